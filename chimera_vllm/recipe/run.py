"""``chimera-vllm recipe``: a trained, evaluated draft of any kind for a target, in one folder.

Stages, each resumable and each recorded in OUT/stages.json with its wall time once finished:

* ``prompts`` (OUT/prompts.jsonl): requests written by the target itself (make-prompts, steered by
  openers), unless prompt files are given;
* ``answers`` (OUT/data.jsonl): the target's greedy answers (make-data);
* ``KIND/train`` (OUT/KIND/train): distillation, the target's hidden states cached once
  (OUT/KIND/hidden.safetensors; a run of less than an epoch is cheaper without), data-parallel under
  torchrun with nproc > 1;
* ``KIND/export`` (OUT/KIND/vllm, baselines only): the draft in vLLM's own format;
* ``KIND/evaluate`` (OUT/KIND/evaluation.json): greedy float32 decoding of the evaluation prompts
  (MT-bench and the held-out requests of other kinds) in vLLM at each K, τ and acceptance by
  position from vLLM's counters, τ by prompt category, outputs checked token for token against
  the target's alone (decoded once per OUT, OUT/baseline.json);
* ``KIND/card`` (OUT/KIND/README.md): the model card.

Prompts and answers sit at OUT's top and serve every kind: drafts of several kinds trained into
one OUT are trained on the same data, which is what a comparison needs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from chimera_vllm.bench.methods import Method
from chimera_vllm.config import HEAD_TYPES
from chimera_vllm.environment import vllm_log_to_file
from chimera_vllm.recipe.args import SERVED_BY, STAGES, RecipeArgs, served_draft
from chimera_vllm.recipe.card import write_card
from chimera_vllm.reference.decoding import DecodeStats
from chimera_vllm.training.make_data import MakeDataArgs, MakePromptsArgs, make_data, make_prompts
from chimera_vllm.training.trainer import TrainArgs, train


class Stages:
    """The finished stages of a recipe folder and their wall times (OUT/stages.json)."""

    def __init__(self, path: Path):
        self.path = path
        self.done: dict[str, dict] = json.loads(path.read_text()) if path.is_file() else {}

    def run(self, name: str, work: Callable[[], object]) -> None:
        """Run work unless the stage is recorded as finished; record it when it returns."""
        if name in self.done:
            print(f"recipe: {name} finished before ({self.done[name]['wall_s']:.0f} s), skipped")
            return
        print(f"recipe: {name}")
        start = time.perf_counter()
        work()
        self.done[name] = {"wall_s": round(time.perf_counter() - start, 1)}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.done, indent=2) + "\n")
        tmp.replace(self.path)


def check_args(args: RecipeArgs) -> None:
    """Refuse bad options before any stage runs."""
    if args.head_type not in SERVED_BY:
        raise ValueError(f"head type {args.head_type!r}: use one of {', '.join(SERVED_BY)} (of {HEAD_TYPES})")
    for name in ("num_prompts", "steps", "batch_size", "nproc", "eval_num_prompts", "num_heads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be 1 or more, got {getattr(args, name)}")
    if args.stop_after not in (None, *STAGES):
        raise ValueError(f"--stop-after {args.stop_after!r}: use one of {', '.join(STAGES)}")
    bad = [k for k in args.eval_ks if not 1 <= k <= args.num_heads]
    if bad or not args.eval_ks:
        raise ValueError(f"--eval-ks {args.eval_ks}: each K must be in 1..{args.num_heads} (the draft's heads)")
    for path in [*(args.prompts or []), *args.eval_prompts, *([args.openers] if args.openers else [])]:
        if not Path(path).is_file():
            raise FileNotFoundError(f"no file at {path}")


def recipe(args: RecipeArgs) -> Path:
    """Run (or resume) every stage; returns the folder of the trained draft's kind (OUT/KIND)."""
    check_args(args)
    out = Path(args.out)
    kind = out / args.head_type
    kind.mkdir(parents=True, exist_ok=True)
    (kind / "recipe_args.json").write_text(json.dumps(asdict(args), indent=2) + "\n")
    stages = Stages(out / "stages.json")
    prompts = args.prompts or [str(out / "prompts.jsonl")]
    work = {
        "prompts": None if args.prompts else lambda: make_prompts(_prompts_args(args, prompts[0])),
        "answers": lambda: make_data(_data_args(args, prompts)),
        "train": lambda: _train(args, kind),
        "export": None if args.head_type == "residual" else lambda: _export(args, kind),
        "evaluate": lambda: _evaluate(args, kind),
    }
    with vllm_log_to_file(out / "vllm.log"):
        for stage in STAGES:
            if work[stage] is not None:
                stages.run(stage if stage in ("prompts", "answers") else f"{args.head_type}/{stage}", work[stage])
            if stage == args.stop_after:
                return kind
    write_card(args, kind, stages.done)
    return kind


def _prompts_args(args: RecipeArgs, path: str) -> MakePromptsArgs:
    return MakePromptsArgs(
        target=args.target,
        out=path,
        count=args.num_prompts,
        engine=args.data_engine,
        seed=args.seed,
        batch_size=args.data_batch_size,
        dtype=args.data_dtype,
        openers=args.openers,
        progress=args.progress,
    )


def _data_args(args: RecipeArgs, prompts: list[str]) -> MakeDataArgs:
    return MakeDataArgs(
        target=args.target,
        prompts=prompts,
        out=str(Path(args.out) / "data.jsonl"),
        max_new_tokens=args.max_new_tokens,
        engine=args.data_engine,
        seed=args.seed,
        batch_size=args.data_batch_size,
        max_prompt_tokens=args.max_length // 2,
        dtype=args.data_dtype,
        progress=args.progress,
    )


def train_args(args: RecipeArgs, kind: Path) -> TrainArgs:
    return TrainArgs(
        target=args.target,
        data=str(Path(args.out) / "data.jsonl"),
        out=str(kind / "train"),
        num_heads=args.num_heads,
        head_type=args.head_type,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        max_length=args.max_length,
        labels=args.labels,
        draft_vocab_size=args.draft_vocab_size,
        hidden_cache=str(kind / "hidden.safetensors") if args.hidden_cache else None,
        seed=args.seed,
        dtype=args.train_dtype,
        save_dtype=args.save_dtype,
        progress=args.progress,
    )


def torchrun_command(train: TrainArgs, nproc: int) -> list[str]:
    """The ``train`` command line of these arguments under torchrun, nproc processes."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command += ["-m", "chimera_vllm.cli", "train"]
    defaults = TrainArgs(target="", data="", out="")
    for name, value in asdict(train).items():
        if name == "progress" or (value == getattr(defaults, name) and name not in ("target", "data", "out")):
            continue  # the bar shows on rank 0 only anyway
        if name == "resume":
            command.append("--no-resume")
        else:
            command += ["--" + name.replace("_", "-"), str(value)]
    return command


def _train(args: RecipeArgs, kind: Path) -> None:
    arguments = train_args(args, kind)
    if args.nproc == 1:
        train(arguments)
    else:
        subprocess.run(torchrun_command(arguments, args.nproc), check=True)


def _export(args: RecipeArgs, kind: Path) -> None:
    from chimera_vllm.model.base import DraftModel, TargetParts
    from chimera_vllm.model.checkpoint import export_vllm_eagle3, export_vllm_medusa
    from chimera_vllm.reference.target import load_target

    draft = DraftModel.from_pretrained(kind / "train")
    if args.head_type == "eagle3":
        export_vllm_eagle3(draft, kind / "vllm")
    else:
        target = load_target(args.target, args.save_dtype or args.train_dtype)
        export_vllm_medusa(draft, TargetParts.from_model(target), kind / "vllm")


def _evaluate(args: RecipeArgs, kind: Path) -> None:
    """One vLLM engine per K; the target's own outputs once per recipe folder (OUT/baseline.json),
    which every kind is compared with token for token. τ overall from vLLM's counters, by prompt
    category from its per-request counts. No speeds: bench measures those, alternating methods."""
    from chimera_vllm.data.prompts import encode, read_prompts
    from chimera_vllm.reference.target import eos_token_ids, generation_config, load_tokenizer
    from chimera_vllm.vllm.engine import close_llm, generate, make_llm

    tokenizer = load_tokenizer(args.target)
    prompts = [p for path in args.eval_prompts for p in read_prompts(path)[: args.eval_num_prompts]]
    encoded = [encode(tokenizer, p) for p in prompts]
    eos = eos_token_ids(tokenizer, generation_config(args.target))
    method = SERVED_BY[args.head_type]

    def decode(m: Method) -> tuple[list[list[int]], DecodeStats]:
        spec = m.spec({method: served_draft(args, kind)})
        engine = dict(max_num_seqs=args.eval_batch_size, enforce_eager=True)
        if spec is not None:  # vLLM refuses per-request counts without speculation
            engine["per_request_spec_decode_metrics"] = "summary"
        llm = make_llm(args.target, spec, "float32", **engine)
        try:
            return generate(llm, encoded, args.eval_max_new_tokens, 0.0, 0, eos, m.k, args.progress)
        finally:
            close_llm(llm)

    settings = {"prompts": args.eval_prompts, "num_prompts": len(prompts), "max_new_tokens": args.eval_max_new_tokens}
    cached = Path(args.out) / "baseline.json"
    baseline = json.loads(cached.read_text()) if cached.is_file() else None
    if baseline is None or baseline["settings"] != settings:
        baseline = {"settings": settings, "outputs": decode(Method("none"))[0]}
        cached.write_text(json.dumps(baseline))
    rows = []
    for k in args.eval_ks:
        outputs, stats = decode(Method(method, k))
        summary = stats.to_dict()
        rows.append({
            "method": f"{method}:{k}", "tau": summary["mean_accepted_length"],
            "acceptance_by_position": summary["acceptance_by_position"],
            "tau_by_category": tau_by_category(prompts, stats),
            "outputs_identical": outputs == baseline["outputs"],
        })  # fmt: skip
    report = {"settings": settings, "target": args.target, "draft": served_draft(args, kind), "rows": rows}
    (kind / "evaluation.json").write_text(json.dumps(report, indent=1) + "\n")


def tau_by_category(prompts: list, stats: DecodeStats) -> dict[str, float]:
    """τ over the requests of each prompt category (a prompt without one counts as "other")."""
    totals: dict[str, list[int]] = {}
    for prompt, steps, accepted in zip(prompts, stats.steps_by_request, stats.accepted_by_request):
        total = totals.setdefault(prompt.category or "other", [0, 0])
        total[0], total[1] = total[0] + steps, total[1] + accepted
    return {category: (steps + accepted) / max(steps, 1) for category, (steps, accepted) in totals.items()}

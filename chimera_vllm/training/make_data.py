"""Self-distillation data: the target's own answers to chat prompts, as token-id sequences,
and prompts written by the target itself (`make_prompts`).

Every prompt is rendered with the tokenizer's chat template and answered by the
target (vLLM offline batch, or the transformers reference decoder). Lines are
appended a batch at a time, so an interrupted run resumes at its last whole
batch; prompt order and sampling seeds depend only on --seed (and the batch
size), so a resumed run writes what an uninterrupted one would have (except
sampled answers from vLLM on CPU, which seeds only the engine there:
docs/vllm-integration.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from chimera_vllm.data import HELDOUT_OTHER_KINDS, MT_BENCH
from chimera_vllm.data.prompts import Prompt, encode, read_prompts
from chimera_vllm.reference.decoding import SpeculativeDecoder
from chimera_vllm.reference.target import load_target, load_tokenizer

HELDOUT_EVAL_SETS = (MT_BENCH, HELDOUT_OTHER_KINDS)


class HeldOutPromptError(ValueError):
    """A training prompt equals a turn of a held-out evaluation set."""


@dataclass
class MakeDataArgs:
    target: str
    prompts: list[str]
    out: str
    max_new_tokens: int = 256
    engine: str = "hf"
    temperature: float = 0.0
    seed: int = 0
    batch_size: int = 32
    limit: int | None = None
    max_prompt_tokens: int | None = None  # skip longer prompts (they leave no room to train on)
    dtype: str = "bfloat16"
    device: str = "cpu"  # hf engine
    progress: bool = True
    vllm_args: dict = field(default_factory=dict)


def heldout_turns(paths: tuple[Path, ...] = HELDOUT_EVAL_SETS) -> set[str]:
    """Every turn of the evaluation sets no training prompt may equal: MT-bench and the requests of
    other kinds (summaries, translation, questions over a passage, math word problems)."""
    turns = set()
    for path in paths:
        if path.is_file():
            lines = path.read_text().splitlines()
            turns.update(t.strip() for line in lines if line.strip() for t in json.loads(line)["turns"])
    return turns


def check_not_heldout(prompts: list[Prompt], heldout: set[str]) -> None:
    for p in prompts:
        if p.text.strip() in heldout:
            raise HeldOutPromptError(f"{p.source}: this prompt is a turn of a held-out evaluation set")


def _complete_batches(path: Path, batch_size: int, total: int) -> int:
    """Lines of the whole batches in path (all total lines once the last, shorter batch is
    written); a batch cut short by a crash is removed.

    Batches (not lines) are the unit of resumption because a batch shares one
    sampling stream and, in bf16, one set of batch-shape-dependent numerics.
    """
    if not path.is_file():
        return 0
    lines = path.read_bytes().split(b"\n")[:-1]  # the last element is b"" or a partial line
    keep = total if len(lines) >= total else len(lines) // batch_size * batch_size
    path.write_bytes(b"".join(line + b"\n" for line in lines[:keep]))
    return keep


@dataclass
class MakePromptsArgs:
    """Chat prompts written by the target (Magpie, arXiv 2406.08464): the chat template up to
    the start of a user message is the whole prompt, so what the target samples next is a user
    request of the kind its instruction tuning saw. Openers steer the kind: with "Explain" after
    the prefix, the target writes a request that begins with it."""

    target: str
    out: str
    count: int  # samples drawn; fewer prompts are kept (duplicates, unfinished, too short, held out)
    max_new_tokens: int = 128
    engine: str = "hf"
    temperature: float = 1.0
    seed: int = 0
    batch_size: int = 256
    min_chars: int = 16  # drop prompts shorter than this after their opener
    dtype: str = "bfloat16"
    device: str = "cpu"  # hf engine
    progress: bool = True
    vllm_args: dict = field(default_factory=dict)
    openers: str | None = None  # a file of openers, one a line: sample i's request starts with opener i mod n


def read_openers(path: str | Path) -> list[str]:
    """The openers of a file, one a line (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no openers file at {path}")
    openers = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not openers:
        raise ValueError(f"{path}: no openers (one a line)")
    return openers


class HFEngine:
    def __init__(self, args: MakeDataArgs | MakePromptsArgs):
        self.target = load_target(args.target, args.dtype, args.device)
        self.args = args

    def __call__(self, prompts: list[list[int]], first_index: int, eos: set[int]) -> list[list[int]]:
        decoder = SpeculativeDecoder(self.target, temperature=self.args.temperature, seed=self.args.seed + first_index)
        outputs, _ = decoder.generate(prompts, self.args.max_new_tokens, eos)
        return outputs

    def close(self) -> None:
        del self.target


class VLLMEngine:
    def __init__(self, args: MakeDataArgs | MakePromptsArgs):
        from chimera_vllm.vllm.engine import make_llm

        self.args = args
        self.llm = make_llm(args.target, dtype=args.dtype, seed=args.seed, **args.vllm_args)

    def __call__(self, prompts: list[list[int]], first_index: int, eos: set[int]) -> list[list[int]]:
        from chimera_vllm.vllm.engine import generate

        a = self.args
        outputs, _ = generate(self.llm, prompts, a.max_new_tokens, a.temperature, a.seed + first_index, eos)
        return outputs

    def close(self) -> None:
        from chimera_vllm.vllm.engine import close_llm

        close_llm(self.llm)


def _check_engine(name: str) -> None:
    if name not in ("hf", "vllm"):
        raise ValueError(f"engine must be hf or vllm, got {name!r}")


@contextlib.contextmanager
def _engine(args: MakeDataArgs | MakePromptsArgs) -> Iterator[HFEngine | VLLMEngine]:
    """The engine, stopped on the way out: a recipe goes on to start others in the same process."""
    engine = (VLLMEngine if args.engine == "vllm" else HFEngine)(args)
    try:
        yield engine
    finally:
        engine.close()


def _eos(tokenizer) -> set[int]:
    return {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()


def make_data(args: MakeDataArgs) -> Path:
    _check_engine(args.engine)
    prompts = [p for path in args.prompts for p in read_prompts(path)]
    heldout = heldout_turns()
    if not heldout:
        warnings.warn(f"{HELDOUT_EVAL_SETS} not found: training prompts are not checked against them", stacklevel=2)
    check_not_heldout(prompts, heldout)
    tokenizer = load_tokenizer(args.target)
    encoded = [encode(tokenizer, p, chat=True) for p in prompts]
    if args.max_prompt_tokens is not None:
        kept = [i for i, ids in enumerate(encoded) if len(ids) <= args.max_prompt_tokens]
        if len(kept) < len(prompts):
            skipped = len(prompts) - len(kept)
            print(f"skipping {skipped} of {len(prompts)} prompts longer than {args.max_prompt_tokens} tokens")
        prompts, encoded = [prompts[i] for i in kept], [encoded[i] for i in kept]
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(args.seed)).tolist()
    if args.limit is not None:
        order = order[: args.limit]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = _complete_batches(out, args.batch_size, len(order))
    if done >= len(order):
        return out
    eos = _eos(tokenizer)
    bar = tqdm(total=len(order), initial=done, unit="prompt", disable=not args.progress)
    with _engine(args) as engine, out.open("a") as f:
        for start in range(done, len(order), args.batch_size):
            batch = [prompts[i] for i in order[start : start + args.batch_size]]
            ids = [encoded[i] for i in order[start : start + args.batch_size]]
            for p, prompt_ids, answer in zip(batch, ids, engine(ids, start, eos)):
                record = {"input_ids": prompt_ids + answer, "prompt_length": len(prompt_ids), "source": p.source}
                f.write(json.dumps(record) + "\n")
            f.flush()
            bar.update(len(batch))
    bar.close()
    return out


def user_turn_prefix(tokenizer) -> list[int]:
    """Token ids of the chat template up to where a user message's text begins."""
    marker = "\x00USER\x00"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    if marker not in rendered:
        raise ValueError(f"the chat template of {tokenizer.name_or_path!r} does not show the user message")
    return tokenizer(rendered[: rendered.index(marker)], add_special_tokens=False).input_ids


def _normalised(text: str) -> str:
    return " ".join(text.lower().split())


def make_prompts(args: MakePromptsArgs) -> Path:
    """Sample args.count user requests from the target; write the distinct finished ones as
    ``{"turns": [text]}`` lines. Resumable: ``<out>.progress`` records the whole batches written."""
    _check_engine(args.engine)
    if args.count < 1 or args.batch_size < 1:
        raise ValueError(f"count and batch_size must be >= 1, got {args.count} and {args.batch_size}")
    openers = read_openers(args.openers) if args.openers else [""]
    tokenizer = load_tokenizer(args.target)
    prefix, eos = user_turn_prefix(tokenizer), _eos(tokenizer)
    if not eos:
        raise ValueError(f"{args.target}: the tokenizer has no eos token to end a user message")
    out, progress = Path(args.out), Path(args.out + ".progress")
    out.parent.mkdir(parents=True, exist_ok=True)
    state = json.loads(progress.read_text()) if progress.is_file() else {"samples_done": 0, "lines": 0}
    done, kept_lines = state["samples_done"], state["lines"]
    kept = out.read_text().splitlines()[:kept_lines] if out.is_file() else []
    out.write_text("".join(line + "\n" for line in kept))  # drops lines of a batch cut short
    seen = {_normalised(t) for t in heldout_turns()} | {_normalised(json.loads(line)["turns"][0]) for line in kept}
    if done >= args.count:
        return out
    opener_ids = [tokenizer(o, add_special_tokens=False).input_ids for o in openers]
    bar = tqdm(total=args.count, initial=done, unit="sample", disable=not args.progress)
    with _engine(args) as engine, out.open("a") as f:
        for start in range(done, args.count, args.batch_size):
            n = min(args.batch_size, args.count - start)
            chosen = [(start + i) % len(openers) for i in range(n)]
            for i, ids in enumerate(engine([prefix + opener_ids[c] for c in chosen], start, eos)):
                opener = openers[chosen[i]]
                text = tokenizer.decode(opener_ids[chosen[i]] + ids, skip_special_tokens=True).strip()
                key = _normalised(text)
                if not ids or ids[-1] not in eos or len(text) < args.min_chars + len(opener) or key in seen:
                    continue
                seen.add(key)
                source = f"{args.target} seed {args.seed} sample {start + i}" + (
                    f" opener {opener!r}" if opener else ""
                )
                f.write(json.dumps({"turns": [text], "source": source}) + "\n")
                kept_lines += 1
            f.flush()
            tmp = progress.with_suffix(".tmp")
            tmp.write_text(json.dumps({"samples_done": start + n, "lines": kept_lines}))
            os.replace(tmp, progress)
            bar.update(n)
    bar.close()
    return out

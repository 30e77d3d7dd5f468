"""Training loop: single process or torchrun (DDP), periodic checkpoints, exact resume.

The target is frozen and runs once per batch for its final hidden states; only
the draft's weights train. A run directory holds the final draft (config.json,
model.safetensors), ``train_log.jsonl``, ``loss.png`` and ``checkpoint/`` (the
latest draft, optimizer state and step, rewritten every ``save_every`` steps).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from chimera_vllm.model.base import DraftModel, TargetParts
from chimera_vllm.model.checkpoint import check_draft_shape, draft_shape_options, init_draft
from chimera_vllm.reference.target import final_and_aux_hidden, load_target
from chimera_vllm.training.data import (
    batch_indices,
    collate,
    frequent_response_tokens,
    read_sequences,
    response_coverage,
)
from chimera_vllm.training.hidden_cache import HiddenCache, cache_key, open_hidden_cache
from chimera_vllm.training.objective import ChimeraObjective, GreedyLabels, LossWeights


@dataclass
class TrainArgs:
    target: str
    data: str
    out: str
    init_draft: str | None = None
    # A fresh draft's shape (None: init_draft's default); with init_draft, each given one must match it.
    num_heads: int | None = None
    trigram_mlp: str | None = None
    head_type: str | None = None
    intermediate_size: int | None = None
    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_length: int = 512
    max_positions: int | None = None  # trained positions per step (all when None)
    step_decay: float = 0.8
    mse_weight: float = 1.0
    kl_weight: float = 0.0
    labels: str = "data"  # "data": the data's next tokens; "target": the target's greedy choice there
    draft_vocab_size: int | None = None  # train (and draft) over the data's most frequent tokens only
    hidden_cache: str | None = None  # file for the target's hidden states, computed once for all epochs
    save_every: int = 200
    log_every: int = 10
    seed: int = 0
    dtype: str = "float32"
    save_dtype: str | None = None  # the final draft's weights (e.g. bfloat16, as shipped); checkpoints keep theirs
    resume: bool = True
    progress: bool = True


LABEL_SOURCES = ("data", "target")
SAVE_DTYPES = ("float32", "bfloat16", "float16")
TRAIN_LOG = "train_log.jsonl"
"""One JSON line of metrics per logged step, in the folder that ``train --out`` writes."""


def learning_rate(args: TrainArgs, step: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    frac = (step - args.warmup_steps) / max(args.steps - args.warmup_steps, 1)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def _save_optimizer(opt: torch.optim.Optimizer, directory: Path) -> None:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{name}"] = value.contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    save_file(tensors, str(directory / "optimizer.safetensors"))
    (directory / "optimizer.json").write_text(json.dumps({"param_groups": sd["param_groups"], "scalars": scalars}))


def _load_optimizer(opt: torch.optim.Optimizer, directory: Path) -> None:
    meta = json.loads((directory / "optimizer.json").read_text())
    state: dict[int, dict] = {}
    for key, value in load_file(str(directory / "optimizer.safetensors")).items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _save_checkpoint(draft: DraftModel, opt, step: int, history: list[dict], out: Path) -> None:
    tmp = out / "checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    draft.save_pretrained(tmp / "draft")
    _save_optimizer(opt, tmp)
    (tmp / "state.json").write_text(json.dumps({"step": step, "history": history}))
    final = out / "checkpoint"
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def plot_history(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    steps = [h["step"] for h in history]
    ax1.plot(steps, [h["loss"] for h in history], label="total")
    for key in sorted(k for k in history[-1] if k.startswith("ce_")):
        ax1.plot(steps, [h.get(key, float("nan")) for h in history], label=key, alpha=0.7)
    ax1.set_xlabel("step"), ax1.set_ylabel("loss"), ax1.set_yscale("log"), ax1.legend()
    for key in sorted(k for k in history[-1] if k.startswith("top1_")):
        ax2.plot(steps, [h.get(key, float("nan")) for h in history], label=f"head {key[5:]} top-1")
    ax2.set_xlabel("step"), ax2.set_ylabel("training top-1 accuracy"), ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def read_train_log(run: Path) -> list[dict]:
    """The metrics ``train`` logged in the folder run (its ``--out``)."""
    log = run / TRAIN_LOG
    if not log.is_file():
        raise FileNotFoundError(f"no training log at {log} (give the folders that train --out wrote)")
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def plot_runs(runs: dict[str, list[dict]], path: Path) -> None:
    """Training curves of several runs on shared axes: head-0 cross-entropy, and training top-1
    of every head (one colour per run, one line style per head)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    styles = ["-", "--", "-.", ":"]
    for colour, (name, history) in enumerate(runs.items()):
        steps = [h["step"] for h in history]
        ax1.plot(steps, [h["ce_0"] for h in history], color=f"C{colour}", label=name)
        heads = sorted(int(k[5:]) for k in history[-1] if k.startswith("top1_"))
        for head in heads:
            ax2.plot(
                steps,
                [h[f"top1_{head}"] for h in history],
                color=f"C{colour}",
                linestyle=styles[head % len(styles)],
                label=f"{name}, head {head}",
            )
    ax1.set_xlabel("step"), ax1.set_ylabel("head 0 cross-entropy"), ax1.set_yscale("log"), ax1.legend()
    ax2.set_xlabel("step"), ax2.set_ylabel("training top-1 accuracy"), ax2.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _check_args(args: TrainArgs) -> dict:
    """Refuse bad options before anything loads; returns the draft-shape options."""
    if args.labels not in LABEL_SOURCES:
        raise ValueError(f"labels {args.labels!r}: use one of {', '.join(LABEL_SOURCES)}")
    if args.save_dtype not in (None, *SAVE_DTYPES):
        raise ValueError(f"save_dtype {args.save_dtype!r}: use one of {', '.join(SAVE_DTYPES)}")
    shape = draft_shape_options(args)
    if args.init_draft:
        check_draft_shape(args.init_draft, shape)
    return shape


def _starting_draft(args: TrainArgs, target, shape: dict, device: str, verbose: bool) -> tuple[DraftModel, int, list]:
    """(draft, first step, history): the checkpoint's when resuming, else a fresh or continued draft
    with its draft vocabulary."""
    ckpt = Path(args.out) / "checkpoint"
    if args.resume and (ckpt / "state.json").is_file():
        state = json.loads((ckpt / "state.json").read_text())
        return (
            DraftModel.from_pretrained(ckpt / "draft", target.config, device=device),
            state["step"],
            state["history"],
        )
    if args.init_draft:
        draft = DraftModel.from_pretrained(args.init_draft, target.config, device=device)
    else:
        draft = init_draft(target, args.target, seed=args.seed, **shape)
    vocab_size = target.config.vocab_size
    if args.draft_vocab_size:
        ids, coverage = frequent_response_tokens([args.data], vocab_size, args.draft_vocab_size)
        draft.set_draft_vocab(ids)
        if verbose:
            print(f"draft vocabulary: {args.draft_vocab_size} tokens cover {coverage:.1%} of the responses")
    elif draft.draft_vocab is not None and verbose:
        coverage = response_coverage([args.data], vocab_size, draft.draft_vocab)
        print(
            f"draft vocabulary (--init-draft's): {len(draft.draft_vocab)} tokens cover {coverage:.1%} of the responses"
        )
    return draft, 0, []


def _hidden_cache(
    args: TrainArgs, target, data: list, aux_layers: list[int] | None, rank: int, world: int
) -> HiddenCache | None:
    """The target's hidden states of the data (and those of the layers an EAGLE-3 draft reads),
    computed once by rank 0 (None without --hidden-cache)."""
    if not args.hidden_cache:
        return None
    key = cache_key(args.target, args.data, args.max_length, target.dtype, aux_layers)
    cache = open_hidden_cache(target, data, args.hidden_cache, key, args.progress) if rank == 0 else None
    if world > 1:
        dist.barrier()
    return cache or HiddenCache(args.hidden_cache)


def _save_final(args: TrainArgs, draft: DraftModel, opt, history: list[dict], out: Path) -> None:
    """The last checkpoint, the log and its plot, and the draft itself (in --save-dtype)."""
    _save_checkpoint(draft, opt, args.steps, history, out)
    with (out / TRAIN_LOG).open("w") as f:
        f.writelines(json.dumps(h) + "\n" for h in history)
    if history:
        plot_history(history, out / "loss.png")
    final = draft.eval()
    if args.save_dtype is not None:
        final = final.to(getattr(torch, args.save_dtype))  # after the checkpoint, which keeps training's
    final.save_pretrained(out)


def train(args: TrainArgs) -> Path:
    """Train a Chimera draft; returns the run directory (which holds the final draft)."""
    shape = _check_args(args)
    rank, world = _distributed()
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    target = load_target(args.target, args.dtype, device)
    parts = TargetParts.from_model(target)
    data = read_sequences(args.data, target.config.vocab_size, args.max_length)
    draft, start, history = _starting_draft(args, target, shape, device, verbose=rank == 0)
    # float32 master weights; with a bf16/fp16 target the forward runs under autocast.
    draft = draft.to(device=device, dtype=torch.float32).train()
    autocast = torch.autocast(torch.device(device).type, dtype=target.dtype, enabled=target.dtype != torch.float32)
    weights = LossWeights.geometric(draft.num_heads, args.step_decay, args.mse_weight, args.kl_weight)
    chimera_objective = ChimeraObjective(draft, parts, weights, args.max_positions)
    objective: torch.nn.Module = chimera_objective
    if world > 1:
        objective = DistributedDataParallel(objective, find_unused_parameters=True)
    opt = torch.optim.AdamW(draft.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    if start:
        _load_optimizer(opt, out / "checkpoint")
    aux_layers = draft.config.aux_layers
    cache = _hidden_cache(args, target, data, aux_layers, rank, world)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_args.json").write_text(json.dumps(asdict(args), indent=2))
    greedy = GreedyLabels(parts.lm_head_weight, [len(s.input_ids) for s in data]) if args.labels == "target" else None
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=rank != 0 or not args.progress)
    for step in bar:
        indices = batch_indices(len(data), args.batch_size, step, args.seed, rank, world)
        ids, attn, labels = (t.to(device) for t in collate([data[i] for i in indices]))
        if cache is not None:
            hidden = cache.batch(indices, ids.shape[1]).to(device)
            aux = cache.batch(indices, ids.shape[1], "aux").to(device) if aux_layers else None
        else:
            with torch.no_grad():
                hidden, aux = final_and_aux_hidden(target, ids, aux_layers, attn.long())
        chimera_objective.reseed(args.seed * 1_000_003 + step * world + rank)
        with autocast:
            next_tokens = greedy.batch(indices, hidden)[:, :-1] if greedy is not None else None
            loss, metrics = objective(ids, hidden, labels, next_tokens, aux)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), args.grad_clip)
        for group in opt.param_groups:
            group["lr"] = learning_rate(args, step)
        opt.step()
        done = step + 1
        if rank == 0 and (done % args.log_every == 0 or done == args.steps):
            history.append({"step": done, **metrics})
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", top1_0=f"{metrics.get('top1_0', 0):.2f}")
        if rank == 0 and done % args.save_every == 0 and done < args.steps:
            _save_checkpoint(draft, opt, done, history, out)
    if rank == 0:
        _save_final(args, draft, opt, history, out)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return out

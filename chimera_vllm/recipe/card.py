"""The model card a recipe writes beside its draft: what it was trained on, for how long, how big it
is and how often the target accepts its tokens, so that a draft can be compared with another."""

from __future__ import annotations

import json
from pathlib import Path

from chimera_vllm.bench.report import markdown
from chimera_vllm.model.base import DraftModel
from chimera_vllm.recipe.args import SERVED_BY, RecipeArgs, served_draft

KIND_NAMES = {"residual": "Chimera", "eagle3": "EAGLE-3", "medusa": "Medusa"}


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def data_summary(path: Path) -> tuple[int, int]:
    """(sequences, response tokens) of a token-id JSONL file."""
    sequences = tokens = 0
    with path.open() as f:
        for line in f:
            record = json.loads(line)
            sequences += 1
            tokens += len(record["input_ids"]) - record.get("prompt_length", 0)
    return sequences, tokens


def evaluation_rows(kind: Path) -> tuple[list[list[str]], list[list[str]]]:
    """(method, τ, acceptance by position, identity) of each row of the evaluation, and τ by prompt
    category (one row per category, one column per method)."""
    rows = json.loads((kind / "evaluation.json").read_text())["rows"]
    overall = [
        [
            r["method"],
            f"{r['tau']:.2f}",
            " / ".join(f"{a:.2f}" for a in r["acceptance_by_position"]),
            "yes" if r["outputs_identical"] else "NO",
        ]
        for r in rows
    ]
    categories = sorted({c for r in rows for c in r["tau_by_category"]})
    by_category = [[c] + [f"{r['tau_by_category'].get(c, float('nan')):.2f}" for r in rows] for c in categories]
    return overall, by_category


def write_card(args: RecipeArgs, kind: Path, stages: dict[str, dict]) -> Path:
    """kind/README.md from the recipe's outputs (stages: stages.json's wall times)."""
    name = KIND_NAMES[args.head_type]
    draft = DraftModel.from_pretrained(kind / "train")
    dtype_bytes = 2 if (args.save_dtype or args.train_dtype) in ("bfloat16", "float16") else 4
    sequences, tokens = data_summary(Path(args.out) / "data.jsonl")
    prompts = ", ".join(args.prompts) if args.prompts else f"{args.num_prompts} samples written by the target"
    wall = {stage: duration(v["wall_s"]) for stage, v in stages.items()}
    overall, by_category = evaluation_rows(kind)
    method = SERVED_BY[args.head_type]
    spec = {"method": method, "model": served_draft(args, kind), "num_speculative_tokens": max(args.eval_ks)}
    if args.head_type == "residual":
        spec.pop("method")
    lines = [
        f"# {name} draft for {args.target}",
        "",
        f"Made by `chimera-vllm recipe --head-type {args.head_type}`. Serve it with vLLM:",
        "",
        f"    vllm serve {args.target} --speculative-config '{json.dumps(spec)}'",
        "",
        "## Data",
        "",
        f"- prompts: {prompts}; the target's greedy answers (≤ {args.max_new_tokens} new tokens, "
        f"{args.data_dtype}): {sequences} sequences, {tokens} response tokens",
        f"- wall time: prompts {wall.get('prompts', '-')}, answers {wall.get('answers', '-')}",
        "",
        "## Training",
        "",
        f"- {args.steps} steps of batch {args.batch_size} x {args.nproc} process(es), lr {args.lr} "
        f"(warm-up {args.warmup_steps}, cosine), labels: {args.labels}, {args.train_dtype}, "
        f"saved in {args.save_dtype or args.train_dtype}",
        f"- draft vocabulary: {draft.config.draft_vocab_size or 'the whole vocabulary'}; "
        f"{draft.num_heads} draft steps at most",
        f"- wall time: {wall.get(f'{args.head_type}/train', '-')} "
        f"({'building the hidden-state cache included' if args.hidden_cache else 'the target run every step'})",
        f"- parameters: {sum(p.numel() for p in draft.parameters()):,}; bytes read per draft token: "
        f"{draft.weights_read_per_step() * dtype_bytes:,} ({dtype_bytes}-byte weights, LM-head rows included)",
        "",
        "![loss curves](train/loss.png)",
        "",
        "## Evaluation",
        "",
        f"{', '.join(Path(p).name for p in args.eval_prompts)} (held out), greedy, float32, ≤ "
        f"{args.eval_max_new_tokens} new tokens, vLLM batch {args.eval_batch_size}; τ (tokens per target "
        "step) and acceptance by position from vLLM's counters; outputs compared token for token with the "
        f"target's alone ({wall.get(f'{args.head_type}/evaluate', '-')}):",
        "",
        markdown(["method", "τ", "acceptance by position", "outputs identical"], overall),
        "",
        "τ by prompt category (vLLM's per-request counts):",
        "",
        markdown(["category", *(row[0] for row in overall)], by_category),
        "",
    ]
    card = kind / "README.md"
    card.write_text("\n".join(lines))
    return card

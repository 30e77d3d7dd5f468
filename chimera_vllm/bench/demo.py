"""The README's first command: SmolLM2-135M-Instruct in vLLM on MT-bench turn 1, with and without Chimera.

vLLM offline batch inference, greedy, over first-turn MT-bench questions (24 of the 80 by
default, spread over the categories, so that every kind of request is in a short run):
one engine without speculation and one with the Chimera draft shipped in
chimera_vllm/drafts, prompt lookup beside it (docs/vllm-integration.md). Prints output
tokens/s, per-token latency, mean accepted length, speedup and whether the outputs are
identical, and writes the report (JSON, markdown, PNG) and vLLM's log under --out
(``chimera-vllm demo``; ``make demo`` sets up .venv and the target first).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from chimera_vllm.bench.methods import Method
from chimera_vllm.bench.throughput import Row, identity, run, write_report
from chimera_vllm.data import MT_BENCH
from chimera_vllm.data.prompts import encode_prompts
from chimera_vllm.drafts import resolve_draft
from chimera_vllm.environment import vllm_log_to_file
from chimera_vllm.reference.fetch import PACKAGED_TARGETS
from chimera_vllm.reference.target import eos_token_ids, generation_config, load_tokenizer

TARGET = PACKAGED_TARGETS["smollm2-135m"].hub_name
DRAFT = "smollm2-135m-instruct"
PROMPTS = MT_BENCH


def spread(items: list, n: int) -> list:
    """n items taken at even strides across the list, first one included (all of them if n >= len)."""
    if n < 1:
        raise ValueError(f"--num-prompts must be at least 1, got {n}")
    if n >= len(items):
        return items
    return [items[i * len(items) // n] for i in range(n)]


def summary(rows: list[Row]) -> str:
    """The demo's table: one line per method, ratios against no speculation."""
    lines = [f"{'method':<20}{'tok/s':>8}{'ms/token':>10}{'τ':>7}{'speedup':>9}  identical to no-spec"]
    for r in rows:
        same = identity(r)
        if r.match_rate is not None and not r.outputs_identical:
            same += "; every divergence at a near-tie" if r.only_near_ties else "; NOT only near-ties"
        speedup = "-" if r.speedup is None else f"{r.speedup:.2f}x"
        lines.append(
            f"{r.method:<20}{r.output_tokens_per_s:>8.1f}{r.ms_per_output_token:>10.1f}"
            f"{r.mean_accepted_length:>7.2f}{speedup:>9}  {same}"
        )
    return "\n".join(lines)


def run_demo(args: argparse.Namespace, command: str) -> None:
    """Both engines on the same prompts, then the summary; vLLM's log goes to OUT.log unless
    --show-vllm-log, so that the console shows the progress bars and the result."""
    out = Path(args.out)
    log = None if args.show_vllm_log else out.with_suffix(".log")
    draft = resolve_draft(args.draft)
    tokenizer = load_tokenizer(args.target)
    prompts = spread(encode_prompts(args.prompts, tokenizer), args.num_prompts)
    methods = [Method("none"), Method.chimera(args.num_speculative_tokens, args.lookup_tokens)]
    print(f"{args.target}, {len(prompts)} MT-bench turn-1 prompts, {args.max_new_tokens} new tokens, greedy,")
    print(f"{args.dtype}, batch {args.batch_size}; draft {draft}")
    eos = eos_token_ids(tokenizer, generation_config(args.target))
    with vllm_log_to_file(log):
        rows = run(
            args.target,
            {"chimera": draft},
            prompts,
            methods,
            [args.batch_size],
            [args.dtype],
            [0.0],
            args.max_new_tokens,
            eos,
            progress=True,
        )
    extra = {k: v for k, v in vars(args).items() if k != "func"}
    write_report(rows, out, command, extra)
    print("\n" + summary(rows))
    print(f"\nreport: {out}.md, {out}.json; chart: {out}.png" + ("" if log is None else f"; vLLM's log: {log}"))

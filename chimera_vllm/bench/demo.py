"""The README's first command: SmolLM2-135M-Instruct in vLLM on MT-bench turn 1, with and without Chimera.

vLLM offline batch inference, greedy, over first-turn MT-bench questions (24 of the 80,
spread over the categories, so that a second run takes under 5 minutes on a 2-core CPU):
one engine without speculation and one with the Chimera draft shipped in
chimera_vllm/drafts, prompt lookup beside it (docs/vllm-integration.md). Prints output
tokens/s, per-token latency, mean accepted length, speedup and whether the outputs are
identical, and writes the report (JSON, markdown, PNG) under --out. ``make demo`` sets up .venv and the target first.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from chimera_vllm.bench.throughput import Method, Row, identity, run, write_report
from chimera_vllm.data import MT_BENCH
from chimera_vllm.data.prompts import encode_prompts
from chimera_vllm.drafts import resolve_draft
from chimera_vllm.environment import logs_to_stderr, use_offline_hub
from chimera_vllm.reference.fetch import PACKAGED_TARGETS
from chimera_vllm.reference.target import eos_token_ids, generation_config, load_tokenizer

TARGET = PACKAGED_TARGETS["smollm2-135m"].hub_name
DRAFT = "smollm2-135m-instruct"
PROMPTS = MT_BENCH


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m chimera_vllm.bench.demo", description=__doc__.splitlines()[0])
    p.add_argument("--target", default=TARGET)
    p.add_argument("--draft", default=DRAFT, help="a draft directory or a shipped draft's name")
    p.add_argument("--prompts", default=str(PROMPTS))
    p.add_argument(
        "--num-prompts",
        type=int,
        default=24,
        help="prompts taken evenly across the file (MT-bench: 3 of each category's 10 questions); 80: all",
    )
    p.add_argument(
        "--num-speculative-tokens",
        type=int,
        default=1,
        help="the draft model's tokens per step; 1: on a CPU in float32 the draft's weights, read once per "
        "draft token, cost more than a second draft token gains (benchmarks/results/throughput-cpu-fp32-avx2.md; "
        "with AVX-512 too: throughput-cpu-fp32-avx512-lookup-b4.md)",
    )
    p.add_argument(
        "--lookup-tokens",
        type=int,
        default=4,
        help="prompt lookup beside the draft: where the text so far matches, up to this many tokens of what "
        "followed the match (0: off; benchmarks/results/throughput-cpu-fp32-avx2-lookup.md)",
    )
    p.add_argument("--batch-size", type=int, default=4, help="vLLM's max_num_seqs")
    p.add_argument("--dtype", default="float32", help="float32: outputs reproducible token for token")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--out", default="runs/demo/mt-bench")
    return p.parse_args(argv)


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    use_offline_hub()
    logs_to_stderr()
    draft = resolve_draft(args.draft)
    tokenizer = load_tokenizer(args.target)
    prompts = spread(encode_prompts(args.prompts, tokenizer), args.num_prompts)
    methods = [Method("none"), Method.chimera(args.num_speculative_tokens, args.lookup_tokens)]
    print(f"{args.target}, {len(prompts)} MT-bench turn-1 prompts, {args.max_new_tokens} new tokens, greedy,")
    print(f"{args.dtype}, batch {args.batch_size}; draft {draft}")
    rows = run(
        args.target,
        {"chimera": draft},
        prompts,
        methods,
        [args.batch_size],
        [args.dtype],
        [0.0],
        args.max_new_tokens,
        eos_token_ids(tokenizer, generation_config(args.target)),
        progress=True,
    )
    out = Path(args.out)
    write_report(rows, out, "python -m chimera_vllm.bench.demo " + " ".join(argv or sys.argv[1:]), vars(args))
    print("\n" + summary(rows))
    print(f"\nreport: {out}.md, {out}.json; chart: {out}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Cost of one linear layer on a CPU against the number of token rows M: vLLM's CPU GEMM
dispatch (what vLLM's layers run; chimera_vllm/vllm_cpu_gemm.py) and torch's F.linear.

    python benchmarks/cpu_gemm.py [--threads 1] [--dtype bfloat16] [--out benchmarks/results/cpu-gemm]

Two things follow from it for speculative decoding on a CPU: verifying K draft tokens per request
is nearly free only while batch x (K + 1) stays in the flat, bandwidth-bound part of the curve,
and a draft's own matmuls must not run through F.linear. Shapes: SmolLM2-135M's layers and the
Chimera draft's own weights. Prints a table; writes OUT.json and OUT.md.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {  # name: (N, K) of the weight [N, K]
    "target gate_up_proj": (3072, 576),
    "target down_proj": (576, 1536),
    "target qkv_proj": (960, 576),
    "target lm_head": (49152, 576),
    "draft trigram ResBlock": (1728, 1728),
    "draft trigram out": (576, 1728),
    "draft residual head": (576, 1152),
    "draft LM head (8192 tokens)": (8192, 576),
}
ROWS = (1, 2, 4, 8, 16, 48)


def time_us(fn, x: torch.Tensor, budget_s: float = 0.2) -> float:
    """Median of 5 timings, each over as many calls as fit in budget_s / 5."""
    for _ in range(3):
        fn(x)
    start = time.perf_counter()
    fn(x)
    calls = max(1, int(budget_s / 5 / max(time.perf_counter() - start, 1e-6)))
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn(x)
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return sorted(samples)[2]


def main() -> None:
    from chimera_vllm.bench import run_info, write_result_files
    from chimera_vllm.vllm_cpu_gemm import CpuLinear

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="vLLM's CPU worker runs the model on one core here")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    rows = []
    for name, (n, k) in SHAPES.items():
        weight = torch.randn(n, k, dtype=dtype) / k**0.5
        vllm_linear = CpuLinear(weight)
        for m in ROWS:
            x = torch.randn(m, k, dtype=dtype)
            vllm_us = time_us(vllm_linear, x)
            torch_us = time_us(lambda x, w=weight: F.linear(x, w), x)
            rows.append({"weight": name, "N": n, "K": k, "M": m, "vllm_us": vllm_us, "torch_us": torch_us})
    header = "| weight [N, K] | " + " | ".join(f"M={m}" for m in ROWS) + " |"
    lines = [header, "|---|" + "---|" * len(ROWS)]
    for name, (n, k) in SHAPES.items():
        cells = [f"{r['vllm_us']:.0f} ({r['torch_us']:.0f})" for r in rows if r["weight"] == name]
        lines.append(f"| {name} [{n}, {k}] | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        info = run_info("python benchmarks/cpu_gemm.py " + " ".join(sys.argv[1:]))
        info.update(threads=args.threads, dtype=args.dtype)
        title = "One linear layer on a CPU: µs per call, vLLM's CPU GEMM (torch F.linear)"
        write_result_files(Path(args.out), title, info, {"rows": rows}, table)


if __name__ == "__main__":
    main()

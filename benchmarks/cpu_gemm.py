"""Cost of one linear layer on a CPU against the number of token rows M: vLLM's CPU GEMM
dispatch (what vLLM's layers run), vLLM's small-GEMM kernel (``weight_packed_linear``) and
torch's F.linear.

    python benchmarks/cpu_gemm.py [--threads 1] [--dtype bfloat16] [--cold] [--out benchmarks/results/cpu-gemm]

Three things follow from it for speculative decoding on a CPU: verifying K draft tokens per
request is nearly free only while batch x (K + 1) stays in the flat, bandwidth-bound part of the
curve; a draft's own matmuls must not run through F.linear; and where the small-GEMM kernel beats
vLLM's choice for a few rows, the draft takes it (chimera_vllm/vllm_cpu_gemm.py). ``--cold``
evicts the caches before every call, as a target forward does between two draft steps. Shapes:
SmolLM2-135M's layers and the Chimera draft's own weights. Prints a table; writes OUT.json and OUT.md.
"""

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

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
    "draft encoder gate_up_proj": (4608, 576),
    "draft encoder down_proj": (576, 2304),
    "draft LM head (8192 tokens)": (8192, 576),
}
ROWS = (1, 2, 4, 8, 16, 48)
IMPLEMENTATIONS = ("vllm", "small", "torch")
EVICT_BYTES = 128 << 20  # several times any L3 this project has run on


def time_us(fn: Callable, x: torch.Tensor, budget_s: float = 0.2) -> float:
    """Median of 5 timings, each over as many calls as fit in budget_s / 5 (the weight stays cached)."""
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


def time_cold_us(fn: Callable, x: torch.Tensor, evict: torch.Tensor, calls: int = 21) -> float:
    """Median of single calls, each after reading an evict buffer larger than the caches."""
    for _ in range(3):
        fn(x)
    samples = []
    for _ in range(calls):
        evict.sum()
        start = time.perf_counter()
        fn(x)
        samples.append((time.perf_counter() - start) * 1e6)
    return sorted(samples)[calls // 2]


def implementations(weight: torch.Tensor) -> dict[str, Callable | None]:
    """x -> x weightᵀ three ways; the small-GEMM kernel is None where this vLLM build lacks it or the
    CPU has no AVX512-BF16 (vLLM itself runs it only with AMX)."""
    from vllm._custom_ops import weight_packed_linear_cpu
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    layer = SimpleNamespace(weight=weight, bias=None)
    dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
    small = None
    if torch.cpu._is_avx512_bf16_supported() and hasattr(torch.ops._C, "convert_weight_packed"):
        packed = torch.ops._C.convert_weight_packed(weight)
        small = lambda x: weight_packed_linear_cpu(x, packed, weight.shape[0], None)  # noqa: E731
    return {"vllm": lambda x: layer.cpu_linear(x, weight, None), "small": small, "torch": lambda x: F.linear(x, weight)}


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def main() -> None:
    from chimera_vllm.bench.report import run_info, write_result_files

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="vLLM's CPU worker gives the model one core by default")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--cold", action="store_true", help="evict the caches before every call")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    evict = torch.ones(EVICT_BYTES // 4)
    rows = []
    for name, (n, k) in SHAPES.items():
        weight = torch.randn(n, k, dtype=dtype) / k**0.5
        impls = implementations(weight)
        for m in ROWS:
            x = torch.randn(m, k, dtype=dtype)
            row = {"weight": name, "N": n, "K": k, "M": m}
            for label, fn in impls.items():
                row[f"{label}_us"] = None if fn is None else time_cold_us(fn, x, evict) if args.cold else time_us(fn, x)
            rows.append(row)
    header = "| weight [N, K] | " + " | ".join(f"M={m}" for m in ROWS) + " |"
    lines = [header, "|---|" + "---|" * len(ROWS)]
    for name, (n, k) in SHAPES.items():
        cells = [" / ".join(_us(r[f"{impl}_us"]) for impl in IMPLEMENTATIONS) for r in rows if r["weight"] == name]
        lines.append(f"| {name} [{n}, {k}] | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        info = run_info("python benchmarks/cpu_gemm.py " + " ".join(sys.argv[1:]))
        info.update(threads=args.threads, dtype=args.dtype, caches="evicted before every call" if args.cold else "warm")
        title = "One linear layer on a CPU: µs per call, vLLM's CPU GEMM / vLLM's small-GEMM kernel / torch F.linear"
        write_result_files(Path(args.out), title, info, {"rows": rows}, table)


if __name__ == "__main__":
    main()

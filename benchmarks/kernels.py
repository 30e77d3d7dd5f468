"""Benchmark the Triton kernels against their PyTorch references and torch.compile, on a GPU.

    python benchmarks/kernels.py [--quick]

Times every kernel at H in {576, 4096}, V in {49152, 32000, 128256}, T in {1, 8, 64, 512}
(bf16, median of CUDA-event timings), beside the device's measured ceilings: a large
device-to-device copy (GB/s) and a large bf16 matmul (TFLOP/s). Writes
benchmarks/results/kernels-<device>.md and prints the same table.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from chimera_vllm.kernels.greedy_head import greedy_head_triton
from chimera_vllm.kernels.residual_head import residual_head_reference, residual_head_triton
from chimera_vllm.kernels.trigram import trigram_reference, trigram_triton

DT = torch.bfloat16


def median_ms(fn, reps: int = 50) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def ceilings() -> tuple[float, float]:
    """(copy GB/s counting read + write, bf16 matmul TFLOP/s) measured on this device."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    gbps = 2 * src.numel() / (median_ms(lambda: dst.copy_(src), 20) * 1e-3) / 1e9
    a = torch.randn(8192, 8192, dtype=DT, device="cuda")
    tflops = 2 * 8192**3 / (median_ms(lambda: a @ a, 20) * 1e-3) / 1e12
    return gbps, tflops


def matmul_argmax(hidden: torch.Tensor, lm_head: torch.Tensor) -> torch.Tensor:
    """What greedy drafting costs without the fused kernel: the [T, V] logits, then their arg-max."""
    return F.linear(hidden, lm_head).argmax(-1)


def cases(quick: bool):
    """(kernel, H, V, T, bytes moved, flops, Triton function, PyTorch reference, arguments)."""
    Hs, Vs, Ts = ([576], [49152], [1, 64]) if quick else ([576, 4096], [49152, 32000, 128256], [1, 8, 64, 512])
    randn = lambda *shape, scale=1.0: torch.randn(*shape, dtype=DT, device="cuda") * scale  # noqa: E731
    for H in Hs:
        for T in Ts:
            ids = torch.randint(49152, (T, 3), device="cuda")
            args = (
                ids,
                randn(49152, H, scale=0.02),
                randn(3 * H, 3 * H, scale=(3 * H) ** -0.5),
                randn(3 * H, scale=0.0),
                randn(H, 3 * H, scale=(3 * H) ** -0.5),
            )
            nbytes = (3 * T * H + 12 * H * H + T * H) * 2
            yield "trigram_fused", H, "-", T, nbytes, 2 * T * 12 * H * H, trigram_triton, trigram_reference, args
            args = (
                randn(T, H),
                randn(T, H),
                randn(4, H, 2 * H, scale=(2 * H) ** -0.5),
                randn(4, H, scale=0.0),
                torch.tensor(2, device="cuda"),
            )
            nbytes = (3 * T * H + 2 * H * H) * 2
            yield (
                "residual_head",
                H,
                "-",
                T,
                nbytes,
                4 * T * H * H,
                residual_head_triton,
                residual_head_reference,
                args,
            )
            for V in Vs:
                args = (randn(T, H), randn(V, H, scale=0.02))
                nbytes = (V * H + T * H) * 2
                yield "greedy_draft_head", H, V, T, nbytes, 2 * T * V * H, greedy_head_triton, matmul_argmax, args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a few shapes only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs a CUDA GPU (the kernels run their PyTorch reference on CPU)")
    device = torch.cuda.get_device_name()
    gbps, tflops = ceilings()
    rows = []
    header = (
        f"| kernel | H | V | T | Triton µs | torch µs | compile µs | vs torch | vs compile "
        f"| GB/s (% of {gbps:.0f}) | TFLOP/s (% of {tflops:.0f}) |"
    )
    for name, H, V, T, nbytes, flops, triton_fn, torch_fn, fn_args in cases(args.quick):
        compiled = torch.compile(torch_fn)
        t_tri, t_ref, t_cmp = (median_ms(lambda f=f, a=fn_args: f(*a)) * 1e3 for f in (triton_fn, torch_fn, compiled))
        bw, fl = nbytes / (t_tri * 1e-6) / 1e9, flops / (t_tri * 1e-6) / 1e12
        rows.append(
            f"| {name} | {H} | {V} | {T} | {t_tri:.1f} | {t_ref:.1f} | {t_cmp:.1f} | {t_ref / t_tri:.2f}x "
            f"| {t_cmp / t_tri:.2f}x | {bw:.0f} ({100 * bw / gbps:.0f}%) | {fl:.1f} ({100 * fl / tflops:.0f}%) |"
        )
        print(rows[-1], flush=True)
    sep = "|" + "---|" * (header.count("|") - 1)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = "\n".join(
        [
            f"# Kernel benchmarks on {device}",
            "",
            f"{stamp}; torch {torch.__version__}; {platform.python_version()}; command: `python benchmarks/kernels.py"
            f"{' --quick' if args.quick else ''}`. bf16, median of 50 CUDA-event timings.",
            f"Ceilings measured here: device-to-device copy {gbps:.0f} GB/s, bf16 matmul {tflops:.0f} TFLOP/s.",
            "",
            header,
            sep,
            *rows,
            "",
        ]
    )
    out = Path(__file__).parent / "results" / f"kernels-{device.replace(' ', '-')}.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()

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


def cases(quick: bool):
    Hs, Vs, Ts = ([576], [49152], [1, 64]) if quick else ([576, 4096], [49152, 32000, 128256], [1, 8, 64, 512])
    dev = "cuda"
    for H in Hs:
        for T in Ts:
            ids = torch.randint(49152, (T, 3), device=dev)
            emb = torch.randn(49152, H, dtype=DT, device=dev) * 0.02
            w1 = torch.randn(3 * H, 3 * H, dtype=DT, device=dev) * (3 * H) ** -0.5
            b1 = torch.zeros(3 * H, dtype=DT, device=dev)
            w2 = torch.randn(H, 3 * H, dtype=DT, device=dev) * (3 * H) ** -0.5
            bytes_ = (3 * T * H + 9 * H * H + 3 * H * H + T * H) * 2
            flops = 2 * T * (9 * H * H + 3 * H * H)
            yield ("trigram_fused", H, "-", T, bytes_, flops,
                   lambda: trigram_triton(ids, emb, w1, b1, w2), lambda: trigram_reference(ids, emb, w1, b1, w2),
                   (trigram_reference, (ids, emb, w1, b1, w2)))
            hh, an = torch.randn(T, H, dtype=DT, device=dev), torch.randn(T, H, dtype=DT, device=dev)
            w = torch.randn(4, H, 2 * H, dtype=DT, device=dev) * (2 * H) ** -0.5
            b = torch.zeros(4, H, dtype=DT, device=dev)
            step = torch.tensor(2, device=dev)
            yield ("residual_head", H, "-", T, (3 * T * H + 2 * H * H) * 2, 2 * T * 2 * H * H,
                   lambda: residual_head_triton(hh, an, w, b, step), lambda: residual_head_reference(hh, an, w, b, step),
                   (residual_head_reference, (hh, an, w, b, step)))
            for V in Vs:
                lm = torch.randn(V, H, dtype=DT, device=dev) * 0.02

                def matmul_argmax(hh=hh, lm=lm):
                    return F.linear(hh, lm).argmax(-1)

                yield ("greedy_draft_head", H, V, T, (V * H + T * H) * 2, 2 * T * V * H,
                       lambda hh=hh, lm=lm: greedy_head_triton(hh, lm), matmul_argmax, (matmul_argmax, ()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a few shapes only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs a CUDA GPU (the kernels run their PyTorch reference on CPU)")
    device = torch.cuda.get_device_name()
    gbps, tflops = ceilings()
    rows = []
    header = (f"| kernel | H | V | T | Triton µs | torch µs | compile µs | vs torch | vs compile "
              f"| GB/s (% of {gbps:.0f}) | TFLOP/s (% of {tflops:.0f}) |")
    for name, H, V, T, nbytes, flops, triton_fn, torch_fn, (ref, ref_args) in cases(args.quick):
        compiled = torch.compile(ref)
        t_tri = median_ms(triton_fn) * 1e3
        t_ref = median_ms(torch_fn) * 1e3
        t_cmp = median_ms(lambda: compiled(*ref_args)) * 1e3
        bw, fl = nbytes / (t_tri * 1e-6) / 1e9, flops / (t_tri * 1e-6) / 1e12
        rows.append(f"| {name} | {H} | {V} | {T} | {t_tri:.1f} | {t_ref:.1f} | {t_cmp:.1f} | {t_ref / t_tri:.2f}x "
                    f"| {t_cmp / t_tri:.2f}x | {bw:.0f} ({100 * bw / gbps:.0f}%) | {fl:.1f} ({100 * fl / tflops:.0f}%) |")
        print(rows[-1], flush=True)
    sep = "|" + "---|" * (header.count("|") - 1)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = "\n".join([
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
    ])
    out = Path(__file__).parent / "results" / f"kernels-{device.replace(' ', '-')}.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()

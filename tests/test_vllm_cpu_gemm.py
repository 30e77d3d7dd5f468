"""The draft's own matmuls on vLLM's CPU GEMM path equal the PyTorch modules they replace."""

from __future__ import annotations

import pytest
import torch

from chimera_vllm.model.layers import ResidualHeads, TrigramEncoder

pytest.importorskip("vllm")
from chimera_vllm.vllm.cpu_gemm import (  # noqa: E402
    SMALL_GEMM_MAX_ROWS,
    CpuDraftGemms,
    route_small_batches,
    small_gemm_weight,
)
from kernels.greedy_head import greedy_head_reference  # noqa: E402

from .conftest import load_benchmark  # noqa: E402

V, K = 500, 3
# float32: both paths are float32 GEMMs summing up to 3H = 1728 products in another order (outputs
# of size ~10 here); bf16: both round each output once from float32 accumulators, a few ulps apart.
TOLERANCES = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def _randomized(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.1)
    return module.to(dtype)


# H=64: bf16 weights under 1 MiB take vLLM's small-GEMM kernel on AMX CPUs; H=576 (SmolLM2) takes oneDNN,
# or, on an AVX512-BF16 CPU, the small-GEMM kernel for up to SMALL_GEMM_MAX_ROWS rows (T=5).
@pytest.mark.parametrize("T", [5, 16])
@pytest.mark.parametrize("H", [64, 576])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["resblock", "linear"])
def test_cpu_gemms_match_the_draft_modules(T, H, dtype, kind):
    trigram = _randomized(TrigramEncoder(H, kind), dtype)
    heads = _randomized(ResidualHeads(K, H), dtype)
    gen = torch.Generator().manual_seed(1)
    embed = torch.randn(V, H, generator=gen).to(dtype)
    lm_head = torch.randn(V, H, generator=gen).to(dtype)
    ids = torch.randint(0, V, (T, 3), generator=gen)
    h_hat, anchor = torch.randn(2, T, H, generator=gen).to(dtype)
    cpu = CpuDraftGemms(trigram, heads, lm_head)

    with torch.no_grad():
        torch.testing.assert_close(cpu.trigram(embed[ids].flatten(1)), trigram(ids, embed), **TOLERANCES[dtype])
        for step in range(K):
            expected, _ = heads(step, h_hat, anchor, lm_head)
            torch.testing.assert_close(cpu.residual_head(step, h_hat, anchor), expected, **TOLERANCES[dtype])
        features = torch.randn(T, H, generator=gen).to(dtype)
        if dtype == torch.float32:
            assert torch.equal(cpu.greedy(features), greedy_head_reference(features, lm_head))
        else:  # a bf16 arg-max may pick another token only where the rounded logits tie
            logits = features.float() @ lm_head.float().T
            chosen = logits.gather(1, cpu.greedy(features)[:, None])[:, 0]
            torch.testing.assert_close(chosen, logits.max(dim=1).values, atol=0.1, rtol=0.02)


@pytest.mark.parametrize("bias", [False, True])
def test_small_batch_routing_matches_the_layer_on_both_sides_of_the_threshold(bias):
    """A vLLM linear layer after CPU dispatch (its weight removed), routed: every row count gives x Wᵀ + b."""
    from types import SimpleNamespace

    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    gen = torch.Generator().manual_seed(2)
    weight = (torch.randn(960, 576, generator=gen) / 24).to(torch.bfloat16)
    b = (torch.randn(960, generator=gen) if bias else torch.zeros(960)).to(torch.bfloat16)
    layer = SimpleNamespace(weight=weight.clone(), bias=b if bias else None)
    dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
    route_small_batches(layer, weight)
    for rows in (1, SMALL_GEMM_MAX_ROWS, SMALL_GEMM_MAX_ROWS + 1, 16):
        x = torch.randn(rows, 576, generator=gen).to(torch.bfloat16)
        expected = x.float() @ weight.float().T + b.float()
        out = layer.cpu_linear(x, layer.weight, layer.bias).float()
        torch.testing.assert_close(out, expected, atol=3e-2, rtol=3e-2)


def test_small_gemm_kernel_only_for_aligned_bf16_weights():
    """Float32 drafts (the lossless tests, the demo) and shapes the kernel cannot pack keep vLLM's dispatch."""
    assert small_gemm_weight(torch.zeros(960, 576)) is None
    assert small_gemm_weight(torch.zeros(960, 577, dtype=torch.bfloat16)) is None
    assert small_gemm_weight(torch.zeros(961, 576, dtype=torch.bfloat16)) is None
    on_this_cpu = torch.cpu._is_avx512_bf16_supported()
    assert (small_gemm_weight(torch.zeros(960, 576, dtype=torch.bfloat16)) is not None) == on_this_cpu


def test_gemm_benchmark_times_three_ways_of_the_same_product():
    """benchmarks/cpu_gemm.py: vLLM's dispatch, the small-GEMM kernel and F.linear give x Wᵀ."""
    bench = load_benchmark("cpu_gemm")
    gen = torch.Generator().manual_seed(3)
    weight = (torch.randn(576, 1152, generator=gen) / 34).to(torch.bfloat16)
    x = torch.randn(4, 1152, generator=gen).to(torch.bfloat16)
    impls = bench.implementations(weight)
    assert set(impls) == set(bench.IMPLEMENTATIONS)
    assert (impls["small"] is not None) == torch.cpu._is_avx512_bf16_supported()
    for fn in (fn for fn in impls.values() if fn is not None):
        torch.testing.assert_close(fn(x).float(), x.float() @ weight.float().T, atol=3e-2, rtol=3e-2)


def test_draft_gemm_benchmark_reports_each_setting_s_median():
    """benchmarks/draft_gemm.py's table: every run, then the median of each setting over its rounds."""
    bench = load_benchmark("draft_gemm")
    rows = [
        {"round": r, "setting": s, "tok_s": v, **{label: v + i for i, label in enumerate(bench.TIMED)}}
        for r, (fast, slow) in enumerate([(30.0, 20.0), (36.0, 24.0), (33.0, 22.0)], start=1)
        for s, v in zip(bench.SETTINGS, (fast, slow))
    ]
    medians = [line for line in bench.markdown_table(rows).splitlines() if line.startswith("| median")]
    timed = len(bench.TIMED)
    assert medians == [
        "| median | small-GEMM kernel | 33.00 | " + " | ".join(f"{33 + i}.00" for i in range(timed)) + " |",
        "| median | vLLM's dispatch | 22.00 | " + " | ".join(f"{22 + i}.00" for i in range(timed)) + " |",
    ]


def test_draft_gemm_benchmark_times_methods_that_exist():
    """Every method benchmarks/draft_gemm.py times is where it says (vLLM renames its internals)."""
    import importlib

    bench = load_benchmark("draft_gemm")
    for label, (module, cls, name, per) in bench.TIMED.items():
        assert callable(getattr(getattr(importlib.import_module(module), cls), name, None)), label
        assert per in (bench.STEP, bench.TOKEN), label

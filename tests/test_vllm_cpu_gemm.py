"""The draft's own matmuls on vLLM's CPU GEMM path equal the PyTorch modules they replace."""

from __future__ import annotations

import pytest
import torch

from chimera_vllm.model import ResidualHeads, TrigramEncoder

pytest.importorskip("vllm")
from chimera_vllm.vllm_cpu_gemm import CpuDraftGemms  # noqa: E402
from kernels.greedy_head import greedy_head_reference  # noqa: E402

V, K, T = 500, 3, 5
# float32: both paths are float32 GEMMs summing up to 3H = 1728 products in another order (outputs
# of size ~10 here); bf16: both round each output once from float32 accumulators, a few ulps apart.
TOLERANCES = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def _randomized(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.1)
    return module.to(dtype)


# H=64: bf16 weights under 1 MiB take vLLM's small-GEMM kernel on AMX CPUs; H=576 (SmolLM2) takes oneDNN.
@pytest.mark.parametrize("H", [64, 576])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["resblock", "linear"])
def test_cpu_gemms_match_the_draft_modules(H, dtype, kind):
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

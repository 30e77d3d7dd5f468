"""int8 draft weights on a CPU: per-channel quantization and the int8 GEMM against float matmuls."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("vllm")
from chimera_vllm.model import ResidualHeads, TrigramEncoder  # noqa: E402
from chimera_vllm.vllm_cpu_gemm import CpuDraftGemms  # noqa: E402
from chimera_vllm.vllm_cpu_int8 import Int8CpuLinear, quantize_per_channel  # noqa: E402

# An output is a sum of K products, each off by up to half a quantization step of its weight
# (1/254 of its row's largest) and of its activation (1/254 of its row's largest); with random
# signs the errors add up to ~1% of an output row's norm for Gaussian data. Bound: 3%.
MAX_RELATIVE_ERROR = 0.03


def test_per_channel_quantization_rounds_each_weight_to_its_rows_step():
    torch.manual_seed(0)
    w = torch.randn(64, 96) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different sizes
    w[5] = 0
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and scale.shape == (64,)
    assert (q.abs().amax(dim=1)[w.abs().amax(dim=1) > 0] == 127).all()  # each row uses its whole range
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 * (1 + 1e-6)).all()
    assert (q[5] == 0).all()


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    return float(((out.float() - expected).norm(dim=-1) / expected.norm(dim=-1)).max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1,), (7,), (2, 3)])
def test_int8_linear_matches_the_float_matmul(dtype, shape):
    gen = torch.Generator().manual_seed(1)
    w, b = torch.randn(1000, 576, generator=gen) / 24, torch.randn(1000, generator=gen) / 10
    x = torch.randn(*shape, 576, generator=gen)
    out = Int8CpuLinear(w.to(dtype), b.to(dtype))(x.to(dtype))
    assert out.dtype == dtype and out.shape == (*shape, 1000)
    assert relative_error(out, F.linear(x, w, b)) < MAX_RELATIVE_ERROR
    no_bias = Int8CpuLinear(w.to(dtype))(x.to(dtype))
    assert relative_error(no_bias, F.linear(x, w)) < MAX_RELATIVE_ERROR


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_draft_gemms_follow_the_draft_modules(dtype):
    """The draft's own pieces on int8 GEMMs stay within int8's error of the modules they replace,
    and greedy drafting picks the float arg-max where the best logit leads by more than that."""
    H, V, K, T = 576, 2000, 3, 5
    torch.manual_seed(0)
    trigram, heads = TrigramEncoder(H, "resblock"), ResidualHeads(K, H)
    with torch.no_grad():
        for p in [*trigram.parameters(), *heads.parameters()]:
            p.normal_(0, 0.05)
    trigram, heads = trigram.to(dtype), heads.to(dtype)
    gen = torch.Generator().manual_seed(1)
    embed, lm_head = (torch.randn(V, H, generator=gen).to(dtype) for _ in range(2))
    ids = torch.randint(0, V, (T, 3), generator=gen)
    h_hat, anchor = torch.randn(2, T, H, generator=gen).to(dtype)
    cpu = CpuDraftGemms(trigram, heads, lm_head, Int8CpuLinear)
    with torch.no_grad():
        assert relative_error(cpu.trigram(embed[ids].flatten(1)), trigram(ids, embed).float()) < MAX_RELATIVE_ERROR
        for step in range(K):
            expected, _ = heads(step, h_hat, anchor, lm_head)
            assert relative_error(cpu.residual_head(step, h_hat, anchor), expected.float()) < MAX_RELATIVE_ERROR
        features = torch.randn(T, H, generator=gen).to(dtype)
        logits = features.float() @ lm_head.float().T
        assert relative_error(cpu.lm_head(features), logits) < MAX_RELATIVE_ERROR
        agree = cpu.greedy(features) == logits.argmax(dim=1)
        assert agree.sum() >= T - 1, agree  # a near-tie may go either way


def test_quantization_config_puts_vllms_linear_layers_on_int8():
    from vllm.model_executor.layers.linear import ReplicatedLinear

    from chimera_vllm.vllm_cpu_int8 import ChimeraInt8Config, Int8LinearMethod

    config = ChimeraInt8Config()
    assert config.get_quant_method(torch.nn.LayerNorm(4), "norm") is None  # linear layers only
    method = config.get_quant_method(ReplicatedLinear.__new__(ReplicatedLinear), "proj")
    assert isinstance(method, Int8LinearMethod)
    gen = torch.Generator().manual_seed(2)
    w, x = torch.randn(1000, 576, generator=gen) / 24, torch.randn(3, 576, generator=gen)
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(w.clone(), requires_grad=False)  # as loaded (the engine test loads one)
    method.process_weights_after_loading(layer)
    assert layer.weight.numel() == 0  # the float weight is released
    assert relative_error(method.apply(layer, x), F.linear(x, w)) < MAX_RELATIVE_ERROR

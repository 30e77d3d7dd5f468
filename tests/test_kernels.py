"""Triton kernels against their PyTorch references (on CPU under TRITON_INTERPRET=1, set in conftest).

Tolerances: float32 rtol 1e-4 (well under 1e-3), bfloat16 1e-2 relative to the output's scale,
both against a float32 reference computed from the same (rounded) inputs. Outputs are poisoned
with NaN first, so an element the kernel never writes fails. The arg-max must equal
torch.argmax exactly: on inputs whose logits are exact in float32 (multiples of 1/16), where
ties are frequent, and on random inputs away from near-ties.
"""

from __future__ import annotations

import pytest
import torch
from chimera_vllm.kernels._triton import HAVE_TRITON
from chimera_vllm.kernels.greedy_head import greedy_head_reference, greedy_head_triton
from chimera_vllm.kernels.residual_head import residual_head_reference, residual_head_triton
from chimera_vllm.kernels.trigram import trigram_reference, trigram_triton

pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed")

TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


def _close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert not out.isnan().any(), "the kernel left elements unwritten"
    scale = ref.abs().max().item() + 1e-6
    torch.testing.assert_close(out.float(), ref.float(), rtol=TOL[dtype], atol=TOL[dtype] * scale)


def _randn(*shape, dtype, scale=1.0):
    return (torch.randn(*shape) * scale).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H", [64, 96])
@pytest.mark.parametrize("T", [1, 3, 17, 64])
@pytest.mark.parametrize("mlp", ["resblock", "linear"])
def test_trigram_fused(mlp, T, H, dtype):
    V = 1000
    ids = torch.randint(V, (T, 3))
    embed = _randn(V, H, dtype=dtype)
    w1 = _randn(3 * H, 3 * H, dtype=dtype, scale=(3 * H) ** -0.5) if mlp == "resblock" else None
    b1 = _randn(3 * H, dtype=dtype, scale=0.1) if mlp == "resblock" else None
    w2 = _randn(H, 3 * H, dtype=dtype, scale=(3 * H) ** -0.5)
    out = torch.full((T, H), float("nan"), dtype=dtype)
    trigram_triton(ids, embed, w1, b1, w2, out=out)
    f = lambda t: None if t is None else t.float()  # noqa: E731
    _close(out, trigram_reference(ids, embed.float(), f(w1), f(b1), w2.float()), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H", [64, 96])
@pytest.mark.parametrize("T", [1, 3, 17, 64])
def test_residual_head(T, H, dtype):
    K = 4
    h_hat, anchor = _randn(T, H, dtype=dtype), _randn(T, H, dtype=dtype)
    weight = _randn(K, H, 2 * H, dtype=dtype, scale=(2 * H) ** -0.5)
    bias = _randn(K, H, dtype=dtype, scale=0.1)
    for k in range(K):
        step = torch.tensor(k)
        out = torch.full((T, H), float("nan"), dtype=dtype)
        residual_head_triton(h_hat, anchor, weight, bias, step, out=out)
        ref = residual_head_reference(h_hat.float(), anchor.float(), weight.float(), bias.float(), step)
        _close(out, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [1000, 4099])
@pytest.mark.parametrize("H", [64, 96])
@pytest.mark.parametrize("T", [1, 3, 17, 64])
def test_greedy_head_exact_with_ties(T, H, V, dtype):
    """Values in {-2..2}/4: every logit is exact in float32 whatever the summation order."""
    hidden = (torch.randint(-2, 3, (T, H)) / 4).to(dtype)
    lm_head = (torch.randint(-2, 3, (V, H)) / 4).to(dtype)
    lm_head[V // 2 :: 7] = lm_head[V // 3]  # repeated rows: exact ties across vocabulary tiles
    ref = greedy_head_reference(hidden, lm_head)
    assert torch.equal(greedy_head_triton(hidden, lm_head), ref)


@pytest.mark.parametrize("T", [17, 64])
def test_greedy_head_random_inputs(T):
    """Random float32 inputs: exact wherever the top two logits are more than 1e-4 apart."""
    hidden, lm_head = torch.randn(T, 96), torch.randn(4099, 96)
    logits = hidden @ lm_head.T
    top2 = logits.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-4
    out = greedy_head_triton(hidden, lm_head)
    assert torch.equal(out[clear], greedy_head_reference(hidden, lm_head)[clear])
    assert clear.float().mean() > 0.9


def test_draft_model_runs_the_kernels_where_triton_is_used(trained_pair, monkeypatch):
    """The draft's forward routes through the kernels: forcing the Triton path (interpreted on CPU)
    drafts the same tokens and keeps decoding lossless."""
    from chimera_vllm.kernels import greedy_head, residual_head, trigram

    from chimera_vllm.reference.decoding import SpeculativeDecoder
    from chimera_vllm.testing.tiny import grammar_prompts

    _, target, tokenizer, _, draft = trained_pair
    prompts = grammar_prompts(tokenizer, 3, seed=8)
    expected, expected_stats = SpeculativeDecoder(target, draft, 4).generate(prompts, 20)
    calls = []

    def force(*tensors):
        calls.append(len(tensors))
        return not torch.is_grad_enabled()

    for module in (trigram, residual_head, greedy_head):
        monkeypatch.setattr(module, "use_triton", force)
    outputs, stats = SpeculativeDecoder(target, draft, 4).generate(prompts, 20)
    assert calls, "the kernels' dispatchers were not reached"
    assert outputs == expected
    assert stats.accepted_by_position == expected_stats.accepted_by_position

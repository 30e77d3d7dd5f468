"""The project's fixes to vLLM-CPU's speculative sampling: the recovered-token noise."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from chimera_vllm.vllm_cpu_fix import (  # noqa: E402
    inverse_exponential_noise,
    sample_recovered_tokens,
    sample_without_drafts,
)


def test_noise_is_exponential_for_requests_with_drafts_and_absent_for_the_rest():
    torch.manual_seed(0)
    inv_q = inverse_exponential_noise([2, 0, 1], 50_000, generators={})
    assert inv_q[1].eq(0).all()
    for row in (0, 2):
        q = inv_q[row].reciprocal()
        assert abs(q.mean().item() - 1) < 0.02 and abs(q.var().item() - 1) < 0.05  # Exponential(1)
        assert abs((q > 1).float().mean().item() - math.exp(-1)) < 0.01


def test_a_requests_own_generator_makes_its_noise_reproducible():
    def noise(seed: int) -> torch.Tensor:
        return inverse_exponential_noise([1, 1], 1000, {1: torch.Generator().manual_seed(seed)})[1]

    assert torch.equal(noise(7), noise(7)) and not torch.equal(noise(7), noise(8))


@pytest.fixture
def cpu_kernels(monkeypatch):
    """vLLM-CPU's C++ stand-ins for its Triton kernels, which an engine registers at start-up.

    The registration scans every attribute of every imported module and calls vars() on it;
    llvmlite's `lib` proxy (imported with numba by the prompt-lookup tests in this process; the
    engines' own processes start with the lookup's import still ahead) answers that with a
    function wrapper, which vLLM 0.32's scan cannot read: it is out of the way while they register."""
    import sys

    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("the fix applies to vLLM's CPU platform")
    with monkeypatch.context() as patch:
        if "llvmlite.binding.ffi" in sys.modules:
            patch.delattr(sys.modules["llvmlite.binding.ffi"], "lib")
        current_platform.register_triton_kernel_overrides()


def test_recovered_tokens_follow_the_target_distribution_without_the_draft_token(cpu_kernels):
    """n-gram/EAGLE-style drafts (no draft probabilities): a rejected draft token t is replaced by
    a sample of p with p[t] set to 0, renormalised. 20,000 requests, one draft token each."""
    torch.manual_seed(0)
    p = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    n, draft = 20_000, 1
    recovered = sample_recovered_tokens(
        max_spec_len=1,
        num_draft_tokens=[1] * n,
        cu_num_draft_tokens=torch.arange(1, n + 1, dtype=torch.int32),
        draft_token_ids=torch.full((n,), draft, dtype=torch.int32),
        draft_probs=None,
        target_probs=p.expand(n, -1).contiguous(),
        sampling_metadata=SimpleNamespace(generators={}),
        device=torch.device("cpu"),
    )
    expected = p.clone()
    expected[draft] = 0
    expected /= expected.sum()
    observed = torch.bincount(recovered.long(), minlength=len(p)).float() / n
    assert observed[draft] == 0
    assert 0.5 * (observed - expected).abs().sum() < 0.015


@pytest.mark.parametrize(
    ("max_spec_len", "max_num_logprobs", "plain"),
    [(0, None, True), (2, None, False), (0, 3, False)],
)
def test_only_a_step_without_drafts_or_logprobs_leaves_the_rejection_sampler_out(max_spec_len, max_num_logprobs, plain):
    """The model runner's _sample gets no spec-decode metadata (vLLM's plain sampler) exactly when
    no request has a draft token and no logprobs are asked for."""
    seen = []
    sample = sample_without_drafts(lambda runner, logits, metadata: seen.append(metadata))
    runner = SimpleNamespace(
        input_batch=SimpleNamespace(sampling_metadata=SimpleNamespace(max_num_logprobs=max_num_logprobs))
    )
    metadata = SimpleNamespace(max_spec_len=max_spec_len)
    sample(runner, torch.zeros(2, 5), metadata)
    assert seen == [None if plain else metadata]
    sample(runner, torch.zeros(2, 5), None)  # without speculation: untouched
    assert seen[-1] is None

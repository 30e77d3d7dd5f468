"""Chimera inside vLLM (V1 model runner, CPU): lossless greedy decoding, parity with the
reference decoder, speculative sampling, metrics and bad input.

Every engine runs in float32 (outputs are reproducible there, docs/vllm-integration.md)
and is shared by the tests of its configuration (start-up takes ~35 s).
"""

from __future__ import annotations

import copy
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from chimera_vllm import cli
from chimera_vllm.config import ChimeraConfigError
from chimera_vllm.evaluation.acceptance import draft_predictions, greedy_accepts
from chimera_vllm.model.base import ChimeraCheckpointError, DraftModel
from chimera_vllm.model.checkpoint import init_draft
from chimera_vllm.model.medusa import MedusaDraft
from chimera_vllm.reference.decoding import SpeculativeDecoder
from chimera_vllm.reference.target import load_target
from chimera_vllm.testing.tiny import build_tiny_target, grammar_prompts, synthetic_corpus
from chimera_vllm.training.trainer import TrainArgs, train
from chimera_vllm.vllm.prompt_lookup import DRAFT_TOKENS_KEY, PromptLookup, simulate_greedy_steps

pytest.importorskip("vllm")
from vllm import LLM, SamplingParams  # noqa: E402
from vllm.exceptions import VLLMValidationError  # noqa: E402

from chimera_vllm.bench.methods import Method  # noqa: E402
from chimera_vllm.bench.step_profile import COMPONENTS, profile_engine, read_trace  # noqa: E402
from chimera_vllm.vllm.engine import SpecCounters, close_llm, target_steps  # noqa: E402

BLOCK = 32  # KV block size (a multiple of 32 on CPU): the prompts below cross several blocks
ENGINE = dict(
    dtype="float32",
    enforce_eager=True,
    max_model_len=512,
    block_size=BLOCK,
    seed=0,
    kv_cache_memory_bytes=64 << 20,
)


def make_engine(target, draft=None, k=None, spec_extra: dict | None = None, **overrides) -> LLM:
    spec = None if draft is None else {"model": str(draft), "num_speculative_tokens": k, **(spec_extra or {})}
    return LLM(model=str(target), speculative_config=spec, disable_log_stats=False, **{**ENGINE, **overrides})


def greedy(llm: LLM, prompts, max_tokens=40, **kw) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def drafts_like_the_reference(llm: LLM, prompts, ref_out, ref, max_tokens=24) -> SpecCounters:
    """Asserts the engine's greedy outputs and draft/accept counts equal the reference decoder's
    (ref_out, ref = SpeculativeDecoder(...).generate(prompts, max_tokens)); closes the engine."""
    try:
        assert greedy(llm, prompts, max_tokens, ignore_eos=True) == [o[:max_tokens] for o in ref_out]
        got = SpecCounters.read(llm)
        assert (got.draft_tokens, got.accepted_tokens) == (ref.draft_tokens, ref.accepted_tokens)
        return got
    finally:
        close_llm(llm)


def counter(llm: LLM, name: str) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == name)


@pytest.fixture(scope="module")
def pair(trained_pair, tmp_path_factory):
    """(target dir, trained draft dir, randomised draft dir, tokenizer)."""
    target_dir, target, tokenizer, _, trained = trained_pair
    root = tmp_path_factory.mktemp("vllm_drafts")
    trained.save_pretrained(root / "trained")
    save_random_draft(target, target_dir, root / "random")
    return target_dir, root / "trained", root / "random", tokenizer


def save_random_draft(target, target_dir, out, seed: int = 0) -> None:
    """An untrained draft with every weight random, so that no path hides behind zeros."""
    draft = init_draft(target, str(target_dir), num_heads=4)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    draft.save_pretrained(out)


def mixed_prompts(tokenizer, n: int = 32) -> list[list[int]]:
    """Short and long prompts (up to ~10 KV blocks, several prefill chunks), some of them
    sharing a 150-token prefix for prefix caching to hit."""
    lines = synthetic_corpus(200, seed=11)
    shared = tokenizer("\n".join(lines[:6])).input_ids[:150]
    prompts = []
    for i in range(n):
        if i % 5 == 0:
            prompts.append(shared + tokenizer(lines[10 + i][:12]).input_ids)
        elif i % 3 == 0:
            prompts.append(tokenizer("\n".join(lines[20 + i : 26 + i])).input_ids[: 60 + 9 * i])
        else:
            prompts.append(tokenizer(lines[40 + i][: 5 + i]).input_ids)
    return prompts


@pytest.fixture(scope="module")
def baseline(pair):
    llm = make_engine(pair[0])
    yield llm
    close_llm(llm)


@pytest.fixture(scope="module")
def chimera(pair):
    """K=4 with a tiny KV cache (preemption), 128-token prefill chunks, prefix caching, and the
    draft's probabilities passed to the rejection sampler."""
    llm = make_engine(
        pair[0],
        pair[1],
        4,
        spec_extra={"draft_sample_method": "probabilistic"},
        num_gpu_blocks_override=20,
        max_num_batched_tokens=128,
        enable_prefix_caching=True,
    )
    yield llm
    close_llm(llm)


def test_batch_of_mixed_prompts_is_lossless_through_preemption_chunks_and_prefix_cache(pair, baseline, chimera):
    prompts = mixed_prompts(pair[3])
    assert max(len(p) for p in prompts) > 5 * BLOCK
    preempted, hits = counter(chimera, "vllm:num_preemptions"), counter(chimera, "vllm:prefix_cache_hits")
    assert greedy(chimera, prompts) == greedy(baseline, prompts)
    assert counter(chimera, "vllm:num_preemptions") > preempted, "the small KV cache was meant to force preemption"
    assert counter(chimera, "vllm:prefix_cache_hits") > hits
    for batch in (prompts[:1], prompts[3:7]):
        assert greedy(chimera, batch) == greedy(baseline, batch)


def test_stops_inside_drafts(pair, baseline, chimera):
    """max_tokens, a stop token and stop strings that land inside accepted drafts."""
    tokenizer = pair[3]
    prompts = grammar_prompts(tokenizer, 8, seed=5)
    for max_tokens in (1, 2, 3, 5, 7):
        assert greedy(chimera, prompts, max_tokens) == greedy(baseline, prompts, max_tokens)
    newline = tokenizer.convert_tokens_to_ids("\n")
    assert greedy(chimera, prompts, stop_token_ids=[newline]) == greedy(baseline, prompts, stop_token_ids=[newline])
    texts = [tokenizer.decode(p) for p in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=40, stop=["e ", "lo"])
    spec = chimera.generate(texts, params, use_tqdm=False)
    base = baseline.generate(texts, params, use_tqdm=False)
    assert [o.outputs[0].text for o in spec] == [o.outputs[0].text for o in base]
    assert any(o.outputs[0].finish_reason == "stop" for o in spec)


def test_vllm_counters_equal_the_reference_decoder(pair, chimera, trained_pair):
    """Same weights, same prompts: vLLM's drafts are accepted exactly as the reference decoder's."""
    _, target, tokenizer, _, draft = trained_pair
    prompts = grammar_prompts(tokenizer, 6, seed=3)
    ref_out, ref = SpeculativeDecoder(target, draft, 4).generate(prompts, 24)
    before = SpecCounters.read(chimera)
    out = greedy(chimera, prompts, 24, ignore_eos=True)
    got = SpecCounters.read(chimera) - before
    assert out == [o[:24] for o in ref_out]
    assert (got.drafts, got.draft_tokens, got.accepted_tokens) == (
        ref.target_steps,
        ref.draft_tokens,
        ref.accepted_tokens,
    )
    assert list(got.accepted_by_position) == ref.accepted_by_position
    assert target_steps(out, got) == ref.target_steps
    assert (ref.target_steps + ref.accepted_tokens) / ref.target_steps > 2.0  # the trained draft does work here


def _exact_continuations(target, prompt: list[int], temperature: float) -> dict[tuple[int, int, int], float]:
    """p(a) p(b|a) p(c|ab) of every likely 3-token continuation, by the transformers target."""

    def logp(batch: list[list[int]]) -> torch.Tensor:
        return torch.log_softmax(target(torch.tensor(batch)).logits[:, -1].float() / temperature, -1)

    with torch.no_grad():
        p1 = logp([prompt])[0]
        a = torch.arange(p1.numel())
        p2 = logp([prompt + [x] for x in a.tolist()])  # [V, V]
        ab = torch.cartesian_prod(a, a)
        ab = ab[(p1[ab[:, 0]] + p2[ab[:, 0], ab[:, 1]]).exp() > 1e-6]
        p3 = logp([prompt + [x, y] for x, y in ab.tolist()])
        joint = ((p1[ab[:, 0]] + p2[ab[:, 0], ab[:, 1]])[:, None] + p3).exp()
    return {(x, y, z): float(row[z]) for (x, y), row in zip(ab.tolist(), joint) for z in range(row.numel())}


def _tv(samples: list[tuple[int, ...]], exact: dict) -> float:
    emp: dict = {}
    for s in samples:
        emp[s] = emp.get(s, 0) + 1 / len(samples)
    return 0.5 * sum(abs(emp.get(k, 0) - exact.get(k, 0)) for k in set(emp) | set(exact))


def assert_samples_follow_the_target(llm: LLM, target, prompt: list[int]) -> None:
    """Temperature 0.8, 3-token continuations, 4000 samples: total variation to the exact target
    distribution under 0.06, while the distribution at temperature 1.2 is measurably farther."""
    params = SamplingParams(temperature=0.8, max_tokens=3, n=4000, ignore_eos=True)
    before = SpecCounters.read(llm)
    out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    assert SpecCounters.read(llm).accepted_tokens > before.accepted_tokens
    samples = [tuple(c.token_ids) for c in out.outputs]
    tv = _tv(samples, _exact_continuations(target, prompt, 0.8))
    assert tv < 0.06
    assert _tv(samples, _exact_continuations(target, prompt, 1.2)) > tv + 0.05


def test_speculative_sampling_keeps_the_target_distribution(pair, chimera, trained_pair):
    assert_samples_follow_the_target(chimera, trained_pair[1], grammar_prompts(pair[3], 1, seed=21)[0])


def test_vllms_suffix_decoding_runs_lossless_beside_the_plugin(pair, baseline):
    """vLLM's own model-free method (Arctic Inference, built by the set-up), which `bench --methods
    suffix` measures against Chimera: the plugin leaves it alone and it drafts from the prompts."""
    llm = LLM(model=str(pair[0]), speculative_config={"method": "suffix"}, disable_log_stats=False, **ENGINE)
    try:
        assert llm.llm_engine.vllm_config.speculative_config.method == "suffix"
        prompts = mixed_prompts(pair[3], 12)
        assert greedy(llm, prompts) == greedy(baseline, prompts)
        assert SpecCounters.read(llm).accepted_tokens > 0
    finally:
        close_llm(llm)


@pytest.mark.parametrize("k", [1, 2])
def test_fewer_speculative_tokens_than_heads(pair, baseline, k):
    llm = make_engine(pair[0], pair[2], k)  # the randomised draft: rejections everywhere
    try:
        prompts = mixed_prompts(pair[3], 12)
        assert greedy(llm, prompts) == greedy(baseline, prompts)
        assert SpecCounters.read(llm).draft_tokens > 0
    finally:
        close_llm(llm)


def test_qwen2_target_is_lossless(pair, tmp_path):
    """The other supported family (attention biases, tied embeddings) through vLLM's Qwen2 model."""
    target = build_tiny_target(tmp_path / "qwen2", "qwen2")
    save_random_draft(load_target(str(target)), target, tmp_path / "draft")
    prompts = mixed_prompts(pair[3], 12)
    llm = make_engine(target)
    try:
        expected = greedy(llm, prompts)
    finally:
        close_llm(llm)
    llm = make_engine(target, tmp_path / "draft", 3)
    try:
        assert greedy(llm, prompts) == expected
        assert SpecCounters.read(llm).draft_tokens > 0
    finally:
        close_llm(llm)


def test_draft_for_another_target_is_refused_before_start(pair, tmp_path):
    other = build_tiny_target(tmp_path / "wide", "llama", hidden_size=96, head_dim=48)
    with pytest.raises(
        ChimeraConfigError, match=rf"Chimera draft {re.escape(str(pair[1]))}: .*hidden_size=64.*hidden_size=96"
    ):
        make_engine(other, pair[1], 2)


def test_a_draft_of_nan_weights_changes_no_output(pair, baseline, tmp_path):
    """Verification rejects whatever such a draft proposes: greedy outputs are the target's, and
    sampling runs with the drafts' probabilities, NaN, passed to the rejection sampler (greedy
    drafting of a NaN draft is in the soak's test, tests/test_soak.py)."""
    draft = init_draft(load_target(str(pair[0])), str(pair[0]), num_heads=4)
    with torch.no_grad():
        for p in draft.parameters():
            p.fill_(float("nan"))
    draft.save_pretrained(tmp_path / "nan")
    prompts = mixed_prompts(pair[3], 12)
    llm = make_engine(pair[0], tmp_path / "nan", 4, spec_extra={"draft_sample_method": "probabilistic"})
    try:
        assert greedy(llm, prompts) == greedy(baseline, prompts)
        params = SamplingParams(temperature=0.8, max_tokens=16, seed=5)
        sampled = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert all(0 <= t < 105 for o in sampled for t in o.outputs[0].token_ids)
        counters = SpecCounters.read(llm)
        assert counters.draft_tokens > 0 and counters.accepted_tokens == 0
    finally:
        close_llm(llm)


def _draft_vocab_id_out_of_range(weights) -> None:
    state = load_file(weights)
    state["draft_vocab"][-10:] = torch.arange(100, 110)
    save_file(state, weights)


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda w: w.write_bytes(w.read_bytes()[:300]), "corrupt draft weights {}: Error while deserializing header"),
        (_draft_vocab_id_out_of_range, "{}: draft_vocab holds token id 105, outside the target's vocabulary 0..104"),
    ],
)
def test_a_damaged_draft_is_refused_before_start_naming_its_file_and_value(pair, tmp_path, damage, message):
    draft = DraftModel.from_pretrained(pair[1])
    draft.set_draft_vocab(torch.arange(5, 60))
    draft.save_pretrained(tmp_path)
    damage(tmp_path / "model.safetensors")
    with pytest.raises(ChimeraCheckpointError, match=message.format(re.escape(str(tmp_path / "model.safetensors")))):
        make_engine(pair[0], tmp_path, 2)


def test_more_speculative_tokens_than_heads_is_refused(pair):
    with pytest.raises(ChimeraConfigError, match=r"num_speculative_tokens=5 .* 4 heads"):
        make_engine(pair[0], pair[1], 5)


def test_chimera_method_needs_a_chimera_draft(pair):
    with pytest.raises(ChimeraConfigError, match="is not one"):
        make_engine(pair[0], pair[0], 2, spec_extra={"method": "chimera"})


def test_too_long_request_is_rejected_and_the_engine_keeps_serving(pair, baseline, chimera):
    with pytest.raises(VLLMValidationError, match="maximum context length is 512"):
        greedy(chimera, [[5] * 600])
    prompts = grammar_prompts(pair[3], 2, seed=9)
    assert greedy(chimera, prompts) == greedy(baseline, prompts)


@pytest.mark.parametrize(
    "spelling",
    [
        {"spec_model": "DRAFT", "spec_tokens": 3},  # --spec-model DRAFT --spec-tokens 3
        {"spec_model": "DRAFT"},  # the number of tokens defaults to the draft's heads
        {"speculative_config": {"model": "DRAFT", "method": "chimera"}},
        {"speculative_config": {"model": "DRAFT", "num_speculative_tokens": 2}},
    ],
)
def test_every_spelling_of_a_chimera_draft_runs_it_as_eagle(pair, spelling):
    from vllm.engine.arg_utils import EngineArgs

    draft = str(pair[1])
    kwargs = {k: draft if v == "DRAFT" else v for k, v in spelling.items() if k != "speculative_config"}
    if "speculative_config" in spelling:
        kwargs["speculative_config"] = {**spelling["speculative_config"], "model": draft}
    config = EngineArgs(model=str(pair[0]), dtype="float32", max_model_len=512, **kwargs).create_engine_config()
    expected_k = spelling.get("spec_tokens") or spelling.get("speculative_config", {}).get("num_speculative_tokens", 4)
    assert config.speculative_config.method == "eagle"
    assert config.speculative_config.num_speculative_tokens == expected_k
    assert config.speculative_config.draft_model_config.hf_config.architectures == ["ChimeraDraftModel"]
    assert config.compute_hash()  # the compilation cache key serialises the draft's config


def test_bfloat16_outputs_differ_only_at_near_ties(pair, trained_pair):
    """bf16: the match rate with vLLM's own bf16 decoding, and every divergence at a near-tie."""
    from chimera_vllm.evaluation.compare import compare_outputs

    prompts = mixed_prompts(pair[3], 24)
    runs = []
    for draft in (None, pair[1]):
        llm = make_engine(pair[0], draft, None if draft is None else 4, dtype="bfloat16")
        try:
            runs.append(greedy(llm, prompts, 48))
        finally:
            close_llm(llm)
    comparison = compare_outputs(trained_pair[1], prompts, *runs)
    print(comparison.to_dict())
    assert comparison.match_rate > 0.5
    assert comparison.only_near_ties, comparison.divergences


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="tensor parallelism on CPU needs a core per worker")
def test_tensor_parallel_2_drafts_like_the_reference_decoder(pair, trained_pair, monkeypatch):
    """TP=2 shards the encoder layer (vLLM's parallel layers) and the target's embedding and LM head."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # vLLM-CPU: one core per TP worker
    _, target, tokenizer, _, draft = trained_pair
    prompts = grammar_prompts(tokenizer, 6, seed=3)
    ref_out, ref = SpeculativeDecoder(target, draft, 4).generate(prompts, 24)
    drafts_like_the_reference(make_engine(pair[0], pair[1], 4, tensor_parallel_size=2), prompts, ref_out, ref)


def test_draft_vocabulary_in_vllm_drafts_like_the_reference_decoder(pair, trained_pair, tmp_path):
    """A draft restricted to 20 target tokens: vLLM's greedy output is the target's, and its
    acceptance counters equal the reference decoder's with the same restricted draft."""
    _, target, tokenizer, _, trained = trained_pair
    draft = copy.deepcopy(trained)
    prompts = grammar_prompts(tokenizer, 6, seed=3)
    outputs, _ = SpeculativeDecoder(target).generate(prompts, 24)
    counts = torch.bincount(torch.tensor([t for o in outputs for t in o]), minlength=target.config.vocab_size)
    draft.set_draft_vocab(counts.topk(20).indices)
    draft.save_pretrained(tmp_path / "restricted")
    ref_out, ref = SpeculativeDecoder(target, draft, 4).generate(prompts, 24)
    got = drafts_like_the_reference(make_engine(pair[0], tmp_path / "restricted", 4), prompts, ref_out, ref)
    assert list(got.accepted_by_position) == ref.accepted_by_position


def test_medusa_baseline_exported_to_vllm_drafts_like_the_reference_decoder(trained_pair, tmp_path):
    """export-medusa writes vLLM's own Medusa format: vLLM's built-in Medusa proposer, fed the
    baseline's heads, is accepted exactly as the reference decoder's Medusa drafts."""
    target_dir, target, tokenizer, _, _ = trained_pair
    run = train(
        TrainArgs(
            target=str(target_dir),
            data=str(target_dir.parent / "data.jsonl"),
            out=str(tmp_path / "medusa"),
            head_type="medusa",
            num_heads=3,
            steps=40,
            batch_size=16,
            lr=3e-3,
            save_every=1000,
            progress=False,
        )
    )
    assert (
        cli.main(["export-medusa", "--target", str(target_dir), "--draft", str(run), "--out", str(tmp_path / "vllm")])
        == 0
    )
    medusa = MedusaDraft.from_pretrained(run, target.config)
    prompts = grammar_prompts(tokenizer, 6, seed=5)
    ref_out, ref = SpeculativeDecoder(target, medusa, 3).generate(prompts, 24)
    assert ref.accepted_tokens > 0
    llm = make_engine(target_dir, tmp_path / "vllm", 3, spec_extra={"method": "medusa"})
    drafts_like_the_reference(llm, prompts, ref_out, ref)


def test_batch_size_schedule_changes_k_and_stays_lossless(pair, baseline):
    """vLLM's num_speculative_tokens_per_batch_size with a Chimera draft: K = 3 while one request
    runs, K = 1 while more do; greedy output stays the target's."""
    _, _, _, tokenizer = pair
    prompts = grammar_prompts(tokenizer, 6, seed=41)
    schedule = [[1, 1, 3], [2, 512, 1]]
    llm = make_engine(
        pair[0], pair[1], 3, spec_extra={"num_speculative_tokens_per_batch_size": schedule}, max_num_seqs=4
    )
    try:
        batched = SpecCounters.read(llm)
        assert greedy(llm, prompts, 24, ignore_eos=True) == greedy(baseline, prompts, 24, ignore_eos=True)
        batched = SpecCounters.read(llm) - batched
        assert 0 < batched.draft_tokens < 3 * batched.drafts  # mostly K = 1 with 4 requests running
        alone = SpecCounters.read(llm)
        assert greedy(llm, prompts[:1], 24, ignore_eos=True) == greedy(baseline, prompts[:1], 24, ignore_eos=True)
        alone = SpecCounters.read(llm) - alone
        assert alone.draft_tokens == 3 * alone.drafts > 0
    finally:
        close_llm(llm)


def sampled(llm: LLM, prompts, seed: int, **kw) -> list:
    params = SamplingParams(temperature=0.8, seed=seed, max_tokens=24, ignore_eos=True, **kw)
    return [o.outputs[0] for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]


def test_steps_that_a_schedule_leaves_without_drafts_sample_as_without_speculation(pair, baseline):
    """K = 0 while one request runs: each of its steps has no draft, and samples (seeded, at
    temperature 0.8) the very tokens an engine without speculation does, with logprobs asked for
    too (then through vLLM's rejection sampler, which the plain sampler replaces otherwise:
    chimera_vllm/vllm/patches/sample_without_drafts.py). Two requests draft."""
    _, _, _, tokenizer = pair
    prompts = grammar_prompts(tokenizer, 2, seed=47)
    llm = make_engine(
        pair[0], pair[1], 2, spec_extra={"num_speculative_tokens_per_batch_size": [[1, 1, 0], [2, 512, 2]]}
    )
    try:
        before = SpecCounters.read(llm)
        for seed in (3, 4):
            got, want = sampled(llm, prompts[:1], seed), sampled(baseline, prompts[:1], seed)
            assert list(got[0].token_ids) == list(want[0].token_ids)
        got = sampled(llm, prompts[:1], 5, logprobs=2)[0]
        want = sampled(baseline, prompts[:1], 5, logprobs=2)[0]
        assert list(got.token_ids) == list(want.token_ids)
        for g, w in zip(got.logprobs, want.logprobs):
            assert g.keys() == w.keys()
            assert all(abs(g[t].logprob - w[t].logprob) < 1e-4 for t in g)
        assert (SpecCounters.read(llm) - before).drafts == 0
        assert greedy(llm, prompts, 24, ignore_eos=True) == greedy(baseline, prompts, 24, ignore_eos=True)
        assert (SpecCounters.read(llm) - before).draft_tokens > 0
    finally:
        close_llm(llm)


LOOKUP = {"prompt_lookup_min": 2, "prompt_lookup_max": 5, DRAFT_TOKENS_KEY: 2}


def test_batch_size_schedule_caps_prompt_lookup_beside_the_draft_and_turns_it_off(pair, baseline):
    """What bench --tune-schedule may give chimera+ngram: K = 3 for one request (lookup up to 3, the
    draft model's 2 elsewhere), K = 1 for two (every draft one token, the lookup's too) and K = 0
    for four (nothing drafted, lookup included). The engine process may take a few steps before the
    last request of a batch arrives, drafting for those already running (without the schedule four
    requests draft ~40 times), hence the slack; greedy output stays the target's throughout."""
    _, _, _, tokenizer = pair
    prompts = grammar_prompts(tokenizer, 4, seed=43)
    spec_extra = {**LOOKUP, "num_speculative_tokens_per_batch_size": [[1, 1, 3], [2, 3, 1], [4, 512, 0]]}
    llm = make_engine(pair[0], pair[1], 3, spec_extra=spec_extra, max_num_seqs=4)
    try:
        for batch in (prompts, prompts[:2], prompts[:1]):
            before = SpecCounters.read(llm)
            assert greedy(llm, batch, 24, ignore_eos=True) == greedy(baseline, batch, 24, ignore_eos=True)
            got = SpecCounters.read(llm) - before
            if len(batch) == 4:
                assert got.drafts <= 8, got
            elif len(batch) == 2:
                assert got.drafts > 10 and got.draft_tokens <= got.drafts + 2 * 3, got
            else:
                assert got.draft_tokens > got.drafts, got  # drafts of 2-3 tokens
    finally:
        close_llm(llm)


@pytest.fixture(scope="module")
def chimera_lookup(pair):
    """Prompt lookup with up to 5 tokens (one more than the draft has heads) beside 2 of the draft
    model's, with 128-token prefill chunks, prefix caching and the draft's probabilities passed to
    the rejection sampler."""
    spec_extra = {**LOOKUP, "draft_sample_method": "probabilistic"}
    llm = make_engine(
        pair[0], pair[1], 5, spec_extra=spec_extra, max_num_batched_tokens=128, enable_prefix_caching=True
    )
    yield llm
    close_llm(llm)


def test_prompt_lookup_beside_the_draft_is_lossless_and_drafts_as_the_replay(
    pair, baseline, chimera_lookup, trained_pair
):
    """Greedy output stays the target's, and vLLM's counters equal the greedy replay of the same
    policy (lookup first, the draft model's 2 tokens elsewhere)."""
    _, target, tokenizer, _, draft = trained_pair
    mixed = mixed_prompts(tokenizer)
    assert greedy(chimera_lookup, mixed) == greedy(baseline, mixed)
    prompts = grammar_prompts(tokenizer, 6, seed=3)
    before = SpecCounters.read(chimera_lookup)
    out = greedy(chimera_lookup, prompts, 24, ignore_eos=True)
    got = SpecCounters.read(chimera_lookup) - before
    longer = greedy(baseline, prompts, 24 + 5, ignore_eos=True)
    assert out == [o[:24] for o in longer]
    lookup = PromptLookup(LOOKUP["prompt_lookup_min"], LOOKUP["prompt_lookup_max"], LOOKUP[DRAFT_TOKENS_KEY])
    steps = []
    for prompt, continuation in zip(prompts, longer):
        tokens = prompt + continuation
        accepts = greedy_accepts(draft_predictions(target, draft, tokens, len(prompt), 2)[0], tokens)
        steps += simulate_greedy_steps(tokens, len(prompt), 24, 5, accepts, lookup)
    assert (got.drafts, got.draft_tokens, got.accepted_tokens) == (
        len(steps),
        sum(s.drafted for s in steps),
        sum(s.accepted for s in steps),
    )
    assert list(got.accepted_by_position) == [sum(s.accepted > i for s in steps) for i in range(5)]
    assert any(s.draft_model_steps == 0 and s.accepted > 2 for s in steps)  # the lookup's longer drafts
    assert any(s.draft_model_steps == 2 for s in steps)


def test_prompt_lookup_sampling_keeps_the_target_distribution(pair, chimera_lookup, trained_pair):
    """A repetitive prompt, so that the lookup drafts beside the draft model's sampled tokens."""
    prompt = grammar_prompts(pair[3], 1, seed=21)[0] * 3
    before = SpecCounters.read(chimera_lookup)
    assert_samples_follow_the_target(chimera_lookup, trained_pair[1], prompt)
    got = SpecCounters.read(chimera_lookup) - before
    assert got.draft_tokens > 2 * got.drafts > 0  # some drafts longer than the draft model's 2 tokens


def test_prompt_lookup_needs_a_draft_model_share_within_its_heads(pair):
    with pytest.raises(ChimeraConfigError, match=r"num_speculative_tokens=6 .* 4 heads"):
        make_engine(pair[0], pair[1], 6, spec_extra={"prompt_lookup_max": 3})
    with pytest.raises(ChimeraConfigError, match=r"chimera_num_speculative_tokens=3 is above num_speculative_tokens=2"):
        make_engine(pair[0], pair[1], 2, spec_extra={"prompt_lookup_max": 3, DRAFT_TOKENS_KEY: 3})


def test_step_profile_finds_every_component_in_a_real_trace(pair, tmp_path):
    """The step profile's patterns name functions of vLLM's runner and of the draft: in a real
    trace every component appears (at T > 0 vLLM's rejection sampler takes its random path; the
    draft runs with prompt lookup beside it), and nested parts fit inside their parents."""
    target_dir, draft_dir, _, tokenizer = pair
    profile = profile_engine(
        str(target_dir),
        Method("chimera+ngram", 3, draft_k=2),
        {"chimera": str(draft_dir)},
        grammar_prompts(tokenizer, 2, seed=3),
        tmp_path / "trace",
        dtype="float32",
        batch_size=2,
        max_new_tokens=24,
        steps=6,
        temperature=0.8,
        **{k: v for k, v in ENGINE.items() if k != "dtype"},
    )
    ms = profile.ms_per_step
    assert profile.steps == 6
    assert set(ms) == {label for label, _, _ in COMPONENTS}
    parts = ("target forward", "target LM head", "sampling / verification", "draft proposal")
    assert ms["engine step"] > sum(ms[part] for part in parts)
    assert ms["target forward"] > ms["linear layers"] + ms["attention"] + ms["KV-cache writes"]
    proposal_parts = ("write context (Chimera)", "prompt lookup (Chimera)", "draft model forward")
    assert ms["draft proposal"] > sum(ms[part] for part in proposal_parts)
    assert ms["sampling / verification"] > ms["temperature, top-k/p (verification)"] + ms["rejection sampling"]
    assert ms["rejection sampling"] > ms["recovered tokens"]
    names = {e.get("name", "") for e in read_trace(tmp_path / "trace")}
    assert any(re.search(r"recovered_tokens\.py\(\d+\): sample_recovered_tokens$", n) for n in names)  # the CPU fix ran
    parts = ms["trigram encoder"] + ms["encoder layer"] + ms["residual heads"]
    assert ms["draft model forward"] > parts

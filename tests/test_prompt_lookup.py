"""Prompt lookup beside the Chimera draft: its settings, its drafts, and the greedy replay."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from chimera_vllm.bench.methods import Method
from chimera_vllm.config import ChimeraConfigError
from chimera_vllm.evaluation.acceptance import confident_lengths, draft_predictions, greedy_accepts
from chimera_vllm.reference.decoding import SpeculativeDecoder
from chimera_vllm.testing.tiny import grammar_prompts
from chimera_vllm.vllm.prompt_lookup import (
    DRAFT_TOKENS_KEY,
    PromptLookup,
    SimulatedStep,
    draft_model_tokens,
    simulate_greedy_steps,
)

pytest.importorskip("vllm")  # the n-gram match is vLLM's own


def test_settings_leave_the_speculative_config_and_default_as_vllm_does():
    spec = {"model": "d", "num_speculative_tokens": 4, "prompt_lookup_max": 5, DRAFT_TOKENS_KEY: 1}
    assert PromptLookup.pop_from_spec(spec) == PromptLookup(5, 5, 1)  # min defaults to max
    assert spec == {"model": "d", "num_speculative_tokens": 4}
    assert PromptLookup.pop_from_spec({"num_speculative_tokens": 4}) is None
    assert draft_model_tokens(None, 3) == 3
    assert draft_model_tokens(PromptLookup(2, 5), 3) == 3
    assert draft_model_tokens(PromptLookup(2, 5, 1), 3) == 1
    assert draft_model_tokens(PromptLookup(2, 5, 2), 1) == 1  # a batch-size schedule may ask for fewer


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({DRAFT_TOKENS_KEY: 1}, "chimera_num_speculative_tokens=1 sets the draft model's share"),
        ({"prompt_lookup_min": 4, "prompt_lookup_max": 2}, "prompt_lookup_min=4 is above prompt_lookup_max=2"),
        ({"prompt_lookup_min": 0}, r"prompt_lookup_min=0: use an integer >= 1"),
        (
            {"prompt_lookup_max": 3, DRAFT_TOKENS_KEY: 5},
            "chimera_num_speculative_tokens=5 is above num_speculative_tokens=4",
        ),
        ({"prompt_lookup_max": 3, DRAFT_TOKENS_KEY: "2"}, "chimera_num_speculative_tokens='2': use an integer"),
    ],
)
def test_bad_settings_are_refused_by_name(spec, message):
    with pytest.raises(ChimeraConfigError, match=message):
        lookup = PromptLookup.pop_from_spec(spec)
        lookup.check(4)


def test_lookup_drafts_what_followed_the_longest_match():
    lookup = PromptLookup(2, 3)
    contexts = np.array(
        [
            [7, 1, 2, 3, 9, 9, 4, 1, 2, 3],  # "1 2 3" matched: what followed it
            [5, 6, 8, 5, 6, 0, 0, 0, 0, 0],  # "5 6" matched near the end: only what exists after it
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],  # nothing repeats
        ],
        dtype=np.int32,
    )
    lengths = np.array([10, 5, 10], dtype=np.int32)
    assert lookup.propose(contexts, lengths, 3, 1 << 20) == [[9, 9, 4], [8, 5, 6], []]
    assert lookup.propose(contexts[:1], lengths[:1], 3, 11) == [[9]]  # never past max_model_len


def test_the_lookup_starts_numba_on_its_own_thread_pool_not_openmp():
    """numba's OpenMP layer, started by the first match in vLLM's CPU worker, slowed every later target
    step there by a fifth (docs/vllm-integration.md); a fresh process, as the worker is."""
    script = (
        "import numpy as np, numba\n"
        "from chimera_vllm.vllm.prompt_lookup import PromptLookup\n"
        "drafts = PromptLookup(2, 3).propose(np.array([[1, 2, 3, 1, 2]], np.int32), np.array([5]), 2, 64)\n"
        "print(drafts, numba.threading_layer())\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split()[-1] == "workqueue", out.stdout


def test_greedy_replay_drafts_from_the_lookup_first_and_the_draft_model_elsewhere():
    # prompt "1 2 3 4", continuation "5 1 2 3 4 5 6 7": the lookup matches from "... 5 1 2" on
    tokens = [1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 6, 7]
    calls = []

    def draft_model_accepts(n: int, s: int) -> int:
        calls.append((n, s))
        return 1

    steps = simulate_greedy_steps(tokens, 4, 8, 4, draft_model_accepts, PromptLookup(2, 2, 2))
    # anchor 3 (context ... 4 5): "4 5" unseen, the draft model's 2 tokens, 1 kept; anchor 5 (... 1 2):
    # the lookup's 4 tokens "3 4 5 1", 3 kept; anchor 9 (... 5 6): unseen, the draft model again
    assert calls == [(3, 2), (9, 2)]
    assert steps == [SimulatedStep(2, 1, 2), SimulatedStep(4, 3, 0), SimulatedStep(2, 1, 2)]
    plain = simulate_greedy_steps(tokens, 4, 8, 2, lambda n, s: 0)
    assert all(s == SimulatedStep(2, 0, 2) for s in plain) and len(plain) == 7


def test_greedy_replay_of_a_draft_model_that_stops_early():
    """A draft model keeping fewer tokens verifies fewer and keeps only those, and it ran one step
    more than it kept (the token it dropped) unless it kept them all."""
    tokens = [1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 6, 7]
    full = simulate_greedy_steps(tokens, 4, 8, 3, lambda n, s: 2)
    assert all(s == SimulatedStep(3, 2, 3) for s in full)
    for kept, expected in ((3, SimulatedStep(3, 2, 3)), (1, SimulatedStep(1, 1, 2)), (0, SimulatedStep(0, 0, 1))):
        steps = simulate_greedy_steps(tokens, 4, 8, 3, lambda n, s: 2, draft_model_length=lambda n, s, m=kept: m)
        assert set(steps) == {expected}
        assert len(steps) == -(-7 // (expected.accepted + 1))  # 7 tokens after the prefill's


def test_confident_lengths_stop_at_the_first_unsure_head():
    # probability[k, p]: head k's probability of its token at query p (anchor n = p - k - 1)
    probability = torch.tensor([[0, 0.9, 0.9, 0.2, 0.9], [0, 0, 0.8, 0.1, 0.9], [0, 0, 0, 0.6, 0.6]])
    length = confident_lengths(probability, 0.5)
    assert [length(0, 3), length(1, 3), length(2, 3), length(0, 2), length(3, 3)] == [3, 1, 0, 2, 1]
    assert confident_lengths(probability, 0.95)(0, 3) == 0
    # keeping the first token whatever its probability, then stopping at the next unsure one
    keep_first = confident_lengths(probability, 0.5, min_tokens=1)
    assert [keep_first(0, 3), keep_first(1, 3), keep_first(2, 3), keep_first(2, 1)] == [3, 1, 2, 1]
    assert confident_lengths(probability, 0.95, min_tokens=2)(0, 3) == 2


def test_greedy_replay_counts_what_the_reference_decoder_counts(trained_pair):
    """Without the lookup, the replay of the draft's teacher-forced drafts is the reference decoder."""
    _, target, tokenizer, _, draft = trained_pair
    prompts = grammar_prompts(tokenizer, 6, seed=3)
    outputs, stats = SpeculativeDecoder(target, draft, 3).generate(prompts, 24)
    longer, _ = SpeculativeDecoder(target).generate(prompts, 24 + 3)
    assert outputs == [o[:24] for o in longer]
    steps = []
    for prompt, continuation in zip(prompts, longer):
        tokens = prompt + continuation
        top1, probability = draft_predictions(target, draft, tokens, len(prompt), 3)
        assert torch.equal(top1 >= 0, probability > 0) and probability.max() <= 1
        steps += simulate_greedy_steps(tokens, len(prompt), 24, 3, greedy_accepts(top1, tokens))
    assert len(steps) == stats.target_steps
    assert sum(s.accepted for s in steps) == stats.accepted_tokens > stats.target_steps  # the draft does work
    assert [sum(s.accepted > i for s in steps) for i in range(3)] == stats.accepted_by_position


def test_bench_method_for_the_lookup_beside_the_draft():
    m = Method.parse("chimera+ngram:4:1")
    assert (m.name, m.k, m.draft_k, str(m)) == ("chimera+ngram", 4, 1, "chimera+ngram:4:1")
    spec = m.spec({"chimera": "/d"})
    assert spec == {
        "model": "/d",
        "num_speculative_tokens": 4,
        "prompt_lookup_max": 5,
        "prompt_lookup_min": 2,
        DRAFT_TOKENS_KEY: 1,
    }
    assert DRAFT_TOKENS_KEY not in Method.parse("chimera+ngram:3").spec({"chimera": "/d"})
    for bad in ("chimera:4:1", "chimera+ngram", "chimera+ngram:x"):
        with pytest.raises(ValueError, match="chimera\\+ngram:K\\[:D\\]"):
            Method.parse(bad)

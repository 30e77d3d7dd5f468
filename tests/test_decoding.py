"""The reference decoder: greedy Chimera decoding is token-for-token the target's own greedy decoding."""

from __future__ import annotations

import copy

import pytest
import torch

from chimera_vllm.config import ChimeraConfigError
from chimera_vllm.model.base import TargetParts
from chimera_vllm.model.checkpoint import init_draft
from chimera_vllm.model.draft import ChimeraDraft
from chimera_vllm.reference.decoding import SpeculativeDecoder
from chimera_vllm.reference.target import load_target
from chimera_vllm.testing.tiny import grammar_prompts

from .conftest import draft_after, hf_greedy

EOS = 4  # the tiny tokenizer's <|im_end|>


def mixed_prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("k", [1, 2, 4])
def test_random_draft_greedy_is_lossless_batched(tiny_target_dir, k):
    """Llama and Qwen2 targets, prompts of 1..23 tokens in one batch, an untrained draft."""
    target = load_target(str(tiny_target_dir))
    draft = init_draft(target, str(tiny_target_dir), num_heads=4, seed=k)
    prompts = mixed_prompts(target.config.vocab_size, [1, 2, 3, 7, 12, 23])
    expected = hf_greedy(target, prompts, 40, EOS)
    outputs, stats = SpeculativeDecoder(target, draft, k).generate(prompts, 40, {EOS})
    assert outputs == expected
    assert stats.draft_tokens == k * stats.target_steps


def test_plain_decoding_matches_transformers(tiny_target_dir):
    target = load_target(str(tiny_target_dir))
    prompts = mixed_prompts(target.config.vocab_size, [5, 1, 9], seed=3)
    outputs, stats = SpeculativeDecoder(target).generate(prompts, 30, {EOS})
    assert outputs == hf_greedy(target, prompts, 30, EOS)
    assert stats.to_dict()["mean_accepted_length"] == 1.0


@pytest.mark.parametrize("k", [1, 3, 4])
def test_trained_draft_is_lossless_and_accepts(trained_pair, k):
    """A draft that is often right exercises every acceptance length; output stays the target's."""
    _, target, tokenizer, _, trained = trained_pair
    prompts = grammar_prompts(tokenizer, 12, seed=99)
    outputs, stats = SpeculativeDecoder(target, trained, k).generate(prompts, 48, {EOS})
    assert outputs == hf_greedy(target, prompts, 48, EOS)
    s = stats.to_dict()
    assert s["mean_accepted_length"] > 1.5
    assert 0 < s["acceptance_by_position"][-1] < 1, "partial acceptance should occur at the last position"
    # per prompt: its steps and kept drafts add up to the totals, and produce its output's length
    assert sum(stats.steps_by_request) == stats.target_steps
    assert sum(stats.accepted_by_request) == stats.accepted_tokens
    for output, steps, kept in zip(outputs, stats.steps_by_request, stats.accepted_by_request):
        # the prefill's token, one a step and the kept drafts, less what the last step made past the end
        assert 0 <= 1 + steps + kept - len(output) <= k


def test_eos_inside_accepted_draft_stops_where_target_would(trained_pair):
    """'.' as the stop token: it is often drafted and accepted mid-draft; nothing after it is emitted."""
    _, target, tokenizer, _, trained = trained_pair
    stop = tokenizer.convert_tokens_to_ids(".")
    prompts = grammar_prompts(tokenizer, 8, seed=5)
    outputs, _ = SpeculativeDecoder(target, trained, 4).generate(prompts, 48, {stop})
    assert outputs == hf_greedy(target, prompts, 48, stop)
    assert all(o[-1] == stop and stop not in o[:-1] for o in outputs)


@pytest.mark.parametrize("max_new", [1, 2, 3, 6, 11])
def test_max_new_tokens_inside_draft(trained_pair, max_new):
    _, target, tokenizer, _, trained = trained_pair
    prompts = grammar_prompts(tokenizer, 4, seed=11)
    outputs, _ = SpeculativeDecoder(target, trained, 4).generate(prompts, max_new, {EOS})
    assert outputs == hf_greedy(target, prompts, max_new, EOS)
    assert all(len(o) == max_new for o in outputs)


def test_cache_trimmed_on_rejection(trained_pair):
    """Batch of one: after every step the target's cache holds exactly the verified tokens."""
    _, target, tokenizer, _, trained = trained_pair
    decoder = SpeculativeDecoder(target, trained, 4)
    from chimera_vllm.reference.decoding import DecodeStats, _Requests

    reqs = _Requests(grammar_prompts(tokenizer, 1, seed=1), 40, set())
    state = decoder._prefill(reqs)
    stats = DecodeStats.zeros(4, 1)
    while state.rows:
        decoder._step(reqs, state, stats)
        if state.rows:
            length = state.cache.get_seq_length()
            assert length == int(state.next_pos[0]) == state.valid.shape[1]
            assert bool(state.valid.all())
            assert state.ctx_k.shape[2] == length
    assert stats.accepted_tokens < stats.draft_tokens, "the test needs at least one rejection"


def test_empty_prompt_is_an_error(llama_target):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        SpeculativeDecoder(llama_target).generate([[5, 6], []], 4)


def test_more_speculative_tokens_than_heads_is_an_error(llama_target, llama_dir):
    draft = init_draft(llama_target, str(llama_dir), num_heads=3)
    with pytest.raises(ChimeraConfigError, match="num_speculative_tokens=4 .* 3 heads"):
        SpeculativeDecoder(llama_target, draft, 4)


def test_request_longer_than_the_target_allows_is_an_error(llama_target):
    limit = llama_target.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"prompt 1 has 500 tokens: .* max_position_embeddings={limit}"):
        SpeculativeDecoder(llama_target).generate([[5, 6], [7] * 500], 20)


def test_draft_vocabulary_restricts_proposals_and_stays_lossless(trained_pair, tmp_path):
    """Drafting over a subset of the vocabulary: every proposal is in it, greedy output is unchanged,
    the subset survives save/load, and sampled drafting gives the rest probability 0."""
    _, target, tokenizer, _, trained = trained_pair
    draft = copy.deepcopy(trained)
    prompts = grammar_prompts(tokenizer, 12, seed=99)
    # The 20 most frequent tokens of the target's own outputs, in shuffled order.
    outputs, full = SpeculativeDecoder(target, trained, 4).generate(prompts, 48, {EOS})
    counts = torch.bincount(torch.tensor([t for o in outputs for t in o]), minlength=target.config.vocab_size)
    vocab = counts.topk(20).indices[torch.randperm(20, generator=torch.Generator().manual_seed(0))]
    draft.set_draft_vocab(vocab)
    assert draft.draft_vocab.tolist() == sorted(vocab.tolist())
    restricted_out, restricted = SpeculativeDecoder(target, draft, 4).generate(prompts, 48, {EOS})
    assert restricted_out == hf_greedy(target, prompts, 48, EOS)
    assert restricted.accepted_tokens > 0.5 * full.accepted_tokens  # the frequent tokens carry most of it
    draft.save_pretrained(tmp_path / "d")
    loaded = ChimeraDraft.from_pretrained(tmp_path / "d", target.config)
    assert torch.equal(loaded.draft_vocab, draft.draft_vocab) and loaded.config.draft_vocab_size == 20
    ids = torch.tensor([prompts[0]])
    hidden = target(ids, output_hidden_states=True).hidden_states[-1].detach()
    parts = TargetParts.from_model(target)
    tokens, _ = draft_after(loaded, parts, ids, hidden, len(prompts[0]) - 2, 4, None)
    assert set(tokens.flatten().tolist()) <= set(vocab.tolist())
    sampled, logits = draft_after(loaded, parts, ids, hidden, len(prompts[0]) - 2, 4, lambda k, lg: lg.argmax(-1))
    outside = torch.ones(target.config.vocab_size, dtype=torch.bool)
    outside[vocab] = False
    assert torch.isinf(logits[..., outside]).all() and torch.equal(sampled, tokens)


def test_draft_vocabulary_out_of_range_is_refused(trained_pair):
    draft = copy.deepcopy(trained_pair[4])
    with pytest.raises(ChimeraConfigError, match="draft vocabulary ids must lie in 0..104"):
        draft.set_draft_vocab(torch.tensor([3, 105]))

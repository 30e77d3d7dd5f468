"""Speculative sampling: the emitted tokens are distributed as sampling from the target alone."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import LlamaForCausalLM

from chimera_vllm.model.checkpoint import init_draft
from chimera_vllm.model.tree import DraftTree
from chimera_vllm.reference.decoding import SpeculativeDecoder
from chimera_vllm.reference.sampling import TokenSampler
from chimera_vllm.testing.tiny import tiny_target_config

VOCAB = 6
PROMPT = [1, 3, 2, 5]
NEW_TOKENS = 3  # token 1 comes from the prefill, tokens 2 and 3 from one verification step
SAMPLES = 6000
# E[TV] of an N-sample empirical distribution over C cells is at most sqrt(C / (2 pi N)) ~ 0.076 here
# (C = 216, N = 6000), and far less for this concentrated distribution: measured ~0.02 for plain sampling
# from the target and for the speculative sampler alike (3 seeds). 0.05 leaves room for sampling noise;
# the naive sampler of the negative control lands above 0.1.
TV_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def small_vocab_target():
    torch.manual_seed(0)
    cfg = tiny_target_config("llama", vocab_size=VOCAB, initializer_range=0.3, eos_token_id=None, bos_token_id=None)
    return LlamaForCausalLM(cfg).eval().requires_grad_(False)


def exact_distribution(target, temperature: float) -> torch.Tensor:
    """P(y1, y2, y3 | PROMPT) under plain sampling from the target, by enumeration [V, V, V]."""
    dist = torch.zeros(VOCAB, VOCAB, VOCAB)
    seqs = [PROMPT + list(prefix) for prefix in itertools.product(range(VOCAB), repeat=2)]
    with torch.no_grad():
        logits = target(torch.tensor(seqs)).logits / temperature
    probs = torch.softmax(logits.double(), dim=-1)
    L = len(PROMPT)
    for i, seq in enumerate(seqs):
        y1, y2 = seq[L], seq[L + 1]
        dist[y1, y2] = probs[i, L - 1, y1] * probs[i, L, y2] * probs[i, L + 1]
    return dist


def empirical_distribution(decoder: SpeculativeDecoder) -> torch.Tensor:
    outputs, _ = decoder.generate([PROMPT] * SAMPLES, NEW_TOKENS)
    counts = torch.zeros(VOCAB, VOCAB, VOCAB)
    for y1, y2, y3 in outputs:
        counts[y1, y2, y3] += 1
    return counts / SAMPLES


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p - q).abs().sum())


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_speculative_sampling_matches_target_distribution(small_vocab_target, seed, temperature):
    draft = init_draft(small_vocab_target, "tiny", num_heads=2, seed=seed)
    decoder = SpeculativeDecoder(small_vocab_target, draft, 2, temperature=temperature, seed=seed)
    exact = exact_distribution(small_vocab_target, temperature)
    assert total_variation(empirical_distribution(decoder), exact) < TV_TOLERANCE


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("branching", [[2, 2], [3, 1]])
def test_sampling_over_a_draft_tree_matches_target_distribution(small_vocab_target, seed, branching):
    """The tree's nodes are the draft's top choices; tokens 2 and 3 come from one tree step."""
    draft = init_draft(small_vocab_target, "tiny", num_heads=2, seed=seed)
    decoder = SpeculativeDecoder(
        small_vocab_target, draft, tree=DraftTree.from_branching(branching), temperature=1.0, seed=seed
    )
    exact = exact_distribution(small_vocab_target, 1.0)
    assert total_variation(empirical_distribution(decoder), exact) < TV_TOLERANCE


def test_the_tree_check_catches_a_sampler_that_keeps_every_first_choice(small_vocab_target, monkeypatch):
    """Negative control: keeping the first child down the tree without the target's test."""
    draft = init_draft(small_vocab_target, "tiny", num_heads=2, seed=0)
    decoder = SpeculativeDecoder(small_vocab_target, draft, tree=DraftTree.from_branching([2, 2]), temperature=1.0)

    def first_children(nodes, children, target_logits):
        slot = torch.full((nodes.shape[0],), int(children[children[0, 0], 0]))
        return slot, decoder.sampler.sample(target_logits[:, slot[0]])

    monkeypatch.setattr(decoder.sampler, "verify_tree", first_children)
    exact = exact_distribution(small_vocab_target, 1.0)
    assert total_variation(empirical_distribution(decoder), exact) > 2 * TV_TOLERANCE


def test_a_tree_step_keeps_a_child_with_the_targets_probability_once_earlier_siblings_are_refused():
    """Root children are tokens 0 and 1; the target's root distribution is p. P(keep child 1) =
    (1 - p0) * p1 / (1 - p0); every other token is drawn from p without 0 and 1."""
    p = torch.tensor([0.5, 0.3, 0.2])
    sampler = TokenSampler(1.0, seed=0)
    n = 20000
    nodes = torch.tensor([[0, 1]]).expand(n, 2)
    logits = p.log().expand(n, 3, 3)  # every slot's distribution is p (children of the root only)
    slot, nxt = sampler.verify_tree(nodes, torch.tensor([[1, 2], [-1, -1], [-1, -1]]), logits)
    kept_first, kept_second = (slot == 1).float().mean(), (slot == 2).float().mean()
    assert abs(float(kept_first) - 0.5) < 0.02 and abs(float(kept_second) - 0.3) < 0.02
    assert bool((nxt[slot == 0] == 2).all())  # refused both: only token 2 remains


def test_the_check_catches_a_sampler_that_keeps_every_draft(small_vocab_target, monkeypatch):
    """Negative control: accepting drafts without the p/q test gives the draft's distribution."""
    draft = init_draft(small_vocab_target, "tiny", num_heads=2, seed=0)
    decoder = SpeculativeDecoder(small_vocab_target, draft, 2, temperature=1.0, seed=0)

    def keep_all(draft_tokens, draft_logits, target_logits):
        B, K = draft_tokens.shape
        return torch.full((B,), K), decoder.sampler.sample(target_logits[:, K])

    monkeypatch.setattr(decoder.sampler, "verify", keep_all)
    exact = exact_distribution(small_vocab_target, 1.0)
    assert total_variation(empirical_distribution(decoder), exact) > 2 * TV_TOLERANCE


def test_greedy_verify_accepts_longest_matching_prefix():
    sampler = TokenSampler(0.0)
    target_logits = torch.full((3, 4, 10), -1.0)
    for b, row in enumerate([[1, 2, 3, 4], [1, 9, 3, 4], [0, 2, 3, 7]]):
        for i, t in enumerate(row):
            target_logits[b, i, t] = 5.0
    drafts = torch.tensor([[1, 2, 3], [1, 2, 3], [1, 2, 3]])
    accepted, nxt = sampler.verify(drafts, torch.zeros(3, 3, 10), target_logits)
    assert accepted.tolist() == [3, 1, 0]
    assert nxt.tolist() == [4, 9, 0]


def test_negative_temperature_is_an_error():
    with pytest.raises(ValueError, match="temperature must be >= 0, got -0.5"):
        TokenSampler(-0.5)

"""Token choice and draft verification: greedy, and speculative (rejection) sampling.

Speculative sampling (Leviathan et al., Chen et al.): draft token x ~ q is kept
with probability min(1, p(x)/q(x)); at the first rejection a token is drawn from
norm(max(p - q, 0)); when every draft is kept a bonus token is drawn from p.
The emitted sequence is then distributed exactly as sampling from the target.

A tree's nodes are the draft's top choices, not samples from it: each is a proposal
with all its mass on one token, so the same rule keeps it with probability p(x) and
leaves norm(p without x) for the next sibling (:meth:`TokenSampler.verify_tree`).
"""

from __future__ import annotations

import torch
from torch import Tensor


class TokenSampler:
    """Greedy when temperature == 0, else sampling from softmax(logits / temperature)."""

    def __init__(self, temperature: float = 0.0, seed: int = 0, device: str | torch.device = "cpu"):
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        self.temperature = temperature
        self.generator = torch.Generator(device=device).manual_seed(seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def probs(self, logits: Tensor) -> Tensor:
        return torch.softmax(logits.float() / self.temperature, dim=-1)

    def sample(self, logits: Tensor) -> Tensor:
        """logits [B, V] -> token ids [B]."""
        if self.greedy:
            return logits.argmax(dim=-1)
        return torch.multinomial(self.probs(logits), 1, generator=self.generator)[:, 0]

    def choose(self, step: int, logits: Tensor) -> Tensor:
        """The drafting loop's chooser: the draft samples with the same rule as the target."""
        return self.sample(logits)

    def verify(self, draft_tokens: Tensor, draft_logits: Tensor | None, target_logits: Tensor) -> tuple[Tensor, Tensor]:
        """Decide how many drafts each request keeps and the token that follows them.

        draft_tokens [B, K], draft_logits [B, K, V] (unused, may be None, when greedy), target_logits [B, K+1, V]
        (target_logits[:, i] is the target's distribution for the slot of draft i).
        Returns (num_accepted [B], next_token [B]).
        """
        B, K = draft_tokens.shape
        if self.greedy:
            pred = target_logits.argmax(dim=-1)  # [B, K+1]
            accepted = (pred[:, :K] == draft_tokens).long().cumprod(dim=1).sum(dim=1)
            return accepted, pred.gather(1, accepted[:, None])[:, 0]
        p = self.probs(target_logits)  # [B, K+1, V]
        q = self.probs(draft_logits)  # [B, K, V]
        p_x = p[:, :K].gather(2, draft_tokens[..., None])[..., 0]
        q_x = q.gather(2, draft_tokens[..., None])[..., 0]
        u = torch.rand(B, K, generator=self.generator, device=p.device)
        keep = u * q_x < p_x  # u < p/q without dividing by a zero q
        accepted = keep.long().cumprod(dim=1).sum(dim=1)
        # Distribution of the next token: the residual at the first rejection, p after K accepts.
        residual = (p[:, :K] - q).clamp(min=0)
        residual = torch.cat([residual, p[:, K:]], dim=1)
        rows = torch.arange(B, device=p.device)
        dist = residual[rows, accepted]
        # If p == q exactly the residual is all zero; any rejection was then impossible,
        # except by float rounding: fall back to p there.
        empty = dist.sum(dim=-1, keepdim=True) <= 0
        dist = torch.where(empty, p[rows, accepted], dist)
        next_token = torch.multinomial(dist, 1, generator=self.generator)[:, 0]
        return accepted, next_token

    def verify_tree(self, nodes: Tensor, children: Tensor, target_logits: Tensor) -> tuple[Tensor, Tensor]:
        """Sampling over a tree of drafts (:class:`~chimera_vllm.model.tree.DraftTree`): from the root, a
        slot's children are tried in rank order, each kept with the target's probability of its token
        once the siblings tried before it are ruled out; the first one kept is the path's next slot.
        Where none is kept (or at a leaf), the next token is drawn from what remains of the target's
        distribution there. Each try is rejection sampling from a one-token proposal, so the emitted
        tokens are distributed exactly as sampling from the target.

        nodes [B, N] (node i in slot i + 1), children [1+N, widest]: each slot's child slots in rank
        order, -1 past its last (slot 0 the root), target_logits [B, 1+N, V]. Returns (the last kept
        slot [B], next token [B])."""
        p = self.probs(target_logits)
        B, device = nodes.shape[0], nodes.device
        rows = torch.arange(B, device=device)
        u = torch.rand(B, nodes.shape[1], generator=self.generator, device=device)  # a node is tried once at most
        slot = torch.zeros(B, dtype=torch.long, device=device)
        searching = torch.ones(B, dtype=torch.bool, device=device)
        remaining = p[:, 0].clone()
        while searching.any():
            remaining = torch.where(searching[:, None], p[rows, slot], remaining)
            moved = torch.zeros_like(searching)
            for rank in range(children.shape[1]):
                child = children[slot, rank]
                node = (child - 1).clamp(min=0)
                token = nodes[rows, node]
                mass = remaining.sum(dim=-1)
                p_token = remaining[rows, token] / mass.clamp(min=torch.finfo(mass.dtype).tiny)
                trying = searching & ~moved & (child >= 0)
                keep = trying & (u[rows, node] < p_token)
                remaining[rows[trying & ~keep], token[trying & ~keep]] = 0
                slot = torch.where(keep, child, slot)
                moved |= keep
            searching = moved
        # If every token with mass was tried and refused (only by float rounding), draw from p there.
        empty = remaining.sum(dim=-1, keepdim=True) <= 0
        remaining = torch.where(empty, p[rows, slot], remaining)
        return slot, torch.multinomial(remaining, 1, generator=self.generator)[:, 0]

"""Token choice and draft verification: greedy, and speculative (rejection) sampling.

Speculative sampling (Leviathan et al., Chen et al.): draft token x ~ q is kept
with probability min(1, p(x)/q(x)); at the first rejection a token is drawn from
norm(max(p - q, 0)); when every draft is kept a bonus token is drawn from p.
The emitted sequence is then distributed exactly as sampling from the target.
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

"""The training forward and distillation loss of a Chimera draft.

Step k at query position p sees exactly what the drafting loop would after the
target verified x_0..x_{n+1} with n = p-k-1: keys/values of the target's h_0..h_n,
the encoder's own outputs of steps 0..k-1 at positions n+1..p-1, and itself;
its head reads the anchor h_n. Every position of a sequence trains every step at
once: step k is one pass of the (single) encoder layer over the sequence, with a
causal mask over the h_j and, per query, the k earlier steps' outputs it reads (one
each, aligned to the query). The K passes are sequential because step k attends to
the outputs of the earlier steps.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chimera_vllm.model.draft import ChimeraDraft, TargetParts
from chimera_vllm.model.layers import trigram_ids


def verified_context_mask(T: int, step: int, device: torch.device | None = None) -> Tensor:
    """[T, T] bool: the target's h_j that query p may see at draft step `step` (j <= p-step-1)."""
    return torch.ones(T, T, dtype=torch.bool, device=device).tril(-(step + 1))


def shift_right(x: Tensor, n: int = 1) -> Tensor:
    """x[:, :, p] <- x[:, :, p-n] along the position axis (dim 2); zeros enter at the front."""
    return F.pad(x, (0, 0) * (x.dim() - 3) + (n, 0))[:, :, : x.shape[2]]


def shifted_anchor(hidden: Tensor, step: int) -> Tensor:
    """anchor[:, p] = h_{p-step-1} (zeros where p <= step, which no loss reads)."""
    return F.pad(hidden, (0, 0, step + 1, 0))[:, : hidden.shape[1]]


def draft_steps(
    draft: ChimeraDraft, parts: TargetParts, input_ids: Tensor, hidden: Tensor, num_steps: int
) -> Iterator[tuple[int, Tensor, Tensor]]:
    """Yield (k, ĥ^(k) [B, T, H] or None for Medusa, anchor^(k) [B, T, H]) for every draft step, teacher-forced.

    input_ids [B, T] and the target's final hidden states hidden [B, T, H].
    Positions p <= k have no anchor; their outputs are meaningless and must not be trained.
    """
    if not draft.uses_context:  # the Medusa baseline: heads over the anchor alone
        for k in range(num_steps):
            yield k, None, shifted_anchor(hidden, k)
        return
    B, T = input_ids.shape
    positions = torch.arange(T, device=input_ids.device).expand(B, T)
    e = draft.trigram(trigram_ids(input_ids), parts.embed_weight)
    keys, values = draft.encoder.context_kv(hidden, positions)
    # own_k[:, :, p, j] is the key of step j's output at position p-k+j: the one entry of
    # that step query p sees at step k; every step shifts them one position further.
    own_k = own_v = None
    for k in range(num_steps):
        mask = verified_context_mask(T, k, input_ids.device)[None]
        h_hat = draft.encoder(e, positions, keys, values, mask, own_k, own_v)
        yield k, h_hat, shifted_anchor(hidden, k)
        if k + 1 < num_steps:
            new_k, new_v = (x[:, :, :, None] for x in draft.encoder.context_kv(h_hat, positions))
            own_k = shift_right(new_k if own_k is None else torch.cat([own_k, new_k], dim=3))
            own_v = shift_right(new_v if own_v is None else torch.cat([own_v, new_v], dim=3))


@dataclass
class LossWeights:
    """loss = sum_k step_weights[k] * (CE_k + mse * MSE_k + kl * KL_k)."""

    step_weights: tuple[float, ...] = (1.0, 0.8, 0.64, 0.512)
    mse: float = 1.0
    kl: float = 0.0

    @classmethod
    def geometric(cls, num_steps: int, decay: float = 0.8, mse: float = 1.0, kl: float = 0.0) -> LossWeights:
        return cls(tuple(decay**k for k in range(num_steps)), mse, kl)


def greedy_next_tokens(hidden: Tensor, lm_head_weight: Tensor, chunk: int = 1024) -> Tensor:
    """The target's greedy choice after every position: argmax of h_p's logits, [B, T].

    As labels they teach the draft what greedy verification accepts. On greedy data they
    equal the data's next tokens; on sampled data (more diverse prefixes) they replace
    the sampled token with the one the target would have picked. Chunked over positions:
    full-vocabulary logits of a whole batch would take gigabytes."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    out = torch.empty(flat.shape[0], dtype=torch.long, device=hidden.device)
    with torch.no_grad():
        for start in range(0, flat.shape[0], chunk):
            out[start : start + chunk] = F.linear(flat[start : start + chunk], lm_head_weight).argmax(-1)
    return out.view(hidden.shape[:-1])


class GreedyLabels:
    """greedy_next_tokens of each training sequence, computed the first time it is in a batch.

    The target is frozen, so every later epoch would compute the same full-vocabulary
    products again: on a CPU, with the hidden states cached, about a fifth of a step."""

    def __init__(self, lm_head_weight: Tensor, lengths: list[int]):
        self.lm_head_weight = lm_head_weight
        self.lengths = lengths
        self._rows: dict[int, Tensor] = {}

    def batch(self, indices: list[int], hidden: Tensor) -> Tensor:
        """[B, T] labels of sequences `indices`, whose target hidden states are hidden [B, T, H]."""
        if any(i not in self._rows for i in indices):
            tokens = greedy_next_tokens(hidden, self.lm_head_weight)
            for b, i in enumerate(indices):
                self._rows[i] = tokens[b, : self.lengths[i]]
            return tokens
        out = torch.zeros(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        for b, i in enumerate(indices):
            out[b, : self.lengths[i]] = self._rows[i]
        return out


class ChimeraObjective(nn.Module):
    """Wraps the draft so that one forward() computes the loss (what DDP needs to wrap)."""

    def __init__(self, draft: ChimeraDraft, parts: TargetParts, weights: LossWeights, max_positions: int | None = None):
        super().__init__()
        self.draft = draft
        self.parts = parts
        self.weights = weights
        # The LM head's [N, V] logits dominate a step's cost for large V: each step trains
        # on at most max_positions positions of the batch, a fresh random subset every time.
        self.max_positions = max_positions
        self.generator = torch.Generator()

    def reseed(self, seed: int) -> None:
        """Fix the position subsets of the next forward (the trainer reseeds every step)."""
        self.generator.manual_seed(seed)

    def _subsample(self, sel: Tensor) -> Tensor:
        if self.max_positions is None or int(sel.sum()) <= self.max_positions:
            return sel
        chosen = sel.flatten().nonzero()[:, 0]
        keep = chosen[torch.randperm(len(chosen), generator=self.generator)[: self.max_positions].to(sel.device)]
        out = torch.zeros_like(sel).flatten()
        out[keep] = True
        return out.view_as(sel)

    def _draft_vocab_labels(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Target ids [B, T] -> indices into the draft vocabulary (-1 where the draft cannot
        propose the token: no loss there), and the target LM-head rows of that vocabulary."""
        vocab, rows = self.draft.draft_vocab, self.parts.lm_head_weight
        index = self.draft.draft_vocab_index(labels, rows.shape[0])
        return index, rows if vocab is None else rows.index_select(0, vocab)

    def forward(
        self, input_ids: Tensor, hidden: Tensor, label_mask: Tensor, next_tokens: Tensor | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        """input_ids/label_mask [B, T] (label_mask[p]: x_p is a token to predict), hidden [B, T, H].

        next_tokens [B, T - 1]: the token each query p learns to propose for position p + 1;
        by default the data's own x_{p+1} (see greedy_next_tokens for the alternative)."""
        T = input_ids.shape[1]
        labels, teacher_rows = self._draft_vocab_labels(input_ids[:, 1:] if next_tokens is None else next_tokens)
        total = hidden.new_zeros(())
        metrics: dict[str, float] = {}
        for k, h_hat, anchor in draft_steps(self.draft, self.parts, input_ids, hidden, len(self.weights.step_weights)):
            # query p predicts x_{p+1}; it needs an anchor (p >= k+1) and a label the draft can propose.
            sel = label_mask[:, 1:] & (labels >= 0)
            sel[:, : k + 1] = False
            sel = self._subsample(sel)
            if not sel.any():
                continue
            hh = h_hat[:, : T - 1][sel] if h_hat is not None else None
            features, rows = self.draft.draft_vocab_product(k, hh, anchor[:, : T - 1][sel], self.parts)
            logits = F.linear(features, rows).float()
            target_label = labels[sel]
            loss = ce = F.cross_entropy(logits, target_label)
            if hh is not None:
                mse = F.mse_loss(hh.float(), hidden[:, : T - 1][sel].float())
                loss = loss + self.weights.mse * mse
                metrics[f"mse_{k}"] = mse.item()
            if self.weights.kl > 0:
                teacher = F.log_softmax(F.linear(hidden[:, : T - 1][sel], teacher_rows).float(), -1)
                kl = F.kl_div(F.log_softmax(logits, -1), teacher, log_target=True, reduction="batchmean")
                loss = loss + self.weights.kl * kl
                metrics[f"kl_{k}"] = kl.item()
            total = total + self.weights.step_weights[k] * loss
            metrics[f"ce_{k}"] = ce.item()
            metrics[f"top1_{k}"] = (logits.argmax(-1) == target_label).float().mean().item()
        metrics["loss"] = total.item()
        return total, metrics

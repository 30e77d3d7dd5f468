"""The distillation loss of a draft.

Every position of a sequence trains every draft step at once: the draft's teacher-forced pass
(:meth:`~chimera_vllm.model.base.DraftModel.training_steps`) gives each step's features at every
query position exactly as the drafting loop would compute them there, and each head learns the
token that verification would accept after that position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chimera_vllm.model.base import DraftModel, TargetParts


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

    def __init__(self, draft: DraftModel, parts: TargetParts, weights: LossWeights, max_positions: int | None = None):
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
        self,
        input_ids: Tensor,
        hidden: Tensor,
        label_mask: Tensor,
        next_tokens: Tensor | None = None,
        aux: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """input_ids/label_mask [B, T] (label_mask[p]: x_p is a token to predict), hidden [B, T, H],
        aux [B, T, 3H] the hidden states of the target layers an EAGLE-3 draft reads.

        next_tokens [B, T - 1]: the token each query p learns to propose for position p + 1;
        by default the data's own x_{p+1} (see greedy_next_tokens for the alternative)."""
        T = input_ids.shape[1]
        labels, teacher_rows = self._draft_vocab_labels(input_ids[:, 1:] if next_tokens is None else next_tokens)
        total = hidden.new_zeros(())
        metrics: dict[str, float] = {}
        for k, h_hat, anchor in self.draft.training_steps(
            self.parts, input_ids, hidden, len(self.weights.step_weights), aux
        ):
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

"""The paper's draft metrics: mean accepted length, acceptance by position, head top-1/top-5.

Head accuracy is measured teacher-forced against the target's own greedy
continuation: for every position of it, head k sees what the drafting loop sees
after the target verified the text up to k+1 tokens earlier, and is right when
its top-1 (top-5) contains the token the target actually produced there.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from .decoding import SpeculativeDecoder
from .model import ChimeraDraft, TargetParts
from .target import final_hidden
from .training.objective import draft_steps


@dataclass
class EvalResult:
    num_prompts: int
    num_speculative_tokens: int
    mean_accepted_length: float
    acceptance_by_position: list[float]
    head_top1: list[float]
    head_top5: list[float]
    outputs_identical: bool

    def to_dict(self) -> dict:
        return asdict(self)


def label_rank(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Rank of each label among [N, V] logits, ties broken by lower index as torch.argmax does."""
    own = logits.gather(1, labels[:, None])
    index = torch.arange(logits.shape[1], device=logits.device)
    before = (logits > own) | ((logits == own) & (index[None] < labels[:, None]))
    return before.sum(dim=1)


@torch.no_grad()
def head_accuracy(
    target: PreTrainedModel, draft: ChimeraDraft, sequences: list[tuple[list[int], list[int]]], num_steps: int
) -> tuple[list[float], list[float]]:
    """Teacher-forced top-1/top-5 of each head over (prompt, greedy continuation) pairs."""
    parts = TargetParts.from_model(target)
    hits1, hits5, counts = torch.zeros(num_steps), torch.zeros(num_steps), torch.zeros(num_steps)
    for prompt, continuation in sequences:
        ids = torch.tensor([prompt + continuation], device=target.device)
        hidden = final_hidden(target, ids)
        T, first_anchor = ids.shape[1], len(prompt) - 1
        for k, h_hat, anchor in draft_steps(draft, parts, ids, hidden, num_steps):
            # query p drafts x_{p+1} from anchor n = p-k-1; the anchor must be a verified
            # position of the continuation's decoding (n >= last prompt position).
            p = torch.arange(first_anchor + k + 1, T - 1, device=ids.device)
            if len(p) == 0:
                continue
            logits = draft.head_logits(k, None if h_hat is None else h_hat[0, p], anchor[0, p], parts)
            rank = label_rank(logits, ids[0, p + 1])
            hits1[k] += (rank < 1).sum().item()
            hits5[k] += (rank < 5).sum().item()
            counts[k] += len(p)
    counts = counts.clamp(min=1)
    return (hits1 / counts).tolist(), (hits5 / counts).tolist()


def evaluate(
    target: PreTrainedModel,
    draft: ChimeraDraft,
    prompts: list[list[int]],
    num_steps: int,
    max_new_tokens: int,
    eos_token_ids: set[int],
    batch_size: int = 16,
    progress: bool = False,
) -> EvalResult:
    """Greedy: decode with and without the draft, then score the heads on the target's continuations."""
    plain, spec, steps, accepted = [], [], 0, torch.zeros(num_steps)
    for start in tqdm(range(0, len(prompts), batch_size), disable=not progress, unit="batch"):
        batch = prompts[start : start + batch_size]
        plain += SpeculativeDecoder(target).generate(batch, max_new_tokens, eos_token_ids)[0]
        outputs, stats = SpeculativeDecoder(target, draft, num_steps).generate(batch, max_new_tokens, eos_token_ids)
        spec += outputs
        steps += stats.target_steps
        accepted += torch.tensor(stats.accepted_by_position, dtype=torch.float)
    top1, top5 = head_accuracy(target, draft, list(zip(prompts, plain)), num_steps)
    return EvalResult(
        num_prompts=len(prompts),
        num_speculative_tokens=num_steps,
        mean_accepted_length=1 + float(accepted.sum()) / max(steps, 1),
        acceptance_by_position=(accepted / max(steps, 1)).tolist(),
        head_top1=top1,
        head_top5=top5,
        outputs_identical=plain == spec,
    )

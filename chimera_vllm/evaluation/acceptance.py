"""The paper's draft metrics: mean accepted length, acceptance by position, head top-1/top-5.

Head accuracy is measured teacher-forced against the target's own greedy
continuation: for every position of it, head k sees what the drafting loop sees
after the target verified the text up to k+1 tokens earlier, and is right when
its top-1 (top-5) over the draft's vocabulary contains the token the target
actually produced there.

The same positions are also grouped by the target's own confidence in its token
(its softmax probability there): where a draft misses tokens the target was sure of,
the draft's capacity or data limit it; near the target's own ties, every draft misses.
And by the draft's own confidence in its top token (its calibration): what a policy that
drafts fewer tokens when the draft is unsure would keep and drop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from chimera_vllm.model.base import DraftModel, TargetParts
from chimera_vllm.model.tree import DraftTree
from chimera_vllm.reference.decoding import SpeculativeDecoder
from chimera_vllm.reference.target import final_hidden

RANKS = 16
"""Ranks of the target's token among each head's choices that are counted (for draft trees)."""

CONFIDENCE_EDGES = (0.5, 0.8, 0.95)
"""Bounds of the confidence buckets: [0, 0.5), [0.5, 0.8), [0.8, 0.95), [0.95, 1]."""


@dataclass
class ConfidenceBucket:
    """The positions where a probability (the target's of its token, or the draft's of its top token)
    lies in [low, high)."""

    low: float
    high: float
    share: list[float]  # per head: the fraction of its positions in this bucket
    head_top1: list[float]  # per head: its top-1 accuracy on them


@dataclass
class HeadAccuracy:
    top1: list[float]
    top5: list[float]
    by_target_confidence: list[ConfidenceBucket]
    by_draft_confidence: list[ConfidenceBucket]
    top1_by_group: dict[str, list[float]]  # per head, over each group's sequences (when groups are given)
    rank_probability: list[list[float]]  # per head: share of positions where the target's token is its r-th choice


@dataclass
class CategoryResult:
    """The metrics over the prompts of one category (a prompt file's "category" field)."""

    category: str
    num_prompts: int
    mean_accepted_length: float
    head_top1: list[float]


class _BucketTally:
    """Top-1 hits and position counts per head and confidence bucket."""

    def __init__(self, num_steps: int):
        self.edges = torch.tensor(CONFIDENCE_EDGES)
        self.hits = torch.zeros(num_steps, len(CONFIDENCE_EDGES) + 1)
        self.counts = torch.zeros_like(self.hits)

    def add(self, step: int, confidence: torch.Tensor, hit: torch.Tensor) -> None:
        bucket = torch.bucketize(confidence, self.edges, right=True)
        self.hits[step] += torch.bincount(bucket, weights=hit.float(), minlength=self.hits.shape[1])
        self.counts[step] += torch.bincount(bucket, minlength=self.hits.shape[1]).float()

    def buckets(self) -> list[ConfidenceBucket]:
        total = self.counts.sum(dim=1).clamp(min=1)
        bounds = (0.0, *CONFIDENCE_EDGES, 1.0)
        return [
            ConfidenceBucket(
                low=bounds[b],
                high=bounds[b + 1],
                share=(self.counts[:, b] / total).tolist(),
                head_top1=(self.hits[:, b] / self.counts[:, b].clamp(min=1)).tolist(),
            )
            for b in range(self.hits.shape[1])
        ]


@dataclass
class EvalResult:
    num_prompts: int
    num_speculative_tokens: int
    mean_accepted_length: float
    acceptance_by_position: list[float]
    head_top1: list[float]
    head_top5: list[float]
    head_top1_by_target_confidence: list[ConfidenceBucket]
    head_top1_by_draft_confidence: list[ConfidenceBucket]
    head_rank_probability: list[list[float]]  # [head][r]: the target's token is the head's r-th choice (r < RANKS)
    outputs_identical: bool
    by_category: list[CategoryResult] = field(default_factory=list)  # weakest first; empty without categories
    tree: list[list[int]] | None = None  # the draft tree's rank paths, when decoding drafted a tree

    def to_dict(self) -> dict:
        return asdict(self)

    def text_report(self, k: int) -> str:
        """Per head: acceptance, top-1 and top-5; top-1 by confidence bucket; by category when known."""
        lines = [f"{'head':>6}{'acceptance':>12}{'top-1':>8}{'top-5':>8}"]
        for i in range(k):
            lines.append(
                f"{i:>6}{self.acceptance_by_position[i]:>12.3f}{self.head_top1[i]:>8.3f}{self.head_top5[i]:>8.3f}"
            )
        for whose, buckets in (
            ("the target's probability of its token", self.head_top1_by_target_confidence),
            ("the draft's probability of its top token", self.head_top1_by_draft_confidence),
        ):
            lines.append(f"head top-1 where {whose} is in [low, high) (share of positions):")
            for b in buckets:
                cells = "  ".join(f"{t:.3f} ({s:.2f})" for t, s in zip(b.head_top1, b.share))
                lines.append(f"  [{b.low:.2f}, {b.high:.2f})  {cells}")
        if self.by_category:
            lines.append("by the prompts' category (mean accepted length; head top-1):")
            for c in self.by_category:
                cells = "  ".join(f"{t:.3f}" for t in c.head_top1)
                lines.append(f"  {c.category:<16}{c.num_prompts:>4} prompts  {c.mean_accepted_length:.3f}  {cells}")
        return "\n".join(lines)


def label_rank(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Rank of each label among [N, V] logits, ties broken by lower index as torch.argmax does."""
    own = logits.gather(1, labels[:, None])
    index = torch.arange(logits.shape[1], device=logits.device)
    before = (logits > own) | ((logits == own) & (index[None] < labels[:, None]))
    return before.sum(dim=1)


def head_logits(
    draft: DraftModel, parts: TargetParts, ids: torch.Tensor, hidden: torch.Tensor, first_anchor: int, num_steps: int
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Teacher-forced (k, positions p, logits [len(p), draft vocabulary]) of every head over one
    sequence ids [1, T] with the target's hidden states: query p drafts x_{p+1} from anchor
    n = p-k-1, and the anchor must be a verified position of the continuation's decoding
    (n >= first_anchor, the last prompt position). Over the draft vocabulary, as drafting
    scores: a token outside it is never proposed."""
    for k, h_hat, anchor in draft.training_steps(parts, ids, hidden, num_steps):
        p = torch.arange(first_anchor + k + 1, ids.shape[1] - 1, device=ids.device)
        if len(p):
            features, rows = draft.draft_vocab_product(k, None if h_hat is None else h_hat[0, p], anchor[0, p], parts)
            yield k, p, F.linear(features, rows)


@torch.no_grad()
def draft_predictions(
    target: PreTrainedModel, draft: DraftModel, tokens: list[int], prompt_len: int, num_steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(top1, probability) [num_steps, len(tokens)]: the target token head k drafts at query p (for
    x_{p+1}) and the draft's probability of it (softmax over its vocabulary), teacher-forced over
    tokens = prompt + the target's greedy continuation; -1 and 0 where no anchor of the decoding reaches."""
    parts = TargetParts.from_model(target)
    ids = torch.tensor([tokens], device=target.device)
    top1 = torch.full((num_steps, len(tokens)), -1, dtype=torch.long)
    probability = torch.zeros(num_steps, len(tokens))
    for k, p, logits in head_logits(draft, parts, ids, final_hidden(target, ids), prompt_len - 1, num_steps):
        best, index = logits.float().softmax(dim=-1).max(dim=-1)
        top1[k, p.cpu()] = (index if draft.draft_vocab is None else draft.draft_vocab[index]).cpu()
        probability[k, p.cpu()] = best.cpu()
    return top1, probability


def greedy_accepts(top1: torch.Tensor, tokens: list[int]) -> Callable[[int, int], int]:
    """accepts(n, s): how many of the s tokens the draft drafts at anchor n greedy decoding keeps
    (its drafts from :func:`draft_predictions`' top1 table, matched against tokens)."""
    table = top1.tolist()

    def accepts(n: int, s: int) -> int:
        kept = 0
        while kept < s and n + kept + 2 < len(tokens) and table[kept][n + kept + 1] == tokens[n + kept + 2]:
            kept += 1
        return kept

    return accepts


def confident_lengths(
    probability: torch.Tensor, min_probability: float, min_tokens: int = 0
) -> Callable[[int, int], int]:
    """length(n, s): how many of the s tokens the draft drafts at anchor n it keeps when it stops at the
    first whose probability (:func:`draft_predictions`' table) is below min_probability, keeping its
    first min_tokens whatever their probability."""
    table = probability.tolist()

    def length(n: int, s: int) -> int:
        kept = min(min_tokens, s)
        while kept < s and n + kept + 1 < len(table[0]) and table[kept][n + kept + 1] >= min_probability:
            kept += 1
        return kept

    return length


@torch.no_grad()
def head_accuracy(
    target: PreTrainedModel,
    draft: DraftModel,
    sequences: list[tuple[list[int], list[int]]],
    num_steps: int,
    groups: list[str] | None = None,
) -> HeadAccuracy:
    """Teacher-forced top-1/top-5 of each head over (prompt, greedy continuation) pairs, and top-1 by
    the target's confidence in each labelled token, by the draft's in its own top token, and by the
    sequences' groups (one label per sequence) when given."""
    parts = TargetParts.from_model(target)
    by_target, by_draft = _BucketTally(num_steps), _BucketTally(num_steps)
    hits5 = torch.zeros(num_steps)
    rank_counts = torch.zeros(num_steps, RANKS + 1)
    group_hits: dict[str, torch.Tensor] = {}  # per group: [hits, positions] per head
    lm_head = parts.lm_head_weight.float()  # once: for a bf16 target, a vocabulary-sized copy
    for i, (prompt, continuation) in enumerate(sequences):
        tally = None if groups is None else group_hits.setdefault(groups[i], torch.zeros(2, num_steps))
        ids = torch.tensor([prompt + continuation], device=target.device)
        hidden = final_hidden(target, ids)
        confidence = (hidden[0].float() @ lm_head.T).softmax(dim=-1).amax(dim=-1).cpu()
        draft_ids = draft.draft_vocab_index(ids[0], parts.lm_head_weight.shape[0])  # -1: outside its vocabulary
        for k, p, logits in head_logits(draft, parts, ids, hidden, len(prompt) - 1, num_steps):
            labels = draft_ids[p + 1]
            rank = label_rank(logits, labels.clamp(min=0))
            rank = torch.where(labels < 0, logits.shape[1], rank).cpu()
            by_target.add(k, confidence[p.cpu()], rank < 1)
            by_draft.add(k, logits.float().softmax(dim=-1).amax(dim=-1).cpu(), rank < 1)
            hits5[k] += (rank < 5).sum().item()
            rank_counts[k] += torch.bincount(rank.clamp(max=RANKS), minlength=RANKS + 1).float()
            if tally is not None:
                tally[:, k] += torch.tensor([(rank < 1).sum().item(), len(rank)])
    total = by_target.counts.sum(dim=1).clamp(min=1)  # positions scored per head
    return HeadAccuracy(
        top1=(by_target.hits.sum(dim=1) / total).tolist(),
        top5=(hits5 / total).tolist(),
        by_target_confidence=by_target.buckets(),
        by_draft_confidence=by_draft.buckets(),
        top1_by_group={g: (t[0] / t[1].clamp(min=1)).tolist() for g, t in group_hits.items()},
        rank_probability=(rank_counts[:, :RANKS] / total[:, None]).tolist(),
    )


def greedy_continuations(
    target: PreTrainedModel,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_token_ids: set[int],
    batch_size: int = 16,
    progress: bool = False,
) -> list[list[int]]:
    """The target's own greedy answers (plain decoding, batch_size prompts at a time)."""
    outputs, decoder = [], SpeculativeDecoder(target)
    for start in tqdm(range(0, len(prompts), batch_size), disable=not progress, unit="batch", desc="target"):
        outputs += decoder.generate(prompts[start : start + batch_size], max_new_tokens, eos_token_ids)[0]
    return outputs


def evaluate(
    target: PreTrainedModel,
    draft: DraftModel,
    prompts: list[list[int]],
    num_steps: int,
    max_new_tokens: int,
    eos_token_ids: set[int],
    batch_size: int = 16,
    progress: bool = False,
    categories: list[str | None] | None = None,
    tree: DraftTree | None = None,
) -> EvalResult:
    """Greedy: decode with and without the draft, then score the heads on the target's continuations.
    With categories (one per prompt, None for none), the metrics also per category; with a tree,
    decoding drafts it (num_steps must be its depth) instead of a chain of num_steps tokens."""
    plain = greedy_continuations(target, prompts, max_new_tokens, eos_token_ids, batch_size, progress)
    spec, steps, accepted = [], 0, torch.zeros(num_steps)
    steps_by_prompt, accepted_by_prompt = [], []
    decoder = SpeculativeDecoder(target, draft, num_steps, tree=tree)
    for start in tqdm(range(0, len(prompts), batch_size), disable=not progress, unit="batch", desc="draft"):
        outputs, stats = decoder.generate(prompts[start : start + batch_size], max_new_tokens, eos_token_ids)
        spec += outputs
        steps += stats.target_steps
        accepted += torch.tensor(stats.accepted_by_position, dtype=torch.float)
        steps_by_prompt += stats.steps_by_request
        accepted_by_prompt += stats.accepted_by_request
    groups = None
    if categories is not None and any(c is not None for c in categories):
        groups = [UNCATEGORISED if c is None else c for c in categories]
    heads = head_accuracy(target, draft, list(zip(prompts, plain)), num_steps, groups)
    return EvalResult(
        num_prompts=len(prompts),
        num_speculative_tokens=num_steps,
        mean_accepted_length=1 + float(accepted.sum()) / max(steps, 1),
        acceptance_by_position=(accepted / max(steps, 1)).tolist(),
        head_top1=heads.top1,
        head_top5=heads.top5,
        head_top1_by_target_confidence=heads.by_target_confidence,
        head_top1_by_draft_confidence=heads.by_draft_confidence,
        head_rank_probability=heads.rank_probability,
        outputs_identical=plain == spec,
        by_category=[] if groups is None else _by_category(groups, steps_by_prompt, accepted_by_prompt, heads),
        tree=None if tree is None else [list(p) for p in tree.paths],
    )


def best_tree(
    target: PreTrainedModel,
    draft: DraftModel,
    prompts: list[list[int]],
    num_nodes: int,
    depth: int,
    max_new_tokens: int,
    eos_token_ids: set[int],
    batch_size: int = 16,
    progress: bool = False,
) -> tuple[DraftTree, list[list[float]]]:
    """The num_nodes-node draft tree (at most depth deep) most likely to be accepted on the target's
    greedy answers to prompts, and the heads' rank probabilities it was built from."""
    plain = greedy_continuations(target, prompts, max_new_tokens, eos_token_ids, batch_size, progress)
    probability = head_accuracy(target, draft, list(zip(prompts, plain)), depth).rank_probability
    return DraftTree.best(probability, num_nodes), probability


UNCATEGORISED = "(no category)"


def _by_category(groups: list[str], steps: list[int], accepted: list[int], heads: HeadAccuracy) -> list[CategoryResult]:
    """Each category's mean accepted length (from its prompts' own decoding counters) and head top-1,
    weakest first."""
    results = []
    for group, top1 in heads.top1_by_group.items():
        members = [i for i, g in enumerate(groups) if g == group]
        group_steps = sum(steps[i] for i in members)
        tau = 1 + sum(accepted[i] for i in members) / max(group_steps, 1)
        results.append(CategoryResult(group, len(members), tau, top1))
    return sorted(results, key=lambda r: r.mean_accepted_length)

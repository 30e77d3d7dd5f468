"""Are two runs' greedy outputs the same, and where they are not, is it a near-tie?

In float32 speculative decoding must reproduce the target's greedy output exactly.
In bfloat16 the target's own arithmetic changes with batch shape and kernels, so two
runs can part where the target's top two logits are nearly equal: this module counts
identical outputs and, for each divergence, measures the target's float32 gap between
its top two logits at the first differing position. A divergence that does not start at
a near-tie is a real mismatch, whatever the match rate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from transformers import PreTrainedModel

NEAR_TIE = 0.25
"""Largest float32 top-2 logit gap counted as a near-tie: bf16 keeps 8 bits of mantissa,
so logits of magnitude ~10-30 carry rounding errors of ~0.05-0.1 after a few layers."""


@dataclass
class Divergence:
    prompt_index: int
    position: int  # index in the generated tokens where the outputs first differ
    expected: int  # -1 where that output had already ended
    got: int
    top2_gap: float  # the target's float32 logit gap between its two best tokens there
    top2_tokens: list[int]

    def near_tie(self, tolerance: float = NEAR_TIE) -> bool:
        return self.top2_gap < tolerance and {self.expected, self.got} <= set(self.top2_tokens)


@dataclass
class Comparison:
    num_outputs: int
    identical: int
    divergences: list[Divergence] = field(default_factory=list)
    tolerance: float = NEAR_TIE

    @property
    def match_rate(self) -> float:
        return self.identical / max(self.num_outputs, 1)

    @property
    def only_near_ties(self) -> bool:
        return all(d.near_tie(self.tolerance) for d in self.divergences)

    def to_dict(self) -> dict:
        return {**asdict(self), "match_rate": self.match_rate, "only_near_ties": self.only_near_ties}


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@torch.no_grad()
def compare_outputs(
    target: PreTrainedModel,
    prompts: list[list[int]],
    expected: list[list[int]],
    got: list[list[int]],
    tolerance: float = NEAR_TIE,
) -> Comparison:
    """Compare got with expected, output by output; target is the transformers model in float32."""
    if target.dtype != torch.float32:
        raise ValueError(f"compare_outputs measures logit gaps in float32; the target is {target.dtype}")
    result = Comparison(num_outputs=len(expected), identical=0, tolerance=tolerance)
    for i, (prompt, e, g) in enumerate(zip(prompts, expected, got)):
        pos = first_difference(e, g)
        if pos is None:
            result.identical += 1
            continue
        ids = torch.tensor([prompt + e[:pos]], device=target.device)
        logits = target(ids).logits[0, -1]
        top = torch.topk(logits, 2)
        result.divergences.append(
            Divergence(
                prompt_index=i,
                position=pos,
                expected=e[pos] if pos < len(e) else -1,
                got=g[pos] if pos < len(g) else -1,
                top2_gap=float(top.values[0] - top.values[1]),
                top2_tokens=top.indices.tolist(),
            )
        )
    return result

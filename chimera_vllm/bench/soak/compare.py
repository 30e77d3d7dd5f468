"""Two servers' answers to the same traffic, compared: greedy ones token for token, sampled ones
as distributions.

Speculative decoding must not change what a request gets: a greedy request the same tokens (in
float32, where batch shapes do not move the arg-max), a sampled one tokens from the same
distribution, though not the same tokens (a speculative step uses its random numbers otherwise).
For sampled requests answered by both servers, the tokens at each position class are pooled per
server and the total variation between the two pools is set against its spread when the two
servers' answers to each request are swapped at random (a paired permutation test). A soak makes
several such comparisons (3 position classes for each draft): they agree unless one distance is in
the top ALPHA / (number of comparisons) of its swapped ones, so that a soak of servers that agree
fails by chance at most ALPHA of the time.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from chimera_vllm.bench.soak.client import Outcome
from chimera_vllm.bench.soak.traffic import RequestSpec

POSITION_CLASSES = {"first": range(0, 1), "2-5": range(1, 5), "6+": range(5, 1 << 30)}
"""The first token comes from the prefill; the next ones from steps that verify drafts."""
ALPHA = 0.01
PERMUTATIONS = 2000


@dataclass
class GreedyComparison:
    compared: int
    identical: int
    first_differences: list[dict]  # a few, to look at: request, the two servers' tokens

    @property
    def identical_share(self) -> float:
        return self.identical / self.compared if self.compared else 1.0


@dataclass
class SampledComparison:
    position_class: str
    requests: int
    tokens: int
    total_variation: float
    p_value: float

    def agrees(self, comparisons: int) -> bool:
        """Whether the servers agree, this being one of so many comparisons."""
        return self.p_value >= ALPHA / comparisons


def answered_by_both(a: list[Outcome], b: list[Outcome]) -> list[tuple[Outcome, Outcome]]:
    """The pairs of completed outcomes of the requests both servers completed."""
    done_b = {o.index: o for o in b if o.outcome == "completed"}
    return [(o, done_b[o.index]) for o in a if o.outcome == "completed" and o.index in done_b]


def compare_greedy(traffic: list[RequestSpec], pairs: list[tuple[Outcome, Outcome]]) -> GreedyComparison:
    greedy = [(x, y) for x, y in pairs if traffic[x.index].greedy]
    differ = [(x, y) for x, y in greedy if x.token_ids != y.token_ids]
    shown = [{"request": x.index, "a": x.token_ids, "b": y.token_ids} for x, y in differ[:5]]
    return GreedyComparison(len(greedy), len(greedy) - len(differ), shown)


def compare_sampled(
    traffic: list[RequestSpec], pairs: list[tuple[Outcome, Outcome]], seed: int = 0
) -> list[SampledComparison]:
    """One comparison per position class, over the sampled requests both servers completed."""
    sampled = [(x, y) for x, y in pairs if not traffic[x.index].greedy]
    rng = random.Random(seed)
    results = []
    for name, positions in POSITION_CLASSES.items():
        units = [(_tokens_at(x, positions), _tokens_at(y, positions)) for x, y in sampled]
        units = [(a, b) for a, b in units if a or b]
        if not units:
            continue
        observed = _tv(units)
        swapped = [_tv([(a, b) if rng.random() < 0.5 else (b, a) for a, b in units]) for _ in range(PERMUTATIONS)]
        p_value = (1 + sum(s >= observed for s in swapped)) / (1 + PERMUTATIONS)
        tokens = sum(sum(a.values()) + sum(b.values()) for a, b in units)
        results.append(SampledComparison(name, len(units), tokens, observed, p_value))
    return results


def _tokens_at(outcome: Outcome, positions: range) -> Counter:
    return Counter(t for ids in outcome.token_ids.values() for i, t in enumerate(ids) if i in positions)


def _tv(units: list[tuple[Counter, Counter]]) -> float:
    a, b = Counter(), Counter()
    for x, y in units:
        a.update(x)
        b.update(y)
    na, nb = sum(a.values()) or 1, sum(b.values()) or 1
    return 0.5 * sum(abs(a[k] / na - b[k] / nb) for k in set(a) | set(b))

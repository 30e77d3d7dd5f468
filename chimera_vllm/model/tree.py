"""Draft trees: several candidate continuations drafted and verified in one target step.

A tree node is a path of ranks: (2, 0) is "the draft's third choice for the first token,
then its first choice after that". Every node is one more token the target verifies in
the same forward pass, under an attention mask that lets a node see only its ancestors;
greedy verification keeps the deepest node whose whole path the target agrees with.
Where the draft's first choice is wrong but its second is right, a chain of drafts stops
and a tree goes on, which is how the Chimera and Medusa papers measure acceptance.

Trees are written as branching factors per depth ("3,2,1,1": three first tokens, two
continuations of each, ...), as a JSON list of paths (Medusa's format: [[0], [1], [0, 0]]),
or built from a draft's measured rank probabilities (:meth:`DraftTree.best`: the paths
most likely to be accepted, Medusa's construction).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from torch import Tensor


class DraftTreeError(ValueError):
    pass


@dataclass(frozen=True)
class DraftTree:
    """Paths of ranks, closed under prefixes, sorted by depth then rank (a parent precedes its children)."""

    paths: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if not self.paths:
            raise DraftTreeError("a draft tree needs at least one node")
        known = set(self.paths)
        if len(known) != len(self.paths):
            raise DraftTreeError("a draft tree lists a path twice")
        for path in self.paths:
            if not path or any(not isinstance(r, int) or r < 0 for r in path):
                raise DraftTreeError(f"tree path {list(path)}: ranks must be integers >= 0")
            if len(path) > 1 and path[:-1] not in known:
                raise DraftTreeError(f"tree path {list(path)} has no parent {list(path[:-1])} in the tree")
        object.__setattr__(self, "paths", tuple(sorted(self.paths, key=lambda p: (len(p), p))))

    @classmethod
    def from_branching(cls, branching: Sequence[int]) -> DraftTree:
        """Every path with branching[d] choices at depth d ("3,2" is 3 + 3*2 nodes)."""
        if not branching or any(b < 1 for b in branching):
            raise DraftTreeError(f"tree branching {list(branching)}: give one factor >= 1 per depth")
        paths = [p for d in range(1, len(branching) + 1) for p in itertools.product(*map(range, branching[:d]))]
        return cls(tuple(paths))

    @classmethod
    def chain(cls, num_tokens: int) -> DraftTree:
        """The draft's first choice only: the ordinary K-token draft."""
        return cls.from_branching([1] * num_tokens)

    @classmethod
    def best(cls, rank_probability: Sequence[Sequence[float]], num_nodes: int) -> DraftTree:
        """The num_nodes paths of highest acceptance probability, rank_probability[d][r] being the chance
        that the target's token at depth d is the draft's r-th choice (depths taken as independent)."""
        if num_nodes < 1:
            raise DraftTreeError(f"a draft tree needs at least one node, got {num_nodes}")
        depth = len(rank_probability)
        frontier = {(r,): p for r, p in enumerate(rank_probability[0])}
        paths: list[tuple[int, ...]] = []
        while frontier and len(paths) < num_nodes:
            path = max(frontier, key=lambda p: (frontier[p], [-r for r in p]))
            probability = frontier.pop(path)
            paths.append(path)
            if len(path) < depth:
                for r, p in enumerate(rank_probability[len(path)]):
                    frontier[path + (r,)] = probability * p
        return cls(tuple(paths))

    @classmethod
    def parse(cls, text: str) -> DraftTree:
        """ "3,2,1,1" (branching factors per depth) or a JSON file of paths."""
        if Path(text).is_file():
            try:
                return cls(tuple(tuple(p) for p in json.loads(Path(text).read_text())))
            except (json.JSONDecodeError, TypeError, DraftTreeError) as e:
                raise DraftTreeError(f"{text}: a draft tree file is a JSON list of rank paths ({e})") from None
        try:
            branching = [int(b) for b in text.split(",")]
        except ValueError:
            raise DraftTreeError(
                f"draft tree {text!r}: give branching factors per depth (3,2,1,1) or a JSON file of paths"
            ) from None
        return cls.from_branching(branching)

    def expected_accepted_length(self, rank_probability: Sequence[Sequence[float]]) -> float:
        """1 + the sum of every path's acceptance probability, depths taken as independent."""
        total = 1.0
        for path in self.paths:
            p = 1.0
            for depth, rank in enumerate(path):
                row = rank_probability[depth]
                p *= row[rank] if rank < len(row) else 0.0
            total += p
        return total

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps([list(p) for p in self.paths]) + "\n")

    @property
    def num_nodes(self) -> int:
        return len(self.paths)

    @property
    def depth(self) -> int:
        return len(self.paths[-1])

    @cached_property
    def parents(self) -> list[int]:
        """Each node's parent node, -1 for the root (the target's pending token)."""
        index = {p: i for i, p in enumerate(self.paths)}
        return [index[p[:-1]] if len(p) > 1 else -1 for p in self.paths]

    @cached_property
    def children(self) -> list[list[int]]:
        """Each slot's child slots in rank order (slot 0 is the root, slot i the node i-1)."""
        kids: list[list[int]] = [[] for _ in range(self.num_nodes + 1)]
        for i, parent in enumerate(self.parents, start=1):  # siblings are listed by rank
            kids[parent + 1].append(i)
        return kids

    def expanding(self, depth: int) -> list[int]:
        """The nodes at `depth` that have children, in order; depth 0 is the root alone ([-1])."""
        if depth == 0:
            return [-1]
        return sorted({parent for path, parent in zip(self.paths, self.parents) if len(path) == depth + 1})

    def choices(self, depth: int) -> int:
        """How many of the draft's best tokens the step at `depth` needs: 1 + the largest rank at depth + 1."""
        return 1 + max(p[-1] for p in self.paths if len(p) == depth + 1)

    def slot_depths(self, device: torch.device | str = "cpu") -> Tensor:
        """[1 + N]: 0 for the root slot, then each node's depth (its position offset)."""
        return torch.tensor([0] + [len(p) for p in self.paths], device=device)

    def visibility(self, device: torch.device | str = "cpu") -> Tensor:
        """[1 + N, 1 + N] bool: slot i may attend to slot j (j is i or one of its ancestors; slot 0 is the root)."""
        n = self.num_nodes + 1
        seen = torch.eye(n, dtype=torch.bool)
        seen[:, 0] = True
        for i, parent in enumerate(self.parents, start=1):
            seen[i] |= seen[parent + 1]
        return seen.to(device)

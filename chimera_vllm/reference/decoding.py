"""Reference speculative decoder on transformers: the target verifies the Chimera draft.

One loop serves plain decoding (no draft: one token per target step) and
Chimera speculative decoding, with a chain of K drafts or a tree of them
(chimera_vllm/tree.py). The batch keeps one slot per fed token in the target's
KV cache; slots of rejected drafts stay behind as masked holes until no request
needs the tail, which is then cropped (a tree's kept path is first moved in front
of its rejected siblings). The draft's encoder keeps
keys/values of the verified hidden states in the same slots, under the same mask.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicCache

from chimera_vllm.model.base import DraftInputs, DraftModel, TargetParts
from chimera_vllm.model.tree import DraftTree
from chimera_vllm.reference.sampling import TokenSampler
from chimera_vllm.reference.target import final_hidden


@dataclass
class DecodeStats:
    """Counters over the decode steps (the prefill's first token is not a target step)."""

    num_speculative_tokens: int
    target_steps: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    accepted_by_position: list[int] = field(default_factory=list)
    # per prompt (the reference decoder's; vLLM's counters are engine-wide): target steps, drafts kept
    steps_by_request: list[int] = field(default_factory=list)
    accepted_by_request: list[int] = field(default_factory=list)
    output_tokens: int = 0
    wall_s: float = 0.0

    @classmethod
    def zeros(cls, num_speculative_tokens: int, num_requests: int) -> DecodeStats:
        """Counters for a decode of num_requests prompts, all zero."""
        return cls(
            num_speculative_tokens,
            accepted_by_position=[0] * num_speculative_tokens,
            steps_by_request=[0] * num_requests,
            accepted_by_request=[0] * num_requests,
        )

    def to_dict(self) -> dict:
        steps = max(self.target_steps, 1)
        return {
            "target_steps": self.target_steps,
            "draft_tokens": self.draft_tokens,
            "accepted_tokens": self.accepted_tokens,
            "mean_accepted_length": (self.target_steps + self.accepted_tokens) / steps,
            "acceptance_by_position": [a / steps for a in self.accepted_by_position],
            "wall_s": self.wall_s,
            "output_tokens_per_s": self.output_tokens / self.wall_s if self.wall_s > 0 else 0.0,
        }


class _Requests:
    """Per-request host state: token histories, outputs, stop rules."""

    def __init__(self, prompts: list[list[int]], max_new_tokens: int, eos_token_ids: set[int]):
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty: a prompt needs at least one token")
        self.tokens = [list(p) for p in prompts]
        self.outputs: list[list[int]] = [[] for _ in prompts]
        self.max_new_tokens = max_new_tokens
        self.eos = eos_token_ids

    def emit(self, request: int, new_tokens: list[int]) -> bool:
        """Append tokens until EOS or max_new_tokens; return True when the request is finished."""
        out = self.outputs[request]
        for t in new_tokens:
            out.append(t)
            self.tokens[request].append(t)
            if t in self.eos or len(out) >= self.max_new_tokens:
                return True
        return False

    def last_three(self, requests: list[int]) -> Tensor:
        """(x_{n-1}, x_n, x_{n+1}) per request, x_0 standing in for missing tokens."""
        rows = []
        for r in requests:
            t = self.tokens[r]
            rows.append([t[max(len(t) - 3, 0)], t[max(len(t) - 2, 0)], t[-1]])
        return torch.tensor(rows, dtype=torch.long)


@dataclass
class _DeviceState:
    """Tensors of the requests still running, one row each."""

    rows: list[int]  # request index of each row
    cache: DynamicCache
    valid: Tensor  # [B, S] bool: slot holds a verified token
    next_pos: Tensor  # [B] position of the pending token x_{n+1}
    pending: Tensor  # [B] x_{n+1}: produced by the target, not yet fed to it
    anchor: Tensor  # [B, H] h_n
    ctx_k: Tensor | None  # [B, kvh, S, d] draft encoder keys of verified slots
    ctx_v: Tensor | None

    def keep(self, keep_rows: list[int]) -> None:
        idx = torch.tensor(keep_rows, dtype=torch.long)
        self.rows = [self.rows[i] for i in keep_rows]
        self.cache.batch_select_indices(idx)
        for name in ("valid", "next_pos", "pending", "anchor", "ctx_k", "ctx_v"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[idx])

    def reorder_tail(self, order: Tensor) -> None:
        """Permute each row's last n cache slots by order [B, n] (before valid/ctx_k take them).
        Positions travel with the keys (rotary embedding is applied before caching), and the
        attention mask follows valid, so a slot's place in the cache carries no meaning."""
        for layer in self.cache.layers:
            for name in ("keys", "values"):
                tensor = getattr(layer, name)
                B, H, _, D = tensor.shape
                index = order[:, None, :, None].expand(B, H, order.shape[1], D)
                tail = tensor[:, :, -order.shape[1] :]
                tail.copy_(tail.gather(2, index))

    def crop_tail(self) -> None:
        """Drop trailing slots that no running request still uses."""
        used = self.valid.any(dim=0).nonzero()
        unused = self.valid.shape[1] - (int(used.max()) + 1 if len(used) else 0)
        if unused > 0:
            self.cache.crop(-unused)
            self.valid = self.valid[:, :-unused]
            if self.ctx_k is not None:
                self.ctx_k, self.ctx_v = self.ctx_k[:, :, :-unused], self.ctx_v[:, :, :-unused]


@dataclass(frozen=True)
class _TreeSlots:
    """A draft tree's slot tensors on the target's device, made once per decoder (slot 0 is the
    pending token, slot i the tree's node i-1)."""

    depths: Tensor  # [1+N]: each slot's position after the pending token's
    seen: Tensor  # [1+N, 1+N]: slot i may attend to slot j
    parents: Tensor  # [N]: each node's parent slot
    children: Tensor  # [1+N, widest]: each slot's child slots in rank order, -1 past its last

    @classmethod
    def of(cls, tree: DraftTree, device: torch.device) -> _TreeSlots:
        parents = torch.tensor([p + 1 for p in tree.parents], device=device)
        width = max(len(c) for c in tree.children)
        children = torch.tensor([c + [-1] * (width - len(c)) for c in tree.children], device=device)
        return cls(tree.slot_depths(device), tree.visibility(device), parents, children)


class SpeculativeDecoder:
    """Chimera speculative decoding (or plain decoding without a draft) on a transformers target."""

    def __init__(
        self,
        target: PreTrainedModel,
        draft: DraftModel | None = None,
        num_speculative_tokens: int | None = None,
        temperature: float = 0.0,
        seed: int = 0,
        tree: DraftTree | None = None,
    ):
        """tree: draft and verify a token tree each step instead of a chain of K tokens."""
        self.target = target
        self.draft = draft
        self.parts = TargetParts.from_model(target)
        self.tree = tree
        self.tree_slots = None if tree is None else _TreeSlots.of(tree, target.device)
        if draft is None:
            if tree is not None:
                raise ValueError("a draft tree needs a draft")
            self.k = 0
        else:
            draft.config.check_target(target.config)
            if tree is not None:
                if num_speculative_tokens not in (None, tree.depth):
                    raise ValueError(
                        f"num_speculative_tokens={num_speculative_tokens} but the draft tree is {tree.depth} deep"
                    )
                num_speculative_tokens = tree.depth
            self.k = draft.num_heads if num_speculative_tokens is None else num_speculative_tokens
            draft.check_num_steps(self.k)
        self.sampler = TokenSampler(temperature, seed, device=target.device)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        eos_token_ids: set[int] | None = None,
        progress: bool = False,
    ) -> tuple[list[list[int]], DecodeStats]:
        """Decode every prompt as one batch; returns the new token ids of each and the counters."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        limit = self.target.config.max_position_embeddings
        for i, p in enumerate(prompts):
            if len(p) + max_new_tokens + self.k > limit:
                raise ValueError(
                    f"prompt {i} has {len(p)} tokens: with max_new_tokens={max_new_tokens} and {self.k} draft "
                    f"tokens it passes the target's max_position_embeddings={limit}"
                )
        reqs = _Requests(prompts, max_new_tokens, eos_token_ids or set())
        stats = DecodeStats.zeros(self.k, len(prompts))
        start = time.perf_counter()
        bar = tqdm(total=len(prompts) * max_new_tokens, disable=not progress, unit="tok")
        state = self._prefill(reqs)
        bar.update(len(prompts))
        while state.rows:
            before = sum(len(o) for o in reqs.outputs)
            self._step(reqs, state, stats)
            bar.update(sum(len(o) for o in reqs.outputs) - before)
        bar.close()
        stats.wall_s = time.perf_counter() - start
        stats.output_tokens = sum(len(o) for o in reqs.outputs)
        return reqs.outputs, stats

    def _prefill(self, reqs: _Requests) -> _DeviceState:
        device = self.target.device
        lengths = [len(t) for t in reqs.tokens]
        L = max(lengths)
        ids = torch.zeros(len(lengths), L, dtype=torch.long)
        mask = torch.zeros(len(lengths), L, dtype=torch.bool)
        for i, t in enumerate(reqs.tokens):  # left padding: every prompt ends in the last slot
            ids[i, L - len(t) :] = torch.tensor(t)
            mask[i, L - len(t) :] = True
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
        cache = DynamicCache()
        hidden = final_hidden(self.target, ids, mask.long(), positions, cache)
        anchor = hidden[:, -1]
        first = self.sampler.sample(self._lm_head(anchor))
        context = None if self.draft is None else self.draft.context_kv(hidden, positions)
        ctx_k, ctx_v = (None, None) if context is None else context
        state = _DeviceState(
            rows=list(range(len(lengths))),
            cache=cache,
            valid=mask,
            next_pos=torch.tensor(lengths, device=device),
            pending=first,
            anchor=anchor,
            ctx_k=ctx_k,
            ctx_v=ctx_v,
        )
        running = [i for i, tok in enumerate(first.tolist()) if not reqs.emit(i, [tok])]
        state.keep(running)
        return state

    def _lm_head(self, hidden: Tensor) -> Tensor:
        return F.linear(hidden, self.parts.lm_head_weight)

    def _step(self, reqs: _Requests, state: _DeviceState, stats: DecodeStats) -> None:
        """One target step: draft, verify, keep the accepted tokens and the target's next one."""
        if self.tree is not None:
            ids, positions, hidden, accepted, nxt = self._verify_tree(reqs, state)
        else:
            ids, positions, hidden, accepted, nxt = self._verify_chain(reqs, state)
        B, device = ids.shape[0], ids.device
        # the pending token and the accepted drafts (a tree's kept path is already in front)
        kept = torch.arange(ids.shape[1], device=device)[None] <= accepted[:, None]
        state.valid = torch.cat([state.valid, kept], dim=1)
        if state.ctx_k is not None:
            new_k, new_v = self.draft.context_kv(hidden, positions)
            state.ctx_k = torch.cat([state.ctx_k, new_k], dim=2)
            state.ctx_v = torch.cat([state.ctx_v, new_v], dim=2)
        state.anchor = hidden[torch.arange(B, device=device), accepted]
        state.next_pos = state.next_pos + 1 + accepted
        state.pending = nxt

        stats.target_steps += B
        stats.draft_tokens += B * (ids.shape[1] - 1)
        stats.accepted_tokens += int(accepted.sum())
        for i in range(self.k):
            stats.accepted_by_position[i] += int((accepted > i).sum())

        running = []
        acc, nxt_list, draft_list = accepted.tolist(), nxt.tolist(), ids[:, 1:].tolist()
        for b, request in enumerate(state.rows):
            stats.steps_by_request[request] += 1
            stats.accepted_by_request[request] += acc[b]
            if not reqs.emit(request, draft_list[b][: acc[b]] + [nxt_list[b]]):
                running.append(b)
        if len(running) < B:
            state.keep(running)
        state.crop_tail()

    def _draft_inputs(self, reqs: _Requests, state: _DeviceState) -> DraftInputs:
        last_three = reqs.last_three(state.rows).to(self.target.device)
        return DraftInputs(self.parts, state.ctx_k, state.ctx_v, state.valid, last_three, state.next_pos, state.anchor)

    def _verify_chain(self, reqs: _Requests, state: _DeviceState) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Draft K tokens (none without a draft) and verify them after the pending token.

        Returns the fed ids [B, 1+K], their positions, the target's hidden states there, how many
        drafts are accepted [B] (they follow the pending token) and the next token [B]."""
        K, device = self.k, self.target.device
        if K:
            chooser = None if self.sampler.greedy else self.sampler.choose
            drafts, draft_logits = self.draft.propose(self._draft_inputs(reqs, state), K, chooser)
            ids = torch.cat([state.pending[:, None], drafts], dim=1)
        else:
            ids = state.pending[:, None]
        B = ids.shape[0]
        positions = state.next_pos[:, None] + torch.arange(K + 1, device=device)
        attn = torch.cat([state.valid, torch.ones(B, K + 1, dtype=torch.bool, device=device)], dim=1)
        hidden = final_hidden(self.target, ids, attn.long(), positions, state.cache)
        logits = self._lm_head(hidden)
        if K:
            accepted, nxt = self.sampler.verify(drafts, draft_logits, logits)
        else:
            accepted, nxt = torch.zeros(B, dtype=torch.long, device=device), self.sampler.sample(logits[:, 0])
        return ids, positions, hidden, accepted, nxt

    def _verify_tree(self, reqs: _Requests, state: _DeviceState) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Draft the tree's nodes and verify them all in one target pass, each node seeing only
        its ancestors (a 4-D mask); greedy: keep the deepest node whose whole path the target chose,
        else the path :meth:`TokenSampler.verify_tree` samples.
        Returns what :meth:`_verify_chain` does, for the 1+N slots of the root and the nodes with
        the kept path first (the step's slots in the target's cache are reordered alike), so that
        the drafts accepted are the slots after the root, as in a chain."""
        slots, device = self.tree_slots, self.target.device
        nodes = self.draft.propose_tree(self._draft_inputs(reqs, state), self.tree)
        ids = torch.cat([state.pending[:, None], nodes], dim=1)
        B, S, N1 = ids.shape[0], state.valid.shape[1], ids.shape[1]
        seen = slots.seen
        positions = state.next_pos[:, None] + slots.depths
        allowed = torch.cat([state.valid[:, None, :].expand(B, N1, S), seen.expand(B, N1, N1)], dim=2)
        dtype = self.target.dtype
        mask = torch.zeros(B, 1, N1, S + N1, dtype=dtype, device=device).masked_fill(
            ~allowed[:, None], torch.finfo(dtype).min
        )
        hidden = final_hidden(self.target, ids, mask, positions, state.cache)
        logits = self._lm_head(hidden)
        if self.sampler.greedy:
            choice = logits.argmax(dim=-1)  # [B, 1+N]: the target's token after each slot
            root = torch.ones(B, 1, dtype=torch.bool, device=device)
            agrees = torch.cat([root, nodes == choice[:, slots.parents]], dim=1)
            on_path = ~((~agrees)[:, None, :] & seen[None]).any(dim=2)  # every slot of its path agrees
            last = (on_path * (slots.depths + 1)).argmax(dim=1)  # the deepest such slot (one per depth at most)
            nxt = choice[torch.arange(B, device=device), last]
        else:
            last, nxt = self.sampler.verify_tree(nodes, slots.children, logits)
        kept = seen[last]
        # The kept path to the front of the step's slots (parents come before children), so that
        # its rejected siblings trail and are cropped like a chain's rejected drafts.
        order = torch.sort((~kept).to(torch.uint8), dim=1, stable=True).indices
        state.reorder_tail(order)
        ids, positions = ids.gather(1, order), positions.gather(1, order)
        hidden = hidden.gather(1, order[:, :, None].expand_as(hidden))
        return ids, positions, hidden, slots.depths[last], nxt

"""The Chimera draft: trigram encoder, full-context encoder, residual decoding heads.

docs/architecture.md gives the exact method; the shapes' letters are base.py's.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from chimera_vllm.config import ChimeraConfig
from chimera_vllm.model.base import DraftInputs, DraftModel, TargetParts, TokenChooser, shifted_anchor
from chimera_vllm.model.layers import ContextEncoderLayer, FullHeads, ResidualHeads, TrigramEncoder, trigram_ids
from chimera_vllm.model.tree import DraftTree


def verified_context_mask(T: int, step: int, device: torch.device | None = None) -> Tensor:
    """[T, T] bool: the target's h_j that query p may see at draft step `step` (j <= p-step-1)."""
    return torch.ones(T, T, dtype=torch.bool, device=device).tril(-(step + 1))


def shift_right(x: Tensor, n: int = 1) -> Tensor:
    """x[:, :, p] <- x[:, :, p-n] along the position axis (dim 2); zeros enter at the front."""
    return F.pad(x, (0, 0) * (x.dim() - 3) + (n, 0))[:, :, : x.shape[2]]


class ChimeraDraft(DraftModel):
    """The method's draft; ``head_type`` "residual" (this project's heads) or "full" (the authors')."""

    def __init__(self, config: ChimeraConfig):
        super().__init__(config)
        H = config.hidden_size
        self.trigram = TrigramEncoder(H, config.trigram_mlp)
        self.encoder = ContextEncoderLayer(config.layer_config())
        if config.head_type == "residual":
            self.heads = ResidualHeads(config.num_heads, H)
        else:
            self.heads = FullHeads(config.num_heads, H, config.vocab_size)

    def init_heads_from_target(self, parts: TargetParts) -> None:
        """Initialise the heads from the target's LM head, as the method does."""
        if isinstance(self.heads, FullHeads):
            lm = parts.lm_head_weight.to(self.heads.weight.dtype)
            with torch.no_grad():
                self.heads.weight.copy_(torch.cat([lm, lm], dim=-1).expand_as(self.heads.weight))
        # Residual heads are zero-initialised: each already equals the target's LM head on ĥ.

    def context_kv(self, hidden: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        return self.encoder.context_kv(hidden, positions)

    @torch.no_grad()
    def propose(
        self, inputs: DraftInputs, num_steps: int, choose: TokenChooser | None = None
    ) -> tuple[Tensor, Tensor | None]:
        self.check_num_steps(num_steps)
        parts, anchor, ctx_k, ctx_v = inputs.parts, inputs.anchor, inputs.ctx_k, inputs.ctx_v
        tri, tokens, all_logits = inputs.last_tokens, [], []
        mask = inputs.ctx_valid[:, None, :]
        for k in range(num_steps):
            pos = (inputs.next_position + k)[:, None]
            e = self.trigram(tri, parts.embed_weight)[:, None]
            h_hat = self.encoder(e, pos, ctx_k, ctx_v, mask)
            tok, logits = self._draft_tokens(k, h_hat[:, 0], anchor, parts, choose)
            tokens.append(tok)
            all_logits.append(logits)
            if k + 1 < num_steps:
                new_k, new_v = self.encoder.context_kv(h_hat, pos)
                ctx_k = torch.cat([ctx_k, new_k], dim=2)
                ctx_v = torch.cat([ctx_v, new_v], dim=2)
                mask = F.pad(mask, (0, 1), value=True)
                tri = torch.cat([tri[:, 1:], tok[:, None]], dim=1)
        logits = None if choose is None else torch.stack(all_logits, dim=1)
        return torch.stack(tokens, dim=1), logits

    @torch.no_grad()
    def propose_tree(self, inputs: DraftInputs, tree: DraftTree) -> Tensor:
        """Each depth is one encoder pass with the nodes that have children as its queries: they
        share the verified context and each sees its own path's earlier draft outputs, the entries
        the drafting loop would have appended for that path."""
        self.check_num_steps(tree.depth)
        parts, anchor = inputs.parts, inputs.anchor
        B = anchor.shape[0]
        tokens = torch.empty(B, tree.num_nodes, dtype=torch.long, device=anchor.device)
        trigrams = {-1: inputs.last_tokens}  # per expanding node: its path's last three tokens [B, 3]
        own: dict[int, tuple[Tensor, Tensor] | None] = {-1: None}  # its path's draft outputs' keys/values
        for depth in range(tree.depth):
            nodes = tree.expanding(depth)
            e = self.trigram(torch.stack([trigrams[u] for u in nodes], dim=1), parts.embed_weight)
            pos = (inputs.next_position + depth)[:, None].expand(B, len(nodes))
            own_k = own_v = None
            if depth:
                own_k = torch.stack([own[u][0] for u in nodes], dim=2)  # [B, kvh, E, depth, d]
                own_v = torch.stack([own[u][1] for u in nodes], dim=2)
            mask = inputs.ctx_valid[:, None, :].expand(B, len(nodes), -1)
            h_hat = self.encoder(e, pos, inputs.ctx_k, inputs.ctx_v, mask, own_k, own_v)
            features, rows = self.draft_vocab_product(depth, h_hat, anchor[:, None].expand_as(h_hat), parts)
            new_k, new_v = self.encoder.context_kv(h_hat, pos)  # [B, kvh, E, d]
            for i, parent, j in self._tree_depth_tokens(tree, depth, nodes, features, rows, tokens):
                trigrams[i] = torch.cat([trigrams[parent][:, 1:], tokens[:, i, None]], dim=1)
                k, v = new_k[:, :, j, None], new_v[:, :, j, None]
                if own[parent] is not None:
                    k, v = torch.cat([own[parent][0], k], dim=2), torch.cat([own[parent][1], v], dim=2)
                own[i] = (k, v)
        return tokens

    def training_steps(
        self, parts: TargetParts, input_ids: Tensor, hidden: Tensor, num_steps: int, aux: Tensor | None = None
    ) -> Iterator[tuple[int, Tensor, Tensor]]:
        """Step k at query position p sees exactly what the drafting loop would after the target
        verified x_0..x_{n+1} with n = p-k-1: keys/values of the target's h_0..h_n, the encoder's
        own outputs of steps 0..k-1 at positions n+1..p-1, and itself; its head reads the anchor
        h_n. Step k is one pass of the (single) encoder layer over the sequence, with a causal mask
        over the h_j and, per query, the k earlier steps' outputs it reads (one each, aligned to the
        query); the passes are sequential because step k attends to the earlier steps' outputs."""
        B, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device).expand(B, T)
        e = self.trigram(trigram_ids(input_ids), parts.embed_weight)
        keys, values = self.encoder.context_kv(hidden, positions)
        # own_k[:, :, p, j] is the key of step j's output at position p-k+j: the one entry of
        # that step query p sees at step k; every step shifts them one position further.
        own_k = own_v = None
        for k in range(num_steps):
            mask = verified_context_mask(T, k, input_ids.device)[None]
            h_hat = self.encoder(e, positions, keys, values, mask, own_k, own_v)
            yield k, h_hat, shifted_anchor(hidden, k)
            if k + 1 < num_steps:
                new_k, new_v = (x[:, :, :, None] for x in self.encoder.context_kv(h_hat, positions))
                own_k = shift_right(new_k if own_k is None else torch.cat([own_k, new_k], dim=3))
                own_v = shift_right(new_v if own_v is None else torch.cat([own_v, new_v], dim=3))

"""The Chimera draft model: trigram encoder, full-context encoder, residual decoding heads, and its checkpoints.

Shapes use B (batch), T (query positions), S (key/value positions), H (hidden),
V (vocabulary), K (draft steps). docs/architecture.md explains the method.

The draft owns no copy of the target's embedding or LM head: both are passed in
as :class:`TargetParts` and never appear in the draft's state dict.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from chimera_vllm.config import ChimeraConfig, ChimeraConfigError
from chimera_vllm.kernels.greedy_head import greedy_draft_head
from chimera_vllm.model.layers import (
    ContextEncoderLayer,
    FullHeads,
    MedusaHeads,
    ResidualHeads,
    TrigramEncoder,
    restrict_to_vocab,
)
from chimera_vllm.model.tree import DraftTree


@dataclass
class TargetParts:
    """The frozen target tensors the draft reads: input embedding [V, H] and LM head [V, H]."""

    embed_weight: Tensor
    lm_head_weight: Tensor

    @classmethod
    def from_model(cls, model: nn.Module) -> TargetParts:
        return cls(
            embed_weight=model.get_input_embeddings().weight.detach(),
            lm_head_weight=model.get_output_embeddings().weight.detach(),
        )


@dataclass
class DraftInputs:
    """What the drafting loop reads once the target has verified x_0..x_n of B requests and
    produced x_{n+1}: ctx_k/ctx_v [B, kvh, S, d] are the encoder's keys/values of the verified
    hidden states h_0..h_n (None for Medusa) in S slots, ctx_valid [B, S] marks the real ones,
    last_tokens [B, 3] are (x_{n-1}, x_n, x_{n+1}), next_position [B] is n+1, anchor [B, H] is h_n."""

    parts: TargetParts
    ctx_k: Tensor | None
    ctx_v: Tensor | None
    ctx_valid: Tensor
    last_tokens: Tensor
    next_position: Tensor
    anchor: Tensor


TokenChooser = Callable[[int, Tensor], Tensor]
"""(step k, logits [B, V]) -> chosen token ids [B]. None means greedy, by the fused arg-max."""


WEIGHTS_NAME = "model.safetensors"


class ChimeraCheckpointError(ValueError):
    """A draft checkpoint is missing, corrupt, or does not match its config."""


class ChimeraDraft(nn.Module):
    def __init__(self, config: ChimeraConfig):
        super().__init__()
        self.config = config
        H = config.hidden_size
        self.trigram: TrigramEncoder | None = None
        self.encoder: ContextEncoderLayer | None = None
        # Target ids the heads may draft (sorted); None drafts from the whole vocabulary.
        vocab = None if config.draft_vocab_size is None else torch.zeros(config.draft_vocab_size, dtype=torch.long)
        self.register_buffer("draft_vocab", vocab)
        if config.head_type == "medusa":
            self.heads: nn.Module = MedusaHeads(config.num_heads, H)
            return
        self.trigram = TrigramEncoder(H, config.trigram_mlp)
        self.encoder = ContextEncoderLayer(config.layer_config())
        if config.head_type == "residual":
            self.heads = ResidualHeads(config.num_heads, H)
        else:
            self.heads = FullHeads(config.num_heads, H, config.vocab_size)

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    def init_heads_from_target(self, parts: TargetParts) -> None:
        """Initialise the heads from the target's LM head, as the method does."""
        if isinstance(self.heads, FullHeads):
            lm = parts.lm_head_weight.to(self.heads.weight.dtype)
            with torch.no_grad():
                self.heads.weight.copy_(torch.cat([lm, lm], dim=-1).expand_as(self.heads.weight))
        # Residual heads are zero-initialised: each already equals the target's LM head on ĥ.

    @property
    def uses_context(self) -> bool:
        """False for the Medusa baseline, which keeps no encoder context."""
        return self.encoder is not None

    def head_logits(self, step: int, h_hat: Tensor | None, anchor: Tensor, parts: TargetParts) -> Tensor:
        """Every head is features [..., D] times a vocabulary matrix [V, D]."""
        features, vocab = self.heads(step, h_hat, anchor, parts.lm_head_weight)
        return F.linear(features, vocab.to(features.dtype))

    def draft_vocab_product(
        self, step: int, h_hat: Tensor | None, anchor: Tensor, parts: TargetParts
    ) -> tuple[Tensor, Tensor]:
        """(features [..., D], rows [Vd, D]): head `step` over the draft vocabulary only.

        Index i of features @ rows.T is target token draft_vocab[i] (all V tokens when
        the draft has no vocabulary). Greedy drafting and training both use it, so
        neither computes the logits of tokens the draft can never propose.
        """
        features, vocab = self.heads(step, h_hat, anchor, parts.lm_head_weight)
        if self.draft_vocab is not None:
            vocab = vocab.index_select(0, self.draft_vocab)
        return features, vocab.to(features.dtype)

    def draft_vocab_index(self, token_ids: Tensor, vocab_size: int) -> Tensor:
        """Target token ids -> their indices in :meth:`draft_vocab_product`'s rows: -1 for a token
        the draft cannot propose (the ids themselves when it has no vocabulary)."""
        if self.draft_vocab is None:
            return token_ids
        index = torch.full((vocab_size,), -1, dtype=torch.long, device=token_ids.device)
        index[self.draft_vocab] = torch.arange(len(self.draft_vocab), device=token_ids.device)
        return index[token_ids]

    def set_draft_vocab(self, token_ids: Tensor) -> None:
        """Draft only these target tokens (the rest of the vocabulary gets probability 0).

        The LM-head product of every draft step then reads len(token_ids) rows instead of V;
        decoding stays lossless, as the target verifies every drafted token.
        """
        ids = torch.unique(token_ids.long().flatten())
        if ids.numel() == 0 or ids[0] < 0 or ids[-1] >= self.config.vocab_size:
            raise ChimeraConfigError(f"draft vocabulary ids must lie in 0..{self.config.vocab_size - 1}")
        self.config.draft_vocab_size = ids.numel()
        self.draft_vocab = ids.to(next(self.parameters()).device)

    def _draft_tokens(
        self, step: int, h_hat: Tensor | None, anchor: Tensor, parts: TargetParts, choose: TokenChooser | None
    ) -> tuple[Tensor, Tensor | None]:
        """(tokens [B], logits [B, V]); greedy drafting never materialises the logits."""
        if choose is None:
            features, rows = self.draft_vocab_product(step, h_hat, anchor, parts)
            best = greedy_draft_head(features, rows)
            return (best if self.draft_vocab is None else self.draft_vocab[best]), None
        logits = self.head_logits(step, h_hat, anchor, parts)
        if self.draft_vocab is not None:
            logits = restrict_to_vocab(logits, self.draft_vocab)
        return choose(step, logits), logits

    def check_num_steps(self, num_steps: int) -> None:
        self.config.check_num_steps(num_steps)

    @torch.no_grad()
    def propose(
        self, inputs: DraftInputs, num_steps: int, choose: TokenChooser | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """The drafting loop for a batch of requests: the drafted tokens [B, num_steps] and their
        logits [B, num_steps, V] (None when choose is None: greedy drafting by the fused arg-max)."""
        self.check_num_steps(num_steps)
        parts, anchor, ctx_k, ctx_v = inputs.parts, inputs.anchor, inputs.ctx_k, inputs.ctx_v
        tri, tokens, all_logits = inputs.last_tokens, [], []
        mask = inputs.ctx_valid[:, None, :] if self.uses_context else None
        for k in range(num_steps):
            if not self.uses_context:  # the Medusa baseline
                tok, logits = self._draft_tokens(k, None, anchor, parts, choose)
                tokens.append(tok)
                all_logits.append(logits)
                continue
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
        """Greedy drafting of a token tree: [B, N], node i's token being the draft's
        (path[-1])-th choice after the tokens of its ancestors.

        Each depth is one encoder pass with the nodes that have children as its queries:
        they share the verified context and each sees its own path's earlier draft outputs,
        the entries the drafting loop would have appended for that path.
        """
        self.check_num_steps(tree.depth)
        parts, anchor = inputs.parts, inputs.anchor
        B = anchor.shape[0]
        tokens = torch.empty(B, tree.num_nodes, dtype=torch.long, device=anchor.device)
        trigrams = {-1: inputs.last_tokens}  # per expanding node: its path's last three tokens [B, 3]
        own: dict[int, tuple[Tensor, Tensor] | None] = {-1: None}  # its path's draft outputs' keys/values
        for depth in range(tree.depth):
            nodes = tree.expanding(depth)
            if self.uses_context:
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
            else:  # Medusa: the heads read the anchor alone, the same for every node of a depth
                features, rows = self.draft_vocab_product(depth, None, anchor, parts)
                features = features[:, None].expand(B, len(nodes), -1)
            top = F.linear(features, rows).topk(tree.choices(depth), dim=-1).indices  # [B, E, choices]
            if self.draft_vocab is not None:
                top = self.draft_vocab[top]
            column = {u: j for j, u in enumerate(nodes)}
            grows = set(tree.expanding(depth + 1)) if depth + 1 < tree.depth else set()
            for i, (path, parent) in enumerate(zip(tree.paths, tree.parents)):
                if len(path) != depth + 1:
                    continue
                j = column[parent]
                tokens[:, i] = top[:, j, path[-1]]
                if i in grows:
                    trigrams[i] = torch.cat([trigrams[parent][:, 1:], tokens[:, i, None]], dim=1)
                    if self.uses_context:
                        k, v = new_k[:, :, j, None], new_v[:, :, j, None]
                        if own[parent] is not None:
                            k, v = torch.cat([own[parent][0], k], dim=2), torch.cat([own[parent][1], v], dim=2)
                        own[i] = (k, v)
        return tokens

    # --- checkpoints ---------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> None:
        """Write config.json and model.safetensors (the draft's own weights only)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.dtype = str(next(self.parameters()).dtype).removeprefix("torch.")
        self.config.save(directory)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        target_config=None,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
    ) -> ChimeraDraft:
        """Load a draft; with ``target_config``, refuse it unless it was built for that target."""
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"no Chimera draft directory at {directory}")
        config = ChimeraConfig.load(directory)
        if target_config is not None:
            config.check_target(target_config)
        path = directory / WEIGHTS_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no draft weights at {path}")
        try:
            state = load_file(str(path), device=str(device))
        except (SafetensorError, OSError, ValueError) as e:
            raise ChimeraCheckpointError(f"corrupt draft weights {path}: {e}") from e
        model = cls(config).to(device)
        _check_state_dict(model, state, path)
        model.load_state_dict(state)
        return model.to(dtype or getattr(torch, config.dtype)).eval()


def _check_state_dict(model: nn.Module, state: dict[str, Tensor], path: Path) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ChimeraCheckpointError(f"{path}: missing weights {missing}, unexpected weights {unexpected}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise ChimeraCheckpointError(
                f"{path}: weight {name} has shape {tuple(state[name].shape)}, the config implies {shape}"
            )

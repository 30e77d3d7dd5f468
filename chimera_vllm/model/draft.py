"""The Chimera draft model: trigram encoder, full-context encoder, residual decoding heads.

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
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    rotate_half,
)

from chimera_vllm.config import ChimeraConfig, ChimeraConfigError
from chimera_vllm.kernels.greedy_head import greedy_draft_head
from chimera_vllm.kernels.residual_head import residual_head
from chimera_vllm.kernels.trigram import trigram_fused
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


class ResBlock(nn.Module):
    """x + SiLU(Linear(x)), with the linear weight zero-initialised (identity at start)."""

    def __init__(self, size: int):
        super().__init__()
        self.linear = nn.Linear(size, size)
        nn.init.zeros_(self.linear.weight)

    def forward(self, x: Tensor) -> Tensor:
        return x + F.silu(self.linear(x))


class TrigramEncoder(nn.Module):
    """e_p = MLP([E(x_{p-2}); E(x_{p-1}); E(x_p)]) in R^H."""

    def __init__(self, hidden_size: int, kind: str):
        super().__init__()
        h3 = 3 * hidden_size
        layers: list[nn.Module] = [ResBlock(h3)] if kind == "resblock" else []
        self.mlp = nn.Sequential(*layers, nn.Linear(h3, hidden_size, bias=False))

    def forward(self, trigram_ids: Tensor, embed_weight: Tensor) -> Tensor:
        """trigram_ids [..., 3] -> [..., H] (the fused kernel on CUDA at inference)."""
        res = self.mlp[0] if isinstance(self.mlp[0], ResBlock) else None
        w1, b1 = (res.linear.weight, res.linear.bias) if res is not None else (None, None)
        out = trigram_fused(trigram_ids.reshape(-1, 3), embed_weight, w1, b1, self.mlp[-1].weight)
        return out.view(*trigram_ids.shape[:-1], -1)


def trigram_ids(input_ids: Tensor) -> Tensor:
    """[B, T] token ids -> [B, T, 3] ids of (x_{p-2}, x_{p-1}, x_p); missing tokens are x_0."""
    T = input_ids.shape[-1]
    p = torch.arange(T, device=input_ids.device)
    idx = torch.stack([(p - 2).clamp(min=0), (p - 1).clamp(min=0), p], dim=-1)  # [T, 3]
    return input_ids[..., idx]


class EncoderAttention(nn.Module):
    """Attention of the encoder layer: queries from the new input, keys/values from a given context.

    Parameter names follow transformers' LlamaAttention so that official
    checkpoints and vLLM's Llama weight loaders map onto them directly.
    """

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        H, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        self.q_proj = nn.Linear(H, self.num_heads * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(H, self.num_kv_heads * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(H, self.num_kv_heads * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * d, H, bias=False)

    def _split(self, x: Tensor, heads: int) -> Tensor:
        return x.unflatten(-1, (heads, self.head_dim)).transpose(1, 2)  # [B, heads, T, d]

    def key_values(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        k = self._split(self.k_proj(x), self.num_kv_heads)
        v = self._split(self.v_proj(x), self.num_kv_heads)
        return _rope(k, cos, sin), v

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        ctx_k: Tensor,
        ctx_v: Tensor,
        ctx_mask: Tensor,
        own_k: Tensor | None = None,
        own_v: Tensor | None = None,
    ) -> Tensor:
        """x [B, T, H] (normed); ctx_k/ctx_v [B, kvh, S, d]; ctx_mask [B|1, T, S] bool.

        Each query attends to the context entries its mask allows, to its own key/value
        and to own_k/own_v [B, kvh, T, m, d]: m more entries that only query t sees
        (in training, the earlier draft steps' outputs at the positions that query reads).
        """
        B, T, _ = x.shape
        q = _rope(self._split(self.q_proj(x), self.num_heads), cos, sin)
        k, v = self.key_values(x, cos, sin)
        own_k = k[:, :, :, None] if own_k is None else torch.cat([own_k, k[:, :, :, None]], dim=3)
        own_v = v[:, :, :, None] if own_v is None else torch.cat([own_v, v[:, :, :, None]], dim=3)
        out = context_attention(q, ctx_k, ctx_v, ctx_mask, own_k, own_v)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


def context_attention(
    q: Tensor, ctx_k: Tensor, ctx_v: Tensor, ctx_mask: Tensor, own_k: Tensor, own_v: Tensor
) -> Tensor:
    """Softmax attention of q [B, h, T, d] over a shared context [B, kvh, S, d] (ctx_mask [B|1, T, S])
    plus per-query entries own_k/own_v [B, kvh, T, m, d] -> [B, h, T, d] (grouped-query heads).

    Per-query entries cost T*m scores where a mask over shared keys would cost T*T*m:
    the training pass has m = step + 1, so this keeps every step as cheap as the first.
    """
    B, h, T, d = q.shape
    kvh, S = ctx_k.shape[1], ctx_k.shape[2]
    q = q.view(B, kvh, h // kvh, T, d) * d**-0.5
    ctx_scores = (q @ ctx_k[:, :, None].transpose(-1, -2)).masked_fill(~ctx_mask[:, None, None], float("-inf"))
    own_scores = torch.einsum("bkgtd,bktmd->bkgtm", q, own_k)
    probs = torch.softmax(torch.cat([ctx_scores, own_scores], dim=-1).float(), dim=-1).to(q.dtype)
    out = probs[..., :S] @ ctx_v[:, :, None] + torch.einsum("bkgtm,bktmd->bkgtd", probs[..., S:], own_v)
    return out.reshape(B, h, T, d)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of x [B, heads, T, d] with cos/sin [B, T, d] (transformers' convention)."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


class ContextEncoderLayer(nn.Module):
    """One Llama decoder layer whose keys/values come from the target's hidden states.

    The context at a verified position j is the target's h_j; at a drafted
    position it is the layer's own earlier output. Both are turned into
    keys/values by :meth:`context_kv` (same norm and projections as the query).
    """

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = LlamaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.self_attn = EncoderAttention(cfg)
        self.post_attention_layernorm = LlamaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)
        self.rotary_emb = LlamaRotaryEmbedding(cfg)

    def context_kv(self, hidden: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """hidden [B, T, H] at positions [B, T] -> keys, values [B, kvh, T, d]."""
        x = self.input_layernorm(hidden)
        cos, sin = self.rotary_emb(x, positions)
        return self.self_attn.key_values(x, cos, sin)

    def forward(
        self,
        e: Tensor,
        positions: Tensor,
        ctx_k: Tensor,
        ctx_v: Tensor,
        ctx_mask: Tensor,
        own_k: Tensor | None = None,
        own_v: Tensor | None = None,
    ) -> Tensor:
        """e [B, T, H] trigram encodings at positions [B, T] -> ĥ [B, T, H] (own_k/own_v: see EncoderAttention)."""
        x = self.input_layernorm(e)
        cos, sin = self.rotary_emb(x, positions)
        h = e + self.self_attn(x, cos, sin, ctx_k, ctx_v, ctx_mask, own_k, own_v)
        return h + self.mlp(self.post_attention_layernorm(h))


class ResidualHeads(nn.Module):
    """Head k: y = ĥ + SiLU(W_k [ĥ; h_a] + b_k), logits = LMHead(y).

    Weights are stacked [K, H, 2H] so the step index is data. Zero-initialised,
    every head starts as the target's own LM head applied to ĥ.
    """

    def __init__(self, num_heads: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_heads, hidden_size, 2 * hidden_size))
        self.bias = nn.Parameter(torch.zeros(num_heads, hidden_size))

    def forward(self, step: int, h_hat: Tensor, anchor: Tensor, lm_head_weight: Tensor) -> tuple[Tensor, Tensor]:
        H = h_hat.shape[-1]
        y = residual_head(h_hat.reshape(-1, H), anchor.reshape(-1, H), self.weight, self.bias, step)
        return y.view_as(h_hat), lm_head_weight


class FullHeads(nn.Module):
    """The official head: logits = W_k [h_a; ĥ] with W_k [V, 2H], initialised to [LMHead | LMHead]."""

    def __init__(self, num_heads: int, hidden_size: int, vocab_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_heads, vocab_size, 2 * hidden_size))

    def forward(self, step: int, h_hat: Tensor, anchor: Tensor, lm_head_weight: Tensor) -> tuple[Tensor, Tensor]:
        return torch.cat([anchor, h_hat], dim=-1), self.weight[step]


class MedusaHeads(nn.Module):
    """The Medusa baseline: head k reads only the anchor, y = h_a + SiLU(W_k h_a + b_k), logits = LMHead(y).

    A draft with these heads has no trigram or full-context encoder; it is
    trained and evaluated by the same code, for side-by-side comparisons.
    """

    def __init__(self, num_heads: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_heads, hidden_size, hidden_size))
        self.bias = nn.Parameter(torch.zeros(num_heads, hidden_size))

    def forward(self, step: int, h_hat: Tensor | None, anchor: Tensor, lm_head_weight: Tensor) -> tuple[Tensor, Tensor]:
        return anchor + F.silu(F.linear(anchor, self.weight[step], self.bias[step])), lm_head_weight


def restrict_to_vocab(logits: Tensor, vocab: Tensor) -> Tensor:
    """logits [..., V] with every token outside vocab set to -inf (probability 0)."""
    out = torch.full_like(logits, float("-inf"))
    out[..., vocab] = logits[..., vocab]
    return out


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

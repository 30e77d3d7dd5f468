"""The draft's layers: trigram encoder, full-context encoder layer, and the three kinds of heads.

Shapes use B (batch), T (query positions), S (key/value positions), H (hidden), V (vocabulary).
The layers hold only the draft's own parameters: the target's embedding and LM head are passed in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    rotate_half,
)

from chimera_vllm.kernels.residual_head import residual_head
from chimera_vllm.kernels.trigram import trigram_fused, trigram_mlp


class ResBlock(nn.Module):
    """The parameters of x + SiLU(Linear(x)) (kernels.trigram.trigram_mlp computes it), the linear
    weight zero-initialised so that the block starts as the identity; a module of its own so that
    checkpoints keep the authors' names (trigram.mlp.0.linear)."""

    def __init__(self, size: int):
        super().__init__()
        self.linear = nn.Linear(size, size)
        nn.init.zeros_(self.linear.weight)


class TrigramEncoder(nn.Module):
    """e_p = MLP([E(x_{p-2}); E(x_{p-1}); E(x_p)]) in R^H."""

    def __init__(self, hidden_size: int, kind: str):
        super().__init__()
        h3 = 3 * hidden_size
        layers: list[nn.Module] = [ResBlock(h3)] if kind == "resblock" else []
        self.mlp = nn.Sequential(*layers, nn.Linear(h3, hidden_size, bias=False))

    def linears(self) -> tuple[nn.Linear | None, nn.Linear]:
        """The MLP's two linear layers: the ResBlock's (None for the linear MLP) and the output one."""
        res = self.mlp[0] if isinstance(self.mlp[0], ResBlock) else None
        return (None if res is None else res.linear), self.mlp[-1]

    def forward(self, trigram_ids: Tensor, embed_weight: Tensor) -> Tensor:
        """trigram_ids [..., 3] -> [..., H] (the fused kernel on CUDA at inference)."""
        linear1, linear2 = self.linears()
        w1, b1 = (None, None) if linear1 is None else (linear1.weight, linear1.bias)
        out = trigram_fused(trigram_ids.reshape(-1, 3), embed_weight, w1, b1, linear2.weight)
        return out.view(*trigram_ids.shape[:-1], -1)

    def encode_rows(self, rows: Tensor) -> Tensor:
        """[T, 3H] embedding rows gathered elsewhere (vLLM's embedding layer) -> [T, H]."""
        return trigram_mlp(rows, *self.linears())


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

    def __init__(self, cfg: LlamaConfig, input_size: int | None = None):
        super().__init__()
        H, d = cfg.hidden_size, cfg.head_dim
        D = input_size or H  # EAGLE-3's layer reads [embedding; feature], 2H wide
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        self.q_proj = nn.Linear(D, self.num_heads * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(D, self.num_kv_heads * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(D, self.num_kv_heads * d, bias=cfg.attention_bias)
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
        """x [B, T, D] (normed); ctx_k/ctx_v [B, kvh, S, d]; ctx_mask [B|1, T, S] bool.

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

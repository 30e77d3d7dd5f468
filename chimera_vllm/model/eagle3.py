"""The EAGLE-3 baseline (arXiv 2503.01840) exactly as vLLM 0.32 runs it (llama_eagle3.py).

The target's hidden states from three layers are fused by a linear layer (``fc``, 3H -> H); one
decoder layer reads [embedding; feature] (2H wide into its attention) and its own LM head scores
the draft vocabulary. Step 0 after the target verified x_0..x_n and produced x_{n+1} stands at
position n with input (E(x_{n+1}), fc(aux_n)); step k stands at n+k with E(its last drafted
token) and step k-1's output before the final norm as its feature. Its keys/values at the
verified positions j come from (E(x_{j+1}), fc(aux_j)): the draft's own KV cache in vLLM.

Trained by the same code as the Chimera draft, with training-time test: step k of the training
pass sees exactly the entries the drafting loop would (the verified ones, then its own earlier
steps'), so that it learns from its own features, not the target's. ``export_vllm_eagle3``
writes it in the speculators ``eagle3`` format, served by vLLM's own EAGLE-3 proposer.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

from chimera_vllm.config import ChimeraConfig, ChimeraConfigError
from chimera_vllm.model.base import DraftInputs, DraftModel, TargetParts, TokenChooser
from chimera_vllm.model.draft import shift_right
from chimera_vllm.model.layers import EncoderAttention
from chimera_vllm.model.tree import DraftTree


def default_aux_layers(num_layers: int) -> list[int]:
    """vLLM's choice (2, L // 2, L - 3) where those are three distinct layers, else 0, L // 2, L."""
    layers = {2, num_layers // 2, num_layers - 3}
    if len(layers) == 3 and min(layers) >= 0:
        return sorted(layers)
    if num_layers < 2:
        raise ChimeraConfigError(f"an EAGLE-3 draft reads three target layers; the target has {num_layers}")
    return [0, num_layers // 2, num_layers]


def step_context_mask(T: int, step: int, device: torch.device | None = None) -> Tensor:
    """[T, T] bool: the verified entries j query p sees at draft step ``step``: 1 <= j <= p - max(step, 1)
    (query p stands at position p - 1; entry 0 would be the position before the sequence)."""
    mask = torch.ones(T, T, dtype=torch.bool, device=device).tril(-max(step, 1))
    mask[:, 0] = False
    return mask


def shift_positions(x: Tensor) -> Tensor:
    """x[:, p] <- x[:, p - 1] along dim 1; zeros enter at the front."""
    return F.pad(x, (0, 0, 1, 0))[:, : x.shape[1]]


class Eagle3Layer(nn.Module):
    """vLLM's EAGLE-3 decoder layer (norm_before_residual): the residual is the normed feature."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        H = cfg.hidden_size
        self.input_layernorm = LlamaRMSNorm(H, eps=cfg.rms_norm_eps)
        self.hidden_norm = LlamaRMSNorm(H, eps=cfg.rms_norm_eps)
        self.self_attn = EncoderAttention(cfg, input_size=2 * H)
        self.post_attention_layernorm = LlamaRMSNorm(H, eps=cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)
        self.rotary_emb = LlamaRotaryEmbedding(cfg)

    def _attention_input(self, embeds: Tensor, feature: Tensor, positions: Tensor) -> tuple[Tensor, ...]:
        residual = self.hidden_norm(feature)
        x = torch.cat([self.input_layernorm(embeds), residual], dim=-1)
        cos, sin = self.rotary_emb(x, positions)
        return x, residual, cos, sin

    def key_values(self, embeds: Tensor, feature: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Keys, values [B, kvh, T, d] of inputs [B, T, H] at positions [B, T]."""
        x, _, cos, sin = self._attention_input(embeds, feature, positions)
        return self.self_attn.key_values(x, cos, sin)

    def forward(
        self,
        embeds: Tensor,
        feature: Tensor,
        positions: Tensor,
        ctx_k: Tensor,
        ctx_v: Tensor,
        ctx_mask: Tensor,
        own_k: Tensor | None = None,
        own_v: Tensor | None = None,
    ) -> Tensor:
        """The layer's output before the final norm [B, T, H] (own_k/own_v: see EncoderAttention)."""
        x, residual, cos, sin = self._attention_input(embeds, feature, positions)
        h = residual + self.self_attn(x, cos, sin, ctx_k, ctx_v, ctx_mask, own_k, own_v)
        return h + self.mlp(self.post_attention_layernorm(h))


class Eagle3Draft(DraftModel):
    """A draft of ``head_type`` "eagle3". Its heads read one feature, the layer's normed output,
    which :meth:`training_steps` yields in the anchor's place; one LM head serves every step."""

    def __init__(self, config: ChimeraConfig):
        super().__init__(config)
        H, cfg = config.hidden_size, config.layer_config()
        self.fc = nn.Linear(len(config.aux_layers) * H, H, bias=False)
        self.layer = Eagle3Layer(cfg)
        self.norm = LlamaRMSNorm(H, eps=cfg.rms_norm_eps)
        self.lm_head = nn.Linear(H, config.draft_vocab_size or config.vocab_size, bias=False)

    def weights_read_per_step(self) -> int:
        """Every weight but fc, which only the first step reads (its LM head is its own)."""
        return sum(p.numel() for name, p in self.named_parameters() if not name.startswith("fc."))

    def init_heads_from_target(self, parts: TargetParts) -> None:
        """The LM head starts as the target's rows of the draft vocabulary."""
        rows = parts.lm_head_weight if self.draft_vocab is None else parts.lm_head_weight[self.draft_vocab]
        with torch.no_grad():
            self.lm_head.weight.copy_(rows)

    def set_draft_vocab(self, token_ids: Tensor) -> None:
        """Keep the LM head's rows of these tokens: the vocabulary can only shrink, as the draft
        holds no rows of tokens outside it."""
        ids = self.vocab_ids(token_ids)
        index = self.draft_vocab_index(ids, self.config.vocab_size)
        outside = ids[index < 0]
        if outside.numel():
            raise ChimeraConfigError(
                f"token id {outside[0].item()} is not in this EAGLE-3 draft's vocabulary: its LM head has no row "
                "for it (set the vocabulary of a fresh draft)"
            )
        super().set_draft_vocab(ids)
        self.lm_head.weight = nn.Parameter(self.lm_head.weight.detach()[index].clone())
        self.lm_head.out_features = len(ids)

    def head_logits(self, step: int, h_hat: Tensor | None, anchor: Tensor, parts: TargetParts) -> Tensor:
        """Logits over the target's vocabulary, -inf outside the draft vocabulary (as vLLM maps them)."""
        logits = self.lm_head(anchor)
        if self.draft_vocab is None:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.config.vocab_size), float("-inf"))
        full[..., self.draft_vocab] = logits
        return full

    def draft_vocab_product(
        self, step: int, h_hat: Tensor | None, anchor: Tensor, parts: TargetParts
    ) -> tuple[Tensor, Tensor]:
        return anchor, self.lm_head.weight.to(anchor.dtype)

    def context_kv(self, hidden: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        raise ChimeraConfigError(
            "an EAGLE-3 draft reads the target's aux hidden states, which the reference decoder does not keep: "
            "serve it with vLLM (chimera-vllm export-eagle3)"
        )

    def verified_kv(
        self, next_tokens: Tensor, aux: Tensor, positions: Tensor, parts: TargetParts
    ) -> tuple[Tensor, Tensor]:
        """Keys, values [B, kvh, T, d] of verified positions [B, T]: position j reads x_{j+1}
        (next_tokens [B, T]) and the target's aux hidden states of x_j (aux [B, T, 3H])."""
        return self.layer.key_values(F.embedding(next_tokens, parts.embed_weight), self.fc(aux), positions)

    @torch.no_grad()
    def propose(
        self, inputs: DraftInputs, num_steps: int, choose: TokenChooser | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """inputs.ctx_k/ctx_v: :meth:`verified_kv` of positions 0..n-1; inputs.aux: the aux hidden
        states of x_n [B, 3H]."""
        self.check_num_steps(num_steps)
        if inputs.aux is None:
            raise ChimeraConfigError("an EAGLE-3 draft drafts from the target's aux hidden states (inputs.aux)")
        parts = inputs.parts
        feature = self.fc(inputs.aux)[:, None]
        token = inputs.last_tokens[:, 2]
        position = (inputs.next_position - 1)[:, None]
        ctx_k, ctx_v, mask = inputs.ctx_k, inputs.ctx_v, inputs.ctx_valid[:, None, :]
        tokens, all_logits = [], []
        for k in range(num_steps):
            embeds = F.embedding(token[:, None], parts.embed_weight)
            out = self.layer(embeds, feature, position + k, ctx_k, ctx_v, mask)
            token, logits = self._draft_tokens(k, None, self.norm(out[:, 0]), parts, choose)
            tokens.append(token)
            all_logits.append(logits)
            if k + 1 < num_steps:
                new_k, new_v = self.layer.key_values(embeds, feature, position + k)
                ctx_k, ctx_v = torch.cat([ctx_k, new_k], dim=2), torch.cat([ctx_v, new_v], dim=2)
                mask = F.pad(mask, (0, 1), value=True)
                feature = out
        return torch.stack(tokens, dim=1), None if choose is None else torch.stack(all_logits, dim=1)

    def propose_tree(self, inputs: DraftInputs, tree: DraftTree) -> Tensor:
        raise ChimeraConfigError("an EAGLE-3 draft drafts chains here; vLLM's EAGLE-3 proposer drafts its trees")

    def training_steps(
        self, parts: TargetParts, input_ids: Tensor, hidden: Tensor, num_steps: int, aux: Tensor | None = None
    ) -> Iterator[tuple[int, None, Tensor]]:
        """Training-time test. Query p (which predicts x_{p+1}) stands at position p-1 and reads
        E(x_p); at step 0 its feature is fc(aux_{p-1}), at step k step k-1's output at query p-1.
        Step k at query p sees the verified entries 1..p-k (step 0's keys, from the target's
        features), the entries of steps 1..k-1 at p-k+1..p-1 (one each, aligned to the query, as
        in the Chimera draft's pass) and itself."""
        if aux is None:
            raise ChimeraConfigError(
                f"an EAGLE-3 draft trains on the target's hidden states of layers {self.config.aux_layers}: "
                "pass aux (the trainer's hidden-state cache stores them for this draft)"
            )
        B, T = input_ids.shape
        positions = (torch.arange(T, device=input_ids.device) - 1).expand(B, T)
        embeds = F.embedding(input_ids, parts.embed_weight)
        feature = shift_positions(self.fc(aux.to(embeds.dtype)))
        ctx_k, ctx_v = self.layer.key_values(embeds, feature, positions)
        own_k = own_v = None
        for k in range(num_steps):
            mask = step_context_mask(T, k, input_ids.device)[None]
            out = self.layer(embeds, feature, positions, ctx_k, ctx_v, mask, own_k, own_v)
            yield k, None, self.norm(out)
            if k + 1 < num_steps:
                if k >= 1:  # step k's entries join what later steps see
                    new_k, new_v = (x[:, :, :, None] for x in self.layer.key_values(embeds, feature, positions))
                    own_k = new_k if own_k is None else torch.cat([own_k, new_k], dim=3)
                    own_v = new_v if own_v is None else torch.cat([own_v, new_v], dim=3)
                if own_k is not None:
                    own_k, own_v = shift_right(own_k), shift_right(own_v)
                feature = shift_positions(out)

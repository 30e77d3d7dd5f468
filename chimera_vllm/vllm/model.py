"""The Chimera draft as a vLLM model: vLLM's parallel layers and paged attention.

The proposer (:mod:`chimera_vllm.vllm.proposer`) runs it in two ways:

* :meth:`ChimeraDraftForVLLM.write_context` turns the target's hidden states h_j at
  verified positions into the encoder's keys/values and writes them into the
  draft's paged KV cache at the positions' slots (no attention is computed).
* ``forward`` is one drafting step for every request: the trigram encoding e_p of
  (x_{p-2}, x_{p-1}, x_p) at position p attends to the cache (its own key/value is
  written at slot p first, as the attention layer always does), the encoder's
  output ĥ_p then replaces e_p's key/value at slot p (the context the next step
  sees; the last step skips this: a slot past the verified tokens is read only by a
  later step of the same proposal, and once p is verified the slot holds the
  key/value of the target's h_p), and the residual head of step k turns ĥ_p and the
  anchor h_a into the features the target's LM head reads.

The two tokens before x_p and the step index k live in persistent buffers that the
proposer fills before each call, so a captured graph reads them as data.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention.attention import unified_kv_cache_update
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.llama import LlamaAttention, LlamaMLP
from vllm.platforms import current_platform
from vllm.utils.torch_utils import _encode_layer_name

from chimera_vllm.config import ChimeraConfig, ChimeraConfigError
from chimera_vllm.kernels.greedy_head import greedy_draft_head
from chimera_vllm.model.layers import ResidualHeads, TrigramEncoder, restrict_to_vocab
from chimera_vllm.vllm.cpu_gemm import CpuDraftGemms, route_small_batches
from chimera_vllm.vllm.prompt_lookup import PromptLookup, draft_model_tokens

# Checkpoint names of the encoder's separate projections -> (vLLM's fused parameter, shard).
_STACKED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", "q"),
    "self_attn.k_proj": ("self_attn.qkv_proj", "k"),
    "self_attn.v_proj": ("self_attn.qkv_proj", "v"),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}

CHIMERA_CONFIG_KEY = "chimera_draft_config"
"""Attribute of the draft's vLLM hf_config holding the draft's whole config.json."""


def carries_chimera_config(hf_config) -> bool:
    """Whether a draft's vLLM hf_config is a Chimera draft's (set by the speculators hook)."""
    return getattr(hf_config, CHIMERA_CONFIG_KEY, None) is not None


def chimera_config_of(hf_config) -> ChimeraConfig | None:
    """The Chimera config carried by a draft's vLLM hf_config, or None for other drafts."""
    return (
        ChimeraConfig.from_dict(getattr(hf_config, CHIMERA_CONFIG_KEY)) if carries_chimera_config(hf_config) else None
    )


class ChimeraEncoderLayer(nn.Module):
    """The full-context encoder: one Llama decoder layer on vLLM's layers (shards under TP)."""

    def __init__(self, config: ChimeraConfig, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        layer = config.layer_config()
        H = config.hidden_size
        self.input_layernorm = RMSNorm(H, eps=layer.rms_norm_eps)
        self.self_attn = LlamaAttention(
            config=layer,
            hidden_size=H,
            num_heads=layer.num_attention_heads,
            num_kv_heads=layer.num_key_value_heads,
            max_position_embeddings=layer.max_position_embeddings,
            cache_config=vllm_config.cache_config,
            prefix=f"{prefix}.self_attn",
        )
        self.post_attention_layernorm = RMSNorm(H, eps=layer.rms_norm_eps)
        self.mlp = LlamaMLP(H, layer.intermediate_size, "silu", prefix=f"{prefix}.mlp")

    def linear_layers(self) -> tuple[nn.Module, ...]:
        return self.self_attn.qkv_proj, self.self_attn.o_proj, self.mlp.gate_up_proj, self.mlp.down_proj

    def _qkv(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn = self.self_attn
        qkv, _ = attn.qkv_proj(self.input_layernorm(x))
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q, k = attn.rotary_emb(positions, q, k)
        return q, k, v

    def write_kv(self, x: torch.Tensor, positions: torch.Tensor) -> None:
        """Write the keys/values of x [T, H] into the paged cache at the forward context's slots."""
        _, k, v = self._qkv(x, positions)
        attn = self.self_attn.attn
        k = k.view(-1, attn.num_kv_heads, attn.head_size)
        v = v.view(-1, attn.num_kv_heads, attn.head_size_v)
        if attn.use_direct_call:
            unified_kv_cache_update(k, v, attn.layer_name)
        else:
            torch.ops.vllm.unified_kv_cache_update(k, v, _encode_layer_name(attn.layer_name))

    def forward(self, e: torch.Tensor, positions: torch.Tensor, keep_output: bool = True) -> torch.Tensor:
        """e [T, H] at positions [T] -> ĥ [T, H]; with keep_output, ĥ's key/value replaces e's at the
        query's slot."""
        q, k, v = self._qkv(e, positions)
        out, _ = self.self_attn.o_proj(self.self_attn.attn(q, k, v))
        h = e + out
        h_hat = h + self.mlp(self.post_attention_layernorm(h))
        if keep_output:
            self.write_kv(h_hat, positions)
        return h_hat


class _ChimeraModules(nn.Module):
    """The draft's own weights (named as in the checkpoint), plus the shared target embedding."""

    def __init__(self, config: ChimeraConfig, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        self.trigram = TrigramEncoder(config.hidden_size, config.trigram_mlp)
        self.encoder = ChimeraEncoderLayer(config, vllm_config, prefix)
        self.heads = ResidualHeads(config.num_heads, config.hidden_size)
        size = config.draft_vocab_size
        self.register_buffer("draft_vocab", None if size is None else torch.zeros(size, dtype=torch.long))
        self.embed_tokens: nn.Module | None = None  # the target's, set by vLLM's proposer


class ChimeraDraftForVLLM(nn.Module):
    """vLLM model class of a Chimera draft (architecture ``ChimeraDraftModel``)."""

    # No ``has_own_embed_tokens``/``has_own_lm_head`` attributes: vLLM's proposer then always
    # shares the target's embedding and LM head with the draft (it logs this as an "MTP model").

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        spec = vllm_config.speculative_config
        assert spec is not None
        config = chimera_config_of(spec.draft_model_config.hf_config)
        if config is None:
            raise ChimeraConfigError("ChimeraDraftModel needs a draft config with speculators_model_type 'chimera'")
        check_draft_for_vllm(config, vllm_config)
        self.config = config
        self.tp_size = get_tensor_model_parallel_world_size()
        target_layers = vllm_config.model_config.get_num_layers(vllm_config.parallel_config)
        # Named like EAGLE's layer (model.layers.<first index after the target's>) so that vLLM
        # gives its attention a KV cache of its own.
        self.model = _ChimeraModules(config, vllm_config, f"model.layers.{target_layers}")
        self.lm_head: nn.Module | None = None  # the target's, set by vLLM's proposer
        self._draft_rows: torch.Tensor | None = None
        self._cpu: CpuDraftGemms | None = None
        self._loaded_encoder_weights: list[torch.Tensor] = []
        self.logits_processor = LogitsProcessor(config.vocab_size)
        max_tokens = vllm_config.scheduler_config.max_num_batched_tokens
        self.register_buffer("trigram_context", torch.zeros(max_tokens, 2, dtype=torch.long), persistent=False)
        self.register_buffer("draft_step", torch.zeros((), dtype=torch.long), persistent=False)

    # --- what the proposer calls ------------------------------------------------

    def write_context(self, hidden_states: torch.Tensor, positions: torch.Tensor) -> None:
        """Keys/values of the target's hidden states at verified positions into the cache."""
        self.model.encoder.write_kv(hidden_states, positions)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        inputs_embeds: torch.Tensor | None = None,
        last_step: bool = False,
    ) -> torch.Tensor:
        """One drafting step: x_p [T], positions p [T], anchors h_a [T, H] -> head features [T, H].

        (x_{p-2}, x_{p-1}) come from ``trigram_context`` and the step from ``draft_step``; the last
        step of a proposal does not write ĥ_p into the cache (no later step reads it).
        """
        if inputs_embeds is not None:
            raise NotImplementedError("Chimera drafts take token ids, not input embeddings")
        T = input_ids.shape[0]
        ids = torch.cat([self.trigram_context[:T], input_ids.long()[:, None]], dim=1)
        e = self._trigram(ids)
        h_hat = self.model.encoder(e, positions, keep_output=not last_step)
        return self._residual_head(h_hat, hidden_states)

    def _trigram(self, ids: torch.Tensor) -> torch.Tensor:
        """[T, 3] ids -> e [T, H]: the fused gather-GEMM where the whole embedding table is on this
        rank, else rows gathered by vLLM's embedding layer (split by vocabulary under TP)."""
        embed, cpu = self.model.embed_tokens, self._cpu_gemms()
        if self.tp_size == 1 and cpu is None:
            return self.model.trigram(ids, embed.weight)
        rows = embed(ids.reshape(-1)).view(ids.shape[0], -1)
        return self.model.trigram.encode_rows(rows) if cpu is None else cpu.trigram(rows)

    def _residual_head(self, h_hat: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        """ĥ [T, H], h_a [T, H] -> the features head ``draft_step`` hands to the target's LM head."""
        cpu = self._cpu_gemms()
        if cpu is not None:
            return cpu.residual_head(int(self.draft_step), h_hat, anchor)
        features, _ = self.model.heads(self.draft_step, h_hat, anchor, None)
        return features

    def _cpu_gemms(self) -> CpuDraftGemms | None:
        """On a CPU, the draft's own matmuls through vLLM's CPU GEMMs (vllm_cpu_gemm.py), prepacked
        on first use: weights and the shared LM head are in place by the first forward."""
        if self._cpu is None and current_platform.is_cpu():
            self._cpu = CpuDraftGemms(
                self.model.trigram, self.model.heads, self._greedy_rows() if self.tp_size == 1 else None
            )
        return self._cpu

    def compute_logits(self, features: torch.Tensor) -> torch.Tensor | None:
        logits = self.logits_processor(self.lm_head, features)
        vocab = self.model.draft_vocab
        return logits if vocab is None or logits is None else restrict_to_vocab(logits, vocab)

    def greedy_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """Arg-max draft tokens; the fused LM-head arg-max when the whole head is on this rank."""
        if self.tp_size > 1:
            return self.compute_logits(features).argmax(dim=-1)
        cpu = self._cpu_gemms()
        ids = cpu.greedy(features) if cpu is not None else greedy_draft_head(features, self._greedy_rows())
        vocab = self.model.draft_vocab
        return ids if vocab is None else vocab[ids]

    def _greedy_rows(self) -> torch.Tensor:
        """The LM-head rows greedy drafting scores: the draft vocabulary's, gathered once (the head
        is frozen), or the whole vocabulary's."""
        vocab = self.model.draft_vocab
        if vocab is None:
            return self.lm_head.weight[: self.config.vocab_size]
        if self._draft_rows is None:
            self._draft_rows = self.lm_head.weight.index_select(0, vocab)
        return self._draft_rows

    # --- weights ------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        buffers = dict(self.named_buffers())
        loaded: set[str] = set()
        for name, tensor in weights:
            name, shard = _vllm_name(f"model.{name}")
            if name == "model.draft_vocab" and buffers.get(name) is not None:
                buffers[name].copy_(tensor)
                continue
            if name not in params:
                raise ChimeraConfigError(f"unexpected weight {name!r} in the Chimera draft checkpoint")
            param = params[name]
            loader = getattr(param, "weight_loader", default_weight_loader)
            if shard is None:
                loader(param, tensor)
            else:
                loader(param, tensor, shard)
            loaded.add(name)
        if current_platform.is_cpu():  # kept past vLLM's CPU prepacking, for process_weights_after_loading
            self._loaded_encoder_weights = [layer.weight.detach() for layer in self.model.encoder.linear_layers()]
        return loaded

    def process_weights_after_loading(self) -> None:
        """vLLM's model-level hook, after its CPU prepacking of every linear layer: the encoder
        layer's linears get the small-GEMM kernel for a few rows, where it is faster (vllm_cpu_gemm.py)."""
        for layer, weight in zip(self.model.encoder.linear_layers(), self._loaded_encoder_weights):
            route_small_batches(layer, weight)
        self._loaded_encoder_weights = []


def _vllm_name(name: str) -> tuple[str, str | int | None]:
    for ckpt, (fused, shard) in _STACKED.items():
        if f".{ckpt}." in name:
            return name.replace(ckpt, fused), shard
    return name, None


def check_draft_for_target(config: ChimeraConfig, target_hf_config, num_speculative_tokens: int | None) -> None:
    """Refuse a draft that cannot serve this target with this many tokens, naming the values."""
    config.check_target(target_hf_config)
    if config.head_type != "residual":
        raise ChimeraConfigError(
            f"vLLM serves Chimera drafts with residual heads; this draft has head_type={config.head_type!r} "
            "(a Medusa-baseline draft runs with the reference engine, `chimera-vllm generate --engine hf`)"
        )
    if num_speculative_tokens is not None:
        config.check_num_steps(num_speculative_tokens)


def check_draft_for_vllm(config: ChimeraConfig, vllm_config: VllmConfig) -> None:
    spec = vllm_config.speculative_config
    k = draft_model_tokens(PromptLookup.of(spec.draft_model_config.hf_config), spec.num_speculative_tokens)
    check_draft_for_target(config, vllm_config.model_config.hf_config, k)
    if vllm_config.use_v2_model_runner:
        raise ChimeraConfigError(
            "Chimera drafts run on vLLM's V1 model runner, but VLLM_USE_V2_MODEL_RUNNER=1 forces V2: unset it"
        )

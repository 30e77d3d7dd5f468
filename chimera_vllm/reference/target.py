"""Loading a target LLM with transformers and running it for its hidden states (final, and of the
layers an EAGLE-3 draft reads)."""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.cache_utils import Cache

from chimera_vllm.config import check_supported_target


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, dtype, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r} (use float32, bfloat16 or float16)")
    return value


def load_target(name_or_path: str, dtype: str | torch.dtype = "float32", device: str = "cpu") -> PreTrainedModel:
    """Load a supported target (Llama family, Qwen2) as a frozen model in eval mode."""
    check_supported_target(AutoConfig.from_pretrained(name_or_path))
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=resolve_dtype(dtype))
    model.to(device).eval().requires_grad_(False)
    return model


def load_tokenizer(name_or_path: str):
    return AutoTokenizer.from_pretrained(name_or_path)


def final_hidden(
    model: PreTrainedModel,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    cache: Cache | None = None,
) -> Tensor:
    """The target's final-normed hidden states [B, T, H] (h_i gives the logits of x_{i+1})."""
    out = model.base_model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=cache is not None,
    )
    return out.last_hidden_state


def final_and_aux_hidden(
    model: PreTrainedModel, input_ids: Tensor, layers: list[int] | None, attention_mask: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """(final hidden states [B, T, H], aux [B, T, len(layers) * H] or None without layers): aux
    concatenates, in the order of ``layers``, the residual stream entering each layer (layer = the
    layer count: the last layer's output before the final norm), what vLLM hands an EAGLE-3 draft."""
    if not layers:
        return final_hidden(model, input_ids, attention_mask), None
    blocks = model.base_model.layers
    captured: dict[int, Tensor] = {}

    def keep(i: int, value: Tensor | tuple) -> None:
        captured[i] = value[0] if isinstance(value, tuple) else value

    for i in layers:
        if not 0 <= i <= len(blocks):
            raise ValueError(
                f"aux layer {i}: the target has layers 0..{len(blocks) - 1}, and {len(blocks)} (its output)"
            )
    hooks = []
    for i in layers:
        if i < len(blocks):
            hooks.append(
                blocks[i].register_forward_pre_hook(
                    lambda m, args, kwargs, i=i: keep(i, args[0] if args else kwargs["hidden_states"]), with_kwargs=True
                )
            )
        else:
            hooks.append(blocks[-1].register_forward_hook(lambda m, args, out, i=i: keep(i, out)))
    try:
        final = final_hidden(model, input_ids, attention_mask)
    finally:
        for hook in hooks:
            hook.remove()
    return final, torch.cat([captured[i] for i in layers], dim=-1)


def generation_config(target: str):
    """The target's GenerationConfig, or None when it has no generation_config.json."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(target)
    except OSError:
        return None


def eos_token_ids(tokenizer, generation_config) -> set[int]:
    """The tokenizer's EOS and the generation config's (one id or a list)."""
    ids = set()
    for value in (tokenizer.eos_token_id, getattr(generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(value)
    return ids

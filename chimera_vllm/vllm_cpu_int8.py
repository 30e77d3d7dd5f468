"""int8 draft weights on a CPU: vLLM quantization method ``chimera_int8``.

A draft step at a small batch reads every weight it multiplies once for a row or a few, so on
a CPU its matmuls cost their weights' memory traffic: ~27 MB a step in bf16 for the SmolLM2
draft, ~54 MB in float32. Stored as int8 (per output channel, symmetric) and multiplied by
activations quantized per token at run time, through vLLM's oneDNN int8 GEMM, they read a half
(bf16) or a quarter (float32) of that. Decoding stays lossless, as with any draft: the target
verifies every token; only a draft whose logits change their arg-max proposes another token.

``{"model": DRAFT, "quantization": "chimera_int8"}`` in the speculative config quantizes the
encoder layer's vLLM linear layers through :class:`ChimeraInt8Config` and, seeing it, the
draft's own matmuls (trigram MLP, residual heads, draft LM head) through :class:`Int8CpuLinear`.
CPU only: the plugin refuses it elsewhere, naming the platform.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm import _custom_ops as ops
from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from .config import INT8_QUANTIZATION as QUANTIZATION


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] weight -> (int8 [N, K], float32 scale [N]) with weight ≈ int8 x scale per row."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    return (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


class Int8CpuLinear:
    """x -> x Wᵀ (+ b) with W int8 per output channel and x quantized per token (oneDNN).

    The GEMM handle points into the int8 weight and its scales, so this object keeps both."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.qweight, self.scale = quantize_per_channel(weight)
        self.bias = None if bias is None else bias.detach()
        self.dtype = weight.dtype
        self.handler = ops.create_onednn_scaled_mm(self.qweight.t(), self.scale, self.dtype, True, False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(self.dtype).contiguous()
        qx, x_scale, _ = ops.onednn_scaled_int8_quant(rows, None, None, True)
        out = torch.empty(rows.shape[0], self.handler.n, dtype=self.dtype, device=x.device)
        ops.onednn_scaled_mm(self.handler, qx, out, x_scale, None, None, self.bias)
        return out.view(*x.shape[:-1], self.handler.n)


class Int8LinearMethod(LinearMethodBase):
    """vLLM's unquantized weights at load time, quantized to int8 once loaded."""

    def __init__(self) -> None:
        self.unquantized = UnquantizedLinearMethod()

    def create_weights(self, layer: torch.nn.Module, *args, **kwargs) -> None:
        self.unquantized.create_weights(layer, *args, **kwargs)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        layer.int8_linear = Int8CpuLinear(layer.weight.data)
        layer.weight = torch.nn.Parameter(torch.empty(0, dtype=layer.weight.dtype), requires_grad=False)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        out = layer.int8_linear(x)
        return out if bias is None else out + bias


@register_quantization_config(QUANTIZATION)
class ChimeraInt8Config(QuantizationConfig):
    """Online int8 quantization of a Chimera draft's linear layers (no checkpoint change)."""

    def get_name(self) -> str:
        return QUANTIZATION

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0  # a CUDA capability; the plugin refuses this method off a CPU

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # nothing to read: the weights are quantized as they load

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ChimeraInt8Config:
        return cls()

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> Int8LinearMethod | None:
        return Int8LinearMethod() if isinstance(layer, LinearBase) else None

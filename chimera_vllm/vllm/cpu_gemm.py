"""The draft's own matmuls on vLLM's CPU GEMM path.

On a CPU, vLLM's linear layers do not call ``F.linear``: each prepacks its weight once for the
platform's GEMM library (oneDNN with AMX on x86, zentorch on AMD Zen, vLLM's small-GEMM kernel for
small weights) and calls that. The draft's trigram MLP, residual heads and draft-vocabulary LM
head are Chimera's own parameters; through ``F.linear`` they cost several times more per one-token
step than through the same dispatch. The CUDA path keeps the fused Triton kernels.

vLLM's dispatch takes its small-GEMM kernel (``weight_packed_linear``) only on CPUs with AMX and
only for weights under 1 MiB. For the draft's larger weights at decode-sized batches it beats
oneDNN too (without AMX at every draft shape up to 8 rows; with AMX at one row), so the draft's
matmuls, its encoder layer's included, take it for decode-sized batches. The measurements and the
commands behind them: docs/vllm-integration.md, "The draft's own matmuls on vLLM's CPU GEMMs".
"""

from __future__ import annotations

from typing import Any

import torch
from vllm._custom_ops import weight_packed_linear_cpu
from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

from chimera_vllm.kernels.greedy_head import greedy_draft_head
from chimera_vllm.kernels.residual_head import residual_head_with
from chimera_vllm.kernels.trigram import trigram_mlp
from chimera_vllm.model.layers import ResidualHeads, TrigramEncoder

SMALL_GEMM_MAX_ROWS = 8
"""Up to this many rows (one per request in a draft step) the small-GEMM kernel is the faster one
without AMX; with AMX it is measured faster end to end at batch 1 only (2-8 rows: not yet)."""


def small_gemm_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """weight [N, K] packed for vLLM's small-GEMM kernel where that kernel beats vLLM's own choice for
    a few rows (bf16 on an AVX512-BF16 CPU, N a multiple of 16, K of 32), else None."""
    n, k = weight.shape
    faster = weight.dtype == torch.bfloat16 and torch.cpu._is_avx512_bf16_supported() and n % 16 == 0 and k % 32 == 0
    return torch.ops._C.convert_weight_packed(weight) if faster else None


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


def route_small_batches(layer: Any, weight: torch.Tensor) -> None:
    """Send a vLLM linear layer's calls of up to SMALL_GEMM_MAX_ROWS rows to the small-GEMM kernel
    where it is faster (small_gemm_weight); weight: the layer's weight as loaded, which vLLM's CPU
    dispatch has since replaced on the layer by its prepacked copy. The kernel takes a float32 bias,
    converted here once: the bias a call passes is the layer's own, or None (``skip_bias_add``)."""
    packed = small_gemm_weight(weight)
    if packed is None:
        return
    n, dispatched = weight.shape[0], layer.cpu_linear
    bias_f32 = None if getattr(layer, "bias", None) is None else layer.bias.detach().float()

    def cpu_linear(x: torch.Tensor, layer_weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if _rows(x) <= SMALL_GEMM_MAX_ROWS:
            return weight_packed_linear_cpu(x, packed, n, None if bias is None else bias_f32)
        return dispatched(x, layer_weight, bias)

    layer.cpu_linear = cpu_linear


class CpuLinear:
    """x -> x Wᵀ + b with W prepacked by vLLM's CPU GEMM dispatch (the weight must stay frozen)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight = weight.detach()
        self.bias = None if bias is None else bias.detach()
        dispatch_cpu_unquantized_gemm(self, remove_weight=False)  # sets self.cpu_linear
        route_small_batches(self, self.weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.cpu_linear(x, self.weight, self.bias)


class CpuDraftGemms:
    """The trigram MLP, the residual heads and the greedy LM head of a loaded draft, prepacked; each
    operation is the kernels' own statement of its math, run with these GEMMs."""

    def __init__(self, trigram: TrigramEncoder, heads: ResidualHeads, lm_head: torch.Tensor | None):
        """lm_head: the rows greedy drafting scores; None under tensor parallelism (vLLM's logits)."""
        linear1, linear2 = trigram.linears()
        self.trigram_linears = (
            None if linear1 is None else CpuLinear(linear1.weight, linear1.bias),
            CpuLinear(linear2.weight),
        )
        self.heads = [CpuLinear(w, b) for w, b in zip(heads.weight, heads.bias)]
        self.lm_head = None if lm_head is None else CpuLinear(lm_head)

    def trigram(self, rows: torch.Tensor) -> torch.Tensor:
        """[T, 3H] concatenated embeddings -> [T, H] (TrigramEncoder's MLP)."""
        return trigram_mlp(rows, *self.trigram_linears)

    def residual_head(self, step: int, h_hat: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        """Head k of ResidualHeads: ĥ + SiLU(W_k [ĥ; h_a] + b_k)."""
        return residual_head_with(h_hat, anchor, self.heads[step])

    def greedy(self, features: torch.Tensor) -> torch.Tensor:
        """Arg-max over the LM head's rows (row indices, not yet mapped to a draft vocabulary)."""
        return greedy_draft_head(features, self.lm_head.weight, gemm=self.lm_head)

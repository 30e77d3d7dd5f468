"""The draft's own matmuls on vLLM's CPU GEMM path.

On a CPU, vLLM's linear layers do not call ``F.linear``: each prepacks its weight once
for the platform's GEMM library (oneDNN with AMX on x86, zentorch on AMD Zen, vLLM's
small-GEMM kernel for small weights) and calls that. The draft's trigram MLP, residual
heads and draft-vocabulary LM head are Chimera's own parameters; run through ``F.linear``
they cost 2-4x more per one-token step than through the same dispatch (SmolLM2-135M shapes,
bf16, one core of this project's Xeon: a [1728, 1728] matmul 306 vs 93 µs, the
[8192, 576] draft LM head 445 vs 133 µs). The CUDA path keeps the fused Triton kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

from .model import ResBlock, ResidualHeads, TrigramEncoder


class CpuLinear:
    """x -> x Wᵀ + b with W prepacked by vLLM's CPU GEMM dispatch (the weight must stay frozen)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight = weight.detach()
        self.bias = None if bias is None else bias.detach()
        dispatch_cpu_unquantized_gemm(self, remove_weight=False)  # sets self.cpu_linear

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.cpu_linear(x, self.weight, self.bias)


class CpuDraftGemms:
    """The trigram MLP, the residual heads and the greedy LM head of a loaded draft, prepacked."""

    def __init__(self, trigram: TrigramEncoder, heads: ResidualHeads, lm_head: torch.Tensor | None):
        """lm_head: the rows greedy drafting scores; None under tensor parallelism (vLLM's logits)."""
        res = trigram.mlp[0] if isinstance(trigram.mlp[0], ResBlock) else None
        self.w1 = None if res is None else CpuLinear(res.linear.weight, res.linear.bias)
        self.w2 = CpuLinear(trigram.mlp[-1].weight)
        self.heads = [CpuLinear(w, b) for w, b in zip(heads.weight, heads.bias)]
        self.lm_head = None if lm_head is None else CpuLinear(lm_head)

    def trigram(self, rows: torch.Tensor) -> torch.Tensor:
        """[T, 3H] concatenated embeddings -> [T, H] (TrigramEncoder's MLP)."""
        if self.w1 is not None:
            rows = rows + F.silu(self.w1(rows))
        return self.w2(rows)

    def residual_head(self, step: int, h_hat: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        """Head k of ResidualHeads: ĥ + SiLU(W_k [ĥ; h_a] + b_k)."""
        return h_hat + F.silu(self.heads[step](torch.cat([h_hat, anchor], dim=-1)))

    def greedy(self, features: torch.Tensor) -> torch.Tensor:
        """Arg-max over the LM head's rows (row indices, not yet mapped to a draft vocabulary)."""
        return self.lm_head(features).argmax(dim=-1)

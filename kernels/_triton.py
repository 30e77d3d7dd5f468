"""Triton availability and dispatch: Triton on CUDA tensors, the PyTorch reference elsewhere."""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a platform without Triton runs the PyTorch references only
    triton = None
    tl = None

HAVE_TRITON = triton is not None
# Triton 3.9's interpreter (CPU) computes tl.dot on bfloat16 tiles wrongly (values off by ~1e10),
# while on float32 tiles it is right. Kernels pass UPCAST=INTERPRET and widen their tiles to float32
# before tl.dot there; bf16 products are exact in float32, so results agree with the GPU path's.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """Triton on CUDA at inference. vLLM disables Triton on CPU, so CPU runs the reference;
    the kernels have no backward, so anything that needs a gradient runs the reference too."""
    if not HAVE_TRITON or not all(t.is_cuda for t in tensors):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))

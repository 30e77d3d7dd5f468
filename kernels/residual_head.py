"""residual_head: y = ĥ + SiLU(W_k [ĥ; h_a] + b_k) with the heads' weights stacked [K, H, 2H].

The step k is read from a device tensor, so one compiled kernel (and one captured CUDA
graph) serves every draft step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import INTERPRET, tl, triton, use_triton
from .trigram import Linear


def residual_head_with(h_hat: torch.Tensor, anchor: torch.Tensor, head: Linear) -> torch.Tensor:
    """y = ĥ + SiLU(head([ĥ; h_a])) with head k's linear layer through any GEMM (trigram.Linear):
    the one statement of the math, for the reference and the CPU GEMM path."""
    return h_hat + F.silu(head(torch.cat([h_hat, anchor], dim=-1)))


def residual_head_reference(h_hat, anchor, weight, bias, step: int | torch.Tensor) -> torch.Tensor:
    """h_hat/anchor [T, H], weight [K, H, 2H], bias [K, H], step (int or 0-d tensor) -> [T, H]."""
    w, b = weight[step], bias[step]
    return residual_head_with(h_hat, anchor, lambda x: F.linear(x, w, b))


if triton is not None:

    @triton.jit
    def _residual_head_kernel(
        hh_ptr,
        an_ptr,
        w_ptr,
        b_ptr,
        step_ptr,
        out_ptr,
        T,
        H,
        stride_hh,
        stride_an,
        stride_wk,
        stride_wn,
        stride_bk,
        stride_out,
        UPCAST: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok, col_ok = rows < T, cols < H
        k = tl.load(step_ptr).to(tl.int64)
        w_base = w_ptr + k * stride_wk
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < H
            a_mask, w_mask = row_ok[:, None] & k_ok[None, :], k_ok[:, None] & col_ok[None, :]
            hh = tl.load(hh_ptr + rows[:, None] * stride_hh + ks[None, :], mask=a_mask, other=0.0)
            w1 = tl.load(w_base + cols[None, :] * stride_wn + ks[:, None], mask=w_mask, other=0.0)
            an = tl.load(an_ptr + rows[:, None] * stride_an + ks[None, :], mask=a_mask, other=0.0)
            w2 = tl.load(w_base + cols[None, :] * stride_wn + (H + ks)[:, None], mask=w_mask, other=0.0)
            if UPCAST:
                hh, w1, an, w2 = hh.to(tl.float32), w1.to(tl.float32), an.to(tl.float32), w2.to(tl.float32)
            acc += tl.dot(hh, w1, out_dtype=tl.float32)
            acc += tl.dot(an, w2, out_dtype=tl.float32)
        acc += tl.load(b_ptr + k * stride_bk + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        mask = row_ok[:, None] & col_ok[None, :]
        res = tl.load(hh_ptr + rows[:, None] * stride_hh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        out = res + acc * tl.sigmoid(acc)
        tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def residual_head_triton(
    h_hat, anchor, weight, bias, step: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    h_hat, anchor, weight, bias = (t.contiguous() for t in (h_hat, anchor, weight, bias))
    T, H = h_hat.shape
    out = torch.empty_like(h_hat) if out is None else out
    BLOCK_T, BLOCK_N, BLOCK_K = 16, 64, 32
    grid = (triton.cdiv(T, BLOCK_T), triton.cdiv(H, BLOCK_N))
    _residual_head_kernel[grid](
        h_hat,
        anchor,
        weight,
        bias,
        step.reshape(1),
        out,
        T,
        H,
        h_hat.stride(0),
        anchor.stride(0),
        weight.stride(0),
        weight.stride(1),
        bias.stride(0),
        out.stride(0),
        UPCAST=INTERPRET,
        BLOCK_T=BLOCK_T,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
    )
    return out


def residual_head(h_hat, anchor, weight, bias, step: int | torch.Tensor) -> torch.Tensor:
    """[T, H] -> [T, H]; Triton on CUDA at inference, the PyTorch reference elsewhere."""
    if use_triton(h_hat, anchor, weight, bias):
        step = step if torch.is_tensor(step) else torch.tensor(step, device=h_hat.device)
        return residual_head_triton(h_hat, anchor, weight, bias, step)
    return residual_head_reference(h_hat, anchor, weight, bias, step)

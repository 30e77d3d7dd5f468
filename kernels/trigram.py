"""trigram_fused: the trigram encoder as a gather-GEMM.

For query token t with ids (x_{p-2}, x_{p-1}, x_p), x_t = [E[x_{p-2}]; E[x_{p-1}]; E[x_p]] in R^{3H}.
The kernel multiplies the three gathered embedding rows straight into the GEMM (no [T, 3H]
concatenation in memory) and fuses the official ResBlock's bias, SiLU and residual:

    resblock:  z = x + SiLU(W1 x + b1);  out = W2 z      (kernel: z;  torch: W2 z)
    linear:    out = W2 x                                (kernel: all of it)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ._triton import INTERPRET, tl, triton, use_triton

Linear = Callable[[torch.Tensor], torch.Tensor]
"""x -> x Wᵀ + b through whichever GEMM a caller has: F.linear, an nn.Linear, vLLM's CPU GEMMs."""


def trigram_mlp(x: torch.Tensor, linear1: Linear | None, linear2: Linear) -> torch.Tensor:
    """The trigram MLP over gathered rows x [T, 3H]: z = x + SiLU(W1 x + b1) (None: z = x), out = W2 z.

    The one statement of the math: the PyTorch reference, a tensor-parallel vLLM draft (rows gathered
    by vLLM's embedding) and the CPU GEMM path (prepacked weights) all call it with their own GEMMs.
    """
    if linear1 is not None:
        x = x + F.silu(linear1(x))
    return linear2(x)


def trigram_reference(
    ids: torch.Tensor, embed: torch.Tensor, w1: torch.Tensor | None, b1: torch.Tensor | None, w2: torch.Tensor
) -> torch.Tensor:
    """ids [T, 3], embed [V, H], w1 [3H, 3H] / b1 [3H] (None for the linear MLP), w2 [H, 3H] -> [T, H]."""
    x = F.embedding(ids, embed).flatten(-2).to(w2.dtype)
    linear1 = None if w1 is None else lambda rows: F.linear(rows, w1, b1)
    return trigram_mlp(x, linear1, lambda rows: F.linear(rows, w2))


if triton is not None:

    @triton.jit
    def _gather_linear_kernel(
        ids_ptr,
        emb_ptr,
        w_ptr,
        b_ptr,
        out_ptr,
        T,
        H,
        N,
        stride_emb,
        stride_w,
        stride_out,
        RESBLOCK: tl.constexpr,
        UPCAST: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """out[t, n] = sum_j sum_h E[ids[t, j], h] * W[n, j*H + h]  (+ ResBlock epilogue)."""
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok, col_ok = rows < T, cols < N
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for j in range(3):
            tok = tl.load(ids_ptr + rows * 3 + j, mask=row_ok, other=0).to(tl.int64)
            for k0 in range(0, H, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < H
                a = tl.load(
                    emb_ptr + tok[:, None] * stride_emb + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
                )
                w = tl.load(
                    w_ptr + cols[None, :] * stride_w + (j * H + ks)[:, None],
                    mask=k_ok[:, None] & col_ok[None, :],
                    other=0.0,
                )
                if UPCAST:
                    a, w = a.to(tl.float32), w.to(tl.float32)
                acc += tl.dot(a, w, out_dtype=tl.float32)
        if RESBLOCK:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            # residual: x[t, n] = E[ids[t, n // H], n % H], gathered again (never stored)
            tok = tl.load(
                ids_ptr + rows[:, None] * 3 + (cols // H)[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0
            )
            x = tl.load(
                emb_ptr + tok.to(tl.int64) * stride_emb + (cols % H)[None, :],
                mask=row_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            acc = x.to(tl.float32) + acc * tl.sigmoid(acc)
        mask = row_ok[:, None] & col_ok[None, :]
        tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def _gather_linear(ids, embed, w, b, resblock: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    T, H, N = ids.shape[0], embed.shape[1], w.shape[0]
    out = torch.empty(T, N, device=embed.device, dtype=embed.dtype) if out is None else out
    BLOCK_T, BLOCK_N, BLOCK_K = 16, 64, 32
    grid = (triton.cdiv(T, BLOCK_T), triton.cdiv(N, BLOCK_N))
    _gather_linear_kernel[grid](
        ids,
        embed,
        w,
        b if b is not None else w,
        out,
        T,
        H,
        N,
        embed.stride(0),
        w.stride(0),
        out.stride(0),
        RESBLOCK=resblock,
        UPCAST=INTERPRET,
        BLOCK_T=BLOCK_T,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
    )
    return out


def trigram_triton(ids, embed, w1, b1, w2, out: torch.Tensor | None = None) -> torch.Tensor:
    """out (optional, [T, H]) receives the result; the resblock's z [T, 3H] is an intermediate."""
    ids = ids.to(torch.int32).contiguous()
    embed = embed.contiguous()
    if w1 is None:
        return _gather_linear(ids, embed, w2.contiguous(), None, resblock=False, out=out)
    z = _gather_linear(ids, embed, w1.contiguous(), b1.contiguous(), resblock=True)
    return torch.matmul(z, w2.t(), out=out) if out is not None else F.linear(z, w2)


def trigram_fused(ids, embed, w1, b1, w2) -> torch.Tensor:
    """[T, 3] ids -> [T, H]; Triton on CUDA, the PyTorch reference elsewhere."""
    params = [w2] if w1 is None else [w1, b1, w2]
    if use_triton(embed, *params):
        return trigram_triton(ids, embed.to(w2.dtype), w1, b1, w2)
    return trigram_reference(ids, embed, w1, b1, w2)

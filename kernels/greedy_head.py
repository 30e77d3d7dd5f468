"""greedy_draft_head: arg-max of the LM head's logits without writing the [T, V] logits.

Each program multiplies a tile of rows by a tile of vocabulary rows and keeps only the tile's
maximum and its (lowest) index; a second, tiny reduction over the tiles picks the winner,
lowest index first on ties, as torch.argmax does. Sampling keeps the probability path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import INTERPRET, tl, triton, use_triton
from .trigram import Linear


def greedy_head_reference(hidden: torch.Tensor, lm_head: torch.Tensor) -> torch.Tensor:
    """hidden [T, H], lm_head [V, H] -> arg-max token ids [T] (logits accumulated in float32)."""
    return F.linear(hidden.float(), lm_head.float()).argmax(dim=-1)


if triton is not None:

    @triton.jit
    def _tile_argmax_kernel(
        h_ptr,
        w_ptr,
        max_ptr,
        idx_ptr,
        T,
        V,
        H,
        num_tiles,
        stride_h,
        stride_w,
        UPCAST: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        tile = tl.program_id(1)
        vocab = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        row_ok, v_ok = rows < T, vocab < V
        acc = tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < H
            h = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(
                w_ptr + vocab[None, :].to(tl.int64) * stride_w + ks[:, None],
                mask=k_ok[:, None] & v_ok[None, :],
                other=0.0,
            )
            if UPCAST:
                h, w = h.to(tl.float32), w.to(tl.float32)
            acc += tl.dot(h, w, out_dtype=tl.float32)
        acc = tl.where(v_ok[None, :], acc, float("-inf"))
        best, where = tl.max(acc, axis=1, return_indices=True, return_indices_tie_break_left=True)
        tl.store(max_ptr + rows * num_tiles + tile, best, mask=row_ok)
        tl.store(idx_ptr + rows * num_tiles + tile, tile * BLOCK_V + where, mask=row_ok)


def greedy_head_triton(hidden: torch.Tensor, lm_head: torch.Tensor) -> torch.Tensor:
    hidden, lm_head = hidden.contiguous(), lm_head.contiguous()
    T, H = hidden.shape
    V = lm_head.shape[0]
    BLOCK_T, BLOCK_V, BLOCK_K = 16, 128, 32
    num_tiles = triton.cdiv(V, BLOCK_V)
    maxes = torch.empty(T, num_tiles, device=hidden.device, dtype=torch.float32)
    idx = torch.empty(T, num_tiles, device=hidden.device, dtype=torch.int64)
    grid = (triton.cdiv(T, BLOCK_T), num_tiles)
    _tile_argmax_kernel[grid](
        hidden,
        lm_head,
        maxes,
        idx,
        T,
        V,
        H,
        num_tiles,
        hidden.stride(0),
        lm_head.stride(0),
        UPCAST=INTERPRET,
        BLOCK_T=BLOCK_T,
        BLOCK_V=BLOCK_V,
        BLOCK_K=BLOCK_K,
    )
    best_tile = maxes.argmax(dim=1, keepdim=True)  # first maximal tile: the lowest indices win ties
    return idx.gather(1, best_tile)[:, 0]


def greedy_draft_head(hidden: torch.Tensor, lm_head: torch.Tensor, gemm: Linear | None = None) -> torch.Tensor:
    """[T, H] features, [V, H] vocabulary matrix -> arg-max ids [T]; Triton on CUDA at inference;
    with gemm (lm_head prepacked for vLLM's CPU GEMMs, trigram.Linear), that GEMM and an arg-max.

    Elsewhere a plain matmul + arg-max in the inputs' dtype: on a CPU the reference's float32 copy
    of a bf16 LM head costs many times the matmul it feeds. In bf16 the two can differ where logits
    round to a tie; any draft token keeps decoding lossless.
    """
    if gemm is not None:
        return gemm(hidden).argmax(dim=-1)
    if use_triton(hidden, lm_head):
        return greedy_head_triton(hidden, lm_head)
    if hidden.dtype == torch.float32:
        return greedy_head_reference(hidden, lm_head)
    return F.linear(hidden, lm_head.to(hidden.dtype)).argmax(dim=-1)

"""The backward of the gated sum (SPEC 7), o = sum_b g_b * o_b, in one pass over do.

dg_b = <do, o_b> and each branch's output gradient do_b = g_b * do come from one read of do and the three
branch outputs, instead of a float32 copy of do and separate elementwise passes. (The forward's gated sum
is the window kernel's epilogue, window.py.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import padded_dim


@triton.jit
def _split_branch(do, GATES, O_B, DO_B, DGATES, r, offs, mask, row_mask, b: tl.constexpr):
    g = tl.load(GATES + r * 3 + b, mask=row_mask, other=0.0).to(tl.float32)
    o_b = tl.load(O_B + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DGATES + r * 3 + b, tl.sum(do * o_b, 1).to(DGATES.dtype.element_ty), mask=row_mask)
    tl.store(DO_B + offs, (do * g[:, None]).to(DO_B.dtype.element_ty), mask=mask)


@triton.jit
def _gates_bwd_kernel(DO, GATES, O_CMP, O_SLC, O_WIN, DGATES, DO_CMP, DO_SLC, DO_WIN, rows,
                      DV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr):
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    d = tl.arange(0, BLOCK_DV)
    row_mask = r < rows
    mask = row_mask[:, None] & (d < DV)[None, :]
    offs = r[:, None] * DV + d[None, :]
    do = tl.load(DO + offs, mask=mask, other=0.0).to(tl.float32)
    _split_branch(do, GATES, O_CMP, DO_CMP, DGATES, r, offs, mask, row_mask, 0)
    _split_branch(do, GATES, O_SLC, DO_SLC, DGATES, r, offs, mask, row_mask, 1)
    _split_branch(do, GATES, O_WIN, DO_WIN, DGATES, r, offs, mask, row_mask, 2)


def gates_bwd(do, gates, o_cmp, o_slc, o_win):
    """Gradients through SPEC 7.

    Args:
        do: [N_tok, HQ, DV] gradient of o; gates: [N_tok, HQ, 3]; o_cmp, o_slc, o_win: [N_tok, HQ, DV].
    Returns:
        dgates [N_tok, HQ, 3] (gates' dtype) and do_cmp, do_slc, do_win [N_tok, HQ, DV] (do's dtype).
    """
    do, gates = do.contiguous(), gates.contiguous()
    N, HQ, DV = do.shape
    rows = N * HQ
    dgates = torch.empty_like(gates)
    do_b = [torch.empty_like(do) for _ in range(3)]
    BLOCK_R = 32
    _gates_bwd_kernel[(triton.cdiv(rows, BLOCK_R),)](
        do, gates, o_cmp.contiguous(), o_slc.contiguous(), o_win.contiguous(), dgates, *do_b, rows,
        DV, BLOCK_R, padded_dim(DV),
    )
    return (dgates, *do_b)

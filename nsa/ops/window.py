"""Sliding-window branch (SPEC 6): FlashAttention restricted to the band t - w < s <= t.

A query tile of BLOCK_M positions visits only the key tiles that meet its band, about (BLOCK_M + w) / BLOCK_N
of them, whatever T is. The backward is FlashAttention-2's split: one kernel owns a key tile of one KV head and
sums over the G query heads of the group and the query tiles of the band (dk, dv without atomics, hence
deterministic); another owns a query tile of one query head (dq).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    LOG2E,
    Packed,
    attention_delta,
    autotune_configs,
    dot_precision,
    padded_dim,
    query_tiles,
    softmax_finish,
    softmax_grad_step,
    softmax_step,
)

# Query tile of the forward and of dq: fixed because the host lays out the tiles. A small tile wastes
# less of the band: each query visits the keys of (BLOCK_Q + w) / BLOCK_N tiles.
BLOCK_Q = 64


def _key_tile(DK: int) -> int:
    """Key tile of dk/dv: its float32 dk and dv accumulators live in registers, so wide heads take fewer keys."""
    return 64 if padded_dim(DK) <= 128 else 32


@triton.autotune(
    configs=autotune_configs([
        triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=3),
    ]),
    key=["DK", "DV"],
)
@triton.jit
def _win_fwd_kernel(
    Q, K, V, O, LSE, CU, TILES, qk_scale, window, GATES, O_CMP, O_SLC, OUT,
    HQ: tl.constexpr, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, GATED: tl.constexpr,
):
    # Heads vary fastest so that the G heads of a group read the same K/V tiles while they sit in L2.
    pid = tl.program_id(0)
    hq = pid % HQ
    tile = pid // HQ
    hkv = hq // G
    seq = tl.load(TILES + 2 * tile)
    m0 = tl.load(TILES + 2 * tile + 1)
    bos = tl.load(CU + seq).to(tl.int64)
    L = tl.load(CU + seq + 1) - bos

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_q = (bos + offs_m) * HQ + hq
    q = tl.load(Q + row_q[:, None] * DK + offs_dk[None, :], mask=(offs_m < L)[:, None] & (offs_dk < DK)[None, :], other=0.0)

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    lo = tl.maximum(m0 - window + 1, 0) // BLOCK_N * BLOCK_N
    hi = tl.minimum(m0 + BLOCK_M, L)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        row_kv = (bos + offs_n) * (HQ // G) + hkv
        in_seq = offs_n < L
        k = tl.load(K + row_kv[:, None] * DK + offs_dk[None, :], mask=in_seq[:, None] & (offs_dk < DK)[None, :], other=0.0)
        v = tl.load(V + row_kv[:, None] * DV + offs_dv[None, :], mask=in_seq[:, None] & (offs_dv < DV)[None, :], other=0.0)
        visible = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] > offs_m[:, None] - window) & in_seq[None, :]
        acc, m_i, l_i = softmax_step(acc, m_i, l_i, q, k, v, visible, qk_scale, PRECISION)
    o, lse = softmax_finish(acc, m_i, l_i)
    out_offs = row_q[:, None] * DV + offs_dv[None, :]
    out_mask = (offs_m < L)[:, None] & (offs_dv < DV)[None, :]
    tl.store(O + out_offs, o.to(O.dtype.element_ty), mask=out_mask)
    tl.store(LSE + row_q, lse, mask=offs_m < L)
    if GATED:
        # SPEC 7 in this kernel's epilogue: the window branch is computed last, so the gated sum of the three
        # branches costs one extra read of o_cmp and o_slc instead of separate elementwise passes.
        g_cmp = tl.load(GATES + row_q * 3, mask=offs_m < L, other=0.0).to(tl.float32)
        g_slc = tl.load(GATES + row_q * 3 + 1, mask=offs_m < L, other=0.0).to(tl.float32)
        g_win = tl.load(GATES + row_q * 3 + 2, mask=offs_m < L, other=0.0).to(tl.float32)
        o_cmp = tl.load(O_CMP + out_offs, mask=out_mask, other=0.0).to(tl.float32)
        o_slc = tl.load(O_SLC + out_offs, mask=out_mask, other=0.0).to(tl.float32)
        # o_win enters as stored, in the inputs' dtype, as o_cmp and o_slc do.
        o_win = o.to(O.dtype.element_ty).to(tl.float32)
        out = g_cmp[:, None] * o_cmp + g_slc[:, None] * o_slc + g_win[:, None] * o_win
        tl.store(OUT + out_offs, out.to(OUT.dtype.element_ty), mask=out_mask)


@triton.autotune(
    configs=autotune_configs([
        triton.Config({"BLOCK_M": 32}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 64}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 32}, num_warps=4, num_stages=1),
    ]),
    key=["DK", "DV"],
)
@triton.jit
def _win_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK_OUT, DV_OUT, CU, TILES, qk_scale, scale, window,
    HKV: tl.constexpr, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    hkv = pid % HKV
    tile = pid // HKV
    seq = tl.load(TILES + 2 * tile)
    n0 = tl.load(TILES + 2 * tile + 1)
    bos = tl.load(CU + seq).to(tl.int64)
    L = tl.load(CU + seq + 1) - bos

    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    in_seq = offs_n < L
    row_kv = (bos + offs_n) * HKV + hkv
    mask_k = in_seq[:, None] & (offs_dk < DK)[None, :]
    mask_v = in_seq[:, None] & (offs_dv < DV)[None, :]
    k = tl.load(K + row_kv[:, None] * DK + offs_dk[None, :], mask=mask_k, other=0.0)
    v = tl.load(V + row_kv[:, None] * DV + offs_dv[None, :], mask=mask_v, other=0.0)

    dk = tl.zeros([BLOCK_N, BLOCK_DK], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    # The queries that see this key tile: n0 <= t < n0 + BLOCK_N - 1 + w.
    hi = tl.minimum(n0 + BLOCK_N - 1 + window, L)
    for g in range(G):
        hq = hkv * G + g
        for m0 in range(n0, hi, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            in_q = offs_m < L
            row_q = (bos + offs_m) * (HKV * G) + hq
            q = tl.load(Q + row_q[:, None] * DK + offs_dk[None, :], mask=in_q[:, None] & (offs_dk < DK)[None, :], other=0.0)
            do = tl.load(DO + row_q[:, None] * DV + offs_dv[None, :], mask=in_q[:, None] & (offs_dv < DV)[None, :], other=0.0)
            lse2 = tl.load(LSE + row_q, mask=in_q, other=float("inf")) * 1.4426950408889634
            delta = tl.load(DELTA + row_q, mask=in_q, other=0.0)
            visible = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] > offs_m[:, None] - window) & in_q[:, None]
            p, dz = softmax_grad_step(q, do, lse2, delta, k, v, visible, qk_scale, PRECISION)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dk += tl.dot(tl.trans(dz.to(q.dtype)), q, input_precision=PRECISION)
    tl.store(DK_OUT + row_kv[:, None] * DK + offs_dk[None, :], (dk * scale).to(DK_OUT.dtype.element_ty), mask=mask_k)
    tl.store(DV_OUT + row_kv[:, None] * DV + offs_dv[None, :], dv.to(DV_OUT.dtype.element_ty), mask=mask_v)


@triton.autotune(
    configs=autotune_configs([
        triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=2),
    ]),
    key=["DK", "DV"],
)
@triton.jit
def _win_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU, TILES, qk_scale, scale, window,
    HQ: tl.constexpr, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    hq = pid % HQ
    tile = pid // HQ
    hkv = hq // G
    seq = tl.load(TILES + 2 * tile)
    m0 = tl.load(TILES + 2 * tile + 1)
    bos = tl.load(CU + seq).to(tl.int64)
    L = tl.load(CU + seq + 1) - bos

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    in_q = offs_m < L
    row_q = (bos + offs_m) * HQ + hq
    mask_q = in_q[:, None] & (offs_dk < DK)[None, :]
    q = tl.load(Q + row_q[:, None] * DK + offs_dk[None, :], mask=mask_q, other=0.0)
    do = tl.load(DO + row_q[:, None] * DV + offs_dv[None, :], mask=in_q[:, None] & (offs_dv < DV)[None, :], other=0.0)
    lse2 = tl.load(LSE + row_q, mask=in_q, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + row_q, mask=in_q, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_DK], dtype=tl.float32)
    lo = tl.maximum(m0 - window + 1, 0) // BLOCK_N * BLOCK_N
    hi = tl.minimum(m0 + BLOCK_M, L)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        row_kv = (bos + offs_n) * (HQ // G) + hkv
        in_seq = offs_n < L
        k = tl.load(K + row_kv[:, None] * DK + offs_dk[None, :], mask=in_seq[:, None] & (offs_dk < DK)[None, :], other=0.0)
        v = tl.load(V + row_kv[:, None] * DV + offs_dv[None, :], mask=in_seq[:, None] & (offs_dv < DV)[None, :], other=0.0)
        visible = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] > offs_m[:, None] - window) & in_seq[None, :]
        p, dz = softmax_grad_step(q, do, lse2, delta, k, v, visible, qk_scale, PRECISION)
        dq += tl.dot(dz.to(k.dtype), k, input_precision=PRECISION)
    tl.store(DQ + row_q[:, None] * DK + offs_dk[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=mask_q)


def _check_window(window) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")


def win_fwd(q, k, v, packed: Packed, window: int, scale: float, gated=None):
    """Sliding-window attention (SPEC 6) on packed sequences, optionally closing NSA's forward (SPEC 7).

    Args:
        q: [N_tok, HQ, DK]; k: [N_tok, HKV, DK]; v: [N_tok, HKV, DV] (the window branch's keys and values).
        packed: where the sequences lie (common.packed_layout).
        window: w; query t attends the keys s of its own sequence with t - w < s <= t.
        gated: None, or (gates [N_tok, HQ, 3], o_cmp [N_tok, HQ, DV], o_slc [N_tok, HQ, DV]): then the kernel's
            epilogue also writes o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win.
    Returns:
        o [N_tok, HQ, DV] in q's dtype and lse [N_tok, HQ] float32 (base e, of the scaled scores); with
        `gated`, (o_win, lse, o).
    """
    _check_window(window)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    N, HQ, DK = q.shape
    HKV, DV = k.shape[1], v.shape[2]
    o = torch.empty(N, HQ, DV, dtype=q.dtype, device=q.device)
    lse = torch.empty(N, HQ, dtype=torch.float32, device=q.device)
    if gated is None:
        gates = o_cmp = o_slc = out = o  # not read: GATED is off
    else:
        gates, o_cmp, o_slc = (x.contiguous() for x in gated)
        out = torch.empty_like(o)
    tiles = query_tiles(packed, BLOCK_Q)
    _win_fwd_kernel[(tiles.shape[0] * HQ,)](
        q, k, v, o, lse, packed.cu_seqlens, tiles, scale * LOG2E, window, gates, o_cmp, o_slc, out,
        HQ, HQ // HKV, DK, DV, padded_dim(DK), padded_dim(DV), BLOCK_Q, PRECISION=dot_precision(q.dtype),
        GATED=gated is not None,
    )
    return (o, lse) if gated is None else (o, lse, out)


def win_bwd(do, q, k, v, o, lse, packed: Packed, window: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of win_fwd: (dq, dk, dv) shaped and typed like (q, k, v); deterministic (no atomics).

    Args:
        do: [N_tok, HQ, DV] gradient of o; o, lse: win_fwd's outputs; the rest as in win_fwd.
    """
    _check_window(window)
    do, q, k, v, lse = do.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), lse.contiguous()
    N, HQ, DK = q.shape
    HKV, DV = k.shape[1], v.shape[2]
    delta = attention_delta(o, do)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    common = dict(DK=DK, DV=DV, BLOCK_DK=padded_dim(DK), BLOCK_DV=padded_dim(DV), PRECISION=dot_precision(q.dtype))
    tiles = query_tiles(packed, _key_tile(DK))
    _win_bwd_dkdv_kernel[(tiles.shape[0] * HKV,)](
        q, k, v, do, lse, delta, dk, dv, packed.cu_seqlens, tiles, scale * LOG2E, scale, window,
        HKV=HKV, G=HQ // HKV, BLOCK_N=_key_tile(DK), **common,
    )
    tiles = query_tiles(packed, BLOCK_Q)
    _win_bwd_dq_kernel[(tiles.shape[0] * HQ,)](
        q, k, v, do, lse, delta, dq, packed.cu_seqlens, tiles, scale * LOG2E, scale, window,
        HQ=HQ, G=HQ // HKV, BLOCK_M=BLOCK_Q, **common,
    )
    return dq, dk, dv

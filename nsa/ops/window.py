"""Sliding-window branch (SPEC 6): FlashAttention restricted to the band t - w < s <= t.

A query tile of BLOCK_M positions visits only the key tiles that meet its band, about (BLOCK_M + w) / BLOCK_N
of them, whatever T is. The backward is FlashAttention-2's split: one kernel owns a key tile of one KV head and
sums over the G query heads of the group and the query tiles of the band (dk, dv without atomics, hence
deterministic); another owns a query tile of one query head (dq). Head dimensions that are not powers of two
run in two power-of-two parts (common.split_dim: 192 = 128 + 64) instead of padded.

Where the window reads the selected branch's keys (k_win is k, the default), the forward also completes that
branch: the num_local blocks every query selects (SPEC 4) end where its band ends, so the kernel visits those key
tiles first, merges its softmax state after them with slc_fwd's output over the other blocks (skip_local) and
writes the whole selected branch back before it gates; the selected branch loads num_local blocks fewer per query,
and the window forward computes no score it would not have computed anyway.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..config import SparsityConfig
from .common import (
    LOG2E,
    Packed,
    attention_delta,
    autotune_configs,
    dot_acc_split,
    dot_precision,
    load_grad_rows,
    load_split,
    padded_dim,
    query_tiles,
    softmax_finish,
    softmax_grad_step,
    softmax_step_split,
    split_blocks,
    store_split,
    zeros_split,
)

# Query tile of the forward and of dq: fixed because the host lays out the tiles. A small tile wastes
# less of the band: each query visits the keys of (BLOCK_Q + w) / BLOCK_N tiles.
BLOCK_Q = 64
# The forward's widest key tile (its autotune configs).
MAX_KEY_TILE = 64


def _key_tile(DK: int) -> int:
    """Key tile of dk/dv: its float32 dk and dv accumulators live in registers, so wide heads take fewer keys."""
    return 64 if padded_dim(DK) <= 128 else 32


@triton.jit
def _gated_sum(g_cmp, g_slc, g_win, o_cmp, o_slc, o_win):
    """g_cmp * o_cmp + g_slc * o_slc + g_win * o_win in float32, for gates [M] and one column part [M, *]."""
    return (g_cmp[:, None] * o_cmp.to(tl.float32) + g_slc[:, None] * o_slc.to(tl.float32)
            + g_win[:, None] * o_win.to(tl.float32))


@triton.jit
def _program_tile(CU, TILES, H: tl.constexpr):
    """The head (of H, varying fastest across programs) and the tile of this program: (head, first position of
    the tile, the sequence's first token bos, its length L)."""
    pid = tl.program_id(0)
    tile = pid // H
    seq = tl.load(TILES + 2 * tile)
    bos = tl.load(CU + seq).to(tl.int64)
    return pid % H, tl.load(TILES + 2 * tile + 1), bos, tl.load(CU + seq + 1) - bos


@triton.jit
def _query_tile(CU, TILES, window, HQ: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The query head and tile of a forward or dq program, heads varying fastest so that the G heads of a group
    read the same K/V tiles while they sit in L2. Returns (hkv, bos, L, offs_m, in_q, row_q, lo, first, end, hi):
    row_q in the [N_tok * HQ, D] views, and the key tiles lo .. hi (BLOCK_N-aligned from lo) that meet the tile's
    band, of which those first .. end lie inside the band of every query of the tile and inside the sequence
    (they need no mask): the band's lower edge lo .. first, its inside, its diagonal edge end .. hi."""
    hq, m0, bos, L = _program_tile(CU, TILES, HQ)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    lo = tl.maximum(m0 - window + 1, 0) // BLOCK_N * BLOCK_N
    hi = tl.minimum(m0 + BLOCK_M, L)
    first = tl.minimum(tl.maximum(lo, tl.cdiv(m0 + BLOCK_M - window, BLOCK_N) * BLOCK_N), hi)
    end = tl.maximum(first, lo + (tl.minimum(m0 + 1, L) - lo) // BLOCK_N * BLOCK_N)
    return hq // G, bos, L, offs_m, offs_m < L, (bos + offs_m) * HQ + hq, lo, first, end, hi


@triton.jit
def _band_tile(K, V, n0, bos, L, offs_m, hkv, HKV, window, DK: tl.constexpr, DV: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DK2: tl.constexpr, BLOCK_DV: tl.constexpr,
               BLOCK_DV2: tl.constexpr, MASKED: tl.constexpr):
    """Keys n0 .. n0 + BLOCK_N of KV head hkv for the query rows offs_m: k and v in their column parts and the
    band t - w < s <= t within the sequence (all true without MASKED, for tiles inside every row's band: the
    compiler drops the mask then)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    in_seq = offs_n < L
    row_kv = (bos + offs_n) * HKV + hkv
    ka, kb = load_split(K, row_kv, 0, 1, in_seq, DK, BLOCK_DK, BLOCK_DK2)
    va, vb = load_split(V, row_kv, 0, 1, in_seq, DV, BLOCK_DV, BLOCK_DV2)
    if MASKED:
        visible = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] > offs_m[:, None] - window) & in_seq[None, :]
    else:
        visible = tl.full([offs_m.shape[0], BLOCK_N], True, tl.int1)
    return ka, kb, va, vb, visible


@triton.jit
def _fwd_tiles(acc_a, acc_b, m_i, l_i, qa, qb, start, stop, K, V, bos, L, offs_m, hkv, HKV, window, qk_scale,
               DK: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
               BLOCK_DK2: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DV2: tl.constexpr, PRECISION: tl.constexpr,
               MASKED: tl.constexpr):
    """The forward's online softmax over the key tiles start .. stop of the band, masked or not (_query_tile)."""
    for n0 in range(start, stop, BLOCK_N):
        ka, kb, va, vb, visible = _band_tile(K, V, n0, bos, L, offs_m, hkv, HKV, window, DK, DV, BLOCK_N, BLOCK_DK,
                                             BLOCK_DK2, BLOCK_DV, BLOCK_DV2, MASKED)
        acc_a, acc_b, m_i, l_i = softmax_step_split(acc_a, acc_b, m_i, l_i, qa, qb, ka, kb, va, vb, visible, qk_scale,
                                                    BLOCK_DK2, BLOCK_DV2, PRECISION)
    return acc_a, acc_b, m_i, l_i


@triton.jit
def _dq_tiles(dqa, dqb, qa, qb, doa, dob, lse2, delta, start, stop, K, V, bos, L, offs_m, hkv, HKV, window,
              qk_scale, DK: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
              BLOCK_DK2: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DV2: tl.constexpr, PRECISION: tl.constexpr,
              MASKED: tl.constexpr):
    """dq's sum (unscaled) over the key tiles start .. stop of the band, masked or not (_query_tile)."""
    for n0 in range(start, stop, BLOCK_N):
        ka, kb, va, vb, visible = _band_tile(K, V, n0, bos, L, offs_m, hkv, HKV, window, DK, DV, BLOCK_N, BLOCK_DK,
                                             BLOCK_DK2, BLOCK_DV, BLOCK_DV2, MASKED)
        p, dz = softmax_grad_step(qa, qb, doa, dob, lse2, delta, ka, kb, va, vb, visible, qk_scale,
                                  BLOCK_DK2, BLOCK_DV2, PRECISION)
        dqa, dqb = dot_acc_split(dqa, dqb, dz.to(ka.dtype), ka, kb, BLOCK_DK2, PRECISION)
    return dqa, dqb


@triton.jit
def _add_local_blocks(O_SLC, LSE_SLC, row_q, in_q, acc_a, acc_b, m_i, l_i, DV: tl.constexpr, BLOCK_DV: tl.constexpr,
                      BLOCK_DV2: tl.constexpr):
    """The selected branch over all its blocks, written over O_SLC and LSE_SLC, which hold it over the blocks
    other than the local ones (slc_fwd's skip_local; lse +inf where there are none): merged with this kernel's
    online softmax state over the local blocks (acc, m_i, l_i, base 2), as two partial softmaxes."""
    rest_a, rest_b = load_split(O_SLC, row_q, 0, 1, in_q, DV, BLOCK_DV, BLOCK_DV2)
    lse_rest = tl.load(LSE_SLC + row_q, mask=in_q, other=float("inf"))
    # The rest as a state of its own: acc = o, l = 1 at m = lse in base 2 (weight 0 where it is empty).
    m_rest = tl.where(lse_rest == float("inf"), float("-inf"), lse_rest * 1.4426950408889634)
    m = tl.maximum(m_i, m_rest)
    alpha, beta = tl.exp2(m_i - m), tl.exp2(m_rest - m)
    l = l_i * alpha + beta
    oa, lse = softmax_finish(acc_a * alpha[:, None] + rest_a.to(tl.float32) * beta[:, None], m, l)
    if BLOCK_DV2 > 0:
        ob, _ = softmax_finish(acc_b * alpha[:, None] + rest_b.to(tl.float32) * beta[:, None], m, l)
    else:
        ob = oa
    store_split(O_SLC, oa, ob, row_q, 0, 1, in_q, DV, BLOCK_DV, BLOCK_DV2)
    tl.store(LSE_SLC + row_q, lse, mask=in_q)
    # The epilogue reads these rows back, in other threads' layouts.
    tl.debug_barrier()


@triton.autotune(
    configs=autotune_configs([
        triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=3),
    ]),
    key=["DK", "DV"],
    # With SLC_LOCAL the kernel merges into o_slc and lse_slc in place: each config timed must start from them.
    restore_value=["O_SLC", "LSE_SLC"],
)
@triton.jit
def _win_fwd_kernel(
    Q, K, V, O, LSE, CU, TILES, qk_scale, window, GATES, O_CMP, O_SLC, LSE_SLC, OUT,
    HQ: tl.constexpr, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DK2: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DV2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, GATED: tl.constexpr,
    SLC_LOCAL: tl.constexpr, LS: tl.constexpr,
):
    hkv, bos, L, offs_m, in_q, row_q, lo, first, end, hi = _query_tile(CU, TILES, window, HQ, G, BLOCK_M, BLOCK_N)
    # Rows are addressed in the [N_tok * H, D] views of the tensors (head 0 of 1).
    qa, qb = load_split(Q, row_q, 0, 1, in_q, DK, BLOCK_DK, BLOCK_DK2)

    acc_a, acc_b = zeros_split(BLOCK_M, BLOCK_DV, BLOCK_DV2)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if SLC_LOCAL > 0:
        # The key tiles local .. hi are the SLC_LOCAL selection blocks ending at the tile's queries (the tile lies
        # in one block; `end` is its first query), all inside the band: visited first, so that the online
        # softmax's state after them is the selected branch's over those blocks. Then the rest of the band.
        local = tl.maximum((end // LS - SLC_LOCAL + 1) * LS, first)
        acc_a, acc_b, m_i, l_i = _fwd_tiles(acc_a, acc_b, m_i, l_i, qa, qb, end, hi, K, V, bos, L, offs_m, hkv,
                                            HQ // G, window, qk_scale, DK, DV, BLOCK_N, BLOCK_DK, BLOCK_DK2, BLOCK_DV,
                                            BLOCK_DV2, PRECISION, True)
        acc_a, acc_b, m_i, l_i = _fwd_tiles(acc_a, acc_b, m_i, l_i, qa, qb, local, end, K, V, bos, L, offs_m, hkv,
                                            HQ // G, window, qk_scale, DK, DV, BLOCK_N, BLOCK_DK, BLOCK_DK2, BLOCK_DV,
                                            BLOCK_DV2, PRECISION, False)
        _add_local_blocks(O_SLC, LSE_SLC, row_q, in_q, acc_a, acc_b, m_i, l_i, DV, BLOCK_DV, BLOCK_DV2)
        acc_a, acc_b, m_i, l_i = _fwd_tiles(acc_a, acc_b, m_i, l_i, qa, qb, first, local, K, V, bos, L, offs_m, hkv,
                                            HQ // G, window, qk_scale, DK, DV, BLOCK_N, BLOCK_DK, BLOCK_DK2, BLOCK_DV,
                                            BLOCK_DV2, PRECISION, False)
        acc_a, acc_b, m_i, l_i = _fwd_tiles(acc_a, acc_b, m_i, l_i, qa, qb, lo, first, K, V, bos, L, offs_m, hkv,
                                            HQ // G, window, qk_scale, DK, DV, BLOCK_N, BLOCK_DK, BLOCK_DK2, BLOCK_DV,
                                            BLOCK_DV2, PRECISION, True)
    else:
        # The band's lower edge, its inside (no mask), its diagonal edge. (In the order above, ptxas spills here:
        # 12 bytes per thread at the paper's shapes, none in this one.)
        acc_a, acc_b, m_i, l_i = _fwd_tiles(acc_a, acc_b, m_i, l_i, qa, qb, lo, first, K, V, bos, L, offs_m, hkv,
                                            HQ // G, window, qk_scale, DK, DV, BLOCK_N, BLOCK_DK, BLOCK_DK2, BLOCK_DV,
                                            BLOCK_DV2, PRECISION, True)
        acc_a, acc_b, m_i, l_i = _fwd_tiles(acc_a, acc_b, m_i, l_i, qa, qb, first, end, K, V, bos, L, offs_m, hkv,
                                            HQ // G, window, qk_scale, DK, DV, BLOCK_N, BLOCK_DK, BLOCK_DK2, BLOCK_DV,
                                            BLOCK_DV2, PRECISION, False)
        acc_a, acc_b, m_i, l_i = _fwd_tiles(acc_a, acc_b, m_i, l_i, qa, qb, end, hi, K, V, bos, L, offs_m, hkv,
                                            HQ // G, window, qk_scale, DK, DV, BLOCK_N, BLOCK_DK, BLOCK_DK2, BLOCK_DV,
                                            BLOCK_DV2, PRECISION, True)
    oa, lse = softmax_finish(acc_a, m_i, l_i)
    ob, _ = softmax_finish(acc_b, m_i, l_i)
    # o_win enters the gated sum as stored, in the inputs' dtype, as o_cmp and o_slc do.
    oa, ob = oa.to(O.dtype.element_ty), ob.to(O.dtype.element_ty)
    store_split(O, oa, ob, row_q, 0, 1, in_q, DV, BLOCK_DV, BLOCK_DV2)
    tl.store(LSE + row_q, lse, mask=in_q)
    if GATED:
        # SPEC 7 in this kernel's epilogue: the window branch is computed last, so the gated sum of the three
        # branches costs one extra read of o_cmp and o_slc instead of separate elementwise passes.
        g_cmp = tl.load(GATES + row_q * 3, mask=in_q, other=0.0).to(tl.float32)
        g_slc = tl.load(GATES + row_q * 3 + 1, mask=in_q, other=0.0).to(tl.float32)
        g_win = tl.load(GATES + row_q * 3 + 2, mask=in_q, other=0.0).to(tl.float32)
        cmp_a, cmp_b = load_split(O_CMP, row_q, 0, 1, in_q, DV, BLOCK_DV, BLOCK_DV2)
        slc_a, slc_b = load_split(O_SLC, row_q, 0, 1, in_q, DV, BLOCK_DV, BLOCK_DV2)
        out_a = _gated_sum(g_cmp, g_slc, g_win, cmp_a, slc_a, oa)
        if BLOCK_DV2 > 0:
            out_b = _gated_sum(g_cmp, g_slc, g_win, cmp_b, slc_b, ob)
        else:
            out_b = out_a
        store_split(OUT, out_a, out_b, row_q, 0, 1, in_q, DV, BLOCK_DV, BLOCK_DV2)


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
    BLOCK_DK: tl.constexpr, BLOCK_DK2: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DV2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    hkv, n0, bos, L = _program_tile(CU, TILES, HKV)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    in_seq = offs_n < L
    # Rows are addressed in the [N_tok * H, D] views of the tensors (head 0 of 1).
    row_kv = (bos + offs_n) * HKV + hkv
    ka, kb = load_split(K, row_kv, 0, 1, in_seq, DK, BLOCK_DK, BLOCK_DK2)
    va, vb = load_split(V, row_kv, 0, 1, in_seq, DV, BLOCK_DV, BLOCK_DV2)

    dka, dkb = zeros_split(BLOCK_N, BLOCK_DK, BLOCK_DK2)
    dva, dvb = zeros_split(BLOCK_N, BLOCK_DV, BLOCK_DV2)
    # The queries that see this key tile: n0 <= t < n0 + BLOCK_N - 1 + w.
    hi = tl.minimum(n0 + BLOCK_N - 1 + window, L)
    for g in range(G):
        hq = hkv * G + g
        for m0 in range(n0, hi, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            in_q = offs_m < L
            row_q = (bos + offs_m) * (HKV * G) + hq
            qa, qb, doa, dob, lse2, delta = load_grad_rows(Q, DO, LSE, DELTA, row_q, in_q, DK, DV, BLOCK_DK,
                                                           BLOCK_DK2, BLOCK_DV, BLOCK_DV2)
            visible = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] > offs_m[:, None] - window) & in_q[:, None]
            p, dz = softmax_grad_step(qa, qb, doa, dob, lse2, delta, ka, kb, va, vb, visible, qk_scale,
                                      BLOCK_DK2, BLOCK_DV2, PRECISION)
            dva, dvb = dot_acc_split(dva, dvb, tl.trans(p.to(doa.dtype)), doa, dob, BLOCK_DV2, PRECISION)
            dka, dkb = dot_acc_split(dka, dkb, tl.trans(dz.to(qa.dtype)), qa, qb, BLOCK_DK2, PRECISION)
    store_split(DK_OUT, dka * scale, dkb * scale, row_kv, 0, 1, in_seq, DK, BLOCK_DK, BLOCK_DK2)
    store_split(DV_OUT, dva, dvb, row_kv, 0, 1, in_seq, DV, BLOCK_DV, BLOCK_DV2)


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
    BLOCK_DK: tl.constexpr, BLOCK_DK2: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DV2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    hkv, bos, L, offs_m, in_q, row_q, lo, first, end, hi = _query_tile(CU, TILES, window, HQ, G, BLOCK_M, BLOCK_N)
    qa, qb, doa, dob, lse2, delta = load_grad_rows(Q, DO, LSE, DELTA, row_q, in_q, DK, DV, BLOCK_DK, BLOCK_DK2,
                                                   BLOCK_DV, BLOCK_DV2)

    dqa, dqb = zeros_split(BLOCK_M, BLOCK_DK, BLOCK_DK2)
    dqa, dqb = _dq_tiles(dqa, dqb, qa, qb, doa, dob, lse2, delta, lo, first, K, V, bos, L, offs_m, hkv, HQ // G,
                         window, qk_scale, DK, DV, BLOCK_N, BLOCK_DK, BLOCK_DK2, BLOCK_DV, BLOCK_DV2, PRECISION, True)
    dqa, dqb = _dq_tiles(dqa, dqb, qa, qb, doa, dob, lse2, delta, first, end, K, V, bos, L, offs_m, hkv, HQ // G,
                         window, qk_scale, DK, DV, BLOCK_N, BLOCK_DK, BLOCK_DK2, BLOCK_DV, BLOCK_DV2, PRECISION, False)
    dqa, dqb = _dq_tiles(dqa, dqb, qa, qb, doa, dob, lse2, delta, end, hi, K, V, bos, L, offs_m, hkv, HQ // G,
                         window, qk_scale, DK, DV, BLOCK_N, BLOCK_DK, BLOCK_DK2, BLOCK_DV, BLOCK_DV2, PRECISION, True)
    store_split(DQ, dqa * scale, dqb * scale, row_q, 0, 1, in_q, DK, BLOCK_DK, BLOCK_DK2)


def _check_window(window) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")


def takes_local_blocks(cfg: SparsityConfig) -> bool:
    """Whether win_fwd can add the selected branch's local blocks (slc_rest) under cfg: a query tile lies in one
    selection block, a key tile (32 or 64 keys) in one block, and every local block's keys lie inside the band
    of every query of the tile, after the band's masked lower edge."""
    return (cfg.num_local > 0 and cfg.slc_block % BLOCK_Q == 0
            and cfg.window >= cfg.num_local * cfg.slc_block + MAX_KEY_TILE)


def win_fwd(q, k, v, packed: Packed, window: int, scale: float, gated=None, slc_rest=None):
    """Sliding-window attention (SPEC 6) on packed sequences, optionally closing NSA's forward (SPEC 7).

    Args:
        q: [N_tok, HQ, DK]; k: [N_tok, HKV, DK]; v: [N_tok, HKV, DV] (the window branch's keys and values).
        packed: where the sequences lie (common.packed_layout).
        window: w; query t attends the keys s of its own sequence with t - w < s <= t.
        gated: None, or (gates [N_tok, HQ, 3], o_cmp [N_tok, HQ, DV], o_slc [N_tok, HQ, DV]): then the kernel's
            epilogue also writes o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win.
        slc_rest: None, or (lse_slc [N_tok, HQ], cfg) with `gated`, where o_slc and lse_slc are slc_fwd's over the
            blocks other than the local ones (skip_local) and k, v are the selected branch's too: the kernel adds
            the local blocks (the key tiles its band ends with, whose scores it computes anyway) and overwrites
            o_slc and lse_slc with the whole selected branch before it gates. Needs takes_local_blocks(cfg).
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
    lse_slc, local, slc_block = lse, 0, 1  # not read without slc_rest
    if slc_rest is not None:
        lse_slc, cfg = slc_rest
        if gated is None or not takes_local_blocks(cfg) or cfg.window != window:
            raise ValueError("slc_rest needs `gated` and a configuration that takes_local_blocks, of this window")
        if not (gated[2].is_contiguous() and lse_slc.is_contiguous()):
            raise ValueError("slc_rest: o_slc and lse_slc are written in place and must be contiguous")
        local, slc_block = cfg.num_local, cfg.slc_block
    tiles = query_tiles(packed, BLOCK_Q)
    _win_fwd_kernel[(tiles.shape[0] * HQ,)](
        q, k, v, o, lse, packed.cu_seqlens, tiles, scale * LOG2E, window, gates, o_cmp, o_slc, lse_slc, out,
        HQ, HQ // HKV, DK, DV, BLOCK_M=BLOCK_Q, PRECISION=dot_precision(q.dtype), GATED=gated is not None,
        SLC_LOCAL=local, LS=slc_block, **split_blocks(DK, DV),
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
    common = dict(DK=DK, DV=DV, PRECISION=dot_precision(q.dtype), **split_blocks(DK, DV))
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

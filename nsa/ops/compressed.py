"""Attention over compressed tokens (SPEC 2): forward with its log-sum-exp, and a FlashAttention-2 backward.

Query t of a sequence sees compressed token i of the same sequence iff i*d + l <= t + 1 (a staircase causal
mask). Programs are group-centric: one program holds BLOCK_T queries of one KV head together with all G
query heads of that group as the rows of its tiles (row r is query t0 + r // G_PAD, head r % G_PAD), so each
compressed K/V tile is loaded once for the whole group. Non-power-of-two G is padded to G_PAD and masked.

lse convention: lse[t, h] is the natural-log log-sum-exp of scale * q.k_cmp over the visible compressed
tokens; a row that sees none (t < l - 1) has o_cmp = 0 and lse = +inf, so that exp(s - lse) is exactly 0 for
every key and the probabilities, block scores and gradients of that row come out 0 without a NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..config import SparsityConfig
from .common import Packed, autotune_configs

LOG2E = 1.4426950408889634
# Rows (queries x heads of a group) per program: the M side of every product.
BLOCK_M = 64


@triton.jit
def group_rows(t0, seq_len, G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr):
    """Positions t [M], heads within the group g [M] and validity [M] of the rows of a group tile."""
    r = tl.arange(0, BLOCK_T * G_PAD)
    t = t0 + r // G_PAD
    g = r % G_PAD
    return t, g, (t < seq_len) & (g < G)


@triton.jit
def tile_offsets(tok, head, H, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """int64 offsets [len(tok), BLOCK_D] into a contiguous [N, H, D] tensor, and the mask of d < D."""
    d = tl.arange(0, BLOCK_D)
    offs = (tok.to(tl.int64) * H + head)[:, None] * D + d[None, :]
    return offs, (d < D)[None, :]


@triton.jit
def num_visible(t_end, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr):
    """How many compressed tokens the queries before t_end see (i*d + l <= t_end); <= 0 means none."""
    return (t_end - CMP_BLOCK + CMP_STRIDE) // CMP_STRIDE


def _fwd_configs():
    return autotune_configs([
        triton.Config({"BLOCK_N": BN}, num_warps=w, num_stages=s)
        for BN in (64, 32) for w in (4, 8) for s in (2, 3)
    ])


@triton.autotune(configs=_fwd_configs(), key=["G_PAD", "BLOCK_DK", "BLOCK_DV", "DOT_PREC"])
@triton.jit
def cmp_fwd_kernel(
    q, k_cmp, v_cmp, o, lse, cu_seqlens, cu_cmp, scale2, HKV,
    G: tl.constexpr, G_PAD: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, DOT_PREC: tl.constexpr,
):
    seq = tl.program_id(1) // HKV
    kvh = tl.program_id(1) % HKV
    tok0 = tl.load(cu_seqlens + seq)
    seq_len = tl.load(cu_seqlens + seq + 1) - tok0
    # The last query tiles see the most compressed tokens: start them first.
    t0 = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_T
    if t0 >= seq_len:
        return
    cmp0 = tl.load(cu_cmp + seq)
    num_cmp = tl.load(cu_cmp + seq + 1) - cmp0
    HQ = HKV * G
    t, g, valid = group_rows(t0, seq_len, G, G_PAD, BLOCK_T)
    q_offs, dk_mask = tile_offsets(tok0 + t, kvh * G + g, HQ, DK, BLOCK_DK)
    q_tile = tl.load(q + q_offs, mask=valid[:, None] & dk_mask, other=0.0)

    m_i = tl.full([BLOCK_T * G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_T * G_PAD], tl.float32)
    acc = tl.zeros([BLOCK_T * G_PAD, BLOCK_DV], tl.float32)
    # Queries past the end of the sequence would see tokens past num_cmp: those loads are masked.
    n_end = num_visible(t0 + BLOCK_T, CMP_BLOCK, CMP_STRIDE)
    for n0 in range(0, n_end, BLOCK_N):
        i = n0 + tl.arange(0, BLOCK_N)
        k_offs, _ = tile_offsets(cmp0 + i, kvh, HKV, DK, BLOCK_DK)
        k_tile = tl.load(k_cmp + k_offs, mask=(i < num_cmp)[:, None] & dk_mask, other=0.0)
        v_offs, dv_mask = tile_offsets(cmp0 + i, kvh, HKV, DV, BLOCK_DV)
        v_tile = tl.load(v_cmp + v_offs, mask=(i < num_cmp)[:, None] & dv_mask, other=0.0)
        s = tl.dot(q_tile, tl.trans(k_tile), input_precision=DOT_PREC) * scale2
        visible = i[None, :] * CMP_STRIDE + CMP_BLOCK <= t[:, None] + 1
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing visible yet keeps m = -inf; shifting by 0 instead keeps exp2 free of NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_shift[:, None])
        alpha = tl.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v_tile.dtype), v_tile, input_precision=DOT_PREC)
        m_i = m_new

    seen = l_i > 0
    acc = acc / tl.where(seen, l_i, 1.0)[:, None]
    o_offs, dv_mask = tile_offsets(tok0 + t, kvh * G + g, HQ, DV, BLOCK_DV)
    tl.store(o + o_offs, acc.to(o.dtype.element_ty), mask=valid[:, None] & dv_mask)
    lse_row = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) / 1.4426950408889634, float("inf"))
    tl.store(lse + (tok0 + t).to(tl.int64) * HQ + kvh * G + g, lse_row, mask=valid)


def _bwd_configs():
    return autotune_configs([
        triton.Config({"BLOCK_N": BN}, num_warps=w, num_stages=s)
        for BN in (32, 64) for w in (4, 8) for s in (1, 2)
    ])


@triton.autotune(configs=_bwd_configs(), key=["G_PAD", "BLOCK_DK", "BLOCK_DV", "DOT_PREC"])
@triton.jit
def cmp_bwd_dkdv_kernel(
    q, k_cmp, v_cmp, do, lse, delta, dk_cmp, dv_cmp, cu_seqlens, cu_cmp, scale, scale2, HKV,
    G: tl.constexpr, G_PAD: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # One program owns a tile of compressed tokens of one KV head and loops over every query and every head
    # of the group that sees it: dk_cmp and dv_cmp are summed in a fixed order, without atomics.
    seq = tl.program_id(1) // HKV
    kvh = tl.program_id(1) % HKV
    cmp0 = tl.load(cu_cmp + seq)
    num_cmp = tl.load(cu_cmp + seq + 1) - cmp0
    n0 = tl.program_id(0) * BLOCK_N
    if n0 >= num_cmp:
        return
    tok0 = tl.load(cu_seqlens + seq)
    seq_len = tl.load(cu_seqlens + seq + 1) - tok0
    HQ = HKV * G
    i = n0 + tl.arange(0, BLOCK_N)
    k_offs, dk_mask = tile_offsets(cmp0 + i, kvh, HKV, DK, BLOCK_DK)
    k_tile = tl.load(k_cmp + k_offs, mask=(i < num_cmp)[:, None] & dk_mask, other=0.0)
    v_offs, dv_mask = tile_offsets(cmp0 + i, kvh, HKV, DV, BLOCK_DV)
    v_tile = tl.load(v_cmp + v_offs, mask=(i < num_cmp)[:, None] & dv_mask, other=0.0)

    dk = tl.zeros([BLOCK_N, BLOCK_DK], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    # The first query that sees token n0 is n0*d + l - 1.
    t_first = ((n0 * CMP_STRIDE + CMP_BLOCK - 1) // BLOCK_T) * BLOCK_T
    for t0 in range(t_first, seq_len, BLOCK_T):
        t, g, valid = group_rows(t0, seq_len, G, G_PAD, BLOCK_T)
        q_offs, _ = tile_offsets(tok0 + t, kvh * G + g, HQ, DK, BLOCK_DK)
        q_tile = tl.load(q + q_offs, mask=valid[:, None] & dk_mask, other=0.0)
        do_offs, _ = tile_offsets(tok0 + t, kvh * G + g, HQ, DV, BLOCK_DV)
        do_tile = tl.load(do + do_offs, mask=valid[:, None] & dv_mask, other=0.0)
        row = (tok0 + t).to(tl.int64) * HQ + kvh * G + g
        lse2 = tl.load(lse + row, mask=valid, other=float("inf")) * 1.4426950408889634
        delta_row = tl.load(delta + row, mask=valid, other=0.0)
        s_t = tl.dot(k_tile, tl.trans(q_tile), input_precision=DOT_PREC) * scale2
        visible = i[:, None] * CMP_STRIDE + CMP_BLOCK <= t[None, :] + 1
        p_t = tl.where(visible, tl.exp2(s_t - lse2[None, :]), 0.0)
        dv += tl.dot(p_t.to(do_tile.dtype), do_tile, input_precision=DOT_PREC)
        dp_t = tl.dot(v_tile, tl.trans(do_tile), input_precision=DOT_PREC)
        ds_t = p_t * (dp_t - delta_row[None, :])
        dk += tl.dot(ds_t.to(q_tile.dtype), q_tile, input_precision=DOT_PREC)

    tl.store(dk_cmp + k_offs, (dk * scale).to(dk_cmp.dtype.element_ty), mask=(i < num_cmp)[:, None] & dk_mask)
    tl.store(dv_cmp + v_offs, dv.to(dv_cmp.dtype.element_ty), mask=(i < num_cmp)[:, None] & dv_mask)


@triton.autotune(configs=_bwd_configs(), key=["G_PAD", "BLOCK_DK", "BLOCK_DV", "DOT_PREC"])
@triton.jit
def cmp_bwd_dq_kernel(
    q, k_cmp, v_cmp, do, lse, delta, dq, cu_seqlens, cu_cmp, scale, scale2, HKV,
    G: tl.constexpr, G_PAD: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, DOT_PREC: tl.constexpr,
):
    seq = tl.program_id(1) // HKV
    kvh = tl.program_id(1) % HKV
    tok0 = tl.load(cu_seqlens + seq)
    seq_len = tl.load(cu_seqlens + seq + 1) - tok0
    t0 = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_T
    if t0 >= seq_len:
        return
    cmp0 = tl.load(cu_cmp + seq)
    num_cmp = tl.load(cu_cmp + seq + 1) - cmp0
    HQ = HKV * G
    t, g, valid = group_rows(t0, seq_len, G, G_PAD, BLOCK_T)
    q_offs, dk_mask = tile_offsets(tok0 + t, kvh * G + g, HQ, DK, BLOCK_DK)
    q_tile = tl.load(q + q_offs, mask=valid[:, None] & dk_mask, other=0.0)
    do_offs, dv_mask = tile_offsets(tok0 + t, kvh * G + g, HQ, DV, BLOCK_DV)
    do_tile = tl.load(do + do_offs, mask=valid[:, None] & dv_mask, other=0.0)
    row = (tok0 + t).to(tl.int64) * HQ + kvh * G + g
    lse2 = tl.load(lse + row, mask=valid, other=float("inf")) * 1.4426950408889634
    delta_row = tl.load(delta + row, mask=valid, other=0.0)

    dq_acc = tl.zeros([BLOCK_T * G_PAD, BLOCK_DK], tl.float32)
    # Queries past the end of the sequence would see tokens past num_cmp: those loads are masked.
    n_end = num_visible(t0 + BLOCK_T, CMP_BLOCK, CMP_STRIDE)
    for n0 in range(0, n_end, BLOCK_N):
        i = n0 + tl.arange(0, BLOCK_N)
        k_offs, _ = tile_offsets(cmp0 + i, kvh, HKV, DK, BLOCK_DK)
        k_tile = tl.load(k_cmp + k_offs, mask=(i < num_cmp)[:, None] & dk_mask, other=0.0)
        v_offs, _ = tile_offsets(cmp0 + i, kvh, HKV, DV, BLOCK_DV)
        v_tile = tl.load(v_cmp + v_offs, mask=(i < num_cmp)[:, None] & dv_mask, other=0.0)
        s = tl.dot(q_tile, tl.trans(k_tile), input_precision=DOT_PREC) * scale2
        visible = i[None, :] * CMP_STRIDE + CMP_BLOCK <= t[:, None] + 1
        p = tl.where(visible, tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do_tile, tl.trans(v_tile), input_precision=DOT_PREC)
        ds = p * (dp - delta_row[:, None])
        dq_acc += tl.dot(ds.to(k_tile.dtype), k_tile, input_precision=DOT_PREC)

    tl.store(dq + q_offs, (dq_acc * scale).to(dq.dtype.element_ty), mask=valid[:, None] & dk_mask)


def group_tiling(num_q_heads: int, num_kv_heads: int, dk: int, dv: int, dtype: torch.dtype) -> dict:
    """The constexprs every group-centric launcher shares: G and its padding, queries per program, tile dims."""
    G = num_q_heads // num_kv_heads
    G_PAD = triton.next_power_of_2(G)
    return dict(
        G=G, G_PAD=G_PAD, BLOCK_T=max(1, BLOCK_M // G_PAD),
        BLOCK_DK=triton.next_power_of_2(dk), BLOCK_DV=triton.next_power_of_2(dv),
        # True float32 products, so float32 inputs meet the tolerance rule against a float32 reference.
        DOT_PREC="ieee" if dtype == torch.float32 else "tf32",
    )


def _check_dims(q, k_cmp, v_cmp):
    for name, x in (("q", q), ("k_cmp", k_cmp), ("v_cmp", v_cmp)):
        if x.dim() != 3:
            raise ValueError(f"{name} must be packed as [N, H, D], got shape {tuple(x.shape)}")
        if x.shape[-1] % 16 or not 16 <= x.shape[-1] <= 256:
            raise ValueError(f"{name}'s last dim must be a multiple of 16 in [16, 256], got {x.shape[-1]}")
    if q.shape[1] % k_cmp.shape[1]:
        raise ValueError(f"q's heads ({q.shape[1]}) must be a multiple of k_cmp's heads ({k_cmp.shape[1]})")
    if q.shape[2] != k_cmp.shape[2] or k_cmp.shape[:2] != v_cmp.shape[:2]:
        raise ValueError(f"k_cmp {tuple(k_cmp.shape)} must match q's DK and v_cmp's [N_cmp, HKV]")


def cmp_fwd(q, k_cmp, v_cmp, packed: Packed, cfg: SparsityConfig, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Compressed-branch attention (SPEC 2).

    Args:
        q: [N_tok, HQ, DK] packed queries; k_cmp: [N_cmp, HKV, DK], v_cmp: [N_cmp, HKV, DV] packed per sequence.
    Returns:
        o_cmp [N_tok, HQ, DV] in q's dtype, 0 where a query sees no compressed token, and lse [N_tok, HQ]
        float32: the log-sum-exp of scale * q.k_cmp over the visible tokens, +inf where there are none.
    """
    _check_dims(q, k_cmp, v_cmp)
    q, k_cmp, v_cmp = q.contiguous(), k_cmp.contiguous(), v_cmp.contiguous()
    N, HQ, DK = q.shape
    HKV, DV = k_cmp.shape[1], v_cmp.shape[2]
    if N == 0 or k_cmp.shape[0] == 0:
        return q.new_zeros(N, HQ, DV), torch.full((N, HQ), float("inf"), dtype=torch.float32, device=q.device)
    o = torch.empty(N, HQ, DV, dtype=q.dtype, device=q.device)
    lse = torch.empty(N, HQ, dtype=torch.float32, device=q.device)
    tiling = group_tiling(HQ, HKV, DK, DV, q.dtype)
    grid = (triton.cdiv(packed.max_len, tiling["BLOCK_T"]), packed.num_seqs * HKV)
    cmp_fwd_kernel[grid](
        q, k_cmp, v_cmp, o, lse, packed.cu_seqlens, packed.cu_cmp, scale * LOG2E, HKV, DK=DK, DV=DV,
        CMP_BLOCK=cfg.cmp_block, CMP_STRIDE=cfg.cmp_stride, **tiling,
    )
    return o, lse


def cmp_bwd(do_cmp, q, k_cmp, v_cmp, o_cmp, lse, packed: Packed, cfg: SparsityConfig, scale: float):
    """Gradients of cmp_fwd, deterministic (bitwise equal across runs).

    Args:
        do_cmp: [N_tok, HQ, DV] gradient of o_cmp; q, k_cmp, v_cmp, o_cmp, lse as in and out of cmp_fwd.
    Returns:
        dq [N_tok, HQ, DK], dk_cmp [N_cmp, HKV, DK], dv_cmp [N_cmp, HKV, DV] in the dtypes of q, k_cmp, v_cmp.
    """
    _check_dims(q, k_cmp, v_cmp)
    q, k_cmp, v_cmp, do_cmp, lse = (x.contiguous() for x in (q, k_cmp, v_cmp, do_cmp, lse))
    N, HQ, DK = q.shape
    N_cmp, HKV, DV = v_cmp.shape
    if N == 0 or N_cmp == 0:
        return torch.zeros_like(q), torch.zeros_like(k_cmp), torch.zeros_like(v_cmp)
    # FlashAttention-2's preprocess: delta = rowsum(do * o), the softmax's Jacobian term per row.
    delta = (do_cmp.float() * o_cmp.float()).sum(-1).contiguous()
    dq = torch.empty_like(q)
    dk_cmp = torch.empty_like(k_cmp)
    dv_cmp = torch.empty_like(v_cmp)
    tiling = group_tiling(HQ, HKV, DK, DV, q.dtype)
    common = dict(DK=DK, DV=DV, CMP_BLOCK=cfg.cmp_block, CMP_STRIDE=cfg.cmp_stride, **tiling)
    max_cmp = cfg.num_cmp(packed.max_len)
    cmp_bwd_dkdv_kernel[lambda meta: (triton.cdiv(max_cmp, meta["BLOCK_N"]), packed.num_seqs * HKV)](
        q, k_cmp, v_cmp, do_cmp, lse, delta, dk_cmp, dv_cmp, packed.cu_seqlens, packed.cu_cmp,
        scale, scale * LOG2E, HKV, **common,
    )
    cmp_bwd_dq_kernel[(triton.cdiv(packed.max_len, tiling["BLOCK_T"]), packed.num_seqs * HKV)](
        q, k_cmp, v_cmp, do_cmp, lse, delta, dq, packed.cu_seqlens, packed.cu_cmp,
        scale, scale * LOG2E, HKV, **common,
    )
    return dq, dk_cmp, dv_cmp

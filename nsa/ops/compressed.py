"""Attention over compressed tokens (SPEC 2): forward with its log-sum-exp, and a FlashAttention-2 backward.

Query t of a sequence sees compressed token i of the same sequence iff i*d + l <= t + 1 (a staircase causal
mask). Programs are group-centric: one program holds BLOCK_T queries of one KV head together with all G
query heads of that group as the rows of its tiles (row r is query t0 + r // G_PAD, head r % G_PAD), so each
compressed K/V tile is loaded once for the whole group. Non-power-of-two G is padded and masked.

The key dimension is cut into two power-of-two parts (192 = 128 + 64) and every product over it is the sum of
two products, so DK = 192 costs 192 columns of work instead of 256 (next_power_of_2's padding).

lse convention: lse[t, h] is the natural-log log-sum-exp of scale * q.k_cmp over the visible compressed
tokens; a row that sees none (t < l - 1) has o_cmp = 0 and lse = +inf, so that exp(s - lse) is exactly 0 for
every key and the probabilities, block scores and gradients of that row come out 0 without a NaN.
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
    dot_split,
    interpreting,
    load_split,
    online_softmax,
    split_dim,
    store_split,
    tile_offsets,
    zeros_split,
)

# Rows (queries x heads of a group) per program: the M side of every product. The forward reads each compressed
# tile for twice the rows of the backward's programs: at 64k in the paper's configuration on the H200, cmp_fwd
# 15.0 -> 12.2 ms against BLOCK_M = 64 (the selection has its own rows, topk.BLOCK_M).
BLOCK_M = 64
FWD_BLOCK_M = 128
# The dk/dv backward cuts the queries that see a key tile into at most DKDV_CHUNKS chunks of at least
# DKDV_MIN_CHUNK queries, one program each: bounded programs, and fp32 partials linear in T.
DKDV_CHUNKS = 16
DKDV_MIN_CHUNK = 512


@triton.jit
def group_rows(t0, seq_len, G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr):
    """Positions t [M], heads within the group g [M] and validity [M] of the rows of a group tile."""
    r = tl.arange(0, BLOCK_T * G_PAD)
    t = t0 + r // G_PAD
    g = r % G_PAD
    return t, g, (t < seq_len) & (g < G)


@triton.jit
def group_program(cu_seqlens, cu_cmp, HKV, BLOCK_T: tl.constexpr):
    """The sequence, KV head and query tile of a program over (query tile, sequence x KV head), the last tiles
    (which see the most compressed tokens) started first: (kvh, tok0, seq_len, t0, cmp0, num_cmp). A program
    with t0 >= seq_len has nothing to do."""
    seq = tl.program_id(1) // HKV
    kvh = tl.program_id(1) % HKV
    tok0 = tl.load(cu_seqlens + seq)
    seq_len = tl.load(cu_seqlens + seq + 1) - tok0
    t0 = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_T
    cmp0 = tl.load(cu_cmp + seq)
    return kvh, tok0, seq_len, t0, cmp0, tl.load(cu_cmp + seq + 1) - cmp0


@triton.jit
def group_grad_rows(q, do, lse, delta, tok0, t, g, valid, kvh, G: tl.constexpr, HQ, dv_mask, DK: tl.constexpr,
                    DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DK2: tl.constexpr, BLOCK_DV: tl.constexpr):
    """What a backward program needs of the rows of a group tile (group_rows): q in its column parts, do
    [M, BLOCK_DV], lse2 = lse * log2(e) (+inf on invalid rows: probability 0) and delta."""
    qa, qb = load_split(q, tok0 + t, kvh * G + g, HQ, valid, DK, BLOCK_DK, BLOCK_DK2)
    do_offs, _ = tile_offsets(tok0 + t, kvh * G + g, HQ, DV, BLOCK_DV)
    do_tile = tl.load(do + do_offs, mask=valid[:, None] & dv_mask, other=0.0)
    row = (tok0 + t).to(tl.int64) * HQ + kvh * G + g
    lse2 = tl.load(lse + row, mask=valid, other=float("inf")) * 1.4426950408889634
    return qa, qb, do_tile, lse2, tl.load(delta + row, mask=valid, other=0.0)


@triton.jit
def num_visible(t_end, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr):
    """How many compressed tokens the queries before t_end see (i*d + l <= t_end); <= 0 means none."""
    return (t_end - CMP_BLOCK + CMP_STRIDE) // CMP_STRIDE


def _tile_configs(gpu: list[tuple[int, int, int]]) -> list[triton.Config]:
    """(BLOCK_N, warps, stages) configs on the GPU; under the interpreter one config of 16-token tiles, so
    that tiny tests cross tile boundaries (and the forward's unmasked tiles occur)."""
    if interpreting():
        gpu = [(16, 4, 1)]
    return autotune_configs([triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s) for bn, w, s in gpu])


# The forward's accumulators are [BLOCK_M, BLOCK_DV] fp32 and its scores [BLOCK_M, BLOCK_N]: 128-token tiles fit
# 8 warps. (Configs with fewer stages, which leave shared memory for a second program per SM, were never chosen at
# 64k in the paper's configuration on the H200; nor were they for slc_fwd and the window forward.)
_FWD_CONFIGS = [(32, 4, 3), (64, 4, 2), (64, 4, 3), (64, 8, 3), (128, 4, 2), (128, 8, 2), (128, 8, 3)]
# dk/dv hold [BLOCK_N, DK + DV] fp32 accumulators (80 KB at 64 tokens and 192 + 128): 64-token tiles want 8 warps.
_DKDV_CONFIGS = [(32, 4, 1), (32, 4, 2), (32, 8, 2), (64, 8, 1), (64, 8, 2)]
_DQ_CONFIGS = [(32, 4, 1), (32, 4, 2), (64, 4, 2), (64, 8, 1), (64, 8, 2)]


@triton.jit
def fwd_tile(acc, m_i, l_i, qa, qb, k_cmp, v_cmp, n0, cmp0, num_cmp, kvh, HKV, t, scale2,
             DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DK2: tl.constexpr,
             BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr,
             MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
    """One tile of compressed tokens n0 .. n0 + BLOCK_N of the online softmax (base 2). MASKED applies the
    staircase and the end of the sequence; the tiles every row sees whole skip both."""
    i = n0 + tl.arange(0, BLOCK_N)
    if MASKED:
        in_seq = i < num_cmp
    else:
        in_seq = i >= 0
    ka, kb = load_split(k_cmp, cmp0 + i, kvh, HKV, in_seq, DK, BLOCK_DK, BLOCK_DK2)
    v_offs, dv_mask = tile_offsets(cmp0 + i, kvh, HKV, DV, BLOCK_DV)
    v_tile = tl.load(v_cmp + v_offs, mask=in_seq[:, None] & dv_mask, other=0.0)
    s = dot_split(qa, qb, ka, kb, BLOCK_DK2, DOT_PREC) * scale2
    if MASKED:
        s = tl.where(i[None, :] * CMP_STRIDE + CMP_BLOCK <= t[:, None] + 1, s, float("-inf"))
    acc, m_i, l_i, _, _ = online_softmax(acc, m_i, l_i, s, v_tile, DOT_PREC)
    return acc, m_i, l_i


@triton.autotune(configs=_tile_configs(_FWD_CONFIGS), key=["G_PAD", "BLOCK_DK", "BLOCK_DK2", "BLOCK_DV", "DOT_PREC"])
@triton.jit
def cmp_fwd_kernel(
    q, k_cmp, v_cmp, o, lse, cu_seqlens, cu_cmp, scale2, HKV,
    G: tl.constexpr, G_PAD: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr,
    BLOCK_DK2: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, DOT_PREC: tl.constexpr,
):
    kvh, tok0, seq_len, t0, cmp0, num_cmp = group_program(cu_seqlens, cu_cmp, HKV, BLOCK_T)
    if t0 >= seq_len:
        return
    HQ = HKV * G
    t, g, valid = group_rows(t0, seq_len, G, G_PAD, BLOCK_T)
    qa, qb = load_split(q, tok0 + t, kvh * G + g, HQ, valid, DK, BLOCK_DK, BLOCK_DK2)

    m_i = tl.full([BLOCK_T * G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_T * G_PAD], tl.float32)
    acc = tl.zeros([BLOCK_T * G_PAD, BLOCK_DV], tl.float32)
    # The tokens the first query sees are seen by every row (and lie in the sequence): whole tiles of them
    # need no mask. Past them the staircase cuts; queries past the end would see tokens past num_cmp, so
    # those tiles mask the loads too.
    n_full = tl.maximum(num_visible(t0 + 1, CMP_BLOCK, CMP_STRIDE), 0) // BLOCK_N * BLOCK_N
    n_end = num_visible(t0 + BLOCK_T, CMP_BLOCK, CMP_STRIDE)
    for n0 in range(0, n_full, BLOCK_N):
        acc, m_i, l_i = fwd_tile(acc, m_i, l_i, qa, qb, k_cmp, v_cmp, n0, cmp0, num_cmp, kvh, HKV, t, scale2,
                                 DK, DV, BLOCK_DK, BLOCK_DK2, BLOCK_DV, BLOCK_N, CMP_BLOCK, CMP_STRIDE, False, DOT_PREC)
    for n0 in range(n_full, n_end, BLOCK_N):
        acc, m_i, l_i = fwd_tile(acc, m_i, l_i, qa, qb, k_cmp, v_cmp, n0, cmp0, num_cmp, kvh, HKV, t, scale2,
                                 DK, DV, BLOCK_DK, BLOCK_DK2, BLOCK_DV, BLOCK_N, CMP_BLOCK, CMP_STRIDE, True, DOT_PREC)

    seen = l_i > 0
    acc = acc / tl.where(seen, l_i, 1.0)[:, None]
    o_offs, dv_mask = tile_offsets(tok0 + t, kvh * G + g, HQ, DV, BLOCK_DV)
    tl.store(o + o_offs, acc.to(o.dtype.element_ty), mask=valid[:, None] & dv_mask)
    lse_row = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) / 1.4426950408889634, float("inf"))
    tl.store(lse + (tok0 + t).to(tl.int64) * HQ + kvh * G + g, lse_row, mask=valid)


@triton.autotune(configs=_tile_configs(_DKDV_CONFIGS), key=["G_PAD", "BLOCK_DK", "BLOCK_DK2", "BLOCK_DV", "DOT_PREC"])
@triton.jit
def cmp_bwd_dkdv_kernel(
    q, k_cmp, v_cmp, do, lse, delta, dk_out, dv_out, cu_seqlens, cu_cmp, scale, scale2, HKV, N_cmp, chunk_len,
    G: tl.constexpr, G_PAD: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr,
    BLOCK_DK2: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_CHUNKS: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # One program owns a tile of compressed tokens of one KV head and one chunk of the queries (all G heads)
    # that see it, and writes that chunk's dk, dv [NUM_CHUNKS, N_cmp, HKV, D]: the chunks are summed
    # afterwards in a fixed order, without atomics. A chunk of queries before the tile writes zeros.
    seq = tl.program_id(1) // HKV
    kvh = tl.program_id(1) % HKV
    cmp0 = tl.load(cu_cmp + seq)
    num_cmp = tl.load(cu_cmp + seq + 1) - cmp0
    n0 = tl.program_id(0) // NUM_CHUNKS * BLOCK_N
    if n0 >= num_cmp:
        return
    chunk = tl.program_id(0) % NUM_CHUNKS
    tok0 = tl.load(cu_seqlens + seq)
    seq_len = tl.load(cu_seqlens + seq + 1) - tok0
    HQ = HKV * G
    i = n0 + tl.arange(0, BLOCK_N)
    in_seq = i < num_cmp
    ka, kb = load_split(k_cmp, cmp0 + i, kvh, HKV, in_seq, DK, BLOCK_DK, BLOCK_DK2)
    v_offs, dv_mask = tile_offsets(cmp0 + i, kvh, HKV, DV, BLOCK_DV)
    v_tile = tl.load(v_cmp + v_offs, mask=in_seq[:, None] & dv_mask, other=0.0)

    dka, dkb = zeros_split(BLOCK_N, BLOCK_DK, BLOCK_DK2)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    # The first query that sees token n0 is n0*d + l - 1; chunk_len is a multiple of BLOCK_T.
    t_first = ((n0 * CMP_STRIDE + CMP_BLOCK - 1) // BLOCK_T) * BLOCK_T
    t_begin = tl.maximum(t_first, chunk * chunk_len)
    t_end = tl.minimum(seq_len, (chunk + 1) * chunk_len)
    for t0 in range(t_begin, t_end, BLOCK_T):
        t, g, valid = group_rows(t0, seq_len, G, G_PAD, BLOCK_T)
        qa, qb, do_tile, lse2, delta_row = group_grad_rows(q, do, lse, delta, tok0, t, g, valid, kvh, G, HQ, dv_mask,
                                                           DK, DV, BLOCK_DK, BLOCK_DK2, BLOCK_DV)
        s_t = dot_split(ka, kb, qa, qb, BLOCK_DK2, DOT_PREC) * scale2
        visible = i[:, None] * CMP_STRIDE + CMP_BLOCK <= t[None, :] + 1
        p_t = tl.where(visible, tl.exp2(s_t - lse2[None, :]), 0.0)
        dv += tl.dot(p_t.to(do_tile.dtype), do_tile, input_precision=DOT_PREC)
        dp_t = tl.dot(v_tile, tl.trans(do_tile), input_precision=DOT_PREC)
        ds_t = (p_t * (dp_t - delta_row[None, :])).to(qa.dtype)
        dka, dkb = dot_acc_split(dka, dkb, ds_t, qa, qb, BLOCK_DK2, DOT_PREC)

    # Rows of chunk c start at c * N_cmp in the packed compressed axis.
    part = chunk * N_cmp + cmp0 + i
    store_split(dk_out, dka * scale, dkb * scale, part, kvh, HKV, in_seq, DK, BLOCK_DK, BLOCK_DK2)
    dv_offs, _ = tile_offsets(part, kvh, HKV, DV, BLOCK_DV)
    tl.store(dv_out + dv_offs, dv.to(dv_out.dtype.element_ty), mask=in_seq[:, None] & dv_mask)


@triton.autotune(configs=_tile_configs(_DQ_CONFIGS), key=["G_PAD", "BLOCK_DK", "BLOCK_DK2", "BLOCK_DV", "DOT_PREC"])
@triton.jit
def cmp_bwd_dq_kernel(
    q, k_cmp, v_cmp, do, lse, delta, dq, cu_seqlens, cu_cmp, scale, scale2, HKV,
    G: tl.constexpr, G_PAD: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr,
    BLOCK_DK2: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, DOT_PREC: tl.constexpr,
):
    kvh, tok0, seq_len, t0, cmp0, num_cmp = group_program(cu_seqlens, cu_cmp, HKV, BLOCK_T)
    if t0 >= seq_len:
        return
    HQ = HKV * G
    t, g, valid = group_rows(t0, seq_len, G, G_PAD, BLOCK_T)
    dv_mask = (tl.arange(0, BLOCK_DV) < DV)[None, :]
    qa, qb, do_tile, lse2, delta_row = group_grad_rows(q, do, lse, delta, tok0, t, g, valid, kvh, G, HQ, dv_mask, DK,
                                                       DV, BLOCK_DK, BLOCK_DK2, BLOCK_DV)

    dqa, dqb = zeros_split(BLOCK_T * G_PAD, BLOCK_DK, BLOCK_DK2)
    # Queries past the end of the sequence would see tokens past num_cmp: those loads are masked.
    n_end = num_visible(t0 + BLOCK_T, CMP_BLOCK, CMP_STRIDE)
    for n0 in range(0, n_end, BLOCK_N):
        i = n0 + tl.arange(0, BLOCK_N)
        in_seq = i < num_cmp
        ka, kb = load_split(k_cmp, cmp0 + i, kvh, HKV, in_seq, DK, BLOCK_DK, BLOCK_DK2)
        v_offs, _ = tile_offsets(cmp0 + i, kvh, HKV, DV, BLOCK_DV)
        v_tile = tl.load(v_cmp + v_offs, mask=in_seq[:, None] & dv_mask, other=0.0)
        s = dot_split(qa, qb, ka, kb, BLOCK_DK2, DOT_PREC) * scale2
        visible = i[None, :] * CMP_STRIDE + CMP_BLOCK <= t[:, None] + 1
        p = tl.where(visible, tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do_tile, tl.trans(v_tile), input_precision=DOT_PREC)
        ds = (p * (dp - delta_row[:, None])).to(ka.dtype)
        dqa, dqb = dot_acc_split(dqa, dqb, ds, ka, kb, BLOCK_DK2, DOT_PREC)

    store_split(dq, dqa * scale, dqb * scale, tok0 + t, kvh * G + g, HQ, valid, DK, BLOCK_DK, BLOCK_DK2)


def group_tiling(num_q_heads: int, num_kv_heads: int, dk: int, dv: int, dtype: torch.dtype,
                 block_m: int = BLOCK_M) -> dict:
    """The constexprs every group-centric launcher shares: G and its padding, queries per program (block_m rows
    of queries x padded heads), tile dims (DK in two parts, see split_dim)."""
    G = num_q_heads // num_kv_heads
    G_PAD = triton.next_power_of_2(G)
    BLOCK_DK, BLOCK_DK2 = split_dim(dk)
    return dict(
        G=G, G_PAD=G_PAD, BLOCK_T=max(1, block_m // G_PAD), BLOCK_DK=BLOCK_DK, BLOCK_DK2=BLOCK_DK2,
        BLOCK_DV=triton.next_power_of_2(dv),
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
    tiling = group_tiling(HQ, HKV, DK, DV, q.dtype, FWD_BLOCK_M)
    grid = (triton.cdiv(packed.max_len, tiling["BLOCK_T"]), packed.num_seqs * HKV)
    cmp_fwd_kernel[grid](
        q, k_cmp, v_cmp, o, lse, packed.cu_seqlens, packed.cu_cmp, scale * LOG2E, HKV, DK=DK, DV=DV,
        CMP_BLOCK=cfg.cmp_block, CMP_STRIDE=cfg.cmp_stride, **tiling,
    )
    return o, lse


def cmp_bwd(do_cmp, q, k_cmp, v_cmp, o_cmp, lse, packed: Packed, cfg: SparsityConfig, scale: float,
            query_chunk: int | None = None):
    """Gradients of cmp_fwd, deterministic (bitwise equal across runs).

    Args:
        do_cmp: [N_tok, HQ, DV] gradient of o_cmp; q, k_cmp, v_cmp, o_cmp, lse as in and out of cmp_fwd.
        query_chunk: queries per chunk of the dk/dv pass (rounded up to whole query tiles); by default the
            longest sequence in DKDV_CHUNKS chunks of at least DKDV_MIN_CHUNK queries.
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
    delta = attention_delta(o_cmp, do_cmp)
    tiling = group_tiling(HQ, HKV, DK, DV, q.dtype)
    common = dict(DK=DK, DV=DV, CMP_BLOCK=cfg.cmp_block, CMP_STRIDE=cfg.cmp_stride, **tiling)

    # Without chunks one program would walk every later query (T * G rows at the first key tile) while the
    # last ones have nothing to do; chunks bound every program by chunk_len * G rows.
    block_t = tiling["BLOCK_T"]
    if query_chunk is None:
        query_chunk = max(DKDV_MIN_CHUNK, triton.cdiv(packed.max_len, DKDV_CHUNKS))
    chunk_len = triton.cdiv(query_chunk, block_t) * block_t
    num_chunks = triton.cdiv(packed.max_len, chunk_len)
    if num_chunks == 1:
        dk_out, dv_out = torch.empty_like(k_cmp), torch.empty_like(v_cmp)
    else:
        # fp32 partials of every chunk, summed below in chunk order: deterministic, and linear in T.
        dk_out = torch.empty(num_chunks, N_cmp, HKV, DK, dtype=torch.float32, device=q.device)
        dv_out = torch.empty(num_chunks, N_cmp, HKV, DV, dtype=torch.float32, device=q.device)
    max_cmp = cfg.num_cmp(packed.max_len)
    cmp_bwd_dkdv_kernel[lambda meta: (triton.cdiv(max_cmp, meta["BLOCK_N"]) * num_chunks, packed.num_seqs * HKV)](
        q, k_cmp, v_cmp, do_cmp, lse, delta, dk_out, dv_out, packed.cu_seqlens, packed.cu_cmp,
        scale, scale * LOG2E, HKV, N_cmp, chunk_len, NUM_CHUNKS=num_chunks, **common,
    )
    if num_chunks == 1:
        dk_cmp, dv_cmp = dk_out, dv_out
    else:
        dk_cmp, dv_cmp = dk_out.sum(0).to(k_cmp.dtype), dv_out.sum(0).to(v_cmp.dtype)

    dq = torch.empty_like(q)
    cmp_bwd_dq_kernel[(triton.cdiv(packed.max_len, block_t), packed.num_seqs * HKV)](
        q, k_cmp, v_cmp, do_cmp, lse, delta, dq, packed.cu_seqlens, packed.cu_cmp,
        scale, scale * LOG2E, HKV, **common,
    )
    return dq, dk_cmp, dv_cmp

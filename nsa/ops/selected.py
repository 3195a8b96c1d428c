"""Selected branch (SPEC 5): attention of each query over the key blocks it selected, group-centric.

A program owns one KV head and a chunk of Q consecutive queries of one sequence. Its M side is the Q x G
(query, head) pairs of the group, G padded to a power of two. Where G >= 16 one query fills tl.dot's 16 rows
alone (Q = 1): the program streams exactly the n blocks the query selected, l' keys each, and masks only the
keys after the query in its own block. Where G < 16, Q = 16 // G consecutive queries share the program; they
share most of their blocks (the forced ones always, the top-scoring ones often), so the program streams the
union of their selected blocks once (built on the host with two sorts) and masks, row by row, the blocks a
query did not select. Programs run KV head by KV head, consecutive chunks adjacent: those in flight read one
head's K/V (42 MB at T = 64k, DK = 192, DV = 128 in bf16), which stays in the 60 MB L2 of an H200.

Backward, deterministic by construction (no atomics): dq per chunk as in the forward. dk/dv key-block-major
over the inverse map of idx (which queries selected block j, per KV head: a CSR built with a stable argsort,
like FlexAttention's q_indices), with each block's query list cut into segments of at most `segment` queries so
that the block every query selects (block 0) is spread over many programs of similar length. A block with one
segment writes dk/dv directly; one with several writes float32 partials per segment, which a second kernel adds
in segment order. Every sum runs in a fixed order, so two runs give bitwise-equal gradients.
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
    host_tensor,
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

# Rows on the M side of the forward's and dq's tl.dot: Q queries x G heads (padded); 16 is tl.dot's minimum,
# and more rows would make a chunk's union of blocks (hence the wasted products) grow.
QUERY_ROWS = 16
# Rows per step of the dk/dv segment programs: the gathered queries' heads, M of dk += dz^T q and dv += p^T do.
SEGMENT_ROWS = 64
# Queries per dk/dv segment: a block's list is cut into segments of this length; at T = 64k with the paper's
# configuration that makes about 8k programs, the longest 1024 queries (256 steps of 64 rows).
SEGMENT = 1024
# No block: sorts after every real block index in a chunk's union.
NO_BLOCK = torch.iinfo(torch.int32).max


# The tuning space of the forward and of dq, which run the same programs over the same chunks.
_CHUNK_CONFIGS = [
    triton.Config({}, num_warps=4, num_stages=2),
    triton.Config({}, num_warps=4, num_stages=3),
    triton.Config({}, num_warps=8, num_stages=2),
    triton.Config({}, num_warps=2, num_stages=3),
]


@triton.jit
def _group_rows(r, t0, L, bos, hkv, G: tl.constexpr, GP: tl.constexpr, HQ: tl.constexpr):
    """Row r of the M side is query t0 + r // GP of the chunk, head g = r % GP of group hkv.
    Returns (position t in the sequence, packed row of q/o/lse, whether the row is real)."""
    t = t0 + r // GP
    g = r % GP
    valid = (g < G) & (t < L)
    return t, (bos + t) * HQ + hkv * G + g, valid


@triton.jit
def _chunk_program(TILES, CU, HKV: tl.constexpr, BLOCK_Q: tl.constexpr):
    """The chunk and KV head of this program: KV head outermost, so that the programs in flight share one
    head's K/V in L2. Returns (hkv, chunk row of the union tables, bos, L, t0, t_last)."""
    pid = tl.program_id(0)
    num_tiles = tl.num_programs(0) // HKV
    hkv = pid // num_tiles
    tile = pid % num_tiles
    seq = tl.load(TILES + 2 * tile)
    t0 = tl.load(TILES + 2 * tile + 1)
    bos = tl.load(CU + seq).to(tl.int64)
    L = tl.load(CU + seq + 1) - bos
    return hkv, tile * HKV + hkv, bos, L, t0, tl.minimum(t0 + BLOCK_Q, L) - 1


@triton.jit
def _chunk_blocks_of(IDX, UNION, chunk, bos, t0, t_last, hkv, HKV: tl.constexpr, NSEL: tl.constexpr,
                     LS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_NSEL: tl.constexpr, SKIP: tl.constexpr):
    """(pointer to the chunk's ascending block list, how many of its blocks the program visits): the query's own
    idx row where Q = 1, else the union built by _chunk_blocks; the last SKIP blocks ending at the chunk's last
    query are left out (SKIP = 0: none)."""
    if BLOCK_Q == 1:
        blocks = IDX + ((bos + t0) * HKV + hkv) * NSEL
    else:
        blocks = UNION + chunk * (BLOCK_Q * NSEL)
    offs = tl.arange(0, BLOCK_Q * BLOCK_NSEL)
    listed = tl.load(blocks + offs, mask=offs < BLOCK_Q * NSEL, other=-1)
    # Padding (-1 in idx, NO_BLOCK in a union) falls outside [0, limit].
    limit = t_last // LS - SKIP
    return blocks, tl.sum(((listed >= 0) & (listed <= limit)).to(tl.int32), 0)


@triton.jit
def _chosen_rows(sel, blk, valid, t, LS: tl.constexpr, BLOCK_Q: tl.constexpr, SKIP: tl.constexpr):
    """Which rows selected block blk, not counting the SKIP blocks ending at each row's query: all real rows
    where the list is the query's own (Q = 1: _chunk_blocks_of already stops before those blocks)."""
    if BLOCK_Q == 1:
        chosen = valid
    else:
        chosen = tl.sum((sel == blk).to(tl.int32), 1) > 0
        if SKIP > 0:
            chosen = chosen & (blk <= t // LS - SKIP)
    return chosen


@triton.jit
def _chunk(IDX, UNION, CU, TILES, HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
           NSEL: tl.constexpr, LS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_NSEL: tl.constexpr,
           SKIP: tl.constexpr):
    """What a forward or dq program knows of its chunk before the first key: (hkv, bos, t, t_last, row_q, valid,
    sel, blocks, count): the M side's rows (_group_rows), each row's selection sel [M, BLOCK_NSEL] (-1 padded)
    and the chunk's block list (_chunk_blocks_of)."""
    hkv, chunk, bos, L, t0, t_last = _chunk_program(TILES, CU, HKV, BLOCK_Q)
    t, row_q, valid = _group_rows(tl.arange(0, BLOCK_Q * GP), t0, L, bos, hkv, G, GP, HQ)
    offs_sel = tl.arange(0, BLOCK_NSEL)
    sel = tl.load(IDX + ((bos + t) * HKV + hkv)[:, None] * NSEL + offs_sel[None, :],
                  mask=valid[:, None] & (offs_sel < NSEL)[None, :], other=-1)
    blocks, count = _chunk_blocks_of(IDX, UNION, chunk, bos, t0, t_last, hkv, HKV, NSEL, LS, BLOCK_Q, BLOCK_NSEL,
                                     SKIP)
    return hkv, bos, t, t_last, row_q, valid, sel, blocks, count


@triton.jit
def _selected_tile(K, V, i, blocks, sel, valid, t, t_last, bos, hkv, HKV: tl.constexpr, DK: tl.constexpr,
                   DV: tl.constexpr, LS: tl.constexpr, SKIP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr,
                   TILES_PER_BLOCK: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DK2: tl.constexpr,
                   BLOCK_DV: tl.constexpr, BLOCK_DV2: tl.constexpr):
    """Step i of the flat loop over (block, key tile): k and v of the tile in their column parts and which
    (row, key) pairs attend (the row selected the block, the key is not after the row's query)."""
    blk = tl.load(blocks + i // TILES_PER_BLOCK)
    chosen = _chosen_rows(sel, blk, valid, t, LS, BLOCK_Q, SKIP)
    s = blk * LS + (i % TILES_PER_BLOCK) * BLOCK_S + tl.arange(0, BLOCK_S)
    # Keys after the chunk's last query are never visible: load nothing there (that also keeps loads inside
    # the sequence).
    in_blk = (s < (blk + 1) * LS) & (s <= t_last)
    row_kv = (bos + s) * HKV + hkv
    ka, kb = load_split(K, row_kv, 0, 1, in_blk, DK, BLOCK_DK, BLOCK_DK2)
    va, vb = load_split(V, row_kv, 0, 1, in_blk, DV, BLOCK_DV, BLOCK_DV2)
    visible = chosen[:, None] & (s[None, :] <= t[:, None]) & in_blk[None, :]
    return ka, kb, va, vb, visible


@triton.autotune(configs=autotune_configs(_CHUNK_CONFIGS), key=["DK", "DV", "G", "LS"])
@triton.jit
def _slc_fwd_kernel(
    Q, K, V, O, LSE, IDX, CU, TILES, UNION, qk_scale,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    NSEL: tl.constexpr, LS: tl.constexpr, SKIP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_DK: tl.constexpr,
    BLOCK_DK2: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DV2: tl.constexpr, BLOCK_NSEL: tl.constexpr,
    BLOCK_S: tl.constexpr, TILES_PER_BLOCK: tl.constexpr, PRECISION: tl.constexpr,
):
    hkv, bos, t, t_last, row_q, valid, sel, blocks, count = _chunk(IDX, UNION, CU, TILES, HQ, HKV, G, GP, NSEL, LS,
                                                                   BLOCK_Q, BLOCK_NSEL, SKIP)
    # Rows of q, o and k, v are addressed in their [N_tok * H, D] views (head 0 of 1).
    qa, qb = load_split(Q, row_q, 0, 1, valid, DK, BLOCK_DK, BLOCK_DK2)

    acc_a, acc_b = zeros_split(BLOCK_Q * GP, BLOCK_DV, BLOCK_DV2)
    m_i = tl.full([BLOCK_Q * GP], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q * GP], dtype=tl.float32)
    # One flat loop over (block, key tile) so that the pipeliner prefetches the next block's K/V (a loop per
    # block would have one iteration at l' = 64 and nothing to overlap).
    for i in range(0, count * TILES_PER_BLOCK):
        ka, kb, va, vb, visible = _selected_tile(K, V, i, blocks, sel, valid, t, t_last, bos, hkv, HKV, DK, DV, LS,
                                                 SKIP, BLOCK_Q, BLOCK_S, TILES_PER_BLOCK, BLOCK_DK, BLOCK_DK2,
                                                 BLOCK_DV, BLOCK_DV2)
        acc_a, acc_b, m_i, l_i = softmax_step_split(acc_a, acc_b, m_i, l_i, qa, qb, ka, kb, va, vb, visible, qk_scale,
                                                    BLOCK_DK2, BLOCK_DV2, PRECISION)
    oa, lse = softmax_finish(acc_a, m_i, l_i)
    ob, _ = softmax_finish(acc_b, m_i, l_i)
    store_split(O, oa, ob, row_q, 0, 1, valid, DV, BLOCK_DV, BLOCK_DV2)
    tl.store(LSE + row_q, lse, mask=valid)


@triton.autotune(configs=autotune_configs(_CHUNK_CONFIGS), key=["DK", "DV", "G", "LS"])
@triton.jit
def _slc_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, IDX, CU, TILES, UNION, qk_scale, scale,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    NSEL: tl.constexpr, LS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DK2: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_DV2: tl.constexpr, BLOCK_NSEL: tl.constexpr, BLOCK_S: tl.constexpr,
    TILES_PER_BLOCK: tl.constexpr, PRECISION: tl.constexpr,
):
    """dq of a chunk: p recomputed from q, k and lse, dp from do and v, over the same blocks as the forward."""
    hkv, bos, t, t_last, row_q, valid, sel, blocks, count = _chunk(IDX, UNION, CU, TILES, HQ, HKV, G, GP, NSEL, LS,
                                                                   BLOCK_Q, BLOCK_NSEL, 0)
    qa, qb, doa, dob, lse2, delta = load_grad_rows(Q, DO, LSE, DELTA, row_q, valid, DK, DV, BLOCK_DK, BLOCK_DK2,
                                                   BLOCK_DV, BLOCK_DV2)

    dqa, dqb = zeros_split(BLOCK_Q * GP, BLOCK_DK, BLOCK_DK2)
    # One flat loop over (block, key tile), as in the forward, so that the next block's K/V is prefetched.
    for i in range(0, count * TILES_PER_BLOCK):
        ka, kb, va, vb, visible = _selected_tile(K, V, i, blocks, sel, valid, t, t_last, bos, hkv, HKV, DK, DV, LS,
                                                 0, BLOCK_Q, BLOCK_S, TILES_PER_BLOCK, BLOCK_DK, BLOCK_DK2, BLOCK_DV,
                                                 BLOCK_DV2)
        p, dz = softmax_grad_step(qa, qb, doa, dob, lse2, delta, ka, kb, va, vb, visible, qk_scale,
                                  BLOCK_DK2, BLOCK_DV2, PRECISION)
        dqa, dqb = dot_acc_split(dqa, dqb, dz.to(ka.dtype), ka, kb, BLOCK_DK2, PRECISION)
    store_split(DQ, dqa * scale, dqb * scale, row_q, 0, 1, valid, DK, BLOCK_DK, BLOCK_DK2)


@triton.autotune(
    configs=autotune_configs([
        triton.Config({}, num_warps=8, num_stages=2),
        triton.Config({}, num_warps=4, num_stages=2),
        triton.Config({}, num_warps=8, num_stages=3),
        triton.Config({}, num_warps=8, num_stages=1),
    ]),
    key=["DK", "DV", "G", "LS"],
)
@triton.jit
def _slc_bwd_segment_kernel(
    Q, K, V, DO, LSE, DELTA, DK_OUT, DV_OUT, DK_PART, DV_PART, CU, BLOCKS, SEGMENTS, QUERIES, qk_scale, scale, NB,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    LS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DK2: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_DV2: tl.constexpr, BLOCK_S: tl.constexpr, PRECISION: tl.constexpr,
):
    """dk/dv of one key block of one KV head, summed over one segment of the queries that selected it, in
    token order: into dk/dv where the block has one segment, else into its float32 partial slot."""
    seg = tl.program_id(0)
    row = tl.load(SEGMENTS + 4 * seg)
    first = tl.load(SEGMENTS + 4 * seg + 1)
    end = tl.load(SEGMENTS + 4 * seg + 2)
    slot = tl.load(SEGMENTS + 4 * seg + 3).to(tl.int64)
    hkv = row // NB
    gb = row % NB
    seq = tl.load(BLOCKS + 2 * gb)
    blk = tl.load(BLOCKS + 2 * gb + 1)
    bos = tl.load(CU + seq).to(tl.int64)
    L = tl.load(CU + seq + 1) - bos
    key_end = tl.minimum((blk + 1) * LS, L)

    r = tl.arange(0, BLOCK_Q * GP)
    g = r % GP
    for s0 in range(blk * LS, key_end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        in_blk = s < key_end
        # Rows are addressed in the [N_tok * H, D] views of q, k, v, do, dk, dv (head 0 of 1), and of the
        # partials as [slots * LS, D].
        row_kv = (bos + s) * HKV + hkv
        ka, kb = load_split(K, row_kv, 0, 1, in_blk, DK, BLOCK_DK, BLOCK_DK2)
        va, vb = load_split(V, row_kv, 0, 1, in_blk, DV, BLOCK_DV, BLOCK_DV2)
        dka, dkb = zeros_split(BLOCK_S, BLOCK_DK, BLOCK_DK2)
        dva, dvb = zeros_split(BLOCK_S, BLOCK_DV, BLOCK_DV2)
        for c in range(first, end, BLOCK_Q):
            entry = c + r // GP
            valid = (entry < end) & (g < G)
            tok = tl.load(QUERIES + entry, mask=valid, other=0).to(tl.int64)
            row_q = tok * HQ + hkv * G + g
            qa, qb, doa, dob, lse2, delta = load_grad_rows(Q, DO, LSE, DELTA, row_q, valid, DK, DV, BLOCK_DK,
                                                           BLOCK_DK2, BLOCK_DV, BLOCK_DV2)
            visible = valid[:, None] & (s[None, :] <= (tok - bos)[:, None]) & in_blk[None, :]
            p, dz = softmax_grad_step(qa, qb, doa, dob, lse2, delta, ka, kb, va, vb, visible, qk_scale,
                                      BLOCK_DK2, BLOCK_DV2, PRECISION)
            dva, dvb = dot_acc_split(dva, dvb, tl.trans(p.to(doa.dtype)), doa, dob, BLOCK_DV2, PRECISION)
            dka, dkb = dot_acc_split(dka, dkb, tl.trans(dz.to(qa.dtype)), qa, qb, BLOCK_DK2, PRECISION)
        if slot < 0:
            store_split(DK_OUT, dka * scale, dkb * scale, row_kv, 0, 1, in_blk, DK, BLOCK_DK, BLOCK_DK2)
            store_split(DV_OUT, dva, dvb, row_kv, 0, 1, in_blk, DV, BLOCK_DV, BLOCK_DV2)
        else:
            part = slot * LS + s - blk * LS
            store_split(DK_PART, dka * scale, dkb * scale, part, 0, 1, in_blk, DK, BLOCK_DK, BLOCK_DK2)
            store_split(DV_PART, dva, dvb, part, 0, 1, in_blk, DV, BLOCK_DV, BLOCK_DV2)


@triton.jit
def _slc_bwd_reduce_kernel(
    DK_OUT, DV_OUT, DK_PART, DV_PART, CU, BLOCKS, ROW_SLOTS, NB,
    HKV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, LS: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """dk/dv of one key block of one KV head with several segments: their partials added in segment order.
    Only additions: tiles padded to powers of two cost masked lanes here, not products."""
    row = tl.program_id(0)
    first = tl.load(ROW_SLOTS + 2 * row).to(tl.int64)
    num = tl.load(ROW_SLOTS + 2 * row + 1)
    if num > 0:
        hkv = row // NB
        gb = row % NB
        seq = tl.load(BLOCKS + 2 * gb)
        blk = tl.load(BLOCKS + 2 * gb + 1)
        bos = tl.load(CU + seq).to(tl.int64)
        L = tl.load(CU + seq + 1) - bos
        key_end = tl.minimum((blk + 1) * LS, L)
        offs_dk = tl.arange(0, BLOCK_DK)
        offs_dv = tl.arange(0, BLOCK_DV)
        for s0 in range(blk * LS, key_end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            in_blk = s < key_end
            key = s - blk * LS
            mask_k = in_blk[:, None] & (offs_dk < DK)[None, :]
            mask_v = in_blk[:, None] & (offs_dv < DV)[None, :]
            dk = tl.zeros([BLOCK_S, BLOCK_DK], dtype=tl.float32)
            dv = tl.zeros([BLOCK_S, BLOCK_DV], dtype=tl.float32)
            for slot in range(first, first + num):
                part = slot * LS + key
                dk += tl.load(DK_PART + part[:, None] * DK + offs_dk[None, :], mask=mask_k, other=0.0)
                dv += tl.load(DV_PART + part[:, None] * DV + offs_dv[None, :], mask=mask_v, other=0.0)
            row_kv = (bos + s) * HKV + hkv
            tl.store(DK_OUT + row_kv[:, None] * DK + offs_dk[None, :], dk.to(DK_OUT.dtype.element_ty), mask=mask_k)
            tl.store(DV_OUT + row_kv[:, None] * DV + offs_dv[None, :], dv.to(DV_OUT.dtype.element_ty), mask=mask_v)


def _key_tile(slc_block: int) -> int:
    """Keys per tile: the block itself up to 64 (a larger block takes several tiles), at least tl.dot's 16."""
    return max(16, min(64, triton.next_power_of_2(slc_block)))


def _queries_per_step(G: int, rows: int) -> int:
    """Queries whose G heads (padded) fill `rows` rows of the M side: 1 where G alone reaches them."""
    return max(1, rows // triton.next_power_of_2(G))


def _check_idx(idx, q, k, cfg: SparsityConfig) -> None:
    expected = (q.shape[0], k.shape[1], cfg.num_selected)
    if not isinstance(idx, torch.Tensor) or idx.dtype != torch.int32:
        raise TypeError(f"idx must be an int32 tensor, got {getattr(idx, 'dtype', type(idx).__name__)}")
    if tuple(idx.shape) != expected:
        raise ValueError(f"idx must have shape [N_tok, HKV, num_selected] = {expected}, got {tuple(idx.shape)}")


def _chunk_blocks(idx, packed: Packed, tiles: torch.Tensor, Q: int):
    """Per chunk of Q consecutive queries (tiles [C, 2], Q > 1) and KV head, the union of their selected blocks.

    Returns union int32 [C, HKV, Q * n], ascending, NO_BLOCK after the last.
    """
    N, HKV, n = idx.shape
    cu = packed.cu_seqlens.long()
    seq, start = tiles[:, 0].long(), tiles[:, 1].long()
    pos = start[:, None] + torch.arange(Q, device=idx.device)
    inside = pos < (cu[seq + 1] - cu[seq])[:, None]
    tok = (cu[seq][:, None] + pos).clamp(max=N - 1)
    rows = torch.where(inside[:, :, None, None], idx[tok].long(), -1)
    blocks = rows.permute(0, 2, 1, 3).reshape(tiles.shape[0], HKV, Q * n)
    blocks = torch.where(blocks < 0, NO_BLOCK, blocks).sort(dim=-1).values
    repeat = torch.zeros_like(blocks, dtype=torch.bool)
    repeat[..., 1:] = blocks[..., 1:] == blocks[..., :-1]
    return torch.where(repeat, NO_BLOCK, blocks).sort(dim=-1).values.to(torch.int32).contiguous()


def _chunks(idx, packed: Packed, Q: int):
    """(tiles, union) for the forward and dq kernels; at Q = 1 the kernels read idx itself and the union table
    is idx (never read)."""
    tiles = query_tiles(packed, Q)
    return tiles, idx if Q == 1 else _chunk_blocks(idx, packed, tiles, Q)


def _block_segments(idx, packed: Packed, cfg: SparsityConfig, segment: int):
    """The inverse map of idx, which queries selected each key block per KV head, cut into segments.

    Key blocks are numbered across the packed sequences (global block gb, NB of them); row hkv * NB + gb of the
    CSR lists the packed tokens that selected block gb for KV head hkv, ascending (a stable sort keeps token
    order, hence a fixed summation order). Each row is cut into max(1, ceil(count / segment)) segments (an
    unselected block still gets one, which writes its zero gradient).

    Returns blocks int32 [NB, 2] (sequence, block index in it), queries int32 [>= 1] (the CSR's tokens),
    segments int32 [S, 4] (row, first entry, end entry, partial slot or -1 where the row has one segment),
    row_slots int32 [HKV * NB, 2] (first partial slot, number of slots: 0 for a row written directly) and the
    number of partial slots.
    """
    N, HKV, n = idx.shape
    device = idx.device
    lengths = packed.lengths
    num_blocks = [-(-length // cfg.slc_block) for length in lengths]
    NB = sum(num_blocks)
    R = HKV * NB
    nb = host_tensor(num_blocks, torch.long, device)
    block_start = torch.cumsum(nb, 0) - nb
    seq_of_token = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                           host_tensor(lengths, torch.long, device), output_size=N)
    row = torch.arange(HKV, device=device)[None, :, None] * NB + block_start[seq_of_token][:, None, None] + idx.long()
    row = torch.where(idx >= 0, row, R).flatten()
    order = torch.argsort(row, stable=True)
    counts = torch.bincount(row, minlength=R + 1)[:R]
    offsets = torch.cumsum(counts, 0) - counts
    # Entries of no block (idx = -1) sort last and are never read.
    queries = (order // (HKV * n)).to(torch.int32)

    num_seg = torch.clamp((counts + segment - 1) // segment, min=1)
    num_slots = torch.where(num_seg > 1, num_seg, 0)
    S, P = (int(x) for x in torch.stack([num_seg.sum(), num_slots.sum()]).tolist())
    seg_row = torch.repeat_interleave(torch.arange(R, device=device), num_seg, output_size=S)
    seg_first = torch.cumsum(num_seg, 0) - num_seg
    seg_in_row = torch.arange(S, device=device) - seg_first[seg_row]
    first = offsets[seg_row] + seg_in_row * segment
    end = torch.minimum(first + segment, offsets[seg_row] + counts[seg_row])
    slot_first = torch.cumsum(num_slots, 0) - num_slots
    slot = torch.where(num_seg[seg_row] > 1, slot_first[seg_row] + seg_in_row, -1)
    segments = torch.stack([seg_row, first, end, slot], dim=1).to(torch.int32).contiguous()
    row_slots = torch.stack([slot_first, num_slots], dim=1).to(torch.int32).contiguous()

    seq_of_block = torch.repeat_interleave(torch.arange(len(lengths), device=device), nb, output_size=NB)
    blocks = torch.stack([seq_of_block, torch.arange(NB, device=device) - block_start[seq_of_block]], dim=1)
    if queries.numel() == 0:
        queries = torch.zeros(1, dtype=torch.int32, device=device)
    return blocks.to(torch.int32).contiguous(), queries, segments, row_slots, P


def _launch_args(q, k, v, cfg: SparsityConfig):
    N, HQ, DK = q.shape
    HKV, DV = k.shape[1], v.shape[2]
    G = HQ // HKV
    return dict(
        HQ=HQ, HKV=HKV, G=G, GP=triton.next_power_of_2(G), DK=DK, DV=DV, LS=cfg.slc_block,
        **split_blocks(DK, DV), BLOCK_S=_key_tile(cfg.slc_block),
        PRECISION=dot_precision(q.dtype),
    )


def slc_fwd(q, k, v, idx, packed: Packed, cfg: SparsityConfig, scale: float, *, skip_local: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected-block attention (SPEC 5) on packed sequences.

    Args:
        q: [N_tok, HQ, DK]; k: [N_tok, HKV, DK]; v: [N_tok, HKV, DV].
        idx: [N_tok, HKV, n] int32, the selected blocks of each query (ascending, -1 after the last), block
            indices relative to the sequence start; query t sees the keys s <= t of blocks [j*l', (j+1)*l').
        packed: where the sequences lie (common.packed_layout); cfg: its slc_block l' and num_selected n count.
        skip_local: leave out the cfg.num_local blocks ending at each query (SPEC 4 forces them into every
            selection), which the window forward adds where it reads the same keys (win_fwd's slc_rest).
    Returns:
        o [N_tok, HQ, DV] in q's dtype and lse [N_tok, HQ] float32 (base e; +inf where nothing is visible).
    """
    _check_idx(idx, q, k, cfg)
    q, k, v, idx = q.contiguous(), k.contiguous(), v.contiguous(), idx.contiguous()
    N, HQ, _ = q.shape
    HKV, DV = k.shape[1], v.shape[2]
    Q = _queries_per_step(HQ // HKV, QUERY_ROWS)
    tiles, union = _chunks(idx, packed, Q)
    launch = _launch_args(q, k, v, cfg)
    o = torch.empty(N, HQ, DV, dtype=q.dtype, device=q.device)
    lse = torch.empty(N, HQ, dtype=torch.float32, device=q.device)
    _slc_fwd_kernel[(tiles.shape[0] * HKV,)](
        q, k, v, o, lse, idx, packed.cu_seqlens, tiles, union, scale * LOG2E,
        NSEL=cfg.num_selected, SKIP=cfg.num_local if skip_local else 0, BLOCK_Q=Q,
        BLOCK_NSEL=triton.next_power_of_2(cfg.num_selected),
        TILES_PER_BLOCK=triton.cdiv(cfg.slc_block, launch["BLOCK_S"]), **launch,
    )
    return o, lse


def slc_bwd(do, q, k, v, o, lse, idx, packed: Packed, cfg: SparsityConfig, scale: float, *, segment: int = SEGMENT):
    """Gradients of slc_fwd: (dq, dk, dv) shaped and typed like (q, k, v), bitwise reproducible (fixed summation
    orders, no atomics), which is also the fastest way found.

    Args:
        do: [N_tok, HQ, DV] gradient of o; o, lse: slc_fwd's outputs; the rest as in slc_fwd.
        segment: the most queries one dk/dv program walks for one key block (the rest go to further programs).
    """
    _check_idx(idx, q, k, cfg)
    do, q, k, v, lse, idx = do.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), lse.contiguous(), idx.contiguous()
    N, HQ, DK = q.shape
    HKV, DV = k.shape[1], v.shape[2]
    G = HQ // HKV
    delta = attention_delta(o, do)
    launch = _launch_args(q, k, v, cfg)
    scales = (scale * LOG2E, scale)

    dq = torch.empty_like(q)
    Q = _queries_per_step(G, QUERY_ROWS)
    tiles, union = _chunks(idx, packed, Q)
    _slc_bwd_dq_kernel[(tiles.shape[0] * HKV,)](
        q, k, v, do, lse, delta, dq, idx, packed.cu_seqlens, tiles, union, *scales,
        NSEL=cfg.num_selected, BLOCK_Q=Q, BLOCK_NSEL=triton.next_power_of_2(cfg.num_selected),
        TILES_PER_BLOCK=triton.cdiv(cfg.slc_block, launch["BLOCK_S"]), **launch,
    )

    dk, dv = torch.empty_like(k), torch.empty_like(v)
    blocks, queries, segments, row_slots, P = _block_segments(idx, packed, cfg, segment)
    NB = blocks.shape[0]
    dk_part = torch.empty(max(P, 1), cfg.slc_block, DK, dtype=torch.float32, device=q.device)
    dv_part = torch.empty(max(P, 1), cfg.slc_block, DV, dtype=torch.float32, device=q.device)
    _slc_bwd_segment_kernel[(segments.shape[0],)](
        q, k, v, do, lse, delta, dk, dv, dk_part, dv_part, packed.cu_seqlens, blocks, segments, queries, *scales, NB,
        BLOCK_Q=_queries_per_step(G, SEGMENT_ROWS), **launch,
    )
    if P > 0:
        _slc_bwd_reduce_kernel[(HKV * NB,)](
            dk, dv, dk_part, dv_part, packed.cu_seqlens, blocks, row_slots, NB,
            HKV=HKV, DK=DK, DV=DV, LS=cfg.slc_block, BLOCK_DK=padded_dim(DK), BLOCK_DV=padded_dim(DV),
            BLOCK_S=launch["BLOCK_S"],
        )
    return dq, dk, dv

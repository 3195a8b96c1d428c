"""Selected branch (SPEC 5): attention of each query over the key blocks it selected, group-centric.

A program owns one KV head and a chunk of Q consecutive queries of one sequence. Its M side is the Q x G
(query, head) pairs of the group, G padded to a power of two, Q chosen so that M reaches the 64 rows a tensor
core tile wants. Consecutive queries share most of their blocks (the forced ones always, the top-scoring ones
often), so the program streams the union of their selected blocks once and masks, row by row, the blocks a
query did not select and the keys after it. The union of each chunk is built on the host with two sorts.

Backward: dq per chunk as in the forward. dk/dv either by float32 atomics from the same chunk programs (one
atomic per element per chunk and block), or, deterministic, by one program per (key block, KV head) that
walks the queries which selected that block in token order (the inverse map of idx, a CSR built with a
stable argsort, like FlexAttention's q_indices).
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
    dot_precision,
    padded_dim,
    query_tiles,
    softmax_finish,
    softmax_grad_step,
    softmax_step,
)

# Rows a program puts on the M side of tl.dot: Q queries x G heads (padded) reach it where G is small.
ROWS = 64
# No block: sorts after every real block index in a chunk's union.
NO_BLOCK = torch.iinfo(torch.int32).max


@triton.jit
def _group_rows(r, t0, L, bos, hkv, G: tl.constexpr, GP: tl.constexpr, HQ: tl.constexpr):
    """Row r of the M side is query t0 + r // GP of the chunk, head g = r % GP of group hkv.
    Returns (position t in the sequence, packed row of q/o/lse, whether the row is real)."""
    t = t0 + r // GP
    g = r % GP
    valid = (g < G) & (t < L)
    return t, (bos + t) * HQ + hkv * G + g, valid


@triton.autotune(
    configs=autotune_configs([
        triton.Config({}, num_warps=4, num_stages=2),
        triton.Config({}, num_warps=8, num_stages=2),
        triton.Config({}, num_warps=4, num_stages=3),
    ]),
    key=["DK", "DV", "G", "LS"],
)
@triton.jit
def _slc_fwd_kernel(
    Q, K, V, O, LSE, IDX, CU, TILES, UNION, COUNT, qk_scale,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    NSEL: tl.constexpr, LS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_NSEL: tl.constexpr, BLOCK_S: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    hkv = pid % HKV
    tile = pid // HKV
    seq = tl.load(TILES + 2 * tile)
    t0 = tl.load(TILES + 2 * tile + 1)
    bos = tl.load(CU + seq).to(tl.int64)
    L = tl.load(CU + seq + 1) - bos
    t_last = tl.minimum(t0 + BLOCK_Q, L) - 1

    t, row_q, valid = _group_rows(tl.arange(0, BLOCK_Q * GP), t0, L, bos, hkv, G, GP, HQ)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_sel = tl.arange(0, BLOCK_NSEL)
    q = tl.load(Q + row_q[:, None] * DK + offs_dk[None, :], mask=valid[:, None] & (offs_dk < DK)[None, :], other=0.0)
    sel = tl.load(IDX + ((bos + t) * HKV + hkv)[:, None] * NSEL + offs_sel[None, :],
                  mask=valid[:, None] & (offs_sel < NSEL)[None, :], other=-1)

    acc = tl.zeros([BLOCK_Q * GP, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BLOCK_Q * GP], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q * GP], dtype=tl.float32)
    chunk = tile * HKV + hkv
    for i in range(0, tl.load(COUNT + chunk)):
        blk = tl.load(UNION + chunk * (BLOCK_Q * NSEL) + i)
        chosen = tl.sum((sel == blk).to(tl.int32), 1) > 0
        # Keys after the chunk's last query are never visible: the local block is cut there.
        for s0 in range(blk * LS, tl.minimum((blk + 1) * LS, t_last + 1), BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            # Load nothing past the chunk's last query: that also keeps loads inside the sequence.
            in_blk = (s < (blk + 1) * LS) & (s <= t_last)
            row_kv = (bos + s) * HKV + hkv
            k = tl.load(K + row_kv[:, None] * DK + offs_dk[None, :], mask=in_blk[:, None] & (offs_dk < DK)[None, :], other=0.0)
            v = tl.load(V + row_kv[:, None] * DV + offs_dv[None, :], mask=in_blk[:, None] & (offs_dv < DV)[None, :], other=0.0)
            visible = chosen[:, None] & (s[None, :] <= t[:, None]) & in_blk[None, :]
            acc, m_i, l_i = softmax_step(acc, m_i, l_i, q, k, v, visible, qk_scale, PRECISION)
    o, lse = softmax_finish(acc, m_i, l_i)
    tl.store(O + row_q[:, None] * DV + offs_dv[None, :], o.to(O.dtype.element_ty), mask=valid[:, None] & (offs_dv < DV)[None, :])
    tl.store(LSE + row_q, lse, mask=valid)


@triton.autotune(
    configs=autotune_configs([
        triton.Config({}, num_warps=8, num_stages=2),
        triton.Config({}, num_warps=4, num_stages=2),
        triton.Config({}, num_warps=8, num_stages=1),
    ]),
    key=["DK", "DV", "G", "LS", "ATOMIC"],
    reset_to_zero=["DK_ACC", "DV_ACC"],
)
@triton.jit
def _slc_bwd_chunk_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DK_ACC, DV_ACC, IDX, CU, TILES, UNION, COUNT, qk_scale, scale,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    NSEL: tl.constexpr, LS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_NSEL: tl.constexpr, BLOCK_S: tl.constexpr, ATOMIC: tl.constexpr, PRECISION: tl.constexpr,
):
    """dq of a chunk; with ATOMIC, also its share of dk/dv, added into the float32 DK_ACC/DV_ACC."""
    pid = tl.program_id(0)
    hkv = pid % HKV
    tile = pid // HKV
    seq = tl.load(TILES + 2 * tile)
    t0 = tl.load(TILES + 2 * tile + 1)
    bos = tl.load(CU + seq).to(tl.int64)
    L = tl.load(CU + seq + 1) - bos
    t_last = tl.minimum(t0 + BLOCK_Q, L) - 1

    t, row_q, valid = _group_rows(tl.arange(0, BLOCK_Q * GP), t0, L, bos, hkv, G, GP, HQ)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_sel = tl.arange(0, BLOCK_NSEL)
    mask_q = valid[:, None] & (offs_dk < DK)[None, :]
    q = tl.load(Q + row_q[:, None] * DK + offs_dk[None, :], mask=mask_q, other=0.0)
    do = tl.load(DO + row_q[:, None] * DV + offs_dv[None, :], mask=valid[:, None] & (offs_dv < DV)[None, :], other=0.0)
    lse2 = tl.load(LSE + row_q, mask=valid, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + row_q, mask=valid, other=0.0)
    sel = tl.load(IDX + ((bos + t) * HKV + hkv)[:, None] * NSEL + offs_sel[None, :],
                  mask=valid[:, None] & (offs_sel < NSEL)[None, :], other=-1)

    dq = tl.zeros([BLOCK_Q * GP, BLOCK_DK], dtype=tl.float32)
    chunk = tile * HKV + hkv
    for i in range(0, tl.load(COUNT + chunk)):
        blk = tl.load(UNION + chunk * (BLOCK_Q * NSEL) + i)
        chosen = tl.sum((sel == blk).to(tl.int32), 1) > 0
        for s0 in range(blk * LS, tl.minimum((blk + 1) * LS, t_last + 1), BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            # Load nothing past the chunk's last query: that also keeps loads inside the sequence.
            in_blk = (s < (blk + 1) * LS) & (s <= t_last)
            row_kv = (bos + s) * HKV + hkv
            mask_k = in_blk[:, None] & (offs_dk < DK)[None, :]
            mask_v = in_blk[:, None] & (offs_dv < DV)[None, :]
            k = tl.load(K + row_kv[:, None] * DK + offs_dk[None, :], mask=mask_k, other=0.0)
            v = tl.load(V + row_kv[:, None] * DV + offs_dv[None, :], mask=mask_v, other=0.0)
            visible = chosen[:, None] & (s[None, :] <= t[:, None]) & in_blk[None, :]
            p, dz = softmax_grad_step(q, do, lse2, delta, k, v, visible, qk_scale, PRECISION)
            dq += tl.dot(dz.to(k.dtype), k, input_precision=PRECISION)
            if ATOMIC:
                dk_part = tl.dot(tl.trans(dz.to(q.dtype)), q, input_precision=PRECISION) * scale
                dv_part = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
                tl.atomic_add(DK_ACC + row_kv[:, None] * DK + offs_dk[None, :], dk_part, mask=mask_k)
                tl.atomic_add(DV_ACC + row_kv[:, None] * DV + offs_dv[None, :], dv_part, mask=mask_v)
    tl.store(DQ + row_q[:, None] * DK + offs_dk[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=mask_q)


@triton.autotune(
    configs=autotune_configs([
        triton.Config({}, num_warps=8, num_stages=2),
        triton.Config({}, num_warps=4, num_stages=2),
        triton.Config({}, num_warps=8, num_stages=1),
    ]),
    key=["DK", "DV", "G", "LS"],
)
@triton.jit
def _slc_bwd_block_kernel(
    Q, K, V, DO, LSE, DELTA, DK_OUT, DV_OUT, CU, BLOCKS, OFFSETS, QUERIES, qk_scale, scale,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    LS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dk/dv of one key block of one KV head, summed over the queries that selected it in token order."""
    pid = tl.program_id(0)
    hkv = pid % HKV
    gb = pid // HKV
    seq = tl.load(BLOCKS + 2 * gb)
    blk = tl.load(BLOCKS + 2 * gb + 1)
    bos = tl.load(CU + seq).to(tl.int64)
    L = tl.load(CU + seq + 1) - bos
    first = tl.load(OFFSETS + hkv * (tl.num_programs(0) // HKV) + gb)
    end = tl.load(OFFSETS + hkv * (tl.num_programs(0) // HKV) + gb + 1)
    key_end = tl.minimum((blk + 1) * LS, L)

    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    r = tl.arange(0, BLOCK_Q * GP)
    g = r % GP
    for s0 in range(blk * LS, key_end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        in_blk = s < key_end
        row_kv = (bos + s) * HKV + hkv
        mask_k = in_blk[:, None] & (offs_dk < DK)[None, :]
        mask_v = in_blk[:, None] & (offs_dv < DV)[None, :]
        k = tl.load(K + row_kv[:, None] * DK + offs_dk[None, :], mask=mask_k, other=0.0)
        v = tl.load(V + row_kv[:, None] * DV + offs_dv[None, :], mask=mask_v, other=0.0)
        dk = tl.zeros([BLOCK_S, BLOCK_DK], dtype=tl.float32)
        dv = tl.zeros([BLOCK_S, BLOCK_DV], dtype=tl.float32)
        for c in range(first, end, BLOCK_Q):
            entry = c + r // GP
            valid = (entry < end) & (g < G)
            tok = tl.load(QUERIES + entry, mask=valid, other=0).to(tl.int64)
            row_q = tok * HQ + hkv * G + g
            q = tl.load(Q + row_q[:, None] * DK + offs_dk[None, :], mask=valid[:, None] & (offs_dk < DK)[None, :], other=0.0)
            do = tl.load(DO + row_q[:, None] * DV + offs_dv[None, :], mask=valid[:, None] & (offs_dv < DV)[None, :], other=0.0)
            lse2 = tl.load(LSE + row_q, mask=valid, other=float("inf")) * 1.4426950408889634
            delta = tl.load(DELTA + row_q, mask=valid, other=0.0)
            visible = valid[:, None] & (s[None, :] <= (tok - bos)[:, None]) & in_blk[None, :]
            p, dz = softmax_grad_step(q, do, lse2, delta, k, v, visible, qk_scale, PRECISION)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dk += tl.dot(tl.trans(dz.to(q.dtype)), q, input_precision=PRECISION)
        tl.store(DK_OUT + row_kv[:, None] * DK + offs_dk[None, :], (dk * scale).to(DK_OUT.dtype.element_ty), mask=mask_k)
        tl.store(DV_OUT + row_kv[:, None] * DV + offs_dv[None, :], dv.to(DV_OUT.dtype.element_ty), mask=mask_v)


def _key_tile(slc_block: int) -> int:
    """Keys per tile: the block itself up to 64 (a larger block takes several tiles), at least tl.dot's 16."""
    return max(16, min(64, triton.next_power_of_2(slc_block)))


def _queries_per_program(G: int) -> int:
    return max(1, ROWS // triton.next_power_of_2(G))


def _check_idx(idx, q, k, cfg: SparsityConfig) -> None:
    expected = (q.shape[0], k.shape[1], cfg.num_selected)
    if not isinstance(idx, torch.Tensor) or idx.dtype != torch.int32:
        raise TypeError(f"idx must be an int32 tensor, got {getattr(idx, 'dtype', type(idx).__name__)}")
    if tuple(idx.shape) != expected:
        raise ValueError(f"idx must have shape [N_tok, HKV, num_selected] = {expected}, got {tuple(idx.shape)}")


def _chunk_blocks(idx, packed: Packed, Q: int):
    """The chunks of Q consecutive queries of one sequence and, per chunk and KV head, the union of their
    selected blocks.

    Returns tiles int32 [C, 2] (sequence, first position), union int32 [C, HKV, Q * n] (ascending, NO_BLOCK
    after the last) and count int32 [C, HKV] (the size of each union).
    """
    N, HKV, n = idx.shape
    tiles = query_tiles(packed, Q)
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
    blocks = torch.where(repeat, NO_BLOCK, blocks).sort(dim=-1).values
    count = (blocks != NO_BLOCK).sum(dim=-1)
    return tiles, blocks.to(torch.int32).contiguous(), count.to(torch.int32).contiguous()


def _block_queries(idx, packed: Packed, cfg: SparsityConfig):
    """The inverse map of idx: which queries selected each key block, per KV head, as a CSR.

    Key blocks are numbered across the packed sequences (global block gb). Returns blocks int32 [NB, 2]
    (sequence, block index in it), offsets int32 [HKV * NB + 1] (row hkv * NB + gb) and queries int32 (packed
    token of each entry, ascending within a row: a stable sort keeps token order, hence a fixed summation order).
    """
    N, HKV, n = idx.shape
    device = idx.device
    cu = packed.cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    num_blocks = (lengths + cfg.slc_block - 1) // cfg.slc_block
    block_start = torch.cat([num_blocks.new_zeros(1), num_blocks.cumsum(0)])
    NB = int(block_start[-1])
    seqs = torch.arange(packed.num_seqs, device=device)
    seq_of_token = torch.repeat_interleave(seqs, lengths, output_size=N)
    gb = block_start[seq_of_token][:, None, None] + idx.long()
    key = torch.arange(HKV, device=device)[None, :, None] * NB + gb
    key = torch.where(idx >= 0, key, HKV * NB).flatten()
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=HKV * NB + 1)[: HKV * NB]
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    queries = (order[: int(offsets[-1])] // (HKV * n)).to(torch.int32)
    if queries.numel() == 0:
        queries = torch.zeros(1, dtype=torch.int32, device=device)
    seq_of_block = torch.repeat_interleave(seqs, num_blocks, output_size=NB)
    blocks = torch.stack([seq_of_block, torch.arange(NB, device=device) - block_start[seq_of_block]], dim=1)
    return blocks.to(torch.int32).contiguous(), offsets.to(torch.int32), queries


def _launch_args(q, k, v, cfg: SparsityConfig):
    N, HQ, DK = q.shape
    HKV, DV = k.shape[1], v.shape[2]
    G = HQ // HKV
    return dict(
        HQ=HQ, HKV=HKV, G=G, GP=triton.next_power_of_2(G), DK=DK, DV=DV, LS=cfg.slc_block,
        BLOCK_DK=padded_dim(DK), BLOCK_DV=padded_dim(DV), BLOCK_S=_key_tile(cfg.slc_block),
        PRECISION=dot_precision(q.dtype),
    )


def slc_fwd(q, k, v, idx, packed: Packed, cfg: SparsityConfig, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected-block attention (SPEC 5) on packed sequences.

    Args:
        q: [N_tok, HQ, DK]; k: [N_tok, HKV, DK]; v: [N_tok, HKV, DV].
        idx: [N_tok, HKV, n] int32, the selected blocks of each query (ascending, -1 after the last), block
            indices relative to the sequence start; query t sees the keys s <= t of blocks [j*l', (j+1)*l').
        packed: where the sequences lie (common.packed_layout); cfg: its slc_block l' and num_selected n count.
    Returns:
        o [N_tok, HQ, DV] in q's dtype and lse [N_tok, HQ] float32 (base e; +inf where nothing is visible).
    """
    _check_idx(idx, q, k, cfg)
    q, k, v, idx = q.contiguous(), k.contiguous(), v.contiguous(), idx.contiguous()
    N, HQ, _ = q.shape
    HKV, DV = k.shape[1], v.shape[2]
    Q = _queries_per_program(HQ // HKV)
    tiles, union, count = _chunk_blocks(idx, packed, Q)
    o = torch.empty(N, HQ, DV, dtype=q.dtype, device=q.device)
    lse = torch.empty(N, HQ, dtype=torch.float32, device=q.device)
    _slc_fwd_kernel[(tiles.shape[0] * HKV,)](
        q, k, v, o, lse, idx, packed.cu_seqlens, tiles, union, count, scale * LOG2E,
        NSEL=cfg.num_selected, BLOCK_Q=Q, BLOCK_NSEL=triton.next_power_of_2(cfg.num_selected), **_launch_args(q, k, v, cfg),
    )
    return o, lse


def slc_bwd(do, q, k, v, o, lse, idx, packed: Packed, cfg: SparsityConfig, scale: float, deterministic: bool = False):
    """Gradients of slc_fwd: (dq, dk, dv) shaped and typed like (q, k, v).

    Args:
        do: [N_tok, HQ, DV] gradient of o; o, lse: slc_fwd's outputs; the rest as in slc_fwd.
        deterministic: accumulate dk/dv without atomics, walking the queries of each key block in token
            order, so that two runs give bitwise-equal gradients; otherwise float32 atomics (faster, the
            summation order varies from run to run).
    """
    _check_idx(idx, q, k, cfg)
    do, q, k, v, lse, idx = do.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), lse.contiguous(), idx.contiguous()
    N, HQ, DK = q.shape
    HKV, DV = k.shape[1], v.shape[2]
    Q = _queries_per_program(HQ // HKV)
    delta = attention_delta(o, do)
    launch = _launch_args(q, k, v, cfg)
    dq = torch.empty_like(q)
    if deterministic:
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        dk_acc, dv_acc = dk, dv
    else:
        dk_acc = torch.zeros(N, HKV, DK, dtype=torch.float32, device=q.device)
        dv_acc = torch.zeros(N, HKV, DV, dtype=torch.float32, device=q.device)
    tiles, union, count = _chunk_blocks(idx, packed, Q)
    _slc_bwd_chunk_kernel[(tiles.shape[0] * HKV,)](
        q, k, v, do, lse, delta, dq, dk_acc, dv_acc, idx, packed.cu_seqlens, tiles, union, count, scale * LOG2E, scale,
        NSEL=cfg.num_selected, BLOCK_Q=Q, BLOCK_NSEL=triton.next_power_of_2(cfg.num_selected), ATOMIC=not deterministic,
        **launch,
    )
    if not deterministic:
        return dq, dk_acc.to(k.dtype), dv_acc.to(v.dtype)
    blocks, offsets, queries = _block_queries(idx, packed, cfg)
    _slc_bwd_block_kernel[(blocks.shape[0] * HKV,)](
        q, k, v, do, lse, delta, dk, dv, packed.cu_seqlens, blocks, offsets, queries, scale * LOG2E, scale,
        BLOCK_Q=Q, **launch,
    )
    return dq, dk, dv

"""NSA of a few new query tokens per sequence against a cache (decoding, speculative decoding, chunked prefill).

Query c of sequence b sits at position t = cache_seqlens[b] + c (FlashAttention's flash_attn_with_kvcache
convention: cache_seqlens counts the tokens before this step's C, whose keys are already written). Four kernels,
all with grids fixed by the cache's capacity and every length read on the device, so that a decode step has no
host synchronisation and can be captured in a CUDA graph:

1. cmp_split: split-K over the compressed tokens (flash-decoding). Program (sequence, KV group, query tile,
   chunk) holds the G heads of its queries as rows and streams the chunk's CH = JC * l'/d compressed tokens once,
   keeping the partial softmax (max m, sum l, unnormalised acc) and the chunk's unnormalised block scores
   bs[h, j] = sum_i exp(s_hi - m_h) ov(i, j) / d over the JC selection blocks it covers plus the next one (its last
   tokens reach into it: l <= l').
2. select: per (sequence, KV group, query), the global lse of each head from the chunks' (m, l); then per chunk
   S[j] = sum_h bs[h, j] * exp(m_h - lse_h) (SPEC 3), the overhang into the next chunk's first block carried over,
   merged into a running top-n (SPEC 4; skipped when no key of the chunk beats the current n-th).
3. slc_win_split: split over the selected blocks (a few per program) and over window tiles; partial softmaxes.
4. combine: merges the partial softmaxes of each branch and applies the gates (SPEC 7).

The selected branch's raw K/V live in pages [num_pages, P, HKV, D] addressed through block_table [B, max_pages]
(a contiguous cache [B, S_cap, HKV, D] is the case P = S_cap, block_table = [[0], [1], ...]). The compressed K/V
are contiguous per sequence [B, Tc_cap, HKV, D]. The window K/V are either the raw ones or a ring
[B, W, HKV, D] holding token s at slot s % W (W >= w + C - 1).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..config import SparsityConfig
from .common import LOG2E, dot_precision, interpreting, largest, online_softmax, padded_dim, softmax_step

# Streaming multiprocessors of the H200: the split-K targets a few programs per SM.
NUM_SMS = 132
# Compressed tokens per tile of the cmp_split loop; keys per tile of the selected and window branches.
BLOCK_N = 64
BLOCK_S = 64


@triton.jit
def token_rows(block_table, b, s, MAX_PAGES, PAGE: tl.constexpr):
    """int64 rows of the page pool holding tokens s [N] of sequence b.

    s wraps around the table's capacity: a window ring (one page of W slots) holds token s at slot s % W, and the
    lanes a caller masks off still get an address inside the pool."""
    s = tl.maximum(s, 0) % (MAX_PAGES * PAGE)
    page = tl.load(block_table + b * MAX_PAGES + s // PAGE)
    return page.to(tl.int64) * PAGE + s % PAGE


@triton.jit
def cmp_split_kernel(
    q, k_cmp, v_cmp, cache_seqlens, m_out, l_out, acc_out, bs_out, qk_scale, HKV, C, CMP_CAP, NSPLIT,
    G: tl.constexpr, G_PAD: tl.constexpr, QT: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, JC: tl.constexpr,
    CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, SLC_BLOCK: tl.constexpr,
    PRECISION: tl.constexpr, FOLD_PREC: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // HKV
    kvh = bh % HKV
    chunk = tl.program_id(2)
    HQ = HKV * G
    r = tl.arange(0, QT * G_PAD)
    qi = tl.program_id(1) * QT + r // G_PAD
    g = r % G_PAD
    row_ok = (qi < C) & (g < G)
    past = tl.load(cache_seqlens + b)
    t = past + qi
    end = past + C
    num_cmp = tl.maximum((end - CMP_BLOCK + CMP_STRIDE) // CMP_STRIDE, 0)
    CH: tl.constexpr = JC * (SLC_BLOCK // CMP_STRIDE)
    i0 = chunk * CH

    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    q_offs = ((b * C + qi).to(tl.int64) * HQ + kvh * G + g)[:, None] * DK + dk[None, :]
    q_tile = tl.load(q + q_offs, mask=row_ok[:, None] & (dk < DK)[None, :], other=0.0)
    jj = tl.arange(0, 2 * JC)
    j = chunk * JC + jj

    m_i = tl.full([QT * G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([QT * G_PAD], tl.float32)
    acc = tl.zeros([QT * G_PAD, BLOCK_DV], tl.float32)
    bs = tl.zeros([QT * G_PAD, 2 * JC], tl.float32)
    for n0 in range(0, tl.minimum(CH, num_cmp - i0), BLOCK_N):
        i = i0 + n0 + tl.arange(0, BLOCK_N)
        in_chunk = (i < num_cmp) & (i < i0 + CH)
        kv_row = (b.to(tl.int64) * CMP_CAP + i) * HKV + kvh
        k = tl.load(k_cmp + kv_row[:, None] * DK + dk[None, :], mask=in_chunk[:, None] & (dk < DK)[None, :], other=0.0)
        v = tl.load(v_cmp + kv_row[:, None] * DV + dv[None, :], mask=in_chunk[:, None] & (dv < DV)[None, :], other=0.0)
        s = tl.dot(q_tile, tl.trans(k), input_precision=PRECISION) * qk_scale
        # SPEC 2: token i is visible to t once its block [i*d, i*d + l) is complete.
        visible = row_ok[:, None] & in_chunk[None, :] & (i[None, :] * CMP_STRIDE + CMP_BLOCK <= t[:, None] + 1)
        s = tl.where(visible, s, float("-inf"))
        acc, m_i, l_i, p, alpha = online_softmax(acc, m_i, l_i, s, v, PRECISION)
        # SPEC 3's fold by ov(i, j) / d, on the probabilities still relative to this chunk's running max.
        lo = tl.maximum(i[:, None] * CMP_STRIDE, j[None, :] * SLC_BLOCK)
        hi = tl.minimum(i[:, None] * CMP_STRIDE + CMP_BLOCK, (j[None, :] + 1) * SLC_BLOCK)
        ov = tl.where((jj <= JC)[None, :], tl.maximum(hi - lo, 0), 0).to(tl.float32) / CMP_STRIDE
        bs = bs * alpha[:, None] + tl.dot(p, ov, input_precision=FOLD_PREC)

    # Every chunk writes its rows, empty ones too (m = -inf, zeros): the later kernels need no emptiness test.
    srow = (bh.to(tl.int64) * NSPLIT + chunk) * (C * G_PAD) + qi * G_PAD + g
    st = qi < C
    tl.store(m_out + srow, m_i, mask=st)
    tl.store(l_out + srow, l_i, mask=st)
    tl.store(acc_out + srow[:, None] * DV + dv[None, :], acc, mask=st[:, None] & (dv < DV)[None, :])
    tl.store(bs_out + srow[:, None] * (2 * JC) + jj[None, :], bs, mask=st[:, None])


@triton.jit
def select_kernel(
    m_in, l_in, bs_in, cache_seqlens, idx, HKV, C, NSPLIT,
    G: tl.constexpr, G_PAD: tl.constexpr, JC: tl.constexpr, KP: tl.constexpr, NUM_SELECTED: tl.constexpr,
    NUM_INIT: tl.constexpr, NUM_LOCAL: tl.constexpr, SLC_BLOCK: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // HKV
    kvh = bh % HKV
    qi = tl.program_id(1)
    t = tl.load(cache_seqlens + b) + qi
    g = tl.arange(0, G_PAD)
    head_ok = g < G

    # The global log-sum-exp (base 2) of every head over all chunks.
    m_g = tl.full([G_PAD], float("-inf"), tl.float32)
    l_g = tl.zeros([G_PAD], tl.float32)
    for c in range(0, NSPLIT):
        row = (bh.to(tl.int64) * NSPLIT + c) * (C * G_PAD) + qi * G_PAD + g
        m_c = tl.load(m_in + row, mask=head_ok, other=float("-inf"))
        l_c = tl.load(l_in + row, mask=head_ok, other=0.0)
        m_new = tl.maximum(m_g, m_c)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_g = l_g * tl.exp2(m_g - shift) + l_c * tl.exp2(m_c - shift)
        m_g = m_new
    # A head that sees no compressed token gets lse = +inf: all its weights are 0 (SPEC 2: p = 0).
    lse2 = tl.where(l_g > 0, m_g + tl.log2(tl.where(l_g > 0, l_g, 1.0)), float("inf"))

    # Top-n keys as in topk.py: the float32 score's bits high, 2^31 - 1 - j low; forced blocks +inf, others -1.
    jt = t // SLC_BLOCK
    jj = tl.arange(0, 2 * JC)
    col = tl.arange(0, 2 * JC)[None, :]
    best = tl.full([1, 2 * JC], -1, tl.int64)
    kth = tl.full([], -1, tl.int64)
    carry = tl.zeros([], tl.float32)
    for c in range(0, jt // JC + 1):
        row = (bh.to(tl.int64) * NSPLIT + c) * (C * G_PAD) + qi * G_PAD + g
        m_c = tl.load(m_in + row, mask=head_ok, other=float("-inf"))
        weight = tl.where(head_ok, tl.exp2(m_c - lse2), 0.0)
        part = tl.load(bs_in + row[:, None] * (2 * JC) + jj[None, :], mask=head_ok[:, None], other=0.0)
        score = tl.sum(part * weight[:, None], 0) + tl.where(jj == 0, carry, 0.0)
        carry = tl.sum(tl.where(jj == JC, score, 0.0))
        j = c * JC + jj
        candidate = (jj < JC) & (j * SLC_BLOCK <= t)
        forced = (j < NUM_INIT) | ((j <= jt) & (j > jt - NUM_LOCAL))
        bits = tl.where(score > 0, score.to(tl.int32, bitcast=True), 0)
        bits = tl.where(forced, 0x7F800000, bits).to(tl.int64)
        key = tl.where(candidate, (bits << 32) | (0x7FFFFFFF - j).to(tl.int64), -1)[None, :]
        # Most chunks hold no block that beats the current n-th best: skip their merge.
        if tl.max(tl.max(key, 1), 0) > kth:
            best = largest(tl.reshape(tl.join(best, key), [1, 4 * JC]), NUM_SELECTED, 2 * JC, -1)
            kth = tl.max(tl.max(tl.where(col == NUM_SELECTED - 1, best, -1), 1), 0)

    # Ascending block order: the largest -j first; -1 after the last chosen block.
    neg_j = tl.where(best >= 0, (best & 0x7FFFFFFF) - 0x7FFFFFFF, -0x7FFFFFFF)
    chosen = -largest(neg_j, NUM_SELECTED, 2 * JC, -0x7FFFFFFF)
    chosen = tl.where(chosen == 0x7FFFFFFF, -1, chosen).to(tl.int32)
    out = ((b * C + qi).to(tl.int64) * HKV + kvh) * NUM_SELECTED + col
    tl.store(idx + out, chosen, mask=col < NUM_SELECTED)


@triton.jit
def slc_win_split_kernel(
    q, k, v, k_win, v_win, block_table, win_table, cache_seqlens, idx, m_out, l_out, acc_out, qk_scale,
    HKV, C, MAX_PAGES, WIN_MAX_PAGES, NSW,
    G: tl.constexpr, ROWS: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr, PAGE: tl.constexpr, WIN_PAGE: tl.constexpr,
    NUM_SELECTED: tl.constexpr, SLC_BLOCK: tl.constexpr, WINDOW: tl.constexpr, BPS: tl.constexpr,
    NSLC: tl.constexpr, WT: tl.constexpr, PRECISION: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // HKV
    kvh = bh % HKV
    qi = tl.program_id(1)
    sp = tl.program_id(2)
    t = tl.load(cache_seqlens + b) + qi
    HQ = HKV * G
    g = tl.arange(0, ROWS)
    head_ok = g < G
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    q_offs = ((b * C + qi).to(tl.int64) * HQ + kvh * G + g)[:, None] * DK + dk[None, :]
    q_tile = tl.load(q + q_offs, mask=head_ok[:, None] & (dk < DK)[None, :], other=0.0)
    ks = tl.arange(0, BLOCK_S)

    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_DV], tl.float32)
    if sp < NSLC:
        # SPEC 5: the keys s <= t of this program's share of the selected blocks.
        for slot in tl.static_range(BPS):
            n_slot = sp * BPS + slot
            j = tl.load(idx + ((b * C + qi).to(tl.int64) * HKV + kvh) * NUM_SELECTED + n_slot,
                        mask=n_slot < NUM_SELECTED, other=-1)
            if j >= 0:
                for s0 in tl.static_range(0, SLC_BLOCK, BLOCK_S):
                    s = j * SLC_BLOCK + s0 + ks
                    ok = (s0 + ks < SLC_BLOCK) & (s <= t)
                    rows = (token_rows(block_table, b, s, MAX_PAGES, PAGE) * HKV + kvh)[:, None]
                    kt = tl.load(k + rows * DK + dk[None, :], mask=ok[:, None] & (dk < DK)[None, :], other=0.0)
                    vt = tl.load(v + rows * DV + dv[None, :], mask=ok[:, None] & (dv < DV)[None, :], other=0.0)
                    acc, m_i, l_i = softmax_step(acc, m_i, l_i, q_tile, kt, vt, head_ok[:, None] & ok[None, :],
                                                 qk_scale, PRECISION)
    else:
        # SPEC 6: this program's tile of the band t - w < s <= t.
        w0 = t - WINDOW + 1 + (sp - NSLC) * WT
        for s0 in tl.static_range(0, WT, BLOCK_S):
            s = w0 + s0 + ks
            ok = (s0 + ks < WT) & (s >= 0) & (s <= t) & (s > t - WINDOW)
            rows = (token_rows(win_table, b, s, WIN_MAX_PAGES, WIN_PAGE) * HKV + kvh)[:, None]
            kt = tl.load(k_win + rows * DK + dk[None, :], mask=ok[:, None] & (dk < DK)[None, :], other=0.0)
            vt = tl.load(v_win + rows * DV + dv[None, :], mask=ok[:, None] & (dv < DV)[None, :], other=0.0)
            acc, m_i, l_i = softmax_step(acc, m_i, l_i, q_tile, kt, vt, head_ok[:, None] & ok[None, :],
                                         qk_scale, PRECISION)

    srow = ((bh.to(tl.int64) * C + qi) * NSW + sp) * ROWS + g
    tl.store(m_out + srow, m_i)
    tl.store(l_out + srow, l_i)
    tl.store(acc_out + srow[:, None] * DV + dv[None, :], acc, mask=(dv < DV)[None, :])


@triton.jit
def merge_splits(m_in, l_in, acc_in, first, last, row0, split_stride, rows, mask, dv, DV: tl.constexpr):
    """o [rows, DV] of the softmax whose partial (m, l, acc) lie at row0 + split * split_stride + rows for the
    splits first .. last - 1; 0 where no split saw a key."""
    m = tl.full(rows.shape, float("-inf"), tl.float32)
    l = tl.zeros(rows.shape, tl.float32)
    acc = tl.zeros([rows.shape[0], dv.shape[0]], tl.float32)
    for sp in range(first, last):
        row = row0 + sp * split_stride + rows
        m_s = tl.load(m_in + row, mask=mask, other=float("-inf"))
        l_s = tl.load(l_in + row, mask=mask, other=0.0)
        acc_s = tl.load(acc_in + row[:, None] * DV + dv[None, :], mask=mask[:, None] & (dv < DV)[None, :], other=0.0)
        m_new = tl.maximum(m, m_s)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha, beta = tl.exp2(m - shift), tl.exp2(m_s - shift)
        l = l * alpha + l_s * beta
        acc = acc * alpha[:, None] + acc_s * beta[:, None]
        m = m_new
    return acc / tl.where(l == 0.0, 1.0, l)[:, None]


@triton.jit
def combine_kernel(
    cmp_m, cmp_l, cmp_acc, sw_m, sw_l, sw_acc, gates, o, HKV, C, NSPLIT, NSW,
    G: tl.constexpr, G_PAD: tl.constexpr, ROWS: tl.constexpr, DV: tl.constexpr, BLOCK_DV: tl.constexpr,
    NSLC: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // HKV
    kvh = bh % HKV
    qi = tl.program_id(1)
    g = tl.arange(0, G_PAD)
    head_ok = g < G
    dv = tl.arange(0, BLOCK_DV)
    o_cmp = merge_splits(cmp_m, cmp_l, cmp_acc, 0, NSPLIT, bh.to(tl.int64) * NSPLIT * (C * G_PAD) + qi * G_PAD,
                         C * G_PAD, g, head_ok, dv, DV)
    row0 = (bh.to(tl.int64) * C + qi) * NSW * ROWS
    o_slc = merge_splits(sw_m, sw_l, sw_acc, 0, NSLC, row0, ROWS, g, head_ok, dv, DV)
    o_win = merge_splits(sw_m, sw_l, sw_acc, NSLC, NSW, row0, ROWS, g, head_ok, dv, DV)
    # SPEC 7, in the epilogue: no separate elementwise passes over the branch outputs.
    head = (b * C + qi).to(tl.int64) * (HKV * G) + kvh * G + g
    g_cmp = tl.load(gates + head * 3, mask=head_ok, other=0.0).to(tl.float32)
    g_slc = tl.load(gates + head * 3 + 1, mask=head_ok, other=0.0).to(tl.float32)
    g_win = tl.load(gates + head * 3 + 2, mask=head_ok, other=0.0).to(tl.float32)
    out = g_cmp[:, None] * o_cmp + g_slc[:, None] * o_slc + g_win[:, None] * o_win
    tl.store(o + head[:, None] * DV + dv[None, :], out.to(o.dtype.element_ty), mask=head_ok[:, None] & (dv < DV)[None, :])


def _check(name, x, shape, meaning):
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {meaning} = {tuple(shape)}, got {tuple(x.shape)}")


def _pages(name, table, pool_name, pool, batch):
    """(table, max_pages, page): a given block_table, or the identity table of a contiguous [B, S_cap, ...] pool."""
    if table is None:
        table = torch.arange(batch, dtype=torch.int32, device=pool.device)[:, None]
    elif table.dtype != torch.int32 or table.dim() != 2 or table.shape[0] != batch:
        raise ValueError(f"{name} must be int32 [B, max_pages] with B={batch}, got {table.dtype} {tuple(table.shape)}")
    if pool.dim() != 4 or not pool.is_contiguous():
        raise ValueError(f"{pool_name} must be a contiguous [pages, page_size, HKV, D] tensor, got {tuple(pool.shape)}")
    return table, table.shape[1], pool.shape[1]


def split_plan(batch_heads: int, slc_capacity: int, num_selected: int, window: int, cfg: SparsityConfig):
    """(JC, BPS, WT): selection blocks per compressed chunk, selected blocks per program, window keys per program.

    Chosen from the capacity (not the lengths) so that shapes stay static; about two programs per SM."""
    target = 2 * NUM_SMS
    jc = triton.next_power_of_2(max(1, -(-slc_capacity * batch_heads // target)))
    jc = min(max(jc, 16, triton.next_power_of_2(num_selected)), 128)
    few = batch_heads * (num_selected + window // BLOCK_S) < target
    bps = 1 if few else 2
    wt = BLOCK_S if few else 2 * BLOCK_S
    return jc, bps, wt


def nsa_decode(q, gates, k, v, k_cmp, v_cmp, cache_seqlens, cfg: SparsityConfig, scale: float | None = None, *,
               k_win=None, v_win=None, block_table=None, win_block_table=None, return_indices: bool = False):
    """NSA of C new queries per sequence against a cache, each as the training path gives its position.

    Args:
        q: [B, C, HQ, DK] the new queries; query c of sequence b is at position cache_seqlens[b] + c.
        gates: [B, C, HQ, 3] the branch gates (cmp, slc, win) after the sigmoid.
        k, v: the selected branch's keys and values, already holding the C new tokens: [B, S_cap, HKV, DK/DV],
            or with block_table the page pools [num_pages, P, HKV, DK/DV].
        k_cmp, v_cmp: [B, Tc_cap, HKV, DK/DV], the first Tc(cache_seqlens[b] + C) rows of each sequence valid.
        cache_seqlens: int32 [B], the tokens of each sequence before the C new ones.
        cfg: the knobs; scale: default 1 / sqrt(DK).
        k_win, v_win: the window branch's keys and values (default k, v): [B, W, HKV, DK/DV] holding token s at
            slot s % W (a ring, W >= window + C - 1), or pools addressed by win_block_table.
        block_table, win_block_table: int32 [B, max_pages] page indices (flash_attn_with_kvcache's convention).
        return_indices: also return idx [B, C, HKV, n] int32, the selected blocks (ascending, -1 after).
    Returns:
        o [B, C, HQ, DV] in q's dtype, or (o, idx). No host synchronisation; shapes depend only on the
        arguments' shapes.
    """
    if q.dim() != 4:
        raise ValueError(f"q must be [B, C, HQ, DK], got shape {tuple(q.shape)}")
    B, C, HQ, DK = q.shape
    HKV, DV = k.shape[2], v.shape[3]
    if HKV < 1 or HQ % HKV:
        raise ValueError(f"the query heads HQ={HQ} must be a multiple of the key/value heads HKV={HKV}")
    G = HQ // HKV
    _check("gates", gates, (B, C, HQ, 3), "[B, C, HQ, 3]")
    if cache_seqlens.dtype != torch.int32 or tuple(cache_seqlens.shape) != (B,):
        raise ValueError(f"cache_seqlens must be int32 [B] = [{B}], got {cache_seqlens.dtype} {tuple(cache_seqlens.shape)}")
    if k_cmp.dim() != 4 or k_cmp.shape[0] != B or k_cmp.shape[2:] != (HKV, DK) or v_cmp.shape != (*k_cmp.shape[:3], DV):
        raise ValueError(f"k_cmp, v_cmp must be [B, Tc_cap, HKV, DK/DV] = [{B}, Tc_cap, {HKV}, {DK}/{DV}], got "
                         f"{tuple(k_cmp.shape)}, {tuple(v_cmp.shape)}")
    if (k_win is None) != (v_win is None):
        raise ValueError("k_win and v_win must be given together (or neither, to reuse k and v)")
    table, max_pages, page = _pages("block_table", block_table, "k", k, B)
    if k_win is None:
        k_win, v_win, win_table, win_max_pages, win_page = k, v, table, max_pages, page
    else:
        win_table, win_max_pages, win_page = _pages("win_block_table", win_block_table, "k_win", k_win, B)
        if win_block_table is None and k_win.shape[1] < cfg.window + C - 1:
            raise ValueError(f"the window ring k_win must hold window + C - 1 = {cfg.window + C - 1} tokens, "
                             f"got {k_win.shape[1]}")
    scale = DK ** -0.5 if scale is None else scale
    dev = q.device
    q, gates = q.contiguous(), gates.contiguous()
    k_cmp, v_cmp = k_cmp.contiguous(), v_cmp.contiguous()
    BLOCK_DK, BLOCK_DV = padded_dim(DK), padded_dim(DV)
    precision = dot_precision(q.dtype)
    n = cfg.num_selected

    G_PAD = triton.next_power_of_2(G)
    QT = min(triton.next_power_of_2(C), max(1, 64 // G_PAD))
    QT = max(QT, 16 // min(G_PAD, 16))
    ns_cap = -(-max_pages * page // cfg.slc_block)
    JC, BPS, WT = split_plan(B * HKV * C, ns_cap, n, cfg.window, cfg)
    nsplit = -(-ns_cap // JC)
    rows = C * G_PAD
    f32 = dict(dtype=torch.float32, device=dev)
    cmp_m = torch.empty(B * HKV, nsplit, rows, **f32)
    cmp_l = torch.empty(B * HKV, nsplit, rows, **f32)
    cmp_acc = torch.empty(B * HKV, nsplit, rows, DV, **f32)
    bs = torch.empty(B * HKV, nsplit, rows, 2 * JC, **f32)
    qk_scale = scale * LOG2E
    cmp_split_kernel[(B * HKV, triton.cdiv(C, QT), nsplit)](
        q, k_cmp, v_cmp, cache_seqlens, cmp_m, cmp_l, cmp_acc, bs, qk_scale, HKV, C, k_cmp.shape[1], nsplit,
        G=G, G_PAD=G_PAD, QT=QT, DK=DK, DV=DV, BLOCK_DK=BLOCK_DK, BLOCK_DV=BLOCK_DV, BLOCK_N=BLOCK_N, JC=JC,
        CMP_BLOCK=cfg.cmp_block, CMP_STRIDE=cfg.cmp_stride, SLC_BLOCK=cfg.slc_block, PRECISION=precision,
        # Three tf32 passes keep the fold at float32 accuracy on tensor cores: near-ties stay resolved.
        FOLD_PREC="ieee" if interpreting() else "tf32x3", num_warps=4,
    )
    idx = torch.empty(B, C, HKV, n, dtype=torch.int32, device=dev)
    select_kernel[(B * HKV, C)](
        cmp_m, cmp_l, bs, cache_seqlens, idx, HKV, C, nsplit, G=G, G_PAD=G_PAD, JC=JC,
        KP=max(16, triton.next_power_of_2(n)), NUM_SELECTED=n, NUM_INIT=cfg.num_init, NUM_LOCAL=cfg.num_local,
        SLC_BLOCK=cfg.slc_block, num_warps=4,
    )
    ROWS = max(16, G_PAD)
    nslc = -(-n // BPS)
    nsw = nslc + -(-cfg.window // WT)
    sw_m = torch.empty(B * HKV, C, nsw, ROWS, **f32)
    sw_l = torch.empty(B * HKV, C, nsw, ROWS, **f32)
    sw_acc = torch.empty(B * HKV, C, nsw, ROWS, DV, **f32)
    slc_win_split_kernel[(B * HKV, C, nsw)](
        q, k, v, k_win, v_win, table, win_table, cache_seqlens, idx, sw_m, sw_l, sw_acc, qk_scale,
        HKV, C, max_pages, win_max_pages, nsw, G=G, ROWS=ROWS, DK=DK, DV=DV, BLOCK_DK=BLOCK_DK, BLOCK_DV=BLOCK_DV,
        BLOCK_S=min(BLOCK_S, max(16, triton.next_power_of_2(cfg.slc_block))), PAGE=page, WIN_PAGE=win_page,
        NUM_SELECTED=n, SLC_BLOCK=cfg.slc_block, WINDOW=cfg.window, BPS=BPS, NSLC=nslc, WT=WT,
        PRECISION=precision, num_warps=4,
    )
    o = torch.empty(B, C, HQ, DV, dtype=q.dtype, device=dev)
    combine_kernel[(B * HKV, C)](
        cmp_m, cmp_l, cmp_acc, sw_m, sw_l, sw_acc, gates, o, HKV, C, nsplit, nsw, G=G, G_PAD=G_PAD, ROWS=ROWS,
        DV=DV, BLOCK_DV=BLOCK_DV, NSLC=nslc, num_warps=4,
    )
    return (o, idx) if return_indices else o

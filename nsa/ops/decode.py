"""NSA of a few new query tokens per sequence against a cache (decoding, speculative decoding, chunked prefill).

Query c of sequence b sits at position t = cache_seqlens[b] + c (FlashAttention's flash_attn_with_kvcache
convention: cache_seqlens counts the tokens before this step's C, whose keys are already written). Five kernels,
all with grids fixed by the cache's capacity and every length read on the device, so that a decode step has no
host synchronisation and can be captured in a CUDA graph:

1. cmp_split: split-K over the compressed tokens (flash-decoding). A program (sequence, KV group, query tile,
   chunk) holds the G heads of its queries as rows and streams the chunk's compressed tokens once, in tiles of
   TB selection blocks (BLOCK_N token slots), keeping the partial softmax (max m, sum l, unnormalised acc). Each
   tile also leaves a record: its blocks' scores sum_i exp2(s_hi - m_h) ov(i, j) / d folded on the CUDA cores
   (topk.fold_blocks), what its last block spills into the next tile, and the running max m_h they are
   relative to.
   win_split: the sliding window, which needs no selection; each program takes plan.win_keys of its query tile's band
   and leaves a partial softmax. On a GPU it runs on a side stream, beside the compressed stream and the selection.
2. select: one program per (sequence, KV group, query) and share of at most SELECT_SHARE_BLOCKS blocks: each
   head's global lse from the chunks' (m, l), then S[j] = sum_h record[h, j] * exp2(m_h - lse_h) plus the
   previous tile's spill (SPEC 3) for the share's blocks at once, and SPEC 4's top n of the share by Triton's
   bitonic top-k on int64 keys that order blocks as SPEC 4 does (the score's bits high, the block low: ties to the
   lowest block). The global top n lies among the shares' top n, which go on as those keys.
3. slc_split: the selected blocks split over programs (a few each; with several shares each program ranks the
   candidates to find its blocks); partial softmaxes.
4. combine: per query head, merges the partial softmaxes of each branch and applies the gates (SPEC 7).

dense_decode is the same split over the keys for full causal attention (dense_split, then dense_merge): a dense
model's decode step, which a CUDA graph can capture too.

The selected branch's raw K/V live in pages [num_pages, P, HKV, D] addressed through block_table [B, max_pages]
(a contiguous cache [B, S_cap, HKV, D] is the case P = S_cap with page b for sequence b, addressed without a
table). The compressed K/V are [B, Tc_cap, HKV, D] of any strides whose last is 1 (read in place, not copied). The
window K/V are either the raw ones or a ring [B, W, HKV, D] holding token s at slot s % W (W >= w + C - 1).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..config import SparsityConfig
from ..functional import KERNEL_DTYPES, check_alike, check_device
from .common import (LOG2E, dot_precision, dot_split, load_split, load_split_rows, online_softmax, padded_dim,
                     softmax_step_split, split_dim)
from .topk import fold_blocks, selection_keys

# Streaming multiprocessors of the H200: the split-K targets a few programs per SM.
NUM_SMS = 132
# Compressed token slots per tile of the compressed stream; keys per tile of the selected and window branches.
BLOCK_N = 64
BLOCK_S = 64
# Window keys per window program (a multiple of BLOCK_S), half as many where the compressed chunks are short. A
# program of 128 keys loads both its tiles at once (238 registers at DK 192 against 96 for 64 keys), so it cannot sit
# beside two compressed programs and runs after them, beside select; one of 64 keys runs beside them. On the H200 at
# B16, 64 against 128: 0.0478 ms against 0.0500 at 8k (short chunks), 0.1014 against 0.0923 at 64k and 0.1413
# against 0.1355 at 128k (the window's reads then slow the compressed stream more than they slow select after it).
WIN_KEYS = 128
# Compressed chunks of at most SHORT_CHUNK tiles stream in 2 pipeline stages instead of 3 (less shared memory: 3
# programs per SM instead of 2); on the H200 at B16 that took the 8k step from 0.0663 ms to 0.0617, and made 64k and
# 128k (16-32 tiles per chunk) slower.
SHORT_CHUNK = 2
# Selection blocks per compressed chunk, at most.
MAX_CHUNK_BLOCKS = 512
# Pipeline stages of the compressed stream's longer chunks, and the compressed programs the split plan puts on an SM.
# With DK 192 in parts of 128 + 64 the program takes 168 registers and 90 KB of shared memory at 3 stages (2 per SM),
# 48 KB at 2; on the H200 at B16 64k / 128k, 3 stages and 2 per SM 0.0941 / 0.1365 ms, 2 stages and 3 per SM
# 0.0984 / 0.1452, 2 stages and 2 per SM 0.1089 / 0.1787.
CMP_STAGES = 3
CMP_PROGRAMS_PER_SM = 2
# Selection blocks of a select program's share, at most: each share's top n go on as candidates, which slc_split
# ranks where there are several shares. On the H200 at B16, 512 against 1024 (with 8 warps a share, below): select
# 5.7 us against 7.4 at 64k (128 programs against 64), the step 0.0901 ms against 0.0914-0.0920; at 128k slc_split
# ranks 64 candidates instead of 32 (+0.5 us), the step 0.1334 against 0.1352-0.1356. 256 (128 candidates) made
# slc_split 18 us at 128k against 15.4.
SELECT_SHARE_BLOCKS = 512
# Splits merged per step where partial softmaxes combine.
SPLIT_T = 16
# Warps per program of the compressed stream, the window, the selected branch and combine (one query head: with one
# warp its reductions need no shared memory and no barrier; on the H200 at B16 0.0033-0.0037 ms against 0.0107 with
# 4), and the fewest of a select program.
CMP_WARPS = 4
WIN_WARPS = 4
SLC_WARPS = 4
# Pipeline stages of slc_split's loop over its blocks, and its programs per SM (each takes as many of the pairs'
# selected blocks as fill that one wave). On the H200 at B16 8k / 64k / 128k, 3 stages and 2 per SM (4 blocks a
# program, 88 KB of shared memory): 0.0474 / 0.0915 / 0.1347 ms; 2 stages and 3 per SM 0.0479 / 0.0922 / 0.1344; 2
# and 2 0.0488 / 0.0928 / 0.1353; 2 and 4 0.0495 / 0.0933 / 0.1364; two blocks a program unrolled, the second's
# loads behind a branch on the first's, 0.0484 / 0.0929 / 0.1353. slc_split itself takes 15-16 us for its 42 MB
# in every case.
SLC_STAGES = 3
SLC_PROGRAMS_PER_SM = 2
COMBINE_WARPS = 1
SELECT_MIN_WARPS = 4
# Heads whose block-score records a select program loads together (all 16 against 4: on the H200 at B16 the step
# 0.0507 against 0.0521 ms at 8k, 0.1416 against 0.1479 at 128k); blocks of its share per warp of a select program
# (4 to 16 warps: 8 for a share of 512).
HEAD_GROUP = 16
SELECT_WARP_BLOCKS = 64
# New queries per sequence in one pass of the kernels; longer chunks go in parts.
MAX_QUERIES = 256
# Key splits of dense_decode per query tile, at most: its merge loads them all at once, unrolled (64 at one warp
# compile for sm_90 without spills; 264 spilled 10 KB).
DENSE_MAX_SPLITS = 64


@triton.jit
def token_rows(block_table, b, s, MAX_PAGES, PAGE: tl.constexpr):
    """int64 rows of the page pool holding tokens s [N] of sequence b; block_table None: contiguous [B, PAGE, ...]
    pools (sequence b's page is b, with no table to load).

    s wraps around the table's capacity: a window ring (one page of W slots) holds token s at slot s % W, and the
    lanes a caller masks off still get an address inside the pool."""
    s = tl.maximum(s, 0) % (MAX_PAGES * PAGE)
    if block_table is None:
        page = b.to(tl.int64)
    else:
        page = tl.load(block_table + b * MAX_PAGES + s // PAGE).to(tl.int64)
    return page * PAGE + s % PAGE


@triton.jit
def kv_tile(k, v, block_table, b, kvh, s, ok, HKV, MAX_PAGES, PAGE: tl.constexpr, DK: tl.constexpr,
            DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DK2: tl.constexpr, dv):
    """The keys of tokens s [N] of sequence b, KV head kvh, in the column parts [N, BLOCK_DK] and [N, BLOCK_DK2]
    (split_dim), and their values [N, BLOCK_DV] (zeros where not ok)."""
    rows = token_rows(block_table, b, s, MAX_PAGES, PAGE)
    ka, kb = load_split(k, rows, kvh, HKV, ok, DK, BLOCK_DK, BLOCK_DK2)
    vt = tl.load(v + (rows * HKV + kvh)[:, None] * DV + dv[None, :], mask=ok[:, None] & (dv < DV)[None, :],
                 other=0.0)
    return ka, kb, vt


@triton.jit
def key_step(acc, m_i, l_i, qa, qb, ka, kb, vt, visible, qk_scale, BLOCK_DK2: tl.constexpr, PRECISION: tl.constexpr):
    """One tile of keys of an online softmax, with the queries and keys in column parts (kv_tile, query_rows)."""
    acc, _, m_i, l_i = softmax_step_split(acc, acc, m_i, l_i, qa, qb, ka, kb, vt, vt, visible, qk_scale, BLOCK_DK2, 0,
                                          PRECISION)
    return acc, m_i, l_i


@triton.jit
def empty_partial(ROWS: tl.constexpr, BLOCK_DV: tl.constexpr):
    """The partial softmax (m, l, acc) of no key yet for ROWS rows."""
    return (tl.full([ROWS], float("-inf"), tl.float32), tl.zeros([ROWS], tl.float32),
            tl.zeros([ROWS, BLOCK_DV], tl.float32))


@triton.jit
def query_rows(q, b, kvh, HKV, C, G: tl.constexpr, G_PAD: tl.constexpr, QT: tl.constexpr, DK: tl.constexpr,
               BLOCK_DK: tl.constexpr, BLOCK_DK2: tl.constexpr):
    """The rows of a program's query tile (program_id(1)): the query qi and head g of each of the QT * G_PAD rows,
    which rows are real, and their queries in the column parts [rows, BLOCK_DK] and [rows, BLOCK_DK2] (zeros
    elsewhere)."""
    r = tl.arange(0, QT * G_PAD)
    qi = tl.program_id(1) * QT + r // G_PAD
    g = r % G_PAD
    row_ok = (qi < C) & (g < G)
    qa, qb = load_split(q, b * C + qi, kvh * G + g, HKV * G, row_ok, DK, BLOCK_DK, BLOCK_DK2)
    return qi, g, row_ok, qa, qb


@triton.jit
def store_partial(m_out, l_out, acc_out, row, m_i, l_i, acc, ok, DV: tl.constexpr):
    """A partial softmax (m, l, acc [rows, BLOCK_DV]) written at int64 rows `row` where ok."""
    dv = tl.arange(0, acc.shape[1])
    tl.store(m_out + row, m_i, mask=ok)
    tl.store(l_out + row, l_i, mask=ok)
    tl.store(acc_out + row[:, None] * DV + dv[None, :], acc, mask=ok[:, None] & (dv < DV)[None, :])


@triton.jit
def cmp_split_kernel(
    q, k_cmp, v_cmp, cache_seqlens, m_out, l_out, acc_out, rec_out, spill_out, mt_out, qk_scale, HKV, C, CMP_CAP,
    SKB, SKT, SKH, SVB, SVT, SVH, NSPLIT, NB_CAP, NT_CAP, G: tl.constexpr, G_PAD: tl.constexpr, QT: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DK2: tl.constexpr, BLOCK_DV: tl.constexpr,
    TB: tl.constexpr, R_PAD: tl.constexpr, TILES: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr,
    SLC_BLOCK: tl.constexpr, PRECISION: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // HKV
    kvh = bh % HKV
    chunk = tl.program_id(2)
    qi, g, row_ok, qa, qb = query_rows(q, b, kvh, HKV, C, G, G_PAD, QT, DK, BLOCK_DK, BLOCK_DK2)
    t = tl.load(cache_seqlens + b) + qi
    end = tl.load(cache_seqlens + b) + C
    dv = tl.arange(0, BLOCK_DV)
    st = qi < C
    m_i, l_i, acc = empty_partial(QT * G_PAD, BLOCK_DV)
    R: tl.constexpr = SLC_BLOCK // CMP_STRIDE
    num_cmp = tl.maximum((end - CMP_BLOCK + CMP_STRIDE) // CMP_STRIDE, 0)
    # Column n of a tile: token k = n % R_PAD of the tile's block n // R_PAD.
    n = tl.arange(0, TB * R_PAD)
    k = n % R_PAD
    jj = tl.arange(0, TB)
    rec_row = ((bh * C + qi) * G_PAD + g).to(tl.int64)
    tile0 = chunk * TILES
    for tile in range(tile0, tl.minimum(tile0 + TILES, tl.cdiv(num_cmp, TB * R))):
        i = (tile * TB + n // R_PAD) * R + k
        # Lengths past the capacity (a caller's error the host cannot see) read no row outside k_cmp.
        in_seq = (k < R) & (i < num_cmp) & (i < CMP_CAP)
        # Any strides, the last one 1.
        k_row = b.to(tl.int64) * SKB + i.to(tl.int64) * SKT + kvh * SKH
        v_row = b.to(tl.int64) * SVB + i.to(tl.int64) * SVT + kvh * SVH
        # The keys in the column parts of split_dim (192 = 128 + 64: no padded columns to load or multiply).
        ka, kb = load_split_rows(k_cmp, k_row, in_seq, DK, BLOCK_DK, BLOCK_DK2)
        vt = tl.load(v_cmp + v_row[:, None] + dv[None, :], mask=in_seq[:, None] & (dv < DV)[None, :], other=0.0)
        s = dot_split(qa, qb, ka, kb, BLOCK_DK2, PRECISION) * qk_scale
        # SPEC 2: token i is visible to t once its block [i*d, i*d + l) is complete.
        visible = row_ok[:, None] & in_seq[None, :] & (i[None, :] * CMP_STRIDE + CMP_BLOCK <= t[:, None] + 1)
        s = tl.where(visible, s, float("-inf"))
        acc, m_i, l_i, p, alpha = online_softmax(acc, m_i, l_i, s, vt, PRECISION)
        # SPEC 3's fold of the tile, relative to the running max m_i, which the tile's record keeps beside it.
        score, spill = fold_blocks(p, k, None, R_PAD - 1, R, CMP_BLOCK, CMP_STRIDE, SLC_BLOCK)
        tl.store(rec_out + rec_row[:, None] * NB_CAP + tile * TB + jj[None, :], score, mask=st[:, None])
        tl.store(spill_out + rec_row * NT_CAP + tile, spill, mask=st)
        tl.store(mt_out + rec_row * NT_CAP + tile, m_i, mask=st)
    # Every chunk writes its rows, empty ones too (m = -inf, zeros): the later kernels need no emptiness test.
    store_partial(m_out, l_out, acc_out, (bh.to(tl.int64) * NSPLIT + chunk) * (C * G_PAD) + qi * G_PAD + g, m_i, l_i,
                  acc, st, DV)


@triton.jit
def win_split_kernel(
    q, k_win, v_win, win_table, cache_seqlens, sw_m, sw_l, sw_acc, qk_scale, HKV, C, WIN_MAX_PAGES, NSW, NSLC,
    G: tl.constexpr, G_PAD: tl.constexpr, QT: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DK2: tl.constexpr, BLOCK_DV: tl.constexpr, WINDOW: tl.constexpr, WT: tl.constexpr,
    BLOCK_S: tl.constexpr, WIN_PAGE: tl.constexpr, PRECISION: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // HKV
    kvh = bh % HKV
    w = tl.program_id(2)
    qi, g, row_ok, qa, qb = query_rows(q, b, kvh, HKV, C, G, G_PAD, QT, DK, BLOCK_DK, BLOCK_DK2)
    past = tl.load(cache_seqlens + b)
    t = past + qi
    dv = tl.arange(0, BLOCK_DV)
    m_i, l_i, acc = empty_partial(QT * G_PAD, BLOCK_DV)
    # SPEC 6: this program's share of the union of its queries' bands t - w < s <= t.
    ks = tl.arange(0, BLOCK_S)
    s_first = past + tl.program_id(1) * QT - WINDOW + 1 + w * WT
    for s0 in tl.static_range(0, WT, BLOCK_S):
        s = s_first + s0 + ks
        ok = (s >= 0) & (s < past + C)
        ka, kb, vt = kv_tile(k_win, v_win, win_table, b, kvh, s, ok, HKV, WIN_MAX_PAGES, WIN_PAGE, DK, DV, BLOCK_DK,
                             BLOCK_DK2, dv)
        visible = row_ok[:, None] & ok[None, :] & (s[None, :] <= t[:, None]) & (s[None, :] > t[:, None] - WINDOW)
        acc, m_i, l_i = key_step(acc, m_i, l_i, qa, qb, ka, kb, vt, visible, qk_scale, BLOCK_DK2, PRECISION)
    store_partial(sw_m, sw_l, sw_acc, ((bh.to(tl.int64) * C + qi) * NSW + NSLC + w) * G_PAD + g, m_i, l_i, acc,
                  qi < C, DV)


@triton.jit
def merge_partials(m, l, m_s, l_s):
    """(m, l) of a base-2 softmax with the partial maxima m_s and sums l_s [splits, *m.shape] of more splits folded
    in, and the factors that rescale the old accumulator (alpha) and each split's (beta [splits, *m.shape]).
    Where every max is -inf the shift is 0, so that no inf - inf turns into NaN."""
    m_new = tl.maximum(m, tl.max(m_s, 0))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha, beta = tl.exp2(m - shift), tl.exp2(m_s - shift)
    return m_new, l * alpha + tl.sum(l_s * beta, 0), alpha, beta


@triton.jit
def select_kernel(
    m_in, l_in, rec, spill_in, mt, cache_seqlens, cand, HKV, C, NSPLIT, NB_CAP, NT_CAP,
    G: tl.constexpr, G_PAD: tl.constexpr, SPLIT_T: tl.constexpr, SJ: tl.constexpr, TB: tl.constexpr,
    KP: tl.constexpr, TOPK: tl.constexpr, HEAD_GROUP: tl.constexpr, NUM_SELECTED: tl.constexpr,
    NUM_INIT: tl.constexpr, NUM_LOCAL: tl.constexpr,
    CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, SLC_BLOCK: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // HKV
    kvh = bh % HKV
    qi = tl.program_id(1)
    sc = tl.program_id(2)
    past = tl.load(cache_seqlens + b)
    t = past + qi
    num_cmp = tl.maximum((past + C - CMP_BLOCK + CMP_STRIDE) // CMP_STRIDE, 0)
    R: tl.constexpr = SLC_BLOCK // CMP_STRIDE
    g = tl.arange(0, G_PAD)

    # The global log-sum-exp (base 2) of every head over all chunks.
    m_g = tl.full([G_PAD], float("-inf"), tl.float32)
    l_g = tl.zeros([G_PAD], tl.float32)
    for c0 in range(0, NSPLIT, SPLIT_T):
        c = c0 + tl.arange(0, SPLIT_T)
        row = (bh.to(tl.int64) * NSPLIT + c)[:, None] * (C * G_PAD) + qi * G_PAD + g[None, :]
        ok = (c < NSPLIT)[:, None] & (g < G)[None, :]
        m_c = tl.load(m_in + row, mask=ok, other=float("-inf"))
        l_c = tl.load(l_in + row, mask=ok, other=0.0)
        m_g, l_g, _, _ = merge_partials(m_g, l_g, m_c, l_c)
    # A head that sees no compressed token gets lse = +inf: all its weights are 0 (SPEC 2: p = 0).
    lse2 = tl.where(l_g > 0, m_g + tl.log2(tl.where(l_g > 0, l_g, 1.0)), float("inf"))

    # SPEC 3: S[j] = sum over heads of each tile's record scaled by exp2(m_tile - lse), plus the previous tile's
    # spill into its first block; the SJ blocks of this program's share at once, as [tiles, blocks of a tile].
    jt = t // SLC_BLOCK
    tiles = sc * (SJ // TB) + tl.arange(0, SJ // TB)
    first = tiles * TB
    tile_ok = (first <= jt) & (first < NB_CAP) & (first * R < num_cmp)
    # A processed tile's record holds all its blocks (0 for those past a row's position): whole rows load.
    j2 = first[:, None] + tl.arange(0, TB)[None, :]
    enter = tile_ok & (tiles > 0)
    score = tl.zeros([SJ // TB, TB], tl.float32)
    for h0 in range(0, G, HEAD_GROUP):
        # A group of heads' loads issued together: one memory latency per group, not per head.
        for dh in tl.static_range(HEAD_GROUP):
            h = h0 + dh
            lse_h = tl.sum(tl.where(g == h, lse2, 0.0), 0)
            row = ((bh * C + qi) * G_PAD + h).to(tl.int64)
            part = tl.load(rec + row * NB_CAP + j2, mask=tile_ok[:, None] & (h < G), other=0.0)
            m_t = tl.load(mt + row * NT_CAP + tiles, mask=tile_ok & (h < G), other=float("-inf"))
            score += part * tl.exp2(m_t - lse_h)[:, None]
            if CMP_BLOCK > CMP_STRIDE:
                part = tl.load(spill_in + row * NT_CAP + tiles - 1, mask=enter & (h < G), other=0.0)
                m_t = tl.load(mt + row * NT_CAP + tiles - 1, mask=enter & (h < G), other=float("-inf"))
                score += tl.where(j2 == first[:, None], (part * tl.exp2(m_t - lse_h))[:, None], 0.0)
    score = tl.reshape(score, [SJ])
    j = sc * SJ + tl.arange(0, SJ)
    # SPEC 4's top n of the share by Triton's bitonic top-k on the int64 selection keys (distinct: ties go to
    # the smaller block), written in ascending block order (a key's place: the chosen keys of smaller blocks,
    # whose low words are larger), then -1; the global top n is among the shares' top n, which slc_split ranks.
    key = selection_keys(score, j, jt, (j * SLC_BLOCK <= t) & (j < NB_CAP), NUM_INIT, NUM_LOCAL)
    top = tl.topk(key, TOPK)
    chosen = (top >= 0) & (tl.arange(0, TOPK) < NUM_SELECTED)
    low = top & 0x7FFFFFFF
    place = tl.sum((chosen[None, :] & (low[None, :] > low[:, None])).to(tl.int32), 1)
    out = cand + (((b * C + qi).to(tl.int64) * HKV + kvh) * tl.num_programs(2) + sc) * NUM_SELECTED
    tl.store(out + place, top, mask=chosen)
    slot = tl.arange(0, KP)
    tl.store(out + slot, -1, mask=(slot >= tl.sum(chosen.to(tl.int32), 0)) & (slot < NUM_SELECTED))


@triton.jit
def slc_split_kernel(
    q, k, v, block_table, cache_seqlens, cand, idx, m_out, l_out, acc_out, qk_scale, HKV, C, MAX_PAGES, NSW,
    G: tl.constexpr, G_PAD: tl.constexpr, ROWS: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DK2: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr, PAGE: tl.constexpr,
    NUM_SELECTED: tl.constexpr, NUM_CAND: tl.constexpr, CAND_PAD: tl.constexpr, SLC_BLOCK: tl.constexpr,
    BPS: tl.constexpr, WRITE_IDX: tl.constexpr, PRECISION: tl.constexpr,
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
    dv = tl.arange(0, BLOCK_DV)
    qa, qb = load_split(q, b * C + qi, kvh * G + g, HQ, head_ok, DK, BLOCK_DK, BLOCK_DK2)
    ks = tl.arange(0, BLOCK_S)

    # This program's ranks sp * BPS .. + BPS - 1 of SPEC 4's top n, which lies among the select shares' candidates
    # (distinct keys, -1 for none); with WRITE_IDX each rank's block goes to its place in the ascending list idx
    # (-1 at the ranks no block fills).
    row = (b * C + qi).to(tl.int64) * HKV + kvh
    if NUM_CAND > NUM_SELECTED:
        # A key's rank is the number of keys above it.
        c = tl.arange(0, CAND_PAD)
        key = tl.load(cand + row * NUM_CAND + c, mask=c < NUM_CAND, other=-1)
        rank = tl.sum((key[None, :] > key[:, None]).to(tl.int32), 1)
        chosen = (key >= 0) & (rank < NUM_SELECTED)
        blk = tl.where(chosen, 0x7FFFFFFF - (key & 0x7FFFFFFF), -1).to(tl.int32)

    m_i, l_i, acc = empty_partial(ROWS, BLOCK_DV)
    # SPEC 5: the keys s <= t of this program's share of the selected blocks. A loop, not unrolled, whose loads
    # are masked rather than branched around (a rank no block fills loads nothing), so that the pipeliner copies
    # the next block's keys into shared memory while this one's are multiplied.
    for r in range(sp * BPS, sp * BPS + BPS):
        if NUM_CAND > NUM_SELECTED:
            j = tl.max(tl.where(rank == r, blk, -1), 0)
            if WRITE_IDX:
                place = tl.where(j >= 0, tl.sum((chosen & (blk < j)).to(tl.int32), 0), r)
                tl.store(idx + row * NUM_SELECTED + place, j, mask=r < NUM_SELECTED)
        else:
            # One share: its candidates are the top n, ascending, then -1.
            key = tl.load(cand + row * NUM_CAND + r, mask=r < NUM_SELECTED, other=-1)
            j = tl.where(key >= 0, 0x7FFFFFFF - (key & 0x7FFFFFFF), -1).to(tl.int32)
            if WRITE_IDX:
                tl.store(idx + row * NUM_SELECTED + r, j, mask=r < NUM_SELECTED)
        for s0 in tl.static_range(0, SLC_BLOCK, BLOCK_S):
            s = j * SLC_BLOCK + s0 + ks
            ok = (j >= 0) & (s0 + ks < SLC_BLOCK) & (s <= t)
            ka, kb, vt = kv_tile(k, v, block_table, b, kvh, s, ok, HKV, MAX_PAGES, PAGE, DK, DV, BLOCK_DK,
                                 BLOCK_DK2, dv)
            acc, m_i, l_i = key_step(acc, m_i, l_i, qa, qb, ka, kb, vt, head_ok[:, None] & ok[None, :], qk_scale,
                                     BLOCK_DK2, PRECISION)

    store_partial(m_out, l_out, acc_out, ((bh.to(tl.int64) * C + qi) * NSW + sp) * G_PAD + g, m_i, l_i, acc,
                  g < G_PAD, DV)


@triton.jit
def merge_splits(m_in, l_in, acc_in, FIRST: tl.constexpr, LAST: tl.constexpr, row0, split_stride, dv,
                 DV: tl.constexpr, SPLIT_T: tl.constexpr):
    """o [DV] of the softmax whose partial (m, l, acc) lie at row0 + split * split_stride for the splits
    FIRST .. LAST - 1, SPLIT_T at a time; 0 where no split saw a key. The steps are unrolled, so that every
    step's loads can be issued before the first one's merge."""
    m = tl.full([], float("-inf"), tl.float32)
    l = tl.zeros([], tl.float32)
    acc = tl.zeros([dv.shape[0]], tl.float32)
    for s0 in tl.static_range(FIRST, LAST, SPLIT_T):
        sp = s0 + tl.arange(0, SPLIT_T)
        ok = sp < LAST
        row = row0 + sp.to(tl.int64) * split_stride
        m_s = tl.load(m_in + row, mask=ok, other=float("-inf"))
        l_s = tl.load(l_in + row, mask=ok, other=0.0)
        acc_s = tl.load(acc_in + row[:, None] * DV + dv[None, :], mask=ok[:, None] & (dv < DV)[None, :], other=0.0)
        m, l, alpha, beta = merge_partials(m, l, m_s, l_s)
        acc = acc * alpha + tl.sum(acc_s * beta[:, None], 0)
    return acc / tl.where(l == 0.0, 1.0, l)


@triton.jit
def combine_kernel(
    cmp_m, cmp_l, cmp_acc, sw_m, sw_l, sw_acc, gates, o, HKV, C,
    G: tl.constexpr, G_PAD: tl.constexpr, DV: tl.constexpr, BLOCK_DV: tl.constexpr, NSPLIT: tl.constexpr,
    NSLC: tl.constexpr, NSW: tl.constexpr, SPLIT_T: tl.constexpr,
):
    # One program per query head: (sequence, KV group, query) and the head g of the group.
    bh = tl.program_id(0)
    b = bh // HKV
    kvh = bh % HKV
    qi = tl.program_id(1)
    g = tl.program_id(2)
    dv = tl.arange(0, BLOCK_DV)
    o_cmp = merge_splits(cmp_m, cmp_l, cmp_acc, 0, NSPLIT, bh.to(tl.int64) * NSPLIT * (C * G_PAD) + qi * G_PAD + g,
                         C * G_PAD, dv, DV, SPLIT_T)
    row0 = (bh.to(tl.int64) * C + qi) * NSW * G_PAD + g
    o_slc = merge_splits(sw_m, sw_l, sw_acc, 0, NSLC, row0, G_PAD, dv, DV, SPLIT_T)
    o_win = merge_splits(sw_m, sw_l, sw_acc, NSLC, NSW, row0, G_PAD, dv, DV, SPLIT_T)
    # SPEC 7, in the epilogue: no separate elementwise passes over the branch outputs.
    head = (b * C + qi).to(tl.int64) * (HKV * G) + kvh * G + g
    g_cmp = tl.load(gates + head * 3).to(tl.float32)
    g_slc = tl.load(gates + head * 3 + 1).to(tl.float32)
    g_win = tl.load(gates + head * 3 + 2).to(tl.float32)
    out = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win
    tl.store(o + head * DV + dv, out.to(o.dtype.element_ty), mask=dv < DV)


@triton.jit
def dense_split_kernel(
    q, k, v, block_table, cache_seqlens, m_out, l_out, acc_out, qk_scale, HKV, C, MAX_PAGES, NSPLIT, CHUNK,
    G: tl.constexpr, G_PAD: tl.constexpr, QT: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DK2: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr, PAGE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // HKV
    kvh = bh % HKV
    chunk = tl.program_id(2)
    qi, g, row_ok, qa, qb = query_rows(q, b, kvh, HKV, C, G, G_PAD, QT, DK, BLOCK_DK, BLOCK_DK2)
    past = tl.load(cache_seqlens + b)
    t = past + qi
    dv = tl.arange(0, BLOCK_DV)
    m_i, l_i, acc = empty_partial(QT * G_PAD, BLOCK_DV)
    # This chunk's keys up to the last query of the tile (causal: key s is visible to position t iff s <= t).
    ks = tl.arange(0, BLOCK_S)
    start = chunk * CHUNK
    stop = tl.minimum(start + CHUNK, past + tl.minimum(C, (tl.program_id(1) + 1) * QT))
    for s0 in range(start, stop, BLOCK_S):
        s = s0 + ks
        ok = s < stop
        ka, kb, vt = kv_tile(k, v, block_table, b, kvh, s, ok, HKV, MAX_PAGES, PAGE, DK, DV, BLOCK_DK, BLOCK_DK2, dv)
        visible = row_ok[:, None] & ok[None, :] & (s[None, :] <= t[:, None])
        acc, m_i, l_i = key_step(acc, m_i, l_i, qa, qb, ka, kb, vt, visible, qk_scale, BLOCK_DK2, PRECISION)
    store_partial(m_out, l_out, acc_out, (bh.to(tl.int64) * NSPLIT + chunk) * (C * G_PAD) + qi * G_PAD + g, m_i, l_i,
                  acc, qi < C, DV)


@triton.jit
def dense_merge_kernel(
    m_in, l_in, acc_in, o, HKV, C, G: tl.constexpr, G_PAD: tl.constexpr, DV: tl.constexpr, BLOCK_DV: tl.constexpr,
    NSPLIT: tl.constexpr, SPLIT_T: tl.constexpr,
):
    # One program per query head, as combine_kernel.
    bh = tl.program_id(0)
    b = bh // HKV
    kvh = bh % HKV
    qi = tl.program_id(1)
    g = tl.program_id(2)
    dv = tl.arange(0, BLOCK_DV)
    out = merge_splits(m_in, l_in, acc_in, 0, NSPLIT, bh.to(tl.int64) * NSPLIT * (C * G_PAD) + qi * G_PAD + g,
                       C * G_PAD, dv, DV, SPLIT_T)
    head = (b * C + qi).to(tl.int64) * (HKV * G) + kvh * G + g
    tl.store(o + head * DV + dv, out.to(o.dtype.element_ty), mask=dv < DV)


def _check(name, x, shape, meaning):
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {meaning} = {tuple(shape)}, got {tuple(x.shape)}")


def _pages(name, table, pool_names, k, v, batch):
    """(table, max_pages, page): a given block_table, or None and one page per sequence for contiguous [B, S_cap, ...]
    pools. The kernels address both pools k, v by the same rows: contiguous [pages, page_size, HKV, DK/DV] alike."""
    if table is not None and (table.dtype != torch.int32 or table.dim() != 2 or table.shape[0] != batch):
        raise ValueError(f"{name} must be int32 [B, max_pages] with B={batch}, got {table.dtype} {tuple(table.shape)}")
    if k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3] or not (k.is_contiguous() and v.is_contiguous()):
        raise ValueError(f"{pool_names} must be contiguous [pages, page_size, HKV, DK/DV] tensors alike, got "
                         f"{tuple(k.shape)} {'' if k.is_contiguous() else '(non-contiguous) '}and {tuple(v.shape)}"
                         f"{'' if v.is_contiguous() else ' (non-contiguous)'}")
    if table is None and k.shape[0] < batch:
        raise ValueError(f"{pool_names} without a block table must be [B, S_cap, HKV, D] with B={batch} rows or "
                         f"more, got {tuple(k.shape)}")
    return table, 1 if table is None else table.shape[1], k.shape[1]


def _check_step(q, k, v, cache_seqlens, block_table):
    """The checks nsa_decode and dense_decode share (q, the pools k, v and their table, cache_seqlens); returns
    (table, max_pages, page) as _pages does."""
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f"q must be float16, bfloat16 or float32 for the decode kernels, got {q.dtype}")
    if q.dim() != 4:
        raise ValueError(f"q must be [B, C, HQ, DK], got shape {tuple(q.shape)}")
    check_alike(q, k=k, v=v)
    check_device(q, cache_seqlens=cache_seqlens, block_table=block_table)
    B, _, HQ, DK = q.shape
    table, max_pages, page = _pages("block_table", block_table, "k, v", k, v, B)
    HKV = k.shape[2]
    if HKV < 1 or HQ % HKV:
        raise ValueError(f"the query heads HQ={HQ} must be a multiple of the key/value heads HKV={HKV}")
    if k.shape[3] != DK:
        raise ValueError(f"k's head dim must be q's DK={DK}, got {tuple(k.shape)}")
    if cache_seqlens.dtype != torch.int32 or tuple(cache_seqlens.shape) != (B,):
        raise ValueError(f"cache_seqlens must be int32 [B] = [{B}], got {cache_seqlens.dtype} "
                         f"{tuple(cache_seqlens.shape)}")
    return table, max_pages, page


_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _side_stream(dev: torch.device) -> torch.cuda.Stream:
    """One side stream per GPU, made on first use and reused by every later step (eager or captured)."""
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(index)
    return _SIDE_STREAMS[index]


def query_tile(C: int, g_pad: int) -> int:
    """Queries per program of the split kernels: their G_PAD heads each make a row, 16 to 64 rows in all."""
    return max(min(triton.next_power_of_2(C), max(1, 64 // g_pad)), 16 // min(g_pad, 16))


class SplitPlan(NamedTuple):
    """How nsa_decode spreads a step over programs; chosen from the capacity (not the lengths) so that shapes
    stay static."""

    r_pad: int  # the l'/d compressed tokens starting in a selection block, padded to a power of two
    tb: int  # selection blocks per tile of the compressed stream (BLOCK_N token slots)
    jc: int  # selection blocks per compressed chunk (a multiple of tb)
    nsplit: int  # compressed chunks
    bps: int  # selected blocks per program of slc_split
    stages: int  # pipeline stages of the compressed stream
    win_keys: int  # window keys per window program
    sj: int  # selection blocks per select program (its share, whose top n it passes on)
    nsel: int  # select programs per query and KV group
    short: bool  # compressed chunks of at most SHORT_CHUNK tiles (the window may end after select)


def split_plan(batch_heads: int, slc_capacity: int, cfg: SparsityConfig) -> SplitPlan:
    """CMP_PROGRAMS_PER_SM compressed chunks per SM in one wave (each a multiple of a tile's blocks), and
    SLC_PROGRAMS_PER_SM selected-block programs per SM in one wave."""
    r_pad = triton.next_power_of_2(cfg.slc_block // cfg.cmp_stride)
    tb = max(1, BLOCK_N // r_pad)
    per_pair = max(1, CMP_PROGRAMS_PER_SM * NUM_SMS // batch_heads)
    jc = tb * -(-slc_capacity // (per_pair * tb))
    jc = min(max(jc, 16, tb), max(MAX_CHUNK_BLOCKS, tb))
    bps = min(cfg.num_selected, -(-batch_heads * cfg.num_selected // (SLC_PROGRAMS_PER_SM * NUM_SMS)))
    nsplit = -(-slc_capacity // jc)
    sj = max(tb, min(triton.next_power_of_2(nsplit * jc), SELECT_SHARE_BLOCKS))
    short = jc // tb <= SHORT_CHUNK
    stages, win_keys = (2, max(BLOCK_S, WIN_KEYS // 2)) if short else (CMP_STAGES, WIN_KEYS)
    return SplitPlan(r_pad, tb, jc, nsplit, bps, stages, win_keys, sj, -(-nsplit * jc // sj), short)


def nsa_decode(q, gates, k, v, k_cmp, v_cmp, cache_seqlens, cfg: SparsityConfig, scale: float | None = None, *,
               k_win=None, v_win=None, block_table=None, win_block_table=None, return_indices: bool = False):
    """NSA of C new queries per sequence against a cache, each as the training path gives its position.

    Args:
        q: [B, C, HQ, DK] the new queries; query c of sequence b is at position cache_seqlens[b] + c.
        gates: [B, C, HQ, 3] the branch gates (cmp, slc, win) after the sigmoid.
        k, v: the selected branch's keys and values, already holding the C new tokens: [B, S_cap, HKV, DK/DV],
            or with block_table the page pools [num_pages, P, HKV, DK/DV].
        k_cmp, v_cmp: [B, Tc_cap, HKV, DK/DV], the first Tc(cache_seqlens[b] + C) rows of each sequence valid; any
            strides whose last is 1 (a head-major [B, HKV, Tc_cap, D] transposed, say), read in place.
        cache_seqlens: int32 [B], the tokens of each sequence before the C new ones.
        cfg: the knobs; scale: default 1 / sqrt(DK).
        k_win, v_win: the window branch's keys and values (default k, v): [B, W, HKV, DK/DV] holding token s at
            slot s % W (a ring, W >= window + C - 1), or pools addressed by win_block_table.
        block_table, win_block_table: int32 [B, max_pages] page indices (flash_attn_with_kvcache's convention).
        return_indices: also return idx [B, C, HKV, n] int32, the selected blocks (ascending, -1 after).
    Returns:
        o [B, C, HQ, DV] in q's dtype, or (o, idx). No host synchronisation; shapes depend only on the
        arguments' shapes. The kernels' float32 work buffers (partial softmaxes, each tile's block scores) grow
        with B * HKV * min(C, MAX_QUERIES) * G and with the capacity in blocks, S_cap / l'.
    """
    table, max_pages, page = _check_step(q, k, v, cache_seqlens, block_table)
    caches = dict(k_win=k_win, v_win=v_win, block_table=block_table, win_block_table=win_block_table)
    B, C, HQ, DK = q.shape
    HKV, DV = k.shape[2], v.shape[3]
    G = HQ // HKV
    _check("gates", gates, (B, C, HQ, 3), "[B, C, HQ, 3]")
    if not gates.is_floating_point():
        raise TypeError(f"gates must be a floating tensor, got {gates.dtype}")
    check_alike(q, k_cmp=k_cmp, v_cmp=v_cmp, k_win=k_win, v_win=v_win)
    check_device(q, gates=gates, win_block_table=win_block_table)
    if k_cmp.dim() != 4 or k_cmp.shape[0] != B or k_cmp.shape[2:] != (HKV, DK) or v_cmp.shape != (*k_cmp.shape[:3], DV):
        raise ValueError(f"k_cmp, v_cmp must be [B, Tc_cap, HKV, DK/DV] = [{B}, Tc_cap, {HKV}, {DK}/{DV}], got "
                         f"{tuple(k_cmp.shape)}, {tuple(v_cmp.shape)}")
    if (k_win is None) != (v_win is None):
        raise ValueError("k_win and v_win must be given together (or neither, to reuse k and v)")
    if k_win is None:
        k_win, v_win, win_table, win_max_pages, win_page = k, v, table, max_pages, page
    else:
        win_table, win_max_pages, win_page = _pages("win_block_table", win_block_table, "k_win, v_win", k_win, v_win,
                                                    B)
        if win_block_table is None and k_win.shape[1] < cfg.window + C - 1:
            raise ValueError(f"the window ring k_win must hold window + C - 1 = {cfg.window + C - 1} tokens, "
                             f"got {k_win.shape[1]}")
    scale = DK ** -0.5 if scale is None else scale
    if C > MAX_QUERIES:
        # A long chunk (a prefill in chunks) goes MAX_QUERIES queries at a time: the split buffers grow with the
        # queries times the capacity. The later queries' keys are already in the cache, where causality hides them.
        parts = [nsa_decode(q[:, c0:c0 + MAX_QUERIES], gates[:, c0:c0 + MAX_QUERIES], k, v, k_cmp, v_cmp,
                            cache_seqlens + c0, cfg, scale, return_indices=True, **caches)
                 for c0 in range(0, C, MAX_QUERIES)]
        o, idx = torch.cat([o for o, _ in parts], 1), torch.cat([idx for _, idx in parts], 1)
        return (o, idx) if return_indices else o
    dev = q.device
    q, gates = q.contiguous(), gates.contiguous()
    # Compressed K/V of any strides with a unit last one are read in place: a copy would move the whole cache.
    k_cmp, v_cmp = (x if x.stride(-1) == 1 else x.contiguous() for x in (k_cmp, v_cmp))
    (BLOCK_DK, BLOCK_DK2), BLOCK_DV = split_dim(DK), padded_dim(DV)
    precision = dot_precision(q.dtype)
    n = cfg.num_selected

    G_PAD = triton.next_power_of_2(G)
    QT = query_tile(C, G_PAD)
    plan = split_plan(B * HKV * C, -(-max_pages * page // cfg.slc_block), cfg)
    nb_cap, nt_cap = plan.nsplit * plan.jc, plan.nsplit * plan.jc // plan.tb
    rows = C * G_PAD
    f32 = dict(dtype=torch.float32, device=dev)
    cmp_m = torch.empty(B * HKV, plan.nsplit, rows, **f32)
    cmp_l = torch.empty(B * HKV, plan.nsplit, rows, **f32)
    cmp_acc = torch.empty(B * HKV, plan.nsplit, rows, DV, **f32)
    # Each tile's block scores, its spill into the next tile and the running max they are relative to.
    rec = torch.empty(B * HKV, rows, nb_cap, **f32)
    spill = torch.empty(B * HKV, rows, nt_cap, **f32)
    mt = torch.empty(B * HKV, rows, nt_cap, **f32)
    qk_scale = scale * LOG2E
    # The selected and window branches' partial softmaxes: nslc programs of selected blocks, then the window's.
    nslc = -(-n // plan.bps)
    nwin = -(-(cfg.window + QT - 1) // plan.win_keys)
    nsw = nslc + nwin
    sw_m = torch.empty(B * HKV, C, nsw, G_PAD, **f32)
    sw_l = torch.empty(B * HKV, C, nsw, G_PAD, **f32)
    sw_acc = torch.empty(B * HKV, C, nsw, G_PAD, DV, **f32)

    def compressed():
        cmp_split_kernel[(B * HKV, triton.cdiv(C, QT), plan.nsplit)](
            q, k_cmp, v_cmp, cache_seqlens, cmp_m, cmp_l, cmp_acc, rec, spill, mt, qk_scale, HKV, C, k_cmp.shape[1],
            *k_cmp.stride()[:3], *v_cmp.stride()[:3], plan.nsplit, nb_cap, nt_cap, G=G, G_PAD=G_PAD, QT=QT, DK=DK,
            DV=DV, BLOCK_DK=BLOCK_DK, BLOCK_DK2=BLOCK_DK2, BLOCK_DV=BLOCK_DV, TB=plan.tb, R_PAD=plan.r_pad,
            TILES=plan.jc // plan.tb, CMP_BLOCK=cfg.cmp_block, CMP_STRIDE=cfg.cmp_stride, SLC_BLOCK=cfg.slc_block,
            PRECISION=precision, num_warps=CMP_WARPS, num_stages=plan.stages,
        )

    def window():
        win_split_kernel[(B * HKV, triton.cdiv(C, QT), nwin)](
            q, k_win, v_win, win_table, cache_seqlens, sw_m, sw_l, sw_acc, qk_scale, HKV, C, win_max_pages, nsw,
            nslc, G=G, G_PAD=G_PAD, QT=QT, DK=DK, DV=DV, BLOCK_DK=BLOCK_DK, BLOCK_DK2=BLOCK_DK2, BLOCK_DV=BLOCK_DV,
            WINDOW=cfg.window, WT=plan.win_keys, BLOCK_S=BLOCK_S, WIN_PAGE=win_page, PRECISION=precision,
            num_warps=WIN_WARPS,
        )

    side = _side_stream(dev) if dev.type == "cuda" else None
    if side is None:
        window()
        compressed()
    else:
        # The window on a side stream, forked before the compressed launch (so that it waits on nothing of it) and
        # joined before slc_split or combine (below): the compressed programs, which select waits for, are
        # dispatched first, and the window's take the SMs as they come free.
        main = torch.cuda.current_stream(dev)
        side.wait_stream(main)
        compressed()
        with torch.cuda.stream(side):
            window()
    # Each select program's candidates (its share's top n as selection keys), then the chosen blocks (written only
    # on request: otherwise slc_split gets cand in idx's place and never stores there).
    cand = torch.empty(B, C, HKV, plan.nsel * n, dtype=torch.int64, device=dev)
    idx = torch.empty(B, C, HKV, n, dtype=torch.int32, device=dev) if return_indices else cand
    kp = triton.next_power_of_2(n)
    select_kernel[(B * HKV, C, plan.nsel)](
        cmp_m, cmp_l, rec, spill, mt, cache_seqlens, cand, HKV, C, plan.nsplit, nb_cap, nt_cap, G=G, G_PAD=G_PAD,
        SPLIT_T=SPLIT_T, SJ=plan.sj, TB=plan.tb, KP=kp, TOPK=min(kp, plan.sj), HEAD_GROUP=min(HEAD_GROUP, G_PAD),
        NUM_SELECTED=n, NUM_INIT=cfg.num_init, NUM_LOCAL=cfg.num_local,
        CMP_BLOCK=cfg.cmp_block, CMP_STRIDE=cfg.cmp_stride, SLC_BLOCK=cfg.slc_block,
        num_warps=max(SELECT_MIN_WARPS, min(16, plan.sj // SELECT_WARP_BLOCKS)),
    )
    # Where the compressed chunks are long the window ends before select does, and the join goes before slc_split:
    # a launch behind a cross-stream join starts 1.4-2.1 us after its last predecessor ends, one that waits on its
    # own stream alone 0.1-0.5 us, and combine (3.4 us) then waits on its own stream alone. On the H200 at B16 that took
    # the step from 0.0889-0.0891 ms to 0.0885-0.0887 at 64k and from 0.1327-0.1330 to 0.1317-0.1318 at 128k. Where
    # the chunks are short (8k at B16, B1) the window can end after select, and the join stays before combine.
    join_early = side is not None and not plan.short
    if join_early:
        main.wait_stream(side)
    slc_split_kernel[(B * HKV, C, nslc)](
        q, k, v, table, cache_seqlens, cand, idx, sw_m, sw_l, sw_acc, qk_scale, HKV, C, max_pages, nsw, G=G,
        G_PAD=G_PAD, ROWS=max(16, G_PAD), DK=DK, DV=DV, BLOCK_DK=BLOCK_DK, BLOCK_DK2=BLOCK_DK2, BLOCK_DV=BLOCK_DV,
        BLOCK_S=min(BLOCK_S, max(16, triton.next_power_of_2(cfg.slc_block))), PAGE=page, NUM_SELECTED=n,
        NUM_CAND=plan.nsel * n, CAND_PAD=triton.next_power_of_2(plan.nsel * n), SLC_BLOCK=cfg.slc_block,
        BPS=plan.bps, WRITE_IDX=return_indices, PRECISION=precision, num_warps=SLC_WARPS, num_stages=SLC_STAGES,
    )
    if side is not None and not join_early:
        main.wait_stream(side)
    o = torch.empty(B, C, HQ, DV, dtype=q.dtype, device=dev)
    combine_kernel[(B * HKV, C, G)](
        cmp_m, cmp_l, cmp_acc, sw_m, sw_l, sw_acc, gates, o, HKV, C, G=G, G_PAD=G_PAD, DV=DV, BLOCK_DV=BLOCK_DV,
        NSPLIT=plan.nsplit, NSLC=nslc, NSW=nsw, SPLIT_T=SPLIT_T, num_warps=COMBINE_WARPS,
    )
    return (o, idx) if return_indices else o


def dense_decode(q, k, v, cache_seqlens, scale: float | None = None, *, block_table=None):
    """Full causal attention of C new queries per sequence against a cache: the dense counterpart of nsa_decode
    (a dense model's decode step), split over the keys so that a short batch still fills the GPU.

    Args:
        q: [B, C, HQ, DK]; query c of sequence b is at position cache_seqlens[b] + c and sees keys s <= that.
        k, v: [B, S_cap, HKV, DK/DV] already holding the C new tokens, or with block_table page pools
            [num_pages, P, HKV, DK/DV].
        cache_seqlens: int32 [B], the tokens of each sequence before the C new ones.
        scale: default 1 / sqrt(DK).
        block_table: int32 [B, max_pages] page indices (flash_attn_with_kvcache's convention).
    Returns:
        o [B, C, HQ, DV] in q's dtype. No host synchronisation; shapes depend only on the arguments' shapes (the
        keys are split by the capacity, and each program reads only its share of a sequence's keys), so a step
        can be captured in a CUDA graph. The float32 partial softmaxes take B * HKV * C * G_PAD * (DV + 2) * 4
        bytes per split, about 2 * 132 programs in all.
    """
    table, max_pages, page = _check_step(q, k, v, cache_seqlens, block_table)
    B, C, HQ, DK = q.shape
    HKV, DV = k.shape[2], v.shape[3]
    scale = DK ** -0.5 if scale is None else scale
    if C > MAX_QUERIES:
        return torch.cat([dense_decode(q[:, c0:c0 + MAX_QUERIES], k, v, cache_seqlens + c0, scale,
                                       block_table=block_table) for c0 in range(0, C, MAX_QUERIES)], 1)
    q = q.contiguous()
    G = HQ // HKV
    G_PAD = triton.next_power_of_2(G)
    QT = query_tile(C, G_PAD)
    tiles = triton.cdiv(C, QT)
    capacity = max_pages * page
    # About two programs per SM, each taking `chunk` keys of a sequence (a multiple of BLOCK_S), and at most
    # DENSE_MAX_SPLITS of them per query tile.
    splits = min(DENSE_MAX_SPLITS, triton.cdiv(2 * NUM_SMS, B * HKV * tiles))
    chunk = BLOCK_S * triton.cdiv(capacity, BLOCK_S * splits)
    nsplit = triton.cdiv(capacity, chunk)
    f32 = dict(dtype=torch.float32, device=q.device)
    m = torch.empty(B * HKV, nsplit, C * G_PAD, **f32)
    l = torch.empty(B * HKV, nsplit, C * G_PAD, **f32)
    acc = torch.empty(B * HKV, nsplit, C * G_PAD, DV, **f32)
    (BLOCK_DK, BLOCK_DK2), BLOCK_DV = split_dim(DK), padded_dim(DV)
    dense_split_kernel[(B * HKV, tiles, nsplit)](
        q, k, v, table, cache_seqlens, m, l, acc, scale * LOG2E, HKV, C, max_pages, nsplit, chunk, G=G, G_PAD=G_PAD,
        QT=QT, DK=DK, DV=DV, BLOCK_DK=BLOCK_DK, BLOCK_DK2=BLOCK_DK2, BLOCK_DV=BLOCK_DV, BLOCK_S=BLOCK_S, PAGE=page,
        PRECISION=dot_precision(q.dtype), num_warps=CMP_WARPS, num_stages=3,
    )
    o = torch.empty(B, C, HQ, DV, dtype=q.dtype, device=q.device)
    dense_merge_kernel[(B * HKV, C, G)](m, l, acc, o, HKV, C, G=G, G_PAD=G_PAD, DV=DV, BLOCK_DV=BLOCK_DV,
                                        NSPLIT=nsplit, SPLIT_T=SPLIT_T, num_warps=COMBINE_WARPS)
    return o

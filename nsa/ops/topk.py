"""Block importance (SPEC 3) and top-n block selection (SPEC 4) in one streaming pass, without a [T, Tc] or
[T, T/l'] buffer.

One program holds BLOCK_T queries of one KV group with all G heads of the group as the rows of its tiles
(row r is query t0 + r // G_PAD, head r % G_PAD). It walks the selection blocks in tiles of BJ blocks. For each
tile it loads the compressed tokens that overlap those blocks (BJ * l'/d of them, plus the l/d - 1 before that
reach into the first block), turns scale * q.k_cmp into the compressed branch's probabilities with cmp_fwd's
lse, folds them into block scores with one product by the overlap matrix ov(i, j) / d, sums the G heads, and
merges the tile into a running top-n kept in registers.

The running top-n is an unordered set of n keys per query with its minimum as the bar to enter: a tile costs
one insertion round (a row maximum of the tile, an argmin of the set) per key that beats its row's bar, as many
rounds as the row with the most such keys needs, and never more than n: the rounds take the tile's keys in
descending order, so once n of them are in, every key left has n larger ones in the union and stays out. Past
the first tiles few blocks beat the n-th best seen so far, so most tiles need no round at all, where a sorted
merge would pay n rounds for every tile.

Top-n keys are int64: the float32 score's bits (order-preserving for scores >= 0) in the high word and
2^31 - 1 - j in the low word, so that the larger key wins and equal scores go to the smaller block j. Forced
blocks get +inf's bits; blocks that are no candidate get -1 and are never output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..config import SparsityConfig
from .common import LOG2E, Packed, autotune_configs, dot_split, largest, load_split, tile_offsets
from .compressed import group_program, group_rows, group_tiling

# Compressed tokens per tile of the scoring product: 31 blocks of the paper's knobs per tile.
BLOCK_N = 128


def _configs():
    return autotune_configs([triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3)])


@triton.jit
def fold_exact(p, ov):
    """p [M, K] @ ov [K, N] at float32 accuracy for ov exact in tf32 (overlaps / d are small integers): p as
    its tf32 head plus the rest, two tf32 products with error ~2^-21 of p where tf32x3 would take three, so
    near-ties stay resolved."""
    p_head = (p.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
    rows = tl.dot(p_head, ov, input_precision="tf32")
    return rows + tl.dot(p - p_head, ov, input_precision="tf32")


@triton.autotune(configs=_configs(), key=["G_PAD", "BLOCK_DK", "BLOCK_DK2", "KT", "KP", "DOT_PREC", "ONE_TO_ONE"])
@triton.jit
def select_blocks_kernel(
    q, k_cmp, lse, idx, cu_seqlens, cu_cmp, scale2, HKV,
    G: tl.constexpr, G_PAD: tl.constexpr, DK: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DK2: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BJ: tl.constexpr, KT: tl.constexpr, KP: tl.constexpr,
    NUM_SELECTED: tl.constexpr, NUM_INIT: tl.constexpr, NUM_LOCAL: tl.constexpr,
    CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, SLC_BLOCK: tl.constexpr, DOT_PREC: tl.constexpr,
    ONE_TO_ONE: tl.constexpr,
):
    # The last query tiles have the most candidate blocks: group_program starts them first.
    kvh, tok0, seq_len, t0, cmp0, num_cmp = group_program(cu_seqlens, cu_cmp, HKV, BLOCK_T)
    if t0 >= seq_len:
        return
    HQ = HKV * G
    t, g, valid = group_rows(t0, seq_len, G, G_PAD, BLOCK_T)
    qa, qb = load_split(q, tok0 + t, kvh * G + g, HQ, valid, DK, BLOCK_DK, BLOCK_DK2)
    # Padded heads and queries past the end get lse = +inf: probability 0, so they add nothing to the scores.
    lse2 = tl.load(lse + (tok0 + t).to(tl.int64) * HQ + kvh * G + g, mask=valid, other=float("inf")) * 1.4426950408889634

    tq = t0 + tl.arange(0, BLOCK_T)
    jt = tq // SLC_BLOCK
    jj = tl.arange(0, KT)
    slot = tl.arange(0, KP)
    # The top-n set: empty slots hold -1 (below every candidate); slots past n hold the largest int64, so
    # they are never the minimum that the next insertion replaces.
    best = tl.where(slot[None, :] < NUM_SELECTED, tl.full([BLOCK_T, KP], -1, tl.int64), 0x7FFFFFFFFFFFFFFF)
    bar = tl.min(best, 1)
    # SPEC 3's overlap ov(i, j) / d of the tile's compressed token i with its block j depends only on their places
    # in the tile (tiles step by whole blocks of l'/d tokens, d dividing l'): one matrix serves every tile.
    i_rel = tl.arange(0, BLOCK_N) - (CMP_BLOCK // CMP_STRIDE - 1)
    lo = tl.maximum(i_rel[:, None] * CMP_STRIDE, jj[None, :] * SLC_BLOCK)
    hi = tl.minimum(i_rel[:, None] * CMP_STRIDE + CMP_BLOCK, (jj[None, :] + 1) * SLC_BLOCK)
    ov = tl.where((jj < BJ)[None, :], tl.maximum(hi - lo, 0), 0).to(tl.float32) / CMP_STRIDE
    # Blocks up to the last query's own block; queries past the end of the sequence are never stored.
    for j0 in range(0, (t0 + BLOCK_T - 1) // SLC_BLOCK + 1, BJ):
        i = j0 * (SLC_BLOCK // CMP_STRIDE) + i_rel
        in_seq = (i >= 0) & (i < num_cmp)
        ka, kb = load_split(k_cmp, cmp0 + i, kvh, HKV, in_seq, DK, BLOCK_DK, BLOCK_DK2)
        s = dot_split(qa, qb, ka, kb, BLOCK_DK2, DOT_PREC) * scale2
        visible = in_seq[None, :] & (i[None, :] * CMP_STRIDE + CMP_BLOCK <= t[:, None] + 1)
        p = tl.where(visible, tl.exp2(s - lse2[:, None]), 0.0)

        # SPEC 3: S[t, j] = sum over heads and tokens of p[t, h, i] * ov(i, j) / d, as one product; where
        # l = d = l' token j is block j (ov is the identity) and the heads' sum is the score.
        j = j0 + jj
        if ONE_TO_ONE:
            score = tl.sum(tl.reshape(p, [BLOCK_T, G_PAD, KT]), 1)
        else:
            score = tl.sum(tl.reshape(fold_exact(p, ov), [BLOCK_T, G_PAD, KT]), 1)

        # SPEC 4: candidates j*l' <= t; forced: the first num_init and the num_local blocks ending at t.
        candidate = (jj < BJ)[None, :] & (j[None, :] * SLC_BLOCK <= tq[:, None])
        forced = (j[None, :] < NUM_INIT) | ((j[None, :] <= jt[:, None]) & (j[None, :] > jt[:, None] - NUM_LOCAL))
        # A score that rounds to -0.0 would read as a negative key: zero it.
        bits = tl.where(score > 0, score.to(tl.int32, bitcast=True), 0)
        bits = tl.where(forced, 0x7F800000, bits).to(tl.int64)
        key = (bits << 32) | (0x7FFFFFFF - j[None, :]).to(tl.int64)
        key = tl.where(candidate, key, -1)

        # Only keys above their row's bar enter; each round moves the largest remaining one of every row in,
        # in place of the row's minimum (a row whose largest is below its bar is left as it is). At most n
        # rounds: the first tile of a long sequence has BJ candidates above the empty set's bar.
        rounds = tl.minimum(tl.max(tl.sum((key > bar[:, None]).to(tl.int32), 1)), NUM_SELECTED)
        for _ in range(rounds):
            top = tl.max(key, 1)
            out = tl.argmin(best, 1)
            best = tl.where((slot[None, :] == out[:, None]) & (top > bar)[:, None], top[:, None], best)
            key = tl.where(key == top[:, None], -1, key)
            bar = tl.min(best, 1)

    # Order the chosen blocks by j: the largest -j first.
    chosen_slot = (best >= 0) & (slot[None, :] < NUM_SELECTED)
    neg_j = tl.where(chosen_slot, (best & 0x7FFFFFFF) - 0x7FFFFFFF, -0x7FFFFFFF)
    chosen = -largest(neg_j, NUM_SELECTED, KP, -0x7FFFFFFF)
    chosen = tl.where(chosen == 0x7FFFFFFF, -1, chosen).to(tl.int32)
    offs = (tok0 + tq).to(tl.int64)[:, None] * (HKV * NUM_SELECTED) + kvh * NUM_SELECTED + slot[None, :]
    tl.store(idx + offs, chosen, mask=(tq < seq_len)[:, None] & (slot < NUM_SELECTED)[None, :])


def select_blocks(q, k_cmp, lse, packed: Packed, cfg: SparsityConfig, scale: float,
                  block_n: int = BLOCK_N) -> torch.Tensor:
    """Top-n selection blocks of every query and KV group (SPEC 3-4), from the compressed branch's lse.

    Args:
        q: [N_tok, HQ, DK] packed queries; k_cmp: [N_cmp, HKV, DK] packed per sequence;
        lse: [N_tok, HQ] float32, cmp_fwd's log-sum-exp (+inf where a query sees no compressed token).
        block_n: compressed tokens per tile (a power of two, raised to fit one block): fewer blocks per tile
            make tiny tests merge several tiles.
    Returns:
        idx [N_tok, HKV, num_selected] int32: block indices relative to the sequence start, ascending,
        -1 after the last selected block.
    """
    for name, x in (("q", q), ("k_cmp", k_cmp)):
        if x.dim() != 3 or x.shape[-1] % 16 or not 16 <= x.shape[-1] <= 256:
            raise ValueError(f"{name} must be [N, H, D] with D a multiple of 16 in [16, 256], got {tuple(x.shape)}")
    N, HQ, DK = q.shape
    HKV = k_cmp.shape[1]
    if HQ % HKV or k_cmp.shape[2] != DK:
        raise ValueError(f"k_cmp {tuple(k_cmp.shape)} must have q's DK and a number of heads dividing q's {HQ}")
    if lse.shape != (N, HQ) or lse.dtype != torch.float32:
        raise ValueError(f"lse must be float32 [N_tok, HQ] = {(N, HQ)}, got {lse.dtype} {tuple(lse.shape)}")
    n = cfg.num_selected
    idx = torch.empty(N, HKV, n, dtype=torch.int32, device=q.device)
    if N == 0:
        return idx
    q, lse = q.contiguous(), lse.contiguous()
    # With no compressed token at all the kernel still selects (all scores 0); it reads no key then.
    k_cmp = k_cmp.contiguous() if k_cmp.shape[0] else k_cmp.new_zeros(1, HKV, DK)
    tiling = group_tiling(HQ, HKV, DK, DK, q.dtype)
    tiling.pop("BLOCK_DV")
    tokens_per_block, lead = cfg.slc_block // cfg.cmp_stride, cfg.cmp_block // cfg.cmp_stride - 1
    # A tile of BJ blocks reads BJ * l'/d tokens plus the `lead` before them that reach into its first block.
    block_n = max(16, block_n, triton.next_power_of_2(tokens_per_block + lead))
    bj = (block_n - lead) // tokens_per_block
    grid = (triton.cdiv(packed.max_len, tiling["BLOCK_T"]), packed.num_seqs * HKV)
    select_blocks_kernel[grid](
        q, k_cmp, lse, idx, packed.cu_seqlens, packed.cu_cmp, scale * LOG2E, HKV, DK=DK,
        BLOCK_N=block_n, BJ=bj, KT=max(16, triton.next_power_of_2(bj)), KP=triton.next_power_of_2(n),
        NUM_SELECTED=n, NUM_INIT=cfg.num_init, NUM_LOCAL=cfg.num_local,
        CMP_BLOCK=cfg.cmp_block, CMP_STRIDE=cfg.cmp_stride, SLC_BLOCK=cfg.slc_block,
        ONE_TO_ONE=cfg.cmp_block == cfg.cmp_stride == cfg.slc_block, **tiling,
    )
    return idx

"""Block importance (SPEC 3) and top-n block selection (SPEC 4) in one streaming pass, without a [T, Tc] or
[T, T/l'] buffer.

One program holds BLOCK_T queries of one KV group with all G heads of the group as the rows of its tiles: row r
is head g of query t0 + q, g made of the bits of r in HEAD_BITS and q of the others (ROW_HEAD_BITS says which, so
that the sum over a query's heads is mostly additions within a thread; sum_bits). It walks the selection blocks in
tiles of BJ blocks, loading the R = l'/d compressed tokens that start in each block (padded to R_PAD, a power of
two; column n holds token k of block j, k made of the bits of n in K_BITS, j of the others). For each tile it turns
scale * q.k_cmp into the compressed branch's probabilities with cmp_fwd's lse, sums the G heads, and folds the
sum into block scores on the CUDA cores in float32: SPEC 3's overlap ov(i, j) / d of token k of block m is w0[k]
with block m and w1[k] = (k*d + l - l')^+ / d with block m + 1 (l <= l', so no token reaches further). The spill
into the next block moves one block along (the last block's spill is carried into the next tile), and the tile
merges into a running top-n kept in registers. Tiles whose tokens the program's first query already sees skip the
staircase mask (every later query sees them too).

The running top-n is kept sorted in descending order, KP = next_power_of_2(n) >= 2 keys per query (the n-th is the
bar to enter). A tile whose keys all stay under their rows' bars is skipped; otherwise its own top KP (Triton's
bitonic top-k) merge with the set in one bitonic step: the set against the tile's top in ascending order, the
larger of each pair, gives the KP largest of both as a bitonic sequence, sorted again in log2(KP) stages. The
cost per tile is fixed, however many of its keys enter.

Top-n keys are int64: the float32 score's bits (order-preserving for scores >= 0) in the high word and
2^31 - 1 - j in the low word, so that the larger key wins and equal scores go to the smaller block j. Forced
blocks get +inf's bits; blocks that are no candidate get -1 and are never output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.jit import constexpr_function

from ..config import SparsityConfig
from .common import LOG2E, Packed, autotune_configs, dot_split, largest, load_split
from .compressed import group_program, group_tiling, num_visible

# Compressed token slots per tile of the scoring product (16 blocks of the paper's knobs, 4 tokens each), and rows
# (queries x heads of a group) per program, in programs of four warps: about 100 KB of shared memory each, so two
# run on one SM and one's product overlaps the other's exponentials, sums and merge. At 64k in the paper's
# configuration on the H200 the selection took 11.0 ms with 256 rows in eight warps, 10.5 with 128 in four.
BLOCK_N = 64
BLOCK_M = 128
NUM_WARPS = 4
# Which bits of a row's index make its head within the group, and of a column's index the token within its block,
# in order of preference: those the product's tile keeps in one thread's registers first (on Hopper with four
# warps over 128 rows, bits 3 and 6 of the row, 0, 3, 4 and 5 of the column), so that most of the sums over a
# query's heads and over a block's tokens are additions in registers rather than shuffles between lanes.
ROW_HEAD_BITS = (3, 6, 0, 1, 2, 4, 5)
COLUMN_TOKEN_BITS = (0, 3, 4, 5, 1, 2)


@constexpr_function
def _log2(n):
    return n.bit_length() - 1


@constexpr_function
def _bits_below(mask, b):
    """How many bits of mask lie below bit b."""
    return bin(mask & ((1 << b) - 1)).count("1")


@constexpr_function
def _bits_above(mask, b):
    """How many bits of mask lie above bit b."""
    return bin(mask >> (b + 1)).count("1")


@triton.jit
def gather_bits(x, MASK: tl.constexpr, NBITS: tl.constexpr):
    """The bits of x (integers below 2^NBITS) at the positions set in MASK, packed in ascending order."""
    out = tl.zeros_like(x)
    for b in tl.static_range(NBITS):
        if (MASK >> b) & 1:
            out |= ((x >> b) & 1) << _bits_below(MASK, b)
    return out


@triton.jit
def sum_bits(x, MASK: tl.constexpr, AXIS: tl.constexpr):
    """x [M, N] (powers of two) summed over the indices of axis AXIS that differ only in the bits set in
    MASK: the result's index along AXIS is gather_bits(index, ~MASK).

    The tensor-core accumulators (mma v2 and v3) keep row bits 0-2 and column bits 1-2 of a tile across the lanes
    of a warp and the other bits in a thread's registers (or across warps): the register bits are summed first,
    with additions, so that fewer values are left to shuffle between lanes."""
    M: tl.constexpr = x.shape[0]
    N: tl.constexpr = x.shape[1]
    NBITS: tl.constexpr = _log2(x.shape[AXIS])
    if AXIS == 0:
        x = tl.reshape(x, [2] * NBITS + [N])
        LANES: tl.constexpr = 0b111
    else:
        x = tl.reshape(x, [M] + [2] * NBITS)
        LANES: tl.constexpr = 0b110
    # Bit b is axis AXIS + NBITS - 1 - b less the bits above it already summed.
    REGS: tl.constexpr = MASK & ~LANES
    for b in tl.static_range(NBITS - 1, -1, -1):
        if (REGS >> b) & 1:
            x = tl.sum(x, AXIS + NBITS - 1 - b - _bits_above(REGS, b))
    for b in tl.static_range(NBITS - 1, -1, -1):
        if ((MASK & LANES) >> b) & 1:
            x = tl.sum(x, AXIS + NBITS - 1 - b - _bits_above(MASK, b))
    if AXIS == 0:
        x = tl.reshape(x, [x.numel // N, N])
    else:
        x = tl.reshape(x, [M, x.numel // M])
    return x


@triton.jit
def fold_blocks(p, k, spill_in, K_BITS: tl.constexpr, R: tl.constexpr, CMP_BLOCK: tl.constexpr,
                CMP_STRIDE: tl.constexpr, SLC_BLOCK: tl.constexpr):
    """SPEC 3's fold of compressed-token weights into selection-block scores, on the CUDA cores in float32.

    p [M, N]: row m's weight of the tile's column n, which holds token k[n] of a block (the R = l'/d tokens
    starting in it, padded to a power of two); the block is the number the bits of n outside K_BITS make
    (sum_bits). Token k overlaps its own block by w0[k] * d and the next by w1[k] * d (l <= l', so no token
    reaches further). spill_in [M] (or None): what the block before the tile spills into its first block.
    Returns (score [M, BJ]: each block's own tokens plus what the previous block spills into it; spill [M]: what
    the tile's last block spills into the block after the tile)."""
    w0 = tl.where(k < R, tl.minimum(k * CMP_STRIDE + CMP_BLOCK, SLC_BLOCK) - k * CMP_STRIDE, 0) / CMP_STRIDE
    score = sum_bits(p * w0[None, :], K_BITS, 1)
    BJ: tl.constexpr = score.shape[1]
    if spill_in is not None:
        # Added in the layout the sums leave, before the shifted spills join in another one: one conversion less.
        score += tl.where(tl.arange(0, BJ)[None, :] == 0, spill_in[:, None], 0.0)
    if CMP_BLOCK > CMP_STRIDE:
        w1 = tl.where(k < R, tl.maximum(k * CMP_STRIDE + CMP_BLOCK - SLC_BLOCK, 0), 0) / CMP_STRIDE
        spills = sum_bits(p * w1[None, :], K_BITS, 1)
        jj = tl.arange(0, BJ)
        prev = tl.broadcast_to(tl.maximum(jj - 1, 0)[None, :], (p.shape[0], BJ))
        score += tl.where(jj[None, :] == 0, 0.0, tl.gather(spills, prev, 1))
        spill = tl.sum(tl.where(jj[None, :] == BJ - 1, spills, 0.0), 1)
    else:
        spill = tl.zeros([p.shape[0]], tl.float32)
    return score, spill


@triton.jit
def selection_bits(score, j, jt, candidate, NUM_INIT: tl.constexpr, NUM_LOCAL: tl.constexpr):
    """SPEC 4's order of blocks j as int32 (score, j, jt and candidate broadcast together): the float32 score's
    bits, which order non-negative floats as integers; the forced blocks (the first NUM_INIT, the NUM_LOCAL ending
    at block jt) +inf's bits; -1 where a block is no candidate. Equal bits rank the smaller j first."""
    forced = (j < NUM_INIT) | ((j <= jt) & (j > jt - NUM_LOCAL))
    # A score that rounds to -0.0 would read as a negative key: zero it.
    bits = tl.where(score > 0, score.to(tl.int32, bitcast=True), 0)
    return tl.where(candidate, tl.where(forced, 0x7F800000, bits), -1)


@triton.jit
def selection_keys(score, j, jt, candidate, NUM_INIT: tl.constexpr, NUM_LOCAL: tl.constexpr):
    """SPEC 4's int64 top-n keys of blocks j, distinct per row: selection_bits high, 2^31 - 1 - j low; -1 where a
    block is no candidate."""
    bits = selection_bits(score, j, jt, candidate, NUM_INIT, NUM_LOCAL)
    return tl.where(bits >= 0, (bits.to(tl.int64) << 32) | (0x7FFFFFFF - j).to(tl.int64), -1)


@triton.jit
def ascending_blocks(best, NUM_SELECTED: tl.constexpr):
    """int32 [rows, KP]: the blocks of the first NUM_SELECTED keys of best [rows, KP] (descending, -1 when empty)
    in ascending order, -1 after the last."""
    KP: tl.constexpr = best.shape[1]
    slot = tl.arange(0, KP)[None, :]
    # The largest -j first.
    neg_j = tl.where((best >= 0) & (slot < NUM_SELECTED), (best & 0x7FFFFFFF) - 0x7FFFFFFF, -0x7FFFFFFF)
    chosen = -largest(neg_j, NUM_SELECTED, KP, -0x7FFFFFFF)
    return tl.where(chosen == 0x7FFFFFFF, -1, chosen).to(tl.int32)


@triton.jit
def _tile_keys(qa, qb, k_cmp, lse2, spill, j0, t, tq, jt, cmp0, num_cmp, kvh, HKV, scale2, DK: tl.constexpr,
               BLOCK_DK: tl.constexpr, BLOCK_DK2: tl.constexpr, BJ: tl.constexpr, R_PAD: tl.constexpr,
               HEAD_BITS: tl.constexpr, K_BITS: tl.constexpr, NUM_INIT: tl.constexpr, NUM_LOCAL: tl.constexpr,
               CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, SLC_BLOCK: tl.constexpr, DOT_PREC: tl.constexpr,
               MASKED: tl.constexpr):
    """The top-n keys [BLOCK_T, BJ] of blocks j0 .. j0 + BJ for the program's queries, and the spill of the
    tile's last block into the next tile. Without MASKED every row sees every token of the tile."""
    R: tl.constexpr = SLC_BLOCK // CMP_STRIDE
    # Column n holds token k of block j0 + j, k and j made of the bits of n inside and outside K_BITS.
    NBITS: tl.constexpr = _log2(BJ * R_PAD)
    n = tl.arange(0, BJ * R_PAD)
    k = gather_bits(n, K_BITS, NBITS)
    i = (j0 + gather_bits(n, (BJ * R_PAD - 1) ^ K_BITS, NBITS)) * R + k
    if MASKED:
        in_seq = (k < R) & (i < num_cmp)
    else:
        in_seq = k < R
    ka, kb = load_split(k_cmp, cmp0 + i, kvh, HKV, in_seq, DK, BLOCK_DK, BLOCK_DK2)
    s = dot_split(qa, qb, ka, kb, BLOCK_DK2, DOT_PREC) * scale2
    if MASKED:
        visible = in_seq[None, :] & (i[None, :] * CMP_STRIDE + CMP_BLOCK <= t[:, None] + 1)
        p = tl.where(visible, tl.exp2(s - lse2[:, None]), 0.0)
    elif R == R_PAD:
        p = tl.exp2(s - lse2[:, None])
    else:
        # Padding slots hold the next block's tokens, which a row may not see: their score may exceed its lse.
        p = tl.where(in_seq[None, :], tl.exp2(s - lse2[:, None]), 0.0)

    # SPEC 3: S[t, j] = sum over heads and tokens of p[t, h, i] * ov(i, j) / d: the heads' sum first.
    p = sum_bits(p, HEAD_BITS, 0)
    score, spill_out = fold_blocks(p, k, spill, K_BITS, R, CMP_BLOCK, CMP_STRIDE, SLC_BLOCK)
    j = j0 + tl.arange(0, BJ)
    # SPEC 4: candidates j*l' <= t; forced: the first num_init and the num_local blocks ending at t.
    candidate = j[None, :] * SLC_BLOCK <= tq[:, None]
    return selection_keys(score, j[None, :], jt[:, None], candidate, NUM_INIT, NUM_LOCAL), spill_out


@triton.jit
def _merge_keys(best, bar, key, NUM_SELECTED: tl.constexpr):
    """The running top-n best [BLOCK_T, KP] (descending) and its bar (the n-th key) with a tile's keys merged
    in; a tile with no key above its rows' bars is skipped."""
    if tl.max(tl.sum((key > bar[:, None]).to(tl.int32), 1)) > 0:
        KP: tl.constexpr = best.shape[1]
        best = tl.bitonic_merge(tl.maximum(best, tl.flip(tl.topk(key, KP), 1)), descending=True)
        bar = tl.sum(tl.where(tl.arange(0, KP)[None, :] == NUM_SELECTED - 1, best, 0), 1)
    return best, bar


def _configs():
    return autotune_configs([triton.Config({}, num_warps=NUM_WARPS, num_stages=s) for s in (2, 3)])


@triton.autotune(configs=_configs(), key=["G_PAD", "BLOCK_DK", "BLOCK_DK2", "BJ", "R_PAD", "KP", "DOT_PREC"])
@triton.jit
def select_blocks_kernel(
    q, k_cmp, lse, idx, cu_seqlens, cu_cmp, scale2, HKV,
    G: tl.constexpr, G_PAD: tl.constexpr, DK: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DK2: tl.constexpr,
    BLOCK_T: tl.constexpr, BJ: tl.constexpr, R_PAD: tl.constexpr, KP: tl.constexpr, HEAD_BITS: tl.constexpr,
    K_BITS: tl.constexpr, NUM_SELECTED: tl.constexpr, NUM_INIT: tl.constexpr, NUM_LOCAL: tl.constexpr,
    CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, SLC_BLOCK: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # The last query tiles have the most candidate blocks: group_program starts them first.
    kvh, tok0, seq_len, t0, cmp0, num_cmp = group_program(cu_seqlens, cu_cmp, HKV, BLOCK_T)
    if t0 >= seq_len:
        return
    HQ = HKV * G
    R: tl.constexpr = SLC_BLOCK // CMP_STRIDE
    # Row r is head g of query t, g and t - t0 made of the bits of r inside and outside HEAD_BITS.
    NBITS: tl.constexpr = _log2(BLOCK_T * G_PAD)
    r = tl.arange(0, BLOCK_T * G_PAD)
    g = gather_bits(r, HEAD_BITS, NBITS)
    t = t0 + gather_bits(r, (BLOCK_T * G_PAD - 1) ^ HEAD_BITS, NBITS)
    valid = (t < seq_len) & (g < G)
    qa, qb = load_split(q, tok0 + t, kvh * G + g, HQ, valid, DK, BLOCK_DK, BLOCK_DK2)
    # Padded heads and queries past the end get lse = +inf: probability 0, so they add nothing to the scores.
    lse2 = tl.load(lse + (tok0 + t).to(tl.int64) * HQ + kvh * G + g, mask=valid, other=float("inf"))
    lse2 = lse2 * 1.4426950408889634

    tq = t0 + tl.arange(0, BLOCK_T)
    jt = tq // SLC_BLOCK
    slot = tl.arange(0, KP)
    # The top-n set, sorted descending: empty slots hold -1, below every candidate.
    best = tl.full([BLOCK_T, KP], -1, tl.int64)
    bar = tl.full([BLOCK_T], -1, tl.int64)
    spill = tl.zeros([BLOCK_T], tl.float32)
    # Tiles whose tokens the first query already sees (hence every row, and all inside the sequence) need no
    # mask; past them the staircase cuts. Blocks run up to the last query's own block; queries past the end of
    # the sequence are never stored.
    j_full = tl.maximum(num_visible(t0 + 1, CMP_BLOCK, CMP_STRIDE), 0) // R // BJ * BJ
    for j0 in range(0, j_full, BJ):
        key, spill = _tile_keys(qa, qb, k_cmp, lse2, spill, j0, t, tq, jt, cmp0, num_cmp, kvh, HKV, scale2, DK,
                                BLOCK_DK, BLOCK_DK2, BJ, R_PAD, HEAD_BITS, K_BITS, NUM_INIT, NUM_LOCAL, CMP_BLOCK,
                                CMP_STRIDE, SLC_BLOCK, DOT_PREC, False)
        best, bar = _merge_keys(best, bar, key, NUM_SELECTED)
    for j0 in range(j_full, (t0 + BLOCK_T - 1) // SLC_BLOCK + 1, BJ):
        key, spill = _tile_keys(qa, qb, k_cmp, lse2, spill, j0, t, tq, jt, cmp0, num_cmp, kvh, HKV, scale2, DK,
                                BLOCK_DK, BLOCK_DK2, BJ, R_PAD, HEAD_BITS, K_BITS, NUM_INIT, NUM_LOCAL, CMP_BLOCK,
                                CMP_STRIDE, SLC_BLOCK, DOT_PREC, True)
        best, bar = _merge_keys(best, bar, key, NUM_SELECTED)

    chosen = ascending_blocks(best, NUM_SELECTED)
    offs = (tok0 + tq).to(tl.int64)[:, None] * (HKV * NUM_SELECTED) + kvh * NUM_SELECTED + slot[None, :]
    tl.store(idx + offs, chosen, mask=(tq < seq_len)[:, None] & (slot < NUM_SELECTED)[None, :])


def _first_bits(order: tuple[int, ...], count: int, size: int) -> int:
    """The mask of the first log2(count) bits of `order` (then every other bit) below log2(size)."""
    width = size.bit_length() - 1
    order = [b for b in order if b < width] + [b for b in range(width) if b not in order]
    return sum(1 << b for b in order[:count.bit_length() - 1])


def select_blocks(q, k_cmp, lse, packed: Packed, cfg: SparsityConfig, scale: float,
                  block_n: int = BLOCK_N) -> torch.Tensor:
    """Top-n selection blocks of every query and KV group (SPEC 3-4), from the compressed branch's lse.

    Args:
        q: [N_tok, HQ, DK] packed queries; k_cmp: [N_cmp, HKV, DK] packed per sequence;
        lse: [N_tok, HQ] float32, cmp_fwd's log-sum-exp (+inf where a query sees no compressed token).
        block_n: compressed token slots per tile (a power of two, raised to at least 16 and one block's l'/d
            tokens padded to a power of two): fewer blocks per tile make tiny tests merge several tiles.
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
    tiling = group_tiling(HQ, HKV, DK, DK, q.dtype, BLOCK_M)
    tiling.pop("BLOCK_DV")
    # Tiles of BJ >= KP blocks (the tile's top-k needs KP keys), each block's l'/d tokens padded to a power of
    # two; the product needs 16 columns.
    r_pad, kp = triton.next_power_of_2(cfg.slc_block // cfg.cmp_stride), max(2, triton.next_power_of_2(n))
    block_n = max(16, r_pad * kp, triton.next_power_of_2(block_n))
    rows = tiling["BLOCK_T"] * tiling["G_PAD"]
    grid = (triton.cdiv(packed.max_len, tiling["BLOCK_T"]), packed.num_seqs * HKV)
    select_blocks_kernel[grid](
        q, k_cmp, lse, idx, packed.cu_seqlens, packed.cu_cmp, scale * LOG2E, HKV, DK=DK,
        BJ=block_n // r_pad, R_PAD=r_pad, KP=kp, HEAD_BITS=_first_bits(ROW_HEAD_BITS, tiling["G_PAD"], rows),
        K_BITS=_first_bits(COLUMN_TOKEN_BITS, r_pad, block_n),
        NUM_SELECTED=n, NUM_INIT=cfg.num_init, NUM_LOCAL=cfg.num_local,
        CMP_BLOCK=cfg.cmp_block, CMP_STRIDE=cfg.cmp_stride, SLC_BLOCK=cfg.slc_block, **tiling,
    )
    return idx

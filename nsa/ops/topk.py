"""Block importance (SPEC 3) and top-n block selection (SPEC 4) in one streaming pass, without a [T, Tc] or
[T, T/l'] buffer.

One program holds BLOCK_T queries of one KV group with all G heads of the group as the rows of its tiles
(row r is query t0 + r // G_PAD, head r % G_PAD). It walks the selection blocks in tiles of BJ blocks. For each
tile it loads the compressed tokens that overlap those blocks (BJ * l'/d of them, plus the l/d - 1 before that
reach into the first block), turns scale * q.k_cmp into the compressed branch's probabilities with cmp_fwd's
lse, folds them into block scores with one product by the overlap matrix ov(i, j) / d, sums the G heads, and
merges the tile into a running top-n kept in registers (num_selected rounds of a row maximum).

Top-n keys are int64: the float32 score's bits (order-preserving for scores >= 0) in the high word and
2^31 - 1 - j in the low word, so that the larger key wins and equal scores go to the smaller block j. Forced
blocks get +inf's bits; blocks that are no candidate get -1 and are never output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..config import SparsityConfig
from .common import Packed, autotune_configs
from .compressed import LOG2E, group_rows, group_tiling, tile_offsets

# Compressed tokens per tile of the scoring product.
BLOCK_N = 64


@triton.jit
def largest(x, K: tl.constexpr, WIDTH: tl.constexpr, empty):
    """[rows, WIDTH]: the K largest entries of each row of x in descending order, then `empty` (the smallest
    value x may hold). Entries above `empty` must be distinct within a row.

    K rounds of a row maximum: a handful of reductions, where a bitonic sort of the merged rows would take
    log^2 compare-and-swap stages (and minutes under the interpreter)."""
    col = tl.arange(0, WIDTH)
    out = tl.full([x.shape[0], WIDTH], empty, x.dtype)
    for r in tl.static_range(K):
        top = tl.max(x, 1)
        out = tl.where(col[None, :] == r, top[:, None], out)
        x = tl.where(x == top[:, None], empty, x)
    return out


def _configs():
    return autotune_configs([triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3)])


@triton.autotune(configs=_configs(), key=["G_PAD", "BLOCK_DK", "KP", "DOT_PREC"])
@triton.jit
def select_blocks_kernel(
    q, k_cmp, lse, idx, cu_seqlens, cu_cmp, scale2, HKV,
    G: tl.constexpr, G_PAD: tl.constexpr, DK: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr, BJ: tl.constexpr, KP: tl.constexpr,
    NUM_SELECTED: tl.constexpr, NUM_INIT: tl.constexpr, NUM_LOCAL: tl.constexpr,
    CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, SLC_BLOCK: tl.constexpr,
    DOT_PREC: tl.constexpr, FOLD_PREC: tl.constexpr,
):
    seq = tl.program_id(1) // HKV
    kvh = tl.program_id(1) % HKV
    tok0 = tl.load(cu_seqlens + seq)
    seq_len = tl.load(cu_seqlens + seq + 1) - tok0
    # The last query tiles have the most candidate blocks: start them first.
    t0 = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_T
    if t0 >= seq_len:
        return
    cmp0 = tl.load(cu_cmp + seq)
    num_cmp = tl.load(cu_cmp + seq + 1) - cmp0
    HQ = HKV * G
    t, g, valid = group_rows(t0, seq_len, G, G_PAD, BLOCK_T)
    q_offs, dk_mask = tile_offsets(tok0 + t, kvh * G + g, HQ, DK, BLOCK_DK)
    q_tile = tl.load(q + q_offs, mask=valid[:, None] & dk_mask, other=0.0)
    # Padded heads and queries past the end get lse = +inf: probability 0, so they add nothing to the scores.
    lse2 = tl.load(lse + (tok0 + t).to(tl.int64) * HQ + kvh * G + g, mask=valid, other=float("inf")) * 1.4426950408889634

    tq = t0 + tl.arange(0, BLOCK_T)
    jt = tq // SLC_BLOCK
    jj = tl.arange(0, KP)
    best = tl.full([BLOCK_T, KP], -1, tl.int64)
    # Blocks up to the last query's own block; queries past the end of the sequence are never stored.
    for j0 in range(0, (t0 + BLOCK_T - 1) // SLC_BLOCK + 1, BJ):
        i = j0 * (SLC_BLOCK // CMP_STRIDE) - (CMP_BLOCK // CMP_STRIDE - 1) + tl.arange(0, BLOCK_N)
        in_seq = (i >= 0) & (i < num_cmp)
        k_offs, _ = tile_offsets(cmp0 + i, kvh, HKV, DK, BLOCK_DK)
        k_tile = tl.load(k_cmp + k_offs, mask=in_seq[:, None] & dk_mask, other=0.0)
        s = tl.dot(q_tile, tl.trans(k_tile), input_precision=DOT_PREC) * scale2
        visible = in_seq[None, :] & (i[None, :] * CMP_STRIDE + CMP_BLOCK <= t[:, None] + 1)
        p = tl.where(visible, tl.exp2(s - lse2[:, None]), 0.0)

        # SPEC 3: S[t, j] = sum over heads and tokens of p[t, h, i] * ov(i, j) / d, as one product.
        j = j0 + jj
        lo = tl.maximum(i[:, None] * CMP_STRIDE, j[None, :] * SLC_BLOCK)
        hi = tl.minimum(i[:, None] * CMP_STRIDE + CMP_BLOCK, (j[None, :] + 1) * SLC_BLOCK)
        ov = tl.where((jj < BJ)[None, :], tl.maximum(hi - lo, 0), 0).to(tl.float32) / CMP_STRIDE
        rows = tl.dot(p, ov, input_precision=FOLD_PREC)
        score = tl.sum(tl.reshape(rows, [BLOCK_T, G_PAD, KP]), 1)

        # SPEC 4: candidates j*l' <= t; forced: the first num_init and the num_local blocks ending at t.
        candidate = (jj < BJ)[None, :] & (j[None, :] * SLC_BLOCK <= tq[:, None])
        forced = (j[None, :] < NUM_INIT) | ((j[None, :] <= jt[:, None]) & (j[None, :] > jt[:, None] - NUM_LOCAL))
        # A score that rounds to -0.0 would read as a negative key: zero it.
        bits = tl.where(score > 0, score.to(tl.int32, bitcast=True), 0)
        bits = tl.where(forced, 0x7F800000, bits).to(tl.int64)
        key = (bits << 32) | (0x7FFFFFFF - j[None, :]).to(tl.int64)
        key = tl.where(candidate, key, -1)
        best = largest(tl.reshape(tl.join(best, key), [BLOCK_T, 2 * KP]), NUM_SELECTED, KP, -1)

    # Order the chosen blocks by j: the largest -j first.
    neg_j = tl.where(best >= 0, (best & 0x7FFFFFFF) - 0x7FFFFFFF, -0x7FFFFFFF)
    chosen = -largest(neg_j, NUM_SELECTED, KP, -0x7FFFFFFF)
    chosen = tl.where(chosen == 0x7FFFFFFF, -1, chosen).to(tl.int32)
    offs = (tok0 + tq).to(tl.int64)[:, None] * (HKV * NUM_SELECTED) + kvh * NUM_SELECTED + jj[None, :]
    tl.store(idx + offs, chosen, mask=(tq < seq_len)[:, None] & (jj < NUM_SELECTED)[None, :])


def select_blocks(q, k_cmp, lse, packed: Packed, cfg: SparsityConfig, scale: float) -> torch.Tensor:
    """Top-n selection blocks of every query and KV group (SPEC 3-4), from the compressed branch's lse.

    Args:
        q: [N_tok, HQ, DK] packed queries; k_cmp: [N_cmp, HKV, DK] packed per sequence;
        lse: [N_tok, HQ] float32, cmp_fwd's log-sum-exp (+inf where a query sees no compressed token).
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
    block_n = max(BLOCK_N, triton.next_power_of_2(tokens_per_block + lead))
    kp = max(16, triton.next_power_of_2(n))
    bj = min(kp, (block_n - lead) // tokens_per_block)
    grid = (triton.cdiv(packed.max_len, tiling["BLOCK_T"]), packed.num_seqs * HKV)
    select_blocks_kernel[grid](
        q, k_cmp, lse, idx, packed.cu_seqlens, packed.cu_cmp, scale * LOG2E, HKV, DK=DK,
        BLOCK_N=block_n, BJ=bj, KP=kp, NUM_SELECTED=n, NUM_INIT=cfg.num_init, NUM_LOCAL=cfg.num_local,
        CMP_BLOCK=cfg.cmp_block, CMP_STRIDE=cfg.cmp_stride, SLC_BLOCK=cfg.slc_block,
        # Three tf32 passes keep the fold at float32 accuracy on tensor cores: near-ties stay resolved.
        FOLD_PREC="tf32x3", **tiling,
    )
    return idx

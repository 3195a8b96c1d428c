"""One kernel for what a decode step does to a layer's new tokens before attention: RoPE on the queries and keys,
and every append to the cache (NSACache.rotate_and_update).

Unfused, a layer's step rotates q and its keys (seven elementwise operations), copies the new keys and values into
the page pools (two) and moves the window and tail rings on (four); a replayed CUDA graph launches each of those
as a kernel of its own, and each costs more in launch and drain than its few kilobytes of data. Here one program
per new token does them all:

- q [B, C, HQ, DK] rotated into a new tensor;
- k (rotated) and v into the page pools at the token's cache position past[b] + c (block_table, P tokens a page);
- k_win (rotated) and v_win into the window ring at slot (past[b] + c) % R (when the window has its own K/V);
- k_tail and v_tail (the compressed branch's raw keys and values) into the tail ring at slot (past[b] + c) % l;
- seqlens[b] = past[b] + C (the program of each sequence's first token).

The rotation is Llama's rotate-half at phases cos, sin [B, C, 1, DK] (float32): x * cos + rotate_half(x) * sin in
float32, rounded once to the destination's dtype, as nsa.modules.apply_rotary computes it. It serves steps whose C
new tokens fit the rings without wrapping over themselves (C <= R and C <= l) and that run no phi (NSACache's
other path gathers phi's blocks from the tail ring before appending to it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .decode import token_rows


@triton.jit
def _load_rows(x, row_stride, cos, sin, H: tl.constexpr, D: tl.constexpr, H_PAD: tl.constexpr,
               BLOCK_D: tl.constexpr, ROTATE: tl.constexpr):
    """The H rows of D features at x (row_stride apart) as float32 [H_PAD, BLOCK_D], rotated at the phases cos, sin
    [BLOCK_D] when ROTATE (zeros outside H x D)."""
    h = tl.arange(0, H_PAD)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    ok = (h < H) & (d < D)
    rows = x + h * row_stride
    val = tl.load(rows + d, mask=ok, other=0.0).to(tl.float32)
    if ROTATE:
        HALF: tl.constexpr = D // 2
        # rotate_half(x)[d] = -x[d + D/2] for d < D/2, x[d - D/2] after.
        partner = tl.load(rows + (d + HALF) % D, mask=ok, other=0.0).to(tl.float32)
        partner = tl.where(d < HALF, -partner, partner)
        val = val * cos[None, :] + partner * sin[None, :]
    return val


@triton.jit
def _store_rows(dst, row_stride, val, H: tl.constexpr, D: tl.constexpr, H_PAD: tl.constexpr, BLOCK_D: tl.constexpr):
    h = tl.arange(0, H_PAD)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    tl.store(dst + h * row_stride + d, val.to(dst.dtype.element_ty), mask=(h < H) & (d < D))


@triton.jit
def _copy_pair(k, v, k_dst, v_dst, row, cos, sin, HKV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
               HKV_PAD: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, ROTATE_K: tl.constexpr):
    """One token's HKV key and value rows at k, v into the destinations' rows row .. row + HKV - 1 (the keys rotated
    when ROTATE_K)."""
    kr = _load_rows(k, DK, cos, sin, HKV, DK, HKV_PAD, BLOCK_DK, ROTATE_K)
    _store_rows(k_dst + row * DK, DK, kr, HKV, DK, HKV_PAD, BLOCK_DK)
    vr = _load_rows(v, DV, cos, sin, HKV, DV, HKV_PAD, BLOCK_DV, False)
    _store_rows(v_dst + row * DV, DV, vr, HKV, DV, HKV_PAD, BLOCK_DV)


@triton.jit
def rope_append_kernel(
    q, q_out, cos, sin, k, v, k_win, v_win, k_tail, v_tail,
    k_pool, v_pool, block_table, win_k, win_v, tail_k, tail_v, past, seqlens,
    C, MAX_PAGES, SQ, SK, SV, SKW, SVW, SKT, SVT,
    HQ: tl.constexpr, HKV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, HQ_PAD: tl.constexpr,
    HKV_PAD: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, PAGE: tl.constexpr,
    RING: tl.constexpr, TAIL: tl.constexpr, HAS_WIN: tl.constexpr, HAS_TAIL: tl.constexpr,
):
    r = tl.program_id(0)  # the new token b * C + c
    b = r // C
    c = r % C
    p0 = tl.load(past + b)
    s = (p0 + c).to(tl.int64)  # its position in the cache
    dk = tl.arange(0, BLOCK_DK)
    cs = tl.load(cos + r.to(tl.int64) * DK + dk, mask=dk < DK, other=0.0)
    sn = tl.load(sin + r.to(tl.int64) * DK + dk, mask=dk < DK, other=0.0)
    r64 = r.to(tl.int64)

    qr = _load_rows(q + r64 * SQ, DK, cs, sn, HQ, DK, HQ_PAD, BLOCK_DK, True)
    _store_rows(q_out + r64 * (HQ * DK), DK, qr, HQ, DK, HQ_PAD, BLOCK_DK)

    _copy_pair(k + r64 * SK, v + r64 * SV, k_pool, v_pool, token_rows(block_table, b, s, MAX_PAGES, PAGE) * HKV, cs,
               sn, HKV, DK, DV, HKV_PAD, BLOCK_DK, BLOCK_DV, True)
    if HAS_WIN:
        _copy_pair(k_win + r64 * SKW, v_win + r64 * SVW, win_k, win_v, (b.to(tl.int64) * RING + s % RING) * HKV, cs,
                   sn, HKV, DK, DV, HKV_PAD, BLOCK_DK, BLOCK_DV, True)
    if HAS_TAIL:
        _copy_pair(k_tail + r64 * SKT, v_tail + r64 * SVT, tail_k, tail_v, (b.to(tl.int64) * TAIL + s % TAIL) * HKV,
                   cs, sn, HKV, DK, DV, HKV_PAD, BLOCK_DK, BLOCK_DV, False)
    if c == 0:
        tl.store(seqlens + b, p0 + C)


def _token_rows(name: str, x: torch.Tensor, B: int, C: int, H: int, D: int) -> torch.Tensor:
    """x [B, C, H, D] whose heads and features are contiguous and whose tokens lie one token stride apart (a view
    of a projection's output); a copy otherwise."""
    if tuple(x.shape) != (B, C, H, D):
        raise ValueError(f"{name} must have shape [B, C, H, D] = {(B, C, H, D)}, got {tuple(x.shape)}")
    if x.stride(3) != 1 or x.stride(2) != D or x.stride(0) != C * x.stride(1):
        x = x.contiguous()
    return x


def rope_append(q, cos, sin, k, v, k_pool, v_pool, block_table, past, seqlens, *, k_win=None, v_win=None,
                win_k=None, win_v=None, k_tail=None, v_tail=None, tail_k=None, tail_v=None) -> torch.Tensor:
    """Rotate and append one step's C new tokens per sequence (see the module docstring); returns q rotated.

    Args:
        q: [B, C, HQ, DK]; cos, sin: float32 [B, C, 1, DK].
        k, v: [B, C, HKV, DK/DV] the selected branch's new keys (unrotated) and values; k_pool, v_pool: the
            contiguous page pools [pages, P, HKV, DK/DV] they go to, through block_table int32 [B, max_pages]
            (None: contiguous [B, S_cap, HKV, D] pools, sequence b's tokens in row b).
        past: int32 [B], each sequence's cached tokens before the step; seqlens: int32 [B], set to past + C.
        k_win, v_win / win_k, win_v: the window's new keys (unrotated) and values and its ring [B, R, HKV, D].
        k_tail, v_tail / tail_k, tail_v: the compressed branch's raw new keys and values and phi's tail ring
            [B, l, HKV, D].
    Every token stride of the new tensors may differ (views of one projection's output are read in place).
    """
    B, C, HQ, DK = q.shape
    HKV, DV = k_pool.shape[2], v_pool.shape[3]  # the cache's heads: new tokens that differ are named
    if k_pool.shape[3] != DK or not (k_pool.is_contiguous() and v_pool.is_contiguous()):
        raise ValueError(f"k_pool, v_pool must be contiguous [pages, P, HKV, DK/DV] with q's DK={DK}, got "
                         f"{tuple(k_pool.shape)} and {tuple(v_pool.shape)}")
    rings = [x.shape[1] for x in (win_k, tail_k) if x is not None]
    if rings and C > min(rings):
        raise ValueError(f"rope_append takes at most as many new tokens as the rings hold ({min(rings)}), got C={C}")
    for name, x in (("cos", cos), ("sin", sin)):
        if tuple(x.shape) != (B, C, 1, DK) or x.dtype != torch.float32:
            raise ValueError(f"{name} must be float32 [B, C, 1, DK] = {(B, C, 1, DK)}, got {x.dtype} {tuple(x.shape)}")
    cos, sin = cos.contiguous(), sin.contiguous()
    q = _token_rows("q", q, B, C, HQ, DK)
    k, v = _token_rows("k", k, B, C, HKV, DK), _token_rows("v", v, B, C, HKV, DV)
    has_win, has_tail = k_win is not None, k_tail is not None
    k_win = _token_rows("k_win", k_win, B, C, HKV, DK) if has_win else k
    v_win = _token_rows("v_win", v_win, B, C, HKV, DV) if has_win else v
    k_tail = _token_rows("k_tail", k_tail, B, C, HKV, DK) if has_tail else k
    v_tail = _token_rows("v_tail", v_tail, B, C, HKV, DV) if has_tail else v
    q_out = torch.empty(B, C, HQ, DK, dtype=q.dtype, device=q.device)
    rope_append_kernel[(B * C,)](
        q, q_out, cos, sin, k, v, k_win, v_win, k_tail, v_tail, k_pool, v_pool, block_table,
        win_k if has_win else k_pool, win_v if has_win else v_pool, tail_k if has_tail else k_pool,
        tail_v if has_tail else v_pool, past, seqlens, C, 1 if block_table is None else block_table.shape[1],
        q.stride(1), k.stride(1), v.stride(1), k_win.stride(1), v_win.stride(1), k_tail.stride(1), v_tail.stride(1),
        HQ=HQ, HKV=HKV, DK=DK,
        DV=DV, HQ_PAD=triton.next_power_of_2(HQ), HKV_PAD=triton.next_power_of_2(HKV),
        BLOCK_DK=triton.next_power_of_2(DK), BLOCK_DV=triton.next_power_of_2(DV), PAGE=k_pool.shape[1],
        RING=win_k.shape[1] if has_win else 1, TAIL=tail_k.shape[1] if has_tail else 1, HAS_WIN=has_win,
        HAS_TAIL=has_tail, num_warps=4,
    )
    return q_out

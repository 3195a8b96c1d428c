"""What every kernel family shares: the packed (varlen) layout, query tiling, autotune under the interpreter.

Every launcher works on packed sequences: a batch of B sequences of length T is the packed layout with
cu_seqlens = [0, T, 2T, ..., BT], so that one kernel serves both cases. Tensors are viewed as
[total_tokens, heads, dim]; offsets are int64 inside the kernels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..config import SparsityConfig


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_configs(configs: list[triton.Config]) -> list[triton.Config]:
    """The interpreter crashes on autotuning over several configs: keep only the first there."""
    return configs[:1] if interpreting() else configs


@dataclass(frozen=True)
class Packed:
    """Where each sequence lies in the packed token axis and in the packed compressed axis.

    cu_seqlens, cu_cmp: int32 [N+1] offsets of the raw and compressed tokens of each sequence.
    lengths: the N sequence lengths on the host, so that launchers lay out their grids without reading
    cu_seqlens back from the device (which would wait for every kernel before them).
    """

    cu_seqlens: torch.Tensor
    cu_cmp: torch.Tensor
    lengths: tuple[int, ...]

    @property
    def num_seqs(self) -> int:
        return len(self.lengths)

    @property
    def max_len(self) -> int:
        """The longest sequence."""
        return max(self.lengths)


def host_tensor(values: list[int], dtype: torch.dtype, device) -> torch.Tensor:
    """A host list as a tensor on device, copied from pinned memory without waiting for the kernels queued
    before it (a plain copy from pageable memory synchronizes the stream, idling the GPU while the host
    launches what follows)."""
    t = torch.tensor(values, dtype=dtype)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


def packed_layout(batch: int, seqlen: int, cu_seqlens, cfg: SparsityConfig, device) -> Packed:
    """The Packed layout of a [B, T] batch, or of the sequences cu_seqlens packs into T (B == 1)."""
    if cu_seqlens is None:
        lengths = [seqlen] * batch
    else:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    offsets = [0]
    cmp_offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
        cmp_offsets.append(cmp_offsets[-1] + cfg.num_cmp(n))
    as_tensor = lambda xs: host_tensor(xs, torch.int32, device)  # noqa: E731
    return Packed(as_tensor(offsets), as_tensor(cmp_offsets), tuple(lengths))


def query_tiles(packed: Packed, block: int) -> torch.Tensor:
    """int32 [num_tiles, 2]: (sequence, first position in it) of every tile of `block` consecutive queries, built
    on the device (at block = 1 and T = 64k a host loop over the tiles would cost more than a kernel)."""
    device = packed.cu_seqlens.device
    per_seq = [-(-n // block) for n in packed.lengths]
    num_tiles = sum(per_seq)
    counts = host_tensor(per_seq, torch.long, device)
    seq = torch.repeat_interleave(torch.arange(packed.num_seqs, device=device), counts, output_size=num_tiles)
    first_tile = torch.cumsum(counts, 0) - counts
    start = (torch.arange(num_tiles, device=device) - first_tile[seq]) * block
    return torch.stack([seq, start], dim=1).to(torch.int32).contiguous()


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: float32 inputs multiply in full precision so that they meet the tolerance
    rule against a true-float32 reference; half types run on tensor cores as they are."""
    return "ieee" if dtype == torch.float32 else "tf32"


def padded_dim(dim: int) -> int:
    """The tile width of a head dimension: a power of two (tl.arange) and at least 16 (tl.dot); 192 -> 256."""
    if dim % 16 or not 16 <= dim <= 256:
        raise ValueError(f"head dimensions must be multiples of 16 between 16 and 256, got {dim}")
    return triton.next_power_of_2(dim)


def split_dim(dim: int) -> tuple[int, int]:
    """Two power-of-two tile widths covering a head dimension, the second 0 when one suffices:
    192 -> (128, 64), 48 -> (32, 16), 128 -> (128, 0). Never wider than next_power_of_2(dim): a product over
    a split dimension is the sum of two products (dot_split), so DK = 192 costs 192 columns instead of 256."""
    if dim % 16 or not 16 <= dim <= 256:
        raise ValueError(f"head dimensions must be multiples of 16 between 16 and 256, got {dim}")
    first = 1 << (dim.bit_length() - 1)
    rest = dim - first
    return first, (triton.next_power_of_2(rest) if rest else 0)


def split_blocks(dk: int, dv: int) -> dict:
    """The tile widths of a kernel over split head dimensions: BLOCK_DK, BLOCK_DK2 and BLOCK_DV, BLOCK_DV2."""
    (block_dk, block_dk2), (block_dv, block_dv2) = split_dim(dk), split_dim(dv)
    return dict(BLOCK_DK=block_dk, BLOCK_DK2=block_dk2, BLOCK_DV=block_dv, BLOCK_DV2=block_dv2)


# The kernels run the softmax in base 2 (exp2 is one instruction) and keep lse in base e.
LOG2E = 1.4426950408889634


@triton.jit
def tile_offsets(tok, head, H, D: tl.constexpr, BLOCK_D: tl.constexpr, D0: tl.constexpr = 0):
    """int64 offsets [len(tok), BLOCK_D] of columns D0 .. D0 + BLOCK_D of a contiguous [N, H, D] tensor, and
    the mask of the columns < D."""
    d = D0 + tl.arange(0, BLOCK_D)
    offs = (tok.to(tl.int64) * H + head)[:, None] * D + d[None, :]
    return offs, (d < D)[None, :]


@triton.jit
def load_split_rows(ptr, row_offs, rows, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr):
    """The two column parts [N, BLOCK_D] and [N, BLOCK_D2] of the rows of D unit-stride columns that start at the
    int64 element offsets row_offs [N], zero on masked rows and past D. With BLOCK_D2 = 0 the second is the first
    again and is never used (no product reads it)."""
    d = tl.arange(0, BLOCK_D)
    a = tl.load(ptr + row_offs[:, None] + d[None, :], mask=rows[:, None] & (d < D)[None, :], other=0.0)
    if BLOCK_D2 > 0:
        d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        b = tl.load(ptr + row_offs[:, None] + d2[None, :], mask=rows[:, None] & (d2 < D)[None, :], other=0.0)
    else:
        b = a
    return a, b


@triton.jit
def load_split(ptr, tok, head, H, rows, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr):
    """load_split_rows of rows (tok, head) of a contiguous [N, H, D] tensor."""
    return load_split_rows(ptr, (tok.to(tl.int64) * H + head) * D, rows, D, BLOCK_D, BLOCK_D2)


@triton.jit
def store_split(ptr, a, b, tok, head, H, rows, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr):
    """Stores the column parts of load_split, cast to ptr's type."""
    offs, cols = tile_offsets(tok, head, H, D, BLOCK_D)
    tl.store(ptr + offs, a.to(ptr.dtype.element_ty), mask=rows[:, None] & cols)
    if BLOCK_D2 > 0:
        offs2, cols2 = tile_offsets(tok, head, H, D, BLOCK_D2, BLOCK_D)
        tl.store(ptr + offs2, b.to(ptr.dtype.element_ty), mask=rows[:, None] & cols2)


@triton.jit
def dot_split(xa, xb, ya, yb, BLOCK_D2: tl.constexpr, PREC: tl.constexpr):
    """x . y^T over a split dimension: xa, ya [*, BLOCK_D] and xb, yb [*, BLOCK_D2] -> [len(x), len(y)] fp32."""
    s = tl.dot(xa, tl.trans(ya), input_precision=PREC)
    if BLOCK_D2 > 0:
        s += tl.dot(xb, tl.trans(yb), input_precision=PREC)
    return s


@triton.jit
def zeros_split(ROWS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr):
    """float32 zeros [ROWS, BLOCK_D] and [ROWS, BLOCK_D2]: an accumulator over a split dimension. With
    BLOCK_D2 = 0 the second is the first again and is never used."""
    a = tl.zeros([ROWS, BLOCK_D], tl.float32)
    if BLOCK_D2 > 0:
        b = tl.zeros([ROWS, BLOCK_D2], tl.float32)
    else:
        b = a
    return a, b


@triton.jit
def dot_acc_split(acc_a, acc_b, x, ya, yb, BLOCK_D2: tl.constexpr, PREC: tl.constexpr):
    """acc += x . y where y's columns, hence acc's, are split: ya, acc_a [*, BLOCK_D] and yb, acc_b [*, BLOCK_D2]."""
    acc_a += tl.dot(x, ya, input_precision=PREC)
    if BLOCK_D2 > 0:
        acc_b += tl.dot(x, yb, input_precision=PREC)
    return acc_a, acc_b


@triton.jit
def online_softmax(acc, m_i, l_i, s, v, PRECISION: tl.constexpr):
    """Folds one key tile into an online softmax (FlashAttention) in base 2.

    s [M, N] base-2 scores, -inf where a key is not visible; v [N, DV]; acc [M, DV], m_i [M], l_i [M] float32.
    Returns the updated (acc, m_i, l_i), and the tile's weights p [M, N] and the rescale alpha [M] of what came
    before, for callers that fold p into other sums too.
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no visible key keeps m = -inf: shift it by 0 so that no inf - inf turns into NaN.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_shift[:, None])
    alpha = tl.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i, p, alpha


@triton.jit
def softmax_step_split(acc_a, acc_b, m_i, l_i, qa, qb, ka, kb, va, vb, visible, qk_scale,
                       BLOCK_DK2: tl.constexpr, BLOCK_DV2: tl.constexpr, PRECISION: tl.constexpr):
    """softmax_step over split head dimensions (split_dim): q, k in parts [*, BLOCK_DK] and [*, BLOCK_DK2],
    v and acc in parts [*, BLOCK_DV] and [*, BLOCK_DV2]. Returns the updated (acc_a, acc_b, m_i, l_i)."""
    s = dot_split(qa, qb, ka, kb, BLOCK_DK2, PRECISION) * qk_scale
    s = tl.where(visible, s, float("-inf"))
    acc_a, m_i, l_i, p, alpha = online_softmax(acc_a, m_i, l_i, s, va, PRECISION)
    if BLOCK_DV2 > 0:
        acc_b = acc_b * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=PRECISION)
    return acc_a, acc_b, m_i, l_i


@triton.jit
def softmax_step(acc, m_i, l_i, q, k, v, visible, qk_scale, PRECISION: tl.constexpr):
    """One key tile of an online softmax: scores of q [M, DK] against k [N, DK], visible [M, N];
    qk_scale = scale * log2(e). Returns the updated (acc, m_i, l_i) (see online_softmax)."""
    acc, _, m_i, l_i = softmax_step_split(acc, acc, m_i, l_i, q, q, k, k, v, v, visible, qk_scale, 0, 0, PRECISION)
    return acc, m_i, l_i


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


@triton.jit
def softmax_finish(acc, m_i, l_i):
    """(o [M, DV], lse [M]) of an online softmax; a row with no visible key gets o = 0 and lse = +inf, so
    that the backward's exp(s - lse) is 0 there (FlashAttention's convention)."""
    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    return o, lse


@triton.jit
def load_grad_rows(Q, DO, LSE, DELTA, row, rows, DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr,
                   BLOCK_DK2: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DV2: tl.constexpr):
    """What softmax_grad_step needs of the query rows `row` (indices into the [N_tok * H, D] views; `rows` masks
    them): q and do in their column parts, lse2 = lse * log2(e) (+inf on masked rows, whose probabilities are
    then 0) and delta."""
    qa, qb = load_split(Q, row, 0, 1, rows, DK, BLOCK_DK, BLOCK_DK2)
    doa, dob = load_split(DO, row, 0, 1, rows, DV, BLOCK_DV, BLOCK_DV2)
    lse2 = tl.load(LSE + row, mask=rows, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + row, mask=rows, other=0.0)
    return qa, qb, doa, dob, lse2, delta


@triton.jit
def softmax_grad_step(qa, qb, doa, dob, lse2, delta, ka, kb, va, vb, visible, qk_scale,
                      BLOCK_DK2: tl.constexpr, BLOCK_DV2: tl.constexpr, PRECISION: tl.constexpr):
    """Probabilities p and score gradients dz of one key tile, z = scale * q.k (FlashAttention-2).

    q [M, DK], do [M, DV], k [N, DK], v [N, DV], each in the two parts of split_dim (a part of width 0 is never
    read); lse2 [M] = lse * log2(e), delta [M] = rowsum(do * o).
    Returns p, dz [M, N] float32; then dq = scale * dz k, dk = scale * dz^T q, dv = p^T do.
    """
    s = dot_split(qa, qb, ka, kb, BLOCK_DK2, PRECISION) * qk_scale
    p = tl.where(visible, tl.exp2(s - lse2[:, None]), 0.0)
    dp = dot_split(doa, dob, va, vb, BLOCK_DV2, PRECISION)
    return p, p * (dp - delta[:, None])


@triton.jit
def _delta_kernel(O, DO, DELTA, rows, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    mask = (r < rows)[:, None] & (d < D)[None, :]
    offs = r.to(tl.int64)[:, None] * D + d[None, :]
    o = tl.load(O + offs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + r, tl.sum(o * do, 1), mask=r < rows)


def attention_delta(o: torch.Tensor, do: torch.Tensor) -> torch.Tensor:
    """delta [N_tok, H] float32 = rowsum(do * o) of o, do [N_tok, H, DV]: the softmax backward's correction,
    computed without a float32 copy of o and do."""
    o, do = o.contiguous(), do.contiguous()
    rows = o.shape[0] * o.shape[1]
    delta = torch.empty(o.shape[:2], dtype=torch.float32, device=o.device)
    BLOCK_R = 16
    _delta_kernel[(triton.cdiv(rows, BLOCK_R),)](o, do, delta, rows, o.shape[2], BLOCK_R, padded_dim(o.shape[2]))
    return delta

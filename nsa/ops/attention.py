"""The whole NSA forward and backward on the Triton kernels, registered as torch.library custom ops.

The launchers read cu_seqlens on the host to lay out their grids, which a traced triton_op cannot do, so the
ops are opaque custom_ops with fake implementations: torch.compile(fullgraph=True) keeps them as single nodes.
The forward saves each branch's output and log-sum-exp (linear in T) for the backward. Every backward kernel sums
in a fixed order without atomics, so gradients are bitwise reproducible whether or not
torch.use_deterministic_algorithms(True) is on, and no separate deterministic path exists.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..config import SparsityConfig
from ..functional import KERNEL_DTYPES
from .common import interpreting, packed_layout
from .compressed import cmp_bwd, cmp_fwd
from .gates import gates_bwd
from .selected import slc_bwd, slc_fwd
from .topk import select_blocks
from .window import takes_local_blocks, win_bwd, win_fwd

_KNOBS = ("cmp_block", "cmp_stride", "slc_block", "num_selected", "num_init", "num_local", "window")


def _same(a: Tensor, b: Tensor) -> bool:
    """Whether a and b are views of the same elements in the same layout."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


def _flat(x: Tensor) -> Tensor:
    """[B, T, H, D] -> [B*T, H, D], the packed layout of the kernels."""
    return x.reshape(x.shape[0] * x.shape[1], x.shape[2], x.shape[3])


@torch.library.custom_op("nsa::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, k_cmp: Tensor, v_cmp: Tensor, gates: Tensor, k_win: Tensor,
                  v_win: Tensor, cu_seqlens: Optional[Tensor], knobs: list[int], scale: float
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> o [B, T, HQ, DV], idx [B, T, HKV, n], then o and lse [B*T, HQ] of the cmp, slc and win branches."""
    cfg = SparsityConfig(*knobs)
    B, T, HQ, _ = q.shape
    packed = packed_layout(B, T, cu_seqlens, cfg, q.device)
    qf, kf, vf = _flat(q), _flat(k), _flat(v)
    o_cmp, lse_cmp = cmp_fwd(qf, _flat(k_cmp), _flat(v_cmp), packed, cfg, scale)
    idx = select_blocks(qf, _flat(k_cmp), lse_cmp, packed, cfg, scale)
    # Where the window reads the selected branch's keys, the local blocks (forced into every selection) are
    # added by the window forward, whose band ends with them: the selected branch reads num_local blocks fewer
    # per query (2 of 16 in the paper's configuration).
    local = takes_local_blocks(cfg) and _same(k_win, k) and _same(v_win, v)
    o_slc, lse_slc = slc_fwd(qf, kf, vf, idx, packed, cfg, scale, skip_local=local)
    o_win, lse_win, o = win_fwd(qf, _flat(k_win), _flat(v_win), packed, cfg.window, scale,
                                gated=(_flat(gates), o_cmp, o_slc), slc_rest=(lse_slc, cfg) if local else None)
    o = o.view(B, T, HQ, -1)
    return o, idx.view(B, T, k.shape[2], -1), o_cmp, lse_cmp, o_slc, lse_slc, o_win, lse_win


@attention_fwd.register_fake
def _(q, k, v, k_cmp, v_cmp, gates, k_win, v_win, cu_seqlens, knobs, scale):
    B, T, HQ, _ = q.shape
    DV = v.shape[-1]
    branch = q.new_empty(B * T, HQ, DV)
    lse = q.new_empty(B * T, HQ, dtype=torch.float32)
    idx = q.new_empty(B, T, k.shape[2], knobs[_KNOBS.index("num_selected")], dtype=torch.int32)
    return q.new_empty(B, T, HQ, DV), idx, branch, lse, branch.clone(), lse.clone(), branch.clone(), lse.clone()


@torch.library.custom_op("nsa::attention_bwd", mutates_args=())
def attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, k_cmp: Tensor, v_cmp: Tensor, gates: Tensor,
                  k_win: Tensor, v_win: Tensor, cu_seqlens: Optional[Tensor], idx: Tensor, o_cmp: Tensor,
                  lse_cmp: Tensor, o_slc: Tensor, lse_slc: Tensor, o_win: Tensor, lse_win: Tensor, knobs: list[int],
                  scale: float
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> the gradients of q, k, v, k_cmp, v_cmp, gates, k_win, v_win."""
    cfg = SparsityConfig(*knobs)
    B, T, HQ, DK = q.shape
    packed = packed_layout(B, T, cu_seqlens, cfg, q.device)
    qf = _flat(q)
    dgates, do_cmp, do_slc, do_win = gates_bwd(_flat(do), _flat(gates), o_cmp, o_slc, o_win)
    dq, dk_cmp, dv_cmp = cmp_bwd(do_cmp, qf, _flat(k_cmp), _flat(v_cmp), o_cmp, lse_cmp, packed, cfg, scale)
    dq_slc, dk, dv = slc_bwd(do_slc, qf, _flat(k), _flat(v), o_slc, lse_slc, _flat(idx), packed, cfg, scale)
    dq_win, dk_win, dv_win = win_bwd(do_win, qf, _flat(k_win), _flat(v_win), o_win, lse_win, packed, cfg.window, scale)
    # Summed in the inputs' dtype, as autograd sums the three branches' contributions to q.
    dq = dq.add_(dq_slc).add_(dq_win)
    shape = lambda x, like: x.view(like.shape)  # noqa: E731
    return (shape(dq, q), shape(dk, k), shape(dv, v), shape(dk_cmp, k_cmp), shape(dv_cmp, v_cmp),
            shape(dgates, gates), shape(dk_win, k_win), shape(dv_win, v_win))


@attention_bwd.register_fake
def _(do, q, k, v, k_cmp, v_cmp, gates, k_win, v_win, cu_seqlens, idx, o_cmp, lse_cmp, o_slc, lse_slc, o_win, lse_win,
      knobs, scale):
    return tuple(torch.empty_like(x) for x in (q, k, v, k_cmp, v_cmp, gates, k_win, v_win))


def _setup_context(ctx, inputs, output):
    q, k, v, k_cmp, v_cmp, gates, k_win, v_win, cu_seqlens, knobs, scale = inputs
    _, idx, o_cmp, lse_cmp, o_slc, lse_slc, o_win, lse_win = output
    ctx.save_for_backward(q, k, v, k_cmp, v_cmp, gates, k_win, v_win, cu_seqlens, idx, o_cmp, lse_cmp, o_slc,
                          lse_slc, o_win, lse_win)
    ctx.knobs, ctx.scale = knobs, scale


def _backward(ctx, do, *unused):
    grads = attention_bwd(do.contiguous(), *ctx.saved_tensors, ctx.knobs, ctx.scale)
    return (*grads, None, None, None)


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def nsa_attention_triton(q, k, v, k_cmp, v_cmp, gates, k_win, v_win, cfg: SparsityConfig, scale: float, cu_seqlens=None):
    """The Triton backend of nsa.nsa_attention (inputs validated). Returns (o, idx)."""
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f"the triton backend takes float16, bfloat16 or float32 inputs, got {q.dtype} "
                        "(use backend='reference' for float64)")
    if q.device.type != "cuda" and not interpreting():
        raise ValueError(f"the triton backend needs CUDA tensors, got {q.device} (or set TRITON_INTERPRET=1 "
                         "before importing triton to run the kernels on the CPU)")
    args = [x.contiguous() for x in (q, k, v, k_cmp, v_cmp, gates, k_win, v_win)]
    knobs = [getattr(cfg, name) for name in _KNOBS]
    o, idx, *_ = attention_fwd(*args, cu_seqlens, knobs, scale)
    return o, idx

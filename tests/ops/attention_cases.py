"""Shared by the kernel tests of the selected and window branches: packed random inputs, and the reference
(reference.masked_attention under a visibility mask, per sequence) in float64 and in the kernel's dtype."""

from __future__ import annotations

import torch

from nsa.config import SparsityConfig
from nsa.ops.common import packed_layout
from nsa.reference import masked_attention
from tests.inputs import DEVICE
from tests.tolerance import assert_within_rule


def packed_inputs(lengths, HQ, HKV, DK, DV, dtype, device=DEVICE):
    """q, k, v, do [N_tok, H, D] drawn at random; Packed of the sequences `lengths` (cu_seqlens layout)."""
    N = sum(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    packed = packed_layout(1, N, cu, SparsityConfig(), device)
    q = torch.randn(N, HQ, DK, device=device).to(dtype)
    k = torch.randn(N, HKV, DK, device=device).to(dtype)
    v = torch.randn(N, HKV, DV, device=device).to(dtype)
    do = torch.randn(N, HQ, DV, device=device).to(dtype)
    return q, k, v, do, packed


def reference(q, k, v, do, lengths, allowed_of, scale, dtype):
    """(o, lse, dq, dk, dv) of the reference in `dtype`, sequence by sequence.

    allowed_of(seq, s0, L) -> [L, HKV, L] bool: which keys each query of that sequence sees.
    """
    q, k, v, do = (x.detach().to(dtype).requires_grad_() for x in (q, k, v, do))
    HKV = k.shape[1]
    G = q.shape[1] // HKV
    outs, lses = [], []
    s0 = 0
    for seq, L in enumerate(lengths):
        allowed = allowed_of(seq, s0, L).to(q.device)
        qs = q[s0:s0 + L].view(1, L, HKV, G, -1)
        o, _ = masked_attention(qs, k[None, s0:s0 + L], v[None, s0:s0 + L], allowed[None], scale)
        scores = torch.einsum("tkgd,skd->tkgs", qs[0], k[s0:s0 + L]).to(torch.promote_types(dtype, torch.float32)) * scale
        scores = scores.masked_fill(~allowed[:, :, None, :], float("-inf"))
        outs.append(o[0].reshape(L, HKV * G, -1))
        lses.append(torch.logsumexp(scores, dim=-1).reshape(L, HKV * G))
        s0 += L
    o = torch.cat(outs)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    return o.detach(), torch.cat(lses).detach(), dq, dk, dv


def check_against_reference(kernel_out, q, k, v, do, lengths, allowed_of, scale, names=("o", "lse", "dq", "dk", "dv")):
    """Assert the tolerance rule on every tensor of kernel_out = (o, lse, dq, dk, dv) (a prefix of it)."""
    oracle = reference(q, k, v, do, lengths, allowed_of, scale, torch.float64)
    low = reference(q, k, v, do, lengths, allowed_of, scale, q.dtype)
    for name, got, lo, ref in zip(names, kernel_out, low, oracle):
        assert_within_rule(name, got, lo, ref, factor=2.0 if name in ("o", "lse") else 3.0)

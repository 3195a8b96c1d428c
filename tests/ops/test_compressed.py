"""The compressed branch's kernels (nsa/ops/compressed.py) against the float64 reference, with the tolerance rule."""

from __future__ import annotations

import pytest
import torch

from nsa.config import SparsityConfig
from nsa.ops.common import packed_layout
from nsa.ops.compressed import cmp_bwd, cmp_fwd
from nsa.reference import masked_attention, stat_dtype
from tests.inputs import DEVICE
from tests.tolerance import assert_within_rule

SMALL = SparsityConfig(cmp_block=16, cmp_stride=8, slc_block=32, num_selected=4)


def cmp_inputs(lengths, HQ, HKV, DK, DV, cfg, dtype, device=DEVICE, batch=None):
    """Random packed q, k_cmp, v_cmp, do [N, H, D] and their Packed layout.

    batch=(B, T) lays out B equal sequences as a batch does (no cu_seqlens); else `lengths` are packed.
    """
    if batch is not None:
        packed = packed_layout(*batch, None, cfg, device)
    else:
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
        packed = packed_layout(1, sum(lengths), cu, cfg, device)
    N, N_cmp = packed.cu_seqlens[-1].item(), packed.cu_cmp[-1].item()
    q = torch.randn(N, HQ, DK, device=device).to(dtype)
    k_cmp = torch.randn(N_cmp, HKV, DK, device=device).to(dtype)
    v_cmp = torch.randn(N_cmp, HKV, DV, device=device).to(dtype)
    do = torch.randn(N, HQ, DV, device=device).to(dtype)
    return q, k_cmp, v_cmp, do, packed


def cmp_visible(T, Tc, cfg, device=DEVICE):
    """[T, Tc] bool: SPEC 2's staircase, i*d + l <= t + 1."""
    t = torch.arange(T, device=device)[:, None]
    return torch.arange(Tc, device=device)[None, :] * cfg.cmp_stride + cfg.cmp_block <= t + 1


def cmp_reference(q, k_cmp, v_cmp, do, packed, cfg, scale, dtype):
    """(o, lse, dq, dk_cmp, dv_cmp, p) of the reference in `dtype`, sequence by sequence; lse is +inf and o is 0
    where a query sees nothing; p lists (s0, s1, probabilities [1, T, HKV, G, Tc]) of each non-empty sequence."""
    q, k_cmp, v_cmp = (x.detach().to(dtype).requires_grad_() for x in (q, k_cmp, v_cmp))
    HKV = k_cmp.shape[1]
    G = q.shape[1] // HKV
    outs, lses, ps = [], [], []
    cu, cu_cmp = packed.cu_seqlens.tolist(), packed.cu_cmp.tolist()
    for s0, s1, c0, c1 in zip(cu[:-1], cu[1:], cu_cmp[:-1], cu_cmp[1:]):
        T, Tc = s1 - s0, c1 - c0
        if T == 0:
            continue
        visible = cmp_visible(T, Tc, cfg, q.device)
        qs = q[s0:s1].view(1, T, HKV, G, -1)
        o, p = masked_attention(qs, k_cmp[None, c0:c1], v_cmp[None, c0:c1], visible[None, :, None].expand(1, T, HKV, Tc), scale)
        scores = torch.einsum("tkgd,skd->tkgs", qs[0], k_cmp[c0:c1]).to(stat_dtype(dtype)) * scale
        lse = torch.logsumexp(scores.masked_fill(~visible[:, None, None], float("-inf")), dim=-1)
        outs.append(o[0].reshape(T, HKV * G, -1))
        lses.append(torch.where(visible.any(-1)[:, None, None], lse, float("inf")).reshape(T, HKV * G))
        ps.append((s0, s1, p.detach()))
    o = torch.cat(outs)
    grads = torch.autograd.grad(o, (q, k_cmp, v_cmp), do.to(dtype), allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, (q, k_cmp, v_cmp))]
    return (o.detach(), torch.cat(lses).detach(), *grads, ps)


def assert_rule(name, got, low, oracle, factor):
    """The tolerance rule; an empty tensor (no compressed token at all) only has to have the right shape."""
    assert got.shape == oracle.shape, f"{name}: shape {tuple(got.shape)} != {tuple(oracle.shape)}"
    if oracle.numel():
        assert_within_rule(name, got, low, oracle, factor)


def assert_lse(got, low, oracle):
    """+inf exactly where the oracle has no visible token; the tolerance rule on the others."""
    empty = oracle.isinf()
    assert torch.equal(got.isinf() & (got > 0), empty), "lse must be +inf exactly on the rows that see nothing"
    assert_rule("lse", got[~empty], low[~empty], oracle[~empty], factor=2.0)


# (lengths, batch, HQ, HKV, DK, DV, cfg): odd T, T < l, T not a multiple of any block, G from 1 to 16,
# DK != DV, a batch of 2, varlen with an empty sequence, non-default block knobs.
CASES = [
    pytest.param([77], None, 4, 2, 32, 16, SparsityConfig(), id="odd-T-G2"),
    pytest.param([20], None, 3, 1, 16, 32, SparsityConfig(), id="T-below-l-G3"),
    pytest.param(None, (2, 53), 2, 2, 16, 16, SparsityConfig(), id="batch2-G1"),
    pytest.param([37, 0, 130, 9], None, 8, 2, 48, 16, SparsityConfig(), id="varlen-G4-DK48"),
    pytest.param([100], None, 8, 1, 16, 16, SparsityConfig(), id="G8"),
    pytest.param([45, 66], None, 16, 1, 16, 32, SMALL, id="varlen-G16-small-blocks"),
    pytest.param([61], None, 12, 2, 16, 16, SMALL, id="G6"),
    # Long enough that the forward has whole tiles before the staircase; DK = 192 is split as 128 + 64.
    pytest.param([300], None, 2, 1, 192, 32, SMALL, id="long-G2-DK192"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lengths, batch, HQ, HKV, DK, DV, cfg", CASES)
def test_cmp_fwd_bwd_match_reference(lengths, batch, HQ, HKV, DK, DV, cfg, dtype):
    q, k_cmp, v_cmp, do, packed = cmp_inputs(lengths, HQ, HKV, DK, DV, cfg, dtype, batch=batch)
    scale = DK ** -0.5
    o, lse = cmp_fwd(q, k_cmp, v_cmp, packed, cfg, scale)
    dq, dk_cmp, dv_cmp = cmp_bwd(do, q, k_cmp, v_cmp, o, lse, packed, cfg, scale)
    oracle = cmp_reference(q, k_cmp, v_cmp, do, packed, cfg, scale, torch.float64)
    low = cmp_reference(q, k_cmp, v_cmp, do, packed, cfg, scale, dtype)
    assert o.dtype == dtype and lse.dtype == torch.float32
    assert_within_rule("o_cmp", o, low[0], oracle[0], factor=2.0)
    assert_lse(lse, low[1], oracle[1])
    for name, got, lo, ref in zip(("dq", "dk_cmp", "dv_cmp"), (dq, dk_cmp, dv_cmp), low[2:5], oracle[2:5]):
        assert got.dtype == dtype
        assert_rule(name, got, lo, ref, factor=3.0)


@pytest.mark.parametrize("query_chunk", [None, 1, 40])
def test_cmp_bwd_is_deterministic(query_chunk):
    """One chunk, and dk/dv summed over chunks of one query tile (16 queries) or of 48: bitwise repeatable."""
    cfg = SMALL
    q, k_cmp, v_cmp, do, packed = cmp_inputs([90, 41], 8, 2, 16, 16, cfg, torch.float16)
    o, lse = cmp_fwd(q, k_cmp, v_cmp, packed, cfg, 0.3)
    first = cmp_bwd(do, q, k_cmp, v_cmp, o, lse, packed, cfg, 0.3, query_chunk=query_chunk)
    second = cmp_bwd(do, q, k_cmp, v_cmp, o, lse, packed, cfg, 0.3, query_chunk=query_chunk)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("query_chunk", [1, 40])
def test_cmp_bwd_query_chunks_match_reference(query_chunk, dtype):
    """dk/dv as sums of per-chunk partials (several chunks per key tile, chunks before a tile, a varlen batch
    whose short sequence has fewer chunks) keep the tolerance rule."""
    cfg = SMALL
    q, k_cmp, v_cmp, do, packed = cmp_inputs([130, 41], 8, 2, 48, 16, cfg, dtype)
    scale = 48 ** -0.5
    o, lse = cmp_fwd(q, k_cmp, v_cmp, packed, cfg, scale)
    dq, dk_cmp, dv_cmp = cmp_bwd(do, q, k_cmp, v_cmp, o, lse, packed, cfg, scale, query_chunk=query_chunk)
    oracle = cmp_reference(q, k_cmp, v_cmp, do, packed, cfg, scale, torch.float64)
    low = cmp_reference(q, k_cmp, v_cmp, do, packed, cfg, scale, dtype)
    for name, got, lo, ref in zip(("dq", "dk_cmp", "dv_cmp"), (dq, dk_cmp, dv_cmp), low[2:5], oracle[2:5]):
        assert got.dtype == dtype
        assert_rule(name, got, lo, ref, factor=3.0)


def test_cmp_accepts_non_contiguous_inputs():
    cfg = SparsityConfig()
    q, k_cmp, v_cmp, do, packed = cmp_inputs([70], 4, 2, 16, 16, cfg, torch.float32)
    scale = 0.25
    o, lse = cmp_fwd(q, k_cmp, v_cmp, packed, cfg, scale)
    q_nc = q.transpose(0, 1).contiguous().transpose(0, 1)
    assert not q_nc.is_contiguous()
    o_nc, lse_nc = cmp_fwd(q_nc, k_cmp, v_cmp, packed, cfg, scale)
    assert torch.equal(o, o_nc) and torch.equal(lse, lse_nc)


def test_cmp_rejects_bad_shapes():
    cfg = SparsityConfig()
    q, k_cmp, v_cmp, do, packed = cmp_inputs([70], 4, 2, 16, 16, cfg, torch.float32)
    with pytest.raises(ValueError, match="multiple of 16"):
        cmp_fwd(q[..., :12], k_cmp[..., :12], v_cmp, packed, cfg, 0.25)
    with pytest.raises(ValueError, match="q's heads"):
        cmp_fwd(q[:, :3], k_cmp, v_cmp, packed, cfg, 0.25)


GPU_CASES = [(8192, 64, 4, 192, 128), (8192, 16, 1, 128, 128), (4099, 12, 2, 64, 64)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real shapes and bfloat16 need a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T, HQ, HKV, DK, DV", GPU_CASES)
def test_cmp_real_shapes_on_gpu(T, HQ, HKV, DK, DV, dtype):
    cfg = SparsityConfig()
    q, k_cmp, v_cmp, do, packed = cmp_inputs([T // 3, T - T // 3], HQ, HKV, DK, DV, cfg, dtype)
    scale = DK ** -0.5
    o, lse = cmp_fwd(q, k_cmp, v_cmp, packed, cfg, scale)
    dq, dk_cmp, dv_cmp = cmp_bwd(do, q, k_cmp, v_cmp, o, lse, packed, cfg, scale)
    oracle = cmp_reference(q, k_cmp, v_cmp, do, packed, cfg, scale, torch.float64)
    low = cmp_reference(q, k_cmp, v_cmp, do, packed, cfg, scale, dtype)
    assert_within_rule("o_cmp", o, low[0], oracle[0], factor=2.0)
    assert_lse(lse, low[1], oracle[1])
    for name, got, lo, ref in zip(("dq", "dk_cmp", "dv_cmp"), (dq, dk_cmp, dv_cmp), low[2:5], oracle[2:5]):
        assert_rule(name, got, lo, ref, factor=3.0)
    again = cmp_bwd(do, q, k_cmp, v_cmp, o, lse, packed, cfg, scale)
    assert all(torch.equal(a, b) for a, b in zip((dq, dk_cmp, dv_cmp), again))

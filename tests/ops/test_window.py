"""Sliding-window kernels (nsa/ops/window.py) against the float64 reference under the band mask of SPEC 6."""

import math

import pytest
import torch

from nsa import SparsityConfig, reference
from nsa.ops.selected import slc_fwd
from nsa.ops.window import takes_local_blocks, win_bwd, win_fwd
from tests.inputs import DEVICE
from tests.ops.attention_cases import check_against_reference, packed_inputs


def band(window):
    def allowed_of(seq, s0, L):
        t = torch.arange(L)
        visible = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - window)
        return visible[:, None, :].expand(L, 1, L)
    return allowed_of


def run(lengths, HQ, HKV, DK, DV, window, dtype):
    q, k, v, do, packed = packed_inputs(lengths, HQ, HKV, DK, DV, dtype)
    scale = 1 / math.sqrt(DK)
    o, lse = win_fwd(q, k, v, packed, window, scale)
    dq, dk, dv = win_bwd(do, q, k, v, o, lse, packed, window, scale)
    allowed = band(window)

    def allowed_of(seq, s0, L):
        return allowed(seq, s0, L).expand(L, HKV, L)

    check_against_reference((o, lse, dq, dk, dv), q, k, v, do, lengths, allowed_of, scale)
    return q, k, v, do, packed, (o, lse, dq, dk, dv)


@pytest.mark.parametrize(
    "lengths, HQ, HKV, DK, DV, window, dtype",
    [
        ([157], 2, 1, 32, 16, 40, torch.float32),         # odd T, window < T spanning tile edges, G = 2, DK != DV
        ([150], 3, 1, 16, 32, 300, torch.float16),        # window > T: plain causal, G = 3
        ([93, 93], 4, 4, 16, 16, 17, torch.float16),      # batch 2 as packed, G = 1, window not a multiple of the tile
        ([70, 5, 131], 8, 1, 48, 16, 64, torch.float32),  # varlen, G = 8, DK = 32 + 16
        ([100], 16, 1, 16, 16, 1, torch.float32),         # G = 16, window of 1: each query sees itself only
        ([66], 4, 1, 16, 32, 33, torch.float16),          # G = 4
        ([70], 2, 1, 144, 16, 20, torch.float32),         # DK = 128 + 16, past 128: narrower key tile for dk/dv
        ([81], 4, 2, 48, 48, 24, torch.float16),          # DK = DV = 32 + 16: dv and o in two parts too
        ([300], 2, 1, 16, 16, 130, torch.float32),        # key tiles inside the band (no mask) between both edges
    ],
)
def test_window_matches_reference(lengths, HQ, HKV, DK, DV, window, dtype):
    run(lengths, HQ, HKV, DK, DV, window, dtype)


def test_window_backward_is_deterministic():
    q, k, v, do, packed, (o, lse, *grads) = run([120, 37], 4, 2, 32, 16, 50, torch.float32)
    again = win_bwd(do, q, k, v, o, lse, packed, 50, 1 / math.sqrt(32))
    for a, b in zip(grads, again):
        assert torch.equal(a, b)


@pytest.mark.parametrize("DV", [16, 48])
def test_gated_epilogue_sums_the_branches(DV):
    """win_fwd's gated epilogue (SPEC 7) over whole and split value dimensions: o = sum of gate * branch."""
    q, k, v, _, packed = packed_inputs([75], 4, 1, 16, DV, torch.float32)
    gates = torch.rand(75, 4, 3, device=DEVICE)
    o_cmp, o_slc = torch.randn(75, 4, DV, device=DEVICE), torch.randn(75, 4, DV, device=DEVICE)
    o_win, _, out = win_fwd(q, k, v, packed, 30, 0.25, gated=(gates, o_cmp, o_slc))
    expected = gates[..., :1] * o_cmp + gates[..., 1:2] * o_slc + gates[..., 2:] * o_win
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


# Two local blocks of 64 keys, inside a window of 192 (the least takes_local_blocks accepts with them).
LOCAL = SparsityConfig(cmp_block=32, cmp_stride=16, slc_block=64, num_selected=4, num_init=1, num_local=2, window=192)


@pytest.mark.parametrize("lengths, HQ, HKV, DV, dtype, cfg", [
    ([300, 7, 130], 4, 2, 48, torch.float32, LOCAL),  # several blocks, a sequence inside its first block, DV split
    ([260], 2, 1, 16, torch.float16, LOCAL),
    ([400], 2, 1, 16, torch.float32, SparsityConfig(32, 16, 128, 3, 1, 1, 200)),  # l' = 2 query tiles, one local
])
def test_slc_rest_adds_the_local_blocks(lengths, HQ, HKV, DV, dtype, cfg):
    """slc_fwd without the local blocks, completed by win_fwd's slc_rest, equals slc_fwd over every block."""
    assert takes_local_blocks(cfg)
    q, k, v, _, packed = packed_inputs(lengths, HQ, HKV, 16, DV, dtype)
    idx = torch.cat([reference.select_blocks(torch.rand(1, L, HKV, cfg.num_slc(L)), cfg)[0] for L in lengths])
    idx = idx.to(torch.int32).to(DEVICE)
    whole, lse_whole = slc_fwd(q, k, v, idx, packed, cfg, 0.25)
    rest, lse_rest = slc_fwd(q, k, v, idx, packed, cfg, 0.25, skip_local=True)
    # The rest is empty exactly where every selected block is a local one (lse +inf there).
    t = torch.cat([torch.arange(L) for L in lengths]).to(DEVICE)
    only_local = ((idx < 0) | (idx > (t // cfg.slc_block - cfg.num_local)[:, None, None])).all(-1)
    assert torch.equal(torch.isinf(lse_rest), only_local.repeat_interleave(HQ // HKV, dim=1))
    gates = torch.rand(q.shape[0], HQ, 3, device=DEVICE).to(dtype)
    o_cmp = torch.randn(q.shape[0], HQ, DV, device=DEVICE).to(dtype)
    _, _, out = win_fwd(q, k, v, packed, cfg.window, 0.25, gated=(gates, o_cmp, rest), slc_rest=(lse_rest, cfg))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(rest, whole, **tol)
    torch.testing.assert_close(lse_rest, lse_whole, **tol)
    _, _, expected = win_fwd(q, k, v, packed, cfg.window, 0.25, gated=(gates, o_cmp, whole))
    torch.testing.assert_close(out, expected, **tol)


def test_slc_rest_needs_a_configuration_it_can_serve():
    q, k, v, _, packed = packed_inputs([70], 2, 1, 16, 16, torch.float32)
    parts = (torch.rand(70, 2, 3, device=DEVICE), q, q)
    lse = torch.zeros(70, 2, device=DEVICE)
    narrow = SparsityConfig(32, 16, 64, 4, 1, 2, 191)
    assert not takes_local_blocks(narrow)
    with pytest.raises(ValueError, match="takes_local_blocks"):
        win_fwd(q, k, v, packed, 191, 0.25, gated=parts, slc_rest=(lse, narrow))
    with pytest.raises(ValueError, match="takes_local_blocks"):
        win_fwd(q, k, v, packed, 192, 0.25, slc_rest=(lse, LOCAL))


def test_window_refuses_bad_window():
    q, k, v, do, packed = packed_inputs([8], 2, 1, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="window"):
        win_fwd(q, k, v, packed, 0, 0.25)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-scale shapes and bfloat16 need CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lengths, HQ, HKV, DK, DV", [([4096], 16, 1, 192, 128), ([1000, 3001], 32, 8, 128, 128)])
def test_window_gpu_scale(lengths, HQ, HKV, DK, DV, dtype):
    run(lengths, HQ, HKV, DK, DV, 512, dtype)

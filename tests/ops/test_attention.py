"""nsa_attention(backend="triton") against the float64 reference: output, selection and every gradient.

Through Triton's CPU interpreter in CI (tiny shapes, float32/float16); at real shapes and bf16 on a GPU.
Outputs and gradients are compared under the kernel's own selection (passed to the reference), and the
selection itself against the reference's, tie-aware.
"""

import math

import pytest
import torch

import nsa
from nsa import SparsityConfig, reference
from nsa.ops import attention
from nsa.ops.selected import slc_fwd
from tests.inputs import DEVICE, knobs, make_inputs
from tests.tolerance import assert_same_selection, assert_within_rule

NAMES = ("q", "k", "v", "k_cmp", "v_cmp", "gates", "k_win", "v_win")
TINY = SparsityConfig(cmp_block=16, cmp_stride=8, slc_block=32, num_selected=3, num_init=1, num_local=1, window=24)


def reference_scores(args, cfg, scale):
    """The float64 reference's block scores S [1 or B, T, HKV, max Ns] (zero-padded across packed sequences)."""
    cu = args.get("cu_seqlens")
    bounds = [(0, args["q"].shape[1])] if cu is None else list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    pieces, c0 = [], 0
    Ns = max(cfg.num_slc(t1 - t0) for t0, t1 in bounds)
    for t0, t1 in bounds:
        T = t1 - t0
        c1 = c0 + cfg.num_cmp(T)
        q = args["q"][:, t0:t1].double()
        B, _, HQ, DK = q.shape
        HKV = args["k"].shape[2]
        k_cmp, v_cmp = args["k_cmp"][:, c0:c1].double(), args["v_cmp"][:, c0:c1].double()
        pos = torch.arange(T, device=q.device)
        visible = (torch.arange(c1 - c0, device=q.device) * cfg.cmp_stride + cfg.cmp_block)[None, :] <= pos[:, None] + 1
        _, p = reference.masked_attention(q.view(B, T, HKV, HQ // HKV, DK), k_cmp, v_cmp, visible[None, :, None].expand(B, T, HKV, -1), scale)
        S = reference.block_scores(p, T, cfg)
        pieces.append(torch.nn.functional.pad(S, (0, Ns - S.shape[-1])))
        c0 = c1
    return torch.cat(pieces, dim=1)


def run_reference(args, grads_of, idx, cfg, scale, dtype):
    inputs = {n: args[n].detach().to(dtype).requires_grad_() for n in NAMES}
    if args["k_win"] is args["k"]:
        inputs.update(k_win=inputs["k"], v_win=inputs["v"])
    o, _ = reference.nsa_attention(*(inputs[n] for n in NAMES), cfg, scale, args.get("cu_seqlens"), block_indices=idx)
    return o, torch.autograd.grad(o, [inputs[n] for n in NAMES], grads_of.to(dtype))


def check(B, T, HQ, HKV, DK, DV, cfg, dtype, seqlens=None, shared_win=False):
    """shared_win: the window branch reads k and v (the same tensors), so their gradients are one sum."""
    args = make_inputs(B, T, HQ, HKV, DK, DV, cfg, dtype=dtype, device=DEVICE, seqlens=seqlens)
    if shared_win:
        args.update(k_win=args["k"], v_win=args["v"])
    for n in NAMES:
        args[n].requires_grad_(True)
    scale = 1 / math.sqrt(DK)
    o, idx = nsa.nsa_attention(**args, **knobs(cfg), return_indices=True, backend="triton")
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, [args[n] for n in NAMES], do)

    _, idx_ref = reference.nsa_attention(*(args[n].detach().double() for n in NAMES), cfg, scale, args.get("cu_seqlens"))
    assert_same_selection(idx, idx_ref, reference_scores(args, cfg, scale), cfg,
                          rtol=1e-5 if dtype == torch.float32 else 2e-2)

    o64, g64 = run_reference(args, do, idx, cfg, scale, torch.float64)
    o_low, g_low = run_reference(args, do, idx, cfg, scale, dtype)
    assert o.dtype == dtype
    assert_within_rule("o", o, o_low, o64, factor=2.0)
    for name, g, lo, ref in zip(NAMES, grads, g_low, g64):
        assert_within_rule(f"d{name}", g, lo, ref, factor=3.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "B, T, HQ, HKV, DK, DV, seqlens",
    [
        (2, 99, 4, 2, 32, 16, None),           # batch 2, odd T, DK != DV, G = 2
        (1, 130, 3, 1, 16, 32, None),          # G = 3 (padded), T not a multiple of any block
        (1, 123, 8, 1, 16, 16, [57, 10, 56]),  # varlen with a sequence shorter than cmp_block, G = 8
    ],
)
def test_triton_matches_reference(B, T, HQ, HKV, DK, DV, seqlens, dtype):
    check(B, T, HQ, HKV, DK, DV, TINY, dtype, seqlens)


LOCAL = SparsityConfig(cmp_block=32, cmp_stride=16, slc_block=64, num_selected=4, num_init=1, num_local=2, window=192)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_window_on_the_selected_keys_adds_the_local_blocks(dtype, monkeypatch):
    """With k_win, v_win = k, v and a configuration win_fwd can serve, the selected branch leaves its local blocks
    to the window forward; the whole is checked against the reference as any other case."""
    skipped = []
    monkeypatch.setattr(attention, "slc_fwd", lambda *a, skip_local, **kw: skipped.append(skip_local)
                        or slc_fwd(*a, skip_local=skip_local, **kw))
    check(1, 390, 4, 2, 16, 32, LOCAL, dtype, seqlens=[300, 7, 83], shared_win=True)
    check(1, 200, 4, 2, 16, 32, LOCAL, dtype)
    assert skipped == [True, False]


def test_deterministic_backward_is_bitwise_reproducible():
    args = make_inputs(1, 90, 4, 1, 16, 16, TINY, dtype=torch.float32, device=DEVICE)
    for n in NAMES:
        args[n].requires_grad_(True)
    do = torch.randn(1, 90, 4, 16, device=DEVICE)
    torch.use_deterministic_algorithms(True)
    try:
        runs = [torch.autograd.grad(nsa.nsa_attention(**args, **knobs(TINY), backend="triton"), [args[n] for n in NAMES], do)
                for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(False)
    for name, a, b in zip(NAMES, *runs):
        assert torch.equal(a, b), f"d{name} differs between two deterministic runs"


def test_float64_is_refused_by_the_triton_backend():
    args = make_inputs(1, 20, 2, 1, 16, 16, TINY, device=DEVICE)
    with pytest.raises(TypeError, match="triton backend takes float16, bfloat16 or float32"):
        nsa.nsa_attention(**args, **knobs(TINY), backend="triton")


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (real shapes, bfloat16)")


@gpu
@pytest.mark.parametrize(
    "T, HQ, HKV, DK, DV, shared_win",
    [(4096, 64, 4, 192, 128, False), (4096, 64, 4, 192, 128, True), (2048, 32, 8, 128, 128, True),
     (3000, 16, 16, 64, 64, False), (2500, 12, 2, 128, 64, False)],
)
def test_triton_matches_reference_on_gpu(T, HQ, HKV, DK, DV, shared_win):
    check(1, T, HQ, HKV, DK, DV, SparsityConfig(), torch.bfloat16, shared_win=shared_win)


@gpu
def test_opcheck_and_fullgraph_compile():
    cfg = SparsityConfig()
    args = make_inputs(1, 1024, 16, 2, 64, 64, cfg, dtype=torch.bfloat16, device=DEVICE)
    from nsa.ops.attention import _KNOBS, attention_fwd

    knob_list = [getattr(cfg, n) for n in _KNOBS]
    inputs = [args[n].requires_grad_(True) for n in NAMES]
    torch.library.opcheck(attention_fwd, (*inputs, None, knob_list, 0.125))

    def layer(q, k, v, k_cmp, v_cmp, gates, k_win, v_win):
        return nsa.nsa_attention(q, k, v, k_cmp, v_cmp, gates, k_win=k_win, v_win=v_win, backend="triton") * 2

    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(*inputs), layer(*inputs))


@gpu
def test_256k_tokens_sampled_rows():
    """T * HQ * DK passes 2^31 here: offsets must be 64-bit. Rows are checked against the reference computing
    only those queries (under the kernel's selection, which is itself checked to be a valid one)."""
    T, HQ, HKV, DK, DV = 262144, 64, 4, 192, 128
    cfg = SparsityConfig()
    args = make_inputs(1, T, HQ, HKV, DK, DV, cfg, dtype=torch.bfloat16, device=DEVICE, separate_win=False)
    o, idx = nsa.nsa_attention(**args, return_indices=True, backend="triton")
    rows = torch.cat([torch.tensor([0, 31, 64, T - 1]), torch.randint(0, T, (12,))]).to(DEVICE)
    inputs = [args[n] for n in ("q", "k", "v", "k_cmp", "v_cmp", "gates", "k", "v")]
    scale = 1 / math.sqrt(DK)
    o64, _ = reference.nsa_forward(*(x.double() for x in inputs), cfg, scale, block_indices=idx[:, rows], rows=rows)
    o_low, _ = reference.nsa_forward(*inputs, cfg, scale, block_indices=idx[:, rows], rows=rows)
    assert torch.isfinite(o).all()
    assert_within_rule("o[rows]", o[:, rows], o_low, o64, factor=2.0)
    _, idx_ref = reference.nsa_forward(*(x.float() for x in inputs), cfg, scale, rows=rows)
    chosen = (idx[:, rows] >= 0).sum(-1)
    assert torch.equal(chosen, (idx_ref >= 0).sum(-1)), "a row selects the wrong number of blocks"

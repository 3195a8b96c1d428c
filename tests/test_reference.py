"""The reference backend against SPEC.md: a naive per-token path, properties, gradients, varlen."""

import math

import pytest
import torch
import torch.nn.functional as F

import nsa
from nsa import SparsityConfig, reference
from tests.inputs import knobs, make_inputs
from nsa.naive import naive_nsa

SMALL = SparsityConfig(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=4, num_init=1, num_local=2, window=24)


@pytest.mark.parametrize(
    "B, T, HQ, HKV, DK, DV, cfg",
    [
        (2, 61, 4, 2, 8, 8, SMALL),            # odd T, not a multiple of any block, batch 2
        (1, 5, 2, 1, 8, 4, SMALL),             # T < cmp_block: no compressed token at all
        (1, 100, 3, 1, 6, 10, SMALL),          # G = 3, DK != DV
        (1, 77, 8, 1, 8, 8, SMALL),            # G = 8
        (1, 90, 4, 4, 4, 4, SMALL),            # G = 1
        (1, 70, 8, 2, 8, 8, SparsityConfig(cmp_block=8, cmp_stride=8, slc_block=8, num_selected=3, num_init=0, num_local=1, window=5)),
        (1, 130, 2, 1, 8, 8, SparsityConfig(cmp_block=16, cmp_stride=4, slc_block=32, num_selected=3, num_init=2, num_local=1, window=40)),
        (1, 150, 2, 1, 8, 8, SparsityConfig()),  # the paper's knobs, T between l and l'
    ],
)
def test_reference_equals_naive(B, T, HQ, HKV, DK, DV, cfg):
    args = make_inputs(B, T, HQ, HKV, DK, DV, cfg)
    scale = 0.7 / math.sqrt(DK)
    o, idx = nsa.nsa_attention(**args, **knobs(cfg), scale=scale, return_indices=True, backend="reference")
    o_naive, idx_naive = naive_nsa(args["q"], args["k"], args["v"], args["k_cmp"], args["v_cmp"], args["gates"],
                                   args["k_win"], args["v_win"], cfg, scale)
    assert torch.equal(idx, idx_naive)
    torch.testing.assert_close(o, o_naive, rtol=1e-10, atol=1e-10)


def test_selection_rules_hold():
    cfg = SparsityConfig(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=5, num_init=1, num_local=2)
    T = 200
    scores = torch.rand(2, T, 3, cfg.num_slc(T), dtype=torch.float64)
    idx = reference.select_blocks(scores, cfg)
    for t in range(T):
        jt = t // cfg.slc_block
        for row in idx[:, t].reshape(-1, cfg.num_selected).tolist():
            chosen = [j for j in row if j >= 0]
            assert row == chosen + [-1] * (len(row) - len(chosen)), "selected blocks first, -1 after them"
            assert chosen == sorted(set(chosen)), "ascending and distinct"
            assert len(chosen) == min(cfg.num_selected, jt + 1)
            assert all(j <= jt for j in chosen), "only causal candidates"
            assert 0 in chosen and jt in chosen and (jt < 1 or jt - 1 in chosen), "forced blocks"


def test_selection_ties_go_to_smaller_block():
    cfg = SparsityConfig(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=4, num_init=1, num_local=1)
    scores = torch.zeros(1, 160, 1, 10, dtype=torch.float64)
    scores[..., 7] = 1.0
    idx = reference.select_blocks(scores, cfg)
    # forced 0 and 9; then 7 (highest); then the tie at 0 goes to block 1.
    assert idx[0, 159, 0].tolist() == [0, 1, 7, 9]


def _full_causal(q, k, v, scale):
    G = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(G, dim=2), v.repeat_interleave(G, dim=2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale)
    return out.transpose(1, 2)


def test_all_blocks_selected_is_full_attention():
    cfg = SparsityConfig(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=8, window=3)
    args = make_inputs(2, 113, 6, 2, 8, 12, cfg)
    args["gates"] = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64).expand_as(args["gates"])
    o = nsa.nsa_attention(**args, **knobs(cfg), backend="reference")
    torch.testing.assert_close(o, _full_causal(args["q"], args["k"], args["v"], 1 / math.sqrt(8)))


def test_window_covering_everything_is_full_attention():
    cfg = SparsityConfig(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=3, window=113)
    args = make_inputs(1, 113, 4, 1, 8, 8, cfg)
    args["gates"] = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).expand_as(args["gates"])
    o = nsa.nsa_attention(**args, **knobs(cfg), backend="reference")
    torch.testing.assert_close(o, _full_causal(args["q"], args["k_win"], args["v_win"], 1 / math.sqrt(8)))


def test_compressed_branch_is_zero_before_first_block():
    cfg = SMALL
    args = make_inputs(1, 40, 4, 2, 8, 8, cfg)
    args["gates"] = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64).expand_as(args["gates"])
    o = nsa.nsa_attention(**args, **knobs(cfg), backend="reference")
    assert torch.equal(o[:, : cfg.cmp_block - 1], torch.zeros_like(o[:, : cfg.cmp_block - 1]))
    assert o[:, cfg.cmp_block - 1 :].abs().min(dim=-1).values.gt(0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_has_no_nan_and_keeps_dtype(dtype):
    args = make_inputs(1, 37, 4, 2, 8, 8, SMALL, dtype=dtype)
    for name in args:
        args[name].requires_grad_(True)
    o = nsa.nsa_attention(**args, **knobs(SMALL), backend="reference")
    assert o.dtype == dtype and torch.isfinite(o).all()
    o.float().square().sum().backward()
    assert all(torch.isfinite(args[name].grad).all() for name in args)


def test_gradcheck_every_input():
    cfg = SparsityConfig(cmp_block=4, cmp_stride=2, slc_block=4, num_selected=3, num_init=1, num_local=1, window=5)
    args = make_inputs(1, 13, 4, 2, 4, 3, cfg)
    names = list(args)

    def fn(*tensors):
        return nsa.nsa_attention(**dict(zip(names, tensors)), **knobs(cfg), backend="reference")

    inputs = tuple(args[n].requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(fn, inputs)


def test_varlen_equals_each_sequence_alone():
    seqlens = [37, 5, 64, 1, 20]
    args = make_inputs(1, sum(seqlens), 4, 2, 8, 8, SMALL, seqlens=seqlens)
    o, idx = nsa.nsa_attention(**args, **knobs(SMALL), return_indices=True, backend="reference")
    t0 = c0 = 0
    for n in seqlens:
        c1 = c0 + SMALL.num_cmp(n)
        alone = {name: x[:, t0 : t0 + n] for name, x in args.items() if name not in ("k_cmp", "v_cmp", "cu_seqlens")}
        alone.update(k_cmp=args["k_cmp"][:, c0:c1], v_cmp=args["v_cmp"][:, c0:c1])
        o_alone, idx_alone = nsa.nsa_attention(**alone, **knobs(SMALL), return_indices=True, backend="reference")
        assert torch.equal(o[:, t0 : t0 + n], o_alone)
        assert torch.equal(idx[:, t0 : t0 + n], idx_alone)
        t0, c0 = t0 + n, c1


def test_window_defaults_to_selected_kv():
    args = make_inputs(1, 50, 4, 2, 8, 8, SMALL, separate_win=False)
    o = nsa.nsa_attention(**args, **knobs(SMALL), backend="reference")
    o_explicit = nsa.nsa_attention(**args, k_win=args["k"], v_win=args["v"], **knobs(SMALL), backend="reference")
    assert torch.equal(o, o_explicit)


def test_reference_is_usable_at_4k_tokens():
    """SPEC.md's reference stays vectorized: T=4096, 16/2 heads, d=64 runs forward and backward on the CPU."""
    args = make_inputs(1, 4096, 16, 2, 64, 64, SparsityConfig(), dtype=torch.float32, separate_win=False)
    for x in args.values():
        x.requires_grad_(True)
    o = nsa.nsa_attention(**args, backend="reference")
    o.sum().backward()
    assert torch.isfinite(o).all() and torch.isfinite(args["q"].grad).all()


def test_sampled_rows_equal_the_full_run():
    """reference.nsa_forward(rows=...) computes a sample of queries exactly as the full run does (long-T checks)."""
    names = ("q", "k", "v", "k_cmp", "v_cmp", "gates", "k_win", "v_win")
    args = make_inputs(2, 300, 4, 2, 8, 8, SMALL)
    o, idx = reference.nsa_forward(*(args[n] for n in names), SMALL, 0.3)
    rows = torch.tensor([0, 5, 77, 299, 150, 151])
    o_rows, idx_rows = reference.nsa_forward(*(args[n] for n in names), SMALL, 0.3, rows=rows)
    assert torch.equal(o[:, rows], o_rows) and torch.equal(idx[:, rows], idx_rows)

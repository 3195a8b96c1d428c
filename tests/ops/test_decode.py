"""The decode kernels (nsa/ops/decode.py): each new query gets what the float64 reference gives its position over
the same prefix; selections tie-aware; contiguous, paged and ring-window caches agree; CUDA-graph replay on the GPU."""

from __future__ import annotations

import pytest
import torch

from nsa import reference
from nsa.config import SparsityConfig
from nsa.ops import decode
from nsa.ops.decode import dense_decode, nsa_decode
from tests.inputs import DEVICE
from tests.tolerance import assert_same_selection, assert_within_rule

SMALL = SparsityConfig(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=4, num_init=1, num_local=2, window=24)
# l = d = l': every compressed token lies in exactly one selection block; and a wide window.
FLAT = SparsityConfig(cmp_block=16, cmp_stride=16, slc_block=16, num_selected=3, num_init=1, num_local=1, window=40)


def make_cache(lengths, C, HQ, HKV, DK, DV, cfg, capacity, dtype, separate_win=True):
    """Random full-length tensors (float64, on DEVICE) of B sequences and their decode inputs: sequence b holds
    lengths[b] tokens after this step's C; everything past a sequence's end is noise the kernel must ignore.
    Without separate_win the window branch reads k, v (a layout without a window ring)."""
    B = len(lengths)
    rnd = lambda *shape: torch.randn(*shape, dtype=torch.float64, device=DEVICE)  # noqa: E731
    full = dict(q=rnd(B, capacity, HQ, DK), k=rnd(B, capacity, HKV, DK), v=rnd(B, capacity, HKV, DV),
                k_cmp=rnd(B, capacity // cfg.cmp_stride, HKV, DK), v_cmp=rnd(B, capacity // cfg.cmp_stride, HKV, DV),
                gates=torch.rand(B, capacity, HQ, 3, dtype=torch.float64, device=DEVICE),
                k_win=rnd(B, capacity, HKV, DK), v_win=rnd(B, capacity, HKV, DV))
    if not separate_win:
        full["k_win"], full["v_win"] = full["k"], full["v"]
    past = torch.tensor(lengths, device=DEVICE) - C
    rows = past[:, None] + torch.arange(C, device=DEVICE)
    take = lambda x: x[torch.arange(B, device=DEVICE)[:, None], rows]  # noqa: E731
    return full, past, take(full["q"]), take(full["gates"])


def reference_rows(full, lengths, C, cfg, dtype, scale, block_indices=None):
    """(o [B, C, HQ, DV], idx, scores [per sequence]) of the reference in `dtype` at each sequence's last C rows."""
    outs, idxs, scores = [], [], []
    for b, L in enumerate(lengths):
        x = {name: t[b:b + 1, :L].to(dtype) for name, t in full.items()}
        tc = cfg.num_cmp(L)
        x["k_cmp"], x["v_cmp"] = full["k_cmp"][b:b + 1, :tc].to(dtype), full["v_cmp"][b:b + 1, :tc].to(dtype)
        rows = torch.arange(L - C, L, device=x["q"].device)
        bi = None if block_indices is None else block_indices[b:b + 1]
        o, idx = reference.nsa_forward(x["q"], x["k"], x["v"], x["k_cmp"], x["v_cmp"], x["gates"], x["k_win"],
                                       x["v_win"], cfg, scale, block_indices=bi, rows=rows)
        outs.append(o)
        idxs.append(idx)
        HKV, G = x["k"].shape[2], x["q"].shape[2] // x["k"].shape[2]
        qg = x["q"][:, rows].view(1, C, HKV, G, -1)
        visible = (torch.arange(tc, device=rows.device) * cfg.cmp_stride + cfg.cmp_block)[None, :] <= rows[:, None] + 1
        p = reference.masked_attention(qg, x["k_cmp"], x["v_cmp"], visible[None, :, None].expand(1, C, HKV, tc), scale)[1]
        scores.append(reference.block_scores(p, L, cfg))
    return torch.cat(outs), torch.cat(idxs), scores


def window_ring(full, lengths, size):
    """[B, size, HKV, D] rings: token s at slot s % size for the last `size` tokens of each sequence; the rest noise."""
    k_win, v_win = full["k_win"], full["v_win"]
    k_ring = torch.randn(len(lengths), size, *k_win.shape[2:], dtype=k_win.dtype, device=k_win.device)
    v_ring = torch.randn(len(lengths), size, *v_win.shape[2:], dtype=v_win.dtype, device=v_win.device)
    for b, L in enumerate(lengths):
        s = torch.arange(max(0, L - size), L, device=k_win.device)
        k_ring[b, s % size], v_ring[b, s % size] = k_win[b, s], v_win[b, s]
    return k_ring, v_ring


def paged(x, page, generator):
    """x [B, S_cap, H, D] scattered over shuffled pages: (pool [B*S_cap/page + 1, page, H, D], block_table)."""
    B, S = x.shape[:2]
    n = B * S // page
    perm = torch.randperm(n + 1, generator=generator)[:n].to(x.device)
    pool = torch.randn(n + 1, page, *x.shape[2:], dtype=x.dtype, device=x.device)
    pool[perm] = x.reshape(n, page, *x.shape[2:])
    return pool, perm.view(B, S // page).to(torch.int32)


def run_decode(full, past, q, gates, lengths, C, cfg, dtype, scale, layout, capacity):
    to = lambda x: x.to(device=DEVICE, dtype=dtype)  # noqa: E731
    kw = {}
    k, v = full["k"], full["v"]
    if layout in ("paged", "paged_ring"):
        g = torch.Generator().manual_seed(1)
        (k, bt), (v, _) = paged(k, 16, g), paged(v, 16, g.manual_seed(1))
        kw["block_table"] = bt.to(DEVICE)
    if layout in ("ring", "paged_ring"):
        k_ring, v_ring = window_ring(full, lengths, cfg.window + C - 1 + 3)
        kw.update(k_win=to(k_ring), v_win=to(v_ring))
    k_cmp, v_cmp = to(full["k_cmp"]), to(full["v_cmp"])
    if layout == "head_major":  # compressed K/V stored [B, HKV, Tc, D], passed as a [B, Tc, HKV, D] view
        k_cmp, v_cmp = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (k_cmp, v_cmp))
    return nsa_decode(to(q), to(gates), to(k), to(v), k_cmp, v_cmp,
                      past.to(device=DEVICE, dtype=torch.int32), cfg, scale, return_indices=True, **kw)


CASES = [
    # cfg, lengths, C, HQ, HKV, DK, DV, capacity, layout
    (SMALL, [600, 301, 37, 5], 1, 6, 2, 32, 16, 640, "ring"),
    (SMALL, [600, 130], 1, 4, 4, 16, 32, 640, "contiguous"),
    (SMALL, [257, 40], 3, 8, 1, 16, 16, 320, "paged_ring"),
    (FLAT, [150, 99, 17], 2, 3, 1, 32, 16, 160, "paged"),
    (SMALL, [70], 9, 16, 1, 16, 16, 96, "contiguous"),
    (SMALL, [333, 80], 2, 4, 2, 16, 32, 384, "head_major"),
]


def assert_new_rows_select_alike(idx, idx_ref, scores, lengths, C, cfg, rtol=1e-4):
    """assert_same_selection on the C new rows of each sequence (idx, idx_ref [B, C, HKV, n], scores [B, C, HKV, Ns]),
    padded to the sequence's length so that the check reads each row's position from its index."""
    for b, L in enumerate(lengths):
        full_idx = torch.full((1, L, *idx.shape[2:]), -1, dtype=torch.int32, device=idx.device)
        full_ref = full_idx.clone()
        full_idx[:, L - C:], full_ref[:, L - C:] = idx[b:b + 1], idx_ref[b:b + 1]
        full_scores = torch.zeros(1, L, idx.shape[2], cfg.num_slc(L), dtype=torch.float64, device=idx.device)
        full_scores[:, L - C:] = scores[b]
        assert_same_selection(full_idx, full_ref, full_scores, cfg, rtol=rtol)


def assert_decode_equals_reference(case, dtype, rtol=1e-4):
    """The decode of a CASES-like case in `dtype` selects as the float64 reference does (tie-aware, scores within
    rtol) and, under its own selection, meets the tolerance rule against the reference in float64 and in `dtype`."""
    cfg, lengths, C, HQ, HKV, DK, DV, capacity, layout = case
    full, past, q, gates = make_cache(lengths, C, HQ, HKV, DK, DV, cfg, capacity, dtype, "ring" in layout)
    scale = DK ** -0.5
    o, idx = run_decode(full, past, q, gates, lengths, C, cfg, dtype, scale, layout, capacity)
    _, idx_ref, scores = reference_rows(full, lengths, C, cfg, torch.float64, scale)
    assert_new_rows_select_alike(idx, idx_ref, scores, lengths, C, cfg, rtol=rtol)
    # Outputs under the kernel's selection (identical to the reference's up to ties).
    oracle = reference_rows(full, lengths, C, cfg, torch.float64, scale, block_indices=idx)[0]
    low = reference_rows(full, lengths, C, cfg, dtype, scale, block_indices=idx)[0]
    assert_within_rule("o", o, low, oracle, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[8]}-C{c[2]}-G{c[3] // c[4]}")
def test_decode_equals_reference_at_the_new_positions(case, dtype):
    assert_decode_equals_reference(case, dtype)


MANY_ROWS = (SMALL, [600, 577, 512, 449, 390, 333, 260, 129], 4, 4, 2, 16, 16, 640, "ring")


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[3], MANY_ROWS],
                         ids=lambda c: f"{c[8]}-C{c[2]}-G{c[3] // c[4]}-B{len(c[1])}")
def test_small_tiles_and_many_splits(case, monkeypatch):
    """Tiles of 16 token slots (several per compressed chunk, so spills cross tiles inside a chunk and between
    chunks), chunks planned for 9 SMs (20 blocks, not a power of two, in the first case), selected-block programs
    planned for one per SM (2 to 4 blocks each; 3 of n = 4 and 2 of n = 3, whose last ranks load nothing), window
    programs of 16 keys (two or more to a band), partial softmaxes merged two splits at a time, and
    the selection over shares of one tile (many candidates to rank)."""
    monkeypatch.setattr(decode, "NUM_SMS", 9)
    monkeypatch.setattr(decode, "SLC_PROGRAMS_PER_SM", 1)
    monkeypatch.setattr(decode, "SELECT_SHARE_BLOCKS", 1)
    monkeypatch.setattr(decode, "BLOCK_N", 16)
    monkeypatch.setattr(decode, "BLOCK_S", 16)
    monkeypatch.setattr(decode, "WIN_KEYS", 16)
    monkeypatch.setattr(decode, "SPLIT_T", 2)
    assert_decode_equals_reference(case, torch.float32)


def test_window_programs_of_several_tiles(monkeypatch):
    """Window programs of 16-key tiles, two to a program where the compressed chunks are short (half of WIN_KEYS)
    and four where they are long (chunks planned for one SM)."""
    monkeypatch.setattr(decode, "BLOCK_S", 16)
    monkeypatch.setattr(decode, "WIN_KEYS", 64)
    plans = []
    plan = decode.split_plan
    monkeypatch.setattr(decode, "split_plan", lambda *args: plans.append(plan(*args)) or plans[-1])
    assert_decode_equals_reference(CASES[0], torch.float32)
    monkeypatch.setattr(decode, "NUM_SMS", 1)
    assert_decode_equals_reference(CASES[0], torch.float32)
    assert [(p.stages, p.win_keys) for p in plans] == [(2, 32), (decode.CMP_STAGES, 64)]


def test_shares_smaller_than_n(monkeypatch):
    """Select shares of 2 blocks (tiles of 8 token slots), fewer than the n = 4 blocks to select: each share passes
    all its candidates on, and slc_split ranks them."""
    monkeypatch.setattr(decode, "SELECT_SHARE_BLOCKS", 1)
    monkeypatch.setattr(decode, "BLOCK_N", 8)
    assert_decode_equals_reference(CASES[0], torch.float32)


@pytest.mark.parametrize("layout", ["ring", "paged_ring"])
def test_long_chunks_go_in_parts(layout, monkeypatch):
    """A chunk longer than MAX_QUERIES runs in parts (here 3 + 3 + 3 of 9 queries): the same selection and
    outputs as one pass."""
    cfg, lengths, C, HQ, HKV, DK, DV, capacity = SMALL, [300, 61], 9, 4, 2, 16, 16, 320
    full, past, q, gates = make_cache(lengths, C, HQ, HKV, DK, DV, cfg, capacity, torch.float32)
    whole = run_decode(full, past, q, gates, lengths, C, cfg, torch.float32, 0.25, layout, capacity)
    monkeypatch.setattr(decode, "MAX_QUERIES", 3)
    parts = run_decode(full, past, q, gates, lengths, C, cfg, torch.float32, 0.25, layout, capacity)
    assert torch.equal(parts[1], whole[1])
    torch.testing.assert_close(parts[0], whole[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("share_blocks", [512, 1])
def test_indices_on_request_only(share_blocks, monkeypatch):
    """Without return_indices the kernels skip idx (and with several select shares, the places in it): the same o."""
    monkeypatch.setattr(decode, "SELECT_SHARE_BLOCKS", share_blocks)
    cfg, lengths, C, HQ, HKV, DK, DV, capacity = SMALL, [300, 61], 2, 4, 2, 16, 16, 320
    full, past, q, gates = make_cache(lengths, C, HQ, HKV, DK, DV, cfg, capacity, torch.float32)
    o, _ = run_decode(full, past, q, gates, lengths, C, cfg, torch.float32, 0.25, "contiguous", capacity)
    f = lambda x: x.to(device=DEVICE, dtype=torch.float32)  # noqa: E731
    alone = nsa_decode(f(q), f(gates), f(full["k"]), f(full["v"]), f(full["k_cmp"]), f(full["v_cmp"]),
                       past.to(device=DEVICE, dtype=torch.int32), cfg, 0.25)
    assert torch.equal(alone, o)


def test_layouts_agree_exactly():
    cfg, lengths, C, HQ, HKV, DK, DV, capacity = SMALL, [300, 61], 2, 4, 2, 16, 16, 320
    full, past, q, gates = make_cache(lengths, C, HQ, HKV, DK, DV, cfg, capacity, torch.float32, separate_win=False)
    outs = [run_decode(full, past, q, gates, lengths, C, cfg, torch.float32, 0.25, layout, capacity)
            for layout in ("contiguous", "paged", "ring", "paged_ring", "head_major")]
    for o, idx in outs[1:]:
        assert torch.equal(idx, outs[0][1])
        torch.testing.assert_close(o, outs[0][0], rtol=1e-6, atol=1e-6)


def test_exact_ties_go_to_the_smaller_block():
    """Zero compressed keys give every compressed token the same probability, so whole blocks' scores tie exactly:
    the selection must take the smallest tied blocks (SPEC 4), as the reference does, with zero-score candidates
    (blocks no compressed token has reached yet) last."""
    cfg, lengths, C, HQ, HKV, DK, DV, capacity = SMALL, [600, 301, 150, 37], 2, 4, 2, 16, 16, 640
    full, past, q, gates = make_cache(lengths, C, HQ, HKV, DK, DV, cfg, capacity, torch.float32)
    full["k_cmp"].zero_()
    _, idx = run_decode(full, past, q, gates, lengths, C, cfg, torch.float32, 0.25, "contiguous", capacity)
    _, idx_ref, _ = reference_rows(full, lengths, C, cfg, torch.float64, 0.25)
    assert torch.equal(idx, idx_ref)


def test_refuses_bad_caches():
    full, past, q, gates = make_cache([40], 1, 2, 1, 16, 16, SMALL, 64, torch.float32)
    f = lambda x: x.float()  # noqa: E731
    with pytest.raises(ValueError, match=r"k, v must be contiguous .*\(non-contiguous\)"):
        nsa_decode(f(q), f(gates), f(full["k"]), f(full["v"]).repeat(1, 2, 1, 1)[:, ::2], f(full["k_cmp"]),
                   f(full["v_cmp"]), past.int(), SMALL)
    with pytest.raises(ValueError, match="window ring k_win must hold"):
        nsa_decode(f(q), f(gates), f(full["k"]), f(full["v"]), f(full["k_cmp"]), f(full["v_cmp"]),
                   past.int(), SMALL, k_win=f(full["k_win"][:, :10]), v_win=f(full["v_win"][:, :10]))
    with pytest.raises(ValueError, match="cache_seqlens must be int32"):
        nsa_decode(f(q), f(gates), f(full["k"]), f(full["v"]), f(full["k_cmp"]), f(full["v_cmp"]), past, SMALL)
    # Two sequences against a contiguous cache of one: the kernels would read past its end.
    two = lambda x: x.expand(2, *x.shape[1:])  # noqa: E731
    with pytest.raises(ValueError, match=r"k, v without a block table must be \[B, S_cap, HKV, D\] with B=2"):
        nsa_decode(two(f(q)), two(f(gates)), f(full["k"]), f(full["v"]), two(f(full["k_cmp"])), two(f(full["v_cmp"])),
                   two(past.int()).contiguous(), SMALL)
    with pytest.raises(ValueError, match=r"k, v without a block table must be \[B, S_cap, HKV, D\] with B=2"):
        dense_decode(two(f(q)), f(full["k"]), f(full["v"]), two(past.int()).contiguous())


def causal_rows(q, k, v, lengths, C, scale):
    """Full causal attention of the last C positions of each sequence (q [B, C, HQ, DK] against k, v [B, S, HKV, D]
    holding lengths[b] tokens), in q's dtype: o [B, C, HQ, DV]."""
    G = q.shape[2] // k.shape[2]
    outs = []
    for b, L in enumerate(lengths):
        kb, vb = k[b, :L].repeat_interleave(G, dim=1), v[b, :L].repeat_interleave(G, dim=1)
        s = torch.einsum("chd,shd->hcs", q[b], kb) * scale
        visible = torch.arange(L, device=q.device)[None, :] <= torch.arange(L - C, L, device=q.device)[:, None]
        outs.append(torch.einsum("hcs,shd->chd", s.masked_fill(~visible, float("-inf")).softmax(-1), vb))
    return torch.stack(outs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lengths, C, HQ, HKV, capacity, paged_at", [
    ([300, 61, 5], 1, 8, 2, 320, None), ([130], 3, 4, 4, 192, None), ([200, 77], 2, 6, 1, 256, 16),
    ([90, 40, 33], 5, 32, 2, 96, None)], ids=["B3-G4", "C3-G1", "paged-G6", "C5-G16"])
def test_dense_decode_equals_causal_attention(lengths, C, HQ, HKV, capacity, paged_at, dtype, monkeypatch):
    """Small key tiles and merges of two splits at a time (so a query's keys span several programs and merge
    steps); the tolerance rule against float64, with the reference in `dtype` as the low-precision one."""
    monkeypatch.setattr(decode, "BLOCK_S", 16)
    monkeypatch.setattr(decode, "SPLIT_T", 2)
    B, DK, DV = len(lengths), 16, 32
    rnd = lambda *shape: torch.randn(*shape, dtype=torch.float64, device=DEVICE)  # noqa: E731
    k, v = rnd(B, capacity, HKV, DK), rnd(B, capacity, HKV, DV)
    q = rnd(B, C, HQ, DK)
    past = torch.tensor(lengths, dtype=torch.int32, device=DEVICE) - C
    oracle = causal_rows(q, k, v, lengths, C, 0.3)
    low = causal_rows(q.to(dtype), k.to(dtype), v.to(dtype), lengths, C, 0.3)
    kw = {}
    if paged_at:
        g = torch.Generator().manual_seed(1)
        (k, kw["block_table"]), (v, _) = paged(k, paged_at, g), paged(v, paged_at, g.manual_seed(1))
        kw["block_table"] = kw["block_table"].to(DEVICE)
    o = dense_decode(q.to(dtype), k.to(dtype), v.to(dtype), past, 0.3, **kw)
    assert o.dtype == dtype and o.shape == (B, C, HQ, DV)
    assert_within_rule("o", o, low, oracle, 2)


def test_refuses_bad_dtypes_and_devices():
    """Mixed dtypes, a dtype the kernels do not compute in and a tensor on another device are refused by name before
    any kernel runs."""
    full, past, q, gates = make_cache([40], 1, 2, 1, 16, 16, SMALL, 64, torch.float32)
    args = dict(q=q, gates=gates, k=full["k"], v=full["v"], k_cmp=full["k_cmp"], v_cmp=full["v_cmp"])
    args = {name: x.float() for name, x in args.items()}

    def decode(**change):
        a = {**args, "cache_seqlens": past.int(), **change}
        return nsa_decode(a["q"], a["gates"], a["k"], a["v"], a["k_cmp"], a["v_cmp"], a["cache_seqlens"], SMALL)

    with pytest.raises(TypeError, match="k_cmp must have q's dtype torch.float32, got torch.float16"):
        decode(k_cmp=args["k_cmp"].half())
    with pytest.raises(TypeError, match="q must be float16, bfloat16 or float32"):
        decode(**{name: x.double() for name, x in args.items()})
    with pytest.raises(TypeError, match="gates must be a floating tensor"):
        decode(gates=args["gates"].int())
    with pytest.raises(ValueError, match="v must be on q's device"):
        decode(v=args["v"].to("meta"))
    with pytest.raises(ValueError, match="cache_seqlens must be on q's device"):
        decode(cache_seqlens=past.int().to("meta"))
    with pytest.raises(TypeError, match="v must have q's dtype"):
        dense_decode(args["q"], args["k"], args["v"].half(), past.int())


def test_dense_decode_refuses_bad_inputs():
    q, k, lengths = torch.zeros(1, 1, 4, 16), torch.zeros(1, 32, 2, 16), torch.zeros(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="multiple of the key/value heads"):
        dense_decode(torch.zeros(1, 1, 3, 16), k, k, lengths)
    with pytest.raises(ValueError, match="cache_seqlens must be int32"):
        dense_decode(q, k, k, torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ValueError, match="k, v must be contiguous .* alike"):
        dense_decode(q, k, torch.zeros(1, 32, 1, 16), lengths)
    with pytest.raises(ValueError, match=r"\(non-contiguous\)"):
        dense_decode(q, k, torch.zeros(1, 2, 32, 16).transpose(1, 2), lengths)
    with pytest.raises(ValueError, match="head dim must be q's"):
        dense_decode(q, torch.zeros(1, 32, 2, 32), k, lengths)


def test_dense_decode_long_chunks_go_in_parts(monkeypatch):
    lengths, C = [70, 41], 5
    k, v, q = (torch.randn(*shape, device=DEVICE) for shape in ((2, 80, 1, 16), (2, 80, 1, 16), (2, C, 4, 16)))
    past = torch.tensor(lengths, dtype=torch.int32, device=DEVICE) - C
    whole = dense_decode(q, k, v, past)
    monkeypatch.setattr(decode, "MAX_QUERIES", 2)
    torch.testing.assert_close(dense_decode(q, k, v, past), whole, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(whole, causal_rows(q, k, v, lengths, C, 0.25), rtol=1e-5, atol=1e-5)


PAPER = SparsityConfig()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 at the paper's shapes and CUDA graphs need a GPU")
@pytest.mark.parametrize("lengths, C", [([8192], 1), ([65536, 4099, 777, 40000], 1), ([131072], 1),
                                        ([8192, 3001], 4)])
def test_paper_shapes_bf16_on_gpu(lengths, C):
    assert_decode_equals_reference((PAPER, lengths, C, 64, 4, 192, 128, max(lengths), "ring"), torch.bfloat16,
                                   rtol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replay_equals_eager():
    lengths, C, HQ, HKV, DK, DV = [5000, 300, 2049], 1, 64, 4, 192, 128
    full, past, q, gates = make_cache(lengths, C, HQ, HKV, DK, DV, PAPER, 8192, torch.bfloat16)
    bf16 = lambda x: x.to(torch.bfloat16)  # noqa: E731
    args = [bf16(q), bf16(gates), bf16(full["k"]), bf16(full["v"]), bf16(full["k_cmp"]), bf16(full["v_cmp"]),
            past.to(torch.int32)]
    eager = nsa_decode(*args, PAPER)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        nsa_decode(*args, PAPER)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = nsa_decode(*args, PAPER)
    # The step advances on the device only: new lengths and queries, then replay.
    args[6].add_(1)
    args[0].copy_(torch.randn_like(args[0]))
    graph.replay()
    torch.testing.assert_close(captured, nsa_decode(*args, PAPER), rtol=0, atol=0)
    assert not torch.equal(captured, eager)

"""NSACache: decoding gives each new token what the training path gives that position (SPEC.md, Decoding)."""

import pytest
import torch

import nsa
from nsa.cache import NSACache, decode_attention
from nsa.modules import NativeSparseAttention

SMALL = nsa.SparsityConfig(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=4, num_init=1, num_local=2, window=24)


def make(share_win_kv=False, heads=6, kv_heads=2):
    return NativeSparseAttention(48, heads, kv_heads, head_dim=8, v_head_dim=12, sparsity=SMALL,
                                 share_win_kv=share_win_kv, layer_idx=1).double()


def decode_in_chunks(m, x, chunks, pos=None):
    cache = NSACache()
    outs, t = [], 0
    for c in chunks:
        outs.append(m(x[:, t:t + c], position_ids=None if pos is None else pos[:, t:t + c], cache=cache))
        t += c
    assert t == x.shape[1]
    return torch.cat(outs, dim=1), cache


@pytest.mark.parametrize("share_win_kv", [False, True])
@pytest.mark.parametrize("chunks", [[1] * 70, [13] + [1] * 57, [30, 3, 1, 7, 29], [70]])
def test_decoding_equals_training_path(share_win_kv, chunks):
    m = make(share_win_kv)
    x = torch.randn(2, 70, 48, dtype=torch.float64)
    pos = torch.randint(0, 500, (2, 1)) + torch.arange(70)
    full = m(x, position_ids=pos)
    decoded, cache = decode_in_chunks(m, x, chunks, pos)
    torch.testing.assert_close(decoded, full, rtol=1e-10, atol=1e-12)
    assert cache.get_seq_length(1) == 70 and cache.get_seq_length(0) == 0


def test_incremental_phi_and_selection_match_training_path():
    """Outputs could agree by luck where a gate is small: compare the compressed tokens and selected blocks too."""
    m = make()
    T = 60
    x = torch.randn(1, T, 48, dtype=torch.float64)
    pos = torch.arange(T)[None]
    p = m.project(x, pos)
    starts = torch.arange(SMALL.num_cmp(T)) * SMALL.cmp_stride
    k_cmp, v_cmp = m.compress(p["k_cmp"], p["v_cmp"], pos, starts)
    _, idx = nsa.nsa_attention(p["q"], p["k_slc"], p["v_slc"], k_cmp, v_cmp, p["gates"], k_win=p["k_win"],
                               v_win=p["v_win"], config=SMALL, return_indices=True)
    cache = NSACache()
    for t in range(T):
        new = {name: value[:, t:t + 1] for name, value in p.items()}
        state = cache.update(0, new["k_slc"], new["v_slc"], k_win=new["k_win"], v_win=new["v_win"],
                             k_cmp_raw=new["k_cmp"], v_cmp_raw=new["v_cmp"], position_ids=pos[:, t:t + 1],
                             compress=m.compress, sparsity=SMALL)
        torch.testing.assert_close(state.k_cmp, k_cmp[:, :SMALL.num_cmp(t + 1)], rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(state.v_cmp, v_cmp[:, :SMALL.num_cmp(t + 1)], rtol=1e-12, atol=1e-13)
        _, step_idx = decode_attention(new["q"], new["gates"], state, SMALL, return_indices=True)
        assert torch.equal(step_idx, idx[:, t:t + 1]), t
    assert (idx[:, -1] >= 0).sum() == SMALL.num_selected * 2


def test_cache_keeps_what_spec_says():
    m = make()
    x = torch.randn(1, 45, 48, dtype=torch.float64)
    _, cache = decode_in_chunks(m, x, [20] + [1] * 25)
    layer = cache.layers[1]
    assert layer.k.shape == (1, 45, 2, 8) and layer.v.shape == (1, 45, 2, 12)
    assert layer.k_cmp.shape == (1, SMALL.num_cmp(45), 2, 8) and layer.v_cmp.shape == (1, SMALL.num_cmp(45), 2, 12)
    assert layer.k_tail.shape[1] == SMALL.cmp_block and layer.pos_tail.tolist() == [list(range(37, 45))]
    assert layer.k_win.shape[1] == SMALL.window
    # The cached window is the newest window keys.
    p = m.project(x, torch.arange(45)[None])
    torch.testing.assert_close(layer.k_win, p["k_win"][:, -SMALL.window:], rtol=1e-12, atol=1e-13)


def test_shared_window_keeps_no_window_copy():
    _, cache = decode_in_chunks(make(share_win_kv=True), torch.randn(1, 30, 48, dtype=torch.float64), [10, 20])
    assert cache.layers[1].k_win is None


def test_reorder_cache_follows_beams():
    m = make()
    x = torch.randn(3, 40, 48, dtype=torch.float64)
    full = m(x)
    cache = NSACache()
    m(x[:, :33], cache=cache)
    order = torch.tensor([2, 0, 0])
    cache.reorder_cache(order)
    out = torch.cat([m(x[order, t:t + 1], cache=cache) for t in range(33, 40)], dim=1)
    torch.testing.assert_close(out, full[order, 33:], rtol=1e-10, atol=1e-12)


def test_update_rejects_a_different_batch():
    m = make()
    cache = NSACache()
    m(torch.randn(2, 5, 48, dtype=torch.float64), cache=cache)
    with pytest.raises(ValueError, match="k must continue the cached"):
        m(torch.randn(3, 1, 48, dtype=torch.float64), cache=cache)

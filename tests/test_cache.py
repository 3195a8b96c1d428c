"""NSACache: decoding gives each new token what the training path gives that position (SPEC.md, Decoding)."""

import pytest
import torch

import nsa
from nsa.cache import RING_SLACK, NSACache, decode_attention
from nsa.modules import NativeSparseAttention
from tests.inputs import DEVICE

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
    k_cmp, v_cmp = m.compress(p["k_cmp"], p["v_cmp"], pos[:, starts + SMALL.cmp_block - 1], starts)
    _, idx = nsa.nsa_attention(p["q"], p["k_slc"], p["v_slc"], k_cmp, v_cmp, p["gates"], k_win=p["k_win"],
                               v_win=p["v_win"], config=SMALL, return_indices=True)
    cache = NSACache()
    for t in range(T):
        new = {name: value[:, t:t + 1] for name, value in p.items()}
        state = cache.update(0, new["k_slc"], new["v_slc"], k_win=new["k_win"], v_win=new["v_win"],
                             k_cmp_raw=new["k_cmp"], v_cmp_raw=new["v_cmp"], position_ids=pos[:, t:t + 1],
                             compress=m.compress, sparsity=SMALL)
        tc = SMALL.num_cmp(t + 1)
        torch.testing.assert_close(state.layer.k_cmp[:, :tc], k_cmp[:, :tc], rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(state.layer.v_cmp[:, :tc], v_cmp[:, :tc], rtol=1e-12, atol=1e-13)
        _, step_idx = decode_attention(new["q"], new["gates"], state, SMALL, return_indices=True)
        assert torch.equal(step_idx, idx[:, t:t + 1]), t
    assert (idx[:, -1] >= 0).sum() == SMALL.num_selected * 2


def test_phi_runs_only_on_steps_that_complete_a_block():
    cache = NSACache()
    l, d = SMALL.cmp_block, SMALL.cmp_stride
    for past in range(1, 60):
        for C in range(1, 6):
            ends = any(e >= l - 1 and (e - l + 1) % d == 0 for e in range(past, past + C))
            assert cache.compresses(past, C, SMALL) == ends, (past, C)
    assert cache.compresses(0, 1, SMALL)
    cache.uniform = False  # the host lengths no longer stand for every sequence's
    assert cache.compresses(5, 1, SMALL)

    m = make()
    calls = []

    def compress(k, v, last):
        calls.append(last)
        return m.compress(k, v, last, cache=cache)

    cache = NSACache()
    x = torch.randn(2, 40, 48, dtype=torch.float64)
    for t in range(40):
        p = m.project(x[:, t:t + 1], torch.full((2, 1), t))
        state = cache.update(0, p["k_slc"], p["v_slc"], k_win=p["k_win"], v_win=p["v_win"], k_cmp_raw=p["k_cmp"],
                             v_cmp_raw=p["v_cmp"], position_ids=torch.full((2, 1), t), compress=compress,
                             sparsity=SMALL)
        assert (state.k_cmp_new is None) == (t > 0 and (t < l - 1 or (t - l + 1) % d != 0)), t
    # The first step, then each step whose token ends a block: 7, 11, ..., 39.
    assert [int(last[0, 0]) for last in calls[1:]] == list(range(l - 1, 40, d))


def test_a_growing_cache_keeps_its_compressed_tokens():
    """Past its first room (256 tokens) a contiguous cache doubles: the compressed tokens move with it (the scratch
    row to the new end), and decoding still equals the training path."""
    m = make()
    x = torch.randn(1, 300, 48, dtype=torch.float64)
    decoded, cache = decode_in_chunks(m, x, [10, 250, 1, 39])
    torch.testing.assert_close(decoded, m(x), rtol=1e-10, atol=1e-12)
    assert cache.capacity == 512 and cache.layers[1].k_cmp.shape[1] == 512 // SMALL.cmp_stride + 1


def test_every_layer_of_a_growing_cache_grows():
    """The first layer to pass the capacity doubles it; the next layers must still grow their own tensors."""
    layers = [make(), make()]
    layers[1].layer_idx = 2
    x = torch.randn(1, 300, 48, dtype=torch.float64)
    cache = NSACache()
    outs = [[], []]
    for t0, t1 in ((0, 10), (10, 300)):
        for m, out in zip(layers, outs):
            out.append(m(x[:, t0:t1], cache=cache))
    for m, out in zip(layers, outs):
        torch.testing.assert_close(torch.cat(out, 1), m(x), rtol=1e-10, atol=1e-12)
        assert cache.layers[m.layer_idx].k.shape[1] == cache.capacity == 512


def test_the_layers_of_a_step_share_their_index_arithmetic():
    """Within cache.step() (a model's forward) the second layer reuses the index tensors and RoPE phases of the
    first, with the outputs of layers updated apart; a cache that took sequences of different lengths shares no
    index tensors."""
    layers = [make(), make()]
    layers[0].layer_idx = 0
    x = torch.randn(2, 40, 48, dtype=torch.float64)
    apart, shared = NSACache(), NSACache()
    for t0, t1 in ((0, 20), (20, 21), (21, 30), (30, 31)):
        pos = torch.arange(t0, t1).expand(2, -1)
        ref = [m(x[:, t0:t1], position_ids=pos, cache=apart) for m in layers]
        phi = shared.compresses(t0, t1 - t0, SMALL)
        assert phi == (t0 in (0, 21))  # 20 and 30 are no block's last token (7, 11, 15, ...)
        with shared.step():
            out = [m(x[:, t0:t1], position_ids=pos, cache=shared) for m in layers]
            # One entry of each kind, two of RoPE phases (the queries' and keys', and phi's at the blocks' ends, on
            # a step that runs phi).
            expected = ["compress", "last_positions", "rope", "rope"] if phi else ["compress", "rope"]
            assert sorted(key[0] for key in shared._memo) == expected + ["update", "window"]
        for a, b in zip(ref, out):
            torch.testing.assert_close(b, a, rtol=0, atol=0)
    m = layers[1]
    p = m.project(x[:, 31:33], torch.arange(31, 33).expand(2, 2))
    shared.update(1, p["k_slc"], p["v_slc"], k_win=p["k_win"], v_win=p["v_win"], k_cmp_raw=p["k_cmp"],
                  v_cmp_raw=p["v_cmp"], position_ids=torch.arange(31, 33).expand(2, 2), compress=m.compress,
                  sparsity=SMALL, lengths=torch.tensor([2, 1], dtype=torch.int32))
    with shared.step():
        layers[0](x[:, 31:32], cache=shared)
        assert {key[0] for key in shared._memo} == {"rope"}


def test_cache_keeps_what_spec_says():
    m = make()
    x = torch.randn(1, 45, 48, dtype=torch.float64)
    _, cache = decode_in_chunks(m, x, [20] + [1] * 25)
    layer = cache.layers[1]
    assert layer.seqlens.tolist() == [45] and cache.get_seq_length(1) == 45
    assert layer.k.shape[:1] + layer.k.shape[2:] == (1, 2, 8) and layer.k.shape[1] >= 45
    p = m.project(x, torch.arange(45)[None])
    torch.testing.assert_close(layer.k[:, :45], p["k_slc"], rtol=1e-12, atol=1e-13)
    tc = SMALL.num_cmp(45)
    assert layer.k_cmp.shape[1] > tc and layer.v_cmp.shape[-1] == 12
    # The tail ring holds the last l raw tokens at slot s % l; the window ring the last w + 15 window keys.
    t = torch.arange(45 - SMALL.cmp_block, 45)
    torch.testing.assert_close(layer.k_tail[:, t % SMALL.cmp_block], p["k_cmp"][:, t], rtol=1e-12, atol=1e-13)
    s = torch.arange(45 - layer.k_win.shape[1], 45)
    assert layer.k_win.shape[1] == SMALL.window + RING_SLACK - 1
    torch.testing.assert_close(layer.k_win[:, s % layer.k_win.shape[1]], p["k_win"][:, s], rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(layer.k_tail[:, torch.arange(37, 45) % 8], p["k_cmp"][:, 37:], rtol=1e-12, atol=1e-13)


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


# A chunk of C of which sequence 1 takes only `taken` (the rest is padding), then one token per step. (10, 9): more
# new tokens than the tail ring's l = 8 slots; (6, 1): fewer, and sequence 1's padding (positions 31-35) falls on
# the tail slots of tokens 24-27, which its next block (tokens 24-31) still needs.
@pytest.mark.parametrize("C, taken", [(10, 9), (6, 1)])
def test_sequences_of_different_lengths_in_one_batch(C, taken):
    """Each sequence appends its own count (lengths) at its own position: as if decoded alone."""
    m = make()
    x = torch.randn(2, 50, 48, dtype=torch.float64)
    ends = [30 + C + 10, 30 + taken + 10]
    alone = [m(x[0:1, :ends[0]])[0], m(x[1:2, :ends[1]])[0]]
    cache = NSACache()
    m(x[:, :30], cache=cache)

    def step(tokens, pos, lengths=None):
        # The module has no per-sequence counts: drive the cache the way a serving engine does.
        p = m.project(tokens, pos)
        state = cache.update(1, p["k_slc"], p["v_slc"], k_win=p["k_win"], v_win=p["v_win"], k_cmp_raw=p["k_cmp"],
                             v_cmp_raw=p["v_cmp"], position_ids=pos, compress=m.compress, sparsity=SMALL,
                             lengths=lengths)
        return m.o_proj(decode_attention(p["q"], p["gates"], state, SMALL).flatten(2))

    pos = torch.arange(30, 30 + C).expand(2, C)
    o = step(x[:, 30:30 + C], pos, torch.tensor([C, taken], dtype=torch.int32))
    outs = [[o[0]], [o[1, :taken]]]
    for _ in range(10):
        cur = cache.seqlens(1).long()
        o = step(x[torch.arange(2), cur][:, None], cur[:, None])
        outs[0].append(o[0])
        outs[1].append(o[1])
    assert cache.seqlens(1).tolist() == ends
    for b in range(2):
        torch.testing.assert_close(torch.cat(outs[b]), alone[b][30:], rtol=1e-10, atol=1e-12)


def paged_cache(batch, page=16, pages_per_seq=8, device="cpu"):
    """A paged cache whose sequences own shuffled pages of a larger pool."""
    perm = torch.randperm(batch * pages_per_seq + 5)[:batch * pages_per_seq]
    return NSACache(block_table=perm.view(batch, pages_per_seq).to(device, torch.int32), page_size=page,
                    num_pages=batch * pages_per_seq + 5)


@pytest.mark.parametrize("share_win_kv", [False, True])
def test_paged_and_contiguous_caches_agree(share_win_kv):
    m = make(share_win_kv)
    x = torch.randn(2, 70, 48, dtype=torch.float64)
    outs = []
    for cache in (NSACache(), NSACache(capacity=128), paged_cache(2)):
        chunks = [25, 1, 1, 17] + [1] * 26
        steps, t = [], 0
        for c in chunks:
            steps.append(m(x[:, t:t + c], cache=cache))
            t += c
        outs.append(torch.cat(steps, dim=1))
    torch.testing.assert_close(outs[0], m(x), rtol=1e-10, atol=1e-12)
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=0, atol=0)


@pytest.mark.parametrize("share_win_kv", [False, True])
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_decode_steps_keep_the_cache_storage(share_win_kv, paged, grad):
    """After the first update of a pre-sized or paged cache, decode steps write every tensor in place (rings,
    compressed tokens, lengths), with or without autograd recording: what a CUDA graph replaying a step reads and
    writes stays where it was captured."""
    m = make(share_win_kv)
    x = torch.randn(2, 60, 48, dtype=torch.float64)
    cache = paged_cache(2) if paged else NSACache(capacity=128)
    with torch.set_grad_enabled(grad):
        outs = [m(x[:, :21], cache=cache)]
        layer = cache.layers[1]
        storage = {name: t.data_ptr() for name, t in vars(layer).items() if isinstance(t, torch.Tensor)}
        assert {"k_tail", "v_tail", "seqlens", "k_cmp"} <= storage.keys()
        assert ("k_win" in storage) != share_win_kv
        for t in range(21, 60):
            outs.append(m(x[:, t:t + 1], cache=cache))
            assert {name: getattr(layer, name).data_ptr() for name in storage} == storage
    torch.testing.assert_close(torch.cat(outs, dim=1), m(x), rtol=1e-10, atol=1e-12)


def test_paged_cache_refuses_to_overflow():
    m = make()
    cache = paged_cache(1, page=16, pages_per_seq=2)
    m(torch.randn(1, 30, 48, dtype=torch.float64), cache=cache)
    with pytest.raises(ValueError, match="paged cache holds 32 tokens"):
        m(torch.randn(1, 3, 48, dtype=torch.float64), cache=cache)


@pytest.mark.parametrize("share_win_kv,chunks", [(False, [40, 1, 3, 5]), (True, [33, 1, 2])])
@pytest.mark.parametrize("paged", ["contiguous", "paged", "one_page_each"])
def test_triton_decode_kernels_on_the_cache(share_win_kv, chunks, paged):
    """The decode kernels read the cache (contiguous or paged, ring or shared window) as the reference does; a paged
    cache of one page per sequence, as many pages as sequences and the pages swapped, is shaped like a contiguous
    one but must be read through its table."""
    m = NativeSparseAttention(64, 4, 2, head_dim=16, v_head_dim=32, sparsity=SMALL, share_win_kv=share_win_kv)
    m = m.to(DEVICE)
    x = torch.randn(2, sum(chunks), 64, device=DEVICE)
    cache = {"contiguous": lambda: NSACache(), "paged": lambda: paged_cache(2, device=DEVICE),
             "one_page_each": lambda: NSACache(block_table=torch.tensor([[1], [0]], dtype=torch.int32, device=DEVICE),
                                               page_size=64, num_pages=2)}[paged]()
    t = 0
    with torch.no_grad():  # with gradients to compute, decode_attention would take the reference path
        for c in chunks:
            pos = torch.arange(t, t + c, device=DEVICE).expand(2, c)
            p = m.project(x[:, t:t + c], pos)
            k_win, v_win = (None, None) if share_win_kv else (p["k_win"], p["v_win"])
            state = cache.update(0, p["k_slc"], p["v_slc"], k_win=k_win, v_win=v_win, k_cmp_raw=p["k_cmp"],
                                 v_cmp_raw=p["v_cmp"], position_ids=pos, compress=m.compress, sparsity=SMALL)
            if t:
                o_ref, idx_ref = decode_attention(p["q"], p["gates"], state, SMALL, return_indices=True,
                                                  backend="reference")
                o, idx = decode_attention(p["q"], p["gates"], state, SMALL, return_indices=True, backend="triton")
                assert torch.equal(idx, idx_ref)
                torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
            t += c

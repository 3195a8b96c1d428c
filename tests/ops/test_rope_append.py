"""rope_append (nsa/ops/rope_append.py): RoPE and a decode step's appends in one kernel, against the unfused torch
operations they replace; and the modules' decode steps through it (NSACache.rotate_and_update) against the steps
without it."""

from __future__ import annotations

import pytest
import torch

import nsa
from nsa.cache import NSACache
from nsa.models import NSAConfig, NSAForCausalLM
from nsa.modules import apply_rotary, rotary_cos_sin
from nsa.ops.rope_append import rope_append
from tests.inputs import DEVICE


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("C", [1, 3])
@pytest.mark.parametrize("paged, rings", [(False, True), (True, True), (True, False)])
def test_rope_append_equals_rotation_and_appends(dtype, C, paged, rings):
    B, HQ, HKV, DK, DV, P, R, L = 3, 6, 2, 12, 10, 8, 7, 4
    kw = dict(dtype=dtype, device=DEVICE)
    # The new tokens as views of one projection's output (token rows wider than their heads), as a module makes them.
    proj = torch.randn(B, C, HQ * DK + 3 * HKV * (DK + DV) + 5, **kw)
    widths = [HQ * DK] + [HKV * DK, HKV * DV] * 3
    parts = proj[..., :sum(widths)].split(widths, dim=-1)
    q = parts[0].view(B, C, HQ, DK)
    k, v, k_win, v_win, k_tail, v_tail = (x.view(B, C, HKV, -1) for x in parts[1:])
    pages_per_seq = 4
    if paged:
        # Pages in shuffled order, and two more pages than the table uses.
        pool = (B * pages_per_seq + 2, P)
        table = torch.randperm(pool[0], device=DEVICE)[:B * pages_per_seq].view(B, pages_per_seq)
    else:
        # A contiguous cache: no table (sequence b's tokens in row b); the identity table gives the rows expected.
        pool = (B, P * pages_per_seq)
        table = torch.arange(B, device=DEVICE)[:, None]
    k_pool, v_pool = torch.randn(*pool, HKV, DK, **kw), torch.randn(*pool, HKV, DV, **kw)
    table = table.to(torch.int32)
    win_k, win_v = torch.randn(B, R, HKV, DK, **kw), torch.randn(B, R, HKV, DV, **kw)
    tail_k, tail_v = torch.randn(B, L, HKV, DK, **kw), torch.randn(B, L, HKV, DV, **kw)
    past = torch.tensor([5, 0, 27][:B], dtype=torch.int32, device=DEVICE)
    seqlens = past.clone()
    pos = past[:, None].long() + torch.arange(C, device=DEVICE) + 100  # RoPE positions need not be cache positions
    cos, sin = rotary_cos_sin(pos, DK, 10000.0)
    want = [x.clone() for x in (k_pool, v_pool, win_k, win_v, tail_k, tail_v)]
    extra = dict(k_win=k_win, v_win=v_win, win_k=win_k, win_v=win_v, k_tail=k_tail, v_tail=v_tail, tail_k=tail_k,
                 tail_v=tail_v) if rings else {}
    q_rot = rope_append(q, cos, sin, k, v, k_pool, v_pool, table if paged else None, past, seqlens, **extra)

    # float32 arithmetic on both sides, which may round a product differently (a fused multiply-add).
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(q_rot, apply_rotary(q, cos, sin), **tol)
    s = past[:, None].long() + torch.arange(C, device=DEVICE)
    b = torch.arange(B, device=DEVICE)[:, None]
    page_len = k_pool.shape[1]
    rows = table.long()[b, s // page_len], s % page_len
    want[0][rows], want[1][rows] = apply_rotary(k, cos, sin), v
    if rings:
        want[2][b, s % R], want[3][b, s % R] = apply_rotary(k_win, cos, sin), v_win
        want[4][b, s % L], want[5][b, s % L] = k_tail, v_tail
    for got, expected in zip((k_pool, v_pool, win_k, win_v, tail_k, tail_v), want):
        # Everything the step does not write keeps its contents.
        torch.testing.assert_close(got, expected, **tol)
    assert torch.equal(seqlens, past + C)


def test_rope_append_refuses_bad_inputs():
    x = torch.randn(1, 5, 2, 8, device=DEVICE)
    cos, sin = rotary_cos_sin(torch.arange(5, device=DEVICE)[None], 8, 10000.0)
    ring = torch.zeros(1, 4, 2, 8, device=DEVICE)
    lengths = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    pools = torch.zeros(1, 16, 2, 8, device=DEVICE), torch.zeros(1, 16, 2, 8, device=DEVICE)
    rest = torch.zeros(1, 1, dtype=torch.int32, device=DEVICE), lengths, lengths.clone()
    with pytest.raises(ValueError, match="at most as many new tokens as the rings hold"):
        rope_append(x, cos, sin, x, x, *pools, *rest, k_win=x, v_win=x, win_k=ring, win_v=ring)
    with pytest.raises(ValueError, match=r"cos must be float32 \[B, C, 1, DK\]"):
        rope_append(x, cos.double(), sin, x, x, *pools, *rest)
    with pytest.raises(ValueError, match=r"sin must be float32 \[B, C, 1, DK\]"):
        rope_append(x, cos, sin[:, :4], x, x, *pools, *rest)
    with pytest.raises(ValueError, match=r"k must have shape \[B, C, H, D\]"):
        rope_append(x, cos, sin, x[:, :, :1], x, *pools, *rest)


SMALL = nsa.SparsityConfig(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=4, num_init=1, num_local=2, window=24)


@pytest.mark.parametrize("attn_impl, share_win_kv", [("nsa", False), ("nsa", True), ("dense", False)])
def test_decode_steps_through_rope_append_equal_the_unfused_steps(attn_impl, share_win_kv, monkeypatch):
    """A model's decode steps on the Triton backend: the plain ones go through rope_append (phi's steps and the
    prefill do not), and logits and caches equal those of the same steps without it."""
    monkeypatch.setenv("NSA_BACKEND", "triton")
    config = NSAConfig(vocab_size=101, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, v_head_dim=32, sparsity=SMALL, attn_impl=attn_impl,
                       share_win_kv=share_win_kv, pad_token_id=0, eos_token_id=None)
    model = NSAForCausalLM(config).to(DEVICE).eval()
    ids = torch.randint(1, 101, (2, 40), device=DEVICE)
    fused_steps = []
    unfused = NSACache.rotate_and_update

    def counted(self, *args, **kwargs):
        step = unfused(self, *args, **kwargs)
        fused_steps.append(step is not None)
        return step

    def run(fuse: bool):
        monkeypatch.setattr(NSACache, "rotate_and_update", counted if fuse else lambda *a, **k: None)
        cache = NSACache(capacity=64)
        with torch.no_grad():
            logits = [model(ids[:, :33], cache=cache).logits]
            logits += [model(ids[:, t:t + 1], cache=cache).logits for t in range(33, 37)]
        return torch.cat(logits, 1), cache

    want, want_cache = run(False)
    got, got_cache = run(True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_cache.layers, want_cache.layers):
        for name, t in vars(a).items():
            if isinstance(t, torch.Tensor):
                # The compressed tokens' last row is scratch for blocks not complete yet: never read, and on a GPU
                # the last of several writes to it wins in no fixed order.
                u = getattr(b, name)
                if name in ("k_cmp", "v_cmp"):
                    t, u = t[:, :-1], u[:, :-1]
                torch.testing.assert_close(t, u, rtol=1e-5, atol=1e-5, msg=name)
    # Per layer: the prefill and phi's step (position 35, where a block of 8 at stride 4 ends) take the
    # unfused path; the other three steps the fused one.
    per_step = [fused_steps[i] for i in range(0, len(fused_steps), config.num_hidden_layers)]
    expected = [False] + [attn_impl == "dense" or (t - 7) % 4 != 0 for t in range(33, 37)]
    assert per_step == expected


def test_rotate_and_update_leaves_every_other_step_to_update(monkeypatch):
    """The fused path takes only plain decode steps on the Triton backend; every other step gets None (the caller
    then rotates and calls update())."""
    from nsa.cache import RING_SLACK
    from nsa.modules import NativeSparseAttention

    monkeypatch.setenv("NSA_BACKEND", "triton")
    m = NativeSparseAttention(48, 4, 2, head_dim=16, v_head_dim=32, sparsity=SMALL).to(DEVICE)
    cache = NSACache()

    def step(t, C, lengths=None):
        pos = torch.arange(t, t + C, device=DEVICE).expand(2, C)
        x = m.project(torch.randn(2, C, 48, device=DEVICE), pos, rotate=False)
        cos, sin = m.rotary(pos, torch.float32)
        args = (0, x["q"], cos, sin, x["k_slc"], x["v_slc"])
        kwargs = dict(k_win=x["k_win"], v_win=x["v_win"], k_cmp_raw=x["k_cmp"], v_cmp_raw=x["v_cmp"], sparsity=SMALL)
        # Appends of per-sequence counts (lengths) go to update() alone: rotate_and_update appends C to each.
        fused = None if lengths is not None else cache.rotate_and_update(*args, **kwargs)
        if fused is None:
            m.rotate(x, cos, sin)
            cache.update(0, x["k_slc"], x["v_slc"], k_win=x["k_win"], v_win=x["v_win"], k_cmp_raw=x["k_cmp"],
                         v_cmp_raw=x["v_cmp"], position_ids=pos, compress=m.compress, sparsity=SMALL,
                         lengths=lengths)
        return fused is not None

    with torch.no_grad():
        assert not step(0, 30)  # a prefill: the layer holds no tokens yet
        assert step(30, 1)  # plain: blocks of 8 at stride 4 end at 31, 35, ...
        assert not step(31, 1)  # phi's step
        assert step(32, 3)  # a few tokens (speculative decoding) that complete no block
        assert not step(35, RING_SLACK + 1)  # more than the window ring's slack
    assert not step(35 + RING_SLACK + 1, 1)  # gradients to compute: the reference path
    with torch.no_grad():
        assert step(36 + RING_SLACK + 1, 1)
        step(37 + RING_SLACK + 1, 1, lengths=torch.tensor([1, 0], dtype=torch.int32, device=DEVICE))
        assert not step(38 + RING_SLACK + 1, 1)  # a cache that took a ragged append stays on update()

    # A dense layer (no compressed branch) likewise, after a ragged append.
    dense = NSACache()
    q, k, v = (torch.randn(2, 1, h, d, device=DEVICE) for h, d in ((4, 16), (2, 16), (2, 32)))
    cos_sin = rotary_cos_sin(torch.full((2, 1), 5, device=DEVICE), 16, 10000.0)
    with torch.no_grad():
        dense.update(0, torch.randn(2, 5, 2, 16, device=DEVICE), torch.randn(2, 5, 2, 32, device=DEVICE))
        assert dense.rotate_and_update(0, q, cos_sin[0], cos_sin[1], k, v) is not None
        dense.update(0, k, v, lengths=torch.tensor([1, 0], dtype=torch.int32, device=DEVICE))
        assert dense.rotate_and_update(0, q, cos_sin[0], cos_sin[1], k, v) is None

"""NativeSparseAttention: its wiring against nsa_attention written out by hand, varlen, gradients, RoPE, init."""

import pytest
import torch
import torch.nn.functional as F

import nsa
from nsa.modules import Compressor, DenseAttention, NativeSparseAttention, apply_rotary, rotary_cos_sin

SMALL = nsa.SparsityConfig(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=4, num_init=1, num_local=2, window=24)


def make(hidden=48, heads=6, kv_heads=2, head_dim=8, v_head_dim=12, share_win_kv=False, sparsity=SMALL):
    return NativeSparseAttention(hidden, heads, kv_heads, head_dim=head_dim, v_head_dim=v_head_dim, sparsity=sparsity,
                                 share_win_kv=share_win_kv, rope_theta=500.0).double()


def rotate_pairs(x, pos, base):
    """RoPE written per frequency: feature pairs (i, i + D/2) turned by pos * base^(-2i/D)."""
    D = x.shape[-1]
    out = x.clone()
    for i in range(D // 2):
        angle = pos.double() * base ** (-2 * i / D)
        a, b = x[..., i], x[..., i + D // 2]
        out[..., i] = a * angle.cos() - b * angle.sin()
        out[..., i + D // 2] = b * angle.cos() + a * angle.sin()
    return out


def phi_by_loop(phi: Compressor, x, starts):
    """Eq. 7 block by block: mean of the encoded block plus the MLP of the flattened encoded block."""
    out = []
    for s in starts.tolist():
        block = x[:, s:s + phi.block] + phi.pos[:, None]  # [B, l, H, D]
        flat = block.permute(0, 2, 1, 3).flatten(-2)
        out.append(block.mean(1) + phi.fc2(F.silu(phi.fc1(flat))))
    return torch.stack(out, dim=1) if out else x.new_zeros(x.shape[0], 0, *x.shape[2:])


def test_phi_reads_consecutive_blocks_without_starts():
    """Without starts phi takes x as blocks of l one after the other (what a decode step gathers)."""
    phi = Compressor(4, 6).double()
    x = torch.randn(2, 12, 3, 6, dtype=torch.float64)
    torch.testing.assert_close(phi(x), phi_by_loop(phi, x, torch.arange(3) * 4), rtol=1e-12, atol=1e-13)


def by_hand(m: NativeSparseAttention, x, pos):
    """The module's forward spelled out from its weights, ending in nsa.nsa_attention."""
    B, T, _ = x.shape
    H, DK, DV, l = m.num_kv_heads, m.head_dim, m.v_head_dim, m.sparsity.cmp_block
    theta = m.rope_theta
    q = rotate_pairs((x @ m.q_proj.weight.T).view(B, T, -1, DK), pos[..., None], theta)
    w = m.kv_proj.weight
    sizes = [H * DK, H * DV] * (2 if m.share_win_kv else 3)
    k_cmp, v_cmp, k_slc, v_slc, *win = [(x @ part.T) for part in w.split(sizes, dim=0)]
    k_cmp, v_cmp = k_cmp.view(B, T, H, DK), v_cmp.view(B, T, H, DV)
    k_slc = rotate_pairs(k_slc.view(B, T, H, DK), pos[..., None], theta)
    v_slc = v_slc.view(B, T, H, DV)
    if win:
        k_win, v_win = rotate_pairs(win[0].view(B, T, H, DK), pos[..., None], theta), win[1].view(B, T, H, DV)
    else:
        k_win, v_win = k_slc, v_slc
    starts = torch.arange(m.sparsity.num_cmp(T)) * m.sparsity.cmp_stride
    kc = rotate_pairs(phi_by_loop(m.k_phi, k_cmp, starts), pos[:, starts + l - 1][..., None], theta)
    vc = phi_by_loop(m.v_phi, v_cmp, starts)
    gates = torch.sigmoid(F.silu(x @ m.gate.fc1.weight.T + m.gate.fc1.bias) @ m.gate.fc2.weight.T + m.gate.bias)
    gates = gates.view(B, T, -1, 3)
    o = nsa.nsa_attention(q, k_slc, v_slc, kc, vc, gates, k_win=k_win, v_win=v_win, config=m.sparsity)
    return o.flatten(-2) @ m.o_proj.weight.T


@pytest.mark.parametrize("share_win_kv", [False, True])
@pytest.mark.parametrize("T", [5, 37, 70])
def test_forward_equals_nsa_attention_on_own_projections(share_win_kv, T):
    m = make(share_win_kv=share_win_kv)
    x = torch.randn(2, T, 48, dtype=torch.float64)
    pos = torch.randint(0, 1000, (2, 1)) + torch.arange(T)
    torch.testing.assert_close(m(x, position_ids=pos), by_hand(m, x, pos), rtol=1e-10, atol=1e-12)


def test_default_positions_are_0_to_T():
    m = make()
    x = torch.randn(1, 30, 48, dtype=torch.float64)
    torch.testing.assert_close(m(x), m(x, position_ids=torch.arange(30)[None]), rtol=0, atol=0)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (3, 1), (8, 1)])
def test_gqa_and_dk_ne_dv_shapes(heads, kv_heads):
    m = make(hidden=40, heads=heads, kv_heads=kv_heads, head_dim=6, v_head_dim=10)
    y = m(torch.randn(3, 33, 40, dtype=torch.float64))
    assert y.shape == (3, 33, 40) and torch.isfinite(y).all()


def test_cu_seqlens_runs_each_sequence_alone():
    m = make()
    lengths = [9, 1, 40, 0, 23]
    xs = [torch.randn(1, n, 48, dtype=torch.float64) for n in lengths]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    packed = m(torch.cat(xs, dim=1), cu_seqlens=cu)
    alone = torch.cat([m(x) for x in xs if x.shape[1]], dim=1)
    torch.testing.assert_close(packed, alone, rtol=1e-10, atol=1e-12)


def test_gradients_reach_every_parameter():
    m = make().float()
    x = torch.randn(2, 64, 48, requires_grad=True)
    m(x).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    assert x.grad.abs().sum() > 0


def test_autocast_trains_in_bfloat16_like_float32():
    """Under autocast the gate's sigmoid runs in float32 while the projections give bfloat16: the module hands
    nsa_attention one dtype, and its output and gradients stay near the float32 run's."""
    torch.manual_seed(0)
    m = make().float()
    x = torch.randn(2, 40, 48)
    want = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)
    got.float().square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_rotary_scores_depend_on_distance_only():
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16, dtype=torch.float64)

    def score(tq, tk):
        cq, sq = rotary_cos_sin(torch.tensor([[tq]]), 16, 10000.0, torch.float64)
        ck, sk = rotary_cos_sin(torch.tensor([[tk]]), 16, 10000.0, torch.float64)
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum()

    torch.testing.assert_close(score(7, 3), score(1007, 1003))
    assert not torch.allclose(score(7, 3), score(7, 5))


def test_initial_gates_sum_to_one_and_output_keeps_dense_scale():
    torch.manual_seed(1)
    m = make(hidden=64, heads=4, kv_heads=4, head_dim=16, v_head_dim=16, sparsity=nsa.SparsityConfig(
        cmp_block=8, cmp_stride=4, slc_block=16, num_selected=3, window=16)).float()
    x = torch.randn(2, 256, 64)
    gates = m.gate(x)
    assert abs(gates.sum(-1).mean().item() - 1.0) < 0.05
    pos = torch.arange(256)[None].expand(2, -1)
    p = m.project(x, pos)
    starts = torch.arange(m.sparsity.num_cmp(256)) * 4
    k_cmp, v_cmp = m.compress(p["k_cmp"], p["v_cmp"], pos[:, starts + 7], starts)
    o = nsa.nsa_attention(p["q"], p["k_slc"], p["v_slc"], k_cmp, v_cmp, gates, k_win=p["k_win"], v_win=p["v_win"],
                          config=m.sparsity)
    dense = F.scaled_dot_product_attention(p["q"].transpose(1, 2), p["k_slc"].transpose(1, 2),
                                           p["v_slc"].transpose(1, 2), is_causal=True).transpose(1, 2)
    ratio = o[:, 64:].std().item() / dense[:, 64:].std().item()
    assert 0.5 < ratio < 2.0, ratio


@pytest.mark.parametrize("kwargs,match", [
    (dict(heads=6, kv_heads=4), "multiple of num_kv_heads"),
    (dict(head_dim=7), "head_dim must be even"),
    (dict(sparsity={"cmp_block": 8}), "sparsity must be a SparsityConfig"),
])
def test_bad_construction_names_the_rule(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make(**kwargs)


def test_bad_inputs_name_the_argument():
    m = make()
    with pytest.raises(ValueError, match="hidden_states must have shape"):
        m(torch.randn(1, 5, 47, dtype=torch.float64))
    with pytest.raises(ValueError, match="position_ids must have shape"):
        m(torch.randn(1, 5, 48, dtype=torch.float64), position_ids=torch.arange(4)[None])
    with pytest.raises(ValueError, match="cu_seqlens must end at T"):
        m(torch.randn(1, 5, 48, dtype=torch.float64), cu_seqlens=torch.tensor([0, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens cannot be combined with a cache"):
        m(torch.randn(1, 5, 48, dtype=torch.float64), cu_seqlens=torch.tensor([0, 5], dtype=torch.int32),
          cache=nsa.NSACache())



def test_dense_attention_is_causal_sdpa_on_the_same_projections():
    d = DenseAttention(48, 6, 2, head_dim=8, v_head_dim=12, rope_theta=500.0).double()
    x = torch.randn(2, 21, 48, dtype=torch.float64)
    pos = torch.arange(21)[None].expand(2, -1)
    q = rotate_pairs((x @ d.q_proj.weight.T).view(2, 21, 6, 8), pos[..., None], 500.0)
    k, v = (x @ d.kv_proj.weight.T).split([16, 24], dim=-1)
    k, v = rotate_pairs(k.view(2, 21, 2, 8), pos[..., None], 500.0), v.view(2, 21, 2, 12)
    scores = torch.einsum("bthd,bshd->bhts", q, k.repeat_interleave(3, dim=2)) / 8 ** 0.5
    scores = scores.masked_fill(torch.ones(21, 21, dtype=torch.bool).triu(1), float("-inf"))
    o = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v.repeat_interleave(3, dim=2))
    torch.testing.assert_close(d(x), o.flatten(-2) @ d.o_proj.weight.T, rtol=1e-10, atol=1e-12)


def test_dense_attention_varlen_and_cache():
    d = DenseAttention(48, 6, 2, head_dim=8, v_head_dim=12).double()
    x = torch.randn(1, 30, 48, dtype=torch.float64)
    cu = torch.tensor([0, 11, 30], dtype=torch.int32)
    torch.testing.assert_close(d(x, cu_seqlens=cu), torch.cat([d(x[:, :11]), d(x[:, 11:])], dim=1),
                               rtol=1e-10, atol=1e-12)
    cache = nsa.NSACache()
    steps = [d(x[:, :9], cache=cache)] + [d(x[:, t:t + 1], cache=cache) for t in range(9, 30)]
    torch.testing.assert_close(torch.cat(steps, dim=1), d(x), rtol=1e-10, atol=1e-12)


@torch.no_grad()
def dense_steps(layer, x, cache, first):
    """The layer's outputs for x [B, T, hidden] fed as a prompt of `first` tokens, then one token per step
    (inference: without gradients, which would take the decode steps off the kernels)."""
    layer(x[:, :first], cache=cache)
    return torch.cat([layer(x[:, t:t + 1], cache=cache) for t in range(first, x.shape[1])], dim=1)


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_dense_attention_decodes_through_the_split_kernel(cuda_graph, monkeypatch):
    """On the Triton backend the steps after the prompt go through dense_decode: the same outputs as SDPA's."""
    import nsa.ops.decode as decode

    calls = []
    kernel = decode.dense_decode
    monkeypatch.setattr(decode, "dense_decode", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    d = DenseAttention(48, 6, 2, head_dim=16, v_head_dim=32)
    x = torch.randn(2, 27, 48)
    new_cache = lambda: nsa.NSACache(capacity=27, cuda_graph=True) if cuda_graph else nsa.NSACache()  # noqa: E731
    monkeypatch.setenv("NSA_BACKEND", "reference")
    expected = dense_steps(d, x, new_cache(), 20)
    assert not calls
    monkeypatch.setenv("NSA_BACKEND", "triton")
    torch.testing.assert_close(dense_steps(d, x, new_cache(), 20), expected, rtol=1e-5, atol=1e-5)
    assert len(calls) == 7


def test_decode_steps_with_gradients_take_the_differentiable_path(monkeypatch):
    """The decode kernels have no backward: where a step has gradients to compute, the Triton backend runs the
    reference path, and the gradients reach the projections."""
    import nsa.ops.decode as decode

    calls = []
    for name in ("dense_decode", "nsa_decode"):
        monkeypatch.setattr(decode, name, lambda *a, _kernel=getattr(decode, name), **kw: calls.append(name)
                            or _kernel(*a, **kw))
    monkeypatch.setenv("NSA_BACKEND", "triton")
    x = torch.randn(1, 21, 48)
    for layer in (DenseAttention(48, 6, 2, head_dim=16, v_head_dim=32),
                  make(hidden=48, heads=6, kv_heads=2, head_dim=16, v_head_dim=32).float()):
        cache = nsa.NSACache()
        with torch.no_grad():
            layer(x[:, :20], cache=cache)
        layer(x[:, 20:], cache=cache).sum().backward()
        assert layer.q_proj.weight.grad.abs().sum() > 0
    assert not calls


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the decode kernel at real shapes needs a GPU")
def test_dense_decode_steps_in_bf16_on_the_gpu(monkeypatch):
    """A bfloat16 layer's decode steps on a cache for CUDA graphs (dense_decode) within the tolerance rule of the
    float64 layer, SDPA in bfloat16 on an ordinary cache the low-precision reference."""
    import copy

    from tests.tolerance import assert_within_rule

    d = DenseAttention(2048, 16, 1, head_dim=192, v_head_dim=128).cuda()
    x = torch.randn(3, 1100, 2048, device="cuda")
    run = lambda dtype, cache: dense_steps(copy.deepcopy(d).to(dtype), x.to(dtype), cache, 1040)  # noqa: E731
    monkeypatch.setenv("NSA_BACKEND", "reference")
    oracle = run(torch.float64, nsa.NSACache())
    low = run(torch.bfloat16, nsa.NSACache())
    monkeypatch.delenv("NSA_BACKEND")
    assert_within_rule("o", run(torch.bfloat16, nsa.NSACache(capacity=1100, cuda_graph=True)), low, oracle, 2)


def test_the_module_needs_no_transformers():
    import pathlib
    import subprocess
    import sys

    code = ("import sys; sys.modules['transformers'] = None\n"
            "import nsa\n"
            "nsa.NativeSparseAttention(16, 2)\n"
            "try:\n    nsa.NSAConfig\nexcept ImportError as e:\n    print(e)\n")
    root = pathlib.Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root)
    assert out.returncode == 0, out.stderr
    assert "pip install 'nsa[hf]'" in out.stdout


def test_default_head_geometry():
    m = NativeSparseAttention(32, 4, sparsity=SMALL)
    assert (m.num_kv_heads, m.head_dim, m.v_head_dim) == (4, 8, 8)
    assert m.k_phi.fc2.out_features == 8 and m(torch.randn(1, 20, 32)).shape == (1, 20, 32)

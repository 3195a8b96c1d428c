"""Every bad input of nsa_attention is refused with an error that names the argument and the broken rule."""

import pytest
import torch

import nsa
from nsa import SparsityConfig
from tests.inputs import make_inputs

CFG = SparsityConfig(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=4, window=24)
KNOBS = dict(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=4, window=24)


def good(**overrides):
    args = make_inputs(1, 40, 4, 2, 8, 8, CFG, dtype=torch.float32)
    args.update(overrides)
    return args


def call(args, **kw):
    return nsa.nsa_attention(**args, **{**KNOBS, **kw})


@pytest.mark.parametrize(
    "knobs, message",
    [
        (dict(cmp_block=8, cmp_stride=3), "cmp_stride (3) must divide cmp_block (8)"),
        (dict(cmp_block=8, cmp_stride=4, slc_block=18), "cmp_stride (4) must divide slc_block (18)"),
        (dict(cmp_block=32, cmp_stride=16, slc_block=16), "cmp_block (32) must be at most slc_block (16)"),
        (dict(num_selected=2, num_init=1, num_local=2), "num_selected (2) must be at least num_init + num_local"),
        (dict(window=0), "window must be a positive int"),
        (dict(cmp_block=0), "cmp_block must be a positive int"),
        (dict(num_local=-1), "num_local must be a non-negative int"),
        (dict(slc_block=16.0), "slc_block must be a positive int"),
    ],
)
def test_bad_knobs(knobs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        SparsityConfig(**knobs)


def test_bad_knobs_through_the_functional_api():
    with pytest.raises(ValueError, match="must divide cmp_block"):
        nsa.nsa_attention(**good(), cmp_block=8, cmp_stride=3, slc_block=24)


@pytest.mark.parametrize(
    "name, shape, message",
    [
        ("q", (1, 40, 4), "q must have 4 dimensions"),
        ("k", (1, 39, 2, 8), "k must have q's batch and length"),
        ("k", (1, 40, 3, 8), "HQ=4 must be a multiple of the key/value heads HKV=3"),
        ("k", (1, 40, 2, 6), r"k must have shape \[B, T, HKV, DK\]"),
        ("v", (1, 40, 1, 8), r"v must have shape \[B, T, HKV, DV\]"),
        ("k_win", (1, 40, 2, 4), r"k_win must have shape \[B, T, HKV, DK\]"),
        ("v_win", (1, 40, 2, 5), r"v_win must have shape \[B, T, HKV, DV\]"),
        ("k_cmp", (1, 7, 2, 8), r"k_cmp must have shape \[B, Tc\(T\), HKV, DK\] with Tc\(T\) = 9"),
        ("v_cmp", (1, 9, 2, 4), r"v_cmp must have shape"),
        ("gates", (1, 40, 4, 2), r"gates must have shape \[B, T, HQ, 3\]"),
        ("gates", (1, 40, 4), "gates must have 4 dimensions"),
    ],
)
def test_bad_shapes(name, shape, message):
    with pytest.raises(ValueError, match=message):
        call(good(**{name: torch.randn(*shape)}))


def test_token_count_beyond_int32_is_refused():
    """Shapes alone decide it: meta tensors hold 2^31 tokens without memory."""
    B, T, H, D = 2, 2**30, 1, 16
    meta = lambda *shape: torch.empty(*shape, device="meta")  # noqa: E731
    Tc = nsa.SparsityConfig().num_cmp(T)
    with pytest.raises(ValueError, match="2\\^31"):
        nsa.nsa_attention(meta(B, T, H, D), meta(B, T, H, D), meta(B, T, H, D), meta(B, Tc, H, D), meta(B, Tc, H, D),
                          meta(B, T, H, 3))


def test_empty_sequence_is_refused():
    args = make_inputs(1, 1, 2, 1, 8, 8, CFG, dtype=torch.float32)
    args = {k: v[:, :0] for k, v in args.items()}
    with pytest.raises(ValueError, match="q must hold at least one token"):
        call(args)


def test_dtypes():
    with pytest.raises(TypeError, match="k must have q's dtype torch.float32, got torch.float16"):
        call(good(k=torch.randn(1, 40, 2, 8, dtype=torch.float16)))
    with pytest.raises(TypeError, match="gates must be float16, bfloat16, float32 or float64, got torch.int64"):
        call(good(gates=torch.ones(1, 40, 4, 3, dtype=torch.long)))
    with pytest.raises(TypeError, match="v must be a torch.Tensor, got list"):
        call(good(v=[[1.0]]))


def test_devices():
    with pytest.raises(ValueError, match="k_cmp must be on q's device"):
        call(good(k_cmp=torch.randn(1, 9, 2, 8, device="meta")))


def test_window_kv_come_together():
    args = good()
    del args["v_win"]
    with pytest.raises(ValueError, match="k_win and v_win must be given together"):
        call(args)


@pytest.mark.parametrize(
    "cu_seqlens, message, error",
    [
        (torch.tensor([0, 20, 40], dtype=torch.int64), "cu_seqlens must be int32", TypeError),
        (torch.tensor([0, 30, 20, 40], dtype=torch.int32), "cu_seqlens must be non-decreasing", ValueError),
        (torch.tensor([0, 20, 39], dtype=torch.int32), "cu_seqlens must end at T=40", ValueError),
        (torch.tensor([1, 20, 40], dtype=torch.int32), "cu_seqlens must start at 0", ValueError),
        (torch.tensor([[0, 40]], dtype=torch.int32), "cu_seqlens must be 1-D", ValueError),
        ([0, 40], "cu_seqlens must be a torch.Tensor", TypeError),
    ],
)
def test_bad_cu_seqlens(cu_seqlens, message, error):
    with pytest.raises(error, match=message):
        call(good(), cu_seqlens=cu_seqlens)


def test_cu_seqlens_needs_batch_one_and_matching_cmp_tokens():
    args = make_inputs(2, 40, 4, 2, 8, 8, CFG, dtype=torch.float32)
    with pytest.raises(ValueError, match="batch size must be 1"):
        call(args, cu_seqlens=torch.tensor([0, 40], dtype=torch.int32))
    # Two sequences of 20 have 2 * Tc(20) = 6 compressed tokens, not Tc(40) = 9.
    with pytest.raises(ValueError, match="sum of Tc"):
        call(good(), cu_seqlens=torch.tensor([0, 20, 40], dtype=torch.int32))


def test_scale_and_backend():
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        call(good(), scale=float("nan"))
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        call(good(), scale=-1.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        call(good(), backend="cuda")


def test_environment_selects_the_backend(monkeypatch):
    monkeypatch.setenv("NSA_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="backend must be one of"):
        call(good())
    monkeypatch.setenv("NSA_BACKEND", "reference")
    assert call(good()).shape == (1, 40, 4, 8)


def test_non_contiguous_inputs_are_accepted():
    args = good()
    q_t = args["q"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not q_t.is_contiguous()
    torch.testing.assert_close(call(good(**{**args, "q": q_t})), call(args), rtol=0, atol=0)

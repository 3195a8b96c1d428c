"""Random inputs of nsa_attention for the tests."""

import torch

from nsa import SparsityConfig

# Where the kernel tests run: compiled on a GPU machine, through Triton's interpreter (conftest) elsewhere.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(B, T, HQ, HKV, DK, DV, cfg: SparsityConfig, dtype=torch.float64, device="cpu", separate_win=True, seqlens=None):
    """Fresh random q, k, v, k_cmp, v_cmp, gates (and k_win, v_win) as a dict of nsa_attention's arguments.

    With `seqlens`, B must be 1 and the dict also holds the matching cu_seqlens (T = sum(seqlens)).
    """
    if seqlens is not None:
        assert B == 1 and sum(seqlens) == T
        Tc = sum(cfg.num_cmp(n) for n in seqlens)
    else:
        Tc = cfg.num_cmp(T)

    def rnd(*shape):
        return torch.randn(*shape, dtype=dtype, device=device)

    args = dict(q=rnd(B, T, HQ, DK), k=rnd(B, T, HKV, DK), v=rnd(B, T, HKV, DV), k_cmp=rnd(B, Tc, HKV, DK),
                v_cmp=rnd(B, Tc, HKV, DV), gates=torch.rand(B, T, HQ, 3, dtype=dtype, device=device))
    if separate_win:
        args.update(k_win=rnd(B, T, HKV, DK), v_win=rnd(B, T, HKV, DV))
    if seqlens is not None:
        offsets = torch.tensor([0] + seqlens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        args["cu_seqlens"] = offsets.to(device)
    return args


def knobs(cfg: SparsityConfig) -> dict:
    """cfg's fields as nsa_attention keyword arguments."""
    return dict(cmp_block=cfg.cmp_block, cmp_stride=cfg.cmp_stride, slc_block=cfg.slc_block, num_selected=cfg.num_selected,
                num_init=cfg.num_init, num_local=cfg.num_local, window=cfg.window)

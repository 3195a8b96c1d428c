"""The correctness guard: NSA is checked before it is timed, so that a wrong kernel never gets a figure.

At every (configuration, length) the suite draws the inputs it will time and checks
  1. the prefix: on the first `guard_len` tokens (a prefix of a causal op is a valid input on its own), the
     kernel's output against the float64 reference under the kernel's own selection, with SPEC's rule
     (error at most 2x that of the reference run in the kernel's dtype), and the kernel's selection against
     the reference's, tie-aware (a block only one side chose must score within SELECTION_TOL of the row's
     best block of the other side's);
  2. the whole length: the output is finite, every query selected min(n, its candidates) distinct blocks in
     ascending order among its candidates, the forced ones included, and the first guard_len rows agree
     with the prefix run.
"""

from __future__ import annotations

import dataclasses

import torch

from .. import reference
from ..functional import nsa_attention
from .configs import BenchConfig
from .impls import fla_call, mean_pool, nsa_call

# Selection differences are accepted where the two blocks' scores differ by less than this share of the
# row's largest block score: rounding of the compressed probabilities, not a wrong top-n.
SELECTION_TOL = 2e-2


def _split(cfg: BenchConfig, inputs: tuple) -> tuple:
    """(q, k, v, k_cmp, v_cmp, gates) from nsa_inputs' tuple, pooling where the configuration does."""
    if cfg.pooled:
        q, k, v, gates = inputs
        block = cfg.sparsity.cmp_block
        return q, k, v, mean_pool(k, block), mean_pool(v, block), gates
    return inputs


def _prefix(cfg: BenchConfig, inputs: tuple, length: int) -> tuple:
    tc = cfg.sparsity.num_cmp(length)
    q, k, v, k_cmp, v_cmp, gates = _split(cfg, inputs)
    return tuple(x[:, :n].contiguous() for x, n in ((q, length), (k, length), (v, length), (k_cmp, tc), (v_cmp, tc),
                                                       (gates, length)))


def _reference(cfg: BenchConfig, parts: tuple, dtype, idx) -> torch.Tensor:
    q, k, v, k_cmp, v_cmp, gates = (x.detach().to(dtype) for x in parts)
    return reference.nsa_forward(q, k, v, k_cmp, v_cmp, gates, k, v, cfg.sparsity, q.shape[-1] ** -0.5, idx)[0]


def block_scores64(cfg: BenchConfig, parts: tuple) -> torch.Tensor:
    """S [B, T, HKV, Ns] in float64 (SPEC 3) from the prefix inputs."""
    q, _, _, k_cmp, v_cmp, _ = (x.detach().double() for x in parts)
    B, T, HQ, DK = q.shape
    HKV, tc = k_cmp.shape[2], k_cmp.shape[1]
    s = cfg.sparsity
    visible = (torch.arange(tc, device=q.device) * s.cmp_stride + s.cmp_block)[None, :] <= torch.arange(T, device=q.device)[:, None] + 1
    _, p = reference.masked_attention(q.view(B, T, HKV, HQ // HKV, DK), k_cmp, v_cmp,
                                      visible[None, :, None].expand(B, T, HKV, tc), DK ** -0.5)
    return reference.block_scores(p, T, s)


def selection_check(cfg: BenchConfig, idx: torch.Tensor, scores: torch.Tensor) -> dict:
    """Compare a selection idx [B, T, HKV, n] (any order, -1 padded) with the reference's on scores S."""
    ns = scores.shape[-1]
    mine = reference.selection_mask(idx, ns)
    theirs = reference.selection_mask(reference.select_blocks(scores, cfg.sparsity), ns)
    s = cfg.sparsity
    forced_cfg = dataclasses.replace(s, num_selected=s.num_init + s.num_local)
    forced = reference.selection_mask(reference.select_blocks(scores, forced_cfg), ns)
    structure = bool(((mine.sum(-1) == theirs.sum(-1)) & (mine | ~forced).all(-1)).all())
    only_mine, only_theirs = mine & ~theirs, theirs & ~mine
    low = scores.masked_fill(~only_mine, float("inf")).amin(-1)
    high = scores.masked_fill(~only_theirs, float("-inf")).amax(-1)
    differ = only_mine.any(-1)
    gap = torch.where(differ, (high - low) / scores.amax(-1).clamp_min(1e-30), torch.zeros_like(low))
    worst = float(gap.max()) if gap.numel() else 0.0
    return {"rows_same_selection": float((~differ).double().mean()), "worst_tie_gap": worst,
            "structure_ok": structure, "passed": structure and worst <= SELECTION_TOL}


def output_check(cfg: BenchConfig, out: torch.Tensor, parts: tuple, idx: torch.Tensor) -> dict:
    """SPEC's rule for `out` against float64 under the selection idx, with the low-precision reference as yardstick."""
    oracle = _reference(cfg, parts, torch.float64, idx)
    low = _reference(cfg, parts, out.dtype, idx)
    err = float((out.double() - oracle).abs().max())
    err_low = float((low.double() - oracle).abs().max())
    return {"max_err": err, "reference_err": err_low, "passed": bool(err <= 2 * err_low or err == 0.0)}


def structure_ok(cfg: BenchConfig, idx: torch.Tensor) -> bool:
    """Every query t selected min(n, t // l' + 1) distinct ascending blocks <= t // l', forced ones included."""
    s = cfg.sparsity
    T = idx.shape[1]
    t = torch.arange(T, device=idx.device)[None, :, None, None]
    jt = t // s.slc_block
    valid = idx >= 0
    count = valid.sum(-1, keepdim=True)
    ok = (count == torch.clamp(jt + 1, max=s.num_selected)) & (idx <= jt).all(-1, keepdim=True)
    ascending = ((idx[..., 1:] > idx[..., :-1]) | ~valid[..., 1:]).all(-1, keepdim=True)
    packed = (valid[..., 1:] <= valid[..., :-1]).all(-1, keepdim=True)
    has = lambda j: ((idx == j) | (j < 0) | (j > jt)).any(-1, keepdim=True)  # noqa: E731
    forced = torch.ones_like(ok)
    for j in range(s.num_init):
        forced &= has(torch.full_like(jt, j))
    for back in range(s.num_local):
        forced &= has(jt - back)
    return bool((ok & ascending & packed & forced).all())


@torch.no_grad()
def check_nsa(cfg: BenchConfig, inputs: tuple, backend: str, guard_len: int) -> dict:
    """The guard for NSA on `inputs` (nsa_inputs' tuple of the timed shape); passed is the verdict."""
    fn = nsa_call(cfg, backend, return_indices=True)
    T = inputs[0].shape[1]
    length = min(T, guard_len)
    full, full_idx = fn(*(x.detach() for x in inputs))
    result = {"prefix_len": length, "finite": bool(torch.isfinite(full).all()), "indices_ok": structure_ok(cfg, full_idx)}
    parts = _prefix(cfg, tuple(x.detach() for x in inputs), length)
    out, idx = nsa_attention(*parts, config=cfg.sparsity, backend=backend, return_indices=True)
    result["output"] = output_check(cfg, out, parts, idx)
    result["selection"] = selection_check(cfg, idx, block_scores64(cfg, parts))
    agree = float((full[:, :length].double() - out.double()).abs().max())
    result["prefix_vs_full_err"] = agree
    result["passed"] = (result["finite"] and result["indices_ok"] and result["output"]["passed"]
                        and result["selection"]["passed"] and agree <= max(2 * result["output"]["reference_err"], 1e-6))
    return result


@torch.no_grad()
def check_fla(cfg: BenchConfig, inputs: tuple, guard_len: int) -> dict:
    """fla on the prefix against our float64 reference under fla's own selection: what fla computes is
    SPEC's NSA at cfg (window gate 0) up to ties in the top-n; informative, it does not hold fla's rows back."""
    fla = fla_call(cfg)
    from fla.ops.nsa.parallel import parallel_nsa_topk

    q, k, v, gates = (x.detach() for x in inputs)
    length = min(q.shape[1], guard_len)
    q, k, v, gates = (x[:, :length].contiguous() for x in (q, k, v, gates))
    s = cfg.sparsity
    k_cmp, v_cmp = mean_pool(k, s.cmp_block), mean_pool(v, s.cmp_block)
    idx = parallel_nsa_topk(q=q, k=k_cmp, lse=None, TK=length, block_counts=s.num_selected, block_size=s.slc_block,
                            scale=q.shape[-1] ** -0.5)
    out = fla(q, k, v, gates[..., 0].contiguous(), gates[..., 1].contiguous())
    parts = (q, k, v, k_cmp, v_cmp, gates)
    return {"prefix_len": length, "output": output_check(cfg, out, parts, idx.to(torch.int32)),
            "selection": selection_check(cfg, idx, block_scores64(cfg, parts))}


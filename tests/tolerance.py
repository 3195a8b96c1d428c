"""The tolerance rule of SPEC.md: a kernel's error against the float64 oracle is at most `factor` times the
error of the reference run in the same low precision (2 for outputs, 3 for gradients)."""

import torch


def max_error(x: torch.Tensor, oracle: torch.Tensor) -> float:
    return (x.double() - oracle.double()).abs().max().item()


def assert_within_rule(name: str, kernel: torch.Tensor, low_ref: torch.Tensor, oracle: torch.Tensor, factor: float, floor: float = 1e-6):
    """`floor` keeps the bound meaningful where the low-precision reference happens to be exact."""
    assert kernel.shape == oracle.shape, f"{name}: shape {tuple(kernel.shape)} != {tuple(oracle.shape)}"
    assert not kernel.isnan().any(), f"{name}: NaN (an element left unwritten?)"
    err = max_error(kernel, oracle)
    bound = factor * max(max_error(low_ref, oracle), floor * max(oracle.abs().max().item(), 1.0))
    assert err <= bound, f"{name}: error {err:.3e} against the float64 oracle exceeds {factor}x the low-precision reference's ({bound:.3e})"


def assert_same_selection(idx: torch.Tensor, idx_ref: torch.Tensor, scores_ref: torch.Tensor, cfg, rtol: float = 1e-4):
    """A kernel's selection may differ from the reference's only between blocks whose scores tie.

    idx, idx_ref [B, T, HKV, n] int32 (ascending, -1 padded); scores_ref [B, T, HKV, Ns], the reference block
    scores (SPEC 3). Where a row differs, it must be a valid selection (ascending candidates, -1 only after them,
    as many as the reference, every forced block) whose total reference score equals the optimum within rounding.
    """
    assert idx.shape == idx_ref.shape and idx.dtype == torch.int32, (idx.shape, idx.dtype)
    differ = (idx != idx_ref).any(-1)
    if not differ.any():
        return
    t = torch.arange(idx.shape[1], device=idx.device)[None, :, None].expand(differ.shape)[differ]
    rows, rows_ref, scores = idx[differ].long(), idx_ref[differ].long(), scores_ref[differ].double()
    valid = rows >= 0
    assert torch.equal(valid.sum(-1), (rows_ref >= 0).sum(-1)), "a row selects the wrong number of blocks"
    assert (valid[:, :-1] >= valid[:, 1:]).all(), "-1 entries must come after the selected blocks"
    assert ((rows[:, 1:] > rows[:, :-1]) | ~valid[:, 1:]).all(), "selected blocks must be ascending and distinct"
    assert (rows * cfg.slc_block <= t[:, None]).all(), "a selected block lies after its query"
    jt = t // cfg.slc_block
    for j in (torch.arange(cfg.num_init, device=t.device)[None, :].expand(len(t), -1),
              jt[:, None] - torch.arange(cfg.num_local, device=t.device)[None, :]):
        needed = (j >= 0) & (j <= jt[:, None])
        present = (rows[:, None, :] == j[:, :, None]).any(-1)
        assert (present | ~needed).all(), "a forced block is missing"
    total = torch.where(valid, scores.gather(-1, rows.clamp_min(0)), 0).sum(-1)
    total_ref = torch.where(rows_ref >= 0, scores.gather(-1, rows_ref.clamp_min(0)), 0).sum(-1)
    gap = (total_ref - total).abs().max().item()
    assert gap <= rtol * max(scores.abs().max().item(), 1e-12), (
        f"{int(differ.sum())} rows select blocks whose scores do not tie with the reference's (gap {gap:.3e})")

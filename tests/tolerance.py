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

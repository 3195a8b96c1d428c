"""Test set-up: Triton's CPU interpreter where there is no GPU, and torch.empty poisoned with NaN.

TRITON_INTERPRET must be set before triton is first imported, hence here and not inside a test.
The interpreter holds every scalar as a one-element numpy array and turns a loop bound into an int with
int(array), which numpy >= 2.4 refuses for arrays of one dimension: any `range(lo, hi)` whose bounds a kernel
computes would fail there, so scalars convert through .item() instead.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1":
    import triton.runtime.interpreter as interpreter

    _patch_lang_tensor = interpreter._patch_lang_tensor

    def _patch_scalar_index(tensor, scope):
        _patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = _patch_scalar_index

_empty, _empty_like = torch.empty, torch.empty_like


def _poisoned(tensor):
    if tensor.is_floating_point():
        tensor.fill_(float("nan"))
    return tensor


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    """An output a kernel forgets to write stays NaN instead of holding plausible leftovers."""
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: _poisoned(_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: _poisoned(_empty_like(*a, **kw)))


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)

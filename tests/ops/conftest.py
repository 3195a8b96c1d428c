"""Kernel tests run through Triton's CPU interpreter, which holds every scalar as a one-element numpy array
and turns it into a loop bound with int(array); numpy >= 2.4 refuses that for arrays of one dimension, so any
`range(lo, hi)` with bounds computed in the kernel would fail. Convert through .item() instead."""

import os

if os.environ.get("TRITON_INTERPRET") == "1":
    import triton.runtime.interpreter as interpreter

    _patch_lang_tensor = interpreter._patch_lang_tensor

    def _patch_scalar_index(tensor, scope):
        _patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = _patch_scalar_index

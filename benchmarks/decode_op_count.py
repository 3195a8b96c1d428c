"""Operations that launch work (views excluded) in a decode step of NSAForCausalLM, per decoder layer, NSA against
its dense twin, by the function that issued them; for NSA a step that runs phi (a block of l tokens completes: one
step in d) and one that does not (it only moves phi's tail ring on). Runs on the CPU along the GPU's path: the
decode kernels serve the steps but are left out (NSA's 5 kernels, the dense layer's 2), rope_append counts as its
one kernel, and torch's rms_norm as one (fused on a GPU); what is counted is what surrounds the attention:
projections, RoPE, phi, the cache's rings, norms and MLP. The cache is one for CUDA graphs (fixed shapes, as
`nsa bench`'s generate() runs) and the model bfloat16 unless --dtype says otherwise. Replayed from a CUDA graph,
each of these is still a kernel of its own.

python3 benchmarks/decode_op_count.py [--layers 2] [--prompt 1500] [--dtype float32]
"""

from __future__ import annotations

import argparse
import collections
import traceback

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import nsa.cache
import nsa.modules
import nsa.ops.rope_append
from nsa import NSACache
from nsa.models import NSAConfig, NSAForCausalLM

# Operations that only make a view (no kernel).
VIEWS = {"view", "_unsafe_view", "reshape", "expand", "split", "chunk", "select", "slice", "unsqueeze", "squeeze",
         "transpose", "permute", "t", "as_strided", "alias", "detach", "split_with_sizes", "unbind", "unflatten",
         "flatten", "_reshape_alias", "lift_fresh", "result_type", "promote_types"}


def issuer() -> str:
    """The innermost nsa function on the stack."""
    frames = [f for f in traceback.extract_stack() if "/nsa/" in f.filename]
    return f"{frames[-1].filename.split('/nsa/')[-1]}:{frames[-1].name}" if frames else "?"


class Count(TorchDispatchMode):
    """Counts the dispatched operations that are not views, by the innermost nsa function that issued them."""

    def __init__(self):
        super().__init__()
        self.by_function = collections.Counter()
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused and func.__name__.split(".")[0] not in VIEWS:
            self.by_function[issuer()] += 1
        return func(*args, **(kwargs or {}))


class FusedOnGPU(TorchFunctionMode):
    """Counts torch's rms_norm as the one fused kernel it is on a GPU (on the CPU it decomposes into several)."""

    def __init__(self, counter: Count):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is not F.rms_norm or self.counter.paused:
            return func(*args, **(kwargs or {}))
        self.counter.by_function[issuer()] += 1
        self.counter.paused = True
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.counter.paused = False


def count(attn_impl: str, layers: int, prompt: int, dtype: torch.dtype) -> collections.Counter:
    config = NSAConfig.nsa_1b(attn_impl=attn_impl, num_hidden_layers=layers, hidden_size=256, intermediate_size=512,
                              num_attention_heads=16, num_key_value_heads=1, head_dim=64, vocab_size=1000)
    torch.manual_seed(0)
    model = NSAForCausalLM(config).to(dtype).eval()
    cache = NSACache(capacity=prompt + 4, cuda_graph=True)
    ids = torch.randint(1, config.vocab_size, (1, prompt))
    with torch.no_grad():
        token = model(ids, cache=cache).logits[:, -1:].argmax(-1)
        model(token, cache=cache)
        mode = Count()
        with mode, FusedOnGPU(mode):
            model(token, cache=cache)
    return mode.by_function


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=1500, help="tokens before the counted step (about)")
    parser.add_argument("--dtype", default="bfloat16", help="the model's dtype (the GPU benchmark's: bfloat16)")
    args = parser.parse_args()
    # The GPU's path: the decode kernels serve the steps (they are left out: a stub that launches nothing stands in
    # for NSA's 5 and the dense layer's 2), and rope_append (one kernel) rotates and appends a plain step's tokens.
    nsa.cache.kernels_serve = lambda *args, **kwargs: True
    attend = lambda q, v: torch.empty(*q.shape[:3], v.shape[-1], dtype=q.dtype)  # noqa: E731
    nsa.modules.decode_attention = lambda q, gates, state, cfg: attend(q, state.layer.v)
    nsa.modules.DenseAttention._decode = lambda self, q, state: attend(q, state.layer.v)
    nsa.ops.rope_append.rope_append = lambda q, *args, **kwargs: q.clone()
    cfg = NSAConfig.nsa_1b().sparsity
    # The counted step appends position prompt + 1: the first prompt from args.prompt on whose step runs phi (a block
    # of l tokens ends there, once every d steps) and the first whose step does not.
    runs_phi = lambda prompt: NSACache().compresses(prompt + 1, 1, cfg)  # noqa: E731
    prompts = {phi: next(p for p in range(args.prompt, args.prompt + cfg.cmp_stride) if runs_phi(p) == phi)
               for phi in (True, False)}
    totals = {}
    for attn_impl, phi in (("nsa", True), ("nsa", False), ("dense", False)):
        prompt = prompts[phi]
        by_function = count(attn_impl, args.layers, prompt, getattr(torch, args.dtype))
        one_layer = count(attn_impl, 1, prompt, getattr(torch, args.dtype))
        per_layer = (sum(by_function.values()) - sum(one_layer.values())) / (args.layers - 1)
        name = f"{attn_impl}{', a step with phi' if phi else ', a step without phi' if attn_impl == 'nsa' else ''}"
        totals[name] = per_layer
        print(f"{name} (position {prompt + 1}): {per_layer:.0f} operations per decoder layer per step")
        for function, n in sorted(((k, (by_function[k] - one_layer[k]) / (args.layers - 1)) for k in by_function),
                                  key=lambda kv: -kv[1]):
            if n:
                print(f"  {n:5.0f}  {function}")
    for name, n in totals.items():
        print(f"{name}: {n / totals['dense']:.2f}x the dense layer's")


if __name__ == "__main__":
    main()

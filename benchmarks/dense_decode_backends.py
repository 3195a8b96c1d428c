"""A dense decode step at 32k keys, 16 query heads and one KV head of 128 (bfloat16): which SDPA backend a step
masked over a cache's capacity takes (the fixed shape a CUDA graph needs), what each backend costs masked and
unmasked over exactly the context, and nsa.ops.decode.dense_decode over each sequence's own keys (lengths on the
device), which a dense layer's cached steps run on a GPU. --dk sets the key head dim (the 1B preset's is 192).

    python3 benchmarks/dense_decode_backends.py [--context 32768] [--dk 128] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from nsa.ops.decode import dense_decode


def timed(fn) -> dict:
    """Median ms and the CUDA kernels of one call, or why fn cannot run."""
    try:
        fn()
        torch.cuda.synchronize()
    except RuntimeError as error:
        return {"error": str(error).splitlines()[0][:120]}
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = sorted({e.name[:70] for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA})
    return {"ms": triton.testing.do_bench(fn, warmup=20, rep=200, return_mode="median"), "kernels": kernels}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--dk", type=int, default=128)
    parser.add_argument("--out")
    args = parser.parse_args()
    T, cap = args.context, args.context + 67
    rows = []
    for B in (1, 16):
        q = torch.randn(B, 1, 16, args.dk, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, cap, 1, args.dk, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(B, cap, 1, 128, device="cuda", dtype=torch.bfloat16)
        # The masked step: the 16 query heads as 16 rows of the KV head, every slot of the capacity.
        qs, ks, vs = q.view(B, 1, 16, args.dk), k.transpose(1, 2), v.transpose(1, 2)
        mask = (torch.arange(cap, device="cuda") < T)[None, None, None, :].expand(B, 1, 1, cap)
        past = torch.full((B,), T - 1, dtype=torch.int32, device="cuda")
        for masked in (True, False):
            for backend in (None, *SDPBackend.__members__.values()):
                if backend in (SDPBackend.ERROR, SDPBackend.OVERRIDEABLE):
                    continue

                def step(backend=backend, masked=masked):
                    keys, values = (ks, vs) if masked else (ks[:, :, :T], vs[:, :, :T])
                    with sdpa_kernel([backend]) if backend is not None else torch.no_grad():
                        return F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask if masked else None)

                name = "default" if backend is None else backend.name
                rows.append({"B": B, "step": f"SDPA {name}, " + ("masked over the capacity" if masked else
                                                                 "unmasked over the context"), **timed(step)})
        rows.append({"B": B, "step": "nsa.ops.decode.dense_decode", **timed(lambda: dense_decode(q, k, v, past))})
    for row in rows:
        figure = f"{row['ms']:.4f} ms" if "ms" in row else row["error"]
        print(f"B{row['B']:<3} {row['step']:<58} {figure}")
    if args.out:
        env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "cudnn": torch.backends.cudnn.version(), "context": T, "capacity": cap, "dk": args.dk, "dv": 128}
        with open(args.out, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

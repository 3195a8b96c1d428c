"""The dense twin's decode step at the 1B model's geometry (one KV head of 128, 16 query heads): which SDPA backend
a step masked over a cache's capacity takes (the fixed shape a CUDA graph needs), what each backend costs, and
FlashAttention's variable-length decode over each sequence's own keys (nsa.modules._flash_decode, what the twin's
captured step runs where it fits).

    python3 benchmarks/dense_decode_backends.py [--context 32768] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from nsa.modules import _flash_decode


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
    parser.add_argument("--out")
    args = parser.parse_args()
    T, cap = args.context, args.context + 67
    rows = []
    for B in (1, 16):
        q = torch.randn(B, 1, 16, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(B, cap, 1, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        # The twin's masked step: the 16 query heads as 16 rows of the KV head, every slot of the capacity.
        qs, ks, vs = q.view(B, 1, 16, 128), k.transpose(1, 2), v.transpose(1, 2)
        mask = (torch.arange(cap, device="cuda") < T)[None, None, None, :].expand(B, 1, 1, cap)
        used = torch.full((B,), T, dtype=torch.int32, device="cuda")
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
        rows.append({"B": B, "step": "flash variable-length decode (nsa.modules._flash_decode)",
                     **timed(lambda: _flash_decode(q, k, v, used))})
    for row in rows:
        figure = f"{row['ms']:.4f} ms" if "ms" in row else row["error"]
        print(f"B{row['B']:<3} {row['step']:<58} {figure}")
    if args.out:
        env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "cudnn": torch.backends.cudnn.version(), "context": T, "capacity": cap}
        with open(args.out, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

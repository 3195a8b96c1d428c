"""Time each decode kernel (nsa/ops/decode.py) on its own, beside the whole step and SDPA's dense decode step.

python3 benchmarks/decode_breakdown.py --config paper --cases 16x8k,16x128k,1x128k --out FILE.json
The step and SDPA are replayed from CUDA graphs (do_bench median); each kernel's device time comes from the
profiler over eager calls. The same inputs every call, so L2 may hold part of them at short contexts: `nsa bench`
(which rotates its inputs) gives the figures to quote.
"""

from __future__ import annotations

import argparse
import collections
import json

import torch
import triton
from torch.profiler import ProfilerActivity, profile

from nsa.bench.configs import FULL_CONFIGS
from nsa.ops.decode import nsa_decode


def graphed(fn):
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return lambda: graph.replay()


def case(config, B: int, T: int, calls: int = 20) -> dict:
    HQ, HKV, DK, DV = config.dense_shape
    cfg = config.sparsity
    torch.manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    tc = cfg.num_cmp(T)
    q, gates = rnd(B, 1, HQ, DK), torch.rand(B, 1, HQ, 3, device="cuda", dtype=torch.bfloat16)
    k, v, k_cmp, v_cmp = rnd(B, T, HKV, DK), rnd(B, T, HKV, DV), rnd(B, tc, HKV, DK), rnd(B, tc, HKV, DV)
    past = torch.full((B,), T - 1, dtype=torch.int32, device="cuda")
    step = lambda: nsa_decode(q, gates, k, v, k_cmp, v_cmp, past, cfg, DK ** -0.5)  # noqa: E731
    ms = triton.testing.do_bench(graphed(step), warmup=50, rep=300, return_mode="median")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    kernels = collections.defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.name.endswith("_kernel"):
            kernels[event.name] += event.device_time / calls / 1000
    qs, ks, vs = rnd(B, HQ, 1, DK), rnd(B, HKV, T, DK), rnd(B, HKV, T, DV)
    dense = lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, enable_gqa=True)  # noqa: E731
    ms_dense = triton.testing.do_bench(graphed(dense), warmup=50, rep=300, return_mode="median")
    return dict(B=B, T=T, nsa_ms=ms, sdpa_ms=ms_dense, kernels_ms=dict(kernels))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="paper")
    parser.add_argument("--cases", default="16x8k,16x32k,16x64k,16x128k,1x32k,1x128k", help="BxT, comma-separated")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    config = {c.name: c for c in FULL_CONFIGS}[args.config]
    rows = []
    for item in args.cases.split(","):
        B, T = item.lower().split("x")
        rows.append(case(config, int(B), int(T[:-1]) * 1024 if T.endswith("k") else int(T)))
    print(f"{'B':>3} {'T':>7} {'NSA ms':>8} {'SDPA ms':>8} {'x':>6}  kernels (ms)")
    for r in rows:
        kern = " ".join(f"{name.removesuffix('_kernel')}={t:.4f}" for name, t in r["kernels_ms"].items())
        print(f"{r['B']:>3} {r['T']:>7} {r['nsa_ms']:8.4f} {r['sdpa_ms']:8.4f} {r['sdpa_ms'] / r['nsa_ms']:6.2f}  {kern}")
    if args.out:
        env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                   config=config.describe())
        with open(args.out, "w") as f:
            json.dump(dict(environment=env, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()

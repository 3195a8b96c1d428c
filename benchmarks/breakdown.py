"""Time each kernel of the Triton backend on its own (bf16, B=1): where NSA's time goes.

python3 benchmarks/breakdown.py --configs paper,fla --seqlens 8192,65536 --out DIR
(configurations by their `nsa bench` names; k_cmp, v_cmp are random inputs in every one)
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import triton
from triton.testing import do_bench

from nsa.bench.configs import FULL_CONFIGS
from nsa.ops import compressed, selected, topk, window
from nsa.ops.common import packed_layout
from nsa.ops.gates import gates_bwd


def bench(fn):
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", default="paper")
    parser.add_argument("--seqlens", default="8192,65536")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    configs = {c.name: c for c in FULL_CONFIGS}
    rows = []
    for name in args.configs.split(","):
        rows += breakdown(configs[name], [int(t) for t in args.seqlens.split(",")])
    for kernel in (compressed.cmp_fwd_kernel, topk.select_blocks_kernel, compressed.cmp_bwd_dkdv_kernel,
                   compressed.cmp_bwd_dq_kernel, window._win_fwd_kernel, window._win_bwd_dkdv_kernel,
                   window._win_bwd_dq_kernel, selected._slc_fwd_kernel, selected._slc_bwd_dq_kernel,
                   selected._slc_bwd_segment_kernel):
        best = getattr(kernel, "best_config", None)
        print(getattr(kernel, "fn", kernel).__name__, best)
    if args.out:
        env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                   configs={name: configs[name].describe() for name in args.configs.split(",")})
        with open(f"{args.out}/breakdown.json", "w") as f:
            json.dump(dict(environment=env, rows=rows), f, indent=1)


def breakdown(config, seqlens: list[int]) -> list[dict]:
    HQ, HKV, DK, DV = config.dense_shape
    cfg = config.sparsity
    scale = 1 / math.sqrt(DK)
    rows = []
    for T in seqlens:
        torch.manual_seed(0)
        dev = "cuda"
        rnd = lambda *s: torch.randn(*s, device=dev, dtype=torch.bfloat16)  # noqa: E731
        Tc = cfg.num_cmp(T)
        q, k, v = rnd(T, HQ, DK), rnd(T, HKV, DK), rnd(T, HKV, DV)
        k_cmp, v_cmp = rnd(Tc, HKV, DK), rnd(Tc, HKV, DV)
        do = rnd(T, HQ, DV)
        packed = packed_layout(1, T, None, cfg, dev)
        o_cmp, lse_cmp = compressed.cmp_fwd(q, k_cmp, v_cmp, packed, cfg, scale)
        idx = topk.select_blocks(q, k_cmp, lse_cmp, packed, cfg, scale)
        o_slc, lse_slc = selected.slc_fwd(q, k, v, idx, packed, cfg, scale)
        o_win, lse_win = window.win_fwd(q, k, v, packed, cfg.window, scale)
        gates = torch.rand(T, HQ, 3, device=dev, dtype=torch.bfloat16)
        parts = {
            "packed_layout": lambda: packed_layout(1, T, None, cfg, dev),
            "cmp_fwd": lambda: compressed.cmp_fwd(q, k_cmp, v_cmp, packed, cfg, scale),
            "select_blocks": lambda: topk.select_blocks(q, k_cmp, lse_cmp, packed, cfg, scale),
            "slc_fwd": lambda: selected.slc_fwd(q, k, v, idx, packed, cfg, scale),
            "win_fwd": lambda: window.win_fwd(q, k, v, packed, cfg.window, scale),
            "win_fwd_gated": lambda: window.win_fwd(q, k, v, packed, cfg.window, scale, gated=(gates, o_cmp, o_slc)),
            "gates_bwd": lambda: gates_bwd(do, gates, o_cmp, o_slc, o_win),
            "cmp_bwd": lambda: compressed.cmp_bwd(do, q, k_cmp, v_cmp, o_cmp, lse_cmp, packed, cfg, scale),
            "slc_bwd": lambda: selected.slc_bwd(do, q, k, v, o_slc, lse_slc, idx, packed, cfg, scale),
            "win_bwd": lambda: window.win_bwd(do, q, k, v, o_win, lse_win, packed, cfg.window, scale),
        }
        for name, fn in parts.items():
            try:
                ms = bench(fn)
            except Exception as exc:  # a failing part is reported, the others still run
                ms = None
                print(f"{name} T={T}: {type(exc).__name__}: {exc}"[:300])
            rows.append(dict(T=T, part=name, ms=ms))
            print(f"{config.name} T={T:6d} {name:14s} {ms if ms is None else round(ms, 3)}", flush=True)
        dense = {}
        qd, kd, vd = (x.view(1, T, -1, x.shape[-1]).transpose(1, 2) for x in (q, k, v))
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            kd2, vd2 = kd.repeat_interleave(HQ // HKV, 1), vd.repeat_interleave(HQ // HKV, 1)
            dense["cudnn_fwd"] = bench(lambda: torch.nn.functional.scaled_dot_product_attention(qd, kd2, vd2, is_causal=True))
        rows += [dict(T=T, part=n, ms=ms) for n, ms in dense.items()]
        print(f"{config.name} T={T:6d} cudnn_fwd      {dense['cudnn_fwd']:.3f}", flush=True)
    return [dict(config=config.name, **row) for row in rows]


if __name__ == "__main__":
    main()

"""Time each decode kernel (nsa/ops/decode.py) on its own, beside the whole step and SDPA's dense decode step.

python3 benchmarks/decode_breakdown.py --config paper --cases 16x8k,16x128k,1x128k --out FILE.json
python3 benchmarks/decode_breakdown.py --set MAX_CHUNK_BLOCKS=512 ...  (a variant: module constants of nsa.ops.decode)
python3 benchmarks/decode_breakdown.py --plot FILE.json  (FILE.png: per case, stacked kernel times of each section of
    FILE, e.g. the "before" and "after" of results/2026-12-01/decode_kernels.json, beside SDPA's step)
python3 benchmarks/decode_breakdown.py --plot-timeline FILE.json  (FILE_timeline.png: per case, each kernel's span
    inside the replayed step, one row per kernel)
The step and SDPA are replayed from CUDA graphs (do_bench median); each kernel's device time comes from the
profiler over eager calls, and the timeline (each kernel's start and end inside a replayed step, microseconds from
the step's first kernel, median over replays) from the profiler over replays, where launch gaps and the overlap of
the side stream show. The same inputs every call, so L2 may hold part of them at short contexts: `nsa bench`
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
from nsa.bench.impls import cuda_graphed
from nsa.ops import decode
from nsa.ops.decode import nsa_decode


def graphed(fn, *args):
    """fn(*args) replayed from a CUDA graph (the bench's capture, as `nsa bench` times decode steps)."""
    replay, _ = cuda_graphed(fn, [args])
    return lambda: replay(*args)


def timeline(replay, replays: int = 20) -> dict:
    """Each kernel's median start and end (us from the step's first kernel) over `replays` replays of the step."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            replay()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                    key=lambda e: e.time_range.start)
    per_step = len(events) // replays
    spans = collections.defaultdict(list)
    for r in range(replays):
        step = events[r * per_step:(r + 1) * per_step]
        t0 = step[0].time_range.start
        for e in step:
            spans[e.name.removesuffix("_kernel")].append((e.time_range.start - t0, e.time_range.end - t0))
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {name: [median([s for s, _ in ts]), median([e for _, e in ts])] for name, ts in spans.items()}


def case(config, B: int, T: int, calls: int = 20) -> dict:
    HQ, HKV, DK, DV = config.dense_shape
    cfg = config.sparsity
    torch.manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    tc = cfg.num_cmp(T)
    q, gates = rnd(B, 1, HQ, DK), torch.rand(B, 1, HQ, 3, device="cuda", dtype=torch.bfloat16)
    k, v, k_cmp, v_cmp = rnd(B, T, HKV, DK), rnd(B, T, HKV, DV), rnd(B, tc, HKV, DK), rnd(B, tc, HKV, DV)
    past = torch.full((B,), T - 1, dtype=torch.int32, device="cuda")
    step = lambda q: nsa_decode(q, gates, k, v, k_cmp, v_cmp, past, cfg, DK ** -0.5)  # noqa: E731
    replay = graphed(step, q)
    ms = triton.testing.do_bench(replay, warmup=50, rep=300, return_mode="median")
    spans = timeline(replay)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step(q)
        torch.cuda.synchronize()
    kernels = collections.defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.name.endswith("_kernel"):
            kernels[event.name] += event.device_time / calls / 1000
    qs, ks, vs = rnd(B, HQ, 1, DK), rnd(B, HKV, T, DK), rnd(B, HKV, T, DV)
    dense = graphed(lambda qs: torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, enable_gqa=True), qs)
    ms_dense = triton.testing.do_bench(dense, warmup=50, rep=300, return_mode="median")
    return dict(B=B, T=T, nsa_ms=ms, sdpa_ms=ms_dense, kernels_ms=dict(kernels), timeline_us=spans)


def plot(path: str) -> str:
    """Stacked bars of each kernel's time per case, one bar per section of the JSON (sections holding "rows"),
    with SDPA's decode step marked; written beside the JSON as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        doc = json.load(f)
    sections = {name: part["rows"] for name, part in doc.items() if isinstance(part, dict) and "rows" in part}
    cases = list(dict.fromkeys((r["B"], r["T"]) for rows in sections.values() for r in rows))
    kernels = list(dict.fromkeys(k for rows in sections.values() for r in rows for k in r["kernels_ms"]))
    colors = dict(zip(kernels, plt.get_cmap("tab10").colors))
    fig, ax = plt.subplots(figsize=(1.6 * len(cases) * len(sections), 4.5))
    width = 0.8 / len(sections)
    for s, (name, rows) in enumerate(sections.items()):
        by_case = {(r["B"], r["T"]): r for r in rows}
        for c, key in enumerate(cases):
            if key not in by_case:
                continue
            x, bottom = c + (s - (len(sections) - 1) / 2) * width, 0.0
            for kernel in kernels:
                t = by_case[key]["kernels_ms"].get(kernel, 0.0)
                ax.bar(x, t, width * 0.9, bottom=bottom, color=colors[kernel],
                       label=kernel.removesuffix("_kernel") if c == 0 and s == 0 else None)
                bottom += t
            ax.text(x, bottom, name, ha="center", va="bottom", fontsize=7, rotation=90)
            ax.plot([x - width / 2, x + width / 2], [by_case[key]["sdpa_ms"]] * 2, color="black", lw=2,
                    label="SDPA decode step" if c == 0 and s == 0 else None)
    ax.set_xticks(range(len(cases)), [f"B={b}, {t // 1024}k" for b, t in cases])
    ax.set_ylabel("ms (kernel device time)")
    ax.set_title("NSA decode step by kernel")
    ax.legend(fontsize=8)
    out = path.removesuffix(".json") + ".png"
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def plot_timeline(path: str) -> str:
    """Each case's replayed step as bars of its kernels' spans (timeline_us), one panel per case, with the replayed
    step's time and SDPA's marked; written beside the JSON as FILE_timeline.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        rows = json.load(f)["rows"]
    kernels = list(dict.fromkeys(k for r in rows for k in r["timeline_us"]))
    colors = dict(zip(kernels, plt.get_cmap("tab10").colors))
    fig, axes = plt.subplots(len(rows), 1, figsize=(9, 1.1 + 0.35 * len(kernels) * len(rows)), squeeze=False)
    for ax, r in zip(axes[:, 0], rows):
        spans = sorted(r["timeline_us"].items(), key=lambda kv: kv[1])
        for y, (name, (a, b)) in enumerate(spans):
            ax.barh(y, b - a, left=a, color=colors[name])
            ax.text(b + 0.5, y, f"{name} {b - a:.1f}", va="center", fontsize=7)
        ax.axvline(1e3 * r["nsa_ms"], color="black", lw=1, ls="--", label="replayed step (do_bench)")
        ax.set_yticks([])
        title = f"B={r['B']}, {r['T'] // 1024}k: step {1e3 * r['nsa_ms']:.1f} us, SDPA {1e3 * r['sdpa_ms']:.1f} us"
        ax.set_title(title, fontsize=9, loc="left")
        ax.set_xlim(0, 1e3 * r["nsa_ms"] * 1.15)
    axes[-1, 0].set_xlabel("us from the step's first kernel")
    axes[0, 0].legend(fontsize=7, loc="lower right")
    out = path.removesuffix(".json") + "_timeline.png"
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--plot", metavar="JSON", help="plot a breakdown JSON instead of timing")
    parser.add_argument("--plot-timeline", metavar="JSON", help="plot the replayed steps of a breakdown JSON")
    parser.add_argument("--config", default="paper")
    parser.add_argument("--cases", default="16x8k,16x32k,16x64k,16x128k,1x32k,1x128k", help="BxT, comma-separated")
    parser.add_argument("--out", default=None)
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME=INT", help="override nsa.ops.decode constants")
    args = parser.parse_args()
    for item in args.set:
        name, value = item.split("=")
        if not hasattr(decode, name):
            raise SystemExit(f"nsa.ops.decode has no constant {name}")
        setattr(decode, name, int(value))
    if args.plot:
        print(plot(args.plot))
        return
    if args.plot_timeline:
        print(plot_timeline(args.plot_timeline))
        return
    config = {c.name: c for c in FULL_CONFIGS}[args.config]
    rows = []
    for item in args.cases.split(","):
        B, T = item.lower().split("x")
        rows.append(case(config, int(B), int(T[:-1]) * 1024 if T.endswith("k") else int(T)))
    print(f"{'B':>3} {'T':>7} {'NSA ms':>8} {'SDPA ms':>8} {'x':>6}  kernels (ms)")
    for r in rows:
        kern = " ".join(f"{name.removesuffix('_kernel')}={t:.4f}" for name, t in r["kernels_ms"].items())
        print(f"{r['B']:>3} {r['T']:>7} {r['nsa_ms']:8.4f} {r['sdpa_ms']:8.4f} {r['sdpa_ms'] / r['nsa_ms']:6.2f}  {kern}")
        spans = sorted(r["timeline_us"].items(), key=lambda kv: kv[1])
        print(" " * 38 + "replayed (us): " + " ".join(f"{name[:24]} {a:.1f}-{b:.1f}" for name, (a, b) in spans))
    if args.out:
        env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                   config=config.describe(), set=args.set)
        with open(args.out, "w") as f:
            json.dump(dict(environment=env, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()

"""Where a decode step of the 1B preset goes: NSAForCausalLM against its dense twin after a prompt of --context
tokens, on a cache for CUDA graphs (as `nsa bench`'s generate() decodes).

For each model and batch: the replayed step's time (CUDA events, median of 20), for NSA both kinds of step (one that
runs phi, when a block of l tokens completes, and one that does not; see NSACache.compresses); one replay of each
under the profiler (its kernels, their summed device time and the span from the first kernel's start to the last
one's end: what is not busy is the time between kernels); and the kernels of one decoder layer's step run eagerly
under the profiler (count, device time, the largest by name). A layer's share of the step's index arithmetic
(NSACache.step()) is in its figures: it is the first layer of its step.

python3 benchmarks/decode_step_profile.py [--context 32768] [--batches 1,16] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import collections
import json

import torch
import triton
from torch.profiler import ProfilerActivity, profile

import nsa
from nsa.models import NSAConfig, NSAForCausalLM


def replay_ms(graph, n: int = 20) -> float:
    times = []
    for _ in range(n):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return sorted(times)[n // 2]


def device_kernels(prof) -> list:
    """The CUDA kernels a profiler recorded."""
    return [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def by_name(kernels: list, top: int) -> tuple[float, list]:
    """The kernels' summed device time (us) and the `top` names that took most, with their time and count."""
    time, count = collections.Counter(), collections.Counter()
    for e in kernels:
        time[e.name[:70]] += e.device_time
        count[e.name[:70]] += 1
    return sum(time.values()), [dict(name=name, us=t, count=count[name]) for name, t in time.most_common(top)]


def replay_kernels(graph) -> dict:
    """One replay under the profiler: how many kernels the step launches, their summed device time, and the span
    from the first kernel's start to the last one's end (the difference is the time between kernels)."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    kernels = device_kernels(prof)
    if not kernels:
        return dict(kernels=0)
    start = min(e.time_range.start for e in kernels)
    end = max(e.time_range.end for e in kernels)
    busy, top = by_name(kernels, 16)
    return dict(kernels=len(kernels), kernel_us=busy, span_us=end - start, top=top)


def layer_kernels(model, cache, token, position) -> dict:
    """The kernels of the first decoder layer's eager step at `position` (it appends to the cache)."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        with cache.step():
            model.model.layers[0](model.model.embed_tokens(token), position_ids=position, cache=cache)
        torch.cuda.synchronize()
    kernels = device_kernels(prof)
    busy, top = by_name(kernels, 12)
    return dict(kernels=len(kernels), us=busy, top=top)


def profile_model(attn_impl: str, context: int, batch: int) -> dict:
    config = NSAConfig.nsa_1b(attn_impl=attn_impl, max_position_embeddings=context + 64)
    torch.manual_seed(0)
    model = NSAForCausalLM(config).to(device="cuda", dtype=torch.bfloat16).eval()
    # Room for the steps below and the replays that time them (each moves the device lengths on a token).
    cache = nsa.NSACache(capacity=context + 128, cuda_graph=True)
    with torch.no_grad():
        token = model(torch.randint(1, config.vocab_size, (batch, context), device="cuda"), cache=cache,
                      logits_to_keep=1).logits.argmax(-1)
        # Steps at positions context, context + 1, ...: each kind's first one captures it, the next replays.
        for p in range(context, context + 2 * config.sparsity.cmp_stride + 2):
            model(token, cache=cache, position_ids=torch.full((batch, 1), p, device="cuda"))
        torch.cuda.synchronize()
        row = dict(attn_impl=attn_impl, B=batch, context=context,
                   replay_ms={("with phi" if phi else "without phi") if attn_impl == "nsa" else "step":
                              replay_ms(graph.graph) for (_, phi), graph in cache.graphs.items()})
        row["replay_profile"] = {("with phi" if phi else "without phi") if attn_impl == "nsa" else "step":
                                 replay_kernels(graph.graph) for (_, phi), graph in cache.graphs.items()}
        position = cache.get_seq_length()
        row["layer"] = layer_kernels(model, cache, token, torch.full((batch, 1), position, device="cuda"))
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = [profile_model(attn_impl, args.context, int(b)) for attn_impl in ("nsa", "dense")
            for b in args.batches.split(",")]
    for r in rows:
        steps = ", ".join(f"{kind} {ms:.3f} ms" for kind, ms in r["replay_ms"].items())
        print(f"{r['attn_impl']:5} B{r['B']:<3} replayed step: {steps}; one layer eagerly: {r['layer']['kernels']} "
              f"kernels, {r['layer']['us']:.1f} us")
        for kind, p in r["replay_profile"].items():
            print(f"      replayed {kind}: {p['kernels']} kernels, {p.get('kernel_us', 0):.0f} us busy of a "
                  f"{p.get('span_us', 0):.0f} us span")
            for k in p.get("top", [])[:10]:
                print(f"        {k['us']:7.1f} us {k['count']:4d}x  {k['name']}")
        for k in r["layer"]["top"][:6]:
            print(f"      {k['us']:7.1f} us {k['count']:3d}x  {k['name']}")
    if args.out:
        env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
        with open(args.out, "w") as f:
            json.dump(dict(environment=env, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()

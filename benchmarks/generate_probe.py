"""Where generate()'s time per new token goes: the captured decode step on the GPU against the host's share.

For NSAForCausalLM (the 1B preset) and its dense twin, greedy generate() on an NSACache with cuda_graph, as `nsa
bench --phases generate` runs it. Each replay of a captured step is timed by CUDA events around it, and the host
notes when it launches each replay and when each token reaches the streamer: per token, the wall time, the replay's
GPU time (by kind of step: NSA's with phi, one in d, and without), the host time from a token's arrival to the next
replay's launch, and from that launch to the next token's arrival (the replay, the head and the sampling).

python3 benchmarks/generate_probe.py [--context 32768] [--batch 1] [--tokens 64]
"""

from __future__ import annotations

import argparse
import collections
import time

import torch

from nsa.bench.configs import FULL_CONFIGS
from nsa.bench.impls import TokenClock, build_generate
from nsa.models.modeling_nsa import DecodeGraph


def timed_replays(log: list):
    """DecodeGraph.replay wrapped to append (host launch time, start event, end event, graph) to log."""
    replay = DecodeGraph.replay

    def timed(self, input_ids, position_ids, cache):
        launched = time.perf_counter()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = replay(self, input_ids, position_ids, cache)
        end.record()
        log.append((launched, start, end, id(self)))
        return out

    return timed


def probe(attn_impl: str, context: int, batch: int, tokens: int, runs: int = 2) -> list[dict]:
    """The bench's generate() (nsa.bench.impls.build_generate: the 1B preset, random weights, an NSACache with
    cuda_graph) with each replay timed."""
    cfg = {c.name: c for c in FULL_CONFIGS}["paper"]
    generate = build_generate(cfg, batch, context, torch.device("cuda"), torch.bfloat16, attn_impl, tokens).fn
    settle = 3 + cfg.sparsity.cmp_stride  # the prompt's token and the steps that capture each kind

    log = []
    original = DecodeGraph.replay
    DecodeGraph.replay = timed_replays(log)
    try:
        generate(settle)
        rows = []
        for _ in range(runs):
            log.clear()
            clock = TokenClock()
            generate(settle + tokens, clock)
            torch.cuda.synchronize()
            # times[i] is the i-th new token's arrival; the last `tokens` replays made the last `tokens` tokens.
            arrivals, replays = clock.times[-tokens:], log[-tokens:]
            kinds = collections.defaultdict(list)
            for _, start, end, graph in replays:
                kinds[graph].append(start.elapsed_time(end))
            gpu = [t for ts in kinds.values() for t in ts]
            rows.append(dict(
                attn_impl=attn_impl, context=context, batch=batch, tokens=tokens,
                ms_per_token=1e3 * (arrivals[-1] - clock.times[-tokens - 1]) / tokens,
                replay_ms=sum(gpu) / len(gpu),
                replay_ms_by_kind=sorted((len(ts), sum(ts) / len(ts)) for ts in kinds.values()),
                arrival_to_launch_ms=1e3 * sum(r[0] - a for r, a in zip(replays[1:], arrivals[:-1])) / (tokens - 1),
                launch_to_arrival_ms=1e3 * sum(a - r[0] for r, a in zip(replays, arrivals)) / tokens))
        return rows
    finally:
        DecodeGraph.replay = original


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    for attn_impl in ("nsa", "dense"):
        for r in probe(attn_impl, args.context, args.batch, args.tokens):
            kinds = ", ".join(f"{n} x {ms:.3f}" for n, ms in r["replay_ms_by_kind"])
            print(f"{attn_impl:5} T={args.context} B{args.batch}: {r['ms_per_token']:.3f} ms per token; replay on the "
                  f"GPU {r['replay_ms']:.3f} ({kinds}); host: arrival -> launch {r['arrival_to_launch_ms']:.3f}, "
                  f"launch -> arrival {r['launch_to_arrival_ms']:.3f}", flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

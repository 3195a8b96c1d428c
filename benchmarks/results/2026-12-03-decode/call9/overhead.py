"""How much of a replayed decode step is the graph's launch: one step per graph against L steps (L layers' caches)
in one graph, for NSA and SDPA, B16; spans of the single-step graphs from the profiler; trivial-kernel graphs."""
import collections, json, sys
import torch, triton
from torch.profiler import ProfilerActivity, profile
from nsa.bench.configs import FULL_CONFIGS
from nsa.bench.impls import sdpa_fn, _all_sdpa_backends
from nsa.ops.decode import nsa_decode

config = {c.name: c for c in FULL_CONFIGS}["paper"]
HQ, HKV, DK, DV = config.dense_shape
cfg = config.sparsity
B, L = 16, 8
bench = lambda f: triton.testing.do_bench(f, warmup=50, rep=300, return_mode="median")


def graph_of(fns):
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns: f()
    torch.cuda.current_stream().wait_stream(s); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns: f()
    return g.replay


def span(replay, n=20):
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n): replay()
        torch.cuda.synchronize()
    ev = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA), key=lambda e: e.time_range.start)
    per = len(ev) // n
    spans = sorted(ev[(r + 1) * per - 1].time_range.end - ev[r * per].time_range.start for r in range(n))
    return spans[n // 2], per


rows = []
x = torch.zeros(1024, device="cuda")
for name, fns in (("1 tiny kernel", [lambda: x.add_(1)]), ("5 tiny kernels", [lambda: x.add_(1)] * 5)):
    r = graph_of(fns)
    rows.append(dict(case=name, ms=bench(r), span_us=span(r)[0]))
    print(rows[-1], flush=True)
for T in map(int, sys.argv[1:]):
    rnd = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16)
    tc = cfg.num_cmp(T)
    past = torch.full((B,), T - 1, dtype=torch.int32, device="cuda")
    layers = [(rnd(B, 1, HQ, DK), torch.rand(B, 1, HQ, 3, device="cuda", dtype=torch.bfloat16), rnd(B, T, HKV, DK),
               rnd(B, T, HKV, DV), rnd(B, tc, HKV, DK), rnd(B, tc, HKV, DV)) for _ in range(L)]
    steps = [lambda a=a: nsa_decode(*a, past, cfg, DK ** -0.5) for a in layers]
    one, many = graph_of(steps[:1]), graph_of(steps)
    nsa1, nsaL, (nsa_span, nsa_k) = bench(one), bench(many) / L, span(one)
    del layers, steps, one, many; torch.cuda.empty_cache()
    layers = [(rnd(B, HQ, 1, DK), rnd(B, HKV, T, DK), rnd(B, HKV, T, DV)) for _ in range(L)]
    fn, note = sdpa_fn(list(_all_sdpa_backends()), layers[0], causal=False)
    steps = [lambda a=a: fn(*a) for a in layers]
    one, many = graph_of(steps[:1]), graph_of(steps)
    sd1, sdL, (sd_span, sd_k) = bench(one), bench(many) / L, span(one)
    del layers, steps, one, many; torch.cuda.empty_cache()
    rows.append(dict(B=B, T=T, L=L, nsa_ms_1=nsa1, nsa_ms_per_layer=nsaL, nsa_span_us=nsa_span, nsa_kernels=nsa_k,
                     sdpa_ms_1=sd1, sdpa_ms_per_layer=sdL, sdpa_span_us=sd_span, sdpa_kernels=sd_k, sdpa_note=note,
                     x_1=sd1 / nsa1, x_per_layer=sdL / nsaL))
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
json.dump(rows, open("overhead.json", "w"), indent=1)

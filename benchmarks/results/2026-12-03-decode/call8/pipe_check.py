"""The pipelined step (PIPE parts of the batch) against one part, same inputs, eager and graphed."""
import torch
from nsa.bench.configs import FULL_CONFIGS
from nsa.ops import decode

config = {c.name: c for c in FULL_CONFIGS}["paper"]
HQ, HKV, DK, DV = config.dense_shape
cfg = config.sparsity
for B, T in ((16, 8192), (5, 20000)):
    torch.manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16)
    tc = cfg.num_cmp(T)
    q, gates = rnd(B, 1, HQ, DK), torch.rand(B, 1, HQ, 3, device="cuda", dtype=torch.bfloat16)
    k, v, k_cmp, v_cmp = rnd(B, T, HKV, DK), rnd(B, T, HKV, DV), rnd(B, tc, HKV, DK), rnd(B, tc, HKV, DV)
    past = torch.randint(T // 2, T - 1, (B,), dtype=torch.int32, device="cuda")
    outs = {}
    for pipe in (1, 2, 4):
        decode.PIPE = pipe
        outs[pipe] = decode.nsa_decode(q, gates, k, v, k_cmp, v_cmp, past, cfg)
    torch.cuda.synchronize()
    print(B, T, {p: (o - outs[1]).abs().max().item() for p, o in outs.items()}, flush=True)
decode.PIPE = 2

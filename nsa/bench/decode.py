"""One decode step of the paper's configuration against SDPA's dense decode over the same context, in one run.

Both sides read a cache of `context` tokens for B sequences and one new query per sequence. NSA reads the
compressed tokens, its n selected blocks and the window (SPEC.md); dense attention reads every key. The bytes each
side must move, divided by its time, against the measured device-to-device copy rate, say how close to the memory
limit each one runs.
"""

from __future__ import annotations

import torch

from ..config import SparsityConfig

# The paper's attention shapes (Section 4): 64 query heads over 4 KV heads, DK = 192, DV = 128.
PAPER_HEADS = dict(hq=64, hkv=4, dk=192, dv=128)


def copy_ceiling_tbs(device, nbytes: int = 1 << 30) -> float:
    """TB/s of a device-to-device copy of nbytes (read + write counted)."""
    import triton

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median")
    return 2 * nbytes / ms / 1e9


def decode_step_benchmark(batches=(1, 16, 64), contexts=(8192, 16384, 32768, 65536, 131072), *,
                          sparsity: SparsityConfig | None = None, hq=64, hkv=4, dk=192, dv=128,
                          dtype=torch.bfloat16, device="cuda", warmup: int = 25, rep: int = 100) -> list[dict]:
    """Time one NSA decode step (nsa.ops.decode.nsa_decode: all branches, selection and gates) and SDPA's dense
    decode (one query over the whole context, enable_gqa) with triton.testing.do_bench (median).

    Returns one dict per (batch, context): batch, context, nsa_ms, sdpa_ms, speedup (sdpa_ms / nsa_ms), nsa_bytes,
    sdpa_bytes (what each must read), nsa_tbs, sdpa_tbs (bytes / time), copy_tbs (the measured ceiling),
    limit_speedup (sdpa_bytes / nsa_bytes: the speedup if both ran at the same rate).
    """
    import triton
    import torch.nn.functional as F

    from ..ops.decode import nsa_decode

    cfg = sparsity or SparsityConfig()
    elt = torch.finfo(dtype).bits // 8
    ceiling = copy_ceiling_tbs(device)
    rows = []
    for context in contexts:
        for batch in batches:
            rnd = lambda *shape: torch.randn(*shape, dtype=dtype, device=device)  # noqa: E731
            ring = cfg.window + 15
            k, v = rnd(batch, context, hkv, dk), rnd(batch, context, hkv, dv)
            k_cmp, v_cmp = rnd(batch, context // cfg.cmp_stride + 1, hkv, dk), rnd(batch, context // cfg.cmp_stride + 1, hkv, dv)
            k_win, v_win = rnd(batch, ring, hkv, dk), rnd(batch, ring, hkv, dv)
            q = rnd(batch, 1, hq, dk)
            gates = torch.rand(batch, 1, hq, 3, dtype=dtype, device=device)
            past = torch.full((batch,), context - 1, dtype=torch.int32, device=device)
            nsa_ms = triton.testing.do_bench(
                lambda: nsa_decode(q, gates, k, v, k_cmp, v_cmp, past, cfg, k_win=k_win, v_win=v_win),
                warmup=warmup, rep=rep, return_mode="median")
            tc = cfg.num_cmp(context)
            keys = tc + min(cfg.num_selected * cfg.slc_block, context) + min(cfg.window, context)
            nsa_bytes = batch * hkv * keys * (dk + dv) * elt
            del k_cmp, v_cmp, k_win, v_win
            # SDPA's layout [B, H, S, D]: the same cache tensors, transposed views.
            qd, kd, vd = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            sdpa_ms = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(qd, kd, vd, enable_gqa=True),
                                              warmup=warmup, rep=rep, return_mode="median")
            sdpa_bytes = batch * hkv * context * (dk + dv) * elt
            rows.append(dict(batch=batch, context=context, nsa_ms=nsa_ms, sdpa_ms=sdpa_ms, speedup=sdpa_ms / nsa_ms,
                             nsa_bytes=nsa_bytes, sdpa_bytes=sdpa_bytes, nsa_tbs=nsa_bytes / nsa_ms / 1e9,
                             sdpa_tbs=sdpa_bytes / sdpa_ms / 1e9, copy_tbs=ceiling,
                             limit_speedup=sdpa_bytes / nsa_bytes))
            del k, v, qd, kd, vd
            torch.cuda.empty_cache()
    return rows

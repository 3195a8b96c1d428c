"""SPEC.md spelled out one query, one head at a time: slow on purpose and independent of nsa.reference,
so that the two can check each other (the tests and `nsa demo` do)."""

import math

import torch


def overlap(i, j, cfg):
    lo = max(i * cfg.cmp_stride, j * cfg.slc_block)
    hi = min(i * cfg.cmp_stride + cfg.cmp_block, (j + 1) * cfg.slc_block)
    return max(0, hi - lo)


def softmax_attend(qv, keys, values, scale):
    """Attention of one query vector over lists of key and value vectors; None when there are no keys."""
    if not keys:
        return None, []
    logits = [scale * float(qv @ kv) for kv in keys]
    top = max(logits)
    weights = [math.exp(x - top) for x in logits]
    total = sum(weights)
    probs = [w / total for w in weights]
    return sum(p * vv for p, vv in zip(probs, values)), probs


def naive_nsa(q, k, v, k_cmp, v_cmp, gates, k_win, v_win, cfg, scale):
    """Returns (o [B, T, HQ, DV], idx [B, T, HKV, n]) for float64 inputs of one batch (no cu_seqlens)."""
    B, T, HQ, _ = q.shape
    HKV, DV = k.shape[2], v.shape[3]
    G = HQ // HKV
    Tc = k_cmp.shape[1]
    num_blocks = math.ceil(T / cfg.slc_block)
    o = torch.zeros(B, T, HQ, DV, dtype=q.dtype)
    idx = torch.full((B, T, HKV, cfg.num_selected), -1, dtype=torch.int32)
    for b in range(B):
        for t in range(T):
            visible = [i for i in range(Tc) if i * cfg.cmp_stride + cfg.cmp_block <= t + 1]
            for g in range(HKV):
                importance = [0.0] * num_blocks
                o_cmp = {}
                for h in range(g * G, (g + 1) * G):
                    out, probs = softmax_attend(q[b, t, h], [k_cmp[b, i, g] for i in visible], [v_cmp[b, i, g] for i in visible], scale)
                    o_cmp[h] = torch.zeros(DV, dtype=q.dtype) if out is None else out
                    for i, p in zip(visible, probs):
                        for j in range(num_blocks):
                            importance[j] += p * overlap(i, j, cfg) / cfg.cmp_stride
                candidates = [j for j in range(num_blocks) if j * cfg.slc_block <= t]
                jt = t // cfg.slc_block
                forced = [j for j in candidates if j < cfg.num_init or jt - cfg.num_local < j <= jt]
                rest = sorted((j for j in candidates if j not in forced), key=lambda j: (-importance[j], j))
                chosen = sorted(forced + rest[: cfg.num_selected - len(forced)])
                idx[b, t, g, : len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
                slc_keys = [s for j in chosen for s in range(j * cfg.slc_block, (j + 1) * cfg.slc_block) if s <= t]
                win_keys = [s for s in range(T) if t - cfg.window < s <= t]
                for h in range(g * G, (g + 1) * G):
                    o_slc, _ = softmax_attend(q[b, t, h], [k[b, s, g] for s in slc_keys], [v[b, s, g] for s in slc_keys], scale)
                    o_win, _ = softmax_attend(q[b, t, h], [k_win[b, s, g] for s in win_keys], [v_win[b, s, g] for s in win_keys], scale)
                    gate = gates[b, t, h]
                    o[b, t, h] = gate[0] * o_cmp[h] + gate[1] * o_slc + gate[2] * o_win
    return o, idx

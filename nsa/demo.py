"""`nsa demo`: which keys a few queries attend through each branch, and a check of the reference."""

from __future__ import annotations

import math
import time

import torch

from . import reference
from .config import SparsityConfig
from .naive import naive_nsa


def planted_inputs(T: int, HQ: int, HKV: int, D: int, cfg: SparsityConfig, generator: torch.Generator):
    """Random q/k/v in float64 with a few key spans that share a direction with every query, so that the
    selection has something to find. k_cmp, v_cmp are mean-pooled blocks (the module learns phi instead)."""

    def rnd(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    u = rnd(D)
    u = u / u.norm() * 2.5
    q = rnd(1, T, HQ, D) + u
    k, v = rnd(1, T, HKV, D), rnd(1, T, HKV, D)
    for start in torch.randint(0, max(1, T - 64), (6,), generator=generator).tolist():
        k[:, start : start + 48] += u
    Tc = cfg.num_cmp(T)
    pool = lambda x: x.unfold(1, cfg.cmp_block, cfg.cmp_stride).mean(-1)[:, :Tc]  # noqa: E731
    gates = torch.full((1, T, HQ, 3), 1 / 3, dtype=torch.float64)
    return q, k, v, pool(k), pool(v), gates


def branch_maps(q, k, v, k_cmp, v_cmp, cfg: SparsityConfig, scale: float, queries: list[int]):
    """Per query of kv-group 0, the attention weight each key position gets through cmp, slc and win: [3, len(queries), T]."""
    T = q.shape[1]
    G = q.shape[2] // k.shape[2]
    qg = q.view(1, T, k.shape[2], G, -1)
    pos = torch.arange(T)
    Tc = k_cmp.shape[1]
    cmp_visible = (torch.arange(Tc) * cfg.cmp_stride + cfg.cmp_block)[None, :] <= pos[:, None] + 1
    _, p_cmp = reference.masked_attention(qg, k_cmp, v_cmp, cmp_visible[None, :, None], scale)
    idx = reference.select_blocks(reference.block_scores(p_cmp, T, cfg), cfg)
    selected = reference.selection_mask(idx, cfg.num_slc(T)).repeat_interleave(cfg.slc_block, -1)[..., :T]
    causal = pos[None, :] <= pos[:, None]
    band = causal & (pos[None, :] > pos[:, None] - cfg.window)
    maps = torch.zeros(3, len(queries), T, dtype=torch.float64)
    for row, t in enumerate(queries):
        # A compressed token's weight is spread over the l keys it summarizes.
        for i in range(Tc):
            maps[0, row, i * cfg.cmp_stride : i * cfg.cmp_stride + cfg.cmp_block] += p_cmp[0, t, 0, 0, i] / cfg.cmp_block
        for m, allowed in ((1, selected[0, t, 0] & causal[t]), (2, band[t])):
            _, p = reference.masked_attention(qg[:, t : t + 1], k, v, allowed[None, None, None, :], scale)
            maps[m, row] = p[0, 0, 0, 0]
    return maps, idx


def run(out: str = "nsa_demo.png", seqlen: int = 2048) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = SparsityConfig()
    gen = torch.Generator().manual_seed(0)
    HQ, HKV, D = 4, 1, 64
    scale = 1 / math.sqrt(D)
    q, k, v, k_cmp, v_cmp, gates = planted_inputs(seqlen, HQ, HKV, D, cfg, gen)
    queries = sorted({min(seqlen - 1, t) for t in (seqlen // 4, seqlen // 2, seqlen - 1)})
    maps, idx = branch_maps(q, k, v, k_cmp, v_cmp, cfg, scale, queries)

    fig, axes = plt.subplots(len(queries), 1, figsize=(12, 2.2 * len(queries)), squeeze=False)
    names = ("compressed", "selected", "window")
    for row, t in enumerate(queries):
        ax = axes[row, 0]
        for m in range(3):
            weights = maps[m, row] / maps[m, row].max().clamp_min(1e-12)
            ax.fill_between(range(seqlen), m, m + 0.9 * weights.numpy(), step="mid", label=names[m], color=f"C{m}")
        for j in idx[0, t, 0].tolist():
            if j >= 0:
                ax.axvspan(j * cfg.slc_block, (j + 1) * cfg.slc_block, color="C1", alpha=0.12)
        ax.axvline(t, color="k", lw=0.8)
        ax.set_yticks([0.45, 1.45, 2.45], names)
        ax.set_xlim(0, seqlen)
        ax.set_title(f"query {t}: weight per key (each branch scaled to its max); shaded: its {cfg.num_selected} selected blocks", fontsize=9)
    axes[-1, 0].set_xlabel("key position")
    fig.suptitle(f"NSA on {seqlen} random tokens with planted key spans (l={cfg.cmp_block}, d={cfg.cmp_stride}, "
                 f"l'={cfg.slc_block}, n={cfg.num_selected}, w={cfg.window})")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"saved {out}: keys attended by queries {queries} through each branch")

    # The vectorized reference against the per-token naive path on a prefix of the same input.
    T = min(seqlen, 160)
    args = [x[:, :T] for x in (q, k, v)] + [k_cmp[:, : cfg.num_cmp(T)], v_cmp[:, : cfg.num_cmp(T)], gates[:, :T]]
    start = time.perf_counter()
    o_ref, idx_ref = reference.nsa_forward(*args, args[1], args[2], cfg, scale)
    o_naive, idx_naive = naive_nsa(*args, args[1], args[2], cfg, scale)
    err = (o_ref - o_naive).abs().max().item()
    same = torch.equal(idx_ref, idx_naive)
    status = "OK" if same and err < 1e-10 else "MISMATCH"
    print(f"reference vs naive, float64, T={T}, {HQ}/{HKV} heads: max |diff| = {err:.2e}, "
          f"same selection: {same} ({time.perf_counter() - start:.1f} s) {status}")
    if status != "OK":
        raise SystemExit(1)

"""SPEC.md in plain, vectorized PyTorch: the oracle every kernel is tested against.

Dtype-generic: in float64 it is the oracle; in float16/bfloat16/float32 it is the "same low precision"
reference of the tolerance rule (products in the input dtype, softmax statistics in float32 or wider).
Queries are processed in chunks so that no [T, T] score matrix of all heads lives at once.
"""

from __future__ import annotations

import torch

from .config import SparsityConfig

# Queries per chunk of the masked dense attention: bounds the score buffer at CHUNK x T per head.
CHUNK = 512


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of softmax statistics: float32, or float64 when the inputs are float64."""
    return torch.promote_types(dtype, torch.float32)


def masked_attention(q, k, v, allowed, scale):
    """Softmax attention of grouped queries over the keys `allowed` marks; 0 where a row allows none.

    Args:
        q: [B, C, HKV, G, DK] queries of C positions, grouped by the KV head they read.
        k: [B, S, HKV, DK], v: [B, S, HKV, DV].
        allowed: [B, C, HKV, S] bool, shared by the G heads of a group.
    Returns:
        o [B, C, HKV, G, DV] in q's dtype and p [B, C, HKV, G, S], the probabilities in stat_dtype.
    """
    B, C, H, G, DK = q.shape
    S = k.shape[1]
    qh = q.permute(0, 2, 1, 3, 4).reshape(B, H, C * G, DK)
    scores = (qh @ k.permute(0, 2, 3, 1)).view(B, H, C, G, S).to(stat_dtype(q.dtype)) * scale
    mask = allowed.permute(0, 2, 1, 3).unsqueeze(3)
    # A finite fill keeps a row with no allowed key finite: its uniform softmax is then zeroed by the mask.
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    p = torch.softmax(scores, dim=-1) * mask
    o = p.to(v.dtype).view(B, H, C * G, S) @ v.transpose(1, 2)
    o = o.view(B, H, C, G, -1).permute(0, 2, 1, 3, 4)
    return o, p.permute(0, 2, 1, 3, 4)


def overlap_weights(num_cmp: int, num_slc: int, cfg: SparsityConfig, dtype, device) -> torch.Tensor:
    """[Tc, Ns]: ov(i, j) / d, the share of compressed token i's block that lies in selection block j (SPEC 3)."""
    start = torch.arange(num_cmp, device=device) * cfg.cmp_stride
    j0 = torch.arange(num_slc, device=device) * cfg.slc_block
    lo = torch.maximum(start[:, None], j0[None, :])
    hi = torch.minimum(start[:, None] + cfg.cmp_block, j0[None, :] + cfg.slc_block)
    return (hi - lo).clamp_min(0).to(dtype) / cfg.cmp_stride


def block_scores(p_cmp: torch.Tensor, seqlen: int, cfg: SparsityConfig) -> torch.Tensor:
    """S [B, T, HKV, Ns] from the compressed branch's probabilities p_cmp [B, T, HKV, G, Tc] (SPEC 3)."""
    P = p_cmp.sum(dim=3)
    return P @ overlap_weights(P.shape[-1], cfg.num_slc(seqlen), cfg, P.dtype, P.device)


def select_blocks(scores: torch.Tensor, cfg: SparsityConfig, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Top-n selection of SPEC 4.

    Args:
        scores: [B, R, HKV, Ns] block importance S of R queries.
        positions: [R] the queries' positions (default 0 .. R-1).
    Returns:
        idx [B, R, HKV, n] int32: the selected blocks of each query in ascending order, -1 after the last.
    """
    B, R, H, Ns = scores.shape
    n = cfg.num_selected
    t = (torch.arange(R, device=scores.device) if positions is None else positions)[:, None]
    j = torch.arange(Ns, device=scores.device)[None, :]
    candidate = j * cfg.slc_block <= t
    jt = t // cfg.slc_block
    forced = candidate & ((j < cfg.num_init) | ((j <= jt) & (j > jt - cfg.num_local)))
    key = scores.masked_fill(forced[:, None], float("inf")).masked_fill(~candidate[:, None], float("-inf"))
    # A stable sort keeps equal scores in block order: ties go to the smaller j.
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :n]
    chosen = torch.where(key.gather(-1, order) == float("-inf"), Ns, order)
    idx = chosen.sort(dim=-1).values
    idx = torch.where(idx == Ns, -1, idx).to(torch.int32)
    if idx.shape[-1] < n:
        idx = torch.cat([idx, idx.new_full((B, R, H, n - idx.shape[-1]), -1)], dim=-1)
    return idx


def selection_mask(idx: torch.Tensor, num_slc: int) -> torch.Tensor:
    """[B, T, HKV, Ns] bool: block j is among idx's selected blocks (-1 entries select nothing)."""
    mask = torch.zeros(*idx.shape[:-1], num_slc + 1, dtype=torch.bool, device=idx.device)
    mask.scatter_(-1, torch.where(idx < 0, num_slc, idx).long(), True)
    return mask[..., :num_slc]


def nsa_forward(q, k, v, k_cmp, v_cmp, gates, k_win, v_win, cfg: SparsityConfig, scale: float, block_indices=None,
                rows=None):
    """NSA on one batch of equal-length sequences (no cu_seqlens); shapes as in nsa.nsa_attention.

    block_indices [B, T, HKV, n] replaces SPEC 4's selection when given (tests compare kernels under one
    selection where scores tie). rows, an int64 tensor [R] of query positions, computes only those queries
    (a check of a long sequence on a sample); block_indices and the outputs then hold R rows.
    Returns (o, idx).
    """
    B, T, HQ, DK = q.shape
    HKV = k.shape[2]
    G = HQ // HKV
    Tc = k_cmp.shape[1]
    Ns = cfg.num_slc(T)
    pos = torch.arange(T, device=q.device)
    qpos = pos if rows is None else rows.to(q.device)
    R = qpos.numel()
    qg = q[:, qpos].view(B, R, HKV, G, DK)
    # SPEC 2: compressed token i is visible to t once its block [i*d, i*d + l) is complete.
    cmp_visible = (torch.arange(Tc, device=q.device) * cfg.cmp_stride + cfg.cmp_block)[None, :] <= qpos[:, None] + 1
    o_cmp, p_cmp = masked_attention(qg, k_cmp, v_cmp, cmp_visible[None, :, None].expand(B, R, HKV, Tc), scale)
    if block_indices is None:
        idx = select_blocks(block_scores(p_cmp.detach(), T, cfg), cfg, qpos)
    else:
        idx = block_indices.to(torch.int32)
    selected = selection_mask(idx, Ns)

    o_slc, o_win = [], []
    for c0 in range(0, R, CHUNK):
        rows_c = qpos[c0 : c0 + CHUNK, None]
        first, last = int(rows_c.min()), int(rows_c.max()) + 1
        keys = pos[None, :last]
        allowed = selected[:, c0 : c0 + CHUNK].repeat_interleave(cfg.slc_block, dim=-1)[..., :last]
        allowed = allowed & (keys <= rows_c)[None, :, None]
        o_slc.append(masked_attention(qg[:, c0 : c0 + CHUNK], k[:, :last], v[:, :last], allowed, scale)[0])
        w0 = max(0, first - cfg.window + 1)
        keys = pos[None, w0:last]
        band = (keys <= rows_c) & (keys > rows_c - cfg.window)
        o_win.append(masked_attention(qg[:, c0 : c0 + CHUNK], k_win[:, w0:last], v_win[:, w0:last],
                                      band[None, :, None].expand(B, -1, HKV, -1), scale)[0])
    branches = torch.stack([o_cmp, torch.cat(o_slc, dim=1), torch.cat(o_win, dim=1)], dim=-1)
    g = gates[:, qpos].view(B, R, HKV, G, 1, 3)
    o = (branches.to(stat_dtype(q.dtype)) * g.to(stat_dtype(q.dtype))).sum(-1)
    return o.reshape(B, R, HQ, -1).to(q.dtype), idx


def nsa_attention(q, k, v, k_cmp, v_cmp, gates, k_win, v_win, cfg: SparsityConfig, scale: float, cu_seqlens=None, block_indices=None):
    """The reference backend of nsa.nsa_attention (inputs already validated). Returns (o, idx)."""
    if cu_seqlens is None:
        return nsa_forward(q, k, v, k_cmp, v_cmp, gates, k_win, v_win, cfg, scale, block_indices)
    outs, idxs = [], []
    c0 = 0
    for s0, s1 in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        c1 = c0 + cfg.num_cmp(s1 - s0)
        if s1 > s0:
            o, idx = nsa_forward(
                q[:, s0:s1], k[:, s0:s1], v[:, s0:s1], k_cmp[:, c0:c1], v_cmp[:, c0:c1], gates[:, s0:s1],
                k_win[:, s0:s1], v_win[:, s0:s1], cfg, scale,
                None if block_indices is None else block_indices[:, s0:s1],
            )
            outs.append(o)
            idxs.append(idx)
        c0 = c1
    return torch.cat(outs, dim=1), torch.cat(idxs, dim=1)

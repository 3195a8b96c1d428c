"""nsa_attention: validation and backend dispatch (SPEC.md, "The functional core")."""

from __future__ import annotations

import math
import os

import torch

from . import reference
from .config import SparsityConfig

BACKENDS = ("reference", "triton")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The dtypes the Triton kernels compute in (the reference backend also takes float64).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_tensor(name, x, rank):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() != rank:
        raise ValueError(f"{name} must have {rank} dimensions, got shape {tuple(x.shape)}")


def _check_shape(name, x, expected, meaning):
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {meaning} = {tuple(expected)}, got {tuple(x.shape)}")


def check_cu_seqlens(cu_seqlens, batch: int, seqlen: int, device) -> None:
    """cu_seqlens: int32 [N+1], 0 first, non-decreasing, ending at T, with B == 1 (FlashAttention's convention)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens must be on {device} like q, got {cu_seqlens.device}")
    if batch != 1:
        raise ValueError(f"with cu_seqlens the batch size must be 1 (sequences packed along T), got B={batch}")
    values = cu_seqlens.tolist()
    if values[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {values[0]}")
    if any(b < a for a, b in zip(values, values[1:])):
        raise ValueError("cu_seqlens must be non-decreasing")
    if values[-1] != seqlen:
        raise ValueError(f"cu_seqlens must end at T={seqlen}, got {values[-1]}")


def check_device(q, /, **tensors) -> None:
    """Each tensor given (None skipped) sits on q's device; ValueError naming the first that does not."""
    for name, x in tensors.items():
        if x is not None and x.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {x.device}")


def check_alike(q, /, **tensors) -> None:
    """Each tensor given (None skipped) has q's dtype (TypeError) and sits on q's device (ValueError)."""
    for name, x in tensors.items():
        if x is not None and x.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}")
    check_device(q, **tensors)


def validate(q, k, v, k_cmp, v_cmp, gates, k_win, v_win, cfg: SparsityConfig, scale, cu_seqlens):
    """Raise TypeError/ValueError naming the argument and the broken rule; return the softmax scale."""
    for name, x in (("q", q), ("k", k), ("v", v), ("k_cmp", k_cmp), ("v_cmp", v_cmp), ("gates", gates),
                    ("k_win", k_win), ("v_win", v_win)):
        _check_tensor(name, x, 4)
        check_alike(q, **{name: x})
    B, T, HQ, DK = q.shape
    if T < 1:
        raise ValueError(f"q must hold at least one token, got T={T}")
    if B * T >= 2**31:
        raise ValueError(f"q holds B*T = {B * T} tokens; at most 2^31 - 1 are supported (cu_seqlens is int32)")
    if k.dim() == 4 and k.shape[:2] != q.shape[:2]:
        raise ValueError(f"k must have q's batch and length {tuple(q.shape[:2])}, got {tuple(k.shape[:2])}")
    HKV = k.shape[2]
    if HKV < 1 or HQ % HKV:
        raise ValueError(f"the query heads HQ={HQ} must be a multiple of the key/value heads HKV={HKV}")
    DV = v.shape[3]
    _check_shape("k", k, (B, T, HKV, DK), "[B, T, HKV, DK]")
    _check_shape("v", v, (B, T, HKV, DV), "[B, T, HKV, DV]")
    _check_shape("k_win", k_win, (B, T, HKV, DK), "[B, T, HKV, DK]")
    _check_shape("v_win", v_win, (B, T, HKV, DV), "[B, T, HKV, DV]")
    _check_shape("gates", gates, (B, T, HQ, 3), "[B, T, HQ, 3]")
    if cu_seqlens is None:
        Tc = cfg.num_cmp(T)
        meaning = f"[B, Tc(T), HKV, D] with Tc(T) = {Tc} for T={T}"
    else:
        check_cu_seqlens(cu_seqlens, B, T, q.device)
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        Tc = sum(cfg.num_cmp(n) for n in lengths)
        meaning = f"[1, sum of Tc(T_i), HKV, D] = {Tc} compressed tokens for the packed sequences"
    _check_shape("k_cmp", k_cmp, (B, Tc, HKV, DK), meaning.replace("D]", "DK]"))
    _check_shape("v_cmp", v_cmp, (B, Tc, HKV, DV), meaning.replace("D]", "DV]"))
    if scale is None:
        return 1.0 / math.sqrt(DK)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    return float(scale)


def resolve_backend(backend, device) -> str:
    """backend, else NSA_BACKEND, else "triton" for CUDA tensors and "reference" elsewhere."""
    if backend is None:
        backend = os.environ.get("NSA_BACKEND") or ("triton" if device.type == "cuda" else "reference")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    return backend


def nsa_attention(q, k, v, k_cmp, v_cmp, gates, *, k_win=None, v_win=None, cmp_block=32, cmp_stride=16,
                  slc_block=64, num_selected=16, num_init=1, num_local=2, window=512, scale=None,
                  cu_seqlens=None, return_indices=False, backend=None, config: SparsityConfig | None = None):
    """Native Sparse Attention (arXiv 2502.11089), exactly as SPEC.md states it.

    Args:
        q: [B, T, HQ, DK] queries.
        k, v: [B, T, HKV, DK], [B, T, HKV, DV]: keys and values of the selected branch.
        k_cmp, v_cmp: [B, Tc, HKV, DK], [B, Tc, HKV, DV]: compressed tokens, Tc = 0 if T < cmp_block else
            (T - cmp_block) // cmp_stride + 1; with cu_seqlens, packed per sequence in the same order.
        gates: [B, T, HQ, 3]: branch gates (compressed, selected, window) after the sigmoid.
        k_win, v_win: keys and values of the window branch, shaped like k and v (default: k and v).
        cmp_block, cmp_stride, slc_block, num_selected, num_init, num_local, window: SPEC's knobs
            (paper defaults); `config`, a SparsityConfig, replaces them all when given.
        scale: softmax scale, default 1 / sqrt(DK).
        cu_seqlens: int32 [N+1] offsets of packed sequences (B must be 1); each runs as if alone.
        return_indices: also return idx [B, T, HKV, num_selected] int32, the selected blocks of each
            query in ascending order, -1 after the last one.
        backend: "reference", "triton", or None (Triton for CUDA tensors, else reference; the
            NSA_BACKEND environment variable overrides None).
    Returns:
        o [B, T, HQ, DV] in q's dtype, or (o, idx) with return_indices=True.
    """
    if config is None:
        config = SparsityConfig(cmp_block, cmp_stride, slc_block, num_selected, num_init, num_local, window)
    elif not isinstance(config, SparsityConfig):
        raise TypeError(f"config must be a SparsityConfig, got {type(config).__name__}")
    if (k_win is None) != (v_win is None):
        raise ValueError("k_win and v_win must be given together (or neither, to reuse k and v)")
    if k_win is None:
        k_win, v_win = k, v
    backend = resolve_backend(backend, q.device if isinstance(q, torch.Tensor) else torch.device("cpu"))
    scale = validate(q, k, v, k_cmp, v_cmp, gates, k_win, v_win, config, scale, cu_seqlens)
    if backend == "reference":
        o, idx = reference.nsa_attention(q, k, v, k_cmp, v_cmp, gates, k_win, v_win, config, scale, cu_seqlens)
    else:
        from .ops import nsa_attention_triton

        o, idx = nsa_attention_triton(q, k, v, k_cmp, v_cmp, gates, k_win, v_win, config, scale, cu_seqlens)
    return (o, idx) if return_indices else o

"""What every kernel family shares: the packed (varlen) layout, query tiling, autotune under the interpreter.

Every launcher works on packed sequences: a batch of B sequences of length T is the packed layout with
cu_seqlens = [0, T, 2T, ..., BT], so that one kernel serves both cases. Tensors are viewed as
[total_tokens, heads, dim]; offsets are int64 inside the kernels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton

from ..config import SparsityConfig


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_configs(configs: list[triton.Config]) -> list[triton.Config]:
    """The interpreter crashes on autotuning over several configs: keep only the first there."""
    return configs[:1] if interpreting() else configs


@dataclass(frozen=True)
class Packed:
    """Where each sequence lies in the packed token axis and in the packed compressed axis.

    cu_seqlens, cu_cmp: int32 [N+1] offsets of the raw and compressed tokens of each sequence.
    max_len: the longest sequence.
    """

    cu_seqlens: torch.Tensor
    cu_cmp: torch.Tensor
    max_len: int

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.numel() - 1


def packed_layout(batch: int, seqlen: int, cu_seqlens, cfg: SparsityConfig, device) -> Packed:
    """The Packed layout of a [B, T] batch, or of the sequences cu_seqlens packs into T (B == 1)."""
    if cu_seqlens is None:
        lengths = [seqlen] * batch
    else:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    offsets = [0]
    cmp_offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
        cmp_offsets.append(cmp_offsets[-1] + cfg.num_cmp(n))
    as_tensor = lambda xs: torch.tensor(xs, dtype=torch.int32, device=device)  # noqa: E731
    return Packed(as_tensor(offsets), as_tensor(cmp_offsets), max(lengths))


def query_tiles(packed: Packed, block: int) -> torch.Tensor:
    """int32 [num_tiles, 2]: (sequence, first position in it) of every tile of `block` queries."""
    starts = packed.cu_seqlens.tolist()
    rows = [(s, p) for s in range(packed.num_seqs) for p in range(0, starts[s + 1] - starts[s], block)]
    return torch.tensor(rows, dtype=torch.int32, device=packed.cu_seqlens.device).view(-1, 2)

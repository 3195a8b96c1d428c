"""The knobs of SPEC.md (block sizes, counts, window), validated once."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SparsityConfig:
    """How NSA sparsifies attention; the defaults are the paper's.

    Args:
        cmp_block: l, the number of keys each compressed token summarizes.
        cmp_stride: d, the distance between the starts of consecutive compression blocks.
        slc_block: l', the number of keys in a selection block.
        num_selected: n, the number of selection blocks each query attends (the forced ones included).
        num_init: the leading blocks every query selects (attention sinks).
        num_local: the blocks ending at the query that every query selects.
        window: w, the sliding window of the window branch (the query itself included).
    """

    cmp_block: int = 32
    cmp_stride: int = 16
    slc_block: int = 64
    num_selected: int = 16
    num_init: int = 1
    num_local: int = 2
    window: int = 512

    def __post_init__(self) -> None:
        for name in ("cmp_block", "cmp_stride", "slc_block", "num_selected", "window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("num_init", "num_local"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        l, d, ls = self.cmp_block, self.cmp_stride, self.slc_block
        if l % d:
            raise ValueError(f"cmp_stride ({d}) must divide cmp_block ({l})")
        if ls % d:
            raise ValueError(f"cmp_stride ({d}) must divide slc_block ({ls})")
        if l > ls:
            raise ValueError(f"cmp_block ({l}) must be at most slc_block ({ls})")
        if self.num_selected < self.num_init + self.num_local:
            raise ValueError(
                f"num_selected ({self.num_selected}) must be at least num_init + num_local "
                f"({self.num_init} + {self.num_local})"
            )

    def num_cmp(self, seqlen: int) -> int:
        """Tc(T): how many compressed tokens a sequence of `seqlen` tokens has (SPEC 1)."""
        if seqlen < self.cmp_block:
            return 0
        return (seqlen - self.cmp_block) // self.cmp_stride + 1

    def num_slc(self, seqlen: int) -> int:
        """How many selection blocks cover a sequence of `seqlen` tokens (the last may be partial)."""
        return -(-seqlen // self.slc_block)

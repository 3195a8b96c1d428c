"""Triton kernels of NSA, one file per kernel family, composed in attention.py."""

from .attention import nsa_attention_triton

__all__ = ["nsa_attention_triton"]

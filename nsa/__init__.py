"""Native Sparse Attention (DeepSeek, arXiv 2502.11089) for PyTorch."""

from .config import SparsityConfig
from .functional import nsa_attention

__all__ = ["SparsityConfig", "nsa_attention"]
__version__ = "0.1.0"

"""Native Sparse Attention (DeepSeek, arXiv 2502.11089) for PyTorch."""

from .cache import NSACache
from .config import SparsityConfig
from .functional import nsa_attention
from .modules import NativeSparseAttention

__all__ = ["NSACache", "NativeSparseAttention", "SparsityConfig", "nsa_attention"]
__version__ = "0.1.0"

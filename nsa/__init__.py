"""Native Sparse Attention (DeepSeek, arXiv 2502.11089) for PyTorch."""

from .cache import NSACache
from .config import SparsityConfig
from .functional import nsa_attention
from .modules import DenseAttention, NativeSparseAttention

__all__ = ["DenseAttention", "NSACache", "NativeSparseAttention", "SparsityConfig", "nsa_attention"]
__version__ = "0.1.0"

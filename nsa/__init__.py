"""Native Sparse Attention (DeepSeek, arXiv 2502.11089) for PyTorch."""

from .cache import NSACache
from .config import SparsityConfig
from .functional import nsa_attention
from .modules import DenseAttention, NativeSparseAttention

__all__ = ["DenseAttention", "NSACache", "NativeSparseAttention", "SparsityConfig", "nsa_attention"]
__version__ = "0.1.0"

MODEL_NAMES = ("NSAConfig", "NSAModel", "NSAForCausalLM", "NSAPreTrainedModel")

# The causal LM needs transformers (the `nsa[hf]` extra); with it installed, importing nsa registers the model
# with the Auto classes, and without it the rest of the package still works.
try:
    import transformers  # noqa: F401
except ImportError:

    def __getattr__(name):
        if name in MODEL_NAMES:
            raise ImportError(f"nsa.{name} needs transformers: pip install 'nsa[hf]'")
        raise AttributeError(f"module 'nsa' has no attribute {name!r}")

else:
    from .models import NSAConfig, NSAForCausalLM, NSAModel, NSAPreTrainedModel

    __all__ += list(MODEL_NAMES)

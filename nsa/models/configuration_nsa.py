"""NSAConfig: a Llama-style decoder whose attention is NativeSparseAttention (or dense, for comparison)."""

from __future__ import annotations

from dataclasses import asdict, fields

from transformers.configuration_utils import PreTrainedConfig

from ..config import SparsityConfig

ATTN_IMPLS = ("nsa", "dense")


class NSAConfig(PreTrainedConfig):
    """Configuration of NSAModel / NSAForCausalLM.

    The defaults are the ~100M-parameter preset (also `NSAConfig.nsa_100m()`); `NSAConfig.nsa_1b()` gives the
    ~1B one. SparsityConfig's fields (cmp_block, cmp_stride, slc_block, num_selected, num_init, num_local, window;
    the paper's values by default) are stored flat so that the config serializes to JSON; `config.sparsity` gives
    them back as one SparsityConfig, and `NSAConfig(sparsity=SparsityConfig(...))` sets them all.

    Args:
        vocab_size, hidden_size, intermediate_size, num_hidden_layers: the decoder's sizes (SwiGLU MLP).
        num_attention_heads: HQ. num_key_value_heads: HKV, any divisor of HQ.
        head_dim: DK. v_head_dim: DV (default DK).
        attn_impl: "nsa" (NativeSparseAttention) or "dense" (causal SDPA on the same q/k/v projections).
        share_win_kv: the window branch reuses the selected branch's keys and values.
        rope_theta: the RoPE base. rms_norm_eps: RMSNorm's epsilon. initializer_range: std of the weights at init.
        tie_word_embeddings: the output head shares the input embedding.

    Example:
        >>> import nsa, transformers
        >>> config = nsa.NSAConfig.nsa_100m(num_hidden_layers=2)
        >>> model = transformers.AutoModelForCausalLM.from_config(config)
    """

    model_type = "nsa"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_key_value_heads: int = 2
    head_dim: int = 64
    v_head_dim: int | None = None
    max_position_embeddings: int = 8192
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0
    attn_impl: str = "nsa"
    share_win_kv: bool = False
    # SparsityConfig's fields, flat; their defaults are SparsityConfig's (the paper's).
    cmp_block: int = SparsityConfig.cmp_block
    cmp_stride: int = SparsityConfig.cmp_stride
    slc_block: int = SparsityConfig.slc_block
    num_selected: int = SparsityConfig.num_selected
    num_init: int = SparsityConfig.num_init
    num_local: int = SparsityConfig.num_local
    window: int = SparsityConfig.window

    def __post_init__(self, **kwargs):
        sparsity = kwargs.pop("sparsity", None)
        if sparsity is not None:
            if not isinstance(sparsity, SparsityConfig):
                raise TypeError(f"sparsity must be a SparsityConfig, got {type(sparsity).__name__}")
            for name, value in asdict(sparsity).items():
                setattr(self, name, value)
        if self.v_head_dim is None:
            self.v_head_dim = self.head_dim
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        self.sparsity  # validates the knobs now rather than at the first forward
        super().__post_init__(**kwargs)

    @property
    def sparsity(self) -> SparsityConfig:
        return SparsityConfig(**{f.name: getattr(self, f.name) for f in fields(SparsityConfig)})

    @classmethod
    def nsa_100m(cls, **kwargs) -> "NSAConfig":
        """~107M parameters (tied embeddings): 12 layers of width 768, 12 query heads over 2 KV heads of 64."""
        return cls(**kwargs)

    @classmethod
    def nsa_1b(cls, **kwargs) -> "NSAConfig":
        """~1.05B parameters (tied embeddings): 20 layers of width 2048, and the paper's head layout at a smaller
        scale: 16 query heads sharing one KV head (G = 16), DK = 192, DV = 128."""
        preset = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=20, num_attention_heads=16,
                      num_key_value_heads=1, head_dim=192, v_head_dim=128)
        return cls(**{**preset, **kwargs})

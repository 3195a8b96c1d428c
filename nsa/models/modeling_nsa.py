"""NSAModel and NSAForCausalLM: a Llama-style decoder (RMSNorm, SwiGLU) on NativeSparseAttention.

Decoding keeps an NSACache (SPEC.md, Decoding) rather than transformers' DynamicCache: the model creates it on the
first forward with use_cache and returns it, and generate() hands it back at every step. The cache argument is
named `cache` (transformers >= 5.18) or `past_key_values` (earlier 5.x); both are accepted.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel

from ..cache import NSACache
from ..modules import GATE_BIAS, Compressor, DenseAttention, Gate, NativeSparseAttention, default_position_ids
from .configuration_nsa import NSAConfig

# The output field that carries the cache, under the name this transformers version's generate() reads.
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


class NSARMSNorm(nn.Module):
    """RMSNorm over the last dimension, x * rsqrt(mean(x^2) + eps) * weight, as torch's rms_norm computes it (on a
    GPU one fused kernel, which accumulates in float32: a decode step replays each operation as a kernel)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The weight in x's dtype: the fused kernel wants them alike (under autocast both are float32).
        return F.rms_norm(x, self.weight.shape, self.weight.to(x.dtype), self.eps)


class NSAMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: NSAConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class NSADecoderLayer(GradientCheckpointingLayer):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: NSAConfig, layer_idx: int):
        super().__init__()
        heads = dict(hidden_size=config.hidden_size, num_heads=config.num_attention_heads,
                     num_kv_heads=config.num_key_value_heads, head_dim=config.head_dim, v_head_dim=config.v_head_dim,
                     rope_theta=config.rope_theta, layer_idx=layer_idx)
        if config.attn_impl == "nsa":
            self.self_attn = NativeSparseAttention(**heads, sparsity=config.sparsity, share_win_kv=config.share_win_kv)
        else:
            self.self_attn = DenseAttention(**heads)
        self.mlp = NSAMLP(config)
        self.input_layernorm = NSARMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = NSARMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, position_ids=None, cache=None, cu_seqlens=None) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), position_ids=position_ids,
                                                       cache=cache, cu_seqlens=cu_seqlens)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class NSAPreTrainedModel(PreTrainedModel):
    config_class = NSAConfig
    config: NSAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["NSADecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not build a DynamicCache: the model builds its own NSACache on the first forward.
        return False

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, Compressor):
            init.normal_(module.pos, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, Gate):
            init.constant_(module.bias, GATE_BIAS)


class NSAModel(NSAPreTrainedModel):
    """The decoder stack: embeddings, NSADecoderLayer x num_hidden_layers, final RMSNorm."""

    def __init__(self, config: NSAConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(NSADecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = NSARMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: NSACache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                cu_seqlens: torch.Tensor | None = None, past_key_values: NSACache | None = None,
                **kwargs) -> BaseModelOutputWithPast:
        """
        Args:
            input_ids: [B, T] token ids, or inputs_embeds [B, T, hidden_size].
            attention_mask: [B, T]; accepted only without padding (all ones): NSA's blocks assume contiguous
                tokens, so pack sequences of different lengths with cu_seqlens instead.
            position_ids: [B, T] (default: continue from the cache, restart at every cu_seqlens sequence).
            cache (or past_key_values): an NSACache to extend; one is created when use_cache is on.
            cu_seqlens: int32 [N+1] offsets of sequences packed along T (B == 1, no cache).
        Returns:
            BaseModelOutputWithPast with last_hidden_state [B, T, hidden_size] and the cache.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("exactly one of input_ids and inputs_embeds must be given")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, NSACache):
            raise TypeError(f"cache must be an NSACache, got {type(cache).__name__}")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("attention_mask must be all ones: NSA supports no padding; pack sequences with "
                             "cu_seqlens instead")
        if use_cache is None:
            # A training step has no use for a cache: config.use_cache only applies in eval mode.
            use_cache = self.config.use_cache and not self.training
        checkpointing = self.training and any(layer.gradient_checkpointing for layer in self.layers)
        if checkpointing or cu_seqlens is not None:
            # A recomputed layer would append to the cache twice; packed sequences are not decoded.
            use_cache, cache = False, None
        if use_cache and cache is None:
            cache = NSACache()
        inputs = input_ids if inputs_embeds is None else inputs_embeds
        B, T = inputs.shape[:2]
        if position_ids is None:
            past = 0 if cache is None else cache.get_seq_length()
            position_ids = default_position_ids(B, T, past, cu_seqlens, inputs.device)
        if (cache is not None and cache.cuda_graph and T == 1 and inputs_embeds is None and input_ids.is_cuda
                and cache.get_seq_length() > 0 and not torch.is_grad_enabled()):
            hidden_states = self._graph_step(input_ids, position_ids, cache)
        else:
            hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
            hidden_states = self._decoder(hidden_states, position_ids, cache, cu_seqlens)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{CACHE_FIELD: cache if use_cache else None})

    def _decoder(self, hidden_states, position_ids, cache, cu_seqlens=None) -> torch.Tensor:
        """The layers and the final norm (with a cache, as one step of it: the layers share its index arithmetic)."""
        with cache.step() if cache is not None else contextlib.nullcontext():
            for layer in self.layers:
                hidden_states = layer(hidden_states, position_ids=position_ids, cache=cache, cu_seqlens=cu_seqlens)
        return self.norm(hidden_states)

    def _graph_step(self, input_ids, position_ids, cache: NSACache) -> torch.Tensor:
        """A one-token decode step on a cache with cuda_graph: the first of its kind runs eagerly (it compiles and
        tunes the kernels) and captures the step for the next ones, which replay it. Two kinds for NSA layers: the
        steps that run phi (a block completes) and the others, which skip it."""
        nsa_layers = self.config.attn_impl == "nsa"
        kind = (tuple(input_ids.shape),
                nsa_layers and cache.compresses(cache.get_seq_length(), 1, self.config.sparsity))
        graph = cache.graphs.get(kind)
        if graph is None:
            lengths = list(cache.lengths)
            hidden_states = self._decoder(self.embed_tokens(input_ids), position_ids, cache)
            cache.graphs[kind] = DecodeGraph(self, cache, input_ids, position_ids, lengths)
            return hidden_states
        return graph.replay(input_ids, position_ids, cache)


class DecodeGraph:
    """NSAModel's one-token decode step on one NSACache (cuda_graph=True), captured in a CUDA graph.

    Eagerly, a step of a 20-layer model (the 1B preset) launches thousands of small kernels from Python
    (projections, the cache's rings and phi, the attention kernels, norms, MLPs), and the host, not the GPU, sets
    the pace; a replay launches them all at once. The graph is bound to the batch size and to the cache's tensors,
    which such a cache never moves (it does not grow; reorder_cache copies in place); its inputs go through static
    input_ids and position_ids buffers ([B, 1] int64). Its layers share the step's index arithmetic
    (NSACache.step()), so a replay assumes that every layer holds the same lengths, as the model's own steps keep
    them.
    """

    def __init__(self, model: NSAModel, cache: NSACache, input_ids: torch.Tensor, position_ids: torch.Tensor,
                 lengths: list[int]):
        """lengths: the cache's host lengths before a step of the kind to capture. The capture runs the step's Python
        at them, so that it takes that step's branches (phi or not), whatever the cache holds now; its kernels read
        the device lengths when replayed."""
        self.input_ids, self.position_ids = input_ids.clone(), position_ids.clone()
        now = list(cache.lengths)
        cache.lengths[:] = lengths
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.hidden_states = model._decoder(model.embed_tokens(self.input_ids), self.position_ids, cache)
        # Capturing ran the step's Python, which counts the new token on the host, but none of its kernels.
        cache.lengths[:] = now

    def replay(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: NSACache) -> torch.Tensor:
        """[B, 1, hidden_size]: the step for these inputs, which appends their token to every layer's cache."""
        cache.check_room(max(cache.lengths) + 1)
        self.input_ids.copy_(input_ids)
        self.position_ids.copy_(position_ids)
        self.graph.replay()
        cache.lengths[:] = [n + 1 for n in cache.lengths]
        return self.hidden_states.clone()


class NSAForCausalLM(NSAPreTrainedModel, GenerationMixin):
    """NSAModel with a language-model head; loss with labels (shifted inside, as in transformers)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: NSAConfig):
        super().__init__(config)
        self.model = NSAModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: NSACache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, cu_seqlens: torch.Tensor | None = None,
                past_key_values: NSACache | None = None, logits_to_keep: int | torch.Tensor = 0,
                **kwargs) -> CausalLMOutputWithPast:
        """As NSAModel.forward, plus labels [B, T] (-100 is ignored) and logits_to_keep (0: all positions).

        Returns CausalLMOutputWithPast with logits [B, T, vocab_size], loss when labels are given, and the cache.
        """
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, cu_seqlens=cu_seqlens,
                         past_key_values=past_key_values)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(out.last_hidden_state[:, keep])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: getattr(out, CACHE_FIELD)})

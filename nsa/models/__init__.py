"""The NSA causal language model on transformers, registered with its Auto classes on import."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_nsa import NSAConfig
from .modeling_nsa import NSAForCausalLM, NSAModel, NSAPreTrainedModel

AutoConfig.register(NSAConfig.model_type, NSAConfig, exist_ok=True)
AutoModel.register(NSAConfig, NSAModel, exist_ok=True)
AutoModelForCausalLM.register(NSAConfig, NSAForCausalLM, exist_ok=True)

__all__ = ["NSAConfig", "NSAForCausalLM", "NSAModel", "NSAPreTrainedModel"]

"""Single-device Qwen2 model with LM and reward heads, and packed-row attention."""
from megapmp.model.attention import ATTENTION_BACKENDS, AttentionInputs, attention, attention_inputs, build_mask
from megapmp.model.qwen2 import Qwen2RewardModel

__all__ = ["ATTENTION_BACKENDS", "AttentionInputs", "Qwen2RewardModel", "attention", "attention_inputs", "build_mask"]

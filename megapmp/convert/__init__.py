"""Checkpoint conversion between megapmp and Hugging Face Qwen2."""
from megapmp.convert.hf import (
    ImportedWeights,
    from_hf_config,
    from_hf_state_dict,
    load_hf_directory,
    load_hf_state_dict,
    save_hf_directory,
    to_hf_config,
    to_hf_state_dict,
)

__all__ = [
    "ImportedWeights",
    "from_hf_config",
    "from_hf_state_dict",
    "load_hf_directory",
    "load_hf_state_dict",
    "save_hf_directory",
    "to_hf_config",
    "to_hf_state_dict",
]

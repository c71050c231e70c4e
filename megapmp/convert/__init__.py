"""Model sources and conversion: any model path -> config, weights, tokenizer and scoring recipe
(`source`), HF Qwen2 <-> megapmp key maps (`hf`), the tokenizer as an HF fast tokenizer (`hf_tokenizer`),
and whole-directory HF export, import and verification (`export`)."""
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
from megapmp.convert.source import (
    ConvertError,
    ModelSource,
    ScoringRecipe,
    SourceNotFoundError,
    find_model_source,
    init_model_from,
    load_model_source,
    scoring_recipe,
)

__all__ = [
    "ConvertError",
    "ImportedWeights",
    "ModelSource",
    "ScoringRecipe",
    "SourceNotFoundError",
    "find_model_source",
    "from_hf_config",
    "from_hf_state_dict",
    "init_model_from",
    "load_hf_directory",
    "load_hf_state_dict",
    "load_model_source",
    "save_hf_directory",
    "scoring_recipe",
    "to_hf_config",
    "to_hf_state_dict",
]

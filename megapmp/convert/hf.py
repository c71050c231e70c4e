"""Hugging Face Qwen2 <-> megapmp: explicit key maps, config translation, checkpoint directories.

Exports are ``Qwen2ForSequenceClassification`` checkpoints whose pooled score equals our reward.
HF pools the *last token that is not pad_token_id* of each row, so the pad id must differ from
the token the reward is read at: the EOS closing each response (``to_hf_config`` refuses
``pad_token_id == eos_token_id``), or under eos_policy "none" the response's last token (preprocessing
refuses a response ending in the pad).

Weights are read from safetensors, or from ``pytorch_model.bin`` only through
``torch.load(weights_only=True)``, whose restricted unpickler builds tensors and containers but
refuses arbitrary objects: an untrusted checkpoint can never run code here.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors

from megapmp.config import ModelConfig

# Per-layer parameters; the names are the same on both sides, HF only adds the "model." prefix.
LAYER_PARAMS = (
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.q_proj.bias",
    "self_attn.k_proj.weight",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.weight",
    "self_attn.v_proj.bias",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "tokenizer.model",
)
# Beside a to-hf export of an untied model: its LM head, which Qwen2ForSequenceClassification would
# report as an unexpected key in model.safetensors.
LM_HEAD_FILE = "lm_head.safetensors"
# In order of preference; the .bin files are read with torch.load(weights_only=True) only.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class ImportedWeights(NamedTuple):
    state_dict: dict[str, torch.Tensor]
    """megapmp keys, loadable with ``Qwen2RewardModel.load_state_dict(strict=True)``."""
    has_score: bool
    """False when the HF checkpoint had no ``score.weight`` (e.g. a causal LM): it was zero-filled."""
    has_lm_head: bool
    """False when an untied checkpoint had no ``lm_head.weight``: it was zero-filled."""


def trunk_key_map(config: ModelConfig) -> dict[str, str]:
    """megapmp key -> HF key for the embedding, the decoder layers and the final norm."""
    keys = {"embed_tokens.weight": "model.embed_tokens.weight"}
    for i in range(config.num_hidden_layers):
        for param in LAYER_PARAMS:
            keys[f"layers.{i}.{param}"] = f"model.layers.{i}.{param}"
    keys["norm.weight"] = "model.norm.weight"
    return keys


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """megapmp key -> parameter shape, for every parameter of a full model."""
    hidden, inter = config.hidden_size, config.intermediate_size
    q_width = config.num_attention_heads * config.head_dim
    kv_width = config.num_key_value_heads * config.head_dim
    layer = {
        "input_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (q_width, hidden),
        "self_attn.q_proj.bias": (q_width,),
        "self_attn.k_proj.weight": (kv_width, hidden),
        "self_attn.k_proj.bias": (kv_width,),
        "self_attn.v_proj.weight": (kv_width, hidden),
        "self_attn.v_proj.bias": (kv_width,),
        "self_attn.o_proj.weight": (hidden, q_width),
        "post_attention_layernorm.weight": (hidden,),
        "mlp.gate_proj.weight": (inter, hidden),
        "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
    }
    shapes = {"embed_tokens.weight": (config.vocab_size, hidden)}
    for i in range(config.num_hidden_layers):
        shapes.update({f"layers.{i}.{param}": layer[param] for param in LAYER_PARAMS})
    shapes["norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (config.vocab_size, hidden)
    shapes["score.weight"] = (1, hidden)
    return shapes


def _listed(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")


def _check_shapes(state_dict: dict[str, torch.Tensor], config: ModelConfig) -> None:
    shapes = expected_shapes(config)
    wrong = [
        f"{key} {tuple(t.shape)} != {shapes[key]}"
        for key, t in state_dict.items()
        if key in shapes and tuple(t.shape) != shapes[key]
    ]
    if wrong:
        raise ValueError("state dict does not match the model config: " + "; ".join(wrong))


def to_hf_state_dict(
    state_dict: dict[str, torch.Tensor], config: ModelConfig, *, include_lm_head: bool = True
) -> dict[str, torch.Tensor]:
    """megapmp state dict -> ``Qwen2ForSequenceClassification`` keys (``model.*``, ``score.weight``),
    plus ``lm_head.weight`` for causal-LM use when untied and ``include_lm_head``.

    Tensors are passed through, not copied. Missing or unknown keys raise ``ValueError``.
    """
    keys = trunk_key_map(config)
    required = set(keys) | {"score.weight"}
    if not config.tie_word_embeddings and include_lm_head:
        required.add("lm_head.weight")
    known = required | {"lm_head.weight"}
    missing, unknown = required - state_dict.keys(), state_dict.keys() - known
    if missing or unknown:
        raise ValueError(
            f"cannot export to HF: missing keys [{_listed(missing)}], unknown keys [{_listed(unknown)}]"
        )
    _check_shapes(state_dict, config)
    hf = {hf_key: state_dict[key] for key, hf_key in keys.items()}
    hf["score.weight"] = state_dict["score.weight"]
    if "lm_head.weight" in required:
        hf["lm_head.weight"] = state_dict["lm_head.weight"]
    return hf


def from_hf_state_dict(hf_state_dict: dict[str, torch.Tensor], config: ModelConfig) -> ImportedWeights:
    """``Qwen2ForCausalLM`` or ``Qwen2ForSequenceClassification`` state dict -> megapmp keys.

    Tied models need no ``lm_head.weight`` (the embedding is used). A missing reward head or an
    untied model's missing LM head is zero-filled and reported in the returned flags.
    """
    keys = trunk_key_map(config)
    # Old HF checkpoints saved the RoPE table; it is derived from the config, never loaded.
    derived = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(config.num_hidden_layers)}
    known = set(keys.values()) | {"lm_head.weight", "score.weight"} | derived
    missing = set(keys.values()) - hf_state_dict.keys()
    unknown = hf_state_dict.keys() - known
    if missing or unknown:
        raise ValueError(
            f"not a Qwen2 checkpoint for this config: missing keys [{_listed(missing)}], "
            f"unknown keys [{_listed(unknown)}]"
        )
    state_dict = {key: hf_state_dict[hf_key] for key, hf_key in keys.items()}
    embed = state_dict["embed_tokens.weight"]

    has_lm_head = config.tie_word_embeddings or "lm_head.weight" in hf_state_dict
    if config.tie_word_embeddings:
        state_dict["lm_head.weight"] = embed
    elif has_lm_head:
        state_dict["lm_head.weight"] = hf_state_dict["lm_head.weight"]
    else:
        state_dict["lm_head.weight"] = torch.zeros_like(embed)

    has_score = "score.weight" in hf_state_dict
    if has_score:
        state_dict["score.weight"] = hf_state_dict["score.weight"]
    else:
        state_dict["score.weight"] = embed.new_zeros(1, config.hidden_size)
    _check_shapes(state_dict, config)
    return ImportedWeights(state_dict, has_score, has_lm_head)


def to_hf_config(
    model_config: ModelConfig,
    *,
    pad_token_id: int,
    eos_token_id: int,
    bos_token_id: int | None = None,
    torch_dtype: str = "float32",
) -> dict:
    """A ``Qwen2Config`` dict for ``Qwen2ForSequenceClassification`` with one label.

    Raises ``ValueError`` if ``pad_token_id`` equals ``eos_token_id`` (HF would pool the token
    before the EOS instead of the EOS) or lies outside the vocabulary.
    """
    model_config.validate()
    eos_ids = eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
    problems = []
    if pad_token_id is None or not 0 <= pad_token_id < model_config.vocab_size:
        problems.append(f"pad_token_id={pad_token_id} is not a token id of vocab_size={model_config.vocab_size}")
    if pad_token_id in eos_ids:
        problems.append(
            f"pad_token_id={pad_token_id} equals eos_token_id={eos_token_id}: HF pools the last non-pad "
            "token, so the score would be read before the EOS the reward is trained at"
        )
    if problems:
        raise ValueError("cannot write an HF reward-model config: " + "; ".join(problems))
    c = model_config
    return {
        "architectures": ["Qwen2ForSequenceClassification"],
        "model_type": "qwen2",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "hidden_act": "silu",
        "max_position_embeddings": c.max_position_embeddings,
        "rope_theta": float(c.rope_theta),
        # transformers >= 5 reads RoPE from here; older versions read rope_theta above.
        "rope_parameters": {"rope_type": "default", "rope_theta": float(c.rope_theta)},
        "rms_norm_eps": c.rms_norm_eps,
        "tie_word_embeddings": c.tie_word_embeddings,
        "initializer_range": c.initializer_range,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": c.num_hidden_layers,
        "use_cache": True,
        "num_labels": 1,
        "id2label": {"0": "LABEL_0"},
        "label2id": {"LABEL_0": 0},
        "pad_token_id": pad_token_id,
        "eos_token_id": eos_token_id,
        "bos_token_id": bos_token_id,
        "torch_dtype": torch_dtype,
    }


def from_hf_config(hf_config: dict) -> ModelConfig:
    """A ``Qwen2Config`` dict (config.json) -> ``ModelConfig``; unsupported variants raise ``ValueError``."""
    problems = []
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    problems += [f"missing {key}" for key in required if key not in hf_config]
    if hf_config.get("model_type", "qwen2") != "qwen2":
        problems.append(f"model_type={hf_config['model_type']!r} is not 'qwen2'")
    if hf_config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf_config['hidden_act']!r} is not 'silu'")
    if hf_config.get("use_sliding_window"):
        problems.append("use_sliding_window=true is not supported")
    rope_theta, rope_problem = _rope_theta(hf_config)
    if rope_problem:
        problems.append(rope_problem)
    if problems:
        raise ValueError("unsupported HF config: " + "; ".join(problems))

    heads = hf_config["num_attention_heads"]
    config = ModelConfig(
        vocab_size=hf_config["vocab_size"],
        hidden_size=hf_config["hidden_size"],
        intermediate_size=hf_config["intermediate_size"],
        num_hidden_layers=hf_config["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=hf_config.get("num_key_value_heads") or heads,
        max_position_embeddings=hf_config.get("max_position_embeddings", 32768),
        rope_theta=rope_theta,
        rms_norm_eps=hf_config.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=hf_config.get("tie_word_embeddings", False),
        initializer_range=hf_config.get("initializer_range", 0.02),
    )
    config.validate()
    head_dim = hf_config.get("head_dim")
    if head_dim is not None and head_dim != config.head_dim:
        raise ValueError(f"unsupported HF config: head_dim={head_dim} != hidden_size / num_attention_heads")
    return config


def _rope_theta(hf_config: dict) -> tuple[float, str | None]:
    """(theta, problem): plain RoPE only; theta from ``rope_parameters`` (v5) or ``rope_theta`` (v4)."""
    params = hf_config.get("rope_parameters") or {}
    scaling = hf_config.get("rope_scaling") or {}
    for source, rope in (("rope_parameters", params), ("rope_scaling", scaling)):
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            return 0.0, f"{source} rope_type={rope_type!r} is not supported (only plain RoPE)"
    theta = params.get("rope_theta", hf_config.get("rope_theta", 10000.0))
    return float(theta), None


def save_hf_directory(
    state_dict: dict[str, torch.Tensor],
    model_config: ModelConfig,
    out_dir: str | os.PathLike,
    *,
    pad_token_id: int,
    eos_token_id: int,
    tokenizer_dir: str | os.PathLike | None = None,
    extra: dict | None = None,
    include_lm_head: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write an HF ``Qwen2ForSequenceClassification`` directory (config.json, model.safetensors,
    tokenizer files copied from ``tokenizer_dir``) atomically: built in a temp dir, then renamed.

    ``extra`` adds keys to config.json (it may not override ours). ``include_lm_head`` also writes
    an untied model's ``lm_head.weight``, which HF's sequence classifier reports as unexpected.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists (pass overwrite=True to replace it)")
    hf_state_dict = to_hf_state_dict(state_dict, model_config, include_lm_head=include_lm_head)
    dtype = str(hf_state_dict["model.embed_tokens.weight"].dtype).removeprefix("torch.")
    config = to_hf_config(model_config, pad_token_id=pad_token_id, eos_token_id=eos_token_id, torch_dtype=dtype)
    clashes = set(extra or {}) & set(config)
    if clashes:
        raise ValueError(f"extra config keys would override exported ones: {_listed(clashes)}")
    config.update(extra or {})
    tokenizer_files = _tokenizer_files(tokenizer_dir) if tokenizer_dir is not None else []

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tensors = {key: t.detach().to("cpu").contiguous() for key, t in hf_state_dict.items()}
        save_safetensors(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for path in tokenizer_files:
            shutil.copy2(path, tmp / path.name)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _tokenizer_files(tokenizer_dir) -> list[Path]:
    files = [Path(tokenizer_dir) / name for name in TOKENIZER_FILES if (Path(tokenizer_dir) / name).is_file()]
    if not files:
        raise FileNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {tokenizer_dir}")
    return files


def _replace_dir(new: Path, target: Path) -> None:
    if not target.exists():
        new.rename(target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    target.rename(old)
    new.rename(target)
    shutil.rmtree(old)


def load_hf_state_dict(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """HF-keyed tensors of a checkpoint directory: model.safetensors, a sharded safetensors index,
    or (through ``torch.load(weights_only=True)``) pytorch_model.bin and its sharded index."""
    directory = Path(directory)
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            state_dict = {}
            for shard in shards:
                state_dict.update(_load_weight_file(directory / shard))
            return state_dict
        return _load_weight_file(path)
    raise FileNotFoundError(f"no weights in {directory} (looked for {', '.join(WEIGHT_FILES)})")


def _load_weight_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_safetensors(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def load_hf_directory(directory: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, HF-keyed state dict) of an HF Qwen2 directory (causal LM or sequence classifier).

    Pass the state dict through ``from_hf_state_dict`` to get megapmp keys and to learn whether
    the reward head was present.
    """
    directory = Path(directory)
    config = from_hf_config(json.loads((directory / "config.json").read_text()))
    state_dict = load_hf_state_dict(directory)
    merge_separate_lm_head(directory, config, state_dict)
    return config, state_dict


def merge_separate_lm_head(directory: str | os.PathLike, config: ModelConfig, hf_state_dict: dict) -> bool:
    """Add ``lm_head.weight`` from LM_HEAD_FILE when an untied model's weights lack it and the file is
    there (megapmp's to-hf export writes it so); True if it was used."""
    path = Path(directory) / LM_HEAD_FILE
    if config.tie_word_embeddings or "lm_head.weight" in hf_state_dict or not path.is_file():
        return False
    hf_state_dict["lm_head.weight"] = load_safetensors(str(path))["lm_head.weight"]
    return True

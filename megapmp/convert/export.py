"""Whole directories: a megapmp checkpoint -> an HF export (`export_to_hf`), an HF directory -> a megapmp
checkpoint (`import_from_hf`), and the check that a checkpoint and its export score alike (`verify_export`).

An export holds:
  config.json             Qwen2Config: architectures [Qwen2ForSequenceClassification], num_labels 1,
                          pad_token_id = the tokenizer's pad (never the EOS the reward is read at)
  model.safetensors       model.* and score.weight (and lm_head.weight with with_lm_head)
  lm_head.safetensors     an untied model's LM head, for Qwen2ForCausalLM use (absent when tied:
                          the LM head is model.embed_tokens.weight; or with with_lm_head)
  tokenizer/              the training tokenizer as an HF fast tokenizer giving the same ids as ours
                          (megapmp.convert.hf_tokenizer); AutoTokenizer loads it as written
  tokenizer.json, tokenizer_config.json
                          the same files at the top level, only where AutoTokenizer.from_pretrained(DIR)
                          gives our ids from there (transformers >= 5 rebuilds the tokenizer of a qwen2
                          directory as Qwen2Tokenizer: exact only for tokenizers built that way)
  megapmp_scoring.json    template, EOS policy, eos/pad ids, the recipe for input ids and where to load
                          the tokenizer from ("tokenizer": {"path": "." or "tokenizer"})

An import holds model.safetensors (megapmp names; no score.weight when the HF model had none, so the
trainer starts a fresh reward head), trainer.json (format megapmp-import: the model config and where it
came from), and the HF directory's tokenizer/ and megapmp_scoring.json when it has them. It exports again
(import -> export is bitwise on the weights): with the tokenizer it brought, or one named by --tokenizer;
an import of a directory that brought none (and no --tokenizer) exports its weights only, as it came, with
a warning saying so.

Everything is written into a temporary directory beside the output and renamed when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from megapmp.convert.hf import LM_HEAD_FILE, TOKENIZER_FILES, save_hf_directory
from megapmp.convert.hf_scorer import TransformersRewardScorer
from megapmp.convert.hf_tokenizer import export_tokenizer
from megapmp.convert.source import (CHECKPOINT, HF, IMPORT_FORMAT, SCORING_FILE, TOKENIZER_SUBDIR, ConvertError,
                                    ModelSource, NoTokenizerError, ScoringRecipe, find_model_source,
                                    load_model_source, scoring_recipe)
from megapmp.io import InputError, iter_jsonl, text_field
from megapmp.model import Qwen2RewardModel
from megapmp.model.attention import AttentionInputs

SCORING_FORMAT, SCORING_VERSION = "megapmp-scoring", 1
DTYPES = ("float32", "bfloat16")

INPUT_RECIPE = (
    "input_ids = tokenize(template.text with its one '{prompt}' replaced by the prompt, plain string "
    "replacement) + tokenize(response) + [eos_token_id] if eos_policy == 'response' else nothing; the "
    "prompt and the response are tokenized separately, with add_special_tokens=False, and the id lists "
    "concatenated"
)
REWARD_RECIPE = (
    "the score at the last token of input_ids (the EOS under eos_policy 'response', else the response's "
    "last token). Batch with right padding using pad_token_id: Qwen2ForSequenceClassification pools the "
    "last token that is not pad_token_id, which is why pad_token_id never equals eos_token_id and, under "
    "eos_policy 'none', a response may not end in the pad token (training data with one is refused)"
)
DEFAULT_VERIFY_PAIRS = (
    {"prompt": "Write a Python function that returns the sum of a list of numbers.",
     "chosen": "def total(xs):\n    return sum(xs)\n",
     "rejected": "def total(xs):\n    for x in xs:\n        return x\n"},
    {"prompt": "Reverse a string s.", "chosen": "def rev(s):\n    return s[::-1]\n",
     "rejected": "def rev(s):\n    return s\n"},
    {"prompt": "Read a JSON file and return the parsed object.",
     "chosen": "import json\n\ndef load(path):\n    with open(path) as f:\n        return json.load(f)\n",
     "rejected": "def load(path):\n    return open(path).read()\n"},
    {"prompt": "Count the words in a text (ünïcode is fine: 中文).",
     "chosen": "def words(text):\n    return len(text.split())\n",
     "rejected": "def words(text):\n    return len(text)\n"},
)


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The megapmp checkpoint at `path` (a step, run or checkpoints directory); an HF directory is refused."""
    kind, directory = find_model_source(path)
    if kind != CHECKPOINT:
        raise ConvertError(f"{path} is not a megapmp checkpoint (it has a config.json: an HF directory? use "
                           "from-hf)")
    return directory


def _check_output(output: Path, overwrite: bool, inputs: list[Path]) -> None:
    if output.exists() and not overwrite:
        raise ConvertError(f"{output} exists; pass --overwrite to replace it")
    resolved = output.resolve()
    for source in inputs:
        source = source.resolve()
        if resolved == source or resolved in source.parents:
            raise ConvertError(f"--output {output} would replace its own input {source}")


def _publish(staging: Path, output: Path) -> None:
    """Rename a complete staging directory to `output`, replacing what was there."""
    if output.exists() or output.is_symlink():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        output.rename(old)
        staging.rename(output)
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    else:
        staging.rename(output)


# ---------------------------------------------------------------------------------------------------
# megapmp -> HF


def scoring_record(recipe: ScoringRecipe, tokenizer_info: dict, source: ModelSource, *, lm_head: dict) -> dict:
    """megapmp_scoring.json: how any HF stack builds inputs whose scores equal ours."""
    tok = recipe.tokenizer
    return {
        "format": SCORING_FORMAT,
        "version": SCORING_VERSION,
        "model_class": "Qwen2ForSequenceClassification",
        "template": {"name": recipe.template.get("name"), "text": recipe.template["text"], "placeholder": "{prompt}"},
        "eos_policy": recipe.eos_policy,
        "eos_token_id": recipe.eos_id,
        "eos_token": tok.eos_token,
        "pad_token_id": recipe.pad_id,
        "pad_token": tok.pad_token,
        "add_special_tokens": False,
        "tokenize_separately": True,
        "input_ids": INPUT_RECIPE,
        "reward": REWARD_RECIPE,
        "max_length": recipe.max_length,
        "overlong": recipe.overlong,
        "tokenizer": {**tokenizer_info, "vocab_size": tok.vocab_size, "added_tokens": list(tok.added_tokens)},
        "model_vocab_size": source.config.vocab_size,
        "lm_head": lm_head,
        "source": {"checkpoint": str(source.path.resolve()), "step": source.step, "data": recipe.origin},
        # A pairwise judge is called through its LM head's label logits (megapmp.data.judge), not the score.
        **({"judge": recipe.judge} if recipe.judge else {}),
    }


def export_to_hf(input_path, output, *, dtype: str = "float32", with_lm_head: bool = False,
                 overwrite: bool = False, shard: str | None = None, tokenizer_spec: str | None = None) -> dict:
    """Write the HF directory of the megapmp checkpoint at `input_path` (a single-process or sharded one of
    any TP/PP/DP layout, gathered to full tensors); returns a summary, with any warnings to show."""
    output = Path(output)
    checkpoint = find_checkpoint(input_path)
    _check_output(output, overwrite, [checkpoint])
    if dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    source = load_model_source(checkpoint)
    if not source.has_reward_head:
        raise ConvertError(f"{checkpoint} has no reward head (score.weight; e.g. imported from a causal LM): "
                           "train it first, it is no reward model yet")
    warnings = []
    if source.trainer_state.get("config", {}).get("loss", {}).get("rm_coef", 1) == 0:
        warnings.append("this checkpoint was trained with loss.rm_coef = 0: its reward head is untrained")
    try:
        recipe = scoring_recipe(source, tokenizer=tokenizer_spec, shard=shard, native=True)
    except NoTokenizerError:
        if source.trainer_state.get("format") != IMPORT_FORMAT:
            raise
        recipe = None  # an import of an HF directory that brought no tokenizer: its weights, as they came
        warnings.append(f"{checkpoint} was imported from an HF directory without a tokenizer: exported the "
                        f"weights and config only (no tokenizer, no {SCORING_FILE}); pass --tokenizer SPEC to "
                        f"include one")
    config = source.config
    if recipe is not None and recipe.tokenizer.vocab_size > config.vocab_size:
        raise ConvertError(f"the tokenizer has {recipe.tokenizer.vocab_size} tokens, the model only "
                           f"{config.vocab_size} embedding rows")
    torch_dtype = getattr(torch, dtype)
    state_dict = {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in source.state_dict.items()}

    if config.tie_word_embeddings:
        lm_head = {"tied": True, "file": "model.safetensors", "key": "model.embed_tokens.weight"}
    elif with_lm_head:
        lm_head = {"tied": False, "file": "model.safetensors", "key": "lm_head.weight"}
    else:
        lm_head = {"tied": False, "file": LM_HEAD_FILE, "key": "lm_head.weight"}

    if recipe is None:
        imported = source.trainer_state.get("imported_from") or {}
        eos_id, pad_id = imported.get("eos_token_id"), imported.get("pad_token_id")
    else:
        eos_id, pad_id = recipe.eos_id, recipe.pad_id
    tokenizer_info = {"family": None, "hf_tokenizer": False, "path": None, "note": None}
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        export = staging / "export"
        try:
            save_hf_directory(state_dict, config, export, pad_token_id=pad_id, eos_token_id=eos_id,
                              include_lm_head=with_lm_head,
                              extra={"megapmp": {"step": source.step, "scoring": SCORING_FILE, "lm_head": lm_head}})
        except ValueError as e:
            raise ConvertError(str(e)) from None
        if lm_head["file"] == LM_HEAD_FILE:
            save_file({"lm_head.weight": state_dict["lm_head.weight"].contiguous()}, str(export / LM_HEAD_FILE),
                      metadata={"format": "pt"})
        if recipe is not None:
            tokenizer_info = export_tokenizer(recipe.tokenizer, export)
            scoring = scoring_record(recipe, tokenizer_info, source, lm_head=lm_head)
            (export / SCORING_FILE).write_text(json.dumps(scoring, indent=2, ensure_ascii=False) + "\n")
        files = sorted(p.name for p in export.iterdir())
        _publish(export, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if tokenizer_info["note"]:
        warnings.append(tokenizer_info["note"])
    return {"output": str(output), "checkpoint": str(checkpoint), "step": source.step, "dtype": dtype,
            "warnings": warnings,
            "tokenizer": tokenizer_info["family"], "hf_tokenizer": tokenizer_info["hf_tokenizer"],
            "tokenizer_path": tokenizer_info["path"],
            "eos_token_id": eos_id, "pad_token_id": pad_id, "files": files}


# ---------------------------------------------------------------------------------------------------
# HF -> megapmp


def import_from_hf(input_path, output, *, overwrite: bool = False) -> dict:
    """Write a megapmp checkpoint directory (model.safetensors + trainer.json) from the HF directory at
    `input_path`, for the trainer's checkpoint.init_from; returns a summary with any notes to show."""
    path, output = Path(input_path), Path(output)
    if path.is_dir() and not (path / "config.json").is_file():
        hint = " (it is a megapmp checkpoint: use to-hf)" if (path / "trainer.json").exists() else ""
        raise ConvertError(f"{path} is not an HF model directory: no config.json{hint}")
    kind, directory = find_model_source(path)
    if kind != HF:
        raise ConvertError(f"{path} is a megapmp checkpoint, not an HF model directory: use to-hf")
    _check_output(output, overwrite, [directory])
    source = load_model_source(directory)
    config, hf_config = source.config, source.hf_config

    state_dict = dict(source.state_dict)
    if not source.has_lm_head:
        # An untied model without an LM head: zero-filled, so that the checkpoint loads strictly.
        state_dict["lm_head.weight"] = torch.zeros_like(state_dict["embed_tokens.weight"])
    notes = []
    if not source.has_reward_head:
        notes.append("no reward head (score.weight) in the HF checkpoint: the trainer initialises a fresh one")
    if not source.has_lm_head:
        notes.append("untied model without lm_head.weight: the LM head was zero-filled")
    trainer_state = {
        "format": IMPORT_FORMAT,
        "step": 0,
        "config": {"model": asdict(config)},
        "has_reward_head": source.has_reward_head,
        "has_lm_head": source.has_lm_head,
        "imported_from": {
            "path": str(directory.resolve()),
            "architectures": hf_config.get("architectures"),
            "pad_token_id": hf_config.get("pad_token_id"),
            "eos_token_id": hf_config.get("eos_token_id"),
            "dtype": hf_config.get("dtype", hf_config.get("torch_dtype")),
            "lm_head_file": LM_HEAD_FILE if source.lm_head_file else None,
        },
        "notes": notes,
    }

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        os.chmod(staging, 0o755)
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(staging / "model.safetensors"),
                  metadata={"format": "pt"})
        (staging / "trainer.json").write_text(json.dumps(trainer_state, indent=1) + "\n")
        # An export's tokenizer/ loads as written; the top level may lack it (see hf_tokenizer.export_tokenizer).
        tokenizer_source = directory / TOKENIZER_SUBDIR if (directory / TOKENIZER_SUBDIR).is_dir() else directory
        tokenizer_files = [tokenizer_source / name for name in TOKENIZER_FILES
                           if (tokenizer_source / name).is_file()]
        if tokenizer_files:
            (staging / TOKENIZER_SUBDIR).mkdir()
            for file in tokenizer_files:
                shutil.copy2(file, staging / TOKENIZER_SUBDIR / file.name)
        if (directory / SCORING_FILE).is_file():
            shutil.copy2(directory / SCORING_FILE, staging / SCORING_FILE)
        _publish(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    overrides = " ".join(f"--model.{k} {str(v).lower() if isinstance(v, bool) else v}"
                         for k, v in asdict(config).items())
    return {"output": str(output), "has_reward_head": source.has_reward_head, "has_lm_head": source.has_lm_head,
            "tied": config.tie_word_embeddings, "files": sorted(p.name for p in output.iterdir()),
            "notes": notes, "train_with": f"--checkpoint.init_from {output} {overrides}"}


# ---------------------------------------------------------------------------------------------------
# Both agree


def load_pairs(path: str | None, limit: int) -> list[dict]:
    """At most `limit` {prompt, chosen, rejected} text pairs from a JSONL file (default: a few built in), read
    by preprocessing's reader and rules (a bad record: ConvertError `FILE:LINE field 'X': reason`)."""
    if path is None:
        return list(DEFAULT_VERIFY_PAIRS)[:limit]
    pairs = []
    try:
        for line_no, record in iter_jsonl(path):
            pairs.append({k: text_field(str(path), line_no, record, k) for k in ("prompt", "chosen", "rejected")})
            if len(pairs) == limit:
                break
    except InputError as e:
        raise ConvertError(str(e)) from None
    except OSError as e:
        raise ConvertError(f"{path}: unreadable ({e.strerror or e})") from None
    if not pairs:
        raise ConvertError(f"{path}: no pairs")
    return pairs


def verify_export(checkpoint_path, hf_dir, *, pairs_file: str | None = None, limit: int = 8, atol: float = 1e-4,
                  shard: str | None = None, tokenizer_spec: str | None = None) -> dict:
    """Compare the input ids and scores of a checkpoint and of its HF export, the latter built by
    transformers and megapmp_scoring.json alone, on the same text pairs; "ok" says whether they agree."""
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise ConvertError(f"{hf_dir} is not an HF model directory: no config.json")
    checkpoint = find_checkpoint(checkpoint_path)
    source = load_model_source(checkpoint)
    recipe = scoring_recipe(source, tokenizer=tokenizer_spec, shard=shard, native=True)
    pairs = load_pairs(pairs_file, limit)

    if not (hf_dir / SCORING_FILE).is_file():
        raise ConvertError(f"{hf_dir} has no {SCORING_FILE}: not a megapmp export")
    hf = TransformersRewardScorer(hf_dir, device="cpu", dtype=torch.float32, progress=False)
    export_dtype = str(json.loads((hf_dir / "config.json").read_text()).get("torch_dtype", "float32"))

    # Ours at the export's precision: weights rounded through its dtype, computed in fp32 like HF here.
    state_dict = source.state_dict
    if export_dtype in DTYPES:
        state_dict = {k: v.to(getattr(torch, export_dtype)).float() if v.is_floating_point() else v
                      for k, v in state_dict.items()}
    model = Qwen2RewardModel(source.config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    model.tie_weights()
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise ConvertError(f"{checkpoint}: weights do not fit the model config (missing {missing}, "
                           f"unexpected {unexpected})")

    ours_rows, hf_rows = [], []
    for pair in pairs:
        prompt, responses = recipe.encode(pair["prompt"], [pair["chosen"], pair["rejected"]])
        ours_rows += [prompt + ids for ids in responses]
        if hf.tokenizer is None:  # no HF form of the tokenizer (SentencePiece): the scores alone are compared
            hf_rows += ours_rows[-2:]
        else:
            hf_rows += [hf.input_ids(pair["prompt"], pair[key]) for key in ("chosen", "rejected")]
    id_mismatches = sum(a != b for a, b in zip(ours_rows, hf_rows))
    ours = _rewards_at_last_token(model, ours_rows, recipe.pad_id)
    theirs = hf.score_ids(hf_rows)
    max_diff = float(np.abs(ours - theirs).max())
    ok = id_mismatches == 0 and max_diff <= atol
    return {"ok": ok, "pairs": len(pairs), "sequences": len(hf_rows), "id_mismatches": id_mismatches,
            "tokenizer_checked": hf.tokenizer is not None, "max_abs_diff": max_diff, "atol": atol,
            "export_dtype": export_dtype, "checkpoint": str(checkpoint)}


@torch.no_grad()
def _rewards_at_last_token(model: Qwen2RewardModel, rows: list[list[int]], pad_id: int) -> np.ndarray:
    """float64 reward at each row's last token: one right-padded causal row per sequence, as HF scores them
    (the evaluator packs pairs behind a shared prompt instead, which gives the same rewards up to rounding)."""
    lengths = [len(row) for row in rows]
    width = max(lengths)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
    positions = torch.arange(width).expand(len(rows), width)
    hidden = model.eval()(input_ids, positions, AttentionInputs.for_padded_causal(lengths, width))
    last = torch.tensor(lengths) - 1
    return model.rewards(hidden)[torch.arange(len(rows)), last].double().numpy()

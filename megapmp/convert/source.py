"""One way to load a model from a path: any model source -> config, weights, tokenizer and scoring recipe.

A model source is one of::

    RUN/                          a training run: its newest complete checkpoint (RUN/checkpoints/step_*)
    RUN/checkpoints/              the same, one level down
    RUN/checkpoints/step_XXXXXXXX/  one checkpoint: model.safetensors + trainer.json (+ manifest.json), or
                                  a parallel run's sharded one (layout.json + model/*.safetensors), or a
                                  checkpoint written by `import_from_hf` (trainer.json says megapmp-import)
    HF/                           an HF Qwen2 directory: config.json + model.safetensors (sharded safetensors
                                  or pytorch_model.bin too), tied or untied, with or without a score head;
                                  an untied export's LM head may sit beside it in lm_head.safetensors

`load_model_source(path)` reads the weights (a checkpoint's are verified against its manifest first,
megapmp.checkpoint) and returns a `ModelSource`. Its tokenizer and scoring recipe are a second step,
`scoring_recipe(source)`, because training from a source needs neither (its tokenizer may have moved).

Where the recipe comes from, first found wins:
1. ``shard=`` a shard prefix made like the training data (checked against trainer.json's record);
2. a checkpoint's trainer.json ``shard_meta`` (the training shard's sidecar): template, EOS policy,
   eos/pad ids, and the tokenizer saved beside the training shards (``PREFIX.tokenizer/``, found through
   ``config.data.train``);
3. a ``megapmp_scoring.json`` beside the weights: an HF export (tokenizer at its recorded path) or a
   checkpoint imported from one (tokenizer in ``tokenizer/``);
4. a foreign HF Qwen2 model (no megapmp_scoring.json): transformers' AutoTokenizer of that directory,
   template ``{prompt}`` and EOS policy ``none`` (HF sequence classifiers are scored on the plain text).
``tokenizer=`` replaces the tokenizer files; for 1-2 it must have the recorded identity.

Every refusal is a `ConvertError`: one line that names the path and says what to do.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from megapmp.checkpoint import CheckpointError, is_sharded, latest_checkpoint, load_model_weights
from megapmp.config import ModelConfig
from megapmp.convert.hf import from_hf_config, from_hf_state_dict, load_hf_state_dict, merge_separate_lm_head
from megapmp.data.shards import ShardMeta, load_shard_tokenizer, recipe_problems
from megapmp.data.tokenizers import load_tokenizer

SCORING_FILE = "megapmp_scoring.json"
TOKENIZER_SUBDIR = "tokenizer"  # an export's tokenizer, and where an import keeps the HF directory's
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
IMPORT_FORMAT = "megapmp-import"  # trainer.json of a checkpoint written by export.import_from_hf
CHECKPOINT, HF = "megapmp-checkpoint", "hf"


class ConvertError(ValueError):
    """A refused model source, input or output; the one-line message names the path and what to do."""


class SourceNotFoundError(ConvertError, FileNotFoundError):
    """The path, or a complete checkpoint under it, does not exist."""


# ---------------------------------------------------------------------------------------------------
# Finding and loading the weights


@dataclass
class ModelSource:
    """A model read from a path: its config and weights, and where they came from."""

    kind: str  # CHECKPOINT or HF
    path: Path  # the step directory or HF directory the weights were read from
    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    """megapmp names. Only tensors the source holds: no lm_head.weight when tied (it is the embedding), no
    score.weight or untied lm_head.weight when the source has none (never the zeros an importer fills in)."""
    step: int | None = None
    trainer_state: dict | None = None  # a checkpoint's trainer.json
    hf_config: dict | None = None  # an HF directory's config.json
    lm_head_file: bool = False  # the untied LM head came from lm_head.safetensors

    @property
    def has_reward_head(self) -> bool:
        return "score.weight" in self.state_dict

    @property
    def has_lm_head(self) -> bool:
        return self.config.tie_word_embeddings or "lm_head.weight" in self.state_dict

    @property
    def sharded(self) -> bool:
        return self.kind == CHECKPOINT and is_sharded(self.path)

    def describe(self) -> dict:
        """What a report records about the model."""
        return {"path": str(self.path), "kind": self.kind, "step": self.step, "model_config": asdict(self.config)}


def find_model_source(path: str | os.PathLike) -> tuple[str, Path]:
    """(kind, directory) of the model at `path`, reading no weights: a step directory as is; a run or
    checkpoints directory -> its newest complete checkpoint; else an HF directory (config.json)."""
    path = Path(path)
    if not path.exists():
        raise SourceNotFoundError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise ConvertError(f"{path} is a file: expected a megapmp checkpoint directory or an HF model directory")
    if (path / "trainer.json").is_file():
        return CHECKPOINT, _complete_checkpoint(path)
    for root in (path / "checkpoints", path):
        latest = latest_checkpoint(root)
        if latest is not None:
            return CHECKPOINT, _complete_checkpoint(latest)
    if (path / "checkpoints").is_dir():  # a run directory (its config.json is the run's, not an HF one)
        raise SourceNotFoundError(f"{path} is not a megapmp checkpoint yet: {path / 'checkpoints'} holds no "
                                  "complete step_XXXXXXXX/ checkpoint")
    if (path / "config.json").is_file():
        return HF, path
    raise SourceNotFoundError(
        f"{path} is not a megapmp checkpoint (a step_XXXXXXXX/ directory holding trainer.json, or a run or "
        "checkpoints directory holding complete ones) nor an HF model directory (config.json + weights)")


def _complete_checkpoint(step: Path) -> Path:
    if is_sharded(step):  # a sharded checkpoint of a parallel run: model/*.safetensors
        if not any((step / "model").glob("*.safetensors")):
            raise ConvertError(f"{step} has layout.json but no model/*.safetensors shards: not a complete checkpoint")
    elif not (step / "model.safetensors").is_file():
        raise ConvertError(f"{step} has trainer.json but no model.safetensors: not a complete checkpoint")
    return step


def load_model_source(path: str | os.PathLike) -> ModelSource:
    """The config and weights of the model at `path` (see the module docstring for what a path may be)."""
    kind, directory = find_model_source(path)
    return _load_checkpoint(directory) if kind == CHECKPOINT else _load_hf(directory)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConvertError(f"{path}: unreadable ({e})") from None


def _load_checkpoint(checkpoint: Path) -> ModelSource:
    state = _read_json(checkpoint / "trainer.json")
    try:
        config = ModelConfig(**state["config"]["model"])
        config.validate()
    except (KeyError, TypeError, ValueError) as e:
        raise ConvertError(f"{checkpoint / 'trainer.json'}: no usable config.model ({e})") from None
    try:
        weights = load_model_weights(checkpoint)  # verified against the manifest first
    except CheckpointError as e:  # its message names the checkpoint and the file
        raise ConvertError(str(e)) from None
    except (OSError, ValueError) as e:
        raise ConvertError(f"{checkpoint}: weights unreadable ({e})") from None
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    return ModelSource(CHECKPOINT, checkpoint, config, weights, step=state.get("step"), trainer_state=state)


def _load_hf(directory: Path) -> ModelSource:
    hf_config = _read_json(directory / "config.json")
    try:
        config = from_hf_config(hf_config)
        hf_state = load_hf_state_dict(directory)
        lm_head_file = merge_separate_lm_head(directory, config, hf_state)
        imported = from_hf_state_dict(hf_state, config)
    except Exception as e:  # a foreign config, missing or foreign weights, a refused pickle: say what
        raise ConvertError(f"{directory}: {type(e).__name__}: {e}") from None
    weights = dict(imported.state_dict)
    if config.tie_word_embeddings or not imported.has_lm_head:  # tied, or zero-filled by the importer
        del weights["lm_head.weight"]
    if not imported.has_score:  # zero-filled by the importer
        del weights["score.weight"]
    return ModelSource(HF, directory, config, weights, hf_config=hf_config, lm_head_file=lm_head_file)


def init_model_from(model: torch.nn.Module, path: str | os.PathLike, *, with_reward_head: bool) -> str:
    """Overwrite `model`'s weights with the source's; returns where they came from, for the log.

    `with_reward_head` False, or a source without one (a causal LM), keeps the model's own reward head. An
    HF directory without an untied LM head keeps the model's own LM head (not the zeros an import writes).
    """
    source = load_model_source(path)
    state = dict(source.state_dict)
    if not with_reward_head or "score.weight" not in state:
        state["score.weight"] = model.score.weight.detach().clone()
    keep_own_lm_head = source.config.tie_word_embeddings  # tied: the embedding is the LM head
    origin = f"checkpoint {source.path.name}"
    if source.kind == HF:
        origin = "HF directory"
        if not source.has_lm_head:
            keep_own_lm_head = True
            origin += ", fresh LM head"
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and keep_own_lm_head)]
    if missing or unexpected:
        raise ConvertError(f"init_from {path}: missing {missing}, unexpected {unexpected}")
    return f"{origin} ({'with' if with_reward_head else 'fresh'} reward head)"


# ---------------------------------------------------------------------------------------------------
# Tokenizer and scoring recipe


@dataclass
class ScoringRecipe:
    """How texts become this model's token ids, exactly as training made them (tools/preprocess_pairs.py):
    prompt ids = encode(template with "{prompt}" replaced), response ids = encode(response) + [eos_id] under
    eos_policy "response"; the reward is read at the response's last token."""

    tokenizer: object  # megapmp Tokenizer, or TransformersTokenizer for a foreign HF tokenizer
    template: dict  # {"name", "text"}
    eos_policy: str
    eos_id: int
    pad_id: int
    origin: str  # where the recipe was read from
    max_length: int | None = None
    overlong: str = "error"
    notes: list = field(default_factory=list)
    judge: dict | None = None  # a pairwise judge's format (megapmp.data.judge); None for a reward model

    def problems(self, model_vocab_size: int) -> list[str]:
        """Why this recipe cannot make inputs for a model of `model_vocab_size` ids (the rules a shard's sidecar
        is held to at open: megapmp.data.shards.recipe_problems, over the ids both the tokenizer and the model
        have); empty when it can."""
        vocab = min(model_vocab_size, getattr(self.tokenizer, "vocab_size", None) or model_vocab_size)
        return recipe_problems(self.template.get("text"), self.eos_policy, self.eos_id, self.pad_id, vocab)

    def encode(self, prompt: str, responses: Sequence[str]) -> tuple[list[int], list[list[int]]]:
        """(prompt ids, [response ids]) of one prompt and its responses, without truncation."""
        eos = [self.eos_id] if self.eos_policy == "response" else []
        prompt_ids = self.tokenizer.encode(self.template["text"].replace("{prompt}", prompt))
        return prompt_ids, [self.tokenizer.encode(r) + eos for r in responses]


class TransformersTokenizer:
    """The little of megapmp's Tokenizer interface scoring needs, over ``transformers.AutoTokenizer``
    (``add_special_tokens=False``, as megapmp never adds BOS/EOS inside ``encode``)."""

    family = "transformers"

    def __init__(self, directory: str | os.PathLike):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            from transformers import AutoTokenizer  # optional: the "hf" extra
        except ImportError as e:
            raise ConvertError(f"{directory}: its tokenizer needs the transformers package "
                               "(pip install 'megapmp[hf]')") from e
        self.directory = str(directory)
        self._tok = AutoTokenizer.from_pretrained(self.directory)
        self.eos_id = self._tok.eos_token_id
        self.pad_id = self._tok.pad_token_id
        self.vocab_size = len(self._tok)

    def encode(self, text: str) -> list[int]:
        return self._tok(text, add_special_tokens=False)["input_ids"]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._tok(list(texts), add_special_tokens=False)["input_ids"]

    def spec(self) -> str:
        return f"transformers:{self.directory}"


def scoring_recipe(source: ModelSource, *, tokenizer: str | None = None, shard: str | None = None,
                   native: bool = False) -> ScoringRecipe:
    """The tokenizer and input recipe of `source`, checked (ScoringRecipe.problems) against its model."""
    recipe = _find_recipe(source, tokenizer=tokenizer, shard=shard, native=native)
    problems = recipe.problems(source.config.vocab_size)
    if problems:
        raise ConvertError(f"the scoring recipe from {recipe.origin} is unusable: {'; '.join(problems)}")
    return recipe


def _find_recipe(source: ModelSource, *, tokenizer: str | None, shard: str | None, native: bool) -> ScoringRecipe:
    """The tokenizer and input recipe of `source` (the module docstring says where they come from).

    tokenizer: a spec or directory replacing the recorded tokenizer files. shard: a shard prefix made like
    the training data (megapmp checkpoints only). native: always a megapmp Tokenizer, as an export writes
    it out again; otherwise a tiktoken export's tokenizer is read with transformers, which honours its
    split_special_tokens setting and so gives exactly the recorded ids.
    """
    if source.kind == CHECKPOINT:
        state = source.trainer_state
        if shard is not None:
            return _recipe_from_shard(source, shard, tokenizer)
        if state.get("shard_meta"):
            return _recipe_from_shard_meta(source, tokenizer)
        if (source.path / SCORING_FILE).is_file():
            return _recipe_from_scoring_file(source.path / SCORING_FILE, source.path / TOKENIZER_SUBDIR,
                                             tokenizer, native)
        if state.get("format") == IMPORT_FORMAT:  # imported from a foreign HF directory
            return _recipe_for_foreign_hf(source, tokenizer, native)
        raise ConvertError(f"{source.path / 'trainer.json'} records no training data (shard_meta): pass --shard "
                           "PREFIX, a shard made with the same tokenizer, template and EOS policy")
    if shard is not None:
        raise ConvertError(f"{source.path} is an HF directory: a shard cannot be checked against it")
    if (source.path / SCORING_FILE).is_file():
        recorded = (_read_json(source.path / SCORING_FILE).get("tokenizer") or {}).get("path")
        tokenizer_dir = source.path / recorded if isinstance(recorded, str) else _hf_tokenizer_dir(source.path)
        return _recipe_from_scoring_file(source.path / SCORING_FILE, tokenizer_dir, tokenizer, native)
    return _recipe_for_foreign_hf(source, tokenizer)


def _load_tokenizer(spec: str, what: str):
    try:
        return load_tokenizer(spec)
    except (OSError, ValueError) as e:
        raise ConvertError(f"cannot load the tokenizer {what}: {e}") from None


def _identity_difference(a: dict, b: dict) -> list[str]:
    """Fields in which two tokenizer identities differ; where the files live ("spec") does not count."""
    return sorted(k for k in set(a) | set(b) if k != "spec" and a.get(k) != b.get(k))


def _find_shard_tokenizer(state: dict, spec: str, checkpoint: Path) -> Path | None:
    """The tokenizer directory saved beside the training shards. The sidecar's spec is relative to the
    shards' folder; a shard prefix in the config may be relative to the directory training ran in."""
    prefixes = state.get("config", {}).get("data", {}).get("train", []) or []
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    for prefix in map(Path, prefixes):
        bases = [prefix] if prefix.is_absolute() else [Path.cwd() / prefix, run_dir / prefix, run_dir.parent / prefix]
        for base in bases:
            if (base.parent / spec).is_dir():
                return base.parent / spec
    return None


def _recipe_from_shard(source: ModelSource, shard: str, tokenizer_spec: str | None) -> ScoringRecipe:
    try:
        meta = ShardMeta.load(shard)
    except (OSError, ValueError) as e:
        raise ConvertError(f"--shard {shard}: {e}") from None
    recorded = source.trainer_state.get("shard_meta")
    if recorded:
        differ = [k for k in ("vocab_size", "eos_id", "pad_id", "template", "eos_policy", "judge")
                  if recorded.get(k) != getattr(meta, k)]
        differ += [f"tokenizer {k}" for k in _identity_difference(meta.tokenizer, recorded["tokenizer"])]
        if differ:
            raise ConvertError(f"--shard {shard} was not made like this checkpoint's training data: it differs "
                               f"in {', '.join(differ)}")
    if tokenizer_spec:
        tokenizer = _load_tokenizer(tokenizer_spec, f"--tokenizer {tokenizer_spec}")
    else:
        try:
            tokenizer = load_shard_tokenizer(shard)
        except (OSError, ValueError) as e:
            raise ConvertError(f"--shard {shard}: cannot load its tokenizer: {e}") from None
    return _checked_recipe(tokenizer, meta, f"shard {shard}")


def _recipe_from_shard_meta(source: ModelSource, tokenizer_spec: str | None) -> ScoringRecipe:
    state = source.trainer_state
    try:
        meta = ShardMeta(**state["shard_meta"])
    except TypeError as e:
        raise ConvertError(f"{source.path / 'trainer.json'}: unreadable shard_meta ({e}); pass --shard") from None
    spec = meta.tokenizer.get("spec")
    if tokenizer_spec:
        tokenizer = _load_tokenizer(tokenizer_spec, f"--tokenizer {tokenizer_spec}")
    elif spec == "byte":
        tokenizer = load_tokenizer("byte")
    else:
        directory = _find_shard_tokenizer(state, spec, source.path)
        if directory is None:
            prefixes = state.get("config", {}).get("data", {}).get("train", [])
            raise ConvertError(
                f"cannot find the training tokenizer {spec}/ beside the training shards {prefixes} "
                "(moved, or relative to another working directory): pass --shard PREFIX or --tokenizer DIR")
        tokenizer = _load_tokenizer(str(directory), str(directory))
    return _checked_recipe(tokenizer, meta, "trainer.json shard_meta")


def _checked_recipe(tokenizer, meta: ShardMeta, origin: str) -> ScoringRecipe:
    """The recipe of shard data `meta`, refused unless `tokenizer` is the one the data was made with."""
    differ = _identity_difference(tokenizer.identity(), meta.tokenizer)
    if differ:
        raise ConvertError(f"the tokenizer {tokenizer.spec()} is not the one the data was made with: it differs in "
                           f"{', '.join(differ)}")
    if (tokenizer.eos_id, tokenizer.pad_id) != (meta.eos_id, meta.pad_id):
        raise ConvertError(f"tokenizer eos/pad ids {tokenizer.eos_id}/{tokenizer.pad_id} differ from the data's "
                           f"{meta.eos_id}/{meta.pad_id}")
    return ScoringRecipe(tokenizer, dict(meta.template), meta.eos_policy, meta.eos_id, meta.pad_id, origin,
                         meta.max_length, meta.overlong, judge=meta.judge)


def _recipe_from_scoring_file(scoring_path: Path, tokenizer_dir: Path | None, tokenizer_spec: str | None,
                              native: bool) -> ScoringRecipe:
    scoring = _read_json(scoring_path)
    try:
        template = {"name": scoring["template"].get("name"), "text": scoring["template"]["text"]}
        eos_policy, eos_id, pad_id = scoring["eos_policy"], int(scoring["eos_token_id"]), int(scoring["pad_token_id"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ConvertError(f"{scoring_path}: missing or bad field ({type(e).__name__}: {e})") from None
    family = (scoring.get("tokenizer") or {}).get("family")
    notes = []
    if tokenizer_spec:
        tokenizer = _load_tokenizer(tokenizer_spec, f"--tokenizer {tokenizer_spec}")
    elif family == "byte":
        tokenizer = load_tokenizer("byte")
    elif tokenizer_dir is None or not tokenizer_dir.is_dir():
        raise ConvertError(f"{scoring_path.parent} has {SCORING_FILE} but no tokenizer directory {tokenizer_dir}: "
                           "pass --tokenizer")
    elif native or family in ("hf", "sentencepiece"):
        tokenizer = _load_tokenizer(str(tokenizer_dir), f"in {tokenizer_dir}")
    else:
        # A tiktoken export is an HF fast tokenizer with split_special_tokens: transformers reads that setting.
        tokenizer = TransformersTokenizer(tokenizer_dir)
        notes.append(f"tokenizer family {family!r} read with transformers.AutoTokenizer")
    if (tokenizer.eos_id, tokenizer.pad_id) != (eos_id, pad_id):
        raise ConvertError(f"tokenizer eos/pad ids {tokenizer.eos_id}/{tokenizer.pad_id} differ from "
                           f"{scoring_path.name}'s {eos_id}/{pad_id}")
    return ScoringRecipe(tokenizer, template, eos_policy, eos_id, pad_id, str(scoring_path),
                         scoring.get("max_length"), scoring.get("overlong", "error"), notes, scoring.get("judge"))


def _hf_tokenizer_dir(directory: Path) -> Path | None:
    """Where an HF directory keeps its tokenizer: tokenizer/ (an export writes it there when transformers
    would rebuild it differently at the top level), else the directory itself."""
    for candidate in (directory / TOKENIZER_SUBDIR, directory):
        if candidate.is_dir() and any((candidate / name).is_file() for name in HF_TOKENIZER_FILES):
            return candidate
    return None


class NoTokenizerError(ConvertError):
    """A model source that brought no tokenizer (an HF directory without one, or a checkpoint imported
    from such a directory), and none was named."""


def _recipe_for_foreign_hf(source: ModelSource, tokenizer_spec: str | None, native: bool = False) -> ScoringRecipe:
    """The defaults for a model from a foreign HF directory (no megapmp_scoring.json): that directory's
    tokenizer (an imported checkpoint keeps it in tokenizer/), template '{prompt}', EOS policy 'none', and the
    eos/pad ids of its config.json. `native`: a megapmp Tokenizer (what an export writes out again), whose
    ids must then be the config's; otherwise transformers' AutoTokenizer reads it, as any HF scorer would."""
    directory = source.path
    if source.kind == HF:
        recorded, tokenizer_dir = source.hf_config, _hf_tokenizer_dir(directory)
    else:  # a checkpoint written by import_from_hf
        recorded = source.trainer_state.get("imported_from") or {}
        tokenizer_dir = _hf_tokenizer_dir(directory / TOKENIZER_SUBDIR) if (directory / TOKENIZER_SUBDIR).is_dir() \
            else None
    if tokenizer_spec:
        tokenizer = _load_tokenizer(tokenizer_spec, f"--tokenizer {tokenizer_spec}")
    elif tokenizer_dir is None:
        where = f"there or in {directory / TOKENIZER_SUBDIR}" if source.kind == HF else f"in {directory / TOKENIZER_SUBDIR}"
        raise NoTokenizerError(f"{directory}: no tokenizer files ({', '.join(HF_TOKENIZER_FILES)}) {where} (the HF "
                               f"directory brought none): pass --tokenizer")
    elif native:
        tokenizer = _load_tokenizer(str(tokenizer_dir), f"in {tokenizer_dir}")
    else:
        tokenizer = TransformersTokenizer(tokenizer_dir)
    eos = recorded.get("eos_token_id", tokenizer.eos_id)
    eos = eos[0] if isinstance(eos, list) else eos
    eos = tokenizer.eos_id if eos is None else eos
    pad = recorded.get("pad_token_id", tokenizer.pad_id)
    if eos is None:
        raise ConvertError(f"{directory}: neither config.json nor the tokenizer names an eos token id")
    pad = int(pad if pad is not None else eos)
    if native and (tokenizer.eos_id, tokenizer.pad_id) != (eos, pad):
        raise ConvertError(f"{directory}: config.json's eos/pad ids {eos}/{pad} differ from its tokenizer's "
                           f"{tokenizer.eos_id}/{tokenizer.pad_id}: pass --tokenizer with one that agrees")
    return ScoringRecipe(tokenizer, {"name": "none", "text": "{prompt}"}, "none", int(eos), pad,
                         f"{directory} (no {SCORING_FILE}: defaults)",
                         notes=[f"no {SCORING_FILE}: template '{{prompt}}' and eos_policy 'none' assumed"])

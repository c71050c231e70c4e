"""Score (prompt, response) texts with a trained reward model: a megapmp checkpoint or an HF directory.

Inputs are built exactly as training built them (tools/preprocess_pairs.py, and the recipe that
tools/convert_checkpoint.py writes into ``megapmp_scoring.json``)::

    prompt ids   = tokenizer.encode(template.text with "{prompt}" replaced by the prompt)
    response ids = tokenizer.encode(response) + ([eos_id] if eos_policy == "response" else [])
    reward       = the score head at the response's last token

Where the recipe comes from, first found wins:

1. a megapmp checkpoint's ``trainer.json`` ``shard_meta`` (the training shard's sidecar): template, EOS
   policy, eos/pad ids, and the tokenizer saved beside the training shards (``PREFIX.tokenizer/``, found
   through ``config.data.train``; ``tokenizer=`` overrides the location and must have the same identity);
2. a ``megapmp_scoring.json`` beside the weights: an HF export written by ``convert_checkpoint.py to-hf``
   (tokenizer files in the same directory), or a checkpoint imported by ``from-hf`` (tokenizer in
   ``tokenizer/``);
3. a foreign HF Qwen2 reward model (no megapmp_scoring.json): transformers' AutoTokenizer of that
   directory, template ``{prompt}``, EOS policy ``none`` (HF sequence classifiers are usually scored on
   the plain text); override with ``template=`` / ``eos_policy=``.

Scoring packs responses two at a time behind one copy of their prompt (the shared-prefix layout
``[P R1 R2]``, where R2 cannot see R1), so a Best-of-N candidate set encodes each prompt M/2 times
instead of M; an odd one out is paired with a one-token dummy whose score is discarded. Results do not
depend on the packing beyond floating-point rounding.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

SCORING_FILE = "megapmp_scoring.json"
IMPORTED_TOKENIZER_DIR = "tokenizer"
EOS_POLICIES = ("response", "none")


class ModelLoadError(ValueError):
    """The model path, its weights or its tokenizer/recipe could not be used; the message says why."""


@dataclass
class ScoringRecipe:
    """How texts become token ids for this model."""

    tokenizer: object  # megapmp Tokenizer (or the transformers adapter below)
    template: dict  # {"name", "text"}
    eos_policy: str
    eos_id: int
    pad_id: int
    origin: str
    max_length: int | None = None
    notes: list = field(default_factory=list)


class TransformersTokenizer:
    """The little of megapmp's Tokenizer interface scoring needs, over ``transformers.AutoTokenizer``
    (``add_special_tokens=False``, as megapmp never adds BOS/EOS inside ``encode``)."""

    family = "transformers"

    def __init__(self, directory: str | os.PathLike):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            from transformers import AutoTokenizer
        except ImportError as e:
            raise ModelLoadError(f"{directory}: its tokenizer needs the transformers package "
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


def pick_device(device=None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_dtype(precision: str, device: torch.device):
    """auto: bf16 autocast on GPUs, fp32 on CPUs (like the trainer)."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    try:
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    except KeyError:
        raise ValueError(f"precision {precision!r} is not auto, fp32, bf16 or fp16") from None


class RewardScorer:
    """A reward model plus the recipe that turns texts into its inputs.

    ``score(prompts, responses)`` -> float64 rewards, one per (prompt, response), in order.
    ``score_pairs(prompts, chosen, rejected)`` -> (r_chosen, r_rejected).
    Build one with :meth:`load` (a checkpoint or HF directory) or directly from a model and a recipe.
    """

    def __init__(self, model, recipe: ScoringRecipe, *, device=None, precision: str = "auto",
                 seq_len: int = 0, batch_tokens: int = 16384, layout: str = "shared-prefix",
                 max_length: int | None = None, progress: bool = True, info: dict | None = None):
        if layout not in ("shared-prefix", "duplicated"):
            raise ValueError(f"layout {layout!r} is not shared-prefix or duplicated")
        if recipe.eos_policy not in EOS_POLICIES:
            raise ValueError(f"eos_policy {recipe.eos_policy!r} is not one of {', '.join(EOS_POLICIES)}")
        if "{prompt}" not in recipe.template["text"]:
            raise ValueError("the template has no {prompt} placeholder")
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        self.recipe = recipe
        self.precision = precision
        self.autocast_dtype = autocast_dtype(precision, self.device)
        self.seq_len = int(seq_len)
        self.batch_tokens = int(batch_tokens)
        self.layout = layout
        # Longer inputs are cut with the preprocessing policy. Not the training shard's max_length by default:
        # evaluation texts may legitimately be longer than training pairs were allowed to be.
        self.max_length = int(max_length or model.config.max_position_embeddings)
        self.progress = progress
        self.info = dict(info or {})
        self.truncated = 0  # responses truncated to max_length so far

    # -- loading --------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike, *, tokenizer: str | None = None, template: str | None = None,
             eos_policy: str | None = None, dtype: str | None = None, **kwargs) -> "RewardScorer":
        """A scorer for a megapmp checkpoint (step dir; run or checkpoints dir -> newest step) or an HF
        directory (config.json + weights). ``tokenizer``: a spec/directory replacing the recorded one;
        ``template``: none | codepmp | a template file, replacing the recorded one; ``eos_policy``:
        response | none; ``dtype``: cast the weights (float32, bfloat16, float16; default as stored).
        Other keyword arguments go to the constructor (device, precision, seq_len, batch_tokens, ...)."""
        path = Path(path)
        if not path.exists():
            raise ModelLoadError(f"{path}: no such file or directory")
        if not path.is_dir():
            raise ModelLoadError(f"{path} is a file: expected a megapmp checkpoint directory or an HF model directory")
        checkpoint = _resolve_megapmp_checkpoint(path)
        if checkpoint is not None:
            config, state, recipe, info = _load_megapmp(checkpoint, tokenizer)
        elif (path / "config.json").is_file():
            config, state, recipe, info = _load_hf(path, tokenizer)
        else:
            raise ModelLoadError(
                f"{path} is neither a megapmp checkpoint (step_XXXXXXXX/ with trainer.json, or a run or checkpoints "
                "directory holding them) nor an HF model directory (config.json + model.safetensors)")
        if template is not None:
            from megapmp.data.preprocess import resolve_template

            name, text = resolve_template(template)
            recipe.template = {"name": name, "text": text}
            recipe.notes.append(f"template overridden by {template!r}")
        if eos_policy is not None:
            if eos_policy not in EOS_POLICIES:
                raise ModelLoadError(f"eos_policy {eos_policy!r} is not one of {', '.join(EOS_POLICIES)}")
            recipe.eos_policy = eos_policy
            recipe.notes.append(f"eos_policy overridden by {eos_policy!r}")
        model = build_scoring_model(config, state, dtype=dtype, source=str(path))
        info.update(dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
                    parameters=sum(p.numel() for p in model.parameters()))
        return cls(model, recipe, info=info, **kwargs)

    # -- inputs ---------------------------------------------------------------------------------

    def describe(self) -> dict:
        """What a report should record about the model and how its inputs were built."""
        r = self.recipe
        tok = r.tokenizer
        return {**self.info, "template": dict(r.template), "eos_policy": r.eos_policy, "eos_id": r.eos_id,
                "pad_id": r.pad_id, "recipe_from": r.origin, "notes": list(r.notes),
                "tokenizer": {"family": getattr(tok, "family", None), "spec": tok.spec(),
                              "vocab_size": getattr(tok, "vocab_size", None)},
                "device": str(self.device), "precision": self.precision, "layout": self.layout,
                "max_length": self.max_length, "truncated_responses": self.truncated}

    def encode_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        text = self.recipe.template["text"]
        return _encode_batch(self.recipe.tokenizer, [text.replace("{prompt}", p) for p in prompts])

    def encode_responses(self, responses: Sequence[str]) -> list[list[int]]:
        eos = [self.recipe.eos_id] if self.recipe.eos_policy == "response" else []
        return [ids + eos for ids in _encode_batch(self.recipe.tokenizer, responses)]

    # -- scoring --------------------------------------------------------------------------------

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """float64 reward of each (prompts[i], responses[i])."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
        from megapmp.data.datasets import Pair

        n = len(responses)
        if n == 0:
            return np.empty(0)
        unique = list(dict.fromkeys(prompts))
        prompt_ids = dict(zip(unique, self.encode_prompts(unique)))
        response_ids = self.encode_responses(responses)
        empty = [i for i, ids in enumerate(response_ids) if not ids]
        if empty:
            raise ValueError(f"response {empty[0]} is empty: with eos_policy 'none' it has no token to read a reward at")
        dummy = np.array([self.recipe.eos_id], np.int64)
        groups: dict[str, list[int]] = {}
        solo = []
        for i, (p, r) in enumerate(zip(prompts, responses)):
            if self.max_length and len(prompt_ids[p]) + len(response_ids[i]) > self.max_length:
                solo.append(i)
            else:
                groups.setdefault(p, []).append(i)
        pairs, owners = [], []  # owners[k] = (index of the chosen slot, index of the rejected slot or -1)
        for p, members in groups.items():
            prompt = np.asarray(prompt_ids[p], np.int64)
            for j in range(0, len(members), 2):
                a = members[j]
                b = members[j + 1] if j + 1 < len(members) else -1
                pairs.append(Pair(prompt, np.asarray(response_ids[a], np.int64),
                                  np.asarray(response_ids[b], np.int64) if b >= 0 else dummy))
                owners.append((a, b))
        for i in solo:
            prompt, response = self._truncate(prompt_ids[prompts[i]], response_ids[i])
            pairs.append(Pair(np.asarray(prompt, np.int64), np.asarray(response, np.int64), dummy))
            owners.append((i, -1))
        self.truncated += len(solo)
        r_a, r_b = self.score_token_pairs(pairs, total_responses=n)
        out = np.empty(n, np.float64)
        for (a, b), x, y in zip(owners, r_a, r_b):
            out[a] = x
            if b >= 0:
                out[b] = y
        return out

    def score_pairs(self, prompts: Sequence[str], chosen: Sequence[str], rejected: Sequence[str]):
        """(r_chosen, r_rejected) float64 arrays."""
        if not len(prompts) == len(chosen) == len(rejected):
            raise ValueError(f"{len(prompts)} prompts, {len(chosen)} chosen, {len(rejected)} rejected")
        rewards = self.score(list(prompts) + list(prompts), list(chosen) + list(rejected))
        return rewards[: len(prompts)], rewards[len(prompts):]

    @torch.no_grad()
    def score_token_pairs(self, pairs: Sequence, total_responses: int | None = None):
        """(r_first, r_second) for already tokenized Pair objects, in order.

        Pairs are sorted longest first and cut into batches of about ``batch_tokens`` tokens; a batch's rows
        are as long as its longest pair (at least ``seq_len``, rounded up to 64), so attention, quadratic in
        the row length, is not spent on rows longer than needed; shorter pairs share rows."""
        from tqdm import tqdm

        from megapmp.data.packing import pair_packed_length
        from megapmp.eval.scoring import score_pairs

        n = len(pairs)
        if n == 0:
            return np.empty(0), np.empty(0)
        lengths = np.array([pair_packed_length(len(p.prompt), len(p.chosen), len(p.rejected), self.layout)
                            for p in pairs], dtype=np.int64)
        order = np.argsort(-lengths, kind="stable")  # longest first: first-fit-decreasing packing
        first, second = np.empty(n), np.empty(n)
        total = total_responses or 2 * n
        bar = tqdm(total=total, unit="resp", desc="scoring", disable=not self.progress or total < 256,
                   file=sys.stderr, dynamic_ncols=True)
        start = 0
        while start < n:
            stop, used = start, 0
            while stop < n and (stop == start or used + lengths[order[stop]] <= self.batch_tokens):
                used += int(lengths[order[stop]])
                stop += 1
            chunk = order[start:stop]
            row = max(self.seq_len, int(lengths[chunk[0]]))
            row = -(-row // 64) * 64
            r_c, r_r = score_pairs(self.model, [pairs[i] for i in chunk], seq_len=row, layout=self.layout,
                                   pad_id=self.recipe.pad_id, device=self.device, pairs_per_batch=len(chunk),
                                   autocast_dtype=self.autocast_dtype)
            first[chunk], second[chunk] = r_c, r_r
            bar.update(min(total - bar.n, 2 * len(chunk)))
            start = stop
        bar.close()
        return first, second

    def _truncate(self, prompt: list[int], response: list[int]):
        # The preprocessing policy (megapmp.data.preprocess.fit_pair) for one response.
        from megapmp.data.preprocess import fit_pair

        eos = self.recipe.eos_id if self.recipe.eos_policy == "response" else None
        prompt, response, _, _ = fit_pair(list(prompt), list(response), list(response), self.max_length, eos)
        return prompt, response


# ---------------------------------------------------------------------------------------------------
# loading helpers


def _encode_batch(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    texts = list(texts)
    if not texts:
        return []
    if hasattr(tokenizer, "encode_batch"):
        return [list(ids) for ids in tokenizer.encode_batch(texts)]
    return [list(tokenizer.encode(t)) for t in texts]


def _resolve_megapmp_checkpoint(path: Path) -> Path | None:
    from megapmp.checkpoint import latest_checkpoint

    if (path / "trainer.json").is_file():
        return path
    for root in (path / "checkpoints", path):
        latest = latest_checkpoint(root)
        if latest is not None:
            return latest
    return None


def build_scoring_model(config, state_dict: dict, *, dtype: str | None = None, source: str = ""):
    """A Qwen2RewardModel without LM head holding ``state_dict`` (megapmp keys), built without a
    random init (meta device, then the tensors assigned)."""
    from megapmp.model import Qwen2RewardModel

    if "score.weight" not in state_dict:
        raise ModelLoadError(f"{source}: no reward head (score.weight): a language model, not a reward model")
    state = {k: v for k, v in state_dict.items() if k != "lm_head.weight" and v is not None}
    if dtype is not None:
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ModelLoadError(f"dtype {dtype!r} is not float32, bfloat16 or float16")
        target = getattr(torch, dtype)
        state = {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}
    with torch.device("meta"):
        model = Qwen2RewardModel(config, with_lm_head=False)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ModelLoadError(f"{source}: the weights do not fit the model config: {e}") from None
    model.rotary.inv_freq = model.rotary._inv_freq(device="cpu")  # non-persistent: rebuilt, fp32
    return model


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: unreadable ({e})") from None


def _load_megapmp(checkpoint: Path, tokenizer_spec: str | None):
    from megapmp.checkpoint import load_model_weights
    from megapmp.config import ModelConfig

    state = _read_json(checkpoint / "trainer.json")
    try:
        config = ModelConfig(**state["config"]["model"])
        config.validate()
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{checkpoint / 'trainer.json'}: no usable config.model ({e})") from None
    try:
        weights = load_model_weights(checkpoint)
    except Exception as e:  # a truncated or foreign file: say which
        raise ModelLoadError(f"{checkpoint / 'model.safetensors'}: unreadable ({e})") from None
    if state.get("shard_meta"):
        recipe = _recipe_from_shard_meta(checkpoint, state, tokenizer_spec)
    elif (checkpoint / SCORING_FILE).is_file():
        tokenizer_dir = checkpoint / IMPORTED_TOKENIZER_DIR
        recipe = _recipe_from_scoring_file(checkpoint / SCORING_FILE, tokenizer_dir, tokenizer_spec)
    else:
        raise ModelLoadError(f"{checkpoint / 'trainer.json'} records no training data (shard_meta) and there is no "
                             f"{SCORING_FILE}: cannot know the tokenizer and template")
    info = {"path": str(checkpoint), "kind": "megapmp-checkpoint", "step": state.get("step"),
            "model_config": state["config"]["model"]}
    return config, weights, recipe, info


def _find_shard_tokenizer(state: dict, spec: str, checkpoint: Path) -> Path | None:
    # The sidecar's tokenizer spec is relative to the shard's folder; the shard prefix in the config may be
    # relative to the directory training ran in.
    prefixes = state.get("config", {}).get("data", {}).get("train", []) or []
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    for prefix in map(Path, prefixes):
        bases = [prefix] if prefix.is_absolute() else [Path.cwd() / prefix, run_dir / prefix, run_dir.parent / prefix]
        for base in bases:
            if (base.parent / spec).is_dir():
                return base.parent / spec
    return None


def _recipe_from_shard_meta(checkpoint: Path, state: dict, tokenizer_spec: str | None) -> ScoringRecipe:
    from megapmp.data.tokenizers import load_tokenizer

    meta = state["shard_meta"]
    recorded = meta["tokenizer"]
    spec = recorded.get("spec")
    if tokenizer_spec is not None:
        tokenizer = _load_tokenizer(tokenizer_spec, f"--tokenizer {tokenizer_spec}")
    elif spec == "byte":
        tokenizer = load_tokenizer("byte")
    else:
        directory = _find_shard_tokenizer(state, spec, checkpoint)
        if directory is None:
            prefixes = state.get("config", {}).get("data", {}).get("train", [])
            raise ModelLoadError(f"cannot find the training tokenizer {spec}/ beside the training shards {prefixes} "
                                 "(moved, or relative to another working directory): pass --tokenizer DIR")
        tokenizer = _load_tokenizer(str(directory), str(directory))
    differ = sorted(k for k in set(recorded) | set(tokenizer.identity())
                    if k != "spec" and recorded.get(k) != tokenizer.identity().get(k))
    if differ:
        raise ModelLoadError(f"the tokenizer {tokenizer.spec()} is not the one the training data was made with: "
                             f"it differs in {', '.join(differ)}")
    return ScoringRecipe(tokenizer, dict(meta.get("template") or {"name": "none", "text": "{prompt}"}),
                         meta.get("eos_policy", "response"), int(meta["eos_id"]), int(meta["pad_id"]),
                         "trainer.json shard_meta", meta.get("max_length"))


def _load_tokenizer(spec: str, what: str):
    from megapmp.data.tokenizers import load_tokenizer

    try:
        return load_tokenizer(spec)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the tokenizer {what}: {e}") from None


def _recipe_from_scoring_file(scoring_path: Path, tokenizer_dir: Path | None,
                              tokenizer_spec: str | None) -> ScoringRecipe:
    from megapmp.data.tokenizers import load_tokenizer

    scoring = _read_json(scoring_path)
    try:
        template = {"name": scoring["template"].get("name"), "text": scoring["template"]["text"]}
        eos_policy, eos_id, pad_id = scoring["eos_policy"], int(scoring["eos_token_id"]), int(scoring["pad_token_id"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ModelLoadError(f"{scoring_path}: missing or bad field ({e})") from None
    family = (scoring.get("tokenizer") or {}).get("family")
    notes = []
    if tokenizer_spec is not None:
        tokenizer = _load_tokenizer(tokenizer_spec, f"--tokenizer {tokenizer_spec}")
    elif family == "byte":
        tokenizer = load_tokenizer("byte")
    elif tokenizer_dir is None or not tokenizer_dir.is_dir():
        raise ModelLoadError(f"{scoring_path.parent} has {SCORING_FILE} but no tokenizer directory {tokenizer_dir}: "
                             "pass --tokenizer")
    elif family in ("hf", "sentencepiece"):
        tokenizer = _load_tokenizer(str(tokenizer_dir), f"in {tokenizer_dir}")
    else:
        # tiktoken exports are an HF fast tokenizer with split_special_tokens: transformers reads that setting.
        tokenizer = TransformersTokenizer(tokenizer_dir)
        notes.append(f"tokenizer family {family!r} read with transformers.AutoTokenizer")
    if (tokenizer.eos_id, tokenizer.pad_id) != (eos_id, pad_id):
        raise ModelLoadError(f"tokenizer eos/pad ids {tokenizer.eos_id}/{tokenizer.pad_id} differ from "
                             f"{scoring_path.name}'s {eos_id}/{pad_id}")
    return ScoringRecipe(tokenizer, template, eos_policy, eos_id, pad_id, str(scoring_path),
                         scoring.get("max_length"), notes)


HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _hf_tokenizer_dir(directory: Path) -> Path | None:
    """Where an HF directory keeps its tokenizer: a tokenizer/ subdirectory (convert_checkpoint.py to-hf
    writes it there when transformers would rebuild it differently at the top level), else the directory."""
    for candidate in (directory / IMPORTED_TOKENIZER_DIR, directory):
        if candidate.is_dir() and any((candidate / name).is_file() for name in HF_TOKENIZER_FILES):
            return candidate
    return None


def _load_hf(directory: Path, tokenizer_spec: str | None):
    from megapmp.convert.hf import from_hf_state_dict, load_hf_directory

    try:
        config, hf_state = load_hf_directory(directory)
        imported = from_hf_state_dict(hf_state, config)
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise ModelLoadError(f"{directory}: {e}") from None
    if not imported.has_score:
        raise ModelLoadError(f"{directory}: no score.weight: a causal LM, not a reward model "
                             "(export one with tools/convert_checkpoint.py to-hf)")
    if (directory / SCORING_FILE).is_file():
        scoring = _read_json(directory / SCORING_FILE)
        recorded = (scoring.get("tokenizer") or {}).get("path")
        tokenizer_dir = directory / recorded if isinstance(recorded, str) else _hf_tokenizer_dir(directory)
        recipe = _recipe_from_scoring_file(directory / SCORING_FILE, tokenizer_dir, tokenizer_spec)
    else:
        hf_config = _read_json(directory / "config.json")
        if tokenizer_spec is not None:
            tokenizer = _load_tokenizer(tokenizer_spec, f"--tokenizer {tokenizer_spec}")
        else:
            tokenizer_dir = _hf_tokenizer_dir(directory)
            if tokenizer_dir is None:
                raise ModelLoadError(f"{directory}: no tokenizer files ({', '.join(HF_TOKENIZER_FILES)}) there or in "
                                     f"{directory / IMPORTED_TOKENIZER_DIR}: pass --tokenizer")
            tokenizer = TransformersTokenizer(tokenizer_dir)
        eos = hf_config.get("eos_token_id", tokenizer.eos_id)
        eos = eos[0] if isinstance(eos, list) else eos
        pad = hf_config.get("pad_token_id", tokenizer.pad_id)
        if eos is None:
            raise ModelLoadError(f"{directory}: neither config.json nor the tokenizer names an eos token id")
        recipe = ScoringRecipe(tokenizer, {"name": "none", "text": "{prompt}"}, "none", int(eos),
                               int(pad if pad is not None else eos), f"{directory} (no {SCORING_FILE}: defaults)",
                               notes=[f"no {SCORING_FILE}: template '{{prompt}}' and eos_policy 'none' assumed"])
    info = {"path": str(directory), "kind": "hf", "step": None,
            "model_config": {k: getattr(config, k) for k in config.__dataclass_fields__}}
    return config, imported.state_dict, recipe, info

#!/usr/bin/env python
"""Convert megapmp checkpoints to and from Hugging Face Qwen2 directories, and check that they agree.

  to-hf    a megapmp checkpoint -> a Qwen2ForSequenceClassification directory (one label, `score` head)
           (single-process or sharded by a parallel run of any TP/PP/DP layout: gathered to full tensors)
           that transformers, vLLM or any HF stack loads, with the training tokenizer and a
           megapmp_scoring.json saying how to build inputs so that its scores equal ours.
  from-hf  a Qwen2ForCausalLM or Qwen2ForSequenceClassification directory -> a megapmp checkpoint
           directory usable as the trainer's checkpoint.init_from.
  verify   score the same pairs with a megapmp checkpoint and with its HF export (loaded by
           transformers alone) and compare the token ids and the scores.

An export holds:
  config.json             Qwen2Config: architectures [Qwen2ForSequenceClassification], num_labels 1,
                          pad_token_id = the tokenizer's pad (never the EOS the reward is read at)
  model.safetensors       model.* and score.weight (and lm_head.weight with --with-lm-head)
  lm_head.safetensors     an untied model's LM head, for Qwen2ForCausalLM use (absent when tied:
                          the LM head is model.embed_tokens.weight; or with --with-lm-head)
  tokenizer/              the training tokenizer as an HF fast tokenizer (tokenizer.json,
                          tokenizer_config.json) giving the same ids as ours, for byte, BPE/HF and
                          tiktoken tokenizers (a SentencePiece model is copied as is); AutoTokenizer
                          loads it as written
  tokenizer.json, tokenizer_config.json
                          the same files at the top level, only where AutoTokenizer.from_pretrained(DIR)
                          gives our ids from there: transformers >= 5 rebuilds the tokenizer of a qwen2
                          directory as Qwen2Tokenizer (NFC, Qwen2's pre-tokenizer), exact only for
                          tokenizers built that way
  megapmp_scoring.json    template, EOS policy, eos/pad ids, the recipe for input ids and where to load
                          the tokenizer from ("tokenizer": {"path": "." or "tokenizer"})

Scoring recipe (also in megapmp_scoring.json): ids = tokenize(template with "{prompt}" replaced by
the prompt) + tokenize(response) + [eos_token_id], the two texts tokenized separately and without
special tokens; the reward is the score at the last token (the EOS). Batches are right-padded with
pad_token_id: Qwen2ForSequenceClassification pools the last token that is not pad.

Everything is written into a temporary directory beside the output and renamed when complete.
Exit codes: 0 success; 1 a refused input or output, or (verify) a mismatch; 2 usage.

Examples:
  python tools/convert_checkpoint.py to-hf --input runs/pmp --output exports/pmp-hf
  python tools/convert_checkpoint.py to-hf --input runs/pmp/checkpoints/step_00001000 --output out \\
      --dtype bfloat16 --with-lm-head
  python tools/convert_checkpoint.py from-hf --input /models/Qwen2-0.5B --output ckpt/qwen2-0.5b
  python tools/convert_checkpoint.py verify --checkpoint runs/pmp --hf exports/pmp-hf --pairs pairs.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

SCORING_FILE = "megapmp_scoring.json"
TOKENIZER_SUBDIR = "tokenizer"  # the exported tokenizer, loadable as written by any transformers version
IMPORTED_TOKENIZER_DIR = "tokenizer"  # where from-hf keeps the HF directory's tokenizer files
SCORING_FORMAT, SCORING_VERSION = "megapmp-scoring", 1
IMPORT_FORMAT = "megapmp-import"
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
    "last token that is not pad_token_id, which is why pad_token_id never equals eos_token_id"
)
# Texts the exported tokenizer must encode exactly as ours before an export is written.
TOKENIZER_CHECK_TEXTS = (
    "def f(x):\n    return x + 1  # ok\n",
    "  two leading spaces, tabs\tand trailing  \r\n\n",
    "héllo wörld ✓ 中文 emoji 🙂 and math ∑ᵢ xᵢ²",
    "Write a function that parses JSON; raise ValueError on error. It's 42, isn't it?",
    "class A:\n\tpass\n\n\n    x = [i ** 2 for i in range(10)]  \n",
    "x = 1234567 + 89; y = 3.14159",
    "cafe\u0301 and re\u0301sume\u0301 (combining accents, not NFC)",
    "text that names <|endoftext|> in the middle",
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


class ConvertError(Exception):
    """A refused input or output, with a message that says what to do about it."""


def log(message: str) -> None:
    print(f"[convert_checkpoint] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------
# Locating and reading checkpoints


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A step directory as is; a run or checkpoints directory -> its newest complete checkpoint."""
    path = Path(path)
    if not path.exists():
        raise ConvertError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise ConvertError(f"{path} is a file, not a megapmp checkpoint directory")
    if (path / "trainer.json").is_file():
        if (path / "layout.json").is_file():  # a sharded checkpoint of a parallel run: model/*.safetensors
            if not any((path / "model").glob("*.safetensors")):
                raise ConvertError(f"{path} has layout.json but no model/*.safetensors shards: not a complete checkpoint")
            return path
        if not (path / "model.safetensors").is_file():
            raise ConvertError(f"{path} has trainer.json but no model.safetensors: not a complete checkpoint")
        return path
    from megapmp.checkpoint import latest_checkpoint  # imports torch: after the cheap refusals

    for root in (path / "checkpoints", path):
        latest = latest_checkpoint(root)
        if latest is not None:
            return latest
    hint = " (it has a config.json: an HF directory? use from-hf)" if (path / "config.json").exists() else ""
    raise ConvertError(
        f"{path} is not a megapmp checkpoint{hint}: expected a step directory holding trainer.json and "
        "model.safetensors, or a run or checkpoints directory holding complete step_XXXXXXXX/ checkpoints")


def read_trainer_state(checkpoint: Path) -> dict:
    try:
        return json.loads((checkpoint / "trainer.json").read_text())
    except (OSError, ValueError) as e:
        raise ConvertError(f"{checkpoint / 'trainer.json'}: unreadable ({e})") from None


def checkpoint_model_config(checkpoint: Path, state: dict):
    from megapmp.config import ModelConfig

    try:
        config = ModelConfig(**state["config"]["model"])
        config.validate()
    except (KeyError, TypeError, ValueError) as e:
        raise ConvertError(f"{checkpoint / 'trainer.json'}: no usable config.model ({e})") from None
    return config


def load_checkpoint_weights(checkpoint: Path, config) -> dict:
    """megapmp-keyed weights of a checkpoint (a sharded one is gathered into full tensors, whatever its
    TP/PP/DP layout); no lm_head.weight when tied (it is the embedding)."""
    from megapmp.checkpoint import load_model_weights

    try:
        state_dict = load_model_weights(checkpoint)
    except Exception as e:  # a truncated or foreign file: say which one
        where = checkpoint / ("model" if (checkpoint / "layout.json").exists() else "model.safetensors")
        raise ConvertError(f"{where}: unreadable ({e})") from None
    if config.tie_word_embeddings:
        state_dict.pop("lm_head.weight", None)
    return state_dict


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
# How the training data was tokenized: tokenizer, template, EOS policy


@dataclass
class ScoringSpec:
    tokenizer: object  # megapmp Tokenizer
    template: dict
    eos_policy: str
    eos_id: int
    pad_id: int
    max_length: int | None
    overlong: str
    origin: str


def _identity_difference(a: dict, b: dict) -> list[str]:
    """Fields in which two tokenizer identities differ; where the files live ("spec") does not count."""
    return sorted(k for k in set(a) | set(b) if k != "spec" and a.get(k) != b.get(k))


def _find_shard_tokenizer(state: dict, spec: str, checkpoint: Path) -> Path | None:
    """The tokenizer directory saved beside the training shards (spec is relative to their folder)."""
    prefixes = state.get("config", {}).get("data", {}).get("train", []) or []
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    for prefix in prefixes:
        prefix = Path(prefix)
        bases = [prefix] if prefix.is_absolute() else [Path.cwd() / prefix, run_dir / prefix,
                                                         run_dir.parent / prefix]
        for base in bases:
            candidate = base.parent / spec
            if candidate.is_dir():
                return candidate
    return None


def scoring_spec(checkpoint: Path, state: dict, *, shard: str | None = None,
                 tokenizer_spec: str | None = None) -> ScoringSpec:
    """The tokenizer and input recipe the checkpoint was trained with.

    Sources, first found wins: --shard (checked against trainer.json's record), trainer.json's
    shard_meta (tokenizer looked up beside the training shards), or what from-hf imported
    (megapmp_scoring.json and tokenizer/ inside the checkpoint). --tokenizer replaces the tokenizer
    files and must have the recorded identity.
    """
    from megapmp.data.shards import ShardMeta, load_shard_tokenizer
    from megapmp.data.tokenizers import ByteTokenizer, load_tokenizer

    def load(spec: str, what: str):
        try:
            return load_tokenizer(spec)
        except (OSError, ValueError) as e:
            raise ConvertError(f"cannot load the tokenizer {what}: {e}") from None

    recorded = state.get("shard_meta")
    if shard is not None:
        try:
            meta = ShardMeta.load(shard)
        except (OSError, ValueError) as e:
            raise ConvertError(f"--shard {shard}: {e}") from None
        if recorded:
            differ = [k for k in ("vocab_size", "eos_id", "pad_id", "template", "eos_policy")
                      if recorded.get(k) != getattr(meta, k)]
            differ += [f"tokenizer {k}" for k in _identity_difference(meta.tokenizer, recorded["tokenizer"])]
            if differ:
                raise ConvertError(f"--shard {shard} was not made like this checkpoint's training data: it differs "
                                   f"in {', '.join(differ)}")
        tokenizer = load(tokenizer_spec, f"--tokenizer {tokenizer_spec}") if tokenizer_spec else None
        if tokenizer is None:
            try:
                tokenizer = load_shard_tokenizer(shard)
            except (OSError, ValueError) as e:
                raise ConvertError(f"--shard {shard}: cannot load its tokenizer: {e}") from None
        origin = f"shard {shard}"
    elif recorded:
        try:
            meta = ShardMeta(**recorded)
        except TypeError as e:
            raise ConvertError(f"{checkpoint / 'trainer.json'}: unreadable shard_meta ({e}); pass --shard") from None
        spec = meta.tokenizer.get("spec")
        if tokenizer_spec:
            tokenizer = load(tokenizer_spec, f"--tokenizer {tokenizer_spec}")
        elif spec == "byte":
            tokenizer = ByteTokenizer()
        else:
            directory = _find_shard_tokenizer(state, spec, checkpoint)
            if directory is None:
                prefixes = state.get("config", {}).get("data", {}).get("train", [])
                raise ConvertError(
                    f"cannot find the training tokenizer {spec}/ beside the training shards {prefixes} "
                    "(moved, or relative to another working directory): pass --shard PREFIX or --tokenizer DIR")
            tokenizer = load(str(directory), str(directory))
        origin = "trainer.json shard_meta"
    elif (checkpoint / SCORING_FILE).is_file():
        return _imported_scoring_spec(checkpoint, tokenizer_spec, load)
    else:
        raise ConvertError(f"{checkpoint / 'trainer.json'} records no training data (shard_meta): pass --shard "
                           "PREFIX, a shard made with the same tokenizer, template and EOS policy")

    differ = _identity_difference(tokenizer.identity(), meta.tokenizer)
    if differ:
        raise ConvertError(f"the tokenizer {tokenizer.spec()} is not the one the data was made with: it differs in "
                           f"{', '.join(differ)}")
    if (tokenizer.eos_id, tokenizer.pad_id) != (meta.eos_id, meta.pad_id):
        raise ConvertError(f"tokenizer eos/pad ids {tokenizer.eos_id}/{tokenizer.pad_id} differ from the data's "
                           f"{meta.eos_id}/{meta.pad_id}")
    return ScoringSpec(tokenizer, dict(meta.template), meta.eos_policy, meta.eos_id, meta.pad_id, meta.max_length,
                       meta.overlong, origin)


def _imported_scoring_spec(checkpoint: Path, tokenizer_spec, load) -> ScoringSpec:
    from megapmp.data.tokenizers import ByteTokenizer

    try:
        scoring = json.loads((checkpoint / SCORING_FILE).read_text())
        family = scoring.get("tokenizer", {}).get("family")
        scoring["eos_token_id"], scoring["pad_token_id"], scoring["template"]["text"], scoring["eos_policy"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConvertError(f"{checkpoint / SCORING_FILE}: unreadable ({type(e).__name__}: {e})") from None
    if tokenizer_spec:
        tokenizer = load(tokenizer_spec, f"--tokenizer {tokenizer_spec}")
    elif family == "byte":
        tokenizer = ByteTokenizer()
    elif (checkpoint / IMPORTED_TOKENIZER_DIR).is_dir():
        tokenizer = load(str(checkpoint / IMPORTED_TOKENIZER_DIR), "imported with the checkpoint")
    else:
        raise ConvertError(f"{checkpoint} has {SCORING_FILE} but no {IMPORTED_TOKENIZER_DIR}/: pass --tokenizer")
    if (tokenizer.eos_id, tokenizer.pad_id) != (scoring["eos_token_id"], scoring["pad_token_id"]):
        raise ConvertError(f"tokenizer eos/pad ids {tokenizer.eos_id}/{tokenizer.pad_id} differ from "
                           f"{SCORING_FILE}'s {scoring['eos_token_id']}/{scoring['pad_token_id']}")
    return ScoringSpec(tokenizer, scoring["template"], scoring["eos_policy"], scoring["eos_token_id"],
                       scoring["pad_token_id"], scoring.get("max_length"), scoring.get("overlong", "error"),
                       f"{checkpoint / SCORING_FILE}")


def encode_pair_texts(spec: ScoringSpec, prompt: str, responses: list[str]) -> tuple[list[int], list[list[int]]]:
    """Token ids exactly as tools/preprocess_pairs.py makes them (without truncation)."""
    tok = spec.tokenizer
    eos = [spec.eos_id] if spec.eos_policy == "response" else []
    prompt_ids = tok.encode(spec.template["text"].replace("{prompt}", prompt))
    return prompt_ids, [tok.encode(r) + eos for r in responses]


# ---------------------------------------------------------------------------------------------------
# The tokenizer as an HF fast tokenizer


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, the alphabet of ByteLevel tokenizers."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs)))


def _byte_level_bpe(vocab: dict[str, int], merges: list[tuple[str, str]], pattern: str | None):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    model = models.BPE(vocab=vocab, merges=merges, fuse_unk=False)
    tok = Tokenizer(model)
    if hasattr(tok.model, "ignore_merges"):
        tok.model.ignore_merges = True  # a whole pre-token in the vocabulary is one token, as tiktoken does
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pattern is None:
        tok.pre_tokenizer = byte_level
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False), byte_level])
    tok.decoder = decoders.ByteLevel()
    return tok


def _add_specials(tok, tokens: list[tuple[str, int]]) -> None:
    from tokenizers import AddedToken

    for content, wanted in tokens:
        tok.add_special_tokens([AddedToken(content, special=True, normalized=False)])
        got = tok.token_to_id(content)
        if got != wanted:
            raise ConvertError(f"the HF tokenizer gives {content!r} id {got}, ours is {wanted}")


def hf_tokenizer_files(tokenizer) -> tuple[dict[str, bytes], dict]:
    """(file name -> contents, info) of an HF fast tokenizer that gives ``tokenizer``'s ids.

    byte: a byte-level BPE without merges whose ids are the byte values; tiktoken: the ranks as a
    byte-level BPE with cl100k pre-tokenization; hf: its own files, with any appended token (an added
    ``<|pad|>``) added. These three encode special-token text in data the way ours do (byte and
    tiktoken as plain text, via split_special_tokens). A SentencePiece model has no faithful HF fast
    form here: its file is copied and info["hf_tokenizer"] is False.
    """
    family = tokenizer.family
    info = {"family": family, "hf_tokenizer": True, "split_special_tokens": False, "note": None}
    config = {}
    if family == "byte":
        alphabet = bytes_to_unicode()
        tok = _byte_level_bpe({alphabet[b]: b for b in range(256)}, [], pattern=None)
        _add_specials(tok, [(tokenizer.eos_token, tokenizer.eos_id), (tokenizer.pad_token, tokenizer.pad_id)])
        info["split_special_tokens"] = True
    elif family == "tiktoken":
        tok = _tiktoken_as_hf(tokenizer)
        info["split_special_tokens"] = True
    elif family == "hf":
        tok, config = _hf_with_added_tokens(tokenizer)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save(tmp)
            files = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
        info.update(hf_tokenizer=False, note=(
            f"no HF fast tokenizer is written for the {family} family (no conversion known to give the same "
            f"ids); its file is copied as is. Tokenize with megapmp's tokenizer (megapmp.data.tokenizers."
            f"load_tokenizer on this directory's {', '.join(sorted(files))})."))
        return files, info

    tok.no_truncation()
    tok.no_padding()
    config.update({
        # The generic fast class loads tokenizer.json as is; model-specific classes may rebuild it.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": info["split_special_tokens"],
    })
    config.setdefault("bos_token", None)
    config.setdefault("unk_token", None)
    files = {"tokenizer.json": tok.to_str().encode("utf-8"),
             "tokenizer_config.json": (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode("utf-8")}
    check_hf_tokenizer(files, info, tokenizer)
    return files, info


def _tiktoken_as_hf(tokenizer):
    from megapmp.data.tokenizers import CL100K_PATTERN, parse_tiktoken_ranks

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tokenizer.save(tmp).partition(":")[2])
        ranks = parse_tiktoken_ranks(path.read_bytes(), str(path))
    alphabet = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    # tiktoken merges the adjacent pair whose concatenation has the lowest rank; a merge for every
    # split of every token, prioritised by the merged token's rank, makes HF's BPE do the same.
    merges = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    tok = _byte_level_bpe({text(t): r for t, r in ranks.items()}, [(text(l), text(r)) for *_, l, r in merges],
                          pattern=CL100K_PATTERN)
    _add_specials(tok, [(tokenizer.eos_token, tokenizer.eos_id), (tokenizer.pad_token, tokenizer.pad_id)])
    return tok


def _hf_with_added_tokens(tokenizer):
    from tokenizers import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tokenizer.save(tmp).partition(":")[2])
        tok = Tokenizer.from_str(path.read_text(encoding="utf-8"))
        config_path = path.parent / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    # The appended tokens (an added <|pad|>) take the ids after the file's vocabulary, in order.
    first = tokenizer.vocab_size - len(tokenizer.added_tokens)
    _add_specials(tok, [(content, first + i) for i, content in enumerate(tokenizer.added_tokens)])
    return tok, config


def export_tokenizer(tokenizer, directory: Path) -> dict:
    """Write the tokenizer into ``directory/tokenizer/`` and, where that loads exactly, also at the top.

    transformers >= 5 loads the tokenizer of a directory whose config.json says qwen2 as Qwen2Tokenizer,
    which keeps tokenizer.json's vocabulary and merges but rebuilds the normalizer (NFC) and the
    pre-tokenizer as Qwen2's: exact for Qwen2's own tokenizer, not for tokenizers built otherwise. The
    subdirectory has no config.json, so AutoTokenizer loads it as written, in every version. The top
    level gets the files only when AutoTokenizer, as installed, gives our ids from there; the returned
    info's "path" names the place a scorer should load from.
    """
    files, info = hf_tokenizer_files(tokenizer)
    subdirectory = directory / TOKENIZER_SUBDIR
    subdirectory.mkdir()
    for name, data in files.items():
        (subdirectory / name).write_bytes(data)
    info.update(path=TOKENIZER_SUBDIR, top_level=False, checked_with=None)
    if not info["hf_tokenizer"]:
        return info
    try:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import transformers
    except ImportError:  # checked with `tokenizers` only; written at the top level as for transformers 4
        info["checked_with"] = "tokenizers"
    else:
        info["checked_with"] = f"transformers {transformers.__version__}"
        problems = transformers_tokenizer_problems(subdirectory, tokenizer)
        if problems:
            raise ConvertError(f"transformers loads the exported {tokenizer.family} tokenizer with other ids than "
                               "ours: " + "; ".join(problems))
    for name, data in files.items():
        (directory / name).write_bytes(data)
    problems = transformers_tokenizer_problems(directory, tokenizer) if info["checked_with"] != "tokenizers" else []
    if problems:
        for name in files:
            (directory / name).unlink()
        info["note"] = (
            f"{info['checked_with']} loads a tokenizer from a qwen2 model directory as Qwen2Tokenizer, rebuilt "
            f"with Qwen2's NFC normalizer and pre-tokenizer, which give other ids for this {tokenizer.family} "
            f"tokenizer ({problems[0]}); so it is not written at the top level. Load it with "
            f"AutoTokenizer.from_pretrained(DIR/{TOKENIZER_SUBDIR}) (vLLM: --tokenizer DIR/{TOKENIZER_SUBDIR})")
    else:
        info.update(path=".", top_level=True)
    return info


def transformers_tokenizer_problems(directory: Path, tokenizer) -> list[str]:
    """How AutoTokenizer.from_pretrained(directory) differs from ours on the check texts (empty: not at all)."""
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(directory))
    except Exception as e:  # whatever transformers raises, the answer is "not loadable from here"
        return [f"AutoTokenizer.from_pretrained failed: {type(e).__name__}: {e}"]
    problems = [f"{name}_token_id {got} != {wanted}"
                for name, got, wanted in (("eos", hf.eos_token_id, tokenizer.eos_id),
                                          ("pad", hf.pad_token_id, tokenizer.pad_id)) if got != wanted]
    for text in TOKENIZER_CHECK_TEXTS:
        theirs, ours = hf(text, add_special_tokens=False)["input_ids"], tokenizer.encode(text)
        if theirs != ours:
            problems.append(f"{text[:24]!r} -> {theirs[:8]}..., ours {ours[:8]}...")
    return problems


def check_hf_tokenizer(files: dict[str, bytes], info: dict, tokenizer) -> None:
    """Refuse an exported tokenizer that gives other ids than ours on a few texts."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
    tok.encode_special_tokens = info["split_special_tokens"]
    problems = [f"{name} {token!r} is id {tok.token_to_id(token)}, ours {wanted}"
                for name, token, wanted in (("eos", tokenizer.eos_token, tokenizer.eos_id),
                                            ("pad", tokenizer.pad_token, tokenizer.pad_id))
                if tok.token_to_id(token) != wanted]
    for text in TOKENIZER_CHECK_TEXTS:
        theirs, ours = tok.encode(text, add_special_tokens=False).ids, tokenizer.encode(text)
        if theirs != ours:
            problems.append(f"{text[:30]!r} -> {theirs[:12]} ..., ours {ours[:12]} ...")
    if problems:
        raise ConvertError(f"the HF form of the {tokenizer.family} tokenizer gives other ids than ours: "
                           + "; ".join(problems))


# ---------------------------------------------------------------------------------------------------
# to-hf


def scoring_record(spec: ScoringSpec, tokenizer_info: dict, model_config, *, lm_head: dict, source: dict) -> dict:
    tok = spec.tokenizer
    return {
        "format": SCORING_FORMAT,
        "version": SCORING_VERSION,
        "model_class": "Qwen2ForSequenceClassification",
        "template": {"name": spec.template.get("name"), "text": spec.template["text"], "placeholder": "{prompt}"},
        "eos_policy": spec.eos_policy,
        "eos_token_id": spec.eos_id,
        "eos_token": tok.eos_token,
        "pad_token_id": spec.pad_id,
        "pad_token": tok.pad_token,
        "add_special_tokens": False,
        "tokenize_separately": True,
        "input_ids": INPUT_RECIPE,
        "reward": REWARD_RECIPE,
        "max_length": spec.max_length,
        "overlong": spec.overlong,
        "tokenizer": {**tokenizer_info, "vocab_size": tok.vocab_size, "added_tokens": list(tok.added_tokens)},
        "model_vocab_size": model_config.vocab_size,
        "lm_head": lm_head,
        "source": source,
    }


def export_to_hf(input_path, output, *, dtype: str = "float32", with_lm_head: bool = False,
                 overwrite: bool = False, shard: str | None = None, tokenizer_spec: str | None = None) -> dict:
    """Write the HF directory; returns a summary (also printed by the CLI)."""
    output = Path(output)
    checkpoint = resolve_checkpoint(input_path)
    _check_output(output, overwrite, [checkpoint])
    if dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    state = read_trainer_state(checkpoint)
    config = checkpoint_model_config(checkpoint, state)

    import torch
    from safetensors.torch import save_file

    from megapmp.convert.hf import LM_HEAD_FILE, save_hf_directory

    state_dict = load_checkpoint_weights(checkpoint, config)
    if "score.weight" not in state_dict:
        raise ConvertError(f"{checkpoint} has no reward head (score.weight; e.g. imported from a causal LM): "
                           "train it first, it is no reward model yet")
    warnings = []
    if state.get("config", {}).get("loss", {}).get("rm_coef", 1) == 0:
        warnings.append("this checkpoint was trained with loss.rm_coef = 0: its reward head is untrained")
    spec = scoring_spec(checkpoint, state, shard=shard, tokenizer_spec=tokenizer_spec)
    if spec.tokenizer.vocab_size > config.vocab_size:
        raise ConvertError(f"the tokenizer has {spec.tokenizer.vocab_size} tokens, the model only "
                           f"{config.vocab_size} embedding rows")
    torch_dtype = getattr(torch, dtype)
    state_dict = {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in state_dict.items()}

    if config.tie_word_embeddings:
        lm_head = {"tied": True, "file": "model.safetensors", "key": "model.embed_tokens.weight"}
    elif with_lm_head:
        lm_head = {"tied": False, "file": "model.safetensors", "key": "lm_head.weight"}
    else:
        lm_head = {"tied": False, "file": LM_HEAD_FILE, "key": "lm_head.weight"}
    step = state.get("step")
    source = {"checkpoint": str(checkpoint.resolve()), "step": step, "data": spec.origin}

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        export = staging / "export"
        try:
            save_hf_directory(state_dict, config, export, pad_token_id=spec.pad_id, eos_token_id=spec.eos_id,
                              include_lm_head=with_lm_head,
                              extra={"megapmp": {"step": step, "scoring": SCORING_FILE, "lm_head": lm_head}})
        except ValueError as e:
            raise ConvertError(str(e)) from None
        if lm_head["file"] == LM_HEAD_FILE:
            save_file({"lm_head.weight": state_dict["lm_head.weight"].contiguous()}, str(export / LM_HEAD_FILE),
                      metadata={"format": "pt"})
        tokenizer_info = export_tokenizer(spec.tokenizer, export)
        scoring = scoring_record(spec, tokenizer_info, config, lm_head=lm_head, source=source)
        (export / SCORING_FILE).write_text(json.dumps(scoring, indent=2, ensure_ascii=False) + "\n")
        files = sorted(p.name for p in export.iterdir())
        _publish(export, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if tokenizer_info["note"]:
        warnings.append(tokenizer_info["note"])
    for warning in warnings:
        log(f"warning: {warning}")
    return {"output": str(output), "checkpoint": str(checkpoint), "step": step, "dtype": dtype,
            "warnings": warnings,
            "tokenizer": tokenizer_info["family"], "hf_tokenizer": tokenizer_info["hf_tokenizer"],
            "tokenizer_path": tokenizer_info["path"],
            "eos_token_id": spec.eos_id, "pad_token_id": spec.pad_id, "files": files}


# ---------------------------------------------------------------------------------------------------
# from-hf


def import_from_hf(input_path, output, *, overwrite: bool = False) -> dict:
    """Write a megapmp checkpoint directory (model.safetensors + trainer.json) from an HF directory."""
    source, output = Path(input_path), Path(output)
    if not source.is_dir():
        raise ConvertError(f"{source}: no such directory" if not source.exists() else
                           f"{source} is a file, not an HF model directory")
    if not (source / "config.json").is_file():
        hint = " (it is a megapmp checkpoint: use to-hf)" if (source / "trainer.json").exists() else ""
        raise ConvertError(f"{source} is not an HF model directory: no config.json{hint}")
    _check_output(output, overwrite, [source])
    try:
        hf_config = json.loads((source / "config.json").read_text())
    except ValueError as e:
        raise ConvertError(f"{source / 'config.json'}: malformed JSON ({e})") from None

    from safetensors.torch import save_file

    from megapmp.convert.hf import (LM_HEAD_FILE, TOKENIZER_FILES, from_hf_config, from_hf_state_dict,
                                    load_hf_state_dict, merge_separate_lm_head)

    try:
        config = from_hf_config(json.loads((source / "config.json").read_text()))
        hf_state = load_hf_state_dict(source)
        used_lm_head_file = merge_separate_lm_head(source, config, hf_state)
        imported = from_hf_state_dict(hf_state, config)
    except Exception as e:  # malformed config, missing or foreign weights, a refused pickle
        raise ConvertError(f"{source}: {type(e).__name__}: {e}") from None
    state_dict = dict(imported.state_dict)
    if config.tie_word_embeddings:
        state_dict.pop("lm_head.weight")
    if not imported.has_score:
        state_dict.pop("score.weight")  # the trainer then starts a fresh reward head

    scoring = None
    if (source / SCORING_FILE).is_file():
        scoring = json.loads((source / SCORING_FILE).read_text())
    notes = []
    if not imported.has_score:
        notes.append("no reward head (score.weight) in the HF checkpoint: the trainer initialises a fresh one")
    if not imported.has_lm_head:
        notes.append("untied model without lm_head.weight: the LM head was zero-filled")
    trainer_state = {
        "format": IMPORT_FORMAT,
        "step": 0,
        "config": {"model": asdict(config)},
        "has_reward_head": imported.has_score,
        "has_lm_head": imported.has_lm_head,
        "imported_from": {
            "path": str(source.resolve()),
            "architectures": hf_config.get("architectures"),
            "pad_token_id": hf_config.get("pad_token_id"),
            "eos_token_id": hf_config.get("eos_token_id"),
            "dtype": hf_config.get("dtype", hf_config.get("torch_dtype")),
            "lm_head_file": LM_HEAD_FILE if used_lm_head_file else None,
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
        # An export's tokenizer/ loads as written; the top level may lack it (see export_tokenizer).
        tokenizer_source = source / TOKENIZER_SUBDIR if (source / TOKENIZER_SUBDIR).is_dir() else source
        tokenizer_files = [tokenizer_source / name for name in TOKENIZER_FILES
                           if (tokenizer_source / name).is_file()]
        if tokenizer_files:
            (staging / IMPORTED_TOKENIZER_DIR).mkdir()
            for path in tokenizer_files:
                shutil.copy2(path, staging / IMPORTED_TOKENIZER_DIR / path.name)
        if scoring is not None:
            shutil.copy2(source / SCORING_FILE, staging / SCORING_FILE)
        _publish(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for note in notes:
        log(f"note: {note}")
    overrides = " ".join(f"--model.{k} {str(v).lower() if isinstance(v, bool) else v}"
                         for k, v in asdict(config).items())
    return {"output": str(output), "has_reward_head": imported.has_score, "has_lm_head": imported.has_lm_head,
            "tied": config.tie_word_embeddings, "files": sorted(p.name for p in output.iterdir()),
            "train_with": f"--checkpoint.init_from {output} {overrides}"}


# ---------------------------------------------------------------------------------------------------
# verify


def _load_pairs(path: str | None, limit: int) -> list[dict]:
    if path is None:
        return list(DEFAULT_VERIFY_PAIRS)[:limit]
    pairs = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                pairs.append({k: record[k] for k in ("prompt", "chosen", "rejected")})
            except (ValueError, KeyError, TypeError) as e:
                raise ConvertError(f"{path}:{line_no}: not a pair with prompt/chosen/rejected ({e})") from None
            if len(pairs) == limit:
                break
    if not pairs:
        raise ConvertError(f"{path}: no pairs")
    return pairs


def verify(checkpoint_path, hf_dir, *, pairs_file: str | None = None, limit: int = 8, atol: float = 1e-4,
           shard: str | None = None, tokenizer_spec: str | None = None) -> dict:
    """Compare input ids and scores of a checkpoint and an HF directory on the same text pairs."""
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise ConvertError(f"{hf_dir} is not an HF model directory: no config.json")
    checkpoint = resolve_checkpoint(checkpoint_path)
    state = read_trainer_state(checkpoint)
    config = checkpoint_model_config(checkpoint, state)
    spec = scoring_spec(checkpoint, state, shard=shard, tokenizer_spec=tokenizer_spec)
    pairs = _load_pairs(pairs_file, limit)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from megapmp.data.datasets import Pair
    from megapmp.eval.scoring import score_pairs
    from megapmp.model import Qwen2RewardModel

    scoring = json.loads((hf_dir / SCORING_FILE).read_text()) if (hf_dir / SCORING_FILE).is_file() else None
    if scoring is None:
        raise ConvertError(f"{hf_dir} has no {SCORING_FILE}: not a megapmp export")
    hf_model = AutoModelForSequenceClassification.from_pretrained(hf_dir, dtype=torch.float32).eval()
    export_dtype = str(json.loads((hf_dir / "config.json").read_text()).get("torch_dtype", "float32"))

    # Ours at the export's precision: weights rounded through its dtype, computed in fp32 like HF here.
    state_dict = load_checkpoint_weights(checkpoint, config)
    if export_dtype in DTYPES:
        state_dict = {k: v.to(getattr(torch, export_dtype)).float() if v.is_floating_point() else v
                      for k, v in state_dict.items()}
    model = Qwen2RewardModel(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    model.tie_weights()
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise ConvertError(f"{checkpoint}: weights do not fit the model config (missing {missing}, "
                           f"unexpected {unexpected})")

    ours_pairs, hf_rows = [], []
    if scoring["tokenizer"].get("hf_tokenizer"):
        hf_tok = AutoTokenizer.from_pretrained(hf_dir / scoring["tokenizer"].get("path", "."))
        template = scoring["template"]["text"]
        eos = [scoring["eos_token_id"]] if scoring["eos_policy"] == "response" else []

        def hf_ids(text: str) -> list[int]:
            return hf_tok(text, add_special_tokens=False)["input_ids"]
    else:
        hf_tok = None
    id_mismatches = 0
    for pair in pairs:
        prompt, (chosen, rejected) = encode_pair_texts(spec, pair["prompt"], [pair["chosen"], pair["rejected"]])
        ours_pairs.append(Pair(np.asarray(prompt), np.asarray(chosen), np.asarray(rejected)))
        for response, ids in ((pair["chosen"], chosen), (pair["rejected"], rejected)):
            if hf_tok is None:
                hf_rows.append(prompt + ids)
                continue
            row = hf_ids(template.replace("{prompt}", pair["prompt"])) + hf_ids(response) + eos
            id_mismatches += row != prompt + ids
            hf_rows.append(row)

    longest = max(len(p.prompt) + max(len(p.chosen), len(p.rejected)) for p in ours_pairs)
    r_c, r_r = score_pairs(model, ours_pairs, seq_len=2 * longest, layout="duplicated", pad_id=spec.pad_id,
                           device="cpu")
    ours = np.stack([r_c, r_r], axis=1).reshape(-1)
    pad = scoring["pad_token_id"]
    width = max(len(r) for r in hf_rows)
    input_ids = torch.full((len(hf_rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, row in enumerate(hf_rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    with torch.no_grad():
        theirs = hf_model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].double().numpy()
    max_diff = float(np.abs(ours - theirs).max())
    ok = id_mismatches == 0 and max_diff <= atol
    return {"ok": ok, "pairs": len(pairs), "sequences": len(hf_rows), "id_mismatches": id_mismatches,
            "tokenizer_checked": hf_tok is not None, "max_abs_diff": max_diff, "atol": atol,
            "export_dtype": export_dtype, "checkpoint": str(checkpoint)}


# ---------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convert_checkpoint.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{to-hf,from-hf,verify}")

    data_help = dict(
        shard=("take the tokenizer, template and EOS policy from this shard prefix (made like the training "
               "data; checked against trainer.json) instead of the training shards recorded in trainer.json"),
        tokenizer=("load the training tokenizer from this spec or directory (e.g. a moved PREFIX.tokenizer/); "
                   "it must match the identity recorded with the training data"),
    )

    to_hf = sub.add_parser("to-hf", help="megapmp checkpoint -> HF Qwen2ForSequenceClassification directory",
                           description="Export a megapmp checkpoint as an HF Qwen2ForSequenceClassification "
                                       "directory whose scores equal megapmp's rewards.")
    to_hf.add_argument("--input", required=True, metavar="CKPT",
                       help="a checkpoint step directory (step_XXXXXXXX/), or a run or checkpoints directory "
                            "(its newest complete checkpoint is taken)")
    to_hf.add_argument("--output", required=True, metavar="DIR",
                       help="the HF directory to write (refused if it exists, unless --overwrite; never the input "
                            "or a directory holding it)")
    to_hf.add_argument("--dtype", default="float32", choices=DTYPES,
                       help="dtype of the written weights (default float32, the checkpoint's own)")
    to_hf.add_argument("--with-lm-head", action="store_true",
                       help="put an untied model's lm_head.weight into model.safetensors, so the directory also "
                            "loads as Qwen2ForCausalLM (the sequence classifier then reports it as an unexpected "
                            "key); default: write it to lm_head.safetensors. A tied model needs neither")
    to_hf.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    to_hf.add_argument("--shard", default=None, metavar="PREFIX", help=data_help["shard"])
    to_hf.add_argument("--tokenizer", default=None, metavar="SPEC", help=data_help["tokenizer"])

    from_hf = sub.add_parser("from-hf", help="HF Qwen2 directory -> megapmp checkpoint (for checkpoint.init_from)",
                             description="Import an HF Qwen2ForCausalLM or Qwen2ForSequenceClassification "
                                         "directory as a megapmp checkpoint directory (model.safetensors + "
                                         "trainer.json) that the trainer takes as checkpoint.init_from.")
    from_hf.add_argument("--input", required=True, metavar="DIR",
                         help="HF directory: config.json and model.safetensors (sharded safetensors and "
                              "pytorch_model.bin are read too, the latter without unpickling objects); an "
                              "lm_head.safetensors beside them (from to-hf) supplies an untied LM head")
    from_hf.add_argument("--output", required=True, metavar="CKPT",
                         help="the checkpoint directory to write: model.safetensors, trainer.json (model config, "
                              "whether the reward head was present), tokenizer/ and megapmp_scoring.json when the "
                              "HF directory has them")
    from_hf.add_argument("--overwrite", action="store_true", help="replace --output if it exists")

    check = sub.add_parser("verify", help="compare a checkpoint's and its HF export's ids and scores",
                           description="Score text pairs with a megapmp checkpoint and with its HF export "
                                       "(transformers AutoTokenizer + AutoModelForSequenceClassification and "
                                       "megapmp_scoring.json only); exit 1 if ids differ or scores differ by "
                                       "more than --atol.")
    check.add_argument("--checkpoint", required=True, metavar="CKPT", help="as to-hf --input")
    check.add_argument("--hf", required=True, metavar="DIR", help="the HF directory written by to-hf")
    check.add_argument("--pairs", default=None, metavar="FILE",
                       help="JSONL of {prompt, chosen, rejected} text pairs (default: a few built-in code pairs)")
    check.add_argument("--limit", type=int, default=8, metavar="N", help="score at most N pairs (default 8)")
    check.add_argument("--atol", type=float, default=1e-4,
                       help="largest allowed |score difference| (default 1e-4; weights are compared at the "
                            "export's dtype)")
    check.add_argument("--shard", default=None, metavar="PREFIX", help=data_help["shard"])
    check.add_argument("--tokenizer", default=None, metavar="SPEC", help=data_help["tokenizer"])
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "to-hf":
            result = export_to_hf(args.input, args.output, dtype=args.dtype, with_lm_head=args.with_lm_head,
                                  overwrite=args.overwrite, shard=args.shard, tokenizer_spec=args.tokenizer)
        elif args.command == "from-hf":
            result = import_from_hf(args.input, args.output, overwrite=args.overwrite)
        else:
            if args.limit < 1:
                raise ConvertError(f"--limit {args.limit} must be at least 1")
            result = verify(args.checkpoint, args.hf, pairs_file=args.pairs, limit=args.limit, atol=args.atol,
                            shard=args.shard, tokenizer_spec=args.tokenizer)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    if args.command == "verify" and not result["ok"]:
        print(f"error: the export does not match: {result['id_mismatches']} id mismatches, max |score "
              f"difference| {result['max_abs_diff']:.3g} > {result['atol']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

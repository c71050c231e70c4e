"""Self-describing shards: `PREFIX.bin` + `PREFIX.idx` (MMIDIDX v1) + `PREFIX.json` sidecar, and the
tokenizer they were made with saved beside them in `PREFIX.tokenizer/`; a shard of response groups
(kind "groups", megapmp/data/groups.py) also has `PREFIX.labels`, one float64 per sequence.

The sidecar records everything a reader needs to use the tokens the same way they were made: the
tokenizer identity and vocabulary sizes, the prompt template, the EOS and truncation policies, counts,
and sha256 checksums and sizes of both binary files.

Opening a shard (`open_shard`) is cheap and always checks: the index's own consistency and the `.bin`
size (megapmp/data/indexed.py), then that the sidecar's dtype, counts and recorded file sizes agree with
the index. `verify_shard` adds the full check on demand: both files' sha256 against the sidecar (this
reads every byte; `python tools/preprocess_pairs.py verify PREFIX` or the trainer's `--data.verify full`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from megapmp.data.groups import LABELS_DTYPE, labels_path
from megapmp.data.indexed import IndexedDataset, ShardError, bin_path, idx_path, merge_shards
from megapmp.io import sha256_file, write_text_atomic

SIDECAR_FORMAT = "megapmp-shard"
SIDECAR_VERSION = 1
KINDS = ("pairs", "documents", "groups")


def group_labels_meta() -> dict:
    """What a group shard's sidecar records about PREFIX.labels (the layout megapmp/data/groups.py specifies)."""
    return {"file": "PREFIX.labels", "dtype": "float64 little-endian", "per": "sequence of the index",
            "prompt": "NaN", "pairs": "labels[i] > labels[j] within a group; ties make no pair"}
EOS_POLICIES = ("response", "none")  # the EOS policies of tools/preprocess_pairs.py --eos-policy


def recipe_problems(template_text, eos_policy, eos_id, pad_id, vocab_size: int) -> list[str]:
    """Why texts cannot be made into a model's inputs by this recipe (template, EOS policy, eos/pad ids, over
    a vocabulary of `vocab_size` ids); empty when they can. The one statement of these rules: a shard's
    sidecar is held to them at every open (so the trainer refuses data at start, not its checkpoint at
    evaluation), and a scoring recipe when a scorer or an export is built (megapmp.convert.source)."""
    problems = []
    if eos_policy not in EOS_POLICIES:
        problems.append(f"eos_policy {eos_policy!r} is not one of {', '.join(EOS_POLICIES)}")
    if not isinstance(template_text, str) or "{prompt}" not in template_text:
        problems.append("the template has no {prompt} placeholder")
    for name, value in (("eos_id", eos_id), ("pad_id", pad_id)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size:
            problems.append(f"{name} {value!r} is outside the vocabulary [0, {vocab_size})")
    if eos_policy == "response" and eos_id == pad_id:
        problems.append(f"pad_id equals eos_id ({eos_id}): the reward is read at the EOS, and a padded batch "
                        f"(HF's sequence classifier pools the last token that is not padding) cannot tell it from padding")
    return problems


def sidecar_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}.json")


def tokenizer_dir(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}.tokenizer")


@dataclass
class ShardMeta:
    kind: str  # "pairs": documents of (prompt, chosen, rejected); "documents": one sequence each;
    # "groups": documents of (prompt, response 1, ..., response K), their labels in PREFIX.labels
    tokenizer: dict  # Tokenizer.identity(), with "spec" relative to the sidecar's folder
    vocab_size: int
    padded_vocab_size: int  # vocab_size rounded up for tensor parallelism (recorded multiple)
    vocab_multiple: int
    eos_id: int
    pad_id: int
    dtype: str
    template: dict = field(default_factory=lambda: {"name": "none", "text": "{prompt}"})
    eos_policy: str = "response"
    max_length: int | None = None
    overlong: str = "error"
    counts: dict = field(default_factory=dict)
    checksums: dict = field(default_factory=dict)
    sizes: dict = field(default_factory=dict)  # {"bin": bytes, "idx": bytes}; absent in older sidecars
    inputs: list = field(default_factory=list)
    # A pairwise judge's samples (megapmp.data.judge.JudgeFormat.to_meta): template, labels and their token
    # ids. None for ordinary pairs and documents.
    judge: dict | None = None
    # A group shard's labels file (group_labels_meta); None for pairs and documents.
    labels: dict | None = None
    format: str = SIDECAR_FORMAT
    version: int = SIDECAR_VERSION

    def save(self, prefix: str | os.PathLike) -> None:
        write_text_atomic(sidecar_path(prefix), json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, prefix: str | os.PathLike) -> "ShardMeta":
        path = sidecar_path(prefix)
        if not path.exists():
            raise FileNotFoundError(f"{path}: shard sidecar missing (is {prefix} a megapmp shard prefix?)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ShardError(f"{path}: unreadable shard sidecar ({e})") from None
        if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT or data.get("version") != SIDECAR_VERSION:
            raise ShardError(f"{path}: not a {SIDECAR_FORMAT} v{SIDECAR_VERSION} sidecar")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ShardError(f"{path}: unknown sidecar fields {', '.join(unknown)}")
        try:
            meta = cls(**data)
        except TypeError as e:  # a required field missing
            raise ShardError(f"{path}: not a complete sidecar ({e})") from None
        problems = meta.recipe_problems()
        if problems:
            raise ShardError(f"{path}: {'; '.join(problems)}: a scorer would refuse a model trained on this data "
                             f"(remake the shard with tools/preprocess_pairs.py)")
        return meta

    def recipe_problems(self) -> list[str]:
        """`recipe_problems` of this data, plus: the eos/pad ids are those of the tokenizer it records (a
        scorer loads that tokenizer and refuses ids that differ)."""
        template = self.template.get("text") if isinstance(self.template, dict) else None
        problems = recipe_problems(template, self.eos_policy, self.eos_id, self.pad_id, self.vocab_size)
        recorded = self.tokenizer if isinstance(self.tokenizer, dict) else {}
        for name in ("eos_id", "pad_id"):
            if name in recorded and recorded[name] != getattr(self, name):
                problems.append(f"{name} {getattr(self, name)!r} is not the tokenizer's ({recorded[name]!r})")
        return problems


def _data_files(prefix: str | os.PathLike, kind: str = "pairs") -> dict:
    """The binary files of a shard of ``kind`` by key: bin and idx, and labels for groups."""
    files = {"bin": bin_path(prefix), "idx": idx_path(prefix)}
    if kind == "groups":
        files["labels"] = labels_path(prefix)
    return files


def shard_checksums(prefix: str | os.PathLike, kind: str = "pairs") -> dict:
    return {f"{key}_sha256": sha256_file(path) for key, path in _data_files(prefix, kind).items()}


def shard_sizes(prefix: str | os.PathLike, kind: str = "pairs") -> dict:
    return {key: os.path.getsize(path) for key, path in _data_files(prefix, kind).items() if path.is_file()}


def shard_files(prefix: str | os.PathLike) -> list[Path]:
    """Every path a shard occupies."""
    return [bin_path(prefix), idx_path(prefix), sidecar_path(prefix), tokenizer_dir(prefix), labels_path(prefix)]


class OutputError(ValueError):
    """An output that cannot be written where asked, or that would destroy an existing file."""


def refuse_existing_output(prefix: str | os.PathLike, overwrite: bool) -> None:
    existing = [str(p) for p in shard_files(prefix) if p.exists()]
    if existing and not overwrite:
        raise OutputError(f"{prefix}: a shard already exists there ({', '.join(existing)}); "
                          f"pass --overwrite to replace it")


def make_staging_dir(prefix: str | os.PathLike) -> Path:
    """A fresh temporary directory beside `prefix` (same file system, so the final renames are atomic)."""
    parent = Path(prefix).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{Path(prefix).name}.", dir=parent))
    except OSError as e:
        raise OutputError(f"{parent}: cannot write the output there ({e.strerror or e})") from None


def check_meta(prefix: str | os.PathLike, meta: ShardMeta, index: IndexedDataset) -> None:
    """The cheap at-open check: the sidecar's dtype, counts and recorded sizes agree with the index
    and the files (fields an older sidecar lacks are not checked)."""
    problems = []
    if meta.dtype != index.dtype.name:
        problems.append(f"dtype {meta.dtype} in the sidecar, {index.dtype.name} in the index")
    unit = meta.kind if meta.kind in ("pairs", "groups") else "documents"
    recorded = {unit: index.num_documents, "sequences": index.num_sequences,
                "tokens": int(index.sequence_lengths.sum(dtype=np.int64))}
    for key, actual in recorded.items():
        if key in meta.counts and meta.counts[key] != actual:
            problems.append(f"{key}: {meta.counts[key]} in the sidecar, {actual} in the index")
    if meta.kind == "groups" and "responses" in meta.counts \
            and meta.counts["responses"] != index.num_sequences - index.num_documents:
        problems.append(f"responses: {meta.counts['responses']} in the sidecar, "
                        f"{index.num_sequences - index.num_documents} in the index")
    if meta.kind == "groups" and not labels_path(prefix).is_file():
        problems.append(f"{labels_path(prefix)}, the labels of a group shard, is missing")
    for key, actual in shard_sizes(prefix, meta.kind).items():
        if key in meta.sizes and meta.sizes[key] != actual:
            problems.append(f"{prefix}.{key} is {actual} bytes, the sidecar recorded {meta.sizes[key]}")
    if problems:
        raise ShardError(f"{sidecar_path(prefix)}: does not match the shard: {'; '.join(problems)}")


def verify_shard(prefix: str | os.PathLike, progress=None) -> ShardMeta:
    """The full check: open the shard (cheap checks), then hash both files against the sidecar.

    Raises ShardError naming the file whose checksum differs. `progress`, if given, is called with
    the number of bytes hashed so far, block by block.
    """
    meta = ShardMeta.load(prefix)
    check_meta(prefix, meta, IndexedDataset(prefix))
    if not meta.checksums:
        raise ShardError(f"{sidecar_path(prefix)}: records no checksums to verify against")
    for name, path in _data_files(prefix, meta.kind).items():
        key = f"{name}_sha256"
        if meta.checksums.get(key) != sha256_file(path, progress):
            raise ShardError(f"{path}: sha256 differs from the sidecar's {key}: the file is damaged "
                             f"(or was changed after preprocessing)")
    return meta


def verify_shards(prefixes: list[str], progress: bool = True) -> list[ShardMeta]:
    """`verify_shard` for each prefix, with one progress bar over all their bytes."""
    from tqdm import tqdm

    total = sum(os.path.getsize(p) for prefix in prefixes for p in _data_files(prefix, "groups").values()
                if p.is_file())
    metas = []
    with tqdm(total=total, unit="B", unit_scale=True, desc="verify shards", disable=not progress,
              dynamic_ncols=True, mininterval=0.5) as bar:
        for prefix in prefixes:
            metas.append(verify_shard(prefix, bar.update))
    return metas


def load_shard_tokenizer(prefix: str | os.PathLike):
    """The tokenizer a shard was made with, from the copy saved beside it."""
    from megapmp.data.tokenizers import load_tokenizer

    spec = ShardMeta.load(prefix).tokenizer["spec"]
    if spec != "byte":
        spec = str(Path(prefix).parent / spec)
    return load_tokenizer(spec)


def _tokenizers_match(a: dict, b: dict) -> bool:
    ignore = {"spec"}
    return {k: v for k, v in a.items() if k not in ignore} == {k: v for k, v in b.items() if k not in ignore}


def merge_shard_set(prefixes: list[str], output_prefix: str, overwrite: bool = False) -> ShardMeta:
    """Merge shards written as separate partitions (same tokenizer, template and policies) into one.

    Refuses an existing `output_prefix` unless `overwrite`, and an output that is one of the inputs."""
    refuse_existing_output(output_prefix, overwrite)
    target = Path(output_prefix).resolve()
    if any(Path(p).resolve() == target for p in prefixes):
        raise OutputError(f"{output_prefix}: is also an input of the merge")
    metas = [open_shard(p)[1] for p in prefixes]
    first = metas[0]
    for prefix, meta in zip(prefixes[1:], metas[1:]):
        mismatched = [name for name in ("kind", "vocab_size", "eos_id", "pad_id", "dtype", "template", "eos_policy",
                                        "max_length", "overlong", "judge")
                      if getattr(meta, name) != getattr(first, name)]
        if not _tokenizers_match(meta.tokenizer, first.tokenizer):
            mismatched.append("tokenizer")
        if mismatched:
            raise ValueError(f"cannot merge {prefix} into {prefixes[0]}: they differ in {', '.join(mismatched)}")
    shutil.rmtree(make_staging_dir(output_prefix))  # fail early, with the folder named, if it is not writable
    if first.kind == "groups":
        _merge_labels(prefixes, output_prefix)
    merge_shards(prefixes, output_prefix)
    counts = {}
    for meta in metas:
        for key, value in meta.counts.items():
            if isinstance(value, (int, float)) and not key.endswith("_per_s"):
                counts[key] = counts.get(key, 0) + value
    merged = ShardMeta(**{**asdict(first), "counts": counts, "inputs": [i for m in metas for i in m.inputs],
                          "checksums": shard_checksums(output_prefix, first.kind),
                          "sizes": shard_sizes(output_prefix, first.kind)})
    _copy_tokenizer(prefixes[0], output_prefix, merged)
    merged.save(output_prefix)
    return merged


def _merge_labels(prefixes: list[str], output_prefix: str) -> None:
    """The labels of merged group shards: the inputs' files back to back (merge_shards keeps every sequence's
    order), written under a temporary name and renamed, before the token files."""
    target = labels_path(output_prefix)
    staging = make_staging_dir(output_prefix)
    try:
        with open(staging / "labels", "wb") as out:
            for prefix in prefixes:
                index = IndexedDataset(prefix)
                path = labels_path(prefix)
                if not path.is_file() or os.path.getsize(path) != LABELS_DTYPE.itemsize * index.num_sequences:
                    raise ShardError(f"{path}: missing, or not one float64 label per sequence of {prefix}")
                with open(path, "rb") as f:
                    shutil.copyfileobj(f, out, length=8 << 20)
        os.replace(staging / "labels", target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _copy_tokenizer(src_prefix: str, dst_prefix: str, meta: ShardMeta) -> None:
    if meta.tokenizer["spec"] == "byte":
        return
    src, dst = tokenizer_dir(src_prefix), tokenizer_dir(dst_prefix)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    meta.tokenizer = {**meta.tokenizer, "spec": dst.name}


def open_shard(prefix: str | os.PathLike, kind: str | None = None) -> tuple[IndexedDataset, ShardMeta]:
    """Open a shard with the cheap checks (module docstring); raises ShardError naming what is wrong."""
    meta = ShardMeta.load(prefix)
    if kind is not None and meta.kind != kind:
        raise ShardError(f"{prefix}: holds {meta.kind}, expected {kind}")
    index = IndexedDataset(prefix)
    check_meta(prefix, meta, index)
    return index, meta

"""Self-describing shards: `PREFIX.bin` + `PREFIX.idx` (MMIDIDX v1) + `PREFIX.json` sidecar, and the
tokenizer they were made with saved beside them in `PREFIX.tokenizer/`.

The sidecar records everything a reader needs to use the tokens the same way they were made: the
tokenizer identity and vocabulary sizes, the prompt template, the EOS and truncation policies, counts,
and sha256 checksums of both binary files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megapmp.data.indexed import IndexedDataset, bin_path, idx_path, merge_shards

SIDECAR_FORMAT = "megapmp-shard"
SIDECAR_VERSION = 1
KINDS = ("pairs", "documents")


def sidecar_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}.json")


def tokenizer_dir(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}.tokenizer")


@dataclass
class ShardMeta:
    kind: str  # "pairs": documents of (prompt, chosen, rejected); "documents": one sequence each
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
    inputs: list = field(default_factory=list)
    format: str = SIDECAR_FORMAT
    version: int = SIDECAR_VERSION

    def save(self, prefix: str | os.PathLike) -> None:
        write_text_atomic(sidecar_path(prefix), json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, prefix: str | os.PathLike) -> "ShardMeta":
        path = sidecar_path(prefix)
        if not path.exists():
            raise FileNotFoundError(f"{path}: shard sidecar missing (is {prefix} a megapmp shard prefix?)")
        data = json.loads(path.read_text())
        if data.get("format") != SIDECAR_FORMAT or data.get("version") != SIDECAR_VERSION:
            raise ValueError(f"{path}: not a {SIDECAR_FORMAT} v{SIDECAR_VERSION} sidecar")
        return cls(**data)


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; a shard is meant to be shared
    os.replace(tmp, path)


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def shard_checksums(prefix: str | os.PathLike) -> dict:
    return {"bin_sha256": sha256_file(bin_path(prefix)), "idx_sha256": sha256_file(idx_path(prefix))}


def verify_shard(prefix: str | os.PathLike) -> ShardMeta:
    """Raise ValueError if the binary files do not match the checksums in the sidecar."""
    meta = ShardMeta.load(prefix)
    actual = shard_checksums(prefix)
    bad = [k for k in actual if meta.checksums.get(k) != actual[k]]
    if bad:
        raise ValueError(f"{prefix}: checksum mismatch for {', '.join(bad)}")
    return meta


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


def merge_shard_set(prefixes: list[str], output_prefix: str) -> ShardMeta:
    """Merge shards written as separate partitions (same tokenizer, template and policies) into one."""
    metas = [ShardMeta.load(p) for p in prefixes]
    first = metas[0]
    for prefix, meta in zip(prefixes[1:], metas[1:]):
        mismatched = [name for name in ("kind", "vocab_size", "eos_id", "pad_id", "dtype", "template", "eos_policy",
                                        "max_length", "overlong")
                      if getattr(meta, name) != getattr(first, name)]
        if not _tokenizers_match(meta.tokenizer, first.tokenizer):
            mismatched.append("tokenizer")
        if mismatched:
            raise ValueError(f"cannot merge {prefix} into {prefixes[0]}: they differ in {', '.join(mismatched)}")
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    merge_shards(prefixes, output_prefix)
    counts = {}
    for meta in metas:
        for key, value in meta.counts.items():
            if isinstance(value, (int, float)) and not key.endswith("_per_s"):
                counts[key] = counts.get(key, 0) + value
    merged = ShardMeta(**{**asdict(first), "counts": counts, "inputs": [i for m in metas for i in m.inputs],
                          "checksums": shard_checksums(output_prefix)})
    _copy_tokenizer(prefixes[0], output_prefix, merged)
    merged.save(output_prefix)
    return merged


def _copy_tokenizer(src_prefix: str, dst_prefix: str, meta: ShardMeta) -> None:
    if meta.tokenizer["spec"] == "byte":
        return
    src, dst = tokenizer_dir(src_prefix), tokenizer_dir(dst_prefix)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    meta.tokenizer = {**meta.tokenizer, "spec": dst.name}


def open_shard(prefix: str | os.PathLike, kind: str | None = None) -> tuple[IndexedDataset, ShardMeta]:
    meta = ShardMeta.load(prefix)
    if kind is not None and meta.kind != kind:
        raise ValueError(f"{prefix}: holds {meta.kind}, expected {kind}")
    return IndexedDataset(prefix), meta

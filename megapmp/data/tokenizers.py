"""One tokenizer interface over four families, each rebuildable from a spec string.

Preprocessing tokenizes in worker processes that rebuild the tokenizer from ``tok.spec()``
(tokenizers also pickle as their spec), and every shard records ``tok.identity()``.

Spec strings accepted by :func:`load_tokenizer`:

- ``None`` or ``"byte"``: the embedded byte tokenizer, needs no file. Ids 0..255 are the UTF-8
  bytes, 256 is ``<|endoftext|>`` (eos), 257 is ``<|pad|>`` (pad); vocab_size 258.
- ``"hf:PATH"``: a Hugging Face ``tokenizers`` file; PATH is a tokenizer.json or a directory
  holding one. A ``tokenizer_config.json`` beside it supplies eos_token/pad_token.
- ``"sp:PATH"``: a SentencePiece model.
- ``"tiktoken:PATH"``: a tiktoken ranks file (``base64(token) rank`` per line), split with the
  cl100k/Qwen2 pattern; ``<|endoftext|>`` and ``<|pad|>`` are appended after the ranks.
- a bare ``PATH``, chosen by its name: ``...tokenizer.json`` -> hf, ``*.model`` -> sp,
  ``*.tiktoken`` -> tiktoken; a directory (e.g. one written by :meth:`Tokenizer.save`) -> its
  tokenizer.json (hf), else its one ``*.model`` (sp), else its one ``*.tiktoken`` (tiktoken).

``"bpe:N"`` is not a load spec: a byte-level BPE is trained by :func:`train_bpe` (``--tokenizer bpe:N``
in tools/preprocess_pairs.py) and is loaded afterwards by the ``hf:`` spec it returns.
:meth:`Tokenizer.spec` always returns the prefixed form with an absolute path.

Conventions every family keeps:

- ``encode`` never adds BOS/EOS; the caller appends ``eos_id`` where the reward is read.
- ``pad_id != eos_id``, because HF scorers pool the last non-pad token and the reward is read at EOS.
  When the file has no usable pad token, ``<|pad|>`` is appended as id ``vocab_size - 1`` and named in
  ``identity()["added_tokens"]`` (an HF export has to add it to the tokenizer too).
- ``decode`` drops eos/pad (and, for hf and sp, the file's other special/control tokens).
- Special-token text inside data: hf matches added tokens in raw text exactly as HF scoring does;
  byte, sp and tiktoken encode it as plain text.
- ``vocab_size`` is the raw size; :func:`padded_vocab_size` rounds it for the embedding table.
"""

from __future__ import annotations

import abc
import errno
import hashlib
import json
import os
from typing import Iterable, Sequence

import numpy as np

from megapmp.io import write_bytes_atomic

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"

_UNKNOWN_SPEC = (
    "unknown tokenizer spec {spec!r}: expected byte, hf:PATH, sp:PATH, tiktoken:PATH or a path to "
    "tokenizer.json / a tokenizer directory / *.model / *.tiktoken"
)

# cl100k's split pattern; Qwen2 uses the same one except that digits are split one at a time.
CL100K_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# HF tokenizers name their eos differently; first present wins when tokenizer_config.json is silent.
_HF_EOS_CANDIDATES = ("<|endoftext|>", "<|im_end|>", "</s>", "<eos>")
# Only tokens that exist to pad. <|im_end|> is deliberately absent: it occurs inside chat-formatted
# text, and transformers < 4.47 pools at the token before the *first* pad, so a pad that can occur in
# the text would move the reward read-out.
_HF_PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]", "<|fim_pad|>")


class Tokenizer(abc.ABC):
    """A text <-> ids mapping with a fixed eos and a distinct pad, reloadable from :meth:`spec`.

    Attributes: ``family`` ("byte" | "hf" | "sentencepiece" | "tiktoken"); ``vocab_size``, the raw
    size (every id from encode is in ``[0, vocab_size)``); ``eos_id``/``pad_id`` with their token
    strings ``eos_token``/``pad_token``; ``added_tokens``, the tokens appended beyond the file's own
    vocabulary.
    """

    family: str
    vocab_size: int
    eos_id: int
    pad_id: int
    eos_token: str
    pad_token: str
    added_tokens: tuple[str, ...] = ()

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; never adds BOS or EOS."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]``, possibly faster."""
        return [self.encode(text) for text in texts]

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``, with eos and pad dropped."""

    @abc.abstractmethod
    def spec(self) -> str:
        """A string that :func:`load_tokenizer` turns back into an equal tokenizer."""

    @abc.abstractmethod
    def save(self, directory: str | os.PathLike) -> str:
        """Write the files this tokenizer needs into ``directory``; return the spec that loads them."""

    def file_sha256(self) -> dict[str, str] | None:
        """sha256 of each file the tokenizer was loaded from, by file name; None when it has none."""
        return None

    def identity(self) -> dict:
        """JSON-able description recorded in shard metadata and compared before training or scoring."""
        return {
            "family": self.family,
            "spec": self.spec(),
            "sha256": self.file_sha256(),
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "added_tokens": list(self.added_tokens),
        }

    def _content_identity(self) -> dict:
        # Same files and same special ids is the same tokenizer, wherever the files live.
        identity = self.identity()
        del identity["spec"]
        return identity

    def __eq__(self, other) -> bool:
        if not isinstance(other, Tokenizer):
            return NotImplemented
        return self._content_identity() == other._content_identity()

    def __hash__(self) -> int:
        return hash(json.dumps(self._content_identity(), sort_keys=True))

    def __reduce__(self):
        # Rebuild from files instead of pickling native library objects (not all of them pickle).
        return (load_tokenizer, (self.spec(),))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(spec={self.spec()!r}, vocab_size={self.vocab_size}, "
            f"eos_id={self.eos_id}, pad_id={self.pad_id})"
        )


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, then eos 256 and pad 257."""

    family = "byte"
    vocab_size = 258
    eos_id = 256
    pad_id = 257
    eos_token = EOS_TOKEN
    pad_token = PAD_TOKEN

    def encode(self, text: str) -> list[int]:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).tolist()

    def decode(self, ids: Iterable[int]) -> str:
        # bytes() rejects any other id >= 256 with a ValueError, which is what a bad id deserves.
        data = bytes(i for i in map(int, ids) if i != self.eos_id and i != self.pad_id)
        return data.decode("utf-8", errors="replace")

    def spec(self) -> str:
        return "byte"

    def save(self, directory: str | os.PathLike) -> str:
        os.makedirs(directory, exist_ok=True)
        return "byte"


class _FileTokenizer(Tokenizer):
    """A tokenizer built from file contents read once: hashes and save() see exactly what was loaded."""

    prefix: str

    def __init__(self, path: str, files: dict[str, bytes]):
        self.path = path  # absolute path of the main file; the others sit beside it
        self._files = files  # file name -> contents
        self._sha256 = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}

    def spec(self) -> str:
        return f"{self.prefix}:{self.path}"

    def file_sha256(self) -> dict[str, str]:
        return dict(self._sha256)

    def save(self, directory: str | os.PathLike) -> str:
        directory = os.path.abspath(os.fspath(directory))
        os.makedirs(directory, exist_ok=True)
        for name, data in self._files.items():
            write_bytes_atomic(os.path.join(directory, name), data)
        return f"{self.prefix}:{os.path.join(directory, os.path.basename(self.path))}"


class HFTokenizer(_FileTokenizer):
    """A Hugging Face ``tokenizers`` tokenizer.json, with eos/pad from tokenizer_config.json if present."""

    family = "hf"
    prefix = "hf"

    def __init__(self, path: str):
        from tokenizers import Tokenizer as RustTokenizer

        files = {os.path.basename(path): _read_file(path)}
        config_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
        config = {}
        if os.path.isfile(config_path):
            files["tokenizer_config.json"] = _read_file(config_path)
            config = json.loads(files["tokenizer_config.json"])
        super().__init__(path, files)

        self._tok = RustTokenizer.from_str(files[os.path.basename(path)].decode("utf-8"))
        # Some tokenizer.json files carry truncation/padding settings; shards need the whole text, unpadded.
        self._tok.no_truncation()
        self._tok.no_padding()
        vocab = self._tok.get_vocab(with_added_tokens=True)
        file_vocab_size = max(self._tok.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)

        self.eos_token = _choose_hf_eos(vocab, config, path)
        self.eos_id = vocab[self.eos_token]
        pad_token = _choose_hf_pad(vocab, config, self.eos_token)
        if pad_token is None:
            self.pad_token, self.pad_id = PAD_TOKEN, file_vocab_size
            self.added_tokens = (PAD_TOKEN,)
            self.vocab_size = file_vocab_size + 1
        else:
            self.pad_token, self.pad_id = pad_token, vocab[pad_token]
            self.vocab_size = file_vocab_size

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # Uses rayon threads unless the caller (e.g. a forked worker) set TOKENIZERS_PARALLELISM=false.
        # encode_batch_fast (tokenizers >= 0.21) skips offset tracking; the ids are the same.
        encode_batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        if self.added_tokens:
            ids = [i for i in ids if i != self.pad_id]  # the library does not know the appended pad
        return self._tok.decode(ids, skip_special_tokens=True)


def _config_token(config: dict, key: str) -> str | None:
    token = config.get(key)
    if isinstance(token, dict):  # serialized AddedToken
        token = token.get("content")
    return token if isinstance(token, str) else None


def _choose_hf_eos(vocab: dict[str, int], config: dict, path: str) -> str:
    configured = _config_token(config, "eos_token")
    if configured is not None and configured in vocab:
        return configured
    for candidate in _HF_EOS_CANDIDATES:
        if candidate in vocab:
            return candidate
    raise ValueError(
        f"{path}: no eos token: tokenizer_config.json eos_token is {configured!r} and none of "
        f"{list(_HF_EOS_CANDIDATES)} is in the vocabulary"
    )


def _choose_hf_pad(vocab: dict[str, int], config: dict, eos_token: str) -> str | None:
    """The pad token to use, or None when one has to be appended to the vocabulary."""
    configured = _config_token(config, "pad_token")
    if configured is not None and configured != eos_token and configured in vocab:
        return configured
    for candidate in _HF_PAD_CANDIDATES:
        if candidate != eos_token and candidate in vocab:
            return candidate
    return None


class SentencePieceTokenizer(_FileTokenizer):
    """A SentencePiece model; pad is appended when the model has none distinct from eos."""

    family = "sentencepiece"
    prefix = "sp"

    def __init__(self, path: str):
        import sentencepiece

        super().__init__(path, {os.path.basename(path): _read_file(path)})
        self._sp = sentencepiece.SentencePieceProcessor(model_proto=self._files[os.path.basename(path)])
        piece_count = self._sp.get_piece_size()

        self.eos_id = self._sp.eos_id()
        if self.eos_id < 0:
            self.eos_id = self._sp.piece_to_id("</s>")
            if self.eos_id == self._sp.unk_id():  # piece_to_id answers unk for a missing piece
                raise ValueError(f"{path}: SentencePiece model has no eos id and no '</s>' piece")
        self.eos_token = self._sp.id_to_piece(self.eos_id)

        # unk is never a pad: it can occur inside encoded text.
        pad_id = self._sp.pad_id()
        if 0 <= pad_id != self.eos_id:
            self.pad_id, self.pad_token = pad_id, self._sp.id_to_piece(pad_id)
            self.vocab_size = piece_count
        else:
            self.pad_id, self.pad_token = piece_count, PAD_TOKEN
            self.added_tokens = (PAD_TOKEN,)
            self.vocab_size = piece_count + 1

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int, add_bos=False, add_eos=False)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # One thread: parallelism belongs to the caller's worker processes.
        return self._sp.encode(list(texts), out_type=int, add_bos=False, add_eos=False, num_threads=1)

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        if self.added_tokens:
            ids = [i for i in ids if i != self.pad_id]
        return self._sp.decode(ids)


class TiktokenTokenizer(_FileTokenizer):
    """A tiktoken ranks file with the cl100k split pattern; eos and pad follow the last rank."""

    family = "tiktoken"
    prefix = "tiktoken"

    def __init__(self, path: str):
        import tiktoken

        super().__init__(path, {os.path.basename(path): _read_file(path)})
        ranks = parse_tiktoken_ranks(self._files[os.path.basename(path)], path)
        first_free = max(ranks.values()) + 1
        self.eos_token, self.eos_id = EOS_TOKEN, first_free
        self.pad_token, self.pad_id = PAD_TOKEN, first_free + 1
        self.added_tokens = (EOS_TOKEN, PAD_TOKEN)
        self.vocab_size = first_free + 2
        self._enc = tiktoken.Encoding(
            name=f"megapmp:{path}",
            pat_str=CL100K_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={EOS_TOKEN: self.eos_id, PAD_TOKEN: self.pad_id},
        )

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def decode(self, ids: Iterable[int]) -> str:
        ids = [i for i in map(int, ids) if i != self.eos_id and i != self.pad_id]
        return self._enc.decode(ids, errors="replace")


def parse_tiktoken_ranks(data: bytes, path: str) -> dict[bytes, int]:
    # tiktoken.load.load_tiktoken_bpe parses the same format but caches local files in a temp dir keyed
    # by path alone and, without an expected hash, serves a stale copy after the file changes.
    import base64

    ranks = {}
    for line_number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as e:
            raise ValueError(f"{path}:{line_number}: expected 'base64(token) rank', got {line[:80]!r}") from e
    if not ranks:
        raise ValueError(f"{path}: empty tiktoken ranks file")
    return ranks


def load_tokenizer(spec: str | None) -> Tokenizer:
    """Build a tokenizer from a spec string (see the module docstring); None means "byte"."""
    if spec is None or spec == "byte":
        return ByteTokenizer()
    family, path = _parse_spec(spec)
    return _FAMILIES[family](path)


_FAMILIES = {"hf": HFTokenizer, "sp": SentencePieceTokenizer, "tiktoken": TiktokenTokenizer}


def _parse_spec(spec: str) -> tuple[str, str]:
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(_UNKNOWN_SPEC.format(spec=spec))
    prefix, colon, rest = spec.partition(":")
    if colon and prefix == "bpe":
        raise ValueError(
            f"tokenizer spec {spec!r} is trained, not loaded: call megapmp.data.tokenizers.train_bpe"
            f"(texts, vocab_size, directory), or pass --tokenizer {spec} to tools/preprocess_pairs.py, "
            "and load the spec it returns"
        )
    if colon and prefix in _FAMILIES:
        if not rest:
            raise ValueError(f"tokenizer spec {spec!r} names no path")
        path = _absolute(rest)
        if prefix == "hf" and os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        return prefix, _existing_file(path)

    path = _absolute(spec)
    if os.path.isdir(path):
        return _directory_family(path)
    for suffix, family in (("tokenizer.json", "hf"), (".model", "sp"), (".tiktoken", "tiktoken")):
        if path.endswith(suffix):
            return family, _existing_file(path)
    raise ValueError(_UNKNOWN_SPEC.format(spec=spec))


def _directory_family(directory: str) -> tuple[str, str]:
    # Any directory written by Tokenizer.save() loads back by its name alone, as shards store it.
    if os.path.isfile(os.path.join(directory, "tokenizer.json")):
        return "hf", os.path.join(directory, "tokenizer.json")
    for suffix, family in ((".model", "sp"), (".tiktoken", "tiktoken")):
        matches = sorted(name for name in os.listdir(directory) if name.endswith(suffix))
        if len(matches) > 1:
            raise ValueError(f"tokenizer directory {directory} holds several {suffix} files {matches}: name one")
        if matches:
            return family, os.path.join(directory, matches[0])
    raise FileNotFoundError(
        errno.ENOENT, "tokenizer directory holds no tokenizer.json, *.model or *.tiktoken",
        os.path.join(directory, "tokenizer.json"),
    )


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def _existing_file(path: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(errno.ENOENT, "tokenizer file not found", path)
    return path


def _read_file(path: str) -> bytes:
    with open(_existing_file(path), "rb") as f:
        return f.read()


def train_bpe(texts: Iterable[str], vocab_size: int, directory: str | os.PathLike) -> Tokenizer:
    """Train a byte-level BPE with HF ``tokenizers`` and save it as ``directory/tokenizer.json``.

    Special tokens ``<|endoftext|>`` (eos) and ``<|pad|>`` (pad) take ids 0 and 1, then the 256 byte
    symbols, then merges up to ``vocab_size``. A ``tokenizer_config.json`` is written beside it so
    ``transformers.AutoTokenizer.from_pretrained(directory)`` loads it too. Same texts, same files.
    """
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    min_size = 2 + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < min_size:
        raise ValueError(f"train_bpe: vocab_size {vocab_size} < {min_size} (2 special tokens + 256 bytes)")

    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)

    directory = os.path.abspath(os.fspath(directory))
    os.makedirs(directory, exist_ok=True)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "bos_token": None,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
    }
    write_bytes_atomic(os.path.join(directory, "tokenizer.json"), tok.to_str().encode("utf-8"))
    write_bytes_atomic(os.path.join(directory, "tokenizer_config.json"), json.dumps(config, indent=2).encode("utf-8"))
    return load_tokenizer(f"hf:{os.path.join(directory, 'tokenizer.json')}")


def padded_vocab_size(vocab_size: int, multiple: int = 128, tensor_parallel: int = 1) -> int:
    """Embedding rows for ``vocab_size``: rounded up to ``multiple * tensor_parallel``, as Megatron's
    ``--make-vocab-size-divisible-by`` does, so every TP rank holds an equal, aligned vocab slice."""
    for name, value in (("vocab_size", vocab_size), ("multiple", multiple), ("tensor_parallel", tensor_parallel)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"padded_vocab_size: {name} must be a positive int, got {value!r}")
    step = int(multiple) * int(tensor_parallel)
    return -(-int(vocab_size) // step) * step

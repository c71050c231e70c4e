"""Megatron's MMIDIDX v1 `.bin`/`.idx` shard format, written and read byte for byte.

Layout of `PREFIX.idx` (all little-endian), as Megatron-Core's `_IndexWriter` writes it:

    b"MMIDIDX\\x00\\x00"      9-byte magic
    uint64  version = 1
    uint8   dtype code (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16)
    uint64  sequence count  S
    uint64  document count  D   (= number of documents + 1: the document index starts with 0)
    int32[S]  sequence lengths (in elements)
    int64[S]  sequence pointers (byte offsets into PREFIX.bin)
    int64[D]  document index: document j is sequences [doc[j], doc[j+1])

`PREFIX.bin` is the concatenation of all sequences in that dtype. A pair is one document of three
sequences (prompt, chosen response, rejected response); a plain text document is one sequence.

The writer streams: tokens go straight to the `.bin`, and the per-sequence lengths are spilled to a
scratch file, so memory stays flat however many sequences are written. Both files are written under
temporary names and only renamed into place by `finish()`: a crash leaves no partial shard.

Checked at every open (`IndexedDataset`), from the index alone and in O(sequences), never reading the
`.bin`: the `.idx` size is exactly what its header implies; lengths are non-negative; pointers are the
running byte offsets of the lengths (sequences back to back, as both writers lay them out); the
document index starts at 0, never decreases and ends at S; the `.bin` size is the sum of the lengths.
A violation raises `ShardError` naming the file. Token values themselves are checked as they are read
(megapmp/data/loader.py) and by the sidecar's checksums on demand (megapmp/data/shards.py).
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1

DTYPE_CODES = {
    np.dtype(np.uint8): 1,
    np.dtype(np.int8): 2,
    np.dtype(np.int16): 3,
    np.dtype(np.int32): 4,
    np.dtype(np.int64): 5,
    np.dtype(np.float64): 6,
    np.dtype(np.float32): 7,
    np.dtype(np.uint16): 8,
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}

# Entries per chunk when streaming the index: bounds memory at ~ 2 MB per array (a few such temporaries
# live at once, so 1 << 20 cost ~35 MB of peak RSS once a shard passed 1M sequences).
_CHUNK = 1 << 18
# Documents per step when merging: their tokens pass through memory at once, so this bounds the merge's
# memory by document size instead of by shard size (1M documents of 1k tokens would be 2 GB).
_MERGE_DOCS = 1 << 12


def optimal_dtype(vocab_size: int) -> np.dtype:
    """Megatron's choice: uint16 when every id fits below 65500, else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def bin_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}.bin")


def idx_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}.idx")


class ShardError(ValueError):
    """A shard that is damaged or does not fit the run: the message names the file and what is wrong."""


class IndexedWriter:
    """Streams sequences and document boundaries into `PREFIX.bin`/`PREFIX.idx`.

    Use as a context manager; `finish()` (called on clean exit) writes the index and renames both
    files into place. On an exception the temporary files are removed.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: np.dtype):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"dtype {self.dtype} has no MMIDIDX code")
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._tmp_dir = Path(tempfile.mkdtemp(prefix=f".{self.prefix.name}.", dir=self.prefix.parent))
        self._bin = open(self._tmp_dir / "data.bin", "wb")
        self._lengths = open(self._tmp_dir / "lengths.i32", "wb")
        self._doc_starts = open(self._tmp_dir / "docs.i64", "wb")
        self.num_sequences = 0
        self.num_documents = 0
        self.num_elements = 0
        self._closed = False

    def add_document(self, sequences: list[np.ndarray]) -> None:
        """Append one document made of `sequences` (1-D integer arrays)."""
        lengths = np.fromiter((len(s) for s in sequences), dtype=np.int32, count=len(sequences))
        self._doc_starts.write(np.int64(self.num_sequences).tobytes())
        for seq in sequences:
            self._bin.write(np.asarray(seq, dtype=self.dtype).tobytes())
        self._lengths.write(lengths.tobytes())
        self.num_sequences += len(sequences)
        self.num_documents += 1
        self.num_elements += int(lengths.sum())

    def add_flat_documents(self, tokens: np.ndarray, sequence_lengths: np.ndarray, sequences_per_doc) -> None:
        """Append many documents at once: `tokens` is the concatenation of their sequences.

        `sequences_per_doc` is an int (every document alike, e.g. 3 for pairs) or one count per
        document. The fast path for preprocessing workers and for merging, which move whole chunks.
        """
        sequence_lengths = np.asarray(sequence_lengths, dtype=np.int32)
        if np.ndim(sequences_per_doc) == 0:
            n_docs, rest = divmod(len(sequence_lengths), int(sequences_per_doc))
            if rest:
                raise ValueError("sequence_lengths is not a whole number of documents")
            counts = np.full(n_docs, int(sequences_per_doc), dtype=np.int64)
        else:
            counts = np.asarray(sequences_per_doc, dtype=np.int64)
            if counts.sum() != len(sequence_lengths):
                raise ValueError("sequences_per_doc does not add up to the number of sequences")
        starts = self.num_sequences + np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
        self._doc_starts.write(starts[: len(counts)].tobytes())
        self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype))  # the buffer itself: no tobytes() copy
        self._lengths.write(sequence_lengths.tobytes())
        self.num_sequences += len(sequence_lengths)
        self.num_documents += len(counts)
        self.num_elements += int(sequence_lengths.sum(dtype=np.int64))

    def finish(self) -> None:
        """Write the index and move both files into place (bin first, so a reader never sees an
        index whose data file is missing)."""
        for f in (self._bin, self._lengths, self._doc_starts):
            f.close()
        self._write_index(self._tmp_dir / "data.idx")
        os.replace(self._tmp_dir / "data.bin", bin_path(self.prefix))
        os.replace(self._tmp_dir / "data.idx", idx_path(self.prefix))
        shutil.rmtree(self._tmp_dir, ignore_errors=True)
        self._closed = True

    def abort(self) -> None:
        for f in (self._bin, self._lengths, self._doc_starts):
            f.close()
        shutil.rmtree(self._tmp_dir, ignore_errors=True)
        self._closed = True

    def _write_index(self, path: Path) -> None:
        itemsize = self.dtype.itemsize
        with open(path, "wb") as out:
            out.write(INDEX_MAGIC)
            out.write(struct.pack("<Q", INDEX_VERSION))
            out.write(struct.pack("<B", DTYPE_CODES[self.dtype]))
            out.write(struct.pack("<Q", self.num_sequences))
            out.write(struct.pack("<Q", self.num_documents + 1))
            _copy_file_into(self._tmp_dir / "lengths.i32", out)
            # Pointers are the running byte offset of each sequence; computed chunk by chunk.
            offset = 0
            for lengths in _read_chunks(self._tmp_dir / "lengths.i32", np.int32):
                ends = offset + np.cumsum(lengths, dtype=np.int64) * itemsize
                out.write(np.concatenate(([offset], ends[:-1])).astype(np.int64).tobytes())
                offset = int(ends[-1])
            _copy_file_into(self._tmp_dir / "docs.i64", out)
            out.write(np.int64(self.num_sequences).tobytes())

    def __enter__(self) -> "IndexedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._closed:
            return
        if exc_type is None:
            self.finish()
        else:
            self.abort()


def _read_chunks(path: Path, dtype) -> "list[np.ndarray]":
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK * np.dtype(dtype).itemsize):
            yield np.frombuffer(chunk, dtype=dtype)


def _copy_file_into(path: Path, out) -> None:
    with open(path, "rb") as f:
        shutil.copyfileobj(f, out, length=8 << 20)


@dataclass(frozen=True)
class IndexHeader:
    dtype: np.dtype
    num_sequences: int
    num_documents: int  # real documents, i.e. the on-disk count minus one
    header_bytes: int


_HEADER_BYTES = len(INDEX_MAGIC) + 8 + 1 + 8 + 8


def read_index_header(path: str | os.PathLike) -> IndexHeader:
    with open(path, "rb") as f:
        raw = f.read(_HEADER_BYTES)
    if len(raw) < _HEADER_BYTES or raw[: len(INDEX_MAGIC)] != INDEX_MAGIC:
        raise ShardError(f"{path}: not an MMIDIDX index (magic {raw[:len(INDEX_MAGIC)]!r})")
    version, code, num_sequences, doc_count = struct.unpack_from("<QBQQ", raw, len(INDEX_MAGIC))
    if version != INDEX_VERSION:
        raise ShardError(f"{path}: MMIDIDX version {version}, only {INDEX_VERSION} is supported")
    if code not in CODE_DTYPES:
        raise ShardError(f"{path}: unknown dtype code {code}")
    if doc_count < 1:
        raise ShardError(f"{path}: document count {doc_count}, at least 1 (the leading 0) expected")
    return IndexHeader(CODE_DTYPES[code], num_sequences, doc_count - 1, _HEADER_BYTES)


def check_index(path: Path, header: IndexHeader, lengths: np.ndarray, pointers: np.ndarray,
                document_index: np.ndarray) -> int:
    """The index's internal consistency (see the module docstring); returns the `.bin` size it implies."""
    itemsize = header.dtype.itemsize
    if len(lengths) and int(lengths.min()) < 0:
        raise ShardError(f"{path}: sequence {int(np.argmax(lengths < 0))} has a negative length")
    ends = np.cumsum(lengths, dtype=np.int64) * itemsize
    expected = np.concatenate(([0], ends[:-1])) if len(ends) else ends
    if not np.array_equal(pointers, expected):
        bad = int(np.argmax(pointers != expected))
        raise ShardError(f"{path}: sequence {bad} points at byte {int(pointers[bad])}, its lengths say {int(expected[bad])}")
    steps = np.diff(document_index)
    if document_index[0] != 0 or document_index[-1] != header.num_sequences or (len(steps) and steps.min() < 0):
        raise ShardError(f"{path}: the document index does not run from 0 to {header.num_sequences} sequences "
                         f"in order (starts {int(document_index[0])}, ends {int(document_index[-1])})")
    return int(ends[-1]) if len(ends) else 0


class IndexedDataset:
    """Read-only, memory-mapped view of an MMIDIDX shard. Nothing is loaded until it is indexed."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = Path(prefix)
        index_file, data_file = idx_path(prefix), bin_path(prefix)
        for path in (index_file, data_file):
            if not path.is_file():
                raise FileNotFoundError(f"{path}: shard file missing (is {prefix} a shard prefix?)")
        header = read_index_header(index_file)
        self.dtype = header.dtype
        n_seq, n_doc = header.num_sequences, header.num_documents
        idx_size = os.path.getsize(index_file)
        expected_idx = header.header_bytes + 12 * n_seq + 8 * (n_doc + 1)
        if idx_size != expected_idx:
            raise ShardError(f"{index_file}: {idx_size} bytes, its header ({n_seq} sequences, {n_doc} documents) "
                             f"says {expected_idx}")
        self._idx = np.memmap(index_file, dtype=np.uint8, mode="r")
        offset = header.header_bytes
        self.sequence_lengths = np.frombuffer(self._idx, np.int32, n_seq, offset)
        offset += 4 * n_seq
        self.sequence_pointers = np.frombuffer(self._idx, np.int64, n_seq, offset)
        offset += 8 * n_seq
        self.document_index = np.frombuffer(self._idx, np.int64, n_doc + 1, offset)
        expected = check_index(index_file, header, self.sequence_lengths, self.sequence_pointers, self.document_index)
        bin_size = os.path.getsize(data_file)
        if bin_size != expected:
            raise ShardError(f"{data_file}: {bin_size} bytes, index says {expected}")
        # An empty file cannot be memory-mapped.
        self._bin = np.memmap(bin_path(prefix), dtype=self.dtype, mode="r") if bin_size else np.empty(0, self.dtype)

    @property
    def num_documents(self) -> int:
        return len(self.document_index) - 1

    @property
    def num_sequences(self) -> int:
        return len(self.sequence_lengths)

    def sequence(self, i: int) -> np.ndarray:
        start = self.sequence_pointers[i] // self.dtype.itemsize
        return self._bin[start : start + self.sequence_lengths[i]]

    def document(self, j: int) -> list[np.ndarray]:
        first, last = self.document_index[j], self.document_index[j + 1]
        return [self.sequence(i) for i in range(first, last)]

    def tokens_of_sequences(self, first: int, last: int) -> np.ndarray:
        """The contiguous tokens of sequences [first, last) (they are stored back to back)."""
        if last <= first:
            return np.empty(0, self.dtype)
        begin = self.sequence_pointers[first] // self.dtype.itemsize
        return self._bin[begin : begin + int(self.sequence_lengths[first:last].sum(dtype=np.int64))]

    def __len__(self) -> int:
        return self.num_documents


def merge_shards(prefixes: list[str | os.PathLike], output_prefix: str | os.PathLike) -> IndexedWriter:
    """Concatenate shards (same dtype) into one, streaming; documents keep their order."""
    datasets = [IndexedDataset(p) for p in prefixes]
    dtypes = {d.dtype for d in datasets}
    if len(dtypes) != 1:
        raise ShardError(f"cannot merge shards of different dtypes: {sorted(map(str, dtypes))}")
    with IndexedWriter(output_prefix, dtypes.pop()) as writer:
        for ds in datasets:
            # Tokens are read with plain file reads, not through the memory map: mapped pages would stay
            # resident and make the merge's RSS as large as its inputs.
            with open(bin_path(ds.prefix), "rb") as bin_file:
                for start in range(0, ds.num_documents, _MERGE_DOCS):
                    stop = min(start + _MERGE_DOCS, ds.num_documents)
                    first_seq, last_seq = ds.document_index[start], ds.document_index[stop]
                    lengths = ds.sequence_lengths[first_seq:last_seq]
                    nbytes = int(lengths.sum(dtype=np.int64)) * ds.dtype.itemsize
                    if nbytes:
                        bin_file.seek(int(ds.sequence_pointers[first_seq]))
                    data = bin_file.read(nbytes)
                    if len(data) != nbytes:
                        raise ShardError(f"{bin_path(ds.prefix)}: truncated (wanted {nbytes} bytes)")
                    writer.add_flat_documents(np.frombuffer(data, ds.dtype), lengths,
                                              np.diff(ds.document_index[start : stop + 1]))
    return writer

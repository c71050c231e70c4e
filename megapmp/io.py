"""The ground floor: atomic writes, sha256 of a file, the FILE:LINE JSONL reader, an exclusive lock, a stderr
logger.

Imports nothing of megapmp, so every layer (data, train, checkpoint, eval, synth, tools) can use it.

Atomic writes go to a temporary file in the target's folder (same filesystem, so the rename is atomic),
are fsynced, then renamed over the target: a reader, or a run killed half-way, never sees a half-written
file, and a failed write leaves the old file in place and no temporary behind.

The JSONL reader turns every bad line into an `InputError` naming FILE:LINE (and the field).
Preprocessing, evaluation and synthesis all read JSONL through here, so a truncated `.gz`, invalid UTF-8,
a lone surrogate such as `"\\ud800"` (valid JSON, but not text any tokenizer can encode) or a duplicated key
get the same one-line message everywhere. No torch here: this runs in preprocessing's worker processes.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import gzip
import hashlib
import json
import os
import re
import sys
import tempfile
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator

# One JSONL line larger than this is rejected before parsing, so a corrupt file cannot exhaust memory.
MAX_LINE_BYTES = 64 << 20
# A lone surrogate can only enter a parsed string through a \uD800-\uDFFF escape (valid UTF-8 bytes never
# decode to one), and a key can only be spelled two ways through a \u or \/ escape; a line without either
# (most lines) skips both the walk over the parsed object and the exact duplicate-key parse.
_ESCAPE = re.compile(rb"\\[u/]")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class InputError(ValueError):
    """A bad input record: names the file, the 1-based line and the field."""

    def __init__(self, file: str, line: int | None, field: str | None, reason: str):
        self.file, self.line, self.field, self.reason = file, line, field, reason
        where = str(file) + (f":{line}" if line else "") + (f" field '{field}'" if field else "")
        super().__init__(f"{where}: {reason}")


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        self.key = key


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    # Python's json keeps the last of duplicated keys silently; for a preference pair that can swap which
    # response is "chosen" without anyone noticing, so a duplicate is bad input.
    record = dict(pairs)
    if len(record) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return record


def _may_hide_duplicates(value, raw: bytes, escaped: bool) -> bool:
    """False when `raw` provably repeats no key: one flat object each of whose keys occurs exactly once
    in its plain spelling, and no escape that could spell a key another way. Everything else takes the
    exact check, which costs about three plain parses."""
    if not isinstance(value, dict):
        return isinstance(value, list)
    if escaped:
        return True
    for key, child in value.items():
        if isinstance(child, (dict, list)) or raw.count(b'"' + key.encode("utf-8") + b'"') != 1:
            return True
    return False


def _find_surrogate(value, path: str = "") -> tuple[str, int] | None:
    """(field path, character index) of the first lone surrogate inside a parsed JSON value."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return path, e.start
        return None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = ((f"[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for key, child in items:
        sub = f"{path}{key}" if key.startswith("[") else (f"{path}.{key}" if path else key)
        found = _find_surrogate(child, sub)
        if found is not None:
            return found
    return None


def _loads(file: str, line_no: int, text: str, **kwargs):
    """json.loads, its every refusal an InputError. Besides JSONDecodeError, json.loads raises a plain
    ValueError for an integer of more than sys.get_int_max_str_digits() digits (4300) and RecursionError
    for nesting deeper than the interpreter's stack."""
    try:
        return json.loads(text, **kwargs)
    except json.JSONDecodeError as e:
        raise InputError(file, line_no, None, f"malformed JSON: {e.msg} at column {e.colno}") from None
    except _DuplicateKey:
        raise
    except ValueError as e:  # "Exceeds the limit (4300 digits) for integer string conversion: ...; use ..."
        raise InputError(file, line_no, None, f"malformed JSON: {str(e).split(';')[0]}") from None
    except RecursionError:
        raise InputError(file, line_no, None, "malformed JSON: nested too deeply") from None


def parse_json_line(file: str, line_no: int, raw: bytes):
    """Parse one JSONL line (bytes without the newline), or raise InputError naming FILE:LINE."""
    if len(raw) > MAX_LINE_BYTES:
        raise InputError(file, line_no, None, f"line is {len(raw)} bytes, over the {MAX_LINE_BYTES}-byte limit")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(file, line_no, None, f"invalid UTF-8 at byte {e.start}") from None
    value = _loads(file, line_no, text)
    escaped = _ESCAPE.search(raw) is not None
    if _may_hide_duplicates(value, raw, escaped):
        try:
            _loads(file, line_no, text, object_pairs_hook=_unique_keys)
        except _DuplicateKey as e:
            raise InputError(file, line_no, e.key, "duplicate key in a JSON object") from None
    if escaped and _SURROGATE_ESCAPE.search(raw):
        found = _find_surrogate(value)
        if found is not None:
            field, index = found
            raise InputError(file, line_no, field or None,
                             f"lone surrogate escape at character {index}: not valid Unicode text")
    return value


def open_lines(path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes without the newline) for the non-blank lines of JSONL(.gz).

    A damaged gzip stream raises InputError after the last line that could be read, naming it.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    line_no = 0
    try:
        with opener(path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                raw = raw.rstrip(b"\r\n")
                if raw.strip():
                    yield line_no, raw
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        reason = "truncated gzip file" if isinstance(e, EOFError) else f"corrupt gzip file ({e})"
        raise InputError(str(path), line_no + 1, None, f"{reason}; the file is cut off after line {line_no}") from None


def text_field(file: str, line_no: int, record: dict, key: str) -> str:
    """`record[key]` as a text a model can be given, or an InputError naming FILE:LINE and the field: missing,
    not a string, or empty (whitespace only). The one rule for text fields: preprocessing (prompt, chosen,
    rejected) and evaluation (every prompt and response it scores) both read them through here."""
    if key not in record:
        raise InputError(file, line_no, key, "missing field")
    value = record[key]
    if not isinstance(value, str):
        raise InputError(file, line_no, key, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise InputError(file, line_no, key, "empty field")
    return value


def cut_torn_jsonl(path: str | os.PathLike, log) -> None:
    """Cut a torn last line of an append-only JSONL file (a writer killed mid-line) back to the last whole
    record, logged, so that the next append starts a line of its own; a line that does not parse anywhere
    else is damage no kill leaves behind: an InputError naming FILE:LINE."""
    path = Path(path)
    if not path.is_file():
        return
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # the bytes after the last newline: b"" in a whole file
    whole = len(data) - len(tail)
    if lines and not _is_record(lines[-1]):
        whole -= len(lines.pop()) + 1
    for number, line in enumerate(lines, start=1):
        if line.strip() and not _is_record(line):
            raise InputError(str(path), number, None, "not a JSON record")
    if whole < len(data):
        os.truncate(path, whole)
        log(f"{path}: cut a torn last line ({len(data) - whole} bytes) back to the last whole record "
            f"(a run killed while writing it)")


def _is_record(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except (ValueError, RecursionError):  # RecursionError: nesting past the parser's stack
        return False


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(1-based line number, object) for each non-blank line of a JSONL(.gz) file of objects."""
    for line_no, raw in open_lines(path):
        record = parse_json_line(str(path), line_no, raw)
        if not isinstance(record, dict):
            raise InputError(str(path), line_no, None, f"expected a JSON object, got {type(record).__name__}")
        yield line_no, record


# --------------------------------------------------------------------------------------------------
# Atomic writes


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside `path` for writing ("w" text UTF-8, or "wb"); on a clean exit it is
    fsynced and renamed over `path`, on an exception removed. Creates the parent folder.

    The one implementation of an atomic write: the helpers below and streaming writers use it.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs (shards, reports, tokenizers) are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (see `atomic_open`)."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically (see `atomic_open`)."""
    with atomic_open(path) as f:
        f.write(text)


def jsonl_line(record: dict) -> str:
    """One record as one JSONL line. ensure_ascii=False keeps code and prose readable; json still escapes
    every control character and newline, so one record is always one line."""
    return json.dumps(record, ensure_ascii=False) + "\n"


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write `records` as JSONL to `path` atomically (see `atomic_open`); returns how many."""
    count = 0
    with atomic_open(path) as f:
        for record in records:
            f.write(jsonl_line(record))
            count += 1
    return count


# --------------------------------------------------------------------------------------------------
# Locks


def try_lock_exclusive(fd: int) -> bool:
    """Take an exclusive ``flock`` on `fd` without waiting: True when taken, False when another open file
    holds it (the kernel drops a lock with the last descriptor of its holder, however that process ends).
    Any other failure (a file system without locks) raises."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


# --------------------------------------------------------------------------------------------------
# Checksums


def sha256_file(path: str | os.PathLike, progress: Callable[[int], None] | None = None) -> str:
    """Hex sha256 of a file's bytes, read in 8 MiB blocks; `progress(n)` is called after each block."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
            if progress is not None:
                progress(len(block))
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Logging


def log(message: str, *, prefix: str | None = "megapmp") -> None:
    """One line on stderr as `[prefix] message` (just `message` when prefix is None), flushed at once so
    progress shows up in a pipe or a job log while the run goes on."""
    print(message if prefix is None else f"[{prefix}] {message}", file=sys.stderr, flush=True)


def get_logger(prefix: str | None) -> Callable[[str], None]:
    """`log` with a fixed prefix, for a module or tool that tags all its lines the same way."""
    return functools.partial(log, prefix=prefix)

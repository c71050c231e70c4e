"""Offline tokenization of preference pairs and plain documents into MMIDIDX shards.

Pipeline: the main process reads raw lines (or files) in order and cuts them into chunks; worker
processes parse, validate, template and tokenize a chunk; the main process writes results strictly in
submission order, so the output is byte-identical for any number of workers. At most
`2 * workers` chunks are in flight, so memory does not grow with the input.

This module must not import torch: it runs in spawned worker processes where that would cost
seconds of start-up and hundreds of MB per worker.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing as mp
import os
import shutil
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import numpy as np

from megapmp.data.shards import EOS_POLICIES  # noqa: F401  (one list of policies, checked at every open)
from megapmp.io import InputError, open_lines, parse_json_line, text_field

CODEPMP_TEMPLATE = (
    "### Instruction: Please read the following code description carefully and generate the actual code "
    "implementation based on this description. Please make sure the code is logical and readable.\n\n"
    "### Code Description:\n{prompt}\n\n### Response:"
)
TEMPLATES = {"none": "{prompt}", "codepmp": CODEPMP_TEMPLATE}
# Pairs: the paper's choice, "w/o EOC" (CodePMP section 5.2 and Table 7: no end-of-context token after a
# response beat appending one, e.g. LogiQA2.0-pair accuracy 0.752 vs 0.686): the reward is read at the
# response's own last token. Documents keep EOS: there it only marks where a document ends for the LM.
DEFAULT_EOS_POLICY = {"pairs": "none", "documents": "response"}
OVERLONG_POLICIES = ("error", "truncate")
CHUNK_LINES = 256
IDENTICAL_POLICIES = ("reject", "keep")
IDENTICAL_REASON = "chosen and rejected are identical: no preference signal"


def resolve_template(spec: str) -> tuple[str, str]:
    """`none`, `codepmp` or a file holding the template; returns (name, text).

    The template must contain `{prompt}` (or CodePMP's `{query}`) exactly where the prompt goes; other
    braces are left alone, so templates can contain code.
    """
    if spec in TEMPLATES:
        return spec, TEMPLATES[spec]
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--template {spec!r}: expected none, codepmp or an existing file")
    text = path.read_text(encoding="utf-8").replace("{query}", "{prompt}")
    if text.count("{prompt}") != 1:
        raise ValueError(f"template file {spec}: must contain exactly one {{prompt}} (or {{query}}) placeholder")
    return str(path.resolve()), text


@dataclass(frozen=True)
class PairFormat:
    """How raw records become token sequences; identical in every worker."""

    tokenizer_spec: str
    keys: tuple[str, str, str] = ("prompt", "chosen", "rejected")
    template: str = "{prompt}"
    eos_policy: str = "none"  # "none": the reward is read at a response's last token; "response": EOS appended, read there
    max_length: int | None = None  # limit on prompt + response tokens, for each response
    overlong: str = "error"  # error: reject the record; truncate: see fit_pair
    dtype: str = "uint16"
    identical: str = "reject"  # reject: chosen == rejected is a bad record (nothing to prefer); keep: train on it
    judge_labels: tuple[str, str] | None = None  # judge samples: chosen and rejected must be these two labels


def fit_pair(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int, eos_id: int | None):
    """Truncation policy: make prompt + each response fit in `max_length` tokens.

    1. The prompt is cut from the left (its end, next to the response, is kept) just enough for the
       longest response to fit, but never below min(len(prompt), max_length // 2) tokens.
    2. A response still too long is cut from the right; if EOS is appended by policy, the last kept
       token is replaced by EOS, because the reward is read there.
    Returns (prompt, chosen, rejected, tokens_removed). The policy lives in megapmp.data.groups.fit_group
    (K responses); a pair is its K = 2 case.
    """
    from megapmp.data.groups import fit_group

    prompt, (chosen, rejected), removed = fit_group(prompt, [chosen, rejected], max_length, eos_id)
    return prompt, chosen, rejected, removed


@dataclass
class ChunkResult:
    """What a worker returns for one chunk: flat tokens of the accepted records, and the rejects."""

    tokens: np.ndarray
    sequence_lengths: np.ndarray
    sequences_per_doc: np.ndarray
    rejects: list[dict] = field(default_factory=list)
    truncated: int = 0
    truncated_tokens: int = 0
    identical: int = 0  # rejects (of `rejects`) whose chosen equals their rejected
    labels: np.ndarray | None = None  # groups: float64, one per sequence, NaN at each prompt (megapmp.data.groups)
    pairs: int = 0  # groups: the labelled pairs of the accepted groups


# Per-worker state, built once by the pool initializer.
_worker_format: PairFormat | None = None
_worker_tokenizer = None


def _init_worker(fmt: PairFormat) -> None:
    global _worker_format, _worker_tokenizer
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from megapmp.data.tokenizers import load_tokenizer

    _worker_format = fmt
    _worker_tokenizer = load_tokenizer(fmt.tokenizer_spec)


def _parse_pair(file: str, line_no: int, raw: bytes, keys: tuple[str, str, str]) -> tuple[str, str, str]:
    record = parse_json_line(file, line_no, raw)
    if not isinstance(record, dict):
        raise InputError(file, line_no, None, f"expected a JSON object, got {type(record).__name__}")
    return tuple(text_field(file, line_no, record, key) for key in keys)


def _reject(err: InputError, raw: bytes) -> dict:
    return {"file": err.file, "line": err.line, "field": err.field, "reason": err.reason,
            "raw": raw[:10000].decode("utf-8", errors="replace")}


def process_pair_chunk(file: str, lines: list[tuple[int, bytes]]) -> ChunkResult:
    """Worker entry point: parse, validate, template, tokenize and fit one chunk of JSONL lines."""
    fmt = _worker_format
    rejects, accepted, identical = [], [], 0
    for line_no, raw in lines:
        try:
            prompt, chosen, rejected = _parse_pair(file, line_no, raw, fmt.keys)
        except InputError as e:
            rejects.append(_reject(e, raw))
            continue
        if chosen == rejected and fmt.identical == "reject":
            rejects.append(_reject(InputError(file, line_no, fmt.keys[2], IDENTICAL_REASON), raw))
            identical += 1
            continue
        if fmt.judge_labels and sorted((chosen, rejected)) != sorted(fmt.judge_labels):
            field = fmt.keys[1] if chosen not in fmt.judge_labels else fmt.keys[2]
            why = f"a judge sample's chosen and rejected are its two labels {' and '.join(map(repr, fmt.judge_labels))}"
            rejects.append(_reject(InputError(file, line_no, field, why), raw))
            continue
        accepted.append((line_no, raw, prompt, [chosen, rejected]))
    fitted = _tokenize_and_fit(file, accepted, lambda i: (fmt.keys[1 + i], ("chosen", "rejected")[i]), rejects)
    rejects.sort(key=lambda r: r["line"])
    return ChunkResult(fitted.tokens, fitted.lengths, np.full(len(fitted.kept), 3, np.int64), rejects,
                       fitted.truncated, fitted.truncated_tokens, identical)


@dataclass
class _Fitted:
    tokens: np.ndarray  # every kept record's prompt and responses, flat
    lengths: np.ndarray  # int32 [sequences]
    kept: list[int]  # the records kept, as indices into the input
    truncated: int = 0
    truncated_tokens: int = 0


def _tokenize_and_fit(file: str, records: list[tuple[int, bytes, str, list[str]]], describe,
                      rejects: list[dict]) -> _Fitted:
    """Template and tokenize (line, raw, prompt, responses) records in one batch, append EOS by policy, and
    fit each to --max-length (megapmp.data.groups.fit_group; --overlong error rejects it instead). A record
    whose response would end with the pad token where its reward is read is rejected too. ``describe(i)``
    names response i: (its field, its name in messages). Rejects are appended to ``rejects``."""
    from megapmp.data.groups import fit_group

    fmt, tok = _worker_format, _worker_tokenizer
    texts = [fmt.template.replace("{prompt}", prompt) for _, _, prompt, _ in records]
    texts += [r for *_, responses in records for r in responses]
    encoded = tok.encode_batch(texts)
    eos = [tok.eos_id] if fmt.eos_policy == "response" else []
    out, pieces, lengths = _Fitted(np.empty(0), np.empty(0), []), [], []
    next_response = len(records)
    for k, (line_no, raw, _, responses) in enumerate(records):
        prompt = encoded[k]
        outputs = [encoded[next_response + i] + eos for i in range(len(responses))]
        next_response += len(responses)
        longest = max(range(len(outputs)), key=lambda i: len(outputs[i]))  # the first of the longest
        need = len(prompt) + len(outputs[longest])
        if fmt.max_length is not None and need > fmt.max_length:
            if fmt.overlong == "error":
                field, name = describe(longest)
                rejects.append(_reject(InputError(file, line_no, field, f"prompt + {name} is {need} tokens, over "
                                                  f"--max-length {fmt.max_length} (use --overlong truncate to cut it)"),
                                       raw))
                continue
            prompt, outputs, removed = fit_group(prompt, outputs, fmt.max_length, tok.eos_id if eos else None)
            out.truncated += 1
            out.truncated_tokens += removed
        # Without an appended EOS the reward is read at a response's last token; were that token the pad (a
        # tokenizer that matches its special tokens in raw text turns a literal pad string into it), an HF
        # scorer of the export, which pools the last token that is not the pad, would read it somewhere else.
        padded = [i for i, r in enumerate(outputs) if not eos and r and r[-1] == tok.pad_id]
        if padded:
            field, name = describe(padded[0])
            rejects.append(_reject(InputError(file, line_no, field, f"{name} ends with the pad token (id {tok.pad_id}), "
                                              "where its reward would be read under --eos-policy none (HF scorers "
                                              "skip pad tokens): remove it, or use --eos-policy response"), raw))
            continue
        pieces += [prompt, *outputs]
        lengths += [len(prompt), *(len(r) for r in outputs)]
        out.kept.append(k)
    out.tokens = np.fromiter(itertools.chain.from_iterable(pieces), dtype=fmt.dtype, count=sum(lengths))
    out.lengths = np.asarray(lengths, np.int32)
    return out


def process_document_chunk(items: list[tuple[str, int, bytes]]) -> ChunkResult:
    """Worker entry point for plain documents: (source, line, utf-8 bytes) -> one sequence each."""
    fmt, tok = _worker_format, _worker_tokenizer
    rejects, texts = [], []
    for source, line_no, raw in items:
        if isinstance(raw, BadDocument):
            rejects.append(_reject(InputError(source, line_no, raw.field, raw.reason), raw.raw))
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            # line_no is 0 for a whole file: name the 1-based line that holds the bad byte.
            line = line_no or raw.count(b"\n", 0, e.start) + 1
            rejects.append(_reject(InputError(source, line, None, f"invalid UTF-8 at byte {e.start}"), raw))
            continue
        if not text.strip():
            rejects.append(_reject(InputError(source, line_no or 1, None, "empty document"), raw))
            continue
        texts.append(text)
    eos = [tok.eos_id] if fmt.eos_policy == "response" else []
    docs = [ids + eos for ids in tok.encode_batch(texts)]
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int32, count=len(docs))
    tokens = np.fromiter(itertools.chain.from_iterable(docs), dtype=fmt.dtype, count=int(lengths.sum()))
    return ChunkResult(tokens, lengths, np.ones(len(docs), np.int64), rejects)


def process_group_chunk(file: str, lines: list[tuple[int, bytes]]) -> ChunkResult:
    """Worker entry point for response groups (megapmp.data.groups): parse, validate, template, tokenize and
    fit one chunk of JSONL lines into documents of 1 + K sequences, with one label per sequence."""
    from megapmp.data.groups import identical_across_labels, parse_group_record

    fmt = _worker_format
    rejects, accepted, identical = [], [], 0
    for line_no, raw in lines:
        try:
            prompt, responses, labels = parse_group_record(file, line_no, raw, fmt.keys)
        except InputError as e:
            rejects.append(_reject(e, raw))
            continue
        same = identical_across_labels(responses, labels) if fmt.identical == "reject" else None
        if same is not None:
            why = f"responses {same[0]} and {same[1]} are identical but labelled differently: no preference signal"
            rejects.append(_reject(InputError(file, line_no, fmt.keys[1], why), raw))
            identical += 1
            continue
        accepted.append((line_no, raw, prompt, responses, labels))
    fitted = _tokenize_and_fit(file, [(line_no, raw, prompt, responses) for line_no, raw, prompt, responses, _
                                      in accepted], lambda i: (fmt.keys[1], f"response {i}"), rejects)
    kept_labels = [accepted[k][4] for k in fitted.kept]
    labels_out = [x for labels in kept_labels for x in (np.nan, *labels.tolist())]
    pairs = sum(int((labels[:, None] > labels[None, :]).sum()) for labels in kept_labels)
    rejects.sort(key=lambda r: r["line"])
    return ChunkResult(fitted.tokens, fitted.lengths, np.asarray([1 + len(x) for x in kept_labels], np.int64), rejects,
                       fitted.truncated, fitted.truncated_tokens, identical, np.asarray(labels_out, np.float64), pairs)


def pair_chunks(paths: Iterable[str]) -> Iterator[tuple[str, list[tuple[int, bytes]]]]:
    for path in paths:
        batch = []
        for item in open_lines(path):
            batch.append(item)
            if len(batch) == CHUNK_LINES:
                yield str(path), batch
                batch = []
        if batch:
            yield str(path), batch


DOCUMENT_SUFFIXES = (".py", ".pyi", ".txt", ".md", ".rst", ".c", ".h", ".cc", ".cpp", ".java", ".js", ".ts",
                     ".go", ".rs", ".sh", ".ipynb")


class BadDocument(NamedTuple):
    """A JSONL line that is not a document; the worker turns it into a reject (fail or skip)."""

    field: str
    reason: str
    raw: bytes


def document_sources(paths: Iterable[str], text_key: str = "text") -> Iterator[tuple[str, int, bytes | BadDocument]]:
    """Documents from files and directories (one file = one document, walked in sorted order) and from
    JSONL(.gz) files (one line = one document, its `text_key` field; a bad line yields a BadDocument)."""
    for path in map(Path, paths):
        if path.is_dir():
            for sub in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in DOCUMENT_SUFFIXES):
                raw = sub.read_bytes()
                # A walk meets empty files (package __init__.py) as a matter of course: they are not
                # bad input, just nothing to learn from. A file named explicitly is still checked.
                if raw.strip():
                    yield str(sub), 0, raw
        elif path.name.endswith((".jsonl", ".jsonl.gz")):
            for line_no, raw in open_lines(path):
                try:
                    record = parse_json_line(str(path), line_no, raw)
                except InputError as e:
                    yield str(path), line_no, BadDocument(e.field or text_key, e.reason, raw)
                    continue
                if not isinstance(record, dict) or text_key not in record:
                    yield str(path), line_no, BadDocument(text_key, "not a JSON object with a string field", raw)
                    continue
                value = record[text_key]
                if not isinstance(value, str):
                    reason = f"expected a string, got {type(value).__name__}"
                    yield str(path), line_no, BadDocument(text_key, reason, raw)
                    continue
                yield str(path), line_no, value.encode("utf-8")
        elif path.is_file():
            yield str(path), 0, path.read_bytes()
        else:
            raise FileNotFoundError(f"no such file or directory: {path}")


def document_chunks(paths: Iterable[str], text_key: str = "text") -> Iterator[tuple[list[tuple[str, int, bytes]]]]:
    batch = []
    for item in document_sources(paths, text_key):
        batch.append(item)
        if len(batch) == CHUNK_LINES:
            yield (batch,)
            batch = []
    if batch:
        yield (batch,)


def run_ordered(fn, tasks: Iterable[tuple], fmt: PairFormat, workers: int) -> Iterator[ChunkResult]:
    """Apply `fn(*task)` to every task, in worker processes when workers > 1, yielding results in
    task order with a bounded number in flight."""
    if workers <= 1:
        _init_worker(fmt)
        for task in tasks:
            yield fn(*task)
        return
    ctx = mp.get_context("spawn")  # fork would copy the parent's tokenizer threads and memory
    with ctx.Pool(workers, initializer=_init_worker, initargs=(fmt,)) as pool:
        in_flight: deque = deque()
        for task in tasks:
            in_flight.append(pool.apply_async(fn, task))
            if len(in_flight) >= 2 * workers:
                yield in_flight.popleft().get()
        while in_flight:
            yield in_flight.popleft().get()


@dataclass
class BuildStats:
    documents: int = 0  # pairs in pair mode
    sequences: int = 0
    tokens: int = 0
    rejected: int = 0
    truncated: int = 0
    truncated_tokens: int = 0
    identical: int = 0
    seconds: float = 0.0
    pairs: int = 0  # groups: labelled pairs

    def as_dict(self, kind: str) -> dict:
        unit = kind if kind in ("pairs", "groups") else "documents"
        rate = self.documents / self.seconds if self.seconds else 0.0
        # a group shard's counts also say how many responses and labelled pairs its groups hold
        groups = {"responses": self.sequences - self.documents, "pairs": self.pairs} if kind == "groups" else {}
        return {unit: self.documents, **groups, "sequences": self.sequences, "tokens": self.tokens,
                "rejected": self.rejected, "truncated": self.truncated, "truncated_tokens": self.truncated_tokens,
                "identical": self.identical,
                "seconds": round(self.seconds, 3), f"{unit}_per_s": round(rate, 1),
                "tokens_per_s": round(self.tokens / self.seconds, 1) if self.seconds else 0.0}


BPE_SAMPLE_MB = 32.0  # --bpe-sample-mb: the text a bpe:N tokenizer is trained on, in MB of UTF-8
BPE_PIECE_CHARS = 64 << 10


def bpe_training_texts(inputs: list[str], kind: str, keys: tuple[str, ...], template: str,
                       max_bytes: int = int(BPE_SAMPLE_MB * 1e6), piece_chars: int = BPE_PIECE_CHARS) -> Iterator[str]:
    """Text to train the embedded BPE on: the records as preprocessed, in order, until `max_bytes` of UTF-8
    in all (the budget: --bpe-sample-mb), each record cut into pieces of at most `piece_chars` characters, at a
    line end where there is one. Its training memory is then bounded by the budget whatever the records'
    sizes: the trainer's working memory for one string grows far beyond the string (a single 20 MB record
    took 2.2 GB before pieces; the same text in small records, megabytes). A cut only splits a run of
    newlines or a line longer than a piece between two pieces, so the counts the merges are learned from
    barely move. Malformed records are passed over here; the real pass reports them."""
    seen = 0
    if kind == "documents":
        items = (raw.decode("utf-8", errors="ignore") for _, _, raw in document_sources(inputs, keys[0])
                 if not isinstance(raw, BadDocument))
    elif kind == "groups":
        from megapmp.data.groups import parse_group_record

        def group_texts(file, line_no, raw):
            prompt, responses, _ = parse_group_record(file, line_no, raw, keys)
            return (prompt, *responses)

        items = _record_texts(inputs, template, group_texts)
    else:
        items = _record_texts(inputs, template, lambda file, line_no, raw: _parse_pair(file, line_no, raw, keys))
    for text in items:
        for piece in _pieces(text, piece_chars):
            size = len(piece.encode("utf-8"))
            if seen + size > max_bytes:
                if max_bytes > seen:
                    yield piece.encode("utf-8")[: max_bytes - seen].decode("utf-8", errors="ignore")
                return
            yield piece
            seen += size


def _pieces(text: str, piece_chars: int) -> Iterator[str]:
    """`text` in consecutive pieces of at most `piece_chars` characters, each
    ending after a newline where the piece holds one."""
    start = 0
    while len(text) - start > piece_chars:
        stop = text.rfind("\n", start, start + piece_chars) + 1
        if stop <= start:
            stop = start + piece_chars
        yield text[start:stop]
        start = stop
    if start < len(text):
        yield text[start:] if start else text


def _record_texts(inputs, template: str, texts) -> Iterator[str]:
    """The templated prompt, then the responses, of every well-formed record of pairs or groups;
    ``texts(file, line_no, raw)`` -> (prompt, *responses) or InputError."""
    for path in inputs:
        for line_no, raw in open_lines(path):
            try:
                prompt, *responses = texts(str(path), line_no, raw)
            except InputError:
                continue
            yield template.replace("{prompt}", prompt)
            yield from responses


def build_shard(inputs: list[str], output_prefix: str, *, kind: str = "pairs", tokenizer: str | None = "byte",
                keys: tuple[str, ...] = ("prompt", "chosen", "rejected"), template: str = "none",
                eos_policy: str | None = None, max_length: int | None = None, overlong: str = "error",
                workers: int = 1, on_error: str = "fail", rejects_path: str | None = None,
                vocab_multiple: int = 128, identical: str = "reject", overwrite: bool = False,
                judge: dict | None = None, progress: bool = True, bpe_sample_mb: float = BPE_SAMPLE_MB) -> dict:
    """Tokenize `inputs` into the shard `output_prefix` (.bin/.idx/.json, + .tokenizer/).

    Raises InputError on the first bad record when on_error == "fail", and when nothing is left to
    write; OutputError when the output cannot be written there, or exists and `overwrite` is False.
    Nothing is left behind on any error. A pair whose chosen equals its rejected is a bad record unless
    identical == "keep". `eos_policy` None is DEFAULT_EOS_POLICY[kind] (pairs: "none", the paper's w/o EOC).
    A `bpe:N` tokenizer is trained on the first `bpe_sample_mb` MB of the input text (bpe_training_texts).
    Returns the statistics also stored in the sidecar's `counts`.

    `judge` (megapmp.data.judge.JudgeFormat.to_meta without label ids) makes a pairwise judge's shard: every
    record's chosen and rejected are the format's two labels, each of which must be one token of the
    tokenizer (their ids are recorded in the sidecar's `judge`), and eos_policy must be "none".

    kind "groups" (megapmp.data.groups): one record = a prompt and its labelled responses, written as one
    document of 1 + K sequences plus PREFIX.labels; `keys` name the prompt, responses and labels fields
    (records may instead hold "chosen" and "rejected" lists). A group is a bad record when it has fewer
    than 2 responses or no labelled pair, or (identical == "reject") two identical responses labelled
    differently; --max-length applies to the prompt with each response.
    """
    import time

    from tqdm import tqdm

    from megapmp.data.indexed import IndexedWriter, optimal_dtype
    from megapmp.data.shards import (ShardMeta, group_labels_meta, make_staging_dir, shard_checksums, shard_sizes,
                                     tokenizer_dir)
    from megapmp.data.tokenizers import load_tokenizer, padded_vocab_size, train_bpe

    output_prefix = str(output_prefix)
    eos_policy = eos_policy or DEFAULT_EOS_POLICY.get(kind, "none")
    _check_options(inputs, kind, keys, eos_policy, max_length, overlong, workers, on_error, rejects_path, identical,
                   bpe_sample_mb)
    if judge is not None and (kind != "pairs" or eos_policy != "none"):
        raise ValueError("a judge shard holds pairs whose responses are one label token each: kind 'pairs' and "
                         f"eos_policy 'none', got {kind!r} and {eos_policy!r}")
    _check_paths(inputs, output_prefix, rejects_path, overwrite)
    template_name, template_text = resolve_template(template) if kind != "documents" else ("none", "{prompt}")
    staging = make_staging_dir(output_prefix)
    start = time.perf_counter()
    try:
        tok = _prepare_tokenizer(tokenizer, staging / "tokenizer", inputs, kind, keys, template_text,
                                 load_tokenizer, train_bpe, int(bpe_sample_mb * 1e6))
        dtype = optimal_dtype(tok.vocab_size)
        if judge is not None:
            judge = {**judge, "label_ids": judge_label_ids(tok, judge["labels"])}
        fmt = PairFormat(tok.spec(), tuple(keys), template_text, eos_policy, max_length, overlong, dtype.name,
                         identical, tuple(judge["labels"]) if judge else None)
        stats = BuildStats()
        rejects_file = open(staging / "rejects.jsonl", "w") if rejects_path else None
        unit = kind if kind in ("pairs", "groups") else "docs"
        labels_file = open(staging / "shard.labels", "wb") if kind == "groups" else None
        bar = tqdm(unit=f" {unit}", desc=f"preprocess {Path(output_prefix).name}", disable=not progress,
                   dynamic_ncols=True, mininterval=0.5)
        with IndexedWriter(staging / "shard", dtype) as writer:
            if kind == "pairs":
                results = run_ordered(process_pair_chunk, pair_chunks(inputs), fmt, workers)
            elif kind == "groups":
                results = run_ordered(process_group_chunk, pair_chunks(inputs), fmt, workers)
            else:
                results = run_ordered(process_document_chunk, document_chunks(inputs, keys[0]), fmt, workers)
            for result in results:
                if result.rejects and on_error == "fail":
                    first = result.rejects[0]
                    raise InputError(first["file"], first["line"], first["field"], first["reason"])
                writer.add_flat_documents(result.tokens, result.sequence_lengths, result.sequences_per_doc)
                if labels_file is not None:
                    labels_file.write(result.labels.astype("<f8").tobytes())
                    stats.pairs += result.pairs
                for reject in result.rejects:
                    rejects_file.write(json.dumps(reject, ensure_ascii=False) + "\n")
                stats.rejected += len(result.rejects)
                stats.identical += result.identical
                stats.truncated += result.truncated
                stats.truncated_tokens += result.truncated_tokens
                bar.update(len(result.sequences_per_doc))
            stats.documents, stats.sequences, stats.tokens = writer.num_documents, writer.num_sequences, writer.num_elements
            if not stats.documents:
                # A 0-pair shard only fails later, in the trainer, far from its cause.
                why = f"all {stats.rejected} records were rejected" if stats.rejected else "the input is empty"
                raise InputError(", ".join(map(str, inputs)), None, None, f"no {kind} to write: {why}")
        bar.close()
        if rejects_file:
            rejects_file.close()
        if labels_file is not None:
            labels_file.close()
        stats.seconds = time.perf_counter() - start
        counts = stats.as_dict(kind)
        _publish(staging, output_prefix, tok, rejects_path, labels=kind == "groups")
        identity = tok.identity()
        identity["spec"] = tokenizer_dir(output_prefix).name if identity.get("family") != "byte" else "byte"
        meta = ShardMeta(kind=kind, tokenizer=identity, vocab_size=tok.vocab_size,
                         padded_vocab_size=padded_vocab_size(tok.vocab_size, vocab_multiple),
                         vocab_multiple=vocab_multiple, eos_id=tok.eos_id, pad_id=tok.pad_id, dtype=dtype.name,
                         template={"name": template_name, "text": template_text}, eos_policy=eos_policy,
                         max_length=max_length, overlong=overlong, counts=counts,
                         checksums=shard_checksums(output_prefix, kind), sizes=shard_sizes(output_prefix, kind),
                         inputs=[str(p) for p in inputs], judge=judge,
                         labels=group_labels_meta() if kind == "groups" else None)
        meta.save(output_prefix)
        return counts
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def judge_label_ids(tok, labels) -> list[int]:
    """The token id of each judge label; a label must be one token on its own (it is the whole response
    the judge is trained to give), and the two must differ."""
    ids = []
    for label in labels:
        encoded = tok.encode(label)
        if len(encoded) != 1:
            raise ValueError(f"judge label {label!r} is {len(encoded)} tokens of the tokenizer {tok.spec()}: a label "
                             "must be one token (choose other --labels)")
        ids.append(int(encoded[0]))
    if len(set(ids)) != len(ids):
        raise ValueError(f"judge labels {list(labels)} map to the same token id {ids[0]}")
    return ids


def _check_options(inputs, kind, keys, eos_policy, max_length, overlong, workers, on_error, rejects_path,
                   identical, bpe_sample_mb=BPE_SAMPLE_MB) -> None:
    problems = []
    if not inputs:
        problems.append("no input given")
    for path in inputs:
        if not Path(path).exists():
            problems.append(f"input {path} does not exist")
    if kind not in ("pairs", "documents", "groups"):
        problems.append(f"kind {kind!r} is not pairs, groups or documents")
    if kind == "groups" and len(keys) != 3:
        problems.append(f"--keys for groups needs three names (prompt,responses,labels), got {','.join(keys)}")
    if kind == "pairs" and len(keys) != 3:
        problems.append(f"--keys needs three names (prompt,chosen,rejected), got {','.join(keys)}")
    if kind == "documents" and len(keys) != 1:
        problems.append(f"--keys in documents mode names the one text field, got {','.join(keys)}")
    if eos_policy not in EOS_POLICIES:
        problems.append(f"--eos-policy {eos_policy!r} is not one of {', '.join(EOS_POLICIES)}")
    if not bpe_sample_mb > 0:
        problems.append(f"--bpe-sample-mb {bpe_sample_mb} must be positive")
    if overlong not in OVERLONG_POLICIES:
        problems.append(f"--overlong {overlong!r} is not one of {', '.join(OVERLONG_POLICIES)}")
    if max_length is not None and max_length < 4:
        problems.append(f"--max-length {max_length} is below 4 tokens")
    if workers < 1:
        problems.append(f"--workers {workers} must be at least 1")
    if on_error not in ("fail", "skip"):
        problems.append(f"--on-error {on_error!r} is not fail or skip")
    if identical not in IDENTICAL_POLICIES:
        problems.append(f"--identical {identical!r} is not one of {', '.join(IDENTICAL_POLICIES)}")
    if on_error == "skip" and not rejects_path:
        problems.append("--on-error skip needs --rejects FILE, so that no rejected line is lost silently")
    if problems:
        raise ValueError("; ".join(problems))


def _check_paths(inputs, output_prefix: str, rejects_path: str | None, overwrite: bool) -> None:
    """Refuse outputs that would destroy something: an existing shard (unless `overwrite`), or a rejects
    file that is one of the inputs or one of the shard's own files. Paths are compared resolved."""
    from megapmp.data.shards import OutputError, refuse_existing_output, shard_files

    refuse_existing_output(output_prefix, overwrite)
    if rejects_path:
        target = Path(rejects_path).resolve()
        for path in [*inputs, *shard_files(output_prefix)]:
            if Path(path).resolve() == target:
                raise OutputError(f"--rejects {rejects_path} is {path}: writing the rejects there would destroy it")
        if target.is_dir():
            raise OutputError(f"--rejects {rejects_path} is a directory, expected a file name")
        try:  # now, not after the shard is written: a failure then would leave half the output
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"--rejects {rejects_path}: cannot write there ({e.strerror or e})") from None


def _prepare_tokenizer(spec, staging_dir: Path, inputs, kind, keys, template_text, load_tokenizer, train_bpe,
                       bpe_sample_bytes: int):
    """Load the tokenizer (or train the embedded BPE on the input) and stage a copy to ship with the shard."""
    if spec and spec.startswith("bpe:"):
        vocab = int(spec.split(":", 1)[1])
        return train_bpe(bpe_training_texts(inputs, kind, keys, template_text, bpe_sample_bytes), vocab, staging_dir)
    tok = load_tokenizer(spec)
    if tok.family == "byte":
        return tok
    return load_tokenizer(tok.save(staging_dir))  # workers load the copy that ships with the shard


def _publish(staging: Path, output_prefix: str, tok, rejects_path: str | None, labels: bool = False) -> None:
    """Move the finished files into place: tokenizer, rejects and labels first, the shard's data files last."""
    from megapmp.data.groups import labels_path
    from megapmp.data.indexed import bin_path, idx_path
    from megapmp.data.shards import tokenizer_dir

    if tok.family != "byte":
        final = tokenizer_dir(output_prefix)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging / "tokenizer", final)
    if rejects_path:
        Path(rejects_path).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / "rejects.jsonl", rejects_path)
    if labels:
        os.replace(staging / "shard.labels", labels_path(output_prefix))
    elif labels_path(output_prefix).exists():
        os.remove(labels_path(output_prefix))  # an overwritten group shard's: it would describe nothing now
    os.replace(bin_path(staging / "shard"), bin_path(output_prefix))
    os.replace(idx_path(staging / "shard"), idx_path(output_prefix))

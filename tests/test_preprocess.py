"""Offline preprocessing: tools/preprocess_pairs.py, megapmp.data.preprocess, .indexed and .shards.

Shards are checked with an MMIDIDX reader written here from the format description (struct + numpy
only), against each tokenizer family's own ``encode``. Tokenizers are trained in the test from local
text; nothing is downloaded.
"""

from __future__ import annotations

import base64
import collections
import gzip
import hashlib
import inspect
import io
import json
import json.decoder
import json.encoder
import os
import re
import string
import struct
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from megapmp.data.indexed import IndexedDataset, IndexedWriter, ShardError, optimal_dtype
from megapmp.data.preprocess import InputError, build_shard, fit_pair
from megapmp.data.shards import ShardMeta, load_shard_tokenizer, verify_shard
from megapmp.data.tokenizers import CL100K_PATTERN, load_tokenizer, train_bpe

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "preprocess_pairs.py"

NON_ASCII = "héllo wörld ✓ 中文 🙂 «ça» ∑ᵢ xᵢ²"

# CodePMP's code-generation prompt, written out here independently of megapmp's constant.
CODEPMP_TEXT = (
    "### Instruction: Please read the following code description carefully and generate the actual code "
    "implementation based on this description. Please make sure the code is logical and readable.\n\n"
    "### Code Description:\n{prompt}\n\n### Response:"
)


# ---- an independent MMIDIDX v1 reader --------------------------------------------------------------

MAGIC = b"MMIDIDX\x00\x00"
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count (+1)
DTYPE_BY_CODE = {4: np.dtype("<i4"), 8: np.dtype("<u2")}


@dataclass
class RawShard:
    dtype_code: int
    num_sequences: int
    doc_count: int  # as stored: documents + 1
    lengths: list[int]
    pointers: list[int]
    doc_index: list[int]
    documents: list[list[list[int]]]  # document -> its sequences -> token ids


def read_mmidx(prefix) -> RawShard:
    """Parse PREFIX.idx/.bin byte by byte and check every structural invariant of the format."""
    idx = Path(f"{prefix}.idx").read_bytes()
    data = Path(f"{prefix}.bin").read_bytes()
    magic, version, code, n_seq, n_doc = HEADER.unpack_from(idx, 0)
    assert HEADER.size == 34
    assert magic == MAGIC
    assert version == 1
    assert code in DTYPE_BY_CODE, code
    dtype = DTYPE_BY_CODE[code]
    assert len(idx) == HEADER.size + 4 * n_seq + 8 * n_seq + 8 * n_doc
    offset = HEADER.size
    lengths = np.frombuffer(idx, "<i4", n_seq, offset)
    offset += 4 * n_seq
    pointers = np.frombuffer(idx, "<i8", n_seq, offset)
    offset += 8 * n_seq
    doc_index = np.frombuffer(idx, "<i8", n_doc, offset)

    assert (lengths >= 0).all()
    starts = np.concatenate(([0], np.cumsum(lengths, dtype=np.int64)[:-1])) if n_seq else np.zeros(0, np.int64)
    assert pointers.tolist() == (starts * dtype.itemsize).tolist()
    assert len(data) == int(lengths.sum(dtype=np.int64)) * dtype.itemsize
    assert n_doc >= 1 and doc_index[0] == 0 and doc_index[-1] == n_seq
    assert (np.diff(doc_index) >= 0).all()

    sequences = []
    for pointer, length in zip(pointers.tolist(), lengths.tolist()):
        sequences.append(np.frombuffer(data, dtype, length, pointer).tolist())
    documents = [sequences[a:b] for a, b in zip(doc_index[:-1].tolist(), doc_index[1:].tolist())]
    return RawShard(code, n_seq, n_doc, lengths.tolist(), pointers.tolist(), doc_index.tolist(), documents)


# ---- input builders and CLI helpers ----------------------------------------------------------------


def pair(prompt: str, chosen: str, rejected: str, keys=("prompt", "chosen", "rejected")) -> dict:
    return dict(zip(keys, (prompt, chosen, rejected)))


BASE_PAIRS = [
    pair("Write a function that adds two numbers.", "def add(a, b):\n    return a + b\n",
         "def add(a, b):\n    return a - b\n"),
    pair(f"Return the greeting «{NON_ASCII}» unchanged.", f"def greet():\n    return {NON_ASCII!r}\n",
         "def greet():\n    print('hi')\n"),
    pair("Sort a list in place.", "xs.sort()\n", "sorted(xs)\n"),
    pair("Parse JSON from a string; raise on error.", "import json\nobj = json.loads(s)\n",
         "obj = eval(s)  # unsafe\n"),
    pair("  leading spaces\tand a tab", "  return None", "\treturn 0"),
]


def corpus_lines() -> list[str]:
    lines = [NON_ASCII, "def f(x):\n    return x + 1  # ok"]
    for module in (json.decoder, json.encoder, textwrap, string):
        lines += [line for line in inspect.getsource(module).splitlines() if line.strip()]
    return lines


def generated_pairs(n: int, offset: int = 0) -> list[dict]:
    """`n` distinct pairs built from stdlib source lines (some with non-ASCII text)."""
    lines = corpus_lines()
    out = []
    for i in range(offset, offset + n):
        line = lines[i % len(lines)].strip()
        extra = f" {NON_ASCII}" if i % 7 == 0 else ""
        out.append(pair(f"Explain line {i}:{extra} {line}", f"{line}  # {i}", f"# wrong {i}\n{line[::-1]}"))
    return out


def to_line(record) -> bytes:
    return record if isinstance(record, bytes) else json.dumps(record, ensure_ascii=False).encode("utf-8")


def write_jsonl(path: Path, records) -> Path:
    """Records are dicts (written as JSON) or raw bytes (written verbatim); .gz paths are gzipped."""
    data = b"".join(to_line(r) + b"\n" for r in records)
    path.write_bytes(gzip.compress(data, mtime=0) if path.name.endswith(".gz") else data)
    return path


def run_tool(*args, expect_rc: int | None = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(TOOL), "--no-progress", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, errors="replace", timeout=120)
    if expect_rc is not None:
        assert proc.returncode == expect_rc, f"rc={proc.returncode}\nstdout:{proc.stdout}\nstderr:{proc.stderr}"
    return proc


def preprocess(inputs, prefix, *args, expect_rc: int | None = 0) -> subprocess.CompletedProcess:
    inputs = inputs if isinstance(inputs, (list, tuple)) else [inputs]
    return run_tool("--input", *inputs, "--output-prefix", prefix, *args, expect_rc=expect_rc)


def sidecar(prefix) -> dict:
    return json.loads(Path(f"{prefix}.json").read_text())


def expected_pair(tok, record: dict, template: str = "{prompt}", eos: bool = False,
                  keys=("prompt", "chosen", "rejected")) -> list[list[int]]:
    prompt, chosen, rejected = (record[k] for k in keys)
    tail = [tok.eos_id] if eos else []
    return [tok.encode(template.replace("{prompt}", prompt)), tok.encode(chosen) + tail, tok.encode(rejected) + tail]


def assert_pairs_shard(prefix, tok, records, **kwargs) -> RawShard:
    shard = read_mmidx(prefix)
    assert shard.num_sequences == 3 * len(records)
    assert shard.doc_count == len(records) + 1
    assert shard.doc_index == list(range(0, 3 * len(records) + 1, 3))
    assert shard.documents == [expected_pair(tok, r, **kwargs) for r in records]
    return shard


# ---- tokenizers built in the test ------------------------------------------------------------------


def train_sentencepiece(path: Path, lines: list[str]) -> Path:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=400, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        character_coverage=1.0, minloglevel=2)
    path.write_bytes(model.getvalue())
    return path


def build_tiktoken_file(path: Path, text: str, merges: int) -> Path:
    """Greedy byte-pair merges over cl100k pre-tokens, written as `base64(token) rank` lines."""
    import regex

    ranks = {bytes([b]): b for b in range(256)}
    words = [[bytes([b]) for b in w.encode("utf-8")] for w in regex.findall(CL100K_PATTERN, text)]
    for _ in range(merges):
        counts = collections.Counter(p for w in words for p in zip(w, w[1:]))
        if not counts:
            break
        (left, right), _ = max(counts.items(), key=lambda item: (item[1], item[0]))
        ranks[left + right] = len(ranks)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if w[i] == left and w[i + 1] == right:
                    w[i : i + 2] = [left + right]
                i += 1
    path.write_bytes(b"".join(base64.b64encode(t) + b" " + str(r).encode() + b"\n" for t, r in ranks.items()))
    return path


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    lines = corpus_lines()
    train_bpe(lines, 400, root / "hf")
    train_bpe(lines[::-1][:200] + ["zzz qqq"] * 50, 400, root / "hf_other")
    return {
        "hf": root / "hf" / "tokenizer.json",
        "hf_other": root / "hf_other" / "tokenizer.json",
        "sp": train_sentencepiece(root / "tiny.model", lines),
        "tiktoken": build_tiktoken_file(root / "tiny.tiktoken", "\n".join(lines[:300]), merges=40),
    }


# ---- 1. layout and tokens, for every tokenizer family -------------------------------------------------

FAMILIES = ["byte", "bpe", "hf", "sp", "tiktoken"]
FAMILY_NAMES = {"byte": "byte", "bpe": "hf", "hf": "hf", "sp": "sentencepiece", "tiktoken": "tiktoken"}


@dataclass
class FamilyShard:
    family: str
    prefix: Path
    records: list[dict]
    tok: object  # the tokenizer the tokens must match
    source_tok: object | None  # the tokenizer loaded from the file given on the command line


@pytest.fixture(scope="module", params=FAMILIES)
def family_shard(request, tmp_path_factory, tokenizer_files) -> FamilyShard:
    family = request.param
    root = tmp_path_factory.mktemp(f"shard_{family}")
    records = BASE_PAIRS + generated_pairs(40)
    source = write_jsonl(root / "pairs.jsonl", records)
    prefix = root / "out" / "shard"
    spec = {"byte": "byte", "bpe": "bpe:320"}.get(family) or str(tokenizer_files[family])
    preprocess(source, prefix, "--tokenizer", spec)
    source_tok = None if family == "bpe" else load_tokenizer(spec)
    tok = load_shard_tokenizer(prefix) if family == "bpe" else source_tok
    return FamilyShard(family, prefix, records, tok, source_tok)


def test_mmidx_header_and_layout(family_shard):
    shard = read_mmidx(family_shard.prefix)
    n = len(family_shard.records)
    assert shard.dtype_code == 8  # uint16: every vocabulary here is < 65500
    assert shard.num_sequences == 3 * n and shard.doc_count == n + 1
    assert shard.doc_index[:4] == [0, 3, 6, 9] and shard.doc_index[-1] == 3 * n
    assert shard.pointers[:2] == [0, 2 * shard.lengths[0]]
    assert os.path.getsize(f"{family_shard.prefix}.bin") == 2 * sum(shard.lengths)
    # megapmp's own reader sees the same thing.
    ours = IndexedDataset(family_shard.prefix)
    assert [[s.tolist() for s in ours.document(j)] for j in range(len(ours))] == shard.documents


def test_tokens_equal_the_tokenizers_own_output(family_shard):
    tok = family_shard.tok
    assert tok.family == FAMILY_NAMES[family_shard.family]
    shard = assert_pairs_shard(family_shard.prefix, tok, family_shard.records)
    # The non-ASCII pair really went through the tokenizer, and by default (the paper's "w/o EOC") no EOS
    # follows a response.
    assert tok.decode(shard.documents[1][0]) == BASE_PAIRS[1]["prompt"]
    assert not any(tok.eos_id in (doc[1][-1], doc[2][-1]) for doc in shard.documents)
    if family_shard.family != "byte":  # a subword tokenizer: fewer tokens than UTF-8 bytes
        assert len(shard.documents[0][1]) < len(BASE_PAIRS[0]["chosen"].encode()) + 1


def test_shipped_tokenizer_and_sidecar_identity(family_shard):
    prefix, tok = family_shard.prefix, family_shard.tok
    meta = sidecar(prefix)
    assert meta["tokenizer"]["family"] == FAMILY_NAMES[family_shard.family]
    assert (meta["vocab_size"], meta["eos_id"], meta["pad_id"]) == (tok.vocab_size, tok.eos_id, tok.pad_id)
    assert meta["padded_vocab_size"] % 128 == 0 and 0 <= meta["padded_vocab_size"] - tok.vocab_size < 128
    assert meta["dtype"] == "uint16"
    shipped = Path(f"{prefix}.tokenizer")
    if family_shard.family == "byte":
        assert meta["tokenizer"]["spec"] == "byte" and not shipped.exists()
        return
    assert meta["tokenizer"]["spec"] == "shard.tokenizer" and shipped.is_dir()
    assert meta["tokenizer"]["sha256"] == tok.file_sha256()
    assert load_shard_tokenizer(prefix) == tok
    if family_shard.source_tok is not None:  # the shipped copy is the file we passed, byte for byte
        assert load_shard_tokenizer(prefix).file_sha256() == family_shard.source_tok.file_sha256()
    else:  # bpe:N trained on the input: the requested size (the corpus is big enough for it)
        assert tok.vocab_size == 320 and (tok.eos_id, tok.pad_id) == (0, 1)


@pytest.mark.parametrize("family", ["byte", "hf"])
def test_eos_policy_none_appends_nothing(tmp_path, tokenizer_files, family):
    spec = "byte" if family == "byte" else str(tokenizer_files["hf"])
    records = BASE_PAIRS
    preprocess(write_jsonl(tmp_path / "p.jsonl", records), tmp_path / "s", "--tokenizer", spec,
               "--eos-policy", "none")
    tok = load_tokenizer(spec)
    shard = assert_pairs_shard(tmp_path / "s", tok, records, eos=False)
    assert all(tok.eos_id not in seq for doc in shard.documents for seq in doc)
    assert sidecar(tmp_path / "s")["eos_policy"] == "none"


def test_response_ending_in_the_pad_token_is_refused_without_eos(tmp_path):
    """Without EOS the reward is read at a response's last token. A BPE tokenizer matches its special tokens in
    raw text, so a response ending in the literal pad string ends in the pad id, which an HF scorer's pooling
    skips: a bad record under the default policy, fine under --eos-policy response (EOS is read, not the pad)."""
    records = generated_pairs(60) + [pair("Say ok.", "ok<|pad|>", "no")]
    source = write_jsonl(tmp_path / "p.jsonl", records)
    proc = preprocess(source, tmp_path / "s", "--tokenizer", "bpe:300", expect_rc=2)
    assert f"error: {source}:61 field 'chosen': chosen ends with the pad token (id 1)" in proc.stderr
    assert not Path(f"{tmp_path / 's'}.bin").exists()
    preprocess(source, tmp_path / "s", "--tokenizer", "bpe:300", "--eos-policy", "response")
    assert sidecar(tmp_path / "s")["counts"]["pairs"] == 61


def test_int32_shard_for_large_vocabularies(tmp_path):
    assert optimal_dtype(65499) == np.uint16 and optimal_dtype(65500) == np.int32
    docs = [[[151643, 0, 70000], [2**31 - 1], [65535, 65536]], [[1], [151645, 151645], [7]]]
    with IndexedWriter(tmp_path / "big", np.int32) as writer:
        writer.add_document([np.array(s) for s in docs[0]])
        writer.add_flat_documents(np.array([1, 151645, 151645, 7]), np.array([1, 2, 1]), 3)
    shard = read_mmidx(tmp_path / "big")
    assert shard.dtype_code == 4
    assert shard.documents == docs
    assert shard.lengths == [3, 1, 2, 1, 2, 1]
    assert shard.pointers == [0, 12, 16, 24, 28, 36]
    assert shard.doc_index == [0, 3, 6]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.bin", "big.idx"]  # no scratch files left


# ---- 2. templates and CodePMP's field names -----------------------------------------------------------


def test_codepmp_template_and_keys(tmp_path):
    keys = ("query", "better", "worse")
    records = [pair(r["prompt"], r["chosen"], r["rejected"], keys) for r in BASE_PAIRS]
    source = write_jsonl(tmp_path / "codepmp.jsonl", records)
    preprocess(source, tmp_path / "s", "--template", "codepmp", "--keys", "query,better,worse")
    shard = read_mmidx(tmp_path / "s")
    tok = load_tokenizer("byte")
    prompt_text = tok.decode(shard.documents[1][0])
    assert prompt_text == CODEPMP_TEXT.replace("{prompt}", BASE_PAIRS[1]["prompt"])
    assert prompt_text.startswith("### Instruction: Please read") and prompt_text.endswith("\n\n### Response:")
    assert_pairs_shard(tmp_path / "s", tok, records, template=CODEPMP_TEXT, keys=keys)
    assert sidecar(tmp_path / "s")["template"] == {"name": "codepmp", "text": CODEPMP_TEXT}
    # The default field names do not exist in CodePMP's data: the first line is named.
    proc = preprocess(source, tmp_path / "t", expect_rc=2)
    assert f"{source}:1 field 'prompt': missing field" in proc.stderr


def test_template_file_with_query_placeholder(tmp_path):
    template_file = tmp_path / "tmpl.txt"
    template_file.write_text("<task>{query}</task>\ndef answer() -> dict: return {'k': 1}\n", encoding="utf-8")
    records = BASE_PAIRS[:3]
    preprocess(write_jsonl(tmp_path / "p.jsonl", records), tmp_path / "s", "--template", template_file)
    tok = load_tokenizer("byte")
    shard = read_mmidx(tmp_path / "s")
    assert tok.decode(shard.documents[1][0]) == (
        f"<task>{BASE_PAIRS[1]['prompt']}</task>\ndef answer() -> dict: return {{'k': 1}}\n")
    assert_pairs_shard(tmp_path / "s", tok, records,
                       template="<task>{prompt}</task>\ndef answer() -> dict: return {'k': 1}\n")
    assert sidecar(tmp_path / "s")["template"]["name"] == str(template_file.resolve())

    no_placeholder = tmp_path / "bad.txt"
    no_placeholder.write_text("no placeholder here")
    proc = preprocess(tmp_path / "p.jsonl", tmp_path / "out" / "t", "--template", no_placeholder, expect_rc=2)
    assert "{prompt}" in proc.stderr and str(no_placeholder) in proc.stderr
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


# ---- 3. bad input ---------------------------------------------------------------------------------------

GOOD = BASE_PAIRS[0]
OVERLONG = pair("short prompt", "x" * 200, "y")  # 12 + 201 bytes > --max-length 200
BAD_LINES = {  # name -> (line, field named in the error, words in the reason)
    "malformed_json": (b'{"prompt": "a", "chosen": ', None, "malformed JSON"),
    "missing_field": ({"prompt": "p", "chosen": "c"}, "rejected", "missing field"),
    "empty_field": (pair("p", "", "r"), "chosen", "empty field"),
    "non_string_field": ({"prompt": "p", "chosen": "c", "rejected": ["r"]}, "rejected", "expected a string, got list"),
    "invalid_utf8": (b'{"prompt": "caf\xe9", "chosen": "c", "rejected": "r"}', None, "invalid UTF-8"),
    "json_array": (b'["p", "c", "r"]', None, "expected a JSON object, got list"),
    "overlong": (OVERLONG, "chosen", "prompt + chosen is 212 tokens, over --max-length 200"),  # no EOS by default
}


def bad_input_file(path: Path, bad_line) -> Path:
    """Good, blank, good, bad, good: the bad record is on physical line 4."""
    return write_jsonl(path, [GOOD, b"", BASE_PAIRS[1], bad_line, BASE_PAIRS[2]])


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_bad_record_fails_with_file_line_field_and_leaves_nothing(tmp_path, case):
    line, field, reason = BAD_LINES[case]
    source = bad_input_file(tmp_path / "in.jsonl", line)
    out = tmp_path / "out"
    out.mkdir()
    proc = preprocess(source, out / "shard", "--max-length", 200, expect_rc=2)
    where = f"{source}:4" + (f" field '{field}'" if field else "")
    assert f"error: {where}: " in proc.stderr
    assert reason in proc.stderr
    assert proc.stdout == ""
    assert list(out.iterdir()) == []  # no shard, no sidecar, no tokenizer, no temp files


def test_late_failure_with_trained_tokenizer_and_workers_leaves_nothing(tmp_path):
    # The bad line comes after several chunks were already written, and a BPE was already trained.
    records = generated_pairs(700) + [b"{not json"] + generated_pairs(5)
    source = write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / "out"
    out.mkdir()
    proc = preprocess(source, out / "shard", "--tokenizer", "bpe:300", "--workers", "2", expect_rc=2)
    assert f"{source}:701: malformed JSON" in proc.stderr
    assert list(out.iterdir()) == []


def test_skip_mode_writes_rejects_and_keeps_good_lines(tmp_path):
    names = list(BAD_LINES)
    lines = [GOOD]
    for name in names:  # good line 1, then bad/good alternating: bad records on lines 2, 4, 6, ...
        lines += [BAD_LINES[name][0], BASE_PAIRS[len(lines) % len(BASE_PAIRS)]]
    source = write_jsonl(tmp_path / "in.jsonl", lines)
    rejects = tmp_path / "rej" / "R.jsonl"
    proc = preprocess(source, tmp_path / "s", "--max-length", 200, "--on-error", "skip", "--rejects", rejects)
    good = [r for r in lines if isinstance(r, dict) and r not in [BAD_LINES[n][0] for n in names]]
    assert len(good) == len(names) + 1
    assert_pairs_shard(tmp_path / "s", load_tokenizer("byte"), good)

    rows = [json.loads(line) for line in rejects.read_text(encoding="utf-8").splitlines()]
    assert [r["line"] for r in rows] == [2 + 2 * i for i in range(len(names))]
    for row, name in zip(rows, names):
        _, field, reason = BAD_LINES[name]
        assert row["file"] == str(source) and row["field"] == field and reason in row["reason"]
    assert rows[0]["raw"] == BAD_LINES["malformed_json"][0].decode()
    assert sidecar(tmp_path / "s")["counts"]["rejected"] == len(names) == json.loads(proc.stdout)["rejected"]
    assert f"{len(names)} records rejected" in proc.stderr


def test_skip_without_rejects_file_is_refused(tmp_path):
    source = bad_input_file(tmp_path / "in.jsonl", BAD_LINES["malformed_json"][0])
    out = tmp_path / "out"
    out.mkdir()
    proc = preprocess(source, out / "shard", "--on-error", "skip", expect_rc=2)
    assert "--on-error skip needs --rejects" in proc.stderr
    assert list(out.iterdir()) == []


def test_input_error_message():
    err = InputError("data/x.jsonl", 12, "chosen", "empty field")
    assert str(err) == "data/x.jsonl:12 field 'chosen': empty field"
    assert (err.file, err.line, err.field) == ("data/x.jsonl", 12, "chosen")
    assert str(InputError("f.jsonl", 3, None, "malformed JSON")) == "f.jsonl:3: malformed JSON"


# ---- 4. truncation ---------------------------------------------------------------------------------------

EOS = 99


def test_fit_pair_cuts_only_the_prompt():
    prompt, chosen, rejected = list(range(1, 9)), [20, 21, EOS], [30, EOS]
    assert fit_pair(prompt, chosen, rejected, 10, EOS) == ([2, 3, 4, 5, 6, 7, 8], [20, 21, EOS], [30, EOS], 1)


def test_fit_pair_cuts_only_a_response():
    chosen = list(range(20, 31)) + [EOS]  # 12 tokens
    result = fit_pair([1, 2], chosen, [30, 31, EOS], 10, EOS)
    assert result == ([1, 2], [20, 21, 22, 23, 24, 25, 26, EOS], [30, 31, EOS], 4)


def test_fit_pair_cuts_both():
    prompt, chosen, rejected = list(range(1, 10)), list(range(20, 28)) + [EOS], [30, 31, 32, EOS]
    # The prompt keeps max_length // 2 = 5 tokens (its end); responses get the other 5.
    assert fit_pair(prompt, chosen, rejected, 10, EOS) == ([5, 6, 7, 8, 9], [20, 21, 22, 23, EOS],
                                                           [30, 31, 32, EOS], 4 + 4)


def test_fit_pair_without_eos_and_when_it_fits():
    assert fit_pair([1, 2, 3], [4, 5], [6], 5, EOS) == ([1, 2, 3], [4, 5], [6], 0)
    assert fit_pair([1, 2], list(range(10, 20)), [6], 6, None) == ([1, 2], [10, 11, 12, 13], [6], 6)


def truncation_records() -> list[dict]:
    digits = "".join(str(i % 10) for i in range(70))
    return [
        pair("fits", "ok", "no"),
        pair("P:" + digits, "short", "also short"),  # prompt over
        pair("q", "C:" + digits, "r"),  # chosen over
        pair("Q:" + digits, "C:" + digits[::-1], "R:" + digits[:50]),  # everything over
        pair(NON_ASCII, "c", "R:" + NON_ASCII * 3),  # rejected over, multi-byte text
        pair("p" * 10, "c" * 29, "r" * 29),  # exactly 40 with eos: fits
    ]


@pytest.mark.parametrize("eos_policy", ["none", "response"])
def test_overlong_truncate(tmp_path, eos_policy):
    max_length, tok = 40, load_tokenizer("byte")
    records = truncation_records()
    proc = preprocess(write_jsonl(tmp_path / "p.jsonl", records), tmp_path / "s", "--max-length", max_length,
                      "--overlong", "truncate", "--eos-policy", eos_policy)
    shard = read_mmidx(tmp_path / "s")
    eos = eos_policy == "response"
    originals = [expected_pair(tok, r, eos=eos) for r in records]
    over = [len(p) + max(len(c), len(r)) > max_length for p, c, r in originals]
    assert over == [False, True, True, True, True, False]
    removed = 0
    for (p, c, r), (op, oc, orr), was_over in zip(shard.documents, originals, over):
        assert len(p) + len(c) <= max_length and len(p) + len(r) <= max_length
        if not was_over:
            assert (p, c, r) == (op, oc, orr)
            continue
        assert p == op[len(op) - len(p):] and len(p) >= min(len(op), max_length // 2)  # the end is kept
        for new, old in ((c, oc), (r, orr)):
            if eos:  # the reward is read at the EOS: a cut response keeps it as its last token
                assert new[-1] == tok.eos_id
                assert new == old or new == old[: len(new) - 1] + [tok.eos_id]
            else:
                assert tok.eos_id not in new and new == old[: len(new)]
        removed += len(op) + len(oc) + len(orr) - len(p) - len(c) - len(r)
    counts = sidecar(tmp_path / "s")["counts"]
    assert counts["truncated"] == 4 == json.loads(proc.stdout)["truncated"]
    assert counts["truncated_tokens"] == removed > 0
    assert counts["rejected"] == 0
    assert sidecar(tmp_path / "s")["max_length"] == 40 and sidecar(tmp_path / "s")["overlong"] == "truncate"


# ---- 5. workers ---------------------------------------------------------------------------------------------


def test_workers_output_is_byte_identical(tmp_path, tokenizer_files):
    first = generated_pairs(1500) + [b"{broken"]
    second = generated_pairs(1300, offset=1500) + [pair("p", "", "r")] + generated_pairs(200, offset=2800)
    inputs = [write_jsonl(tmp_path / "a.jsonl", first), write_jsonl(tmp_path / "b.jsonl.gz", second)]
    assert gzip.decompress((tmp_path / "b.jsonl.gz").read_bytes()).count(b"\n") == 1501
    prefixes = {}
    for workers in (1, 2):
        prefixes[workers] = tmp_path / f"w{workers}" / "s"
        preprocess(inputs, prefixes[workers], "--tokenizer", tokenizer_files["hf"], "--workers", workers,
                   "--on-error", "skip", "--rejects", tmp_path / f"w{workers}" / "rejects.jsonl")
    for suffix in (".bin", ".idx"):
        one, two = (Path(f"{prefixes[w]}{suffix}").read_bytes() for w in (1, 2))
        assert one == two and len(one) > 10000
    assert sidecar(prefixes[1])["checksums"] == sidecar(prefixes[2])["checksums"]
    assert (tmp_path / "w1" / "rejects.jsonl").read_bytes() == (tmp_path / "w2" / "rejects.jsonl").read_bytes()
    counts = sidecar(prefixes[2])["counts"]
    assert (counts["pairs"], counts["rejected"]) == (3000, 2)
    # Order is input order across both files, and the gzipped file was tokenized too.
    shard = read_mmidx(prefixes[2])
    tok = load_tokenizer(str(tokenizer_files["hf"]))
    good = generated_pairs(3000)
    for j in (0, 1499, 1500, 2799, 2800, 2999):
        assert shard.documents[j] == expected_pair(tok, good[j])


# ---- 6. sidecar ------------------------------------------------------------------------------------------------


def test_sidecar_fields_and_checksums(tmp_path):
    prefix = tmp_path / "s"
    preprocess(write_jsonl(tmp_path / "p.jsonl", BASE_PAIRS), prefix, "--max-length", 512)
    meta = sidecar(prefix)
    shard = read_mmidx(prefix)
    assert meta["format"] == "megapmp-shard" and meta["version"] == 1 and meta["kind"] == "pairs"
    assert meta["tokenizer"]["family"] == "byte" and meta["tokenizer"]["spec"] == "byte"
    assert (meta["vocab_size"], meta["padded_vocab_size"], meta["vocab_multiple"]) == (258, 384, 128)
    assert (meta["eos_id"], meta["pad_id"], meta["dtype"]) == (256, 257, "uint16")
    assert meta["template"] == {"name": "none", "text": "{prompt}"}
    assert (meta["eos_policy"], meta["max_length"], meta["overlong"]) == ("none", 512, "error")
    counts = meta["counts"]
    assert (counts["pairs"], counts["sequences"], counts["tokens"]) == (5, 15, sum(shard.lengths))
    assert (counts["rejected"], counts["truncated"]) == (0, 0)
    assert meta["inputs"] == [str(tmp_path / "p.jsonl")]
    for suffix in ("bin", "idx"):
        digest = hashlib.sha256(Path(f"{prefix}.{suffix}").read_bytes()).hexdigest()
        assert meta["checksums"][f"{suffix}_sha256"] == digest
    assert verify_shard(prefix).counts == counts
    assert ShardMeta.load(prefix).padded_vocab_size == 384


@pytest.mark.parametrize("suffix", ["bin", "idx"])
def test_verify_shard_detects_a_flipped_byte(tmp_path, suffix):
    prefix = tmp_path / "s"
    preprocess(write_jsonl(tmp_path / "p.jsonl", BASE_PAIRS), prefix)
    path = Path(f"{prefix}.{suffix}")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    # A flipped index byte may already break the index's own consistency, caught before any hashing;
    # either way the message names the damaged file.
    with pytest.raises(ShardError, match=re.escape(f"{prefix}.{suffix}: ")):
        verify_shard(prefix)


def test_vocab_multiple_option(tmp_path):
    preprocess(write_jsonl(tmp_path / "p.jsonl", BASE_PAIRS[:1]), tmp_path / "s", "--vocab-multiple", 64)
    assert (sidecar(tmp_path / "s")["padded_vocab_size"], sidecar(tmp_path / "s")["vocab_multiple"]) == (320, 64)


# ---- 7. partitions and merging ------------------------------------------------------------------------------


@pytest.fixture
def two_partitions(tmp_path, tokenizer_files):
    spec = str(tokenizer_files["hf"])
    parts = {"A": BASE_PAIRS + generated_pairs(30), "B": generated_pairs(45, offset=30)}
    prefixes = {}
    for name, records in parts.items():
        prefixes[name] = tmp_path / name / "part"
        preprocess(write_jsonl(tmp_path / f"{name}.jsonl", records), prefixes[name], "--tokenizer", spec)
    return prefixes, parts, load_tokenizer(spec)


def test_merge_partitions(tmp_path, two_partitions):
    prefixes, parts, tok = two_partitions
    merged = tmp_path / "M" / "all"
    run_tool("--merge", prefixes["A"], prefixes["B"], "--output-prefix", merged)
    a, b, m = read_mmidx(prefixes["A"]), read_mmidx(prefixes["B"]), read_mmidx(merged)
    assert m.documents == a.documents + b.documents
    assert m.doc_index == list(range(0, 3 * (len(parts["A"]) + len(parts["B"])) + 1, 3))
    assert Path(f"{merged}.bin").read_bytes() == Path(f"{prefixes['A']}.bin").read_bytes() + Path(
        f"{prefixes['B']}.bin").read_bytes()
    assert_pairs_shard(merged, tok, parts["A"] + parts["B"])
    meta, ma, mb = sidecar(merged), sidecar(prefixes["A"]), sidecar(prefixes["B"])
    for key in ("pairs", "sequences", "tokens", "rejected", "truncated"):
        assert meta["counts"][key] == ma["counts"][key] + mb["counts"][key]
    assert meta["counts"]["pairs"] == 80
    assert verify_shard(merged).checksums == meta["checksums"]
    assert meta["inputs"] == ma["inputs"] + mb["inputs"]
    assert load_shard_tokenizer(merged) == tok


def test_merge_refuses_different_tokenizers(tmp_path, two_partitions, tokenizer_files):
    prefixes, _, _ = two_partitions
    other = tmp_path / "C" / "part"
    preprocess(write_jsonl(tmp_path / "C.jsonl", BASE_PAIRS), other, "--tokenizer", tokenizer_files["hf_other"])
    # Same family, vocab size and special ids: only the tokenizer files differ.
    assert sidecar(other)["vocab_size"] == sidecar(prefixes["A"])["vocab_size"] == 400
    out = tmp_path / "out"
    proc = run_tool("--merge", prefixes["A"], other, "--output-prefix", out / "bad", expect_rc=2)
    assert f"cannot merge {other} into {prefixes['A']}: they differ in tokenizer" in proc.stderr
    byte_shard = tmp_path / "D" / "part"
    preprocess(write_jsonl(tmp_path / "D.jsonl", BASE_PAIRS), byte_shard)
    proc = run_tool("--merge", prefixes["A"], byte_shard, "--output-prefix", out / "bad", expect_rc=2)
    assert "differ in vocab_size, eos_id, pad_id" in proc.stderr and "tokenizer" in proc.stderr
    assert not out.exists() or list(out.iterdir()) == []


# ---- 8. documents mode ----------------------------------------------------------------------------------------


def write_source_tree(root: Path) -> list[Path]:
    """A few source files, created out of order; returns them in sorted path order."""
    files = {
        "z_last.py": "print('last')\n",
        "a_first.py": f"# {NON_ASCII}\ndef first():\n    return 1\n",
        "m/middle.py": "x = [i * i for i in range(3)]\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    (root / "m" / "ignored.pyc").write_bytes(b"\x00\xff binary")
    return [root / "a_first.py", root / "m" / "middle.py", root / "z_last.py"]


def test_documents_mode_one_sequence_per_file_in_sorted_order(tmp_path, tokenizer_files):
    ordered = write_source_tree(tmp_path / "src")
    tok = load_tokenizer(str(tokenizer_files["hf"]))
    preprocess(tmp_path / "src", tmp_path / "docs", "--documents", "--tokenizer", tokenizer_files["hf"])
    shard = read_mmidx(tmp_path / "docs")
    assert shard.doc_index == [0, 1, 2, 3] and shard.num_sequences == 3
    assert shard.documents == [[tok.encode(p.read_text(encoding="utf-8")) + [tok.eos_id]] for p in ordered]
    meta = sidecar(tmp_path / "docs")
    assert meta["kind"] == "documents" and meta["counts"]["documents"] == 3


def test_documents_mode_reports_invalid_utf8(tmp_path):
    write_source_tree(tmp_path / "src")
    bad = tmp_path / "src" / "m" / "broken.py"
    bad.write_bytes(b"ok = 1\ns = 'caf\xe9'\n")
    out = tmp_path / "out"
    out.mkdir()
    proc = preprocess(tmp_path / "src", out / "docs", "--documents", expect_rc=2)
    assert f"error: {bad}:2: invalid UTF-8" in proc.stderr
    assert list(out.iterdir()) == []

    rejects = tmp_path / "rejects.jsonl"
    preprocess(tmp_path / "src", out / "docs", "--documents", "--on-error", "skip", "--rejects", rejects)
    rows = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [(r["file"], r["line"]) for r in rows] == [(str(bad), 2)] and "invalid UTF-8" in rows[0]["reason"]
    shard = read_mmidx(out / "docs")
    assert len(shard.documents) == 3 and sidecar(out / "docs")["counts"]["rejected"] == 1


def test_documents_mode_jsonl_bad_lines_fail_or_skip(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl.gz", [{"text": "a = 1\n"}, b"{bad", {"text": 5}, {"text": NON_ASCII}])
    out = tmp_path / "out"
    out.mkdir()
    proc = preprocess(source, out / "d", "--documents", expect_rc=2)
    assert f"error: {source}:2 field 'text': malformed JSON: Expecting property name" in proc.stderr
    assert list(out.iterdir()) == []

    rejects = tmp_path / "rejects.jsonl"
    preprocess(source, out / "d", "--documents", "--workers", 2, "--on-error", "skip", "--rejects", rejects)
    rows = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [(r["line"], r["field"], r["reason"]) for r in rows] == [
        (2, "text", "malformed JSON: Expecting property name enclosed in double quotes at column 2"),
        (3, "text", "expected a string, got int")]
    tok = load_tokenizer("byte")
    assert read_mmidx(out / "d").documents == [[tok.encode("a = 1\n") + [256]], [tok.encode(NON_ASCII) + [256]]]
    assert sidecar(out / "d")["counts"]["rejected"] == 2


def test_build_shard_api_matches_cli(tmp_path):
    # The library entry point writes the same bytes as the tool.
    source = write_jsonl(tmp_path / "p.jsonl", BASE_PAIRS)
    preprocess(source, tmp_path / "cli")
    counts = build_shard([str(source)], str(tmp_path / "api"), progress=False)
    assert counts["pairs"] == 5
    for suffix in (".bin", ".idx"):
        assert Path(f"{tmp_path / 'cli'}{suffix}").read_bytes() == Path(f"{tmp_path / 'api'}{suffix}").read_bytes()


# ---------------------------------------------------------------- BPE training memory (ISSUE21)

# VmHWM, not ru_maxrss: on Linux a child's ru_maxrss keeps the RSS of the forked copy of its parent (pytest,
# with torch loaded: 0.5-0.9 GB) from before its exec.
BPE_PEAK = """
import re, sys, tempfile
from megapmp.data.preprocess import bpe_training_texts
from megapmp.data.tokenizers import train_bpe
with tempfile.TemporaryDirectory() as d:
    tok = train_bpe(bpe_training_texts([sys.argv[1]], "pairs", ("prompt", "chosen", "rejected"), "{prompt}"), 512, d)
print(int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024, tok.vocab_size)
"""


def _code_lines(n_bytes: int, seed: int = 0) -> str:
    import random

    rng = random.Random(seed)
    words = ["def", "return", "self", "value", "items", "for", "in", "if", "else", "None", "total", "count"]
    lines, size = [], 0
    while size < n_bytes:
        line = "    " * rng.randint(0, 3) + " ".join(rng.choice(words) + str(rng.randint(0, 999))
                                                  for _ in range(rng.randint(2, 9)))
        lines.append(line)
        size += len(line) + 1
    return "\n".join(lines)


def test_bpe_training_memory_of_one_20mb_record(tmp_path):
    """One 20 MB record under bpe:512: the trainer gets it in pieces, so its peak RSS (measured in a process
    of its own) stays near that of small records: 0.13 GB on the development machine, 1.9 GB before the pieces."""
    big = "\n".join([_code_lines(200_000)] * 100)  # 20 MB in one string (repeated: cheap to make)
    path = tmp_path / "one_record.jsonl"
    path.write_text(json.dumps(pair("Write it.", big, "pass")) + "\n")
    del big
    proc = subprocess.Popen([sys.executable, "-c", BPE_PEAK, str(path)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "true"})
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:  # a regression must not take the (shared) machine down with it
        try:
            rss = int(re.search(r"VmRSS:\s+(\d+)", status.read_text()).group(1)) * 1024
        except (OSError, AttributeError):
            rss = 0
        if rss > 1_500_000_000:
            proc.kill()
            pytest.fail("BPE training passed 1.5 GB of RSS on one 20 MB record")
        time.sleep(0.05)
    peak, vocab = map(int, proc.stdout.read().split())
    assert proc.returncode == 0 and vocab == 512
    assert peak < 400_000_000, f"peak RSS {peak / 1e6:.0f} MB"


def test_bpe_training_texts_are_pieces_of_the_records_within_the_budget(tmp_path):
    from megapmp.data.preprocess import bpe_training_texts

    big = _code_lines(300_000, seed=1)
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(pair("Write it.", big, "x = 1")) + "\n" + json.dumps(pair("p", "c ü", "r")) + "\n")
    keys = ("prompt", "chosen", "rejected")
    pieces = list(bpe_training_texts([str(path)], "pairs", keys, "{prompt}", piece_chars=1000))
    assert "".join(pieces) == "Write it." + big + "x = 1" + "p" + "c ü" + "r"  # nothing lost, nothing reordered
    assert max(map(len, pieces)) <= 1000 and all(p.endswith("\n") for p in pieces[1:-5])  # cut at line ends
    budget = list(bpe_training_texts([str(path)], "pairs", keys, "{prompt}", max_bytes=5000, piece_chars=1000))
    assert sum(len(p.encode()) for p in budget) == 5000 and "".join(budget) == ("Write it." + big)[:5000]

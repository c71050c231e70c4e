"""Group shards: tools/preprocess_pairs.py --groups read back by the from-scratch MMIDIDX reader of
tests/test_preprocess.py (the token part, as Megatron's reader sees it) and by a from-scratch reader of
PREFIX.labels written here from the spec in megapmp/data/groups.py (struct only); FILE:LINE errors for
bad groups; truncation; byte-identical output for any number of workers; merge and verify.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest

from megapmp.data.datasets import GroupDataset
from megapmp.data.groups import fit_group
from megapmp.data.indexed import ShardError
from megapmp.data.tokenizers import load_tokenizer
from tests.test_preprocess import preprocess, read_mmidx, run_tool, sidecar, write_jsonl

GROUPS = [
    {"prompt": "What is 2 + 2?", "responses": ["4", "5", "2 + 2 = 4", "22"], "labels": [True, False, True, False]},
    {"prompt": "Capital of France? «ça»", "chosen": ["Paris"], "rejected": ["Lyon", "Nice"]},
    {"prompt": "Rate these.", "responses": ["a", "b", "c"], "labels": [0.5, 0.9, 0.5]},  # a tie: no pair 0-2
    {"prompt": "Sort xs.", "responses": ["xs.sort()", "sorted(xs)"], "labels": [1, 0]},
]


def read_labels_from_scratch(prefix) -> list[float]:
    """PREFIX.labels as its spec says: float64 little-endian, one per sequence of the index."""
    data = Path(f"{prefix}.labels").read_bytes()
    assert len(data) % 8 == 0
    return [struct.unpack_from("<d", data, 8 * i)[0] for i in range(len(data) // 8)]


def expected_group(tok, record, eos: bool) -> tuple[list[list[int]], list[float]]:
    if "chosen" in record:
        responses, labels = record["chosen"] + record["rejected"], [1.0] * len(record["chosen"]) + \
            [0.0] * len(record["rejected"])
    else:
        responses, labels = record["responses"], [float(x) for x in record["labels"]]
    tail = [tok.eos_id] if eos else []
    return [tok.encode(record["prompt"])] + [tok.encode(r) + tail for r in responses], labels


@pytest.mark.parametrize("eos_policy", [None, "response"])  # None: the pairs' default, "none" (w/o EOC)
def test_group_shard_tokens_labels_and_sidecar(tmp_path, eos_policy):
    source = write_jsonl(tmp_path / "g.jsonl", GROUPS)
    prefix = tmp_path / "s"
    proc = preprocess(source, prefix, "--groups", *(["--eos-policy", eos_policy] if eos_policy else []))
    assert sidecar(prefix)["eos_policy"] == (eos_policy or "none")
    tok = load_tokenizer("byte")
    shard = read_mmidx(prefix)  # Megatron's view: documents of sequences of tokens
    labels = read_labels_from_scratch(prefix)
    assert len(labels) == shard.num_sequences
    for record, document, start in zip(GROUPS, shard.documents, shard.doc_index):
        tokens, want = expected_group(tok, record, eos=eos_policy == "response")
        assert document == tokens
        assert math.isnan(labels[start]) and labels[start + 1 : start + len(tokens)] == want
    meta = sidecar(prefix)
    assert meta["kind"] == "groups" and meta["labels"]["per"] == "sequence of the index"
    assert meta["counts"]["groups"] == 4 and meta["counts"]["responses"] == 12
    assert meta["counts"]["pairs"] == 4 + 2 + 2 + 1 == json.loads(proc.stdout)["pairs"]
    assert meta["sizes"]["labels"] == 8 * shard.num_sequences and "labels_sha256" in meta["checksums"]
    group = GroupDataset(str(prefix))[2]
    assert group.pairs.tolist() == [[1, 0], [1, 2]]  # the tie between responses 0 and 2 makes no pair


BAD = {
    "too_few": ({"prompt": "p", "responses": ["a"], "labels": [True]}, "responses", "at least 2 responses, got 1"),
    "all_equal": ({"prompt": "p", "responses": ["a", "b"], "labels": [0.5, 0.5]}, "labels", "all labels are equal"),
    "count": ({"prompt": "p", "responses": ["a", "b"], "labels": [True]}, "labels", "1 labels for 2 responses"),
    "mixed": ({"prompt": "p", "responses": ["a", "b"], "labels": [True, 0]}, "labels", "mixes booleans and numbers"),
    "nan": (b'{"prompt": "p", "responses": ["a", "b"], "labels": [NaN, 1]}', "labels", "not a finite number"),
    "string_label": ({"prompt": "p", "responses": ["a", "b"], "labels": ["yes", "no"]}, "labels",
                     "expected a boolean or a number, got str"),
    "empty_response": ({"prompt": "p", "responses": ["a", " "], "labels": [1, 0]}, "responses", "item 1: empty string"),
    "not_a_list": ({"prompt": "p", "responses": "a", "labels": [1]}, "responses", "expected a list of strings"),
    "both_forms": ({"prompt": "p", "responses": ["a", "b"], "labels": [1, 0], "chosen": ["a"]}, "chosen",
                   "either 'responses' with 'labels', or 'chosen' with 'rejected'"),
    "no_responses": ({"prompt": "p"}, "responses", "missing field"),
    "no_rejected": ({"prompt": "p", "chosen": ["a", "b"]}, "rejected", "missing field"),
    "identical": ({"prompt": "p", "responses": ["a", "b", "a"], "labels": [1, 0, 0]}, "responses",
                  "responses 0 and 2 are identical but labelled differently"),
    "overlong": ({"prompt": "p" * 30, "responses": ["a" * 40, "b"], "labels": [1, 0]}, "responses",
                 "prompt + response 0 is 70 tokens, over --max-length 50"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_group_fails_with_file_line_field(tmp_path, case):
    line, field, reason = BAD[case]
    source = write_jsonl(tmp_path / "in.jsonl", [GROUPS[0], GROUPS[1], line, GROUPS[2]])
    out = tmp_path / "out"
    out.mkdir()
    proc = preprocess(source, out / "s", "--groups", "--max-length", 50, expect_rc=2)
    assert f"error: {source}:3 field '{field}': " in proc.stderr and reason in proc.stderr, proc.stderr
    assert list(out.iterdir()) == []


def test_skip_mode_and_identical_keep(tmp_path):
    lines = [GROUPS[0], BAD["all_equal"][0], BAD["identical"][0], GROUPS[3]]
    source = write_jsonl(tmp_path / "in.jsonl", lines)
    preprocess(source, tmp_path / "s", "--groups", "--on-error", "skip", "--rejects", tmp_path / "r.jsonl")
    rejects = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejects] == [2, 3] and sidecar(tmp_path / "s")["counts"]["identical"] == 1
    assert len(GroupDataset(str(tmp_path / "s"))) == 2
    preprocess(source, tmp_path / "k", "--groups", "--identical", "keep", "--on-error", "skip", "--rejects",
               tmp_path / "r2.jsonl")
    assert len(GroupDataset(str(tmp_path / "k"))) == 3


def test_fit_group_truncates_like_fit_pair():
    prompt, responses, removed = fit_group(list(range(10)), [[1] * 8, [2] * 3], 12, eos_id=99)
    assert prompt == list(range(4, 10)) and responses == [[1] * 5 + [99], [2] * 3] and removed == 4 + 2
    assert fit_group([1, 2], [[3], [4]], 12, eos_id=None) == ([1, 2], [[3], [4]], 0)


def test_overlong_truncate_and_workers_are_byte_identical(tmp_path):
    records = [{"prompt": f"question {i} " * (i % 5 + 1), "responses": [f"answer {j} " * (j + 1) for j in range(4)],
                "labels": [j % 2 == 0 for j in range(4)]} for i in range(600)]
    source = write_jsonl(tmp_path / "in.jsonl", records)
    one = preprocess(source, tmp_path / "one", "--groups", "--max-length", 40, "--overlong", "truncate")
    preprocess(source, tmp_path / "two", "--groups", "--max-length", 40, "--overlong", "truncate",
                     "--workers", "2")
    assert json.loads(one.stdout)["truncated"] > 0
    for suffix in (".bin", ".idx", ".labels"):
        assert Path(f"{tmp_path / 'one'}{suffix}").read_bytes() == Path(f"{tmp_path / 'two'}{suffix}").read_bytes()
    shard = read_mmidx(tmp_path / "one")
    starts = shard.doc_index
    assert all(len(doc[0]) + len(r) <= 40 for doc in shard.documents for r in doc[1:])
    assert len(read_labels_from_scratch(tmp_path / "one")) == starts[-1]


def test_merge_verify_and_damage(tmp_path):
    a = preprocess(write_jsonl(tmp_path / "a.jsonl", GROUPS[:2]), tmp_path / "a", "--groups")
    preprocess(write_jsonl(tmp_path / "b.jsonl", GROUPS[2:]), tmp_path / "b", "--groups")
    assert a.returncode == 0
    run_tool("--merge", tmp_path / "a", tmp_path / "b", "--output-prefix", tmp_path / "m")
    preprocess(write_jsonl(tmp_path / "all.jsonl", GROUPS), tmp_path / "all", "--groups")
    for suffix in (".bin", ".idx", ".labels"):
        assert Path(f"{tmp_path / 'm'}{suffix}").read_bytes() == Path(f"{tmp_path / 'all'}{suffix}").read_bytes()
    assert sidecar(tmp_path / "m")["counts"]["pairs"] == sidecar(tmp_path / "all")["counts"]["pairs"]
    run_tool("verify", tmp_path / "m")
    labels = Path(f"{tmp_path / 'm'}.labels")
    data = bytearray(labels.read_bytes())
    data[8 * 2] ^= 1  # one response's label, same size
    labels.write_bytes(bytes(data))
    proc = run_tool("verify", tmp_path / "m", expect_rc=2)
    assert "m.labels: sha256 differs" in proc.stderr
    labels.write_bytes(bytes(data[:-8]))
    with pytest.raises(ShardError, match="labels is .* bytes, the sidecar recorded"):
        GroupDataset(str(tmp_path / "m"))
    labels.unlink()
    with pytest.raises(ShardError, match="the labels of a group shard, is missing"):
        GroupDataset(str(tmp_path / "m"))


def test_labels_checked_at_open(tmp_path):
    prefix = tmp_path / "s"
    preprocess(write_jsonl(tmp_path / "g.jsonl", GROUPS), prefix, "--groups")
    labels = np.fromfile(f"{prefix}.labels", "<f8")
    labels[5] = 1.0  # the second group's prompt (sequence 5)
    labels.tofile(f"{prefix}.labels")
    meta = sidecar(prefix)
    meta.pop("sizes")  # a hand-edited shard: only the content checks can catch it
    Path(f"{prefix}.json").write_text(json.dumps(meta))
    with pytest.raises(ShardError, match=r"group 1 \(sequence 5\): a prompt's label is not NaN"):
        GroupDataset(str(prefix))

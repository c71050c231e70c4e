"""Bad input reaches the user as one line naming the file (and line), exit 2, nothing written or lost.

Covers issue 11, sections 4 and 5: shards checked at open and on demand (`verify`, `--data.verify full`),
token ids outside the vocabulary, and each bad-input case of preprocessing, training and evaluation.
The CLIs run in-process through their `main(argv)` (fast); one test runs each tool as a subprocess, so
the exit code a shell sees is checked too.
"""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megapmp.data.datasets import PairDataset
from megapmp.data.indexed import ShardError
from megapmp.data.preprocess import build_shard
from megapmp.data.shards import ShardMeta, verify_shard
from megapmp.eval.formats import DataError, iter_jsonl
from megapmp.train import main as train_main
from tool_loader import load_tool

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "configs" / "tiny.toml"
FAST = ["--steps", "2", "--data.seq_len", "256", "--data.items_per_step", "4", "--data.micro_batches", "1",
        "--logging.progress", "false", "--logging.eval_interval", "0", "--checkpoint.interval", "0",
        "--num_threads", "1"]


preprocess_tool = load_tool("preprocess_pairs")
evaluate_tool = load_tool("evaluate")


def pairs(n: int, offset: int = 0) -> list[dict]:
    return [{"prompt": f"Return x plus {i}.", "chosen": f"return x + {i}", "rejected": f"return x - {i}"}
            for i in range(offset, offset + n)]


def write_lines(path: Path, records) -> Path:
    """Dicts are written as JSON, bytes verbatim; a .gz path is gzipped."""
    data = b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records)
    path.write_bytes(gzip.compress(data, mtime=0) if path.name.endswith(".gz") else data)
    return path


def run_preprocess(capsys, *argv) -> tuple[int, str]:
    rc = preprocess_tool.main(["--no-progress", *map(str, argv)])
    return rc, capsys.readouterr().err


def one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    return lines[0]


def error_line(stderr: str, prefix: str) -> str:
    """The one error line of a tool that also logs progress to stderr; no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, f"expected one '{prefix}' line on stderr, got:\n{stderr}"
    return lines[0]


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- preprocessing: bad input ---------------------------------------------------------------------


def test_truncated_gzip_is_one_line_naming_the_file(tmp_path, capsys):
    whole = write_lines(tmp_path / "p.jsonl.gz", pairs(300))
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole.read_bytes()[: len(whole.read_bytes()) // 2])
    out = tmp_path / "out"
    rc, err = run_preprocess(capsys, "--input", cut, "--output-prefix", out / "s")
    line = one_line_error(err)
    assert rc == 2 and line.startswith(f"error: {cut}:") and "truncated gzip file" in line
    assert not out.exists() or listing(out) == []


def test_lone_surrogate_names_file_line_field_and_skip_mode_skips_it(tmp_path, capsys):
    bad = b'{"prompt": "p", "chosen": "a \\ud800 b", "rejected": "r"}'
    source = write_lines(tmp_path / "p.jsonl", [*pairs(2), bad, *pairs(2, offset=2)])
    out = tmp_path / "out"
    out.mkdir()
    rc, err = run_preprocess(capsys, "--input", source, "--output-prefix", out / "s")
    assert rc == 2 and one_line_error(err).startswith(f"error: {source}:3 field 'chosen': lone surrogate")
    assert listing(out) == []

    rejects = tmp_path / "rejects.jsonl"
    rc, _ = run_preprocess(capsys, "--input", source, "--output-prefix", out / "s", "--on-error", "skip",
                           "--rejects", rejects)
    assert rc == 0
    rows = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [(r["line"], r["field"]) for r in rows] == [(3, "chosen")]
    meta = ShardMeta.load(out / "s")
    assert meta.counts["pairs"] == 4 and meta.counts["rejected"] == 1


def test_unwritable_output_directory(tmp_path, capsys):
    source = write_lines(tmp_path / "p.jsonl", pairs(3))
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the output folder should be\n")
    rc, err = run_preprocess(capsys, "--input", source, "--output-prefix", blocker / "sub" / "s")
    line = one_line_error(err)
    assert rc == 2 and f"{blocker / 'sub'}: cannot write the output there" in line
    assert blocker.read_text() == "a file where the output folder should be\n"


@pytest.mark.skipif(not hasattr(sys, "getuid") or __import__("os").getuid() == 0,
                    reason="root writes into read-only folders; the file-as-folder case above covers root")
def test_read_only_output_directory(tmp_path, capsys):
    source = write_lines(tmp_path / "p.jsonl", pairs(3))
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    rc, err = run_preprocess(capsys, "--input", source, "--output-prefix", locked / "s")
    assert rc == 2 and f"{locked}: cannot write the output there" in one_line_error(err)
    assert listing(locked) == []


def test_existing_output_prefix_is_refused_unless_overwrite(tmp_path, capsys):
    first = write_lines(tmp_path / "a.jsonl", pairs(3))
    second = write_lines(tmp_path / "b.jsonl", pairs(5, offset=10))
    prefix = tmp_path / "s"
    assert run_preprocess(capsys, "--input", first, "--output-prefix", prefix)[0] == 0
    before = {p: p.read_bytes() for p in (Path(f"{prefix}.bin"), Path(f"{prefix}.idx"), Path(f"{prefix}.json"))}
    rc, err = run_preprocess(capsys, "--input", second, "--output-prefix", prefix)
    line = one_line_error(err)
    assert rc == 2 and line.startswith(f"error: {prefix}: a shard already exists") and "--overwrite" in line
    assert {p: p.read_bytes() for p in before} == before
    assert run_preprocess(capsys, "--input", second, "--output-prefix", prefix, "--overwrite")[0] == 0
    assert ShardMeta.load(prefix).counts["pairs"] == 5


def test_merge_refuses_an_existing_output(tmp_path, capsys):
    source = write_lines(tmp_path / "a.jsonl", pairs(3))
    assert run_preprocess(capsys, "--input", source, "--output-prefix", tmp_path / "a")[0] == 0
    assert run_preprocess(capsys, "--input", source, "--output-prefix", tmp_path / "b")[0] == 0
    rc, err = run_preprocess(capsys, "--merge", tmp_path / "a", tmp_path / "a", "--output-prefix", tmp_path / "b")
    assert rc == 2 and "a shard already exists" in one_line_error(err)
    assert ShardMeta.load(tmp_path / "b").counts["pairs"] == 3


def test_rejects_equal_to_an_input_is_refused_and_the_input_kept(tmp_path, capsys):
    source = write_lines(tmp_path / "p.jsonl", [*pairs(3), b"{bad"])
    original = source.read_bytes()
    (tmp_path / "sub").mkdir()
    same = tmp_path / "sub" / ".." / "p.jsonl"  # spelled differently: the check compares resolved paths
    out = tmp_path / "out"
    rc, err = run_preprocess(capsys, "--input", source, "--output-prefix", out / "s", "--on-error", "skip",
                             "--rejects", same)
    assert rc == 2 and "writing the rejects there would destroy it" in one_line_error(err)
    assert source.read_bytes() == original
    assert not out.exists() or listing(out) == []


@pytest.mark.parametrize("content", [b"", b"\n  \n\n"], ids=["empty", "blank-lines"])
def test_empty_input_is_refused(tmp_path, capsys, content):
    source = tmp_path / "p.jsonl"
    source.write_bytes(content)
    out = tmp_path / "out"
    rc, err = run_preprocess(capsys, "--input", source, "--output-prefix", out / "s")
    assert rc == 2 and one_line_error(err) == f"error: {source}: no pairs to write: the input is empty"
    assert not out.exists() or listing(out) == []


def test_identical_chosen_and_rejected_is_bad_input_counted(tmp_path, capsys):
    same = {"prompt": "p", "chosen": "return 1", "rejected": "return 1"}
    source = write_lines(tmp_path / "p.jsonl", [*pairs(2), same, *pairs(1, offset=5)])
    rc, err = run_preprocess(capsys, "--input", source, "--output-prefix", tmp_path / "fail")
    line = one_line_error(err)
    assert rc == 2 and line.startswith(f"error: {source}:3 field 'rejected': chosen and rejected are identical")
    assert not Path(f"{tmp_path / 'fail'}.bin").exists()

    rejects = tmp_path / "rejects.jsonl"
    rc, err = run_preprocess(capsys, "--input", source, "--output-prefix", tmp_path / "skip", "--on-error", "skip",
                             "--rejects", rejects)
    counts = ShardMeta.load(tmp_path / "skip").counts
    assert rc == 0 and (counts["pairs"], counts["rejected"], counts["identical"]) == (3, 1, 1)
    assert [json.loads(r)["line"] for r in rejects.read_text().splitlines()] == [3]

    assert run_preprocess(capsys, "--input", source, "--output-prefix", tmp_path / "keep", "--identical", "keep")[0] == 0
    assert ShardMeta.load(tmp_path / "keep").counts["pairs"] == 4


def test_duplicate_json_keys_are_refused(tmp_path, capsys):
    dup = b'{"prompt": "p", "chosen": "good", "rejected": "bad", "chosen": "bad"}'
    source = write_lines(tmp_path / "p.jsonl", [*pairs(1), dup])
    out = tmp_path / "out"
    rc, err = run_preprocess(capsys, "--input", source, "--output-prefix", out / "s")
    line = one_line_error(err)
    assert rc == 2 and line == f"error: {source}:2 field 'chosen': duplicate key in a JSON object"
    assert not out.exists() or listing(out) == []


def test_preprocess_exit_code_through_a_shell(tmp_path):
    source = write_lines(tmp_path / "p.jsonl", [b'{"prompt": "p", "chosen": "c", "chosen": "d", "rejected": "r"}'])
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_pairs.py"), "--no-progress",
                           "--input", str(source), "--output-prefix", str(tmp_path / "s")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert one_line_error(proc.stderr).startswith(f"error: {source}:1 field 'chosen': duplicate key")


# -- shards: checked at open, and fully on demand --------------------------------------------------


@pytest.fixture
def shard(tmp_path) -> Path:
    prefix = tmp_path / "shard" / "train"
    build_shard([str(write_lines(tmp_path / "p.jsonl", pairs(24)))], str(prefix), progress=False)
    return prefix


def damage(path: Path, edit) -> None:
    data = bytearray(path.read_bytes())
    edit(data)
    path.write_bytes(bytes(data))


def test_open_checks_file_sizes_and_pointers(shard):
    bin_file = Path(f"{shard}.bin")
    intact_bin = bin_file.read_bytes()
    bin_file.write_bytes(intact_bin[:-2])
    with pytest.raises(ShardError, match=rf"{shard}.bin: \d+ bytes, index says \d+"):
        PairDataset(str(shard))
    bin_file.write_bytes(intact_bin)
    idx = Path(f"{shard}.idx")
    intact = idx.read_bytes()
    idx.write_bytes(intact + b"\0" * 8)
    with pytest.raises(ShardError, match=rf"{shard}.idx: \d+ bytes, its header"):
        PairDataset(str(shard))
    # Header (34 bytes), int32 lengths of the 72 sequences, then their int64 pointers: move the second
    # pointer one token on, so its data would be read shifted.
    pointers = 34 + 4 * 72
    data = bytearray(intact)
    data[pointers + 8 : pointers + 16] = (np.frombuffer(intact, np.int64, 1, pointers + 8) + 2).tobytes()
    idx.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=rf"{shard}.idx: sequence 1 points at byte"):
        PairDataset(str(shard))


def test_open_checks_the_sidecar_counts_and_sizes(shard):
    sidecar = Path(f"{shard}.json")
    meta = json.loads(sidecar.read_text())
    meta["counts"]["pairs"] += 1
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(ShardError, match=r"pairs: 25 in the sidecar, 24 in the index"):
        PairDataset(str(shard))
    meta["counts"]["pairs"] -= 1
    meta["sizes"]["bin"] += 2
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(ShardError, match=r"train.bin is \d+ bytes, the sidecar recorded \d+"):
        PairDataset(str(shard))


def test_full_verification_catches_a_flipped_byte(shard, capsys):
    damage(Path(f"{shard}.bin"), lambda d: d.__setitem__(len(d) // 2, d[len(d) // 2] ^ 0x01))
    PairDataset(str(shard))  # same sizes: the cheap check cannot see it
    with pytest.raises(ShardError, match=rf"{shard}.bin: sha256 differs"):
        verify_shard(shard)
    rc, err = run_preprocess(capsys, "verify", shard)
    assert rc == 2 and one_line_error(err).startswith(f"error: {shard}.bin: sha256 differs")


def test_verify_mode_passes_intact_shards(shard, capsys):
    assert preprocess_tool.main(["--no-progress", "verify", str(shard)]) == 0
    assert preprocess_tool.main(["--no-progress", "--verify", str(shard)]) == 0
    assert f"{shard}: ok" in capsys.readouterr().out


# -- the trainer ---------------------------------------------------------------------------------


def train(capsys, run_dir: Path, *argv) -> tuple[int, str]:
    rc = train_main(["--config", str(TINY), "--run-dir", str(run_dir), *FAST, *map(str, argv)])
    return rc, capsys.readouterr().err


def test_train_without_data_train(tmp_path, capsys):
    rc, err = train(capsys, tmp_path / "run")
    line = one_line_error(err)
    assert rc == 2 and line.startswith("megapmp.train: error: invalid DataConfig: train lists no shard prefix")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, message", [
    (("--data.layout", "sideways"), "layout='sideways' is not duplicated, shared-prefix or group"),
    (("--optimizer.lr", "fast"), "--optimizer.lr expects float, got 'fast'"),
    (("--data.verify", "sometimes"), "verify='sometimes' is not open or full"),
    (("--parallel.nonsense", "1"), "unknown config key 'parallel.nonsense'"),
])
def test_invalid_config_is_one_line_and_leaves_no_run_dir(shard, tmp_path, capsys, override, message):
    rc, err = train(capsys, tmp_path / "run", "--data.train", shard, *override)
    line = one_line_error(err)
    assert rc == 2 and line.startswith("megapmp.train: error: ") and message in line
    assert not (tmp_path / "run").exists()


def test_token_ids_beyond_the_vocabulary_name_shard_and_document(shard, tmp_path, capsys):
    bin_file = Path(f"{shard}.bin")
    bin_file.write_bytes(b"\xff" * bin_file.stat().st_size)  # same size: passes the checks at open
    rc, err = train(capsys, tmp_path / "run", "--data.train", shard)
    line = error_line(err, "megapmp.train: error: ")
    assert rc == 2 and line.startswith(f"megapmp.train: error: {shard}.bin: document ")
    assert "holds token id 65535, outside the vocabulary [0, 258)" in line


def test_data_verify_full_catches_a_flipped_byte_before_training(shard, tmp_path, capsys):
    # A flip that keeps every id inside the vocabulary: only the checksum can see it.
    damage(Path(f"{shard}.bin"), lambda d: d.__setitem__(0, d[0] ^ 0x01))
    rc, err = train(capsys, tmp_path / "run", "--data.train", shard, "--data.verify", "full")
    assert rc == 2 and error_line(err, "megapmp.train: error: ").startswith(
        f"megapmp.train: error: {shard}.bin: sha256 differs")
    assert not (tmp_path / "run").exists()


# -- evaluation inputs ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad, reason", [
    (b'{"prompt": "p", "chosen": "\xff\xfe", "rejected": "r"}', ":2: invalid UTF-8 at byte 27"),
    # json.loads raises ValueError, not JSONDecodeError, past 4300 digits, and RecursionError past its depth
    (b'{"prompt": "p", "chosen": "c", "rejected": "r", "n": ' + b"7" * 5000 + b"}",
     ":2: malformed JSON: Exceeds the limit (4300 digits) for integer string conversion: value has 5000 digits"),
    (b'{"prompt": "p", "chosen": "c", "rejected": "r", "n": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
     ":2: malformed JSON: nested too deeply"),
    (b'{"prompt": "p", "chosen": "x\\udfff", "rejected": "r"}', ":2 field 'chosen': lone surrogate"),
])
def test_evaluate_inputs_name_file_and_line(tmp_path, capsys, bad, reason):
    source = write_lines(tmp_path / "pairs.jsonl", [*pairs(1), bad])
    with pytest.raises(DataError, match="^" + re.escape(f"{source}{reason}")):
        list(iter_jsonl(source))
    rc = evaluate_tool.main(["rm-accuracy", "--model", str(tmp_path / "no_model"), "--data", str(source),
                             "--output", str(tmp_path / "report.json"), "--no-progress"])
    line = one_line_error(capsys.readouterr().err)
    assert rc == 2 and line.startswith(f"evaluate.py: error: {source}{reason}")
    assert not (tmp_path / "report.json").exists()

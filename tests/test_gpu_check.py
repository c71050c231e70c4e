"""tools/gpu_check.sh's plumbing, rehearsed on the CPU (--dry-run: the same parts, CPU tools, tiny settings):
what it leaves in OUT_DIR (the files the device tool brings back: flat, at most 8, plain names), each part's
exit status and time, a part killed at its limit recorded as such while the next part still runs, parts past
the deadline skipped, and summary.json read back from the benches' JSON lines. The device run itself cannot
be tested here; the benches' own tests check their lines (including a bench terminated mid-side)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def gpu_check(out: Path, **env) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHON": sys.executable, **env}
    environ.pop("TRITON_INTERPRET", None)
    return subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), str(out), "--dry-run"], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=600)


def files_written_since(started: float) -> list[str]:
    """Files in the checkout modified since ``started`` (virtualenvs and .git aside)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d != ".git" and not d.startswith(".venv")]
        found += [os.path.join(dirpath, f) for f in filenames if os.stat(os.path.join(dirpath, f)).st_mtime > started]
    return found


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    import time

    out = tmp_path_factory.mktemp("gpu_check")
    started = time.time()
    # The mfu part is killed 2 s in: its bench starts a process per side, each importing torch and building a model
    # before its first step (6.7 s for the whole part on a quiet 2-core machine), so it is always cut short.
    done = gpu_check(out, GPU_CHECK_LIMIT_mfu="2")
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done, files_written_since(started)


def test_output_is_what_the_device_tool_brings_back(dry_run):
    out, done, in_checkout = dry_run
    files = sorted(p.name for p in out.iterdir())
    assert all(p.is_file() for p in out.iterdir()) and len(files) <= 8, files  # flat, at most 8
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in files)
    assert {"summary.txt", "summary.json", "tests.log", "loss.jsonl", "mfu.jsonl"} <= set(files)
    assert "== gpu_check summary" in done.stdout  # the table closes the command's output (the reply's tail)
    assert in_checkout == []  # only OUT_DIR comes back from a device: nothing may land in the checkout


def test_parts_are_recorded_and_a_killed_part_does_not_stop_the_next(dry_run):
    out, _, _ = dry_run
    summary = json.loads((out / "summary.json").read_text())
    parts = {p["part"]: p for p in summary["parts"]}
    assert list(parts) == ["tests", "loss_small", "mfu", "mfu_extra"]
    assert parts["tests"]["rc"] == 0 and parts["loss_small"]["rc"] == 0 and parts["mfu_extra"]["rc"] == 0
    assert parts["mfu"]["rc"] == 124 and parts["mfu"]["killed"] and parts["mfu"]["limit"] == 2
    assert parts["mfu"]["seconds"] <= 2 + 10 + 2  # SIGTERM at the limit, SIGKILL 10 s later at the latest
    # on a CPU every CUDA test is collected and skipped, none fails
    assert summary["tests"]["counts"].get("skipped", 0) > 10 and not summary["tests"]["failed"]


def test_summary_reads_the_benches_lines(dry_run):
    out, _, _ = dry_run
    summary = json.loads((out / "summary.json").read_text())
    loss = summary["loss"]["small"]
    assert set(loss["sides"]) == {"naive", "torch"} and loss["sides"]["torch"]["max_rel_err"] < 1e-5
    extra = summary["mfu"]["tiny"]["prompt 20-70, responses 20-70"]["sides"]["megapmp_shared_prefix"]
    assert extra["tokens_per_s"] > 0 and extra["steps_timed"] == 1


def test_parts_past_the_deadline_are_skipped(tmp_path):
    done = gpu_check(tmp_path, GPU_CHECK_DEADLINE_S="20")
    assert done.returncode == 0, done.stderr[-3000:]
    parts = json.loads((tmp_path / "summary.json").read_text())["parts"]
    assert [p["part"] for p in parts] == ["tests", "loss_small", "mfu"] and all(p["rc"] == "skipped" for p in parts)


def test_a_second_try_runs_only_the_parts_named(tmp_path):
    done = gpu_check(tmp_path, GPU_CHECK_PARTS="mfu_extra")
    assert done.returncode == 0, done.stderr[-3000:]
    parts = json.loads((tmp_path / "summary.json").read_text())["parts"]
    assert [(p["part"], p["rc"]) for p in parts] == [("mfu_extra", 0)]
    assert not (tmp_path / "loss.jsonl").exists() and not (tmp_path / "tests.log").exists()


def test_usage():
    done = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh")], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "usage" in done.stderr

"""tools/bench_loss.py end to end on a reduced CPU shape: one JSON line per side as it finishes, then a summary
line with the documented keys; the fused (Triton's torch twin) and chunked (megapmp.loss's CPU path) sides equal
to the naive logits path.

Tolerance 1e-5 relative: all three sides are fp32 on CPU and differ only in summation order (~3e-7)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_loss_reports_every_side():
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_loss.py"), "--device", "cpu", "--shape", "small",
                           "--tokens", "256", "--pairs", "4", "--reps", "1"],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = [json.loads(line) for line in done.stdout.strip().splitlines()]
    *sides, out = lines
    assert [s["side"] for s in sides] == ["naive", "torch", "chunked"] and out["line"] == "summary"
    for side in sides:  # each side's own line holds what the summary says of it
        assert side["line"] == "side" and side["tool"] == "bench_loss" and side["tokens"] == 256
        assert side["ms"] == out[f"{side['side']}_ms"] and side["peak_bytes"] == out[f"{side['side']}_peak_bytes"]
    for key in ("fused_peak_bytes", "naive_peak_bytes", "fused_ms", "naive_ms", "max_rel_err", "device",
                "chunked_peak_bytes", "chunked_ms", "chunked_max_rel_err", "chunked_rows"):
        assert out[key] is not None, key
    assert out["device"].startswith("cpu") and (out["tokens"], out["vocab"], out["hidden"]) == (256, 16384, 256)
    assert out["fp32_accumulation_mode"] == "fp32"  # an fp32 model accumulates in fp32 with no special GEMM
    assert out["max_rel_err"] < 1e-5 and out["chunked_max_rel_err"] < 1e-5
    # Both memory-bounded sides need less than the logits the naive side keeps ([T, V] fp32, twice over).
    logits_bytes = 4 * out["tokens"] * out["vocab"]
    assert out["naive_workspace_bytes"] > logits_bytes
    assert out["fused_workspace_bytes"] < logits_bytes and out["chunked_workspace_bytes"] < logits_bytes


@pytest.mark.parametrize("flags,message", [
    (["--accumulate", "fast"], "triton@MODE with MODE in addmm,mm,cast"),
    (["--sides", "naive,torch@mm"], "unknown side"),
    (["--recompute-config", "128,128"], "five integers"),
])
def test_bad_side_flags_are_usage_errors(flags, message):
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_loss.py"), "--device", "cpu", *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]

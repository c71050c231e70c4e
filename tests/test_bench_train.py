"""tools/bench_train.py end to end with tiny settings: one JSON line with the documented keys, both sides fed
the same real tokens, and (same weights, same pairs, same normalisation) the same first-step losses.

Tolerance 1e-5 on losses: fp32 on CPU, the padded HF forward and our packed forward run the same math on
different tensor shapes, so only summation order differs (~1e-7 on the O(1) RM loss, ~1e-6 on the LM loss).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "tiny", "--pairs-per-step", "3", "--seq-len", "512", "--prompt-len", "8,24",
        "--response-len", "8,32", "--warmup", "1", "--steps", "1", "--mem-steps", "2",
        "--threads", "1"]  # 2 intra-op threads on 2 shared cores make tiny ops ~20x slower
TOL = 1e-5


def run_bench(*extra) -> dict:
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_train.py"), *TINY, *extra],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    return json.loads(lines[0])


@pytest.mark.parametrize("layout,packing", [("duplicated", "flat"), ("shared-prefix", "flat"), ("duplicated", "rows")])
def test_bench_against_baseline(layout, packing):
    out = run_bench("--layout", layout, "--packing", packing)
    for key in ("megapmp_tokens_per_s", "baseline_tokens_per_s", "speedup", "megapmp_peak_bytes",
                "baseline_peak_bytes", "memory_ratio", "model", "device", "layout", "pairs_per_step",
                "real_tokens_per_step", "baseline_padded_tokens_per_step", "megapmp_row_tokens_per_step",
                "loss_megapmp", "loss_baseline"):
        assert key in out and out[key] is not None, key
    assert out["layout"] == layout and out["model"] == "tiny" and out["device"] == "cpu"
    assert out["pairs_per_step"] == 3
    # Both sides processed the same real tokens ([P C] + [P R] per pair), counted from their own batches.
    assert out["megapmp_real_tokens_per_step"] == out["baseline_real_tokens_per_step"] == out["real_tokens_per_step"]
    assert out["lm_tokens_per_step"] == out["baseline_lm_tokens_per_step"] > 0
    assert out["baseline_padded_tokens_per_step"] >= out["real_tokens_per_step"]
    prompts_encoded_once = out["real_tokens_per_step"] - out["megapmp_row_tokens_per_step"]  # flat, shared-prefix
    if packing == "rows":
        assert out["megapmp_row_tokens_per_step"] % 512 == 0 and out["packing"] == "rows"
    elif layout == "duplicated":  # a flat row holds exactly the real tokens
        assert out["megapmp_row_tokens_per_step"] == out["real_tokens_per_step"]
    else:  # ... and shared-prefix encodes each of the 3 prompts (8-24 tokens) once
        assert 3 * 8 <= prompts_encoded_once <= 3 * 24
    assert out["megapmp_tokens_per_s"] > 0 and out["baseline_tokens_per_s"] > 0
    assert out["megapmp_peak_bytes"] > 0 and out["baseline_peak_bytes"] > 0
    assert out["memory_ratio"] == pytest.approx(out["baseline_peak_bytes"] / out["megapmp_peak_bytes"])
    assert out["rm_loss_abs_diff"] < TOL and out["lm_loss_abs_diff"] < TOL
    assert out["loss_megapmp"] == pytest.approx(out["loss_baseline"], abs=2 * TOL)


def test_bench_compare_layouts():
    out = run_bench("--compare-layouts", "--no-memory")
    for key in ("duplicated_tokens_per_s", "shared_prefix_tokens_per_s", "shared_prefix_speedup"):
        assert out[key] > 0, key
    assert out["duplicated_real_tokens_per_step"] == out["shared_prefix_real_tokens_per_step"] \
        == out["real_tokens_per_step"]
    assert out["shared_prefix_row_tokens_per_step"] < out["duplicated_row_tokens_per_step"]
    # The FLOP ratio is the speedup a perfect implementation would get; the LM head is part of both.
    assert 1.0 < out["flops_ratio"] < out["duplicated_row_tokens_per_step"] / out["shared_prefix_row_tokens_per_step"]
    assert 0 < out["lm_head_flops_share_duplicated"] < out["lm_head_flops_share_shared_prefix"] < 1
    assert out["rm_loss_abs_diff"] < TOL and out["lm_loss_abs_diff"] < TOL


def test_bench_group_layout_against_the_expanded_pairs():
    """--layout group: one line per side (group, duplicated, shared-prefix), then the summary; the same pairs
    in every side (so the same RM loss), the group side encoding far fewer tokens per pair."""
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_train.py"), "--layout", "group", "--model", "tiny",
                           "--groups-per-step", "2", "--responses-per-group", "6", "--prompt-len", "8,24",
                           "--response-len", "8,32", "--seq-len", "512", "--warmup", "1", "--steps", "1",
                           "--threads", "1", "--lm-weighting", "pairs"],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    *sides, summary = [json.loads(line) for line in done.stdout.strip().splitlines()]
    assert [s["side"] for s in sides] == ["group", "duplicated", "shared-prefix"]
    group, duplicated, shared = sides
    assert group["pairs_per_step"] == duplicated["pairs_per_step"] == 2 * 3 * 3  # 3 correct x 3 incorrect each
    assert group["real_tokens_per_pair"] < shared["real_tokens_per_pair"] < duplicated["real_tokens_per_pair"]
    assert group["flop_ceiling"] > shared["flop_ceiling"] > 1.0 == duplicated["flop_ceiling"]
    for side in sides:
        assert side["pairs_per_s"] > 0 and side["fraction_of_ceiling"] == pytest.approx(
            side["speedup_vs_duplicated"] / side["flop_ceiling"])
    # --lm-weighting pairs: the group step is the expanded step, term for term
    assert group["first_step_loss"] == pytest.approx(duplicated["first_step_loss"], rel=1e-6)
    assert summary["rm_loss_abs_diff_group_vs_duplicated"] < TOL
    assert summary["group_flop_ceiling"] == group["flop_ceiling"] and "targets" in summary

"""tools/bench_shapes.py end to end: one JSON line; on bench_mfu's mix the token budget gives one shape and
the exact / bucketed policies many, with padding as the packed rows define it (checked against the loader)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_shapes_and_padding_of_each_policy():
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_shapes.py"), "--steps", "12"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    for layout in ("duplicated", "shared-prefix"):
        exact, bucket, budget = (out["layouts"][layout][p] for p in ("exact", "bucket:256", "budget"))
        assert exact["padding"] == 0 and exact["distinct_shapes"] > 12  # 4 fresh lengths a step
        assert 1 < bucket["distinct_shapes"] < exact["distinct_shapes"] and 0 < bucket["padding"] < 256 * 4 / 20_000
        assert budget["distinct_shapes"] == 1 and budget["new_shapes_after_step_2"] == 0
        assert budget["new_shapes_per_step_first_10"] == [1] + [0] * 9
        assert budget["micro_batch_tokens"] % 128 == 0 and budget["fitted"] and 0 < budget["padding"] < 0.2
        assert budget["micro_batches_per_step_mean"] >= 4

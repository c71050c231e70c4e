"""tools/eoc_ablation.py's resume: a kill leaves a torn record (cut, its run redone); runs measured on other
evaluation data are refused, not averaged with the new ones. (The ablation's training and scoring are the
trainer's and the scorer's, tested in their own files.)"""
import json

import pytest

from tool_loader import load_tool

TOOL = load_tool("eoc_ablation")
LIMITS = {"valid_limit": 300, "bon_limit": 300}


def record(seed: int, **limits) -> str:
    return json.dumps({"setting": "w/o EOC", "seed": seed, **(limits or LIMITS), "rm_accuracy": 0.7}) + "\n"


def test_a_torn_record_is_cut_and_its_run_redone(tmp_path, capsys):
    path = tmp_path / "results.jsonl"
    torn = record(1)[:20]
    path.write_text(record(0) + torn)
    assert [r["seed"] for r in TOOL.finished_runs(path, LIMITS)] == [0]
    assert path.read_text() == record(0)  # the next append starts a line of its own
    assert f"cut a torn last line ({len(torn)} bytes)" in capsys.readouterr().err
    assert TOOL.finished_runs(tmp_path / "absent.jsonl", LIMITS) == []


def test_runs_of_other_limits_are_refused(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(record(0) + record(1, valid_limit=50, bon_limit=300))
    with pytest.raises(ValueError, match="holds 1 runs measured with .'valid_limit': 50"):
        TOOL.finished_runs(path, LIMITS)

"""examples/reproduce_codepmp.sh: the paper's whole pipeline. --scale tiny runs every stage on this CPU (models
trained from scratch and served on loopback; the shared GSM8K / LogiQA 2.0 files, or the fixtures in their
formats where those are absent); --scale 1.5b / 7b print every stage's command under DRY_RUN=1."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "reproduce_codepmp.sh"
GPU_STAGES = ["collect", "summarize", "generate", "shards_pmp", "train_pmp", "pairs_mathshepherd", "pairs_reclor",
              "pairs_logiqa2"] + [f"train_rm_{t}_{i}" for t in ("mathshepherd", "reclor", "logiqa2") for i in ("pmp", "base")] \
             + ["candidates_gsm8k", "candidates_math", "eval_mathshepherd_pmp_bon_gsm8k", "eval_logiqa2_base_mc_reclor",
                "report"]


@pytest.mark.parametrize("scale", ["1.5b", "7b"])
def test_gpu_scales_print_every_stage(scale):
    proc = subprocess.run(["bash", str(SCRIPT), "--scale", scale], env={**os.environ, "DRY_RUN": "1",
                          "PYTHON": sys.executable}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    stages = [line.split("== ")[1].rstrip(" =") for line in proc.stderr.splitlines() if line.startswith("[reproduce] ==")]
    assert all(s in stages for s in GPU_STAGES), set(GPU_STAGES) - set(stages)
    text = proc.stderr
    assert f"bash examples/pretrain_pmp_{scale}.sh" in text and f"SCALE={scale}" in text
    assert "--max-length 1024" in text and "--n 256" in text and "MetaMath-Mistral-7B" in text
    assert not (REPO / f"runs/reproduce-{scale}").exists()  # a dry run writes nothing


def test_reproduce_tiny_end_to_end(tmp_path):
    out = tmp_path / "tiny"
    proc = subprocess.run(["bash", str(SCRIPT), "--scale", "tiny", str(out)], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable}, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    data = json.loads((out / "data_used.json").read_text())
    assert data["source"] in ("shared", "fixtures") and report["data"] == data
    results = report["results"]
    expected = {f"{t}/rm_accuracy" for t in ("math", "logic")} | {"math/bon_candidates", "math/bon_gsm8k_solutions",
                                                                   "logic/mc_logiqa2"}
    assert set(results) == expected
    for key, by_init in results.items():
        assert set(by_init) == {"pmp", "base"}, key
    for init in ("pmp", "base"):
        assert 0 <= results["math/rm_accuracy"][init]["accuracy"] <= 1
        assert [r["n"] for r in results["math/bon_candidates"][init]["rows"]] == [1, 2, 4, 8]
        assert [r["n"] for r in results["math/bon_gsm8k_solutions"][init]["rows"]] == [1, 2, 4]
        assert results["logic/mc_logiqa2"][init]["chance"] == pytest.approx(0.25)
    # The served strong and weak models really wrote the PMP pairs, and the runs' lengths came from epochs.
    pairs = (out / "data" / "codepmp_pairs.jsonl").read_text().splitlines()
    assert len(pairs) > 10 and all(json.loads(p)["chosen_model"] == "strong" for p in pairs)
    assert "steps = " in proc.stderr and "epochs 1 x" in proc.stderr
    sampled = json.loads((out / "data" / "logic_sampled" / "stats.json").read_text())
    # 6 questions read, less those of the evaluation's test file (--exclude: the fixtures repeat some), each
    # sampled from 2 models at 3 grid values
    excluded = sampled["read"].get("questions_excluded_as_in_exclude_files", 0)
    assert excluded < 6 and sampled["read"]["samples"] == (6 - excluded) * 2 * 3
    assert (out / "best_of_n.png").stat().st_size > 0 and "RM accuracy" in (out / "report.md").read_text()
    timings = json.loads((out / "timings.json").read_text())
    print(f"reproduce_codepmp.sh --scale tiny: {timings['total']:.0f} s ({data['source']} data)")


def test_served_export_takes_its_tokenizer_from_its_recipe(tmp_path):
    """tools/serve_models.py serves megapmp's HF exports as causal LMs (the tiny scale's generators): their
    tokenizer is where megapmp_scoring.json says, not necessarily beside the weights."""
    from megapmp.synth.serve import tokenizer_directory

    assert tokenizer_directory(str(tmp_path)) == str(tmp_path)
    (tmp_path / "megapmp_scoring.json").write_text(json.dumps({"tokenizer": {"path": "tokenizer"}}))
    assert tokenizer_directory(str(tmp_path)) == str(tmp_path / "tokenizer")

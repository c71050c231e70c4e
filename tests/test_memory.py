"""The per-rank memory estimator: parameter counts against the real model and the published sizes."""
import subprocess
import sys
from pathlib import Path

import pytest

from megapmp.config import DataConfig, ParallelConfig, model_preset
from megapmp.model import Qwen2RewardModel
from megapmp.parallel.memory import estimate_memory, parameter_counts

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_count_equals_the_tiny_models_numel(tied):
    config = model_preset("tiny")
    config.tie_word_embeddings = tied
    model = Qwen2RewardModel(config)
    assert parameter_counts(config)["total"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("preset,billions", [("qwen2-1.5b", 1.54), ("qwen2-7b", 7.62)])
def test_parameter_count_of_qwen2_presets(preset, billions):
    total = parameter_counts(model_preset(preset))["total"]  # + the score head's H
    assert round(total / 1e9, 2) == billions


def test_estimate_scales_with_the_layout():
    model, data = model_preset("qwen2-7b"), DataConfig(seq_len=2048, items_per_step=1024, micro_batches=32)
    one = estimate_memory(model, ParallelConfig(tp=2, sequence_parallel=True, distributed_optimizer=True), data,
                          "bf16", world_size=32)
    assert one["layout"]["dp"] == 16 and one["layout"]["pairs_per_micro_batch"] == 2
    assert one["parameters_per_rank"] == pytest.approx(parameter_counts(model)["total"] / 2, rel=1e-3)
    assert one["bytes"]["optimizer"] == pytest.approx(12 * one["parameters_per_rank"] / 16)
    plain = estimate_memory(model, ParallelConfig(tp=2, sequence_parallel=True), data, "bf16", world_size=32)
    assert plain["bytes"]["optimizer"] == pytest.approx(8 * one["parameters_per_rank"])
    no_sp = estimate_memory(model, ParallelConfig(tp=2, distributed_optimizer=True), data, "bf16", world_size=32)
    assert no_sp["bytes"]["activations"] > one["bytes"]["activations"]
    assert one["bytes"]["total"] / 2**30 < 80  # fits an H100


def test_cli_prints_layout_and_estimate():
    out = subprocess.run([sys.executable, str(REPO / "tools" / "estimate_memory.py"), "--config",
                          str(REPO / "examples" / "configs" / "pmp_7b.toml"), "--world-size", "32"],
                         capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert "layout: world 32 = tp 2 x pp 1 x dp 16" in out
    for key in ("parameters", "gradients", "optimizer", "activations", "total"):
        assert key in out

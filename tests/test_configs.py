"""Every shipped config in examples/configs/ runs in one process (CPU, tiny model overrides): 2 steps,
a checkpoint, a restart that resumes from it and continues, with the uninterrupted run's curve.

Configs written for many GPUs (tp 2, ZeRO-1, bf16, an untied 7B head) keep everything that one process can
honour: parallel.distributed_optimizer, precision, tie_word_embeddings, rope_theta, the loss, data layout
and schedule. The model shrinks to the tiny preset's sizes and tp/pp to 1. The glob picks up new configs.
"""
import shutil
from pathlib import Path

import pytest

from megapmp import checkpoint as ckpt
from megapmp.config import load_train_config
from megapmp.train import Trainer
from tests.test_train import TINY, losses, pair_shard

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "examples" / "configs").glob("*.toml"))

# The tiny preset's sizes; vocab_size 0 = the test shards' padded vocabulary.
TINY_MODEL = [("model.hidden_size", "64"), ("model.intermediate_size", "176"), ("model.num_hidden_layers", "2"),
              ("model.num_attention_heads", "4"), ("model.num_key_value_heads", "2"), ("model.vocab_size", "0"),
              ("model.max_position_embeddings", "4096")]
ONE_PROCESS = [("parallel.tp", "1"), ("parallel.pp", "1"), ("parallel.vpp", "1")]
# steps overrides the configs' epochs; data.max_length 0: the test shards hold short pairs of any recorded length.
SMALL_RUN = [("steps", "4"), ("data.seq_len", "128"), ("data.max_length", "0"), ("data.items_per_step", "4"),
             ("data.micro_batches", "2"),
             ("logging.progress", "false"), ("logging.eval_interval", "0"), ("checkpoint.interval", "2"),
             ("checkpoint.keep_last", "0"), ("num_threads", "1")]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("config_data")
    pair_shard(root, "train", 64)
    return root


def small_config(path: Path, shards: Path):
    return load_train_config(str(path), TINY_MODEL + ONE_PROCESS + SMALL_RUN + [("data.train", str(shards / "train"))])


@pytest.mark.parametrize("config_path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_runs_saves_and_resumes(config_path, shards, tmp_path):
    whole = Trainer(small_config(config_path, shards), tmp_path / "whole").fit()
    assert [r["step"] for r in whole] == [1, 2, 3, 4]
    saved = [p.name for p in ckpt.list_checkpoints(tmp_path / "whole" / "checkpoints")]
    assert saved == ["step_00000002", "step_00000004"]

    # A run that stopped after its step-2 checkpoint: restart it (resume = "auto") and let it finish.
    run = tmp_path / "restarted"
    shutil.copytree(tmp_path / "whole", run)
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    resumed_trainer = Trainer(small_config(config_path, shards), run)
    assert resumed_trainer.step == 2
    resumed = resumed_trainer.fit()
    assert [r["step"] for r in resumed] == [3, 4]
    assert losses(resumed) == losses(whole[2:])
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in whole[2:]]
    assert ckpt.verify_checkpoint(run / "checkpoints" / "step_00000004")


def test_one_process_distributed_optimizer_is_plain_adamw(shards, capfd, tmp_path):
    """ZeRO-1 over one DP rank shards nothing: plain AdamW, the curve of the same run without
    parallel.distributed_optimizer bit for bit, and a plain (not sharded) checkpoint that resumes."""
    def run(name, *extra):
        cfg = load_train_config(str(TINY), SMALL_RUN + [("data.train", str(shards / "train")), ("steps", "6"),
                                                        ("checkpoint.interval", "3"), *extra])
        return Trainer(cfg, tmp_path / name).fit()

    plain = run("plain")
    zero = run("zero", ("parallel.distributed_optimizer", "true"))
    assert "nothing to shard, using plain AdamW" in capfd.readouterr().err
    assert [(r["loss"], r["grad_norm"]) for r in zero] == [(r["loss"], r["grad_norm"]) for r in plain]
    step3 = tmp_path / "zero" / "checkpoints" / "step_00000003"
    assert (step3 / "optimizer.safetensors").exists() and not ckpt.is_sharded(step3)

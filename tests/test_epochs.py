"""A run's length as epochs over its data (CodePMP's Table 3 gives every run as 1 epoch): the step count is
derived at start, printed, identical on every data-parallel rank, kept by an exact resume, and a resume over
changed data is refused; `steps` still overrides. Also the WCD schedule and data.max_length."""
import json
import math
import shutil

import pytest

from megapmp import checkpoint as ckpt
from megapmp.config import ConfigError, build_train_config, load_train_config
from megapmp.optim import lr_at
from megapmp.train import Trainer, resolve_steps
from tests.distributed_utils import run_ranks
from tests.test_train import FAST, TINY, losses, pair_shard

PAIRS = 100  # 100 pairs at 8 per step: 12 steps per epoch, 4 pairs of each epoch not drawn


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("epochs")
    pair_shard(root, "train", PAIRS, seed=0)
    pair_shard(root, "more", 36, seed=2)
    return root


def epoch_config(shards, *extra, train=("train",)):
    """The golden test's fast config, with its length given as 1 epoch instead of steps."""
    data = [("data.train", ",".join(str(shards / t) for t in train))]
    return load_train_config(str(TINY), FAST + data + [("steps", "0"), ("epochs", "1"), *extra])


def test_steps_from_epochs_pure():
    cfg = build_train_config({"steps": 0, "epochs": 1, "data": {"items_per_step": 64, "train": ["x"]}})
    messages = []
    got = resolve_steps(cfg, [1000], messages.append)
    assert got.steps == 15 and cfg.steps == 0  # floor(1000 / 64); the given config is left as it was
    assert messages == ["steps = 15: epochs 1 x 1,000 pairs in 1 shard(s) / 64 per step "
                        "(40 pairs of the last epoch are not drawn)"]
    # Blended shards: an epoch counts every item of every shard once; the weights only set the mix.
    assert resolve_steps(cfg, [300, 700]).steps == 15
    assert resolve_steps(build_train_config({"steps": 0, "epochs": 2.5, "data": {"items_per_step": 64}}),
                         [1000]).steps == math.floor(2.5 * 1000 / 64)
    # steps given: it wins, and the log says what epochs would have given.
    messages.clear()
    assert resolve_steps(build_train_config({"steps": 7, "epochs": 1, "data": {"items_per_step": 64}}),
                         [1000], messages.append).steps == 7
    assert messages == ["steps = 7 given: it overrides epochs = 1 (15 steps over this data)"]
    # No epochs: steps as given, untouched.
    assert resolve_steps(build_train_config({"steps": 9}), [1000]).steps == 9
    with pytest.raises(ConfigError, match="less than one step of data.items_per_step = 64"):
        resolve_steps(cfg, [63])


def test_steps_and_epochs_validation():
    for table, needle in (({"steps": 0}, "give the run's length as steps, or as epochs"),
                          ({"steps": -1}, "must be >= 0"), ({"epochs": -1.0}, "must be >= 0")):
        cfg = build_train_config({**table, "data": {"train": ["x"]}})
        with pytest.raises(ConfigError, match=needle):
            cfg.validate()
    build_train_config({"steps": 0, "epochs": 1, "data": {"train": ["x"]}}).validate()


def test_trainer_runs_one_epoch_and_says_so(shards, tmp_path, capfd):
    history = Trainer(epoch_config(shards), tmp_path / "run").fit()
    assert len(history) == PAIRS // 8 == 12
    err = capfd.readouterr().err
    assert "steps = 12: epochs 1 x 100 pairs in 1 shard(s) / 8 per step (4 pairs of the last epoch are not drawn)" in err
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (recorded["steps"], recorded["epochs"]) == (12, 1.0)
    # The schedule spans the derived steps: the last step's learning rate is the end of the WSD decay.
    assert history[-1]["lr"] == pytest.approx(lr_at(11, lr=3e-3, total_steps=12, schedule="wsd", warmup_fraction=0.05,
                                                    decay_fraction=0.1, min_lr_ratio=0.0))
    # Two shards blended: one epoch is all 136 items, 17 steps.
    assert len(Trainer(epoch_config(shards, train=("train", "more")), tmp_path / "two").fit()) == 17


def test_resume_keeps_the_derived_steps_and_refuses_changed_data(shards, tmp_path):
    whole = Trainer(epoch_config(shards, ("checkpoint.interval", "4"), ("checkpoint.keep_last", "0")),
                    tmp_path / "whole").fit()
    run = tmp_path / "restarted"
    shutil.copytree(tmp_path / "whole", run)
    for step in (8, 12):
        shutil.rmtree(run / "checkpoints" / f"step_{step:08d}")
    trainer = Trainer(epoch_config(shards, ("checkpoint.interval", "4"), ("checkpoint.keep_last", "0")), run)
    assert trainer.step == 4 and trainer.cfg.steps == 12
    assert losses(trainer.fit()) == losses(whole[4:])

    # The checkpoint records the derived count: the same run over more data derives 17 steps, a schedule for
    # other data, and the resume's config check refuses it (naming the change).
    shutil.rmtree(run / "checkpoints" / "step_00000012")
    with pytest.raises(ckpt.IncompatibleCheckpointError, match=r"steps 12 -> 17"):
        Trainer(epoch_config(shards, train=("train", "more")), run)
    # Another batch size changes the count as well (25 steps); given explicitly, the old count continues it
    # (the batch size change allowed by name).
    with pytest.raises(ckpt.IncompatibleCheckpointError, match=r"steps 12 -> 25"):
        Trainer(epoch_config(shards, ("data.items_per_step", "4")), run)
    resumed = Trainer(epoch_config(shards, ("data.items_per_step", "4"), ("steps", "12"),
                                   ("checkpoint.allow_change", "data.items_per_step")), run)
    assert resumed.step == 8
    resumed.close()


def _steps_on_rank(rank, world_size, shards, run_dir):
    cfg = epoch_config(shards, ("parallel.overlap_grad_reduce", "false"))
    trainer = Trainer(cfg, run_dir)
    return trainer.cfg.steps, [r["loss"] for r in trainer.fit()]


def test_data_parallel_ranks_derive_the_same_steps(shards, tmp_path):
    """items_per_step is global: two data-parallel ranks (each reading half of every step) derive the same
    12 steps as one process, and train the same curve."""
    single = losses(Trainer(epoch_config(shards), tmp_path / "one").fit())
    results = run_ranks(2, _steps_on_rank, shards, str(tmp_path / "dp2"), timeout=300)
    assert [r[0] for r in results] == [12, 12]
    assert [round(x, 7) for x in results[0][1]] == pytest.approx(single, rel=1e-5)


def test_wcd_is_linear_warmup_then_cosine_decay():
    kw = dict(lr=1.0, total_steps=100, schedule="wcd", warmup_fraction=0.25, decay_fraction=0.0, min_lr_ratio=0.0)
    lrs = [lr_at(s, **kw) for s in range(100)]
    assert lrs[:25] == pytest.approx([(s + 1) / 25 for s in range(25)])  # Table 3's logical RM: 25% warmup
    assert lrs[24] == 1.0 and lrs[99] == pytest.approx(0.0, abs=1e-12)
    assert all(a > b for a, b in zip(lrs[24:], lrs[25:]))  # decaying from the end of warmup to the last step
    assert lrs[62] == pytest.approx(0.5 * (1 + math.cos(math.pi * 38 / 75)))
    assert lrs == [lr_at(s, **{**kw, "schedule": "cosine"}) for s in range(100)]


def test_max_length_is_checked_against_the_shards(shards, tmp_path):
    with pytest.raises(ConfigError, match=r"train: preprocessed with --max-length None, but data.max_length = 128"):
        Trainer(epoch_config(shards, ("data.max_length", "128")), tmp_path / "a")
    assert not (tmp_path / "a").exists()
    cfg = build_train_config({"data": {"train": ["x"], "max_length": 1024, "seq_len": 2047}})
    with pytest.raises(ConfigError, match="seq_len=2047 cannot hold a pair of two 1024-token sequences"):
        cfg.validate()

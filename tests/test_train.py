"""The trainer: schedules, config handling, the golden loss curve, exact resume after SIGKILL,
non-finite step handling and the LM -> PMP -> RM initialisation chain."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megapmp import checkpoint as ckpt
from megapmp.config import build_train_config, load_train_config
from megapmp.data.preprocess import build_shard
from megapmp.optim import lr_at
from megapmp.train import Trainer, parse_cli

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden" / "tiny_pmp.json"
TINY = REPO / "examples" / "configs" / "tiny.toml"

# Small enough for a 2-core CI: ~0.1 s per step.
FAST = [("steps", "20"), ("data.seq_len", "256"), ("data.items_per_step", "8"), ("data.micro_batches", "2"),
        ("logging.progress", "false"), ("logging.eval_interval", "0"), ("checkpoint.interval", "0"),
        ("num_threads", "1")]


def synthetic_pairs(path: Path, n: int, seed: int = 0) -> None:
    """Pairs whose chosen and rejected differ in one operator, as a rules mutation would."""
    import random

    rng = random.Random(seed)
    ops = [("+", "-"), ("<", ">="), ("==", "!="), ("and", "or"), ("*", "//")]
    with open(path, "w") as f:
        for _ in range(n):
            good, bad = rng.choice(ops)
            var, const = rng.choice("xyzab"), rng.randint(0, 99)
            body = lambda op: f"def f({var}):\n    return {var} {op} {const}\n"
            f.write(json.dumps({"prompt": f"Return {var} {good} {const}.", "chosen": body(good),
                                "rejected": body(bad)}) + "\n")


def pair_shard(root: Path, name: str, n: int, seed: int = 0) -> Path:
    """ROOT/NAME.{bin,idx,json} from `n` synthetic pairs; returns the shard prefix. The committed golden curve
    was made with EOS appended to every response: that policy is pinned here, whatever the default."""
    synthetic_pairs(root / f"{name}.jsonl", n, seed=seed)
    build_shard([str(root / f"{name}.jsonl")], str(root / name), eos_policy="response", progress=False)
    return root / name


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    pair_shard(root, "train", 400, seed=0)
    pair_shard(root, "valid", 64, seed=1)
    docs = root / "docs"
    docs.mkdir()
    for i in range(12):
        (docs / f"m{i}.py").write_text(f"def g{i}(x):\n    return x * {i} + {i % 5}\n" * 3)
    build_shard([str(docs)], str(root / "docs"), kind="documents", keys=("text",), progress=False)
    return root


def config(shards, *extra):
    return load_train_config(str(TINY), FAST + [("data.train", str(shards / "train"))] + list(extra))


def losses(history):
    return [round(r["loss"], 7) for r in history]


# -- schedule and config ---------------------------------------------------------------------------

def test_wsd_schedule_shape():
    kw = dict(lr=1.0, total_steps=100, schedule="wsd", warmup_fraction=0.03, decay_fraction=0.1, min_lr_ratio=0.0)
    lrs = [lr_at(s, **kw) for s in range(100)]
    assert lrs[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert all(x == 1.0 for x in lrs[3:90])
    assert lrs[99] == pytest.approx(0.0, abs=1e-12)
    assert all(a > b for a, b in zip(lrs[89:], lrs[90:]))  # strictly decaying over the last 10%
    assert lrs[94] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)), rel=1e-6)


def test_cosine_schedule_ends_at_min():
    kw = dict(lr=2.0, total_steps=50, schedule="cosine", warmup_fraction=0.1, decay_fraction=0.0, min_lr_ratio=0.1)
    assert lr_at(4, **kw) == pytest.approx(2.0)
    assert lr_at(49, **kw) == pytest.approx(0.2)


def test_validate_names_every_offending_value():
    cfg = build_train_config({"model": {"preset": "tiny", "num_attention_heads": 3}, "optimizer": {"lr": -1.0},
                              "data": {"train": [], "layout": "zigzag"}, "steps": 0})
    with pytest.raises(ValueError) as err:
        cfg.validate()
    message = str(err.value)
    for needle in ("num_attention_heads=3", "lr=-1.0", "train lists no shard", "layout='zigzag'", "steps=0"):
        assert needle in message


def test_dense_mask_attention_needs_row_packing():
    data = {"train": ["shard"]}
    cfg = build_train_config({"model": {"preset": "tiny"}, "data": data, "attention_backend": "sdpa"})
    with pytest.raises(ValueError, match="use data.packing=rows"):
        cfg.validate()
    build_train_config({"model": {"preset": "tiny"}, "data": {**data, "packing": "rows"},
                        "attention_backend": "sdpa"}).validate()
    with pytest.raises(ValueError, match="packing='ragged' is not flat or rows"):
        build_train_config({"model": {"preset": "tiny"}, "data": {**data, "packing": "ragged"}}).validate()


def test_cli_overrides_and_unknown_keys():
    args, overrides = parse_cli(["--run-dir", "r", "--optimizer.lr", "1e-4", "--data.layout=shared-prefix"])
    cfg = build_train_config({"model": {"preset": "qwen2-1.5b"}}, overrides)
    assert cfg.optimizer.lr == 1e-4 and cfg.data.layout == "shared-prefix" and cfg.model.hidden_size == 1536
    with pytest.raises(ValueError, match="unknown config key 'optimizer.learning_rate'"):
        build_train_config({}, [("optimizer.learning_rate", "1")])


# -- the golden curve ----------------------------------------------------------------------------

def test_golden_loss_curve(shards, tmp_path):
    """Refactors must not move the tiny config's curve. MEGAPMP_UPDATE_GOLDEN=1 rewrites the file
    (only when a change is meant to alter the numbers, with the reason in the commit)."""
    history = Trainer(config(shards), tmp_path / "run").fit()
    got = losses(history)
    assert len(got) == 20 and got[-1] < got[0]
    if os.environ.get("MEGAPMP_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps({"config": "examples/configs/tiny.toml + tests/test_train.py FAST",
                                      "loss": got}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())["loss"]
    # fp32 on CPU is deterministic for a fixed thread count; 1e-5 leaves room for a different BLAS build.
    assert got == pytest.approx(golden, rel=1e-5)


def test_bf16_autocast_run_follows_the_fp32_curve(shards, tmp_path):
    """precision=bf16 (CPU autocast over the forward and the loss; fp32 master weights and rewards):
    the same run within bf16 rounding of the fp32 one, and the packing choice does not matter."""
    steps = [("steps", "6")]
    fp32 = losses(Trainer(config(shards, *steps), tmp_path / "fp32").fit())
    bf16 = losses(Trainer(config(shards, *steps, ("precision", "bf16")), tmp_path / "bf16").fit())
    rows = losses(Trainer(config(shards, *steps, ("precision", "bf16"), ("data.packing", "rows")),
                          tmp_path / "rows").fit())
    assert all(math.isfinite(x) for x in bf16) and bf16 != fp32
    assert max(abs(a - b) / abs(b) for a, b in zip(bf16, fp32)) < 2e-2
    assert max(abs(a - b) / abs(b) for a, b in zip(rows, bf16)) < 2e-2


def test_pmp_learns_the_preference(shards, tmp_path):
    cfg = config(shards, ("steps", "30"), ("data.valid", str(shards / "valid")), ("logging.eval_interval", "30"))
    history = Trainer(cfg, tmp_path / "run").fit()
    assert history[-1]["valid_rm_acc"] >= 0.9
    assert history[-1]["lm_loss"] < history[0]["lm_loss"]
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("step", "loss", "rm_loss", "lm_loss", "rm_acc", "lr", "grad_norm", "tokens", "tokens_per_s", "pairs"):
        assert key in record


# -- resume --------------------------------------------------------------------------------------

def train_command(shards, run_dir, *extra):
    args = ["--config", str(TINY), "--run-dir", str(run_dir), "--data.train", str(shards / "train")]
    for key, value in FAST + [("steps", "14"), ("checkpoint.interval", "1"), ("checkpoint.keep_last", "2")] + list(extra):
        args += [f"--{key}", value]
    return [sys.executable, "-m", "megapmp.train"] + args


def read_curve(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_resume_reproduces_the_uninterrupted_curve(shards, tmp_path):
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    subprocess.run(train_command(shards, tmp_path / "whole"), check=True, env=env, capture_output=True)
    whole = read_curve(tmp_path / "whole")

    run = tmp_path / "killed"
    proc = subprocess.Popen(train_command(shards, run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 6:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(read_curve(run))
    assert 6 <= killed_at < 14, "the run should have been killed midway"

    subprocess.run(train_command(shards, run), check=True, env=env, capture_output=True)
    resumed = read_curve(run)
    assert [r["step"] for r in resumed] == list(range(1, 15))
    for a, b in zip(resumed, whole):
        assert (a["loss"], a["grad_norm"], a["lr"], a["rm_acc"]) == (b["loss"], b["grad_norm"], b["lr"], b["rm_acc"])
    assert len(ckpt.list_checkpoints(run / "checkpoints")) == 2  # keep_last
    assert not list((run / "checkpoints").glob(".step_*")), "a killed save's temp dir was left behind"


# -- non-finite steps ----------------------------------------------------------------------------

def test_nonfinite_step_is_skipped_and_counted(shards, tmp_path, monkeypatch):
    import megapmp.train as train_module

    real_loss = train_module.pmp_loss
    calls = {"n": 0}

    def loss_with_one_nan(*args, **kwargs):
        out = real_loss(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] in (5, 6):  # both micro-batches of step 3
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(train_module, "pmp_loss", loss_with_one_nan)
    trainer = Trainer(config(shards, ("steps", "5")), tmp_path / "run")
    before = {}

    history = []
    while trainer.step < 5:
        if trainer.step == 2:
            before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        history.append(trainer.train_step(trainer.loader.next_step()))
        trainer.step += 1
        if trainer.step == 3:
            after = trainer.model.state_dict()
            assert all(torch.equal(before[k], after[k]) for k in before), "a skipped step changed the weights"
    assert [h["skipped"] for h in history] == [False, False, True, False, False]
    assert trainer.skipped_steps == 1 and trainer.consecutive_nonfinite == 0


def test_too_many_nonfinite_steps_stop_the_run(shards, tmp_path):
    cfg = config(shards, ("optimizer.lr", "1e30"), ("optimizer.grad_clip", "0"), ("max_nonfinite_steps", "2"))
    with pytest.raises(RuntimeError, match="consecutive steps had non-finite"):
        Trainer(cfg, tmp_path / "run").fit()
    records = read_curve(tmp_path / "run")
    assert records[-1]["skipped_steps"] == 3


# -- the LM -> PMP -> RM chain -------------------------------------------------------------------

def test_lm_then_pmp_then_rm_finetune(shards, tmp_path):
    lm = load_train_config(str(TINY), FAST + [("steps", "3"), ("data.kind", "documents"), ("loss.rm_coef", "0"),
                                              ("data.train", str(shards / "docs"))])
    lm_trainer = Trainer(lm, tmp_path / "lm")
    lm_trainer.fit()
    assert all(r["rm_acc"] is None for r in read_curve(tmp_path / "lm"))

    pmp = config(shards, ("steps", "3"), ("checkpoint.init_from", str(tmp_path / "lm")),
                 ("checkpoint.init_reward_head", "false"))
    pmp_trainer = Trainer(pmp, tmp_path / "pmp")
    lm_weights = ckpt.load_model_weights(ckpt.latest_checkpoint(tmp_path / "lm" / "checkpoints"))
    state = pmp_trainer.model.state_dict()
    assert torch.equal(state["layers.0.self_attn.q_proj.weight"], lm_weights["layers.0.self_attn.q_proj.weight"])
    pmp_trainer.fit()

    rm = config(shards, ("steps", "2"), ("loss.lm_coef", "0"), ("checkpoint.init_from", str(tmp_path / "pmp")))
    rm_trainer = Trainer(rm, tmp_path / "rm")
    pmp_weights = ckpt.load_model_weights(ckpt.latest_checkpoint(tmp_path / "pmp" / "checkpoints"))
    assert torch.equal(rm_trainer.model.state_dict()["score.weight"], pmp_weights["score.weight"])
    history = rm_trainer.fit()
    assert all(r["lm_loss"] == 0.0 for r in history)

"""Resume never trains from a damaged checkpoint (ISSUE11 section 3).

Each case of the issue, measured on the tiny config with checkpoints at steps 2 and 4 and then
`checkpoint.resume = "auto"`: the damaged step-4 checkpoint is refused with a message naming the file and
what differs, the run falls back to step 2 and reproduces the uninterrupted curve from there, and
`keep_last = 2` never deletes the good checkpoint. Plus: nothing intact, an explicit damaged path, a
checkpoint without a manifest (older code), a SIGKILL while a checkpoint is written or replaced, and a
sharded (tp 2) checkpoint with one rank's file damaged.
"""
import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megapmp import checkpoint as ckpt
from megapmp.config import load_train_config
from megapmp.train import Trainer
from tests.distributed_utils import RankError, run_ranks
from tests.test_train import TINY, pair_shard

REPO = Path(__file__).resolve().parents[1]
SMALL = [("steps", "6"), ("data.seq_len", "128"), ("data.items_per_step", "4"), ("data.micro_batches", "2"),
         ("logging.progress", "false"), ("logging.eval_interval", "0"), ("checkpoint.interval", "2"),
         ("checkpoint.keep_last", "2"), ("num_threads", "1")]
STEP2, STEP4, STEP6 = "step_00000002", "step_00000004", "step_00000006"


# conftest.py's one_thread for the whole module: the CLI runs with num_threads = 1, in-process runs must too,
# to equal the killed subprocesses bit for bit
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity_data")
    pair_shard(root, "train", 64)
    return root


def overrides(shards, *extra):
    return SMALL + [("data.train", str(shards / "train"))] + list(extra)


def config(shards, *extra):
    return load_train_config(str(TINY), overrides(shards, *extra))


def curve(history):
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in history]


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """The uninterrupted 6-step run, every checkpoint kept (2, 4, 6)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    history = Trainer(config(shards, ("checkpoint.keep_last", "0")), run).fit()
    return {"run": run, "curve": curve(history)}


def stopped_at_4(reference, tmp_path) -> Path:
    """A copy of the reference run as if it had stopped right after its step-4 checkpoint."""
    run = tmp_path / "run"
    shutil.copytree(reference["run"], run)
    shutil.rmtree(run / "checkpoints" / STEP6)
    return run


def resume_and_check_fallback(run, shards, reference, capfd, *needles):
    """Restart (resume auto): falls back to step 2 saying why, then equals the reference; keep_last = 2
    keeps step 2 until a newer verified checkpoint exists, and what is left is intact and the reference's."""
    trainer = Trainer(config(shards), run)
    err = capfd.readouterr().err
    assert trainer.step == 2, err
    assert f"not resuming from {STEP4}" in err and "fell back to step_00000002" in err, err
    for needle in needles:
        assert needle in err, err
    after_each_save = []
    save = trainer.save_checkpoint

    def save_and_look():
        path = save()
        left = ckpt.list_checkpoints(run / "checkpoints")
        after_each_save.append([(p.name, ckpt.verify_checkpoint(p)) for p in left])
        return path

    trainer.save_checkpoint = save_and_look
    assert curve(trainer.fit()) == reference["curve"][2:]
    assert after_each_save == [[(STEP2, True), (STEP4, True)], [(STEP4, True), (STEP6, True)]]
    for name in (STEP4, STEP6):
        got = load_file(run / "checkpoints" / name / "model.safetensors")
        want = load_file(reference["run"] / "checkpoints" / name / "model.safetensors")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    return err


def drop_tensors(file: Path, prefixes) -> list[str]:
    """Rewrite a safetensors file without some tensors: a self-consistent file, only not the one written."""
    tensors = load_file(file)
    dropped = sorted(k for k in tensors if k.startswith(tuple(prefixes)))
    save_file({k: v for k, v in tensors.items() if k not in dropped}, file)
    return dropped


def rewrite_manifest(path: Path) -> None:
    """What a damage that also rewrote the manifest would leave: only the strict load can catch it.
    Written from the format spec (megapmp/checkpoint.py), not with the code under test."""
    files = {p.relative_to(path).as_posix(): {"size": p.stat().st_size,
                                              "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
             for p in sorted(path.rglob("*")) if p.is_file() and p.name != "manifest.json"}
    body = {"format": "megapmp-manifest-v1", "step": int(path.name.split("_")[1]), "files": files}
    (path / "manifest.json").write_text(json.dumps(body, indent=1) + "\n")


def overwrite(file: Path, offset: int, data: bytes) -> None:
    with open(file, "r+b") as f:
        f.seek(offset)
        f.write(data)


# -- the manifest --------------------------------------------------------------------------------

def test_manifest_lists_every_file_with_size_and_sha256(reference):
    path = reference["run"] / "checkpoints" / STEP4
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    assert manifest["format"] == ckpt.MANIFEST_FORMAT and manifest["step"] == 4
    assert sorted(manifest["files"]) == ["model.safetensors", "optimizer.safetensors", "trainer.json"]
    for rel, meta in manifest["files"].items():
        data = (path / rel).read_bytes()
        assert meta == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert ckpt.verify_checkpoint(path) is True


# -- each measured case of the issue ---------------------------------------------------------------

def test_tensors_removed_from_the_weights_are_caught_by_the_manifest(shards, reference, capfd, tmp_path):
    run = stopped_at_4(reference, tmp_path)
    assert drop_tensors(run / "checkpoints" / STEP4 / "model.safetensors", ["layers.0.", "score."])
    resume_and_check_fallback(run, shards, reference, capfd, "model.safetensors: ", "manifest says")


def test_tensors_removed_under_a_matching_manifest_are_caught_by_the_strict_load(shards, reference, capfd, tmp_path):
    run = stopped_at_4(reference, tmp_path)
    dropped = drop_tensors(run / "checkpoints" / STEP4 / "model.safetensors", ["layers.0.", "score."])
    rewrite_manifest(run / "checkpoints" / STEP4)
    resume_and_check_fallback(run, shards, reference, capfd, f"model: missing {len(dropped)} tensors: {dropped[0]}, ")


def test_optimizer_state_removed_under_a_matching_manifest_is_caught(shards, reference, capfd, tmp_path):
    run = stopped_at_4(reference, tmp_path)
    drop_tensors(run / "checkpoints" / STEP4 / "optimizer.safetensors", ["score."])
    rewrite_manifest(run / "checkpoints" / STEP4)
    resume_and_check_fallback(run, shards, reference, capfd, "optimizer: missing state for 1 parameters: score.weight")


def test_deleted_optimizer_file_is_caught(shards, reference, capfd, tmp_path):
    run = stopped_at_4(reference, tmp_path)
    (run / "checkpoints" / STEP4 / "optimizer.safetensors").unlink()
    resume_and_check_fallback(run, shards, reference, capfd, "optimizer.safetensors: missing")


def test_0xff_written_into_the_weights_is_caught(shards, reference, capfd, tmp_path):
    run = stopped_at_4(reference, tmp_path)
    weights = run / "checkpoints" / STEP4 / "model.safetensors"
    overwrite(weights, weights.stat().st_size // 2, b"\xff" * 4096)
    resume_and_check_fallback(run, shards, reference, capfd, "model.safetensors: sha256 ", "manifest says")


def test_truncated_file_is_caught(shards, reference, capfd, tmp_path):
    run = stopped_at_4(reference, tmp_path)
    weights = run / "checkpoints" / STEP4 / "model.safetensors"
    size = weights.stat().st_size
    os.truncate(weights, size // 2)
    resume_and_check_fallback(run, shards, reference, capfd,
                              f"model.safetensors: {size // 2} bytes, manifest says {size}")


def test_truncated_file_without_manifest_is_named(shards, reference, capfd, tmp_path):
    """Older checkpoints (no manifest) load unverified, with a warning; a safetensors error names its file."""
    run = stopped_at_4(reference, tmp_path)
    for name in (STEP2, STEP4):
        (run / "checkpoints" / name / "manifest.json").unlink(missing_ok=True)  # (older code wrote none)
    weights = run / "checkpoints" / STEP4 / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    trainer = Trainer(config(shards), run)
    err = capfd.readouterr().err
    assert trainer.step == 2, err
    assert f"{weights}: not a readable safetensors file" in err
    assert f"{run / 'checkpoints' / STEP2} has no manifest.json" in err and "loading it unverified" in err


# -- no fallback possible ------------------------------------------------------------------------

def test_nothing_intact_is_a_one_line_error(shards, reference, tmp_path):
    run = stopped_at_4(reference, tmp_path)
    for name in (STEP2, STEP4):
        overwrite(run / "checkpoints" / name / "model.safetensors", 4096, b"\xff" * 4096)
    with pytest.raises(ValueError) as err:  # the CLI turns a ValueError into one line and exit code 2
        Trainer(config(shards), run)
    message = str(err.value)
    assert type(err.value).__name__ == "CheckpointError" and "\n" not in message
    assert message.startswith(f"no intact checkpoint to resume from in {run / 'checkpoints'}")
    assert "--checkpoint.resume" in message
    # The command line: that one line and exit code 2, no traceback.
    argv = ["--config", str(TINY), "--run-dir", str(run), *(f"--{k}={v}" for k, v in overrides(shards))]
    proc = subprocess.run([sys.executable, "-m", "megapmp.train", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert f"megapmp.train: error: no intact checkpoint to resume from in {run / 'checkpoints'}" in proc.stderr


def test_an_explicit_damaged_checkpoint_is_an_error_not_a_fallback(shards, reference, tmp_path):
    run = stopped_at_4(reference, tmp_path)
    step4 = run / "checkpoints" / STEP4
    (step4 / "optimizer.safetensors").unlink()
    with pytest.raises(ValueError, match=r"checkpoint.resume=.*step_00000004: .*optimizer.safetensors: missing"):
        Trainer(config(shards, ("checkpoint.resume", str(step4))), run)
    with pytest.raises(ValueError, match="no such checkpoint directory"):
        Trainer(config(shards, ("checkpoint.resume", str(run / "checkpoints" / "step_00000099"))), run)


# -- pruning -------------------------------------------------------------------------------------

def test_pruning_never_removes_the_checkpoint_just_written(tmp_path):
    """A newer checkpoint left from before a resume (step 4) must not make keep_last delete the new one."""
    state = {"w": torch.ones(2)}
    for step in (2, 4):
        ckpt.save_checkpoint(tmp_path, step, model_state=state, optimizer_tensors={}, trainer_state={"step": step})
    ckpt.save_checkpoint(tmp_path, 3, model_state=state, optimizer_tensors={}, trainer_state={"step": 3}, keep_last=1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000003", STEP4]


# -- kills while a checkpoint is written -----------------------------------------------------------

KILLER = """
import os, shutil, signal, sys
from megapmp import checkpoint, train

KILL_AT = os.environ["KILL_AT"]
real_save, real_rmtree, saves = checkpoint.save_file, shutil.rmtree, []

def save_then_die(tensors, filename, *args, **kwargs):  # SIGKILL after the 3rd file: step 4's weights
    real_save(tensors, filename, *args, **kwargs)
    saves.append(filename)
    if KILL_AT == "write" and len(saves) == 3:
        os.kill(os.getpid(), signal.SIGKILL)

def rmtree_then_die(path, *args, **kwargs):  # while a checkpoint of step 4 is being deleted: one file, then die
    files = sorted(p for p in __import__("pathlib").Path(path).rglob("*") if p.is_file()) if os.path.isdir(path) else []
    if KILL_AT == "replace" and "step_00000004" in str(path) and files:
        files[0].unlink()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_rmtree(path, *args, **kwargs)

checkpoint.save_file, shutil.rmtree = save_then_die, rmtree_then_die
sys.exit(train.main(sys.argv[1:]))
"""


def killed_run(shards, run, kill_at, *extra):
    args = ["--config", str(TINY), "--run-dir", str(run)]
    for key, value in overrides(shards, *extra):
        args += [f"--{key}", value]
    env = {**os.environ, "KILL_AT": kill_at, "PYTHONHASHSEED": "0"}
    proc = subprocess.run([sys.executable, "-c", KILLER, *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


def test_kill_while_writing_leaves_the_previous_checkpoint(shards, reference, capfd, tmp_path):
    run = tmp_path / "run"
    killed_run(shards, run, "write")
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == [STEP2]
    assert list((run / "checkpoints").glob(".step_00000004.*")), "the kill should have hit the step-4 save"
    trainer = Trainer(config(shards), run)
    assert "removed .step_00000004." in capfd.readouterr().err and trainer.step == 2
    assert curve(trainer.fit()) == reference["curve"][2:]
    assert all(ckpt.verify_checkpoint(p) for p in ckpt.list_checkpoints(run / "checkpoints"))


def test_kill_while_replacing_a_checkpoint_leaves_a_loadable_one(shards, reference, capfd, tmp_path):
    """Resumed explicitly from step 2, the run saves step 4 again over the old step 4; a kill while the old
    one is deleted must not leave a half-deleted step_00000004 that looks complete."""
    run = stopped_at_4(reference, tmp_path)
    killed_run(shards, run, "replace", ("checkpoint.resume", str(run / "checkpoints" / STEP2)))
    trainer = Trainer(config(shards), run)
    err = capfd.readouterr().err
    assert trainer.step == 4 and "not resuming" not in err, err
    assert ckpt.verify_checkpoint(run / "checkpoints" / STEP4)
    assert curve(trainer.fit()) == reference["curve"][4:]


# -- sharded checkpoints (2 gloo ranks, tp 2) ------------------------------------------------------

def train_runs(rank, world_size, runs):
    """On every rank: train each (run_dir, overrides); return (curve, rank 0's stderr, step resumed at)."""
    out = []
    for run_dir, extra in runs:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            trainer = Trainer(load_train_config(str(TINY), extra), run_dir)
            start = trainer.step
            history = trainer.fit()
        out.append((curve(history), err.getvalue(), start))
    return out


def killed_in_step4_save(rank, world_size, run_dir, extra):
    """Train, with rank 1 SIGKILLed right after it wrote its first file of the step-4 checkpoint."""
    from megapmp import checkpoint

    real_save = checkpoint.save_file

    def save_then_die(tensors, filename, *args, **kwargs):
        real_save(tensors, filename, *args, **kwargs)
        if rank == 1 and ".step_00000004" in str(filename):
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.save_file = save_then_die
    Trainer(load_train_config(str(TINY), extra), run_dir).fit()


def test_sharded_checkpoint_damage_and_kill_fall_back(shards, tmp_path):
    tp2 = [("parallel.tp", "2")]
    whole = tmp_path / "whole"
    ((reference_curve, _, _),) = run_ranks(2, train_runs, [(str(whole), overrides(shards, *tp2,
                                                                                  ("checkpoint.keep_last", "0")))],
                                           timeout=300)[0]
    runs = {}
    for case in ("0xff", "dropped", "both"):
        run = tmp_path / case
        shutil.copytree(whole, run)
        shutil.rmtree(run / "checkpoints" / STEP6)
        rank1 = run / "checkpoints" / STEP4 / "model" / "tp01_pp000.safetensors"
        if case == "0xff":
            overwrite(rank1, rank1.stat().st_size // 2, b"\xff" * 4096)
        else:
            drop_tensors(rank1, ["layers.0.mlp."])
            rewrite_manifest(run / "checkpoints" / STEP4)
        if case == "both":
            overwrite(run / "checkpoints" / STEP2 / "optimizer" / "tp00_pp000.safetensors", 4096, b"\xff" * 64)
        runs[case] = run
    runs["killed"] = tmp_path / "killed"
    with pytest.raises(RankError, match="rank 1 exited"):
        run_ranks(2, killed_in_step4_save, str(runs["killed"]), overrides(shards, *tp2), timeout=300)
    assert (runs["killed"] / "checkpoints" / ".step_00000004.partial").is_dir()

    cases = ["0xff", "dropped", "killed"]
    results = run_ranks(2, train_runs, [(str(runs[c]), overrides(shards, *tp2)) for c in cases], timeout=300)[0]
    needles = {"0xff": "model/tp01_pp000.safetensors: sha256",
               "dropped": "TP rank 1 of stage 0 (tp01_pp000) has no layers.0.mlp.",
               "killed": "removed .step_00000004.partial"}
    for case, (got, err, start) in zip(cases, results):
        assert start == 2 and needles[case] in err, (case, err)
        assert case == "killed" or "fell back to step_00000002" in err, (case, err)
        assert got == reference_curve[2:], case
        assert all(ckpt.verify_checkpoint(p) for p in ckpt.list_checkpoints(runs[case] / "checkpoints")), case
    with pytest.raises(RankError, match="no intact checkpoint to resume from"):
        run_ranks(2, train_runs, [(str(runs["both"]), overrides(shards, *tp2))], timeout=300)


def test_init_from_a_damaged_checkpoint_is_an_error(shards, reference, tmp_path):
    """RM finetuning from a PMP run whose newest weights were damaged: an error naming the file, not a
    model quietly initialised from them."""
    run = stopped_at_4(reference, tmp_path)
    weights = run / "checkpoints" / STEP4 / "model.safetensors"
    overwrite(weights, weights.stat().st_size // 2, b"\xff" * 4096)
    with pytest.raises(ValueError, match=f"{weights.parent}: model.safetensors: sha256 "):
        Trainer(config(shards, ("checkpoint.init_from", str(run))), tmp_path / "rm")

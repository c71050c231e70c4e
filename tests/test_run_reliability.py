"""A run is one run (ISSUE21): one owner per run directory, a resume that continues exactly one run and
refuses settings that change its curve, and bad data refused at open rather than at the step that meets it.

Each test is a case of the issue, on the tiny config (4-6 steps of 4 pairs, one thread); each fails on the
code before the fix (two trainers both ran; resume none spliced; a changed seq_len resumed silently, a
changed model was called damaged; a torn metrics line was a JSONDecodeError; an over-long pair stopped the
run at the step that drew it; a sidecar the scorer refuses trained to the end).
"""
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from megapmp import checkpoint as ckpt
from megapmp.config import ModelConfig, load_train_config
from megapmp.data.indexed import ShardError
from megapmp.data.preprocess import build_shard
from megapmp.run_dir import RunDirError
from megapmp.train import Trainer
from tests.test_train import TINY, pair_shard

REPO = Path(__file__).resolve().parents[1]
SMALL = [("steps", "4"), ("data.seq_len", "128"), ("data.items_per_step", "4"), ("data.micro_batches", "2"),
         ("logging.progress", "false"), ("logging.eval_interval", "0"), ("checkpoint.interval", "2"),
         ("checkpoint.keep_last", "0"), ("num_threads", "1")]


# conftest.py's one_thread for the whole module
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("run_data")
    pair_shard(root, "train", 64, seed=0)
    pair_shard(root, "other", 64, seed=5)
    return root


def overrides(shards, *extra):
    return SMALL + [("data.train", str(shards / "train"))] + list(extra)


def config(shards, *extra):
    return load_train_config(str(TINY), overrides(shards, *extra))


def cli(shards, run_dir, *extra) -> list[str]:
    return [sys.executable, "-m", "megapmp.train", "--config", str(TINY), "--run-dir", str(run_dir),
            *(f"--{k}={v}" for k, v in overrides(shards, *extra))]


def metric_steps(run_dir: Path) -> list[int]:
    """Steps of metrics.jsonl's whole records (a killed writer may leave a torn last line)."""
    steps = []
    for line in (run_dir / "metrics.jsonl").read_text().split("\n"):
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:
            pass
    return steps


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("reference") / "run"
    history = Trainer(config(shards), run).fit()
    return {"run": run, "curve": [(r["step"], r["loss"], r["grad_norm"]) for r in history]}


def copy_run(reference, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(reference["run"], run)
    return run


# -- one run, one owner ------------------------------------------------------------------------------------

def test_two_trainers_started_together_one_refuses(shards, tmp_path):
    """Both start at once: one trains, the other exits 2 at open naming the first's pid and host; the
    metrics hold each step once. Killed, the winner leaves its lock: the next start takes it over (logged)."""
    run = tmp_path / "run"
    logs = [open(tmp_path / f"err{i}.txt", "w+") for i in range(2)]
    # Enough steps that the winner is still training when the loser gives up.
    procs = [subprocess.Popen(cli(shards, run, ("steps", "100000"), ("checkpoint.interval", "1")),
                              stdout=subprocess.DEVNULL, stderr=log) for log in logs]
    try:
        deadline = time.time() + 180
        while time.time() < deadline and all(p.poll() is None for p in procs):
            time.sleep(0.1)
        done = [i for i, p in enumerate(procs) if p.poll() is not None]
        assert len(done) == 1, "one of the two trainers should have stopped at open"
        loser, winner = procs[done[0]], procs[1 - done[0]]
        logs[done[0]].seek(0)
        err = logs[done[0]].read()
        assert loser.returncode == 2, err
        assert "Traceback" not in err and len(err.strip().splitlines()[-1]) > 0
        assert (f"megapmp.train: error: {run} is in use by pid {winner.pid} on host {socket.gethostname()}"
                in err), err
        while time.time() < deadline and len(metric_steps(run)) < 3:
            time.sleep(0.1)
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for log in logs:
            log.close()
    steps = metric_steps(run)
    assert len(steps) >= 3 and steps == list(range(1, len(steps) + 1))  # one writer: each step once

    # The killed winner's lock record is stale: taken over, with a log line, and the run resumes.
    trainer = Trainer(config(shards, ("steps", "100000"), ("checkpoint.interval", "1")), run)
    trainer.close()
    assert trainer.step >= 1


def test_a_start_refused_while_the_holder_writes_its_record_still_names_it(tmp_path):
    """The window the test above met on a loaded CI box: the winner holds the flock but has not yet written
    its record. The refused start waits for the record rather than calling the holder unknown; a lock whose
    record never comes is reported as unreadable after the wait."""
    import fcntl
    import os
    import threading

    from megapmp.run_dir import LOCK_FILE, RunLock

    run = tmp_path / "run"
    run.mkdir()
    fd = os.open(run / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # locked, still empty: the instant after the winner's flock
    record = json.dumps({"pid": 4242, "host": "winner", "started": "now"}) + "\n"
    late = threading.Timer(0.3, lambda: os.pwrite(fd, record.encode(), 0))
    try:
        late.start()
        with pytest.raises(RunDirError, match=f"{run} is in use by pid 4242 on host winner, started now"):
            RunLock.acquire(run, print)
        late.join()
        os.ftruncate(fd, 0)  # a holder that never writes one
        t0 = time.monotonic()
        with pytest.raises(RunDirError, match=r"in use by another process \(its record in run.lock is unreadable\)"):
            RunLock.acquire(run, print)
        assert time.monotonic() - t0 >= 1.5
    finally:
        late.cancel()
        late.join()
        os.close(fd)


def test_the_lock_taken_refused_and_unavailable(tmp_path, monkeypatch):
    """io.try_lock_exclusive, the one lock of run directories and synthesis outputs: taken once, refused to a
    second open file while held, taken again once released; a file system without locks (ENOLCK, an NFS
    mount with nolock) is its own one-line error, not "in use"."""
    import errno
    import fcntl
    import os

    from megapmp.io import try_lock_exclusive
    from megapmp.run_dir import RunLock

    path = tmp_path / "lock"
    first, second = (os.open(path, os.O_RDWR | os.O_CREAT) for _ in range(2))
    try:
        assert try_lock_exclusive(first) and not try_lock_exclusive(second)
        os.close(first)
        assert try_lock_exclusive(second)
    finally:
        os.close(second)

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(RunDirError, match=r"run.lock: cannot be locked \(No locks available\): the file system "
                                          r"offers no locks"):
        RunLock.acquire(tmp_path, print)


def test_a_held_run_directory_is_refused_until_released(shards, tmp_path, capfd):
    run = tmp_path / "run"
    first = Trainer(config(shards), run)  # holds the lock until fit() returns
    with pytest.raises(RunDirError, match=r"is in use by this very process") as err:
        Trainer(config(shards), run)
    assert "\n" not in str(err.value)
    first.fit()
    second = Trainer(config(shards), run)  # released: the finished run is resumed (nothing left to do)
    assert second.step == 4 and second.fit() == []


def test_a_lock_left_by_a_dead_process_is_taken_over(shards, tmp_path, capfd):
    run = tmp_path / "run"
    run.mkdir()
    dead = {"pid": 999999999, "host": "gone", "started": "yesterday", "command": "killed"}
    (run / "run.lock").write_text(json.dumps(dead) + "\n")
    Trainer(config(shards, ("steps", "1")), run).fit()
    err = capfd.readouterr().err
    assert (f"took over {run / 'run.lock'} from pid 999999999 on host gone, started yesterday, which ended "
            f"without releasing it") in err
    assert (run / "run.lock").read_text() == ""  # released at the end of the run


def refused_start(rank, world_size, run_dir, extra):
    """On every rank: the RunDirError a start in `run_dir` raises (None if it starts)."""
    try:
        Trainer(load_train_config(str(TINY), extra), run_dir).close()
    except RunDirError as e:
        return str(e)
    return None


def test_a_refused_parallel_start_ends_every_rank(shards, tmp_path):
    """Rank 0 alone holds the lock; when it cannot, every rank raises the same error (by broadcast) rather
    than waiting at a collective for a rank 0 that has left."""
    from megapmp.run_dir import RunLock
    from tests.distributed_utils import run_ranks

    run = tmp_path / "run"
    run.mkdir()
    holder = RunLock.acquire(run, print)  # another trainer, as far as the ranks can tell
    try:
        messages = run_ranks(2, refused_start, str(run), overrides(shards, ("parallel.tp", "2")), timeout=120)
    finally:
        holder.release()
    assert messages[0] == messages[1] and f"{run} is in use by pid" in messages[0]


# -- resume continues one run --------------------------------------------------------------------------------

def test_resume_none_over_a_run_is_refused_and_overwrite_moves_it_aside(shards, reference, tmp_path):
    run = copy_run(reference, tmp_path)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "run.lock"}
    with pytest.raises(RunDirError) as err:
        Trainer(config(shards, ("checkpoint.resume", "none"), ("steps", "3")), run)
    message = str(err.value)
    assert "\n" not in message and f"{run} holds a run (checkpoints up to step_00000004)" in message
    assert "pick another --run-dir, or pass --overwrite" in message
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "run.lock"}
    assert after == before  # nothing touched
    # Another run's checkpoint is refused there the same way.
    with pytest.raises(RunDirError, match="would splice two runs"):
        Trainer(config(shards, ("checkpoint.resume", str(reference["run"] / "checkpoints" / "step_00000002"))), run)

    # --overwrite: the old run moves aside whole, the new one starts from scratch.
    history = Trainer(config(shards, ("checkpoint.resume", "none"), ("steps", "3")), run, overwrite=True).fit()
    assert [r["step"] for r in history] == [1, 2, 3]
    (aside,) = tmp_path.glob("run.old-*")
    moved = {p.relative_to(aside): p.read_bytes() for p in aside.rglob("*") if p.is_file() and p.name != "run.lock"}
    assert moved == before
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step_00000002", "step_00000003"]
    assert metric_steps(run) == [1, 2, 3]
    # A later resume continues the new run.
    assert Trainer(config(shards, ("steps", "3")), run).step == 3


CHANGES = {
    "data path": (("data.train", "OTHER"), "data.train"),
    "seq_len": (("data.seq_len", "256"), "data.seq_len 128 -> 256"),
    "batch": (("data.items_per_step", "8"), "data.items_per_step 4 -> 8"),
    "lr": (("optimizer.lr", "0.001"), "optimizer.lr 0.003 -> 0.001"),
}


@pytest.mark.parametrize("name", list(CHANGES))
def test_a_changed_setting_is_refused_unless_allowed(name, shards, reference, tmp_path, capfd):
    (key, value), shown = CHANGES[name]
    value = str(shards / "other") if value == "OTHER" else value
    run = copy_run(reference, tmp_path)
    with pytest.raises(ckpt.CheckpointError) as err:
        Trainer(config(shards, (key, value), ("steps", "6")), run)
    message = str(err.value)
    assert "\n" not in message and "which change the training curve" in message and shown in message
    assert f"--checkpoint.allow-change {key} steps" in message and "damaged" not in message
    assert "fell back" not in capfd.readouterr().err

    # Allowed by name: resumed, logged, and recorded in the first record after the resume.
    history = Trainer(config(shards, (key, value), ("steps", "6"),
                             ("checkpoint.allow_change", f"{key},steps")), run).fit()
    assert [r["step"] for r in history] == [5, 6]
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[4])
    assert record["step"] == 5 and set(record["config_changes"]) == {key, "steps"}
    assert "config_changes" not in history[1]


def test_allow_change_takes_several_keys_on_the_command_line():
    from megapmp.config import build_train_config
    from megapmp.train import parse_cli

    _, overrides_ = parse_cli(["--run-dir", "r", "--checkpoint.allow-change", "data.seq_len", "steps", "--steps", "6"])
    cfg = build_train_config({}, overrides_)
    assert cfg.checkpoint.allow_change == ["data.seq_len", "steps"] and cfg.steps == 6
    cfg.data.train = ["x"]
    cfg.checkpoint.allow_change = ["data.seqlen"]
    with pytest.raises(ValueError, match="allow_change names unknown settings data.seqlen"):
        cfg.validate()


def test_a_changed_model_is_incompatible_not_damaged(shards, reference, tmp_path, capfd):
    run = copy_run(reference, tmp_path)
    with pytest.raises(ckpt.CheckpointError) as err:
        Trainer(config(shards, ("model.hidden_size", "128")), run)
    message = str(err.value)
    assert "holds another model (model.hidden_size 64 -> 128)" in message and "intact but incompatible" in message
    assert "damaged" not in message and "not resuming" not in capfd.readouterr().err
    # Even allowed by name: tensors of other shapes cannot be loaded.
    with pytest.raises(ckpt.CheckpointError, match="incompatible"):
        Trainer(config(shards, ("model.hidden_size", "128"), ("checkpoint.allow_change", "model.hidden_size")), run)


def test_the_step_must_be_one(shards, reference, tmp_path, capfd):
    """A checkpoint directory renamed to another step is damaged: not resumed, fallen back past."""
    run = copy_run(reference, tmp_path)
    (run / "checkpoints" / "step_00000004").rename(run / "checkpoints" / "step_00000005")
    trainer = Trainer(config(shards), run)
    err = capfd.readouterr().err
    assert trainer.step == 2
    assert ("step_00000005: the step is not one: trainer.json says 4, manifest.json says 4, the directory name "
            "says 5") in err and "fell back to step_00000002" in err
    trainer.close()


def test_a_torn_metrics_line_is_cut_at_resume(shards, reference, tmp_path, capfd):
    run = copy_run(reference, tmp_path)
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    torn = lines[2][: len(lines[2]) // 2]  # killed while writing step 3's record
    (run / "metrics.jsonl").write_text("".join(lines[:2]) + torn)
    history = Trainer(config(shards), run).fit()
    err = capfd.readouterr().err
    assert f"{run / 'metrics.jsonl'}: cut a torn last line ({len(torn.encode())} bytes)" in err
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in history] == reference["curve"][2:]
    assert metric_steps(run) == [1, 2, 3, 4]
    assert (run / "metrics.jsonl").read_text().splitlines()[:2] == [line.rstrip("\n") for line in lines[:2]]


def test_a_failed_rewrite_of_the_metrics_at_resume_keeps_the_old_file(tmp_path):
    """Resuming rewrites metrics.jsonl without the steps past the checkpoint; a write that fails half way
    (here the file-size limit; a full disk or a kill is the same) must leave the history whole, not emptied.
    In a subprocess: RLIMIT_FSIZE is per process."""
    metrics = tmp_path / "metrics.jsonl"
    history = "".join(json.dumps({"step": step, "loss": 1.0 / step, "pad": "x" * 40}) + "\n" for step in range(1, 1001))
    metrics.write_text(history)
    script = ("import resource, signal, sys\nfrom pathlib import Path\nfrom megapmp.tracking import MetricsLog\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (8192, resource.RLIM_INFINITY))\n"
              "try:\n    MetricsLog(Path(sys.argv[1]), 900)\nexcept OSError as e:\n    print(e.errno)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(metrics)], capture_output=True, text=True,
                          timeout=60, cwd=REPO, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "27", proc.stderr  # EFBIG: the write did fail
    assert metrics.read_text() == history
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temporary file left behind


def test_a_damaged_metrics_line_in_the_middle_is_an_error(shards, reference, tmp_path):
    run = copy_run(reference, tmp_path)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[1] = "{not json"
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(RunDirError, match=r"metrics.jsonl:2: not a JSON record"):
        Trainer(config(shards), run)


# -- bad data fails at open ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def long_shard(tmp_path_factory):
    """40 short pairs and 3 whose duplicated layout needs 2P + C + R > 128 tokens (byte tokenizer)."""
    root = tmp_path_factory.mktemp("long_data")
    records = [{"prompt": f"Return {i}.", "chosen": f"return {i}", "rejected": f"return -{i}"} for i in range(40)]
    for i, n in ((7, 110), (19, 150), (31, 130)):
        records[i]["chosen"] = "x = 1\n" * (n // 6)
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    build_shard([str(root / "pairs.jsonl")], str(root / "long"), progress=False)
    return root / "long"


def test_an_overlong_pair_fails_at_open(long_shard, shards, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run(cli(shards, run, ("data.train", str(long_shard))), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"megapmp.train: error: {long_shard}: 3 of 40 pairs do not fit a row of "
                           f"data.seq_len=128 tokens in the duplicated layout (the longest, pair 19, needs "), last
    assert "--data.overlong drop" in last and "--max-length 64 --overlong truncate" in last
    assert not run.exists()  # refused before the run directory is made
    # The same for held-out pairs.
    with pytest.raises(ShardError, match="3 of 40 pairs do not fit"):
        Trainer(config(shards, ("data.valid", str(long_shard))), tmp_path / "valid_run")
    assert not (tmp_path / "valid_run").exists()


def test_overlong_drop_leaves_them_out(long_shard, shards, tmp_path, capfd):
    trainer = Trainer(config(shards, ("data.train", str(long_shard)), ("data.overlong", "drop"), ("steps", "12"),
                             ("data.valid", str(long_shard))), tmp_path / "run")
    assert f"left out 3 pairs of {long_shard}" in capfd.readouterr().err
    assert len(trainer.valid_pairs) == 37
    drawn = set()
    for _ in range(12):  # 48 draws from 37 pairs: every one at least once, never a long one
        drawn |= {int(i) for _, i in trainer.loader.next_step().step_items}
    assert drawn == set(range(40)) - {7, 19, 31}
    trainer.close()


def test_a_token_budget_is_fitted_to_the_pairs_that_fit(long_shard, shards):
    from megapmp.data.loader import StepLoader

    loader = StepLoader([str(long_shard)], items_per_step=4, micro_batches=2, seq_len=128, packing="flat",
                        overlong="drop", micro_batch_tokens="auto")
    kept = loader.item_lengths(0, loader.kept[0])
    assert loader.kept[0].size == 37 and kept.max() <= 128 < loader.item_lengths(0, np.array([19]))[0]
    assert loader.micro_batch_tokens >= kept.max()  # the budget holds every drawable pair
    for _ in range(12):
        assert all(b.shape == (1, loader.micro_batch_tokens) for b in loader.next_step().micro_batches)
    # A fixed budget need only hold the pairs the sampler can draw, not the ones left out.
    fixed = StepLoader([str(long_shard)], items_per_step=4, micro_batches=2, seq_len=128, packing="flat",
                       overlong="drop", micro_batch_tokens=128)
    assert fixed.next_step().micro_batches[0].shape == (1, 128)


def bad_sidecar(shards, tmp_path, edit) -> Path:
    prefix = tmp_path / "bad"
    for ext in ("bin", "idx"):
        shutil.copy(f"{shards / 'train'}.{ext}", f"{prefix}.{ext}")
    meta = json.loads((shards / "train.json").read_text())
    edit(meta)
    (tmp_path / "bad.json").write_text(json.dumps(meta))
    return prefix


SIDECARS = {
    "pad equals eos": (lambda m: m.update(pad_id=m["eos_id"]), "pad_id equals eos_id (256)"),
    "eos outside the vocabulary": (lambda m: m.update(eos_id=m["vocab_size"] + 7),
                                   "eos_id 265 is outside the vocabulary [0, 258)"),
    "unknown eos policy": (lambda m: m.update(eos_policy="sometimes"),
                           "eos_policy 'sometimes' is not one of response, none"),
    "template without {prompt}": (lambda m: m.update(template={"name": "mine", "text": "Q: {query}\nA:"}),
                                  "the template has no {prompt} placeholder"),
}


@pytest.mark.parametrize("case", list(SIDECARS))
def test_a_sidecar_the_scorer_refuses_is_refused_at_open(case, shards, tmp_path):
    """The trainer refuses the data at open with the reason the scorer gives: one rule, megapmp.data.shards."""
    from megapmp.convert.source import ScoringRecipe
    from megapmp.data.tokenizers import ByteTokenizer
    from megapmp.eval.reward_model import RewardScorer
    from megapmp.model import Qwen2RewardModel

    edit, reason = SIDECARS[case]
    prefix = bad_sidecar(shards, tmp_path, edit)
    with pytest.raises(ShardError) as err:
        Trainer(config(shards, ("data.train", str(prefix))), tmp_path / "run")
    assert str(err.value).startswith(f"{prefix}.json: ") and reason in str(err.value)
    assert "\n" not in str(err.value) and not (tmp_path / "run").exists()

    meta = json.loads((tmp_path / "bad.json").read_text())
    recipe = ScoringRecipe(ByteTokenizer(), meta["template"], meta["eos_policy"], meta["eos_id"], meta["pad_id"],
                           "test")
    model = Qwen2RewardModel(ModelConfig(vocab_size=384))  # the byte tokenizer's padded vocabulary
    with pytest.raises(ValueError) as scorer_err:
        RewardScorer(model, recipe, device="cpu")
    assert reason in str(scorer_err.value)


def test_a_bad_sidecar_is_one_line_and_exit_2(shards, tmp_path):
    prefix = bad_sidecar(shards, tmp_path, SIDECARS["unknown eos policy"][0])
    proc = subprocess.run(cli(shards, tmp_path / "run", ("data.train", str(prefix))), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"megapmp.train: error: {prefix}.json: eos_policy 'sometimes'" in proc.stderr

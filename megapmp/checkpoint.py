"""Checkpoints: safetensors for tensors, JSON for everything else; nothing is ever unpickled.

    CHECKPOINTS/step_00000100/
        model.safetensors      weights under megapmp's module names
        optimizer.safetensors  optimizer state tensors, keyed "<param name>.<state key>"
        trainer.json           step, optimizer hyper-parameters and scalar state (with "state_names", the
                               parameters that have optimizer state), scheduler, sampler, RNG states,
                               config, counters
        manifest.json          {"format": "megapmp-manifest-v1", "step": 100,
                                "files": {"<relative path>": {"size": bytes, "sha256": hex}, ...}}:
                               every other file of the directory, written last

Parallel runs write a sharded checkpoint instead (layout.json, model/, optimizer/, layout/: see
"Sharded checkpoints" below), with the same manifest over all of its files; `load_full_checkpoint`
and `load_model_weights` read either format.

Integrity rules (DESIGN.md, "Reliability rules"):
- A checkpoint is written into a temporary directory beside its final name; the manifest is computed
  from the files as they are on disk, and only then is the directory renamed into place. A run killed
  at any moment leaves either the whole checkpoint or a `.step_*` temp dir (removed at the next start).
- `verify_checkpoint` checks every file against the manifest (presence, size, sha256, nothing unlisted)
  and `check_state` checks that the tensors are exactly the model's (names and shapes) with complete
  optimizer state, so a resume never trains from a damaged checkpoint. Failures raise `CheckpointError`
  naming the checkpoint, the file and what differs. A checkpoint written before manifests (none there)
  still loads, unverified: the caller says so.
- `prune` keeps the newest `keep_last` checkpoints and never removes the one just written and verified.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from megapmp.io import sha256_file

STEP_DIR = re.compile(r"^step_(\d{8})$")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "megapmp-manifest-v1"


class CheckpointError(ValueError):
    """A checkpoint that is damaged, incomplete or does not fit the model. The message is one line naming
    the checkpoint, the file and what is wrong; a ValueError, so the CLI reports it as bad input (exit 2)."""


class IncompatibleCheckpointError(CheckpointError):
    """An intact checkpoint that this run cannot continue (another model, or settings that change the
    curve): raised at once, with no fallback to an older checkpoint of the same run."""


def step_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories under `root` (renamed into place, with trainer.json), oldest first.
    Complete is not intact: `verify_checkpoint` says whether the files are the ones that were written."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "trainer.json").exists()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def remove_incomplete(root: str | os.PathLike) -> list[Path]:
    """Delete temporary directories left by a save that was killed midway; returns what was removed."""
    root = Path(root)
    stale = [p for p in root.glob(".step_*") if p.is_dir()] if root.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


# ------------------------------------------------------------------------------------------------
# Manifest: every file's size and sha256

def describe_files(directory: str | os.PathLike, relative: list[str] | None = None) -> dict[str, dict]:
    """{relative path: {"size", "sha256"}} of the files `relative` under `directory` (default: all of them
    but the manifest), read back from disk, so the manifest records what was written, not what was meant."""
    directory = Path(directory)
    if relative is None:
        relative = [p.relative_to(directory).as_posix() for p in directory.rglob("*")
                    if p.is_file() and p.relative_to(directory).as_posix() != MANIFEST]
    return {rel: {"size": (directory / rel).stat().st_size, "sha256": sha256_file(directory / rel)}
            for rel in sorted(relative)}


def write_manifest(directory: str | os.PathLike, step: int, files: dict[str, dict]) -> None:
    """Write manifest.json for `files` (from `describe_files`); the last file of a checkpoint."""
    body = {"format": MANIFEST_FORMAT, "step": step, "files": dict(sorted(files.items()))}
    (Path(directory) / MANIFEST).write_text(json.dumps(body, indent=1) + "\n")


def _short(digest: str) -> str:
    return digest[:12] + "..."


def verify_checkpoint(path: str | os.PathLike, only: tuple[str, ...] | None = None) -> bool:
    """Check every file of the checkpoint directory `path` against its manifest: each listed file present
    with the recorded size and sha256, and no file that the manifest does not list. `only` (relative path
    prefixes, e.g. the weight files) restricts the check to those files, for readers that need no more.

    Returns True when verified and False for a checkpoint written before manifests existed (nothing to
    verify against: the caller loads it as unverified and says so). Raises CheckpointError naming every
    mismatch (file, expected vs actual)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not (path / MANIFEST).exists():
        return False
    manifest = _read_json(path / MANIFEST)
    if manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{path / MANIFEST}: not a {MANIFEST_FORMAT} manifest")
    expected = manifest["files"]
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {MANIFEST}
    if only is not None:
        expected = {rel: meta for rel, meta in expected.items() if rel.startswith(only)}
        on_disk = {rel for rel in on_disk if rel.startswith(only)}
    problems = [f"{rel}: missing (manifest lists {meta['size']} bytes)" for rel, meta in expected.items()
                if rel not in on_disk]
    problems += [f"{rel}: not in the manifest" for rel in sorted(on_disk - set(expected))]
    for rel, meta in expected.items():
        if rel not in on_disk:
            continue
        size = (path / rel).stat().st_size
        if size != meta["size"]:  # cheap, and a truncated file needs no hashing to be caught
            problems.append(f"{rel}: {size} bytes, manifest says {meta['size']}")
            continue
        digest = sha256_file(path / rel)
        if digest != meta["sha256"]:
            problems.append(f"{rel}: sha256 {_short(digest)}, manifest says {_short(meta['sha256'])}")
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems))
    return True


# ------------------------------------------------------------------------------------------------
# Reading: every failure names its file

def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: unreadable JSON ({e})") from e


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(file)
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from e


def per_parameter(tensors: dict, scalars: dict | None = None) -> dict[str, dict]:
    """"<param name>.<state key>" entries -> {param name: {state key: value}} (scalars become tensors)."""
    states: dict[str, dict] = {}
    for key, value in tensors.items():
        name, k = key.rsplit(".", 1)
        states.setdefault(name, {})[k] = value
    for key, value in (scalars or {}).items():
        name, k = key.rsplit(".", 1)
        states.setdefault(name, {})[k] = torch.tensor(float(value))
    return states


TRAINER_KEYS = ("step", "skipped_steps", "consecutive_nonfinite", "optimizer", "loader", "rng")


def check_state(path: str | os.PathLike, model_state: dict, optimizer_states: dict, trainer_state: dict,
                expected: dict[str, tuple], parameter_shapes: dict[str, tuple] | None = None) -> None:
    """Strict loading, before anything is copied into the model: the checkpoint's tensors must be exactly
    `expected` (full-model name -> shape; a tied LM head is not stored), every optimizer entry must belong to
    a parameter of `parameter_shapes` (default `expected`; a ZeRO-1 checkpoint may hold the tied head's
    duplicate state), have its shape and the same state keys as the others, and the parameters with state
    must be the ones trainer.json records ("state_names"; older checkpoints: some state at any step > 0).
    Raises CheckpointError listing what is missing, unexpected or misshapen."""
    problems = [f"trainer.json: no {key!r}" for key in TRAINER_KEYS if key not in trainer_state]
    missing = sorted(set(expected) - set(model_state))
    unexpected = sorted(set(model_state) - set(expected))
    if missing:
        problems.append(f"model: missing {len(missing)} tensors: {_names(missing)}")
    if unexpected:
        problems.append(f"model: {len(unexpected)} unexpected tensors: {_names(unexpected)}")
    problems += [f"model: {name} has shape {list(model_state[name].shape)}, the model's is {list(shape)}"
                 for name, shape in expected.items()
                 if name in model_state and tuple(model_state[name].shape) != tuple(shape)]
    shapes = expected if parameter_shapes is None else parameter_shapes
    key_sets = {frozenset(entry) for entry in optimizer_states.values()}
    for name, entry in sorted(optimizer_states.items()):
        if name not in shapes:
            problems.append(f"optimizer: state for unknown parameter {name}")
            continue
        for k in ("exp_avg", "exp_avg_sq"):
            if k not in entry:
                problems.append(f"optimizer: {name} has no {k}")
            elif tuple(entry[k].shape) != tuple(shapes[name]):
                problems.append(f"optimizer: {name}.{k} has shape {list(entry[k].shape)}, "
                                f"the parameter's is {list(shapes[name])}")
    if len(key_sets) > 1:
        problems.append(f"optimizer: parameters have different state keys {sorted(sorted(s) for s in key_sets)}")
    recorded = (trainer_state.get("optimizer") or {}).get("state_names")
    if recorded is not None:
        lost = sorted(set(recorded) - set(optimizer_states))
        if lost:
            problems.append(f"optimizer: missing state for {len(lost)} parameters: {_names(lost)}")
    elif trainer_state.get("step", 0) > 0 and not optimizer_states:
        problems.append(f"optimizer: no state at step {trainer_state.get('step')}")
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems))


def _names(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return f"{shown} (+{len(names) - limit} more)" if len(names) > limit else shown


# ------------------------------------------------------------------------------------------------
# Optimizer state and RNG

def optimizer_to_tensors(optimizer: torch.optim.Optimizer, names: dict) -> tuple[dict, dict]:
    """Split an optimizer state_dict into safetensors-able tensors and a JSON-able rest.

    `names` maps each parameter object to its model name, so state is keyed by name, not by position.
    The rest records which parameters have state ("state_names"), so a load can tell lost state from none.
    """
    state = optimizer.state_dict()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    tensors, scalars = {}, {}
    for index, per_param in state["state"].items():
        name = names[params[index]]
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{name}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{name}.{key}"] = value
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": [names[params[i]] for i in g["params"]]}
              for g in state["param_groups"]]
    state_names = sorted(names[params[i]] for i in state["state"])
    return tensors, {"param_groups": groups, "scalars": scalars, "state_names": state_names}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, names: dict, tensors: dict, rest: dict) -> None:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    index_of = {names[p]: i for i, p in enumerate(params)}
    per_param: dict[int, dict] = {}
    for full_key, value in list(tensors.items()) + list(rest["scalars"].items()):
        name, key = full_key.rsplit(".", 1)
        if name not in index_of:
            raise KeyError(f"optimizer state for unknown parameter {name}")
        per_param.setdefault(index_of[name], {})[key] = value
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": [index_of[n] for n in g["params"]]}
              for g in rest["param_groups"]]
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# ------------------------------------------------------------------------------------------------
# Writing

def save_checkpoint(root: str | os.PathLike, step: int, *, model_state: dict, optimizer_tensors: dict,
                    trainer_state: dict, keep_last: int | None = None) -> Path:
    """Write a complete checkpoint for `step` atomically (files, then the manifest of what is on disk,
    then the rename); then prune to the newest `keep_last`, never removing this one."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, step)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, tmp / "model.safetensors")
        save_file(optimizer_tensors, tmp / "optimizer.safetensors")
        (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=1) + "\n")
        write_manifest(tmp, step, describe_files(tmp))
        _move_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(root, keep_last, keep=final)
    return final


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished `tmp` to `final`. A checkpoint already there (the same step saved again after a
    resume) is first renamed aside to a `.step_*` name, so a kill at any point leaves no half-deleted
    step directory that still looks complete; the aside copy is deleted last (or at the next start)."""
    aside = None
    if final.exists():
        aside = final.with_name(f".{final.name}.replaced")
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(final, aside)
    os.rename(tmp, final)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def prune(root: str | os.PathLike, keep_last: int | None, *, keep: Path) -> list[Path]:
    """Delete the oldest checkpoints beyond the newest `keep_last`, but never `keep`: the checkpoint just
    written and verified (its manifest describes the bytes on disk). Called only after that checkpoint is
    in place, so the newest verified one always survives. Returns what was removed."""
    if not keep_last:
        return []
    removed = [old for old in list_checkpoints(root)[:-keep_last] if old != Path(keep)]
    for old in removed:
        shutil.rmtree(old, ignore_errors=True)
    return removed


def load_checkpoint(path: str | os.PathLike) -> tuple[dict, dict, dict]:
    """(model_state, optimizer_tensors, trainer_state) of a checkpoint directory. Reads only: see
    `verify_checkpoint` and `check_state` for integrity; unreadable files raise CheckpointError."""
    path = Path(path)
    if not (path / "trainer.json").exists():
        raise CheckpointError(f"{path} is not a complete megapmp checkpoint (no trainer.json)")
    trainer_state = _read_json(path / "trainer.json")
    model_state = _read_tensors(path / "model.safetensors")
    optimizer_tensors = _read_tensors(path / "optimizer.safetensors")
    return model_state, optimizer_tensors, trainer_state


def load_model_weights(path: str | os.PathLike) -> dict:
    """Weights only, from a checkpoint directory (single-file or sharded: full tensors are gathered),
    its model.safetensors, or an HF-style safetensors file. A checkpoint directory's weight files are
    verified against its manifest first (CheckpointError if damaged), so init_from, evaluation and export
    never read corrupted weights."""
    path = Path(path)
    if path.is_dir() and (path / "trainer.json").exists():
        verify_checkpoint(path, only=("model", "layout"))  # the weight files (and, sharded, their layout)
    if path.is_dir() and is_sharded(path):
        return load_sharded_weights(path)
    file = path / "model.safetensors" if path.is_dir() else path
    if file.suffix != ".safetensors":
        raise ValueError(f"{file}: only .safetensors weights are loaded (never pickles)")
    return _read_tensors(file)


# ------------------------------------------------------------------------------------------------
# Sharded checkpoints (multi-rank runs)
#
#   CHECKPOINTS/step_00000100/
#       layout.json                         format, tp, pp, dp, vpp, sequence_parallel, distributed_optimizer
#       trainer.json                        as above (written by global rank 0)
#       model/tp00_pp000.safetensors        (tp, pp) rank's local shards, full-model names (dp rank 0 writes)
#       layout/tp00_pp000.json              that rank's [name, local shape, TP layout] list (flattening order)
#       optimizer/tp00_pp000.safetensors    "<name>.exp_avg", "<name>.exp_avg_sq", "<name>.step" (local shards)
#       optimizer/tp00_pp000_dp000.safetensors   ZeRO-1 instead: this DP rank's flat slices
#                                           master, exp_avg, exp_avg_sq [S] and per-parameter steps
#       manifest.json                       every file above, as in a single-file checkpoint
#
# Each rank hashes the files it wrote (`write_rank_files` returns their manifest entries); global rank 0
# gathers them, checks that they are exactly the files in the temp dir, adds layout.json and trainer.json,
# writes the manifest and renames (`publish_sharded`).
#
# The last pipeline stage's copy of a tied LM head is never written (it is the embedding).
# `load_full_checkpoint` rebuilds full tensors from any layout (concatenating TP shards along the
# recorded dims, uniting the PP stages' names, joining ZeRO slices), so a run resumes under a
# different TP/PP/DP layout and any layout exports to HF.

SHARDED_FORMAT = "megapmp-sharded-v1"


def is_sharded(path: str | os.PathLike) -> bool:
    return (Path(path) / "layout.json").exists()


def rank_tag(tp_rank: int, pp_rank: int) -> str:
    return f"tp{tp_rank:02d}_pp{pp_rank:03d}"


def partial_dir(root: str | os.PathLike, step: int) -> Path:
    """The fixed temporary directory every rank of a sharded save writes into (a shared filesystem)."""
    return Path(root) / f".{step_dir(root, step).name}.partial"


def write_rank_files(tmp: Path, *, tp_rank: int, pp_rank: int, dp_rank: int, model_state: dict | None,
                     param_records: list | None, optimizer_tensors: dict | None,
                     zero_state: dict | None) -> dict[str, dict]:
    """One rank's part of a sharded checkpoint (see the layout above); None parts are not written.
    Returns the manifest entries of the files written (hashed here, so the ranks hash in parallel)."""
    tag = rank_tag(tp_rank, pp_rank)
    for sub in ("model", "layout", "optimizer"):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
    written = []
    if model_state is not None:
        written.append(f"model/{tag}.safetensors")
        save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, tmp / written[-1])
    if param_records is not None:
        written.append(f"layout/{tag}.json")
        (tmp / written[-1]).write_text(json.dumps(param_records) + "\n")
    if optimizer_tensors is not None:
        written.append(f"optimizer/{tag}.safetensors")
        save_file({k: v.detach().contiguous().cpu() for k, v in optimizer_tensors.items()}, tmp / written[-1])
    if zero_state is not None:
        written.append(f"optimizer/{tag}_dp{dp_rank:03d}.safetensors")
        save_file({k: v.detach().contiguous().cpu() for k, v in zero_state.items()}, tmp / written[-1])
    return describe_files(tmp, written)


def publish_sharded(root: str | os.PathLike, step: int, *, layout: dict, trainer_state: dict,
                    rank_files: dict[str, dict], keep_last: int | None = None) -> Path:
    """Rank 0, after every rank wrote its files: add layout.json and trainer.json, write the manifest of all
    files (`rank_files`: every rank's `write_rank_files` entries, united), rename, prune."""
    root = Path(root)
    tmp, final = partial_dir(root, step), step_dir(root, step)
    (tmp / "layout.json").write_text(json.dumps({"format": SHARDED_FORMAT, **layout}, indent=1) + "\n")
    (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=1) + "\n")
    files = {**rank_files, **describe_files(tmp, ["layout.json", "trainer.json"])}
    on_disk = {p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file()}
    if on_disk != set(files):  # a rank that wrote nothing, or a stray writer: never publish that
        raise RuntimeError(f"{tmp}: the ranks reported {sorted(set(files) - on_disk)} not on disk and "
                           f"{sorted(on_disk - set(files))} on disk unreported; checkpoint not published")
    write_manifest(tmp, step, files)
    _move_into_place(tmp, final)
    prune(root, keep_last, keep=final)
    return final


def _join_tp(parts: list[torch.Tensor], layout: dict) -> torch.Tensor:
    """A full tensor from its TP ranks' local tensors (rank order) under a recorded TPLayout."""
    kind = layout["kind"]
    if kind == "replicated" or len(parts) == 1:
        return parts[0]
    if kind == "shard":
        return torch.cat(parts, dim=layout["dim"])
    if kind == "kv_replica":
        holders = len(parts) // layout["slots"]
        return torch.cat([parts[s * holders] for s in range(layout["slots"])], dim=0)
    raise ValueError(f"unknown TP layout kind {kind!r}")


def _records(path: Path, tp: int, pp: int) -> dict:
    return {(t, p): _read_json(path / "layout" / f"{rank_tag(t, p)}.json") for t in range(tp) for p in range(pp)}


def _join_files(path: Path, files: dict, tp: int, p: int, name: str, tp_layout: dict,
                key: str | None = None) -> torch.Tensor:
    """_join_tp over the TP ranks' loaded files of stage `p`; a rank file without the tensor is named."""
    parts = []
    for t in range(tp):
        entry = files[(t, p)].get(name)
        if key is not None and entry is not None:
            entry = entry.get(key)
        if entry is None:
            what = f"{name}.{key}" if key else name
            raise CheckpointError(f"{path}: TP rank {t} of stage {p} ({rank_tag(t, p)}) has no {what}")
        parts.append(entry)
    return _join_tp(parts, tp_layout)


def load_sharded_weights(path: str | os.PathLike) -> dict:
    """Full-model weights (megapmp names) from a sharded checkpoint of any layout."""
    path = Path(path)
    layout = _read_json(path / "layout.json")
    tp, pp = layout["tp"], layout["pp"]
    records = _records(path, tp, pp)
    files = {(t, p): _read_tensors(path / "model" / f"{rank_tag(t, p)}.safetensors")
             for t in range(tp) for p in range(pp)}
    full = {}
    for p in range(pp):
        for name, _, tp_layout in records[(0, p)]:
            if name in files[(0, p)]:  # absent: a tied duplicate, or lost (check_state names it)
                full[name] = _join_files(path, files, tp, p, name, tp_layout)
    return full


def load_sharded_optimizer(path: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """Full per-parameter AdamW state {name: {"exp_avg", "exp_avg_sq", "step"}} from a sharded checkpoint
    (plain or ZeRO-1), in full-model shapes."""
    path = Path(path)
    layout = _read_json(path / "layout.json")
    tp, pp, dp = layout["tp"], layout["pp"], layout["dp"]
    records = _records(path, tp, pp)
    local: dict[tuple[int, int], dict[str, dict]] = {}
    for (t, p), recs in records.items():
        states: dict[str, dict] = {}
        if layout.get("distributed_optimizer"):
            files = [path / "optimizer" / f"{rank_tag(t, p)}_dp{d:03d}.safetensors" for d in range(dp)]
            slices = [_read_tensors(file) for file in files]
            for file, s in zip(files, slices):
                lost = [k for k in ("exp_avg", "exp_avg_sq", "steps") if k not in s]
                if lost:
                    raise CheckpointError(f"{file}: no {', '.join(lost)}")
            names = [r[0] for r in recs]
            shapes = [r[1] for r in recs]
            numel = sum(math.prod(s) for s in shapes)
            flat = {k: torch.cat([s[k] for s in slices])[:numel] for k in ("exp_avg", "exp_avg_sq")}
            if flat["exp_avg"].numel() != numel or slices[0]["steps"].numel() != len(names):
                raise CheckpointError(f"{path}: the {rank_tag(t, p)} ZeRO slices do not cover the "
                                      f"{len(names)} parameters of layout/{rank_tag(t, p)}.json")
            steps = slices[0]["steps"]
            offset = 0
            for i, (name, shape) in enumerate(zip(names, shapes)):
                n = math.prod(shape)
                if steps[i] > 0:
                    states[name] = {k: flat[k][offset: offset + n].view(shape).clone() for k in flat}
                    states[name]["step"] = torch.tensor(float(steps[i]))
                offset += n
        else:
            states = per_parameter(_read_tensors(path / "optimizer" / f"{rank_tag(t, p)}.safetensors"))
        local[(t, p)] = states
    full: dict[str, dict] = {}
    for p in range(pp):
        for name, _, tp_layout in records[(0, p)]:
            if name not in local[(0, p)]:
                continue
            full[name] = {k: v if k == "step" else _join_files(path, local, tp, p, name, tp_layout, key=k)
                          for k, v in local[(0, p)][name].items()}
    return full


def load_full_checkpoint(path: str | os.PathLike) -> tuple[dict, dict, dict]:
    """(full model state, full per-parameter optimizer state {name: {key: tensor}}, trainer_state) of
    a checkpoint in either format."""
    path = Path(path)
    if is_sharded(path):
        trainer_state = _read_json(path / "trainer.json")
        return load_sharded_weights(path), load_sharded_optimizer(path), trainer_state
    model_state, tensors, trainer_state = load_checkpoint(path)
    scalars = trainer_state.get("optimizer", {}).get("scalars", {})
    return model_state, per_parameter(tensors, scalars), trainer_state


# ------------------------------------------------------------------------------------------------
# A training run's checkpoints: save and resume
#
# The trainer hands over its engine (megapmp.parallel.engine.Engine) and its own state; which format is
# written, how every rank takes part, and how the ranks agree on what to resume from is decided here, with
# the formats, so the trainer never branches on the layout. Every rank calls `save` and `resume`.

def save(root: str | os.PathLike, step: int, engine, *, trainer_state: dict, keep_last: int | None,
         sequence_parallel: bool, tie_word_embeddings: bool) -> Path:
    """Checkpoint `step` of a run under `root` and return its directory (on every rank).

    A single-process run (``engine.whole_model``) writes the single-file format with the optimizer's own
    state; a parallel run writes the sharded format, each rank its part, which resumes under any layout.
    `trainer_state` is the trainer's part of trainer.json (step, counters, loader, rng, config, ...): the
    optimizer's scalar state is added here. `sequence_parallel` and `tie_word_embeddings` are the run's
    settings, recorded in a sharded checkpoint's layout.json.
    """
    model = engine.whole_model
    if model is None:
        return _save_sharded(Path(root), step, engine, trainer_state=trainer_state, keep_last=keep_last,
                             layout_options={"sequence_parallel": sequence_parallel,
                                             "distributed_optimizer": engine.zero is not None,
                                             "tie_word_embeddings": tie_word_embeddings})
    optimizer_tensors, optimizer_rest = optimizer_to_tensors(engine.optimizer, engine.param_names)
    model_state = {k: v for k, v in model.state_dict().items()
                   if not (k == "lm_head.weight" and tie_word_embeddings)}  # the tied head is the embedding
    return save_checkpoint(root, step, model_state=model_state, optimizer_tensors=optimizer_tensors,
                           trainer_state={**trainer_state, "optimizer": optimizer_rest}, keep_last=keep_last)


def _save_sharded(root: Path, step: int, engine, *, trainer_state: dict, keep_last: int | None,
                  layout_options: dict) -> Path:
    ctx = engine.ctx
    tmp = partial_dir(root, step)
    if ctx.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    local = engine.local_state()
    written = {}  # this rank's manifest entries
    if ctx.dp_rank == 0:  # one copy of each (tp, pp) part of the model and its plain optimizer state
        written |= write_rank_files(tmp, tp_rank=ctx.tp_rank, pp_rank=ctx.pp_rank, dp_rank=0,
                                    model_state=local["model"], param_records=local["records"],
                                    optimizer_tensors=local["optimizer"], zero_state=None)
    if local["zero"] is not None:  # ZeRO-1: every DP rank holds a different slice
        written |= write_rank_files(tmp, tp_rank=ctx.tp_rank, pp_rank=ctx.pp_rank, dp_rank=ctx.dp_rank,
                                    model_state=None, param_records=None, optimizer_tensors=None,
                                    zero_state=local["zero"])
    state_names = local["state_names"] if ctx.dp_rank == 0 or local["zero"] is not None else []
    # Rank 0 writes the manifest of every rank's files: gather what each wrote (after all have written).
    reports = [None] * ctx.world_size
    dist.all_gather_object(reports, (written, state_names))
    final = step_dir(root, step)
    if ctx.rank == 0:
        layout = {"tp": ctx.tp_size, "pp": ctx.pp_size, "dp": ctx.dp_size, "vpp": ctx.vpp_size, **layout_options}
        rank_files = {rel: meta for files, _ in reports for rel, meta in files.items()}
        state_names = sorted({name for _, names in reports for name in names})
        final = publish_sharded(root, step, layout=layout, rank_files=rank_files, keep_last=keep_last,
                                trainer_state={**trainer_state,
                                               "optimizer": {"kind": engine.kind, "state_names": state_names}})
    dist.barrier()  # no rank goes on (or exits) before the checkpoint is in place
    return final


def resume(root: str | os.PathLike, resume: str, engine, *, expected_shapes: dict[str, tuple],
           parameter_shapes: dict[str, tuple], tie_word_embeddings: bool, log, check=None) -> dict | None:
    """Load the checkpoint that `resume` names into `engine` and return its trainer state (step, counters,
    "loader", "rng": the trainer applies them), or None when there is nothing to resume.

    resume = "auto": the newest intact checkpoint under `root`, falling back past damaged ones (each
    skipped with a message saying what is wrong; CheckpointError if every one is damaged); "none": None;
    a path: that checkpoint, or a CheckpointError saying what is wrong with it. Temp dirs of saves that did
    not finish are removed first. `expected_shapes` / `parameter_shapes`: what `check_state` holds the
    checkpoint to (full shapes, any layout). `log(message)` reports (the trainer's rank-0 log).
    `check(path, trainer_state)`, if given, is asked (on rank 0, before any tensor is read) whether this run
    may continue the checkpoint: a reason it may not is an IncompatibleCheckpointError on every rank.
    A checkpoint whose trainer.json, manifest and directory name disagree on its step is damaged.
    """
    root, ctx = Path(root), engine.ctx
    if ctx.rank == 0:
        for stale in remove_incomplete(root):
            log(f"removed {stale.name}, left by a save that did not finish")
    _barrier(ctx)
    if resume == "none":
        return None
    explicit = resume != "auto"
    candidates = [Path(resume)] if explicit else list_checkpoints(root)[::-1]
    skipped = []
    for path in candidates:
        state, problem = _try_resume(path, engine, expected_shapes=expected_shapes,
                                     parameter_shapes=parameter_shapes, tie_word_embeddings=tie_word_embeddings,
                                     log=log, check=check)
        if problem is None:
            if skipped:
                log(f"fell back to {path.name}: newer checkpoints are damaged ({', '.join(skipped)})")
            return state
        if explicit:
            raise CheckpointError(f"checkpoint.resume={resume}: {problem}")
        log(f"not resuming from {path.name}, it is damaged: {problem}")
        skipped.append(path.name)
    if candidates:
        raise CheckpointError(f"no intact checkpoint to resume from in {root} ({', '.join(skipped)} are "
                              f"damaged: see the messages above); name one with --checkpoint.resume PATH "
                              f"or start over with --checkpoint.resume none")
    return None


def _try_resume(path: Path, engine, *, expected_shapes: dict, parameter_shapes: dict, tie_word_embeddings: bool,
                log, check=None) -> tuple[dict | None, str | None]:
    """Verify, read and strictly check `path`, then load it into `engine`: (trainer state, None), or
    (None, what is wrong) with nothing loaded. Rank 0 asks `check`, hashes the files and checks the step;
    every rank reads and checks the same full state, and a problem on any rank is every rank's, so that all
    ranks load the same checkpoint."""
    ctx = engine.ctx
    verified, problem, incompatible = None, None, None
    if ctx.rank == 0:
        try:
            if check is not None and (path / "trainer.json").is_file():
                verify_checkpoint(path, only=("trainer.json",))  # judged on the config it was written with
                incompatible = check(path, _read_json(path / "trainer.json"))
            if incompatible is None:
                verified = verify_checkpoint(path)
                check_step(path)
        except CheckpointError as e:
            problem = str(e)
    verified, problem, incompatible = _from_rank0(ctx, (verified, problem, incompatible))
    if incompatible is not None:
        raise IncompatibleCheckpointError(incompatible)
    if problem is None:
        try:
            if not (path / "trainer.json").exists():
                raise CheckpointError(f"{path} is not a complete megapmp checkpoint (no trainer.json)")
            model_state, optimizer_states, state = load_full_checkpoint(path)
            check_state(path, model_state, optimizer_states, state, expected_shapes, parameter_shapes)
        except CheckpointError as e:
            problem = str(e)
    problem = _any_rank_problem(ctx, problem)
    if problem is not None:
        return None, problem
    if not verified:
        log(f"{path} has no {MANIFEST} (written before checkpoints had one): loading it unverified")
    _load_into(engine, path, model_state, optimizer_states, state, tie_word_embeddings)
    log(f"resumed from {path} at step {state['step']}")
    return state, None


def check_step(path: Path) -> None:
    """trainer.json's step must be the manifest's and the directory name's (step_XXXXXXXX): a checkpoint
    copied or renamed to another step would otherwise resume a run at the wrong point of its schedule."""
    steps = {"trainer.json": _read_json(path / "trainer.json").get("step")}
    if (path / MANIFEST).is_file():
        steps["manifest.json"] = _read_json(path / MANIFEST).get("step")
    named = STEP_DIR.match(path.name)
    if named:
        steps["the directory name"] = int(named.group(1))
    if len(set(steps.values())) > 1:
        raise CheckpointError(f"{path}: the step is not one: " + ", ".join(f"{k} says {v}" for k, v in steps.items()))


def _load_into(engine, path: Path, model_state: dict, optimizer_states: dict, state: dict,
               tie_word_embeddings: bool) -> None:
    model = engine.whole_model
    if model is not None and not is_sharded(path):
        # The single-file format restores the optimizer's own state_dict (param groups included).
        if tie_word_embeddings:
            model_state["lm_head.weight"] = model_state["embed_tokens.weight"]
        model.load_state_dict(model_state, strict=True)
        model.tie_weights()
        tensors = {f"{name}.{k}": v for name, entry in optimizer_states.items() for k, v in entry.items()
                   if f"{name}.{k}" not in state["optimizer"]["scalars"]}
        optimizer_from_tensors(engine.optimizer, engine.param_names, tensors, state["optimizer"])
    else:
        engine.load_full_state(model_state, optimizer_states, tie_word_embeddings)


def _barrier(ctx) -> None:
    if ctx.world_size > 1:
        dist.barrier()


def _from_rank0(ctx, value):
    """Rank 0's `value`, on every rank."""
    if ctx.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _any_rank_problem(ctx, problem: str | None) -> str | None:
    """The first rank's problem, on every rank, so that all ranks load the same checkpoint."""
    if ctx.world_size == 1:
        return problem
    problems = [None] * ctx.world_size
    dist.all_gather_object(problems, problem)
    return next((p for p in problems if p is not None), None)

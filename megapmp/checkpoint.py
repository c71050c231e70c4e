"""Checkpoints: safetensors for tensors, JSON for everything else; nothing is ever unpickled.

    CHECKPOINTS/step_00000100/
        model.safetensors      weights under megapmp's module names
        optimizer.safetensors  optimizer state tensors, keyed "<param name>.<state key>"
        trainer.json           step, optimizer hyper-parameters and scalar state, scheduler, sampler,
                               RNG states, config, counters

Parallel runs write a sharded checkpoint instead (layout.json, model/, optimizer/, layout/: see
"Sharded checkpoints" below); `load_full_checkpoint` and `load_model_weights` read either format.

A checkpoint is written into a temporary directory beside its final name and renamed when complete,
so a run killed at any moment leaves either the whole checkpoint or none of it; `latest_checkpoint`
only ever sees complete ones.
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
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
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


def optimizer_to_tensors(optimizer: torch.optim.Optimizer, names: dict) -> tuple[dict, dict]:
    """Split an optimizer state_dict into safetensors-able tensors and a JSON-able rest.

    `names` maps each parameter object to its model name, so state is keyed by name, not by position.
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
    return tensors, {"param_groups": groups, "scalars": scalars}


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


def save_checkpoint(root: str | os.PathLike, step: int, *, model_state: dict, optimizer_tensors: dict,
                    trainer_state: dict, keep_last: int | None = None) -> Path:
    """Write a complete checkpoint for `step` atomically; then prune to the newest `keep_last`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, step)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, tmp / "model.safetensors")
        save_file(optimizer_tensors, tmp / "optimizer.safetensors")
        (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=1) + "\n")
        if final.exists():  # re-saving a step (e.g. after a resume): replace it whole
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last:
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | os.PathLike) -> tuple[dict, dict, dict]:
    """(model_state, optimizer_tensors, trainer_state) of a checkpoint directory."""
    path = Path(path)
    if not (path / "trainer.json").exists():
        raise FileNotFoundError(f"{path} is not a complete megapmp checkpoint (no trainer.json)")
    trainer_state = json.loads((path / "trainer.json").read_text())
    model_state = load_file(path / "model.safetensors")
    optimizer_tensors = load_file(path / "optimizer.safetensors") if (path / "optimizer.safetensors").exists() else {}
    return model_state, optimizer_tensors, trainer_state


def load_model_weights(path: str | os.PathLike) -> dict:
    """Weights only, from a checkpoint directory (single-file or sharded: full tensors are gathered),
    its model.safetensors, or an HF-style safetensors file."""
    path = Path(path)
    if path.is_dir() and is_sharded(path):
        return load_sharded_weights(path)
    file = path / "model.safetensors" if path.is_dir() else path
    if file.suffix != ".safetensors":
        raise ValueError(f"{file}: only .safetensors weights are loaded (never pickles)")
    return load_file(file)


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
                     param_records: list | None, optimizer_tensors: dict | None, zero_state: dict | None) -> None:
    """One rank's part of a sharded checkpoint (see the layout above); None parts are not written."""
    tag = rank_tag(tp_rank, pp_rank)
    for sub in ("model", "layout", "optimizer"):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
    if model_state is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, tmp / "model" / f"{tag}.safetensors")
    if param_records is not None:
        (tmp / "layout" / f"{tag}.json").write_text(json.dumps(param_records) + "\n")
    if optimizer_tensors is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in optimizer_tensors.items()},
                  tmp / "optimizer" / f"{tag}.safetensors")
    if zero_state is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in zero_state.items()},
                  tmp / "optimizer" / f"{tag}_dp{dp_rank:03d}.safetensors")


def publish_sharded(root: str | os.PathLike, step: int, *, layout: dict, trainer_state: dict,
                    keep_last: int | None = None) -> Path:
    """Rank 0, after every rank wrote its files: add layout.json and trainer.json, rename, prune."""
    root = Path(root)
    tmp, final = partial_dir(root, step), step_dir(root, step)
    (tmp / "layout.json").write_text(json.dumps({"format": SHARDED_FORMAT, **layout}, indent=1) + "\n")
    (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=1) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    if keep_last:
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
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
    return {(t, p): json.loads((path / "layout" / f"{rank_tag(t, p)}.json").read_text())
            for t in range(tp) for p in range(pp)}


def load_sharded_weights(path: str | os.PathLike) -> dict:
    """Full-model weights (megapmp names) from a sharded checkpoint of any layout."""
    path = Path(path)
    layout = json.loads((path / "layout.json").read_text())
    tp, pp = layout["tp"], layout["pp"]
    records = _records(path, tp, pp)
    files = {(t, p): load_file(path / "model" / f"{rank_tag(t, p)}.safetensors") for t in range(tp) for p in range(pp)}
    full = {}
    for p in range(pp):
        for name, _, tp_layout in records[(0, p)]:
            if name in files[(0, p)]:
                full[name] = _join_tp([files[(t, p)][name] for t in range(tp)], tp_layout)
    return full


def load_sharded_optimizer(path: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """Full per-parameter AdamW state {name: {"exp_avg", "exp_avg_sq", "step"}} from a sharded checkpoint
    (plain or ZeRO-1), in full-model shapes."""
    path = Path(path)
    layout = json.loads((path / "layout.json").read_text())
    tp, pp, dp = layout["tp"], layout["pp"], layout["dp"]
    records = _records(path, tp, pp)
    local: dict[tuple[int, int], dict[str, dict]] = {}
    for (t, p), recs in records.items():
        states: dict[str, dict] = {}
        if layout.get("distributed_optimizer"):
            slices = [load_file(path / "optimizer" / f"{rank_tag(t, p)}_dp{d:03d}.safetensors") for d in range(dp)]
            names = [r[0] for r in recs]
            shapes = [r[1] for r in recs]
            numel = sum(math.prod(s) for s in shapes)
            flat = {k: torch.cat([s[k] for s in slices])[:numel] for k in ("exp_avg", "exp_avg_sq")}
            steps = slices[0]["steps"]
            offset = 0
            for i, (name, shape) in enumerate(zip(names, shapes)):
                n = math.prod(shape)
                if steps[i] > 0:
                    states[name] = {k: flat[k][offset: offset + n].view(shape).clone() for k in flat}
                    states[name]["step"] = torch.tensor(float(steps[i]))
                offset += n
        else:
            file = path / "optimizer" / f"{rank_tag(t, p)}.safetensors"
            tensors = load_file(file) if file.exists() else {}
            for key, value in tensors.items():
                name, k = key.rsplit(".", 1)
                states.setdefault(name, {})[k] = value
        local[(t, p)] = states
    full: dict[str, dict] = {}
    for p in range(pp):
        for name, _, tp_layout in records[(0, p)]:
            if name not in local[(0, p)]:
                continue
            entry = {}
            for k, v in local[(0, p)][name].items():
                entry[k] = v if k == "step" else _join_tp([local[(t, p)][name][k] for t in range(tp)], tp_layout)
            full[name] = entry
    return full


def load_full_checkpoint(path: str | os.PathLike) -> tuple[dict, dict, dict]:
    """(full model state, full per-parameter optimizer state {name: {key: tensor}}, trainer_state) of
    a checkpoint in either format."""
    path = Path(path)
    if is_sharded(path):
        trainer_state = json.loads((path / "trainer.json").read_text())
        return load_sharded_weights(path), load_sharded_optimizer(path), trainer_state
    model_state, tensors, trainer_state = load_checkpoint(path)
    states: dict[str, dict] = {}
    for key, value in tensors.items():
        name, k = key.rsplit(".", 1)
        states.setdefault(name, {})[k] = value
    for key, value in trainer_state.get("optimizer", {}).get("scalars", {}).items():
        name, k = key.rsplit(".", 1)
        states.setdefault(name, {})[k] = torch.tensor(float(value))
    return model_state, states, trainer_state

"""Checkpoints: safetensors for tensors, JSON for everything else; nothing is ever unpickled.

    CHECKPOINTS/step_00000100/
        model.safetensors      weights under megapmp's module names
        optimizer.safetensors  optimizer state tensors, keyed "<param name>.<state key>"
        trainer.json           step, optimizer hyper-parameters and scalar state, scheduler, sampler,
                               RNG states, config, counters

A checkpoint is written into a temporary directory beside its final name and renamed when complete,
so a run killed at any moment leaves either the whole checkpoint or none of it; `latest_checkpoint`
only ever sees complete ones.
"""

from __future__ import annotations

import json
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
    """Weights only, from a checkpoint directory, its model.safetensors, or an HF-style safetensors file."""
    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    if file.suffix != ".safetensors":
        raise ValueError(f"{file}: only .safetensors weights are loaded (never pickles)")
    return load_file(file)

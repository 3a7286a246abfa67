"""Resume checkpoints of a training run: safetensors + JSON, written atomically, nothing pickled.

A run that writes ``models/x/dense.safetensors`` keeps its resume points in
``models/x/dense.resume/iter_<step>/`` (``model.safetensors``, ``optimizer.safetensors`` and
``state.json``). Each point is written into a hidden temporary folder and renamed into place, so a
point either exists whole or not at all; older points are removed once a newer one is in place,
and the whole folder is removed when the final model is written.

The optimizer state is stored per parameter *name* (``<param>:<key>`` tensors, e.g. SGD's
``momentum_buffer``), so it reloads into a freshly built optimizer over the same model.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

RESUME_FORMAT = 1
_PREFIX = "iter_"


@dataclass(frozen=True)
class ResumePoint:
    """A complete resume point on disk.

    Args:
        path: its folder (``.../iter_<step>``).
        step: iterations completed when it was written.
        meta: what the run recorded about itself (recipe, seed, ...), to check a restart against.
    """

    path: Path
    step: int
    meta: dict[str, Any]


def resume_dir_for(out: str | Path) -> Path:
    """The resume folder beside a final checkpoint: ``dense.safetensors`` -> ``dense.resume``."""
    return Path(out).with_suffix(".resume")


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the optimizer's parameters in its state-dict order (groups, then params)."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    names = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in by_id:
                raise ValueError("the optimizer holds a parameter that is not in the model")
            names.append(by_id[id(p)])
    return names


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer's state into named tensors and a JSON-able rest."""
    names = _param_names(model, optimizer)
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{names[idx]}:{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(names[idx], {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars, "names": names}


def load_optimizer_state(
        model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], rest: dict,
) -> None:
    """Inverse of :func:`optimizer_state` into an optimizer built over the same model."""
    names = _param_names(model, optimizer)
    if names != rest["names"]:
        raise ValueError("optimizer parameters differ from the ones the resume point was written for")
    index = {n: i for i, n in enumerate(names)}
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        name, _, field = key.rpartition(":")
        state.setdefault(index[name], {})[field] = value
    for name, fields in rest["scalars"].items():
        state.setdefault(index[name], {}).update(fields)
    optimizer.load_state_dict({"state": state, "param_groups": rest["param_groups"]})


def save_resume(
        resume_dir: str | Path,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        meta: dict[str, Any],
        scaler: torch.amp.GradScaler | None = None,
) -> Path:
    """Write the resume point for ``step`` atomically, then drop older points. Returns its folder."""
    resume_dir = Path(resume_dir)
    resume_dir.mkdir(parents=True, exist_ok=True)
    final = resume_dir / f"{_PREFIX}{step:08d}"
    tmp = resume_dir / f".{final.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(weights, str(tmp / "model.safetensors"))
        opt_tensors, opt_rest = optimizer_state(model, optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        state = {
            "format": RESUME_FORMAT,
            "step": step,
            "meta": meta,
            "optimizer": opt_rest,
            "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        }
        (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in resume_dir.glob(f"{_PREFIX}*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_resume(resume_dir: str | Path) -> ResumePoint | None:
    """The newest complete resume point in ``resume_dir``, or ``None``."""
    resume_dir = Path(resume_dir)
    if not resume_dir.is_dir():
        return None
    points = sorted(p for p in resume_dir.glob(f"{_PREFIX}*") if (p / "state.json").is_file())
    if not points:
        return None
    path = points[-1]
    try:
        state = json.loads((path / "state.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path / 'state.json'}: unreadable resume state ({e}); delete {resume_dir} to start over"
        ) from None
    if state.get("format") != RESUME_FORMAT:
        raise ValueError(f"{path}: resume format {state.get('format')} is not {RESUME_FORMAT}; delete {resume_dir}")
    return ResumePoint(path, int(state["step"]), state["meta"])


def load_resume(
        point: ResumePoint,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None = None,
) -> None:
    """Load a resume point's model, optimizer (and AMP scaler) state in place."""
    state = json.loads((point.path / "state.json").read_text())
    device = next(model.parameters()).device
    weights = load_file(str(point.path / "model.safetensors"), device=str(device))
    try:
        model.load_state_dict(weights, strict=True)
        load_optimizer_state(model, optimizer, load_file(str(point.path / "optimizer.safetensors")), state["optimizer"])
    except (RuntimeError, KeyError, ValueError) as e:
        first = str(e).strip().splitlines()[0]
        raise ValueError(
            f"{point.path}: resume point does not match this model ({first}); delete {point.path.parent} to start over"
        ) from None
    if scaler is not None and scaler.is_enabled() and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])


def clear_resume(resume_dir: str | Path) -> None:
    """Remove the resume folder (after the final model is written)."""
    shutil.rmtree(resume_dir, ignore_errors=True)

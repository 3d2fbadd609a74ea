"""Atomic trainer checkpoints: ``<dir>/step-000012/`` plus a ``LATEST`` pointer.

A checkpoint is written into a temporary sibling directory and renamed into place only when
complete; then ``LATEST`` is replaced atomically (``os.replace``). A crash at any point leaves the
previous checkpoint and pointer untouched, and a half-written directory is never pointed to.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 2
_META, _STATE, _LATEST = "meta.json", "state.pt", "LATEST"

__all__ = ["save_checkpoint", "load_checkpoint", "load_policy_weights", "resolve", "CheckpointError"]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, half-written or does not fit the current policy/config."""


def save_checkpoint(state: dict[str, Any], directory: Path, step: int, *, model: str = "",
                    keep_last: int | None = None) -> Path:
    """Write ``state`` (a trainer's ``state_dict()``) as ``<directory>/step-N`` atomically and
    point ``LATEST`` at it.

    ``keep_last=k`` then deletes all but the newest k complete checkpoints (a 135M LoRA run
    writes ~6 MB per step, ~700 MB over a 2-hour run otherwise); pruning runs only after the
    new checkpoint and pointer are in place, so a crash while pruning loses nothing needed.
    """
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 (or None to keep all), got {keep_last}")
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=directory))
    try:
        torch.save(state, tmp / _STATE)
        meta = {"format_version": FORMAT_VERSION, "step": step, "model": model,
                "config": state.get("config"), "credit": state.get("credit"),
                "params": {n: list(t.shape) for n, t in state["params"].items()}}
        (tmp / _META).write_text(json.dumps(meta, indent=1))  # written last: marks completeness
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer = directory / f".{_LATEST}.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, directory / _LATEST)
    if keep_last is not None:
        _prune(directory, keep_last, final)
    return final


def _prune(directory: Path, keep_last: int, newest: Path) -> None:
    done = sorted((p for p in directory.glob("step-*") if (p / _META).exists()),
                  key=lambda p: p.name)  # zero-padded step numbers sort by name
    for old in done[:-keep_last]:
        if old != newest:
            shutil.rmtree(old, ignore_errors=True)


def resolve(directory: Path) -> Path:
    """The checkpoint a path names: itself if it holds one, else the one ``LATEST`` points to."""
    if (directory / _META).exists() or (directory / _STATE).exists():
        return directory
    latest = directory / _LATEST
    if not latest.exists():
        raise CheckpointError(f"no complete checkpoint in {directory}: no {_META} and no {_LATEST} "
                              "(missing, or half-written by a crash)")
    return directory / latest.read_text().strip()


def load_checkpoint(directory: Path) -> tuple[Path, dict[str, Any]]:
    """The checkpoint ``directory`` names and its state dict, loaded without unpickling code
    (``weights_only=True``: tensors and plain containers only)."""
    path = resolve(directory)
    try:
        meta = json.loads((path / _META).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable or half-written: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise CheckpointError(f"checkpoint {path} has format {version}, "
                              f"this version reads {FORMAT_VERSION}")
    try:
        state = torch.load(path / _STATE, weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable, half-written or not a plain "
                              f"weights file: {exc}") from exc
    missing = [k for k in ("step", "config", "credit", "params", "critic", "optimizer", "rng",
                           "task_queue", "history") if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path}/{_STATE} lacks {missing}")
    return path, state


def load_policy_weights(policy: Any, directory: Path) -> Path:
    """Load only the trained weights of a checkpoint into ``policy`` (for evaluation/serving)."""
    path, state = load_checkpoint(directory)
    params = {n: p for n, p in policy.model.named_parameters() if p.requires_grad}
    saved = state["params"]
    mismatch = sorted(set(params) ^ set(saved)) or [n for n in params if params[n].shape != saved[n].shape]
    if mismatch:
        raise CheckpointError(f"checkpoint {path} does not fit this policy; e.g. {mismatch[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
    return path

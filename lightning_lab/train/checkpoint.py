"""Crash-safe trainer checkpoints: ``<dir>/step-000012/`` plus a ``LATEST`` pointer.

Every step of a save leaves a resumable directory, whenever the process dies (tests kill it
between each pair of steps):

1. the checkpoint is written into a temporary sibling (``.step-N.tmp-*``), every file fsynced,
   ``meta.json`` last (it marks completeness);
2. it is renamed to ``step-N`` and the directory fsynced; ``LATEST`` is then replaced
   atomically (written to a temp file, fsynced, ``os.replace``d);
3. only then is anything stale deleted, by renaming it to ``.step-N.stale-*`` first, so a
   half-deleted directory never looks complete. The directory ``LATEST`` names is never deleted.

Re-saving a step that exists (a finished run run again) points ``LATEST`` at the new temp
directory before the old ``step-N`` is moved aside. Leftover temp/stale directories are removed
by the writer (each save, and a run when it resumes), never by a reader, which could be looking
at a directory another process is still writing. ``state.pt`` holds only tensors and plain
Python values. Reading (the newest-intact fallback, ``weights_only`` loading, the weights a
policy or the proxy loads) is ``inference/checkpoints.py``, which serving shares; its names are
re-exported here.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..inference import checkpoints
from ..inference.checkpoints import (FORMAT_VERSION, LATEST_FILE, META_FILE, STATE_FILE,
                                     CheckpointError, latest_checkpoint, load_policy_weights,
                                     named_by_latest, read_policy_weights, resolve)

__all__ = ["save_checkpoint", "load_checkpoint", "load_policy_weights", "read_policy_weights",
           "latest_checkpoint", "resolve", "clean_orphans", "CheckpointError", "FORMAT_VERSION",
           "TRAINER_KEYS"]


# ---------------------------------------------------------------- durable file operations
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _write_text_durably(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _point_latest(directory: Path, name: str) -> None:
    pointer = directory / f".{LATEST_FILE}.tmp"
    _write_text_durably(pointer, name)
    os.replace(pointer, directory / LATEST_FILE)
    _fsync_dir(directory)


def _discard(path: Path) -> None:
    """Delete a checkpoint directory: first rename it out of the ``step-*`` namespace (atomic),
    so a crash mid-``rmtree`` cannot leave a ``step-N`` that has meta.json but no state."""
    if not path.exists():
        return
    stale = path.with_name(f".{path.name.lstrip('.')}.stale-{uuid.uuid4().hex[:8]}")
    os.rename(path, stale)
    shutil.rmtree(stale, ignore_errors=True)


def clean_orphans(directory: Path) -> list[str]:
    """Remove temp/stale directories that crashes left behind (never what ``LATEST`` names)."""
    if not directory.is_dir():
        return []
    keep = named_by_latest(directory)
    removed = []
    for path in directory.iterdir():
        name = path.name
        if name.startswith(".step-") and (".tmp-" in name or ".stale-" in name) and name != keep:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
    (directory / f".{LATEST_FILE}.tmp").unlink(missing_ok=True)
    return removed


# ---------------------------------------------------------------- save
def save_checkpoint(state: dict[str, Any], directory: Path, step: int, *, model: str = "",
                    keep_last: int | None = None,
                    extra: Callable[[Path], None] | None = None) -> Path:
    """Write ``state`` (a trainer's ``state_dict()``) as ``<directory>/step-N`` and point
    ``LATEST`` at it, crash-safely (see the module docstring).

    ``keep_last=k`` then deletes all but the newest k complete checkpoints (a 135M LoRA run
    writes ~6 MB per step, ~700 MB over a 2-hour run otherwise). ``extra(tmp_dir)`` writes more
    files into the checkpoint before it is committed (the trainer writes the LoRA adapter as
    ``adapter/`` in PEFT's format: what other tools and ``lightning-lab export`` read); they are
    fsynced and renamed with the state.
    """
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 (or None to keep all), got {keep_last}")
    directory.mkdir(parents=True, exist_ok=True)
    clean_orphans(directory)
    final = directory / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=directory))
    try:
        torch.save(state, tmp / STATE_FILE)
        _fsync_file(tmp / STATE_FILE)
        if extra is not None:
            extra(tmp)
            for path in tmp.rglob("*"):
                if path.is_file() and path.name != STATE_FILE:
                    _fsync_file(path)
        meta = {"format_version": FORMAT_VERSION, "step": step, "model": model,
                "config": state.get("config"), "credit": state.get("credit"),
                "params": {n: list(t.shape) for n, t in state["params"].items()}}
        _write_text_durably(tmp / META_FILE, json.dumps(meta, indent=1))  # last: marks completeness
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _commit(directory, tmp, final)
    if keep_last is not None:
        _prune(directory, keep_last)
    clean_orphans(directory)  # e.g. the temp dir an interrupted re-save left LATEST naming
    return final


def _commit(directory: Path, tmp: Path, final: Path) -> None:
    """Make the complete ``tmp`` the checkpoint ``final`` and ``LATEST``; each step is atomic
    and leaves ``LATEST`` (or the newest-complete fallback) naming a complete checkpoint."""
    if final.exists():  # re-saving a step: LATEST must not name final while it is replaced
        _point_latest(directory, tmp.name)
        _discard(final)
    os.rename(tmp, final)
    _fsync_dir(directory)
    _point_latest(directory, final.name)


def _prune(directory: Path, keep_last: int) -> None:
    keep = named_by_latest(directory)
    done = sorted((p for p in directory.glob("step-*") if (p / META_FILE).exists()),
                  key=lambda p: p.name)  # zero-padded step numbers sort by name
    for old in done[:-keep_last]:
        if old.name != keep:
            _discard(old)


# ---------------------------------------------------------------- load
TRAINER_KEYS = ("step", "config", "credit", "params", "critic", "optimizer", "rng", "task_queue",
                "history")
"""What a PPO trainer's ``state_dict()`` holds (and resuming needs)."""


# ---------------------------------------------------------------- load
TRAINER_KEYS = ("step", "config", "credit", "params", "critic", "optimizer", "rng", "task_queue",
                "history")
"""What a PPO trainer's ``state_dict()`` holds (and resuming needs)."""


def load_checkpoint(directory: Path, require: Sequence[str] = TRAINER_KEYS
                    ) -> tuple[Path, dict[str, Any]]:
    """``inference.checkpoints.load_checkpoint`` requiring, by default, all a resume needs."""
    return checkpoints.load_checkpoint(directory, require)

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
at a directory another process is still writing. When ``LATEST`` is missing or names nothing,
loading falls back to the newest complete ``step-*`` directory; when the checkpoint found is
unreadable (a truncated ``state.pt``, a broken ``meta.json``: a disk that lost the tail of a
write), to the next older one, with a warning naming the skipped file. Nothing is unpickled:
``state.pt`` holds only tensors and plain Python values, read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..inference.adapters import set_weights

FORMAT_VERSION = 2
"""2: ``state.pt`` is a trainer's ``state_dict()``, readable with ``weights_only=True``."""
_META, _STATE, _LATEST = "meta.json", "state.pt", "LATEST"
_META_KEYS = {"format_version": int, "step": int, "model": str, "config": dict, "credit": dict,
              "params": dict}

__all__ = ["save_checkpoint", "load_checkpoint", "load_policy_weights", "read_policy_weights",
           "latest_checkpoint", "resolve", "clean_orphans", "CheckpointError"]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, half-written or does not fit the current policy/config."""


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
    pointer = directory / f".{_LATEST}.tmp"
    _write_text_durably(pointer, name)
    os.replace(pointer, directory / _LATEST)
    _fsync_dir(directory)


def _discard(path: Path) -> None:
    """Delete a checkpoint directory: first rename it out of the ``step-*`` namespace (atomic),
    so a crash mid-``rmtree`` cannot leave a ``step-N`` that has meta.json but no state."""
    if not path.exists():
        return
    stale = path.with_name(f".{path.name.lstrip('.')}.stale-{uuid.uuid4().hex[:8]}")
    os.rename(path, stale)
    shutil.rmtree(stale, ignore_errors=True)


def _named_by_latest(directory: Path) -> str | None:
    try:
        return (directory / _LATEST).read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def clean_orphans(directory: Path) -> list[str]:
    """Remove temp/stale directories that crashes left behind (never what ``LATEST`` names)."""
    if not directory.is_dir():
        return []
    keep = _named_by_latest(directory)
    removed = []
    for path in directory.iterdir():
        name = path.name
        if name.startswith(".step-") and (".tmp-" in name or ".stale-" in name) and name != keep:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
    (directory / f".{_LATEST}.tmp").unlink(missing_ok=True)
    return removed


def _complete(path: Path) -> bool:
    return (path / _META).is_file() and (path / _STATE).is_file()


def _candidates(directory: Path) -> list[Path]:
    """Complete checkpoints, best first: the one ``LATEST`` names, then every complete
    ``step-*`` directory newest first (``LATEST`` lost or dangling after a crash)."""
    named = _named_by_latest(directory)
    done = sorted((p for p in directory.glob("step-*") if _complete(p)), key=lambda p: p.name,
                  reverse=True)  # zero-padded step numbers sort by name
    if named is not None and "/" not in named and _complete(directory / named):
        return [directory / named] + [p for p in done if p.name != named]
    if named is not None and done:
        warnings.warn(f"{directory}/{_LATEST} names {named!r}, which is not a complete "
                      f"checkpoint; using the newest complete one, {done[0].name}", stacklevel=3)
    return done


def latest_checkpoint(directory: Path) -> Path | None:
    """The checkpoint to resume from (the first of ``_candidates``), or None."""
    found = _candidates(Path(directory))
    return found[0] if found else None


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
        torch.save(state, tmp / _STATE)
        _fsync_file(tmp / _STATE)
        if extra is not None:
            extra(tmp)
            for path in tmp.rglob("*"):
                if path.is_file() and path.name != _STATE:
                    _fsync_file(path)
        meta = {"format_version": FORMAT_VERSION, "step": step, "model": model,
                "config": state.get("config"), "credit": state.get("credit"),
                "params": {n: list(t.shape) for n, t in state["params"].items()}}
        _write_text_durably(tmp / _META, json.dumps(meta, indent=1))  # last: marks completeness
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
    keep = _named_by_latest(directory)
    done = sorted((p for p in directory.glob("step-*") if (p / _META).exists()),
                  key=lambda p: p.name)  # zero-padded step numbers sort by name
    for old in done[:-keep_last]:
        if old.name != keep:
            _discard(old)


# ---------------------------------------------------------------- load
def resolve(directory: Path) -> Path:
    """The checkpoint a path names: itself if it holds one, else ``latest_checkpoint``'s."""
    directory = Path(directory)
    if (directory / _META).exists() or (directory / _STATE).exists():
        return directory
    found = latest_checkpoint(directory)
    if found is None:
        raise _nothing_in(directory)
    return found


def _nothing_in(directory: Path) -> CheckpointError:
    return CheckpointError(f"no complete checkpoint in {directory}: no step-*/{_META} "
                           "(missing, or half-written by a crash)")


TRAINER_KEYS = ("step", "config", "credit", "params", "critic", "optimizer", "rng", "task_queue",
                "history")
"""What a PPO trainer's ``state_dict()`` holds (and resuming needs)."""


def load_checkpoint(directory: Path, require: Sequence[str] = TRAINER_KEYS
                    ) -> tuple[Path, dict[str, Any]]:
    """The checkpoint ``directory`` names and its state dict, loaded without unpickling code
    (``weights_only=True``: tensors and plain containers only). Every error names the file.
    ``require``: the keys the caller needs (weights alone, as an SFT checkpoint holds, need
    only ``params``).

    A directory of checkpoints yields its newest intact one: an unreadable newest checkpoint is
    skipped with a warning naming the file and why (the older step loses a few steps of work;
    refusing to start would lose the run)."""
    directory = Path(directory)
    if (directory / _META).exists() or (directory / _STATE).exists():
        return directory, _read(directory, require)
    candidates = _candidates(directory)
    if not candidates:
        raise _nothing_in(directory)
    problems: list[CheckpointError] = []
    for path, older in zip(candidates, candidates[1:] + [None]):
        try:
            return path, _read(path, require)
        except CheckpointError as exc:
            problems.append(exc)
            if older is not None:
                warnings.warn(f"skipping a broken checkpoint: {exc}; using the older "
                              f"{older.name}", stacklevel=2)
    if len(problems) == 1:
        raise problems[0]
    raise CheckpointError(f"no intact checkpoint in {directory}: "
                          + "; ".join(str(p) for p in problems))


def _read(path: Path, require: Sequence[str]) -> dict[str, Any]:
    """``path``'s checked ``meta.json`` and its state dict; each error names the file."""
    try:
        meta = json.loads((path / _META).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{path / _META}: unreadable or half-written: {exc}") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path / _META}: expected a JSON object")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path / _META}: checkpoint format {meta.get('format_version')!r}, "
                              f"this version reads {FORMAT_VERSION} (format 1 stored pickled "
                              "state, which is never loaded)")
    for key, kind in _META_KEYS.items():
        if not isinstance(meta.get(key), kind):
            raise CheckpointError(f"{path / _META}: field {key!r} missing or not a "
                                  f"{kind.__name__}")
    try:
        state = torch.load(path / _STATE, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - OSError, EOFError, pickle.UnpicklingError, ...
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        raise CheckpointError(f"{path / _STATE}: unreadable, half-written or not a weights-only "
                              f"file (nothing is unpickled): {type(exc).__name__}: "
                              f"{first_line}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path / _STATE}: not a trainer state dict")
    missing = [k for k in require if k not in state]
    if missing:
        raise CheckpointError(f"{path / _STATE}: lacks {missing}")
    return state


def read_policy_weights(policy: Any, directory: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A checkpoint's trained weights, checked to fit ``policy``'s trainable parameters."""
    path, state = load_checkpoint(Path(directory), require=("params",))
    params = {n: p for n, p in policy.model.named_parameters() if p.requires_grad}
    saved = state["params"]
    if not (isinstance(saved, dict) and all(isinstance(t, torch.Tensor) for t in saved.values())):
        raise CheckpointError(f"{path / _STATE}: 'params' is not a mapping of names to tensors")
    mismatch = sorted(set(params) ^ set(saved)) or [n for n in params if params[n].shape != saved[n].shape]
    if mismatch:
        raise CheckpointError(f"checkpoint {path} does not fit this policy; e.g. {mismatch[:3]}")
    return path, {n: saved[n] for n in params}


def load_policy_weights(policy: Any, directory: Path) -> Path:
    """Load only the trained weights of a checkpoint into ``policy`` (for evaluation/serving)."""
    path, weights = read_policy_weights(policy, directory)
    set_weights(policy.model, weights)
    return path

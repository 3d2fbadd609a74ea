"""Reading trainer checkpoints: the on-disk format both training and serving load weights from.

A checkpoint is ``<dir>/step-000012/`` holding ``state.pt`` (a trainer's ``state_dict()``:
tensors and plain Python values only) and ``meta.json`` (written last: it marks completeness),
with a ``LATEST`` file naming the newest. Writing (crash-safe, fsynced, pruned) is the trainer's
business and lives in ``train/checkpoint.py``; reading lives here, below both the trainer and
the proxy, so ``lightning-lab serve --checkpoint`` and ``POST /v1/load_lora_adapter`` load
weights without importing the training stack.

Nothing is unpickled: ``state.pt`` is read with ``torch.load(weights_only=True)``. When
``LATEST`` is missing or names nothing, loading falls back to the newest complete ``step-*``
directory; when the checkpoint found is unreadable (a truncated ``state.pt``, a broken
``meta.json``: a disk that lost the tail of a write), to the next older one, with a warning
naming the skipped file. A reader never deletes anything: another process may still be writing.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

from .adapters import set_weights

FORMAT_VERSION = 2
"""2: ``state.pt`` is a trainer's ``state_dict()``, readable with ``weights_only=True``."""
META_FILE, STATE_FILE, LATEST_FILE = "meta.json", "state.pt", "LATEST"
_META_KEYS = {"format_version": int, "step": int, "model": str, "config": dict, "credit": dict,
              "params": dict}

__all__ = ["CheckpointError", "FORMAT_VERSION", "META_FILE", "STATE_FILE", "LATEST_FILE",
           "named_by_latest", "latest_checkpoint", "resolve", "load_checkpoint",
           "read_policy_weights", "load_policy_weights"]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, half-written or does not fit the current policy/config."""


def named_by_latest(directory: Path) -> str | None:
    """The checkpoint name ``LATEST`` holds, or None when it is missing or unreadable."""
    try:
        return (directory / LATEST_FILE).read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def _complete(path: Path) -> bool:
    return (path / META_FILE).is_file() and (path / STATE_FILE).is_file()


def _candidates(directory: Path) -> list[Path]:
    """Complete checkpoints, best first: the one ``LATEST`` names, then every complete
    ``step-*`` directory newest first (``LATEST`` lost or dangling after a crash)."""
    named = named_by_latest(directory)
    done = sorted((p for p in directory.glob("step-*") if _complete(p)), key=lambda p: p.name,
                  reverse=True)  # zero-padded step numbers sort by name
    if named is not None and "/" not in named and _complete(directory / named):
        return [directory / named] + [p for p in done if p.name != named]
    if named is not None and done:
        warnings.warn(f"{directory}/{LATEST_FILE} names {named!r}, which is not a complete "
                      f"checkpoint; using the newest complete one, {done[0].name}", stacklevel=3)
    return done


def latest_checkpoint(directory: Path) -> Path | None:
    """The checkpoint to resume from (the first of ``_candidates``), or None."""
    found = _candidates(Path(directory))
    return found[0] if found else None


def resolve(directory: Path) -> Path:
    """The checkpoint a path names: itself if it holds one, else ``latest_checkpoint``'s."""
    directory = Path(directory)
    if (directory / META_FILE).exists() or (directory / STATE_FILE).exists():
        return directory
    found = latest_checkpoint(directory)
    if found is None:
        raise _nothing_in(directory)
    return found


def _nothing_in(directory: Path) -> CheckpointError:
    return CheckpointError(f"no complete checkpoint in {directory}: no step-*/{META_FILE} "
                           "(missing, or half-written by a crash)")


def load_checkpoint(directory: Path, require: Sequence[str]) -> tuple[Path, dict[str, Any]]:
    """The checkpoint ``directory`` names and its state dict, loaded without unpickling code
    (``weights_only=True``: tensors and plain containers only). Every error names the file.
    ``require``: the keys the caller needs (weights alone, as an SFT checkpoint holds, need
    only ``params``).

    A directory of checkpoints yields its newest intact one: an unreadable newest checkpoint is
    skipped with a warning naming the file and why (the older step loses a few steps of work;
    refusing to start would lose the run)."""
    directory = Path(directory)
    if (directory / META_FILE).exists() or (directory / STATE_FILE).exists():
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
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{path / META_FILE}: unreadable or half-written: {exc}") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path / META_FILE}: expected a JSON object")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path / META_FILE}: checkpoint format {meta.get('format_version')!r}, "
                              f"this version reads {FORMAT_VERSION} (format 1 stored pickled "
                              "state, which is never loaded)")
    for key, kind in _META_KEYS.items():
        if not isinstance(meta.get(key), kind):
            raise CheckpointError(f"{path / META_FILE}: field {key!r} missing or not a "
                                  f"{kind.__name__}")
    try:
        state = torch.load(path / STATE_FILE, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - OSError, EOFError, pickle.UnpicklingError, ...
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        raise CheckpointError(f"{path / STATE_FILE}: unreadable, half-written or not a weights-only "
                              f"file (nothing is unpickled): {type(exc).__name__}: "
                              f"{first_line}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path / STATE_FILE}: not a trainer state dict")
    missing = [k for k in require if k not in state]
    if missing:
        raise CheckpointError(f"{path / STATE_FILE}: lacks {missing}")
    return state


def read_policy_weights(policy: Any, directory: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A checkpoint's trained weights, checked to fit ``policy``'s trainable parameters."""
    path, state = load_checkpoint(Path(directory), require=("params",))
    params = {n: p for n, p in policy.model.named_parameters() if p.requires_grad}
    saved = state["params"]
    if not (isinstance(saved, dict) and all(isinstance(t, torch.Tensor) for t in saved.values())):
        raise CheckpointError(f"{path / STATE_FILE}: 'params' is not a mapping of names to tensors")
    mismatch = sorted(set(params) ^ set(saved)) or [n for n in params if params[n].shape != saved[n].shape]
    if mismatch:
        raise CheckpointError(f"checkpoint {path} does not fit this policy; e.g. {mismatch[:3]}")
    return path, {n: saved[n] for n in params}


def load_policy_weights(policy: Any, directory: Path) -> Path:
    """Load only the trained weights of a checkpoint into ``policy`` (for evaluation/serving)."""
    path, weights = read_policy_weights(policy, directory)
    set_weights(policy.model, weights)
    return path

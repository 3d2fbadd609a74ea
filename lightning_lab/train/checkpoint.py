"""Atomic trainer checkpoints: ``<dir>/step-000012/`` plus a ``LATEST`` pointer.

A checkpoint is written into a temporary sibling directory and renamed into place only when
complete; then ``LATEST`` is replaced atomically (``os.replace``). A crash at any point leaves the
previous checkpoint and pointer untouched, and a half-written directory is never pointed to.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

FORMAT_VERSION = 1
_META, _STATE, _LATEST = "meta.json", "state.pt", "LATEST"

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError"]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, half-written or does not fit the current policy/config."""


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(trainer: Any, directory: Path, keep_last: int | None = None) -> Path:
    """Write ``<directory>/step-N`` atomically and point ``LATEST`` at it.

    ``keep_last=k`` then deletes all but the newest k complete checkpoints (a 135M LoRA run
    writes ~6 MB per step, ~700 MB over a 2-hour run otherwise); pruning runs only after the
    new checkpoint and pointer are in place, so a crash while pruning loses nothing needed.
    """
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 (or None to keep all), got {keep_last}")
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{trainer.step_count:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=directory))
    try:
        params = _trainable(trainer.policy.model)
        torch.save({
            "params": {n: p.detach().cpu() for n, p in params.items()},
            "critic": trainer.critic.state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "numpy": np.random.get_state(), "tasks": trainer._task_rng.getstate(),
                    "task_queue": list(trainer._task_queue)},
            "history": trainer.history,
        }, tmp / _STATE)
        meta = {
            "format_version": FORMAT_VERSION,
            "step": trainer.step_count,
            "model": getattr(trainer.policy, "name", ""),
            "config": dataclasses.asdict(trainer.config),
            "credit": {"name": trainer.credit.name, "params": trainer.credit.params()},
            "params": {n: list(p.shape) for n, p in params.items()},
        }
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


def load_checkpoint(cls: type, directory: Path, policy: Any, agent: Callable[[Any], Any],
                    tasks: Sequence[Any], credit: Any, callbacks: Sequence[Any]) -> Any:
    from .. import credit as credit_lib
    from .trainer import PPOConfig

    path = resolve(directory)
    try:
        meta = json.loads((path / _META).read_text())
        state = torch.load(path / _STATE, weights_only=False)
    except (OSError, ValueError, RuntimeError, EOFError) as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable or half-written: {exc}") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format {meta.get('format_version')}, "
                              f"this version reads {FORMAT_VERSION}")
    config = PPOConfig(**meta["config"])
    if credit is None:
        credit = credit_lib.get(meta["credit"]["name"], **meta["credit"]["params"])
    trainer = cls(policy, agent, tasks, credit=credit, config=config, callbacks=callbacks)
    params = _trainable(policy.model)
    expected = {n: list(p.shape) for n, p in params.items()}
    if expected != meta["params"]:
        missing = sorted(set(meta["params"]) ^ set(expected))[:3]
        shapes = [n for n in expected if n in meta["params"] and expected[n] != meta["params"][n]][:3]
        raise CheckpointError(
            f"checkpoint {path} does not fit this policy (saved from model {meta['model']!r}): "
            f"parameters only on one side {missing}, shape mismatches {shapes}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state["params"][name])
    trainer.critic.load_state_dict(state["critic"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    trainer._task_rng.setstate(rng["tasks"])
    trainer._task_queue = list(rng["task_queue"])
    trainer.step_count = meta["step"]
    trainer.history = list(state["history"])
    return trainer


def load_policy_weights(policy: Any, directory: Path) -> Path:
    """Load only the trained weights of a checkpoint into ``policy`` (for evaluation/serving)."""
    path = resolve(directory)
    try:
        state = torch.load(path / _STATE, weights_only=False)
    except (OSError, RuntimeError, EOFError) as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable or half-written: {exc}") from exc
    params = _trainable(policy.model)
    missing = sorted(set(params) ^ set(state["params"]))
    if missing:
        raise CheckpointError(f"checkpoint {path} does not fit this policy; e.g. {missing[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state["params"][name])
    return path

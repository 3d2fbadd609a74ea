"""Environment registry: tasks, an agent factory and a metrics summary, found by name.

Environments live in the top-level ``environments/`` package and register themselves on import;
``get(name)`` imports ``environments.<name>`` on a miss, so adding an environment is one new folder
and no change here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from .records import Batch

__all__ = ["Environment", "register", "get", "names", "task_id_of"]


@dataclass(frozen=True)
class Environment:
    name: str
    load_tasks: Callable[..., list[Any]]
    """(split="train"|"dev", data=None|path, seed=0, limit=None) -> tasks with a ``task_id``."""
    make_agent: Callable[..., Callable[[Any], Any]]
    """(policy, **options) -> agent(task); the agent runs inside ``ll.rollout``."""
    summarize: Callable[[Batch], dict[str, float]]
    """Evaluation metrics of a finished batch, e.g. {"exec_acc": 0.12}."""
    description: str = ""
    demonstrations: Callable[..., list[Any]] | None = None
    """(tasks, **agent_options) -> ``ll.train.sft.Demonstration``s: each task's reference answer
    written as the agent's own call (its prompt, prefill and stop), for supervised warm starts.
    None when the environment has no reference answers in that form."""


_REGISTRY: dict[str, Environment] = {}


def register(env: Environment) -> Environment:
    _REGISTRY[env.name] = env
    return env


def get(name: str) -> Environment:
    if name not in _REGISTRY:
        try:
            importlib.import_module(f"environments.{name}")
        except ModuleNotFoundError as exc:
            if exc.name not in (f"environments.{name}", "environments"):
                raise
    if name not in _REGISTRY:
        raise KeyError(f"unknown environment {name!r}; known: {', '.join(names()) or 'none'}")
    return _REGISTRY[name]


def names() -> list[str]:
    """Registered names plus the folders under ``environments/`` (importable on demand)."""
    found = set(_REGISTRY)
    try:
        import environments

        for path in environments.__path__:
            from pathlib import Path

            found.update(p.name for p in Path(path).iterdir()
                         if (p / "__init__.py").exists() and not p.name.startswith("_"))
    except ImportError:
        pass
    return sorted(found)


def task_id_of(task: Any, index: int = 0) -> str:
    """A task's id: its ``task_id`` attribute or key, else its position."""
    if isinstance(task, dict):
        return str(task.get("task_id", index))
    return str(getattr(task, "task_id", index))

"""Your own agent from the command line: ``--agent module:function`` or ``--agent-cmd "..."``,
with tasks from a JSONL file (``--tasks``), standing in for an environment.

Task file: one JSON object per line (blank lines skipped). ``task_id`` (any JSON scalar) names the
task, else its line number does; the whole object is what the agent receives, so any other keys
(question, expected answer, ...) are yours. The agent rewards itself (``ll.reward`` in Python,
``LL_REWARD_URL`` or a printed ``{"reward": x}`` line for process agents).

An ``--agent`` function is called as ``fn(task, **agent_options)``; parameters named ``policy``
and ``base_url`` are filled with the in-process policy and the rollout's traced OpenAI base URL
(a proxy is started for it). ``async def`` functions are awaited. An ``--agent-cmd`` starts the
command per rollout (see ``rollouts/process.py`` for its environment variables).

Layering: this is part of the run pipeline (``run.load_env`` builds it from ``RunConfig``), and it
needs both ``rollouts`` (process agents) and ``proxy`` (a base URL for HTTP agents), so it lives
in ``train/``, above both; ``rollouts`` never imports the proxy.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import sys
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError
from ..proxy import http_agent, serve
from ..records import Batch
from ..rollouts.process import process_agent

__all__ = ["UserAgents", "load_callable", "load_task_file"]


def load_callable(spec: str) -> Callable[..., Any]:
    """``module:attribute`` (dots allowed in both) as a callable; ConfigError naming what failed."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(f"--agent expects module:function, got {spec!r}")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:  # `python -m` semantics: cwd first
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"--agent {spec}: cannot import module {module_name!r}: {exc}") from exc
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"--agent {spec}: module {module_name!r} has no attribute "
                              f"{attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"--agent {spec}: {module_name}.{attribute} is a "
                          f"{type(target).__name__}, not callable")
    return target


def load_task_file(path: str | Path) -> list[dict[str, Any]]:
    """The tasks of a JSONL file; any bad line is a ConfigError naming ``file:line``."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--tasks: cannot read {path}: {exc}") from exc
    tasks = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            task = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise ConfigError(f"{path}:{number}: not JSON: {exc}") from exc
        if not isinstance(task, dict):
            raise ConfigError(f"{path}:{number}: a task must be a JSON object, got "
                              f"{type(task).__name__}")
        if isinstance(task.get("task_id"), (dict, list)):
            raise ConfigError(f"{path}:{number}: task_id must be a string or number")
        task["task_id"] = str(task.get("task_id", f"line{number}"))
        tasks.append(task)
    if not tasks:
        raise ConfigError(f"--tasks: {path} has no tasks")
    return tasks


class UserAgents:
    """An environment made of a task file and a user agent (duck-types ``envs.Environment``)."""

    def __init__(self, agent: str | None, agent_cmd: str | None, tasks: str | None,
                 max_tokens_cap: int | None = None):
        if bool(agent) == bool(agent_cmd):
            raise ConfigError("give one of --agent module:function or --agent-cmd COMMAND")
        if not tasks:
            raise ConfigError(f"{'--agent' if agent else '--agent-cmd'} needs --tasks FILE.jsonl")
        self.fn = load_callable(agent) if agent else None  # fail before loading a model
        self.command, self.task_file, self.max_tokens_cap = agent_cmd, tasks, max_tokens_cap
        self.name = agent or agent_cmd
        self.server: Any = None

    def load_tasks(self, split: str = "train", data: Any = None, seed: int = 0,
                   limit: int | None = None, **options: Any) -> list[dict[str, Any]]:
        """The same file for training and evaluation (``split`` does not apply)."""
        if options:
            raise ConfigError(f"--task-option does not apply to a task file: {sorted(options)}")
        return load_task_file(self.task_file)[:limit]

    def _serve(self, policy: Any) -> Any:
        if self.server is None:
            self.server = serve(policy, max_tokens_cap=self.max_tokens_cap)
        return self.server

    def make_agent(self, policy: Any, **options: Any) -> Callable[[Any], Any]:
        if self.fn is None:
            if options:
                raise ConfigError(f"--agent-option does not apply to --agent-cmd: {sorted(options)}")
            return process_agent(self._serve(policy), self.command)
        params = _parameters(self.fn)
        try:
            inspect.signature(self.fn).bind_partial(None, **options)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"--agent-option {sorted(options)}: {exc}") from exc
        if "policy" in params:
            options["policy"] = policy
        fn = functools.partial(self.fn, **options) if options else self.fn
        if "base_url" in params:
            return http_agent(self._serve(policy), fn)
        return fn

    @staticmethod
    def summarize(batch: Batch) -> dict[str, float]:
        return {}

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


def _parameters(fn: Callable[..., Any]) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # builtins without a signature
        return set()

"""Agents in other processes (any language): one child process per rollout, traced over HTTP.

The child gets the rollout's traced OpenAI endpoint and its task through the environment, so an
unchanged OpenAI-SDK program (Python in another virtualenv, Node.js, curl in bash, ...) is trained
as is. The runner records how it ended and turns every way of going wrong into a failed
trajectory with a reason, never a crash of the step:

=====================  =====================================================================
variable               value
=====================  =====================================================================
``OPENAI_BASE_URL``    the rollout's traced base URL (``.../rollout/<id>/v1``)
``OPENAI_API_KEY``     the server's API key (``lightning-lab`` when it needs none)
``LL_MODEL``           the served model name, for the request's ``model``
``LL_TASK``            the task as JSON (also written to the child's stdin)
``LL_TASK_ID``         the task's id
``LL_ROLLOUT_ID``      the rollout id
``LL_REWARD_URL``      POST ``{"reward": x, "final": true}`` here to reward the rollout
=====================  =====================================================================

A last stdout line that is a JSON object with a ``reward`` is applied as the final reward (for
scripts that would rather print than POST). Reasons: ``exit_code`` (non-zero exit, with the
stderr tail), ``timeout`` (past ``timeout_s`` or the runner's rollout timeout; the whole process
group is killed), ``no_llm_calls`` (exited 0 without calling the model), ``spawn`` (could not
start).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import subprocess
import tempfile
import time
from typing import Any, Callable, Sequence

from .. import tracing
from ..envs import task_id_of

__all__ = ["ProcessAgentError", "process_agent", "task_json"]

TAIL_CHARS = 2000
"""How much of the child's stdout/stderr end is kept in the trajectory's meta."""


class ProcessAgentError(RuntimeError):
    """A process agent failed; the trajectory's ``meta["reason"]`` says how."""


def task_json(task: Any) -> str:
    """A task as JSON: dicts as they are, dataclasses as their fields, anything else via ``str``."""
    if dataclasses.is_dataclass(task) and not isinstance(task, type):
        task = dataclasses.asdict(task)
    return json.dumps(task, default=str)


def _tail(file: Any) -> str:
    file.seek(0, os.SEEK_END)
    size = file.tell()
    file.seek(max(0, size - 4 * TAIL_CHARS))
    return file.read().decode("utf-8", "replace")[-TAIL_CHARS:]


def _kill_group(process: subprocess.Popen) -> None:
    """Kill the child and everything it started (it leads its own session)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _fail(reason: str, message: str) -> None:
    tracing.current().meta["reason"] = reason
    raise ProcessAgentError(message)


def process_agent(server: Any, command: str | Sequence[str], *, env: dict[str, str] | None = None,
                  cwd: str | None = None, timeout_s: float | None = None,
                  max_tokens: int | None = None) -> Callable[[Any], None]:
    """An ``agent(task)`` that runs ``command`` once per rollout against ``server`` (``ll.serve``).

    ``command`` is an argv list or a shell-like string (split with ``shlex``, no shell). ``env``
    adds variables; ``timeout_s`` bounds each run (the trainer's ``rollout_timeout_s`` applies
    too, whichever is first); ``max_tokens`` is the rollout's default generation budget.
    """
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    if not argv:
        raise ValueError("process_agent needs a command")
    api_key = server.config.api_key or "lightning-lab"

    def agent(task: Any) -> None:
        payload = task_json(task)
        with server.rollout(max_tokens=max_tokens) as handle, \
                tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            child_env = {**os.environ, **(env or {}),
                         "OPENAI_BASE_URL": handle.base_url, "OPENAI_API_KEY": api_key,
                         "LL_MODEL": server.backend.name, "LL_TASK": payload,
                         "LL_TASK_ID": task_id_of(task), "LL_ROLLOUT_ID": handle.rollout_id,
                         "LL_REWARD_URL": handle.reward_url}
            start = time.monotonic()
            try:
                process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out, stderr=err,
                                           env=child_env, cwd=cwd, start_new_session=True)
            except OSError as exc:
                _fail("spawn", f"could not start {argv[0]!r}: {exc}")
            control = tracing.current_control()
            unregister = control.on_cancel(lambda: _kill_group(process)) if control else None
            try:
                try:
                    process.communicate(payload.encode(), timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    _kill_group(process)
                    process.wait()
                    _fail("timeout", f"{argv[0]} ran past timeout_s={timeout_s:g}")
            finally:
                if unregister is not None:
                    unregister()
                _kill_group(process)  # children it left behind
                meta = tracing.current().meta
                meta["process"] = {"command": argv, "exit_code": process.returncode,
                                   "seconds": round(time.monotonic() - start, 3),
                                   "stdout_tail": _tail(out), "stderr_tail": _tail(err)}
            if control is not None and control.cancelled:
                return  # the runner already reported the timeout
            if process.returncode != 0:
                stderr = meta["process"]["stderr_tail"].strip()[-500:]
                _fail("exit_code", f"{argv[0]} exited with code {process.returncode}"
                                   + (f": {stderr}" if stderr else ""))
            _reward_from_stdout(meta["process"]["stdout_tail"], handle)
            if not handle.trajectory.transitions:
                _fail("no_llm_calls", f"{argv[0]} exited 0 without calling the LLM at "
                                      "OPENAI_BASE_URL")

    agent.__name__ = f"process_agent({argv[0]})"
    return agent


def _reward_from_stdout(stdout: str, handle: Any) -> None:
    """Apply ``{"reward": x}`` printed as the last line; other output is the agent's business."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        return
    try:
        last = json.loads(lines[-1])
    except ValueError:
        return
    if isinstance(last, dict) and "reward" in last:
        try:
            handle.reward(last["reward"], final=True)
        except (ValueError, tracing.TracingError) as exc:
            _fail("bad_reward", f"the printed reward is not usable: {exc}")

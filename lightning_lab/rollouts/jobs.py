"""What both rollout runners share: the job list, async-agent detection, the timeout record."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Sequence

from ..envs import task_id_of
from ..records import Trajectory
from ..tracing import RolloutControl, derive_seed

__all__ = ["jobs_of", "is_async_agent", "returned_awaitable", "timed_out"]


def is_async_agent(agent: Any) -> bool:
    """``async def`` functions, partials of them, and objects with an ``async def __call__``."""
    return inspect.iscoroutinefunction(agent) or inspect.iscoroutinefunction(
        getattr(agent, "__call__", None))


def returned_awaitable(result: Any) -> None:
    """A blocking agent that returns a coroutine never ran: fail loudly instead of tracing nothing."""
    if inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()  # no "never awaited" warning on top of the error
        raise TypeError("the agent returned an awaitable instead of running: define it with "
                        "`async def` so the runner awaits it (or await inside the agent)")


def timed_out(control: RolloutControl, task_id: str, group_id: str, timeout_s: float) -> Trajectory:
    """The failed trajectory of a rollout past its deadline: what it had recorded until then."""
    control.cancel("timeout")
    traj = control.trajectory or Trajectory(task_id=task_id, group_id=group_id)
    snapshot = dataclasses.replace(traj, transitions=list(traj.transitions), meta=dict(traj.meta))
    snapshot.status = "failed"
    snapshot.error = f"timeout: the rollout ran past rollout_timeout_s={timeout_s:g}"
    snapshot.meta["reason"] = "timeout"
    return snapshot


def jobs_of(tasks: Sequence[Any], group_size: int, group_prefix: str,
            seed: int | None = None) -> list[tuple[Any, str, str, int | None]]:
    """``(task, task_id, group_id, rollout seed)``, task-major; the k-th rollout's seed is
    ``derive_seed(seed, k)``, so its samples do not depend on scheduling."""
    jobs = []
    for i, task in enumerate(tasks):
        tid = task_id_of(task, i)
        for _ in range(group_size):
            k = len(jobs)
            jobs.append((task, tid, f"{group_prefix}{i}:{tid}",
                         None if seed is None else derive_seed(seed, k)))
    return jobs

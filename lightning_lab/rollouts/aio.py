"""``async def`` agents: every rollout is a task on one event loop, awaited, with a deadline.

Each task gets its own copy of the context, so tracing's contextvars keep rollouts apart exactly
as threads do; ``policy.achat`` and the async OpenAI client then wait without holding a thread,
so hundreds of agents cost one thread. A timed-out task is cancelled: its pending engine requests
are aborted (``Policy.agenerate``) and its control closes whatever else it registered.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Callable, Sequence

from ..records import Batch, Trajectory
from ..tracing import RolloutControl, rollout
from .jobs import jobs_of, timed_out

__all__ = ["arun_rollouts", "run_async_in_thread"]

CANCEL_GRACE_S = 1.0
"""How long a cancelled agent may take to unwind before the runner stops waiting for it."""


async def arun_rollouts(agent: Callable[[Any], Any], tasks: Sequence[Any], *, group_size: int = 1,
                        temperature: float | None = None, max_workers: int = 32,
                        group_prefix: str = "", seed: int | None = None,
                        timeout_s: float | None = None) -> Batch:
    """``run_rollouts`` for code already inside an event loop (``await`` it)."""
    jobs = jobs_of(tasks, group_size, group_prefix, seed)
    return Batch(await _run_jobs(agent, jobs, temperature, max_workers, timeout_s))


def run_async_in_thread(agent: Callable[[Any], Any], jobs: list[tuple[Any, str, str, int | None]],
                        temperature: float | None, max_workers: int,
                        timeout_s: float | None) -> Batch:
    """Run the jobs on a fresh event loop in a helper thread (the caller may own a running loop)."""
    out: dict[str, Any] = {}

    def main() -> None:
        try:
            out["batch"] = asyncio.run(_run_jobs(agent, jobs, temperature, max_workers, timeout_s))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            out["error"] = exc

    thread = threading.Thread(target=main, name="ll-async-agents", daemon=True)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return Batch(out["batch"])


async def _run_jobs(agent: Callable[[Any], Any], jobs: list[tuple[Any, str, str, int | None]],
                    temperature: float | None, max_workers: int,
                    timeout_s: float | None) -> list[Trajectory]:
    slots = asyncio.Semaphore(max(1, max_workers))

    async def one(task: Any, tid: str, gid: str, seed: int | None) -> Trajectory:
        async with slots:
            return await _run_one(agent, task, tid, gid, seed, temperature, timeout_s)

    return list(await asyncio.gather(*(one(*job) for job in jobs)))


async def _run_one(agent: Callable[[Any], Any], task: Any, tid: str, gid: str, seed: int | None,
                   temperature: float | None, timeout_s: float | None) -> Trajectory:
    control = RolloutControl()

    async def body() -> Trajectory:
        with rollout(task_id=tid, group_id=gid, temperature=temperature, catch=True, seed=seed,
                     control=control) as traj:
            result = agent(task)
            if not asyncio.iscoroutine(result) and not asyncio.isfuture(result):
                raise TypeError(f"async agent returned {type(result).__name__}, not an awaitable")
            await result
        return traj

    running = asyncio.ensure_future(body())  # its own task: a copy of the context, as a thread
    done, _ = await asyncio.wait({running}, timeout=timeout_s)
    if running in done:
        error = "CancelledError: the agent's task was cancelled" if running.cancelled() \
            else running.exception()
        if error is None:
            return running.result()
        traj = control.trajectory or Trajectory(task_id=tid, group_id=gid)  # e.g. SystemExit
        traj.status, traj.error = "failed", error if isinstance(error, str) else \
            f"{type(error).__name__}: {error}"
        traj.meta["reason"] = "exception"
        return traj
    snapshot = timed_out(control, tid, gid, timeout_s or 0.0)
    running.cancel()
    await asyncio.wait({running}, timeout=CANCEL_GRACE_S)
    return snapshot

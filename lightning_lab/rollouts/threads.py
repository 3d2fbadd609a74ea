"""Run an agent over tasks concurrently, each run inside its own traced rollout.

Plain agents are blocking Python, so each rollout runs in its own thread and their LLM calls meet in
the policy's batching engine; ``async def`` agents run as tasks on one event loop instead
(``aio.py``). Either way a rollout may have a deadline: past it, the rollout is reported as failed
with reason ``timeout``, its in-flight LLM requests are aborted, and the rest of the batch goes on.
A thread cannot be killed, so a timed-out blocking agent is left behind (its later LLM calls raise
``RolloutCancelled``) and the runner returns a snapshot of its trajectory taken at the deadline.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable, Sequence

from ..records import Batch, Trajectory
from ..tracing import RolloutControl, rollout
from .aio import run_async_in_thread
from .jobs import is_async_agent, jobs_of, returned_awaitable, timed_out

__all__ = ["run_rollouts", "is_async_agent"]


def run_rollouts(agent: Callable[[Any], Any], tasks: Sequence[Any], *, group_size: int = 1,
                 temperature: float | None = None, max_workers: int = 32,
                 group_prefix: str = "", seed: int | None = None,
                 timeout_s: float | None = None) -> Batch:
    """Run ``agent`` ``group_size`` times per task; whatever an agent raises (``sys.exit()``
    included) becomes a ``failed`` trajectory; only the user's Ctrl-C stops the batch.

    ``async def`` agents are awaited on an event loop (in a helper thread, so this also works inside
    Jupyter's running loop); others run in up to ``max_workers`` threads. ``timeout_s`` bounds each
    rollout from its start. Order of the returned trajectories is deterministic (task-major, then
    sample), whatever order they finished in. With ``seed``, the k-th rollout is opened with
    ``derive_seed(seed, k)``, so its samples do not depend on thread scheduling either.
    """
    if timeout_s is not None and timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    jobs = jobs_of(tasks, group_size, group_prefix, seed)
    if is_async_agent(agent):
        return run_async_in_thread(agent, jobs, temperature, max_workers, timeout_s)
    if timeout_s is None and min(max_workers, len(jobs)) <= 1:  # inline: Ctrl-C reaches it
        return Batch([_run_inline(agent, *job, temperature) for job in jobs])
    return Batch(_supervise(agent, jobs, temperature, max(1, min(max_workers, len(jobs))),
                            timeout_s))


def _run_inline(agent: Callable[[Any], Any], task: Any, tid: str, gid: str, seed: int | None,
                temperature: float | None) -> Trajectory:
    with rollout(task_id=tid, group_id=gid, temperature=temperature, catch=True,
                 seed=seed) as traj:
        returned_awaitable(agent(task))
    return traj


def _supervise(agent: Callable[[Any], Any], jobs: list[tuple[Any, str, str, int | None]],
               temperature: float | None, workers: int, timeout_s: float | None
               ) -> list[Trajectory]:
    """Start up to ``workers`` rollout threads at a time; collect them, or time them out."""
    results: list[Trajectory | None] = [None] * len(jobs)
    finished: queue.SimpleQueue[int] = queue.SimpleQueue()
    running: dict[int, tuple[RolloutControl, float]] = {}
    next_job = 0

    def body(index: int, control: RolloutControl) -> None:
        task, tid, gid, seed = jobs[index]
        try:
            with rollout(task_id=tid, group_id=gid, temperature=temperature, catch=True,
                         seed=seed, control=control) as traj:
                returned_awaitable(agent(task))
        except BaseException as exc:  # noqa: BLE001 - what ll.rollout re-raises (cancellation)
            traj = control.trajectory or Trajectory(task_id=tid, group_id=gid)
            traj.status, traj.error = "failed", f"{type(exc).__name__}: {exc}"
            traj.meta["reason"] = "exception"
        finally:
            if not control.cancelled:
                results[index] = traj
            finished.put(index)

    while next_job < len(jobs) or running:
        while next_job < len(jobs) and len(running) < workers:
            control = RolloutControl()
            running[next_job] = (control, time.monotonic())
            # daemon: a hung agent must not keep the interpreter alive after the step gave up on it
            threading.Thread(target=body, args=(next_job, control), daemon=True,
                             name=f"ll-agent-{next_job}").start()
            next_job += 1
        wait = None
        if timeout_s is not None:
            wait = max(0.0, min(start for _, start in running.values()) + timeout_s - time.monotonic())
        try:
            index = finished.get(timeout=wait)
            running.pop(index, None)
        except queue.Empty:
            now = time.monotonic()
            for index, (control, start) in list(running.items()):
                if now - start >= timeout_s:
                    task, tid, gid, _ = jobs[index]
                    results[index] = timed_out(control, tid, gid, timeout_s)
                    del running[index]
    return [r for r in results if r is not None]

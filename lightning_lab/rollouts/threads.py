"""Run an agent over tasks concurrently, each run inside its own traced rollout.

Agents are ordinary blocking Python; running them in threads lets their LLM calls meet in the
policy's batching engine, so many sequential multi-step agents still decode in large batches.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

from ..envs import task_id_of
from ..records import Batch, Trajectory
from ..tracing import derive_seed, rollout

__all__ = ["run_rollouts"]


def _run_one(agent: Callable[[Any], Any], task: Any, task_id: str, group_id: str,
             temperature: float | None, seed: int | None = None) -> Trajectory:
    with rollout(task_id=task_id, group_id=group_id, temperature=temperature, catch=True,
                 seed=seed) as traj:
        agent(task)
    return traj


def run_rollouts(agent: Callable[[Any], Any], tasks: Sequence[Any], *, group_size: int = 1,
                 temperature: float | None = None, max_workers: int = 32,
                 group_prefix: str = "", seed: int | None = None) -> Batch:
    """Run ``agent`` ``group_size`` times per task; whatever an agent raises (``sys.exit()``
    included) becomes a ``failed`` trajectory; only the user's Ctrl-C stops the batch.

    Order of the returned trajectories is deterministic (task-major, then sample), whatever order
    the threads finished in. With ``seed``, the k-th rollout is opened with
    ``derive_seed(seed, k)``, so its samples do not depend on thread scheduling either.
    """
    jobs = []
    for i, task in enumerate(tasks):
        tid = task_id_of(task, i)
        for _ in range(group_size):
            k = len(jobs)
            jobs.append((task, tid, f"{group_prefix}{i}:{tid}",
                         None if seed is None else derive_seed(seed, k)))
    workers = max(1, min(max_workers, len(jobs)))
    if workers == 1:
        return Batch([_run_one(agent, t, tid, gid, temperature, s) for t, tid, gid, s in jobs])
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ll-agent")
    try:
        futures = [pool.submit(_run_one, agent, t, tid, gid, temperature, s)
                   for t, tid, gid, s in jobs]
        batch = Batch([f.result() for f in futures])
    except BaseException:  # Ctrl-C while waiting: drop queued rollouts, do not wait for them
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return batch

"""A step's rollouts: the tasks it draws, sampled by this process's share, gathered whole.

Data parallel: every process draws the same task list (same seed), runs ``tasks[rank::world]``,
then every process holds the whole batch (credit and minibatches need it) and knows which
trajectories it sampled (``distributed.py``).

Asynchronous rollouts (``PPOConfig.max_staleness > 0``): a ``Prefetcher`` samples the next
step's share in a background thread while this step's update runs; the gather then happens on
the main thread when the step takes the batch, so collectives never run from two threads.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Hashable, Sequence

from ..records import Batch
from ..rollouts.threads import run_rollouts
from ..tracing import derive_seed
from .config import PPOConfig
from .distributed import DataParallel

__all__ = ["Prefetcher", "TaskOrder", "collect_rollouts", "task_labels"]


class TaskOrder:
    """Shuffled passes over the task list, so every task is seen once per pass.

    Its own RNG stream (not the minibatches'), so the tasks a step sees never depend on how many
    loss rows earlier steps had (that number depends on the credit strategy): runs that compare
    strategies on one seed train on the same tasks at every step.

    With ``groups`` (a label per task, e.g. its database) a pass is cut into chunks of ``chunk``
    tasks of one label (shuffled within labels, then the chunks shuffled); each label's leftover
    tasks are pooled into mixed chunks that come last. A step drawing ``chunk`` tasks then gets
    one label's tasks whenever it can; a step that straddles two passes takes what it lacks from
    the new pass's pooled leftovers, so the steps after it stay aligned with the chunks.
    """

    def __init__(self, n_tasks: int, seed: int, groups: Sequence[Any] | None = None,
                 chunk: int = 1):
        if groups is not None and len(groups) != n_tasks:
            raise ValueError(f"TaskOrder: {len(groups)} group labels for {n_tasks} tasks")
        self.n_tasks, self.groups, self.chunk = n_tasks, groups, max(1, chunk)
        self.rng = random.Random(f"tasks/{seed}")
        self.queue: list[int] = []
        """The rest of the current pass, drawn from the end."""

    def next(self, n: int) -> list[int]:
        """The indices of the next ``n`` tasks (at most one pass's worth)."""
        out: list[int] = []
        want = min(n, self.n_tasks)
        while len(out) < want:
            if not self.queue:
                self.queue = self._pass(head=want - len(out))
            out.append(self.queue.pop())
        return out

    def _pass(self, head: int) -> list[int]:
        """A shuffled pass, in draw order reversed; ``head``: tasks the current step still lacks."""
        order = list(range(self.n_tasks))
        self.rng.shuffle(order)
        if self.groups is None:
            return order
        by_label: dict[Any, list[int]] = {}
        for i in order:
            by_label.setdefault(self.groups[i], []).append(i)
        chunks, leftover, size = [], [], self.chunk
        for members in by_label.values():
            full = len(members) - len(members) % size
            chunks += [members[a:a + size] for a in range(0, full, size)]
            leftover += members[full:]
        self.rng.shuffle(chunks)
        first = head % size  # 0 when the step starts with this pass
        rest = leftover[first:]
        draws = ([leftover[:first]] + chunks
                 + [rest[a:a + size] for a in range(0, len(rest), size)])  # a short one last
        return [i for c in reversed(draws) for i in reversed(c)]


def task_labels(tasks: Sequence[Any], field_name: str) -> list[Any]:
    """Each task's ``field_name`` (a dict key or an attribute), for ``TaskOrder``'s groups."""
    labels = []
    for i, task in enumerate(tasks):
        value = task.get(field_name, _MISSING) if isinstance(task, dict) else getattr(
            task, field_name, _MISSING)
        where = f"PPOConfig.group_tasks_by={field_name!r}: task {i} ({type(task).__name__})"
        if value is _MISSING:
            raise ValueError(f"{where} has no such field")
        if not isinstance(value, Hashable):
            raise ValueError(f"{where}: its value {value!r:.80} cannot be a group label")
        labels.append(value)
    return labels


_MISSING = object()


def collect_rollouts(agent: Callable[[Any], Any], tasks: Sequence[Any], config: PPOConfig,
                     parallel: DataParallel, iteration: int) -> tuple[Batch, set[str]]:
    """All processes' rollouts of ``tasks`` (``group_size`` each) in one-process order, and the
    trajectory ids this process sampled. Seeds and group ids differ per step and per rank."""
    local = sample_share(agent, tasks, config, parallel, iteration)
    return parallel.gather_batch(local, len(tasks), config.group_size)


def sample_share(agent: Callable[[Any], Any], tasks: Sequence[Any], config: PPOConfig,
                 parallel: DataParallel, iteration: int) -> Batch:
    """This process's rollouts of its share of ``tasks`` (no communication)."""
    rank_part = (parallel.rank,) if parallel.enabled else ()
    rank = f"r{parallel.rank}/" if parallel.enabled else ""
    return run_rollouts(agent, parallel.shard(tasks), group_size=config.group_size,
                        timeout_s=config.rollout_timeout_s, temperature=config.temperature,
                        max_workers=config.rollout_workers, group_prefix=f"s{iteration}/{rank}",
                        seed=derive_seed("rollouts", config.seed, iteration, *rank_part))


class Prefetcher:
    """Step ``iteration``'s rollouts, sampled in a daemon thread from weights of ``version``.

    ``rewind`` is the task order's state before these tasks were drawn: a checkpoint taken while
    they are in flight saves it, so a resumed run samples the same tasks anew (the rollouts
    themselves are discarded, never trained on twice or lost silently). The seeds and group ids
    are those of ``iteration``, as a synchronous step would use.
    """

    def __init__(self, agent: Callable[[Any], Any], tasks: Sequence[Any], config: PPOConfig,
                 parallel: DataParallel, iteration: int, *, version: int, rewind: dict[str, Any]):
        self.n_tasks, self.group_size, self.parallel = len(tasks), config.group_size, parallel
        self.iteration, self.version, self.rewind = iteration, version, rewind
        self._future: Future = Future()
        args = (agent, tasks, config, parallel, iteration)
        threading.Thread(target=self._run, args=args, name=f"ll-prefetch-{iteration}",
                         daemon=True).start()  # a daemon: Ctrl-C never waits for it

    def _run(self, *args: Any) -> None:
        t0 = time.perf_counter()
        try:
            local = sample_share(*args)
        except BaseException as exc:  # re-raised by ``result`` on the main thread
            self._future.set_exception(exc)
            return
        self._future.set_result((local, time.perf_counter() - t0))

    def result(self) -> tuple[Batch, set[str], float]:
        """The whole batch (gathered over processes), this process's trajectory ids, and the
        seconds the sampling took; waits for it."""
        local, seconds = self._future.result()
        batch, own = self.parallel.gather_batch(local, self.n_tasks, self.group_size)
        return batch, own, seconds

    def done(self) -> bool:
        """Whether the sampling has finished (or failed)."""
        return self._future.done()

    def wait(self) -> None:
        """Let the sampling finish, whatever its outcome (before the sampler's weights move)."""
        self._future.exception()

"""A step's rollouts: the tasks it draws, sampled by this process's share, gathered whole.

Data parallel: every process draws the same task list (same seed), runs ``tasks[rank::world]``,
then every process holds the whole batch (credit and minibatches need it) and knows which
trajectories it sampled (``distributed.py``).
"""

from __future__ import annotations

import random
from typing import Any, Callable, Sequence

from ..records import Batch
from ..rollouts.threads import run_rollouts
from ..tracing import derive_seed
from .config import PPOConfig
from .distributed import DataParallel

__all__ = ["TaskOrder", "collect_rollouts"]


class TaskOrder:
    """Shuffled passes over the task list, so every task is seen once per pass.

    Its own RNG stream (not the minibatches'), so the tasks a step sees never depend on how many
    loss rows earlier steps had (that number depends on the credit strategy): runs that compare
    strategies on one seed train on the same tasks at every step.
    """

    def __init__(self, n_tasks: int, seed: int):
        self.n_tasks = n_tasks
        self.rng = random.Random(f"tasks/{seed}")
        self.queue: list[int] = []
        """The rest of the current pass, drawn from the end."""

    def next(self, n: int) -> list[int]:
        """The indices of the next ``n`` tasks (at most one pass's worth)."""
        out = []
        while len(out) < min(n, self.n_tasks):
            if not self.queue:
                self.queue = list(range(self.n_tasks))
                self.rng.shuffle(self.queue)
            out.append(self.queue.pop())
        return out


def collect_rollouts(agent: Callable[[Any], Any], tasks: Sequence[Any], config: PPOConfig,
                     parallel: DataParallel, iteration: int) -> tuple[Batch, set[str]]:
    """All processes' rollouts of ``tasks`` (``group_size`` each) in one-process order, and the
    trajectory ids this process sampled. Seeds and group ids differ per step and per rank."""
    rank_part = (parallel.rank,) if parallel.enabled else ()
    rank = f"r{parallel.rank}/" if parallel.enabled else ""
    local = run_rollouts(agent, parallel.shard(tasks), group_size=config.group_size,
                         timeout_s=config.rollout_timeout_s, temperature=config.temperature,
                         max_workers=config.rollout_workers, group_prefix=f"s{iteration}/{rank}",
                         seed=derive_seed("rollouts", config.seed, iteration, *rank_part))
    return parallel.gather_batch(local, len(tasks), config.group_size)

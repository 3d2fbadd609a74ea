"""Greedy evaluation of an agent over tasks: a Batch of traced trajectories plus metrics."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from ..records import Batch
from .threads import run_rollouts

__all__ = ["evaluate"]


def evaluate(agent: Callable[[Any], Any], tasks: Sequence[Any], *,
             summarize: Callable[[Batch], dict[str, float]] | None = None,
             temperature: float = 0.0, max_workers: int = 32,
             progress: bool = False,
             timeout_s: float | None = None) -> tuple[Batch, dict[str, float]]:
    """Run each task once at ``temperature`` (0 = greedy) and summarise.

    It is the rollouts' temperature, so calls that set none sample at it, whatever entry point
    the agent uses (the contract in ``tracing``).

    Tasks run in chunks of ``max_workers`` concurrent agents, so a progress bar can move between
    chunks. Without an environment ``summarize`` the metrics are mean total reward and failures;
    ``n_timeout`` counts rollouts stopped at ``timeout_s`` (they count as failed).
    """
    from tqdm.auto import tqdm

    batch = Batch()
    with tqdm(total=len(tasks), desc="eval", disable=not progress) as bar:
        for start in range(0, len(tasks), max_workers):
            chunk = run_rollouts(agent, tasks[start:start + max_workers], temperature=temperature,
                                 max_workers=max_workers, timeout_s=timeout_s)
            batch.trajectories.extend(chunk.trajectories)
            bar.update(len(chunk))
    ok = [t for t in batch.trajectories if t.status == "ok"]
    metrics = {"reward_mean": sum(t.total_reward for t in ok) / max(len(ok), 1),
               "n": float(len(batch)), "n_failed": float(batch.n_failed),
               "n_timeout": float(sum(t.meta.get("reason") == "timeout" for t in batch))}
    if summarize is not None:
        metrics.update(summarize(batch))
    return batch, metrics

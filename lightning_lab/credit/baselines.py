"""Baselines for the critic-free strategies: subtract what a trajectory was expected to score.

A trajectory's *score* is its return at its first transition (its whole, possibly discounted,
reward). The baseline is computed from scores of comparable trajectories and subtracted from every
return of the trajectory, so all its transitions move together and only the strategy decides how
reward is spread over the steps. Failed trajectories neither receive nor contribute to a baseline.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

from ..records import Batch, Trajectory

__all__ = ["BASELINES", "apply_baseline"]

BASELINES = (None, "group", "rloo", "batch")


def _group_key(traj: Trajectory) -> str:
    return traj.group_id or traj.task_id


def apply_baseline(batch: Batch, baseline: str | None, scale_std: bool = False,
                   eps: float = 1e-6) -> None:
    """Set ``advantage = return - baseline`` on the transitions of usable trajectories.

    ``group``: mean score of the trajectories sharing the group (GRPO); ``rloo``: mean score of the
    *other* trajectories of the group; ``batch``: mean over the batch. ``scale_std`` divides by the
    group's (or batch's) score standard deviation, as GRPO does.
    """
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; choose from {BASELINES}")
    usable = [t for t in batch.trajectories if t.usable]
    score = {t.traj_id: t.transitions[0].ret for t in usable}
    if baseline == "batch":
        groups = {"*": usable}
    else:
        groups = defaultdict(list)
        for t in usable:
            groups[_group_key(t)].append(t)
    for members in groups.values():
        values = [score[t.traj_id] for t in members]
        total, n = sum(values), len(values)
        std = statistics.pstdev(values) if n > 1 else 0.0
        for t in members:
            if baseline is None:
                b = 0.0
            elif baseline == "rloo":
                b = (total - score[t.traj_id]) / (n - 1) if n > 1 else score[t.traj_id]
            else:
                b = total / n
            div = (std + eps) if scale_std and baseline is not None else 1.0
            for tr in t.transitions:
                tr.advantage = (tr.ret - b) / div
    for t in batch.trajectories:
        if not t.usable:
            for tr in t.transitions:
                tr.advantage = None

"""What every importer checks before foreign traces become training data.

The same rules as ``records`` (``Batch.load_jsonl``) and ``tracing`` (``ll.reward``) apply, so
an imported batch can be saved, reloaded and trained on like a recorded one.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

from ..records import Batch, TraceFormatError, Trajectory, reward_problem


def rewards_problem(traj: Trajectory) -> str | None:
    """Why ``traj``'s rewards cannot be trained on, or None.

    Each transition's reward and their total are checked *after* summing: two finite 1e308
    rewards add up to inf. A failed trajectory only needs finite values, as ``load_jsonl`` and
    ``tracing`` (which fails a trajectory whose rewards sum out of range) allow.
    """
    rewards = [tr.reward for tr in traj.transitions]
    for what, value in [*((f"step {i}", r) for i, r in enumerate(rewards)),
                        ("total", sum(rewards))]:
        problem = reward_problem(value)
        if problem and (traj.status == "ok" or not math.isfinite(value)):
            return f"rewards summed out of range ({what}): {problem}"
    return None


def finish_load(batch: Batch, path: str | Path) -> Batch:
    """Warn once about the records skipped while loading ``path``; a file whose records were all
    skipped is an error naming the file, not a silently empty batch."""
    errors = batch.load_errors
    if errors and not batch.trajectories:
        raise TraceFormatError(f"{path}: no loadable trace; {len(errors)} bad record(s) skipped, "
                               f"the first: {errors[0]}")
    if errors:
        warnings.warn(f"{path}: skipped {len(errors)} bad record(s) (see Batch.load_errors); "
                      f"the first: {errors[0]}", stacklevel=3)
    return batch

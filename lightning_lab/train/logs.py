"""A run folder's append-only logs, rolled back to the step a resumed run continues from.

A run killed after step 7 whose last checkpoint is step 5 re-runs steps 6 and 7 on resume; their
first rows in ``metrics.jsonl`` and ``trajectories.jsonl`` describe a history that no longer
exists, so they are cut before the run appends again. Each file is rewritten to a temporary
sibling, fsynced and swapped in with ``os.replace``, so a crash here loses nothing either. A torn
last line (the crash hit mid-write) is dropped; lines that carry no step are kept.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable

__all__ = ["roll_back_logs", "METRICS", "TRAJECTORIES"]

METRICS, TRAJECTORIES = "metrics.jsonl", "trajectories.jsonl"
_GROUP = re.compile(r"^s(\d+)/")
"""The trainer's group ids start with ``s<steps done before>/`` (the step is that + 1)."""


def _metrics_step(row: dict) -> int | None:
    step = row.get("step")
    return int(step) if isinstance(step, (int, float)) else None


def _trajectory_step(row: dict) -> int | None:
    match = _GROUP.match(str(row.get("group_id", "")))
    return int(match.group(1)) + 1 if match else None


def _rewrite(path: Path, step: int, step_of: Callable[[dict], int | None]) -> int:
    """Keep the lines of steps <= ``step``; returns how many lines were dropped."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):  # torn by a crash mid-write
                dropped += 1
                continue
            try:
                row = json.loads(raw)
                row_step = step_of(row) if isinstance(row, dict) else None
            except (ValueError, RecursionError):
                dropped += 1
                continue
            if row_step is not None and row_step > step:
                dropped += 1
                continue
            kept.append(raw)
    if dropped:
        tmp = path.with_name(f".{path.name}.rollback")
        with open(tmp, "wb") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return dropped


def roll_back_logs(out: Path, step: int) -> dict[str, int]:
    """Cut ``out``'s metrics and trajectory logs back to ``step``; {file: lines dropped}."""
    return {METRICS: _rewrite(Path(out) / METRICS, step, _metrics_step),
            TRAJECTORIES: _rewrite(Path(out) / TRAJECTORIES, step, _trajectory_step)}

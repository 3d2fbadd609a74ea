"""Transition, Trajectory and Batch: the records every other module passes around.

Plain dataclasses (not pydantic) because the trainer creates thousands of transitions per step and
tracing overhead must stay in the low microseconds; validation happens at the boundaries that see
untrusted input (``reward``, ``load_jsonl``).
"""

from __future__ import annotations

import itertools
import json
import math
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Iterator

__all__ = ["Transition", "Trajectory", "Batch", "TraceFormatError"]

# Trajectory ids: a random per-process prefix plus a counter; unique across processes and ~20x
# cheaper than a uuid4 per rollout (tracing overhead is a budget measured in microseconds).
_ID_PREFIX = uuid.uuid4().hex[:8]
_ID_COUNTER = itertools.count()


def _new_traj_id() -> str:
    return f"{_ID_PREFIX}-{next(_ID_COUNTER):x}"


@dataclass(slots=True)
class Transition:
    """One LLM call: the tokens it saw, the tokens it produced and their behaviour logprobs."""

    prompt_ids: list[int] = field(default_factory=list)
    response_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    """Log-probabilities of ``response_ids`` under the policy that sampled them (PPO's "old" policy)."""
    prompt: str = ""
    response: str = ""
    agent: str = ""
    """Agent/role name set by ``ll.step``; empty when the call was made outside any step."""
    step: int = 0
    """Index of this transition inside its trajectory."""
    reward: float = 0.0
    """Immediate reward attached with ``ll.reward``."""
    temperature: float = 1.0
    """Sampling temperature the logprobs refer to (the trainer divides logits by it)."""
    finish_reason: str = "stop"
    meta: dict[str, Any] = field(default_factory=dict)
    # Filled by credit assignment / the critic; None until then.
    ret: float | None = None
    advantage: float | None = None
    value: float | None = None

    @property
    def trainable(self) -> bool:
        return bool(self.response_ids) and not self.meta.get("frozen", False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Transition":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown Transition fields: {sorted(unknown)}")
        return cls(**data)


@dataclass(slots=True)
class Trajectory:
    """One run of an agent on one task: its transitions in call order, plus outcome."""

    task_id: str = ""
    transitions: list[Transition] = field(default_factory=list)
    status: str = "ok"
    """``"ok"`` or ``"failed"`` (the agent raised; ``error`` holds the exception text)."""
    error: str = ""
    group_id: str = ""
    """Trajectories sampled for the same task in one step share a group id (GRPO baselines)."""
    traj_id: str = field(default_factory=_new_traj_id)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for i, tr in enumerate(self.transitions):  # step is the position; keep them consistent
            tr.step = i

    @property
    def total_reward(self) -> float:
        return float(sum(t.reward for t in self.transitions))

    @property
    def usable(self) -> bool:
        """Whether the loss may use this trajectory: it finished and made at least one LLM call."""
        return self.status == "ok" and any(t.response_ids for t in self.transitions)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "transitions"}
        data["transitions"] = [t.to_dict() for t in self.transitions]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Trajectory":
        data = dict(data)
        transitions = [Transition.from_dict(t) for t in data.pop("transitions", [])]
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown Trajectory fields: {sorted(unknown)}")
        return cls(transitions=transitions, **data)


class TraceFormatError(ValueError):
    """A trace file line could not be parsed; carries ``path`` and ``line`` for the message."""


@dataclass
class Batch:
    """The trajectories of one training step (or one evaluation)."""

    trajectories: list[Trajectory] = field(default_factory=list)
    load_errors: list[str] = field(default_factory=list)
    """``file:line: reason`` for every line skipped by ``load_jsonl``."""

    def __iter__(self) -> Iterator[Trajectory]:
        return iter(self.trajectories)

    def __len__(self) -> int:
        return len(self.trajectories)

    def __getitem__(self, i: int) -> Trajectory:
        return self.trajectories[i]

    def transitions(self) -> Iterator[tuple[Trajectory, Transition]]:
        for traj in self.trajectories:
            for tr in traj.transitions:
                yield traj, tr

    @property
    def n_failed(self) -> int:
        return sum(t.status != "ok" for t in self.trajectories)

    def to_pandas(self):
        """One row per transition; trajectories without transitions appear as one empty row."""
        import pandas as pd

        rows = []
        for traj in self.trajectories:
            base = {"traj_id": traj.traj_id, "task_id": traj.task_id, "group_id": traj.group_id,
                    "status": traj.status, "error": traj.error}
            if not traj.transitions:
                rows.append({**base, "step": None, "agent": None, "reward": 0.0})
            for tr in traj.transitions:
                rows.append({
                    **base, "step": tr.step, "agent": tr.agent, "reward": tr.reward,
                    "return": tr.ret, "advantage": tr.advantage, "value": tr.value,
                    "prompt_tokens": len(tr.prompt_ids), "response_tokens": len(tr.response_ids),
                    "prompt": tr.prompt, "response": tr.response,
                    "finish_reason": tr.finish_reason,
                })
        columns = ["traj_id", "task_id", "group_id", "status", "error", "step", "agent", "reward",
                   "return", "advantage", "value", "prompt_tokens", "response_tokens", "prompt",
                   "response", "finish_reason"]
        return pd.DataFrame(rows, columns=columns)

    # -- JSONL: one trajectory per line, appended and flushed, so a crash loses at most one line.
    def save_jsonl(self, path: str | Path, append: bool = False) -> None:
        with open(path, "a" if append else "w", encoding="utf-8") as f:
            for traj in self.trajectories:
                f.write(json.dumps(traj.to_dict(), allow_nan=False) + "\n")
                f.flush()

    @classmethod
    def load_jsonl(cls, path: str | Path, strict: bool = False) -> "Batch":
        """Read every valid line; bad lines are reported as ``file:line`` in ``load_errors``.

        With ``strict=True`` the first bad line raises ``TraceFormatError`` instead.
        """
        batch = cls()
        for lineno, traj, err in _iter_jsonl(Path(path)):
            if err is None:
                batch.trajectories.append(traj)
                continue
            message = f"{path}:{lineno}: {err}"
            if strict:
                raise TraceFormatError(message)
            batch.load_errors.append(message)
        if batch.load_errors:
            import warnings

            warnings.warn(f"skipped {len(batch.load_errors)} bad line(s): {batch.load_errors[0]}",
                          stacklevel=2)
        return batch

    # -- Parquet: one row per trajectory with transitions as a nested list, for pandas/duckdb users.
    def save_parquet(self, path: str | Path) -> None:
        import pandas as pd

        frame = pd.DataFrame({"trajectory": [json.dumps(t.to_dict()) for t in self.trajectories],
                              "task_id": [t.task_id for t in self.trajectories],
                              "total_reward": [t.total_reward for t in self.trajectories],
                              "status": [t.status for t in self.trajectories]})
        frame.to_parquet(path, index=False)

    @classmethod
    def load_parquet(cls, path: str | Path) -> "Batch":
        import pandas as pd

        frame = pd.read_parquet(path)
        return cls([Trajectory.from_dict(json.loads(s)) for s in frame["trajectory"]])


def _iter_jsonl(path: Path) -> Iterable[tuple[int, Trajectory | None, str | None]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                traj = Trajectory.from_dict(json.loads(line))
                _check_finite(traj)
            except (json.JSONDecodeError, TypeError, ValueError, AttributeError) as exc:
                yield lineno, None, f"{type(exc).__name__}: {exc}"
                continue
            yield lineno, traj, None


def _check_finite(traj: Trajectory) -> None:
    for tr in traj.transitions:
        if not isinstance(tr.reward, (int, float)) or not math.isfinite(tr.reward):
            raise ValueError(f"reward must be a finite number, got {tr.reward!r}")
        if len(tr.logprobs) not in (0, len(tr.response_ids)):
            raise ValueError(f"{len(tr.logprobs)} logprobs for {len(tr.response_ids)} response tokens")

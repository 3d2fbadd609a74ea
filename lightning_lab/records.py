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

__all__ = ["Transition", "Trajectory", "Batch", "TraceFormatError", "MAX_ABS_REWARD",
           "reward_problem"]

MAX_ABS_REWARD = 1e12
"""Largest reward magnitude accepted, per call and after summation. Far beyond any meaningful
reward, and small enough that every sum, mean, std and float32 advantage computed from a batch
of them stays finite (1e308 passes ``isfinite`` but two of them sum to inf, and 1e39 is already
inf in the float32 loss)."""


def reward_problem(value: Any) -> str | None:
    """Why ``value`` is not an acceptable reward (or a sum of rewards), or None if it is."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"reward must be a real number, got {type(value).__name__}: {value!r}"
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range, e.g. 10**400
        return f"reward must be finite, got an integer of {len(str(abs(value)))} digits"
    if not math.isfinite(number):
        return f"reward must be finite, got {number}"
    if abs(number) > MAX_ABS_REWARD:
        return f"reward magnitude {number:g} exceeds {MAX_ABS_REWARD:g}"
    return None

# Trajectory ids: a random per-process prefix plus a counter; unique across processes and ~20x
# cheaper than a uuid4 per rollout (tracing overhead is a budget measured in microseconds).
_ID_PREFIX = uuid.uuid4().hex[:8]
_ID_COUNTER = itertools.count()


def new_traj_id() -> str:
    """A fresh ``Trajectory.traj_id`` (the default of the field)."""
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
    role: str = ""
    """Who made the call, named by ``ll.role``; ``tracing.DEFAULT_ROLE`` ("main") outside any role."""
    turn: int = 0
    """Index of this transition inside its trajectory."""
    reward: float = 0.0
    """Immediate reward attached with ``ll.reward``."""
    temperature: float = 1.0
    """Sampling temperature of the call, 0 for greedy (``tracing`` states the contract). The
    logprobs are of ``log_softmax(logits / T)``, T=1 when greedy; the trainer scores likewise."""
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
    def from_dict(cls, data: dict[str, Any], what: str = "Transition") -> "Transition":
        """Read a stored transition; the names of earlier versions (``agent``, ``step``) are
        accepted (see ``upgrade_names``), ``what`` names the record in errors."""
        data = upgrade_names(data, what)
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{what}: unknown Transition fields: {sorted(unknown)}")
        return cls(**data)


RENAMED_FIELDS = {"agent": "role", "step": "turn"}
"""Transition fields renamed since traces were first stored: old name -> new name."""


def upgrade_names(data: dict[str, Any], what: str = "Transition") -> dict[str, Any]:
    """``data`` with the old field names of ``RENAMED_FIELDS`` under their new names (a copy
    when anything is renamed). Traces written before the rename keep loading; a record holding
    both names with different values is ambiguous and raises naming ``what``."""
    if not any(old in data for old in RENAMED_FIELDS):
        return data
    data = dict(data)
    for old, new in RENAMED_FIELDS.items():
        if old not in data:
            continue
        value = data.pop(old)
        if new in data and data[new] != value:
            raise ValueError(f"{what}: holds both {old!r} ({value!r}) and its new name {new!r} "
                             f"({data[new]!r}); keep one")
        data.setdefault(new, value)
    return data


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
    traj_id: str = field(default_factory=new_traj_id)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for i, tr in enumerate(self.transitions):  # turn is the position; keep them consistent
            tr.turn = i

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
        transitions = [Transition.from_dict(t, f"trajectory {data.get('traj_id', '')!r} "
                                               f"transitions[{i}]")
                       for i, t in enumerate(data.pop("transitions", []))]
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
                rows.append({**base, "turn": None, "role": None, "reward": 0.0})
            for tr in traj.transitions:
                rows.append({
                    **base, "turn": tr.turn, "role": tr.role, "reward": tr.reward,
                    "return": tr.ret, "advantage": tr.advantage, "value": tr.value,
                    "prompt_tokens": len(tr.prompt_ids), "response_tokens": len(tr.response_ids),
                    "prompt": tr.prompt, "response": tr.response,
                    "finish_reason": tr.finish_reason,
                })
        columns = ["traj_id", "task_id", "group_id", "status", "error", "turn", "role", "reward",
                   "return", "advantage", "value", "prompt_tokens", "response_tokens", "prompt",
                   "response", "finish_reason"]
        return pd.DataFrame(rows, columns=columns)

    # -- JSONL: one trajectory per line, appended and flushed, so a crash loses at most one line.
    def save_jsonl(self, path: str | Path, append: bool = False) -> None:
        """Write one line per trajectory; one that JSON cannot hold (an inf reward) raises
        ``TraceFormatError`` naming the file and the trajectory."""
        with open(path, "a" if append else "w", encoding="utf-8") as f:
            for i, traj in enumerate(self.trajectories):
                try:
                    line = json.dumps(traj.to_dict(), allow_nan=False)
                except (TypeError, ValueError) as exc:
                    raise TraceFormatError(f"{path}: trajectory {i} ({traj.traj_id}) cannot be "
                                           f"saved: {exc}") from exc
                f.write(line + "\n")
                f.flush()

    @classmethod
    def load_jsonl(cls, path: str | Path, strict: bool = False) -> "Batch":
        """Read every valid line; bad lines are reported as ``file:line`` in ``load_errors``.

        Each line is decoded on its own, so invalid UTF-8, nesting too deep for the parser or a
        field of the wrong type costs that line only. With ``strict=True`` the first bad line
        raises ``TraceFormatError`` instead.
        """
        return cls._collect(_iter_jsonl(Path(path)), path, "", strict)

    @classmethod
    def _collect(cls, items: Iterable[tuple[int, Trajectory | None, str | None]], path: Any,
                 where: str, strict: bool) -> "Batch":
        batch = cls()
        for lineno, traj, err in items:
            if err is None:
                batch.trajectories.append(traj)
                continue
            message = f"{path}:{where}{lineno}: {err}"
            if strict:
                raise TraceFormatError(message)
            batch.load_errors.append(message)
        if batch.load_errors:
            import warnings

            warnings.warn(f"skipped {len(batch.load_errors)} bad record(s): {batch.load_errors[0]}",
                          stacklevel=3)
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
    def load_parquet(cls, path: str | Path, strict: bool = False) -> "Batch":
        """Read every valid row; bad rows are reported as ``file:row N`` in ``load_errors``
        (``strict=True``: the first one raises ``TraceFormatError``)."""
        import pandas as pd

        try:
            column = pd.read_parquet(path, columns=["trajectory"])["trajectory"]
        except Exception as exc:  # noqa: BLE001 - pyarrow raises many types; name the file
            raise TraceFormatError(f"{path}: not a lightning-lab Parquet trace: "
                                   f"{type(exc).__name__}: {exc}") from exc
        rows = ((i, *_parse_line(text)) for i, text in enumerate(column))
        return cls._collect(rows, path, "row ", strict)


def _iter_jsonl(path: Path) -> Iterable[tuple[int, Trajectory | None, str | None]]:
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise TraceFormatError(f"{path}: cannot open: {exc}") from exc
    with f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                yield (lineno, *_parse_line(line))


def _parse_line(raw: Any) -> tuple[Trajectory | None, str | None]:
    """One serialised trajectory -> (trajectory, None) or (None, reason)."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        if not isinstance(text, str):
            raise TypeError(f"expected JSON text, got {type(text).__name__}")
        return _from_data(json.loads(text)), None
    except RecursionError:
        return None, "RecursionError: JSON nested too deeply"
    except (UnicodeDecodeError, TypeError, ValueError, AttributeError, KeyError) as exc:
        return None, f"{type(exc).__name__}: {exc}"


_TRAJECTORY_TYPES = {"task_id": str, "status": str, "error": str, "group_id": str, "traj_id": str,
                     "meta": dict, "transitions": list}
_TRANSITION_TYPES = {"prompt": str, "response": str, "role": str, "finish_reason": str,
                     "meta": dict, "turn": int, "prompt_ids": list, "response_ids": list,
                     "logprobs": list}
_OPTIONAL_FLOATS = ("ret", "advantage", "value")


def _check_types(data: dict, types: dict[str, type], what: str) -> None:
    for name, kind in types.items():
        if name in data and (not isinstance(data[name], kind) or isinstance(data[name], bool)):
            raise TypeError(f"{what}.{name} must be {kind.__name__}, got "
                            f"{type(data[name]).__name__}")


def _from_data(data: Any) -> Trajectory:
    """A Trajectory from decoded JSON, checking every field's type and every number's range."""
    if not isinstance(data, dict):
        raise TypeError(f"a trajectory must be a JSON object, got {type(data).__name__}")
    _check_types(data, _TRAJECTORY_TYPES, "trajectory")
    if data.get("status", "ok") not in ("ok", "failed"):
        raise ValueError(f"trajectory.status must be 'ok' or 'failed', got {data['status']!r}")
    transitions = data.get("transitions", [])
    for i, tr in enumerate(transitions):
        what = f"transitions[{i}]"
        if not isinstance(tr, dict):
            raise TypeError(f"{what} must be an object, got {type(tr).__name__}")
        tr = transitions[i] = upgrade_names(tr, what)
        _check_types(tr, _TRANSITION_TYPES, what)
        for name in ("prompt_ids", "response_ids"):
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in tr.get(name, [])):
                raise TypeError(f"{what}.{name} must be a list of integers")
        logprobs = tr.get("logprobs", [])
        if not all(_real(x) and math.isfinite(x) for x in logprobs):
            raise ValueError(f"{what}.logprobs must be finite numbers")
        if len(logprobs) not in (0, len(tr.get("response_ids", []))):
            raise ValueError(f"{what}: {len(logprobs)} logprobs for "
                             f"{len(tr.get('response_ids', []))} response tokens")
        reward = tr.get("reward", 0.0)
        problem = reward_problem(reward)
        if problem and (data.get("status") != "failed" or not _real(reward)
                        or not math.isfinite(reward)):  # a failed one may hold its huge sum
            raise ValueError(f"{what}: {problem}")
        temperature = tr.get("temperature", 1.0)
        if not _real(temperature) or not 0 <= temperature < math.inf:
            raise ValueError(f"{what}.temperature must be a finite number >= 0 (0: greedy), "
                             f"got {temperature!r}")
        for name in _OPTIONAL_FLOATS:
            if tr.get(name) is not None and not (_real(tr[name]) and math.isfinite(tr[name])):
                raise ValueError(f"{what}.{name} must be a finite number or null")
    return Trajectory.from_dict(data)


def _real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)

"""Which trajectory an HTTP call belongs to: rollout ids in the URL, mapped to open trajectories.

HTTP handlers run on the server's event loop, not in the agent's thread, so tracing's contextvars
cannot tell them the rollout; the URL does. Appending reuses ``tracing.record_generation`` with the
trajectory and role passed explicitly, so an HTTP call becomes exactly the
Transition an in-process ``policy.chat`` would have made. Concurrent calls of one rollout are
serialised by a per-trajectory lock, so turn indices stay dense and in arrival order.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from lightning_lab import tracing
from lightning_lab.inference.policy import Generation
from lightning_lab.records import Trajectory, Transition

__all__ = ["OpenRollout", "RolloutRegistry", "TraceStats"]


@dataclass
class OpenRollout:
    """A trajectory reachable under ``/rollout/<rollout_id>/v1``."""

    rollout_id: str
    trajectory: Trajectory
    temperature: float | None = None
    """Default temperature of calls that send none (the enclosing ``ll.rollout``'s, e.g. 0 in eval)."""
    max_tokens: int | None = None
    """Default generation budget of calls that send none (else the server's)."""
    control: Any = None
    """The rollout's ``tracing.RolloutControl``: cancelling it cancels this rollout's HTTP calls."""
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class TraceStats:
    """Time spent building and appending transitions (the proxy's tracing overhead)."""

    calls: int = 0
    total_s: float = 0.0
    max_s: float = 0.0

    @property
    def mean_ms(self) -> float:
        return 1e3 * self.total_s / max(self.calls, 1)


class RolloutRegistry:
    """Open rollouts by id; thread-safe (agents open them from threads, handlers read them)."""

    def __init__(self) -> None:
        self._open: dict[str, OpenRollout] = {}
        self._lock = threading.Lock()
        self.stats = TraceStats()

    def open(self, trajectory: Trajectory, temperature: float | None = None,
             max_tokens: int | None = None, control: Any = None) -> OpenRollout:
        """Route a new id to ``trajectory``; a cancelled ``control`` closes the route at once."""
        entry = OpenRollout(uuid.uuid4().hex, trajectory, temperature, max_tokens, control)
        with self._lock:
            self._open[entry.rollout_id] = entry
        if control is not None:
            control.on_cancel(lambda: self.close(entry.rollout_id))
        return entry

    def close(self, rollout_id: str) -> None:
        with self._lock:
            self._open.pop(rollout_id, None)

    def get(self, rollout_id: str) -> OpenRollout | None:
        return self._open.get(rollout_id)

    def __len__(self) -> int:
        return len(self._open)

    def record(self, entry: OpenRollout, *, prompt_ids: list[int], prompt_text: str,
               response_ids: list[int], logprobs: list[float], text: str, temperature: float,
               finish_reason: str, role: str, meta: dict[str, Any]) -> Transition | None:
        """Append one choice as a Transition; returns it (None if the rollout closed meanwhile)."""
        start = time.perf_counter()
        gen = Generation(text=text, prompt_ids=prompt_ids, response_ids=response_ids,
                         logprobs=logprobs, finish_reason=finish_reason, prompt_text=prompt_text,
                         temperature=temperature)
        with entry.lock:
            tr = tracing.record_generation(gen, trajectory=entry.trajectory, role=role)
            if tr is not None:
                tr.meta.update(meta)
        elapsed = time.perf_counter() - start
        stats = self.stats  # racy increments lose at most a sample; it is a diagnostic
        stats.calls += 1
        stats.total_s += elapsed
        stats.max_s = max(stats.max_s, elapsed)
        return tr

    def reward(self, entry: OpenRollout, value: Any, final: bool) -> None:
        """``ll.reward`` semantics on this rollout's trajectory; ValueError on a bad value."""
        with entry.lock:
            tracing.reward(value, final=final, trajectory=entry.trajectory)

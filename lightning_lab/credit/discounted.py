"""``discounted``: return_t = sum_{k>=t} gamma^(k-t) r_k over the trajectory's transitions."""

from __future__ import annotations

from dataclasses import dataclass

from ..records import Batch
from .baselines import apply_baseline
from .registry import CreditStrategy, register


def discounted_returns(rewards: list[float], gamma: float) -> list[float]:
    """Reverse accumulation: G_t = r_t + gamma * G_{t+1}, G_T = 0."""
    out = [0.0] * len(rewards)
    running = 0.0
    for t in range(len(rewards) - 1, -1, -1):
        running = rewards[t] + gamma * running
        out[t] = running
    return out


@register("discounted")
@dataclass
class Discounted(CreditStrategy):
    gamma: float = 0.9
    """Per-transition discount: a reward k calls later counts gamma^k."""
    baseline: str | None = "group"
    """None | "group" | "rloo" | "batch" (see credit/baselines.py)."""
    scale_std: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")

    def assign(self, batch: Batch) -> Batch:
        for traj in batch:
            rets = discounted_returns([t.reward for t in traj.transitions], self.gamma)
            for tr, ret in zip(traj.transitions, rets):
                tr.ret = ret
        apply_baseline(batch, self.baseline, self.scale_std)
        return batch

"""``uniform`` (LightningRL): every transition is credited with the trajectory's total reward."""

from __future__ import annotations

from dataclasses import dataclass

from ..records import Batch
from .baselines import apply_baseline
from .registry import CreditStrategy, register


def uniform_returns(rewards: list[float]) -> list[float]:
    """return_t = sum_k r_k for every t."""
    total = float(sum(rewards))
    return [total] * len(rewards)


@register("uniform")
@dataclass
class Uniform(CreditStrategy):
    baseline: str | None = "group"
    """None | "group" | "rloo" | "batch" (see credit/baselines.py)."""
    scale_std: bool = False
    """Divide advantages by the group's reward std (GRPO's normalisation)."""

    def assign(self, batch: Batch) -> Batch:
        for traj in batch:
            for tr, ret in zip(traj.transitions, uniform_returns([t.reward for t in traj.transitions])):
                tr.ret = ret
        apply_baseline(batch, self.baseline, self.scale_std)
        return batch

"""``value``: turn-level GAE against a learned critic.

The critic (``lightning_lab/train/critic.py``) estimates V(s_t) for the state *before* transition t (the
policy's hidden state at the last prompt token) and the trainer writes it into
``Transition.value``. This file only does the arithmetic, so it can be swapped onto any batch whose
values are filled.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..records import Batch
from .registry import CreditStrategy, register


def gae(rewards: list[float], values: list[float], gamma: float, lam: float
        ) -> tuple[list[float], list[float]]:
    """Generalised advantage estimation over one trajectory's turns.

    delta_t = r_t + gamma * V_{t+1} - V_t (V_T = 0 at the end), A_t = sum_l (gamma*lam)^l delta_{t+l}.
    Returns (advantages, returns) with returns = A_t + V_t, the critic's regression target.
    """
    if len(rewards) != len(values):
        raise ValueError(f"{len(rewards)} rewards but {len(values)} values")
    advantages = [0.0] * len(rewards)
    lastgaelam = 0.0
    for t in range(len(rewards) - 1, -1, -1):
        next_value = values[t + 1] if t + 1 < len(values) else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages[t] = lastgaelam
    returns = [a + v for a, v in zip(advantages, values)]
    return advantages, returns


@register("value")
@dataclass
class ValueCredit(CreditStrategy):
    gamma: float = 1.0
    lam: float = 0.95
    needs_values = True

    def assign(self, batch: Batch) -> Batch:
        for traj in batch:
            if not traj.usable:
                for tr in traj.transitions:
                    tr.advantage = None
                continue
            values = [tr.value for tr in traj.transitions]
            if any(v is None for v in values):
                raise ValueError(
                    "the 'value' strategy needs Transition.value on every transition; run it "
                    "through PPOTrainer (its critic fills them) or call trainer.critic_values(batch)")
            advs, rets = gae([tr.reward for tr in traj.transitions], values, self.gamma, self.lam)
            for tr, a, r in zip(traj.transitions, advs, rets):
                tr.advantage, tr.ret = a, r
        return batch

"""Rejection-sampling fine-tuning: sample n per task, keep the good trajectories, fine-tune, repeat.

Why: a weak policy rarely succeeds, so on-policy RL sees few positive samples and mostly noise.
Best-of-n filtering (RAFT, Expert Iteration, STaR) turns its rare successes into a supervised
dataset: every transition of a trajectory whose reward is above a threshold becomes an SFT target,
all roles at once, through the agent's own prompts (they were recorded as the agent ran). Each
round samples from the policy the previous round produced.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..records import Batch
from ..rollouts.threads import run_rollouts
from .config import REJECTION_TEMPERATURE as TEMPERATURE
from .sft import SFTConfig, SFTTrainer

__all__ = ["TEMPERATURE", "RejectionConfig", "RejectionRounds", "RoundResult", "keep_above",
           "rejection_sample", "rejection_sampling_finetune"]


@dataclass
class RejectionConfig:
    n: int = 8
    """Samples per task per round."""
    threshold: float = 0.5
    """Keep trajectories whose total reward is strictly above this."""
    temperature: float = TEMPERATURE
    """Sampling temperature of the rollouts."""
    rounds: int = 2
    """Sample -> filter -> fine-tune cycles."""
    tasks_per_round: int | None = None
    """Tasks sampled per round (a fresh slice of the task list each round); None = all."""
    unique: bool = True
    """Keep one copy of identical trajectories (same response tokens) per task, so an answer the
    policy already gives every time does not outweigh the rarer successes."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """How each round fine-tunes on what it kept."""
    rollout_workers: int = 32
    """Agents run concurrently (``run(config)`` passes ``ppo.rollout_workers``)."""
    rollout_timeout_s: float | None = None
    """A rollout running longer fails with reason timeout and is not kept; None = no limit
    (``run(config)`` passes ``ppo.rollout_timeout_s``)."""


@dataclass
class RoundResult:
    """What one round sampled, kept and learned."""

    round: int
    sampled: Batch
    kept: Batch
    sft_history: list[dict[str, float]]

    @property
    def iteration(self) -> int:
        """The round's number: a run's iteration (``run(config)`` with ``algorithm: rejection``)."""
        return self.round

    @property
    def batch(self) -> Batch:
        """What the round sampled (a run saves it to ``trajectories.jsonl``)."""
        return self.sampled

    @property
    def metrics(self) -> dict[str, float]:
        rewards = [t.total_reward for t in self.sampled if t.status == "ok"]
        return {"step": float(self.round), "round": float(self.round), "sampled": float(len(self.sampled)),
                "kept": float(len(self.kept)),
                "reward_mean": sum(rewards) / max(len(rewards), 1),
                "tasks_solved": float(len({t.task_id for t in self.kept})),
                "sft_loss": self.sft_history[-1]["loss"] if self.sft_history else float("nan")}


def keep_above(batch: Batch, threshold: float, *, unique: bool = True) -> Batch:
    """The usable trajectories of ``batch`` whose total reward is strictly above ``threshold``."""
    kept, seen = [], set()
    for traj in batch:
        if not traj.usable or not traj.total_reward > threshold:
            continue
        key = (traj.task_id, tuple(tuple(tr.response_ids) for tr in traj.transitions))
        if unique and key in seen:
            continue
        seen.add(key)
        kept.append(traj)
    return Batch(kept)


def rejection_sample(agent: Callable[[Any], Any], tasks: Sequence[Any], *, n: int,
                     threshold: float, temperature: float, unique: bool = True,
                     max_workers: int = 32, timeout_s: float | None = None
                     ) -> tuple[Batch, Batch]:
    """(all sampled, kept): ``n`` traced rollouts per task, filtered by ``keep_above``."""
    sampled = run_rollouts(agent, tasks, group_size=n, temperature=temperature,
                           max_workers=max_workers, timeout_s=timeout_s)
    return sampled, keep_above(sampled, threshold, unique=unique)


class RejectionRounds:
    """Rounds of sample -> keep above threshold -> SFT, one at a time; one optimizer throughout.

    A round that keeps nothing trains nothing and says so in its result (``kept == 0``); the next
    round samples again from the unchanged policy. Round ``r`` samples a fresh slice of the
    task list (``tasks_per_round``), wrapping around.
    """

    def __init__(self, policy: Any, agent: Callable[[Any], Any], tasks: Sequence[Any],
                 config: RejectionConfig | None = None, *, callbacks: Sequence[Any] = ()):
        self.policy, self.agent, self.tasks = policy, agent, list(tasks)
        self.config = config or RejectionConfig()
        self.callbacks = callbacks
        self.optimizer: Any = None
        self.results: list[RoundResult] = []

    def round(self) -> RoundResult:
        cfg, tasks = self.config, self.tasks
        per_round = cfg.tasks_per_round or len(tasks)
        start = (len(self.results) * per_round) % len(tasks)
        chunk = (tasks + tasks)[start:start + per_round]
        sampled, kept = rejection_sample(self.agent, chunk, n=cfg.n, threshold=cfg.threshold,
                                         temperature=cfg.temperature, unique=cfg.unique,
                                         max_workers=cfg.rollout_workers,
                                         timeout_s=cfg.rollout_timeout_s)
        history: list[dict[str, float]] = []
        if len(kept):
            sft = SFTTrainer(self.policy, kept, cfg.sft, callbacks=self.callbacks,
                             optimizer=self.optimizer)
            self.optimizer = sft.optimizer
            history = [s.metrics for s in sft.fit(progress=False)]
        result = RoundResult(round=len(self.results) + 1, sampled=sampled, kept=kept,
                             sft_history=history)
        self.results.append(result)
        return result


def rejection_sampling_finetune(policy: Any, agent: Callable[[Any], Any], tasks: Sequence[Any],
                                config: RejectionConfig | None = None, *,
                                on_round: Callable[[RoundResult], None] | None = None,
                                callbacks: Sequence[Any] = ()) -> list[RoundResult]:
    """``config.rounds`` rounds of ``RejectionRounds``: sample -> keep above threshold -> SFT."""
    rounds = RejectionRounds(policy, agent, tasks, config, callbacks=callbacks)
    for _ in range(rounds.config.rounds):
        result = rounds.round()
        if on_round is not None:
            on_round(result)
    return rounds.results

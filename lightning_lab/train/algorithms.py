"""The algorithms ``run(config)`` drives through one loop: PPO, SFT and rejection sampling.

Each is a trainer with the same run-facing surface (``Algorithm``), so a run's budget,
checkpoints, evaluations, logs, callbacks and W&B behave the same whatever ``config.algorithm``
says; only what a step is differs (a PPO iteration, an SFT optimizer step, a rejection round).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections import Counter
from pathlib import Path
from typing import Any, Protocol, Sequence

from ..records import Batch
from .callbacks import Callback, CallbackList
from .config import ConfigError, RunConfig, SFTConfig
from .rejection import RejectionConfig, RejectionRounds, RoundResult
from .sft import SFTStepState, SFTTrainer, demonstrations_to_batch, load_traces, sft_state_dict
from .trainer import PPOTrainer

__all__ = ["Algorithm", "PPORun", "SFTRun", "RejectionRun", "sft_data"]


class Algorithm(Protocol):
    """What the run loop and the callbacks (``attach``) use of a trainer."""

    policy: Any
    config: Any
    tasks: list[Any]
    history: list[dict[str, float]]
    mid_update: bool
    """True while a step is changing the weights: an interrupt then saves nothing."""
    keeps_trajectories: bool
    """Its steps sample trajectories the run appends to ``trajectories.jsonl``."""

    @property
    def iteration(self) -> int: ...

    def step(self) -> Any:
        """One iteration; the result has ``iteration``, ``metrics`` and ``batch`` (``StepState``)."""

    def planned_steps(self, config: RunConfig) -> int:
        """Steps a run of ``config`` takes (before its wall-clock budget)."""

    def save(self, directory: str | Path, keep_last: int | None = None) -> Path: ...

    def settle(self) -> None:
        """Drop anything sampled ahead for the next step, so an evaluation sees the current
        weights (asynchronous PPO rollouts; nothing for the others)."""

    def add_callback(self, callback: Any) -> Callback: ...

    def describe(self) -> str:
        """What it trains on, for the run's opening line."""

    def line(self, state: Any) -> str:
        """A step's log line."""

    def summary(self) -> dict[str, Any]:
        """What ``summary.json`` adds for this algorithm."""


class PPORun(PPOTrainer):
    """``PPOTrainer`` as a run's algorithm; a step is a PPO iteration (rollouts + update)."""

    keeps_trajectories = True

    def planned_steps(self, config: RunConfig) -> int:
        return config.steps

    def describe(self) -> str:
        return self.credit.describe()

    def line(self, state: Any) -> str:
        m = state.metrics
        return (f"step {state.iteration:3d}  reward {m['reward_mean']:.3f} ± {m['reward_std']:.3f}  "
                f"kl {m['kl']:.4f}  clip {m['clip_frac']:.3f}  loss {m['policy_loss']:+.4f}  "
                f"tok/s {m['tokens_per_s']:.0f}  failed {int(m['n_failed'])}")

    def summary(self) -> dict[str, Any]:
        return {}


class _FineTuning(ABC):
    """What SFT and rejection sampling share: the policy's trainable weights as an SFT
    checkpoint (``train --init-from`` reads it), callbacks, the interrupt flag."""

    def __init__(self, policy: Any, config: SFTConfig, tasks: Sequence[Any],
                 callbacks: Sequence[Any]):
        self.policy, self.config, self.tasks = policy, config, list(tasks)
        self.callbacks = CallbackList(callbacks)
        self.mid_update = False

    def add_callback(self, callback: Any) -> Callback:
        return self.callbacks.add(callback)

    def settle(self) -> None:
        """Fine-tuning samples nothing ahead (rejection rounds sample inside their step)."""

    def step(self) -> Any:
        """One fine-tuning step (SFT) or round (rejection); ``mid_update`` stays True if it
        fails part-way, so an interrupt then saves nothing."""
        self.mid_update = True
        result = self._step()
        self.mid_update = False
        return result

    @abstractmethod
    def _step(self) -> Any: ...

    def save(self, directory: str | Path, keep_last: int | None = None) -> Path:
        from .checkpoint import save_checkpoint

        state = sft_state_dict(self.policy, config=dataclasses.asdict(self.config),
                               step=self.iteration, optimizer=self._optimizer(),
                               history=self._sft_history())
        return save_checkpoint(state, Path(directory), self.iteration,
                               model=getattr(self.policy, "name", ""), keep_last=keep_last)

    @property
    @abstractmethod
    def iteration(self) -> int: ...

    @abstractmethod
    def _optimizer(self) -> Any:
        """The optimizer a checkpoint saves."""

    @abstractmethod
    def _sft_history(self) -> list[dict[str, float]]:
        """Every fine-tuning step's metrics, for the checkpoint."""


class SFTRun(_FineTuning):
    """Fine-tuning on one batch (stored traces or demonstrations); a step is an optimizer step,
    ``sft.epochs`` passes plan the run."""

    keeps_trajectories = False

    def __init__(self, policy: Any, batch: Batch, config: SFTConfig, tasks: Sequence[Any],
                 skipped: Counter, callbacks: Sequence[Any] = ()):
        super().__init__(policy, config, tasks, callbacks)
        self.sft = SFTTrainer(policy, batch, config, callbacks=self.callbacks)
        self.skipped = Counter(skipped)
        self.skipped.update(self.sft.skipped)

    @property
    def iteration(self) -> int:
        return self.sft.iteration

    @property
    def history(self) -> list[dict[str, float]]:
        return self.sft.history

    def _step(self) -> SFTStepState:
        return self.sft.step()

    def planned_steps(self, config: RunConfig) -> int:
        return max(1, round(self.config.epochs * self.sft.steps_per_epoch))

    def describe(self) -> str:
        return (f"SFT on {len(self.sft.rows)} transitions ({self.sft.steps_per_epoch} "
                f"steps/epoch; skipped {dict(+self.skipped) or 'none'})")

    def line(self, state: SFTStepState) -> str:
        m = state.metrics
        return f"step {state.iteration:4d}  loss {m['loss']:.4f}  token_acc {m['token_acc']:.3f}"

    def summary(self) -> dict[str, Any]:
        return {"rows": len(self.sft.rows), "skipped": dict(self.skipped),
                "loss": [h["loss"] for h in self.history]}

    def _optimizer(self) -> Any:
        return self.sft.optimizer

    def _sft_history(self) -> list[dict[str, float]]:
        return self.history


class RejectionRun(_FineTuning):
    """Rejection sampling; a step is a round (sample ``n`` per task, keep above ``threshold``,
    fine-tune), ``sft.rounds`` of them plan the run."""

    keeps_trajectories = True

    def __init__(self, policy: Any, agent: Any, tasks: Sequence[Any], config: SFTConfig,
                 callbacks: Sequence[Any] = (), rollout_workers: int = 32,
                 rollout_timeout_s: float | None = None):
        super().__init__(policy, config, tasks, callbacks)
        rejection = RejectionConfig(n=config.n, threshold=config.threshold,
                                    temperature=config.temperature, rounds=config.rounds,
                                    tasks_per_round=config.tasks_per_round, sft=config,
                                    rollout_workers=rollout_workers,
                                    rollout_timeout_s=rollout_timeout_s)
        self.rounds = RejectionRounds(policy, agent, tasks, rejection, callbacks=self.callbacks)

    @property
    def iteration(self) -> int:
        return len(self.rounds.results)

    @property
    def history(self) -> list[dict[str, float]]:
        return [r.metrics for r in self.rounds.results]

    def _step(self) -> RoundResult:
        return self.rounds.round()

    def planned_steps(self, config: RunConfig) -> int:
        return self.config.rounds

    def describe(self) -> str:
        return (f"rejection sampling ({self.config.n} per task, reward > {self.config.threshold}) "
                f"on {len(self.tasks)} tasks")

    def line(self, state: RoundResult) -> str:
        return ("round {round:.0f}: sampled {sampled:.0f}, kept {kept:.0f} ({tasks_solved:.0f} "
                "tasks), reward {reward_mean:.3f}".format(**state.metrics))

    def summary(self) -> dict[str, Any]:
        results = self.rounds.results
        return {"rounds": self.history,
                "rows": sum(len(t.transitions) for r in results for t in r.kept),
                "loss": [h["loss"] for h in self._sft_history()]}

    def _optimizer(self) -> Any:
        return self.rounds.optimizer

    def _sft_history(self) -> list[dict[str, float]]:
        return [m for r in self.rounds.results for m in r.sft_history]


def sft_data(config: RunConfig, env: Any, policy: Any, train_tasks: Sequence[Any],
             log: Any = print) -> tuple[Batch, Counter]:
    """The batch ``algorithm: sft`` trains on and what was skipped building it: the stored
    traces of ``sft.traces`` (bad records logged), else the environment's demonstrations."""
    skipped: Counter = Counter()
    if config.sft.traces:
        batch = load_traces(config.sft.traces, config.sft.traces_format, policy.tokenizer)
        for error in batch.load_errors:
            log(f"skipped: {error}")
        skipped["load_errors"] = len(batch.load_errors)
        return batch, skipped
    if getattr(env, "demonstrations", None) is None:
        raise ConfigError(f"environment {config.env!r} has no demonstrations; pass --traces "
                          "or use --mode rejection")
    demos = env.demonstrations(train_tasks, **config.agent_options)
    skipped["no_demonstration"] = len(train_tasks) - len(demos)
    max_context = config.sft.max_context or policy.model.config.max_position_embeddings
    batch, bad = demonstrations_to_batch(policy.tokenizer, demos, max_context=max_context)
    skipped.update(bad)
    return batch, skipped

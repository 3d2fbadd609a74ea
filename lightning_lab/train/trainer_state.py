"""What a ``PPOTrainer`` checkpoint holds and how a trainer comes back from one.

``state_dict``/``load_state_dict`` are the trainer/run boundary: plain tensors and lists (loaded
with ``weights_only``, never unpickled), the trainable weights of every adapter, the critic, the
optimizer, and the sampling state (RNGs and the rest of the pass over the tasks), so a resumed
run draws exactly the tasks and minibatches an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .. import credit as credit_lib
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import PPOConfig, upgrade_field_names
from .distributed import DataParallel
from .multi_adapter import check_adapter_set, learning_rates, saved_parameters
from ..inference.adapters import has_adapter
from ..inference.multi_lora import adapter_names

__all__ = ["TrainerState"]


class TrainerState:
    """Checkpointing for ``PPOTrainer`` (a mixin: it reads the trainer's policy, config, credit,
    critic, optimizer, task order and history)."""

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs, as tensors and plain data (loads with ``weights_only``).

        Weights are the trainable parameters only (the LoRA adapter, or the whole model when it
        is trained in full); RNG states cover task order, minibatch order and torch's sampling.
        """
        return {
            "step": self.iteration,
            "config": dataclasses.asdict(self.config),
            "credit": {"name": self.credit.name, "params": self.credit.params()},
            "params": {n: p.detach().cpu() for n, p in saved_parameters(self.policy.model).items()},
            "adapters": adapter_names(self.policy.model),
            "critic": self.critic.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            **self._sampling_state(),
            "history": list(self.history),
        }

    def _sampling_state(self) -> dict[str, Any]:
        """What a step draws from: the RNGs (task order, minibatch order, torch's sampling) and
        the rest of the current pass over the tasks. Rollouts prefetched for the next step count
        as not drawn: a checkpoint discards them and its resume samples their tasks anew."""
        tasks = self._prefetch.rewind if self._prefetch is not None else self._task_state()
        return {"rng": {"torch": torch.get_rng_state(), "tasks": tasks["rng"],
                        "minibatches": _rng_state(self.minibatch_rng)},
                "task_queue": tasks["queue"]}

    def _task_state(self) -> dict[str, Any]:
        return {"rng": _rng_state(self.task_order.rng), "queue": list(self.task_order.queue)}

    def _set_task_state(self, state: dict[str, Any]) -> None:
        _set_rng_state(self.task_order.rng, state["rng"])
        self.task_order.queue = [int(i) for i in state["queue"]]

    def _load_sampling_state(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["rng"]["torch"])
        self._set_task_state({"rng": state["rng"]["tasks"], "queue": state["task_queue"]})
        _set_rng_state(self.minibatch_rng, state["rng"]["minibatches"])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s state. The trainer's own config and credit stay: a resumed
        run may change them (learning rates are re-applied over the optimizer's saved ones)."""
        check_adapter_set(state.get("adapters"), adapter_names(self.policy.model), "the checkpoint")
        params = saved_parameters(self.policy.model)
        saved = state["params"]
        if {n: tuple(p.shape) for n, p in params.items()} != {n: tuple(t.shape) for n, t in saved.items()}:
            only = sorted(set(params) ^ set(saved))[:3]
            shapes = [n for n in params if n in saved and params[n].shape != saved[n].shape][:3]
            raise ValueError(f"does not fit this policy: parameters on one side only {only}, "
                             f"shape mismatches {shapes}")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])
        self.critic.load_state_dict(state["critic"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group, lr in zip(self.optimizer.param_groups,
                             learning_rates(self.policy.model, self.config)):
            group["lr"] = lr
        self._load_sampling_state(state)
        self.iteration = int(state["step"])
        self.history = [dict(h) for h in state["history"]]

    def save(self, directory: str | Path, keep_last: int | None = None) -> Path:
        """Atomic checkpoint under ``directory``; ``keep_last=k`` prunes all but the newest k."""
        # the portable copy of the weights, written into the checkpoint: a PEFT adapter folder
        extra = ((lambda tmp: self.save_adapter(tmp / "adapter")) if has_adapter(self.policy.model)
                 else None)
        return save_checkpoint(self.state_dict(), Path(directory), self.iteration,
                               model=getattr(self.policy, "name", ""), keep_last=keep_last,
                               extra=extra)

    def save_adapter(self, directory: str | Path) -> Path:
        """The policy's LoRA adapter as a standard PEFT folder (``peft.PeftModel.from_pretrained``
        and vLLM load it); see ``export.py``."""
        from .export import save_adapter

        return save_adapter(self.policy, directory, step=self.iteration)

    @classmethod
    def load(cls, directory: str | Path, policy: Any, agent: Callable[[Any], Any],
             tasks: Sequence[Any], *, credit: str | credit_lib.CreditStrategy | None = None,
             config: PPOConfig | None = None, callbacks: Sequence[Any] = (),
             sync: Any = None, parallel: DataParallel | None = None,
             reference_weights: dict[str, torch.Tensor] | None = None) -> Any:
        """A trainer continuing a checkpoint; ``credit``/``config`` default to the saved ones,
        the other arguments are the constructor's (what a checkpoint does not hold)."""
        path, state = load_checkpoint(Path(directory))
        check_adapter_set(state.get("adapters"), adapter_names(policy.model),
                          f"checkpoint {path / 'state.pt'}")
        try:
            if config is None:
                config = PPOConfig(**upgrade_field_names(state["config"], f"checkpoint {path}"))
            if credit is None:
                credit = credit_lib.get(state["credit"]["name"], **state["credit"]["params"])
        except (TypeError, ValueError, KeyError) as exc:  # e.g. a field this version lacks
            raise CheckpointError(f"checkpoint {path / 'state.pt'}: its config does not fit "
                                  f"this version: {type(exc).__name__}: {exc}") from exc
        trainer = cls(policy, agent, tasks, credit=credit, config=config, callbacks=callbacks,
                      sync=sync, parallel=parallel, reference_weights=reference_weights)
        try:
            trainer.load_state_dict(state)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, RuntimeError) as exc:
            # an edited or foreign state.pt: valid torch data of the wrong shape or structure
            raise CheckpointError(f"checkpoint {path / 'state.pt'}: {type(exc).__name__}: "
                                  f"{exc}") from exc
        return trainer


def _rng_state(rng: random.Random) -> list[Any]:
    """``random.Random`` state as plain lists (safe to load without unpickling)."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _set_rng_state(rng: random.Random, state: list[Any]) -> None:
    version, internal, gauss = state
    rng.setstate((int(version), tuple(int(x) for x in internal), gauss))

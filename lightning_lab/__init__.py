"""lightning-lab: trace ordinary agents, assign credit to their steps, train the LLM with PPO.

``import lightning_lab as ll`` stays light: torch-heavy modules (models, policy, trainer) load on
first attribute access.
"""

from __future__ import annotations

import importlib
from typing import Any

from . import credit, envs, tracing
from .paths import cache_dir
from .records import Batch, TraceFormatError, Trajectory, Transition
from .tracing import RolloutCancelled, TracingError, current, reward, role, rollout, step, traced

__version__ = "0.1.0"

_LAZY = {
    "models": ("lightning_lab.inference.models", None),
    "Policy": ("lightning_lab.inference.policy", "Policy"),
    "Generation": ("lightning_lab.inference.policy", "Generation"),
    "PPOTrainer": ("lightning_lab.train.trainer", "PPOTrainer"),
    "PPOConfig": ("lightning_lab.train.config", "PPOConfig"),
    "RunConfig": ("lightning_lab.train.config", "RunConfig"),
    "run": ("lightning_lab.train.run", "run"),
    "CallbackBase": ("lightning_lab.train.callbacks", "CallbackBase"),
    "StepState": ("lightning_lab.train.trainer", "StepState"),
    "SFTTrainer": ("lightning_lab.train.sft", "SFTTrainer"),
    "SFTConfig": ("lightning_lab.train.sft", "SFTConfig"),
    "Demonstration": ("lightning_lab.train.sft", "Demonstration"),
    "traces": ("lightning_lab.traces", None),
    "evaluate": ("lightning_lab.rollouts", "evaluate"),
    "run_rollouts": ("lightning_lab.rollouts", "run_rollouts"),
    "arun_rollouts": ("lightning_lab.rollouts", "arun_rollouts"),
    "process_agent": ("lightning_lab.rollouts", "process_agent"),
    "widgets": ("lightning_lab.workbench.widgets", None),
    "tracking": ("lightning_lab.workbench.tracking", None),
    "serve": ("lightning_lab.proxy", "serve"),
    "proxy": ("lightning_lab.proxy", None),
    "LangGraphRoles": ("lightning_lab.integrations.langchain", "LangGraphRoles"),
}

__all__ = ["cache_dir", "Batch", "Trajectory", "Transition", "TraceFormatError", "TracingError",
           "RolloutCancelled", "credit",
           "envs", "current", "reward", "role", "rollout", "step", "traced", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'lightning_lab' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value

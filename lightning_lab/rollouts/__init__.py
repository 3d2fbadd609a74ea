"""Running agents to get trajectories: concurrent traced rollouts and greedy evaluation."""

from .evaluation import evaluate
from .threads import run_rollouts

__all__ = ["evaluate", "run_rollouts"]

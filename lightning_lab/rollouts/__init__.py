"""Running agents to get trajectories: concurrent traced rollouts (threads for plain agents, an
event loop for ``async def`` ones, child processes for agents in any language), timeouts, and
greedy evaluation."""

from .aio import arun_rollouts
from .evaluation import evaluate
from .process import ProcessAgentError, process_agent
from .threads import run_rollouts

__all__ = ["evaluate", "run_rollouts", "arun_rollouts", "process_agent", "ProcessAgentError"]

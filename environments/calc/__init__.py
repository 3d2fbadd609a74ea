"""``calc``: arithmetic word problems solved with a calculator tool by a plain OpenAI-SDK loop.

The agent (``agent.solve``) calls the model through lightning-lab's OpenAI-compatible proxy with
``tools=[calculator]``, runs the calls, sends ``role: "tool"`` results and reads the final number;
reward 1 for the exact answer. Levels ``easy``/``medium``/``hard`` (see ``problems``); train and
dev problems are disjoint. Metrics: accuracy, valid-tool-call rate of the first reply, per level.
"""
from __future__ import annotations

from statistics import fmean
from typing import Any, Sequence

import lightning_lab as ll

from .agent import CalcAgentConfig, final_number, make_agent, solve
from .calculator import TOOL, calculate
from .problems import LEVELS, CalcTask, generate

__all__ = ["CalcAgentConfig", "CalcTask", "LEVELS", "TOOL", "calculate", "final_number",
           "generate", "load_tasks", "make_agent", "solve", "summarize"]

SPLIT_SEEDS = {"train": 1, "dev": 2}
SPLIT_SIZES = {"train": 600, "dev": 60}


def load_tasks(split: str = "train", data: Any = None, seed: int = 0, limit: int | None = None,
               levels: str | Sequence[str] | None = None) -> list[CalcTask]:
    """Generated problems; dev never repeats a train question."""
    if data not in (None, "generated"):
        raise ValueError("calc generates its own problems; it takes no --data path")
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_SEEDS)}, got {split!r}")
    chosen = tuple(levels.split(",") if isinstance(levels, str) else levels or LEVELS)
    if not set(chosen) <= set(LEVELS):
        raise ValueError(f"unknown levels {sorted(set(chosen) - set(LEVELS))}; expected {LEVELS}")
    tasks = generate(SPLIT_SIZES[split], 1000 * seed + SPLIT_SEEDS[split], chosen, prefix=split)
    if split == "dev":
        seen = {t.question for t in generate(SPLIT_SIZES["train"], 1000 * seed + 1, chosen)}
        tasks = [t for t in tasks if t.question not in seen]
    return tasks[:limit] if limit else tasks


def summarize(batch: Any) -> dict[str, float]:
    """Accuracy and valid-tool-call rate (first reply parsed into a call), overall and per level."""
    metas = [t.meta for t in batch]
    if not metas:
        return {"accuracy": 0.0, "valid_tool_call": 0.0, "n": 0.0}
    summary = {
        "accuracy": fmean(float(bool(m.get("correct"))) for m in metas),
        "valid_tool_call": fmean(float(bool(m.get("first_call_valid"))) for m in metas),
        "computed": fmean(float(bool(m.get("computed"))) for m in metas),
        "tool_calls": fmean(float(m.get("tool_calls", 0)) for m in metas),
        "n": float(len(metas)),
        "failed": float(sum(t.status != "ok" for t in batch)),
    }
    for level in LEVELS:
        scores = [float(bool(m.get("correct"))) for m in metas if m.get("level") == level]
        if scores:
            summary[f"accuracy_{level}"] = fmean(scores)
    return summary


ll.envs.register(ll.envs.Environment(
    name="calc", load_tasks=load_tasks, make_agent=make_agent, summarize=summarize,
    description="arithmetic word problems, calculator tool, OpenAI-SDK tool loop via the proxy, "
                "reward = exact answer"))

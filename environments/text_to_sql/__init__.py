"""Text-to-SQL environment: questions over SQLite databases, scored by execution accuracy.

Data: six generated databases with templated questions (default; train/dev split by database)
or Spider in its original layout. Agent: writer -> execute -> checker -> rewriter, reward =
Spider execution accuracy of the final query. Registers itself as `ll.envs.get("text_to_sql")`.
"""
from __future__ import annotations

from pathlib import Path
from statistics import fmean
from typing import Any, Sequence

import lightning_lab as ll

from .agent import SQLAgentConfig, make_agent, run_agent
from .data import build_databases, generate_tasks
from .hardness import LEVELS, spider_hardness
from .prompts import parse_verdict
from .reward import RewardConfig, SQLScore, execution_match, results_match, score_sql
from .schema import schema_text
from .similarity import sql_similarity
from .demos import demonstrations
from .spider import SpiderFormatError, SpiderFormatWarning, load_spider, split_by_database
from .sql import ExecResult, extract_sql, is_valid_sql, run_sql
from .task import SQLTask

__all__ = [
    "ExecResult", "RewardConfig", "SQLAgentConfig", "SQLScore", "SQLTask", "SpiderFormatError",
    "SpiderFormatWarning", "build_databases", "execution_match", "extract_sql",
    "generate_tasks", "is_valid_sql", "load_spider", "load_tasks", "make_agent",
    "parse_verdict", "results_match", "run_agent", "run_sql", "schema_text", "score_sql",
    "spider_hardness", "split_by_database", "sql_similarity", "summarize", "demonstrations",
]


def load_tasks(split: str = "train", data: str | Path | None = None, seed: int = 0,
               limit: int | None = None, levels: str | Sequence[str] | None = None,
               by_database: bool = False, with_generated: bool = False) -> list[SQLTask]:
    """Tasks of a split: generated (data=None or "generated") or Spider from a folder.

    For Spider, `split` picks `dev.json` or `train_spider.json` and `seed` is ignored; `limit`
    keeps the first tasks in file order (so evaluations on a prefix are comparable). `levels`
    ("hard,extra" or a list) keeps only questions of those Spider levels, applied before `limit`.
    `by_database=True` splits Spider's dev file by database instead (`split_by_database`):
    "train" = the training databases' questions, "dev" = the held-out databases'.
    `with_generated=True` adds the generated training tasks after the Spider ones in the "train"
    split (train on generated data and the training databases at once); "dev" stays Spider only,
    so a run's evaluations stay the held-out table.
    """
    if data is None or str(data) == "generated":
        tasks = generate_tasks(seed=seed, split=split)
    else:
        path = Path(data)
        if not path.exists():
            raise FileNotFoundError(f"text_to_sql: no Spider data at {path} "
                                    "(or pass data='generated')")
        if by_database:
            tasks = load_spider(path, split="dev")
            train_dbs, held_out = split_by_database(tasks)
            keep = set(held_out if split == "dev" else train_dbs)
            tasks = [t for t in tasks if t.db_id in keep]
        else:
            tasks = load_spider(path, split=split, limit=None if levels or with_generated else limit)
        if with_generated and split == "train":
            tasks = tasks + generate_tasks(seed=seed, split="train")
    if levels:
        wanted = set(levels.split(",") if isinstance(levels, str) else levels)
        if not wanted <= set(LEVELS):
            raise ValueError(f"unknown levels {sorted(wanted - set(LEVELS))}; expected {LEVELS}")
        tasks = [t for t in tasks if t.difficulty in wanted]
    return tasks if limit is None else tasks[:limit]


def summarize(batch: Any) -> dict[str, float]:
    """Execution accuracy and shaping-term rates of a batch; failed rollouts count as 0."""
    trajectories = list(batch)
    metas = [t.meta for t in trajectories]
    if not metas:
        return {"exec_acc": 0.0, "n": 0.0}

    def rate(key: str) -> float:
        return fmean(float(bool(m.get(key, False))) for m in metas)

    summary = {
        "exec_acc": fmean(float(m.get("exec_acc", 0.0)) for m in metas),
        "n": float(len(metas)),
        "parsed_rate": rate("parsed"),
        "executed_rate": rate("executed"),
        "no_sql_rate": fmean(float(m.get("no_sql", "pred_sql" not in m)) for m in metas),
        "rewrites": fmean(float(m.get("rewrites", 0)) for m in metas),
        "failed": float(sum(getattr(t, "status", "ok") != "ok" for t in trajectories)),
    }
    if any("gold_empty" in m for m in metas):
        # Spider counts an empty prediction as correct when gold is empty too (16 of the 213
        # shared dev questions), which a weak model earns by accident; this rate leaves them out.
        kept = [float(m.get("exec_acc", 0.0)) for m in metas if not m.get("gold_empty", False)]
        summary["exec_acc_nonempty_gold"] = fmean(kept) if kept else 0.0
        summary["gold_empty_rate"] = rate("gold_empty")
    if any("similarity" in m for m in metas):  # absent in logs older than the field
        summary["similarity"] = fmean(float(m.get("similarity", 0.0)) for m in metas)
    for level in LEVELS:
        scores = [float(m.get("exec_acc", 0.0)) for m in metas if m.get("difficulty") == level]
        if scores:
            summary[f"exec_acc_{level}"] = fmean(scores)
    return summary


ll.envs.register(ll.envs.Environment(
    name="text_to_sql",
    load_tasks=load_tasks,
    make_agent=make_agent,
    summarize=summarize,
    demonstrations=demonstrations,
    description="text-to-SQL over SQLite (generated dbs or Spider), writer/checker/rewriter agent, "
                "reward = execution accuracy",
))

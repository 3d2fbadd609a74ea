"""The task record shared by the generated data and the Spider loader."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SQLTask:
    """One text-to-SQL question over one SQLite database.

    The agent needs only `question`, `schema` and `db_path`; `gold_sql` is used by the reward.
    Frozen so a task can be shared across concurrently running agents without surprises.
    """

    task_id: str
    """Stable id (`<db_id>-<index>` for generated data, `spider-<split>-<index>` for Spider)."""
    question: str
    """Natural-language question."""
    gold_sql: str
    """Reference SQL; scored by execution, so any equivalent query is fine."""
    db_id: str
    """Database name (also the split unit: a dev db never appears in train)."""
    db_path: str
    """Path to the `.sqlite` file."""
    schema: str
    """CREATE TABLE statements of the database (without sample rows)."""
    difficulty: str | None = None
    """Spider's level of the gold query: easy | medium | hard | extra (`hardness.py`)."""



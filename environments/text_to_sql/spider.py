"""Loader for Spider in its original layout.

    <path>/dev.json | train_spider.json   [{"db_id", "question", "query", ...}, ...]
    <path>/tables.json                    (optional here: the schema is read from the .sqlite)
    <path>/database/<db_id>/<db_id>.sqlite

A malformed record is reported with the file and the record index and skipped (or raised with
`strict=True`), so one bad line does not cost the whole split; a missing database is always an
error, because every task over it would silently score 0.
"""
from __future__ import annotations

import json
import sqlite3
import warnings
from pathlib import Path

from .hardness import spider_hardness
from .schema import schema_text
from .task import SQLTask

SPLIT_FILES = {"dev": ("dev.json",), "train": ("train_spider.json", "train.json")}
_REQUIRED = ("db_id", "question", "query")


class SpiderFormatError(ValueError):
    """A Spider file or record that cannot be read."""


class SpiderFormatWarning(UserWarning):
    """A malformed Spider record was skipped."""


def _split_file(root: Path, split: str) -> Path:
    if split not in SPLIT_FILES:
        raise ValueError(f"unknown Spider split {split!r}; expected one of {sorted(SPLIT_FILES)}")
    for name in SPLIT_FILES[split]:
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"Spider {split} file not found: looked for "
                            f"{', '.join(str(root / n) for n in SPLIT_FILES[split])}")


def _record_problem(record: object) -> str | None:
    if not isinstance(record, dict):
        return f"expected an object, got {type(record).__name__}"
    for key in _REQUIRED:
        value = record.get(key)
        if not isinstance(value, str) or not value.strip():
            return f"field {key!r} missing or not a non-empty string"
    return None


def db_path_for(root: Path, db_id: str) -> Path:
    return root / "database" / db_id / f"{db_id}.sqlite"


def load_spider(path: str | Path, split: str = "dev", *, strict: bool = False,
                limit: int | None = None) -> list[SQLTask]:
    """Spider questions of `split` as `SQLTask`s (task ids `spider-<split>-<index>`).

    `path` is the Spider root folder (or the split's JSON file itself, with `database/` beside it).
    Malformed records warn (`SpiderFormatWarning`) and are skipped; with `strict=True` they raise
    `SpiderFormatError`. A missing `.sqlite` raises FileNotFoundError naming db_id and path.
    """
    path = Path(path)
    file = path if path.is_file() else _split_file(path, split)
    root = file.resolve().parent
    try:
        records = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or bad UTF-8
        raise SpiderFormatError(f"{file}: cannot read Spider JSON: {type(e).__name__}: {e}") from e
    if not isinstance(records, list):
        raise SpiderFormatError(f"{file}: expected a JSON list of records, "
                                f"got {type(records).__name__}")
    tasks: list[SQLTask] = []
    checked: dict[str, Path] = {}
    schemas: dict[str, str] = {}
    for i, record in enumerate(records):
        problem = _record_problem(record)
        if problem:
            msg = f"{file}: record {i}: {problem}"
            if strict:
                raise SpiderFormatError(msg)
            warnings.warn(msg + " (skipped)", SpiderFormatWarning, stacklevel=2)
            continue
        db_id = record["db_id"]
        if db_id not in checked:
            db_path = db_path_for(root, db_id)
            if not db_path.is_file():
                raise FileNotFoundError(f"Spider database for db_id {db_id!r} (record {i} of "
                                        f"{file}) not found at {db_path}")
            try:  # a corrupt file fails every task over it: an error, like a missing one
                schemas[db_id] = schema_text(str(db_path))
            except sqlite3.Error as e:
                raise SpiderFormatError(f"{db_path}: not a readable SQLite database (db_id "
                                        f"{db_id!r}, record {i} of {file}): {e}") from e
            checked[db_id] = db_path
        db_path = checked[db_id]
        tasks.append(SQLTask(task_id=f"spider-{split}-{i:04d}", question=record["question"].strip(),
                             gold_sql=record["query"].strip(), db_id=db_id, db_path=str(db_path),
                             schema=schemas[db_id], difficulty=record.get("hardness")
                             or spider_hardness(record["query"])))
        if limit is not None and len(tasks) >= limit:
            break
    return tasks


def split_by_database(tasks: list[SQLTask]) -> tuple[list[str], list[str]]:
    """(training db_ids, held-out db_ids) of a set of Spider tasks, by a fixed rule.

    Spider's questions come in paraphrase pairs over the same database, so a split by question
    leaks answers into training; only a split by database measures transfer to unseen schemas.
    Rule: databases sorted by question count (largest first, ties by name); the 1st, 3rd, 5th...
    are held out, the 2nd, 4th... train. Both sides get large and small schemas, about half the
    questions each, and the split follows from the data alone (on the shared 647-question dev:
    held out world_1, dog_kennels, student_transcripts_tracking, poker_player, course_teach,
    battle_death = 366 questions; train cre_Doc_Template_Mgt, flight_2, concert_singer,
    employee_hire_evaluation, singer, real_estate_properties = 281).
    """
    counts: dict[str, int] = {}
    for task in tasks:
        counts[task.db_id] = counts.get(task.db_id, 0) + 1
    ranked = sorted(counts, key=lambda db: (-counts[db], db))
    return ranked[1::2], ranked[0::2]

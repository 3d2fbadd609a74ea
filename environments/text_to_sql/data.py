"""Generated text-to-SQL data: six SQLite databases and templated questions, from a seed.

Databases are written once per seed to `<cache>/text_to_sql/<seed>/<db_id>.sqlite` (cache =
`$LIGHTNING_LAB_CACHE` or `~/.cache/lightning-lab`), atomically, with a version stamp so a
changed generator never reuses stale files. The train/dev split is by database, as in Spider:
a model evaluated on dev has never seen those schemas.
"""
from __future__ import annotations

import os
import random
import sqlite3
import tempfile
import threading
from functools import lru_cache
from pathlib import Path

import lightning_lab as ll

from .domains import BUILDERS, DEV_DBS, TRAIN_DBS, Domain
from .hardness import spider_hardness
from .questions import domain_questions
from .schema import schema_text
from .task import SQLTask

GENERATOR_VERSION = "2"
"""Bump when domains or templates change; cached databases with another stamp are rebuilt."""
SPLITS = {"train": TRAIN_DBS, "dev": DEV_DBS}
ROUNDS = {"train": 3, "dev": 1}
"""Passes of the templates per database. Each pass draws new filter values and wordings, so
train sees each template several ways (more like Spider's free-form questions) while dev keeps
one instance per template and stays quick to evaluate."""
SPIDER_LAYOUT = frozenset({"school", "shop", "airline"})
"""Databases whose stored DDL is laid out like Spider's (quoted names, one column per line,
key clauses at the end); the others keep one-line DDL. The prompt shows the stored DDL, so
training on both layouts keeps a policy from tying what it learned to one way of writing a
schema, and Spider's layout is what it meets on the benchmark."""
_lock = threading.Lock()


def default_cache_dir(seed: int) -> Path:
    return ll.cache_dir() / "text_to_sql" / str(seed)


def _rng(seed: int, db_id: str) -> random.Random:
    # str seeds are hashed with SHA-512 by `random`, so this is stable across processes.
    return random.Random(f"text_to_sql/{GENERATOR_VERSION}/{seed}/{db_id}")


def spider_layout(ddl: str) -> str:
    """`ddl` (one CREATE TABLE) rewritten in Spider's layout, read back via SQLite's PRAGMAs."""
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute("PRAGMA foreign_keys = OFF")  # referenced tables do not exist here
        conn.execute(ddl)
        (table,) = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchone()
        cols = conn.execute(f'PRAGMA table_info("{table}")').fetchall()
        fks = conn.execute(f'PRAGMA foreign_key_list("{table}")').fetchall()
    finally:
        conn.close()
    lines = [f'"{c[1]}" {c[2]}' + (" NOT NULL" if c[3] else "") for c in cols]
    keys = [c[1] for c in sorted(cols, key=lambda c: c[5]) if c[5]]
    if keys:
        lines.append("PRIMARY KEY (" + ",".join(f'"{k}"' for k in keys) + ")")
    # `REFERENCES t` without a column (fk[4] is None) means t's primary key; keep it implicit.
    lines += [f'FOREIGN KEY ("{fk[3]}") REFERENCES "{fk[2]}"' + (f'("{fk[4]}")' if fk[4] else "")
              for fk in sorted(fks, key=lambda fk: -fk[0])]  # PRAGMA lists them last-first
    return f'CREATE TABLE "{table}" (\n' + ",\n".join(lines) + "\n)"


def _write_db(domain: Domain, path: Path) -> None:
    """Write `domain` to `path` via a temp file + rename, so readers never see a partial db."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        conn = sqlite3.connect(tmp)
        with conn:
            conn.execute(f"PRAGMA user_version = {int(GENERATOR_VERSION)}")
            for ddl in domain.ddl:
                conn.execute(spider_layout(ddl) if domain.db_id in SPIDER_LAYOUT else ddl)
            for table, rows in domain.rows.items():
                if rows:
                    marks = ", ".join("?" * len(rows[0]))
                    conn.executemany(f"INSERT INTO {table} VALUES ({marks})", rows)
        conn.close()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _is_current(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return conn.execute("PRAGMA user_version").fetchone()[0] == int(GENERATOR_VERSION)
        finally:
            conn.close()
    except sqlite3.Error:
        return False


def build_databases(seed: int = 0, cache_dir: str | Path | None = None,
                    db_ids: tuple[str, ...] | None = None) -> dict[str, Path]:
    """Make sure the generated databases exist; returns {db_id: path}."""
    root = Path(cache_dir) if cache_dir else default_cache_dir(seed)
    out = {}
    with _lock:
        for db_id in db_ids or tuple(BUILDERS):
            path = root / f"{db_id}.sqlite"
            if not _is_current(path):
                _write_db(BUILDERS[db_id](_rng(seed, db_id)), path)
            out[db_id] = path
    return out


@lru_cache(maxsize=16)
def _tasks(seed: int, split: str, cache_dir: str | None) -> tuple[SQLTask, ...]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    paths = build_databases(seed, cache_dir, SPLITS[split])
    tasks: list[SQLTask] = []
    for db_id, path in paths.items():
        # The questions' rng is separate from the rows' rng but equally seeded.
        rng = _rng(seed, db_id + "/questions")
        domain = BUILDERS[db_id](_rng(seed, db_id))  # metadata only; rows already on disk
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            seen: set[str] = set()
            schema = schema_text(str(path))
            drafts = [q for _ in range(ROUNDS[split]) for q in domain_questions(domain, conn, rng)]
            for question, sql in drafts:
                if question in seen:
                    continue
                try:
                    rows = conn.execute(sql).fetchmany(1)
                except sqlite3.Error as e:  # a template bug; surface it loudly
                    raise RuntimeError(f"generated gold SQL fails on {db_id}: {sql}: {e}") from e
                if not rows or rows[0][0] is None:  # empty, or an aggregate over no rows
                    continue
                seen.add(question)
                tasks.append(SQLTask(task_id=f"{db_id}-{len(seen) - 1:03d}", question=question,
                                     gold_sql=sql, db_id=db_id, db_path=str(path),
                                     schema=schema, difficulty=spider_hardness(sql)))
        finally:
            conn.close()
    return tuple(tasks)


def generate_tasks(seed: int = 0, split: str = "train",
                   cache_dir: str | Path | None = None) -> list[SQLTask]:
    """Generated questions for `split` ("train": school, library, shop, hospital;
    "dev": airline, music). Deterministic in `seed`; every gold query has a non-empty result."""
    return list(_tasks(int(seed), split, str(cache_dir) if cache_dir else None))

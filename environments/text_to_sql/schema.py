"""Schema text for prompts, read from the database itself.

We read `sqlite_master` rather than Spider's `tables.json` so generated and Spider databases are
described the same way, and the model sees exactly the DDL the engine will execute against.
"""
from __future__ import annotations

import re
import sqlite3
from functools import lru_cache

from .sql import connect_readonly


def _clean_ddl(sql: str) -> str:
    # Spider DDL often carries tabs, blank lines and long runs of spaces; tokens cost context.
    lines = [re.sub(r"\s+", " ", line).strip() for line in sql.splitlines()]
    return "\n".join(line for line in lines if line)


@lru_cache(maxsize=256)
def _schema_cached(db_path: str, sample_rows: int) -> str:
    conn = connect_readonly(db_path)
    try:
        tables = conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'table' AND sql IS NOT NULL "
            "AND name NOT LIKE 'sqlite_%' ORDER BY rowid"
        ).fetchall()
        parts = []
        for name, ddl in tables:
            text = _clean_ddl(ddl).rstrip(";") + ";"
            if sample_rows > 0:
                text += _sample_text(conn, name, sample_rows)
            parts.append(text)
        return "\n\n".join(parts)
    finally:
        conn.close()


def _sample_text(conn: sqlite3.Connection, table: str, n: int) -> str:
    try:
        cur = conn.execute(f'SELECT * FROM "{table}" LIMIT {int(n)}')
        rows = cur.fetchall()
        cols = [d[0] for d in cur.description]
    except sqlite3.Error:
        return ""
    if not rows:
        return ""
    # SQL comments keep the whole prompt valid SQL, which small models imitate better than prose.
    lines = [f"/* {n} example rows from {table}:", " | ".join(cols)]
    lines += [" | ".join(_short(v) for v in row) for row in rows]
    return "\n" + "\n".join(lines) + " */"


def _short(value: object, limit: int = 30) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def schema_text(db_path: str, sample_rows: int = 0) -> str:
    """CREATE TABLE statements of `db_path`, optionally followed by `sample_rows` rows per table."""
    return _schema_cached(str(db_path), int(sample_rows))


@lru_cache(maxsize=256)
def compact_schema(db_path: str) -> str:
    """One line per table, `table(col, col, ...)` plus `-- a.x = b.y` join hints.

    About a third of the DDL's tokens; small models lose less of the question in a short prompt.
    """
    conn = connect_readonly(db_path)
    try:
        lines, joins = [], []
        for name in table_names_conn(conn):
            cols = [r[1] for r in conn.execute(f'PRAGMA table_info("{name}")')]
            lines.append(f"{name}({', '.join(cols)})")
            for fk in conn.execute(f'PRAGMA foreign_key_list("{name}")'):
                # `REFERENCES t` without a column means t's primary key.
                target_col = fk[4] or next((r[1] for r in conn.execute(
                    f'PRAGMA table_info("{fk[2]}")') if r[5]), "rowid")
                join = f"{name}.{fk[3]} = {fk[2]}.{target_col}"
                if join not in joins:
                    joins.append(join)
        if joins:
            lines.append("-- joins: " + ", ".join(joins))
        return "\n".join(lines)
    finally:
        conn.close()


def table_names_conn(conn: sqlite3.Connection) -> list[str]:
    return [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
        "ORDER BY rowid")]


def table_names(db_path: str) -> list[str]:
    """Names of the user tables in `db_path`."""
    conn = connect_readonly(db_path)
    try:
        return [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
    finally:
        conn.close()


def schema_prompt(db_path: str, style: str = "ddl", sample_rows: int = 0) -> str:
    """Schema for a prompt: "ddl" (CREATE TABLE text) or "compact" (one line per table)."""
    if style == "ddl":
        return schema_text(db_path, sample_rows)
    if style != "compact":
        raise ValueError(f"unknown schema style {style!r}; expected 'ddl' or 'compact'")
    text = compact_schema(str(db_path))
    if sample_rows > 0:
        conn = connect_readonly(db_path)
        try:
            text += "".join(_sample_text(conn, t, sample_rows) for t in table_names_conn(conn))
        finally:
            conn.close()
    return text

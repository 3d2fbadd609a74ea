"""Running model-written SQL safely, and finding the SQL inside model output.

Model SQL is untrusted: it may try to write, attach other files, flip pragmas, loop forever
(a recursive CTE without a bound) or build one enormous value in a single function call
(``zeroblob(900000000)``, ``printf('%.*c', 999999999, 'x')``). Guards keep a rollout cheap and
the database intact: a read-only URI connection; an authorizer that only allows reading; a
progress handler that enforces a wall-clock deadline between VM steps; per-connection
``sqlite3_limit``s (no string or blob longer than ``max_value_bytes`` is ever allocated, LIKE
patterns and SQL text are short, nothing can be attached); and a worker process per query slot
that is killed when one VM step outlives the deadline and cannot grow past 512 MB
(``sandbox.py``). Fetching is capped in rows and bytes. Heap limits are not used: SQLite's are
process-wide. Nothing here raises on bad SQL; errors come back as text the checker/rewriter
can read.
"""
from __future__ import annotations

import re
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import sqlglot
from sqlglot import exp

from . import sandbox


@dataclass
class ExecResult:
    """Outcome of one sandboxed query: rows, or an error message (never both)."""

    rows: list[tuple] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    error: str | None = None
    truncated: bool = False
    """True when more than `max_rows` rows (or `max_bytes` bytes) were available and the rest
    were not fetched."""
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def connect_readonly(db_path: str | Path) -> sqlite3.Connection:
    """Open `db_path` read-only (URI `mode=ro`); fails if the file does not exist."""
    path = Path(db_path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"database file not found: {path}")
    conn = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True, check_same_thread=False)
    # Some Spider databases hold non-UTF-8 bytes in TEXT columns; do not fail the whole query.
    conn.text_factory = lambda b: b.decode("utf-8", errors="replace")
    return conn


def run_sql(db_path: str | Path, sql: str | None, *, timeout_s: float = 1.5,
            max_rows: int = 1000, max_bytes: int = 8 << 20,
            max_value_bytes: int = 1 << 20) -> ExecResult:
    """Execute one statement of untrusted SQL on `db_path` in a sandbox worker; never raises.

    The deadline is checked every few thousand VM instructions, so even a query that never
    yields a row (an unbounded recursive CTE under ORDER BY) stops at `timeout_s`; a single
    long function call is stopped by killing its worker shortly after. No value longer than
    `max_value_bytes` is ever built, and at most `max_rows` rows and about `max_bytes` bytes
    come back (`truncated` says whether more were available).
    """
    start = time.monotonic()
    if not sql or not sql.strip():
        return ExecResult(error="empty query")
    path = Path(db_path).resolve()
    if not path.is_file():
        return ExecResult(error=f"cannot open database: database file not found: {path}")
    out = sandbox.execute(str(path), sql, timeout_s=timeout_s, max_rows=max_rows,
                          max_bytes=max_bytes, max_value_bytes=max_value_bytes)
    return ExecResult(rows=out.get("rows", []), columns=out.get("columns", []),
                      error=out.get("error"), truncated=out.get("truncated", False),
                      elapsed_s=time.monotonic() - start)


# ---------------------------------------------------------------------------------------------
# Extraction: models wrap SQL in fences, prose, or trail off into explanations.

_FENCE = re.compile(r"```[ \t]*([A-Za-z]*)[ \t]*\n?(.*?)(?:```|$)", re.S)
_SQL_START = re.compile(r"\b(SELECT|WITH)\b", re.I)


def parse_query(sql: str) -> exp.Expression | None:
    """Parse `sql` as one SQLite query with sqlglot; None unless it is a real SELECT-like query."""
    try:
        tree = sqlglot.parse_one(sql, read="sqlite")
    except Exception:
        return None
    if not isinstance(tree, exp.Query):
        return None
    select = tree if isinstance(tree, exp.Select) else tree.find(exp.Select)
    # sqlglot accepts a bare "SELECT"; a query must select something.
    if select is None or not select.expressions:
        return None
    return tree


def is_valid_sql(sql: str | None) -> bool:
    """True when `sql` parses as a single SELECT-like query."""
    return bool(sql) and parse_query(sql) is not None


def _candidates(text: str) -> list[str]:
    """Plausible SQL snippets in `text`, most trustworthy first."""
    out = []
    for lang, body in _FENCE.findall(text):
        if lang.lower() in ("", "sql", "sqlite") and _SQL_START.search(body):
            out.append(body[_SQL_START.search(body).start():])
    m = _SQL_START.search(text)
    if m:
        out.append(text[m.start():])
    return out


def _best_prefix(snippet: str) -> str | None:
    """Longest prefix of `snippet` that parses, trying statement, line, then word boundaries."""
    snippet = snippet.split(";", 1)[0].replace("```", " ").strip()
    if not snippet:
        return None
    if parse_query(snippet):
        return snippet
    lines = snippet.splitlines()
    for i in range(len(lines) - 1, 0, -1):
        cand = "\n".join(lines[:i]).strip()
        if parse_query(cand):
            return cand
    # Trailing prose on the same line ("SELECT a FROM t This returns ..."): drop words.
    # Only cut before a word that cannot continue a query, so a query truncated mid-clause
    # ("... WHERE") is not "repaired" into a different, valid query.
    words = snippet.split()
    for i in range(len(words) - 1, max(1, len(words) - 40), -1):
        if _continues_sql(words[i]):
            continue
        cand = " ".join(words[:i])
        if parse_query(cand):
            return cand
    return None


_SQL_WORDS = {
    "select", "from", "where", "and", "or", "not", "on", "join", "inner", "left", "outer",
    "cross", "group", "order", "by", "having", "limit", "offset", "union", "intersect", "except",
    "all", "distinct", "as", "in", "like", "between", "is", "null", "asc", "desc", "case", "when",
    "then", "else", "end", "exists", "with", "using", "natural",
}


def _continues_sql(word: str) -> bool:
    w = word.lower()
    return w in _SQL_WORDS or not w[:1].isalpha() or "(" in w or "." in w.rstrip(".")


def extract_sql(text: str | None) -> str | None:
    """The SQL query in model output, or None if there is no SELECT/WITH at all.

    Prefers fenced blocks, cuts at the first `;`, and trims trailing prose until sqlglot parses
    it. If nothing parses, the raw snippet is returned anyway: SQLite's error message is more
    useful to the rewriter (and the logs) than a silent None.
    """
    if not text:
        return None
    cands = _candidates(text)
    for cand in cands:
        best = _best_prefix(cand)
        if best:
            return best
    if cands:
        raw = cands[0].split(";", 1)[0].replace("```", " ").strip()
        return " ".join(raw.split()) or None
    return None

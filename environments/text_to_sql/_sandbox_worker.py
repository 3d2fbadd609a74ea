"""One sandboxed SQLite worker process: reads JSON query lines on stdin, answers JSON lines.

Started by ``sandbox.py`` as ``python -I <this file> <memory_bytes>``; it imports nothing but the
standard library (so it starts in tens of milliseconds and cannot re-run the caller's script),
caps its own address space, and is killed by its parent when a query outlives its deadline.
"""

from __future__ import annotations

import base64
import json
import resource
import sqlite3
import sys
import time
from urllib.parse import quote

_ALLOWED_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION,
                    getattr(sqlite3, "SQLITE_RECURSIVE", 33)}
# Functions that could reach outside the database file even on a read-only connection.
_DENIED_FUNCTIONS = {"load_extension", "readfile", "writefile", "edit", "fts3_tokenizer"}
_LIMITS = {
    sqlite3.SQLITE_LIMIT_SQL_LENGTH: 100_000,
    sqlite3.SQLITE_LIMIT_LIKE_PATTERN_LENGTH: 1000,
    sqlite3.SQLITE_LIMIT_ATTACHED: 0,
}


def _authorizer(action: int, arg1, arg2, dbname, source) -> int:
    if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() in _DENIED_FUNCTIONS:
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK if action in _ALLOWED_ACTIONS else sqlite3.SQLITE_DENY


def _cell(value: object) -> object:
    if isinstance(value, bytes):  # JSON has no bytes
        return {"b64": base64.b64encode(value).decode()}
    return value


def run(db_path: str, sql: str, timeout_s: float, max_rows: int, max_bytes: int,
        max_value_bytes: int) -> dict:
    start = time.monotonic()
    deadline = start + timeout_s
    try:
        conn = sqlite3.connect(f"file:{quote(db_path)}?mode=ro", uri=True)
    except Exception as e:  # noqa: BLE001 - unreadable file
        return {"error": f"cannot open database: {e}"}
    # Some Spider databases hold non-UTF-8 bytes in TEXT columns; do not fail the whole query.
    conn.text_factory = lambda b: b.decode("utf-8", errors="replace")
    try:
        conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, max_value_bytes)
        for category, limit in _LIMITS.items():
            conn.setlimit(category, limit)
        conn.set_authorizer(_authorizer)
        conn.set_progress_handler(lambda: 1 if time.monotonic() > deadline else 0, 2000)
        cur = conn.execute(sql)
        columns = [d[0] for d in cur.description or []]
        rows, size, truncated = [], 0, False
        for row in cur:
            if len(rows) == max_rows or size > max_bytes:
                truncated = True
                break
            rows.append([_cell(v) for v in row])
            size += sum(len(v) if isinstance(v, (str, bytes)) else 8 for v in row)
        return {"rows": rows, "columns": columns, "truncated": truncated}
    except Exception as e:  # noqa: BLE001 - sqlite3.Error, Warning, MemoryError, ...
        msg = str(e) or type(e).__name__
        if time.monotonic() > deadline and "interrupt" in msg.lower():
            msg = f"query exceeded the {timeout_s:g}s time limit"
        elif "too big" in msg:
            msg += f" (values are limited to {max_value_bytes} bytes)"
        elif isinstance(e, MemoryError) or "out of memory" in msg:
            msg = "query ran out of the sandbox's memory"
        return {"error": msg}
    finally:
        conn.close()


def main() -> None:
    memory = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    for line in sys.stdin:
        job = json.loads(line)
        out = run(**job)
        try:
            text = json.dumps(out)
        except MemoryError:
            text = json.dumps({"error": "query result too large for the sandbox's memory"})
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()

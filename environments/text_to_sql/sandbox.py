"""Killable SQLite workers: the hard wall-clock and memory bound on model-written SQL.

SQLite checks its progress handler between VM steps, so one long step, a single function call
such as ``printf('%.*c', 999999999, 'x')`` (14 s on SQLite 3.40 even under a 1 MB length limit),
never sees the deadline. Queries therefore run in small worker processes
(``_sandbox_worker.py``, standard library only, address space capped with ``RLIMIT_AS``) that
the caller kills when a query outlives ``timeout_s`` plus a short grace; the next query starts
a fresh worker. Workers are reused between queries (start-up is tens of milliseconds, a query
usually a millisecond) and at most ``MAX_WORKERS`` run at once.
"""

from __future__ import annotations

import atexit
import base64
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

__all__ = ["execute", "MAX_WORKERS", "MEMORY_BYTES", "GRACE_S"]

MAX_WORKERS = 4
MEMORY_BYTES = 512 << 20
"""Address-space cap of a worker: allocations beyond it fail inside the worker."""
GRACE_S = 0.1
"""How long past ``timeout_s`` a worker may take before it is killed."""
_WORKER = str(Path(__file__).with_name("_sandbox_worker.py"))


class _Worker:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-I", _WORKER, str(MEMORY_BYTES)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, bufsize=1)

    def ask(self, job: dict[str, Any], wait_s: float) -> dict[str, Any] | None:
        """The worker's answer, or None if it did not answer within ``wait_s`` (or died)."""
        answer: list[str] = []
        reader = threading.Thread(target=lambda: answer.append(self.proc.stdout.readline()),
                                  daemon=True)
        try:
            self.proc.stdin.write(json.dumps(job) + "\n")
            self.proc.stdin.flush()
        except OSError:
            return None
        reader.start()
        reader.join(wait_s)
        if not answer or not answer[0]:
            return None
        return json.loads(answer[0])

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


_idle: list[_Worker] = []
_lock = threading.Lock()
_slots = threading.BoundedSemaphore(MAX_WORKERS)


def _decode(value: Any) -> Any:
    return base64.b64decode(value["b64"]) if isinstance(value, dict) else value


def execute(db_path: str, sql: str, *, timeout_s: float, max_rows: int, max_bytes: int,
            max_value_bytes: int) -> dict[str, Any]:
    """Run one query in a worker: ``{"rows", "columns", "truncated"}`` or ``{"error"}``."""
    job = dict(db_path=db_path, sql=sql, timeout_s=timeout_s, max_rows=max_rows,
               max_bytes=max_bytes, max_value_bytes=max_value_bytes)
    with _slots:
        with _lock:
            worker = _idle.pop() if _idle else None
        if worker is None or worker.proc.poll() is not None:
            worker = _Worker()
        answer = worker.ask(job, timeout_s + GRACE_S)
        if answer is None:  # over time, or died (memory): never reuse it
            alive = worker.proc.poll() is None
            worker.kill()
            return {"error": f"query exceeded the {timeout_s:g}s time limit" if alive
                    else "query crashed the sandbox (out of memory?)"}
        with _lock:
            _idle.append(worker)
    if "rows" in answer:
        answer["rows"] = [tuple(_decode(v) for v in row) for row in answer["rows"]]
    return answer


@atexit.register
def _shutdown() -> None:
    with _lock:
        while _idle:
            _idle.pop().kill()

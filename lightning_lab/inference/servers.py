"""Several rollout servers behind one client: least-outstanding routing and failure bookkeeping.

Why one pool for both HTTP clients (``VLLMEngine`` for in-process agents, the proxy's
``RemoteBackend`` for HTTP agents): the trainer must learn, after a step's rollouts, whether a
server failed during them, whichever client saw it, and the adapter sync must reach exactly the
servers requests may go to.

A server *fails* when a request to it gets no HTTP answer (connection refused or reset, a
timeout): a dead or hung process. An HTTP error status is an answer, about that request, and is
not a server failure. What a failure does depends on ``allow_degraded``:

- off (the default): the failure is recorded and the request fails naming the URL; the
  trainer's ``check`` after the step's rollouts raises ``RolloutServerError`` with every failure,
  so the step fails instead of training on what the other servers sampled.
- on: the server is dropped for the rest of the process (a warning names it and the error), the
  request is sent again to another server, and the run goes on with the rest; ``check`` raises
  only when none is left.
"""

from __future__ import annotations

import threading
import warnings
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

__all__ = ["RolloutServerError", "ServerPool", "server_urls"]


class RolloutServerError(RuntimeError):
    """A rollout server failed during a step; ``batch`` holds the step's rollouts (failed ones
    carry their error), so the caller can record them before stopping."""

    def __init__(self, message: str, batch: Any = None):
        super().__init__(message)
        self.batch = batch


def server_urls(urls: str | Sequence[str], suffix: str = "") -> list[str]:
    """Server base URLs without a trailing slash, ``suffix`` (e.g. ``/v1``) appended where
    missing; one string is one server."""
    listed = [urls] if isinstance(urls, str) else list(urls)
    if not listed:
        raise ValueError("no rollout server URL given")
    out = []
    for url in listed:
        url = url.rstrip("/")
        out.append(url if not suffix or url.endswith(suffix) else url + suffix)
    if len(set(out)) != len(out):
        raise ValueError(f"a rollout server URL is listed twice: {out}")
    return out


class ServerPool:
    """The servers one client spreads requests over; thread-safe."""

    def __init__(self, urls: Sequence[str], allow_degraded: bool = False):
        self.urls = list(urls)
        self.allow_degraded = allow_degraded
        self.outstanding = dict.fromkeys(self.urls, 0)
        """Requests sent and not yet answered, per server."""
        self.dropped: dict[str, str] = {}
        """Servers no longer used (``allow_degraded``), with the error that dropped them."""
        self.failures: list[tuple[str, str]] = []
        """(URL, error) of each failure since the last ``check``."""
        self._lock = threading.Lock()
        self._turn = 0

    @property
    def live(self) -> list[str]:
        """The servers requests and adapter syncs go to."""
        return [u for u in self.urls if u not in self.dropped]

    @contextmanager
    def lease(self) -> Iterator[str]:
        """The live server with the fewest outstanding requests (ties taken in turn), counted
        as busy until the block ends."""
        with self._lock:
            live = self.live
            if not live:
                raise RolloutServerError(self.report())
            start = self._turn % len(live)
            self._turn += 1
            url = min(live[start:] + live[:start], key=self.outstanding.__getitem__)
            self.outstanding[url] += 1
        try:
            yield url
        finally:
            with self._lock:
                self.outstanding[url] -= 1

    def fail(self, url: str, error: str) -> bool:
        """Record that ``url`` gave no answer; True when the request may go to another server
        (``allow_degraded`` and one is left)."""
        with self._lock:
            self.failures.append((url, error))
            if not self.allow_degraded:
                return False
            if url not in self.dropped:
                self.dropped[url] = error
                warnings.warn(f"rollout server {url} failed ({error}); going on with "
                              f"{len(self.live)} of {len(self.urls)} server(s)", stacklevel=2)
            return bool(self.live)

    def check(self, batch: Any = None) -> None:
        """Raise ``RolloutServerError`` (with ``batch``) for the failures since the last check
        that the run may not go past; forget them either way."""
        with self._lock:
            failures, self.failures = self.failures, []
        if failures and (not self.allow_degraded or not self.live):
            raise RolloutServerError(self.report(failures), batch)

    def report(self, failures: Sequence[tuple[str, str]] = ()) -> str:
        """Which servers failed and how, first error per server."""
        first: dict[str, str] = {}
        for url, error in [*failures, *self.dropped.items()]:
            first.setdefault(url, error)
        lines = "; ".join(f"{url}: {error}" for url, error in first.items())
        if self.allow_degraded:
            return f"no rollout server left of {len(self.urls)} ({lines})"
        hint = ("; pass --vllm-allow-degraded (RunConfig.vllm_allow_degraded) to go on with "
                "the others" if len(self.urls) > 1 else "")
        return f"rollout server failed ({lines}){hint}"

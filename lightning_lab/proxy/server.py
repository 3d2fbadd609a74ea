"""``ll.serve(policy)``: the proxy in a background uvicorn thread, plus per-rollout base URLs.

An unchanged OpenAI-SDK agent only needs a base URL. ``server.rollout()`` hands it one whose
calls land in a trajectory; inside an already-open ``ll.rollout`` (as the trainer runs agents) it
joins that trajectory instead of opening a new one, so in-process ``ll.reward``/``ll.role`` calls
and HTTP calls share one record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from lightning_lab import tracing
from lightning_lab.records import Trajectory

from .app import create_app
from .backends import Backend, LocalBackend
from .config import ServeConfig, check_bind
from .registry import RolloutRegistry, TraceStats

__all__ = ["ProxyServer", "RolloutHandle", "serve", "http_agent", "reward_url"]


@dataclass
class RolloutHandle:
    """What an HTTP agent needs: the base URL that traces into ``trajectory``."""

    rollout_id: str
    base_url: str
    """``.../rollout/<id>/v1``: pass as ``openai.OpenAI(base_url=...)``."""
    trajectory: Trajectory
    server: "ProxyServer"

    @property
    def reward_url(self) -> str:
        return reward_url(self.base_url)

    def reward(self, value: float, *, final: bool = False) -> None:
        """In-process equivalent of ``POST reward_url`` (safe from any thread)."""
        entry = self.server.registry.get(self.rollout_id)
        if entry is None:
            raise tracing.TracingError(f"rollout {self.rollout_id} is closed")
        self.server.registry.reward(entry, value, final)


def reward_url(base_url: str) -> str:
    """``.../rollout/<id>/v1`` -> ``.../rollout/<id>/reward`` (POST ``{"reward": x, "final": b}``)."""
    return base_url.rstrip("/").removesuffix("/v1") + "/reward"


class ProxyServer:
    """An OpenAI-compatible server over a policy (or remote backend) running in a daemon thread."""

    def __init__(self, policy: Any = None, config: ServeConfig | None = None,
                 backend: Backend | None = None):
        if backend is None and policy is None:
            raise ValueError("serve needs a policy or a backend")
        self.config = config or ServeConfig()
        check_bind(self.config)
        self.policy = policy
        self.backend = backend if backend is not None else LocalBackend(policy)
        self.registry = RolloutRegistry()
        self.app = create_app(self.backend, self.registry, self.config)
        self.port: int | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self, timeout_s: float = 20.0) -> "ProxyServer":
        import uvicorn

        if self._thread is not None:
            return self
        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.config.host, self.config.port))
        self.port = sock.getsockname()[1]
        uv_config = uvicorn.Config(self.app, log_level=self.config.log_level, access_log=False,
                                   lifespan="off", timeout_graceful_shutdown=2,
                                   backlog=2048, timeout_keep_alive=60)
        self._server = uvicorn.Server(uv_config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="ll-proxy", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the proxy server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._server, self._thread = None, None

    def __enter__(self) -> "ProxyServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---- addresses -------------------------------------------------------------------------
    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the server is not started")
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """Untraced OpenAI base URL (``.../v1``)."""
        return f"{self.url}/v1"

    @property
    def trace_stats(self) -> TraceStats:
        return self.registry.stats

    # ---- rollouts --------------------------------------------------------------------------
    def open_rollout(self, trajectory: Trajectory, temperature: float | None = None,
                     max_tokens: int | None = None,
                     control: tracing.RolloutControl | None = None) -> RolloutHandle:
        """Route ``handle.base_url`` to ``trajectory`` until ``close_rollout`` (or ``control``
        cancels it: its in-flight calls are aborted and answer 408)."""
        entry = self.registry.open(trajectory, temperature, max_tokens, control)
        return RolloutHandle(entry.rollout_id, f"{self.url}/rollout/{entry.rollout_id}/v1",
                             trajectory, self)

    def close_rollout(self, handle: RolloutHandle) -> None:
        self.registry.close(handle.rollout_id)

    @contextlib.contextmanager
    def rollout(self, task_id: str = "", *, group_id: str = "", temperature: float | None = None,
                catch: bool = False, meta: dict[str, Any] | None = None,
                max_tokens: int | None = None) -> Iterator[RolloutHandle]:
        """A base URL tracing into a trajectory: the open ``ll.rollout``'s, or a new one.

        Joining (inside ``ll.rollout``) ignores ``task_id``/``group_id``/``meta``; the enclosing
        rollout's default temperature applies to calls that send none, and its cancellation (a
        runner's timeout) closes the URL. ``max_tokens`` is this rollout's default budget.
        """
        joined = tracing.active_trajectory()
        if joined is not None:
            if temperature is None:
                temperature = tracing.current_temperature()
            handle = self.open_rollout(joined, temperature, max_tokens,
                                       tracing.current_control())
            try:
                yield handle
            finally:
                self.close_rollout(handle)
            return
        with tracing.rollout(task_id, group_id=group_id, temperature=temperature, catch=catch,
                             meta=meta) as traj:
            handle = self.open_rollout(traj, temperature, max_tokens)
            try:
                yield handle
            finally:  # before the rollout finalises its rewards: late calls get a 404
                self.close_rollout(handle)


def serve(policy: Any = None, config: ServeConfig | None = None, *,
          backend: Backend | None = None, **settings: Any) -> ProxyServer:
    """Start the proxy over ``policy`` (or ``backend``) and return it; ``with`` stops it on exit.

    ``settings`` are ``ServeConfig`` fields applied over ``config`` (``serve(policy,
    default_max_tokens=64)``); ``adapter_dirs`` (with ``api_key``) turns on
    ``/v1/load_lora_adapter``.
    """
    config = dataclasses.replace(config or ServeConfig(), **settings)
    return ProxyServer(policy, config, backend).start()


def http_agent(server: ProxyServer, agent_fn: Callable[..., Any], *,
               max_tokens: int | None = None) -> Callable[[Any], Any]:
    """Adapt ``agent_fn(task, base_url=...)`` (any OpenAI-SDK agent) to the trainer's ``agent(task)``.

    The trainer runs ``agent(task)`` inside its own ``ll.rollout``; the HTTP calls made through
    ``base_url`` append to that trajectory, and ``ll.reward`` inside ``agent_fn`` works as usual.
    An ``async def agent_fn`` (e.g. with ``openai.AsyncOpenAI``) gives an async agent, which the
    runner awaits. ``max_tokens`` is the default budget of calls that send none.
    """
    from lightning_lab.rollouts.jobs import is_async_agent, returned_awaitable

    if is_async_agent(agent_fn):
        async def agent(task: Any) -> Any:
            with server.rollout(max_tokens=max_tokens) as handle:
                return await agent_fn(task, base_url=handle.base_url)
    else:
        def agent(task: Any) -> Any:
            with server.rollout(max_tokens=max_tokens) as handle:
                result = agent_fn(task, base_url=handle.base_url)
                returned_awaitable(result)
                return result

    agent.__name__ = getattr(agent_fn, "__name__", "http_agent")
    agent.__doc__ = agent_fn.__doc__
    return agent

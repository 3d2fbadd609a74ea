"""``ll.serve(policy)``: the proxy in a background uvicorn thread, plus per-rollout base URLs.

An unchanged OpenAI-SDK agent only needs a base URL. ``server.rollout()`` hands it one whose
calls land in a trajectory; inside an already-open ``ll.rollout`` (as the trainer runs agents) it
joins that trajectory instead of opening a new one, so in-process ``ll.reward``/``ll.step`` calls
and HTTP calls share one record.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from lightning_lab import tracing
from lightning_lab.records import Trajectory

from .app import AppConfig, create_app
from .backends import Backend, LocalBackend
from .limits import LOOPBACK_HOSTS, Limits
from .registry import RolloutRegistry, TraceStats

__all__ = ["ServeConfig", "ProxyServer", "RolloutHandle", "serve", "http_agent", "reward_url"]


@dataclass
class ServeConfig:
    """Network and safety settings of ``ll.serve``."""

    host: str = "127.0.0.1"
    """Interface to bind; loopback unless ``allow_remote`` (and an ``api_key``) say otherwise."""
    port: int = 0
    """0 picks a free port; read it back from ``server.port`` / ``server.base_url``."""
    api_key: str | None = None
    """Require ``Authorization: Bearer <api_key>`` on every request."""
    allow_remote: bool = False
    """Permit a non-loopback host (the policy would otherwise be reachable by anyone on the network)."""
    default_max_tokens: int = 512
    """Budget for requests that send no max_tokens (a rollout may set its own default)."""
    max_tokens_cap: int | None = None
    """Clamp every request's max_tokens to this; None = no cap."""
    served_model_names: tuple[str, ...] = ()
    """Extra names accepted as ``model`` (the policy's name always is; others get a 404)."""
    log_level: str = "warning"
    adapter_dirs: tuple[str, ...] = ()
    """Enables ``POST /v1/load_lora_adapter`` for checkpoints under these directories (needs
    ``api_key``); off by default, because it swaps the weights every client is served."""
    allowed_hosts: tuple[str, ...] | None = None
    """Host-header names to answer (DNS-rebinding defence). None: the loopback names (plus
    ``host``) on a loopback bind; no check on a remote bind, where the API key is the gate."""
    limits: Limits = field(default_factory=Limits)
    """Body-size and token caps per request and per server (see ``proxy/limits.py``)."""

    def hosts(self) -> tuple[str, ...] | None:
        if self.allowed_hosts is not None:
            return tuple(self.allowed_hosts)
        if _is_loopback(self.host):
            return tuple(dict.fromkeys((*LOOPBACK_HOSTS, self.host.strip("[]").lower())))
        return None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(config: ServeConfig) -> None:
    """Refuse to expose the policy beyond this machine without an explicit opt-in and a key."""
    if _is_loopback(config.host):
        return
    if not config.allow_remote:
        raise ValueError(f"refusing to bind {config.host!r}: not a loopback address; "
                         "pass allow_remote=True (and an api_key) to serve other machines")
    if not config.api_key:
        raise ValueError(f"refusing to bind {config.host!r} without an api_key")


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
        self.app = create_app(self.backend, self.registry, AppConfig(
            api_key=self.config.api_key, default_max_tokens=self.config.default_max_tokens,
            max_tokens_cap=self.config.max_tokens_cap,
            served_model_names=tuple(self.config.served_model_names),
            adapter_dirs=tuple(str(d) for d in self.config.adapter_dirs),
            allowed_hosts=self.config.hosts(), limits=self.config.limits))
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


def serve(policy: Any = None, host: str = "127.0.0.1", port: int = 0, *, api_key: str | None = None,
          allow_remote: bool = False, backend: Backend | None = None,
          default_max_tokens: int = 512, max_tokens_cap: int | None = None,
          served_model_names: tuple[str, ...] = (), log_level: str = "warning",
          adapter_dirs: tuple[str, ...] = (), allowed_hosts: tuple[str, ...] | None = None,
          limits: Limits | None = None) -> ProxyServer:
    """Start the proxy over ``policy`` (or ``backend``) and return it; ``with`` stops it on exit.

    See ``ServeConfig`` for the arguments; ``adapter_dirs`` (with ``api_key``) turns on
    ``/v1/load_lora_adapter``.
    """
    config = ServeConfig(host=host, port=port, api_key=api_key, allow_remote=allow_remote,
                         default_max_tokens=default_max_tokens, max_tokens_cap=max_tokens_cap,
                         served_model_names=tuple(served_model_names), log_level=log_level,
                         adapter_dirs=tuple(str(d) for d in adapter_dirs),
                         allowed_hosts=allowed_hosts, limits=limits or Limits())
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

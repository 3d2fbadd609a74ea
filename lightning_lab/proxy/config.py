"""``ServeConfig``: the proxy's one settings object.

``ll.serve(policy, config, **overrides)``, ``lightning-lab serve`` (its flags build one) and
``create_app(backend, registry, config)`` all read this dataclass; nothing copies its fields.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from .limits import LOOPBACK_HOSTS, Limits

__all__ = ["ServeConfig", "check_bind", "is_loopback", "ANY_HOST"]

ANY_HOST = "*"
"""In ``allowed_hosts``: answer any ``Host`` header (a remote bind whose API key is the gate)."""


@dataclass
class ServeConfig:
    """Network, safety and generation settings of the proxy (``ll.serve``, ``lightning-lab
    serve``, ``create_app``)."""

    host: str = "127.0.0.1"
    """Interface to bind; loopback unless ``allow_remote`` (and an ``api_key``) say otherwise."""
    port: int = 0
    """0 picks a free port; read it back from ``server.port`` / ``server.base_url``."""
    api_key: str | None = None
    """Require ``Authorization: Bearer <api_key>`` on every request."""
    allow_remote: bool = False
    """Permit a non-loopback host (the policy would otherwise be reachable by anyone on the network)."""
    default_max_tokens: int = 512
    """Budget for requests that send neither max_tokens nor max_completion_tokens (a rollout may
    set its own default)."""
    max_tokens_cap: int | None = None
    """Clamp every request's max_tokens to this (training wants bounded rollouts); None = no cap."""
    served_model_names: tuple[str, ...] = ()
    """Extra names accepted as ``model`` (the policy's name always is; others get a 404)."""
    log_level: str = "warning"
    adapter_dirs: tuple[str, ...] = ()
    """Enables ``POST /v1/load_lora_adapter`` for checkpoints under these directories (needs
    ``api_key``); off by default, because it swaps the weights every client is served."""
    allowed_hosts: tuple[str, ...] | None = None
    """Host-header names to answer (DNS-rebinding defence). None means the loopback names
    (``LOOPBACK_HOSTS``) plus ``host``, wherever the config is used; ``("*",)`` answers any
    Host. A non-loopback bind must set it: the loopback names would refuse its clients."""
    disconnect_poll_s: float = 0.25
    """How often a waiting non-streaming request checks whether its client hung up."""
    limits: Limits = field(default_factory=Limits)
    """Body-size and token caps per request and per server (see ``proxy/limits.py``)."""

    def __post_init__(self) -> None:
        self.served_model_names = tuple(self.served_model_names)
        self.adapter_dirs = tuple(str(d) for d in self.adapter_dirs)
        if self.allowed_hosts is not None:
            self.allowed_hosts = tuple(self.allowed_hosts)
        if self.api_key is not None and (not self.api_key.strip()
                                         or self.api_key != self.api_key.strip()):
            raise ValueError("api_key is blank or has surrounding whitespace: no client could "
                             "ever authenticate with it (the Bearer token is stripped)")
        if self.adapter_dirs and not self.api_key:
            raise ValueError("load_lora_adapter (adapter_dirs) needs an api_key: it changes the "
                             "served weights")

    def host_names(self) -> frozenset[str]:
        """The lower-cased names the ``Host`` header may carry (``"*"``: any)."""
        if self.allowed_hosts is None:
            return frozenset((*LOOPBACK_HOSTS, self.host.strip("[]").lower()))
        return frozenset(h.lower() for h in self.allowed_hosts)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(config: ServeConfig) -> None:
    """Refuse to expose the policy beyond this machine without an explicit opt-in, a key and the
    host names its clients use."""
    if is_loopback(config.host):
        return
    if not config.allow_remote:
        raise ValueError(f"refusing to bind {config.host!r}: not a loopback address; "
                         "pass allow_remote=True (and an api_key) to serve other machines")
    if not config.api_key:
        raise ValueError(f"refusing to bind {config.host!r} without an api_key")
    if config.allowed_hosts is None:
        raise ValueError(f"binding {config.host!r}: set allowed_hosts to the names clients reach "
                         f"this machine by, or ('{ANY_HOST}',) to answer any Host header (None "
                         "means the loopback names, which would refuse every remote client)")

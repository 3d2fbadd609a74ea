"""What every endpoint shares: auth, rollout lookup, body decoding, model names, token budgets.

``create_app`` builds one ``Endpoints`` and hands it to the route modules (``completions``,
``responses``), so each OpenAI endpoint is its own module and they all answer alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from ..tracing import sampling_temperature
from .protocol import ProtocolError
from .registry import OpenRollout

__all__ = ["Endpoints", "agent_name"]


@dataclass
class Endpoints:
    backend: Any
    registry: Any
    config: Any
    """The app's ``ServeConfig``."""
    check_auth: Callable[[Any], None]
    lookup: Callable[[str | None], OpenRollout | None]
    json_body: Callable[[Any], Awaitable[Any]]
    make_call: Callable[..., Any]
    """``make_call(request, entry, chat_request, warnings, prepared=None)``: one traced call."""
    complete: Callable[..., Awaitable[Any]]
    """``complete(request, call)``: its completions (recorded), or a 499 response."""
    off_loop: Callable[..., Awaitable[Any]]
    """``await off_loop(fn, *args)``: ``fn`` in a worker thread; its unexpected errors are 400s."""
    served: set[str]
    """Model names requests may ask for (the backend's, aliases, loaded adapters)."""
    budget: Any
    """The server's ``limits.TokenBudget``: ``budget.admit(tokens)`` -> a ticket to release."""

    def admit(self, calls: list[Any]) -> Any:
        """A budget ticket for what ``calls`` may cost (prompt + n x max_tokens each)."""
        return self.budget.admit(sum(len(c.prepared.prompt_ids) + c.request.n * c.max_tokens
                                     for c in calls))

    def check_model(self, model: str) -> None:
        """A model the server does not serve is a 404, as OpenAI answers; none sent = the served one."""
        if model and model not in self.served and model != self.backend.name:
            raise ProtocolError(f"The model '{model}' does not exist; this server serves "
                                f"{sorted(self.served | {self.backend.name})}", param="model",
                                code="model_not_found", status=404)

    def max_tokens(self, requested: int | None, entry: OpenRollout | None,
                   warnings: list[str]) -> int:
        """The request's budget, else the rollout's default, else the server's; then the cap.

        A request above the server cap is clamped (and told so in ``X-LL-Warning``) rather than
        refused: agents hard-code large budgets, and training wants them bounded, not failing.
        """
        if requested is None:
            requested = entry.max_tokens if entry is not None and entry.max_tokens else \
                self.config.default_max_tokens
        cap = self.config.max_tokens_cap
        if cap is not None and requested > cap:
            warnings.append(f"max_tokens clamped from {requested} to the server cap {cap}")
            return cap
        return requested

    def temperature(self, requested: float | None, entry: OpenRollout | None) -> float:
        """The request's, else the rollout's, else the default (``tracing``'s contract)."""
        from ..inference.sampling import normalize_temperature

        return normalize_temperature(sampling_temperature(
            requested, entry.temperature if entry is not None else None))


def agent_name(request: Any, metadata: dict[str, Any], user: str) -> str:
    """The role of a call: ``X-LL-Agent`` header, else ``metadata.agent``, else ``user``."""
    return request.headers.get("x-ll-agent") or metadata.get("agent") or user

"""The serving object: what every endpoint shares, owned in one place.

``Serving`` holds the backend, the rollout registry, the ``ServeConfig``, the served model names
and the token budget, and does the steps every endpoint takes alike (auth, rollout lookup, body
decoding off the event loop, a call's model, temperature and token budget, generating unless
the client left). The
endpoint modules (``chat``, ``completions``, ``responses``) are functions of a ``Serving``; the
routes in ``app.py`` are a few lines each, registered once for both URL forms.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from ..tracing import sampling_temperature
from .backends import Backend, Completion
from .config import ServeConfig
from .limits import Ticket, TokenBudget, decode_json, read_body
from .protocol import ProtocolError, error_body
from .registry import OpenRollout, RolloutRegistry

__all__ = ["Serving", "off_loop", "role_name", "warning_headers", "ignored_warning"]

log = logging.getLogger("lightning_lab.proxy")


class Serving:
    """One server's backend, registry, config and budget; see the module docstring."""

    def __init__(self, backend: Backend, registry: RolloutRegistry, config: ServeConfig):
        self.backend, self.registry, self.config = backend, registry, config
        self.served = {backend.name, *config.served_model_names,
                       *getattr(backend, "adapters", ())} - {""}
        """Model names requests may ask for (the backend's, aliases, loaded adapters, and the
        policy's LoRA adapters when it has several: one per role)."""
        self.budget = TokenBudget(config.limits)
        self.adapter_roots = [Path(d).resolve() for d in config.adapter_dirs]
        self.inflight = 0

    def check_auth(self, request: Request) -> None:
        if self.config.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 self.config.api_key.encode()):
            raise ProtocolError("Incorrect or missing API key (Authorization: Bearer <key>).",
                                code="invalid_api_key", status=401)

    def lookup(self, rollout_id: str | None) -> OpenRollout | None:
        """The open rollout a ``/rollout/<id>/...`` URL names (None: the untraced ``/v1``)."""
        if rollout_id is None:
            return None
        entry = self.registry.get(rollout_id)
        if entry is None:
            raise ProtocolError(f"unknown or closed rollout id {rollout_id!r}", param="rollout_id",
                                code="rollout_not_found", status=404)
        return entry

    async def raw_body(self, request: Request) -> bytes:
        return await read_body(request.stream(), request.headers, self.config.limits.max_body_bytes)

    async def json_body(self, request: Request) -> Any:
        return await off_loop(decode_json, await self.raw_body(request))

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

    def admit(self, calls: list[Any]) -> Ticket:
        """A budget ticket for what ``calls`` may cost (prompt + n x max_tokens each)."""
        return self.budget.admit(sum(len(c.prepared.prompt_ids) + c.request.n * c.max_tokens
                                     for c in calls))

    async def complete(self, request: Request, call: Any) -> list[Completion] | JSONResponse:
        """Generate (non-streaming) and record; the completions, or a 499 if the client left."""
        self.inflight += 1
        try:
            return await _unless_disconnected(request, call.generate(),
                                              self.config.disconnect_poll_s)
        except _ClientGone:
            call.record_abort()
            return JSONResponse(error_body("client disconnected", "aborted"), 499)
        finally:
            self.inflight -= 1


def role_name(request: Any, metadata: dict[str, Any], user: str) -> str:
    """The role of a call: ``X-LL-Role`` header, else ``metadata.role``, else ``user``
    (``X-LL-Agent`` / ``metadata.agent``, the names before "role", are still read)."""
    headers = request.headers
    return (headers.get("x-ll-role") or headers.get("x-ll-agent") or metadata.get("role")
            or metadata.get("agent") or user)


def warning_headers(warnings: list[str]) -> dict[str, str]:
    """``X-LL-Warning``: each warning once, in order."""
    return {"X-LL-Warning": "; ".join(dict.fromkeys(warnings))} if warnings else {}


def ignored_warning(ignored: list[str]) -> list[str]:
    return [f"ignored unsupported parameter(s): {', '.join(ignored)}"] if ignored else []


async def off_loop(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` in a worker thread; an unexpected error there is the client's request's
    fault (it only parses and tokenises), so it becomes a logged 400 rather than a 500."""
    try:
        return await asyncio.to_thread(fn, *args)
    except ProtocolError:
        raise
    except Exception as exc:  # noqa: BLE001 - catch-all by design, see docstring
        log.warning("request rejected by an unexpected parsing error", exc_info=True)
        raise ProtocolError(f"could not read the request: {type(exc).__name__}: {exc}",
                            code="invalid_request") from exc


class _ClientGone(Exception):
    pass


async def _unless_disconnected(request: Request, coro: Any, poll_s: float) -> Any:
    """Await ``coro``; if the client hangs up first, cancel it (freeing its batch slots)."""
    task = asyncio.ensure_future(coro)
    while True:
        done, _ = await asyncio.wait({task}, timeout=poll_s)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - we are abandoning it
                pass
            raise _ClientGone()

"""Admission control of the proxy: which requests get in, and how much work may wait.

A server on 127.0.0.1 is still reachable from every web page the user opens (a POST with a
``text/plain`` body needs no CORS preflight) and, through DNS rebinding, readable by them. So
every request must name a host this server answers to, and every POST must declare a JSON body;
a browser can send neither without a preflight that this server never grants. Bodies are read
with a byte cap, and the tokens a request may cost (prompt + ``n`` x ``max_tokens``) are capped
per request and summed over the requests in flight, so one client cannot queue minutes of
decoding in front of everyone else.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from .protocol import ProtocolError, error_body

__all__ = ["Limits", "TokenBudget", "Ticket", "GuardMiddleware", "read_body", "decode_json",
           "LOOPBACK_HOSTS"]

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class Limits:
    """Caps on one request and on the server's queue (all client errors, never a 5xx)."""

    max_body_bytes: int = 8 << 20
    """Larger request bodies get 413 before they are read."""
    max_tokens: int = 32768
    """Largest ``max_tokens`` a request may ask for (400 above)."""
    max_request_tokens: int = 65536
    """Prompt + n x max_tokens (clipped to the context) of one request (400 above)."""
    max_queued_tokens: int = 262144
    """Tokens of all requests in flight; a request that would pass it gets 429 (Retry-After)."""


class Ticket:
    """A request's share of the token budget; ``release`` is idempotent."""

    def __init__(self, budget: "TokenBudget", tokens: int):
        self.budget, self.tokens, self._held = budget, tokens, True

    def release(self) -> None:
        if self._held:
            self._held = False
            self.budget.queued -= self.tokens


class TokenBudget:
    """Tokens promised to requests in flight. Used from the event loop only, so no lock."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.queued = 0

    def admit(self, tokens: int) -> Ticket:
        """A ticket for ``tokens``, or ProtocolError 400 (too big ever) / 429 (too big now).

        One request is always admitted when nothing is queued, so a cap below a request's own
        size cannot starve it.
        """
        limits = self.limits
        if tokens > limits.max_request_tokens:
            raise ProtocolError(
                f"this request may cost {tokens} tokens (prompt + n x max_tokens); the limit is "
                f"{limits.max_request_tokens}: lower n or max_tokens", param="max_tokens",
                code="request_too_large")
        if self.queued and self.queued + tokens > limits.max_queued_tokens:
            raise ProtocolError(
                f"the server has {self.queued} tokens queued (limit {limits.max_queued_tokens}); "
                "retry shortly", code="rate_limit_exceeded", status=429, type="requests")
        self.queued += tokens
        return Ticket(self, tokens)


async def read_body(receive_stream: Any, headers: Any, max_bytes: int) -> bytes:
    """The request body, refusing (413) more than ``max_bytes`` whatever Content-Length claims."""
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(int(declared), max_bytes)
    chunks, size = [], 0
    async for chunk in receive_stream:
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(size, max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, max_bytes: int) -> ProtocolError:
    return ProtocolError(f"request body of {size}+ bytes exceeds the {max_bytes}-byte limit",
                         code="request_too_large", status=413)


def decode_json(raw: bytes) -> Any:
    """``json.loads`` whose every failure is a 400 (deep nesting raises RecursionError)."""
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"request body is not valid JSON: {exc}", code="invalid_json") from exc
    except RecursionError:
        raise ProtocolError("request body is nested too deeply", code="invalid_json") from None


_HOST = re.compile(r"(?:\[(?P<ip6>[0-9a-f:.]+)\]|(?P<name>[^\[\]:]+))(?::[0-9]{1,5})?")
"""``host[:port]`` as RFC 9110 allows it: a bracketed IPv6 literal or a name, then only a port."""


def _hostname(host_header: str) -> str | None:
    """The host a ``Host`` header names, or None when it is not of the form ``host[:port]``
    (``[::1]attacker.example`` must not pass for ``::1``)."""
    match = _HOST.fullmatch(host_header.strip().lower())
    if match is None:
        return None
    return match["ip6"] or match["name"].rstrip(".")


class GuardMiddleware:
    """Pure ASGI middleware: Host-header check and JSON-only POST bodies, OpenAI-style errors.

    The Host header must name one of ``host_names`` (lower-case; DNS-rebinding defence), unless
    they include ``"*"`` (a remote bind that chose to let the API key be the only gate).
    """

    def __init__(self, app: Callable[..., Awaitable[None]], host_names: frozenset[str]):
        self.app = app
        self.allowed = None if "*" in host_names else host_names

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            error = self._check(scope)
            if error is not None:
                await _send_error(send, error)
                return
        await self.app(scope, receive, send)

    def _check(self, scope: dict) -> ProtocolError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.allowed is not None:
            host = headers.get("host")
            if host is None or _hostname(host) not in self.allowed:
                return ProtocolError(f"Host header {host!r} is not one this server answers to",
                                     code="invalid_host", status=400)
        if scope["method"] == "POST":
            media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if media != "application/json" and not media.endswith("+json"):
                return ProtocolError(f"Content-Type must be application/json, got {media!r}",
                                     code="unsupported_media_type", status=415)
        return None


async def _send_error(send: Callable, error: ProtocolError) -> None:
    body = json.dumps(error_body(error.message, error.type, error.param, error.code)).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})

"""Agent Lightning's per-attempt URL, ``/rollout/<id>/attempt/<aid>/v1/...``, as an alias.

Agent Lightning hands its agents ``{endpoint}/rollout/{rollout_id}/attempt/{attempt_id}/v1`` as
the OpenAI base URL, so such agents point at this server unchanged. The path is rewritten to
``/rollout/<id>/...`` before routing, and the attempt id travels in the ASGI scope
(``ll_attempt``) into the transitions' meta.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["AttemptAlias"]

_ATTEMPT = re.compile(r"^/rollout/(?P<rollout>[^/]+)/attempt/(?P<attempt>[^/]+)(?P<rest>/.*)$")


class AttemptAlias:
    """Pure ASGI middleware (no body buffering, streaming untouched)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            match = _ATTEMPT.match(scope["path"])
            if match:
                path = f"/rollout/{match['rollout']}{match['rest']}"
                scope = dict(scope, path=path, raw_path=path.encode(), ll_attempt=match["attempt"])
        await self.app(scope, receive, send)

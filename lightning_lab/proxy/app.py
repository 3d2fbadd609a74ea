"""The FastAPI app: ``/v1/...`` (served, untraced) and ``/rollout/<id>/v1/...`` (traced).

Each OpenAI route is written once on ``router`` and mounted twice, plain and under
``/rollout/{rollout_id}``; the auth check is the router's dependency and the rollout the URL
names (None on the plain form) is the ``rollout`` dependency, so a route is one line calling
its endpoint module (``chat``, ``completions``, ``responses``) with the app's ``Serving``.
``/rollout/<id>/attempt/<aid>/v1/...`` (Agent Lightning's URL) is an alias.

Handlers never block the event loop on the model: they await the engine's futures, and decoding
JSON, validating and tokenising run in a worker thread, so a huge request cannot stall
``/health`` or other clients. Every client error is an OpenAI-style ``{"error": {...}}`` body
with a 4xx status, never a 500: anything unexpected while reading a request is logged and
answered 400. Admission (Host, content type, sizes, token budget) is in ``limits.py``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from .aliases import AttemptAlias
from .backends import Backend
from .chat import chat_completion
from .completions import text_completion
from .config import ServeConfig
from .limits import GuardMiddleware
from .protocol import ProtocolError, error_body
from .registry import OpenRollout, RolloutRegistry
from .responses import respond
from .serving import Serving, off_loop

__all__ = ["create_app"]


def serving_of(request: Request) -> Serving:
    return request.app.state.serving


def authorized(request: Request) -> None:
    """Every route's preamble but ``/health``: the API key, when the server has one."""
    serving_of(request).check_auth(request)


def rollout(request: Request) -> OpenRollout | None:
    """The open rollout of a ``/rollout/{rollout_id}/...`` URL; None on the plain form."""
    return serving_of(request).lookup(request.path_params.get("rollout_id"))


Rollout = Depends(rollout)
router = APIRouter(dependencies=[Depends(authorized)])
"""The OpenAI routes, mounted at ``/`` and at ``/rollout/{rollout_id}``."""


@router.get("/v1/models")
async def models(request: Request, _: Any = Rollout) -> dict[str, Any]:
    serving = serving_of(request)
    first = await serving.backend.model_name()
    names = [first] + sorted(serving.served - {first})
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0,
                                        "owned_by": "lightning-lab"} for name in names]}


@router.post("/v1/chat/completions")
async def chat(request: Request, entry: OpenRollout | None = Rollout):
    return await chat_completion(serving_of(request), request, entry)


@router.post("/v1/completions")
async def completions(request: Request, entry: OpenRollout | None = Rollout):
    return await text_completion(serving_of(request), request, entry)


@router.post("/v1/responses")
async def responses(request: Request, entry: OpenRollout | None = Rollout):
    return await respond(serving_of(request), request, entry)


traced = APIRouter(prefix="/rollout/{rollout_id}", dependencies=[Depends(authorized)])
"""Routes that exist only for a rollout."""


@traced.post("/reward")
async def reward(request: Request, entry: OpenRollout = Rollout) -> dict[str, Any]:
    body = await serving_of(request).json_body(request)
    if not isinstance(body, dict) or "reward" not in body:
        raise ProtocolError("body must be {'reward': number, 'final': bool}", param="reward",
                            code="missing_required_parameter")
    final = body.get("final", False)
    if not isinstance(final, bool):
        raise ProtocolError("'final' must be a boolean", param="final", code="invalid_type")
    try:
        serving_of(request).registry.reward(entry, body["reward"], final)
    except ValueError as exc:
        raise ProtocolError(str(exc), param="reward", code="invalid_value") from exc
    return {"ok": True, "transitions": len(entry.trajectory.transitions)}


management = APIRouter(dependencies=[Depends(authorized)])
"""Mounted only when adapter directories are configured (404 otherwise)."""


@management.post("/v1/load_lora_adapter")
async def load_lora_adapter(request: Request) -> dict[str, Any]:
    serving = serving_of(request)
    body = await serving.json_body(request)
    if not isinstance(body, dict) or not isinstance(body.get("lora_path"), str) \
            or not isinstance(body.get("lora_name", ""), str):
        raise ProtocolError("body must be {'lora_name': str, 'lora_path': str}",
                            param="lora_path", code="missing_required_parameter")
    name = _adapter_name(body.get("lora_name") or "")
    path = await off_loop(_allowed_path, body["lora_path"], serving.adapter_roots)
    try:
        await serving.backend.load_adapter(name, str(path))
    except (OSError, RuntimeError, ValueError) as exc:
        raise ProtocolError(f"could not load adapter: {exc}", param="lora_path",
                            code="invalid_value") from exc
    serving.served.add(serving.backend.name)
    return {"ok": True, "model": serving.backend.name}


def create_app(backend: Backend, registry: RolloutRegistry, config: ServeConfig | None = None
               ) -> FastAPI:
    """The routes over ``backend``; ``config``'s network fields (host, port) are the server's."""
    config = config or ServeConfig()
    app = FastAPI(title="lightning-lab OpenAI-compatible proxy", docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.add_middleware(AttemptAlias)
    app.add_middleware(GuardMiddleware, host_names=config.host_names())
    app.state.serving = serving = Serving(backend, registry, config)
    app.add_exception_handler(ProtocolError, _protocol_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _server_error)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "open_rollouts": len(registry), "inflight": serving.inflight}

    app.include_router(router)
    app.include_router(router, prefix="/rollout/{rollout_id}")
    app.include_router(traced)
    if serving.adapter_roots:
        app.include_router(management)
    return app


async def _protocol_error(_: Request, exc: ProtocolError) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.status == 429 else None
    return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), exc.status,
                        headers=headers)


async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return JSONResponse(error_body(str(exc.detail), "invalid_request_error", None, code),
                        exc.status_code)


async def _server_error(_: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(error_body(f"{type(exc).__name__}: {exc}", "server_error"), 500)


ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,255}")
"""What ``lora_name`` may be: it becomes the served ``model`` name, echoed in every response."""


def _adapter_name(name: str) -> str:
    if name and not ADAPTER_NAME.fullmatch(name):
        raise ProtocolError(f"'lora_name' must be 1-256 characters of letters, digits and "
                            f"._:@+- (starting with a letter or digit), got {name[:40]!r}",
                            param="lora_name", code="invalid_value")
    return name


def _allowed_path(raw: str, roots: list[Path]) -> Path:
    """``raw`` resolved (symlinks too), if it and everything under it lie inside one of
    ``roots``; else a 403. A checkpoint is read through its ``LATEST`` file and step folder,
    so a link inside it would otherwise reach a checkpoint outside the roots."""
    try:
        path = Path(raw).resolve()
    except (OSError, RuntimeError, ValueError) as exc:
        raise ProtocolError(f"bad lora_path: {exc}", param="lora_path", code="invalid_value") from exc
    escapes = [] if _inside(path, roots) else [str(path)]
    for folder, dirs, files in os.walk(path) if not escapes else ():
        links = [Path(folder, n) for n in dirs + files if Path(folder, n).is_symlink()]
        escapes += [f"{link} -> {link.resolve()}" for link in links
                    if not _inside(link.resolve(), roots)]
    if escapes:
        raise ProtocolError(f"lora_path {raw!r} is or holds a link outside the directories this "
                            f"server loads adapters from: {escapes[0]}", param="lora_path",
                            code="path_not_allowed", status=403)
    return path


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path.is_relative_to(root) for root in roots)

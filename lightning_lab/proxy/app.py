"""FastAPI routes: ``/v1/...`` (served, untraced) and ``/rollout/<id>/v1/...`` (traced).

Chat completions live here; ``/v1/completions`` and ``/v1/responses`` are their own modules on the
same ``Endpoints``; ``/rollout/<id>/attempt/<aid>/v1/...`` (Agent Lightning's URL) is an alias.

Handlers never block the event loop on the model: they await the engine's futures, so hundreds of
agents' requests wait concurrently and the engine decodes them as one batch. Decoding JSON,
validating and tokenising run in a worker thread too, so a huge request cannot stall ``/health``
or other clients. Every client error is an OpenAI-style ``{"error": {...}}`` body with a 4xx
status, never a 500: anything unexpected while reading a request is logged and answered 400.
Admission (Host, content type, sizes, token budget) is in ``limits.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from .. import tracing
from .aliases import AttemptAlias
from .backends import Backend, Completion, Prepared
from .config import ServeConfig
from .context import Endpoints, agent_name
from .limits import GuardMiddleware, Ticket, TokenBudget, decode_json, read_body
from .protocol import (ChatRequest, ProtocolError, chunk_body, completion_body, error_body,
                       logprobs_content, new_id, parse_chat_request)
from .registry import OpenRollout, RolloutRegistry
from .streaming import ContentBeforeCalls, Delta, stream_deltas, top_texts

__all__ = ["create_app"]

log = logging.getLogger("lightning_lab.proxy")


class _ClientGone(Exception):
    pass


def create_app(backend: Backend, registry: RolloutRegistry, config: ServeConfig | None = None
               ) -> FastAPI:
    """The routes over ``backend``; ``config``'s network fields (host, port) are the server's."""
    config = config or ServeConfig()
    app = FastAPI(title="lightning-lab OpenAI-compatible proxy", docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.add_middleware(AttemptAlias)
    app.add_middleware(GuardMiddleware, host_names=config.host_names())
    app.state.inflight = 0
    served = {backend.name, *config.served_model_names} - {""}
    budget = TokenBudget(config.limits)
    adapter_roots = [Path(d).resolve() for d in config.adapter_dirs]

    @app.exception_handler(ProtocolError)
    async def _protocol_error(_: Request, exc: ProtocolError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status == 429 else None
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), exc.status,
                            headers=headers)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error", None, code),
                            exc.status_code)

    @app.exception_handler(Exception)
    async def _server_error(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"{type(exc).__name__}: {exc}", "server_error"), 500)

    def check_auth(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 config.api_key.encode()):
            raise ProtocolError("Incorrect or missing API key (Authorization: Bearer <key>).",
                                code="invalid_api_key", status=401)

    def lookup(rollout_id: str | None) -> OpenRollout | None:
        if rollout_id is None:
            return None
        entry = registry.get(rollout_id)
        if entry is None:
            raise ProtocolError(f"unknown or closed rollout id {rollout_id!r}", param="rollout_id",
                                code="rollout_not_found", status=404)
        return entry

    async def raw_body(request: Request) -> bytes:
        return await read_body(request.stream(), request.headers, config.limits.max_body_bytes)

    async def json_body(request: Request) -> Any:
        return await _off_loop(decode_json, await raw_body(request))

    def parse_and_prepare(raw: bytes) -> tuple[ChatRequest, Prepared, int]:
        """Runs in a worker thread: JSON -> validated request -> prompt ids -> token cost."""
        chat_request = parse_chat_request(decode_json(raw))
        max_tokens = chat_request.max_tokens or config.default_max_tokens
        if max_tokens > config.limits.max_tokens:
            raise ProtocolError(f"'max_tokens' may be at most {config.limits.max_tokens}, got "
                                f"{max_tokens}", param="max_tokens", code="invalid_value")
        prepared = backend.prepare(chat_request)
        prompt = len(prepared.prompt_ids)
        room = max(backend.context_limit - prompt, 1)
        return chat_request, prepared, prompt + chat_request.n * min(max_tokens, room)

    async def models_body() -> dict[str, Any]:
        first = await backend.model_name()
        names = [first] + sorted(served - {first})
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0,
                                            "owned_by": "lightning-lab"} for name in names]}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check_auth(request)
        return await models_body()

    @app.get("/rollout/{rollout_id}/v1/models")
    async def rollout_models(rollout_id: str, request: Request) -> dict[str, Any]:
        check_auth(request)
        lookup(rollout_id)
        return await models_body()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "open_rollouts": len(registry), "inflight": app.state.inflight}

    @app.post("/rollout/{rollout_id}/reward")
    async def reward(rollout_id: str, request: Request) -> dict[str, Any]:
        check_auth(request)
        entry = lookup(rollout_id)
        body = await json_body(request)
        if not isinstance(body, dict) or "reward" not in body:
            raise ProtocolError("body must be {'reward': number, 'final': bool}", param="reward",
                                code="missing_required_parameter")
        final = body.get("final", False)
        if not isinstance(final, bool):
            raise ProtocolError("'final' must be a boolean", param="final", code="invalid_type")
        try:
            registry.reward(entry, body["reward"], final)
        except ValueError as exc:
            raise ProtocolError(str(exc), param="reward", code="invalid_value") from exc
        return {"ok": True, "transitions": len(entry.trajectory.transitions)}

    async def load_lora_adapter(request: Request) -> dict[str, Any]:
        check_auth(request)
        body = await json_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("lora_path"), str) \
                or not isinstance(body.get("lora_name", ""), str):
            raise ProtocolError("body must be {'lora_name': str, 'lora_path': str}",
                                param="lora_path", code="missing_required_parameter")
        name = _adapter_name(body.get("lora_name") or "")
        path = await _off_loop(_allowed_path, body["lora_path"], adapter_roots)
        try:
            await backend.load_adapter(name, str(path))
        except (OSError, RuntimeError, ValueError) as exc:
            raise ProtocolError(f"could not load adapter: {exc}", param="lora_path",
                                code="invalid_value") from exc
        served.add(backend.name)
        return {"ok": True, "model": backend.name}

    if adapter_roots:  # management endpoints exist only when enabled (404 otherwise)
        app.post("/v1/load_lora_adapter")(load_lora_adapter)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await chat_completion(request, None)

    @app.post("/rollout/{rollout_id}/v1/chat/completions")
    async def rollout_chat(rollout_id: str, request: Request):
        return await chat_completion(request, rollout_id)

    async def chat_completion(request: Request, rollout_id: str | None):
        check_auth(request)
        entry = lookup(rollout_id)
        chat_request, prepared, cost = await _off_loop(parse_and_prepare, await raw_body(request))
        warnings = [f"ignored unsupported parameter(s): {', '.join(chat_request.ignored)}"] \
            if chat_request.ignored else []
        call = make_call(request, entry, chat_request, warnings, prepared)
        ticket = budget.admit(cost)
        if chat_request.stream:  # the stream gives its tokens back when it ends, however it ends
            return StreamingResponse(call.events(ticket), media_type="text/event-stream",
                                     headers=warning_headers(warnings),
                                     background=BackgroundTask(ticket.release))
        try:
            completions = await complete(request, call)
        finally:
            ticket.release()
        if isinstance(completions, JSONResponse):
            return completions
        warnings += _grammar_failures(completions)
        return JSONResponse(call.response(completions), headers=warning_headers(warnings))

    def make_call(request: Request, entry: OpenRollout | None, chat_request: ChatRequest,
                  warnings: list[str], prepared: Prepared | None = None) -> "_Call":
        """A call of the chat path; ``prepared`` given = already tokenised (or a raw prompt)."""
        endpoints.check_model(chat_request.model)
        prepared = prepared or backend.prepare(chat_request)
        if chat_request.seed is None and entry is not None:  # a seeded rollout's k-th call
            chat_request.seed = tracing.call_seed(entry.trajectory)
        temperature = endpoints.temperature(chat_request.temperature, entry)
        max_tokens = endpoints.max_tokens(chat_request.max_tokens, entry, warnings)
        agent = agent_name(request, chat_request.metadata, chat_request.user)
        return _Call(backend, registry, entry, chat_request, prepared, temperature, max_tokens,
                     agent, new_id(), request.scope.get("ll_attempt"))

    async def complete(request: Request, call: "_Call") -> list[Completion] | JSONResponse:
        """Generate (non-streaming) and record; the completions, or a 499 if the client left."""
        app.state.inflight += 1
        try:
            completions = await _unless_disconnected(request, call.generate(),
                                                     config.disconnect_poll_s)
        except _ClientGone:
            call.record_abort()
            return JSONResponse(error_body("client disconnected", "aborted"), 499)
        finally:
            app.state.inflight -= 1
        return completions

    endpoints = Endpoints(backend=backend, registry=registry, config=config, check_auth=check_auth,
                          lookup=lookup, json_body=json_body, make_call=make_call,
                          complete=complete, off_loop=_off_loop, served=served,
                          budget=budget)
    from .completions import add_completion_routes
    from .responses import add_response_routes

    add_completion_routes(app, endpoints)
    add_response_routes(app, endpoints)
    return app


def warning_headers(warnings: list[str]) -> dict[str, str]:
    return {"X-LL-Warning": "; ".join(warnings)} if warnings else {}


def tool_call_deltas(index: int, call: dict[str, Any]) -> list[dict[str, Any]]:
    """One parsed call as vLLM and OpenAI stream it: index, id, type and name with empty
    arguments first, then the arguments (clients concatenate the fragments per index)."""
    function = call["function"]
    return [{"index": index, "id": call["id"], "type": "function",
             "function": {"name": function["name"], "arguments": ""}},
            {"index": index, "function": {"arguments": function["arguments"]}}]


def _grammar_failures(completions: list[Completion]) -> list[str]:
    """Choices whose grammar llguidance gave up on mid-way (finish_reason ``"error"``), logged
    and said in ``X-LL-Warning``: their text is cut where it failed and need not match it. A
    grammar that fails on its first step is a 400 before sampling (``guided_grammar``)."""
    failed = [f"choice {i}: the grammar failed mid-way ({c.meta['constraint_error']})"
              for i, c in enumerate(completions) if c.meta.get("constraint_error")]
    for message in failed:
        log.warning(message)
    return failed


def _message(c: Completion) -> dict[str, Any]:
    """The choice's assistant message: parsed calls, or the text as content."""
    if c.message is None:
        return {"role": "assistant", "content": c.text}
    return dict(c.message)


async def _off_loop(fn: Any, *args: Any) -> Any:
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


class _Call:
    """One chat completion: generate, record into the rollout, render as JSON or SSE."""

    def __init__(self, backend: Backend, registry: RolloutRegistry, entry: OpenRollout | None,
                 request: ChatRequest, prepared: Prepared, temperature: float, max_tokens: int,
                 agent: str, request_id: str, attempt: str | None = None):
        self.backend, self.registry, self.entry = backend, registry, entry
        self.request, self.prepared = request, prepared
        self.temperature, self.max_tokens, self.agent, self.id = temperature, max_tokens, agent, request_id
        self.meta = {"request_id": self.id, "via": "http"}
        if attempt:
            self.meta["attempt_id"] = attempt

    async def generate(self) -> list[Completion]:
        with _cancelled_with_rollout(self.entry):
            completions = await self.backend.generate(self.prepared, self.request,
                                                      self.temperature, self.max_tokens)
        self.record(completions)
        return completions

    def record(self, completions: list[Completion]) -> None:
        """Append each choice to the rollout (nothing once its runner cancelled it)."""
        if self.entry is None or (self.entry.control is not None and self.entry.control.cancelled):
            return
        for i, c in enumerate(completions):
            self.registry.record(  # own prompt list per choice: transitions own their lists
                self.entry, prompt_ids=list(self.prepared.prompt_ids),
                prompt_text=self.prepared.prompt_text, response_ids=c.response_ids,
                logprobs=c.logprobs, text=c.text, temperature=self.temperature,
                finish_reason=c.finish_reason, agent=self.agent,
                meta={**c.meta, **self.meta, "choice": i})

    def streams(self) -> bool:
        """Token streaming needs the local engine (a remote backend answers whole)."""
        return hasattr(self.backend, "stream")

    def _content_split(self) -> ContentBeforeCalls | None:
        """A filter holding tool-call text out of the content stream, when calls may come."""
        plan = self.prepared.plan
        if plan is None or not plan.tools or plan.choice.mode == "none":
            return None
        return ContentBeforeCalls(getattr(plan.format, "call_start", "<tool_call>"))

    async def deltas(self) -> AsyncIterator[Delta | list[Completion]]:
        """Content deltas of each choice as tokens are sampled (tool-call text held out), then
        the recorded completions. Without token streaming each content is one delta."""
        if not self.streams():
            completions = await self.generate()
            for i, c in enumerate(completions):
                if _message(c)["content"]:
                    yield Delta(i, _message(c)["content"], c.response_ids, c.logprobs,
                                c.top_logprobs)
            yield completions
            return
        splits = [self._content_split() for _ in range(self.request.n)]
        with _cancelled_with_rollout(self.entry):
            async for item in stream_deltas(self.backend, self.prepared, self.request,
                                            self.temperature, self.max_tokens):
                if isinstance(item, list):
                    completions = item
                    continue
                split = splits[item.index]
                item.text = split.add(item.text) if split is not None else item.text
                if item.text or (self.request.logprobs and item.token_ids):
                    yield item
        self.record(completions)
        for i, (split, c) in enumerate(zip(splits, completions)):
            rest = split.finish(_message(c)["content"]) if split is not None else ""
            if rest:
                yield Delta(i, rest)
        yield completions

    def record_abort(self) -> None:
        """The client hung up: keep a trace of the call, with nothing trainable in it."""
        if self.entry is not None:
            self.registry.record(
                self.entry, prompt_ids=self.prepared.prompt_ids, prompt_text=self.prepared.prompt_text,
                response_ids=[], logprobs=[], text="", temperature=self.temperature,
                finish_reason="abort", agent=self.agent,
                meta={**self.meta, "truncated": True})

    def _logprobs(self, ids: list[int], logprobs: list[float],
                  top: list[list[tuple[int, float]]]) -> dict[str, Any] | None:
        """``choices[].logprobs`` of these tokens (None unless the request asked)."""
        if not self.request.logprobs:
            return None
        return {"content": logprobs_content(self.backend.token_texts(ids), logprobs,
                                            top_texts(self.backend, top)), "refusal": None}

    def _usage(self, completions: list[Completion]) -> tuple[int, int]:
        return len(self.prepared.prompt_ids), sum(len(c.response_ids) for c in completions)

    def response(self, completions: list[Completion]) -> dict[str, Any]:
        choices = []
        for i, c in enumerate(completions):
            choice = {"index": i, "message": {**_message(c), "refusal": None},
                      "logprobs": self._logprobs(c.response_ids, c.logprobs, c.top_logprobs),
                      "finish_reason": c.finish_reason}
            if self.request.return_token_ids:
                choice["token_ids"] = c.response_ids
            choices.append(choice)
        prompt_tokens, completion_tokens = self._usage(completions)
        return completion_body(
            request_id=self.id, model=self.backend.name, choices=choices,
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
            prompt_token_ids=self.prepared.prompt_ids if self.request.return_token_ids else None)

    async def events(self, ticket: Ticket) -> AsyncIterator[str]:
        """SSE: a role chunk at once, content deltas as tokens are sampled, finish chunks, usage,
        ``[DONE]``. Backends without token streaming send one content delta per choice."""
        try:
            async for event in self._events():
                yield event
        finally:
            ticket.release()

    async def _events(self) -> AsyncIterator[str]:
        created, n = int(time.time()), self.request.n

        def sse(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
            body = chunk_body(request_id=self.id, model=self.backend.name, created=created,
                              choices=choices, usage=usage)
            return f"data: {json.dumps(body)}\n\n"

        yield sse([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None} for i in range(n)])
        try:
            async for item in self.deltas():
                if isinstance(item, Delta):
                    logprobs = self._logprobs(item.token_ids, item.logprobs, item.top_logprobs)
                    yield sse([{"index": item.index, "delta": {"content": item.text},
                                "logprobs": logprobs, "finish_reason": None}])
                else:
                    completions = item
        except asyncio.CancelledError:
            self.record_abort()
            raise
        except Exception as exc:  # noqa: BLE001 - headers are sent; report in-band, OpenAI-style
            error = exc if isinstance(exc, ProtocolError) else ProtocolError(
                f"{type(exc).__name__}: {exc}", type="server_error", status=500)
            yield f"data: {json.dumps(error_body(error.message, error.type, error.param, error.code))}\n\n"
            yield "data: [DONE]\n\n"
            return
        for i, c in enumerate(completions):
            for k, call in enumerate(_message(c).get("tool_calls") or []):
                for part in tool_call_deltas(k, call):
                    yield sse([{"index": i, "delta": {"tool_calls": [part]}, "logprobs": None,
                                "finish_reason": None}])
        yield sse([{"index": i, "delta": {}, "logprobs": None, "finish_reason": c.finish_reason}
                   for i, c in enumerate(completions)])
        if self.request.include_usage:
            prompt_tokens, completion_tokens = self._usage(completions)
            yield sse([], {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                           "total_tokens": prompt_tokens + completion_tokens})
        yield "data: [DONE]\n\n"


@contextlib.contextmanager
def _cancelled_with_rollout(entry: OpenRollout | None) -> Iterator[None]:
    """Cancel the awaiting handler when the rollout's runner cancels the rollout (a timeout).

    The engine request is aborted by the backend's cancellation path; the agent, still waiting
    on its HTTP call, gets a 408 ``rollout_cancelled`` instead of a hang.
    """
    control = entry.control if entry is not None else None
    if control is None:
        yield
        return
    task, loop = asyncio.current_task(), asyncio.get_running_loop()
    unregister = control.on_cancel(lambda: loop.call_soon_threadsafe(task.cancel))
    try:
        yield
    except asyncio.CancelledError:
        if not control.cancelled:
            raise
        raise ProtocolError(f"rollout cancelled: {control.reason}", code="rollout_cancelled",
                            status=408) from None
    finally:
        unregister()

"""``/v1/chat/completions``: one ``Call`` per request, generated, recorded, rendered.

A ``Call`` generates through the backend (awaiting the engine's futures, so hundreds of agents'
requests are decoded as one batch), appends each choice to its rollout, and renders the chat
completion as JSON or as SSE with content deltas as tokens are sampled (tool-call text held out
of the content and sent as ``tool_calls`` deltas at the end). ``completions`` and ``responses``
reuse it for their own wire formats.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator, Iterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from .. import tracing
from .backends import Backend, Completion, Prepared
from .limits import Ticket, decode_json
from .protocol import ChatRequest, ProtocolError, parse_chat_request
from .registry import OpenRollout, RolloutRegistry
from .serving import Serving, ignored_warning, off_loop, role_name, warning_headers
from .streaming import ContentBeforeCalls, Delta, sse_error, stream_deltas, top_texts

__all__ = ["chat_completion", "complete_whole", "new_call", "Call", "tool_call_deltas", "new_id"]

log = logging.getLogger("lightning_lab.proxy")


async def chat_completion(serving: Serving, request: Request, entry: OpenRollout | None):
    """Parse and tokenise off the event loop, admit the token cost, then stream or answer whole."""
    chat_request, prepared, cost = await off_loop(_parse_and_prepare, serving,
                                                  await serving.raw_body(request))
    warnings = ignored_warning(chat_request.ignored)
    call = new_call(serving, request, entry, chat_request, warnings, prepared)
    ticket = serving.budget.admit(cost)
    if chat_request.stream:  # the stream gives its tokens back when it ends, however it ends
        return StreamingResponse(call.events(ticket), media_type="text/event-stream",
                                 headers=warning_headers(warnings),
                                 background=BackgroundTask(ticket.release))
    completions = await complete_whole(serving, request, call, ticket, warnings)
    if isinstance(completions, JSONResponse):
        return completions
    return JSONResponse(call.response(completions), headers=warning_headers(warnings))


async def complete_whole(serving: Serving, request: Request, call: "Call", ticket: Any,
                         warnings: list[str]) -> list[Completion] | JSONResponse:
    """A non-streamed answer (chat or Responses): sample, give the tokens back, and add the
    choices whose grammar failed mid-way to ``warnings``; an error comes back as its response."""
    try:
        completions = await serving.complete(request, call)
    finally:
        ticket.release()
    if not isinstance(completions, JSONResponse):
        warnings += _grammar_failures(completions)
    return completions


def new_call(serving: Serving, request: Request, entry: OpenRollout | None,
             chat_request: ChatRequest, warnings: list[str], prepared: Prepared | None = None
             ) -> "Call":
    """One traced call of the chat path; ``prepared`` given = already tokenised (or a raw
    prompt). A seeded rollout's k-th call gets its k-th seed."""
    serving.check_model(chat_request.model)
    prepared = prepared or serving.backend.prepare(chat_request)
    if chat_request.seed is None and entry is not None:
        chat_request.seed = tracing.call_seed(entry.trajectory)
    return Call(serving.backend, serving.registry, entry, chat_request, prepared,
                serving.temperature(chat_request.temperature, entry),
                serving.max_tokens(chat_request.max_tokens, entry, warnings),
                role_name(request, chat_request.metadata, chat_request.user), new_id(),
                request.scope.get("ll_attempt"))


def _parse_and_prepare(serving: Serving, raw: bytes) -> tuple[ChatRequest, Prepared, int]:
    """Runs in a worker thread: JSON -> validated request -> prompt ids -> token cost."""
    chat_request = parse_chat_request(decode_json(raw))
    config = serving.config
    max_tokens = chat_request.max_tokens or config.default_max_tokens
    if max_tokens > config.limits.max_tokens:
        raise ProtocolError(f"'max_tokens' may be at most {config.limits.max_tokens}, got "
                            f"{max_tokens}", param="max_tokens", code="invalid_value")
    prepared = serving.backend.prepare(chat_request)
    prompt = len(prepared.prompt_ids)
    room = max(serving.backend.context_limit - prompt, 1)
    return chat_request, prepared, prompt + chat_request.n * min(max_tokens, room)


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


def new_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def logprobs_content(token_texts: list[str], logprobs: list[float],
                     top: list[list[tuple[str, float]]] | None = None) -> list[dict[str, Any]]:
    """``choices[].logprobs.content``: one entry per generated token (stop token included),
    with its most likely alternatives ``top`` (token text, logprob), best first, if asked."""
    def entry(text: str, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    top = top or [[] for _ in token_texts]
    return [{**entry(t, lp), "top_logprobs": [entry(*alt) for alt in alts]}
            for t, lp, alts in zip(token_texts, logprobs, top)]


def completion_body(*, request_id: str, model: str, choices: list[dict[str, Any]],
                    prompt_tokens: int, completion_tokens: int,
                    prompt_token_ids: list[int] | None = None) -> dict[str, Any]:
    body = {
        "id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
        "system_fingerprint": None, "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }
    if prompt_token_ids is not None:
        body["prompt_token_ids"] = prompt_token_ids
    return body


def chunk_body(*, request_id: str, model: str, created: int, choices: list[dict[str, Any]],
               usage: dict[str, int] | None = None) -> dict[str, Any]:
    body = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": None, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body


class Call:
    """One chat completion: generate, record into the rollout, render as JSON or SSE."""

    def __init__(self, backend: Backend, registry: RolloutRegistry, entry: OpenRollout | None,
                 request: ChatRequest, prepared: Prepared, temperature: float, max_tokens: int,
                 role: str, request_id: str, attempt: str | None = None):
        self.backend, self.registry, self.entry = backend, registry, entry
        self.request, self.prepared = request, prepared
        self.temperature, self.max_tokens, self.role, self.id = temperature, max_tokens, role, request_id
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
                finish_reason=c.finish_reason, role=self.role,
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
                finish_reason="abort", role=self.role,
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
            yield sse_error(exc)
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

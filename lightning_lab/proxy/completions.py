"""``/v1/completions``: a raw prompt in (no chat template), text and per-token logprobs out.

Agents that format their own prompts (ReAct loops, few-shot templates, base models) use this
API. Each prompt is tokenised as is (or taken as token ids) and sampled by the same engine, and
every choice of a traced call becomes a Transition whose prompt is exactly that text.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from .chat import new_call, new_id
from .protocol import ChatRequest, CompletionRequest, ProtocolError, validate
from .registry import OpenRollout
from .serving import Serving, ignored_warning, off_loop, warning_headers
from .streaming import Delta, released, sse_error, stream_deltas, top_texts

__all__ = ["text_completion"]


def _prepare(backend: Any, body: Any) -> tuple[CompletionRequest, ChatRequest, list[Any]]:
    """Runs in a worker thread (a multi-MB prompt takes seconds to tokenise): the validated
    request, its sampling options and each prompt tokenised."""
    request = validate(CompletionRequest, body)
    return request, request.sampling(), [backend.prepare_text(p, "prompt") for p in request.prompt]


def _logprobs(backend: Any, ids: list[int], logprobs: list[float],
              top: list[list[tuple[int, float]]], start: int) -> dict[str, Any]:
    """The legacy ``logprobs`` object: tokens, their logprobs, offsets into the choice text, and
    per token a {text: logprob} of the ``logprobs=k`` most likely tokens and the sampled one."""
    token_texts = backend.token_texts(ids)
    offsets, at = [], start
    for t in token_texts:
        offsets.append(at)
        at += len(t)
    alternatives = top_texts(backend, top) if top else [[] for _ in token_texts]
    return {"tokens": token_texts, "token_logprobs": logprobs,
            "top_logprobs": [dict(alts) | {t: lp}
                             for t, lp, alts in zip(token_texts, logprobs, alternatives)],
            "text_offset": offsets}


async def text_completion(serving: Serving, request: Request, entry: OpenRollout | None):
    """Every prompt is a call of the chat path (its own ``n`` choices), streamed in order."""
    backend = serving.backend
    if not hasattr(backend, "prepare_text"):
        raise ProtocolError("/v1/completions needs the local backend", code="unsupported")
    body = await serving.json_body(request)
    completion, sampling, prepared = await off_loop(_prepare, backend, body)
    warnings = ignored_warning(completion.ignored)
    calls = [new_call(serving, request, entry, sampling, warnings, p) for p in prepared]
    headers = warning_headers(warnings)
    request_id = "cmpl-" + new_id().removeprefix("chatcmpl-")
    ticket = serving.admit(calls)
    if sampling.stream:
        return StreamingResponse(released(_events(serving, calls, request_id, completion.echo),
                                          ticket),
                                 media_type="text/event-stream", headers=headers,
                                 background=BackgroundTask(ticket.release))
    try:
        results = await asyncio.gather(*(serving.complete(request, call) for call in calls))
    finally:
        ticket.release()
    for result in results:
        if isinstance(result, JSONResponse):  # the client went away
            return result
    choices = []
    for p, (call, completions) in enumerate(zip(calls, results)):
        prefix = call.prepared.prompt_text if completion.echo else ""
        for j, c in enumerate(completions):
            choices.append({
                "text": prefix + c.text, "index": p * sampling.n + j,
                "logprobs": _logprobs(backend, c.response_ids, c.logprobs, c.top_logprobs,
                                      len(prefix)) if sampling.logprobs else None,
                "finish_reason": c.finish_reason})
    prompt_tokens = sum(len(call.prepared.prompt_ids) for call in calls)
    completion_tokens = sum(len(c.response_ids) for r in results for c in r)
    return JSONResponse({
        "id": request_id, "object": "text_completion", "created": int(time.time()),
        "model": backend.name, "system_fingerprint": None, "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens}}, headers=headers)


async def _events(serving: Serving, calls: list[Any], request_id: str, echo: bool
                  ) -> AsyncIterator[str]:
    """SSE for completions: the prompts one after another, each token-streamed."""
    created, model = int(time.time()), serving.backend.name

    def sse(choice: dict[str, Any], usage: dict[str, int] | None = None) -> str:
        body = {"id": request_id, "object": "text_completion", "created": created, "model": model,
                "choices": [choice] if choice else []}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    prompt_tokens = completion_tokens = 0
    try:
        for p, call in enumerate(calls):
            n = call.request.n
            if echo:
                for j in range(n):
                    yield sse({"text": call.prepared.prompt_text, "index": p * n + j,
                               "logprobs": None, "finish_reason": None})
            async for item in stream_deltas(serving.backend, call.prepared, call.request,
                                            call.temperature, call.max_tokens):
                if isinstance(item, Delta):
                    yield sse({"text": item.text, "index": p * n + item.index,
                               "logprobs": _logprobs(serving.backend, item.token_ids, item.logprobs,
                                                     item.top_logprobs, 0)
                               if call.request.logprobs else None, "finish_reason": None})
                    continue
                call.record(item)
                for j, c in enumerate(item):
                    yield sse({"text": "", "index": p * n + j, "logprobs": None,
                               "finish_reason": c.finish_reason})
                prompt_tokens += len(call.prepared.prompt_ids)
                completion_tokens += sum(len(c.response_ids) for c in item)
    except Exception as exc:  # noqa: BLE001 - headers are sent; report in-band, OpenAI-style
        yield sse_error(exc)
        yield "data: [DONE]\n\n"
        return
    if calls and calls[0].request.include_usage:
        yield sse({}, {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                       "total_tokens": prompt_tokens + completion_tokens})
    yield "data: [DONE]\n\n"

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

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from .context import Endpoints
from .protocol import (ChatRequest, ProtocolError, _boolean, _integer, _number, _stop, _text,
                       error_body, new_id)
from .streaming import Delta, released, stream_deltas, top_texts

__all__ = ["add_completion_routes", "parse_completion_request"]

MAX_PROMPTS = 32
CONSUMED = frozenset({"model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed",
                      "logprobs", "echo", "stream", "stream_options", "user", "best_of", "suffix",
                      "metadata"})


def _prompts(value: Any) -> list[str | list[int]]:
    """``prompt``: a string, a list of strings, a list of token ids, or a list of id lists."""
    def is_ids(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in v)

    if isinstance(value, str) or is_ids(value):
        prompts = [value]
    elif isinstance(value, list) and value and all(isinstance(v, str) or is_ids(v) for v in value):
        prompts = list(value)
    else:
        raise ProtocolError("'prompt' must be a string, a list of strings, a list of token ids or "
                            "a list of token-id lists (non-empty)", param="prompt",
                            code="invalid_type")
    if len(prompts) > MAX_PROMPTS:
        raise ProtocolError(f"at most {MAX_PROMPTS} prompts per request", param="prompt",
                            code="invalid_value")
    for p in prompts:
        if isinstance(p, str):
            _text(p, "prompt")
    return prompts


def parse_completion_request(body: Any) -> tuple[list[str | list[int]], ChatRequest, dict[str, Any]]:
    """Validate a body: (prompts, sampling options as a ChatRequest, completion-only options)."""
    if not isinstance(body, dict):
        raise ProtocolError("request body must be a JSON object", code="invalid_type")
    if "prompt" not in body:
        raise ProtocolError("missing required parameter: 'prompt'", param="prompt",
                            code="missing_required_parameter")
    prompts = _prompts(body["prompt"])
    model = body.get("model", "")
    if not isinstance(model, str):
        raise ProtocolError("'model' must be a string", param="model", code="invalid_type")
    if body.get("suffix") is not None:
        raise ProtocolError("'suffix' (insertion) is not supported", param="suffix",
                            code="unsupported_parameter")
    n = _integer(body, "n", 1, 32) or 1
    best_of = _integer(body, "best_of", 1, 32)
    if best_of is not None and best_of != n:
        raise ProtocolError("'best_of' other than n is not supported", param="best_of",
                            code="unsupported_parameter")
    logprobs = _integer(body, "logprobs", 0, 5)
    echo = _boolean(body, "echo")
    if echo and logprobs is not None:
        raise ProtocolError("echo with logprobs would need the prompt's logprobs, which are not "
                            "computed", param="echo", code="unsupported_parameter")
    user = body.get("user") or ""
    if not isinstance(user, str):
        raise ProtocolError("'user' must be a string", param="user", code="invalid_type")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise ProtocolError("'stream_options' must be an object", param="stream_options",
                            code="invalid_type")
    top_p = _number(body, "top_p", 0.0, 1.0)
    seed = _integer(body, "seed", -(1 << 63), (1 << 64) - 1)
    sampling = ChatRequest(
        messages=[], model=model, temperature=_number(body, "temperature", 0.0, 2.0),
        top_p=1.0 if top_p is None else max(top_p, 1e-6),
        max_tokens=_integer(body, "max_tokens", 1, 1 << 20), n=n, stop=_stop(body.get("stop")),
        seed=None if seed is None else seed % (1 << 62), logprobs=logprobs is not None,
        top_logprobs=logprobs or 0,
        stream=_boolean(body, "stream"),
        include_usage=bool(stream_options.get("include_usage", False)), user=user)
    sampling.ignored = sorted(k for k in body if k not in CONSUMED)
    return prompts, sampling, {"echo": echo}


def _prepare(backend: Any, body: Any) -> tuple[ChatRequest, dict[str, Any], list[Any]]:
    """Runs in a worker thread (a multi-MB prompt takes seconds to tokenise): the validated
    request and each prompt tokenised."""
    prompts, sampling, options = parse_completion_request(body)
    return sampling, options, [backend.prepare_text(p, "prompt") for p in prompts]


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


def add_completion_routes(app: FastAPI, ep: Endpoints) -> None:
    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, None)

    @app.post("/rollout/{rollout_id}/v1/completions")
    async def rollout_completions(rollout_id: str, request: Request):
        return await complete(request, rollout_id)

    async def complete(request: Request, rollout_id: str | None):
        ep.check_auth(request)
        entry = ep.lookup(rollout_id)
        if not hasattr(ep.backend, "prepare_text"):
            raise ProtocolError("/v1/completions needs the local backend", code="unsupported")
        body = await ep.json_body(request)
        sampling, options, prepared = await ep.off_loop(_prepare, ep.backend, body)
        warnings = [f"ignored unsupported parameter(s): {', '.join(sampling.ignored)}"] \
            if sampling.ignored else []
        calls = [ep.make_call(request, entry, sampling, warnings, p) for p in prepared]
        headers = {"X-LL-Warning": "; ".join(dict.fromkeys(warnings))} if warnings else {}
        request_id = "cmpl-" + new_id().removeprefix("chatcmpl-")
        ticket = ep.admit(calls)
        if sampling.stream:
            return StreamingResponse(released(_events(ep, calls, request_id, options["echo"]),
                                               ticket),
                                     media_type="text/event-stream", headers=headers,
                                     background=BackgroundTask(ticket.release))
        try:
            results = await asyncio.gather(*(ep.complete(request, call) for call in calls))
        finally:
            ticket.release()
        for result in results:
            if isinstance(result, JSONResponse):  # the client went away
                return result
        choices = []
        for p, (call, completions) in enumerate(zip(calls, results)):
            prefix = call.prepared.prompt_text if options["echo"] else ""
            for j, c in enumerate(completions):
                choices.append({
                    "text": prefix + c.text, "index": p * sampling.n + j,
                    "logprobs": _logprobs(ep.backend, c.response_ids, c.logprobs,
                                          c.top_logprobs, len(prefix))
                    if sampling.logprobs else None,
                    "finish_reason": c.finish_reason})
        prompt_tokens = sum(len(call.prepared.prompt_ids) for call in calls)
        completion_tokens = sum(len(c.response_ids) for r in results for c in r)
        return JSONResponse({
            "id": request_id, "object": "text_completion", "created": int(time.time()),
            "model": ep.backend.name, "system_fingerprint": None, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}, headers=headers)




async def _events(ep: Endpoints, calls: list[Any], request_id: str, echo: bool
                  ) -> AsyncIterator[str]:
    """SSE for completions: the prompts one after another, each token-streamed."""
    created, model = int(time.time()), ep.backend.name

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
            async for item in stream_deltas(ep.backend, call.prepared, call.request,
                                            call.temperature, call.max_tokens):
                if isinstance(item, Delta):
                    yield sse({"text": item.text, "index": p * n + item.index,
                               "logprobs": _logprobs(ep.backend, item.token_ids, item.logprobs,
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
        error = exc if isinstance(exc, ProtocolError) else ProtocolError(
            f"{type(exc).__name__}: {exc}", type="server_error", status=500)
        yield f"data: {json.dumps(error_body(error.message, error.type, error.param, error.code))}\n\n"
        yield "data: [DONE]\n\n"
        return
    if calls and calls[0].request.include_usage:
        yield sse({}, {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                       "total_tokens": prompt_tokens + completion_tokens})
    yield "data: [DONE]\n\n"

"""The OpenAI chat-completions wire format: parse requests strictly, build responses and errors.

Kept free of FastAPI and torch so it can be tested (and fuzzed) on its own. Parsing is strict
about types and ranges because every accepted request ends up in a trajectory the trainer learns
from; unknown OpenAI parameters are accepted and reported back (``ignored``) instead of failing,
so off-the-shelf agents that send e.g. ``presence_penalty`` keep working.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from lightning_lab.inference.tools import (ToolError, check_history, parse_response_format,
                                           parse_tool_choice, parse_tools)

__all__ = ["ChatRequest", "ProtocolError", "parse_chat_request", "error_body", "completion_body",
           "chunk_body", "logprobs_content"]

ROLES = ("system", "developer", "user", "assistant", "tool", "function")
MAX_N = 32
MAX_MESSAGES = 4096
"""More messages than this is a client error (the app's byte and token caps bound the rest)."""
MAX_STOP = 4
MAX_TOP_LOGPROBS = 20
MAX_GRAMMAR_CHARS = 1 << 16
"""A longer ``guided_grammar`` is refused before llguidance compiles it."""
KNOWN_IGNORED = frozenset({
    "frequency_penalty", "presence_penalty", "logit_bias", "service_tier", "store", "modalities",
    "audio", "prediction", "reasoning_effort", "top_k", "web_search_options",
})
"""OpenAI parameters we accept but do not implement; reported in the ``X-LL-Warning`` header."""
CONSUMED = frozenset({
    "model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "n", "stop",
    "seed", "logprobs", "top_logprobs", "stream", "stream_options", "user", "metadata",
    "return_token_ids", "tools", "tool_choice", "parallel_tool_calls", "response_format",
    "functions", "function_call", "guided_grammar",
})


class ProtocolError(ValueError):
    """A client error; becomes an OpenAI-style error body with this status."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status: int = 400, type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type


@dataclass
class ChatRequest:
    """A validated ``/v1/chat/completions`` request (``temperature=None``: the rollout default)."""

    messages: list[dict[str, Any]]
    """Text content, plus ``tool_calls`` (assistant) and ``tool_call_id``/``name`` (tool) as sent."""
    model: str = ""
    temperature: float | None = None
    top_p: float = 1.0
    max_tokens: int | None = None
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    stream: bool = False
    include_usage: bool = False
    user: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    return_token_ids: bool = False
    """vLLM's extension: add ``prompt_token_ids`` and ``choices[].token_ids`` to the response."""
    tools: list[dict[str, Any]] = field(default_factory=list)
    """OpenAI function tools (legacy ``functions`` are converted), validated."""
    tool_choice: Any = None
    parallel_tool_calls: bool = True
    response_format: dict[str, Any] | None = None
    guided_grammar: str | None = None
    """vLLM's extension (``extra_body={"guided_grammar": ...}``): a Lark grammar (llguidance's
    dialect) the reply must follow, e.g. SQL over one database's identifiers."""
    ignored: list[str] = field(default_factory=list)
    """Parameters that were sent but have no effect here."""

    @property
    def tool_options(self) -> dict[str, Any]:
        """Keyword arguments for ``Policy.plan`` / ``inference.chat.plan_chat``."""
        return {"tools": self.tools or None, "tool_choice": self.tool_choice,
                "parallel_tool_calls": self.parallel_tool_calls,
                "response_format": self.response_format, "grammar": self.guided_grammar}


def _number(body: dict, name: str, lo: float, hi: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or (isinstance(value, float) and not math.isfinite(value)):  # ints: any size
        raise ProtocolError(f"'{name}' must be a number, got {value!r}", param=name,
                            code="invalid_type")
    if not lo <= value <= hi:
        raise ProtocolError(f"'{name}' must be between {lo} and {hi}, got {value}", param=name,
                            code="invalid_value")
    return float(value)


def _integer(body: dict, name: str, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"'{name}' must be an integer, got {value!r}", param=name,
                            code="invalid_type")
    if not lo <= value <= hi:
        raise ProtocolError(f"'{name}' must be between {lo} and {hi}, got {value}", param=name,
                            code="invalid_value")
    return value


def _boolean(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ProtocolError(f"'{name}' must be a boolean, got {value!r}", param=name,
                            code="invalid_type")
    return value


def _text(value: str, param: str) -> str:
    """``value`` if it is valid Unicode text: JSON's ``"\\ud800"`` decodes to a lone surrogate,
    which no tokenizer (and no UTF-8 file) accepts."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ProtocolError(f"'{param}' is not valid Unicode text (lone surrogate at {exc.start})",
                            param=param, code="invalid_value") from None
    return value


def _content(value: Any, i: int) -> str:
    """String content, or the text parts of a content list (images etc. are rejected)."""
    param = f"messages[{i}].content"
    if value is None:
        return ""
    if isinstance(value, str):
        return _text(value, param)
    if isinstance(value, list):
        texts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):
                raise ProtocolError("only text content parts are supported", param=param,
                                    code="invalid_value")
            texts.append(part["text"])
        return _text("".join(texts), param)
    raise ProtocolError(f"'{param}' must be a string or a list of text parts", param=param,
                        code="invalid_type")


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ProtocolError("'messages' must be a non-empty list", param="messages",
                            code="invalid_type" if not isinstance(value, list) else "invalid_value")
    if len(value) > MAX_MESSAGES:
        raise ProtocolError(f"'messages' holds {len(value)} messages; at most {MAX_MESSAGES} "
                            "are accepted", param="messages", code="too_many_messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise ProtocolError(f"'messages[{i}]' must be an object", param=f"messages[{i}]",
                                code="invalid_type")
        role = message.get("role")
        if role not in ROLES:
            raise ProtocolError(f"'messages[{i}].role' must be one of {list(ROLES)}, got {role!r}",
                                param=f"messages[{i}].role", code="invalid_value")
        msg: dict[str, Any] = {"role": role, "content": _content(message.get("content"), i)}
        for key in ("tool_calls", "tool_call_id", "name"):
            if message.get(key) is not None:
                msg[key] = message[key]
        if role == "assistant" and message.get("function_call") is not None:  # legacy form
            call = message["function_call"]
            msg["tool_calls"] = [{"id": f"call_legacy_{i}", "type": "function", "function": call}]
        if role == "function":  # legacy result: answers the call above it
            msg = {"role": "tool", "content": msg["content"], "tool_call_id": f"call_legacy_{i - 1}",
                   "name": message.get("name") or ""}
        out.append(msg)
    try:
        check_history(out)
    except ToolError as exc:
        raise ProtocolError(exc.message, param=exc.param, code=exc.code) from exc
    return out


def _tools(body: dict) -> tuple[list[dict[str, Any]], Any]:
    """``tools``/``tool_choice``, or the legacy ``functions``/``function_call`` converted."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    param = "tools"
    if tools is None and body.get("functions") is not None:
        functions, param = body["functions"], "functions"
        if not isinstance(functions, list):
            raise ProtocolError("'functions' must be a list", param="functions", code="invalid_type")
        tools = [{"type": "function", "function": f} for f in functions]
        legacy = body.get("function_call")
        choice = ({"type": "function", "function": legacy} if isinstance(legacy, dict)
                  else legacy)
    try:
        parsed = parse_tools(tools, param)
        parse_tool_choice(choice, parsed, "tool_choice" if param == "tools" else "function_call")
    except ToolError as exc:
        if param == "functions" and exc.param:
            exc.param = exc.param.replace(".function.", ".", 1)
        raise ProtocolError(exc.message, param=exc.param, code=exc.code) from exc
    return [t.to_openai() for t in parsed], choice


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ProtocolError("'stop' must be a string or a list of strings", param="stop",
                            code="invalid_type")
    if len(stops) > MAX_STOP or any(not s for s in stops):
        raise ProtocolError(f"'stop' takes at most {MAX_STOP} non-empty strings", param="stop",
                            code="invalid_value")
    return tuple(_text(s, "stop") for s in stops)


def parse_chat_request(body: Any) -> ChatRequest:
    """Validate a decoded JSON body; raises ``ProtocolError`` naming the offending parameter."""
    if not isinstance(body, dict):
        raise ProtocolError("request body must be a JSON object", code="invalid_type")
    if "messages" not in body:
        raise ProtocolError("missing required parameter: 'messages'", param="messages",
                            code="missing_required_parameter")
    model = body.get("model", "")
    if not isinstance(model, str):
        raise ProtocolError("'model' must be a string", param="model", code="invalid_type")
    _text(model, "model")
    max_tokens = _integer(body, "max_completion_tokens", 1, 1 << 20)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1, 1 << 20)
    top_p = _number(body, "top_p", 0.0, 1.0)
    seed = _integer(body, "seed", -(1 << 63), (1 << 64) - 1)
    user = body.get("user") or ""
    if not isinstance(user, str):
        raise ProtocolError("'user' must be a string", param="user", code="invalid_type")
    _text(user, "user")
    metadata = body.get("metadata") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ProtocolError("'metadata' must be an object of strings", param="metadata",
                            code="invalid_type")
    for key, value in metadata.items():
        _text(key + value, "metadata")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise ProtocolError("'stream_options' must be an object", param="stream_options",
                            code="invalid_type")
    tools, tool_choice = _tools(body)
    try:
        parse_response_format(body.get("response_format"))
    except ToolError as exc:
        raise ProtocolError(exc.message, param=exc.param, code=exc.code) from exc
    grammar = body.get("guided_grammar")
    if grammar is not None and (not isinstance(grammar, str) or not grammar.strip()
                                or len(grammar) > MAX_GRAMMAR_CHARS):
        raise ProtocolError(f"'guided_grammar' must be a non-empty Lark grammar string of at most "
                            f"{MAX_GRAMMAR_CHARS} characters", param="guided_grammar",
                            code="invalid_value")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise ProtocolError("'parallel_tool_calls' must be a boolean", param="parallel_tool_calls",
                            code="invalid_type")
    request = ChatRequest(
        messages=_messages(body["messages"]),
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=parallel,
        response_format=body.get("response_format"),
        guided_grammar=grammar,
        model=model,
        temperature=_number(body, "temperature", 0.0, 2.0),
        top_p=1.0 if top_p is None else max(top_p, 1e-6),  # OpenAI allows 0: only the top token
        max_tokens=max_tokens,
        n=_integer(body, "n", 1, MAX_N) or 1,
        stop=_stop(body.get("stop")),
        seed=None if seed is None else seed % (1 << 62),
        logprobs=_boolean(body, "logprobs"),
        top_logprobs=_integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS) or 0,
        stream=_boolean(body, "stream"),
        include_usage=bool(stream_options.get("include_usage", False)),
        user=user,
        metadata=dict(metadata),
        return_token_ids=_boolean(body, "return_token_ids"),
    )
    if request.top_logprobs and not request.logprobs:
        raise ProtocolError("'top_logprobs' needs 'logprobs': true", param="top_logprobs",
                            code="invalid_value")
    request.ignored = sorted(k for k in body if k not in CONSUMED)
    return request


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


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

"""``/v1/responses``: the Responses API subset the OpenAI Agents SDK uses, translated onto chat.

The Agents SDK's default model talks Responses: ``input`` items (messages, ``function_call``,
``function_call_output``), ``instructions`` and function ``tools``, the whole history sent each
turn (no server-side state). Each request becomes a chat request (items -> messages, function
calls -> assistant ``tool_calls``, outputs -> ``tool`` messages, tools -> chat tools) and takes
the chat path, so it is rendered, sampled, parsed and traced exactly like a chat completion; the
chat reply is turned back into output items (or streamed as Responses events). Stored state
(``previous_response_id``) is refused with a 400.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from .chat import complete_whole, new_call
from .protocol import ProtocolError, ResponsesRequest, parse_chat_request, validate
from .registry import OpenRollout
from .serving import Serving, ignored_warning, warning_headers
from .streaming import Delta, released

__all__ = ["respond", "to_chat_body", "to_response"]

PASSED = {"temperature": "temperature", "top_p": "top_p", "max_output_tokens": "max_tokens",
          "user": "user", "metadata": "metadata", "parallel_tool_calls": "parallel_tool_calls",
          "seed": "seed", "stop": "stop", "stream": "stream"}
"""Responses parameters with a chat equivalent (``seed``/``stop`` are extensions, as in vLLM)."""
TEXT_PART_TYPES = ("input_text", "output_text", "text", "refusal")


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def _text(content: Any, param: str) -> str:
    """A message's content: a string, or text parts (images and files are refused)."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise ProtocolError(f"'{param}' must be a string or a list of content parts", param=param,
                            code="invalid_type")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in TEXT_PART_TYPES:
            raise ProtocolError(f"'{param}[{j}]': only text content parts are supported",
                                param=f"{param}[{j}]", code="invalid_value")
        text = part.get("text", part.get("refusal"))
        if not isinstance(text, str):
            raise ProtocolError(f"'{param}[{j}].text' must be a string", param=f"{param}[{j}].text",
                                code="invalid_type")
        texts.append(text)
    return "".join(texts)


def _field(item: dict, key: str, i: int) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise ProtocolError(f"'input[{i}].{key}' must be a string", param=f"input[{i}].{key}",
                            code="invalid_type" if key in item else "missing_required_parameter")
    return value


def _messages(body: dict) -> list[dict[str, Any]]:
    """``instructions`` + ``input`` as chat messages; consecutive calls form one assistant turn."""
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise ProtocolError("'instructions' must be a string", param="instructions",
                                code="invalid_type")
        messages.append({"role": "system", "content": instructions})
    items = body.get("input")
    if isinstance(items, str):
        return messages + [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise ProtocolError("'input' must be a string or a non-empty list of items", param="input",
                            code="invalid_type")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ProtocolError(f"'input[{i}]' must be an object", param=f"input[{i}]",
                                code="invalid_type")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise ProtocolError(f"'input[{i}].role' must be user, system, developer or "
                                    f"assistant, got {role!r}", param=f"input[{i}].role",
                                    code="invalid_value")
            messages.append({"role": role,
                             "content": _text(item.get("content"), f"input[{i}].content")})
        elif kind == "function_call":
            call = {"id": _field(item, "call_id", i), "type": "function",
                    "function": {"name": _field(item, "name", i),
                                 "arguments": _field(item, "arguments", i)}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            elif last is not None and last["role"] == "assistant" and not last.get("tool_calls"):
                last["tool_calls"] = [call]  # text then calls: one assistant turn, as the model said
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": _field(item, "call_id", i),
                             "content": output if isinstance(output, str)
                             else _text(output, f"input[{i}].output")})
        elif kind == "reasoning":
            continue  # no reasoning tokens here; the Agents SDK may echo such items back
        else:
            raise ProtocolError(f"'input[{i}].type' {kind!r} is not supported (message, "
                                "function_call, function_call_output)", param=f"input[{i}].type",
                                code="unsupported_value")
    return messages


def _tools(body: dict) -> tuple[list[dict[str, Any]] | None, Any]:
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None:
        return None, choice
    if not isinstance(tools, list):
        raise ProtocolError("'tools' must be a list", param="tools", code="invalid_type")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise ProtocolError(f"'tools[{i}]': only function tools are supported",
                                param=f"tools[{i}].type", code="unsupported_value")
        function = {k: tool[k] for k in ("name", "description", "parameters", "strict")
                    if tool.get(k) is not None}
        out.append({"type": "function", "function": function})
    if isinstance(choice, dict) and choice.get("type") == "function":
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    return out or None, choice


def _response_format(body: dict) -> dict[str, Any] | None:
    text = body.get("text")
    if text is None:
        return None
    fmt = text.get("format") if isinstance(text, dict) else None
    if not isinstance(fmt, dict) or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_schema":
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": schema}
    return {"type": fmt.get("type")}


def to_chat_body(body: Any) -> tuple[dict[str, Any], list[str]]:
    """A Responses request as a chat-completions body, plus the parameters it ignores."""
    request = validate(ResponsesRequest, body)
    chat: dict[str, Any] = {"messages": _messages(body), "model": request.model}
    for key, chat_key in PASSED.items():
        if body.get(key) is not None:
            chat[chat_key] = body[key]
    tools, choice = _tools(body)
    if tools:
        chat["tools"] = tools
    if choice is not None:
        chat["tool_choice"] = choice
    response_format = _response_format(body)
    if response_format is not None:
        chat["response_format"] = response_format
    return chat, request.ignored


def _output(message: dict[str, Any]) -> list[dict[str, Any]]:
    """A chat assistant message as Responses output items (text first, then each call)."""
    items: list[dict[str, Any]] = []
    if message.get("content") or not message.get("tool_calls"):
        items.append({"type": "message", "id": _id("msg"), "status": "completed",
                      "role": "assistant",
                      "content": [{"type": "output_text", "text": message.get("content") or "",
                                   "annotations": [], "logprobs": []}]})
    for call in message.get("tool_calls") or []:
        items.append({"type": "function_call", "id": _id("fc"), "call_id": call["id"],
                      "name": call["function"]["name"],
                      "arguments": call["function"]["arguments"], "status": "completed"})
    return items


def to_response(body: dict[str, Any], chat: dict[str, Any] | None, model: str,
                response_id: str | None = None) -> dict[str, Any]:
    """The chat completion ``chat`` answered to the Responses request ``body``; ``chat=None``:
    the response still in progress (a stream's first events)."""
    choice = chat["choices"][0] if chat else {"finish_reason": None, "message": None}
    usage = chat["usage"] if chat else None
    truncated = choice["finish_reason"] == "length"
    text_format = body.get("text") if isinstance(body.get("text"), dict) else None
    return {
        "id": response_id or _id("resp"), "object": "response", "created_at": time.time(),
        "model": model,
        "status": "in_progress" if chat is None else "incomplete" if truncated else "completed",
        "incomplete_details": {"reason": "max_output_tokens"} if truncated else None,
        "error": None, "instructions": body.get("instructions"),
        "output": _output(choice["message"]) if chat else [],
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "tool_choice": body.get("tool_choice") or "auto", "tools": body.get("tools") or [],
        "temperature": body.get("temperature"), "top_p": body.get("top_p"),
        "max_output_tokens": body.get("max_output_tokens"), "metadata": body.get("metadata") or {},
        "text": text_format or {"format": {"type": "text"}}, "store": False,
        "usage": usage and {"input_tokens": usage["prompt_tokens"],
                            "input_tokens_details": {"cached_tokens": 0},
                            "output_tokens": usage["completion_tokens"],
                            "output_tokens_details": {"reasoning_tokens": 0},
                            "total_tokens": usage["total_tokens"]},
    }


async def respond(serving: Serving, request: Request, entry: OpenRollout | None):
    """Translate onto chat, take the chat path, translate the reply (or stream) back."""
    body = await serving.json_body(request)
    chat_body, ignored = to_chat_body(body)
    chat_request = parse_chat_request(chat_body)
    warnings = ignored_warning(sorted(set(ignored) | set(chat_request.ignored)))
    call = new_call(serving, request, entry, chat_request, warnings)
    call.meta["api"] = "responses"
    ticket = serving.admit([call])
    if chat_request.stream:
        return StreamingResponse(released(_events(body, call, serving.backend.name), ticket),
                                 media_type="text/event-stream", headers=warning_headers(warnings),
                                 background=BackgroundTask(ticket.release))
    completions = await complete_whole(serving, request, call, ticket, warnings)
    if isinstance(completions, JSONResponse):
        return completions
    return JSONResponse(to_response(body, call.response(completions), serving.backend.name),
                        headers=warning_headers(warnings))


class _Sequence:
    """Numbered SSE events of one streamed response (``sequence_number`` counts from 0)."""

    def __init__(self) -> None:
        self.next = 0

    def __call__(self, kind: str, **fields: Any) -> str:
        event = {"type": kind, "sequence_number": self.next, **fields}
        self.next += 1
        return f"event: {kind}\ndata: {json.dumps(event)}\n\n"


async def _events(body: dict[str, Any], call: Any, model: str) -> AsyncIterator[str]:
    """The Responses API's stream: created, in_progress, the message item with its text deltas
    as tokens are sampled, each function call item with its arguments, then completed (or
    incomplete) carrying the whole response, as the ``openai`` SDK and the Agents SDK read it."""
    event, response_id, message_id = _Sequence(), _id("resp"), _id("msg")
    started = to_response(body, None, model, response_id)
    yield event("response.created", response=started)
    yield event("response.in_progress", response=started)
    text, opened = "", False
    try:
        async for item in call.deltas():
            if not isinstance(item, Delta):
                completions = item
                continue
            if item.index != 0 or not item.text:
                continue
            for chunk in ([] if opened else _message_opened(event, message_id)):
                yield chunk
            opened = True
            text += item.text
            yield event("response.output_text.delta", item_id=message_id, output_index=0,
                        content_index=0, delta=item.text, logprobs=[])
    except asyncio.CancelledError:  # the client hung up: keep a trace of the call
        call.record_abort()
        raise
    except Exception as exc:  # noqa: BLE001 - headers are sent; report in-band
        error = exc if isinstance(exc, ProtocolError) else ProtocolError(
            f"{type(exc).__name__}: {exc}", type="server_error", status=500)
        yield event("error", code=error.code, message=error.message, param=error.param)
        return
    final = to_response(body, call.response(completions), model, response_id)
    for index, item in enumerate(final["output"]):
        if item["type"] == "message":
            item["id"] = message_id
            for chunk in ([] if opened else _message_opened(event, message_id)):
                yield chunk
            for chunk in _message_closed(event, item, index):
                yield chunk
        else:
            for chunk in _call_events(event, item, index):
                yield chunk
    yield event(f"response.{final['status']}", response=final)



def _message_opened(event: _Sequence, message_id: str) -> list[str]:
    item = {"type": "message", "id": message_id, "status": "in_progress", "role": "assistant",
            "content": []}
    return [event("response.output_item.added", output_index=0, item=item),
            event("response.content_part.added", item_id=message_id, output_index=0,
                  content_index=0, part={"type": "output_text", "text": "", "annotations": [],
                                         "logprobs": []})]


def _message_closed(event: _Sequence, item: dict[str, Any], index: int) -> list[str]:
    part = item["content"][0]
    return [event("response.output_text.done", item_id=item["id"], output_index=index,
                  content_index=0, text=part["text"], logprobs=[]),
            event("response.content_part.done", item_id=item["id"], output_index=index,
                  content_index=0, part=part),
            event("response.output_item.done", output_index=index, item=item)]


def _call_events(event: _Sequence, item: dict[str, Any], index: int) -> list[str]:
    """A function call item: added with empty arguments, the arguments, done."""
    return [event("response.output_item.added", output_index=index,
                  item={**item, "arguments": "", "status": "in_progress"}),
            event("response.function_call_arguments.delta", item_id=item["id"],
                  output_index=index, delta=item["arguments"]),
            event("response.function_call_arguments.done", item_id=item["id"],
                  output_index=index, name=item["name"], arguments=item["arguments"]),
            event("response.output_item.done", output_index=index, item=item)]



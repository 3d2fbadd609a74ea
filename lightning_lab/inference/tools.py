"""OpenAI function tools for a local model: the request types and their validation.

``parse_tools`` / ``parse_tool_choice`` / ``parse_response_format`` / ``check_history`` check
what a client sent and raise ``ToolError(message, param)`` naming the field (the proxy turns it
into a 400 in OpenAI's error shape); ``normalize_messages`` maps ``developer`` to ``system`` and
keeps the tool fields. How tools and calls become prompt text and back is a *format*
(``tool_formats``); ``chat.plan_chat`` puts both together for one turn.

Everything here is torch-free. This module and ``tool_formats`` are the shared core of the
proxy's ``/v1/chat/completions`` (and ``/v1/responses``, which translates its function tools
into these) and of ``Policy.chat(tools=...)``.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Tool", "ToolCall", "ToolChoice", "ParsedReply", "ToolError", "parse_tools",
    "parse_tool_choice", "parse_response_format", "normalize_messages", "check_history",
    "new_call_id", "JSON_STYLE",
]

NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
"""OpenAI's rule for function names."""


class ToolError(ValueError):
    """A client error in tools, tool_choice, response_format or tool history; names the field."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


@dataclass(frozen=True)
class Tool:
    """One function tool as the model sees it."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})
    """JSON Schema of the arguments object (checked against the JSON Schema meta-schema)."""
    strict: bool = False

    def to_openai(self) -> dict[str, Any]:
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}


@dataclass
class ToolCall:
    """A parsed call, in OpenAI's shape: ``arguments`` is a JSON string."""

    name: str
    arguments: str
    id: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or new_call_id()

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolChoice:
    """``mode`` is ``"none"``, ``"auto"`` or ``"required"``; ``name`` set means that function only."""

    mode: str = "auto"
    name: str | None = None

    @property
    def forced(self) -> bool:
        """Whether the reply must be a call (and is therefore constrained)."""
        return self.mode == "required" or self.name is not None


@dataclass
class ParsedReply:
    """Generated text split into content and calls; ``error`` says why calls were not parsed."""

    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)
    error: str | None = None
    partial: str = ""
    """An unterminated call that ends ``content`` (the text was cut off inside it)."""

    @property
    def finish_reason(self) -> str | None:
        """``"tool_calls"`` when there are calls, else None (keep the engine's reason)."""
        return "tool_calls" if self.tool_calls else None

    def cut_off(self) -> "ParsedReply":
        """The reply of a generation stopped by ``max_tokens``: the unfinished call leaves
        ``content``, as with OpenAI and vLLM; a framework would otherwise send half a call back
        in the next turn's history. Complete calls stay."""
        if not self.partial:
            return self
        content = self.content or ""
        content = content[: content.rfind(self.partial)].strip()
        return ParsedReply(content or None, self.tool_calls, self.error)

    def message(self) -> dict[str, Any]:
        """The OpenAI assistant message; append it to ``messages`` for the next turn."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            msg["tool_calls"] = [c.to_openai() for c in self.tool_calls]
        return msg


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


# ---- request validation ---------------------------------------------------------------------

def _check_schema(schema: Any, param: str) -> None:
    if not isinstance(schema, dict):
        raise ToolError(f"'{param}' must be a JSON Schema object", param, "invalid_type")
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ToolError(f"'{param}' is not a valid JSON Schema: {exc.message}", param) from exc


def parse_tools(value: Any, param: str = "tools") -> list[Tool]:
    """OpenAI ``tools`` (``[{"type": "function", "function": {...}}]``) -> ``Tool`` list."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ToolError(f"'{param}' must be a list", param, "invalid_type")
    tools, seen = [], set()
    for i, item in enumerate(value):
        where = f"{param}[{i}]"
        if isinstance(item, Tool):
            tools.append(item)
            continue
        if not isinstance(item, dict):
            raise ToolError(f"'{where}' must be an object", where, "invalid_type")
        if item.get("type") != "function":
            raise ToolError(f"'{where}.type' must be 'function', got {item.get('type')!r}",
                            f"{where}.type")
        function = item.get("function")
        if not isinstance(function, dict):
            raise ToolError(f"'{where}.function' must be an object", f"{where}.function",
                            "invalid_type")
        name = function.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ToolError(f"'{where}.function.name' must match {NAME_RE.pattern}, got {name!r}",
                            f"{where}.function.name")
        if name in seen:
            raise ToolError(f"duplicate tool name {name!r}", f"{where}.function.name")
        seen.add(name)
        description = function.get("description") or ""
        if not isinstance(description, str):
            raise ToolError(f"'{where}.function.description' must be a string",
                            f"{where}.function.description", "invalid_type")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        _check_schema(parameters, f"{where}.function.parameters")
        tools.append(Tool(name, description, parameters, bool(function.get("strict", False))))
    return tools


def parse_tool_choice(value: Any, tools: list[Tool], param: str = "tool_choice") -> ToolChoice:
    """``"none" | "auto" | "required" | {"type": "function", "function": {"name": ...}}``."""
    if value is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(value, str):
        if value not in ("none", "auto", "required"):
            raise ToolError(f"'{param}' must be 'none', 'auto', 'required' or a named function, "
                            f"got {value!r}", param)
        if value == "required" and not tools:
            raise ToolError(f"'{param}' is 'required' but no tools were given", param)
        return ToolChoice(value)
    if isinstance(value, dict) and value.get("type") == "function":
        name = (value.get("function") or {}).get("name")
        if not isinstance(name, str):
            raise ToolError(f"'{param}.function.name' must be a string", f"{param}.function.name",
                            "invalid_type")
        if name not in {t.name for t in tools}:
            raise ToolError(f"'{param}' names function {name!r}, which is not in 'tools'",
                            f"{param}.function.name")
        return ToolChoice("required", name)
    raise ToolError(f"'{param}' must be a string or {{'type': 'function', 'function': "
                    f"{{'name': ...}}}}, got {value!r}", param, "invalid_type")


def parse_response_format(value: Any, param: str = "response_format") -> dict[str, Any] | None:
    """``text`` -> None; ``json_object`` -> a non-empty object; ``json_schema`` -> its schema.

    ``json_object`` asks for at least one key: an empty ``{}`` is valid JSON but answers nothing
    (LangChain's ``json_mode`` got ``{}`` from a weak model every time)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ToolError(f"'{param}' must be an object", param, "invalid_type")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object", "minProperties": 1}
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise ToolError(f"'{param}.json_schema' must be an object with a 'schema'",
                            f"{param}.json_schema", "invalid_type")
        _check_schema(spec["schema"], f"{param}.json_schema.schema")
        return spec["schema"]
    raise ToolError(f"'{param}.type' must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                    f"{param}.type")


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict))


def normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies with ``developer`` -> ``system``, text content, and the tool fields kept.

    Assistant ``tool_calls`` keep their ids; tool messages keep ``tool_call_id`` and get the
    called function's ``name`` from the matching call when they lack one.
    """
    out: list[dict[str, Any]] = []
    names: dict[str, str] = {}
    for message in messages:
        role = "system" if message.get("role") == "developer" else message.get("role")
        msg: dict[str, Any] = {"role": role, "content": _text(message.get("content"))}
        if role == "assistant" and message.get("tool_calls"):
            msg["tool_calls"] = [
                {"id": c.get("id") or new_call_id(), "type": "function",
                 "function": {"name": c["function"]["name"],
                              "arguments": c["function"].get("arguments") or "{}"}}
                for c in message["tool_calls"]]
            names.update((c["id"], c["function"]["name"]) for c in msg["tool_calls"])
        if role == "tool":
            msg["tool_call_id"] = message.get("tool_call_id", "")
            msg["name"] = message.get("name") or names.get(msg["tool_call_id"], "")
        out.append(msg)
    return out


def check_history(messages: list[dict[str, Any]], param: str = "messages") -> None:
    """Every tool message answers an earlier assistant call (OpenAI rejects the rest too)."""
    known: set[str] = set()
    for i, message in enumerate(messages):
        role = message.get("role")
        if role == "assistant":
            calls = message.get("tool_calls") or []
            if not isinstance(calls, list):
                raise ToolError(f"'{param}[{i}].tool_calls' must be a list",
                                f"{param}[{i}].tool_calls", "invalid_type")
            for j, call in enumerate(calls):
                where = f"{param}[{i}].tool_calls[{j}]"
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                    raise ToolError(f"'{where}.function.name' must be a string",
                                    f"{where}.function.name", "invalid_type")
                if not isinstance(function.get("arguments", ""), str):
                    raise ToolError(f"'{where}.function.arguments' must be a JSON string",
                                    f"{where}.function.arguments", "invalid_type")
                if isinstance(call.get("id"), str):
                    known.add(call["id"])
        elif role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or call_id not in known:
                raise ToolError(f"'{param}[{i}].tool_call_id' {call_id!r} matches no earlier "
                                "assistant tool call", f"{param}[{i}].tool_call_id")


JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ",
              "lenient": True}
"""llguidance JSON options: the compact spacing ``json.dumps`` writes, no free whitespace (a
free-whitespace grammar lets a weak model pad for hundreds of tokens)."""

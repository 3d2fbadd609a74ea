"""OpenAI function tools for a local model: validate requests, render history, parse replies.

The model only ever sees text, so tool calling is a *format*: how tool schemas, assistant
``tool_calls`` and ``role: "tool"`` results are written into the prompt, and how calls are read
back out of generated text. A ``ToolFormat`` owns both directions (renderer + parser) plus the
grammar that forces a valid call; formats are registered by name (``register_format``).

Shipped: ``"hermes"``, the Hermes/Qwen2.5 convention (tools listed in the system turn inside
``<tools>``, calls as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, results as
``<tool_response>`` in a user turn), rendered through the tokenizer's plain chat template; and
``"template"``, which hands ``tools``/``tool_calls``/tool messages to the tokenizer's own chat
template (for templates that support tools, e.g. Qwen2.5's, which uses the same call syntax) and
parses with the Hermes parser. ``"auto"`` picks ``"template"`` when the chat template mentions
``tools``, else ``"hermes"``.

Everything here is torch-free and deterministic: the rendered prompt is the exact text whose
token ids are recorded, so the trainer conditions on what the model saw, tool results included.
This module is the shared core of the proxy's ``/v1/chat/completions`` (and ``/v1/responses``,
which translates its function tools into these) and of ``Policy.chat(tools=...)``.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

__all__ = [
    "Tool", "ToolCall", "ToolChoice", "ParsedReply", "ToolError", "ToolFormat", "HermesFormat",
    "TemplateFormat", "parse_tools", "parse_tool_choice", "parse_response_format",
    "normalize_messages", "check_history", "register_format", "get_format", "format_names",
    "new_call_id",
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

    @property
    def finish_reason(self) -> str | None:
        """``"tool_calls"`` when there are calls, else None (keep the engine's reason)."""
        return "tool_calls" if self.tool_calls else None

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
    """``text`` -> None; ``json_object`` -> ``{"type": "object"}``; ``json_schema`` -> its schema."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ToolError(f"'{param}' must be an object", param, "invalid_type")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
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


# ---- formats --------------------------------------------------------------------------------

class ToolFormat(Protocol):
    """How tools and calls become prompt text and back (one registered name per format)."""

    name: str

    def render(self, tokenizer: Any, messages: list[dict[str, Any]], tools: list[Tool]) -> str:
        """The full prompt text (generation prompt included) for normalized ``messages``."""

    def parse(self, text: str, tools: list[Tool]) -> ParsedReply:
        """Split generated text into content and calls (unknown names / bad JSON -> error)."""

    def call_grammar(self, tools: list[Tool], parallel: bool) -> str:
        """A Lark grammar (llguidance dialect, ``%json`` allowed) of one or more valid calls."""


CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ",
              "lenient": True}
"""llguidance JSON options: the compact spacing ``json.dumps`` writes, no free whitespace (a
free-whitespace grammar lets a weak model pad for hundreds of tokens)."""


def _arguments_json(arguments: str) -> Any:
    """History arguments (a JSON string) as an object for rendering; raw text if not JSON."""
    try:
        return json.loads(arguments)
    except (TypeError, ValueError):
        return arguments


class HermesFormat:
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, rendered without template help."""

    name = "hermes"

    def system_text(self, tools: list[Tool]) -> str:
        listed = "\n".join(json.dumps(t.to_openai(), ensure_ascii=False) for t in tools)
        return ("# Tools\n\nYou can call functions to help answer. Their signatures are inside "
                f"<tools></tools>:\n<tools>\n{listed}\n</tools>\n\nTo call a function, reply with "
                "one JSON object per call inside <tool_call></tool_call> tags:\n<tool_call>\n"
                '{"name": <function-name>, "arguments": <arguments-object>}\n</tool_call>')

    def call_text(self, name: str, arguments: Any) -> str:
        body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
        return f"<tool_call>\n{body}\n</tool_call>"

    def plain_messages(self, messages: list[dict[str, Any]], tools: list[Tool]) -> list[dict[str, str]]:
        """Messages any chat template can render: calls and results become text."""
        out: list[dict[str, str]] = []
        for msg in messages:
            role = msg["role"]
            if role == "assistant" and msg.get("tool_calls"):
                parts = [msg["content"]] if msg["content"] else []
                parts += [self.call_text(c["function"]["name"],
                                         _arguments_json(c["function"]["arguments"]))
                          for c in msg["tool_calls"]]
                out.append({"role": "assistant", "content": "\n".join(parts)})
            elif role == "tool":
                block = f"<tool_response>\n{msg['content']}\n</tool_response>"
                if out and out[-1].get("tool_results"):  # consecutive results share one turn
                    out[-1]["content"] += "\n" + block
                else:
                    out.append({"role": "user", "content": block, "tool_results": "1"})
            else:
                out.append({"role": role, "content": msg["content"]})
        for msg in out:
            msg.pop("tool_results", None)
        if tools:
            tool_text = self.system_text(tools)
            if out and out[0]["role"] == "system":
                out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{tool_text}"}
            else:
                out.insert(0, {"role": "system", "content": tool_text})
        return out

    def render(self, tokenizer: Any, messages: list[dict[str, Any]], tools: list[Tool]) -> str:
        return tokenizer.apply_chat_template(self.plain_messages(messages, tools), tokenize=False,
                                             add_generation_prompt=True)

    def parse(self, text: str, tools: list[Tool]) -> ParsedReply:
        bodies = CALL_RE.findall(text)
        if not bodies:
            if "<tool_call>" in text:
                return ParsedReply(text, error="unterminated <tool_call>")
            return ParsedReply(text)
        names = {t.name for t in tools}
        calls = []
        for body in bodies:
            try:
                data = json.loads(body)
            except ValueError as exc:
                return ParsedReply(text, error=f"tool call is not JSON: {exc}")
            if not isinstance(data, dict) or not isinstance(data.get("name"), str):
                return ParsedReply(text, error="tool call has no string 'name'")
            if data["name"] not in names:
                return ParsedReply(text, error=f"unknown tool {data['name']!r}")
            arguments = data.get("arguments", {})
            if isinstance(arguments, str):  # some models write the OpenAI string form
                try:
                    arguments = json.loads(arguments)
                except ValueError as exc:
                    return ParsedReply(text, error=f"tool call arguments are not JSON: {exc}")
            if not isinstance(arguments, dict):
                return ParsedReply(text, error="tool call arguments are not an object")
            calls.append(ToolCall(data["name"], json.dumps(arguments, ensure_ascii=False)))
        content = CALL_RE.sub("", text).strip()
        return ParsedReply(content or None, calls)

    def call_grammar(self, tools: list[Tool], parallel: bool) -> str:
        options = [{"type": "object", "properties": {"name": {"const": t.name},
                                                     "arguments": t.parameters},
                    "required": ["name", "arguments"], "additionalProperties": False}
                   for t in tools]
        schema = {"anyOf": options, "x-guidance": JSON_STYLE}
        repeat = ' ("\\n" call)*' if parallel else ""
        return (f"start: call{repeat}\n"
                'call: "<tool_call>\\n" body "\\n</tool_call>"\n'
                f"body: %json {json.dumps(schema)}\n")


class TemplateFormat(HermesFormat):
    """The tokenizer's own tool-aware chat template renders; Hermes syntax parses and constrains."""

    name = "template"

    def render(self, tokenizer: Any, messages: list[dict[str, Any]], tools: list[Tool]) -> str:
        history = []
        for msg in messages:
            msg = dict(msg)
            if msg.get("tool_calls"):  # templates index arguments as a mapping
                msg["tool_calls"] = [
                    {**c, "function": {**c["function"],
                                       "arguments": _arguments_json(c["function"]["arguments"])}}
                    for c in msg["tool_calls"]]
            history.append(msg)
        return tokenizer.apply_chat_template(history, tools=[t.to_openai() for t in tools] or None,
                                             tokenize=False, add_generation_prompt=True)


_FORMATS: dict[str, Callable[[], ToolFormat]] = {"hermes": HermesFormat,
                                                 "template": TemplateFormat}


def register_format(name: str, factory: Callable[[], ToolFormat]) -> None:
    """Add a format; refuses to rebind a name to another factory."""
    if name in _FORMATS and _FORMATS[name] is not factory:
        raise ValueError(f"tool format {name!r} is already registered")
    _FORMATS[name] = factory


def format_names() -> list[str]:
    return sorted(_FORMATS) + ["auto"]


def template_supports_tools(tokenizer: Any) -> bool:
    template = getattr(tokenizer, "chat_template", None) or ""
    return isinstance(template, str) and "tools" in template


def get_format(name: str = "auto", tokenizer: Any = None) -> ToolFormat:
    """A format by name; ``"auto"``: the chat template's if it handles tools, else Hermes."""
    if name == "auto":
        name = "template" if template_supports_tools(tokenizer) else "hermes"
    if name not in _FORMATS:
        raise KeyError(f"unknown tool format {name!r}; known: {format_names()}")
    return _FORMATS[name]()

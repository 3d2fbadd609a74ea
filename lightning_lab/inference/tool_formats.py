"""Tool formats: how tools, calls and results become prompt text, and calls are read back.

A ``ToolFormat`` owns both directions (renderer + parser) plus the grammar that forces a valid
call; formats are registered by name (``register_format``). Shipped: ``"hermes"``, the
Hermes/Qwen2.5 convention (tools listed in the system turn inside ``<tools>``, calls as
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, results as ``<tool_response>`` in a
user turn), rendered through the tokenizer's plain chat template; and ``"template"``, which hands
``tools``/``tool_calls``/tool messages to the tokenizer's own chat template (for templates that
support tools, e.g. Qwen2.5's, which uses the same call syntax) and parses with the Hermes
parser. ``"auto"`` picks ``"template"`` when the chat template mentions ``tools``.

The rendered prompt is the exact text whose token ids are recorded, so the trainer conditions on
what the model saw, tool results included.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Protocol

from .tools import JSON_STYLE, ParsedReply, Tool, ToolCall

__all__ = ["ToolFormat", "HermesFormat", "TemplateFormat", "register_format", "get_format",
           "format_names", "template_supports_tools", "closed"]


class ToolFormat(Protocol):
    """How tools and calls become prompt text and back (one registered name per format)."""

    name: str

    def render(self, tokenizer: Any, messages: list[dict[str, Any]], tools: list[Tool]) -> str:
        """The full prompt text (generation prompt included) for normalized ``messages``."""

    def parse(self, text: str, tools: list[Tool]) -> ParsedReply:
        """Split generated text into content and calls (unknown names / bad JSON -> error); an
        unterminated last call is also set as ``partial``, so a cut-off reply can drop it."""

    def call_grammar(self, tools: list[Tool], parallel: bool) -> str:
        """A Lark grammar (llguidance dialect, ``%json`` allowed) of one or more valid calls."""


CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)

def _arguments_json(arguments: str) -> Any:
    """History arguments (a JSON string) as an object for rendering; raw text if not JSON."""
    try:
        return json.loads(arguments)
    except (TypeError, ValueError):
        return arguments


def closed(schema: dict[str, Any]) -> dict[str, Any]:
    """An object schema that does not say ``additionalProperties`` gets ``false`` for forced calls.

    Like OpenAI's strict mode: a constrained call fills in the declared arguments only, instead
    of inventing extra keys the tool would reject (a weak model can pad one for hundreds of tokens).
    """
    if schema.get("type") == "object" and "additionalProperties" not in schema:
        return {**schema, "additionalProperties": False}
    return schema


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
        _, tag, tail = text.rpartition("<tool_call>")
        partial = (tag + tail).strip() if tag and "</tool_call>" not in tail else ""
        reply = self._parse_calls(text, tools)
        if partial:
            reply.partial, reply.error = partial, reply.error or "unterminated <tool_call>"
        return reply

    def _parse_calls(self, text: str, tools: list[Tool]) -> ParsedReply:
        """The complete calls; all text outside them (an unterminated call too) is content."""
        bodies = CALL_RE.findall(text)
        if not bodies:
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
                                                     "arguments": closed(t.parameters)},
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

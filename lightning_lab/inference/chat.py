"""One chat turn with OpenAI semantics: plan the prompt and constraint, then read the reply.

``plan_chat`` turns (messages, tools, tool_choice, parallel_tool_calls, response_format) into the
exact prompt text, plus a compiled grammar when the reply must be a call or JSON; ``ChatPlan.
reply`` parses one sampled text into an OpenAI assistant message and the facts a transition
records (``meta``). ``Policy.generate/chat`` and the proxy's local backend both go through here,
so an in-process agent and an HTTP agent get the same prompt ids for the same conversation.

When is a reply constrained: ``tool_choice`` ``"required"`` or a named function (a call grammar
from the tool format), else ``response_format`` ``json_object``/``json_schema`` when no call is
possible (no tools, or ``tool_choice="none"``), else a caller's own Lark ``grammar`` (vLLM's
``guided_grammar``: e.g. SQL over one database's identifiers). ``"auto"`` is never constrained:
the model may answer in text, and text that looks like a broken call stays ``content`` with the
reason in ``meta["tool_parse_error"]``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

from .schema_bounds import bound_schema
from .tool_formats import ToolFormat, get_format
from .tools import (ParsedReply, Tool, ToolChoice, ToolError, check_history, normalize_messages,
                    parse_response_format, parse_tool_choice, parse_tools)

__all__ = ["ChatPlan", "plan_chat"]


@dataclass
class ChatPlan:
    """Everything fixed before sampling; ``reply`` is applied to each sample."""

    messages: list[dict[str, Any]]
    tools: list[Tool]
    choice: ToolChoice
    parallel: bool
    response_schema: dict[str, Any] | None
    format: ToolFormat
    prompt_text: str
    grammar: str | None = None
    """Compiled llguidance grammar, or None when sampling is free."""
    meta: dict[str, Any] = field(default_factory=dict)

    def reply(self, text: str, finish_reason: str, constrained: bool = False,
              constraint_error: str = "") -> tuple[ParsedReply, str, dict[str, Any]]:
        """(parsed reply, OpenAI finish_reason, transition meta) for one sampled ``text``."""
        meta: dict[str, Any] = dict(self.meta)
        if constrained:
            meta["constrained"] = True
        if constraint_error:
            meta["constraint_error"] = constraint_error
        if self.tools and self.choice.mode != "none":
            parsed = self.format.parse(text, self.tools)
            if self.choice.name and any(c.name != self.choice.name for c in parsed.tool_calls):
                parsed = ParsedReply(text, error=f"called a tool other than {self.choice.name!r}")
            if not self.parallel and len(parsed.tool_calls) > 1:
                meta["dropped_tool_calls"] = len(parsed.tool_calls) - 1
                parsed.tool_calls = parsed.tool_calls[:1]
            if parsed.error or (self.choice.forced and not parsed.tool_calls):
                meta["tool_parse_error"] = parsed.error or f"no tool call ({finish_reason})"
            if finish_reason == "length" and parsed.partial:
                meta["cut_tool_call"] = parsed.partial
                parsed = parsed.cut_off()
            meta["tool_calls"] = [c.name for c in parsed.tool_calls]
        else:
            parsed = ParsedReply(text)
        if self.response_schema is not None and not parsed.tool_calls:
            try:
                json.loads(text)
                meta["json_valid"] = True
            except ValueError:
                meta["json_valid"] = False
        if finish_reason in ("length", "error"):  # a cut-off or failed reply says so, calls or not
            return parsed, finish_reason, meta
        return parsed, parsed.finish_reason or finish_reason, meta


def plan_chat(tokenizer: Any, messages: list[dict[str, Any]], *, tools: Any = None,
              tool_choice: Any = None, parallel_tool_calls: bool = True,
              response_format: Any = None, tool_format: str | ToolFormat = "auto",
              prefill: str = "", grammar: str | None = None,
              compile_grammar: Any = None) -> ChatPlan:
    """Validate and render one turn. Raises ``ToolError`` (a ValueError) naming the bad field.

    ``grammar`` is a Lark grammar (llguidance's dialect) of the generated text, after
    ``prefill``; it cannot be combined with a forced call or a ``response_format``, which bring
    their own. ``compile_grammar(lark) -> str`` checks a grammar against the model's vocabulary
    (the engine's ``compile_grammar``); without it no constraint is applied.
    """
    parsed_tools = parse_tools(tools)
    choice = parse_tool_choice(tool_choice, parsed_tools)
    schema = parse_response_format(response_format)
    check_history(messages)
    fmt = get_format(tool_format, tokenizer) if isinstance(tool_format, str) else tool_format
    normalized = normalize_messages(messages)
    text = fmt.render(tokenizer, normalized, parsed_tools) + prefill
    plan = ChatPlan(normalized, parsed_tools, choice, parallel_tool_calls, schema, fmt, text,
                    meta={"tool_format": fmt.name} if parsed_tools else {})
    lark = None
    if grammar is not None:
        if choice.forced or schema is not None:
            raise ToolError("grammar cannot be combined with a forced tool call or a "
                            "response_format", "grammar")
        if not isinstance(grammar, str) or not grammar.strip():
            raise ToolError("grammar must be a non-empty Lark grammar string", "grammar")
        lark = grammar
    elif choice.forced:
        allowed = [replace(t, parameters=bound_schema(t.parameters))
                   for t in parsed_tools if choice.name in (None, t.name)]
        lark = fmt.call_grammar(allowed, parallel_tool_calls and choice.name is None)
    elif schema is not None and (not parsed_tools or choice.mode == "none"):
        from .constraints import json_schema_grammar

        lark = json_schema_grammar(bound_schema(schema))
    if lark is not None and compile_grammar is not None:
        try:
            plan.grammar = compile_grammar(lark)
        except ValueError as exc:  # a schema llguidance cannot compile is the client's field
            param = ("grammar" if grammar is not None else "tools" if choice.forced
                     else "response_format")
            raise ToolError(f"cannot constrain to this {param}: {exc}", param) from exc
    return plan

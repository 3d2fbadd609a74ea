"""The OpenAI wire format as pydantic models: chat, completions and responses requests, errors.

Kept free of FastAPI and torch so it can be tested (and fuzzed) on its own. Validation is strict
about types and ranges (no coercion: ``"1"`` is not a number) because every accepted request
ends up in a trajectory the trainer learns from. Fields a model does not declare are accepted
and listed in ``ignored`` (the ``X-LL-Warning`` header) instead of failing, so off-the-shelf
agents that send e.g. ``presence_penalty`` keep working. ``validate`` turns pydantic's first
error into an OpenAI-style ``ProtocolError`` whose ``param`` names the field
(``messages[0].content``).
"""

from __future__ import annotations

import sys
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field,
                      ValidationError, field_validator, model_validator)

from lightning_lab.inference.tools import (ToolError, check_history, parse_response_format,
                                           parse_tool_choice, parse_tools)

__all__ = ["ChatRequest", "CompletionRequest", "ResponsesRequest", "ProtocolError", "validate",
           "parse_chat_request", "error_body"]

MAX_N = 32
MAX_MESSAGES = 4096
"""More messages than this is a client error (the app's byte and token caps bound the rest)."""
MAX_STOP = 4
MAX_TOP_LOGPROBS = 20
MAX_PROMPTS = 32
MAX_GRAMMAR_CHARS = 1 << 16
"""A longer ``guided_grammar`` is refused before llguidance compiles it."""


class ProtocolError(ValueError):
    """A client error; becomes an OpenAI-style error body with this status."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status: int = 400, type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type


class FieldError(ValueError):
    """A field validator's complaint, ``what`` is wrong; ``validate`` names the field (from
    pydantic's location, which the validator does not know: ``messages[3].content``)."""

    def __init__(self, what: str, code: str = "invalid_value"):
        super().__init__(what)
        self.what, self.code = what, code


# ---------------------------------------------------------------- field types
def _valid_text(value: str) -> str:
    """JSON's ``"\\ud800"`` decodes to a lone surrogate, which no tokenizer (or UTF-8 file) takes."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise FieldError(f"is not valid Unicode text (lone surrogate at {exc.start})") from None
    return value


def _finite_range(value: Any) -> Any:
    """An int beyond float range is a number out of range, not a wrong type (as JSON reads it)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > sys.float_info.max:
        return sys.float_info.max if value > 0 else -sys.float_info.max
    return value


def _or(default: Any) -> BeforeValidator:
    """``null`` (or, with ``falsy``, any false value) means the default, as OpenAI reads it."""
    return BeforeValidator(lambda v: default if v is None else v)


Text = Annotated[str, AfterValidator(_valid_text)]
Number = Annotated[float, BeforeValidator(_finite_range)]
Seed = Annotated[int | None, Field(ge=-(1 << 63), le=(1 << 64) - 1),
                 AfterValidator(lambda s: None if s is None else s % (1 << 62))]
TopP = Annotated[Number, Field(ge=0.0, le=1.0), _or(1.0),
                 AfterValidator(lambda p: max(p, 1e-6))]  # OpenAI allows 0: only the top token
MaxTokens = Annotated[int | None, Field(ge=1, le=1 << 20)]
Flag = Annotated[bool, _or(False)]


def _stop(value: Any) -> tuple[str, ...]:
    stops = [] if value is None else [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise FieldError("must be a string or a list of strings", "invalid_type")
    if len(stops) > MAX_STOP or any(not s for s in stops):
        raise FieldError(f"takes at most {MAX_STOP} non-empty strings")
    return tuple(_valid_text(s) for s in stops)


def _metadata(value: Any) -> dict[str, str]:
    value = value or {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise FieldError("must be an object of strings", "invalid_type")
    for key, text in value.items():
        _valid_text(key + text)
    return dict(value)


def _object(value: Any) -> dict[str, Any]:
    if not isinstance(value or {}, dict):
        raise FieldError("must be an object", "invalid_type")
    return value or {}


class _Request(BaseModel):
    """What every endpoint's request shares: strict types, undeclared fields kept as extras."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False,
                              validate_assignment=False)

    model: Text = ""
    temperature: Annotated[Number | None, Field(ge=0.0, le=2.0)] = None
    """None: the rollout's temperature, else the policy's (``tracing.sampling_temperature``)."""
    top_p: TopP = 1.0
    max_tokens: MaxTokens = None
    n: Annotated[int, Field(ge=1, le=MAX_N), _or(1)] = 1
    stop: Annotated[tuple[str, ...], BeforeValidator(_stop)] = ()
    seed: Seed = None
    stream: Flag = False
    stream_options: Annotated[dict[str, Any], BeforeValidator(_object)] = {}
    user: Annotated[Text, BeforeValidator(lambda v: v or "")] = ""

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options.get("include_usage", False))

    @property
    def ignored(self) -> list[str]:
        """Parameters that were sent but have no effect here."""
        return sorted(self.model_extra or {})


# ---------------------------------------------------------------- chat
def _content(value: Any) -> str:
    """String content, or the text parts of a content list (images etc. are rejected)."""
    if value is None or isinstance(value, str):
        return _valid_text(value or "")
    if not isinstance(value, list):
        raise FieldError("must be a string or a list of text parts", "invalid_type")
    if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
               for p in value):
        raise FieldError("holds a part that is not text: only text content parts are supported")
    return _valid_text("".join(p["text"] for p in value))


class ChatMessage(BaseModel):
    """One message as sent; ``tool_calls``/``tool_call_id``/``name`` are checked as a history."""

    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Annotated[str, BeforeValidator(_content)] = ""
    tool_calls: Any = None
    tool_call_id: Any = None
    name: Any = None
    function_call: Any = None
    """Legacy: an assistant's single call (``role: "function"`` answers it)."""

    def as_dict(self, i: int) -> dict[str, Any]:
        """The chat-template form, the legacy function call and result converted."""
        if self.role == "function":  # legacy result: answers the call above it
            return {"role": "tool", "content": self.content,
                    "tool_call_id": f"call_legacy_{i - 1}", "name": self.name or ""}
        msg: dict[str, Any] = {"role": self.role, "content": self.content}
        for key in ("tool_calls", "tool_call_id", "name"):
            if getattr(self, key) is not None:
                msg[key] = getattr(self, key)
        if self.role == "assistant" and self.function_call is not None:
            msg["tool_calls"] = [{"id": f"call_legacy_{i}", "type": "function",
                                  "function": self.function_call}]
        return msg


def _few_messages(value: Any) -> Any:
    """Refused by length before thousands of messages are validated one by one."""
    if isinstance(value, list) and len(value) > MAX_MESSAGES:
        raise FieldError(f"holds {len(value)} messages; at most {MAX_MESSAGES} are accepted",
                         "too_many_messages")
    return value


def _history(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    out = [m.as_dict(i) for i, m in enumerate(messages)]
    try:
        check_history(out)
    except ToolError as exc:
        raise ProtocolError(exc.message, param=exc.param, code=exc.code) from exc
    return out


class ChatRequest(_Request):
    """A validated ``/v1/chat/completions`` request; also the sampling options every endpoint
    hands the backend (``CompletionRequest.sampling()``)."""

    max_completion_tokens: MaxTokens = None
    """The newer name of ``max_tokens``; wins when both are sent."""
    metadata: Annotated[dict[str, str], BeforeValidator(_metadata)] = {}
    tools: Any = None
    """OpenAI function tools (legacy ``functions`` are converted), validated in ``_tool_fields``."""
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    guided_grammar: str | None = None
    """vLLM's extension (``extra_body={"guided_grammar": ...}``): a Lark grammar (llguidance's
    dialect) the reply must follow, e.g. SQL over one database's identifiers."""
    parallel_tool_calls: bool = True
    messages: Annotated[list[ChatMessage], BeforeValidator(_few_messages), Field(min_length=1),
                        AfterValidator(_history)]
    """Validated as ``ChatMessage``; kept as the dicts the chat template takes."""
    logprobs: Flag = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS), _or(0)] = 0
    return_token_ids: Flag = False
    """vLLM's extension: add ``prompt_token_ids`` and ``choices[].token_ids`` to the response."""

    @field_validator("response_format", mode="before")
    @classmethod
    def _response_format(cls, value: Any) -> Any:
        try:
            parse_response_format(value)
        except ToolError as exc:
            raise ProtocolError(exc.message, param=exc.param, code=exc.code) from exc
        return value

    @field_validator("guided_grammar", mode="before")
    @classmethod
    def _grammar(cls, value: Any) -> Any:
        if value is not None and (not isinstance(value, str) or not value.strip()
                                  or len(value) > MAX_GRAMMAR_CHARS):
            raise FieldError(f"must be a non-empty Lark grammar string of at most "
                             f"{MAX_GRAMMAR_CHARS} characters")
        return value

    @model_validator(mode="after")
    def _tool_fields(self) -> "ChatRequest":
        """Legacy ``functions``/``function_call`` become ``tools``/``tool_choice``; both checked
        together (a named choice must name a tool); ``max_completion_tokens`` wins."""
        param, tools, choice = "tools", self.tools, self.tool_choice
        if tools is None and self.functions is not None:
            if not isinstance(self.functions, list):
                raise ProtocolError("'functions' must be a list", param="functions",
                                    code="invalid_type")
            param, tools = "functions", [{"type": "function", "function": f} for f in self.functions]
            legacy = self.function_call
            choice = {"type": "function", "function": legacy} if isinstance(legacy, dict) else legacy
        try:
            parsed = parse_tools(tools, param)
            parse_tool_choice(choice, parsed, "tool_choice" if param == "tools" else "function_call")
        except ToolError as exc:
            if param == "functions" and exc.param:
                exc.param = exc.param.replace(".function.", ".", 1)
            raise ProtocolError(exc.message, param=exc.param, code=exc.code) from exc
        self.tools, self.tool_choice = [t.to_openai() for t in parsed], choice
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        if self.top_logprobs and not self.logprobs:
            raise ProtocolError("'top_logprobs' needs 'logprobs': true", param="top_logprobs",
                                code="invalid_value")
        return self

    @property
    def tool_options(self) -> dict[str, Any]:
        """Keyword arguments for ``Policy.plan`` / ``inference.chat.plan_chat``."""
        return {"tools": self.tools or None, "tool_choice": self.tool_choice,
                "parallel_tool_calls": self.parallel_tool_calls,
                "response_format": self.response_format, "grammar": self.guided_grammar}


# ---------------------------------------------------------------- completions
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
        raise FieldError("must be a string, a list of strings, a list of token ids or a list "
                         "of token-id lists (non-empty)", "invalid_type")
    if len(prompts) > MAX_PROMPTS:
        raise FieldError(f"holds {len(prompts)} prompts; at most {MAX_PROMPTS} per request")
    for p in prompts:
        if isinstance(p, str):
            _valid_text(p)
    return prompts


def _unsupported(why: str) -> AfterValidator:
    def refuse(value: Any) -> Any:
        if value is not None:
            raise FieldError(why, "unsupported_parameter")
        return value
    return AfterValidator(refuse)


class CompletionRequest(_Request):
    """A validated ``/v1/completions`` request: raw prompts, no chat template."""

    prompt: Annotated[list[str | list[int]], BeforeValidator(_prompts)]
    suffix: Annotated[Any, _unsupported("(insertion) is not supported")] = None
    best_of: Annotated[int | None, Field(ge=1, le=MAX_N)] = None
    logprobs: Annotated[int | None, Field(ge=0, le=5)] = None
    """The legacy form: how many alternatives per token (0: only the sampled token's logprob)."""
    echo: Flag = False
    metadata: Any = None

    @model_validator(mode="after")
    def _supported(self) -> "CompletionRequest":
        if self.best_of is not None and self.best_of != self.n:
            raise ProtocolError("'best_of' other than n is not supported", param="best_of",
                                code="unsupported_parameter")
        if self.echo and self.logprobs is not None:
            raise ProtocolError("echo with logprobs would need the prompt's logprobs, which are "
                                "not computed", param="echo", code="unsupported_parameter")
        return self

    def sampling(self) -> ChatRequest:
        """The sampling options as the ``ChatRequest`` the backend takes (no messages)."""
        shared = self.model_dump(include=set(_Request.model_fields))
        return ChatRequest.model_construct(
            **shared, messages=[], logprobs=self.logprobs is not None,
            top_logprobs=self.logprobs or 0)


# ---------------------------------------------------------------- responses
STATEFUL = ("needs server-side state, which this server does not keep: send the whole history "
            "in 'input'")


class ResponsesRequest(BaseModel):
    """A ``/v1/responses`` request's top level; ``input`` items and the sampling fields are
    checked when it is translated onto chat (``responses.to_chat_body``), under chat's names."""

    model_config = ConfigDict(extra="allow")

    input: Any
    instructions: Any = None
    model: Any = ""
    tools: Any = None
    tool_choice: Any = None
    text: Any = None
    previous_response_id: Annotated[Any, _unsupported(STATEFUL)] = None
    conversation: Annotated[Any, _unsupported(STATEFUL)] = None
    prompt: Annotated[Any, _unsupported(STATEFUL)] = None
    temperature: Any = None
    top_p: Any = None
    max_output_tokens: Any = None
    user: Any = None
    metadata: Any = None
    parallel_tool_calls: Any = None
    seed: Any = None
    """An extension, as in vLLM (``stop`` too)."""
    stop: Any = None
    stream: Any = None
    # accepted, no effect here (not warned: the Agents SDK sends them on every call)
    store: Any = None
    include: Any = None
    truncation: Any = None
    reasoning: Any = None
    service_tier: Any = None
    prompt_cache_key: Any = None
    safety_identifier: Any = None
    top_logprobs: Any = None
    background: Any = None
    max_tool_calls: Any = None
    prompt_cache_retention: Any = None
    stream_options: Any = None

    @property
    def ignored(self) -> list[str]:
        return sorted(self.model_extra or {})


# ---------------------------------------------------------------- errors
Model = TypeVar("Model", bound=BaseModel)


def validate(model: type[Model], body: Any) -> Model:
    """``body`` (decoded JSON) as ``model``; else a ``ProtocolError`` for the first bad field."""
    if not isinstance(body, dict):
        raise ProtocolError("request body must be a JSON object", code="invalid_type")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise _protocol_error(exc.errors()[0]) from None


def parse_chat_request(body: Any) -> ChatRequest:
    """Validate a decoded JSON body; raises ``ProtocolError`` naming the offending parameter."""
    return validate(ChatRequest, body)


EXPECTED = {"float_type": "a number", "finite_number": "a number", "int_type": "an integer",
            "bool_type": "a boolean", "string_type": "a string", "list_type": "a list",
            "tuple_type": "a list", "dict_type": "an object", "model_type": "an object"}
"""What pydantic's type errors expected, in the words of OpenAI's error messages."""


def _param(loc: tuple[Any, ...]) -> str:
    """``("messages", 0, "content")`` -> ``"messages[0].content"``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


def _protocol_error(error: dict[str, Any]) -> ProtocolError:
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, ProtocolError):  # a check that names its own field
        return cause
    param, kind, value = _param(error["loc"]), error["type"], error.get("input")
    if isinstance(cause, FieldError):
        return ProtocolError(f"'{param}' {cause.what}", param=param, code=cause.code)
    if kind == "missing":
        return ProtocolError(f"missing required parameter: '{param}'", param=param,
                             code="missing_required_parameter")
    if kind in EXPECTED:
        return ProtocolError(f"'{param}' must be {EXPECTED[kind]}, got {_short(value)}",
                             param=param, code="invalid_type")
    ctx = error.get("ctx") or {}
    rule = {"greater_than_equal": f"at least {ctx.get('ge')}",
            "less_than_equal": f"at most {ctx.get('le')}", "too_short": "non-empty",
            "literal_error": f"one of {ctx.get('expected')}"}.get(kind, error["msg"])
    return ProtocolError(f"'{param}' must be {rule}, got {_short(value)}", param=param,
                         code="invalid_value")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}

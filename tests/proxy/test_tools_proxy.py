"""OpenAI tools through the proxy with the official ``openai`` client: round trips, streaming,
recording, and 400s in OpenAI's error shape naming the field."""

from __future__ import annotations

import json

from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel

import lightning_lab as ll

WEATHER = {"type": "function", "function": {
    "name": "weather", "description": "Current weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}},
                   "required": ["city"]}}}
CLOCK = {"type": "function", "function": {
    "name": "clock", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}}
ADD = {"type": "function", "function": {  # open sizes: no maxLength, no range
    "name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "note": {"type": "string"}},
        "required": ["a", "note"]}}}
USER = [{"role": "user", "content": "Weather in Oslo?"}]


class Verdict(BaseModel):
    answer: Literal["yes", "no"]


class Person(BaseModel):
    name: str
    age: int


@pytest.fixture(scope="module")
def server(policy):
    with ll.serve(policy, default_max_tokens=40) as s:
        yield s


def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)


def test_required_named_and_auto_round_trip_and_are_recorded(server):
    with server.rollout(task_id="tools") as r:
        c = client(r.base_url)
        forced = c.chat.completions.create(model="tiny", messages=USER, tools=[WEATHER, CLOCK],
                                           tool_choice="required", temperature=1.0, seed=1, max_tokens=80)
        choice = forced.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        calls = choice.message.tool_calls
        assert calls and all(call.type == "function" and call.id.startswith("call_") for call in calls)
        for call in calls:
            assert call.function.name in ("weather", "clock")
            json.loads(call.function.arguments)
        named = c.chat.completions.create(
            model="tiny", messages=USER, tools=[WEATHER, CLOCK], temperature=1.0,
            tool_choice={"type": "function", "function": {"name": "weather"}})
        (call,) = named.choices[0].message.tool_calls
        assert call.function.name == "weather"
        assert json.loads(call.function.arguments)["city"] in ("Paris", "Oslo")
        history = USER + [named.choices[0].message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "content": "-3 C, snow"}]
        auto = c.chat.completions.create(model="tiny", messages=history, tools=[WEATHER],
                                         max_tokens=6, extra_body={"return_token_ids": True})
        assert auto.choices[0].finish_reason in ("stop", "length")
        assert isinstance(auto.choices[0].message.content, str)
    first, second, third = r.trajectory.transitions
    assert first.meta["constrained"] and first.meta["tool_calls"] == [x.function.name for x in calls]
    assert second.meta["tool_calls"] == ["weather"]
    assert "constrained" not in third.meta
    assert "<tool_response>\n-3 C, snow\n</tool_response>" in third.prompt
    assert third.prompt_ids == auto.model_extra["prompt_token_ids"]  # exactly what the model saw
    assert all(tr.role == "main" for tr in (first, second, third))  # default role, never ""


def test_parallel_tool_calls_false_gives_one_call(server):
    r = client(server.base_url).chat.completions.create(
        model="tiny", messages=USER, tools=[WEATHER, CLOCK], tool_choice="required",
        parallel_tool_calls=False, temperature=1.0, n=4, max_tokens=80)
    assert all(len(c.message.tool_calls or []) == 1 for c in r.choices), r.choices


def test_response_format_json_schema_and_json_object(server):
    c = client(server.base_url)
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}},
              "required": ["answer"], "additionalProperties": False}
    r = c.chat.completions.create(model="tiny", messages=USER, temperature=1.0, response_format={
        "type": "json_schema", "json_schema": {"name": "verdict", "schema": schema, "strict": True}})
    assert json.loads(r.choices[0].message.content)["answer"] in ("yes", "no")
    parsed = c.chat.completions.parse(model="tiny", messages=USER, temperature=1.0,
                                      response_format=Verdict)  # the SDK's pydantic path
    assert parsed.choices[0].message.parsed.answer in ("yes", "no")
    # json_object: any object; the random model's keys are free strings, so only the start is
    # checked here (an unbounded key can run to max_tokens)
    r = c.chat.completions.create(model="tiny", messages=USER, temperature=1.0, max_tokens=8,
                                  response_format={"type": "json_object"})
    assert r.choices[0].message.content.lstrip().startswith("{")


def test_guided_grammar_as_vllm_clients_send_it(server):
    """`extra_body={"guided_grammar": ...}` (vLLM's name) constrains the reply, streamed too,
    and the recorded transition says so."""
    grammar = 'start: " " ("yes" | "no") "."\n'
    with server.rollout(task_id="g", temperature=1.0) as rollout:
        c = client(rollout.base_url)
        r = c.chat.completions.create(model="tiny", messages=USER, max_tokens=8,
                                      extra_body={"guided_grammar": grammar})
        assert r.choices[0].message.content in (" yes.", " no.")
        chunks = c.chat.completions.create(model="tiny", messages=USER, max_tokens=8,
                                           stream=True, extra_body={"guided_grammar": grammar})
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) in (
            " yes.", " no.")
    first, second = rollout.trajectory.transitions
    assert first.meta["constrained"] and second.meta["constrained"]


def test_streaming_tool_calls_accumulate_in_the_sdk(server):
    c = client(server.base_url)
    with c.chat.completions.stream(model="tiny", messages=USER, tools=[WEATHER],
                                   tool_choice="required", temperature=1.0,
                                   parallel_tool_calls=False) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls
    assert final.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "weather" and json.loads(call.function.arguments)["city"]
    raw = c.chat.completions.create(model="tiny", messages=USER, tools=[WEATHER], stream=True,
                                    tool_choice="required", parallel_tool_calls=False)
    deltas = [ch.choices[0].delta for ch in raw if ch.choices]
    first, *rest = [d.tool_calls[0] for d in deltas if d.tool_calls]
    # vLLM's / OpenAI's shape: index, id, type and name first, then argument fragments
    assert first.index == 0 and first.id.startswith("call_") and first.type == "function"
    assert first.function.name == "weather" and rest and all(
        r.index == 0 and r.id is None and r.function.name is None for r in rest)
    arguments = (first.function.arguments or "") + "".join(r.function.arguments for r in rest)
    assert json.loads(arguments)["city"] in ("Paris", "Oslo")


def _streamed(c: openai.OpenAI, **kw) -> tuple[list[str], str | None]:
    """(content deltas, finish_reason) of a streamed chat completion."""
    chunks = [ch.choices[0] for ch in c.chat.completions.create(stream=True, **kw) if ch.choices]
    return [ch.delta.content for ch in chunks if ch.delta.content], chunks[-1].finish_reason


@pytest.mark.parametrize("extra", [
    {"tools": [WEATHER], "tool_choice": "none"},
    {"tools": [WEATHER], "tool_choice": "auto"},
    {"response_format": {"type": "json_object"}},
])
def test_streams_token_by_token_with_tools_or_response_format(server, extra):
    """Issue 23 item 5: one content delta for the whole reply whenever tools/response_format."""
    c = client(server.base_url)
    kw = dict(model="tiny", messages=USER, max_tokens=24, seed=5, temperature=1.0, **extra)
    reply = c.chat.completions.create(**kw)
    whole = reply.choices[0]
    parts, finish = _streamed(c, **kw)
    assert finish == whole.finish_reason
    if whole.message.tool_calls:  # auto may call: the content before the call streamed alone
        assert "".join(parts) == (whole.message.content or "")
        return
    assert "".join(parts) == whole.message.content
    # token by token, not one blob (the last token is the end of turn, which has no text)
    assert len(parts) >= min(3, reply.usage.completion_tokens - 1)


def test_streamed_content_holds_back_a_call_marker():
    from lightning_lab.proxy.streaming import ContentBeforeCalls

    split = ContentBeforeCalls("<tool_call>")
    out = [split.add(t) for t in ["Let me ", "check.", "\n<tool", "_call>", '\n{"name"']]
    assert out == ["Let me", " check.", "", "", ""] and split.calling
    assert split.finish("Let me check.") == ""
    plain = ContentBeforeCalls("<tool_call>")
    assert [plain.add(t) for t in ["a <", "b"]] == ["a", " <b"]
    assert plain.finish("a <b c") == " c"


@pytest.mark.parametrize("extra, param", [
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "search"}}},
     "tool_choice.function.name"),
    ({"messages": USER + [{"role": "tool", "tool_call_id": "call_x", "content": "1"}]},
     "messages[1].tool_call_id"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"functions": [{"name": "bad name"}]}, "functions[0].name"),
    ({"guided_grammar": "start: undefined_rule"}, "guided_grammar"),
    ({"guided_grammar": 3}, "guided_grammar"),
    ({"guided_grammar": "start: /a{1000000}/"}, "guided_grammar"),  # llguidance gives up on it
    ({"guided_grammar": 'start: "a"', "response_format": {"type": "json_object"}}, "guided_grammar"),
])
def test_bad_tool_input_is_a_400_naming_the_field(server, extra, param):
    body = {"messages": USER, "max_tokens": 2, **extra}
    r = httpx.post(server.base_url + "/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
    with pytest.raises(openai.BadRequestError) as info:  # the SDK surfaces it as such
        extra = {k: body.pop(k) for k in ("guided_grammar",) if k in body}  # not an SDK kwarg
        client(server.base_url).chat.completions.create(model="tiny", **body, extra_body=extra)
    assert info.value.body["param"] == param


def test_legacy_functions_are_tools(server):
    r = httpx.post(server.base_url + "/chat/completions", timeout=60, json={
        "messages": USER, "functions": [WEATHER["function"]], "function_call": {"name": "weather"},
        "temperature": 1.0})
    assert r.status_code == 200 and "x-ll-warning" not in r.headers
    assert r.json()["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "weather"


def test_langchain_structured_output_via_function_calling(server):
    """``with_structured_output(method="function_calling")`` used to return None (tools ignored)."""
    from langchain_openai import ChatOpenAI

    schema = {"title": "Verdict", "description": "A yes/no verdict.", "type": "object",
              "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
              "additionalProperties": False}  # open objects let the random model add keys
    llm = ChatOpenAI(model="tiny", base_url=server.base_url, api_key="unused", max_retries=0,
                     temperature=1.0, max_tokens=60)
    for method in ("function_calling", "json_schema"):
        result = llm.with_structured_output(schema, method=method).invoke("Is 2 > 1?")
        assert result is not None and result["answer"] in ("yes", "no"), method


def test_forced_call_and_json_schema_with_open_sizes_close_via_the_sdk(server):
    """Integer and free-string arguments used to run to max_tokens (1 of 36 forced calls
    parsed); every seed now gives a call / JSON that validates."""
    c = client(server.base_url)
    person = Person.model_json_schema()
    for seed in range(12):
        r = c.chat.completions.create(model="tiny", messages=USER, tools=[ADD], temperature=1.0,
                                      tool_choice={"type": "function", "function": {"name": "add"}},
                                      seed=seed, max_tokens=64)
        (call,) = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "add"
        jsonschema.validate(json.loads(call.function.arguments), ADD["function"]["parameters"])
        r = c.chat.completions.create(model="tiny", messages=USER, temperature=1.0, seed=seed,
                                      max_tokens=64, response_format={"type": "json_schema",
                                      "json_schema": {"name": "person", "schema": person}})
        jsonschema.validate(json.loads(r.choices[0].message.content), person)


def test_langchain_structured_output_with_open_sizes(server):
    """function_calling gave None, json_schema a LengthFinishReasonError, json_mode ``{}``."""
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="tiny", base_url=server.base_url, api_key="unused", max_retries=0,
                     temperature=1.0, max_tokens=96)
    for method in ("function_calling", "json_schema"):
        result = llm.with_structured_output(Person, method=method).invoke("Who is it?")
        assert isinstance(result, Person), method
    result = llm.with_structured_output(None, method="json_mode").invoke("Answer in JSON.")
    assert isinstance(result, dict) and result


def test_a_reply_cut_inside_a_call_says_length_and_drops_the_partial_call(server):
    """``required`` + ``max_tokens=40`` used to end inside a second call with ``finish_reason
    "tool_calls"`` and ``'<tool_call>\\n{"name'`` as content, which frameworks send back."""
    c = client(server.base_url)
    r = c.chat.completions.create(model="tiny", messages=USER, tools=[WEATHER, ADD], n=12,
                                  tool_choice="required", temperature=1.0, seed=0, max_tokens=40)
    finishes = [choice.finish_reason for choice in r.choices]
    assert "length" in finishes, finishes
    for choice in r.choices:
        assert "<tool_call>" not in (choice.message.content or ""), choice
        for call in choice.message.tool_calls or []:
            json.loads(call.function.arguments)
    history = USER + [r.choices[finishes.index("length")].message.model_dump(exclude_none=True)]
    assert "<tool_call>" not in json.dumps(history)  # nothing half-written goes back


def test_a_grammar_failing_mid_way_is_not_a_quiet_stop(server):
    body = {"messages": USER, "max_tokens": 8, "temperature": 1.0,
            "guided_grammar": "start: /[a-z]/ /a{1000000}/"}
    r = httpx.post(server.base_url + "/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "error"
    assert "grammar failed mid-way" in r.headers["x-ll-warning"]


def test_a_grammar_failing_mid_way_is_said_on_the_responses_endpoint_too(server, monkeypatch):
    """Non-streamed ``/v1/responses`` used to drop the warning that chat gives."""
    from lightning_lab.inference.constraints import Constraint

    advance = Constraint.advance
    seen: dict[int, int] = {}

    def give_up_on_the_second_token(self, token: int) -> bool:
        seen[id(self)] = seen.get(id(self), 0) + 1
        return advance(self, token) and seen[id(self)] < 2

    monkeypatch.setattr(Constraint, "advance", give_up_on_the_second_token)
    body = {"input": "Who is it?", "max_output_tokens": 16, "temperature": 1.0,
            "text": {"format": {"type": "json_schema", "name": "person",
                                "schema": Person.model_json_schema()}}}
    r = httpx.post(server.base_url + "/responses", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert "grammar failed mid-way" in r.headers["x-ll-warning"]

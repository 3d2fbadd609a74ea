"""Tool calling in the policy: validation, faithful rendering, parsing, constrained decoding.

Tiny model only. The constrained-decoding tests check the logprob contract: a masked choice
records the *unmasked* policy logprob, which the trainer's forward reproduces.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

import lightning_lab as ll
from lightning_lab.inference.chat import plan_chat
from lightning_lab.inference.constraints import GrammarError
from lightning_lab.inference.schema_bounds import DEFAULT_MAX_INTEGER, bound_schema
from lightning_lab.train.scoring import score
from lightning_lab.inference.tool_formats import HermesFormat, get_format
from lightning_lab.inference.tools import (ToolError, check_history, parse_response_format,
                                           parse_tool_choice, parse_tools)

CALC = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate arithmetic.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string", "maxLength": 8}},
                   "required": ["expression"]}}}
WEATHER = {"type": "function", "function": {
    "name": "weather", "parameters": {"type": "object",
                                      "properties": {"city": {"enum": ["Paris", "Oslo"]}},
                                      "required": ["city"]}}}
ADD = {"type": "function", "function": {  # open sizes: no maxLength, no range
    "name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "note": {"type": "string"}},
        "required": ["a", "note"]}}}
PERSON = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "score": {"type": "number"},
    "tags": {"type": "array", "items": {"type": "string"}}, "extra": {}},
    "required": ["name", "age", "score", "tags"]}


@pytest.fixture(scope="module")
def tiny():
    policy = ll.models.load("tiny", lora=True)
    yield policy
    policy.close()


# ---------------------------------------------------------------- validation names the field
@pytest.mark.parametrize("tools, param", [
    ([{"type": "retrieval"}], "tools[0].type"),
    ([{"type": "function", "function": {"name": "bad name!"}}], "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}],
     "tools[0].function.parameters"),
    ([CALC, CALC], "tools[1].function.name"),
    ({"calculator": CALC}, "tools"),
])
def test_bad_tools_name_the_field(tools, param):
    with pytest.raises(ToolError) as info:
        parse_tools(tools)
    assert info.value.param == param


def test_tool_choice_and_response_format_validation():
    tools = parse_tools([CALC, WEATHER])
    assert parse_tool_choice(None, tools).mode == "auto"
    assert parse_tool_choice(None, []).mode == "none"
    named = parse_tool_choice({"type": "function", "function": {"name": "weather"}}, tools)
    assert named.forced and named.name == "weather"
    with pytest.raises(ToolError, match="not in 'tools'") as info:
        parse_tool_choice({"type": "function", "function": {"name": "search"}}, tools)
    assert info.value.param == "tool_choice.function.name"
    with pytest.raises(ToolError):
        parse_tool_choice("always", tools)
    with pytest.raises(ToolError):
        parse_tool_choice("required", [])
    assert parse_response_format({"type": "text"}) is None
    assert parse_response_format({"type": "json_object"}) == {"type": "object", "minProperties": 1}
    with pytest.raises(ToolError) as info:
        parse_response_format({"type": "json_schema", "json_schema": {"schema": {"type": 3}}})
    assert info.value.param == "response_format.json_schema.schema"


def test_tool_message_must_answer_an_earlier_call():
    call = {"id": "call_1", "type": "function", "function": {"name": "calculator", "arguments": "{}"}}
    check_history([{"role": "assistant", "content": None, "tool_calls": [call]},
                   {"role": "tool", "tool_call_id": "call_1", "content": "4"}])
    with pytest.raises(ToolError) as info:
        check_history([{"role": "user", "content": "hi"},
                       {"role": "tool", "tool_call_id": "call_9", "content": "4"}])
    assert info.value.param == "messages[1].tool_call_id"


# ---------------------------------------------------------------- rendering and parsing
def test_history_is_rendered_faithfully(tiny):
    """Calls, results (with their order) and developer->system all reach the prompt text."""
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "What is 6*7 and the weather in Oslo?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"id": "a", "type": "function",
             "function": {"name": "calculator", "arguments": '{"expression": "6*7"}'}},
            {"id": "b", "type": "function",
             "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "a", "content": "42"},
        {"role": "tool", "tool_call_id": "b", "content": "snow"},
    ]
    plan = plan_chat(tiny.tokenizer, messages, tools=[CALC, WEATHER])
    text = plan.prompt_text
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools")  # developer -> system
    assert '"name": "weather"' in text.split("<tools>\n")[1].split("\n</tools>")[0]
    call = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "6*7"}}\n</tool_call>'
    assert "Let me check.\n" + call in text
    results = "<tool_response>\n42\n</tool_response>\n<tool_response>\nsnow\n</tool_response>"
    assert text.endswith(f"<|im_start|>user\n{results}<|im_end|>\n<|im_start|>assistant\n")
    # no tools and no tool history: exactly the chat template, as before tool support
    plain = [{"role": "user", "content": "hi"}]
    assert plan_chat(tiny.tokenizer, plain).prompt_text == tiny.tokenizer.apply_chat_template(
        plain, tokenize=False, add_generation_prompt=True)


def test_parse_calls_content_and_failures():
    fmt, tools = HermesFormat(), parse_tools([CALC, WEATHER])
    reply = fmt.parse('Sure.\n<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}'
                      '\n</tool_call>\n<tool_call>{"name": "calculator", "arguments": '
                      '"{\\"expression\\": \\"1+1\\"}"}</tool_call>', tools)
    assert reply.error is None and reply.content == "Sure."
    assert [(c.name, json.loads(c.arguments)) for c in reply.tool_calls] == [
        ("weather", {"city": "Paris"}), ("calculator", {"expression": "1+1"})]
    assert reply.finish_reason == "tool_calls" and reply.tool_calls[0].id.startswith("call_")
    for bad, reason in [('<tool_call>{"name": "weather", "arguments": {</tool_call>', "not JSON"),
                        ('<tool_call>{"name": "search", "arguments": {}}</tool_call>', "unknown"),
                        ('<tool_call>{"name": "weather"', "unterminated")]:
        parsed = fmt.parse(bad, tools)
        assert parsed.tool_calls == [] and parsed.content == bad and reason in parsed.error


def test_template_format_is_used_when_the_chat_template_knows_tools(tiny):
    class ToolTemplate:  # a stand-in tokenizer whose template renders tools itself
        chat_template = "{% if tools %}...{% endif %}"

        def apply_chat_template(self, messages, tools=None, **_):
            return json.dumps({"messages": messages, "tools": tools})

    assert get_format("auto", tiny.tokenizer).name == "hermes"
    fmt = get_format("auto", ToolTemplate())
    assert fmt.name == "template"
    call = {"id": "a", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
    rendered = json.loads(plan_chat(ToolTemplate(), [
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "a", "content": "snow"}], tools=[WEATHER]).prompt_text)
    assert rendered["tools"][0]["function"]["name"] == "weather"
    assert rendered["messages"][0]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    assert rendered["messages"][1] == {"role": "tool", "content": "snow", "tool_call_id": "a",
                                       "name": "weather"}


# ---------------------------------------------------------------- constrained decoding
def test_required_call_is_valid_and_logprobs_are_unmasked(tiny):
    """Even the random tiny model emits a parseable call; the trainer reproduces its logprobs."""
    with ll.rollout("t", temperature=1.0) as traj:
        for seed in range(3):
            gen = tiny.generate([[{"role": "user", "content": "weather?"}]], max_new_tokens=40,
                                seed=seed, tools=[WEATHER], tool_choice="required",
                                parallel_tool_calls=False)[0]
            (call,) = gen.message["tool_calls"]
            assert call["function"]["name"] == "weather"
            assert json.loads(call["function"]["arguments"])["city"] in ("Paris", "Oslo")
            assert gen.finish_reason == "tool_calls"
    rows = traj.transitions
    assert all(tr.meta["constrained"] and tr.meta["tool_calls"] == ["weather"] for tr in rows)
    with torch.no_grad():
        forward = score(tiny.model, rows, grad=False)  # the update's forward
    recorded = torch.tensor([x for tr in rows for x in tr.logprobs])
    assert (forward.logprobs - recorded).abs().max().item() < 1e-4 * max(1.0, recorded.abs().max())
    # the recorded logprob is the unmasked one: far below 0 for tokens the grammar forced
    assert recorded.min().item() < -5


def test_named_function_and_json_schema(tiny):
    message = tiny.chat("hi", tools=[CALC, WEATHER], max_new_tokens=40, temperature=1.0,
                        tool_choice={"type": "function", "function": {"name": "weather"}})
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["weather"]
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                               "color": {"enum": ["red", "blue"]}},
              "required": ["ok", "color"], "additionalProperties": False}
    text = tiny.chat("json please", max_new_tokens=30, temperature=1.0, response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    data = json.loads(text)
    assert isinstance(data["ok"], bool) and data["color"] in ("red", "blue")


def test_auto_garbage_is_content_with_a_recorded_reason(tiny):
    fmt = HermesFormat()
    plan = plan_chat(tiny.tokenizer, [{"role": "user", "content": "x"}], tools=[CALC], tool_format=fmt)
    parsed, finish, meta = plan.reply('<tool_call>{"name": "calculator", "arguments": 3}</tool_call>',
                                      "stop")
    assert parsed.content.startswith("<tool_call>") and finish == "stop"
    assert "not an object" in meta["tool_parse_error"] and meta["tool_calls"] == []


# ---------------------------------------------------------------- forced output closes (issue 23.3)
def test_forced_call_with_open_sizes_closes_within_64_tokens(tiny):
    """An integer and a free string used to run to max_tokens (``1111...``): 1 of 36 parsed."""
    schema = ADD["function"]["parameters"]
    for seed in range(12):
        gen = tiny.generate([[{"role": "user", "content": "add"}]], max_new_tokens=64, seed=seed,
                            temperature=1.0, tools=[ADD],
                            tool_choice={"type": "function", "function": {"name": "add"}})[0]
        assert gen.finish_reason == "tool_calls", (seed, gen.text)
        (call,) = gen.message["tool_calls"]
        jsonschema.validate(json.loads(call["function"]["arguments"]), schema)


def test_structured_output_closes_and_validates(tiny):
    prompt = [[{"role": "user", "content": "a person as JSON"}]]
    for seed in range(12):
        (gen,) = tiny.generate(prompt, max_new_tokens=128, seed=seed, temperature=1.0,
                               response_format={"type": "json_schema", "json_schema": {
                                   "name": "person", "schema": PERSON}})
        jsonschema.validate(json.loads(gen.text), PERSON)
        (gen,) = tiny.generate(prompt, max_new_tokens=128, seed=seed, temperature=1.0,
                               response_format={"type": "json_object"})
        reply = json.loads(gen.text)
        assert isinstance(reply, dict) and reply, seed  # json_object: not an empty {}


def test_default_bounds_fill_only_what_the_schema_leaves_open():
    bounded = bound_schema(PERSON)
    props = bounded["properties"]
    assert props["name"]["maxLength"] == 64 and props["tags"]["maxItems"] == 8
    assert props["age"]["maximum"] == DEFAULT_MAX_INTEGER == -props["age"]["minimum"]
    assert props["score"]["multipleOf"] == 1e-6 and bounded["additionalProperties"] is False
    assert {o["type"] for o in props["extra"]["anyOf"]} == {"string", "number", "boolean", "null"}
    # the schema's own bounds win; a default never contradicts them
    assert bound_schema({"type": "string", "maxLength": 500})["maxLength"] == 500
    assert bound_schema({"type": "string", "minLength": 100})["maxLength"] == 100
    assert bound_schema({"type": "integer", "minimum": 5}) == {
        "type": "integer", "minimum": 5, "maximum": DEFAULT_MAX_INTEGER}
    assert bound_schema({"type": "integer", "exclusiveMaximum": -2 * DEFAULT_MAX_INTEGER}) == {
        "type": "integer", "exclusiveMaximum": -2 * DEFAULT_MAX_INTEGER,
        "minimum": -2 * DEFAULT_MAX_INTEGER}
    assert bound_schema({"enum": ["x" * 100]}) == {"enum": ["x" * 100]}
    free = bound_schema({"type": "object", "additionalProperties": {"type": "integer"}})
    assert free["maxProperties"] == 8 and free["additionalProperties"] is False
    (value,) = free["patternProperties"].values()
    assert value["type"] == "integer" and "maximum" in value
    # a bound narrows, never widens: the original accepts what the bounded copy refuses
    params, long_note = ADD["function"]["parameters"], {"a": 1, "note": "x" * 65}
    jsonschema.validate(long_note, params)
    with pytest.raises(jsonschema.ValidationError, match="too long"):
        jsonschema.validate(long_note, bound_schema(params))


# ---------------------------------------------------------------- cut-off replies (issue 23.4)
def test_a_call_cut_off_by_max_tokens_is_dropped_and_the_reply_says_length(tiny):
    fmt = HermesFormat()
    plan = plan_chat(tiny.tokenizer, [{"role": "user", "content": "x"}], tools=[WEATHER],
                     tool_format=fmt, tool_choice="required")
    whole = '<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    text = whole + '\n<tool_call>\n{"name'
    parsed = fmt.parse(text, parse_tools([WEATHER]))
    assert parsed.partial == '<tool_call>\n{"name' and len(parsed.tool_calls) == 1
    reply, finish, meta = plan.reply(text, "length")
    assert finish == "length" and reply.content is None and meta["cut_tool_call"] == parsed.partial
    assert [c.name for c in reply.tool_calls] == ["weather"]
    assert reply.message()["tool_calls"][0]["function"]["arguments"] == '{"city": "Oslo"}'
    reply, finish, _ = plan.reply("Let me see. " + '<tool_call>\n{"na', "length")
    assert (reply.content, reply.tool_calls, finish) == ("Let me see.", [], "length")
    reply, finish, _ = plan.reply(whole, "stop")  # a finished reply is unchanged
    assert finish == "tool_calls" and len(reply.tool_calls) == 1


def test_cut_off_parallel_calls_on_the_tiny_model(tiny):
    """``required`` + a small budget used to end inside a second call: ``finish_reason
    "tool_calls"`` with ``'<tool_call>\\n{"name'`` as content (6 of 12 seeds)."""
    cut = 0
    for seed in range(12):
        gen = tiny.generate([[{"role": "user", "content": "weather?"}]], max_new_tokens=40,
                            seed=seed, temperature=1.0, tools=[WEATHER, ADD],
                            tool_choice="required")[0]
        content = gen.message["content"] or ""
        assert "<tool_call>" not in content and "</tool_call>" not in content, (seed, gen.text)
        assert gen.finish_reason == ("length" if len(gen.response_ids) == 40 else "tool_calls")
        cut += "cut_tool_call" in gen.meta
        for call in gen.message.get("tool_calls", []):
            json.loads(call["function"]["arguments"])
    assert cut >= 3  # the case is exercised, not skipped


# ---------------------------------------------------------------- grammar failures (issue 23.12)
def test_a_grammar_llguidance_gives_up_on_is_reported(tiny, caplog):
    with pytest.raises(GrammarError, match="too many expressions"):  # before any sampling
        tiny.generate(["hi"], max_new_tokens=8, grammar="start: /a{1000000}/\n")
    with pytest.raises(ToolError, match="gave up on the grammar") as info:
        tiny.chat("hi", max_new_tokens=8, grammar="start: /a{1000000}/\n")
    assert info.value.param == "grammar"
    # a grammar whose first step works fails mid-way: marked, never a quiet "stop"
    gens = tiny.generate(["hi"], n=3, max_new_tokens=8, seed=0, temperature=1.0,
                         grammar="start: /[a-z]/ /a{1000000}/\n")
    for gen in gens:
        assert gen.finish_reason == "error"
        assert "too many expressions" in gen.meta["constraint_error"]
    assert "grammar failed mid-way" in caplog.text

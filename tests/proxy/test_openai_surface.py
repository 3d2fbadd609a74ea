"""The rest of the OpenAI surface: token streaming, /v1/completions, /v1/responses (and the Agents
SDK on it), model names, usage, max_tokens cap and per-rollout default, Agent Lightning's URL.

Real ``openai`` / ``openai-agents`` clients against a uvicorn server on loopback, tiny model.
"""

from __future__ import annotations

import json
import math
from typing import Any

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lightning_lab as ll
import lightning_lab.proxy as proxy
from lightning_lab.proxy.app import create_app
from lightning_lab.proxy.config import ServeConfig
from lightning_lab.proxy.registry import RolloutRegistry

USER = [{"role": "user", "content": "Say something."}]
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city.",
           "parameters": {"type": "object",
                          "properties": {"city": {"type": "string", "maxLength": 8}},
                          "required": ["city"], "additionalProperties": False}}
"""``maxLength`` keeps the constrained call short, so the random tiny model always finishes it."""


@pytest.fixture(scope="module")
def server(policy):
    with ll.serve(policy, default_max_tokens=16, served_model_names=("my-agent-model",)) as s:
        yield s


def client(base_url: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60, **kw)


# ---------------------------------------------------------------- token streaming
def test_chat_streams_token_by_token_and_matches_the_whole_reply(server):
    c = client(server.base_url)
    kw = dict(model="tiny", messages=USER, max_tokens=16, seed=11, temperature=1.0, logprobs=True)
    whole = c.chat.completions.create(**kw)
    chunks = list(c.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                            **kw))
    deltas = [ch.choices[0] for ch in chunks if ch.choices and ch.choices[0].delta.content]
    n_tokens = whole.usage.completion_tokens
    assert len(deltas) >= max(3, n_tokens // 2)  # token by token, not one blob
    assert "".join(d.delta.content for d in deltas) == whole.choices[0].message.content
    streamed_lp = [e.logprob for ch in chunks if ch.choices and ch.choices[0].logprobs
                   for e in ch.choices[0].logprobs.content]
    assert streamed_lp == pytest.approx([e.logprob for e in whole.choices[0].logprobs.content],
                                        rel=1e-4, abs=1e-4)
    assert chunks[-1].usage.completion_tokens == n_tokens


def test_streaming_never_leaks_a_stop_string(server):
    c = client(server.base_url)
    full = c.chat.completions.create(model="tiny", messages=USER, max_tokens=16, temperature=0)
    text = full.choices[0].message.content
    stop = text[4:7]
    kw = dict(model="tiny", messages=USER, max_tokens=16, temperature=0, stop=[stop])
    streamed = "".join(ch.choices[0].delta.content or "" for ch in
                       c.chat.completions.create(stream=True, **kw) if ch.choices)
    assert streamed == text[:text.index(stop)]


def _check_top(sampled: float, top: list, k: int, greedy_token: str | None = None) -> None:
    """k alternatives, best first, a distribution's (mass <= 1), the sampled one not above."""
    values = [t.logprob for t in top]
    assert len(top) == k and values == sorted(values, reverse=True)
    assert sum(math.exp(v) for v in values) <= 1 + 1e-5 and sampled <= values[0] + 1e-5
    if greedy_token is not None:
        assert top[0].token == greedy_token and abs(top[0].logprob - sampled) <= 1e-5


def test_chat_top_logprobs_streamed_and_not(server):
    """Issue 23 item 5: ``top_logprobs`` was ignored (``[]``)."""
    c = client(server.base_url)
    kw = dict(model="tiny", messages=USER, max_tokens=6, temperature=0, logprobs=True,
              top_logprobs=3)
    content = c.chat.completions.create(**kw).choices[0].logprobs.content
    assert len(content) >= 2
    for entry in content:
        _check_top(entry.logprob, entry.top_logprobs, 3, entry.token)
        assert all(t.bytes == list(t.token.encode()) for t in entry.top_logprobs)
    streamed = [e for ch in c.chat.completions.create(stream=True, **kw) if ch.choices
                and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [(e.token, [t.token for t in e.top_logprobs]) for e in streamed] == \
        [(e.token, [t.token for t in e.top_logprobs]) for e in content]
    sampled = c.chat.completions.create(**{**kw, "temperature": 1.0, "top_logprobs": 20})
    for entry in sampled.choices[0].logprobs.content:
        _check_top(entry.logprob, entry.top_logprobs, 20)
    none = c.chat.completions.create(**{**kw, "top_logprobs": 0})
    assert all(e.top_logprobs == [] for e in none.choices[0].logprobs.content)
    r = httpx.post(server.base_url + "/chat/completions",
                   json={"messages": USER, "top_logprobs": 2})  # OpenAI: needs logprobs=true
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"


def test_completions_top_logprobs(server):
    c = client(server.base_url)
    kw = dict(model="tiny", prompt="Once upon a time", max_tokens=5, temperature=0, logprobs=3)
    whole = c.completions.create(**kw).choices[0].logprobs
    streamed = [ch.choices[0].logprobs for ch in c.completions.create(stream=True, **kw)
                if ch.choices and ch.choices[0].logprobs]
    assert [t for lp in streamed for t in lp.top_logprobs] == whole.top_logprobs
    for token, lp, top in zip(whole.tokens, whole.token_logprobs, whole.top_logprobs):
        best = max(top, key=top.get)
        assert len(top) == 3 and best == token and abs(top[best] - lp) <= 1e-5


# ---------------------------------------------------------------- /v1/completions
def test_completions_text_logprobs_and_tracing(server):
    with server.rollout(task_id="c") as r:
        c = client(r.base_url)
        out = c.completions.create(model="tiny", prompt=["Once upon a time", "The answer is"],
                                   n=2, max_tokens=5, logprobs=1, temperature=1.0)
        ids = c.completions.create(model="tiny", prompt=[504, 3324, 253], max_tokens=3)
        echo = c.completions.create(model="tiny", prompt="Echo me", max_tokens=2, echo=True)
    assert out.object == "text_completion" and [ch.index for ch in out.choices] == [0, 1, 2, 3]
    for ch in out.choices:
        lp = ch.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) <= 5
        assert all(v <= 0 for v in lp.token_logprobs)
        assert "".join(lp.tokens).startswith(ch.text)
    assert out.usage.completion_tokens == sum(len(ch.logprobs.tokens) for ch in out.choices)
    assert echo.choices[0].text.startswith("Echo me")
    transitions = r.trajectory.transitions
    assert sorted(t.prompt for t in transitions[:4]) == ["Once upon a time"] * 2 + ["The answer is"] * 2
    assert [t.prompt for t in transitions[4:]] == [
        server.policy.tokenizer.decode([504, 3324, 253]), "Echo me"]
    assert transitions[4].prompt_ids == [504, 3324, 253] and ids.usage.prompt_tokens == 3
    (first,) = [t for t in transitions if t.prompt == "Once upon a time" and t.meta["choice"] == 0]
    assert first.logprobs == pytest.approx(out.choices[0].logprobs.token_logprobs, rel=1e-5)
    assert "<|im_start|>" not in first.prompt  # a raw prompt: no chat template


def test_completions_stream(server):
    c = client(server.base_url)
    kw = dict(model="tiny", prompt="Count: one two", max_tokens=12, seed=3)
    whole = c.completions.create(**kw).choices[0].text
    parts = [ch.choices[0].text for ch in c.completions.create(stream=True, **kw) if ch.choices]
    assert "".join(parts) == whole and sum(bool(p) for p in parts) >= 3


# ---------------------------------------------------------------- /v1/responses
def test_responses_text_usage_and_trace(server):
    with server.rollout(task_id="r") as r:
        resp = client(r.base_url).responses.create(model="tiny", input="Hello there",
                                                   instructions="Be brief.", max_output_tokens=6)
    assert resp.object == "response" and resp.status in ("completed", "incomplete")
    assert isinstance(resp.output_text, str)
    assert resp.usage.total_tokens == resp.usage.input_tokens + resp.usage.output_tokens
    (tr,) = r.trajectory.transitions
    assert tr.meta["api"] == "responses" and tr.response == resp.output_text
    assert "Be brief." in tr.prompt and "Hello there" in tr.prompt
    assert len(tr.response_ids) == resp.usage.output_tokens


def test_responses_function_tool_round_trip_is_traced(server):
    with server.rollout(task_id="tools") as r:
        c = client(r.base_url)
        history = [{"role": "user", "content": "Weather in Paris?"}]
        first = c.responses.create(model="tiny", input=history, tools=[WEATHER],
                                   tool_choice="required", parallel_tool_calls=False,
                                   max_output_tokens=48)
        (call,) = [item for item in first.output if item.type == "function_call"]
        assert call.name == "get_weather" and isinstance(json.loads(call.arguments), dict)
        history += [{"type": "function_call", "call_id": call.call_id, "name": call.name,
                     "arguments": call.arguments},
                    {"type": "function_call_output", "call_id": call.call_id,
                     "output": "sunny, 21 C"}]
        second = c.responses.create(model="tiny", input=history, tools=[WEATHER],
                                    max_output_tokens=4)
    assert second.usage.input_tokens > first.usage.input_tokens
    calling, answering = r.trajectory.transitions
    assert calling.meta["tool_calls"] == ["get_weather"] and calling.finish_reason == "tool_calls"
    assert answering.prompt.startswith(calling.prompt)  # the same conversation, continued
    after = answering.prompt[len(calling.prompt):]  # by the call and the tool's output
    assert "<tool_call>" in after and "get_weather" in after and "sunny, 21 C" in after
    assert after.index("get_weather") < after.index("sunny, 21 C")


RESPONSE_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
                   "response.content_part.added", "response.output_text.delta",
                   "response.output_text.done", "response.content_part.done",
                   "response.output_item.done", "response.completed"]


def test_responses_stream_text_events(server):
    """Issue 23 item 5: ``stream=true`` on /v1/responses was a 400."""
    c = client(server.base_url)
    kw = dict(model="tiny", input="Hello there", max_output_tokens=16, temperature=1.0)
    free = c.responses.create(**kw, extra_body={"seed": 4}).output_text
    kw["extra_body"] = {"seed": 4, "stop": [free[-6:-3]]}  # stops: status "completed"
    whole = c.responses.create(**kw)
    assert whole.status == "completed"
    events = list(c.responses.create(stream=True, **kw))
    kinds = [e.type for e in events]
    assert [k for i, k in enumerate(kinds) if k not in kinds[:i]] == RESPONSE_EVENTS
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) >= 3 and "".join(deltas) == whole.output_text
    done = events[-1].response
    assert done.output_text == whole.output_text and done.status == whole.status
    assert done.usage.output_tokens == whole.usage.output_tokens
    with c.responses.stream(**kw) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        assert stream.get_final_response().output_text == text == whole.output_text


def test_responses_stream_function_call_events(server):
    c = client(server.base_url)
    events = list(c.responses.create(
        model="tiny", input="Weather in Paris?", tools=[WEATHER], tool_choice="required",
        parallel_tool_calls=False, max_output_tokens=48, stream=True))
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds
    (added,) = [e.item for e in events if e.type == "response.output_item.added"]
    assert added.type == "function_call" and added.name == "get_weather" and added.arguments == ""
    arguments = "".join(e.delta for e in events
                        if e.type == "response.function_call_arguments.delta")
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert done.arguments == arguments and isinstance(json.loads(arguments), dict)
    (call,) = events[-1].response.output
    assert call.type == "function_call" and call.arguments == arguments
    assert call.call_id == added.call_id


def test_agents_sdk_run_streamed_with_the_default_model(server):
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)
    import asyncio

    async def weather(ctx, arguments: str) -> str:
        return f"sunny in {json.loads(arguments)['city']}"

    tool = agents.FunctionTool(name="get_weather", description="The weather in a city.",
                               params_json_schema=WEATHER["parameters"], on_invoke_tool=weather)

    async def run() -> tuple[list[str], Any]:
        model = agents.OpenAIResponsesModel(model="tiny", openai_client=openai.AsyncOpenAI(
            base_url=server.base_url, api_key="-", max_retries=0))
        agent = agents.Agent(name="weather", instructions="Use the tool.", tools=[tool],
                             model=model, tool_use_behavior="stop_on_first_tool",
                             model_settings=agents.ModelSettings(
                                 tool_choice="required", parallel_tool_calls=False,
                                 max_tokens=128))  # one forced call closes well within 128
        result = agents.Runner.run_streamed(agent, "Weather in Paris?")
        kinds = [e.type async for e in result.stream_events()]
        return kinds, result

    kinds, result = asyncio.run(run())
    assert "raw_response_event" in kinds and "run_item_stream_event" in kinds
    assert result.final_output.startswith("sunny in ")


def test_agents_sdk_agent_trains_for_a_step(policy, server):
    agents = pytest.importorskip("agents")  # the OpenAI Agents SDK
    agents.set_tracing_disabled(True)
    calls = []

    async def weather(ctx, arguments: str) -> str:
        city = json.loads(arguments)["city"]
        calls.append(city)
        return f"sunny in {city}"

    get_weather = agents.FunctionTool(name="get_weather", description="The weather in a city.",
                                      params_json_schema=WEATHER["parameters"],
                                      on_invoke_tool=weather)

    async def sdk_agent(task, base_url):
        model = agents.OpenAIResponsesModel(
            model="tiny", openai_client=openai.AsyncOpenAI(base_url=base_url, api_key="-",
                                                           max_retries=0))
        agent = agents.Agent(name="weather", instructions="Use the tool.", tools=[get_weather],
                             model=model, tool_use_behavior="stop_on_first_tool",
                             model_settings=agents.ModelSettings(
                                 tool_choice="required", max_tokens=48,
                                 # one call fits 48 tokens; a second would be cut off, and a
                                 # cut-off reply is status "incomplete", which the SDK raises on
                                 parallel_tool_calls=False))
        result = await agents.Runner.run(agent, task["q"])
        ll.reward(float(len(result.final_output)), final=True)

    agent = proxy.http_agent(server, sdk_agent)
    tasks = [{"task_id": "paris", "q": "Weather in Paris?"}, {"task_id": "oslo", "q": "Oslo?"}]
    trainer = ll.PPOTrainer(policy, agent, tasks, config=ll.PPOConfig(
        tasks_per_step=2, group_size=2, minibatch_size=4, kl_coef=0.0))
    state = trainer.step()
    assert state.batch.n_failed == 0, [t.error for t in state.batch]
    assert len(calls) == 4
    for traj in state.batch:
        (tr,) = traj.transitions
        assert tr.meta["api"] == "responses" and tr.meta["tool_calls"] == ["get_weather"]
    assert sorted(t.total_reward for t in state.batch) == sorted(len(f"sunny in {c}") for c in calls)
    assert state.metrics["n_transitions"] == 4


# ---------------------------------------------------------------- model, usage, budgets, aliases
def test_model_names_are_checked(server):
    c = client(server.base_url)
    with pytest.raises(openai.NotFoundError) as err:
        c.chat.completions.create(model="gpt-4o", messages=USER, max_tokens=2)
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        c.responses.create(model="gpt-4o", input="x")
    assert c.chat.completions.create(model="my-agent-model", messages=USER, max_tokens=2).model == "tiny"
    assert {m.id for m in c.models.list().data} == {"tiny", "my-agent-model"}
    r = httpx.post(server.base_url + "/chat/completions", json={"messages": USER, "max_tokens": 2})
    assert r.status_code == 200  # no model sent: the served one


def test_max_tokens_cap_and_rollout_default(policy):
    with ll.serve(policy, default_max_tokens=16, max_tokens_cap=3) as capped:
        r = httpx.post(capped.base_url + "/chat/completions",
                       json={"messages": USER, "max_tokens": 2048, "stop": ["\x00"]}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3
        assert "clamped from 2048 to the server cap 3" in r.headers["x-ll-warning"]
        with capped.rollout(task_id="d", max_tokens=2) as ro:
            c = client(ro.base_url)
            c.chat.completions.create(model="tiny", messages=USER, stop=["\x00"])
            c.completions.create(model="tiny", prompt="x", stop=["\x00"])
        assert [len(t.response_ids) for t in ro.trajectory.transitions] == [2, 2]


def test_agent_lightning_attempt_url_alias(server):
    with server.rollout(task_id="agl") as r:
        base = r.base_url.removesuffix("/v1") + "/attempt/attempt-7/v1"
        client(base).chat.completions.create(model="tiny", messages=USER, max_tokens=2)
        client(base).responses.create(model="tiny", input="hi", max_output_tokens=2)
        assert httpx.post(base.removesuffix("/v1") + "/reward", json={"reward": 2.0}).status_code == 200
    assert [t.meta["attempt_id"] for t in r.trajectory.transitions] == ["attempt-7"] * 2
    assert r.trajectory.total_reward == 2.0
    bad = httpx.post(server.url + "/rollout/nope/attempt/a/v1/chat/completions",
                     json={"messages": USER})
    assert bad.status_code == 404 and bad.json()["error"]["code"] == "rollout_not_found"


# ---------------------------------------------------------------- wrong shapes: 400, never 5xx
@pytest.mark.parametrize("path, body, param", [
    ("/completions", {"model": "tiny"}, "prompt"),
    ("/completions", {"prompt": {"a": 1}}, "prompt"),
    ("/completions", {"prompt": []}, "prompt"),
    ("/completions", {"prompt": [1, "a"]}, "prompt"),
    ("/completions", {"prompt": [10**9]}, "prompt"),
    ("/completions", {"prompt": "x", "suffix": "y"}, "suffix"),
    ("/completions", {"prompt": "x", "best_of": 3}, "best_of"),
    ("/completions", {"prompt": "x", "logprobs": 9}, "logprobs"),
    ("/completions", {"prompt": "x", "echo": True, "logprobs": 1}, "echo"),
    ("/responses", {"model": "tiny"}, "input"),
    ("/responses", {"input": 5}, "input"),
    ("/responses", {"input": [{"type": "computer_call"}]}, "input[0].type"),
    ("/responses", {"input": [{"role": "wizard", "content": "x"}]}, "input[0].role"),
    ("/responses", {"input": [{"role": "user", "content": [{"type": "input_image"}]}]},
     "input[0].content[0]"),
    ("/responses", {"input": [{"type": "function_call", "name": "f"}]}, "input[0].call_id"),
    ("/responses", {"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ("/responses", {"input": "x", "stream": "yes"}, "stream"),
    ("/responses", {"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
    ("/responses", {"input": "x", "instructions": 3}, "instructions"),
])
def test_bad_shapes_are_openai_400s(server, path, body, param):
    r = httpx.post(server.base_url + path, json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param


JUNK = st.one_of(st.none(), st.booleans(), st.integers(-3, 60000), st.floats(allow_nan=True),
                 st.text(max_size=6), st.lists(st.integers(-2, 60000), max_size=3),
                 st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
ITEM = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "tool", "x"])},
                          optional={"content": st.one_of(st.text(max_size=20), JUNK)}),
    st.fixed_dictionaries({"type": st.sampled_from(["function_call", "function_call_output",
                                                    "reasoning", "message", "other"])},
                          optional={"call_id": JUNK, "name": JUNK, "arguments": JUNK,
                                    "output": JUNK}),
    JUNK)
COMPLETIONS = st.fixed_dictionaries({}, optional={
    "prompt": st.one_of(st.text(max_size=20), st.lists(st.text(max_size=5), max_size=3), JUNK),
    "max_tokens": st.one_of(st.integers(1, 3), JUNK), "n": st.one_of(st.integers(1, 2), JUNK),
    "logprobs": st.one_of(st.integers(0, 6), JUNK), "echo": JUNK, "stream": st.booleans(),
    "stop": JUNK, "model": st.one_of(st.just("tiny"), JUNK)})
VALID_COMPLETIONS = st.fixed_dictionaries(
    {"prompt": st.one_of(st.text(min_size=1, max_size=20),
                         st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=2))},
    optional={"max_tokens": st.integers(1, 3), "n": st.integers(1, 2),
              "logprobs": st.integers(0, 5), "stream": st.booleans(), "seed": st.integers()})
VALID_RESPONSES = st.fixed_dictionaries(
    {"input": st.one_of(st.text(min_size=1, max_size=20), st.lists(
        st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                               "content": st.text(max_size=20)}), min_size=1, max_size=2))},
    optional={"max_output_tokens": st.integers(1, 3), "instructions": st.text(max_size=10),
              "temperature": st.floats(0, 2)})
RESPONSES = st.fixed_dictionaries({}, optional={
    "input": st.one_of(st.text(max_size=20), st.lists(ITEM, max_size=3), JUNK),
    "instructions": JUNK, "tools": st.one_of(st.just([WEATHER]), JUNK), "tool_choice": JUNK,
    "max_output_tokens": st.one_of(st.integers(1, 3), JUNK), "text": JUNK,
    "model": st.one_of(st.just("tiny"), JUNK), "temperature": JUNK})


def test_fuzz_new_endpoints_never_5xx(policy):
    from fastapi.testclient import TestClient

    registry = RolloutRegistry()
    app = create_app(proxy.LocalBackend(policy), registry, ServeConfig(default_max_tokens=3))
    rid = registry.open(ll.Trajectory(task_id="fuzz")).rollout_id
    seen = {"n": 0, "ok": 0}

    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as tc:
        @settings(max_examples=150, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(body=st.one_of(st.one_of(VALID_COMPLETIONS, COMPLETIONS).map(
                                  lambda b: ("completions", b)),
                              st.one_of(VALID_RESPONSES, RESPONSES).map(
                                  lambda b: ("responses", b))),
               traced=st.booleans())
        def check(body, traced):
            endpoint, payload = body
            path = (f"/rollout/{rid}" if traced else "") + f"/v1/{endpoint}"
            r = tc.post(path, content=json.dumps(payload).encode(),
                        headers={"content-type": "application/json"})
            seen["n"] += 1
            assert r.status_code < 500, (payload, r.text)
            if r.status_code >= 400:
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}
            else:
                seen["ok"] += 1

        check()
    assert seen["ok"] > 30, seen

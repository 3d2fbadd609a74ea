"""Framework agents, unchanged, trained through the proxy: a real PPO step on the tiny model each.

(a) a plain OpenAI-SDK tool loop, (b) LangGraph's ``create_react_agent`` with langchain-openai's
``ChatOpenAI`` and two Python tools (plus the one-line ``ll.LangGraphRoles()`` callback), (c) an
OpenAI Agents SDK ``Agent`` with a ``@function_tool`` on its chat-completions model class. The
random tiny model only calls tools when forced, so the first call of each rollout uses
``tool_choice="required"`` (constrained decoding makes it a valid call) and the next call is free.
Argument schemas are bounded (``maximum``): unbounded integers let the random model repeat a
digit until max_tokens, which is a truncated call, not a grammar failure.
Each rollout must record >= 2 transitions with the tool result in the second prompt.
"""

from __future__ import annotations

import json
from typing import Annotated

import pytest
from pydantic import Field
import torch

import lightning_lab as ll

TASKS = [{"task_id": "t0", "a": 3, "b": 4}, {"task_id": "t1", "a": 5, "b": 6}]
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers.",
    "parameters": {"type": "object", "required": ["a", "b"],
                   "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999},
                                  "b": {"type": "integer", "minimum": 0, "maximum": 999}}}}}
Small = Annotated[int, Field(ge=0, le=999)]


@pytest.fixture(scope="module")
def server(policy):
    with ll.serve(policy, default_max_tokens=64) as s:
        yield s


def lora_weights(policy) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for n, p in policy.model.named_parameters()
                      if "lora_" in n])


def ppo_step(policy, server, agent_fn, **config):
    """One PPO step over TASKS x 2 samples; returns the state after checking the update ran."""
    before = lora_weights(policy)
    trainer = ll.PPOTrainer(policy, ll.proxy.http_agent(server, agent_fn), TASKS,
                            config=ll.PPOConfig(tasks_per_step=2, group_size=2, lr=1e-3, **config))
    state = trainer.step()
    assert state.metrics["n_failed"] == 0, [t.error for t in state.batch]
    assert state.metrics["behaviour_logprob_err"] < 1e-4  # constrained tokens included
    assert not torch.equal(before, lora_weights(policy))
    for traj in state.batch:
        assert len(traj.transitions) >= 2
        assert traj.transitions[0].meta["constrained"]
        assert traj.transitions[0].meta["tool_calls"]
    return state


def tool_result_in_second_prompt(traj, result: str) -> bool:
    return f"<tool_response>\n{result}\n</tool_response>" in traj.transitions[1].prompt


def length_reward(text: str | None) -> float:
    """Any reward that differs between samples exercises the update (group baseline)."""
    return (len(text or "") % 7) / 7


# ---------------------------------------------------------------- (a) plain OpenAI SDK loop
def openai_tool_loop(task, base_url):
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": f"What is {task['a']} + {task['b']}?"}]
    for turn in range(3):
        reply = client.chat.completions.create(
            model="tiny", messages=messages, tools=[ADD], max_tokens=64,
            tool_choice="required" if turn == 0 else "none", parallel_tool_calls=False)
        message = reply.choices[0].message
        messages.append(message.model_dump(exclude_none=True))
        if not message.tool_calls:
            break
        for call in message.tool_calls:
            args = json.loads(call.function.arguments)
            messages.append({"role": "tool", "tool_call_id": call.id,
                             "content": str(args["a"] + args["b"])})
    ll.current().meta["tool_result"] = messages[2]["content"]
    ll.reward(length_reward(messages[-1].get("content")), final=True)


def test_openai_sdk_tool_loop_trains(policy, server):
    state = ppo_step(policy, server, openai_tool_loop)
    for traj in state.batch:
        assert tool_result_in_second_prompt(traj, traj.meta["tool_result"])
        assert all(tr.role == ll.tracing.DEFAULT_ROLE for tr in traj.transitions)


# ---------------------------------------------------------------- (b) LangGraph react agent
def langgraph_agent(task, base_url):
    from langchain_core.messages import ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from langgraph.prebuilt import create_react_agent

    @tool
    def add(a: Small, b: Small) -> int:
        """Add two integers."""
        return a + b

    @tool
    def multiply(a: Small, b: Small) -> int:
        """Multiply two integers."""
        return a * b

    llm = ChatOpenAI(model="tiny", base_url=base_url, api_key="unused", max_tokens=64,
                     max_retries=0)

    def model(state, runtime):  # forced call until a tool answered (the random model never would)
        answered = any(isinstance(m, ToolMessage) for m in state["messages"])
        return llm.bind_tools([add, multiply], tool_choice="auto" if answered else "required",
                              parallel_tool_calls=False)

    graph = create_react_agent(model, [add, multiply])
    out = graph.invoke({"messages": [("user", f"What is {task['a']} times {task['b']}?")]},
                       config={"callbacks": [ll.LangGraphRoles()], "recursion_limit": 8})
    tool_messages = [m for m in out["messages"] if isinstance(m, ToolMessage)]
    ll.current().meta["tool_result"] = tool_messages[0].content
    ll.reward(length_reward(out["messages"][-1].content), final=True)


def test_langgraph_react_agent_trains_with_node_roles(policy, server):
    state = ppo_step(policy, server, langgraph_agent, trainable_roles=("agent",))
    for traj in state.batch:
        assert tool_result_in_second_prompt(traj, traj.meta["tool_result"])
        assert [tr.role for tr in traj.transitions] == ["agent"] * len(traj.transitions)
    assert state.metrics["n_failed"] == 0


# ---------------------------------------------------------------- (c) OpenAI Agents SDK
def agents_sdk_agent(task, base_url):
    from agents import (Agent, ModelSettings, OpenAIChatCompletionsModel, RunConfig, Runner,
                        function_tool)
    from openai import AsyncOpenAI

    results = []

    @function_tool
    def add(a: Small, b: Small) -> int:
        """Add two integers."""
        results.append(a + b)
        return a + b

    model = OpenAIChatCompletionsModel(model="tiny", openai_client=AsyncOpenAI(
        base_url=base_url, api_key="unused", max_retries=0))
    # reset_tool_choice (the SDK's default) frees the second call after the forced tool call
    agent = Agent(name="adder", instructions="Use the add tool.", tools=[add], model=model,
                  model_settings=ModelSettings(tool_choice="required", max_tokens=64))
    result = Runner.run_sync(agent, f"What is {task['a']} + {task['b']}?", max_turns=4,
                             run_config=RunConfig(tracing_disabled=True))
    ll.current().meta["tool_result"] = str(results[0])
    ll.reward(length_reward(str(result.final_output)), final=True)


def test_openai_agents_sdk_agent_trains(policy, server):
    state = ppo_step(policy, server, agents_sdk_agent)
    for traj in state.batch:
        assert tool_result_in_second_prompt(traj, traj.meta["tool_result"])

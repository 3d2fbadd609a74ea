"""The calc agent: a plain OpenAI-SDK tool loop, trained unchanged through the proxy.

Nothing in ``solve`` is lightning-lab API: it is the loop an OpenAI user writes (``tools=``, run
the calls, append ``role: "tool"`` results, ask again until the model answers in text). The
environment wraps it with ``ll.proxy.http_agent`` so each call lands in the rollout, then scores
the final answer.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from typing import Any, Callable

import lightning_lab as ll

from .calculator import TOOL, calculate
from .problems import CalcTask

SYSTEM = ("You solve arithmetic word problems. Use the calculator tool for the arithmetic, "
          "then reply with the final number only.")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
# Deliberately unlike every generated problem (no shared name or item), so it teaches the
# format, not an answer.
WORKED_EXAMPLE: list[dict[str, Any]] = [
    {"role": "user", "content": "A farm has 17 ducks and buys 25 more. How many ducks now?"},
    {"role": "assistant", "content": "", "tool_calls": [{
        "id": "call_example", "type": "function",
        "function": {"name": "calculator", "arguments": json.dumps({"expression": "17 + 25"})}}]},
    {"role": "tool", "tool_call_id": "call_example", "content": "42"},
    {"role": "assistant", "content": "42"},
]


@dataclass
class CalcAgentConfig:
    """Options of the tool loop (``--agent-option key=value``)."""

    max_turns: int = 3
    """Model calls per episode; the last one gets ``tool_choice="none"`` so it must answer."""
    first_tool_choice: str = "auto"
    """``tool_choice`` of the first call: ``auto`` (the model decides; what is learned) or
    ``required`` (constrained: always a valid call)."""
    required_fraction: float = 0.0
    """Share of *sampled* rollouts whose first call uses ``tool_choice="required"``: guided
    exploration for a model that never calls tools on its own. The forced call's tokens are
    recorded with their unmasked logprobs, so when forced rollouts earn more, PPO raises the
    model's own probability of calling. Greedy evaluation (temperature 0) never forces."""
    call_tokens: int = 48
    """max_tokens of a call that may produce a tool call."""
    answer_tokens: int = 24
    """max_tokens of the final answer call."""
    tool_credit: float = 0.0
    """Reward when a calculator result equals the exact answer but the final reply does not
    (the right computation, not yet reported); 1.0 is for the exact final answer."""
    worked_example: bool = True
    """Open the conversation with one solved problem (question, calculator call, tool result,
    answer), as OpenAI users do to show a format: the untrained 135M model then writes a
    parseable call on its own in a share of problems, which gives RL something to reinforce
    (without it, almost never)."""


def final_number(text: str | None) -> int | None:
    """The last number in the answer text, as an int when it is integral."""
    found = _NUMBER.findall(text or "")
    if not found:
        return None
    value = float(found[-1])
    return int(value) if value.is_integer() else None


def solve(question: str, base_url: str, cfg: CalcAgentConfig, model: str = "policy",
          first_tool_choice: str | None = None) -> dict[str, Any]:
    """Run the tool loop against any OpenAI-compatible server; returns what happened."""
    import openai

    first_tool_choice = first_tool_choice or cfg.first_tool_choice
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM},
                                      *(WORKED_EXAMPLE if cfg.worked_example else []),
                                      {"role": "user", "content": question}]
    calls, results, first_call_ok = 0, [], None
    answer = None
    for turn in range(cfg.max_turns):
        last = turn == cfg.max_turns - 1
        reply = client.chat.completions.create(
            model=model, messages=messages, tools=[TOOL],
            tool_choice="none" if last else (first_tool_choice if turn == 0 else "auto"),
            max_tokens=cfg.answer_tokens if last else cfg.call_tokens)
        message = reply.choices[0].message
        messages.append(message.model_dump(exclude_none=True, exclude={"refusal", "annotations"}))
        if turn == 0:
            first_call_ok = bool(message.tool_calls)
        if not message.tool_calls:
            answer = message.content
            break
        for call in message.tool_calls:
            calls += 1
            try:
                expression = json.loads(call.function.arguments).get("expression", "")
            except (ValueError, AttributeError):
                expression = ""
            result = calculate(expression)
            results.append(result)
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    return {"answer_text": answer, "tool_calls": calls, "tool_results": results,
            "first_tool_choice": first_tool_choice,
            "first_call_valid": first_call_ok, "turns": turn + 1}


def make_agent(policy: Any, server: Any = None, **options: Any) -> Callable[[CalcTask], None]:
    """``agent(task)`` for the trainer: ``solve`` through a proxy over ``policy``, then reward.

    ``server`` reuses a running ``ll.serve`` (else one is started on 127.0.0.1 and kept for the
    agent's lifetime).
    """
    cfg = CalcAgentConfig(**options)
    if cfg.max_turns < 2:
        raise ValueError("max_turns must be >= 2 (a call, then an answer)")
    server = server or ll.serve(policy)

    def run(task: CalcTask, base_url: str) -> None:
        sampling = ll.tracing.sampling_temperature(None, ll.tracing.current_temperature()) > 0
        forced = sampling and random.random() < cfg.required_fraction
        outcome = solve(task.question, base_url, cfg, model=server.backend.name,
                        first_tool_choice="required" if forced else None)
        predicted = final_number(outcome["answer_text"])
        correct = predicted == task.answer
        computed = str(task.answer) in outcome["tool_results"]
        ll.reward(1.0 if correct else cfg.tool_credit if computed else 0.0, final=True)
        ll.current().meta.update(outcome, question=task.question, answer=task.answer,
                                 predicted=predicted, correct=correct, computed=computed,
                                 level=task.level)

    agent = ll.proxy.http_agent(server, run)
    agent.config, agent.server = cfg, server  # type: ignore[attr-defined]
    return agent

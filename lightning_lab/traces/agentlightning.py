"""Agent Lightning's stored spans as a ``Batch``, so its traces can be inspected and trained on here.

Agent Lightning (microsoft/agent-lightning, v0.2-0.3 store format) stores each OpenTelemetry span
as a JSON object: ``rollout_id``, ``attempt_id``, ``sequence_id``, ``trace_id``, ``span_id``,
``parent_id``, ``name``, ``attributes`` (flat OTel keys), ``events``, ``start_time``/``end_time``
(seconds), ``status``, ``resource``. What this importer reads from them:

* **LLM calls**: spans whose name matches ``llm_call_match`` (its adapters' default,
  ``openai.chat.completion``, plus the LLM proxy's ``raw_gen_ai_request``), with token ids in
  ``prompt_token_ids`` / ``response_token_ids`` when its proxy recorded them (vLLM
  ``return_token_ids``), the chat in ``gen_ai.prompt.<i>.role/content`` and
  ``gen_ai.completion.<i>.content``, the temperature in ``gen_ai.request.temperature`` and
  logprobs, when requested, in ``logprobs.content`` (OpenAI's JSON list of ``{token, logprob}``).
* **Rewards**: ``agentlightning.annotation`` / reward spans with ``agentlightning.reward.<i>.value``
  (v0.3, the first dimension is the primary reward), a plain ``reward`` attribute (v0.2) or
  AgentOps' ``agentops.task.output`` = ``{"type": "reward", "value": x}``. Each reward goes to
  the latest LLM call that ended before the reward span started (Agent Lightning's
  "first occurrence" match seen from the reward's side).
* **Roles**: ``agent.name`` (OpenAI Agents SDK) or ``gen_ai.agent.name`` on the call or
  an ancestor span.

One ``Trajectory`` per ``(rollout_id, attempt_id)``. When token ids are missing, the prompt is
rebuilt with the policy tokenizer's chat template and re-tokenised (and the response text too);
the transition's ``meta["retokenized"]`` says so, and such transitions carry no logprobs (the
behaviour policy's tokenisation is unknown), so offline PPO refuses them and SFT takes them.
A malformed record, a rollout with contradictory parts or with rewards out of range (each and
summed, as ``records.reward_problem`` defines it) is skipped and named in ``Batch.load_errors``
(``file:record N`` or ``file: rollout R``), with one warning; the rest are kept. A file with
nothing loadable raises ``TraceFormatError`` naming it.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Iterable

from ..records import Batch, TraceFormatError, Trajectory, Transition, reward_problem
from ._checks import finish_load, rewards_problem

__all__ = ["load_agentlightning", "spans_to_batch", "LLM_CALL_MATCH"]

LLM_CALL_MATCH = r"openai\.chat\.completion|raw_gen_ai_request"
_PROMPT_IDS = ("prompt_token_ids", "agentlightning.operation.output.prompt_token_ids")
_RESPONSE_IDS = ("response_token_ids", "agentlightning.operation.output.response_token_ids.0",
                 "agentlightning.operation.output.choices.0.token_ids",
                 "agentlightning.operation.output.choices.0.provider_specific_fields.token_ids")
_INDEXED = re.compile(r"^(gen_ai\.(?:prompt|completion))\.(\d+)\.(\w+)$")
_REWARD = re.compile(r"^agentlightning\.reward\.(\d+)\.value$")


def load_agentlightning(path: str | Path, tokenizer: Any = None, *,
                        llm_call_match: str = LLM_CALL_MATCH) -> Batch:
    """Read Agent Lightning spans from a JSON list, a JSON object with a ``spans`` list, or JSONL
    (one span per line), and build the ``Batch`` (see the module docstring)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    records: list[tuple[str, Any]] = []
    try:
        doc = json.loads(text)
        items = doc.get("spans", []) if isinstance(doc, dict) else doc
        if not isinstance(items, list):
            raise TraceFormatError(f"{path}: expected a list of spans (or an object with a "
                                   f"'spans' list), got {type(items).__name__}")
        records = [(f"{path}:record {i}", item) for i, item in enumerate(items)]
    except json.JSONDecodeError:
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((f"{path}:line {lineno}", json.loads(line)))
            except json.JSONDecodeError as exc:
                records.append((f"{path}:line {lineno}", exc))
    return finish_load(spans_to_batch(records, tokenizer, llm_call_match=llm_call_match,
                                      source=str(path)), path)


def spans_to_batch(records: Iterable[tuple[str, Any]], tokenizer: Any = None, *,
                   llm_call_match: str = LLM_CALL_MATCH, source: str = "spans") -> Batch:
    """``(where, span dict)`` pairs to a ``Batch``; ``where`` names the record in errors."""
    batch = Batch()
    rollouts: dict[tuple[str, str], list[tuple[str, dict[str, Any]]]] = {}
    for where, span in records:
        problem = _record_problem(span)
        if problem:
            batch.load_errors.append(f"{where}: {problem} (span skipped)")
            continue
        key = (str(span["rollout_id"]), str(span.get("attempt_id") or ""))
        rollouts.setdefault(key, []).append((where, span))
    for (rollout_id, attempt_id), spans in rollouts.items():
        try:
            batch.trajectories.append(_trajectory(rollout_id, attempt_id, spans, tokenizer,
                                                  re.compile(llm_call_match)))
        except (AttributeError, KeyError, OverflowError, TypeError, ValueError) as exc:
            batch.load_errors.append(f"{source}: rollout {rollout_id!r} attempt {attempt_id!r} "
                                     f"(first record {spans[0][0]}): {exc} (rollout skipped)")
    return batch


def _record_problem(span: Any) -> str | None:
    if isinstance(span, Exception):
        return f"not JSON ({span})"
    if not isinstance(span, dict):
        return f"expected a span object, got {type(span).__name__}"
    for key in ("rollout_id", "span_id", "name"):
        if not isinstance(span.get(key), str) or not span[key]:
            return f"field {key!r} missing or not a non-empty string"
    if not isinstance(span.get("attributes", {}), dict):
        return "field 'attributes' is not an object"
    return None


def _trajectory(rollout_id: str, attempt_id: str, spans: list[tuple[str, dict[str, Any]]],
                tokenizer: Any, llm_call: re.Pattern) -> Trajectory:
    by_id: dict[str, dict[str, Any]] = {}
    for where, span in spans:
        previous = by_id.get(span["span_id"])
        if previous is not None and previous != span:
            raise ValueError(f"span_id {span['span_id']!r} appears twice with different content "
                             f"({where})")
        by_id[span["span_id"]] = span
    ordered = sorted(by_id.values(), key=lambda s: (_time(s, "start_time"), s.get("sequence_id", 0)))
    calls = [s for s in ordered if llm_call.search(s["name"])]
    if not calls:
        raise ValueError(f"no LLM call spans (names matching {llm_call.pattern!r})")
    transitions = [_transition(span, by_id, tokenizer) for span in calls]
    for span in ordered:
        reward = _reward(span)
        if reward is None:
            continue
        start = _time(span, "start_time")
        before = [i for i, c in enumerate(calls) if _time(c, "end_time") <= start]
        # a reward emitted before any call (unusual) belongs to the first, as ll.reward does
        transitions[before[-1] if before else 0].reward += reward
    traj = Trajectory(task_id=rollout_id, transitions=transitions,
                      traj_id=f"{rollout_id}/{attempt_id}", group_id=rollout_id,
                      meta={"source": "agentlightning", "rollout_id": rollout_id,
                            "attempt_id": attempt_id})
    problem = rewards_problem(traj)
    if problem:
        raise ValueError(problem)
    return traj


def _time(span: dict[str, Any], key: str) -> float:
    value = span.get(key)
    if value is None:
        return math.inf if key == "end_time" else 0.0
    value = float(value)
    return value / 1e9 if value > 1e12 else value  # Agent Lightning stores seconds; accept ns


def _transition(span: dict[str, Any], by_id: dict[str, dict[str, Any]], tokenizer: Any) -> Transition:
    attrs = span.get("attributes") or {}
    where = f"span {span['span_id']!r}"
    prompt_ids = _ids(attrs, _PROMPT_IDS, where)
    response_ids = _ids(attrs, _RESPONSE_IDS, where)
    messages = _indexed(attrs, "gen_ai.prompt")
    completion = _indexed(attrs, "gen_ai.completion")
    response_text = str(completion[0].get("content") or "") if completion else ""
    meta: dict[str, Any] = {"source": "agentlightning", "span_id": span["span_id"]}
    if attrs.get("gen_ai.response.id"):
        meta["response_id"] = attrs["gen_ai.response.id"]
    prompt_text = ""
    if prompt_ids is None or response_ids is None:
        if tokenizer is None:
            raise ValueError(f"{where} has no prompt_token_ids/response_token_ids and no "
                             "tokenizer was given to re-tokenise its messages")
        if not messages:
            raise ValueError(f"{where} has neither token ids nor gen_ai.prompt messages")
        from ..inference.policy import render_prompt

        prompt_text = render_prompt(tokenizer, [{"role": str(m.get("role", "user")),
                                                 "content": str(m.get("content") or "")}
                                                for m in messages])
        if prompt_ids is None:
            prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        if response_ids is None:
            response_ids = tokenizer(response_text, add_special_tokens=False)["input_ids"]
        meta["retokenized"] = ("token ids were missing; prompt and response re-tokenised with "
                               f"{type(tokenizer).__name__} ({getattr(tokenizer, 'name_or_path', '')})")
    logprobs = _logprobs(attrs, len(response_ids), where)
    if meta.get("retokenized"):
        logprobs = []  # they score the sampler's tokens, not the re-tokenised ones
    temperature = attrs.get("gen_ai.request.temperature")
    if temperature is None:  # none sent: OpenAI's default; 0 stays 0 (greedy)
        temperature = 1.0
    return Transition(prompt_ids=prompt_ids, response_ids=response_ids, logprobs=logprobs,
                      prompt=prompt_text, response=response_text, role=_role(span, by_id),
                      temperature=float(temperature),
                      finish_reason=_finish(completion), meta=meta)


def _ids(attrs: dict[str, Any], keys: tuple[str, ...], where: str) -> list[int] | None:
    for key in keys:
        if key in attrs:
            value = attrs[key]
            if not isinstance(value, (list, tuple)) or not all(
                    isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in value):
                raise ValueError(f"{where}: {key} is not a list of token ids")
            if value:
                return list(value)
    return None


def _indexed(attrs: dict[str, Any], prefix: str) -> list[dict[str, Any]]:
    """``gen_ai.prompt.0.role`` style flat keys as a list of dicts, in index order."""
    rows: dict[int, dict[str, Any]] = {}
    for key, value in attrs.items():
        m = _INDEXED.match(key)
        if m and m.group(1) == prefix:
            rows.setdefault(int(m.group(2)), {})[m.group(3)] = value
    return [rows[i] for i in sorted(rows)]


def _logprobs(attrs: dict[str, Any], n: int, where: str) -> list[float]:
    raw = attrs.get("logprobs.content")
    if raw is None:
        return []
    content = json.loads(raw) if isinstance(raw, str) else raw
    values = [float(item["logprob"]) for item in content]
    if len(values) != n:
        raise ValueError(f"{where}: logprobs.content has {len(values)} entries for {n} response "
                         "tokens (contradictory)")
    if not all(math.isfinite(v) and v <= 0 for v in values):
        raise ValueError(f"{where}: logprobs.content holds values that are not log-probabilities")
    return values


def _finish(completion: list[dict[str, Any]]) -> str:
    reason = completion[0].get("finish_reason") if completion else None
    return "length" if reason == "length" else "stop"


def _role(span: dict[str, Any], by_id: dict[str, dict[str, Any]]) -> str:
    seen = set()
    node: dict[str, Any] | None = span
    while node is not None and node["span_id"] not in seen:
        seen.add(node["span_id"])
        attrs = node.get("attributes") or {}
        for key in ("agent.name", "gen_ai.agent.name"):
            if isinstance(attrs.get(key), str) and attrs[key]:
                return attrs[key]
        node = by_id.get(node.get("parent_id") or "")
    return ""


def _reward(span: dict[str, Any]) -> float | None:
    """The primary reward a span carries, or None; one ``records.reward_problem`` refuses raises."""
    attrs = span.get("attributes") or {}
    value: Any = None
    dims = sorted((int(m.group(1)), v) for k, v in attrs.items() if (m := _REWARD.match(k)))
    if dims:
        value = dims[0][1]
    elif span["name"] in ("agentlightning.annotation", "agentlightning.reward") and "reward" in attrs:
        value = attrs["reward"]
    elif isinstance(attrs.get("agentops.task.output"), str):
        try:
            payload = json.loads(attrs["agentops.task.output"])
        except json.JSONDecodeError:
            payload = None
        if isinstance(payload, dict) and payload.get("type") == "reward":
            value = payload.get("value")
    else:
        return None
    if value is None:
        return None
    problem = reward_problem(value)
    if problem:
        raise ValueError(f"span {span['span_id']!r}: {problem}")
    return float(value)

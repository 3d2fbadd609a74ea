"""The tool-calling text-to-SQL agent: the model calls ``run_sql``, sees rows or the error, answers.

Selected with ``make_agent(policy, style="tools")`` (CLI: ``--agent-option style=tools``). One
role, ``sql_agent``, in-process through ``policy.chat(tools=...)``: each call's prompt holds the
earlier calls and their results exactly as rendered for the model. The scored query is the last
one the agent ran (its final text answer is recorded, not scored).
"""
from __future__ import annotations

import json
from typing import Any

import lightning_lab as ll

from .prompts import cell_text, clip
from .reward import score_sql
from .schema import schema_prompt
from .sql import ExecResult, run_sql
from .task import SQLTask

RUN_SQL = {"type": "function", "function": {
    "name": "run_sql",
    "description": "Run one SQLite SELECT query on the database; returns the rows or the error.",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}},
                   "required": ["query"]}}}
SYSTEM = ("You answer questions about a SQLite database. Call run_sql with a SELECT query, read "
          "the rows, fix the query if it fails, then answer briefly.\n\n")
MAX_RESULT_ROWS = 10
"""Rows shown to the model per query (the rest are counted)."""
MAX_RESULT_CHARS = 2000
"""Most characters of one tool result, marker included; each value is also cut to
``prompts.MAX_CELL_CHARS``. Without caps one 8 MB row became a 32 M-character prompt."""


def result_text(result: ExecResult) -> str:
    """What the model sees: an error, or columns plus the first rows, every value and the
    whole text cut to their caps with a visible ``…[truncated ...]`` marker."""
    if not result.ok:
        return clip(f"error: {result.error}", MAX_RESULT_CHARS)
    if not result.rows:
        return "(no rows)"
    lines = [" | ".join(map(cell_text, result.columns))]
    lines += [" | ".join(map(cell_text, row)) for row in result.rows[:MAX_RESULT_ROWS]]
    more = len(result.rows) - MAX_RESULT_ROWS
    tail = f"\n... ({max(more, 0)} more rows)" if more > 0 or result.truncated else ""
    return clip("\n".join(lines), MAX_RESULT_CHARS - len(tail)) + tail


def run_tool_agent(policy: Any, task: SQLTask, cfg: Any) -> dict[str, Any]:
    """One episode inside the current ``ll.rollout``; returns the meta it recorded."""
    schema = (task.schema if cfg.schema_style == "ddl" and not cfg.sample_rows
              else schema_prompt(task.db_path, cfg.schema_style, cfg.sample_rows))
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM + schema},
                                      {"role": "user", "content": task.question}]
    sql, calls, answer = None, 0, None
    for turn in range(cfg.max_turns + 1):  # max_turns queries, then the answer
        last = turn == cfg.max_turns
        with ll.role("sql_agent"):
            message = policy.chat(messages, tools=[RUN_SQL], tool_choice="none" if last else "auto",
                                  max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
        messages.append(message)
        if not message.get("tool_calls"):
            answer = message["content"]
            break
        for call in message["tool_calls"]:
            calls += 1
            query = json.loads(call["function"]["arguments"]).get("query")
            result = run_sql(task.db_path, query) if isinstance(query, str) else ExecResult(
                error="'query' must be a string")
            if isinstance(query, str):
                sql = query
            messages.append({"role": "tool", "tool_call_id": call["id"],
                             "content": result_text(result)})
    score = score_sql(task.db_path, sql, task.gold_sql, cfg.reward)
    ll.reward(score.reward, final=True)
    meta = {"question": task.question, "pred_sql": sql, "gold_sql": task.gold_sql,
            "db_id": task.db_id, "difficulty": task.difficulty, "error": score.error,
            "exec_acc": score.exec_acc, "parsed": score.parsed, "executed": score.executed,
            "no_sql": sql is None, "gold_empty": score.gold_empty, "similarity": score.similarity,
            "tool_calls": calls, "answer": answer}
    ll.current().meta.update(meta)
    return meta

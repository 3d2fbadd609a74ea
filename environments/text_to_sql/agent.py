"""The text-to-SQL agent: writer -> execute -> checker -> rewriter, for a few rounds.

Three roles share one policy, each call under its own `ll.role(...)` so the trainer can
attribute (and optionally restrict) credit per role. The episode's reward is execution accuracy
of the final query, put on the last transition; shaping terms are added only if enabled.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import lightning_lab as ll

from .grammar import schema_grammar
from .prompts import checker_messages, parse_verdict, rewriter_messages, writer_messages
from .reward import RewardConfig, score_sql
from .schema import schema_prompt
from .sql import ExecResult, extract_sql, is_valid_sql, run_sql
from .task import SQLTask
from .tool_agent import run_tool_agent


@dataclass
class SQLAgentConfig:
    """Options of the writer/checker/rewriter agent (pass as `make_agent(policy, **options)`)."""

    max_turns: int = 2
    """Queries written at most (1 = writer only; each extra turn is check + rewrite)."""
    max_new_tokens: int = 96
    """Generation budget of the writer and rewriter."""
    checker_tokens: int = 8
    """Generation budget of the checker (a verdict needs a few tokens)."""
    schema_style: str = "ddl"
    """"ddl" (CREATE TABLE text) or "compact" (`table(col, ...)` lines + join hints)."""
    sample_rows: int = 0
    """Example rows per table appended to the schema (costs prompt tokens)."""
    use_checker: bool = True
    """Ask the checker before rewriting; without it, only failing queries are rewritten."""
    check_errors: bool = False
    """Also ask the checker about queries that failed to execute (else: rewrite directly)."""
    default_verdict: bool = True
    """Verdict when the checker's reply is neither yes nor no (True = keep the query)."""
    prefill: str = "SELECT"
    """Start of the writer/rewriter turn: a 135M model then continues a query instead of chatting
    (Spider slice ~0% -> ~5-7%, though most of those matches are empty results; see README)."""
    stop: tuple[str, ...] = (";", "\n\n", "```")
    """Stop strings for SQL generation; a query ends at ';' and small models ramble after it."""
    temperature: float | None = None
    """Sampling temperature; None = the rollout's default (0 in evaluation)."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Shaping bonuses and sandbox limits of the final score."""
    constrain: bool = False
    """Decode the writer's and rewriter's queries under the database's schema grammar
    (`grammar.schema_grammar`): only its own tables and columns, Spider's SELECT subset, one line.
    Needs `prefill` "" or "SELECT"; roles style only."""
    qualify: bool = False
    """Columns as `table.column`, no table aliases: demonstrations are the gold rewritten so
    (`qualify.qualify_sql`), and with `constrain` the grammar admits only the database's real
    `table.column` pairs (`schema_grammar(qualified=True)`), binding each column to its table."""
    style: str = "roles"
    """"roles": writer/checker/rewriter prompts; "tools": one agent calling a `run_sql` tool
    (OpenAI tools format; `max_turns` queries, then an answer; see `tool_agent`)."""


def _sql_call(policy: Any, messages: list[dict[str, str]], cfg: SQLAgentConfig,
              task: SQLTask) -> str:
    grammar = (schema_grammar(str(task.db_path), cfg.prefill, qualified=cfg.qualify)
               if cfg.constrain else None)
    return policy.chat(messages, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                       stop=list(cfg.stop), prefill=cfg.prefill, grammar=grammar)


def run_agent(policy: Any, task: SQLTask, cfg: SQLAgentConfig) -> dict[str, Any]:
    """Run one episode inside the current `ll.rollout`; returns the meta it recorded."""
    schema = (task.schema if cfg.schema_style == "ddl" and not cfg.sample_rows
              else schema_prompt(task.db_path, cfg.schema_style, cfg.sample_rows))
    with ll.role("writer"):
        raw = _sql_call(policy, writer_messages(schema, task.question), cfg, task)
    sql = extract_sql(raw)
    result = run_sql(task.db_path, sql) if sql else None
    verdicts: list[bool | None] = []
    rewrites = 0
    for _ in range(cfg.max_turns - 1):
        failed = result is None or not result.ok
        if cfg.use_checker and (not failed or cfg.check_errors):
            with ll.role("checker"):
                reply = policy.chat(checker_messages(task.question, sql or "(none)",
                                                     result or ExecResult(error="no SQL")),
                                    max_new_tokens=cfg.checker_tokens,
                                    temperature=cfg.temperature)
            verdict = parse_verdict(reply)
            verdicts.append(verdict)
            if (cfg.default_verdict if verdict is None else verdict) and not failed:
                break
        elif not failed:
            break  # no checker: a query that runs is kept
        with ll.role("rewriter"):
            raw = _sql_call(policy, rewriter_messages(schema, task.question, sql, result), cfg,
                           task)
        rewrites += 1
        new_sql = extract_sql(raw)
        if new_sql:  # a rewrite without SQL keeps the previous query
            sql, result = new_sql, run_sql(task.db_path, new_sql)

    score = score_sql(task.db_path, sql, task.gold_sql, cfg.reward)
    ll.reward(score.reward, final=True)
    meta = {
        "question": task.question, "pred_sql": sql, "gold_sql": task.gold_sql,
        "db_id": task.db_id, "difficulty": task.difficulty, "error": score.error,
        "exec_acc": score.exec_acc, "parsed": score.parsed, "executed": score.executed,
        "no_sql": sql is None, "gold_empty": score.gold_empty, "rewrites": rewrites,
        "verdicts": verdicts, "similarity": score.similarity,
    }
    if sql is None:
        meta["no_sql_reason"] = f"no SELECT/WITH query in model output: {raw[:120]!r}"
    elif not is_valid_sql(sql):
        meta["no_sql_reason"] = "model output does not parse as a SQL query"
    ll.current().meta.update(meta)
    return meta


def make_agent(policy: Any, config: SQLAgentConfig | None = None,
               **options: Any) -> Callable[[SQLTask], None]:
    """An `agent(task)` for `ll.rollout`; `options` override fields of `SQLAgentConfig`.

    `reward` may be a dict of `RewardConfig` fields (as the CLI's `--agent-option` gives it).
    """
    if isinstance(options.get("reward"), dict):
        options["reward"] = RewardConfig(**options["reward"])
    cfg = replace(config or SQLAgentConfig(), **options)
    if cfg.max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {cfg.max_turns}")
    if cfg.style not in ("roles", "tools"):
        raise ValueError(f"style must be 'roles' or 'tools', got {cfg.style!r}")
    if cfg.constrain and cfg.style == "tools":
        raise ValueError("constrain=True applies to the roles style (tool arguments are JSON)")
    if cfg.constrain and cfg.prefill.strip().upper() not in ("", "SELECT"):
        raise ValueError(f"constrain=True needs prefill '' or 'SELECT', got {cfg.prefill!r}")
    run = run_tool_agent if cfg.style == "tools" else run_agent

    def agent(task: SQLTask) -> None:
        run(policy, task, cfg)

    agent.config = cfg  # type: ignore[attr-defined]  # visible in notebooks and logs
    return agent

"""Gold SQL as demonstrations of the writer's call, for a supervised warm start.

The target is what the writer would have produced had it written the gold query: the prompt is
`writer_messages(schema, question)` with the agent's prefill ("SELECT") in the prompt, and the
target is the rest of the gold query plus the first stop string (";"), so after fine-tuning the
agent stops where it should. Gold queries that do not start with the prefill cannot be written
as that call and are left out (counted in the returned report). With the agent's `qualify`
option the gold is first rewritten with table-qualified columns (`qualify.qualify_sql`); a query
the rewrite refuses (self-joins, derived tables) is kept as written and counted.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import replace
from typing import Any, Sequence

from lightning_lab.train.sft import Demonstration

from .agent import SQLAgentConfig
from .prompts import writer_messages
from .qualify import qualify_sql
from .schema import schema_prompt
from .task import SQLTask

_SPACE = re.compile(r"\s+")


def demonstrations(tasks: Sequence[SQLTask], config: SQLAgentConfig | None = None,
                   report: Counter | None = None, **options: Any) -> list[Demonstration]:
    """One writer demonstration per task whose gold SQL fits the agent's prefill.

    `options` are the agent's options (`max_turns`, `prefill`, `schema_style`, ...), so the
    prompt is byte for byte the one `make_agent(policy, **options)` would send. Tasks left out
    are counted in `report["prefill_mismatch"]`, gold kept unqualified in `report["unqualified"]`,
    when a Counter is given.
    """
    options = {k: v for k, v in options.items() if k != "reward"}  # scoring only, not the prompt
    cfg = replace(config or SQLAgentConfig(), **options)
    stop = cfg.stop[0] if cfg.stop else ""
    out = []
    for task in tasks:
        gold = _SPACE.sub(" ", task.gold_sql).strip().rstrip(";").strip()
        if cfg.qualify:
            qualified = qualify_sql(gold, str(task.db_path))
            if qualified is None and report is not None:
                report["unqualified"] += 1
            gold = qualified or gold
        if not gold.upper().startswith(cfg.prefill.upper()):
            if report is not None:
                report["prefill_mismatch"] += 1
            continue
        schema = (task.schema if cfg.schema_style == "ddl" and not cfg.sample_rows
                  else schema_prompt(task.db_path, cfg.schema_style, cfg.sample_rows))
        out.append(Demonstration(prompt=writer_messages(schema, task.question),
                                 prefill=cfg.prefill, target=gold[len(cfg.prefill):] + stop,
                                 role="writer", task_id=task.task_id))
    return out

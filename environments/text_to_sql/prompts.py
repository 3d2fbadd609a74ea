"""Prompts for the writer, checker and rewriter roles.

Kept short and concrete on purpose: a 135M model loses the question in long instructions, and
its best format (measured) is schema + question with the assistant turn pre-filled by "SELECT",
so the model only has to continue a query rather than decide to write one.
"""
from __future__ import annotations

import re

from .sql import ExecResult

SYSTEM = "You write SQLite queries. Reply with one SQL query only."


def _messages(user: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def writer_messages(schema: str, question: str) -> list[dict[str, str]]:
    return _messages(f"{schema}\n\nQuestion: {question}\nSQL:")


def result_preview(result: ExecResult, max_rows: int = 5, max_chars: int = 300) -> str:
    """A few result rows (or the error) in a compact form the model can read."""
    if not result.ok:
        return f"Error: {result.error}"
    if not result.rows:
        return "Result: no rows"
    # Each value is cut before it is turned into text: str() of a 100 MB value (or repr of a
    # blob, ~4x its size) would cost more memory than the whole query.
    def cell(v: object) -> str:
        return str(v[:max_chars] if isinstance(v, (str, bytes)) else v)[:max_chars]

    shown = "; ".join(", ".join(cell(v) for v in row) for row in result.rows[:max_rows])
    more = len(result.rows) - max_rows
    text = f"Result ({len(result.rows)}{'+' if result.truncated else ''} rows): {shown}"
    if more > 0:
        text += f"; ... {more} more"
    return text if len(text) <= max_chars else text[: max_chars - 3] + "..."


def checker_messages(question: str, sql: str, result: ExecResult) -> list[dict[str, str]]:
    return [{"role": "user", "content":
             f"Question: {question}\nSQL: {sql}\n{result_preview(result)}\n"
             "Does this SQL answer the question correctly? Answer yes or no."}]


def rewriter_messages(schema: str, question: str, sql: str | None,
                      result: ExecResult | None) -> list[dict[str, str]]:
    feedback = result_preview(result) if result is not None else "Error: no SQL was written"
    return _messages(f"{schema}\n\nQuestion: {question}\nWrong SQL: {sql or '(none)'}\n"
                     f"{feedback}\nCorrect SQL:")


_YES = re.compile(r"\b(yes|correct|right|true|answers)\b")
_NO = re.compile(r"\b(no|not|incorrect|wrong|false|doesn't|does not|isn't|error)\b")


def parse_verdict(text: str | None) -> bool | None:
    """True for a yes-ish verdict, False for no-ish, None if neither appears.

    The earliest cue wins, so "not correct" is no and "correct, no changes" is yes.
    """
    t = (text or "").lower()
    yes, no = _YES.search(t), _NO.search(t)
    if yes and (not no or yes.start() < no.start()):
        return True
    if no:
        return False
    return None

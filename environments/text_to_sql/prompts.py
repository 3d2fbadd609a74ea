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


MAX_CELL_CHARS = 200
"""Most characters of one result value (or column name) shown to the model, marker included."""


def clip(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters in all, ending with a visible
    ``…[truncated N chars]`` marker when anything was cut, so the model knows it saw a part."""
    if len(text) <= limit:
        return text
    keep = max(limit - len(f"…[truncated {len(text)} chars]"), 0)
    return f"{text[:keep]}…[truncated {len(text) - keep} chars]"


def cell_text(value: object, limit: int = MAX_CELL_CHARS) -> str:
    """One result value as prompt text, at most ``limit`` characters.

    A value is cut before it is turned into text: the repr of a 1 MB blob is up to 4 MB, and one
    8 MB row once made a 32 M-character prompt that took 21 s to tokenize.
    """
    if not isinstance(value, bytes):
        return clip(str(value), limit)
    text = str(value[:limit])
    if len(value) <= limit and len(text) <= limit:
        return text
    marker = f"…[truncated; {len(value)} bytes]"
    return text[:max(limit - len(marker), 0)] + marker


def result_preview(result: ExecResult, max_rows: int = 5, max_chars: int = 300) -> str:
    """A few result rows (or the error) in a compact form the model can read, at most
    ``max_chars`` characters (cut values and a cut preview say so)."""
    if not result.ok:
        return clip(f"Error: {result.error}", max_chars)
    if not result.rows:
        return "Result: no rows"
    limit = min(MAX_CELL_CHARS, max_chars)
    shown = "; ".join(", ".join(cell_text(v, limit) for v in row) for row in result.rows[:max_rows])
    more = len(result.rows) - max_rows
    text = f"Result ({len(result.rows)}{'+' if result.truncated else ''} rows): {shown}"
    if more > 0:
        text += f"; ... {more} more"
    return clip(text, max_chars)


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

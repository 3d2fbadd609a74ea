"""Load HotpotQA JSON (distractor setting) into `RagTask`s.

Two layouts are accepted, because both are in circulation:
  * the official release: `context = [[title, [sentences]]]`, `supporting_facts = [[title, i]]`;
  * the Hugging Face `datasets` export (what ../shared/data/hotpotqa holds):
    `context = {"title": [...], "sentences": [[...]]}`, `supporting_facts = {"title", "sent_id"}`.
A malformed record is skipped with a warning naming the file and the record index, so one bad
line in a hand-edited slice does not throw away the rest; `strict=True` raises instead.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from .tasks import Paragraph, RagTask, attach_corpus


class HotpotQAFormatWarning(UserWarning):
    """A record in a HotpotQA file could not be read and was skipped."""


class HotpotQAFormatError(ValueError):
    """A HotpotQA file (or, with strict=True, a record) could not be read."""


def _pairs(value: Any, keys: tuple[str, str], what: str) -> list[tuple[Any, Any]]:
    """Normalise `[[a, b], ...]` or `{keys[0]: [a...], keys[1]: [b...]}` to a list of pairs."""
    if isinstance(value, dict):
        if not all(k in value for k in keys):
            raise ValueError(f"{what} must have keys {keys}, got {sorted(value)}")
        left, right = value[keys[0]], value[keys[1]]
        if not isinstance(left, list) or not isinstance(right, list) or len(left) != len(right):
            raise ValueError(f"{what}: {keys[0]!r} and {keys[1]!r} must be lists of equal length")
        return list(zip(left, right))
    if isinstance(value, list):
        out = []
        for item in value:
            if not isinstance(item, (list, tuple)) or len(item) != 2:
                raise ValueError(f"{what} entries must be [{keys[0]}, {keys[1]}] pairs, got {item!r}")
            out.append((item[0], item[1]))
        return out
    raise ValueError(f"{what} must be a list or a dict, got {type(value).__name__}")


def parse_record(record: Any, default_id: str) -> RagTask:
    """One HotpotQA record -> RagTask; raises ValueError saying what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"record must be an object, got {type(record).__name__}")
    for key in ("question", "answer", "context"):
        if key not in record:
            raise ValueError(f"missing field {key!r}")
    question, answer = record["question"], record["answer"]
    if not isinstance(question, str) or not question.strip():
        raise ValueError("'question' must be a non-empty string")
    if not isinstance(answer, str):
        raise ValueError("'answer' must be a string")

    paragraphs = []
    for title, sentences in _pairs(record["context"], ("title", "sentences"), "context"):
        if not isinstance(title, str) or not isinstance(sentences, list) or not all(
            isinstance(s, str) for s in sentences
        ):
            raise ValueError(f"context paragraph {title!r} must be (title, [sentences])")
        paragraphs.append(Paragraph(title, tuple(sentences)))
    if not paragraphs:
        raise ValueError("'context' is empty")

    facts = []
    for title, sent_id in _pairs(record.get("supporting_facts", []), ("title", "sent_id"),
                                 "supporting_facts"):
        if not isinstance(title, str) or not isinstance(sent_id, int):
            raise ValueError(f"supporting fact must be (title, int), got ({title!r}, {sent_id!r})")
        facts.append((title, sent_id))

    task_id = record.get("_id") or record.get("id") or default_id
    return RagTask(
        task_id=str(task_id), question=question.strip(), answer=answer.strip(),
        kind=str(record.get("type", "unknown")), level=str(record.get("level", "unknown")),
        paragraphs=paragraphs, supporting_facts=facts, source="hotpotqa",
    )


def load_hotpotqa(path: str | Path, *, strict: bool = False) -> list[RagTask]:
    """Read a HotpotQA JSON file (a list of records) into tasks sharing one open-setting corpus.

    Records without an `_id`/`id` get `<file stem>-<index>`. Malformed records are skipped with
    a `HotpotQAFormatWarning` (or raise `HotpotQAFormatError` when `strict`).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON or bad UTF-8
        raise HotpotQAFormatError(f"{path}: cannot read HotpotQA JSON: "
                                  f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(data, list):
        raise HotpotQAFormatError(f"{path}: expected a JSON list of records, "
                                  f"got {type(data).__name__}")
    tasks = []
    for i, record in enumerate(data):
        try:
            tasks.append(parse_record(record, default_id=f"{path.stem}-{i}"))
        except ValueError as exc:
            message = f"{path}: record {i} skipped: {exc}"
            if strict:
                raise HotpotQAFormatError(message) from exc
            warnings.warn(message, HotpotQAFormatWarning, stacklevel=2)
    attach_corpus(tasks)
    return tasks

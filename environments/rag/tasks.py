"""Task records shared by the generator, the HotpotQA loader, retrieval and the agent.

A task is one multi-hop question with its candidate paragraphs (HotpotQA's distractor setting:
the gold paragraphs plus distractors) and the supporting facts that justify the answer.
Tasks loaded together share one `Corpus` (all their paragraphs), which is what the open
setting searches; it is excluded from equality and repr so tasks stay cheap to print/compare.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Iterable, Sequence


@dataclass(frozen=True)
class Paragraph:
    """A titled, Wikipedia-like paragraph; sentences are kept apart so supporting facts
    (title, sentence index) can point into them."""

    title: str
    sentences: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(s.strip() for s in self.sentences if s.strip())


class Corpus:
    """A de-duplicated set of paragraphs, shared by every task of one load.

    Its BM25 index (``retrieval.corpus_index``) is built once, on first use, and kept here, so
    the (comparatively costly) open-setting index is computed once even when agents run in many
    threads.
    """

    def __init__(self, paragraphs: Iterable[Paragraph]):
        seen: dict[tuple[str, str], Paragraph] = {}
        for p in paragraphs:
            seen.setdefault((p.title, p.text), p)
        self.paragraphs: tuple[Paragraph, ...] = tuple(seen.values())
        self.bm25 = None
        """Its BM25 index once ``retrieval.corpus_index`` has built it."""
        self.lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.paragraphs)

    def __repr__(self) -> str:
        return f"Corpus({len(self)} paragraphs)"


@dataclass
class RagTask:
    """One multi-hop question.

    `supporting_facts` are (title, sentence index) pairs as in HotpotQA; `kind` is "bridge" or
    "comparison" (HotpotQA's `type`, renamed to avoid shadowing the builtin).
    """

    task_id: str
    question: str
    answer: str
    kind: str
    paragraphs: list[Paragraph]
    supporting_facts: list[tuple[str, int]]
    level: str = "medium"
    source: str = "generated"
    corpus: Corpus | None = field(default=None, repr=False, compare=False)

    @property
    def gold_titles(self) -> list[str]:
        """Titles of the supporting paragraphs, in first-mention order, without repeats."""
        return list(dict.fromkeys(title for title, _ in self.supporting_facts))

    def paragraph(self, title: str) -> Paragraph | None:
        for p in self.paragraphs:
            if p.title == title:
                return p
        return None


def attach_corpus(tasks: Sequence[RagTask]) -> Corpus:
    """Give every task a reference to one shared corpus of all their paragraphs (open setting)."""
    corpus = Corpus(p for t in tasks for p in t.paragraphs)
    for t in tasks:
        t.corpus = corpus
    return corpus

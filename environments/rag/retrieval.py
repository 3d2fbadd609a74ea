"""BM25 retrieval over paragraphs (bm25s), for the distractor and the open setting.

We tokenise ourselves (lowercase word tokens minus a small stopword list) and hand bm25s lists
of strings: the same function then serves documents and queries, and query words the corpus has
never seen are simply ignored instead of being mapped through a separate query vocabulary.
The title is indexed with the text because questions name entities, and titles are entities.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import bm25s

from .tasks import Corpus, Paragraph, RagTask

_TOKEN = re.compile(r"\w+", re.UNICODE)
_STOPWORDS = frozenset(
    """a an the of in on at to for by with from and or but is are was were be been being it its
    this that these those which who whom what when where why how as into than then there their
    his her he she they them do does did has have had not no yes""".split()
)


def tokenize(text: str) -> list[str]:
    """Lowercased word tokens without stopwords (used for both passages and queries)."""
    return [t for t in _TOKEN.findall(text.lower()) if t not in _STOPWORDS]


@dataclass(frozen=True)
class Hit:
    """One retrieved passage with its BM25 score (0.0 means no query word matched)."""

    paragraph: Paragraph
    score: float

    @property
    def title(self) -> str:
        return self.paragraph.title


class BM25Index:
    """A BM25 index over a fixed list of paragraphs; `search` returns the top-k as `Hit`s."""

    def __init__(self, paragraphs: Sequence[Paragraph]):
        self.paragraphs = tuple(paragraphs)
        # bm25s cannot index an empty document; a placeholder token keeps indices aligned.
        docs = [tokenize(f"{p.title} {p.text}") or ["<empty>"] for p in self.paragraphs]
        self._bm25 = bm25s.BM25()
        if docs:
            self._bm25.index(docs, show_progress=False)

    def __len__(self) -> int:
        return len(self.paragraphs)

    def search(self, query: str, k: int = 2) -> list[Hit]:
        """Up to k paragraphs for `query`, best first.

        Paragraphs sharing no word with the query (score 0) are left out: bm25s would pad the
        top-k with them in arbitrary order, handing the agent (and the shaping reward) luck.
        """
        k = min(k, len(self.paragraphs))
        tokens = tokenize(query)
        if k <= 0 or not tokens:
            return []
        docs, scores = self._bm25.retrieve([tokens], k=k, show_progress=False, n_threads=1)
        return [Hit(self.paragraphs[int(i)], float(s))
                for i, s in zip(docs[0], scores[0]) if s > 0]


_cache: OrderedDict[tuple[Paragraph, ...], BM25Index] = OrderedDict()
_cache_lock = threading.Lock()
_CACHE_SIZE = 4096


def index_for(paragraphs: Sequence[Paragraph]) -> BM25Index:
    """A cached index per distinct paragraph list, so repeated rollouts of one task (a PPO group)
    and repeated epochs reuse the same index instead of rebuilding it."""
    key = tuple(paragraphs)
    with _cache_lock:
        index = _cache.get(key)
        if index is not None:
            _cache.move_to_end(key)
            return index
    index = BM25Index(key)
    with _cache_lock:
        _cache[key] = index
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return index


def corpus_index(corpus: Corpus) -> BM25Index:
    """The corpus's BM25 index, built on first use and kept on the corpus."""
    if corpus.bm25 is None:
        with corpus.lock:
            if corpus.bm25 is None:
                corpus.bm25 = BM25Index(corpus.paragraphs)
    return corpus.bm25


def retrieve(task: RagTask, query: str, k: int = 2, setting: str = "distractor") -> list[Hit]:
    """Search the task's own paragraphs ("distractor") or the corpus of all loaded tasks ("open")."""
    if setting == "distractor":
        return index_for(task.paragraphs).search(query, k)
    if setting == "open":
        if task.corpus is None:
            raise ValueError(
                f"task {task.task_id} has no corpus for the open setting; load tasks with "
                "load_tasks/generate_tasks/load_hotpotqa, or call tasks.attach_corpus(tasks)"
            )
        return corpus_index(task.corpus).search(query, k)
    raise ValueError(f"unknown setting {setting!r}; expected 'distractor' or 'open'")

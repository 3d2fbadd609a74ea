"""The retrieval agent: query -> retrieve -> (reformulate -> retrieve)* -> answer.

Each LLM call sits in its own `ll.role(...)`, so the trainer sees three roles ("query",
"reformulate", "answer") and credit can be assigned per turn. Prompts are short and concrete
because the target model is a 135M instruct model: one instruction, the evidence, a cue for a
short output, and the answer turn prefilled with "Answer:" so it starts answering at once.
(Checked on SmolLM2-135M, greedy, generated dev: listing candidate names in the reformulate
prompt made it name the bridge entity in 5/12 cases instead of 0/12; the answer prompt avoids
listing answer kinds, since "(a name, place, year or yes/no)" made it say "Yes" or "2022".)
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Callable

import lightning_lab as ll

from .retrieval import Hit, retrieve
from .reward import answer_em, answer_f1, normalize_answer, support_recall
from .tasks import RagTask


@dataclass
class RagConfig:
    """Options of the RAG agent (`make_agent(policy, **options)` overrides any of them)."""

    max_hops: int = 2
    """searches per question: 1 = query only; each extra hop is one "reformulate" step"""
    top_k: int = 2
    """passages retrieved per search"""
    setting: str = "distractor"
    """"distractor" searches the task's own ~10 paragraphs, "open" the corpus of all tasks"""
    max_new_tokens: int = 16
    """token budget of the answer (short answers are what HotpotQA scores)"""
    query_tokens: int = 16
    """token budget of each search query"""
    max_passages: int = 4
    """passages shown to the answer step (first found first)"""
    passage_chars: int = 300
    """each passage is cut to this many characters to keep the prompt short"""
    search_with_question: bool = False
    """append the question to the first query: a safety net for weak policies, but then the
    query step barely matters, so it is off for training"""
    shaping: float = 0.0
    """weight of supporting-document recall, paid on the search steps as they find gold
    paragraphs (0 = reward is answer F1 only)"""
    answer_prefill: str = "Answer:"
    """text the answer turn starts with; stripped from the prediction"""


# ------------------------------------------------------------------------------------ prompts


def query_prompt(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content":
             "Write a short search query (a few key words) to find facts for this question.\n"
             f"Question: {question}\nReply with the query only."}]


def _passage_lines(hits: list[Hit], chars: int) -> str:
    if not hits:
        return "(no passages found)"
    lines = []
    for i, hit in enumerate(hits, 1):
        text = hit.paragraph.text
        if len(text) > chars:
            text = text[:chars].rsplit(" ", 1)[0] + " ..."
        lines.append(f"[{i}] {hit.title}: {text}")
    return "\n".join(lines)


_NAME = re.compile(r"\b[A-Z][\w'-]+(?:\s+(?:of\s+|de\s+)?[A-Z][\w'-]+)*")
_NOT_NAMES = frozenset("It The He She Its They His Her A An In On At This That".split())


def candidate_names(hits: list[Hit], question: str, limit: int = 8) -> list[str]:
    """Capitalised spans of the passages that are neither in the question nor already retrieved:
    the possible bridge entities. Listing them turns "what should we search next?" (which a
    135M model answers with filler) into "pick one of these" (which it can do)."""
    seen = {h.title for h in hits}
    names: list[str] = []
    for hit in hits:
        for name in _NAME.findall(hit.paragraph.text):
            if name in _NOT_NAMES or name in seen or name in question:
                continue
            seen.add(name)
            names.append(name)
    return names[:limit]


def reformulate_prompt(question: str, hits: list[Hit], chars: int) -> list[dict[str, str]]:
    names = candidate_names(hits, question)
    listed = f"Names in the passages: {', '.join(names)}.\n" if names else ""
    return [{"role": "user", "content":
             f"{_passage_lines(hits, chars)}\n\nQuestion: {question}\n{listed}"
             "Which name should we look up next to answer the question? Reply with one name."}]


def answer_prompt(question: str, hits: list[Hit], chars: int) -> list[dict[str, str]]:
    return [{"role": "user", "content":
             f"Passages:\n{_passage_lines(hits, chars)}\n\nQuestion: {question}\n"
             "Answer in a few words."}]


# --------------------------------------------------------------------------------- extraction

_PREFIX = re.compile(
    r"^\s*(?:final answer|answer|short answer|a|query|search query|search|name)\s*:\s*",
    re.IGNORECASE,
)
_ANSWER_IS = re.compile(r"^\s*the answer is\s*", re.IGNORECASE)
_QUOTES = "\"'`*“”‘’ \t"


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def _strip_prefixes(text: str) -> str:
    previous = None
    while previous != text:
        previous = text
        # lstrip(":"): the model often repeats the prefilled colon ("Answer:: Quendor").
        text = _ANSWER_IS.sub("", _PREFIX.sub("", text)).lstrip(": ").strip(_QUOTES)
    return text


def extract_answer(text: str) -> str:
    """A short answer out of free model text: drop "Answer:"-style prefixes (repeatedly, since
    the prefill and the model may both write one), keep the first line and first sentence,
    strip quotes/markdown and the final period. "" when nothing is left."""
    text = _strip_prefixes(text)
    text = _strip_prefixes(_first_line(text))
    # Cut at the first sentence end, but not after initials or abbreviations ("J. R.", "St. Louis").
    match = re.search(r"(?<=[a-z0-9)]{3})\.\s+(?=[A-Z])", text)
    if match:
        text = text[: match.start()]
    return text.strip(_QUOTES).rstrip(".").strip(_QUOTES)


def clean_query(text: str) -> str:
    """A search query out of model text: first line without "Query:" prefixes or quotes."""
    return _strip_prefixes(_first_line(_strip_prefixes(text)))


def _is_none(query: str) -> bool:
    return normalize_answer(query) in ("", "none", "done", "no", "nothing", "noanswer")


# -------------------------------------------------------------------------------------- agent


def make_agent(policy: Any, config: RagConfig | None = None,
               **options: Any) -> Callable[[RagTask], str]:
    """An agent for `RagTask`s. Runs inside `ll.rollout`; returns the predicted answer.

    Reward: `ll.reward(answer_f1, final=True)`, plus optional support-recall shaping on the
    search steps. Evaluation facts go to `ll.current().meta`.
    """
    cfg = dataclasses.replace(config or RagConfig(), **_checked(options))
    if cfg.setting not in ("distractor", "open"):
        raise ValueError(f"setting must be 'distractor' or 'open', got {cfg.setting!r}")
    if cfg.max_hops < 1:
        raise ValueError(f"max_hops must be >= 1, got {cfg.max_hops}")

    def agent(task: RagTask) -> str:
        found: dict[str, Hit] = {}  # title -> hit, in the order found
        queries: list[str] = []
        recall = 0.0

        def search(query: str) -> None:
            nonlocal recall
            queries.append(query)
            for hit in retrieve(task, query, cfg.top_k, cfg.setting):
                found.setdefault(hit.title, hit)
            new_recall = support_recall(found, task.gold_titles)
            if cfg.shaping:
                ll.reward(cfg.shaping * (new_recall - recall))  # on the step that found them
            recall = new_recall

        with ll.role("query"):
            raw = policy.chat(query_prompt(task.question), max_new_tokens=cfg.query_tokens,
                              stop=["\n"])
        query = clean_query(raw)
        if cfg.search_with_question or _is_none(query):
            query = f"{query} {task.question}".strip()
        search(query)

        for _ in range(cfg.max_hops - 1):
            shown = list(found.values())[: cfg.max_passages]
            with ll.role("reformulate"):
                raw = policy.chat(reformulate_prompt(task.question, shown, cfg.passage_chars),
                                  max_new_tokens=cfg.query_tokens, stop=["\n"])
            query = clean_query(raw)
            if _is_none(query):
                break
            search(query)

        shown = list(found.values())[: cfg.max_passages]
        with ll.role("answer"):
            raw = policy.chat(answer_prompt(task.question, shown, cfg.passage_chars),
                              max_new_tokens=cfg.max_new_tokens, stop=["\n"],
                              prefill=cfg.answer_prefill)
        pred = extract_answer(raw)
        f1, em = answer_f1(pred, task.answer), answer_em(pred, task.answer)
        ll.reward(f1, final=True)
        ll.current().meta.update(
            question=task.question, pred=pred, gold=task.answer, em=em, f1=f1,
            sp_recall=recall, kind=task.kind, queries=queries, retrieved=list(found),
            hops=len(queries),
        )
        return pred

    return agent


def _checked(options: dict[str, Any]) -> dict[str, Any]:
    fields = {f.name for f in dataclasses.fields(RagConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise TypeError(f"unknown rag agent option(s) {unknown}; valid: {sorted(fields)}")
    return options

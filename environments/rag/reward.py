"""HotpotQA answer metrics (EM, F1) with the official normalisation, and support recall.

Normalisation follows the official evaluation script: lowercase, drop punctuation, drop the
articles a/an/the, collapse whitespace. F1 keeps the official special case: when either side
normalises to yes/no/noanswer, only an exact match scores (a "yes" never half-matches "yes sir").
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Iterable

_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_SPECIAL = ("yes", "no", "noanswer")


def normalize_answer(text: str) -> str:
    """Official HotpotQA/SQuAD normalisation (order matters: punctuation before articles)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_em(pred: str, gold: str) -> float:
    """1.0 if the normalised strings are equal, else 0.0."""
    return float(normalize_answer(pred) == normalize_answer(gold))


def answer_f1(pred: str, gold: str) -> float:
    """Token-level F1 between normalised prediction and gold (official HotpotQA definition)."""
    p, g = normalize_answer(pred), normalize_answer(gold)
    if (p in _SPECIAL or g in _SPECIAL) and p != g:
        return 0.0
    p_tokens, g_tokens = p.split(), g.split()
    same = sum((Counter(p_tokens) & Counter(g_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p_tokens), same / len(g_tokens)
    return 2 * precision * recall / (precision + recall)


def support_recall(retrieved_titles: Iterable[str], gold_titles: Iterable[str]) -> float:
    """Fraction of gold (supporting) paragraph titles found among the retrieved ones.

    Used as an optional shaping term: it rewards finding the evidence even when the small
    model then fails to read the answer off it. 0.0 when there are no gold titles.
    """
    gold = set(gold_titles)
    if not gold:
        return 0.0
    return len(gold & set(retrieved_titles)) / len(gold)

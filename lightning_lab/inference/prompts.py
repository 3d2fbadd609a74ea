"""Prompt deduplication shared by sampling (prefill once) and the update (score once).

A GRPO group submits the same prompt ``group_size`` times; both the engine's prefill and the
trainer's forward run each distinct prompt once and index the result out to its rows.
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["dedupe_prompts"]


def dedupe_prompts(prompts: Sequence[Sequence[int]]) -> tuple[list[tuple[int, ...]], list[int]]:
    """Distinct prompts (in first-seen order) and, per input, the index of its distinct prompt."""
    index: dict[tuple[int, ...], int] = {}
    of_input = [index.setdefault(tuple(p), len(index)) for p in prompts]
    return list(index), of_input

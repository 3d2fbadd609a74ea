"""``wordplay``: a two-turn, two-role task small enough to learn on a CPU in minutes.

Turn 1, the *namer* is asked for one example of a category ("Name a fruit.") and should answer
with a single word. Turn 2, the *shouter* is asked to repeat that word in capital letters. The
namer earns 1 for a one-word answer; the shouter earns 1 for exactly the namer's word uppercased.
An instruction-tuned 135M model starts out chatty ("Sure! One fruit is the apple."), which fails
both turns, so the reward has room to rise, and the second turn's success depends on the first:
a small, honest test bed for multi-step credit assignment. Built into the repo so the training
loop can be shown with no data download.
"""

from __future__ import annotations

import random
import re
import statistics
from dataclasses import dataclass
from typing import Any, Callable

import lightning_lab as ll

CATEGORIES = ["fruit", "color", "animal", "country", "vegetable", "bird", "flower", "tree",
              "metal", "planet", "city", "sport", "musical instrument", "fish", "drink",
              "vehicle", "tool", "insect", "gemstone", "spice", "dessert", "body part",
              "piece of furniture", "kitchen utensil", "weather event", "profession", "ocean",
              "language", "dog breed", "card game"]
_WORD = re.compile(r"^[A-Za-z][A-Za-z'-]*$")


@dataclass(frozen=True)
class WordTask:
    task_id: str
    category: str


def load_tasks(split: str = "train", data: Any = None, seed: int = 0, limit: int | None = None
               ) -> list[WordTask]:
    """Categories split 2:1 into train/dev (dev categories are never trained on)."""
    if data not in (None, "generated"):
        raise ValueError("wordplay generates its own tasks; it takes no --data path")
    cats = list(CATEGORIES)
    random.Random(seed).shuffle(cats)
    cut = len(cats) * 2 // 3
    chosen = cats[:cut] if split == "train" else cats[cut:]
    tasks = [WordTask(task_id=f"{split}-{c.replace(' ', '_')}", category=c) for c in chosen]
    return tasks[:limit] if limit else tasks


def single_word(text: str) -> str | None:
    """The answer's one word (trailing period allowed), or None if it is not exactly one word."""
    cleaned = text.strip().rstrip(".!")
    return cleaned if _WORD.match(cleaned) else None


@dataclass
class WordplayConfig:
    max_new_tokens: int = 12
    """Short budgets keep rollouts cheap; a one-word answer needs ~3 tokens plus end-of-turn."""


def make_agent(policy: Any, **options: Any) -> Callable[[WordTask], None]:
    cfg = WordplayConfig(**options)

    def agent(task: WordTask) -> None:
        ask = [{"role": "user", "content": f"Name a {task.category}. Answer with one word."}]
        with ll.role("namer"):
            named = policy.chat(ask, max_new_tokens=cfg.max_new_tokens)
        word = single_word(named)
        ll.reward(1.0 if word else 0.0)
        history = ask + [{"role": "assistant", "content": named},
                         {"role": "user", "content": "Now write that word in capital letters only."}]
        with ll.role("shouter"):
            shouted = policy.chat(history, max_new_tokens=cfg.max_new_tokens)
        ok = word is not None and shouted.strip().rstrip(".!") == word.upper()
        ll.reward(1.0 if ok else 0.0)
        ll.current().meta.update(category=task.category, named=named, shouted=shouted,
                                 one_word=word is not None, shout_ok=ok)

    return agent


def summarize(batch: ll.Batch) -> dict[str, float]:
    ok = [t for t in batch if t.status == "ok"]
    if not ok:
        return {"one_word": 0.0, "shout_ok": 0.0}
    return {"one_word": statistics.fmean(bool(t.meta.get("one_word")) for t in ok),
            "shout_ok": statistics.fmean(bool(t.meta.get("shout_ok")) for t in ok)}


ll.envs.register(ll.envs.Environment(
    name="wordplay", load_tasks=load_tasks, make_agent=make_agent, summarize=summarize,
    description="two-turn namer/shouter task with programmatic rewards (built in, no data)"))

"""Generated arithmetic word problems at three levels, with exact integer answers.

Levels: ``easy`` one addition or subtraction of two-digit numbers; ``medium`` one multiplication
or exact division with a two- or three-digit number (hard to do "in the head" for a 135M model,
easy with a calculator); ``hard`` two operations. Train and dev draw from disjoint seeds and dev
questions that also occur in train are dropped, so dev problems are unseen.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from .calculator import calculate

LEVELS = ("easy", "medium", "hard")
NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jade", "Kofi",
         "Lena", "Mateo", "Nia", "Omar", "Priya"]
ITEMS = ["apples", "stamps", "marbles", "books", "coins", "stickers", "shells", "cards", "pens",
         "cookies", "bricks", "seeds"]


@dataclass(frozen=True)
class CalcTask:
    task_id: str
    question: str
    answer: int
    level: str
    expression: str
    """One expression that gives the answer (for analysis; the agent never sees it)."""


def _easy(rng: random.Random, name: str, item: str) -> tuple[str, str]:
    a, b = rng.randint(12, 99), rng.randint(11, 89)
    if rng.random() < 0.5:
        return f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", f"{a} + {b}"
    a, b = max(a, b), min(a, b)
    return f"{name} has {a} {item} and gives away {b}. How many {item} are left?", f"{a} - {b}"


def _medium(rng: random.Random, name: str, item: str) -> tuple[str, str]:
    a, b = rng.randint(12, 99), rng.randint(13, 48)
    if rng.random() < 0.5:
        return (f"{name} buys {b} boxes with {a} {item} in each box. How many {item} is that "
                "in total?", f"{b} * {a}")
    return (f"{name} shares {a * b} {item} equally among {b} friends. How many {item} does "
            "each friend get?", f"{a * b} / {b}")


def _hard(rng: random.Random, name: str, item: str) -> tuple[str, str]:
    a, b, c = rng.randint(12, 49), rng.randint(13, 39), rng.randint(11, 99)
    if rng.random() < 0.5:
        return (f"{name} packs {a} bags of {b} {item} and then finds {c} more. How many {item} "
                f"does {name} have?", f"{a} * {b} + {c}")
    return (f"{name} has {a * b + c} {item}, keeps {c} and splits the rest into {a} equal "
            "piles. How many are in each pile?", f"({a * b + c} - {c}) / {a}")


_MAKERS = {"easy": _easy, "medium": _medium, "hard": _hard}


def generate(n: int, seed: int, levels: tuple[str, ...] = LEVELS, prefix: str = "t") -> list[CalcTask]:
    """``n`` problems cycling through ``levels``; ``seed`` fixes them."""
    rng = random.Random(seed)
    tasks = []
    for i in range(n):
        level = levels[i % len(levels)]
        question, expression = _MAKERS[level](rng, rng.choice(NAMES), rng.choice(ITEMS))
        answer = int(calculate(expression))  # every generated division is exact
        tasks.append(CalcTask(f"{prefix}{i}-{level}", question, answer, level, expression))
    return tasks

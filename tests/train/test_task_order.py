"""Which tasks a step draws: shuffled passes, and with ``group_tasks_by`` one database a step."""

from __future__ import annotations

import random
from collections import Counter

import pytest

import lightning_lab as ll
from lightning_lab.train.collect import TaskOrder, task_labels

# 9 + 6 + 2 + 1 tasks: a and b fill 2 and 1 steps of 4, their 1 + 2 leftovers pool with c and d
LABELS = ["a"] * 9 + ["b"] * 6 + ["c"] * 2 + ["d"]


def test_ungrouped_order_is_the_plain_shuffled_pass():
    """No groups: the same draws as shuffling range(n) with the ``tasks/<seed>`` stream."""
    order, rng = TaskOrder(18, seed=5), random.Random("tasks/5")
    first, second = list(range(18)), list(range(18))
    rng.shuffle(first)
    rng.shuffle(second)
    expected = (first[::-1] + second[::-1])[:32]
    assert [i for _ in range(8) for i in order.next(4)] == expected


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_passes_see_every_task_once_and_steps_stay_in_one_label(seed):
    """18 tasks in steps of 4 over 9 passes (162 draws, a pass boundary inside a step 8 times).
    Per pass: 3 one-label steps (a, a, b) and the pooled rest; every step after a boundary
    stays aligned, so at least 3 of each pass's ~4.5 steps hold one label."""
    order = TaskOrder(len(LABELS), seed, LABELS, chunk=4)
    draws = [order.next(4) for _ in range(40)] + [order.next(2)]  # 162 = 9 passes
    flat = [i for step in draws for i in step]
    for p in range(9):
        assert Counter(flat[18 * p:18 * (p + 1)]) == Counter(range(18)), f"pass {p}"
    pure = [step for step in draws[:40] if len({LABELS[i] for i in step}) == 1]
    assert len(pure) >= 27, [[LABELS[i] for i in s] for s in draws]
    assert Counter(LABELS[s[0]] for s in pure) == Counter({"a": 18, "b": 9})


def test_task_labels_read_dict_keys_and_attributes_and_name_a_missing_field():
    class Task:
        def __init__(self, db_id):
            self.db_id = db_id

    assert task_labels([{"db_id": "x"}, Task("y")], "db_id") == ["x", "y"]
    with pytest.raises(ValueError, match=r"group_tasks_by='db'.*task 1 \(Task\)"):
        task_labels([{"db": "x"}, Task("y")], "db")
    with pytest.raises(ValueError, match="cannot be a group label"):
        task_labels([{"db": ["unhashable"]}], "db")


def test_a_trainer_with_group_tasks_by_draws_a_step_from_one_database(tiny):
    tasks = [{"task_id": f"{db}-{q}", "db": db, "q": f"{db} question {q}"}
             for db in ("x", "y", "z") for q in range(4)]
    config = ll.PPOConfig(tasks_per_step=4, group_size=1, group_tasks_by="db")
    trainer = ll.PPOTrainer(tiny, lambda task: ll.reward(0.0), tasks, config=config)
    steps = [{t["db"] for t in trainer._draw_tasks()} for _ in range(6)]
    assert all(len(dbs) == 1 for dbs in steps), steps
    with pytest.raises(ValueError, match="group_tasks_by='database'"):
        ll.PPOTrainer(tiny, lambda task: ll.reward(0.0), tasks,
                      config=ll.PPOConfig(tasks_per_step=4, group_tasks_by="database"))

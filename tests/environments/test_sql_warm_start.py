"""Spider split by database, and gold SQL as demonstrations of the writer's own call."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

import lightning_lab as ll
from environments.text_to_sql import demonstrations, load_tasks, make_agent, split_by_database
from lightning_lab.train.sft import demonstrations_to_batch

SPIDER = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "spider"
needs_spider = pytest.mark.skipif(not (SPIDER / "dev.json").exists(),
                                  reason=f"Spider slice not found at {SPIDER}")


@needs_spider
def test_spider_split_by_database_is_disjoint_and_documented():
    train = load_tasks("train", data=SPIDER, by_database=True)
    held = load_tasks("dev", data=SPIDER, by_database=True)
    assert not {t.db_id for t in train} & {t.db_id for t in held}
    assert len(train) + len(held) == 647
    assert sorted({t.db_id for t in held}) == ["battle_death", "course_teach", "dog_kennels",
                                                "poker_player", "student_transcripts_tracking",
                                                "world_1"]
    assert len(held) == 366 and len(train) == 281
    assert set(Counter(t.difficulty for t in held)) == {"easy", "medium", "hard", "extra"}
    # paraphrase pairs share a database, so no held-out question has its twin in training
    assert not {t.question for t in held} & {t.question for t in train}
    mixed = load_tasks("train", data=SPIDER, by_database=True, with_generated=True)
    assert mixed[:len(train)] == train and len(mixed) > len(train)
    assert all(not t.task_id.startswith("spider") for t in mixed[len(train):])
    assert load_tasks("dev", data=SPIDER, by_database=True, with_generated=True) == held


def test_split_rule_alternates_by_size():
    fake = [type("T", (), {"db_id": db})() for db, n in
            (("a", 5), ("b", 4), ("c", 3), ("d", 3), ("e", 1)) for _ in range(n)]
    train_dbs, held = split_by_database(fake)
    assert held == ["a", "c", "e"] and train_dbs == ["b", "d"]  # ties by name: c before d


def test_demonstration_prompt_is_the_agents_own_call(tiny):
    """The SFT prompt tokens are exactly those the agent's writer call conditions on."""
    tasks = load_tasks("train")[:3]
    options = {"max_turns": 1, "max_new_tokens": 4}
    agent = make_agent(tiny, **options)
    batch = ll.run_rollouts(agent, tasks, temperature=0.0)
    demos = demonstrations(tasks, **options)
    sft_batch, skipped = demonstrations_to_batch(tiny.tokenizer, demos)
    assert not skipped and len(sft_batch) == 3
    for traj, demo_traj, task in zip(batch, sft_batch, tasks):
        called, demo = traj.transitions[0], demo_traj.transitions[0]
        assert demo.prompt_ids == called.prompt_ids and demo.role == called.role == "writer"
        assert demo.prompt.endswith("SELECT")
        assert ("SELECT" + demo.response).rstrip(";") == " ".join(task.gold_sql.split())
        assert demo.response.endswith(";") and demo.logprobs == []
        assert tiny.tokenizer.decode(demo.response_ids) == demo.response


def test_demonstrations_skip_gold_that_does_not_fit_the_prefill():
    tasks = load_tasks("train")[:2]
    odd = type(tasks[0])(**{**tasks[0].__dict__, "gold_sql": "WITH x AS (SELECT 1) SELECT * FROM x"})
    report = Counter()
    demos = demonstrations([odd, tasks[1]], report=report)
    assert len(demos) == 1 and report == {"prefill_mismatch": 1}

"""Table-qualified rewriting of gold SQL (`qualify_sql`) and demonstrations written with it.

A rewrite is only useful if it means the same query: every rewritten gold query of Spider and of
the generated databases must return the same rows as the original.
"""
from __future__ import annotations

import sqlite3
from collections import Counter
from pathlib import Path

import pytest
import sqlglot
from sqlglot import exp

from environments.text_to_sql import demonstrations, generate_tasks, load_tasks
from environments.text_to_sql.qualify import qualify_sql

SPIDER = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "spider"


@pytest.fixture(scope="module")
def school(tmp_path_factory) -> str:
    db = tmp_path_factory.mktemp("q") / "school.sqlite"
    conn = sqlite3.connect(db)
    conn.executescript(
        "CREATE TABLE teacher (teacher_id INT, name TEXT, age INT);"
        "CREATE TABLE course (course_id INT, teacher_id INT, title TEXT);"
        "INSERT INTO teacher VALUES (1, 'Ada', 40), (2, 'Bo', 30);"
        "INSERT INTO course VALUES (10, 1, 'Math'), (11, 1, 'Art'), (12, 2, 'Law');")
    conn.close()
    return str(db)


@pytest.mark.parametrize("sql, want", [
    ("SELECT T1.name FROM teacher AS T1 JOIN course AS T2 ON T1.teacher_id = T2.teacher_id "
     "WHERE T2.title = 'Math'",
     "SELECT teacher.name FROM teacher JOIN course ON teacher.teacher_id = course.teacher_id "
     "WHERE course.title = 'Math'"),
    # a bare column goes to the one FROM table that has it (ORDER BY and HAVING too)
    ("SELECT name, title FROM teacher JOIN course ON teacher.teacher_id = course.teacher_id "
     "ORDER BY age",
     "SELECT teacher.name, course.title FROM teacher JOIN course ON teacher.teacher_id = "
     "course.teacher_id ORDER BY teacher.age"),
    ("SELECT teacher_id FROM course GROUP BY teacher_id HAVING count(*) > 1",
     "SELECT course.teacher_id FROM course GROUP BY course.teacher_id HAVING COUNT(*) > 1"),
    # subqueries: each scope's columns go to its own tables
    ("SELECT name FROM teacher WHERE teacher_id IN (SELECT teacher_id FROM course)",
     "SELECT teacher.name FROM teacher WHERE teacher.teacher_id IN "
     "(SELECT course.teacher_id FROM course)"),
    # a JOIN without ON is written as SQLite's comma join; a double-quoted string stays
    ("SELECT T1.name FROM teacher AS T1 JOIN course AS T2 WHERE T2.title = \"Art\"",
     "SELECT teacher.name FROM teacher, course WHERE course.title = \"Art\""),
])
def test_rewrites_aliases_and_bare_columns(school, sql, want):
    assert qualify_sql(sql, school) == want
    conn = sqlite3.connect(school)
    assert sorted(conn.execute(sql).fetchall()) == sorted(conn.execute(want).fetchall())


@pytest.mark.parametrize("sql", [
    "SELECT T1.name FROM teacher AS T1 JOIN teacher AS T2 ON T1.age < T2.age",    # self-join
    "SELECT T1.n FROM (SELECT count(*) AS n FROM course) AS T1",                 # derived table
    "SELECT name FROM teacher AS T1 WHERE age > (SELECT avg(age) FROM teacher AS T2 "
    "WHERE T2.teacher_id = T1.teacher_id)",                                      # correlated
    "SELECT FROM WHERE",                                                         # not SQL
])
def test_refuses_what_it_cannot_rewrite_without_changing_meaning(school, sql):
    assert qualify_sql(sql, school) is None


def _same_rows(db_path: str, gold: str, rewritten: str) -> bool:
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        a, b = conn.execute(gold).fetchall(), conn.execute(rewritten).fetchall()
    finally:
        conn.close()
    return Counter(map(repr, a)) == Counter(map(repr, b)) and (
        "ORDER BY" not in gold.upper() or a == b)


def _check(tasks) -> int:
    """Rewrites every task's gold; returns how many were refused. Every rewrite means the same
    and leaves no alias and no bare column a table has."""
    refused = 0
    for task in tasks:
        rewritten = qualify_sql(task.gold_sql, str(task.db_path))
        if rewritten is None:
            refused += 1
            continue
        assert _same_rows(str(task.db_path), task.gold_sql, rewritten), (task.gold_sql, rewritten)
        tree = sqlglot.parse_one(rewritten, read="sqlite")
        assert not any(t.alias for t in tree.find_all(exp.Table)), rewritten
    return refused


@pytest.mark.skipif(not (SPIDER / "dev.json").is_file(), reason=f"no Spider slice at {SPIDER}")
def test_every_spider_rewrite_returns_the_gold_rows():
    tasks = load_tasks("dev", SPIDER)
    assert len(tasks) == 647
    assert _check(tasks) <= 10  # self-joins and derived tables


def test_every_generated_rewrite_returns_the_gold_rows(tmp_path):
    tasks = generate_tasks(seed=0, split="train", cache_dir=tmp_path)
    assert _check(tasks) <= len(tasks) // 50


def test_qualified_demonstrations_target_the_rewritten_gold(school):
    tasks = load_tasks("train")[:3]
    odd = type(tasks[0])(**{**tasks[0].__dict__, "db_path": school,
                            "gold_sql": "SELECT T1.name FROM teacher AS T1 JOIN teacher AS T2 "
                                        "ON T1.age < T2.age"})
    report = Counter()
    demos = demonstrations([*tasks, odd], report=report, qualify=True)
    assert report == {"unqualified": 1}
    for demo, task in zip(demos, tasks):
        assert "SELECT" + demo.target == qualify_sql(task.gold_sql, str(task.db_path)) + ";"
    assert demos[-1].target == odd.gold_sql[len("SELECT"):] + ";"  # kept as written

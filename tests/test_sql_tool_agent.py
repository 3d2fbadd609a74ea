"""text_to_sql's tool-calling variant (``style="tools"``): run_sql results as tool messages."""

from __future__ import annotations

import sqlite3

import pytest

import lightning_lab as ll
from environments.text_to_sql import make_agent
from environments.text_to_sql.data import generate_tasks
from environments.text_to_sql.sql import run_sql
from environments.text_to_sql.tool_agent import result_text


@pytest.fixture()
def toy_db(tmp_path) -> str:
    path = tmp_path / "toy.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript("CREATE TABLE t (a INTEGER, b TEXT);" +
                       "".join(f"INSERT INTO t VALUES ({i}, 'r{i}');" for i in range(12)))
    conn.commit()
    conn.close()
    return str(path)


def test_result_text_shows_rows_or_the_error(toy_db):
    assert result_text(run_sql(toy_db, "SELECT a, b FROM t WHERE a < 2")) == "a | b\n0 | r0\n1 | r1"
    assert result_text(run_sql(toy_db, "SELECT * FROM t")).endswith("... (2 more rows)")
    assert result_text(run_sql(toy_db, "SELECT a FROM t WHERE a > 99")) == "(no rows)"
    assert result_text(run_sql(toy_db, "SELECT nope FROM t")).startswith("error: ")


def test_tool_style_is_selectable_and_records_one_role(tmp_path):
    policy = ll.models.load("tiny")
    task = generate_tasks(seed=0, split="dev", cache_dir=tmp_path)[0]
    agent = make_agent(policy, style="tools", max_turns=1, max_new_tokens=8)
    with ll.rollout(task.task_id, temperature=0) as traj:
        agent(task)
    assert traj.transitions and {tr.agent for tr in traj.transitions} == {"sql_agent"}
    assert '"name": "run_sql"' in traj.transitions[0].prompt  # the tool is rendered for the model
    assert traj.meta["no_sql"] == (traj.meta["tool_calls"] == 0)
    assert traj.total_reward == pytest.approx(0.0)
    with pytest.raises(ValueError, match="style"):
        make_agent(policy, style="graph")

"""text_to_sql's tool-calling variant (``style="tools"``): run_sql results as tool messages."""

from __future__ import annotations

import json
import sqlite3
from types import SimpleNamespace

import pytest

import lightning_lab as ll
from environments.text_to_sql import make_agent
from environments.text_to_sql.data import generate_tasks
from environments.text_to_sql.prompts import MAX_CELL_CHARS
from environments.text_to_sql.sql import run_sql
from environments.text_to_sql.task import SQLTask
from environments.text_to_sql.tool_agent import MAX_RESULT_CHARS, result_text

CELL = 1_000_000  # under the sandbox's 1 MB value limit, so the query runs and returns it


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
    assert traj.transitions and {tr.role for tr in traj.transitions} == {"sql_agent"}
    assert '"name": "run_sql"' in traj.transitions[0].prompt  # the tool is rendered for the model
    assert traj.meta["no_sql"] == (traj.meta["tool_calls"] == 0)
    assert traj.total_reward == pytest.approx(0.0)
    with pytest.raises(ValueError, match="style"):
        make_agent(policy, style="graph")


@pytest.fixture()
def huge_db(tmp_path) -> str:
    """One 8 MB row: four 1 MB texts and four 1 MB blobs (a blob's repr is up to 4x its size)."""
    path = tmp_path / "huge.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE big (id INTEGER, t1 TEXT, t2 TEXT, t3 TEXT, t4 TEXT, "
                 "b1 BLOB, b2 BLOB, b3 BLOB, b4 BLOB)")
    conn.execute("INSERT INTO big VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?)",
                 ("x" * CELL,) * 4 + (bytes(CELL),) * 4)
    conn.commit()
    conn.close()
    return str(path)


def test_a_huge_cell_is_cut_with_a_visible_marker(huge_db):
    row = result_text(run_sql(huge_db, "SELECT id, t1 FROM big")).splitlines()[1]
    number, cell = row.split(" | ")
    kept = cell.index("…")
    assert number == "1" and len(cell) <= MAX_CELL_CHARS
    assert cell == "x" * kept + f"…[truncated {CELL - kept} chars]"
    blob = result_text(run_sql(huge_db, "SELECT b1 FROM big")).splitlines()[1]
    assert len(blob) <= MAX_CELL_CHARS and blob.startswith("b'\\x00") and f"{CELL} bytes" in blob


def test_an_8_mb_row_and_a_long_error_stay_within_the_result_cap(huge_db):
    result = run_sql(huge_db, "SELECT * FROM big")
    assert result.ok and len(result.rows[0]) == 9
    text = result_text(result)
    assert len(text) <= MAX_RESULT_CHARS and text.count("…[truncated") >= 8
    assert text.startswith("id | t1 | t2 | t3 | t4 | b1 | b2 | b3 | b4\n1 | xxx")
    error = result_text(run_sql(huge_db, f"SELECT {'y' * 50_000} FROM big"))
    assert error.startswith("error: no such column: yyy") and len(error) <= MAX_RESULT_CHARS


class _OneQuery:
    """Calls ``run_sql`` once with ``query``, then answers; keeps every prompt it was sent."""

    def __init__(self, query: str) -> None:
        self.query, self.prompts = query, []

    def chat(self, messages, **kw):
        self.prompts.append(json.dumps(messages))
        ll.tracing.record_generation(SimpleNamespace(
            prompt_ids=[1], response_ids=[2], logprobs=[-0.1], prompt_text="p", text="t",
            temperature=0.0, finish_reason="stop"))
        if len(self.prompts) > 1:
            return {"role": "assistant", "content": "done"}
        call = {"id": "call_1", "type": "function",
                "function": {"name": "run_sql", "arguments": json.dumps({"query": self.query})}}
        return {"role": "assistant", "content": "", "tool_calls": [call]}


def test_the_agent_prompt_after_an_8_mb_row_stays_small(huge_db):
    task = SQLTask(task_id="big-0", question="What is in big?", gold_sql="SELECT id FROM big",
                   db_id="big", db_path=huge_db, schema="CREATE TABLE big (...)")
    policy = _OneQuery("SELECT * FROM big")
    with ll.rollout(task.task_id) as traj:
        make_agent(policy, style="tools", max_turns=1)(task)
    assert traj.meta["tool_calls"] == 1 and traj.meta["answer"] == "done"
    assert len(policy.prompts) == 2
    assert len(policy.prompts[1]) - len(policy.prompts[0]) <= MAX_RESULT_CHARS + 500

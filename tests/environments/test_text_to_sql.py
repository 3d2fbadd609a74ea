"""Tests of the text_to_sql environment: data, Spider loader, sandbox, reward, agent, training."""
from __future__ import annotations

from collections import Counter

import hashlib
import json
import random
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pytest

import lightning_lab as ll
from environments.text_to_sql import (
    SQLTask, SpiderFormatError, SpiderFormatWarning, execution_match, extract_sql,
    generate_tasks, load_spider, load_tasks, make_agent, parse_verdict, run_sql, schema_text,
    score_sql, sql_similarity, summarize,
)
from environments.text_to_sql.data import SPIDER_LAYOUT, build_databases, spider_layout
from environments.text_to_sql.domains import BUILDERS
from environments.text_to_sql.hardness import LEVELS, spider_hardness
from environments.text_to_sql.reward import RewardConfig, gold_orders_rows, results_match

SPIDER = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "spider"
needs_spider = pytest.mark.skipif(not (SPIDER / "dev.json").is_file(),
                                  reason=f"Spider slice not found at {SPIDER}")


@pytest.fixture(scope="module")
def gen_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("t2s_cache")


@pytest.fixture(scope="module")
def train(gen_dir) -> list[SQLTask]:
    return generate_tasks(seed=0, split="train", cache_dir=gen_dir)


@pytest.fixture(scope="module")
def dev(gen_dir) -> list[SQLTask]:
    return generate_tasks(seed=0, split="dev", cache_dir=gen_dir)


@pytest.fixture()
def toy_db(tmp_path) -> str:
    """t(a, b) with a duplicated row, for hand-checked reward cases."""
    path = tmp_path / "toy.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript("CREATE TABLE t (a INTEGER, b TEXT);"
                       "INSERT INTO t VALUES (3, 'x'), (1, 'y'), (2, 'z'), (1, 'y');")
    conn.commit()
    conn.close()
    return str(path)


def _sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ------------------------------------------------------------------------------ generated data
def _dump(db_path: str) -> list:
    conn = sqlite3.connect(db_path)
    names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
    out = [(n, conn.execute(f"SELECT * FROM {n}").fetchall()) for n in names]
    conn.close()
    return out


def test_generator_is_deterministic(train, tmp_path):
    again = generate_tasks(seed=0, split="train", cache_dir=tmp_path / "other")
    key = lambda ts: [(t.task_id, t.question, t.gold_sql, t.db_id, t.difficulty) for t in ts]  # noqa: E731
    assert key(again) == key(train)
    assert _dump(again[0].db_path) == _dump(train[0].db_path)
    other_seed = generate_tasks(seed=1, split="train", cache_dir=tmp_path / "seed1")
    assert _dump(other_seed[0].db_path) != _dump(train[0].db_path)


def test_split_is_by_database_and_sized(train, dev):
    train_dbs, dev_dbs = {t.db_id for t in train}, {t.db_id for t in dev}
    assert len(train_dbs | dev_dbs) >= 6
    assert not train_dbs & dev_dbs
    assert not {t.db_path for t in train} & {t.db_path for t in dev}
    assert len(train) >= 150 and len(dev) >= 50
    for tasks in (train, dev):
        assert {t.difficulty for t in tasks} == set(LEVELS)
        assert len({t.task_id for t in tasks}) == len(tasks)
    hard = [t.gold_sql.upper() for t in train if t.difficulty in ("hard", "extra")]
    assert any(" JOIN " in q for q in hard) and any("INTERSECT" in q or "EXCEPT" in q for q in hard)


def test_train_words_each_template_several_ways(train, dev):
    # Train makes several passes over the templates, so one gold query appears under more than
    # one wording; dev makes one pass, so each template appears once there.
    wordings: dict[str, set[str]] = {}
    for t in train:
        wordings.setdefault(t.gold_sql, set()).add(t.question)
    assert sum(len(w) > 1 for w in wordings.values()) >= 50
    openers = {t.question.split()[0] for t in train}
    assert {"How", "Find", "List", "What", "Which", "Count", "Return"} <= openers
    assert len({t.gold_sql for t in dev}) == len(dev)


def _table_facts(ddl: str) -> tuple:
    conn = sqlite3.connect(":memory:")
    conn.execute(ddl)
    (name,) = conn.execute("SELECT name FROM sqlite_master").fetchone()
    facts = (name, conn.execute(f'PRAGMA table_info("{name}")').fetchall(),
             conn.execute(f'PRAGMA foreign_key_list("{name}")').fetchall())
    conn.close()
    return facts


def test_spider_layout_keeps_the_schema_and_is_used_for_some_dbs(train, dev):
    ddls = [ddl for build in BUILDERS.values() for ddl in build(random.Random(0)).ddl]
    for ddl in ddls:  # same columns, types, keys and foreign keys, only laid out differently
        laid_out = spider_layout(ddl)
        assert _table_facts(laid_out) == _table_facts(ddl)
        assert laid_out.startswith('CREATE TABLE "') and "\n" in laid_out
    assert spider_layout("CREATE TABLE c (p INTEGER REFERENCES t, x TEXT)").endswith(
        'FOREIGN KEY ("p") REFERENCES "t"\n)')
    layouts = {t.db_id: t.schema.startswith('CREATE TABLE "') for t in train + dev}
    assert layouts == {db: db in SPIDER_LAYOUT for db in layouts}
    assert True in layouts.values() and False in layouts.values()


def test_every_gold_query_runs_and_returns_rows(train, dev):
    for t in train + dev:
        res = run_sql(t.db_path, t.gold_sql)
        assert res.ok, (t.task_id, t.gold_sql, res.error)
        assert res.rows and res.rows[0][0] is not None, (t.task_id, t.gold_sql)


def test_databases_have_foreign_keys_and_realistic_size(train):
    for path in {t.db_path for t in train}:
        conn = sqlite3.connect(path)
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        assert 3 <= len(tables) <= 8
        fks = sum(len(conn.execute(f"PRAGMA foreign_key_list({t})").fetchall()) for t in tables)
        rows = sum(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables)
        conn.close()
        assert fks >= 2 and 200 <= rows <= 2000, (path, fks, rows)


def test_generation_honours_cache_env_and_reuses_its_databases(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_LAB_CACHE", str(tmp_path))
    tasks = generate_tasks(seed=7, split="train") + generate_tasks(seed=7, split="dev")
    assert all(Path(t.db_path).parent == tmp_path / "text_to_sql" / "7" for t in tasks)
    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "text_to_sql" / "7").glob("*.sqlite")}
    assert len(written) == 6
    build_databases(seed=7)  # already current: nothing is rebuilt
    assert {p: p.stat().st_mtime_ns for p in written} == written


# ------------------------------------------------------------------------------ Spider
@needs_spider
def test_load_spider_dev():
    tasks = load_spider(SPIDER, split="dev")
    assert len(tasks) == 647 and len({t.db_id for t in tasks}) == 12
    t = tasks[0]
    assert t.task_id == "spider-dev-0000" and t.question and t.gold_sql.upper().startswith("SELECT")
    assert Path(t.db_path).is_file() and "CREATE TABLE" in t.schema
    assert all(run_sql(x.db_path, x.gold_sql).ok for x in tasks[:40])
    assert execution_match(t.db_path, t.gold_sql, t.gold_sql) == 1.0
    # All four of Spider's levels, graded by hardness.py (no record carries a level itself).
    levels = Counter(x.difficulty for x in tasks)
    assert levels == {"easy": 156, "medium": 274, "hard": 110, "extra": 107}
    hard_extra = load_tasks("dev", data=SPIDER, levels="extra", limit=5)
    assert len(hard_extra) == 5 and {x.difficulty for x in hard_extra} == {"extra"}


@pytest.mark.parametrize("sql, level", [
    ("SELECT count(*) FROM singer", "easy"),                              # nothing but FROM
    ("SELECT name FROM singer WHERE age > 30", "easy"),                   # one clause
    ("SELECT name, age FROM singer ORDER BY age DESC", "medium"),         # one clause, 2 columns
    ("SELECT country, count(*) FROM singer GROUP BY country", "medium"),  # one clause, 2 columns
    ("SELECT T2.name FROM a AS T1 JOIN b AS T2 ON T1.id = T2.a_id WHERE T1.x = 1", "medium"),
    ("SELECT year FROM concert GROUP BY year ORDER BY count(*) DESC LIMIT 1", "hard"),  # 3 clauses
    ("SELECT song_name FROM singer WHERE age > (SELECT avg(age) FROM singer)", "hard"),  # 1 nested
    ("SELECT c FROM t WHERE x > 4 INTERSECT SELECT c FROM t WHERE x < 3", "hard"),  # set op = nested
    ("SELECT c FROM t EXCEPT SELECT c FROM t WHERE x > 4", "hard"),
    ("SELECT T1.a FROM t AS T1 JOIN u AS T2 ON T1.id = T2.t_id WHERE T2.s = 'x' "
     "INTERSECT SELECT T1.a FROM t AS T1 JOIN u AS T2 ON T1.id = T2.t_id WHERE T2.s = 'y'", "extra"),
    ("SELECT T1.n FROM t AS T1 JOIN u AS T2 ON T1.id = T2.t_id GROUP BY T1.id "
     "ORDER BY count(*) DESC LIMIT 1", "extra"),                          # join + 3 clauses
    ("SELECT a, b, c FROM t WHERE x = 1 AND y = 2 GROUP BY a, b", "hard"),  # 2 clauses, 3 others
])
def test_spider_hardness_hand_checked(sql, level):
    assert spider_hardness(sql) == level


def test_levels_filter(train):
    hard = load_tasks("train", levels=["hard", "extra"])
    assert hard and {t.difficulty for t in hard} == {"hard", "extra"}
    assert len(load_tasks("train", levels="hard,extra", limit=3)) == 3
    with pytest.raises(ValueError, match="unknown levels"):
        load_tasks("train", levels="impossible")


def _spider_copy(tmp_path: Path, records: list) -> Path:
    (tmp_path / "database").symlink_to(SPIDER / "database")
    (tmp_path / "dev.json").write_text(json.dumps(records))
    return tmp_path


@needs_spider
def test_load_spider_malformed_record_is_named_and_skipped(tmp_path):
    good = json.loads((SPIDER / "dev.json").read_text())[:3]
    records = [good[0], {"db_id": good[1]["db_id"], "question": "no query here"}, "junk", good[2]]
    root = _spider_copy(tmp_path, records)
    with pytest.warns(SpiderFormatWarning) as caught:
        tasks = load_spider(root, split="dev")
    messages = [str(w.message) for w in caught]
    assert any("dev.json" in m and "record 1" in m and "query" in m for m in messages)
    assert any("record 2" in m for m in messages)
    assert [t.question for t in tasks] == [good[0]["question"], good[2]["question"]]
    assert tasks[1].task_id == "spider-dev-0003"  # ids keep the record index
    with pytest.raises(SpiderFormatError, match="record 1"):
        load_spider(root, split="dev", strict=True)


@needs_spider
def test_load_spider_missing_database_and_bad_json(tmp_path):
    root = _spider_copy(tmp_path, [{"db_id": "no_such_db", "question": "q?", "query": "SELECT 1"}])
    with pytest.raises(FileNotFoundError, match=r"no_such_db.*no_such_db\.sqlite"):
        load_spider(root)
    (root / "dev.json").write_text("{not json")
    with pytest.raises(SpiderFormatError, match="dev.json"):
        load_spider(root)


# ------------------------------------------------------------------------------ schema prompt
def test_schema_text_with_and_without_sample_rows(train):
    db = train[0].db_path
    plain = schema_text(db)
    assert plain.count("CREATE TABLE") == 5 and 'REFERENCES "departments"("id")' in plain
    assert "example rows" not in plain
    with_rows = schema_text(db, sample_rows=2)
    assert with_rows.count("/* 2 example rows from") == 5


def test_compact_schema_lists_columns_and_joins(dev):
    from environments.text_to_sql.schema import schema_prompt
    text = schema_prompt(dev[0].db_path, "compact")
    assert "aircraft(id, model, manufacturer, seats)" in text
    assert "flights.origin = airports.code" in text and "CREATE" not in text
    assert len(text) < len(schema_prompt(dev[0].db_path, "ddl"))
    with pytest.raises(ValueError):
        schema_prompt(dev[0].db_path, "yaml")


# ------------------------------------------------------------------------------ reward
def test_execution_match_hand_checked_cases(toy_db):
    em = lambda pred, gold: execution_match(toy_db, pred, gold)  # noqa: E731
    # no ORDER BY in gold: row order is irrelevant
    assert em("SELECT a FROM t ORDER BY a", "SELECT a FROM t") == 1.0
    # ORDER BY in gold: order is part of the answer
    assert em("SELECT a FROM t ORDER BY a", "SELECT a FROM t ORDER BY a DESC") == 0.0
    assert em("SELECT a FROM t ORDER BY -a", "SELECT a FROM t ORDER BY a DESC") == 1.0
    # multisets: duplicates count
    assert em("SELECT DISTINCT a FROM t", "SELECT a FROM t") == 0.0
    assert em("SELECT a FROM t UNION ALL SELECT 1", "SELECT a FROM t") == 0.0
    assert em("SELECT a FROM t WHERE b != 'q'", "SELECT a FROM t") == 1.0
    # column permutation is forgiven, different values are not
    assert em("SELECT b, a FROM t", "SELECT a, b FROM t") == 1.0
    assert em("SELECT a, a FROM t", "SELECT a, b FROM t") == 0.0
    # numerically equal aggregates
    assert em("SELECT sum(a) * 1.0 / count(*) FROM t", "SELECT avg(a) FROM t") == 1.0
    assert em("SELECT count(*) FROM t", "SELECT 4") == 1.0
    # broken or missing predictions
    assert em("SELEC a FROM t", "SELECT a FROM t") == 0.0
    assert em(None, "SELECT a FROM t") == 0.0
    assert em("SELECT a FROM missing_table", "SELECT a FROM t") == 0.0


def test_results_match_and_order_detection():
    assert results_match([(1,), (1,), (2,)], [(2,), (1,), (1,)], ordered=False)
    assert not results_match([(1,), (2,), (2,)], [(2,), (1,), (1,)], ordered=False)
    assert not results_match([(1,), (2,)], [(2,), (1,)], ordered=True)
    assert gold_orders_rows("SELECT a FROM t ORDER BY a")
    assert not gold_orders_rows("SELECT a FROM t WHERE a IN (SELECT a FROM t ORDER BY a LIMIT 1)")


def test_shaping_terms_are_off_by_default_and_reported(toy_db):
    base = score_sql(toy_db, "SELECT b FROM t", "SELECT a FROM t")
    assert (base.exec_acc, base.parsed, base.executed, base.reward) == (0.0, True, True, 0.0)
    shaped = score_sql(toy_db, "SELECT b FROM t", "SELECT a FROM t",
                       RewardConfig(valid_sql_bonus=0.1, executed_bonus=0.2))
    assert shaped.exec_acc == 0.0 and shaped.reward == pytest.approx(0.3)
    # Spider counts empty == empty as a match; the training reward for it is configurable
    empty = score_sql(toy_db, "SELECT a FROM t WHERE a > 9", "SELECT a FROM t WHERE b = 'q'",
                      RewardConfig(empty_match_reward=0.0))
    assert empty.exec_acc == 1.0 and empty.gold_empty and empty.reward == 0.0
    bad = score_sql(toy_db, "SELECT nope FROM t", "SELECT a FROM t")
    assert bad.parsed and not bad.executed and "nope" in bad.error and not bad.gold_empty
    # gold_empty is a fact about the task, known even when the prediction fails or is missing
    assert score_sql(toy_db, "SELECT nope FROM t", "SELECT a FROM t WHERE a > 9").gold_empty
    assert score_sql(toy_db, None, "SELECT a FROM t WHERE a > 9").gold_empty


# Components (see similarity.py) of the gold query used below: table:teachers, column:name,
# column:salary, clause:where, value:84000. F1 = 2 * shared / (len(pred) + len(gold)).
_GOLD = "SELECT name FROM teachers WHERE salary > 84000"


@pytest.mark.parametrize("pred, gold, expected", [
    (_GOLD, _GOLD, 1.0),
    # aliases, qualification and identifier case do not matter
    ("SELECT T1.Name FROM Teachers AS T1 WHERE T1.SALARY > 84000", _GOLD, 1.0),
    # right table, wrong filter column and value: shares teachers, name, where -> 2*3/10
    ("SELECT name FROM teachers WHERE hire_year > 2011", _GOLD, 0.6),
    # right table, wrong column: {teachers, salary} vs {teachers, name} -> 2*1/4
    ("SELECT salary FROM teachers", "SELECT name FROM teachers", 0.5),
    # other table, only the column `name` shared: {departments, name, budget, order, limit,
    # value:1} vs gold -> 2*1/11
    ("SELECT name FROM departments ORDER BY budget DESC LIMIT 1", _GOLD, 2 / 11),
    ("SELECT count(*) FROM departments", _GOLD, 0.0),
    # missing aggregate and GROUP BY: 2 of the gold's 4 components -> 2*2/6
    ("SELECT building FROM departments",
     "SELECT building, count(*) FROM departments GROUP BY building", 2 / 3),
    # LIMIT counts and text values are values; text keeps its case
    ("SELECT name FROM teachers ORDER BY salary LIMIT 3",
     "SELECT name FROM teachers ORDER BY salary LIMIT 1", 10 / 12),
    ("SELECT budget FROM departments WHERE name = 'physics'",
     "SELECT budget FROM departments WHERE name = 'Physics'", 8 / 10),
    # unparsable or missing on either side
    ("SELEC name FROM teachers", _GOLD, 0.0),
    (None, _GOLD, 0.0),
    ("", _GOLD, 0.0),
    (_GOLD, "SELECT FROM WHERE", 0.0),
])
def test_sql_similarity_hand_checked(pred, gold, expected):
    assert sql_similarity(pred, gold) == pytest.approx(expected)


def test_sql_similarity_never_raises_on_broken_queries():
    golds = [("SELECT building FROM departments WHERE budget > 300000 INTERSECT SELECT building"
              " FROM departments WHERE budget < 116000"),
             ("SELECT count(*) FROM students AS T1 JOIN enrollments AS T2 ON T1.id = T2.student_id"
              " WHERE T1.city = 'Riverton'"),
             "WITH x AS (SELECT a FROM t) SELECT a FROM x WHERE EXISTS (SELECT 1)"]
    for gold in golds:
        for cut in range(len(gold) + 1):
            pred = gold[:cut]
            sim = sql_similarity(pred, gold)
            assert 0.0 <= sim <= 1.0 and sim == sql_similarity(gold, pred)
    assert sql_similarity("\x00" + _GOLD, _GOLD) == 0.0


def test_partial_credit_only_for_non_matching_results(toy_db):
    gold = "SELECT a FROM t WHERE b = 'y'"  # table:t, column:a, column:b, clause:where, value:y
    cfg = RewardConfig(partial_credit=0.3)
    # wrong column: shares 4 of 5 components and has 4 -> 2*4/9
    wrong = score_sql(toy_db, "SELECT b FROM t WHERE b = 'y'", gold, cfg)
    assert wrong.exec_acc == 0.0 and wrong.similarity == pytest.approx(8 / 9)
    assert wrong.reward == 0.3 * wrong.similarity
    # a match earns the full match reward, whatever its structure (similarity 2*3/9 here)
    match = score_sql(toy_db, "SELECT a FROM t WHERE a = 1", gold, cfg)
    assert match.exec_acc == 1.0 and match.reward == 1.0
    assert match.similarity == pytest.approx(2 / 3)
    # off by default, but the similarity is still reported
    off = score_sql(toy_db, "SELECT b FROM t WHERE b = 'y'", gold)
    assert off.reward == 0.0 and off.similarity == wrong.similarity
    assert score_sql(toy_db, "SELEC a FROM t", gold, cfg).reward == 0.0


@pytest.mark.parametrize("weight", [-0.1, 1.0, 2.0, float("nan")])
def test_partial_credit_must_be_below_one(weight):
    with pytest.raises(ValueError, match="partial_credit must be in"):
        RewardConfig(partial_credit=weight)


# ------------------------------------------------------------------------------ sandbox
@pytest.mark.parametrize("sql", [
    "INSERT INTO t VALUES (9, 'w')", "DELETE FROM t", "UPDATE t SET a = 0", "DROP TABLE t",
    "CREATE TABLE u (x)", "ATTACH DATABASE ':memory:' AS other", "PRAGMA writable_schema = ON",
    "PRAGMA journal_mode = DELETE", "SELECT load_extension('x')", "SELECT 1; DROP TABLE t",
])
def test_sandbox_denies_writes(toy_db, sql):
    before = _sha(toy_db)
    res = run_sql(toy_db, sql)
    assert not res.ok and res.error
    assert _sha(toy_db) == before
    assert run_sql(toy_db, "SELECT count(*) FROM t").rows == [(4,)]


def test_sandbox_stops_runaway_query(toy_db):
    # The error names the deadline, which only a stopped query reports (left alone, this one
    # never ends); how long that took is not asserted, as it depends on the machine's load.
    res = run_sql(toy_db, "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
                          "SELECT x FROM c ORDER BY x DESC", timeout_s=0.5)
    assert not res.ok and res.error == "query exceeded the 0.5s time limit"
    assert run_sql(toy_db, "SELECT count(*) FROM t").rows == [(4,)]  # the sandbox still serves


def test_sandbox_caps_huge_results(toy_db):
    res = run_sql(toy_db, "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
                          "SELECT x FROM c", max_rows=500)
    assert res.ok and res.truncated and len(res.rows) == 500


def test_checker_and_rewriter_previews_are_capped_with_a_marker(tmp_path):
    from environments.text_to_sql.prompts import MAX_CELL_CHARS, result_preview, rewriter_messages

    path = tmp_path / "big.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE big (id INTEGER, t TEXT, b BLOB)")
    conn.execute("INSERT INTO big VALUES (1, ?, ?)", ("x" * 1_000_000, bytes(1_000_000)))
    conn.commit()
    conn.close()
    result = run_sql(path, "SELECT * FROM big")
    preview = result_preview(result)
    assert result.ok and len(preview) <= 300 and preview.startswith("Result (1 rows): 1, xxx")
    assert "…[truncated" in preview and len(preview.split(", ")[1]) <= MAX_CELL_CHARS
    error = result_preview(run_sql(path, f"SELECT {'y' * 50_000} FROM big"))
    assert error.startswith("Error: no such column: yyy") and len(error) <= 300
    assert error.endswith(" chars]")
    prompt = rewriter_messages("CREATE TABLE big (id, t, b)", "What?", "SELECT * FROM big", result)
    assert len(prompt[-1]["content"]) < 400


def test_sandbox_never_raises(toy_db, tmp_path):
    assert run_sql(toy_db, None).error == "empty query"
    assert not run_sql(toy_db, "\x00garbage").ok
    assert "cannot open database" in run_sql(tmp_path / "absent.sqlite", "SELECT 1").error


# ------------------------------------------------------------------------------ extraction
@pytest.mark.parametrize("text, expected", [
    ("```sql\nSELECT a FROM t;\n```\nThis query lists a.", "SELECT a FROM t"),
    ("Sure! Here it is:\n```\nSELECT count(*) FROM t\n```", "SELECT count(*) FROM t"),
    ("The answer is SELECT name FROM singer WHERE age > 30 which returns names.",
     "SELECT name FROM singer WHERE age > 30"),
    ("SELECT a FROM t\n\nExplanation: it selects a", "SELECT a FROM t"),
    ("SELECT a FROM t; SELECT b FROM t", "SELECT a FROM t"),
    ("with x as (select 1 as a) select a from x", "with x as (select 1 as a) select a from x"),
    ("I don't know.", None),
    ("", None),
])
def test_extract_sql(text, expected):
    assert extract_sql(text) == expected


def test_extract_sql_does_not_repair_truncated_clause():
    # A query cut off mid-clause must stay invalid rather than become a different query.
    assert extract_sql("SELECT name FROM singer WHERE") == "SELECT name FROM singer WHERE"


@pytest.mark.parametrize("reply, verdict", [
    ("Yes.", True), ("yes, it is correct", True), ("THE QUERY IS CORRECT.", True),
    ("No", False), ("The query is not correct", False), ("It is incorrect.", False),
    ("hmm", None), ("", None),
])
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) is verdict


# ------------------------------------------------------------------------------ registry
def test_registered_environment(train, tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_LAB_CACHE", str(tmp_path))
    env = ll.envs.get("text_to_sql")
    tasks = env.load_tasks("dev", limit=5)
    assert len(tasks) == 5 and all(isinstance(t, SQLTask) for t in tasks)
    assert [t.question for t in env.load_tasks("train", data="generated")] == [t.question for t in train]
    if (SPIDER / "dev.json").is_file():
        assert len(env.load_tasks("dev", data=SPIDER, limit=7)) == 7


def test_summarize():
    metas = [dict(exec_acc=1.0, parsed=True, executed=True, no_sql=False, rewrites=0, difficulty="easy"),
             dict(exec_acc=0.0, parsed=True, executed=False, no_sql=False, rewrites=1, difficulty="hard"),
             dict(exec_acc=0.0, parsed=False, executed=False, no_sql=True, rewrites=1, difficulty="hard"),
             dict(exec_acc=0.0, parsed=False, executed=False, no_sql=True, rewrites=1, difficulty="hard")]
    batch = ll.Batch([ll.Trajectory(task_id=str(i), meta=m) for i, m in enumerate(metas)])
    s = summarize(batch)
    assert s["exec_acc"] == 0.25 and s["n"] == 4
    assert s["parsed_rate"] == 0.5 and s["executed_rate"] == 0.25 and s["no_sql_rate"] == 0.5
    assert s["exec_acc_easy"] == 1.0 and s["exec_acc_hard"] == 0.0
    assert "similarity" not in s  # logs from before the field
    assert summarize(ll.Batch([]))["n"] == 0
    metas[0]["similarity"], metas[1]["similarity"] = 1.0, 0.5
    s = summarize(ll.Batch([ll.Trajectory(task_id=str(i), meta=m) for i, m in enumerate(metas)]))
    assert s["similarity"] == 0.375  # missing (no SQL) counts as 0
    assert "exec_acc_nonempty_gold" not in s  # logs from before the field
    for m, empty in zip(metas, (True, False, False, False)):
        m["gold_empty"] = empty
    s = summarize(ll.Batch([ll.Trajectory(task_id=str(i), meta=m) for i, m in enumerate(metas)]))
    assert s["exec_acc"] == 0.25 and s["exec_acc_nonempty_gold"] == 0.0
    assert s["gold_empty_rate"] == 0.25


# ------------------------------------------------------------------------------ agent (scripted)
class ScriptedPolicy:
    """Returns canned replies per role and records them as transitions, like the real policy."""

    def __init__(self, replies: dict[str, list[str]]):
        self.replies = {k: list(v) for k, v in replies.items()}
        self.calls: list[tuple[str, dict]] = []

    def chat(self, messages, **kw):
        role = "checker" if "Answer yes or no" in messages[-1]["content"] else (
            "rewriter" if "Wrong SQL" in messages[-1]["content"] else "writer")
        self.calls.append((role, kw))
        text = self.replies[role].pop(0)
        ll.tracing.record_generation(SimpleNamespace(
            prompt_ids=[1], response_ids=[2, 3], logprobs=[-0.1, -0.2], prompt_text="p",
            text=text, temperature=0.0, finish_reason="stop"))
        return kw.get("prefill", "") + text


def _run(policy, task, **options):
    with ll.rollout(task_id=task.task_id) as traj:
        make_agent(policy, **options)(task)
    return traj


def test_agent_correct_first_try(train):
    task = next(t for t in train if t.gold_sql.startswith("SELECT count(*) FROM students"))
    policy = ScriptedPolicy({"writer": [" count(*) FROM students"], "checker": ["Yes"]})
    traj = _run(policy, task)
    assert [tr.role for tr in traj.transitions] == ["writer", "checker"]
    assert traj.transitions[-1].reward == 1.0 and traj.meta["exec_acc"] == 1.0
    assert traj.meta["pred_sql"] == "SELECT count(*) FROM students"
    assert traj.meta["gold_sql"] == task.gold_sql and traj.meta["db_id"] == "school"
    assert policy.calls[0][1]["prefill"] == "SELECT"


def test_agent_rewrites_after_no_and_after_error(train):
    task = next(t for t in train if t.gold_sql.startswith("SELECT count(*) FROM students"))
    policy = ScriptedPolicy({"writer": [" count(*) FROM teachers"],
                             "checker": ["No, wrong table", "Yes"],
                             "rewriter": [" count(*) FROM students"]})
    traj = _run(policy, task, max_turns=3)
    # the rewrite is checked again; "yes" ends the episode before a second rewrite
    assert [tr.role for tr in traj.transitions] == ["writer", "checker", "rewriter", "checker"]
    assert traj.meta["exec_acc"] == 1.0 and traj.meta["rewrites"] == 1
    assert traj.meta["verdicts"] == [False, True]
    policy = ScriptedPolicy({"writer": [" nope FROM students"], "rewriter": [" count(*) FROM students"]})
    traj = _run(policy, task, max_turns=2)
    assert [tr.role for tr in traj.transitions] == ["writer", "rewriter"]  # errors skip the checker
    assert traj.meta["exec_acc"] == 1.0 and traj.meta["verdicts"] == []


def test_agent_partial_credit_from_cli_option(train):
    from lightning_lab.train.config import parse_options

    task = next(t for t in train if t.gold_sql == "SELECT count(*) FROM students")
    options = parse_options(['reward={"partial_credit": 0.3}', "max_turns=1"])
    policy = ScriptedPolicy({"writer": [" count(*) FROM teachers"]})
    traj = _run(policy, task, **options)
    # {teachers, count} vs {students, count}: 2*1/4
    assert traj.meta["exec_acc"] == 0.0 and traj.meta["similarity"] == 0.5
    assert traj.transitions[-1].reward == pytest.approx(0.15)
    with pytest.raises(ValueError, match="partial_credit"):
        make_agent(policy, **parse_options(['reward={"partial_credit": 1.5}']))


def test_agent_without_sql_gets_zero_with_reason(train):
    task = train[0]
    policy = ScriptedPolicy({"writer": ["I cannot help"], "rewriter": ["sorry"]})
    traj = _run(policy, task, prefill="", max_turns=2)
    assert traj.meta["exec_acc"] == 0.0 and traj.meta["no_sql"]
    assert "no SELECT" in traj.meta["no_sql_reason"]
    assert sum(tr.reward for tr in traj.transitions) == 0.0


# ------------------------------------------------------------------------------ tiny model
@pytest.fixture(scope="module")
def tiny_policy():
    return ll.models.load("tiny")


def test_agent_on_tiny_model_attributes_roles(tiny_policy, dev):
    agent = make_agent(tiny_policy, max_turns=2, max_new_tokens=8, checker_tokens=3,
                       check_errors=True)
    with ll.rollout(task_id=dev[0].task_id, temperature=1.0) as traj:
        agent(dev[0])
    roles = [tr.role for tr in traj.transitions]
    assert roles[0] == "writer" and "checker" in roles
    assert set(roles) <= {"writer", "checker", "rewriter"}
    assert all(tr.response_ids and len(tr.logprobs) == len(tr.response_ids) for tr in traj.transitions)
    assert traj.meta["exec_acc"] in (0.0, 1.0) and traj.meta["db_id"] == dev[0].db_id
    assert traj.transitions[-1].reward == traj.meta["exec_acc"]


def test_short_training_run_on_tiny_model(train):
    policy = ll.models.load("tiny", lora=True)
    agent = make_agent(policy, max_turns=2, max_new_tokens=6, checker_tokens=2,
                       reward=RewardConfig(valid_sql_bonus=0.1, executed_bonus=0.1))
    # The tiny model never earns a reward, so advantages are all zero: keep those transitions in
    # the loss so the update path (ratios, KL) really runs.
    config = ll.PPOConfig(tasks_per_step=2, group_size=2, minibatch_size=8, seed=0,
                          skip_zero_advantage=False)
    trainer = ll.PPOTrainer(policy, agent, train[:8], config=config)
    states = [trainer.step() for _ in range(2)]
    assert len(states) == 2 and trainer.iteration == 2
    for state in states:
        assert len(state.batch) == 4 and state.batch.n_failed == 0
        assert state.metrics["n_loss_transitions"] >= 4
        assert all(t.meta.get("gold_sql") and "exec_acc" in t.meta for t in state.batch)
        assert {tr.role for _, tr in state.batch.transitions()} <= {"writer", "checker", "rewriter"}

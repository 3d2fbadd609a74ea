"""The schema grammar of text_to_sql and the `grammar=` constraint of `Policy.chat`.

The grammar must accept every gold query of the generated databases and of Spider (else decoding
under it would forbid right answers), and reject what it exists to forbid: names the database
does not have, words run together, a second line. Acceptance is checked with llguidance's own
matcher over the tokenizer's ids, the path decoding takes.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import sqlglot
from sqlglot import exp

import lightning_lab as ll
from environments.text_to_sql import generate_tasks, load_tasks, make_agent
from environments.text_to_sql.grammar import schema_grammar, schema_identifiers, table_columns
from environments.text_to_sql.qualify import qualify_sql
from lightning_lab.inference.constraints import _ll_tokenizer
from lightning_lab.inference.tools import ToolError

SPIDER = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "spider"


@pytest.fixture(scope="module")
def model():
    return ll.models.load("tiny")


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    return generate_tasks(seed=0, split="dev", cache_dir=tmp_path_factory.mktemp("t2s"))


def _accepts(model, db_path: str, text: str, prefill: str = "SELECT",
             qualified: bool = False) -> bool:
    import llguidance

    engine = model.engine
    compiled = engine.compile_grammar(schema_grammar(db_path, prefill, qualified=qualified))
    matcher = llguidance.LLMatcher(
        _ll_tokenizer(model.tokenizer, engine.vocab_size, tuple(sorted(engine.stop_token_ids))),
        compiled)
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    return all(matcher.consume_token(i) for i in ids) and matcher.is_accepting()


def _after_select(sql: str) -> str:
    assert sql[:6].upper() == "SELECT"
    return " " + sql[6:].strip()


def test_every_generated_gold_query_is_in_its_grammar(model, dev):
    for task in dev:
        assert _accepts(model, str(task.db_path), _after_select(task.gold_sql)), task.gold_sql


@pytest.mark.skipif(not (SPIDER / "dev.json").is_file(), reason=f"no Spider slice at {SPIDER}")
def test_every_spider_gold_query_is_in_its_grammar(model):
    tasks = load_tasks("dev", SPIDER)
    assert len(tasks) == 647
    rejected = [t.gold_sql for t in tasks
                if not _accepts(model, str(t.db_path), _after_select(t.gold_sql))]
    assert rejected == []


@pytest.mark.parametrize("text, ok", [
    (" name FROM {t}", True),
    (" name FROM {t} ;", True),
    (" count(DISTINCT name) FROM {t} AS T1 WHERE T1.name LIKE '%a%' ORDER BY count(*) DESC LIMIT 3",
     True),
    ("name FROM {t}", False),                       # SELECT and the next word need a space
    (" sum(name)FROM {t}", False),                  # keywords stand apart
    (" nameFROM {t}", False),
    (" name FROM {t}WHERE name = 1", False),
    (" life_expectancy FROM {t}", False),            # no such column
    (" name FROM {t}s", False),                      # no such table
    (" name FROM {t}\nWHERE name = 1", False),       # one line
    (" name FROM {t} AS X1", False),                 # aliases are T1..T9
    (" name    FROM {t}", False),                    # at most three blanks
    (" name FROM {t}; DROP TABLE {t}", False),
])
def test_grammar_rejects_what_it_exists_to_forbid(model, dev, text, ok):
    task = next(t for t in dev if "name" in schema_identifiers(str(t.db_path))[1])
    table = next(tb for tb in schema_identifiers(str(task.db_path))[0])
    assert _accepts(model, str(task.db_path), text.format(t=table)) is ok


@pytest.mark.skipif(not (SPIDER / "dev.json").is_file(), reason=f"no Spider slice at {SPIDER}")
def test_every_qualified_spider_gold_query_is_in_the_qualified_grammar(model):
    tasks = load_tasks("dev", SPIDER)
    rewritten = [(t, qualify_sql(t.gold_sql, str(t.db_path))) for t in tasks]
    rewritten = [(t, q) for t, q in rewritten if q is not None]
    assert len(rewritten) >= 630
    rejected = [q for t, q in rewritten
                if not _accepts(model, str(t.db_path), _after_select(q), qualified=True)]
    assert rejected == []


def test_qualified_grammar_binds_each_column_to_its_own_table(model, tmp_path):
    db = tmp_path / "school.sqlite"
    conn = sqlite3.connect(db)
    conn.executescript("CREATE TABLE teacher (teacher_id INT, name TEXT);"
                       "CREATE TABLE course (course_id INT, teacher_id INT, title TEXT);")
    conn.close()
    ok = [" teacher.name FROM teacher",
          " COUNT(*) FROM course JOIN teacher ON course.teacher_id = teacher.teacher_id",
          " Teacher.NAME FROM teacher WHERE teacher.teacher_id IN (SELECT course.teacher_id FROM"
          " course)"]
    bad = [" course.name FROM course",          # a real column, of another table
           " name FROM teacher",                # bare columns
           " T1.name FROM teacher AS T1",       # aliases
           " teacher.title FROM teacher"]
    for text in ok:
        assert _accepts(model, str(db), text, qualified=True), text
    for text in bad:
        assert not _accepts(model, str(db), text, qualified=True), text
    assert _accepts(model, str(db), " name FROM teacher")  # the plain grammar takes bare ones


def test_names_match_in_ascii_case_only(model, dev):
    """Any ASCII case (SQLite's rule), but not Unicode folding: 'ſ' (U+017F) folds to 's'."""
    db = str(dev[0].db_path)
    table = next(t for t in schema_identifiers(db)[0] if "s" in t)
    assert _accepts(model, db, f" * FROM {table.upper()}")
    assert not _accepts(model, db, f" * FROM {table.replace('s', chr(0x17F))}")


def test_grammar_without_prefill_and_bad_prefill(model, dev):
    db = str(dev[0].db_path)
    assert _accepts(model, db, dev[0].gold_sql, prefill="")
    with pytest.raises(ValueError, match="prefill"):
        schema_grammar(db, "WITH")


def test_chat_grammar_constrains_even_a_random_model(model):
    grammar = 'start: " " ("yes" | "no") "."\n'
    with ll.rollout("t", temperature=1.0) as traj:
        replies = [model.chat("Is it?", grammar=grammar, max_new_tokens=8, prefill="Answer:")
                   for _ in range(4)]
    assert set(replies) <= {"Answer: yes.", "Answer: no."}
    assert all(tr.meta.get("constrained") for tr in traj.transitions)
    # plain string prompts are constrained too
    (gen,) = model.generate(["Q: yes or no? A:"], grammar=grammar, max_new_tokens=8, seed=1)
    assert gen.text in (" yes.", " no.")


def test_chat_grammar_errors_name_the_field(model):
    with pytest.raises(ToolError) as info:
        model.chat("x", grammar='start: "a"', response_format={"type": "json_object"})
    assert info.value.param == "grammar"
    with pytest.raises(ToolError) as info:
        model.chat("x", grammar="start: undefined_rule\n")
    assert info.value.param == "grammar"


@pytest.mark.parametrize("qualify", [False, True])
def test_constrained_agent_samples_only_inside_the_grammar(model, dev, qualify):
    """The random tiny model, sampling freely under the grammar: every token it chose is one
    the grammar allows, and a query it finished names only the database's tables and columns
    (with `qualify`, only real `table.column` pairs)."""
    import llguidance

    agent = make_agent(model, max_turns=1, max_new_tokens=64, constrain=True,
                       schema_style="compact", qualify=qualify)
    engine = model.engine
    ll_tok = _ll_tokenizer(model.tokenizer, engine.vocab_size, tuple(sorted(engine.stop_token_ids)))
    for seed, task in enumerate(dev[:12]):
        with ll.rollout(task_id=task.task_id, temperature=1.0, seed=seed) as traj:
            agent(task)
        (writer,) = traj.transitions
        assert writer.meta["constrained"]
        matcher = llguidance.LLMatcher(
            ll_tok, engine.compile_grammar(schema_grammar(str(task.db_path), qualified=qualify)))
        assert all(matcher.consume_token(i) for i in writer.response_ids), writer.response
        if writer.finish_reason == "length":
            continue  # cut by max_new_tokens: a prefix of a valid query (most random samples)
        pairs = {(t.lower(), c.lower()) for t, cols in table_columns(str(task.db_path)).items()
                 for c in cols}
        tree = sqlglot.parse_one(traj.meta["pred_sql"], read="sqlite")
        assert {t.name.lower() for t in tree.find_all(exp.Table)} <= {t for t, _ in pairs}
        # (a double-quoted string is a literal to SQLite unless a column has that name)
        named = [c for c in tree.find_all(exp.Column) if not c.this.quoted]
        assert {c.name.lower() for c in named} <= {c for _, c in pairs}
        if qualify:
            assert {(c.table.lower(), c.name.lower()) for c in named} <= pairs


def test_constrain_needs_the_roles_style_and_a_select_prefill(model):
    with pytest.raises(ValueError, match="roles"):
        make_agent(model, constrain=True, style="tools")
    with pytest.raises(ValueError, match="prefill"):
        make_agent(model, constrain=True, prefill="WITH")

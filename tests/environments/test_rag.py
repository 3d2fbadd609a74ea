"""Tests of the RAG environment: generated data, HotpotQA loading, BM25, metrics, agent."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

import lightning_lab as ll
from environments.rag import (
    HotpotQAFormatError,
    HotpotQAFormatWarning,
    RagTask,
    answer_em,
    answer_f1,
    extract_answer,
    generate_tasks,
    load_hotpotqa,
    load_tasks,
    make_agent,
    normalize_answer,
    retrieve,
    summarize,
)
from environments.rag.agent import candidate_names, clean_query, reformulate_prompt
from environments.rag import retrieval
from environments.rag.retrieval import corpus_index, index_for
from environments.rag.tasks import Paragraph, attach_corpus

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "hotpotqa"
HOTPOT = SHARED / "dev_distractor_60.json"
needs_hotpot = pytest.mark.skipif(not HOTPOT.exists(),
                                  reason=f"HotpotQA slice not found at {HOTPOT}")


@pytest.fixture(scope="module")
def train() -> list[RagTask]:
    return generate_tasks(seed=0, split="train")


@pytest.fixture(scope="module")
def dev() -> list[RagTask]:
    return generate_tasks(seed=0, split="dev")


def _count_index_builds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the size of every BM25 index built from now on (the costly part of retrieval)."""
    built: list[int] = []
    real = retrieval.BM25Index.__init__

    def counting(self, paragraphs):
        built.append(len(paragraphs))
        real(self, paragraphs)

    monkeypatch.setattr(retrieval.BM25Index, "__init__", counting)
    return built


# ------------------------------------------------------------------------------ generated data


def test_generation_is_deterministic_lazy_and_sized(train, dev, monkeypatch):
    # Generation stays cheap because it builds no BM25 index: counted, not timed (a time limit
    # fails on a loaded machine and passes a slow generator on a fast one).
    built = _count_index_builds(monkeypatch)
    again = generate_tasks(seed=0, split="train")
    assert built == [] and again[0].corpus.bm25 is None
    assert again == train  # dataclass equality: questions, answers, paragraphs, facts
    assert [t.task_id for t in again] == [t.task_id for t in train]
    other = generate_tasks(seed=1, split="train")
    assert [t.question for t in other] != [t.question for t in train]
    assert len(train) == 200 and len(dev) == 60
    assert {t.kind for t in train} == {"bridge", "comparison"}
    assert len({t.task_id for t in train + dev}) == 260
    assert len({t.question for t in train}) == 200


def test_splits_share_no_entity_or_question(train, dev):
    train_titles = {p.title for t in train for p in t.paragraphs}
    dev_titles = {p.title for t in dev for p in t.paragraphs}
    assert train_titles and dev_titles and not train_titles & dev_titles
    assert not {t.question for t in train} & {t.question for t in dev}
    # No dev entity name is even mentioned anywhere in the train data.
    train_text = " ".join(p.text for t in train for p in t.paragraphs)
    assert not [title for title in dev_titles if title in train_text]


def test_distractor_setting_shape(train):
    for task in train:
        titles = [p.title for p in task.paragraphs]
        assert len(titles) == 10 and len(set(titles)) == 10
        assert len(task.gold_titles) == 2 and set(task.gold_titles) <= set(titles)
        for title, i in task.supporting_facts:
            assert 0 <= i < len(task.paragraph(title).sentences)
        assert 2 <= len(task.paragraphs[0].sentences) <= 4


def test_every_question_is_answerable_from_its_supporting_facts(train, dev):
    for task in train + dev:
        gold_text = " ".join(task.paragraph(t).text for t in task.gold_titles)
        if task.answer in ("yes", "no"):
            assert task.kind == "comparison"
        elif task.kind == "comparison":
            assert task.answer in task.gold_titles and task.answer in task.question
        else:
            assert task.answer in gold_text
        # The supporting sentences carry the facts the question is about.
        support = " ".join(task.paragraph(t).sentences[i] for t, i in task.supporting_facts)
        if task.kind == "bridge":
            assert task.answer in support
    # Comparisons are decided by the supporting sentences: check "born first" by the years.
    born_first = [t for t in train if t.question.startswith("Who was born first")]
    assert born_first
    for task in born_first:
        years = {title: int(re.search(r"\(born (\d{4})\)", task.paragraph(title).sentences[0])[1])
                 for title in task.gold_titles}
        assert task.answer == min(years, key=years.get)
    yes_no = [t.answer for t in train if t.answer in ("yes", "no")]
    assert "yes" in yes_no and "no" in yes_no


def test_bridge_questions_need_both_paragraphs(train):
    bridges = [t for t in train if t.kind == "bridge"]
    assert len(bridges) > 50
    for task in bridges:
        (first, first_sent), (second, second_sent) = task.supporting_facts
        first_para, second_para = task.paragraph(first), task.paragraph(second)
        assert first in task.question  # hop 1 is named in the question ...
        assert second not in task.question  # ... the bridge entity is not
        assert second in first_para.sentences[first_sent]  # hop 1 names the bridge entity
        assert task.answer not in first_para.text  # no shortcut through hop 1
        assert task.answer in second_para.sentences[second_sent]


# ---------------------------------------------------------------------------------- HotpotQA


@needs_hotpot
def test_load_shared_hotpotqa_slice():
    tasks = load_hotpotqa(HOTPOT)
    assert len(tasks) == 60
    assert len({t.task_id for t in tasks}) == 60
    assert {t.kind for t in tasks} == {"bridge", "comparison"}
    first = tasks[0]
    assert first.question.startswith("Were Scott Derrickson and Ed Wood")
    assert first.answer == "yes" and first.gold_titles == ["Scott Derrickson", "Ed Wood"]
    # HotpotQA's distractor setting has 10 paragraphs, a few dev records fewer (kept as is).
    assert sum(len(t.paragraphs) == 10 for t in tasks) >= 55
    for task in tasks:
        assert 2 <= len(task.paragraphs) <= 10
        titles = {p.title for p in task.paragraphs}
        assert set(task.gold_titles) <= titles
    assert first.corpus is tasks[-1].corpus and len(first.corpus) > 400
    assert load_tasks("dev", data=HOTPOT, limit=5) == tasks[:5]


@needs_hotpot
def test_malformed_records_are_skipped_with_file_and_index(tmp_path):
    records = json.loads(HOTPOT.read_text())
    del records[3]["context"]
    records[7] = "not a record"
    records[9]["supporting_facts"] = {"title": ["x"], "sent_id": []}
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(records))
    with pytest.warns(HotpotQAFormatWarning) as caught:
        tasks = load_hotpotqa(broken)
    messages = [str(w.message) for w in caught]
    assert len(tasks) == 57
    for index, what in ((3, "context"), (7, "object"), (9, "supporting_facts")):
        assert any(str(broken) in m and f"record {index} " in m and what in m for m in messages)
    with pytest.raises(HotpotQAFormatError, match="record 3"):
        load_hotpotqa(broken, strict=True)


def test_official_layout_and_unreadable_files(tmp_path):
    record = {"_id": "abc", "question": "Which city is Velcor Dynamics in?", "answer": "Quendor",
              "type": "bridge", "level": "easy",
              "supporting_facts": [["Velcor Dynamics", 1]],
              "context": [["Velcor Dynamics", ["Velcor Dynamics is a firm.", " It is in Quendor."]],
                          ["Quendor", ["Quendor is a city."]]]}
    path = tmp_path / "official.json"
    path.write_text(json.dumps([record]))
    (task,) = load_hotpotqa(path)
    assert task.task_id == "abc" and task.supporting_facts == [("Velcor Dynamics", 1)]
    assert task.paragraph("Velcor Dynamics").text == "Velcor Dynamics is a firm. It is in Quendor."
    (tmp_path / "dict.json").write_text(json.dumps({"data": [record]}))
    with pytest.raises(HotpotQAFormatError, match="dict.json.*list"):
        load_hotpotqa(tmp_path / "dict.json")
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(HotpotQAFormatError, match="bad.json"):
        load_hotpotqa(tmp_path / "bad.json")


# ------------------------------------------------------------------------------------ metrics


@pytest.mark.parametrize("pred, gold, em, f1", [
    ("The Eiffel Tower!", "eiffel tower", 1.0, 1.0),       # case, article, punctuation
    ("an apple", "Apple", 1.0, 1.0),
    ("1,789,088", "1789088", 1.0, 1.0),                     # punctuation inside numbers
    ("U.S.A.", "USA", 1.0, 1.0),
    ("New York City", "Greenwich Village, New York City", 0.0, 0.75),  # P=3/3, R=3/5
    ("born in Quendor city", "Quendor", 0.0, 0.4),          # P=1/4, R=1
    ("Quendor Quendor", "Quendor", 0.0, 2 * 0.5 * 1 / 1.5),  # repeated tokens count once
    ("Ostravia", "Quendor", 0.0, 0.0),
    ("yes", "yes", 1.0, 1.0),
    ("Yes.", "yes", 1.0, 1.0),
    ("yes", "no", 0.0, 0.0),
    ("no, it is not", "no", 0.0, 0.0),                       # yes/no: exact or nothing
    ("yes", "yes sir", 0.0, 0.0),
    ("the", "a", 1.0, 0.0),                                 # both normalise to ""
])
def test_answer_metrics(pred, gold, em, f1):
    assert answer_em(pred, gold) == em
    assert answer_f1(pred, gold) == pytest.approx(f1)


def test_normalisation_order_matches_official():
    # Punctuation goes before articles, so "the-end" -> "theend" keeps its "the".
    assert normalize_answer("The-end of  THE   world.") == "theend of world"


# ---------------------------------------------------------------------------------- retrieval


def test_bm25_finds_paragraph_named_in_question(train):
    for task in train:
        for title in task.gold_titles:
            if title in task.question:
                assert title in [h.title for h in retrieve(task, task.question, k=2)]
        if task.kind == "bridge":  # hop 1 is the best match for the question itself
            assert retrieve(task, task.question, k=1)[0].title == task.supporting_facts[0][0]


def test_open_setting_searches_all_tasks_and_caches(train, monkeypatch):
    corpus = train[0].corpus
    assert corpus is train[-1].corpus and len(corpus) > 100
    built = _count_index_builds(monkeypatch)
    for task in train[:50]:
        second_hop = task.gold_titles[-1]
        hits = retrieve(task, second_hop, k=1, setting="open")
        assert hits[0].title == second_hop
    # 50 open-setting searches index the corpus at most once (none if an earlier test did).
    assert built.count(len(corpus)) <= 1 and corpus.bm25 is not None
    assert corpus_index(corpus) is corpus_index(corpus)  # built once
    assert index_for(train[0].paragraphs) is index_for(list(train[0].paragraphs))
    with pytest.raises(ValueError, match="setting"):
        retrieve(train[0], "x", setting="web")


def test_retrieval_edge_cases():
    paras = [Paragraph("Quendor", ("Quendor is a city.",)), Paragraph("Velcor", ("A firm.",))]
    task = RagTask("t", "q", "a", "bridge", paras, [])
    assert retrieve(task, "the of", k=5) == []  # only stopwords
    assert retrieve(task, "zzz unknown", k=2) == []  # no word in common: no luck hits
    assert [h.title for h in retrieve(task, "velcor firm", k=5)] == ["Velcor"]
    assert retrieve(task, "quendor velcor", k=5)[0].score > 0
    with pytest.raises(ValueError, match="corpus"):
        retrieve(task, "q", setting="open")
    attach_corpus([task])
    assert retrieve(task, "quendor", k=1, setting="open")[0].title == "Quendor"


# ------------------------------------------------------------------------- agent (no model)


@pytest.mark.parametrize("raw, answer", [
    ("Answer: Quendor.", "Quendor"),
    ("Answer: Answer: \"1962\"", "1962"),
    (" Quendor. The founder was born there.", "Quendor"),
    ("**Velcor Dynamics**", "Velcor Dynamics"),
    ("Answer: The answer is St. Louis.", "St. Louis"),
    ("Answer:\n\nyes\nbecause both", "yes"),
    ("J. R. R. Tolkien", "J. R. R. Tolkien"),
    ("Answer:", ""),
    ('Answer:: "Lideilia"', "Lideilia"),
])
def test_extract_answer(raw, answer):
    assert extract_answer(raw) == answer


def test_candidate_names_list_bridge_entities(train):
    bridge = next(t for t in train if t.kind == "bridge")
    (first, _), (second, _) = bridge.supporting_facts
    hits = retrieve(bridge, bridge.question, k=1)
    names = candidate_names(hits, bridge.question)
    assert second in names and first not in names and "It" not in names
    assert "Names in the passages: " in reformulate_prompt(bridge.question, hits, 300)[0]["content"]


def test_clean_query():
    assert clean_query('Query: "founder of Velcor Dynamics"\nsecond line') == \
        "founder of Velcor Dynamics"


class ScriptedPolicy:
    """Stands in for a policy: answers each role from the task's gold facts (an oracle), and
    records a generation on the open rollout the way the real policy does."""

    def __init__(self, task: RagTask, answer: str | None = None):
        self.task, self.answer, self.prompts = task, answer, []

    def chat(self, messages, *, max_new_tokens=128, temperature=None, top_p=None, stop=None,
             prefill=""):
        prompt = messages[-1]["content"]
        self.prompts.append(prompt)
        (first, _), (second, _) = self.task.supporting_facts
        if prompt.startswith("Write a short search query"):
            text = f"Query: {first}"
        elif "look up next" in prompt:
            text = "NONE" if f"] {second}:" in prompt else second  # already retrieved?
        else:
            text = f" {self.answer if self.answer is not None else self.task.answer}."
        ll.tracing.record_generation(SimpleNamespace(
            prompt_ids=[1, 2], response_ids=[3], logprobs=[-0.5], prompt_text=prompt,
            text=prefill + text, temperature=1.0, finish_reason="stop"))
        return prefill + text


def test_oracle_agent_gets_full_reward_and_roles(dev):
    bridge = next(t for t in dev if t.kind == "bridge")
    policy = ScriptedPolicy(bridge)
    with ll.rollout(task_id=bridge.task_id) as traj:
        pred = make_agent(policy, shaping=0.5)(bridge)
    assert pred == bridge.answer
    assert [tr.role for tr in traj.transitions] == ["query", "reformulate", "answer"]
    # Shaping: the query found hop 1 (+0.25), the reformulation hop 2 (+0.25); F1 on the answer.
    assert [tr.reward for tr in traj.transitions] == pytest.approx([0.25, 0.25, 1.0])
    meta = traj.meta
    assert meta["f1"] == 1.0 and meta["em"] == 1.0 and meta["sp_recall"] == 1.0
    assert meta["queries"] == [bridge.supporting_facts[0][0], bridge.supporting_facts[1][0]]
    assert set(bridge.gold_titles) <= set(meta["retrieved"])
    assert bridge.answer in policy.prompts[-1]  # the answer step saw the evidence


def test_agent_config_and_wrong_answer(dev):
    task = next(t for t in dev if t.kind == "comparison" and t.answer not in ("yes", "no"))
    with ll.rollout(task_id=task.task_id) as traj:
        make_agent(ScriptedPolicy(task, answer="Nobody"), max_hops=1, top_k=3,
                   setting="open")(task)
    assert [tr.role for tr in traj.transitions] == ["query", "answer"]
    assert traj.transitions[-1].reward == 0.0 and traj.meta["f1"] == 0.0
    assert 1 <= len(traj.meta["retrieved"]) <= 3 and task.gold_titles[0] in traj.meta["retrieved"]
    with pytest.raises(TypeError, match="top_kk"):
        make_agent(None, top_kk=3)
    with pytest.raises(ValueError, match="setting"):
        make_agent(None, setting="web")


def test_summarize_and_registration(dev):
    env = ll.envs.get("rag")
    assert env.load_tasks is load_tasks and env.make_agent is make_agent
    assert load_tasks("dev", limit=3) == dev[:3]
    assert load_tasks("dev", data="generated", seed=0) == dev
    with pytest.raises(FileNotFoundError):
        load_tasks("dev", data="/nonexistent/hotpot.json")
    trajectories = []
    for task, answer in zip(dev[:4], [None, None, "wrong", "wrong"]):
        with ll.rollout(task_id=task.task_id) as traj:
            make_agent(ScriptedPolicy(task, answer=answer))(task)
        trajectories.append(traj)
    summary = env.summarize(ll.Batch(trajectories))
    assert summary["f1"] == pytest.approx(0.5) and summary["em"] == pytest.approx(0.5)
    assert summary["n"] == 4 and summary["failed"] == 0
    assert summarize(ll.Batch([]))["n"] == 0


# ------------------------------------------------------------------------ agent (tiny model)


@pytest.fixture(scope="module")
def tiny():
    return ll.models.load("tiny")


def test_agent_on_tiny_model_attributes_roles(tiny, dev):
    task = next(t for t in dev if t.kind == "bridge")
    with ll.rollout(task_id=task.task_id, temperature=1.0) as traj:
        pred = make_agent(tiny, max_hops=3, max_new_tokens=8, query_tokens=8)(task)
    roles = [tr.role for tr in traj.transitions]
    assert roles[0] == "query" and roles[-1] == "answer"
    assert set(roles[1:-1]) <= {"reformulate"} and len(roles) <= 4
    assert traj.meta["hops"] == len(traj.meta["queries"]) <= 3
    for tr in traj.transitions:
        assert tr.response_ids and len(tr.logprobs) == len(tr.response_ids)
        assert task.question in tr.prompt
    assert "Passages:" in traj.transitions[-1].prompt
    assert traj.meta["pred"] == pred and traj.meta["gold"] == task.answer
    assert traj.transitions[-1].reward == pytest.approx(traj.meta["f1"])
    assert set(traj.meta) >= {"question", "pred", "gold", "em", "f1", "sp_recall"}


def test_short_ppo_run_on_tiny_model(tiny):
    env = ll.envs.get("rag")
    rag_agent = env.make_agent(tiny, max_hops=2, max_new_tokens=8, query_tokens=8)

    def agent(task):
        rag_agent(task)
        # The random tiny model never scores F1; a small length bonus gives the group reward
        # variance, so the PPO update really runs through the rag transitions.
        ll.reward(0.01 * len(ll.current().meta["pred"]), final=True)

    tasks = env.load_tasks("train", limit=8)
    config = ll.PPOConfig(tasks_per_step=2, group_size=4, minibatch_size=8, rollout_workers=8)
    trainer = ll.PPOTrainer(tiny, agent, tasks, config=config)
    states = [trainer.step() for _ in range(2)]
    assert [s.iteration for s in states] == [1, 2]
    for state in states:
        assert len(state.batch) == 8 and state.batch.n_failed == 0
        assert all("f1" in traj.meta for traj in state.batch)
    assert sum(s.metrics["n_loss_transitions"] for s in states) > 0
    summary = env.summarize(states[-1].batch)
    assert summary["n"] == 8 and 0.0 <= summary["f1"] <= 1.0

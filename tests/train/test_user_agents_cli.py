"""``lightning-lab train/eval --agent module:fn --tasks file.jsonl`` and ``--agent-cmd``.

A user's own agent (in-process, OpenAI-SDK through ``base_url``, async, or another process)
trains and evaluates from the shell with tasks from a JSONL file; every mistake in naming it is a
usage error (exit 2) that says which module or attribute is wrong.
"""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest

from lightning_lab.cli import main
from lightning_lab.train.user_agents import load_task_file

TESTS = Path(__file__).resolve().parents[1]

AGENTS = '''
import openai
import lightning_lab as ll

def chatty(task, policy, max_new_tokens=4):
    text = policy.chat(task["q"], max_new_tokens=max_new_tokens)
    ll.reward(float(len(text)), final=True)

async def over_http(task, base_url):
    client = openai.AsyncOpenAI(base_url=base_url, api_key="-", max_retries=0)
    reply = await client.chat.completions.create(
        model="tiny", max_tokens=3, messages=[{"role": "user", "content": task["q"]}])
    ll.reward(float(len(reply.choices[0].message.content)))

NOT_CALLABLE = 42

import threading
RELEASE = threading.Event()

def stuck_on_a(task, policy):
    if task["task_id"] == "a":
        RELEASE.wait(120)  # a hung tool call; the test sets it when done
    ll.reward(float(len(policy.chat(task["q"], max_new_tokens=3))))
'''


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "my_agents_mod.py").write_text(textwrap.dedent(AGENTS))
    (tmp_path / "tasks.jsonl").write_text(
        '{"task_id": "a", "q": "hello"}\n\n{"q": "good bye", "extra": [1, 2]}\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("my_agents_mod", None)


def test_task_file_format(workdir):
    tasks = load_task_file(workdir / "tasks.jsonl")
    assert tasks == [{"task_id": "a", "q": "hello"},
                     {"task_id": "line3", "q": "good bye", "extra": [1, 2]}]


def test_train_and_eval_a_module_agent(workdir, capsys):
    out = workdir / "run"
    code = main(["train", "--model", "tiny", "--lora", "on", "--agent", "my_agents_mod:chatty",
                 "--agent-option", "max_new_tokens=5", "--tasks", "tasks.jsonl", "--steps", "1",
                 "--tasks-per-step", "2", "--group-size", "2", "--rollout-timeout-s", "60",
                 "--out", str(out)])
    assert code == 0
    (metrics,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics["n_failed"] == 0 and metrics["n_transitions"] == 4
    trajectories = [json.loads(line) for line in (out / "trajectories.jsonl").read_text().splitlines()]
    assert sorted(t["task_id"] for t in trajectories) == ["a", "a", "line3", "line3"]
    for traj in trajectories:
        (tr,) = traj["transitions"]
        assert tr["reward"] == len(tr["response"]) and len(tr["response_ids"]) <= 5
    summary = json.loads((out / "summary.json").read_text())
    assert summary["after"]["n"] == 2 and summary["after"]["n_failed"] == 0
    assert "my_agents_mod:chatty" in capsys.readouterr().out

    results = workdir / "eval.jsonl"
    assert main(["eval", "--model", "tiny", "--agent", "my_agents_mod:over_http", "--tasks",
                 "tasks.jsonl", "--rollout-timeout-s", "60", "--out", str(results)]) == 0
    evaluated = [json.loads(line) for line in results.read_text().splitlines()]
    assert [t["task_id"] for t in evaluated] == ["a", "line3"]
    for traj in evaluated:
        (tr,) = traj["transitions"]
        assert tr["meta"]["via"] == "http" and tr["temperature"] == 0.0  # greedy records 0
        assert tr["reward"] == len(tr["response"])


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_train_a_command_agent(workdir):
    out = workdir / "cmd-run"
    code = main(["train", "--model", "tiny", "--lora", "on", "--agent-cmd",
                 f"bash {TESTS / 'process_agents' / 'agent.sh'}", "--tasks", "tasks.jsonl",
                 "--steps", "1", "--tasks-per-step", "2", "--group-size", "2",
                 "--max-tokens-cap", "3", "--out", str(out)])
    assert code == 0
    trajectories = [json.loads(line) for line in (out / "trajectories.jsonl").read_text().splitlines()]
    assert len(trajectories) == 4
    for traj in trajectories:
        (tr,) = traj["transitions"]
        assert traj["status"] == "ok" and tr["reward"] == 0.5 and len(tr["response_ids"]) <= 3
        assert traj["meta"]["process"]["exit_code"] == 0


@pytest.mark.parametrize("argv, message", [
    (["--agent", "no_such_module_xyz:fn"], "cannot import module 'no_such_module_xyz'"),
    (["--agent", "my_agents_mod:missing"], "module 'my_agents_mod' has no attribute 'missing'"),
    (["--agent", "my_agents_mod:NOT_CALLABLE"], "my_agents_mod.NOT_CALLABLE is a int, not callable"),
    (["--agent", "my_agents_mod"], "expects module:function"),
    (["--agent", "my_agents_mod:chatty", "--agent-cmd", "true"], "give one of"),
    (["--agent", "my_agents_mod:chatty", "--agent-option", "bogus=1"], "bogus"),
])
@pytest.mark.parametrize("command", ["train", "eval"])
def test_bad_agents_exit_2_naming_what_is_wrong(workdir, capsys, command, argv, message):
    code = main([command, "--model", "tiny", "--tasks", "tasks.jsonl", *argv]
                + (["--out", str(workdir / "bad")] if command == "train" else []))
    assert code == 2
    assert message in capsys.readouterr().err


def test_missing_or_bad_task_files_exit_2(workdir, capsys):
    assert main(["eval", "--model", "tiny", "--agent", "my_agents_mod:chatty"]) == 2
    assert "--agent needs --tasks" in capsys.readouterr().err
    (workdir / "bad.jsonl").write_text('{"q": "fine"}\n[1, 2]\n')
    assert main(["eval", "--model", "tiny", "--agent", "my_agents_mod:chatty",
                 "--tasks", "bad.jsonl"]) == 2
    assert "bad.jsonl:2: a task must be a JSON object" in capsys.readouterr().err


def test_a_rejection_run_times_out_a_hung_agent_with_the_runs_rollout_timeout(workdir):
    """Rejection rounds ignored ``ppo.rollout_timeout_s`` (and ``rollout_workers``): one hung
    rollout hung the run. Now it fails with reason timeout and the round goes on without it."""
    from lightning_lab.train.config import RunConfig
    from lightning_lab.train.run import run

    config = RunConfig(algorithm="rejection", model="tiny", agent="my_agents_mod:stuck_on_a",
                       tasks="tasks.jsonl", eval_limit=0, out=str(workdir / "rs"),
                       ppo={"rollout_timeout_s": 2, "rollout_workers": 4},
                       sft={"n": 2, "rounds": 1, "threshold": 0.5, "batch_size": 2})
    try:
        run(config, log=lambda _line: None)
    finally:
        sys.modules["my_agents_mod"].RELEASE.set()
    sampled = [json.loads(line) for line in (workdir / "rs" / "trajectories.jsonl").read_text().splitlines()]
    by_task = {t["task_id"]: [] for t in sampled}
    for t in sampled:
        by_task[t["task_id"]].append((t["status"], t["meta"].get("reason")))
    assert by_task["a"] == [("failed", "timeout")] * 2
    assert [status for status, _ in by_task["line3"]] == ["ok", "ok"]

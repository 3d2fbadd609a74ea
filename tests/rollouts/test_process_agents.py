"""Agents in other processes: Node.js, bash + curl and a Python script, trained through the proxy.

Each rollout starts the command with the rollout's traced URL in its environment; every way a child
can go wrong (non-zero exit, a bad reward line, no LLM call, a hang) must become a failed
trajectory with a reason while the rest of the step trains.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import pytest

import lightning_lab as ll

HERE = Path(__file__).resolve().parents[1] / "process_agents"


@pytest.fixture(scope="module")
def server(policy):
    with ll.serve(policy, default_max_tokens=8) as s:
        yield s


def train_one_step(policy, agent, tasks, **config):
    trainer = ll.PPOTrainer(policy, agent, tasks, config=ll.PPOConfig(
        tasks_per_step=len(tasks), group_size=2, minibatch_size=8, kl_coef=0.0, **config))
    before = [p.detach().clone() for p in policy.model.parameters() if p.requires_grad]
    state = trainer.step()
    after = [p for p in policy.model.parameters() if p.requires_grad]
    moved = max((a - b).abs().max().item() for a, b in zip(after, before))
    return state, moved


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_node_agent_trains_for_a_step(policy, server):
    agent = ll.process_agent(server, ["node", str(HERE / "agent.mjs")])
    tasks = [{"task_id": "n1", "q": "hello", "turns": 2}, {"task_id": "n2", "q": "bye", "turns": 1}]
    state, moved = train_one_step(policy, agent, tasks)
    batch = state.batch
    assert batch.n_failed == 0, [t.error for t in batch]
    assert sorted((t.task_id, len(t.transitions)) for t in batch) == [
        ("n1", 2), ("n1", 2), ("n2", 1), ("n2", 1)]
    for traj in batch:
        # JavaScript's String.length counts UTF-16 code units
        chars = sum(len(tr.response.encode("utf-16-le")) // 2 for tr in traj.transitions)
        assert traj.total_reward == pytest.approx(chars / 10)  # the reward it POSTed
        assert traj.meta["process"]["exit_code"] == 0
        assert "node agent done" in traj.meta["process"]["stdout_tail"]
        assert all(tr.meta["via"] == "http" and len(tr.logprobs) == len(tr.response_ids) > 0
                   for tr in traj.transitions)
    assert state.metrics["n_loss_transitions"] > 0 and moved > 0


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_bash_curl_agent_rewards_by_printing(server):
    agent = ll.process_agent(server, ["bash", str(HERE / "agent.sh")])
    batch = ll.run_rollouts(agent, [{"task_id": "b"}], group_size=2)
    assert batch.n_failed == 0, [t.error for t in batch]
    for traj in batch:
        (tr,) = traj.transitions
        assert tr.reward == 0.5 and 1 <= len(tr.response_ids) <= 3
        assert "model said" in traj.meta["process"]["stderr_tail"]


def test_python_process_agent_trains_and_failures_keep_the_step(policy, server):
    agent = ll.process_agent(server, [sys.executable, str(HERE / "agent.py")], timeout_s=60)
    tasks = [{"task_id": "ok", "q": "hi"}, {"task_id": "crash", "mode": "crash"},
             {"task_id": "garbage", "mode": "garbage", "q": "x"},
             {"task_id": "silent", "mode": "silent"}]
    state, moved = train_one_step(policy, agent, tasks)
    by_task = {}
    for traj in state.batch:
        by_task.setdefault(traj.task_id, []).append(traj)
    for traj in by_task["ok"]:
        (tr,) = traj.transitions
        assert traj.status == "ok" and traj.total_reward == len(tr.response)
    for traj in by_task["crash"]:
        assert traj.status == "failed" and traj.meta["reason"] == "exit_code"
        assert traj.meta["process"]["exit_code"] == 7
        assert "exited with code 7: something broke in the agent" in traj.error
    for traj in by_task["garbage"]:
        assert traj.status == "failed" and traj.meta["reason"] == "bad_reward"
        assert len(traj.transitions) == 1  # the call it made is kept for inspection
    for traj in by_task["silent"]:
        assert traj.status == "failed" and traj.meta["reason"] == "no_llm_calls"
    assert state.metrics["n_failed"] == 6 and moved > 0


def test_hung_process_is_killed_at_the_rollout_timeout(server):
    agent = ll.process_agent(server, [sys.executable, str(HERE / "agent.py")])
    start = time.monotonic()  # the timeout scales with this machine's speed, so load never fails it
    (warm,) = ll.run_rollouts(agent, [{"task_id": "ok", "q": "y"}])
    timeout_s = max(10.0, 5 * (time.monotonic() - start))
    assert warm.status == "ok"
    tasks = [{"task_id": "hang", "mode": "hang", "q": "x"}, {"task_id": "ok", "q": "y"}]
    batch = ll.run_rollouts(agent, tasks, timeout_s=timeout_s)
    hung, ok = batch
    assert hung.status == "failed" and hung.meta["reason"] == "timeout"
    assert ok.status == "ok" and len(ok.transitions) == 1


def test_own_timeout_and_missing_command(server):
    agent = ll.process_agent(server, ["sleep", "30"], timeout_s=0.5)
    (traj,) = ll.run_rollouts(agent, [{"task_id": "s"}])
    assert traj.meta["reason"] == "timeout" and traj.meta["process"]["exit_code"] == -9
    missing = ll.process_agent(server, ["/no/such/agent-binary"])
    (traj,) = ll.run_rollouts(missing, [{"task_id": "m"}])
    assert traj.meta["reason"] == "spawn" and "/no/such/agent-binary" in traj.error

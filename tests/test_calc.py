"""The ``calc`` environment: problems, the calculator tool, and its OpenAI-SDK agent through the proxy."""

from __future__ import annotations

import pytest

import lightning_lab as ll
from environments.calc import calculate, final_number, generate, load_tasks, summarize


def test_problems_are_exact_and_dev_is_unseen():
    train, dev = load_tasks("train"), load_tasks("dev")
    assert len(train) == 600 and 0 < len(dev) <= 60
    assert not {t.question for t in train} & {t.question for t in dev}
    for task in train[:60] + dev:
        assert calculate(task.expression) == str(task.answer)  # every division is exact
    assert {t.level for t in train} == {"easy", "medium", "hard"}
    assert [t.level for t in load_tasks("train", levels="easy", limit=5)] == ["easy"] * 5
    assert generate(3, seed=7) == generate(3, seed=7)
    with pytest.raises(ValueError, match="unknown levels"):
        load_tasks("train", levels="easy,impossible")


@pytest.mark.parametrize("expression, result", [
    ("12 * (3 + 4)", "84"), ("7 / 2", "3.5"), ("37 * 52 = 1900", "1924"), ("2 ^ 3", "8"),
    ("1 / 0", "error: division by zero"), ("", "error: empty expression"),
    ("__import__('os')", "error: unsupported syntax: Call"), ("2 ** 99", "error: exponent too large"),
])
def test_calculator_evaluates_arithmetic_only(expression, result):
    assert calculate(expression) == result


def test_final_number_reads_the_last_integer():
    assert final_number("The answer is 42.") == 42
    assert final_number("3 boxes of 7 make 21") == 21
    assert final_number("about 2.5") is None and final_number(None) is None


def test_agent_runs_the_sdk_tool_loop_through_the_proxy_and_trains(monkeypatch):
    """The env's agent, unchanged, on the tiny model: the forced first call is a constrained
    (valid) calculator call, the tool result is in the second call's prompt, rewards are paid and
    one PPO step runs on the two-call trajectories; greedy evaluation never forces a call."""
    import copy

    from environments.calc import agent as calc_agent

    # The random model would fill an unbounded string until max_tokens cuts the call; a length
    # bound in the schema lets the grammar close it (what the notebook's schema does too).
    tool = copy.deepcopy(calc_agent.TOOL)
    tool["function"]["parameters"]["properties"]["expression"]["pattern"] = "^[0-9+*/ -]{1,12}$"
    monkeypatch.setattr(calc_agent, "TOOL", tool)
    policy = ll.models.load("tiny", lora=True)
    env = ll.envs.get("calc")
    tasks = env.load_tasks("train", limit=2)
    agent = env.make_agent(policy, max_turns=2, required_fraction=1.0, call_tokens=48,
                           answer_tokens=8, tool_credit=0.5)
    try:
        trainer = ll.PPOTrainer(policy, agent, tasks, config=ll.PPOConfig(
            tasks_per_step=2, group_size=2, rollout_workers=4))
        state = trainer.step()
        assert state.metrics["n_failed"] == 0
        for traj in state.batch:
            assert traj.meta["first_tool_choice"] == "required" and traj.meta["first_call_valid"]
            assert len(traj.transitions) == 2
            first, second = traj.transitions
            assert first.meta.get("constrained") and first.meta["tool_calls"]
            # "length" when 48 tokens end inside a second, parallel call (dropped from the reply)
            assert first.finish_reason in ("tool_calls", "length")
            assert "<tool_response>" in second.prompt and second.prompt.startswith(first.prompt)
            expected = 1.0 if traj.meta["correct"] else 0.5 if traj.meta["computed"] else 0.0
            assert traj.total_reward == expected
        assert state.metrics["behaviour_logprob_err"] < 1e-4
        evaluated, summary = ll.evaluate(agent, tasks, summarize=summarize)
        assert all(t.meta["first_tool_choice"] == "auto" for t in evaluated)
        assert summary["n"] == 2 and 0.0 <= summary["valid_tool_call"] <= 1.0
    finally:
        agent.server.stop()

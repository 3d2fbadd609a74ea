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


NESTED_POWERS = [
    "(((((9**10)**10)**10)**10)**10)**10",  # 35 characters: 9**(10**6), ~954,000 digits
    "((((((9**10)**10)**10)**10)**10)**10)**10",  # 41: held a PPO step for 7.9 s
    "((((((((9**10)**10)**10)**10)**10)**10)**10)**10)**10",  # froze every thread for > 30 s
]


@pytest.mark.parametrize("expression", NESTED_POWERS)
def test_nested_powers_are_refused_before_any_huge_number_is_computed(expression, monkeypatch):
    """Big-int ``pow`` holds the GIL, so the bound must hold before an operation runs: every
    operand and result any operation sees stays within ``10 ** MAX_DIGITS``."""
    from environments.calc import calculator

    bound = 10 ** calculator.MAX_DIGITS
    seen: list[float] = []

    def bounded(op):
        def run(left, right):
            assert abs(left) <= bound and abs(right) <= bound, "a huge operand reached an operation"
            result = op(left, right)
            seen.append(abs(result))
            assert abs(result) <= bound, "an operation computed a huge number"
            return result
        return run

    monkeypatch.setattr(calculator, "_OPS", {k: bounded(op) for k, op in calculator._OPS.items()})
    result = calculate(expression)
    assert result.startswith("error:") and "too large" in result
    assert seen and max(seen) == 9 ** 100  # ((9**10)**10) is computed, the next power is not


def test_a_result_too_long_to_print_is_an_error_string_not_an_exception():
    """The 35-character form used to raise ``ValueError: Exceeds the limit (4300 digits)``
    out of ``calculate`` while printing its ~954,000-digit result."""
    assert calculate(NESTED_POWERS[0]) == "error: result too large (limit 1e100)"


@pytest.mark.parametrize("expression", [
    "9" * 101, "(10 ** 10) ** 10 * 10", "1e300 / 1e-300", "1e308 * 10", "1e999", "(-8) ** 0.5",
])
def test_results_beyond_the_bound_or_not_real_are_error_strings(expression):
    result = calculate(expression)
    assert isinstance(result, str) and result.startswith("error:"), result


@pytest.mark.parametrize("expression, result", [
    ("(10 ** 10) ** 10", "1" + "0" * 100), ("(9 ** 10) ** 10", str(9 ** 100)),  # at the bound
    ("-(2 ** 10) ** 3", str(-(2 ** 30))), ("2 ** -2", "0.25"),
    ("0 ** -1", "error: division by zero"), ("1e-300 * 1e-300", "0"), ("7 % 3 - 8 // 3", "-1"),
])
def test_large_and_ordinary_results_within_the_bound_still_work(expression, result):
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

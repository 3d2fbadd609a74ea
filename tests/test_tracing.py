import asyncio
import math
import threading
from types import SimpleNamespace

import pytest

import lightning_lab as ll
from lightning_lab.tracing import record_generation


def _call(text: str = "hi", n_tokens: int = 2) -> None:
    """Stand-in for a policy call: what Policy.generate hands to tracing."""
    record_generation(SimpleNamespace(prompt_ids=[1, 2], response_ids=list(range(n_tokens)),
                                      logprobs=[-1.0] * n_tokens, prompt_text="p", text=text,
                                      temperature=1.0, finish_reason="stop"))


def test_rollout_step_reward_attribution():
    with ll.rollout(task_id="t1") as traj:
        with ll.role("writer"):
            _call("a")
        ll.reward(0.5)
        with ll.role("checker"):
            _call("b")
            _call("c")
        ll.reward(1.0, final=True)
        _call("d")  # a call after the final reward: the final reward still lands on the last one
    assert [t.role for t in traj.transitions] == ["writer", "checker", "checker", "main"]  # default role
    assert [t.reward for t in traj.transitions] == [0.5, 0.0, 0.0, 1.0]
    assert [t.turn for t in traj.transitions] == [0, 1, 2, 3]
    assert traj.status == "ok"


def test_step_is_a_deprecated_alias_of_role():
    with ll.rollout(task_id="t1") as traj:
        with pytest.warns(DeprecationWarning, match=r"use ll.role\(name\)"):
            alias = ll.step("writer")
        with alias:
            _call("a")
        _call("b")
    assert isinstance(alias, ll.role)
    assert [t.role for t in traj.transitions] == ["writer", ll.tracing.DEFAULT_ROLE]


def test_calls_outside_rollout_are_not_recorded_and_reward_outside_raises():
    assert record_generation(SimpleNamespace()) is None
    with pytest.raises(ll.TracingError, match="no rollout is open"):
        ll.reward(1.0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, "1.0", None, True])
def test_reward_rejects_non_numbers(bad):
    with ll.rollout(task_id="t"):
        _call()
        with pytest.raises(ValueError, match="reward must be"):
            ll.reward(bad)


@pytest.mark.parametrize("rewards", [[math.nan, 1.0], [1.0, math.inf], [2e12, -2e12], [-3e12, 0.0]])
def test_rewards_set_directly_are_checked_when_the_rollout_ends(rewards):
    """Rewards written onto transitions without ``ll.reward`` (each unchecked) still fail the
    trajectory when one is non-finite or out of range, even if their sum is in range."""
    with ll.rollout(task_id="t") as traj:
        for value in rewards:
            _call()
            traj.transitions[-1].reward = value
    assert traj.status == "failed" and traj.error.startswith("RewardError")


def test_agent_exception_marks_trajectory_failed():
    with ll.rollout(task_id="t", catch=True) as traj:
        _call()
        raise RuntimeError("tool exploded")
    assert traj.status == "failed" and "tool exploded" in traj.error
    assert len(traj.transitions) == 1 and not traj.usable
    with pytest.raises(KeyError):
        with ll.rollout(task_id="t2") as traj2:
            raise KeyError("propagates without catch")
    assert traj2.status == "failed"


def test_rollout_without_llm_call_is_flagged():
    with ll.rollout(task_id="t") as traj:
        ll.reward(1.0, final=True)
    assert traj.meta["no_llm_calls"] and not traj.usable


def test_threads_do_not_mix_rollouts():
    results = {}

    def agent(i: int) -> None:
        with ll.rollout(task_id=f"t{i}") as traj:
            for k in range(50):
                with ll.role(f"role{i}"):
                    _call(f"{i}-{k}")
        results[i] = traj

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, traj in results.items():
        assert len(traj.transitions) == 50
        assert {t.role for t in traj.transitions} == {f"role{i}"}
        assert [t.response for t in traj.transitions] == [f"{i}-{k}" for k in range(50)]


def test_asyncio_tasks_do_not_mix_rollouts():
    async def agent(i: int) -> ll.Trajectory:
        with ll.rollout(task_id=f"t{i}") as traj:
            for k in range(5):
                with ll.role(f"r{i}"):
                    await asyncio.sleep(0)
                    _call(f"{i}-{k}")
        return traj

    async def main():
        return await asyncio.gather(*(agent(i) for i in range(10)))

    for i, traj in enumerate(asyncio.run(main())):
        assert [t.response for t in traj.transitions] == [f"{i}-{k}" for k in range(5)]
        assert {t.role for t in traj.transitions} == {f"r{i}"}


def test_decorator_form_returns_result_and_trajectory():
    @ll.traced
    def agent(task):
        with ll.role("solo"):
            _call()
        ll.reward(2.0)
        return "done"

    result, traj = agent(SimpleNamespace(task_id="abc"))
    assert result == "done" and traj.task_id == "abc" and traj.total_reward == 2.0


def test_recorded_transition_carries_every_generation_field():
    """``record_generation`` builds the Transition positionally (it is the hot path): each field
    must land where it belongs."""
    gen = SimpleNamespace(prompt_ids=[1, 2, 3], response_ids=[4, 5], logprobs=[-0.1, -0.2],
                          prompt_text="the prompt", text="the text", temperature=0.7,
                          finish_reason="length")
    with ll.rollout(task_id="t") as traj:
        ll.reward(0.25)  # before any call: pending, lands on the first transition
        with ll.role("writer"):
            record_generation(gen)
            record_generation(gen)
    first, second = traj.transitions
    expected = dict(prompt_ids=[1, 2, 3], response_ids=[4, 5], logprobs=[-0.1, -0.2],
                    prompt="the prompt", response="the text", role="writer", temperature=0.7,
                    finish_reason="length", meta={}, ret=None, advantage=None, value=None)
    for tr, turn, reward in ((first, 0, 0.25), (second, 1, 0.0)):
        assert {k: getattr(tr, k) for k in expected} == expected
        assert (tr.turn, tr.reward) == (turn, reward)


def test_greedy_generation_records_temperature_zero():
    """A greedy call (temperature 0) is recorded as 0, not as 1.0: the record says how it was
    sampled; its logprobs are of the T=1 distribution, which scoring reads 0 as."""
    gen = SimpleNamespace(prompt_ids=[1], response_ids=[2], logprobs=[-0.5], prompt_text="p",
                          text="t", temperature=0.0, finish_reason="stop")
    with ll.rollout(task_id="t", temperature=0) as traj:
        record_generation(gen)
    assert traj.transitions[0].temperature == 0.0

"""Async agents and rollout timeouts: awaited, traced per task, cancelled at the deadline.

``async def`` agents (``policy.achat``, ``openai.AsyncOpenAI``, the OpenAI Agents SDK) run as tasks
on one event loop; a rollout past ``timeout_s`` fails with reason ``timeout``, its in-flight engine
requests leave the batch, and the rest of the step is untouched.
"""

from __future__ import annotations

import asyncio
import threading
import time

import openai
import pytest

import lightning_lab as ll

HANG_S = 2.0
"""Rollout timeout of the hang tests on a quiet machine; ``hang_s`` scales it up on a loaded one.
The hung agents call the model in a loop that only the timeout ends: one long call alone (1500
tokens, ~3 s here) can finish first on a faster CPU or when the random model samples EOS."""


@pytest.fixture(scope="module")
def policy():
    p = ll.models.load("tiny", lora=True)
    p.chat("warm up", max_new_tokens=2)  # the first forward is slow; keep it out of timed rollouts
    yield p
    p.close()


@pytest.fixture(scope="module")
def hang_s(policy):
    """The timeout, scaled to this machine: 10x what a batch of the finishing rollouts takes now
    (so a CPU shared with other jobs makes the test slower, never flaky)."""
    start = time.monotonic()
    ll.run_rollouts(lambda task: policy.chat("measure", max_new_tokens=4), [{}] * 4)
    return max(HANG_S, 10 * (time.monotonic() - start))


@pytest.fixture(scope="module")
def server(policy):
    with ll.serve(policy, default_max_tokens=8) as s:
        yield s


def wait_until(predicate, limit_s: float = 60.0) -> bool:
    """Poll ``predicate`` until true; ``limit_s`` is only a safety limit for a loaded machine."""
    deadline = time.monotonic() + limit_s
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.02)
    return predicate()


def test_async_agent_trains_for_a_step_with_its_roles(policy):
    async def agent(task):
        with ll.role("planner"):
            plan = await policy.achat(task["q"], max_new_tokens=4)
        with ll.role("writer"):  # two concurrent calls inside one rollout, one role each
            await asyncio.gather(policy.achat(plan, max_new_tokens=4),
                                 policy.achat(task["q"], max_new_tokens=3))
        tr = ll.current().transitions[0]
        ll.reward(sum(t % 3 == 0 for t in tr.response_ids) / len(tr.response_ids), final=True)

    tasks = [{"task_id": f"t{i}", "q": f"question {i}"} for i in range(3)]
    trainer = ll.PPOTrainer(policy, agent, tasks, config=ll.PPOConfig(
        tasks_per_step=3, group_size=2, minibatch_size=8, kl_coef=0.0))
    before = [p.detach().clone() for p in policy.model.parameters() if p.requires_grad]
    state = trainer.step()
    batch = state.batch
    assert batch.n_failed == 0 and len(batch) == 6
    for traj in batch:
        assert [t.role for t in traj.transitions[:1]] == ["planner"]
        assert sorted(t.role for t in traj.transitions[1:]) == ["writer", "writer"]
        assert [t.turn for t in traj.transitions] == [0, 1, 2]
        assert all(len(t.logprobs) == len(t.response_ids) > 0 for t in traj.transitions)
    assert state.metrics["n_no_llm_calls"] == 0 and state.metrics["n_transitions"] == 18
    after = [p for p in policy.model.parameters() if p.requires_grad]
    assert max((a - b).abs().max().item() for a, b in zip(after, before)) > 0


def test_tasks_spawned_inside_a_rollout_stay_in_it(policy):
    """create_task copies the context: sub-tasks record into their rollout, never a neighbour's."""

    async def agent(task):
        async def helper(k):
            with ll.role(f"helper{k}"):
                await asyncio.sleep(0.001 * k)
                return await policy.achat(f"{task['q']} {k}", max_new_tokens=2)

        await asyncio.gather(*(asyncio.create_task(helper(k)) for k in range(3)))
        ll.current().meta["q"] = task["q"]

    batch = ll.run_rollouts(agent, [{"task_id": str(i), "q": f"q{i}"} for i in range(8)])
    for i, traj in enumerate(batch):
        assert traj.task_id == str(i) and traj.meta["q"] == f"q{i}"
        assert sorted(t.role for t in traj.transitions) == ["helper0", "helper1", "helper2"]
        assert all(t.prompt.count(f"q{i} ") == 1 for t in traj.transitions)


def test_async_openai_sdk_agent_via_http_agent(policy, server):
    async def sdk_agent(task, base_url):
        client = openai.AsyncOpenAI(base_url=base_url, api_key="-", max_retries=0)
        first, second = await asyncio.gather(*(client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": task["q"]}], max_tokens=3)
            for _ in range(2)))
        ll.reward(float(len(first.choices[0].message.content)))

    agent = ll.proxy.http_agent(server, sdk_agent)
    assert asyncio.iscoroutinefunction(agent)
    batch = ll.run_rollouts(agent, [{"task_id": "a", "q": "hi"}, {"task_id": "b", "q": "yo"}],
                            group_size=2)
    assert batch.n_failed == 0
    assert [len(t.transitions) for t in batch] == [2, 2, 2, 2]
    assert all(t.transitions[0].meta["via"] == "http" for t in batch)


def test_a_returned_coroutine_is_an_error_not_an_empty_batch(policy):
    async def real(task):
        await policy.achat("x", max_new_tokens=2)

    def forgets_to_await(task):
        return real(task)

    batch = ll.run_rollouts(forgets_to_await, [{"task_id": "x"}])
    assert batch[0].status == "failed" and "async def" in batch[0].error
    with pytest.raises(RuntimeError, match="async def"):
        ll.PPOTrainer(policy, forgets_to_await, [{"task_id": "x"}],
                      config=ll.PPOConfig(tasks_per_step=1, group_size=1)).step()


@pytest.mark.parametrize("kind", ["async", "thread"])
def test_hung_rollout_times_out_and_leaves_the_engine_batch(policy, hang_s, kind):
    aborted = policy.engine.aborted_rows
    released = threading.Event()

    async def async_agent(task):
        await policy.achat(task["q"], max_new_tokens=2)
        while task["q"] == "hang":
            await policy.achat("long", max_new_tokens=1500, stop=["\x00never"])
        ll.reward(1.0)

    def thread_agent(task):
        policy.chat(task["q"], max_new_tokens=2)
        try:
            while task["q"] == "hang":
                policy.chat("long", max_new_tokens=1500, stop=["\x00never"])
        except ll.RolloutCancelled:
            released.set()
            raise
        ll.reward(1.0)

    agent = async_agent if kind == "async" else thread_agent
    tasks = [{"task_id": "a", "q": "a"}, {"task_id": "hang", "q": "hang"}, {"task_id": "b", "q": "b"}]
    batch = ll.run_rollouts(agent, tasks, timeout_s=hang_s)
    a, hung, b = batch
    assert hung.status == "failed" and hung.meta["reason"] == "timeout" and "timeout" in hung.error
    # the calls that finished are kept; the one cut off by the timeout never landed
    assert hung.transitions and all(t.finish_reason != "abort" for t in hung.transitions)
    assert a.status == b.status == "ok" and a.total_reward == b.total_reward == 1.0
    assert wait_until(lambda: policy.engine.aborted_rows == aborted + 1)
    assert wait_until(lambda: policy.engine.active_rows == 0)
    if kind == "thread":  # the stuck thread got RolloutCancelled from its pending call
        assert released.wait(10)
    policy.chat("still serving", max_new_tokens=2)


def test_timeouts_in_training_and_evaluation(policy, hang_s):
    async def agent(task):
        await policy.achat(task["q"], max_new_tokens=3)
        if task["q"] == "sleep":
            await asyncio.Event().wait()  # hangs without any LLM call in flight
        ll.reward(float(len(ll.current().transitions[0].response)))

    tasks = [{"task_id": "ok", "q": "fine"}, {"task_id": "sleep", "q": "sleep"}]
    batch, metrics = ll.evaluate(agent, tasks, timeout_s=hang_s)
    assert metrics["n_timeout"] == 1 and metrics["n_failed"] == 1
    assert [t.meta.get("reason") for t in batch] == [None, "timeout"]


def test_http_agent_call_is_cancelled_at_the_timeout(policy, server, hang_s):
    aborted = server.backend.aborted
    statuses = []

    def sdk_agent(task, base_url):
        client = openai.OpenAI(base_url=base_url, api_key="-", max_retries=0, timeout=60)
        try:
            for _ in range(task["calls"]):
                client.chat.completions.create(model="tiny", max_tokens=task["max_tokens"],
                                               stop=["\x00never"],
                                               messages=[{"role": "user", "content": "x"}])
        except openai.APIStatusError as exc:
            statuses.append((exc.status_code, exc.body["code"]))
            raise

    agent = ll.proxy.http_agent(server, sdk_agent)
    batch = ll.run_rollouts(agent, [{"task_id": "long", "max_tokens": 1500, "calls": 10**6},
                                    {"task_id": "short", "max_tokens": 2, "calls": 1}], timeout_s=hang_s)
    long, short = batch
    assert long.meta["reason"] == "timeout" and short.status == "ok"
    assert wait_until(lambda: statuses == [(408, "rollout_cancelled")])
    assert server.backend.aborted == aborted + 1 and wait_until(lambda: policy.engine.active_rows == 0)


def test_trainer_step_goes_on_without_the_timed_out_rollouts(policy, hang_s):
    def agent(task):
        text = policy.chat(task["q"], max_new_tokens=4)
        if task["q"] == "hang":
            threading.Event().wait()  # a blocking agent that never returns
        ll.reward(float(len(text)))

    tasks = [{"task_id": "ok", "q": "fine"}, {"task_id": "hang", "q": "hang"}]
    trainer = ll.PPOTrainer(policy, agent, tasks, config=ll.PPOConfig(
        tasks_per_step=2, group_size=2, minibatch_size=4, kl_coef=0.0, rollout_timeout_s=hang_s))
    state = trainer.step()
    m = state.metrics
    assert m["n_timeout"] == 2 and m["n_failed"] == 2
    hung = [t for t in state.batch if t.task_id == "hang"]
    assert all(t.meta["reason"] == "timeout" and not t.usable for t in hung)
    assert m["n_loss_transitions"] == 2  # both finished rollouts trained
    with pytest.raises(ll.train.config.ConfigError):
        ll.PPOConfig(rollout_timeout_s=0)


def test_concurrent_calls_in_one_seeded_rollout_draw_different_samples(policy, server):
    """A fan-out agent inside a seeded (trainer) rollout: its concurrent calls all start before any
    is recorded, so a seed taken from the transition count gave all of them one seed and 8 copies
    of one sample. Each started call now takes its own seed; sequential calls keep theirs."""
    async def fan_out(task):
        return await asyncio.gather(*(policy.achat("same prompt", max_new_tokens=12, temperature=1.0)
                                      for _ in range(8)))

    async def run_in_rollout(agent):
        with ll.rollout("t", seed=123) as traj:
            replies = await agent({})
        return traj, replies

    traj, replies = asyncio.run(run_in_rollout(fan_out))
    assert len(traj.transitions) == 8
    assert len({tuple(t.response_ids) for t in traj.transitions}) >= 6  # 8 draws of 12 random tokens

    async def http_fan_out(task):  # the same through the proxy, as a trainer's rollout runs it
        with server.rollout() as handle:
            async with openai.AsyncOpenAI(base_url=handle.base_url, api_key="x") as client:
                return await asyncio.gather(*(client.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": "same prompt"}],
                    max_tokens=12, temperature=1.0) for _ in range(8)))

    http_traj, _ = asyncio.run(run_in_rollout(http_fan_out))
    assert len(http_traj.transitions) == 8
    assert len({tuple(t.response_ids) for t in http_traj.transitions}) >= 6

    async def sequential(task):
        return [await policy.achat("same prompt", max_new_tokens=12, temperature=1.0) for _ in range(3)]

    first, again = (asyncio.run(run_in_rollout(sequential))[0] for _ in range(2))
    assert [t.response_ids for t in first.transitions] == [t.response_ids for t in again.transitions]

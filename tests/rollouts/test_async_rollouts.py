"""Asynchronous rollouts with bounded staleness (``PPOConfig.max_staleness``) on the tiny model:
the lag each transition records, the decoder's private weights, checkpoints that discard the
prefetch, and learning."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import lightning_lab as ll
from lightning_lab.inference.engine import Request
from lightning_lab.inference.sampling import SamplingParams
from shared_agents import parity_agent

TASKS = [{"task_id": f"t{i}", "q": f"Question number {i} " + "word " * i} for i in range(8)]


def cfg(**kw) -> ll.PPOConfig:
    base = dict(tasks_per_step=4, group_size=4, lr=3e-3, minibatch_size=16, kl_coef=0.02,
                rollout_workers=4, seed=3)
    base.update(kw)
    return ll.PPOConfig(**base)


def task_ids(state) -> list[str]:
    return [t.task_id for t in state.batch.trajectories]


def lags(state) -> set[int]:
    return {tr.meta["lag"] for _, tr in state.batch.transitions()}


def versions(state) -> set[int]:
    return {tr.meta["adapter_version"] for _, tr in state.batch.transitions()}


def test_synchronous_step_takes_no_snapshot_and_records_lag_zero(tiny):
    trainer = ll.PPOTrainer(tiny, parity_agent(tiny), TASKS, config=cfg())
    states = trainer.fit(2, progress=False)
    assert tiny.engine.snapshot is None and trainer._prefetch is None
    assert [lags(s) for s in states] == [{0}, {0}]
    assert [versions(s) for s in states] == [{0}, {1}]
    assert states[-1].metrics["staleness_mean"] == 0.0 == states[-1].metrics["staleness_max"]
    assert not trainer.recompute_logprobs  # fp32 sampler and update, no staleness


def test_prefetched_rollouts_are_one_version_old_on_the_same_tasks(tiny):
    policy = ll.models.load("tiny", seed=0)
    sync_states = ll.PPOTrainer(policy, parity_agent(policy), TASKS, config=cfg()).fit(3, progress=False)
    trainer = ll.PPOTrainer(tiny, parity_agent(tiny), TASKS, config=cfg(max_staleness=1))
    states = trainer.fit(3, progress=False)
    assert trainer.recompute_logprobs  # truncated importance weights correct the lag
    assert [lags(s) for s in states] == [{0}, {1}, {1}]
    assert [versions(s) for s in states] == [{0}, {0}, {1}]  # step k+1 sampled by version k-1
    assert [(s.metrics["staleness_mean"], s.metrics["staleness_max"]) for s in states] == [
        (0.0, 0.0), (1.0, 1.0), (1.0, 1.0)]
    assert "is_weight_mean" in states[-1].metrics
    # the same tasks, seeds and group ids per step as the synchronous run
    assert [task_ids(s) for s in states] == [task_ids(s) for s in sync_states]
    assert [t.group_id for t in states[-1].batch.trajectories] == [
        t.group_id for t in sync_states[-1].batch.trajectories]
    # step 4's rollouts sample during step 3's update, by the weights it started from
    assert trainer._prefetch is not None and trainer._prefetch.version == 2
    assert tiny.engine.snapshot.version == 2


def _sample(engine, seed: int, on_token=None) -> list[int]:
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=seed)
    [[sample]] = engine.generate([Request([1, 5, 9, 14, 20], params, on_token=on_token)])
    return sample.response_ids


def test_decoder_snapshot_is_private_and_ignores_the_live_weights(tiny_lora):
    engine = tiny_lora.engine
    live = {n: p for n, p in tiny_lora.model.named_parameters()}
    lora_b = [p for n, p in live.items() if "lora_B" in n]
    engine.snapshot_weights(0)
    copy = dict(engine.snapshot.model.named_parameters())
    assert all(copy[n].data_ptr() != p.data_ptr() for n, p in live.items() if p.requires_grad)
    assert all(copy[n].data_ptr() == p.data_ptr() for n, p in live.items() if not p.requires_grad)
    before = _sample(engine, seed=5)

    def move_live_weights(row) -> None:  # the optimizer writing while the decoder samples
        with torch.no_grad():
            for p in lora_b:
                p.add_(0.5)

    during = _sample(engine, seed=5, on_token=move_live_weights)
    after = _sample(engine, seed=5)
    assert during == before == after  # the live adapter moved by 12 * 0.5 per entry meanwhile
    engine.snapshot_weights(1)
    assert engine.snapshot.version == 1
    assert all(torch.equal(copy[n], p) for n, p in live.items())
    assert _sample(engine, seed=5) != before  # the refreshed copy decodes the moved weights


def test_checkpoint_discards_the_prefetch_and_resume_samples_its_tasks_anew(tmp_path):
    policy = ll.models.load("tiny", seed=0)
    straight = ll.PPOTrainer(policy, parity_agent(policy), TASKS, config=cfg(max_staleness=1))
    straight.fit(2, progress=False)
    straight.save(tmp_path / "ckpt")  # step 3's rollouts are in flight: not saved
    expected = straight.step()
    assert lags(expected) == {1}

    policy = ll.models.load("tiny", seed=0)
    resumed = ll.PPOTrainer.load(tmp_path / "ckpt", policy, parity_agent(policy), TASKS)
    assert resumed.iteration == 2 and resumed._prefetch is None
    got = resumed.step()
    assert task_ids(got) == task_ids(expected)  # the discarded prefetch's tasks, sampled anew
    assert [t.group_id for t in got.batch.trajectories] == [
        t.group_id for t in expected.batch.trajectories]  # and the same step's seeds
    assert lags(got) == {0} and versions(got) == {2}  # by the checkpoint's own weights
    assert resumed.step().metrics["staleness_max"] == 1.0  # prefetching again


def test_settle_discards_the_prefetch_and_decodes_the_current_weights(tiny):
    policy = ll.models.load("tiny", seed=0)
    sync_states = ll.PPOTrainer(policy, parity_agent(policy), TASKS, config=cfg()).fit(2, progress=False)
    trainer = ll.PPOTrainer(tiny, parity_agent(tiny), TASKS, config=cfg(max_staleness=1))
    trainer.step()
    trainer.settle()
    assert trainer._prefetch is None and tiny.engine.snapshot.version == 1
    second = trainer.step()
    assert lags(second) == {0} and task_ids(second) == task_ids(sync_states[1])


def test_sync_slower_than_the_staleness_bound_is_refused(tiny):
    slow = SimpleNamespace(config=SimpleNamespace(every=2))
    trainer = ll.PPOTrainer(tiny, parity_agent(tiny), TASKS, config=cfg(max_staleness=1), sync=slow)
    with pytest.raises(ValueError, match=r"max_staleness=1 .*every 2 steps \(SyncConfig.every\)"):
        trainer.step()
    assert trainer.iteration == 0


def test_reward_rises_with_one_step_of_staleness(tiny):
    config = cfg(tasks_per_step=4, group_size=8, minibatch_size=32, max_staleness=1, seed=0,
                 rollout_workers=32)
    trainer = ll.PPOTrainer(tiny, parity_agent(tiny), TASKS, config=config)
    states = trainer.fit(12, progress=False)
    first = sum(s.metrics["reward_mean"] for s in states[:3]) / 3
    last = sum(s.metrics["reward_mean"] for s in states[-3:]) / 3
    assert last > first + 0.3, [round(s.metrics["reward_mean"], 3) for s in states]
    assert all(s.metrics["staleness_max"] == 1.0 for s in states[1:])

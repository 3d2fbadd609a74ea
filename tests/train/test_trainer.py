"""End-to-end PPO on the tiny model: learning, faults, logprob fidelity, checkpoints."""

from __future__ import annotations

import pytest
import torch

import lightning_lab as ll
from shared_agents import parity_agent
from lightning_lab.train.checkpoint import CheckpointError

TASKS = [{"task_id": f"t{i}", "q": f"Question number {i} " + "word " * i} for i in range(8)]


def cfg(**kw) -> ll.PPOConfig:
    base = dict(tasks_per_step=4, group_size=8, lr=3e-3, minibatch_size=32, kl_coef=0.02)
    base.update(kw)
    return ll.PPOConfig(**base)


def test_reward_rises_on_tiny_model(tiny):
    trainer = ll.PPOTrainer(tiny, parity_agent(tiny), TASKS, credit="uniform", config=cfg())
    states = trainer.fit(12, progress=False)
    first = sum(s.metrics["reward_mean"] for s in states[:3]) / 3
    last = sum(s.metrics["reward_mean"] for s in states[-3:]) / 3
    assert last > first + 0.3, [round(s.metrics["reward_mean"], 3) for s in states]
    m = states[-1].metrics
    for key in ("reward_mean", "reward_std", "kl", "clip_frac", "policy_loss", "entropy", "grad_norm",
                "tokens_per_s", "rollout_s", "update_s", "n_failed", "prefix_hit_rate"):
        assert key in m
    assert m["kl"] > 0 and m["n_failed"] == 0
    assert m["prefix_hit_rate"] > 0.5  # a group's 8 rows share one prompt


def test_recorded_logprobs_match_trainer_forward(tiny):
    """The classic silent PPO bug: sampling and training must score tokens identically."""
    batch = ll.run_rollouts(parity_agent(tiny, max_new_tokens=10), TASKS, group_size=3, temperature=0.7)
    trainer = ll.PPOTrainer(tiny, parity_agent(tiny), TASKS, config=cfg())
    rows = [tr for _, tr in batch.transitions()]
    assert len({len(tr.prompt_ids) for tr in rows}) > 4  # different prompt lengths -> padding
    with torch.no_grad():
        fwd = trainer.scorer.forward(rows, grad=False)
    recorded = torch.tensor([x for tr in rows for x in tr.logprobs])
    assert (fwd.logprobs - recorded).abs().max().item() < 1e-4
    assert all(tr.temperature == 0.7 for tr in rows)


def test_value_credit_trains_critic_and_recompute_swaps_strategy(tiny):
    trainer = ll.PPOTrainer(tiny, parity_agent(tiny), TASKS, credit=ll.credit.get("value", gamma=1.0, lam=1.0),
                            config=cfg(ppo_epochs=2))
    s1 = trainer.step()
    assert "value_loss" in s1.metrics and s1.metrics["behaviour_logprob_err"] < 1e-4
    assert all(tr.value is not None for _, tr in s1.batch.transitions())
    losses = [trainer.step().metrics["value_loss"] for _ in range(4)]
    assert losses[-1] < s1.metrics["value_loss"]

    uni = s1.recompute("uniform", baseline=None)
    # the copy has uniform returns; the original state keeps GAE advantages
    for (t_new, tr_new), (_, tr_old) in zip(uni.batch.transitions(), s1.batch.transitions()):
        assert tr_new.ret == t_new.total_reward
        assert tr_new is not tr_old
    assert uni.credit.name == "uniform" and s1.credit.name == "value"


def test_value_loss_is_a_transition_mean_logged_as_optimised(tiny):
    """Two transitions of 1 and 3 response tokens, returns 2 and 1, scored in separate forwards
    (a 6-token budget). The critic starts at V=0, so the value loss is 0.5 * (2^2 + 1^2) / 2 =
    1.25 per transition (a token-weighted log would say 0.5 * (1*4 + 3*1) / 4 = 0.875), and the
    gradient of value_coef * it on the head's output bias is 0.5 * mean(0 - G) = -0.75."""
    from lightning_lab.records import Batch, Trajectory, Transition

    def traj(response, reward):
        return Trajectory(task_id="t", transitions=[Transition(
            prompt_ids=[1, 2, 3 + len(response)], response_ids=response,
            logprobs=[-1.0] * len(response), reward=reward)])

    batch = Batch([traj([5], 2.0), traj([6, 7, 8], 1.0)])
    config = cfg(lr=0.0, value_lr=0.0, kl_coef=0.0, value_coef=0.5, max_tokens_per_forward=6)
    trainer = ll.PPOTrainer(tiny, parity_agent(tiny), TASKS, config=config,
                            credit=ll.credit.get("value", gamma=1.0, lam=1.0))
    state = trainer.learn(batch)
    assert [tr.ret for _, tr in state.batch.transitions()] == [2.0, 1.0]
    assert state.metrics["value_loss"] == pytest.approx(1.25, rel=1e-6)
    bias_grad = trainer.critic.net[-1].bias.grad
    assert float(bias_grad) == pytest.approx(-0.75, rel=1e-6)


def test_failed_rollouts_are_counted_and_skipped(tiny):
    inner = parity_agent(tiny)

    def flaky(task):
        inner(task)
        if task["task_id"] in ("t0", "t1", "t2", "t3", "t4"):
            raise RuntimeError(f"tool crashed on {task['task_id']}")

    trainer = ll.PPOTrainer(tiny, flaky, TASKS, config=cfg(tasks_per_step=8, group_size=2))
    state = trainer.step()
    assert state.metrics["n_failed"] == 10
    failed = [t for t in state.batch if t.status == "failed"]
    assert all("tool crashed" in t.error for t in failed)
    assert all(tr.advantage is None for t in failed for tr in t.transitions)
    assert state.metrics["n_loss_transitions"] <= 3 * 2 * 2


def test_all_failed_raises_naming_first_error(tiny):
    def broken(task):
        raise ValueError("no database for " + task["task_id"])

    trainer = ll.PPOTrainer(tiny, broken, TASKS, config=cfg(group_size=1))
    with pytest.raises(RuntimeError, match="all 4 rollouts failed; first error: ValueError: no database"):
        trainer.step()


def test_rollout_without_llm_calls_is_flagged_and_skipped(tiny):
    inner = parity_agent(tiny)

    def sometimes_silent(task):
        if task["task_id"] == "t0":
            ll.reward(1.0, final=True)
            return
        inner(task)

    trainer = ll.PPOTrainer(tiny, sometimes_silent, TASKS, config=cfg(tasks_per_step=8, group_size=2))
    state = trainer.step()
    assert state.metrics["n_no_llm_calls"] == 2
    silent = [t for t in state.batch if t.task_id == "t0"]
    assert all(t.meta["no_llm_calls"] and not t.transitions for t in silent)


def test_trainable_roles_limits_the_loss(tiny):
    trainer = ll.PPOTrainer(tiny, parity_agent(tiny), TASKS,
                            config=cfg(trainable_roles=("b",), skip_zero_advantage=False))
    state = trainer.step()
    assert state.metrics["n_loss_transitions"] == 4 * 8  # one "b" call per rollout
    assert {key[1] for key in state.ratios} == {1}


def test_lora_reference_is_adapter_off(tiny_lora):
    trainer = ll.PPOTrainer(tiny_lora, parity_agent(tiny_lora), TASKS, config=cfg(lr=1e-2, minibatch_size=64))
    first = trainer.step().metrics
    assert first["kl"] < 1e-6  # LoRA starts as a no-op: policy == reference on the first minibatch
    assert trainer.scorer.ref_model is None  # no copy of the model was made
    later = [trainer.step().metrics["kl"] for _ in range(2)]
    assert later[-1] > 1e-5


def _fresh(seed=0):
    return ll.models.load("tiny", seed=seed)


def test_resume_reproduces_uninterrupted_run(tmp_path):
    config = cfg(rollout_workers=1, seed=3)
    keys = ("reward_mean", "policy_loss", "kl", "clip_frac", "entropy", "grad_norm")

    policy = _fresh()
    straight = ll.PPOTrainer(policy, parity_agent(policy), TASKS, config=config)
    straight.fit(2, progress=False)
    expected = straight.step().metrics

    policy = _fresh()
    first = ll.PPOTrainer(policy, parity_agent(policy), TASKS, config=config)
    first.fit(2, progress=False)
    first.save(tmp_path / "ckpt")

    policy = _fresh()  # the same base model; trained weights, optimizer and RNG come from the checkpoint
    resumed = ll.PPOTrainer.load(tmp_path / "ckpt", policy, parity_agent(policy), TASKS)
    assert resumed.iteration == 2
    got = resumed.step().metrics
    assert {k: got[k] for k in keys} == {k: expected[k] for k in keys}


def test_load_takes_the_process_group_and_the_adapter_sync(tmp_path, tiny):
    """What a checkpoint does not hold comes from the caller, as for the constructor."""
    from lightning_lab.train.distributed import DataParallel

    trainer = ll.PPOTrainer(tiny, parity_agent(tiny), TASKS, config=cfg(group_size=2))
    trainer.step()
    trainer.save(tmp_path / "ckpt")
    parallel, sync = DataParallel(rank=0, world_size=1), object()
    resumed = ll.PPOTrainer.load(tmp_path / "ckpt", tiny, parity_agent(tiny), TASKS,
                                 parallel=parallel, sync=sync)
    assert resumed.parallel is parallel and resumed.sync is sync and resumed.iteration == 1


def test_half_written_and_incompatible_checkpoints(tmp_path, tiny, tiny_lora):
    trainer = ll.PPOTrainer(tiny, parity_agent(tiny), TASKS, config=cfg(group_size=2))
    trainer.step()
    good = trainer.save(tmp_path / "ckpt")
    # a crash mid-write leaves a temp dir and never moves LATEST
    (tmp_path / "ckpt" / ".step-000002.tmp-x").mkdir()
    (tmp_path / "ckpt" / "step-000009").mkdir()
    assert (tmp_path / "ckpt" / "LATEST").read_text() == good.name
    with pytest.raises(CheckpointError, match="half-written"):
        ll.PPOTrainer.load(tmp_path / "ckpt" / "step-000009", tiny, parity_agent(tiny), TASKS)
    with pytest.raises(CheckpointError, match="does not fit this policy"):
        ll.PPOTrainer.load(tmp_path / "ckpt", tiny_lora, parity_agent(tiny_lora), TASKS)
    assert ll.PPOTrainer.load(tmp_path / "ckpt", tiny, parity_agent(tiny), TASKS).iteration == 1


def test_a_checkpoint_saving_the_old_key_trainable_agents_still_loads(tmp_path, tiny):
    """Checkpoints of the version before "role": their config says ``trainable_agents``."""
    trainer = ll.PPOTrainer(tiny, parity_agent(tiny), TASKS,
                            config=cfg(group_size=2, trainable_roles=("b",)))
    trainer.step()
    state_file = trainer.save(tmp_path / "ckpt") / "state.pt"
    state = torch.load(state_file, weights_only=True)
    state["config"]["trainable_agents"] = state["config"].pop("trainable_roles")
    torch.save(state, state_file)
    with pytest.warns(FutureWarning, match="'trainable_agents' is deprecated"):
        resumed = ll.PPOTrainer.load(tmp_path / "ckpt", tiny, parity_agent(tiny), TASKS)
    assert resumed.config.trainable_roles == ("b",) and resumed.iteration == 1


def test_keep_last_prunes_old_checkpoints_only_after_the_new_one_lands(tmp_path, tiny):
    trainer = ll.PPOTrainer(tiny, parity_agent(tiny), TASKS, config=cfg(group_size=2))
    ckpt = tmp_path / "ckpt"
    (ckpt / ".step-000003.tmp-x").mkdir(parents=True)  # a crashed write is not a checkpoint
    for _ in range(4):
        trainer.step()
        last = trainer.save(ckpt, keep_last=2)
    assert sorted(p.name for p in ckpt.glob("step-*")) == ["step-000003", "step-000004"]
    assert (ckpt / "LATEST").read_text() == last.name == "step-000004"
    assert ll.PPOTrainer.load(ckpt, tiny, parity_agent(tiny), TASKS).iteration == 4
    trainer.save(ckpt)  # no keep_last: nothing is deleted
    assert len(list(ckpt.glob("step-*"))) == 2
    with pytest.raises(ValueError, match="keep_last"):
        trainer.save(ckpt, keep_last=0)


def test_callbacks_receive_states_and_failures_do_not_stop_training(tiny):
    seen = []

    def broken(state):
        raise ConnectionError("wandb down")

    trainer = ll.PPOTrainer(tiny, parity_agent(tiny), TASKS, config=cfg(group_size=2),
                            callbacks=[seen.append, broken])
    with pytest.warns(UserWarning, match="wandb down"):
        trainer.step()
    assert len(seen) == 1 and isinstance(seen[0], ll.StepState)


def test_micro_batches_put_rows_of_one_schema_together():
    """Sorted by prompt, two schemas' questions (interleaved in the minibatch) each fit one
    forward when their prefix counts once; unshared, every row needs its own."""
    from lightning_lab.records import Transition
    from lightning_lab.train.update import micro_batches

    schemas = [list(range(100, 140)), list(range(200, 240))]
    rows = [Transition(prompt_ids=schemas[i % 2] + [i], response_ids=[1, 2]) for i in range(6)]
    # one schema's 3 rows: 40 (prefix) + 3 * 3 = 49 padded tokens; a row alone: 43
    assert micro_batches(rows, list(range(6)), 50, share_prefixes=True) == [[0, 2, 4], [1, 3, 5]]
    assert micro_batches(rows, list(range(6)), 50) == [[i] for i in range(6)]

"""Training from stored traces: SFT on response tokens only, rejection sampling, offline PPO."""

from __future__ import annotations

import math

import pytest
import torch

import lightning_lab as ll
from numerics import assert_rel_close
from shared_agents import parity_agent
from lightning_lab.train.offline import OfflineBatchError, offline_ppo_step
from lightning_lab.train.rejection import RejectionConfig, keep_above, rejection_sampling_finetune
from lightning_lab.train.scoring import padded_tokens
from lightning_lab.train.sft import (Demonstration, SFTConfig, SFTTrainer, demonstrations_to_batch,
                                     prefix_clusters, sft_loss)

TASKS = [{"task_id": f"t{i}", "q": f"Question number {i} " + "word " * i} for i in range(8)]


def test_sft_loss_is_token_mean_nll_by_hand():
    # three response tokens with p = e^-1, e^-2, e^-3: mean NLL = (1 + 2 + 3) / 3
    assert sft_loss(torch.tensor([-1.0, -2.0, -3.0])).item() == pytest.approx(2.0)


def test_sft_loss_counts_response_tokens_only(tiny):
    """The trainer's loss equals Hugging Face's masked NLL (labels -100 on prompt and padding)."""
    demos = [Demonstration(prompt="The capital of France is", target=" Paris, of course."),
             Demonstration(prompt=[{"role": "user", "content": "Say hi"}], target="Hi there!",
                           prefill="Sure: ", end_of_turn=True)]
    batch, skipped = demonstrations_to_batch(tiny.tokenizer, demos)
    assert not skipped and len(batch) == 2
    rows = [t.transitions[0] for t in batch]
    assert rows[1].prompt.endswith("<|im_start|>assistant\nSure: ")
    assert rows[1].response_ids[-1] == tiny.tokenizer.convert_tokens_to_ids("<|im_end|>")

    model = tiny.model
    width = max(len(r.prompt_ids) + len(r.response_ids) for r in rows)
    ids = torch.zeros((2, width), dtype=torch.long)
    labels = torch.full((2, width), -100)
    mask = torch.zeros((2, width), dtype=torch.long)
    for b, r in enumerate(rows):
        seq = r.prompt_ids + r.response_ids
        ids[b, :len(seq)] = torch.tensor(seq)
        mask[b, :len(seq)] = 1
        labels[b, len(r.prompt_ids):len(seq)] = torch.tensor(r.response_ids)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
        everything = model(input_ids=ids, attention_mask=mask,
                           labels=torch.where(mask.bool(), ids, -100)).loss.item()
    trainer = SFTTrainer(tiny, batch, SFTConfig(batch_size=2, lr=0.0))
    got = trainer.step().metrics["loss"]
    assert got == pytest.approx(expected, rel=1e-4)
    assert abs(got - everything) > 1e-3 * abs(expected)  # prompt tokens would change it


def test_sft_learns_targets_and_skips_bad_rows(tiny):
    demos = [Demonstration(prompt=f"Question {i}:", target=" alpha beta gamma;") for i in range(6)]
    demos += [Demonstration(prompt="empty", target="  "),
              Demonstration(prompt="word " * 400, target=" too long")]
    batch, skipped = demonstrations_to_batch(tiny.tokenizer, demos, max_context=256)
    assert len(batch) == 6 and skipped == {"empty_target": 1, "over_context": 1}
    trainer = SFTTrainer(tiny, batch, SFTConfig(batch_size=6, lr=3e-3, epochs=15))
    states = trainer.fit(progress=False)
    assert states[-1].metrics["loss"] < 0.3 * states[0].metrics["loss"]
    gen = tiny.generate(["Question 9:"], temperature=0, max_new_tokens=4)[0]
    assert gen.text.startswith(" alpha beta")  # generalises to an unseen prompt of the same form


def test_sft_batch_without_rows_is_a_clear_error(tiny):
    batch, _ = demonstrations_to_batch(tiny.tokenizer, [Demonstration(prompt="x", target="")])
    with pytest.raises(ValueError, match="no transitions to train on"):
        SFTTrainer(tiny, batch)


def _graded_agent(policy):
    """Reward = response length mod 4 / 3, so samples of one task differ; deterministic given the
    tokens, so the filter can be checked exactly."""

    def agent(task):
        with ll.role("writer"):
            policy.chat(task["q"], max_new_tokens=int(task["task_id"][1:]) % 3 + 3, stop=["."])
        tr = ll.current().transitions[-1]
        ll.reward((len(tr.response_ids) % 4) / 3)

    return agent


def test_rejection_sampling_keeps_exactly_trajectories_above_threshold(tiny):
    rounds = []
    results = rejection_sampling_finetune(
        tiny, _graded_agent(tiny), TASKS,
        RejectionConfig(n=6, threshold=0.5, temperature=1.0, rounds=2, tasks_per_round=4,
                        unique=False, sft=SFTConfig(batch_size=8, lr=1e-3)),
        on_round=rounds.append)
    assert [r.round for r in rounds] == [1, 2] and results == rounds
    for r in results:
        assert len(r.sampled) == 24
        expected = [t.traj_id for t in r.sampled if t.total_reward > 0.5]
        assert [t.traj_id for t in r.kept] == expected and 0 < len(expected) < 24
        assert r.metrics["kept"] == len(expected)
        assert r.sft_history  # it trained on them
    assert {t.task_id for t in results[0].sampled} == {"t0", "t1", "t2", "t3"}
    assert {t.task_id for t in results[1].sampled} == {"t4", "t5", "t6", "t7"}


def test_keep_above_deduplicates_identical_trajectories():
    tr = lambda ids: ll.Transition(prompt_ids=[1], response_ids=ids, reward=1.0)  # noqa: E731
    batch = ll.Batch([ll.Trajectory(task_id="a", transitions=[tr([5, 6])]),
                      ll.Trajectory(task_id="a", transitions=[tr([5, 6])]),
                      ll.Trajectory(task_id="b", transitions=[tr([5, 6])]),
                      ll.Trajectory(task_id="a", transitions=[tr([7])])])
    assert [t.task_id for t in keep_above(batch, 0.5)] == ["a", "b", "a"]
    assert len(keep_above(batch, 0.5, unique=False)) == 4
    assert len(keep_above(batch, 1.0)) == 0  # strictly above


def _params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])


def test_offline_ppo_on_saved_batch_reproduces_online_update(tmp_path):
    config = ll.PPOConfig(tasks_per_step=4, group_size=4, lr=3e-3, minibatch_size=8, ppo_epochs=2)
    online = ll.models.load("tiny")
    start = _params(online.model)
    trainer = ll.PPOTrainer(online, parity_agent(online), TASKS, config=config)
    state = trainer.step()
    state.batch.save_jsonl(tmp_path / "step.jsonl")
    moved = _params(online.model) - start
    assert moved.norm() > 0

    offline = ll.models.load("tiny")
    assert torch.equal(_params(offline.model), start)
    replay = ll.PPOTrainer(offline, parity_agent(offline), TASKS, config=config)
    again = offline_ppo_step(replay, ll.Batch.load_jsonl(tmp_path / "step.jsonl"))
    diff = (_params(offline.model) - start) - moved
    assert diff.norm() <= 1e-4 * moved.norm()
    for key in ("policy_loss", "kl", "clip_frac", "reward_mean", "n_loss_transitions"):
        assert again.metrics[key] == pytest.approx(state.metrics[key], rel=1e-4, abs=1e-7)


def test_offline_ppo_without_logprobs_names_the_field_and_sft_still_works(tiny, tmp_path):
    batch = ll.run_rollouts(parity_agent(tiny), TASKS[:2], group_size=2, temperature=1.0)
    batch[1].transitions[0].logprobs = []
    trainer = ll.PPOTrainer(tiny, parity_agent(tiny), TASKS, config=ll.PPOConfig())
    with pytest.raises(OfflineBatchError, match=r"field 'logprobs' is missing in trajectory 1"):
        offline_ppo_step(trainer, batch)
    state = SFTTrainer(tiny, batch, SFTConfig(batch_size=8)).step()
    assert math.isfinite(state.metrics["loss"]) and state.metrics["n_rows"] == 8


def test_sft_step_with_shared_prefixes_equals_unshared():
    """Questions after one schema: sharing its tokens gives the same loss and gradients."""
    torch.manual_seed(0)
    policy = ll.models.load("tiny", lora={"r": 4, "init_lora_weights": False})
    schema = "Schema: " + " ".join(f"CREATE TABLE t{i} (id INT, name TEXT);" for i in range(12))
    demos = [Demonstration(prompt=[{"role": "user", "content": f"{schema}\nQuestion {q}: {w}?"}],
                           target=f" SELECT name FROM t{q} WHERE id = {q};", prefill="SQL:")
             for q, w in enumerate(["how many", "which names", "list all", "count the", "who"])]
    batch, _ = demonstrations_to_batch(policy.tokenizer, demos)
    rows = [t.transitions[0] for t in batch]
    assert padded_tokens(rows, share_prefixes=True) < padded_tokens(rows) / 2
    lora = [p for p in policy.model.parameters() if p.requires_grad]

    def step(share):
        config = SFTConfig(lr=0.0, batch_size=5, max_grad_norm=1e9, share_prefixes=share,
                           max_tokens_per_forward=256)
        loss = SFTTrainer(policy, batch, config).step().metrics["loss"]
        return loss, torch.cat([p.grad.flatten() for p in lora])

    shared_loss, shared_grad = step(True)
    alone_loss, alone_grad = step(False)
    assert shared_loss == pytest.approx(alone_loss, rel=1e-6)
    assert alone_grad.norm() > 0
    assert_rel_close(shared_grad, alone_grad, 1e-4, "LoRA gradient")


def test_prefix_clusters_group_a_schemas_questions_not_a_shared_system_prompt():
    system = [1, 2]  # shared by every prompt, but short next to a schema
    a, b = system + [10] * 20, system + [20] * 20  # two databases' schemas
    prompts = [a + [7], b + [7], a + [8, 9], system + [30, 31], b + [5], a + [7]]
    assert sorted(map(sorted, prefix_clusters(prompts))) == [[0, 2, 5], [1, 4], [3]]
    assert prefix_clusters([]) == []


def test_group_by_prefix_batches_one_database_and_still_sees_every_row_once_a_pass(tiny):
    schemas = {db: f"Schema {db}: " + " ".join(f"CREATE TABLE {db}{i} (id INT);" for i in range(8))
               for db in "abc"}
    demos = [Demonstration(prompt=[{"role": "user", "content": f"{schemas[db]}\nQ{q}?"}],
                           target=f" SELECT {q};") for db in "abc" for q in range(4)]
    batch, _ = demonstrations_to_batch(tiny.tokenizer, demos)
    rows_db = ["abc"[i // 4] for i in range(12)]

    def passes(group):
        trainer = SFTTrainer(tiny, batch, SFTConfig(batch_size=4, group_by_prefix=group, seed=3))
        return [trainer._next_rows() for _ in range(6)]  # two passes of three batches

    grouped, mixed = passes(True), passes(False)
    for batches in (grouped, mixed):
        assert sorted(sum(batches[:3], [])) == sorted(sum(batches[3:], [])) == list(range(12))
    assert all(len({rows_db[i] for i in b}) == 1 for b in grouped)
    assert any(len({rows_db[i] for i in b}) > 1 for b in mixed)

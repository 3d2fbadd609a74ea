"""Truncated importance sampling for behaviour/trainer mismatch (rollouts from another engine)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_lab.train.offpolicy import truncated_is_weights
from lightning_lab.train.ppo import ppo_loss


def test_weights_and_diagnostics_by_hand():
    trainer = torch.tensor([-1.0, -2.0, -0.5, -3.0])
    behaviour = trainer - torch.tensor([0.0, 1.0, -1.0, 0.5])  # log ratios 0, 1, -1, 0.5
    out = truncated_is_weights(trainer, behaviour, cap=2.0)
    ratios = [1.0, math.e, math.exp(-1), math.exp(0.5)]
    assert out.weights.tolist() == pytest.approx([1.0, 2.0, math.exp(-1), math.exp(0.5)])
    assert float(out.truncation_frac) == 0.25  # only e^1 > 2
    assert float(out.ratio_mean) == pytest.approx(sum(ratios) / 4)
    k3 = [r - 1 - math.log(r) for r in ratios]
    assert float(out.mismatch_kl) == pytest.approx(sum(k3) / 4)
    assert float(out.max_abs_logprob_diff) == pytest.approx(1.0)


def test_agreeing_sampler_gives_unit_weights_and_no_mismatch():
    lp = torch.randn(50).clamp(max=0)
    out = truncated_is_weights(lp, lp.clone())
    assert torch.equal(out.weights, torch.ones(50))
    assert float(out.mismatch_kl) == 0.0 and float(out.truncation_frac) == 0.0


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="shapes differ"):
        truncated_is_weights(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="cap must be >= 1"):
        truncated_is_weights(torch.zeros(3), torch.zeros(3), cap=0.5)


def test_weights_scale_each_tokens_policy_gradient():
    """The IS-weighted loss's gradient is each token's unweighted gradient times its weight."""
    new = torch.tensor([-1.0, -2.0, -0.7], requires_grad=True)
    old = torch.tensor([-1.0, -2.1, -0.7])
    adv = torch.tensor([1.0, -1.0, 0.5])
    weights = torch.tensor([1.0, 2.0, 0.25])
    plain = torch.autograd.grad(ppo_loss(new, old, adv, None, clip_eps=0.2, kl_coef=0.0).loss, new)[0]
    weighted = torch.autograd.grad(ppo_loss(new, old, adv, None, clip_eps=0.2, kl_coef=0.0,
                                            is_weights=weights).loss, new)[0]
    assert torch.allclose(weighted, plain * weights, rtol=1e-6, atol=0)


def perturbed_agent(policy, masked: bool = False):
    """Samples with the policy, then reports behaviour logprobs off by -1/+1 on even/odd tokens:
    what a sampler that disagrees with the trainer (another engine, bf16, a stale adapter) hands in.
    ``masked``: the sample says its logprobs are a grammar-masked distribution's (vLLM's)."""
    import lightning_lab as ll

    def agent(task):
        policy.chat(task["q"], max_new_tokens=6)
        tr = ll.current().transitions[-1]
        tr.logprobs = [lp + (1.0 if j % 2 else -1.0) for j, lp in enumerate(tr.logprobs)]
        if masked:
            tr.meta["masked_logprobs"] = True
        ll.reward(1.0)

    return agent


def run_step(recompute: bool, masked: bool = False):
    import lightning_lab as ll

    policy = ll.models.load("tiny", lora=True)
    tasks = [{"task_id": f"t{i}", "q": f"Question {i}"} for i in range(3)]
    config = ll.PPOConfig(tasks_per_step=3, group_size=2, minibatch_size=64, lr=1e-3, kl_coef=0.0,
                          recompute_logprobs=recompute, tis_cap=2.0, rollout_workers=2)
    trainer = ll.PPOTrainer(policy, perturbed_agent(policy, masked), tasks, config=config,
                            credit=ll.credit.get("uniform", baseline=None))
    return trainer.step()


def test_recomputed_logprobs_and_truncated_weights_on_perturbed_behaviour():
    state = run_step(recompute=True)
    corrected = state.metrics
    rows = [tr for _, tr in state.batch.transitions()]
    lengths = [len(tr.response_ids) for tr in rows]
    up = sum((n + 1) // 2 for n in lengths)  # even positions: ratio e^1 > cap, truncated to 2
    down = sum(n // 2 for n in lengths)  # odd positions: ratio e^-1, kept
    assert corrected["n_loss_transitions"] == len(rows)
    assert corrected["is_truncation_frac"] == pytest.approx(up / (up + down), rel=1e-6)
    k3_up, k3_down = math.e - 2.0, math.exp(-1.0)  # r - 1 - log r at r = e and r = 1/e
    assert corrected["is_mismatch_kl"] == pytest.approx((up * k3_up + down * k3_down) / (up + down),
                                                        rel=1e-3)
    assert corrected["is_weight_mean"] == pytest.approx((2.0 * up + math.exp(-1) * down) / (up + down),
                                                        rel=1e-3)
    assert corrected["behaviour_logprob_err"] == pytest.approx(1.0, rel=1e-3)
    # PPO's ratio starts at 1 with the recomputed old logprobs: nothing is clipped by the noise...
    assert corrected["clip_frac"] == 0.0
    # ...while with the sampler's numbers every token's ratio is e^±1, all outside the clip range.
    uncorrected = run_step(recompute=False).metrics
    assert uncorrected["clip_frac"] == 1.0
    assert "is_truncation_frac" not in uncorrected


def test_masked_logprobs_are_replaced_by_the_trainers_recompute():
    """Samples flagged ``masked_logprobs`` (constrained replies from vLLM, whose logprobs are the
    masked distribution's) train on the trainer's own recompute even without
    ``recompute_logprobs``: the +-1 they recorded leaves no trace (ratio 1, weights 1)."""
    metrics = run_step(recompute=False, masked=True).metrics
    assert metrics["clip_frac"] == 0.0  # unflagged, every ratio would be e^+-1 (test above)
    assert metrics["is_weight_mean"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["is_mismatch_kl"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["behaviour_logprob_err"] == pytest.approx(0.0, abs=1e-6)


def test_one_minibatch_recompute_scores_nothing_extra(monkeypatch):
    """With a single minibatch the old policy is the update's own first forward: no extra pass."""
    from lightning_lab.train.update import Scorer

    scored = []
    original = Scorer.logprobs

    def counting(self, rows, which, model=None):
        scored.extend(which)
        return original(self, rows, which, model)

    monkeypatch.setattr(Scorer, "logprobs", counting)
    state = run_step(recompute=True)
    assert scored == [] and state.metrics["clip_frac"] == 0.0


def test_recomputed_old_logprobs_are_the_pre_update_policy_in_every_epoch(monkeypatch):
    """Two epochs of three minibatches: every row's old logprobs (first minibatch from its own
    forward, the rest scored up front) equal the policy before any optimizer step."""
    import lightning_lab as ll
    from lightning_lab.train import update
    from tests.numerics import assert_rel_close

    policy = ll.models.load("tiny", lora=True)
    tasks = [{"task_id": f"t{i}", "q": f"Question {i}"} for i in range(3)]
    config = ll.PPOConfig(tasks_per_step=3, group_size=2, minibatch_size=2, ppo_epochs=2, lr=1e-2,
                          kl_coef=0.0, recompute_logprobs=True, rollout_workers=2)
    trainer = ll.PPOTrainer(policy, perturbed_agent(policy), tasks, config=config,
                            credit=ll.credit.get("uniform", baseline=None))
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters() if p.requires_grad}
    seen = {}
    recompute = update.recompute_old_logprobs

    def spy(scorer, rows, mine, **kw):
        seen["rows"], seen["old"] = rows, recompute(scorer, rows, mine, **kw)
        return seen["old"]

    monkeypatch.setattr(update, "recompute_old_logprobs", spy)
    state = trainer.step()
    assert state.metrics["approx_kl"] > 0  # the policy moved between minibatches
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if n in before:
                p.copy_(before[n])
    rows, old = seen["rows"], seen["old"].by_row
    assert sorted(old) == list(range(len(rows)))
    expected = trainer.scorer.logprobs(rows, list(range(len(rows))))
    for i, lp in expected.items():
        assert_rel_close(old[i], lp, rtol=1e-5, what=f"row {i}")


def test_bf16_update_recomputes_and_tracks_the_fp32_gradient():
    """update_dtype=bfloat16 implies recomputed old logprobs (ratio starts at 1 exactly) and its
    gradient points where the fp32 one does (same batch, same initial weights)."""
    import lightning_lab as ll
    from lightning_lab.records import Batch

    def grads(dtype: str, batch: Batch | None):
        torch.manual_seed(0)
        policy = ll.models.load("tiny", lora={"r": 4, "init_lora_weights": False})
        tasks = [{"task_id": f"t{i}", "q": f"Question {i}"} for i in range(3)]
        config = ll.PPOConfig(tasks_per_step=3, group_size=2, minibatch_size=64, lr=0.0,
                              kl_coef=0.0, update_dtype=dtype, recompute_logprobs=True,
                              rollout_workers=2)
        trainer = ll.PPOTrainer(policy, perturbed_agent(policy), tasks, config=config,
                                credit=ll.credit.get("uniform", baseline=None))
        state = trainer.step() if batch is None else trainer.learn(batch)
        params = [p for p in policy.model.parameters() if p.requires_grad]
        return trainer, state, torch.cat([p.grad.flatten() for p in params])

    trainer, state, g16 = grads("bfloat16", None)
    assert trainer.update_dtype == torch.bfloat16
    assert ll.PPOTrainer(trainer.policy, trainer.agent, trainer.tasks, config=ll.PPOConfig(
        update_dtype="bfloat16")).recompute_logprobs  # implied, not only asked for
    assert state.metrics["clip_frac"] == 0.0
    _, _, g32 = grads("float32", state.batch)
    # bf16 keeps 8 mantissa bits: on the random tiny model the clipped gradients agree to a
    # cosine of ~0.96 (a sign or row mix-up would give ~0 or below).
    cos = torch.nn.functional.cosine_similarity(g16, g32, dim=0)
    assert cos > 0.9, cos

"""The PPO objective against gradients derived by hand."""

import math

import pytest
import torch

from lightning_lab.train.ppo import kl_k3, ppo_loss, value_loss


def test_unclipped_gradient_is_minus_advantage_times_ratio_over_n():
    old = torch.tensor([-1.0, -2.0, -0.5])
    new = torch.tensor([-0.9, -2.1, -0.5], requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 0.5])
    out = ppo_loss(new, old, adv, None, clip_eps=0.2, kl_coef=0.0)
    out.loss.backward()
    ratio = torch.exp(new.detach() - old)  # 1.105, 0.905, 1.0: all inside [0.8, 1.2]
    # L = mean(-A * ratio) -> dL/dlogp_i = -A_i * ratio_i / 3
    assert torch.allclose(new.grad, -adv * ratio / 3, atol=1e-6)
    assert out.clip_frac.item() == 0.0
    assert torch.allclose(out.policy_loss, (-adv * ratio).mean())


def test_clipped_tokens_have_zero_gradient():
    old = torch.zeros(2)
    new = torch.tensor([0.5, 0.5], requires_grad=True)  # ratio e^0.5 = 1.65 > 1.2
    adv = torch.tensor([1.0, -1.0])
    out = ppo_loss(new, old, adv, None, clip_eps=0.2, kl_coef=0.0)
    out.loss.backward()
    # A>0, ratio above 1+eps: the clipped branch (constant) is the max -> no gradient.
    # A<0, ratio above 1+eps: -A*ratio = 1.65 > -A*1.2 = 1.2 -> unclipped branch, grad = -A*r/N.
    r = torch.exp(torch.tensor(0.5))
    assert torch.allclose(new.grad, torch.tensor([0.0, float(r) / 2]), atol=1e-6)
    assert out.clip_frac.item() == 1.0


def test_clip_higher_widens_only_the_upper_range():
    old = torch.zeros(1)
    new = torch.tensor([0.25], requires_grad=True)  # ratio 1.284
    out = ppo_loss(new, old, torch.ones(1), None, clip_eps=0.2, kl_coef=0.0, clip_eps_high=0.3)
    out.loss.backward()
    assert out.clip_frac.item() == 0.0 and new.grad.item() < 0


def test_kl_penalty_value_and_gradient():
    old = torch.tensor([-1.0, -1.0])
    new = torch.tensor([-1.0, -1.0], requires_grad=True)
    ref = torch.tensor([-1.5, -0.5])
    out = ppo_loss(new, old, torch.zeros(2), ref, clip_eps=0.2, kl_coef=0.1)
    out.loss.backward()
    d = ref - new.detach()  # -0.5, 0.5
    # k3 = exp(d) - d - 1 ; d k3 / d logp = -exp(d) + 1 ; loss = 0.1 * mean(k3)
    assert torch.allclose(out.kl, (torch.exp(d) - d - 1).mean())
    assert torch.allclose(new.grad, 0.1 * (1 - torch.exp(d)) / 2, atol=1e-6)
    assert out.kl.item() > 0


def test_kl_past_the_gap_cap_is_k3s_tangent_line():
    """With cap 2: a gap of 1 is plain k3; gaps of 4 and 1000 are k3(2) + (e^2 - 1)(d - 2),
    finite, and pull back with the bounded gradient e^2 - 1 (plain k3 would give e^4 - 1 and inf)."""
    ref = torch.tensor([0.0, 0.0, 0.0])
    new = torch.tensor([-1.0, -4.0, -1000.0], requires_grad=True)
    out = ppo_loss(new, new.detach(), torch.zeros(3), ref, clip_eps=0.2, kl_coef=1.0,
                   kl_gap_cap=2.0)
    out.loss.backward()
    e, e2 = math.e, math.exp(2.0)
    k3 = [e - 2.0, (e2 - 3.0) + (e2 - 1.0) * 2.0, (e2 - 3.0) + (e2 - 1.0) * 998.0]
    assert out.kl.item() == pytest.approx(sum(k3) / 3, rel=1e-5)
    assert new.grad.tolist() == pytest.approx([(1 - e) / 3, (1 - e2) / 3, (1 - e2) / 3], rel=1e-5)
    assert kl_k3(torch.tensor([-3.0, 0.5]), None).tolist() == pytest.approx(
        [math.exp(-3.0) + 2.0, math.exp(0.5) - 1.5], rel=1e-6)  # no cap: plain k3


def test_approx_kl_zero_when_policy_unchanged():
    lp = torch.tensor([-0.3, -1.2])
    out = ppo_loss(lp.clone(), lp, torch.ones(2), lp, clip_eps=0.2, kl_coef=0.1)
    assert out.approx_kl.item() == 0.0 and out.kl.item() == 0.0
    assert torch.equal(out.ratio, torch.ones(2))


def test_value_loss_is_half_the_mean_squared_error_over_transitions():
    """One term per transition whatever its length: errors 1, -2, 3 give 0.5 * 14 / 3."""
    values = torch.tensor([1.0, 0.0, 3.0], requires_grad=True)
    returns = torch.tensor([0.0, 2.0, 0.0])
    loss = value_loss(values, returns)
    assert float(loss) == pytest.approx(7.0 / 3.0, rel=1e-6)
    loss.backward()
    assert values.grad.tolist() == pytest.approx([1 / 3, -2 / 3, 1.0], rel=1e-6)  # (V - G) / 3

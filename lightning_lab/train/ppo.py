"""The PPO objective, as a pure function over flat per-token tensors.

Everything the trainer needs to log comes back as separate named terms, so the loss stays a dozen
readable lines and the diagnostics cannot drift from what was optimised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PPOLossOutput", "kl_k3", "ppo_loss", "value_loss"]


@dataclass
class PPOLossOutput:
    loss: torch.Tensor
    policy_loss: torch.Tensor
    kl: torch.Tensor
    """Mean per-token KL(policy || reference): the k3 estimator, linear past ``kl_gap_cap``."""
    approx_kl: torch.Tensor
    """Mean per-token KL(behaviour || policy), k3 estimator: how far this update has moved."""
    clip_frac: torch.Tensor
    ratio: torch.Tensor
    """Per-token ratio pi/pi_behaviour, detached, same shape as the inputs."""


def ppo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
             ref_logprobs: torch.Tensor | None, *, clip_eps: float, kl_coef: float,
             clip_eps_high: float | None = None, kl_gap_cap: float | None = None,
             is_weights: torch.Tensor | None = None) -> PPOLossOutput:
    """Clipped surrogate on token log-ratios plus a KL penalty to the reference policy.

    All inputs are flat (N,) tensors over the minibatch's response tokens; ``advantages`` is the
    transition's advantage broadcast to its tokens. Token-mean aggregation: every generated token
    weighs the same, so long answers are not down-weighted (DAPO's argument). ``is_weights``
    (N,), detached, multiplies each token's clipped surrogate: the truncated importance weights of
    ``offpolicy.truncated_is_weights`` when rollouts came from another engine.

    The KL term is k3, ``exp(d) - d - 1`` with ``d = ref - logprob``, up to ``d = kl_gap_cap``
    nats and its tangent line beyond (``kl_k3``).
    """
    logratio = logprobs - old_logprobs  # (N,)
    ratio = torch.exp(logratio)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high)
    pg_loss = torch.max(pg_loss1, pg_loss2)  # (N,)
    if is_weights is not None:
        pg_loss = pg_loss * is_weights
    policy_loss = pg_loss.mean()
    if ref_logprobs is not None:
        kl = kl_k3(ref_logprobs - logprobs, kl_gap_cap).mean()
    else:
        kl = torch.zeros((), device=logprobs.device)
    loss = policy_loss + kl_coef * kl
    with torch.no_grad():
        approx_kl = ((ratio - 1.0) - logratio).mean()
        clipped = (ratio < 1.0 - clip_eps) | (ratio > 1.0 + high)
        clip_frac = clipped.float().mean()
    return PPOLossOutput(loss=loss, policy_loss=policy_loss.detach(), kl=kl.detach(),
                         approx_kl=approx_kl, clip_frac=clip_frac, ratio=ratio.detach())


def kl_k3(gap: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Per-token k3 KL estimate of ``gap = ref - logprob`` (N,), continued linearly past ``cap``.

    k3 grows as ``exp(gap)``: one token the policy has made 13 nats less likely than the
    reference (under constrained decoding the grammar can keep sampling such a token) weighs
    ~4e5 times a typical one, and after the gradient-norm clip it is the whole step. Past ``cap``
    the term follows k3's tangent, so that token still pulls back, with a bounded force
    ``exp(cap) - 1``. (verl's ``low_var_kl`` clamps the value at 10 instead, which stops the pull.)
    None = plain k3.
    """
    within = gap if cap is None else gap.clamp(max=cap)
    grow = torch.exp(within)
    return grow - within - 1.0 + (grow - 1.0) * (gap - within)


def value_loss(values: torch.Tensor, returns: torch.Tensor) -> torch.Tensor:
    """Critic regression: 0.5 * mean over transitions of (V(s_t) - G_t)^2.

    ``values`` and ``returns`` are (B,), one per transition. Transition-mean aggregation, unlike
    the policy's token mean: the critic makes one prediction per state (``critic.py``), so a long
    answer is one regression sample, not many. The update weights each micro-batch's value loss by
    its share of the minibatch's transitions, and logs it with the same weights.
    """
    return 0.5 * ((values - returns) ** 2).mean()

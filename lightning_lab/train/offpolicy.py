"""Off-policy correction for rollouts sampled by another engine than the trainer's forward.

Why: PPO's ratio needs the probability of each sampled token under the policy *as the trainer
computes it*. When rollouts come from vLLM, a bf16 sampler, or a server one adapter version
behind, the behaviour logprobs the sampler reports differ from the trainer's (kernels, precision,
staleness). Using them as PPO's "old" logprobs makes the ratio start away from 1, so the clip bites
on noise, and the gradient is that of another policy. The fix verl and Agent Lightning use
("truncated importance sampling", Yao et al. 2025, "Your efficient RL framework secretly brings
you off-policy RL training"): recompute the old logprobs with the trainer's model before the
update, use those in PPO's ratio, and weight each token's loss by the importance ratio
pi_trainer / pi_behaviour, truncated at ``cap`` so a few tokens the sampler found unlikely cannot
dominate the batch (bounded variance for a little bias).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ISCorrection", "truncated_is_weights"]


@dataclass
class ISCorrection:
    weights: torch.Tensor
    """(N,) detached per-token weights min(pi_trainer / pi_behaviour, cap)."""
    mismatch_kl: torch.Tensor
    """Mean per-token KL(behaviour || trainer), k3 estimator: how far the sampler is from us."""
    max_abs_logprob_diff: torch.Tensor
    """Largest |log pi_trainer - log pi_behaviour| over the tokens."""
    truncation_frac: torch.Tensor
    """Fraction of tokens whose ratio exceeded ``cap`` (and was cut to it)."""
    ratio_mean: torch.Tensor
    """Mean untruncated ratio; 1 in expectation when the sampler and trainer agree."""


def truncated_is_weights(trainer_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, *,
                         cap: float = 2.0) -> ISCorrection:
    """Token-level truncated importance weights and mismatch diagnostics.

    trainer_logprobs: (N,) log pi_trainer(token) recomputed before the update (PPO's "old" policy);
    behaviour_logprobs: (N,) what the sampler reported for the same tokens. Both are treated as
    constants (no gradient flows through the weights).
    """
    if trainer_logprobs.shape != behaviour_logprobs.shape:
        raise ValueError(f"logprob shapes differ: trainer {tuple(trainer_logprobs.shape)} vs "
                         f"behaviour {tuple(behaviour_logprobs.shape)}")
    if cap < 1.0:
        raise ValueError(f"the truncation cap must be >= 1 (a cap below 1 down-weights on-policy "
                         f"tokens), got {cap}")
    with torch.no_grad():
        logratio = trainer_logprobs.detach() - behaviour_logprobs.detach()  # (N,)
        ratio = torch.exp(logratio)
        return ISCorrection(
            weights=ratio.clamp(max=cap),
            mismatch_kl=(ratio - 1.0 - logratio).mean(),
            max_abs_logprob_diff=logratio.abs().max() if logratio.numel() else logratio.sum(),
            truncation_frac=(ratio > cap).float().mean(),
            ratio_mean=ratio.mean(),
        )

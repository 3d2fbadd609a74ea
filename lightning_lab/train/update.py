"""The PPO update, read like cleanrl: epochs -> minibatches -> forward -> loss terms -> backward ->
clip -> step. ``ppo_update`` is the loop; the pieces it calls are named here:

* ``own_rows``: under data parallelism every process walks the same minibatches but runs forward
  and backward only on the rows it sampled itself; the gradients are summed over processes before
  the clip (``distributed.py``, step 3).
* ``micro_batches``: a minibatch is scored in forwards of at most ``max_tokens_per_forward``
  tokens; each one's loss is weighted by its share of the minibatch (tokens for the policy terms,
  rows for the value term, over all processes' rows), so the accumulated gradient is that of the
  whole minibatch's loss. With ``share_prefixes`` a minibatch's rows are sorted by prompt first,
  so rows whose prompts start alike share one forward and their common prefix (``scoring``).
* ``recompute_old_logprobs`` / ``old_policy``: PPO's old policy is either the sampler's logprobs
  or, with ``recompute_logprobs``, the trainer's own forward before the first optimizer step, the
  sampler's then only entering through truncated importance weights (``offpolicy.py``). Rows
  whose recorded logprobs are not the policy's (``masked_logprobs``) always take the recompute.
"""

from __future__ import annotations

import copy
import random
from typing import Any, Iterable, Protocol

import torch

from ..inference.adapters import has_adapter
from ..records import Batch, Transition
from .config import PPOConfig
from .distributed import DataParallel
from .multi_adapter import (AdapterStats, adapter_of, clip_by_adapter, param_groups,
                            score_by_adapter)
from .offpolicy import truncated_is_weights
from .ppo import ppo_loss, value_loss
from .scoring import Scores, chunk_rows, sharing_groups

__all__ = ["Learner", "Scorer", "loss_rows", "make_optimizer", "ppo_update"]

Key = tuple[str, int]
"""A loss row's (traj_id, turn)."""


class Learner(Protocol):
    """What ``ppo_update`` reads from the trainer (``PPOTrainer`` is one)."""

    config: PPOConfig
    credit: Any
    """Its ``needs_values`` says whether the critic trains."""
    scorer: "Scorer"
    critic: torch.nn.Module
    optimizer: torch.optim.Optimizer
    """All groups but the last: the policy's parameters (the ones clipped; one group per
    trained LoRA adapter, ``multi_adapter.param_groups``); the last: the critic's."""
    parallel: DataParallel
    minibatch_rng: random.Random
    recompute_logprobs: bool


def ppo_update(trainer: Learner, rows: list[Transition], keys: list[Key], owned: list[bool]
               ) -> tuple[dict[str, float], dict[Key, list[float]]]:
    """PPO epochs over ``rows``; returns the mean of each term over minibatches (all processes'
    rows) and each row's per-token ratios after the last epoch. ``owned``: the rows this process
    sampled (all of them in a one-process run)."""
    cfg, scorer, optimizer = trainer.config, trainer.scorer, trainer.optimizer
    use_critic = trainer.credit.needs_values
    mine = own_rows(range(len(rows)), owned)
    ref = scorer.reference_logprobs(rows, mine) if cfg.kl_coef > 0 else None
    order = minibatch_order(rows, trainer.minibatch_rng)  # epoch 0's, drawn before the recompute
    old = (recompute_old_logprobs(scorer, rows, mine, first_minibatch=order[:cfg.minibatch_size])
           if trainer.recompute_logprobs or any(map(masked_logprobs, rows)) else None)
    policy_groups = optimizer.param_groups[:-1]
    per_adapter = AdapterStats.for_model(scorer.policy.model, cfg.trainable_adapters)
    loss_terms = dict(clip_eps=cfg.clip_eps, kl_coef=cfg.kl_coef, clip_eps_high=cfg.clip_eps_high,
                      kl_gap_cap=cfg.kl_gap_cap)
    all_params = [p for group in optimizer.param_groups for p in group["params"]]
    sums: dict[str, float] = {}
    ratios: dict[Key, list[float]] = {}
    grad_norms, first_err, n_mb = 0.0, 0.0, 0
    for epoch in range(cfg.ppo_epochs):
        if epoch > 0:
            order = minibatch_order(rows, trainer.minibatch_rng)
        for start in range(0, len(order), cfg.minibatch_size):
            mb_inds = order[start:start + cfg.minibatch_size]
            mb_tokens = sum(len(rows[i].response_ids) for i in mb_inds)
            optimizer.zero_grad(set_to_none=True)
            for micro in micro_batches(rows, own_rows(mb_inds, owned), cfg.max_tokens_per_forward,
                                       share_prefixes=cfg.share_prefixes):
                micro_rows = [rows[i] for i in micro]
                fwd = scorer.forward(micro_rows, grad=True, hidden=use_critic)
                behaviour = _flat([tr.logprobs for tr in micro_rows], like=fwd.logprobs)  # (N,)
                masked = _flat([[masked_logprobs(tr)] * len(tr.response_ids) for tr in micro_rows],
                               like=fwd.logprobs).bool()  # (N,) tokens to take from ``old``
                old_logprobs, is_weights, diagnostics, err = old_policy(old, micro, fwd, behaviour,
                                                                        masked, cap=cfg.tis_cap)
                advantages = _flat([[tr.advantage] * len(tr.response_ids) for tr in micro_rows],
                                   like=fwd.logprobs)  # (N,) each row's advantage on its tokens
                ref_logprobs = torch.cat([ref[i] for i in micro]) if ref is not None else None
                pg = ppo_loss(fwd.logprobs, old_logprobs, advantages, ref_logprobs,
                              is_weights=is_weights, **loss_terms)
                # shares of the whole minibatch (all processes' rows), so the summed gradient is
                # that of its token-mean policy loss and its transition-mean value loss
                token_share = len(fwd.logprobs) / mb_tokens
                row_share = len(micro) / len(mb_inds)
                loss = pg.loss * token_share
                if use_critic:
                    values = trainer.critic(fwd.prompt_hidden)  # (B,)
                    v_loss = value_loss(values, _flat([[tr.ret] for tr in micro_rows], like=values))
                    loss = loss + cfg.value_coef * v_loss * row_share
                    _add(sums, row_share, value_loss=v_loss)  # weighted as it is optimised
                loss.backward()
                per_adapter.add_terms(micro_rows, fwd.logprobs, old_logprobs, advantages,
                                      ref_logprobs, is_weights, loss_terms)
                _add(sums, token_share, loss=pg.loss, policy_loss=pg.policy_loss, kl=pg.kl,
                     approx_kl=pg.approx_kl, clip_frac=pg.clip_frac, entropy=fwd.entropy.mean(),
                     **diagnostics)
                if epoch == cfg.ppo_epochs - 1:
                    ratios.update({keys[i]: r.tolist()
                                   for i, r in zip(micro, pg.ratio.split(fwd.lengths))})
                if epoch == 0 and (start == 0 or old is not None):  # sampler vs trainer, see below
                    first_err = max(first_err, err)
            trainer.parallel.all_reduce_grads(all_params)
            per_adapter.add_grad_norms(policy_groups)
            grad_norm = clip_by_adapter(policy_groups, cfg.max_grad_norm)
            optimizer.step()
            grad_norms += float(grad_norm)  # the same on every process
            n_mb += 1
    metrics = _merge_processes(trainer, sums, ratios, n_mb, first_err)
    metrics["grad_norm"] = grad_norms / n_mb
    metrics.update(per_adapter.metrics(trainer.parallel))
    return metrics, ratios


def make_optimizer(model: torch.nn.Module, critic: torch.nn.Module, config: PPOConfig
                   ) -> torch.optim.Optimizer:
    """AdamW over the policy's trainable parameters (a group per trained LoRA adapter, the ones
    clipped) and the critic's (the last group)."""
    groups = param_groups(model, config.trainable_adapters, config.lr, config.weight_decay,
                          config.adapter_lr)
    if not any(group["params"] for group in groups):
        raise ValueError("the policy has no trainable parameters (frozen model without LoRA?)")
    return torch.optim.AdamW([
        *groups, {"params": list(critic.parameters()), "lr": config.value_lr, "weight_decay": 0.0},
    ])


def own_rows(indices: Iterable[int], owned: list[bool]) -> list[int]:
    """The rows at ``indices`` this process sampled, hence forwards and backwards."""
    return [i for i in indices if owned[i]]


def owned_by_process(keys: list[Key], own: set[str] | None) -> list[bool]:
    """Per loss row: sampled by this process (``own``: its trajectory ids; None: all rows)."""
    return [own is None or traj_id in own for traj_id, _ in keys]


def micro_batches(rows: list[Transition], indices: list[int], budget: int, *,
                  share_prefixes: bool = False) -> list[list[int]]:
    """``indices`` split into forwards of at most ``budget`` padded tokens (``chunk_rows``).

    With ``share_prefixes`` the rows are first sorted by prompt, so prompts that start alike
    land in one forward (the minibatch's gradient is a sum over its rows: order is free)."""
    if share_prefixes:
        indices = sorted(indices, key=lambda i: rows[i].prompt_ids)
    chunks = chunk_rows([rows[i] for i in indices], budget, share_prefixes=share_prefixes)
    return [[indices[j] for j in chunk] for chunk in chunks]


def minibatch_order(rows: list[Transition], rng: random.Random) -> list[int]:
    """Rows in shuffled order, those sharing a prompt or a trajectory's turns kept adjacent:
    minibatches then hold whole groups, whose forward runs once (see ``scoring``)."""
    shuffled = sharing_groups(rows)
    rng.shuffle(shuffled)
    return [i for group in shuffled for i in group]


class OldLogprobs:
    """PPO's old policy, recomputed by the trainer's forward before the update's first step.

    The rows of the first minibatch are not scored up front: their forward in the update runs
    before any optimizer step (the same model), so ``take`` records it on first sight and later
    epochs reuse it. A one-minibatch update thus costs no extra forward.
    """

    def __init__(self, by_row: dict[int, torch.Tensor]):
        self.by_row = by_row

    def take(self, indices: list[int], fwd: Scores) -> torch.Tensor:
        """(N,) old logprobs of the rows at ``indices``, ``fwd`` being their forward now."""
        for i, fresh in zip(indices, fwd.logprobs.detach().split(fwd.lengths)):
            self.by_row.setdefault(i, fresh)
        return torch.cat([self.by_row[i] for i in indices])


def recompute_old_logprobs(scorer: "Scorer", rows: list[Transition], mine: list[int], *,
                           first_minibatch: list[int]) -> OldLogprobs:
    """Score this process's rows outside the first minibatch now, before any step."""
    first = set(first_minibatch)
    return OldLogprobs(scorer.logprobs(rows, [i for i in mine if i not in first]))


def old_policy(old: OldLogprobs | None, indices: list[int], fwd: Scores, behaviour: torch.Tensor,
               masked: torch.Tensor, *, cap: float
               ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any], float]:
    """PPO's old logprobs for ``indices``, their importance weights (None: no correction), the
    correction's diagnostics, and how far the sampler's logprobs are from the trainer's.

    Without a recompute the old policy is the sampler's, and the distance is to this forward
    (numerics only before the first step, when both are the same model). ``masked`` (N,): tokens
    whose recorded logprobs are not the policy's (``masked_logprobs``); their behaviour is the
    recompute (weight 1), as the local engine would have recorded it.
    """
    if old is None:
        return behaviour, None, {}, float((fwd.logprobs.detach() - behaviour).abs().max())
    recomputed = old.take(indices, fwd)
    behaviour = torch.where(masked, recomputed, behaviour)
    corr = truncated_is_weights(recomputed, behaviour, cap=cap)
    diagnostics = {"is_mismatch_kl": corr.mismatch_kl, "is_truncation_frac": corr.truncation_frac,
                   "is_weight_mean": corr.weights.mean()}
    return recomputed, corr.weights, diagnostics, float(corr.max_abs_logprob_diff)


def masked_logprobs(tr: Transition) -> bool:
    """The transition's recorded logprobs are a grammar-masked distribution's (a constrained
    reply sampled by vLLM, which masks before it computes logprobs), not the policy's."""
    return bool(tr.meta.get("masked_logprobs"))


def loss_rows(batch: Batch, config: PPOConfig) -> tuple[list[Key], list[Transition]]:
    """The transitions that enter the loss, with their (traj_id, turn) keys."""
    allowed = config.trainable_roles
    keys, rows = [], []
    for traj, tr in batch.transitions():
        if not traj.usable or not tr.trainable or tr.advantage is None:
            continue
        if allowed is not None and tr.role not in allowed:
            continue
        if config.trainable_adapters is not None and adapter_of(tr) not in config.trainable_adapters:
            continue
        if config.skip_zero_advantage and tr.advantage == 0.0:
            continue
        keys.append((traj.traj_id, tr.turn))
        rows.append(tr)
    return keys, rows


def empty_update_metrics() -> dict[str, float]:
    """The update's metrics when no row enters the loss."""
    return dict(loss=0.0, policy_loss=0.0, kl=0.0, approx_kl=0.0, clip_frac=0.0, entropy=0.0,
                grad_norm=0.0, behaviour_logprob_err=0.0)


def _merge_processes(trainer: Learner, sums: dict[str, float], ratios: dict[Key, list[float]],
                     n_mb: int, first_err: float) -> dict[str, float]:
    """Every process's share of each term summed, averaged over minibatches; ratios merged in
    place. ``behaviour_logprob_err``: the sampler's logprobs against the trainer's, taken on the
    first minibatch, before any step (with recomputed logprobs: over the whole first epoch, the
    old policy being the pre-update one throughout)."""
    merged: dict[str, float] = {}
    for part in trainer.parallel.gather(sums):
        for key, val in part.items():
            merged[key] = merged.get(key, 0.0) + val
    metrics = {k: v / n_mb for k, v in merged.items()}
    metrics["behaviour_logprob_err"] = max(trainer.parallel.gather(first_err))
    if trainer.parallel.enabled:
        for part in trainer.parallel.gather(ratios):
            ratios.update(part)
    return metrics


def _add(sums: dict[str, float], weight: float, **terms: torch.Tensor) -> None:
    for key, val in terms.items():
        sums[key] = sums.get(key, 0.0) + weight * float(val.detach())


def _flat(lists: list[list[float]], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor([x for xs in lists for x in xs], dtype=like.dtype, device=like.device)


class Scorer:
    """The update's forward passes: response-token logprobs of transitions under the policy or
    its KL reference, in forwards of at most ``max_tokens_per_forward`` padded tokens."""

    def __init__(self, policy: Any, config: PPOConfig, dtype: torch.dtype,
                 reference_weights: dict[str, torch.Tensor] | None = None):
        self.policy = policy
        self.config = config
        self.dtype = dtype
        self.reference_weights = reference_weights
        # Without an adapter, "disable the adapter" is impossible: keep a frozen copy for the KL.
        self.ref_model = None
        if config.kl_coef > 0 and not has_adapter(policy.model) and reference_weights is None:
            self.ref_model = copy.deepcopy(policy.model).requires_grad_(False).eval()

    def forward(self, rows: list[Transition], *, grad: bool, hidden: bool = False,
                model: Any = None) -> Scores:
        """Response-token logprobs of ``rows`` under ``model`` (default: the policy)."""
        return score_by_adapter(model if model is not None else self.policy.model, rows,
                     device=self.policy.device, grad=grad, hidden=hidden,
                     checkpointing=self.config.gradient_checkpointing, dtype=self.dtype,
                     share_prefixes=self.config.share_prefixes)

    def chunks(self, rows: list[Transition]) -> list[list[int]]:
        return chunk_rows(rows, self.config.max_tokens_per_forward,
                          share_prefixes=self.config.share_prefixes)

    def logprobs(self, rows: list[Transition], which: list[int], model: Any = None
                 ) -> dict[int, torch.Tensor]:
        """Response logprobs of the rows at ``which`` under ``model`` (default: the policy as
        it is now), no grad, keyed by row index (sorted by prompt first, as ``micro_batches``)."""
        if self.config.share_prefixes:
            which = sorted(which, key=lambda i: rows[i].prompt_ids)
        picked = [rows[i] for i in which]
        out: list[torch.Tensor] = []
        with torch.no_grad():
            for chunk in self.chunks(picked):
                fwd = self.forward([picked[i] for i in chunk], grad=False, model=model)
                out.extend(fwd.logprobs.split(fwd.lengths))
        return dict(zip(which, out))

    def reference_logprobs(self, rows: list[Transition], which: list[int]
                           ) -> dict[int, torch.Tensor]:
        """``logprobs`` under the KL reference (the frozen copy, the warm start, or the base)."""
        from contextlib import nullcontext

        context = (nullcontext(self.ref_model) if self.ref_model is not None
                   else self.policy.reference(self.reference_weights))
        with context as model:
            return self.logprobs(rows, which, model)

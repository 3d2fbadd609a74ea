"""Training one LoRA adapter per role: each transition trains the adapter that sampled it.

Why a separate module: the PPO update (``update.py``) stays the single-policy loop it was; this
module supplies what changes when a policy carries several adapters (``inference/multi_lora``):

* **Scoring** (``score_by_adapter``): a transition's logprobs are those of the adapter recorded
  in ``meta["adapter"]``. The update's forward shares prompt KV between rows (GRPO groups, turns,
  prefixes), and KV computed under one adapter is wrong for another, so the rows of a forward are
  split by adapter, each part scored by ``score`` under its adapter, and the results put back in
  row order. Every part is exactly what scoring that adapter's rows alone gives; prompts of two
  adapters could never share KV anyway, so the split loses only the base matmul's batching.
* **The optimizer** (``param_groups``): one parameter group per trained adapter (its own ``lr``
  if ``adapter_lr`` says so); adapters outside ``trainable_adapters`` are in no group, so an
  optimizer step leaves them bit-identical (AdamW's weight decay never touches them).
* **Metrics** (``AdapterStats``, ``adapter_rewards``): reward, KL, clip fraction, loss and gradient norm per
  adapter, as ``<name>/<adapter>`` in ``StepState.metrics``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..inference.multi_lora import (DEFAULT, adapter_names, adapter_parameters, check_adapter,
                                   use_adapter)
from ..records import Transition
from .scoring import Scores, score

__all__ = ["AdapterStats", "adapter_of", "clip_by_adapter", "adapter_rewards", "param_groups",
           "check_adapter_set", "learning_rates", "saved_parameters", "score_as",
           "score_by_adapter", "trained_adapters", "warm_start_parameters"]


def adapter_of(tr: Transition) -> str:
    """The adapter that sampled ``tr`` (transitions recorded before adapters: ``"default"``)."""
    return tr.meta.get("adapter") or DEFAULT


def score_by_adapter(model: Any, rows: Sequence[Transition], **kwargs: Any) -> Scores:
    """``score`` with each row under the adapter that sampled it (see the module docstring)."""
    parts: dict[str, list[int]] = {}
    for i, tr in enumerate(rows):
        parts.setdefault(adapter_of(tr), []).append(i)
    if len(parts) == 1:
        (name,) = parts
        with use_adapter(model, name):
            return score(model, rows, **kwargs)
    if kwargs.get("checkpointing") and kwargs.get("grad"):
        # the recompute runs in the backward, after the adapter routing has been undone
        raise ValueError("gradient_checkpointing cannot score rows of several adapters")
    by_row: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
    for name, idx in parts.items():
        with use_adapter(model, name):
            part = score(model, [rows[i] for i in idx], **kwargs)
        hidden = part.prompt_hidden
        for k, (i, lp, ent) in enumerate(zip(idx, part.logprobs.split(part.lengths),
                                             part.entropy.split(part.lengths))):
            by_row[i] = (lp, ent, None if hidden is None else hidden[k])
    order = [by_row[i] for i in range(len(rows))]
    hidden_rows = [h for _, _, h in order]
    return Scores(logprobs=torch.cat([lp for lp, _, _ in order]),
                  entropy=torch.cat([e for _, e, _ in order]),
                  prompt_hidden=None if hidden_rows[0] is None else torch.stack(hidden_rows),
                  lengths=[len(tr.response_ids) for tr in rows])


def score_as(model: Any, rows: Sequence[Transition], adapter: str | None, **kwargs: Any
             ) -> Scores:
    """Every row under ``adapter`` (a warm start aimed at one role), or with None each row
    under the adapter that sampled it (``score_by_adapter``)."""
    if adapter is None:
        return score_by_adapter(model, rows, **kwargs)
    with use_adapter(model, adapter):
        return score(model, rows, **kwargs)


def warm_start_parameters(model: Any, adapter: str | None) -> list[torch.nn.Parameter]:
    """What an SFT / rejection-sampling warm start trains: ``adapter``'s parameters (checked,
    and made trainable), or with None every trainable parameter."""
    if adapter is None:
        return [p for p in model.parameters() if p.requires_grad]
    check_adapter(model, adapter)
    return [p.requires_grad_(True) for p in adapter_parameters(model, adapter).values()]


def trained_adapters(model: Any, trainable: Sequence[str] | None) -> list[str]:
    """The adapters an update trains: ``trainable`` (checked), else all of the model's."""
    names = adapter_names(model)
    if trainable is None:
        return names
    unknown = [a for a in trainable if a not in names]
    if unknown:
        raise ValueError(f"trainable_adapters names unknown adapter(s) {unknown}; this policy's "
                         f"adapters: {', '.join(names) or 'none (no LoRA)'}")
    return [a for a in names if a in trainable]


def saved_parameters(model: Any) -> dict[str, torch.nn.Parameter]:
    """What a checkpoint holds: the trainable parameters and every adapter's, frozen ones too
    (a frozen role's adapter may be a warm start that exists nowhere else)."""
    adapters = {n: p for name in adapter_names(model)
                for n, p in adapter_parameters(model, name).items()}
    return {n: p for n, p in model.named_parameters() if p.requires_grad or n in adapters}


def check_adapter_set(saved: Sequence[str] | None, current: Sequence[str], where: str) -> None:
    """Refuse a checkpoint of another adapter set, naming both. LoRA on one side only, or an
    older checkpoint (``saved`` None), is left to the parameter-name check that follows."""
    from .checkpoint import CheckpointError

    if saved and current and list(saved) != list(current):
        raise CheckpointError(f"{where} holds adapters {list(saved)}, but this policy has "
                              f"{list(current)}; load it into a policy with the same adapters")


def learning_rates(model: Any, config: Any) -> list[float]:
    """The optimizer's learning rates from ``config`` (PPOConfig), group by group as
    ``make_optimizer`` builds them (the critic's last): re-applied over a checkpoint's."""
    names = trained_adapters(model, config.trainable_adapters) or [""]
    return [(config.adapter_lr or {}).get(n, config.lr) for n in names] + [config.value_lr]


def param_groups(model: Any, trainable: Sequence[str] | None, lr: float, weight_decay: float,
                 adapter_lr: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """One AdamW group per trained adapter, in ``adapter_names`` order; frozen adapters get
    ``requires_grad=False`` and no group. Other trainable parameters (a model without LoRA,
    peft's ``modules_to_save``) join the first group, or form one with ``lr``."""
    names = adapter_names(model)
    keep = trained_adapters(model, trainable)
    unknown = sorted(set(adapter_lr or {}) - set(names))
    if unknown:
        raise ValueError(f"adapter_lr names unknown adapter(s) {unknown}; adapters: {names}")
    groups, in_adapters = [], set()
    for name in names:
        params = list(adapter_parameters(model, name).values())
        in_adapters.update(id(p) for p in params)
        for p in params:
            p.requires_grad_(name in keep)
        if name in keep:
            groups.append({"params": params, "lr": (adapter_lr or {}).get(name, lr),
                           "weight_decay": weight_decay})
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in in_adapters]
    if groups:
        groups[0]["params"] += rest
        return groups
    return [{"params": rest, "lr": lr, "weight_decay": weight_decay}]


def clip_by_adapter(groups: list[dict[str, Any]], max_norm: float) -> torch.Tensor:
    """Clip each adapter's gradient to ``max_norm`` on its own (one role's large gradient must
    not shrink another's step); returns the norm of all of them before the clip. With one
    group it is ``clip_grad_norm_`` as before."""
    if len(groups) == 1:
        return torch.nn.utils.clip_grad_norm_(groups[0]["params"], max_norm)
    norms = torch.stack([torch.nn.utils.clip_grad_norm_(g["params"], max_norm) for g in groups])
    return norms.norm()


class AdapterStats:
    """Per-adapter terms of one update: token means of the PPO terms over every forward of the
    update (all epochs), recomputed on each adapter's tokens with the loss's own function, and
    each adapter's gradient norm before the clip, averaged over minibatches."""

    def __init__(self, adapters: list[str]):
        self.adapters = adapters
        self.sums: dict[str, float] = {}
        """``<term>/<adapter>`` -> sum over tokens; ``tokens/<adapter>`` -> token count."""

    @staticmethod
    def for_model(model: Any, trainable: Sequence[str] | None) -> "AdapterStats":
        """Stats of the trained adapters; with fewer than two adapters none are kept (every call
        is a no-op: the global metrics say it all)."""
        several = len(adapter_names(model)) > 1
        return AdapterStats(trained_adapters(model, trainable) if several else [])

    def add_terms(self, rows: Sequence[Transition], logprobs: torch.Tensor, old: torch.Tensor,
                  advantages: torch.Tensor, ref: torch.Tensor | None,
                  is_weights: torch.Tensor | None, loss_terms: dict[str, Any]) -> None:
        """Accumulate the PPO terms of one forward's tokens, per adapter (flat (N,) inputs);
        ``loss_terms`` are ``ppo_loss``'s keyword settings, as the update passes them."""
        from .ppo import ppo_loss

        if not self.adapters:
            return

        owner = [adapter_of(tr) for tr in rows for _ in tr.response_ids]
        with torch.no_grad():
            for name in dict.fromkeys(owner):
                at = torch.tensor([a == name for a in owner], device=logprobs.device)
                part = ppo_loss(logprobs.detach()[at], old[at], advantages[at],
                                None if ref is None else ref[at],
                                is_weights=None if is_weights is None else is_weights[at],
                                **loss_terms)
                n = int(at.sum())
                self._add(f"tokens/{name}", n)
                for term in ("loss", "kl", "clip_frac"):
                    self._add(f"{term}/{name}", n * float(getattr(part, term)))

    def add_grad_norms(self, groups: list[dict[str, Any]]) -> None:
        """Each trained adapter's gradient norm now (after the all-reduce, before the clip);
        ``groups``: the optimizer's adapter groups, in ``adapters`` order."""
        if not self.adapters:
            return
        for name, group in zip(self.adapters, groups):
            grads = [p.grad.detach().norm() for p in group["params"] if p.grad is not None]
            self._add(f"grad_norm/{name}", float(torch.stack(grads).norm()) if grads else 0.0)
        self._add("minibatches", 1)

    def metrics(self, parallel: Any) -> dict[str, float]:
        """Merged over processes: token means of the terms, the mean gradient norm."""
        if not self.adapters:
            return {}
        merged: dict[str, float] = {}
        for part in parallel.gather(self.sums):
            for key, val in part.items():
                merged[key] = merged.get(key, 0.0) + val
        out = {}
        for key, val in merged.items():
            term, _, name = key.partition("/")
            if term in ("loss", "kl", "clip_frac"):
                out[key] = val / max(merged[f"tokens/{name}"], 1)
            elif term == "grad_norm":  # each process counted its own copy of every minibatch
                out[key] = val / max(merged["minibatches"], 1)
        return out

    def _add(self, key: str, value: float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + value


def adapter_rewards(batch: Any) -> dict[str, float]:
    """``reward/<adapter>``: mean total reward of the finished trajectories the adapter sampled
    in (a team's outcome, seen by each of its members)."""
    totals: dict[str, list[float]] = {}
    for traj in batch.trajectories:
        if traj.status != "ok":
            continue
        for name in dict.fromkeys(adapter_of(tr) for tr in traj.transitions):
            totals.setdefault(name, []).append(traj.total_reward)
    return {f"reward/{name}": sum(v) / len(v) for name, v in totals.items()}

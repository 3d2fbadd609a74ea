"""Stepwise PPO: ``trainer.step()`` = collect rollouts -> assign credit -> PPO epochs -> metrics.

Reads top to bottom like cleanrl: the loop is in ``step``, the objective in ``ppo.py``, the
advantage arithmetic in ``credit/``. Each step returns a ``StepState`` holding the whole batch, so a
notebook can inspect it, recompute advantages under another strategy, and carry on.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .. import credit as credit_lib
from .critic import ValueHead
from .ppo import ppo_loss
from ..records import Batch, Transition
from ..rollouts.threads import run_rollouts
from ..inference.prompts import dedupe_prompts
from .scoring import Scores, chunk_rows, score

__all__ = ["PPOConfig", "PPOTrainer", "StepState"]


@dataclass
class PPOConfig:
    tasks_per_step: int = 8
    """Distinct tasks sampled per step."""
    group_size: int = 4
    """Rollouts per task per step (the group for GRPO-style baselines)."""
    temperature: float = 1.0
    """Sampling temperature of rollouts (the logprobs and the loss use the same value)."""
    ppo_epochs: int = 1
    """Passes over the batch per step; >1 reuses samples off-policy (the clip then matters)."""
    minibatch_size: int = 16
    """Transitions per optimizer step."""
    lr: float = 2e-4
    """AdamW learning rate of the policy parameters (LoRA adapter or full model)."""
    weight_decay: float = 0.0
    clip_eps: float = 0.2
    """PPO clip range for the ratio pi/pi_behaviour."""
    clip_eps_high: float | None = None
    """Upper clip range if different (DAPO's clip-higher); None = clip_eps."""
    kl_coef: float = 0.02
    """Weight of the KL penalty to the reference (adapter-off) policy."""
    max_grad_norm: float = 1.0
    max_tokens_per_forward: int = 2048
    """Padded tokens per forward pass (a shared prompt counts once); minibatches are split
    (gradient accumulation) to fit."""
    value_lr: float = 1e-3
    """Learning rate of the critic head (used by the ``value`` credit strategy)."""
    value_coef: float = 0.5
    trainable_agents: tuple[str, ...] | None = None
    """Only transitions of these agent/role names enter the loss; None = all."""
    skip_zero_advantage: bool = True
    """Leave transitions with zero advantage out of the update (they carry no policy gradient)."""
    rollout_workers: int = 32
    """Agents run concurrently; their LLM calls are batched by the policy's engine."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.trainable_agents is not None:
            self.trainable_agents = tuple(self.trainable_agents)
        for name in ("tasks_per_step", "group_size", "ppo_epochs", "minibatch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"PPOConfig.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class StepState:
    """Everything about one training step; widgets and trackers read it directly."""

    step: int
    batch: Batch
    metrics: dict[str, float]
    credit: credit_lib.CreditStrategy
    ratios: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    """Per-token ratio pi/pi_behaviour after the last epoch, keyed by (traj_id, step)."""
    value_fn: Callable[[Batch], None] | None = field(default=None, repr=False)

    def recompute(self, strategy: str | credit_lib.CreditStrategy, **params: Any) -> "StepState":
        """Advantages of the same rollouts under another strategy (a copy; this state is kept)."""
        strategy = credit_lib.get(strategy, **params)
        batch = copy_batch(self.batch)
        if strategy.needs_values and any(tr.value is None for _, tr in batch.transitions()):
            if self.value_fn is None:
                raise ValueError("this batch has no critic values; recompute with a trainer's state")
            self.value_fn(batch)
        strategy.assign(batch)
        return dataclasses.replace(self, batch=batch, credit=strategy)

    def to_pandas(self):
        return self.batch.to_pandas()


def copy_batch(batch: Batch) -> Batch:
    """New Trajectory/Transition objects sharing the (never mutated) token lists."""
    return Batch([dataclasses.replace(t, transitions=[dataclasses.replace(tr, meta=dict(tr.meta))
                                                      for tr in t.transitions], meta=dict(t.meta))
                  for t in batch.trajectories])


class PPOTrainer:
    """PPO over traced agent rollouts. See module docstring for the loop."""

    def __init__(self, policy: Any, agent: Callable[[Any], Any], tasks: Sequence[Any], *,
                 credit: str | credit_lib.CreditStrategy = "uniform",
                 config: PPOConfig | None = None, callbacks: Sequence[Any] = ()):
        if not tasks:
            raise ValueError("PPOTrainer needs at least one task")
        self.policy = policy
        self.agent = agent
        self.tasks = list(tasks)
        self.config = config or PPOConfig()
        self.credit = credit_lib.get(credit)
        self.callbacks = list(callbacks)
        self.step_count = 0
        self.history: list[dict[str, float]] = []
        torch.manual_seed(self.config.seed)
        self._task_rng = random.Random(self.config.seed)
        self._task_queue: list[int] = []
        model = policy.model
        self.critic = ValueHead(model.config.hidden_size).to(policy.device)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the policy has no trainable parameters (frozen model without LoRA?)")
        self.optimizer = torch.optim.AdamW([
            {"params": params, "lr": self.config.lr, "weight_decay": self.config.weight_decay},
            {"params": list(self.critic.parameters()), "lr": self.config.value_lr, "weight_decay": 0.0},
        ])
        # Without an adapter, "disable the adapter" is impossible: keep a frozen copy for the KL.
        self._ref_model = None
        if self.config.kl_coef > 0 and not _has_adapter(model):
            self._ref_model = copy.deepcopy(model).requires_grad_(False).eval()

    # ------------------------------------------------------------------ the loop
    def step(self) -> StepState:
        cfg = self.config
        t0 = time.perf_counter()
        tasks = [self.tasks[i] for i in self._next_task_indices()]
        batch = run_rollouts(self.agent, tasks, group_size=cfg.group_size,
                             temperature=cfg.temperature, max_workers=cfg.rollout_workers,
                             group_prefix=f"s{self.step_count}/")
        rollout_s = time.perf_counter() - t0
        if batch.n_failed == len(batch):
            raise RuntimeError(f"all {len(batch)} rollouts failed; first error: {batch[0].error}")

        t1 = time.perf_counter()
        if self.credit.needs_values:
            self.critic_values(batch)
        self.credit.assign(batch)
        keys, rows = self._loss_rows(batch)
        metrics, ratios = self._update(rows, keys) if rows else (_empty_update_metrics(), {})
        update_s = time.perf_counter() - t1

        metrics.update(_batch_metrics(batch))
        metrics.update(rollout_s=rollout_s, update_s=update_s, n_loss_transitions=len(rows),
                       tokens_per_s=metrics["response_tokens"] / max(rollout_s, 1e-9))
        self.step_count += 1
        metrics["step"] = self.step_count
        state = StepState(step=self.step_count, batch=batch, metrics=metrics, credit=self.credit,
                          ratios=ratios, value_fn=self.critic_values)
        self.history.append(metrics)
        self._notify(state)
        return state

    def fit(self, n_steps: int, progress: bool = True) -> list[StepState]:
        """``n_steps`` calls of ``step()`` with a progress bar; returns their states."""
        from tqdm.auto import tqdm

        states = []
        bar = tqdm(range(n_steps), desc="ppo", disable=not progress)
        for _ in bar:
            state = self.step()
            states.append(state)
            bar.set_postfix(reward=f"{state.metrics['reward_mean']:.3f}",
                            kl=f"{state.metrics['kl']:.4f}")
        return states

    # ------------------------------------------------------------------ pieces
    def _next_task_indices(self) -> list[int]:
        """Walk through shuffled passes over the tasks, so every task is seen once per epoch."""
        out = []
        while len(out) < min(self.config.tasks_per_step, len(self.tasks)):
            if not self._task_queue:
                self._task_queue = list(range(len(self.tasks)))
                self._task_rng.shuffle(self._task_queue)
            out.append(self._task_queue.pop())
        return out

    def _loss_rows(self, batch: Batch) -> tuple[list[tuple[str, int]], list[Transition]]:
        """The transitions that enter the loss, with their (traj_id, step) keys."""
        allowed = self.config.trainable_agents
        keys, rows = [], []
        for traj, tr in batch.transitions():
            if not traj.usable or not tr.trainable or tr.advantage is None:
                continue
            if allowed is not None and tr.agent not in allowed:
                continue
            if self.config.skip_zero_advantage and tr.advantage == 0.0:
                continue
            keys.append((traj.traj_id, tr.step))
            rows.append(tr)
        return keys, rows

    def _update(self, rows: list[Transition], keys: list[tuple[str, int]]
                ) -> tuple[dict[str, float], dict]:
        cfg = self.config
        ref = self._reference_logprobs(rows) if cfg.kl_coef > 0 else None
        use_critic = self.credit.needs_values
        sums: dict[str, float] = {}
        n_mb = 0
        ratios: dict[tuple[str, int], list[float]] = {}
        first_err = None
        for epoch in range(cfg.ppo_epochs):
            order = self._minibatch_order(rows)
            for start in range(0, len(order), cfg.minibatch_size):
                idx = order[start:start + cfg.minibatch_size]
                mb_tokens = sum(len(rows[i].response_ids) for i in idx)
                self.optimizer.zero_grad(set_to_none=True)
                # Gradient accumulation over micro-batches that fit the token budget; each term is
                # weighted by its share of the minibatch, so the sum is the minibatch's token-mean.
                for micro in self._chunks([rows[i] for i in idx]):
                    mi = [idx[j] for j in micro]
                    mb = [rows[i] for i in mi]
                    fwd = self._forward(mb, grad=True, hidden=use_critic)
                    old = _flat([tr.logprobs for tr in mb], fwd.logprobs)
                    adv = torch.cat([torch.full((len(tr.response_ids),), float(tr.advantage))
                                     for tr in mb]).to(fwd.logprobs)
                    ref_lp = torch.cat([ref[i] for i in mi]) if ref is not None else None
                    out = ppo_loss(fwd.logprobs, old, adv, ref_lp, clip_eps=cfg.clip_eps,
                                   kl_coef=cfg.kl_coef, clip_eps_high=cfg.clip_eps_high)
                    weight = len(old) / mb_tokens
                    loss = out.loss * weight
                    value_loss = torch.zeros(())
                    if use_critic:
                        values = self.critic(fwd.prompt_hidden)
                        targets = torch.tensor([tr.ret for tr in mb], dtype=values.dtype,
                                               device=values.device)
                        value_loss = 0.5 * ((values - targets) ** 2).mean()
                        loss = loss + cfg.value_coef * value_loss * (len(mi) / len(idx))
                    if first_err is None:  # before any update: new == behaviour, up to numerics
                        first_err = (fwd.logprobs.detach() - old).abs().max().item()
                    loss.backward()
                    for key, val in (("loss", loss / weight), ("policy_loss", out.policy_loss),
                                     ("kl", out.kl), ("approx_kl", out.approx_kl),
                                     ("clip_frac", out.clip_frac), ("entropy", fwd.entropy.mean()),
                                     ("value_loss", value_loss)):
                        sums[key] = sums.get(key, 0.0) + weight * float(val.detach())
                    if epoch == cfg.ppo_epochs - 1:
                        for i, r in zip(mi, out.ratio.split(fwd.lengths)):
                            ratios[keys[i]] = r.tolist()
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    [p for g in self.optimizer.param_groups[:1] for p in g["params"]], cfg.max_grad_norm)
                self.optimizer.step()
                sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(grad_norm)
                n_mb += 1
        metrics = {k: v / n_mb for k, v in sums.items()}
        metrics["behaviour_logprob_err"] = first_err or 0.0
        if not use_critic:
            metrics.pop("value_loss")
        return metrics, ratios

    def _minibatch_order(self, rows: list[Transition]) -> list[int]:
        """Rows in shuffled order, those sharing a prompt kept adjacent: minibatches then hold
        whole groups, whose prompt the forward pass runs once (see ``scoring``)."""
        prompts, of_row = dedupe_prompts([tr.prompt_ids for tr in rows])
        shuffled: list[list[int]] = [[] for _ in prompts]
        for i, p in enumerate(of_row):
            shuffled[p].append(i)
        self._task_rng.shuffle(shuffled)
        return [i for group in shuffled for i in group]

    def _chunks(self, rows: list[Transition]) -> list[list[int]]:
        return chunk_rows(rows, self.config.max_tokens_per_forward)

    def _reference_logprobs(self, rows: list[Transition]) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        with torch.no_grad(), self._reference_context() as model:
            for chunk in self._chunks(rows):
                fwd = self._forward([rows[i] for i in chunk], grad=False, model=model)
                out.extend(fwd.logprobs.split(fwd.lengths))
        return out

    def _reference_context(self):
        from contextlib import nullcontext

        if self._ref_model is not None:
            return nullcontext(self._ref_model)
        return self.policy.reference()

    def critic_values(self, batch: Batch) -> None:
        """Fill ``Transition.value`` for every transition of the usable trajectories."""
        rows = [tr for traj, tr in batch.transitions() if traj.usable and tr.response_ids]
        with torch.no_grad():
            for idx in self._chunks(rows):
                chunk = [rows[i] for i in idx]
                fwd = self._forward(chunk, grad=False, hidden=True)
                for tr, v in zip(chunk, self.critic(fwd.prompt_hidden).tolist()):
                    tr.value = v

    def _forward(self, rows: list[Transition], *, grad: bool, hidden: bool = False,
                 model: Any = None) -> Scores:
        """Response-token logprobs of ``rows`` under ``model`` (default: the policy)."""
        return score(model if model is not None else self.policy.model, rows,
                     device=self.policy.device, grad=grad, hidden=hidden)

    def _notify(self, state: StepState) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, "on_step", cb)
            try:
                fn(state)
            except Exception as exc:  # noqa: BLE001 - a broken logger must not stop training
                warnings.warn(f"callback {cb!r} failed ({type(exc).__name__}: {exc}); training goes on",
                              stacklevel=2)

    # ------------------------------------------------------------------ checkpoints
    def save(self, directory: str | Path, keep_last: int | None = None) -> Path:
        """Atomic checkpoint under `directory`; `keep_last=k` prunes all but the newest k."""
        from .checkpoint import save_checkpoint

        return save_checkpoint(self, Path(directory), keep_last)

    @classmethod
    def load(cls, directory: str | Path, policy: Any, agent: Callable[[Any], Any],
             tasks: Sequence[Any], *, credit: str | credit_lib.CreditStrategy | None = None,
             callbacks: Sequence[Any] = ()) -> "PPOTrainer":
        from .checkpoint import load_checkpoint

        return load_checkpoint(cls, Path(directory), policy, agent, tasks, credit, callbacks)


def _has_adapter(model: Any) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def _flat(lists: list[list[float]], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor([x for xs in lists for x in xs], dtype=like.dtype, device=like.device)


def _empty_update_metrics() -> dict[str, float]:
    return dict(loss=0.0, policy_loss=0.0, kl=0.0, approx_kl=0.0, clip_frac=0.0, entropy=0.0,
                grad_norm=0.0, behaviour_logprob_err=0.0)


def _batch_metrics(batch: Batch) -> dict[str, float]:
    import statistics

    rewards = [t.total_reward for t in batch.trajectories if t.status == "ok"]
    advs = [tr.advantage for _, tr in batch.transitions() if tr.advantage is not None]
    return dict(
        reward_mean=statistics.fmean(rewards) if rewards else 0.0,
        reward_std=statistics.pstdev(rewards) if len(rewards) > 1 else 0.0,
        advantage_mean=statistics.fmean(advs) if advs else 0.0,
        advantage_std=statistics.pstdev(advs) if len(advs) > 1 else 0.0,
        n_trajectories=float(len(batch)),
        n_failed=float(batch.n_failed),
        n_no_llm_calls=float(sum(bool(t.meta.get("no_llm_calls")) for t in batch.trajectories)),
        n_transitions=float(sum(len(t.transitions) for t in batch.trajectories)),
        response_tokens=float(sum(len(tr.response_ids) for _, tr in batch.transitions())),
    )

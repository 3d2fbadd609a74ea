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
from .callbacks import Callback, as_callback
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import PPOConfig
from .critic import ValueHead
from .distributed import DataParallel
from .offpolicy import truncated_is_weights
from .ppo import ppo_loss
from ..records import Batch, Transition
from ..rollouts.threads import run_rollouts
from ..tracing import derive_seed
from ..inference.adapters import has_adapter
from ..inference.precision import resolve_dtype
from .scoring import Scores, chunk_rows, score, sharing_groups

__all__ = ["PPOConfig", "PPOTrainer", "StepState"]


@dataclass
class StepState:
    """Everything about one training step; widgets and trackers read it directly."""

    step: int
    batch: Batch
    metrics: dict[str, float]
    credit: credit_lib.CreditStrategy
    ratios: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    """Per-token ratio pi/pi_behaviour after the last epoch, keyed by (traj_id, step)."""
    trainer: "PPOTrainer | None" = field(default=None, repr=False)
    """The trainer that made this step: its critic fills values for ``recompute("value")`` while
    this is still its latest step (after that the critic and the policy have moved on)."""

    def recompute(self, strategy: str | credit_lib.CreditStrategy, **params: Any) -> "StepState":
        """Advantages of the same rollouts under another strategy (a copy; this state is kept).

        A value-based strategy needs critic values: those recorded at training time are reused;
        otherwise they come from the trainer's critic as it is after this step's update, which
        only exists while this is the trainer's latest step (older states refuse).
        """
        strategy = credit_lib.get(strategy, **params)
        batch = copy_batch(self.batch)
        if strategy.needs_values and any(tr.value is None for _, tr in batch.transitions()):
            if self.trainer is None:
                raise ValueError("this batch has no critic values and no trainer to compute them")
            if self.trainer.step_count != self.step:
                raise ValueError(
                    f"step {self.step}'s batch has no critic values, and the critic has moved on "
                    f"(the trainer is at step {self.trainer.step_count}); recompute a value strategy "
                    "on the latest StepState, or train with it so values are recorded")
            self.trainer.critic_values(batch)
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
                 config: PPOConfig | None = None, callbacks: Sequence[Any] = (),
                 sync: Any = None, parallel: DataParallel | None = None,
                 reference_weights: dict[str, torch.Tensor] | None = None):
        if not tasks:
            raise ValueError("PPOTrainer needs at least one task")
        self.policy = policy
        self.agent = agent
        self.tasks = list(tasks)
        self.config = config or PPOConfig()
        self.credit = credit_lib.get(credit)
        self._callbacks: list[Callback] = []
        for cb in callbacks:
            self.add_callback(cb)
        self.sync = sync
        """An ``AdapterSync``: before a step's rollouts, push the adapter to the inference server."""
        self.parallel = parallel or DataParallel()
        """This process's rank in a data-parallel group (``distributed.py``); one process by default."""
        self.reference_weights = reference_weights
        """Trainable weights of the KL reference, e.g. the warm start's adapter (``train
        --init-from``), as TRL's reference is the SFT model; None = the adapter-off base model."""
        self.step_count = 0
        self.history: list[dict[str, float]] = []
        torch.manual_seed(self.config.seed)
        # Two streams, so the tasks a step sees never depend on how many loss rows earlier
        # steps had (that number depends on the credit strategy): runs that compare strategies
        # on one seed train on the same tasks at every step.
        self.task_rng = random.Random(f"tasks/{self.config.seed}")
        self.minibatch_rng = random.Random(f"minibatches/{self.config.seed}")
        self.task_queue: list[int] = []
        model = policy.model
        self.update_dtype = resolve_dtype(self.config.update_dtype, str(policy.device))
        sampler_dtype = getattr(getattr(policy, "engine", None), "decode_dtype", torch.float32)
        self.recompute_logprobs = (self.config.recompute_logprobs or sampler_dtype != torch.float32
                                   or self.update_dtype != torch.float32)
        """PPO's old policy = the trainer's own forward before the update, not the sampler's
        logprobs: asked for, or implied when the sampler or the update multiply in bf16 (their
        logprobs then differ by ~1e-2, which would shift every ratio)."""
        self.critic = ValueHead(model.config.hidden_size).to(policy.device)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the policy has no trainable parameters (frozen model without LoRA?)")
        if self.config.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.optimizer = torch.optim.AdamW([
            {"params": params, "lr": self.config.lr, "weight_decay": self.config.weight_decay},
            {"params": list(self.critic.parameters()), "lr": self.config.value_lr, "weight_decay": 0.0},
        ])
        # Without an adapter, "disable the adapter" is impossible: keep a frozen copy for the KL.
        self._ref_model = None
        if self.config.kl_coef > 0 and not has_adapter(model) and reference_weights is None:
            self._ref_model = copy.deepcopy(model).requires_grad_(False).eval()

    # ------------------------------------------------------------------ the loop
    def step(self) -> StepState:
        cfg = self.config
        t0 = time.perf_counter()
        if self.sync is not None and self.sync.due(self.step_count):  # raises before any change
            self._sync_adapter()
        t_sampling = time.perf_counter()
        tasks = [self.tasks[i] for i in self._next_task_indices()]
        # Data parallel: this process runs its share of the tasks, then every process holds the
        # whole batch (credit and minibatches need it) and knows which rows it sampled.
        rank_part = (self.parallel.rank,) if self.parallel.enabled else ()  # own seeds per rank
        rank = f"r{self.parallel.rank}/" if self.parallel.enabled else ""
        local = run_rollouts(self.agent, self.parallel.shard(tasks), group_size=cfg.group_size,
                             timeout_s=cfg.rollout_timeout_s,
                             temperature=cfg.temperature, max_workers=cfg.rollout_workers,
                             group_prefix=f"s{self.step_count}/{rank}",
                             seed=derive_seed("rollouts", cfg.seed, self.step_count, *rank_part))
        batch, own = self.parallel.gather_batch(local, len(tasks), cfg.group_size)
        rollout_s = time.perf_counter() - t_sampling  # tokens_per_s is the sampler's alone
        if batch.n_failed == len(batch):
            raise RuntimeError(f"all {len(batch)} rollouts failed; first error: {batch[0].error}")
        return self.learn(batch, rollout_s=rollout_s, sync_s=t_sampling - t0, own=own)

    def learn(self, batch: Batch, *, rollout_s: float = 0.0, sync_s: float = 0.0,
              own: Any = None) -> StepState:
        """Credit -> PPO epochs on ``batch`` -> metrics: the second half of ``step()``.

        ``step()`` calls it on fresh rollouts; ``offline.offline_ppo_step`` on a stored batch
        (checked there for behaviour logprobs), so both take exactly the same update. ``own``:
        the trajectory ids this process sampled under data parallelism (None: all of them).
        """
        sync_metrics = ({**self._stamp_versions(batch), "sync_s": sync_s}
                        if self.sync is not None else {})
        t1 = time.perf_counter()
        if self.credit.needs_values:
            self.critic_values(batch)
        self.credit.assign(batch)
        keys, rows = self._loss_rows(batch)
        owned = [own is None or key[0] in own for key in keys]  # this process's share of the update
        metrics, ratios = self._update(rows, keys, owned) if rows else (_empty_update_metrics(), {})
        update_s = time.perf_counter() - t1

        metrics.update(_batch_metrics(batch), **sync_metrics)
        metrics.update(rollout_s=rollout_s, update_s=update_s, n_loss_transitions=len(rows),
                       tokens_per_s=metrics["response_tokens"] / max(rollout_s, 1e-9))
        self.step_count += 1
        metrics["step"] = self.step_count
        state = StepState(step=self.step_count, batch=batch, metrics=metrics, credit=self.credit,
                          ratios=ratios, trainer=self)
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
    def _sync_adapter(self) -> None:
        """Rank 0 pushes the adapter; every rank learns the outcome, so all fail or all switch."""
        from .sync import AdapterSyncError

        error = None
        if self.parallel.is_main:
            try:
                self.sync.sync(self.policy, self.step_count)
            except AdapterSyncError as exc:
                error = str(exc)
        error, version = self.parallel.broadcast((error, self.sync.version))
        if error is not None:
            raise AdapterSyncError(error)
        if not self.parallel.is_main:
            self.sync.adopt(version, self.step_count)

    def _stamp_versions(self, batch: Batch) -> dict[str, float]:
        """Record the adapter version each transition was sampled with (the server's word when
        the proxy recorded one); count those not sampled by the version now live."""
        stale = 0
        for _, tr in batch.transitions():
            version = tr.meta.setdefault("adapter_version", self.sync.version)
            stale += version != self.sync.version
        return {"stale_transitions": float(stale)}

    def _next_task_indices(self) -> list[int]:
        """Walk through shuffled passes over the tasks, so every task is seen once per epoch."""
        out = []
        while len(out) < min(self.config.tasks_per_step, len(self.tasks)):
            if not self.task_queue:
                self.task_queue = list(range(len(self.tasks)))
                self.task_rng.shuffle(self.task_queue)
            out.append(self.task_queue.pop())
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

    def _update(self, rows: list[Transition], keys: list[tuple[str, int]],
                owned: list[bool] | None = None) -> tuple[dict[str, float], dict]:
        """PPO epochs over minibatches: minibatch -> loss (accumulated) -> clip -> step.

        With data parallelism every process walks the same minibatches but computes only the
        rows it ``owned`` (sampled); gradients are summed over processes before the clip.
        """
        cfg = self.config
        owned = owned or [True] * len(rows)
        mine = [i for i, o in enumerate(owned) if o]
        ref = self._by_row(self._reference_logprobs, rows, mine) if cfg.kl_coef > 0 else None
        orders = [self._minibatch_order(rows)]  # epoch 0's now: the recompute skips its first minibatch
        old = None
        if self.recompute_logprobs:
            # Rows of the first minibatch take their old logprobs from their own forward in
            # _accumulate (no step has happened yet: it is the same model), so a one-minibatch
            # update recomputes nothing; the rest are scored now, before the first step.
            first = set(orders[0][:cfg.minibatch_size])
            old = self._by_row(self._policy_logprobs, rows, [i for i in mine if i not in first])
        policy_params = self.optimizer.param_groups[0]["params"]
        all_params = [p for g in self.optimizer.param_groups for p in g["params"]]
        sums: dict[str, float] = {}
        ratios: dict[tuple[str, int], list[float]] = {}
        n_mb, grad_norms, first_err = 0, 0.0, 0.0
        for epoch in range(cfg.ppo_epochs):
            order = orders[0] if epoch == 0 else self._minibatch_order(rows)
            for start in range(0, len(order), cfg.minibatch_size):
                mb_idx = order[start:start + cfg.minibatch_size]
                self.optimizer.zero_grad(set_to_none=True)
                stats, mb_ratios = self._accumulate(rows, mb_idx, ref, old, owned)
                self.parallel.all_reduce_grads(all_params)
                grad_norm = torch.nn.utils.clip_grad_norm_(policy_params, cfg.max_grad_norm)
                self.optimizer.step()
                err = stats.pop("behaviour_logprob_err")
                for k, v in stats.items():  # this process's share of each token-mean
                    sums[k] = sums.get(k, 0.0) + v
                grad_norms += float(grad_norm)  # the same on every process
                if epoch == cfg.ppo_epochs - 1:
                    ratios.update({keys[i]: r for i, r in mb_ratios.items()})
                if n_mb == 0 or (old is not None and epoch == 0):
                    first_err = max(first_err, err)
                n_mb += 1
        merged: dict[str, float] = {}
        for part in self.parallel.gather(sums):
            for key, val in part.items():
                merged[key] = merged.get(key, 0.0) + val
        metrics = {k: v / n_mb for k, v in merged.items()}
        metrics["grad_norm"] = grad_norms / n_mb
        # Before any update (or, with recomputed logprobs, over the whole first epoch): the
        # sampler's logprobs against the trainer's, numerics only when they are the same model.
        metrics["behaviour_logprob_err"] = max(self.parallel.gather(first_err))
        if self.parallel.enabled:
            for part in self.parallel.gather(ratios):
                ratios.update(part)
        if not self.credit.needs_values:
            metrics.pop("value_loss", None)
        return metrics, ratios

    @staticmethod
    def _by_row(fn: Callable[[list[Transition]], list[torch.Tensor]], rows: list[Transition],
                which: list[int]) -> dict[int, torch.Tensor]:
        """``fn`` over the rows at ``which`` (this process's), keyed by row index."""
        return dict(zip(which, fn([rows[i] for i in which]))) if which else {}

    def _accumulate(self, rows: list[Transition], mb_idx: list[int],
                    ref: dict[int, torch.Tensor] | None, old: dict[int, torch.Tensor] | None,
                    owned: list[bool]) -> tuple[dict[str, float], dict[int, list[float]]]:
        """Backward of one minibatch's loss in micro-batches that fit the token budget.

        Each micro-batch's loss is weighted by its share of the minibatch's response tokens (all
        processes' rows), so the accumulated (and all-reduced) gradient is that of the
        minibatch's token-mean loss. ``old``: recomputed logprobs, PPO's old policy in place of
        the sampler's, with truncated importance weights; a row missing from it (first minibatch
        of the first epoch) gets this forward's values, stored for later epochs. Returns this
        process's share of the minibatch's stats (token-weighted) and its rows' per-token ratios.
        """
        cfg = self.config
        use_critic = self.credit.needs_values
        mb_tokens = sum(len(rows[i].response_ids) for i in mb_idx)
        mine = [i for i in mb_idx if owned[i]]
        stats: dict[str, float] = {}
        ratios: dict[int, list[float]] = {}
        err = 0.0
        for micro in self._chunks([rows[i] for i in mine]):
            idx = [mine[j] for j in micro]
            mb = [rows[i] for i in idx]
            fwd = self._forward(mb, grad=True, hidden=use_critic)
            old_logprobs = _flat([tr.logprobs for tr in mb], fwd.logprobs)  # the sampler's
            is_weights = None
            weight = len(old_logprobs) / mb_tokens
            if old is not None:
                for i, fresh in zip(idx, fwd.logprobs.detach().split(fwd.lengths)):
                    old.setdefault(i, fresh)
                behaviour, old_logprobs = old_logprobs, torch.cat([old[i] for i in idx])
                corr = truncated_is_weights(old_logprobs, behaviour, cap=cfg.tis_cap)
                is_weights = corr.weights
                err = max(err, float(corr.max_abs_logprob_diff))
                for key, val in (("is_mismatch_kl", corr.mismatch_kl),
                                 ("is_truncation_frac", corr.truncation_frac),
                                 ("is_weight_mean", corr.weights.mean())):
                    stats[key] = stats.get(key, 0.0) + weight * float(val)
            advantages = torch.cat([torch.full((len(tr.response_ids),), float(tr.advantage))
                                    for tr in mb]).to(fwd.logprobs)
            ref_logprobs = torch.cat([ref[i] for i in idx]) if ref is not None else None
            out = ppo_loss(fwd.logprobs, old_logprobs, advantages, ref_logprobs,
                           clip_eps=cfg.clip_eps, kl_coef=cfg.kl_coef, clip_eps_high=cfg.clip_eps_high,
                           is_weights=is_weights)
            loss = out.loss * weight
            value_loss = torch.zeros(())
            if use_critic:
                values = self.critic(fwd.prompt_hidden)
                targets = torch.tensor([tr.ret for tr in mb], dtype=values.dtype, device=values.device)
                value_loss = 0.5 * ((values - targets) ** 2).mean()
                loss = loss + cfg.value_coef * value_loss * (len(idx) / len(mb_idx))
            loss.backward()
            if old is None:
                err = max(err, (fwd.logprobs.detach() - old_logprobs).abs().max().item())
            for key, val in (("loss", out.loss), ("policy_loss", out.policy_loss), ("kl", out.kl),
                             ("approx_kl", out.approx_kl), ("clip_frac", out.clip_frac),
                             ("entropy", fwd.entropy.mean()), ("value_loss", value_loss)):
                stats[key] = stats.get(key, 0.0) + weight * float(val.detach())
            ratios.update({i: r.tolist() for i, r in zip(idx, out.ratio.split(fwd.lengths))})
        stats["behaviour_logprob_err"] = err
        return stats, ratios

    def _minibatch_order(self, rows: list[Transition]) -> list[int]:
        """Rows in shuffled order, those sharing a prompt or a trajectory's turns kept adjacent:
        minibatches then hold whole groups, whose forward runs once (see ``scoring``)."""
        shuffled = sharing_groups(rows)
        self.minibatch_rng.shuffle(shuffled)
        return [i for group in shuffled for i in group]

    def _chunks(self, rows: list[Transition]) -> list[list[int]]:
        return chunk_rows(rows, self.config.max_tokens_per_forward)

    def _reference_logprobs(self, rows: list[Transition]) -> list[torch.Tensor]:
        with self._reference_context() as model:
            return self._policy_logprobs(rows, model)

    def _policy_logprobs(self, rows: list[Transition], model: Any = None) -> list[torch.Tensor]:
        """Per-row response logprobs under ``model`` (default: the policy as it is now), no grad."""
        out: list[torch.Tensor] = []
        with torch.no_grad():
            for chunk in self._chunks(rows):
                fwd = self._forward([rows[i] for i in chunk], grad=False, model=model)
                out.extend(fwd.logprobs.split(fwd.lengths))
        return out

    def _reference_context(self):
        from contextlib import nullcontext

        if self._ref_model is not None:
            return nullcontext(self._ref_model)
        return self.policy.reference(self.reference_weights)

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
                     device=self.policy.device, grad=grad, hidden=hidden,
                     checkpointing=self.config.gradient_checkpointing, dtype=self.update_dtype)

    @property
    def callbacks(self) -> tuple[Callback, ...]:
        return tuple(self._callbacks)

    def add_callback(self, callback: Any) -> Callback:
        """Register ``callback`` (a ``Callback`` or a function ``fn(state)``) once."""
        if any(cb is callback or getattr(cb, "fn", None) is callback for cb in self._callbacks):
            return callback
        cb = as_callback(callback)
        self._callbacks.append(cb)
        return cb

    def _notify(self, state: StepState) -> None:
        for cb in self._callbacks:
            try:
                cb.on_step(state)
            except Exception as exc:  # noqa: BLE001 - a broken logger must not stop training
                warnings.warn(f"callback {cb!r} failed ({type(exc).__name__}: {exc}); training goes on",
                              stacklevel=2)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs, as tensors and plain data (loads with ``weights_only``).

        Weights are the trainable parameters only (the LoRA adapter, or the whole model when it
        is trained in full); RNG states cover task order, minibatch order and torch's sampling.
        """
        return {
            "step": self.step_count,
            "config": dataclasses.asdict(self.config),
            "credit": {"name": self.credit.name, "params": self.credit.params()},
            "params": {n: p.detach().cpu() for n, p in trainable_parameters(self.policy.model).items()},
            "critic": self.critic.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "tasks": _rng_state(self.task_rng),
                    "minibatches": _rng_state(self.minibatch_rng)},
            "task_queue": list(self.task_queue),
            "history": list(self.history),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s state. The trainer's own config and credit stay: a resumed
        run may change them (learning rates are re-applied over the optimizer's saved ones)."""
        params = trainable_parameters(self.policy.model)
        saved = state["params"]
        if {n: tuple(p.shape) for n, p in params.items()} != {n: tuple(t.shape) for n, t in saved.items()}:
            only = sorted(set(params) ^ set(saved))[:3]
            shapes = [n for n in params if n in saved and params[n].shape != saved[n].shape][:3]
            raise ValueError(f"does not fit this policy: parameters on one side only {only}, "
                             f"shape mismatches {shapes}")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])
        self.critic.load_state_dict(state["critic"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group, lr in zip(self.optimizer.param_groups, (self.config.lr, self.config.value_lr)):
            group["lr"] = lr
        torch.set_rng_state(state["rng"]["torch"])
        _set_rng_state(self.task_rng, state["rng"]["tasks"])
        _set_rng_state(self.minibatch_rng, state["rng"]["minibatches"])
        self.task_queue = [int(i) for i in state["task_queue"]]
        self.step_count = int(state["step"])
        self.history = [dict(h) for h in state["history"]]

    def save(self, directory: str | Path, keep_last: int | None = None) -> Path:
        """Atomic checkpoint under ``directory``; ``keep_last=k`` prunes all but the newest k."""
        # the portable copy of the weights, written into the checkpoint: a PEFT adapter folder
        extra = ((lambda tmp: self.save_adapter(tmp / "adapter")) if has_adapter(self.policy.model)
                 else None)
        return save_checkpoint(self.state_dict(), Path(directory), self.step_count,
                               model=getattr(self.policy, "name", ""), keep_last=keep_last,
                               extra=extra)

    def save_adapter(self, directory: str | Path) -> Path:
        """The policy's LoRA adapter as a standard PEFT folder (``peft.PeftModel.from_pretrained``
        and vLLM load it); see ``export.py``."""
        from .export import save_adapter

        return save_adapter(self.policy, directory, step=self.step_count)

    @classmethod
    def load(cls, directory: str | Path, policy: Any, agent: Callable[[Any], Any],
             tasks: Sequence[Any], *, credit: str | credit_lib.CreditStrategy | None = None,
             config: PPOConfig | None = None, callbacks: Sequence[Any] = (),
             reference_weights: dict[str, torch.Tensor] | None = None) -> "PPOTrainer":
        """A trainer continuing a checkpoint; ``credit``/``config`` default to the saved ones."""
        path, state = load_checkpoint(Path(directory))
        try:
            if config is None:
                config = PPOConfig(**state["config"])
            if credit is None:
                credit = credit_lib.get(state["credit"]["name"], **state["credit"]["params"])
        except (TypeError, ValueError, KeyError) as exc:  # e.g. a field this version lacks
            raise CheckpointError(f"checkpoint {path / 'state.pt'}: its config does not fit "
                                  f"this version: {type(exc).__name__}: {exc}") from exc
        trainer = cls(policy, agent, tasks, credit=credit, config=config, callbacks=callbacks,
                      reference_weights=reference_weights)
        try:
            trainer.load_state_dict(state)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, RuntimeError) as exc:
            # an edited or foreign state.pt: valid torch data of the wrong shape or structure
            raise CheckpointError(f"checkpoint {path / 'state.pt'}: {type(exc).__name__}: "
                                  f"{exc}") from exc
        return trainer


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _rng_state(rng: random.Random) -> list[Any]:
    """``random.Random`` state as plain lists (safe to load without unpickling)."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _set_rng_state(rng: random.Random, state: list[Any]) -> None:
    version, internal, gauss = state
    rng.setstate((int(version), tuple(int(x) for x in internal), gauss))


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
        n_timeout=float(sum(t.meta.get("reason") == "timeout" for t in batch.trajectories)),
        n_transitions=float(sum(len(t.transitions) for t in batch.trajectories)),
        response_tokens=float(sum(len(tr.response_ids) for _, tr in batch.transitions())),
    )

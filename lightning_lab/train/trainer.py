"""Stepwise PPO: ``trainer.step()`` = collect rollouts -> assign credit -> PPO epochs -> metrics.

Reads top to bottom like cleanrl: the step is in ``step``/``learn``, the rollouts in
``collect.py``, the PPO epochs in ``update.py``, the objective in ``ppo.py``, the advantage
arithmetic in ``credit/``. Each step returns a ``StepState`` holding the whole batch, so a
notebook can inspect it, recompute advantages under another strategy, and carry on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .. import credit as credit_lib
from .callbacks import Callback, CallbackList
from .collect import Prefetcher, TaskOrder, collect_rollouts, task_labels
from .config import PPOConfig
from .critic import ValueHead
from .distributed import DataParallel
from .multi_adapter import adapter_rewards
from .sync import AdapterSyncError, sync_everywhere
from .threads import SharedCores
from .trainer_state import TrainerState
from .versions import check_async, check_servers, stamp_lag, stamp_versions
from .update import (Scorer, empty_update_metrics, loss_rows, make_optimizer, owned_by_process,
                     ppo_update)
from ..records import Batch
from ..inference.servers import RolloutServerError
from ..inference.adapters import decoder_layers
from ..inference.engine import prefix_hit_rate
from ..inference.precision import resolve_dtype

__all__ = ["PPOConfig", "PPOTrainer", "StepState"]


@dataclass
class StepState:
    """Everything about one training iteration (``trainer.step()``); widgets and trackers read
    it directly."""

    iteration: int
    batch: Batch
    metrics: dict[str, float]
    credit: credit_lib.CreditStrategy
    ratios: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    """Per-token ratio pi/pi_behaviour after the last epoch, keyed by (traj_id, turn)."""
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
            if self.trainer.iteration != self.iteration:
                raise ValueError(
                    f"iteration {self.iteration}'s batch has no critic values, and the critic has "
                    f"moved on (the trainer is at iteration {self.trainer.iteration}); recompute "
                    "a value strategy on the latest StepState, or train with it so values are "
                    "recorded")
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


class PPOTrainer(TrainerState):
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
        self._callbacks = CallbackList(callbacks)
        self.sync = sync
        """An ``AdapterSync``: before a step's rollouts, push the adapter to the inference server."""
        self.parallel = parallel or DataParallel()
        """This process's rank in a data-parallel group (``distributed.py``); one process by default."""
        self.reference_weights = reference_weights
        """Trainable weights of the KL reference, e.g. the warm start's adapter (``train
        --init-from``), as TRL's reference is the SFT model; None = the adapter-off base model."""
        self.iteration = 0
        self.mid_update = False
        """True from the update's first optimizer step until its step finishes: the weights then
        belong to no step, so there is nothing consistent to checkpoint."""
        self.history: list[dict[str, float]] = []
        torch.manual_seed(self.config.seed)
        self.task_order = TaskOrder(
            len(self.tasks), self.config.seed, chunk=self.config.tasks_per_step,
            groups=(task_labels(self.tasks, self.config.group_tasks_by)
                    if self.config.group_tasks_by else None))
        self.minibatch_rng = random.Random(f"minibatches/{self.config.seed}")  # see TaskOrder
        model = policy.model
        if self.config.role_adapters:
            policy.map_roles(self.config.role_adapters)
        self.update_dtype = resolve_dtype(self.config.update_dtype, str(policy.device))
        sampler_dtype = getattr(getattr(policy, "engine", None), "decode_dtype", torch.float32)
        self.recompute_logprobs = (self.config.recompute_logprobs or self.config.max_staleness > 0
                                   or sampler_dtype != torch.float32
                                   or self.update_dtype != torch.float32)
        """PPO's old policy = the trainer's own forward before the update, not the sampler's
        logprobs: asked for, or implied when rollouts may be sampled by older weights
        (``max_staleness``) or when the sampler or the update multiply in bf16 (their logprobs
        then differ by ~1e-2, which would shift every ratio)."""
        self._prefetch: Prefetcher | None = None
        """The next step's rollouts, sampling while this step's update runs (``max_staleness``)."""
        self.critic = ValueHead(model.config.hidden_size).to(policy.device)
        if self.config.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.optimizer = make_optimizer(model, self.critic, self.config)
        self.optimizer.register_step_post_hook(self._weights_moved)
        self.scorer = Scorer(policy, self.config, self.update_dtype, reference_weights)
        """The update's forward passes, under the policy or the KL reference (``update.py``)."""

    # ------------------------------------------------------------------ the loop
    def step(self) -> StepState:
        """One PPO step on fresh rollouts.

        A Ctrl-C (``KeyboardInterrupt``) before the update's first optimizer step puts back the
        RNGs and task queue the step advanced: the trainer is then exactly at its last finished
        step, and a checkpoint saved now resumes as if the step had never begun. After that
        step, ``mid_update`` says the weights belong to no step. The same holds for an
        ``AdapterSyncError``, a ``RolloutServerError`` (a server failed during the rollouts; it
        carries them), and for rollouts prefetched for this step or the next
        (``max_staleness``): they are dropped and their tasks drawn again.
        """
        before = self._sampling_state()
        try:
            return self._step()
        except (KeyboardInterrupt, AdapterSyncError, RolloutServerError):
            if not self.mid_update:
                self._prefetch = None  # a daemon thread: left to finish, its rollouts unused
                self._load_sampling_state(before)
            raise

    def _step(self) -> StepState:
        t0 = time.perf_counter()
        if self.config.max_staleness > 0:
            check_async(self.config.max_staleness, self.sync, self.policy)
        if self._prefetch is not None:  # sampled during the last update
            prefetch, self._prefetch = self._prefetch, None
            batch, own, rollout_s = prefetch.result()
            version, sync_s = prefetch.version, 0.0  # its sync ran before the last update
        else:
            self._sync_if_due()  # raises before any change
            t_sampling = time.perf_counter()
            sync_s = t_sampling - t0  # kept out of rollout_s: tokens_per_s is the sampler's alone
            version = self._sampler_version()
            batch, own = collect_rollouts(self.agent, self._draw_tasks(), self.config,
                                          self.parallel, self.iteration)
            rollout_s = time.perf_counter() - t_sampling
        check_servers(self.sync, self.parallel, batch)
        if batch.n_failed == len(batch):
            raise RuntimeError(f"all {len(batch)} rollouts failed; first error: {batch[0].error}")
        if self.config.max_staleness > 0:
            self._start_prefetch()
        return self.learn(batch, rollout_s=rollout_s, sync_s=sync_s, own=own, version=version)

    def learn(self, batch: Batch, *, rollout_s: float = 0.0, sync_s: float = 0.0,
              own: Any = None, version: int | None = None) -> StepState:
        """Credit -> PPO epochs on ``batch`` -> metrics: the second half of ``step()``.

        ``step()`` calls it on fresh rollouts; ``offline.offline_ppo_step`` on a stored batch
        (checked there for behaviour logprobs), so both take exactly the same update. ``own``:
        the trajectory ids this process sampled under data parallelism (None: all of them).
        ``version``: the trainer step whose weights sampled ``batch`` (None: unknown, e.g. a
        stored batch); each transition then records its lag behind the weights updated now.
        """
        sync_metrics = ({**stamp_versions(self.sync, batch), "sync_s": sync_s}
                        if self.sync is not None else {})
        if version is not None:
            sync_metrics.update(stamp_lag(batch, version, self.iteration))
        t1 = time.perf_counter()
        if self.credit.needs_values:
            self.critic_values(batch)
        self.credit.assign(batch)
        keys, rows = loss_rows(batch, self.config)
        owned = owned_by_process(keys, own)
        with self._cores_beside_sampling():
            metrics, ratios = (ppo_update(self, rows, keys, owned) if rows
                               else (empty_update_metrics(), {}))
        update_s = time.perf_counter() - t1

        metrics.update(_batch_metrics(batch), **sync_metrics)
        if len(getattr(self.policy, "adapters", ())) > 1:
            metrics.update(adapter_rewards(batch))
        metrics.update(rollout_s=rollout_s, update_s=update_s, n_loss_transitions=len(rows),
                       tokens_per_s=metrics["response_tokens"] / max(rollout_s, 1e-9),
                       prefix_hit_rate=prefix_hit_rate(self.policy))
        self.iteration += 1
        self.mid_update = False
        metrics["step"] = self.iteration
        state = StepState(iteration=self.iteration, batch=batch, metrics=metrics, credit=self.credit,
                          ratios=ratios, trainer=self)
        self.history.append(metrics)
        self._callbacks.on_step(state)
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

    def settle(self) -> None:
        """Discard the rollouts prefetched for the next step (after they finish; their tasks are
        drawn again by the next step) and put the sampler on the current weights. Call it before
        sampling anything else mid-run, e.g. an evaluation, so that it sees the policy as trained
        so far. A no-op without a prefetch, and under data parallelism (where every process would
        have to settle together): evaluation there samples the sampler's version."""
        if self._prefetch is None or self.parallel.enabled:
            return
        prefetch, self._prefetch = self._prefetch, None
        prefetch.wait()
        self._set_task_state(prefetch.rewind)
        if self.sync is None:
            self.policy.engine.snapshot_weights(self.iteration)
        elif self.sync.synced_step != self.iteration:
            self._sync_adapter()

    # ------------------------------------------------------------------ pieces
    def _draw_tasks(self) -> list[Any]:
        return [self.tasks[i] for i in self.task_order.next(self.config.tasks_per_step)]

    def _sync_if_due(self) -> None:
        if self.sync is not None and self.sync.due(self.iteration):
            self._sync_adapter()

    def _sampler_version(self) -> int:
        """The trainer step whose weights rollouts started now are sampled by: the last synced
        adapter's with a server, else the policy's own (as of now)."""
        return self.iteration if self.sync is None else int(self.sync.synced_step)

    def _cores_beside_sampling(self) -> Any:
        """While the next step's rollouts sample (``max_staleness``), the update leaves the
        sampler's threads their cores (``threads.SharedCores``)."""
        prefetch = self._prefetch
        if prefetch is None:
            return contextlib.nullcontext()
        sampler_threads = getattr(getattr(self.policy.engine, "config", None), "num_threads", None)
        return SharedCores(decoder_layers(self.policy.model), lambda: not prefetch.done(),
                           sampler_threads or 1)

    def _start_prefetch(self) -> None:
        """Start sampling the next step's rollouts from the weights as they are before this
        step's update: the server's adapter is synced first when due, the local engine decodes
        from its own snapshot of them (``Engine.snapshot_weights``)."""
        self._sync_if_due()
        if self.sync is None:
            self.policy.engine.snapshot_weights(self.iteration)
        rewind = self._task_state()
        self._prefetch = Prefetcher(self.agent, self._draw_tasks(), self.config, self.parallel,
                                    self.iteration + 1, version=self._sampler_version(),
                                    rewind=rewind)

    def _sync_adapter(self) -> None:
        """Rank 0 pushes the adapter; every rank learns the outcome, so all fail or all switch."""
        sync_everywhere(self.sync, self.policy, self.iteration, self.parallel)

    def _weights_moved(self, *_: Any) -> None:
        self.mid_update = True

    def critic_values(self, batch: Batch) -> None:
        """Fill ``Transition.value`` for every transition of the usable trajectories."""
        rows = [tr for traj, tr in batch.transitions() if traj.usable and tr.response_ids]
        with torch.no_grad():
            for idx in self.scorer.chunks(rows):
                chunk = [rows[i] for i in idx]
                fwd = self.scorer.forward(chunk, grad=False, hidden=True)
                for tr, v in zip(chunk, self.critic(fwd.prompt_hidden).tolist()):
                    tr.value = v

    @property
    def callbacks(self) -> tuple[Callback, ...]:
        return tuple(self._callbacks)

    def add_callback(self, callback: Any) -> Callback:
        """Register ``callback`` (a ``Callback`` or a function ``fn(state)``) once."""
        return self._callbacks.add(callback)


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

"""The W&B trainer callback.

Design: ``WandbCallback`` is a plain object with ``on_step(state)`` (what ``PPOTrainer`` calls) and
``attach(trainer)``, which registers it on the trainer and lets it see what a ``StepState`` does not
carry: the model name, the full ``PPOConfig`` and the checkpoint method. A callback that was never
attached still logs every step (config then holds only the credit strategy and your ``config``).

Offline by default: unless you are logged in (``WANDB_API_KEY`` or a ``~/.netrc`` entry) or chose a
``WANDB_MODE`` yourself, runs are written to ``./wandb`` and never need an API key (``wandb sync``
uploads them later). If wandb is missing or fails, training goes on with one warning.

wandb is imported inside functions, so ``import lightning_lab.workbench.tracking`` stays cheap.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...train.callbacks import CallbackBase
from ...train.config import SFTConfig

__all__ = ["WandbCallback", "wandb_mode", "split_metrics", "transition_rows", "LOSS_KEYS"]

LOSS_KEYS = ("loss", "policy_loss", "value_loss", "kl", "approx_kl", "clip_frac", "entropy",
             "grad_norm", "behaviour_logprob_err")
"""Metrics logged under ``losses/``; every other step metric goes under ``train/``."""


def wandb_mode(explicit: str | None = None) -> str | None:
    """The mode to pass to ``wandb.init``: yours, ``WANDB_MODE``, online if logged in, else offline."""
    if explicit:
        return explicit
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY") or _netrc_has_wandb():
        return None  # wandb's own default (online)
    return "offline"


def _netrc_has_wandb() -> bool:
    import netrc

    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


@dataclass
class WandbCallback(CallbackBase):
    """Log PPO steps to W&B: ``train/*`` and ``losses/*`` per step, a transitions table every
    ``table_every`` steps, optional checkpoint artifacts, eval summaries via ``log_eval``.

    ``trainer = PPOTrainer(...); WandbCallback(project="demo").attach(trainer)``.
    """

    project: str = "lightning-lab"
    config: dict[str, Any] = field(default_factory=dict)
    """Extra config (env, data, notes); merged with what the trainer knows."""
    table_every: int = 5
    """Log a ``wandb.Table`` sample of transitions every k steps (0 = never)."""
    table_rows: int = 32
    log_checkpoints: bool = False
    """Save a trainer checkpoint as a ``model`` artifact every ``checkpoint_every`` steps and at finish."""
    checkpoint_every: int = 10
    name: str | None = None
    group: str | None = None
    tags: tuple[str, ...] = ()
    dir: str | None = None
    """Parent of the ``wandb/`` run folder (default: ``WANDB_DIR`` or the working directory)."""
    mode: str | None = None
    """``online`` | ``offline`` | ``disabled``; None = offline unless logged in (see ``wandb_mode``)."""
    entity: str | None = None
    init_kwargs: dict[str, Any] = field(default_factory=dict)
    finish_with_run: bool = True
    """Close the W&B run when the training run ends (``on_finish``); a sweep, which adds the
    run's summary afterwards, sets False and calls ``finish()`` itself."""

    def __post_init__(self) -> None:
        self.run: Any = None
        self.trainer: Any = None
        self.enabled = True
        self.best: dict[str, float] = {}
        self._owns_run = False

    # ------------------------------------------------------------------ wiring
    def attach(self, trainer: Any) -> "WandbCallback":
        """Register on ``trainer`` (idempotent) and remember it for config and checkpoints."""
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    def full_config(self, state: Any = None) -> dict[str, Any]:
        """Everything needed to reproduce the run: model, credit, the algorithm's config, environment,
        yours."""
        out: dict[str, Any] = {}
        trainer = self.trainer
        strategy = getattr(state, "credit", None) or getattr(trainer, "credit", None)
        if trainer is not None:
            out["model"] = getattr(trainer.policy, "name", type(trainer.policy).__name__)
            # SFT and rejection runs keep their hyper-parameters in RunConfig's ``sft`` section
            section = "sft" if isinstance(trainer.config, SFTConfig) else "ppo"
            out[section] = _jsonable(dataclasses.asdict(trainer.config))
            env = _env_name(trainer.tasks)
            if env:
                out["env"] = env
            out["n_tasks"] = len(trainer.tasks)
        if strategy is not None:
            out["credit"] = strategy.describe()
            out["credit_name"] = strategy.name
            out["credit_params"] = _jsonable(strategy.params())
        out.update(self.config)
        return out

    # ------------------------------------------------------------------ trainer hook
    def on_step(self, state: Any) -> None:
        if not self._ensure_run(state):
            return
        try:
            self.run.log(split_metrics(state.metrics), step=int(state.iteration))
            if self.table_every and state.iteration % self.table_every == 0:
                self.log_table(state)
            if (self.log_checkpoints and self.trainer is not None and self.checkpoint_every
                    and state.iteration % self.checkpoint_every == 0):
                self.log_checkpoint()
        except Exception as exc:  # noqa: BLE001 - tracking must never stop training
            self._disable(exc)

    def on_eval(self, metrics: dict[str, float], step: int) -> None:
        self.log_eval(metrics)

    def on_finish(self) -> None:
        if self.finish_with_run:
            self.finish()

    def log_table(self, state: Any) -> None:
        import wandb

        columns, rows = transition_rows(state.batch, self.table_rows)
        table = wandb.Table(columns=["step", *columns], data=[[state.iteration, *r] for r in rows])
        self.run.log({"samples/transitions": table}, step=int(state.iteration))

    def log_eval(self, metrics: dict[str, float], prefix: str = "eval") -> None:
        """Log evaluation metrics and keep ``best/<name>`` (the max so far) in the run summary."""
        if not self._ensure_run(None):
            return
        try:
            step = getattr(self.trainer, "iteration", None)
            data = {f"{prefix}/{k}": float(v) for k, v in metrics.items()}
            self.run.log(data, **({"step": int(step)} if step is not None else {}))
            for k, v in metrics.items():
                key = f"best/{prefix}_{k}"
                if key not in self.best or float(v) > self.best[key]:
                    self.best[key] = float(v)
                    self.run.summary[key] = float(v)
        except Exception as exc:  # noqa: BLE001
            self._disable(exc)

    def log_checkpoint(self) -> None:
        import wandb

        with tempfile.TemporaryDirectory(prefix="ll-ckpt-") as tmp:
            path = self.trainer.save(tmp)
            art = wandb.Artifact(f"{self.run.id}-checkpoint", type="model",
                                 metadata={"step": self.trainer.iteration})
            art.add_dir(str(path))
            self.run.log_artifact(art, aliases=["latest", f"step-{self.trainer.iteration}"])
            if hasattr(art, "wait") and (self.run.settings.mode or "") != "offline":
                art.wait()

    def finish(self) -> None:
        """Log a final checkpoint if asked, and close the run this callback opened."""
        if self.run is None:
            return
        try:
            if self.log_checkpoints and self.trainer is not None and self.enabled:
                self.log_checkpoint()
            if self._owns_run:
                self.run.finish()
        except Exception as exc:  # noqa: BLE001
            self._disable(exc)
        self.run = None

    # ------------------------------------------------------------------ internals
    def _ensure_run(self, state: Any) -> bool:
        if not self.enabled:
            return False
        if self.run is not None:
            return True
        try:
            import wandb

            config = self.full_config(state)
            if wandb.run is not None:  # inside wandb.agent or a user's own wandb.init: reuse it
                self.run = wandb.run  # never overwrite what the sweep controller set
                self.run.config.update({k: v for k, v in config.items() if k not in self.run.config})
                return True
            kwargs = dict(project=self.project, config=config, name=self.name, group=self.group,
                          tags=list(self.tags) or None, dir=self.dir or os.environ.get("WANDB_DIR"),
                          mode=wandb_mode(self.mode), entity=self.entity, reinit="finish_previous")
            kwargs.update(self.init_kwargs)
            if kwargs["dir"]:
                Path(kwargs["dir"]).mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(**{k: v for k, v in kwargs.items() if v is not None})
            self._owns_run = True
            return True
        except Exception as exc:  # noqa: BLE001 - ImportError, auth, network: tracking goes off
            self._disable(exc)
            return False

    def _disable(self, exc: BaseException) -> None:
        self.enabled = False
        warnings.warn(f"W&B tracking is off ({type(exc).__name__}: {exc}); training continues",
                      RuntimeWarning, stacklevel=3)


def split_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """``{"kl": .1, "reward_mean": .5}`` -> ``{"losses/kl": .1, "train/reward_mean": .5}``.

    A per-adapter metric goes where its family does (``kl/writer`` -> ``losses/kl/writer`` beside
    ``losses/kl``, ``reward/writer`` -> ``train/reward/writer``), so W&B shows each adapter's
    curve in the same section as the overall one.
    """
    out = {}
    for k, v in metrics.items():
        if k == "step" or not isinstance(v, (int, float)):
            continue
        out[f"{'losses' if k.partition('/')[0] in LOSS_KEYS else 'train'}/{k}"] = float(v)
    return out


def transition_rows(batch: Any, limit: int = 32, text_chars: int = 2000
                    ) -> tuple[list[str], list[list[Any]]]:
    """An evenly spread sample of ``limit`` transitions as table rows (prompt = last user turn)."""
    from ..widgets.tables import last_user_message

    pairs = list(batch.transitions())
    if len(pairs) > limit:
        stride = len(pairs) / limit
        pairs = [pairs[int(i * stride)] for i in range(limit)]
    columns = ["traj_id", "task_id", "question", "role", "response", "reward", "return",
               "advantage", "tokens", "status"]
    rows = [[traj.traj_id, traj.task_id, last_user_message(tr.prompt)[:text_chars], tr.role,
             tr.response[:text_chars], tr.reward, tr.ret, tr.advantage, len(tr.response_ids),
             traj.status] for traj, tr in pairs]
    return columns, rows


def _env_name(tasks: list[Any]) -> str | None:
    module = type(tasks[0]).__module__ if tasks else ""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "environments" else None


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))



"""``run(config)``: one training run, the same from the CLI, a sweep or a notebook.

Greedy dev evaluation before, steps of ``config.algorithm`` (``algorithms.py``: PPO iterations
until ``steps``, SFT optimizer steps for ``sft.epochs``, rejection rounds for ``sft.rounds``) or
until the wall-clock budget (with evaluations every ``eval_every`` steps and checkpoints every
``save_every``), a final checkpoint and evaluation, and ``summary.json``. The run folder holds everything needed to look at it or go on:
``config.yaml`` (the resolved config), ``metrics.jsonl``, ``trajectories.jsonl`` (PPO, rejection),
``eval_stepNNNN.jsonl``, ``checkpoints/`` and ``summary.json``.

Under ``torchrun`` / ``accelerate launch`` every process runs this same function: each samples its
share of a step's tasks and the gradients are summed (``distributed.py``); process 0 alone
evaluates, logs, writes the run folder and checkpoints, and decides when the budget is spent.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .. import credit as credit_lib
from .. import envs
from .algorithms import PPORun, RejectionRun, SFTRun, sft_data
from .callbacks import Callback, as_callback
from .checkpoint import clean_orphans, latest_checkpoint
from .logs import roll_back_logs
from .threads import ThreadGovernor, requested_threads
from .config import (FROZEN_ON_RESUME, ConfigError, RunConfig, check_out, credit_fields_not_taken,
                     flatten, load_config, load_yaml, override, save_config)

__all__ = ["RunSetup", "RolloutEngine", "build", "run", "resume_config", "load_env", "load_tasks",
           "load_policy", "make_agent", "credit_strategy", "start_rollout_engine"]

CONFIG_FILE = "config.yaml"
FAILED_ROLLOUTS = "failed_rollouts.jsonl"
"""Rollouts of steps that failed before their update (a rollout server died): kept, not trained."""


@dataclass
class RunSetup:
    """What a run is made of; ``build(config)`` returns it without training."""

    config: RunConfig
    env: Any
    policy: Any
    agent: Any
    train_tasks: list[Any]
    dev_tasks: list[Any]
    trainer: Any
    """The ``algorithms.Algorithm`` the run steps (a ``PPOTrainer`` for ppo)."""
    callbacks: list[Callback]
    resumed: bool = False
    parallel: Any = None
    """This process's ``DataParallel`` place (one process unless launched by torchrun/accelerate)."""
    rollouts: "RolloutEngine | None" = None
    """The vLLM server rollouts sample from (``rollout_engine: vllm``); None = the local engine."""

    def close(self) -> None:
        """Stop what the run started: a user agent's proxy, a vLLM server."""
        if hasattr(self.env, "close"):
            self.env.close()
        if self.rollouts is not None:
            self.rollouts.close()

    @property
    def out(self) -> Path:
        return Path(self.config.out)

    def evaluate(self, tag: str) -> dict[str, float]:
        """Greedy dev evaluation, saved as ``eval_<tag>.jsonl`` and passed to the callbacks;
        nothing without dev tasks (``eval_limit: 0``). Rollouts prefetched for the next step are
        discarded first, so it samples the current weights (``settle``)."""
        from ..rollouts import evaluate

        if not self.dev_tasks:
            return {}
        self.trainer.settle()
        batch, metrics = evaluate(self.agent, self.dev_tasks, summarize=self.env.summarize,
                                  timeout_s=self.config.ppo.rollout_timeout_s)
        batch.save_jsonl(self.out / f"eval_{tag}.jsonl")
        for cb in self.callbacks:
            cb.on_eval(metrics, self.trainer.iteration)
        return metrics


def resume_config(out: str | Path | None, changes: dict[str, Any],
                  log: Callable[[str], None] = print, config_file: str | Path | None = None
                  ) -> RunConfig:
    """The config of a resumed run: the saved ``config.yaml`` with the fields of
    ``config_file`` and then ``changes`` applied (``out`` None: theirs, else the default).

    Changes to fields that decide weights or the task list (``FROZEN_ON_RESUME``) are refused;
    every other change is applied and logged, never silently dropped. A run folder with no run
    in it yet starts a new run, so a restart loop can pass ``--resume`` from the first start.
    """
    if config_file is not None:
        load_config(config_file)  # its own errors name the file
        changes = {**load_yaml(config_file), **changes}
    out = str(out if out is not None else changes.get("out", RunConfig.out))
    check_out(out)  # Path("") would be the current directory
    changes = {**changes, "out": out}  # the folder resumed from, even if it was moved
    out = Path(out)
    path = out / CONFIG_FILE
    if not path.exists():
        return _fresh_resume(out, changes, log)
    saved = load_config(path)
    if "credit" in changes:  # a new strategy keeps only the saved parameters it takes
        changes = {**dict.fromkeys(credit_fields_not_taken(changes["credit"])), **changes}
    config = override(saved, changes)
    old, new = flatten(saved), flatten(config)
    changed = {k: (old[k], new[k]) for k in new if old.get(k) != new[k] and k != "resume"}
    frozen = sorted(k for k in changed if k in FROZEN_ON_RESUME)
    if frozen:
        raise ConfigError("cannot resume with a different " + ", ".join(
            f"{k} ({changed[k][0]!r} -> {changed[k][1]!r})" for k in frozen)
            + "; start a new run (another out) instead")
    for k, (a, b) in sorted(changed.items()):
        log(f"resume: {k} changed {a!r} -> {b!r}")
    return dataclasses.replace(config, resume=True)


def _fresh_resume(out: Path, changes: dict[str, Any], log: Callable[[str], None]) -> RunConfig:
    """``--resume`` where no run was saved yet: a new run, unless checkpoints exist without
    the config that says what they are."""
    if latest_checkpoint(out / "checkpoints") is not None:
        raise ConfigError(f"cannot resume: {out / CONFIG_FILE} does not exist, but "
                          f"{out / 'checkpoints'} holds checkpoints; restore the config or start "
                          "a new run (another out)")
    log(f"resume: no run in {out} yet ({CONFIG_FILE} missing): starting a new run")
    return dataclasses.replace(override(RunConfig(), changes), resume=True)


def load_env(config: RunConfig) -> Any:
    """The environment, or the user's agent and task file standing in for one."""
    if config.agent or config.agent_cmd:
        from .user_agents import UserAgents

        return UserAgents(config.agent, config.agent_cmd, config.tasks, config.max_tokens_cap)
    try:
        return envs.get(config.env)
    except KeyError as exc:
        raise ConfigError(f"--env: {exc.args[0]}") from exc


def load_tasks(env: Any, config: RunConfig, split: str, limit: int | None) -> list[Any]:
    """``env.load_tasks`` with the run's data/seed/task options; bad options are usage errors."""
    try:
        return env.load_tasks(split, data=config.data, seed=config.seed, limit=limit,
                              **config.task_options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{config.env} tasks ({split}; --data / --task-option): {exc}") from exc


def make_agent(env: Any, policy: Any, config: RunConfig) -> Any:
    try:
        return env.make_agent(policy, **config.agent_options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{config.env} agent (--agent-option): {exc}") from exc


def load_policy(config: RunConfig) -> Any:
    from ..inference import models
    from ..inference.adapters import lora_flag

    cap = requested_threads(config.threads)
    decode_threads = config.decode_threads
    if cap is not None:  # the user's thread cap holds for the sampling worker too
        decode_threads = min(decode_threads or cap, cap)
    return models.load(config.model, lora=lora_flag(config.lora), device=config.device,
                       seed=config.seed, decode_dtype=config.decode_dtype,
                       decode_threads=decode_threads, adapters=config.adapters)


@dataclass
class RolloutEngine:
    """vLLM servers behind the policy's sampling entry points, with the adapter sync into them."""

    engine: Any
    sync: Any
    servers: list[Any] = dataclasses.field(default_factory=list)
    """The ``VLLMServer``s this run started (none when attached to the user's)."""

    def close(self) -> None:
        self.engine.close()
        _stop(self.servers)


def _stop(servers: list[Any]) -> None:
    for server in servers:
        server.stop()


def start_rollout_engine(config: RunConfig, policy: Any, folder: Path, step: int = 0,
                         log: Callable[[str], None] = print,
                         parallel: Any = None) -> RolloutEngine | None:
    """``rollout_engine: vllm``: start or attach to the servers, refuse any serving another base
    model, make them the policy's engine, and load the policy's adapters as version ``step`` (so
    even the first evaluation samples the trainer's weights). None for the local engine.
    Under data parallelism (``parallel``) process 0 names and loads the versions."""
    if config.rollout_engine != "vllm":
        return None
    from ..inference.adapters import has_adapter
    from ..inference.vllm_engine import VLLMEngine, check_base_model
    from .distributed import DataParallel
    from .sync import AdapterSync, SyncConfig, sync_everywhere

    if not has_adapter(policy.model):
        raise ConfigError("--rollout-engine vllm syncs a LoRA adapter into the server; "
                          "--lora off has none")
    servers = _launch_vllm(config, policy, folder, log) if config.vllm_python else []
    try:
        engine = VLLMEngine.for_policy([s.url for s in servers] or config.vllm_url, policy,
                                       allow_degraded=config.vllm_allow_degraded)
        gap = check_base_model(engine, policy)
        log(f"vLLM at {engine.base_url} serves the trainer's base model "
            f"(logprob gap {gap:.3f} nats/token)")
        policy.engine.close()
        policy.engine = engine
        adapters = Path(config.adapter_dir) if config.adapter_dir else folder / "adapters"
        adapters.mkdir(parents=True, exist_ok=True)
        # a name of its own per run: a server outlives runs, and may serve several at once
        parallel = parallel or DataParallel()
        prefix = parallel.broadcast(f"ll-{uuid.uuid4().hex[:8]}")
        sync = AdapterSync(engine, SyncConfig(export_dir=str(adapters), prefix=prefix))
        sync_everywhere(sync, policy, step, parallel)
    except BaseException:
        _stop(servers)
        raise
    return RolloutEngine(engine, sync, servers)


def _launch_vllm(config: RunConfig, policy: Any, folder: Path,
                 log: Callable[[str], None]) -> list[Any]:
    """Start ``config.vllm_servers`` of ``config.vllm_python``'s vLLM on the policy's base model,
    one after the other (each loads the model); logs to <folder>/vllm.log, vllm-1.log, ..."""
    from ..inference.vllm_server import (VLLMServer, base_model_dir, check_python, lora_rank,
                                         max_loras, served_dtype)

    check_python(config.vllm_python)
    started: list[Any] = []
    try:
        for i in range(config.vllm_servers):
            server = VLLMServer(config.vllm_python, base_model_dir(policy),
                                folder / ("vllm.log" if i == 0 else f"vllm-{i}.log"),
                                max_lora_rank=lora_rank(policy), max_loras=max_loras(policy),
                                dtype=served_dtype(policy, config.vllm_dtype))
            log(f"starting vLLM ({config.vllm_python}) on {server.url}, log {server.log_path}")
            started.append(server.start(config.vllm_start_timeout_s))
    except BaseException:
        _stop(started)
        raise
    return started


def credit_strategy(config: RunConfig) -> credit_lib.CreditStrategy:
    try:
        return credit_lib.get(config.credit, **config.credit_params())
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"--credit {config.credit}: {exc.args[0]}") from exc


def build(config: RunConfig, callbacks: Sequence[Any] = (),
          log: Callable[[str], None] = print) -> RunSetup:
    """Environment, tasks, policy, agent and trainer of ``config`` (resumed if it says so)."""
    from .distributed import DataParallel

    parallel = DataParallel.from_env(config.device)
    if parallel.world_size > 1 and config.algorithm != "ppo":
        raise ConfigError(f"algorithm {config.algorithm} runs in one process (no torchrun) for now")
    env = load_env(config)
    train_tasks = load_tasks(env, config, "train", config.limit)
    dev_tasks = load_tasks(env, config, "dev", config.eval_limit) if config.eval_limit != 0 else []
    strategy = credit_strategy(config) if config.algorithm == "ppo" else None
    policy = load_policy(dataclasses.replace(config, device=parallel.local_device(config.device)))
    agent = make_agent(env, policy, config)
    cbs = [as_callback(cb) for cb in callbacks] if parallel.is_main else []
    # A crash during the very first save leaves no complete checkpoint: start from step 0.
    resumed = config.resume and latest_checkpoint(Path(config.out) / "checkpoints") is not None
    warm_start = _warm_start(config, policy, resumed)
    if config.algorithm == "sft":
        batch, skipped = sft_data(config, env, policy, train_tasks, log)
        trainer: Any = SFTRun(policy, batch, config.sft, train_tasks, skipped, cbs)
    elif config.algorithm == "rejection":
        trainer = RejectionRun(policy, agent, train_tasks, config.sft, cbs,  # ppo's rollout limits
                               config.ppo.rollout_workers, config.ppo.rollout_timeout_s)
    else:
        trainer = _ppo_trainer(config, policy, agent, train_tasks, strategy, cbs, parallel,
                               resumed, warm_start)
    if config.vllm_python and parallel.world_size > 1:
        raise ConfigError("--vllm-python starts servers from one process; under torchrun start "
                          "them yourself and pass each with --vllm-url")
    rollouts = start_rollout_engine(config, policy, Path(config.out), trainer.iteration, log,
                                    parallel)
    if rollouts is not None:
        trainer.sync = rollouts.sync
    for cb in cbs:
        cb.attach(trainer)
    return RunSetup(config, env, policy, agent, train_tasks, dev_tasks, trainer, cbs, resumed,
                    parallel, rollouts)


def _warm_start(config: RunConfig, policy: Any, resumed: bool) -> dict[str, Any] | None:
    """``init_from``'s weights (the KL reference too, read again on resume), set into the policy
    unless a resumed run's own checkpoint will be."""
    if not config.init_from:
        return None
    from ..inference.adapters import set_weights
    from .checkpoint import read_policy_weights

    _, weights = read_policy_weights(policy, Path(config.init_from))
    if not resumed:
        set_weights(policy.model, weights)
    return weights


def _ppo_trainer(config: RunConfig, policy: Any, agent: Any, tasks: list[Any], strategy: Any,
                 callbacks: list[Callback], parallel: Any, resumed: bool,
                 warm_start: dict[str, Any] | None) -> PPORun:
    options = dict(credit=strategy, config=config.ppo, callbacks=callbacks, parallel=parallel,
                   reference_weights=warm_start)
    if resumed:
        return PPORun.load(Path(config.out) / "checkpoints", policy, agent, tasks, **options)
    return PPORun(policy, agent, tasks, **options)


def run(config: RunConfig, callbacks: Sequence[Any] = (), log: Callable[[str], None] = print
        ) -> dict[str, Any]:
    """Train as ``config`` says; returns (and writes) the run's summary."""
    setup = build(config, callbacks, log)
    if not setup.parallel.is_main:
        summary = _follow(setup)
        setup.parallel.close()
        return summary
    out, trainer = setup.out, setup.trainer
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / CONFIG_FILE)
    ckpt_dir = out / "checkpoints"
    if setup.resumed:
        log(f"resumed from {ckpt_dir} at step {trainer.iteration}")
    elif config.resume:
        log(f"no complete checkpoint in {ckpt_dir}: starting at step 0")
    if config.resume:  # re-run steps must not be logged twice
        clean_orphans(ckpt_dir)
        dropped = roll_back_logs(out, trainer.iteration)
        if any(dropped.values()):
            log("rolled back to step {}: dropped {}".format(trainer.iteration, ", ".join(
                f"{n} line(s) of {f}" for f, n in dropped.items() if n)))
    try:
        summary = _train(setup, log)
    finally:
        for cb in setup.callbacks:
            cb.on_finish()
        setup.close()
    setup.parallel.close()
    return summary


def _train(setup: RunSetup, log: Callable[[str], None]) -> dict[str, Any]:
    """Evaluate, step until the plan or the budget is done, checkpoint, evaluate, summarise."""
    config, out, trainer = setup.config, setup.out, setup.trainer
    ckpt_dir, keep = out / "checkpoints", config.keep_checkpoints or None
    governor = _thread_governor(config, log)
    before = _evaluate(setup, log)
    planned = trainer.planned_steps(config)
    log(f"training {setup.policy.name} on {getattr(setup.env, 'name', config.env)} with "
        f"{trainer.describe()} for {planned} steps -> {out}")
    started = time.monotonic()
    deadline = started + 60 * config.max_minutes if config.max_minutes else float("inf")
    with open(out / "metrics.jsonl", "a") as metrics_log:
        while setup.parallel.broadcast(trainer.iteration < planned
                                       and time.monotonic() < deadline):
            t0 = time.perf_counter()
            if governor is not None:
                governor.adjust()
            state = _interruptible_step(trainer, ckpt_dir, keep, log)
            metrics_log.write(json.dumps(state.metrics) + "\n")
            metrics_log.flush()
            if trainer.keeps_trajectories:
                state.batch.save_jsonl(out / "trajectories.jsonl", append=True)
            log(f"{trainer.line(state)}  {time.perf_counter() - t0:.1f}s")
            if config.save_every and state.iteration % config.save_every == 0:
                trainer.save(ckpt_dir, keep_last=keep)
            if (config.eval_every and state.iteration % config.eval_every == 0
                    and state.iteration < planned):
                _evaluate(setup, log)
    train_minutes = (time.monotonic() - started) / 60
    log(f"trained {trainer.iteration} steps in {train_minutes:.1f} min")
    checkpoint = trainer.save(ckpt_dir, keep_last=keep)
    after = _evaluate(setup, log)
    summary = {"before": before, "after": after, "train_minutes": train_minutes,
               "history": [h["reward_mean"] for h in trainer.history],
               "checkpoint": str(checkpoint), **trainer.summary()}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    log("reward_mean per step: " + " ".join(f"{r:.2f}" for r in summary["history"]))
    return summary


def _evaluate(setup: RunSetup, log: Callable[[str], None]) -> dict[str, float]:
    tag = f"step{setup.trainer.iteration:04d}"
    metrics = setup.evaluate(tag)
    if metrics:
        log(f"[eval {tag}] " + _fmt(metrics))
    return metrics


def _interruptible_step(trainer: Any, ckpt_dir: Path, keep: int | None,
                        log: Callable[[str], None]) -> Any:
    """``trainer.step()``; on Ctrl-C or a failed rollout server, checkpoint the last finished
    step, then re-raise.

    Ctrl-C mostly lands during rollouts, before the update: the trainer then puts itself back
    at its last finished step (``PPOTrainer.step``), so the checkpoint resumes exactly. Once the
    optimizer has stepped (``trainer.mid_update``), the weights belong to no step and nothing is
    saved (the last periodic checkpoint stands). A server failure (``RolloutServerError``,
    ``AdapterSyncError``) comes before the update: the step's rollouts, failed ones with their
    error, are appended to ``failed_rollouts.jsonl`` (their tasks are sampled again on resume).
    """
    from ..inference.servers import RolloutServerError
    from .sync import AdapterSyncError

    try:
        return trainer.step()
    except KeyboardInterrupt:
        if trainer.mid_update:
            log(f"interrupted during the update of step {trainer.iteration + 1}: not saved; "
                f"resume continues from the last checkpoint")
            raise
        path = trainer.save(ckpt_dir, keep_last=keep)
        log(f"interrupted: saved {path} (step {trainer.iteration}); continue with --resume")
        raise
    except (RolloutServerError, AdapterSyncError) as exc:
        failed = ckpt_dir.parent / FAILED_ROLLOUTS
        batch = getattr(exc, "batch", None)
        if batch is not None:
            for traj in batch.trajectories:
                traj.meta["not_trained"] = str(exc)[:500]
            batch.save_jsonl(failed, append=True)
        path = trainer.save(ckpt_dir, keep_last=keep)
        log(f"step {trainer.iteration + 1} failed: {exc}\nsaved {path} (step "
            f"{trainer.iteration})" + (f"; its {len(batch)} rollouts are in {failed}"
                                       if batch is not None else "")
            + "; restart the server (--vllm-python starts new ones) and continue with --resume")
        raise


def _thread_governor(config: RunConfig, log: Callable[[str], None]) -> ThreadGovernor | None:
    """On CPU, the update's threads, decided now and re-checked before each step
    (``threads.py``: a busy machine gets fewer threads than cores)."""
    if config.device != "cpu":
        return None
    governor = ThreadGovernor(requested_threads(config.threads), log)
    governor.adjust()
    return governor


def _follow(setup: RunSetup) -> dict[str, Any]:
    """A data-parallel process other than 0: train while process 0 says so; nothing else."""
    while setup.parallel.broadcast(None):
        setup.trainer.step()
    return {}


def _fmt(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k}={v:.3f}" for k, v in metrics.items())

"""``run_sft(config)``: a supervised warm start, from stored traces or from an environment.

The data comes from one of:

* stored traces: a lightning-lab batch (``.jsonl`` / ``.parquet``), an OpenTelemetry OTLP-JSON
  file, or Agent Lightning's stored spans (``traces_format``; ``auto`` guesses from the file);
* the environment's demonstrations (``traces=None``, ``mode="sft"``): each train task's reference
  answer written as the agent's own call (``Environment.demonstrations``);
* rejection sampling (``mode="rejection"``): the agent samples ``n`` per task, trajectories above
  ``threshold`` are kept and fine-tuned on, ``rounds`` times.

The run folder looks like a ``train`` run's (``config.yaml``, ``metrics.jsonl``,
``checkpoints/``, ``eval_*.jsonl``, ``summary.json``), so ``lightning-lab train --init-from
<out>/checkpoints`` continues with RL from the fine-tuned weights.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..records import Batch, TraceFormatError
from .config import (SEED_MAX, ConfigError, FieldError, bounded, check_out, check_ranges,
                     load_yaml, nested_mapping)
from .rejection import TEMPERATURE as REJECTION_TEMPERATURE
from .sft import SFTConfig

__all__ = ["SFTRunConfig", "run_sft", "load_traces", "sft_override", "load_sft_config"]


@dataclass
class SFTRunConfig:
    """One supervised warm-start run."""

    model: str = "smollm2-135m"
    """tiny | smollm2-135m | a local Hugging Face model directory."""
    lora: str = field(default="auto", metadata={"choices": ("auto", "on", "off")})
    """LoRA adapter: auto (on for real models, off for tiny) | on | off."""
    device: str = "cpu"
    """Torch device of the policy."""
    seed: int = bounded(0, ge=0, le=SEED_MAX)
    """Seeds the model's init (tiny), the task loaders and the row order."""
    env: str = "wordplay"
    """Environment whose agent prompts and tasks are used (demonstrations, rejection, eval)."""
    data: str | None = None
    """Dataset path in the benchmark's own format (default: generated tasks)."""
    limit: int | None = bounded(None, ge=1)
    """Use at most this many training tasks."""
    agent_options: dict[str, Any] = field(default_factory=dict)
    """Options for the environment's agent (CLI: --agent-option KEY=VALUE); demonstrations use
    the same prompt options, so they match the agent trained next."""
    task_options: dict[str, Any] = field(default_factory=dict)
    """Options for the task loader, train and dev (CLI: --task-option KEY=VALUE)."""
    traces: str | None = None
    """Stored traces to fine-tune on; None = the environment's demonstrations (mode sft) or
    fresh samples (mode rejection)."""
    traces_format: str = field(default="auto", metadata={
        "choices": ("auto", "batch", "otlp", "agentlightning")})
    """auto (by file name/content) | batch (.jsonl/.parquet) | otlp (OTLP-JSON) | agentlightning."""
    mode: str = field(default="sft", metadata={"choices": ("sft", "rejection")})
    """sft: fine-tune on the given data | rejection: sample n per task, keep above threshold, repeat."""
    n: int = bounded(8, ge=1)
    """Rejection sampling: samples per task per round."""
    threshold: float = bounded(0.5)
    """Rejection sampling: keep trajectories whose total reward is strictly above this."""
    rounds: int = bounded(2, ge=1)
    """Rejection sampling: sample -> keep -> fine-tune cycles."""
    tasks_per_round: int | None = bounded(None, ge=1)
    """Rejection sampling: tasks per round (None: all train tasks)."""
    temperature: float = bounded(REJECTION_TEMPERATURE, gt=0)
    """Rejection sampling: sampling temperature."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """The fine-tuning's hyper-parameters (CLI: --epochs, --batch-size, --lr, ...)."""
    max_minutes: float | None = bounded(None, gt=0)
    """Stop fine-tuning after the step that passes this wall-clock budget."""
    eval_limit: int | None = bounded(None, ge=0)
    """Greedy dev evaluation before and after on at most this many tasks (0: no evaluation)."""
    keep_checkpoints: int = bounded(3, ge=0)
    """Keep the newest K checkpoints (0: keep all)."""
    wandb: bool = False
    """Log to Weights & Biases (offline unless logged in)."""
    out: str = "runs/sft"
    """Run folder: config.yaml, metrics.jsonl, checkpoints/, eval_*.jsonl, summary.json."""

    def __post_init__(self) -> None:
        if isinstance(self.sft, dict):
            try:
                self.sft = SFTConfig(**self.sft)
            except FieldError as exc:
                raise exc.within("sft") from None
        self.sft.seed = self.seed
        check_ranges(self)
        check_out(self.out)


def sft_override(config: SFTRunConfig, values: dict[str, Any]) -> SFTRunConfig:
    """A copy of ``config`` with fields replaced by name; fine-tuning fields as ``sft.lr`` or
    ``lr``. Unknown names fail with the valid ones."""
    top = dataclasses.asdict(config)
    run_names = {f.name for f in dataclasses.fields(SFTRunConfig)} - {"sft"}
    sft_names = {f.name for f in dataclasses.fields(SFTConfig)} - {"seed"}
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if key == "sft":
            flat.update({f"sft.{k}": v for k, v in nested_mapping("sft", value).items()})
        else:
            flat[key] = value
    for key, value in flat.items():
        name = key.removeprefix("sft.")
        if key.startswith("sft.") or (key not in run_names and name in sft_names):
            if name not in sft_names:
                raise ConfigError(f"unknown fine-tuning field {key!r}; valid: {sorted(sft_names)}")
            if name == "agents" and isinstance(value, str):
                value = tuple(a for a in value.split(",") if a)
            top["sft"][name] = value
        elif key in run_names:
            top[key] = value
        else:
            raise ConfigError(f"unknown config field {key!r}; valid: {sorted(run_names)} "
                              "and sft.<field>")
    try:
        return SFTRunConfig(**top)
    except FieldError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from exc


def load_sft_config(path: str | Path) -> SFTRunConfig:
    """An ``SFTRunConfig`` from YAML (nested ``sft:`` mapping or dotted keys); every error
    names the file."""
    data = load_yaml(path, "sft config")
    try:
        return sft_override(SFTRunConfig(), data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def _save_config(config: SFTRunConfig, path: Path) -> None:
    import yaml

    data = dataclasses.asdict(config)
    del data["sft"]["seed"]  # follows the run's seed
    if data["sft"]["agents"] is not None:
        data["sft"]["agents"] = list(data["sft"]["agents"])
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def load_traces(path: str | Path, fmt: str = "auto", tokenizer: Any = None) -> Batch:
    """A ``Batch`` from stored traces in any supported format; bad records are reported in
    ``Batch.load_errors`` (the loaders skip them and name file and record)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no trace file at {path}")
    if fmt == "auto":
        fmt = _guess_format(path)
    if fmt == "batch":
        batch = Batch.load_parquet(path) if path.suffix == ".parquet" else Batch.load_jsonl(path)
    elif fmt == "otlp":
        from ..traces.otel import load_otlp_json

        batch = load_otlp_json(path)
    elif fmt == "agentlightning":
        from ..traces.agentlightning import load_agentlightning

        batch = load_agentlightning(path, tokenizer)
    else:
        raise ValueError(f"unknown traces format {fmt!r}; expected auto, batch, otlp or agentlightning")
    if not batch.trajectories:  # refused here, before a model is evaluated for nothing
        raise TraceFormatError(f"{path}: no trajectories to train on")
    return batch


def _guess_format(path: Path) -> str:
    if path.suffix == ".parquet":
        return "batch"
    with open(path, encoding="utf-8") as f:
        head = f.read(4096)
    if '"resourceSpans"' in head:
        return "otlp"
    if '"rollout_id"' in head and '"span_id"' in head:
        return "agentlightning"
    return "batch"


def run_sft(config: SFTRunConfig, *, log: Callable[[str], None] = print,
            callbacks: tuple[Any, ...] = ()) -> dict[str, Any]:
    """Fine-tune as ``config`` says; returns (and writes) the run's summary."""
    from .. import envs
    from ..inference import models
    from ..rollouts import evaluate
    from .rejection import RejectionConfig, rejection_sampling_finetune
    from .sft import SFTTrainer, demonstrations_to_batch

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    _save_config(config, out / "config.yaml")
    env = envs.get(config.env)
    train_tasks = env.load_tasks("train", data=config.data, seed=config.seed, limit=config.limit,
                                 **config.task_options)
    lora = {"auto": None, "on": True, "off": False}[config.lora]
    policy = models.load(config.model, lora=lora, device=config.device, seed=config.seed)
    agent = env.make_agent(policy, **config.agent_options)
    stored = None  # read first: a bad trace file fails before minutes of evaluation
    if config.traces and config.mode != "rejection":
        stored = load_traces(config.traces, config.traces_format, policy.tokenizer)
    dev_tasks = []
    if config.eval_limit != 0:
        dev_tasks = env.load_tasks("dev", data=config.data, seed=config.seed,
                                   limit=config.eval_limit, **config.task_options)

    def dev_eval(tag: str) -> dict[str, float]:
        if not dev_tasks:
            return {}
        batch, metrics = evaluate(agent, dev_tasks, summarize=env.summarize)
        batch.save_jsonl(out / f"eval_{tag}.jsonl")
        log(f"[eval {tag}] " + "  ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
        for cb in callbacks:
            if hasattr(cb, "on_eval"):
                cb.on_eval(metrics, 0)
        return metrics

    before = dev_eval("before")
    started = time.monotonic()
    skipped: Counter = Counter()
    metrics_log = open(out / "metrics.jsonl", "a")

    def on_step(state: Any) -> None:
        metrics_log.write(json.dumps(state.metrics) + "\n")
        metrics_log.flush()

    if config.mode == "rejection":
        results = rejection_sampling_finetune(
            policy, agent, train_tasks,
            RejectionConfig(n=config.n, threshold=config.threshold, temperature=config.temperature,
                            rounds=config.rounds, tasks_per_round=config.tasks_per_round,
                            sft=config.sft),
            on_round=lambda r: log("round {round:.0f}: sampled {sampled:.0f}, kept {kept:.0f} "
                                   "({tasks_solved:.0f} tasks), reward {reward_mean:.3f}".format(
                                       **r.metrics)),
            callbacks=(on_step, *callbacks))
        trainer_state = {"rounds": [r.metrics for r in results]}
        history = [m for r in results for m in r.sft_history]
        n_rows = sum(len(t.transitions) for r in results for t in r.kept)
        final_params = None
    else:
        if stored is not None:
            batch = stored
            for error in batch.load_errors:
                log(f"skipped: {error}")
            skipped["load_errors"] = len(batch.load_errors)
        else:
            if env.demonstrations is None:
                raise ConfigError(f"environment {config.env!r} has no demonstrations; pass --traces "
                                 "or use --mode rejection")
            demos = env.demonstrations(train_tasks, **config.agent_options)
            skipped["no_demonstration"] = len(train_tasks) - len(demos)
            batch, bad = demonstrations_to_batch(
                policy.tokenizer, demos,
                max_context=config.sft.max_context or policy.model.config.max_position_embeddings)
            skipped.update(bad)
        trainer = SFTTrainer(policy, batch, config.sft, callbacks=(on_step, *callbacks))
        skipped.update(trainer.skipped)
        log(f"fine-tuning {policy.name} on {len(trainer.rows)} transitions "
            f"({trainer.steps_per_epoch} steps/epoch); skipped {dict(+skipped) or 'none'}")
        trainer.fit(max_minutes=config.max_minutes, progress=False,
                    on_step=lambda s: log(f"step {s.step:4d}  loss {s.metrics['loss']:.4f}  "
                                          f"token_acc {s.metrics['token_acc']:.3f}  "
                                          f"{s.metrics['update_s']:.1f}s"))
        history, n_rows = trainer.history, len(trainer.rows)
        trainer_state = {}
        final_params = trainer
    metrics_log.close()
    minutes = (time.monotonic() - started) / 60
    ckpt = _save_weights(policy, out / "checkpoints", len(history), config,
                         optimizer=getattr(final_params, "optimizer", None), history=history,
                         keep_last=config.keep_checkpoints or None)
    after = dev_eval("after")
    summary = {"before": before, "after": after, "train_minutes": minutes, "rows": n_rows,
               "skipped": dict(skipped), "loss": [h["loss"] for h in history],
               "checkpoint": str(ckpt), **trainer_state}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    log(f"fine-tuned {len(history)} steps in {minutes:.1f} min -> {ckpt}")
    for cb in callbacks:
        if hasattr(cb, "on_finish"):
            cb.on_finish()
    return summary


def _save_weights(policy: Any, directory: Path, step: int, config: SFTRunConfig, *,
                  optimizer: Any, history: list[dict[str, float]], keep_last: int | None) -> Path:
    """The fine-tuned weights as a checkpoint ``load_policy_weights`` (and ``train
    --init-from``) reads."""
    from .checkpoint import save_checkpoint
    from .sft import sft_state_dict

    state = sft_state_dict(policy, config=dataclasses.asdict(config), step=step,
                           optimizer=optimizer, history=history)
    return save_checkpoint(state, directory, step, model=getattr(policy, "name", ""),
                           keep_last=keep_last)

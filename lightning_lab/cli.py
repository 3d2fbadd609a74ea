"""``lightning-lab``: train / eval / serve / sweep from the shell.

Every subcommand is a thin layer over the library calls a notebook would make, so results from
the shell and from Jupyter are the same thing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

__all__ = ["main", "build_trainer", "build_parser", "TrainSetup"]


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="tiny | smollm2-135m | local HF dir")
    p.add_argument("--lora", choices=["auto", "on", "off"], default="auto",
                   help="LoRA adapter (auto: on for real models, off for tiny)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)


def _add_env_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--env", default="wordplay", help="environment name (folder under environments/)")
    p.add_argument("--data", default=None,
                   help="dataset path in the benchmark's own format (default: generated tasks)")
    p.add_argument("--limit", type=int, default=None, help="use at most this many tasks")
    p.add_argument("--agent-option", action="append", default=[], metavar="KEY=VALUE",
                   help="option for the environment's agent, e.g. max_turns=2 (repeatable)")
    p.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                   help="option for the environment's task loader, e.g. levels=hard,extra "
                        "(repeatable; train applies it to train and dev tasks)")


def _parse_options(pairs: list[str], flag: str = "--agent-option") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise ValueError(f"{flag} expects KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _load_policy(args: argparse.Namespace):
    from .inference import models

    lora = {"auto": None, "on": True, "off": False}[args.lora]
    return models.load(args.model, lora=lora, device=args.device, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-lab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="PPO-train a model on an environment")
    _add_model_args(train)
    _add_env_args(train)
    train.add_argument("--credit", default="uniform", help="credit strategy (see --list-credit)")
    train.add_argument("--gamma", type=float, default=None)
    train.add_argument("--lam", type=float, default=None)
    train.add_argument("--baseline", default=None, help="none | group | rloo | batch")
    train.add_argument("--steps", type=int, default=20)
    train.add_argument("--tasks-per-step", type=int, default=8)
    train.add_argument("--group-size", type=int, default=4)
    train.add_argument("--lr", type=float, default=None)
    train.add_argument("--kl-coef", type=float, default=None)
    train.add_argument("--ppo-epochs", type=int, default=None)
    train.add_argument("--temperature", type=float, default=None)
    train.add_argument("--trainable-agents", default=None,
                       help="comma-separated roles that enter the loss (default: all)")
    train.add_argument("--eval-every", type=int, default=0, help="greedy dev eval every N steps (0: start/end only)")
    train.add_argument("--eval-limit", type=int, default=None)
    train.add_argument("--max-minutes", type=float, default=None,
                       help="stop after the step that passes this wall-clock budget (evals excluded)")
    train.add_argument("--save-every", type=int, default=5)
    train.add_argument("--keep-checkpoints", type=int, default=3,
                       help="keep the newest K checkpoints, delete older ones (0: keep all)")
    train.add_argument("--resume", action="store_true", help="continue from <out>/checkpoints")
    train.add_argument("--wandb", action="store_true", help="log to Weights & Biases (offline by default)")
    train.add_argument("--out", default="runs/demo")

    ev = sub.add_parser("eval", help="greedy evaluation of a model on an environment's tasks")
    _add_model_args(ev)
    _add_env_args(ev)
    ev.add_argument("--split", default="dev")
    ev.add_argument("--checkpoint", default=None, help="trainer checkpoint dir to load weights from")
    ev.add_argument("--out", default=None, help="write per-example results (.jsonl or .parquet)")

    sub.add_parser("envs", help="list environments")
    sub.add_parser("credit", help="list credit strategies")

    from .proxy import add_cli as add_serve_cli
    from .workbench.tracking import add_cli as add_sweep_cli

    add_serve_cli(sub, _add_model_args)
    add_sweep_cli(sub, _add_model_args)
    return parser


@dataclass
class TrainSetup:
    """What ``cmd_train`` (and ``lightning_lab.workbench.tracking``'s sweeps) build from the train options."""

    env: Any
    policy: Any
    agent: Any
    train_tasks: list[Any]
    dev_tasks: list[Any]
    trainer: Any
    resumed: bool = False


def build_trainer(args: argparse.Namespace, callbacks: Sequence[Any] = ()) -> TrainSetup:
    """Environment, tasks, policy, agent and PPOTrainer from ``lightning-lab train`` options.

    Shared with sweeps so a swept run is exactly the run the CLI would have made.
    """
    from . import credit as credit_lib
    from . import envs
    from .train.trainer import PPOConfig, PPOTrainer

    env = envs.get(args.env)
    task_options = _parse_options(args.task_option, "--task-option")
    train_tasks = env.load_tasks("train", data=args.data, seed=args.seed, limit=args.limit,
                                 **task_options)
    dev_tasks = env.load_tasks("dev", data=args.data, seed=args.seed, limit=args.eval_limit,
                               **task_options)
    policy = _load_policy(args)
    agent = env.make_agent(policy, **_parse_options(args.agent_option))
    credit_params = {k: v for k, v in (("gamma", args.gamma), ("lam", args.lam)) if v is not None}
    if args.baseline is not None:
        credit_params["baseline"] = None if args.baseline == "none" else args.baseline
    overrides = {k: v for k, v in dict(lr=args.lr, kl_coef=args.kl_coef, ppo_epochs=args.ppo_epochs,
                                       temperature=args.temperature).items() if v is not None}
    config = PPOConfig(tasks_per_step=args.tasks_per_step, group_size=args.group_size, seed=args.seed,
                       trainable_agents=tuple(args.trainable_agents.split(","))
                       if args.trainable_agents else None, **overrides)
    ckpt_dir = Path(args.out) / "checkpoints"
    strategy = credit_lib.get(args.credit, **credit_params)
    resumed = bool(args.resume and ckpt_dir.exists())
    if resumed:
        trainer = PPOTrainer.load(ckpt_dir, policy, agent, train_tasks, callbacks=callbacks)
    else:
        trainer = PPOTrainer(policy, agent, train_tasks, credit=strategy, config=config,
                             callbacks=callbacks)
    for cb in callbacks:  # callbacks that want the whole trainer (config, checkpoints) get it
        if hasattr(cb, "attach"):
            cb.attach(trainer)
    return TrainSetup(env, policy, agent, train_tasks, dev_tasks, trainer, resumed)


def cmd_train(args: argparse.Namespace) -> int:
    from .rollouts.evaluation import evaluate

    out = Path(args.out)
    ckpt_dir = out / "checkpoints"
    callbacks: list[Any] = []
    if args.wandb:
        from .workbench.tracking import WandbCallback

        callbacks.append(WandbCallback(project="lightning-lab", config={"env": args.env, "model": args.model}))
    setup = build_trainer(args, callbacks)
    env, policy, agent, dev_tasks, trainer = (setup.env, setup.policy, setup.agent, setup.dev_tasks,
                                              setup.trainer)
    if setup.resumed:
        print(f"resumed from {ckpt_dir} at step {trainer.step_count}")
    out.mkdir(parents=True, exist_ok=True)

    def dev_eval(tag: str) -> dict[str, float]:
        batch, metrics = evaluate(agent, dev_tasks, summarize=env.summarize)
        batch.save_jsonl(out / f"eval_{tag}.jsonl")
        print(f"[eval {tag}] " + "  ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
        for cb in callbacks:
            if hasattr(cb, "log_eval"):
                cb.log_eval(metrics)
        return metrics

    before = dev_eval(f"step{trainer.step_count:04d}")
    print(f"training {policy.name} on {args.env} with {trainer.credit.describe()} "
          f"for {args.steps} steps -> {out}")
    started = time.monotonic()
    deadline = started + 60 * args.max_minutes if args.max_minutes else float("inf")
    with open(out / "metrics.jsonl", "a") as log:
        while trainer.step_count < args.steps and time.monotonic() < deadline:
            t0 = time.perf_counter()
            state = trainer.step()
            m = state.metrics
            log.write(json.dumps(m) + "\n")
            log.flush()
            state.batch.save_jsonl(out / "trajectories.jsonl", append=True)
            print(f"step {state.step:3d}  reward {m['reward_mean']:.3f} ± {m['reward_std']:.3f}  "
                  f"kl {m['kl']:.4f}  clip {m['clip_frac']:.3f}  loss {m['policy_loss']:+.4f}  "
                  f"tok/s {m['tokens_per_s']:.0f}  failed {int(m['n_failed'])}  "
                  f"{time.perf_counter() - t0:.1f}s", flush=True)
            if args.save_every and state.step % args.save_every == 0:
                trainer.save(ckpt_dir, keep_last=args.keep_checkpoints or None)
            if args.eval_every and state.step % args.eval_every == 0 and state.step < args.steps:
                dev_eval(f"step{state.step:04d}")
    train_minutes = (time.monotonic() - started) / 60
    print(f"trained {trainer.step_count} steps in {train_minutes:.1f} min")
    trainer.save(ckpt_dir, keep_last=args.keep_checkpoints or None)
    after = dev_eval(f"step{trainer.step_count:04d}")
    summary = {"before": before, "after": after, "train_minutes": train_minutes,
               "history": [h["reward_mean"] for h in trainer.history]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print("reward_mean per step: " + " ".join(f"{r:.2f}" for r in summary["history"]))
    for cb in callbacks:
        if hasattr(cb, "finish"):
            cb.finish()
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from . import envs
    from .train.checkpoint import load_policy_weights
    from .rollouts.evaluation import evaluate

    env = envs.get(args.env)
    tasks = env.load_tasks(args.split, data=args.data, seed=args.seed, limit=args.limit,
                           **_parse_options(args.task_option, "--task-option"))
    policy = _load_policy(args)
    if args.checkpoint:
        load_policy_weights(policy, Path(args.checkpoint))
    agent = env.make_agent(policy, **_parse_options(args.agent_option))
    t0 = time.perf_counter()
    batch, metrics = evaluate(agent, tasks, summarize=env.summarize, progress=True)
    metrics["seconds"] = time.perf_counter() - t0
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        (batch.save_parquet if out.suffix == ".parquet" else batch.save_jsonl)(out)
        print(f"wrote {len(batch)} results to {out}")
    print(json.dumps({k: round(v, 4) for k, v in metrics.items()}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "envs":
        from . import envs

        print("\n".join(envs.names()))
        return 0
    if args.command == "credit":
        from . import credit

        print("\n".join(credit.names()))
        return 0
    handler = {"train": cmd_train, "eval": cmd_eval}.get(args.command) or args.handler
    try:
        return handler(args) or 0
    except (KeyError, TypeError, ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"lightning-lab {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

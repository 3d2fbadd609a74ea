"""``lightning-lab``: train / eval / serve / sweep from the shell.

Every subcommand is a thin layer over the library calls a notebook would make, so results from
the shell and from Jupyter are the same thing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import tempfile
import time
import typing
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from .train.config import (FIELD_RENAMES, ConfigError, FieldError, PPOConfig, RunConfig,
                           SFTConfig, field_docs, parse_options)

__all__ = ["main", "build_parser"]

MODEL_FIELDS = ("model", "lora", "adapters", "device", "seed")
ROLLOUT_FIELDS = ("rollout_engine", "vllm_url", "vllm_python", "vllm_servers", "vllm_dtype",
                  "vllm_allow_degraded", "adapter_dir", "vllm_start_timeout_s")
ENV_FIELDS = ("env", "data", "limit", "agent_options", "task_options", "agent", "agent_cmd",
              "tasks", "max_tokens_cap")
SFT_RUN_FIELDS = MODEL_FIELDS + ("decode_dtype", "decode_threads", "threads", "env", "data",
                                 "limit", "agent_options", "task_options", "init_from",
                                 "max_minutes", "eval_every", "eval_limit", "save_every",
                                 "keep_checkpoints", "wandb", "out")
"""The RunConfig fields ``lightning-lab sft`` takes (the rest are PPO's)."""
_OPTION_FLAGS = {"agent_options": "--agent-option", "task_options": "--task-option"}
_REPEATABLE = {"vllm_url"}
"""Tuple fields given once per item (`--vllm-url A --vllm-url B`)."""
# ppo: its fields become flags of their own; sft, algorithm: `lightning-lab sft`'s flags (or a
# --config naming them), so a flag like --lr means one field; seed: added once, after
_SKIP = {"ppo", "sft", "algorithm", "seed"}


def _add_field(p: argparse.ArgumentParser, cls: type, name: str, dest: str, suppress: bool) -> None:
    """One flag from a dataclass field: type from its annotation, help from its docstring."""
    hint = typing.get_type_hints(cls)[name]
    default = argparse.SUPPRESS if suppress else getattr(cls(), name)
    doc = field_docs(cls).get(name, "")
    if name in _OPTION_FLAGS:
        p.add_argument(_OPTION_FLAGS[name], dest=dest, action="append", metavar="KEY=VALUE",
                       default=argparse.SUPPRESS if suppress else [], help=doc + " (repeatable)")
        return
    flags = ["--" + n.replace("_", "-") for n in (name, *_old_names(name))]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    if base is bool:
        action = "store_true" if getattr(cls(), name) is False else argparse.BooleanOptionalAction
        p.add_argument(*flags, dest=dest, action=action, default=default, help=doc)
        return
    kind = typing.get_origin(base) or base
    if name in _REPEATABLE:
        p.add_argument(*flags, dest=dest, action="append", default=default, metavar="URL",
                       help=doc)
        return
    choices = {f.name: f for f in dataclasses.fields(cls)}[name].metadata.get("choices")
    p.add_argument(*flags, dest=dest, default=default, help=doc, choices=choices,
                   type=str if kind in (tuple, dict) else kind,
                   metavar="A,B" if kind is tuple else name.upper())


def _old_names(name: str) -> list[str]:
    """Earlier names of a config field, kept as flag aliases (``--trainable-agents``)."""
    return [old for old, new in FIELD_RENAMES.items() if new == name]


def add_run_fields(p: argparse.ArgumentParser, names: Sequence[str], suppress: bool = False) -> None:
    for name in names:
        _add_field(p, RunConfig, name, name, suppress)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    add_run_fields(p, MODEL_FIELDS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-lab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="PPO-train a model on an environment",
                           description="Every flag is a RunConfig field (lightning_lab/train/config.py); "
                                       "flags override --config, and on --resume the run's config.yaml.")
    train.add_argument("--config", default=None, help="RunConfig YAML (defaults for every flag)")
    add_run_fields(train, [f.name for f in dataclasses.fields(RunConfig) if f.name not in _SKIP],
                   suppress=True)
    _add_field(train, RunConfig, "seed", "seed", suppress=True)
    for f in dataclasses.fields(PPOConfig):
        if f.name != "seed":
            _add_field(train, PPOConfig, f.name, f"ppo.{f.name}", suppress=True)

    ev = sub.add_parser("eval", help="greedy evaluation of a model on an environment's tasks")
    add_run_fields(ev, MODEL_FIELDS + ENV_FIELDS + ROLLOUT_FIELDS)
    ev.add_argument("--split", default="dev")
    _add_field(ev, PPOConfig, "rollout_timeout_s", "ppo.rollout_timeout_s", suppress=True)
    ev.add_argument("--checkpoint", default=None, help="trainer checkpoint dir to load weights from")
    ev.add_argument("--out", default=None, help="write per-example results (.jsonl or .parquet)")

    sft = sub.add_parser("sft", help="supervised warm start: stored traces, demonstrations or "
                                     "rejection sampling (train --algorithm sft|rejection)",
                         description="`train --algorithm sft` (or rejection with --mode rejection) "
                                     "with the flags that apply: RunConfig fields and SFTConfig's "
                                     "(lightning_lab/train/config.py); default --out runs/sft; "
                                     "then `train --init-from <out>/checkpoints`.")
    sft.add_argument("--config", default=None, help="RunConfig YAML (defaults for every flag)")
    sft.add_argument("--mode", dest="algorithm", choices=("sft", "rejection"),
                     default=argparse.SUPPRESS, help="sft: fine-tune on --traces or the "
                     "environment's demonstrations | rejection: sample --n per task, keep "
                     "above --threshold, fine-tune, --rounds times")
    add_run_fields(sft, SFT_RUN_FIELDS, suppress=True)
    for f in dataclasses.fields(SFTConfig):
        if f.name != "seed":
            _add_field(sft, SFTConfig, f.name, f"sft.{f.name}", suppress=True)

    sub.add_parser("envs", help="list environments")
    sub.add_parser("credit", help="list credit strategies")

    from .proxy import add_cli as add_serve_cli
    from .workbench.tracking import add_cli as add_sweep_cli

    add_serve_cli(sub, _add_model_args)
    add_sweep_cli(sub)
    from .train.export import add_cli as add_export_cli

    add_export_cli(sub)
    return parser


def _changes(args: argparse.Namespace, skip: Sequence[str] = ()) -> dict[str, Any]:
    """The RunConfig fields the command line set explicitly (unset flags are absent)."""
    out = {k: v for k, v in vars(args).items() if k not in ("command", "handler", "config", *skip)}
    for name, flag in _OPTION_FLAGS.items():
        if name in out:
            out[name] = parse_options(out[name], flag)
    return out


@contextlib.contextmanager
def naming_flags(changes: Mapping[str, Any]) -> Iterator[None]:
    """Prefix an invalid value's error with the flag that gave it (``--lr: ppo.lr must be > 0``);
    values from a config file are named by their file (``load_config``)."""
    try:
        yield
    except FieldError as exc:
        if exc.field not in changes:
            raise
        flag = "--" + exc.field.removeprefix("ppo.").removeprefix("sft.").replace("_", "-")
        raise ConfigError(f"{flag}: {exc}") from exc


SFT_BASE = RunConfig(algorithm="sft", out="runs/sft")
"""``lightning-lab sft``'s defaults: old SFT YAML files, which name no algorithm, load as SFT."""


def train_config(args: argparse.Namespace, base: RunConfig = RunConfig()) -> RunConfig:
    """The run ``lightning-lab train`` (and ``sft``) makes: flags over --config over ``base``;
    on --resume, flags and --config over the run's saved config."""
    from .train.config import load_config, override
    from .train.run import resume_config

    changes = _changes(args)
    with naming_flags(changes):
        if changes.get("resume"):
            return resume_config(changes.get("out"), changes, config_file=args.config)
        if args.config:
            base = load_config(args.config, base)
        return override(base, changes)


def cmd_train(args: argparse.Namespace) -> int:
    """``train`` and ``sft``: one ``run(config)``, whatever the algorithm."""
    from .train.run import run

    config = train_config(args, SFT_BASE if args.command == "sft" else RunConfig())
    callbacks: list[Any] = []
    if config.wandb:
        from .workbench.tracking import WandbCallback

        callbacks.append(WandbCallback(project="lightning-lab",
                                       config={"algorithm": config.algorithm}))
    run(config, callbacks, log=lambda line: print(line, flush=True))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .rollouts import evaluate
    from .train.checkpoint import load_policy_weights
    from .train.config import override
    from .train.run import load_env, load_policy, load_tasks, make_agent, start_rollout_engine

    changes = _changes(args, skip=("split", "checkpoint", "out"))
    with naming_flags(changes):
        config = override(RunConfig(), changes)
    env = load_env(config)
    tasks = load_tasks(env, config, args.split, config.limit)
    policy = load_policy(config)
    if args.checkpoint:
        load_policy_weights(policy, Path(args.checkpoint))
    # a started vLLM server logs (and adapters go) next to --out, else in a temporary folder
    folder = Path(args.out).parent if args.out else Path(tempfile.mkdtemp(prefix="ll-eval-"))
    rollouts = start_rollout_engine(config, policy, folder)
    agent = make_agent(env, policy, config)
    t0 = time.perf_counter()
    try:
        batch, metrics = evaluate(agent, tasks, summarize=env.summarize, progress=True,
                                  timeout_s=config.ppo.rollout_timeout_s)
    finally:
        if hasattr(env, "close"):  # a user agent's proxy
            env.close()
        if rollouts is not None:
            rollouts.close()
    metrics["seconds"] = time.perf_counter() - t0
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        (batch.save_parquet if out.suffix == ".parquet" else batch.save_jsonl)(out)
        print(f"wrote {len(batch)} results to {out}")
    print(json.dumps({k: round(v, 4) for k, v in metrics.items()}))
    return 0


def _usage_errors() -> tuple[type[BaseException], ...]:
    from .records import TraceFormatError
    from .train.checkpoint import CheckpointError
    from .train.export import ExportError
    from .inference.servers import RolloutServerError
    from .train.sync import AdapterSyncError

    # FileNotFoundError: a --data / --checkpoint / --config path that is not there
    return (ConfigError, CheckpointError, ExportError, AdapterSyncError, RolloutServerError,
            TraceFormatError, FileNotFoundError)


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
    handler = {"train": cmd_train, "eval": cmd_eval, "sft": cmd_train}.get(args.command) or args.handler
    try:
        return handler(args) or 0
    except _usage_errors() as exc:  # what the user can fix; anything else keeps its traceback
        print(f"lightning-lab {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: train has checkpointed what it could and said so
        print(f"lightning-lab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""Hyper-parameter sweeps from a W&B sweep config, online (``wandb.agent``) or offline (local runner).

A sweep config is the W&B format (``method``: grid | random | bayes; ``parameters``: name ->
``{value}`` | ``{values}`` | ``{min, max, distribution}``). With the default ``train_fn`` the
parameter names are ``RunConfig`` fields by dotted name (``credit``, ``gamma``, ``ppo.lr`` or just
``lr``, ``env``, ``model``, ``steps``, ...), and each run is ``run(config)``: exactly what
``lightning-lab train`` does with the same values. Names are checked before any run starts.

Offline (the default without a W&B login) the same config runs in-process: grid or random
(bayes falls back to random with a warning), every run logged to W&B offline under one ``group``.
Both paths return a pandas DataFrame: one row per run, its parameters and final metrics.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import random
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable

from ...train.config import (ConfigError, RunConfig, credit_fields_not_taken, flatten, override,
                             parse_options)
from .callback import WandbCallback, wandb_mode

__all__ = ["sweep", "expand_sweep", "load_sweep_config", "sweep_parameters", "train_run", "add_cli"]

TrainFn = Callable[[dict[str, Any], WandbCallback], dict[str, float]]
_NOT_SWEEPABLE = {"wandb", "resume", "out", "ppo.seed"}


def sweep_parameters() -> dict[str, Any]:
    """Sweepable names with their defaults: ``RunConfig`` fields by dotted name, and the PPO
    fields also by their short name (``lr`` = ``ppo.lr``)."""
    names = {k: v for k, v in flatten(RunConfig()).items() if k not in _NOT_SWEEPABLE}
    short = {k[4:]: v for k, v in names.items() if k.startswith("ppo.") and k[4:] not in names}
    return {**names, **short}


def load_sweep_config(config: dict[str, Any] | str | Path) -> dict[str, Any]:
    if isinstance(config, (str, Path)):
        import yaml

        with open(config, encoding="utf-8") as f:
            config = yaml.safe_load(f)
    if not isinstance(config, dict) or not isinstance(config.get("parameters"), dict):
        raise ConfigError("a sweep config needs a 'parameters' mapping")
    return config


def validate(config: dict[str, Any], valid: set[str] | None) -> None:
    """Unknown parameter names, credit strategies or value specs fail here, before any run."""
    from ... import credit as credit_lib

    params = config["parameters"]
    if valid is not None:
        unknown = sorted(set(params) - valid)
        if unknown:
            raise ConfigError(f"unknown sweep parameter(s) {unknown}; valid: {sorted(valid)}")
    for name, spec in params.items():
        if not isinstance(spec, dict) or not ({"value", "values", "min", "max"} & set(spec)):
            raise ConfigError(f"sweep parameter {name!r} needs value, values or min/max; got {spec!r}")
    if "credit" in params:
        spec = params["credit"]
        for name in spec.get("values", [spec.get("value")]):
            if name not in credit_lib.names():
                raise ConfigError(f"unknown credit strategy {name!r} in sweep; registered: "
                                 f"{', '.join(credit_lib.names())}")
    method = config.get("method", "grid")
    if method not in ("grid", "random", "bayes"):
        raise ConfigError(f"sweep method must be grid, random or bayes, got {method!r}")


def expand_sweep(config: dict[str, Any], count: int | None = None, seed: int = 0
                 ) -> list[dict[str, Any]]:
    """The runs' parameter dicts: the grid's product, or ``count`` random samples."""
    params, method = config["parameters"], config.get("method", "grid")
    if method == "bayes":
        warnings.warn("bayes search needs the W&B server; running it as random search offline",
                      stacklevel=2)
        method = "random"
    if method == "grid":
        axes = {}
        for name, spec in params.items():
            if "min" in spec or "max" in spec:
                raise ConfigError(f"grid search needs 'values' for {name!r}, not a min/max range")
            axes[name] = spec["values"] if "values" in spec else [spec["value"]]
        runs = [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]
        return runs[:count] if count else runs
    rng = random.Random(seed)
    n = count or config.get("run_cap") or 4
    return [{name: _sample(name, spec, rng) for name, spec in params.items()} for _ in range(n)]


def _sample(name: str, spec: dict[str, Any], rng: random.Random) -> Any:
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return rng.choices(spec["values"], weights=spec.get("probabilities"))[0]
    lo, hi = spec["min"], spec["max"]
    dist = spec.get("distribution", "int_uniform" if isinstance(lo, int) and isinstance(hi, int)
                    else "uniform")
    if dist == "uniform":
        return rng.uniform(lo, hi)
    if dist == "int_uniform":
        return rng.randint(lo, hi)
    if dist == "log_uniform_values":
        return math.exp(rng.uniform(math.log(lo), math.log(hi)))
    if dist == "log_uniform":
        return math.exp(rng.uniform(lo, hi))
    raise ConfigError(f"distribution {dist!r} of {name!r} is not supported offline")


def effective_params(params: dict[str, Any]) -> dict[str, Any]:
    """Drop credit parameters the chosen strategy does not take (uniform has no gamma), so a
    credit x gamma grid does not fail and does not repeat identical uniform runs."""
    dropped = credit_fields_not_taken(params.get("credit", RunConfig.credit))
    return {k: v for k, v in params.items() if k not in dropped}


def train_run(params: dict[str, Any], callback: WandbCallback) -> dict[str, float]:
    """Default sweep run: ``run(config)`` with ``params`` over RunConfig's defaults, in a
    temporary run folder; returns the final train reward and the final dev evaluation."""
    from ...train.run import run

    config = override(RunConfig(out=tempfile.mkdtemp(prefix="ll-sweep-")), params)
    # swept values live under "sweep" so they never shadow the callback's own keys (credit =
    # the full describe() string); online, wandb.agent also puts them at the top level
    callback.config.update({"run": _jsonable_config(config), "env": config.env,
                            "model": config.model, "steps": config.steps, "sweep": dict(params)})
    summary = run(config, [callback], log=lambda _line: None)
    rewards = summary["history"]
    out = {"reward_mean": rewards[-1] if rewards else float("nan"),
           "reward_mean_max": max(rewards) if rewards else float("nan")}
    out.update({f"eval_{k}": float(v) for k, v in summary["after"].items()})
    return out


def _jsonable_config(config: RunConfig) -> dict[str, Any]:
    data = dataclasses.asdict(config)
    roles = data["ppo"]["trainable_roles"]
    data["ppo"]["trainable_roles"] = list(roles) if roles is not None else None
    return data


def sweep(config: dict[str, Any] | str | Path, train_fn: TrainFn | None = None, *,
          project: str = "lightning-lab-sweeps", count: int | None = None, group: str | None = None,
          dir: str | Path | None = None, mode: str | None = None, seed: int = 0,
          valid_params: set[str] | None = None, table_every: int = 0, progress: bool = True):
    """Run a W&B sweep config; returns a DataFrame (one row per run: params, metrics, run id).

    ``train_fn(params, callback) -> metrics`` trains one run, logging through ``callback`` (a
    ``WandbCallback`` to ``attach`` to its trainer); default ``train_run``. ``valid_params``:
    the names ``train_fn`` accepts (default: the train CLI's options when ``train_fn`` is None,
    else unchecked). Online (logged in, or ``mode="online"``) uses ``wandb.sweep`` + ``wandb.agent``.
    """
    import pandas as pd

    config = load_sweep_config(config)
    if valid_params is None and train_fn is None:
        valid_params = set(sweep_parameters())
    validate(config, valid_params)
    fn: TrainFn = train_fn or train_run
    prep = effective_params if train_fn is None else dict
    group = group or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    resolved = wandb_mode(mode)
    rows: list[dict[str, Any]] = []

    def one_run(i: int, params: dict[str, Any]) -> None:
        cb = WandbCallback(project=project, group=group, name=f"{group}-{i}", mode=resolved,
                           dir=str(dir) if dir else None, table_every=table_every,
                           config={"sweep_group": group}, finish_with_run=False)
        row: dict[str, Any] = {"run": i, **params}
        t0 = time.perf_counter()
        try:
            row.update(fn(params, cb))
        except Exception as exc:  # noqa: BLE001 - one bad run must not end the sweep
            warnings.warn(f"sweep run {i} {params} failed: {type(exc).__name__}: {exc}", stacklevel=2)
            row["error"] = f"{type(exc).__name__}: {exc}"
        row["seconds"] = time.perf_counter() - t0
        row["run_id"] = getattr(cb.run, "id", None)
        if cb.run is not None:
            cb.run.summary.update({k: v for k, v in row.items()
                                   if isinstance(v, (int, float)) and k != "run"})
        cb.finish()
        rows.append(row)
        if progress:
            shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
            print(f"[sweep {group}] run {i}: {shown}", flush=True)

    if resolved in (None, "online"):
        import wandb

        sweep_id = wandb.sweep(config, project=project)

        def agent_fn() -> None:
            run = wandb.init(group=group)
            one_run(len(rows), prep(dict(run.config)))
            run.finish()

        wandb.agent(sweep_id, function=agent_fn, count=count)
    else:
        runs, seen = [], set()
        for params in expand_sweep(config, count=count, seed=seed):
            params = prep(params)
            key = tuple(sorted((k, repr(v)) for k, v in params.items()))
            if key not in seen:  # e.g. uniform x gamma: the gamma axis does not apply
                seen.add(key)
                runs.append(params)
        for i, params in enumerate(runs):
            one_run(i, params)
    frame = pd.DataFrame(rows)
    frame.attrs["group"] = group
    return frame


# ---------------------------------------------------------------------- CLI
def add_cli(sub: Any) -> None:
    """``lightning-lab sweep sweep.yaml``. Model/env/steps come from the YAML (fixed ``value``s)
    or ``--set key=value``: one source of truth per run."""
    p = sub.add_parser("sweep", help="run a W&B sweep config (offline locally unless logged in)")
    p.add_argument("config", help="W&B sweep config (YAML)")
    p.add_argument("--count", type=int, default=None, help="max runs (random search: runs to sample)")
    p.add_argument("--project", default="lightning-lab-sweeps")
    p.add_argument("--group", default=None)
    p.add_argument("--dir", default=None, help="parent folder of wandb/ (default: WANDB_DIR or cwd)")
    p.add_argument("--mode", default=None, choices=["online", "offline", "disabled"])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="fix a parameter for every run, e.g. --set model=tiny (repeatable)")
    p.add_argument("--out", default=None, help="write the results table (.csv)")
    p.set_defaults(handler=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    config = load_sweep_config(args.config)
    for key, value in parse_options(args.set, "--set").items():
        config["parameters"][key] = {"value": value}
    frame = sweep(config, project=args.project, count=args.count, group=args.group, dir=args.dir,
                  mode=args.mode)
    print(frame.to_string(index=False))
    if args.out:
        frame.to_csv(args.out, index=False)
        print(f"wrote {len(frame)} runs to {args.out}")
    return 0

"""Weights & Biases tracking: a trainer callback, sweeps, and a reader for offline runs.

``WandbCallback(...).attach(trainer)`` logs every PPO step; ``sweep(config)`` runs a W&B sweep
config (offline locally unless you are logged in) and returns a DataFrame; ``read_run(run_dir)``
parses what an offline run recorded. Offline by default, never needs an API key, and wandb is
imported only inside functions so importing this package costs nothing.
"""

from .callback import LOSS_KEYS, WandbCallback, split_metrics, transition_rows, wandb_mode
from .runs import find_runs, read_run
from .sweeps import add_cli, expand_sweep, load_sweep_config, sweep, sweep_parameters, train_run

__all__ = ["WandbCallback", "wandb_mode", "split_metrics", "transition_rows", "LOSS_KEYS",
           "find_runs", "read_run", "sweep", "expand_sweep", "load_sweep_config",
           "sweep_parameters", "train_run", "add_cli"]

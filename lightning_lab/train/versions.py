"""Which weights sampled a step's rollouts: checks and stamps around the sampler's version.

A step's rollouts may come from a server's synced adapter (``sync.py``) or, with asynchronous
rollouts, from weights one or more updates old; these functions refuse set-ups that cannot keep
the promised staleness, fail a step whose server failed, and record on each transition the
version that sampled it and its lag, so the update and the dashboard can see both.
"""

from __future__ import annotations

from typing import Any

from .distributed import DataParallel
from .multi_adapter import adapter_of
from ..inference.servers import RolloutServerError
from ..records import Batch

__all__ = ["check_async", "check_servers", "stamp_lag", "stamp_versions"]


def check_servers(sync: Any, parallel: DataParallel, batch: Batch) -> None:
    """Fail the step if a rollout server failed while ``batch`` was sampled, unless the run
    may go on with the others (``inference/servers.py``); under data parallelism every
    process fails if any saw such a failure."""
    pool = getattr(getattr(sync, "backend", None), "pool", None)
    if pool is None:
        return
    error = None
    try:
        pool.check(batch)
    except RolloutServerError as exc:
        error = str(exc)
    errors = [e for e in parallel.gather(error) if e is not None]
    if errors:
        raise RolloutServerError("; ".join(dict.fromkeys(errors)), batch)


def check_async(max_staleness: int, sync: Any, policy: Any) -> None:
    """Asynchronous rollouts need a sampler holding its own weights, at most
    ``max_staleness`` versions behind when the update that uses them runs."""
    k = max_staleness
    if sync is not None:
        if sync.config.every > k:
            raise ValueError(
                f"PPOConfig.max_staleness={k} but the adapter sync runs every "
                f"{sync.config.every} steps (SyncConfig.every): prefetched rollouts "
                f"would be up to {sync.config.every} versions old; sync at least every "
                f"{k} step(s) or raise max_staleness")
    elif not hasattr(getattr(policy, "engine", None), "snapshot_weights"):
        raise ValueError(
            f"PPOConfig.max_staleness={k} needs a sampler with its own copy of the weights: "
            f"the local engine, or a server with an AdapterSync (trainer.sync); this "
            f"policy's engine is {type(getattr(policy, 'engine', None)).__name__}")


def stamp_versions(sync: Any, batch: Batch) -> dict[str, float]:
    """Record the adapter version each transition was sampled with (the server's word when
    the proxy recorded one); count those not sampled by the version now live."""
    stale = 0
    for _, tr in batch.transitions():
        live = sync.current(adapter_of(tr))  # each adapter has its own module
        stale += tr.meta.setdefault("adapter_version", live) != live
    return {"stale_transitions": float(stale)}


def stamp_lag(batch: Batch, version: int, iteration: int) -> dict[str, float]:
    """Record on each transition the version that sampled it (a server's own word stays)
    and its ``lag``: the trainer iterations between that version and the weights this update
    starts from (``iteration``); their mean and max are the step's staleness."""
    lags = []
    for _, tr in batch.transitions():
        tr.meta.setdefault("adapter_version", version)
        tr.meta["lag"] = iteration - version
        lags.append(tr.meta["lag"])
    return {"staleness_mean": sum(lags) / len(lags) if lags else 0.0,
            "staleness_max": float(max(lags, default=0))}

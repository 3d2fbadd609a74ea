"""How many CPU threads the update uses: the user's cap, or as many cores as others leave idle.

torch's OpenMP threads spin-wait for each other at every parallel region. On a machine whose
cores are busy with other processes, a thread that is descheduled stalls its peers, so a
2-thread update under load ~10 on 2 cores took 440-560 s per step instead of 15-28 s: far worse
than a fair share. So, unless the user caps the threads (``--threads N``, ``RunConfig.threads``,
or the environment variable ``LIGHTNING_LAB_THREADS``; ``OMP_NUM_THREADS`` is honoured too), the
update uses the cores the 1-minute load average says are idle, down to one, re-checked before
every step. ``choose_threads`` is the decision, a pure function; ``ThreadGovernor`` applies it.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable

from .config import ConfigError

__all__ = ["ENV_VAR", "SharedCores", "ThreadGovernor", "available_cpus", "choose_threads",
           "requested_threads"]

ENV_VAR = "LIGHTNING_LAB_THREADS"


def available_cpus() -> int:
    """Cores this process may run on (its affinity mask: a container or ``taskset`` limit)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def choose_threads(load: float, cpus: int, requested: int | None, own: float = 0.0
                   ) -> tuple[int, str]:
    """Threads for the update and why.

    ``load``: the 1-minute load average; ``own``: the part of it that is this process (its
    average number of busy threads); ``requested``: the user's cap (None: decide). Without a
    cap, the update takes the cores the others leave idle, rounded, at least one and at most
    ``cpus``; a cap is used as given, up to ``cpus``.
    """
    if requested is not None:
        threads = min(requested, cpus)
        note = f", {cpus} cores" if threads < requested else ""
        return threads, f"requested {requested}{note}"
    others = max(0.0, load - own)
    threads = max(1, min(cpus, int(cpus - others + 0.5)))
    if threads == cpus:
        return threads, f"{cpus} cores, load {load:.1f}"
    return threads, (f"the machine is busy: load {load:.1f} on {cpus} cores, {others:.1f} of it "
                     f"not this run; set --threads or {ENV_VAR} to override")


def requested_threads(configured: int | None) -> int | None:
    """The user's cap: the config's ``threads``, else ``LIGHTNING_LAB_THREADS``, else
    ``OMP_NUM_THREADS`` (which pins torch's threads at start), else None (decide by load)."""
    if configured is not None:
        return configured
    for name in (ENV_VAR, "OMP_NUM_THREADS"):
        raw = os.environ.get(name, "").strip()
        if raw:
            try:
                value = int(raw)
            except ValueError:
                value = 0
            if value < 1:
                raise ConfigError(f"{name} must be a whole number >= 1, got {raw!r}")
            return value
    return None


class ThreadGovernor:
    """Applies ``choose_threads`` to torch's intra-op threads of the calling thread (the one
    that runs the update) at start and before each step; logs each change and why."""

    def __init__(self, requested: int | None, log: Callable[[str], None]) -> None:
        self.requested, self.cpus, self.threads = requested, available_cpus(), 0
        self._log = log
        self._mark = (time.monotonic(), time.process_time())

    def _own_load(self) -> float:
        """This process's busy threads since the last check (CPU seconds per wall second)."""
        wall, cpu = time.monotonic(), time.process_time()
        busy = (cpu - self._mark[1]) / max(wall - self._mark[0], 1e-6)
        self._mark = (wall, cpu)
        return busy if self.threads else 0.0  # at start: loading the model is not a peer

    def adjust(self) -> int:
        """Re-decide (cheap: one ``getloadavg`` call) and apply the threads; returns them."""
        import torch

        own = self._own_load()
        if self.requested is not None and self.threads:
            return self.threads
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0  # not on Windows
        threads, why = choose_threads(load, self.cpus, self.requested, own)
        if threads != self.threads:
            torch.set_num_threads(threads)
            self._log(f"threads: {threads} for the update ({why})")
            self.threads = threads
        return threads


class SharedCores:
    """The update's threads while asynchronous rollouts sample beside it (``max_staleness``).

    A 2-thread update beside a busy decode thread on 2 cores spends its time in OpenMP barriers
    waiting for the thread that shares a core with the decoder, so overlapping gained ~5%. Inside
    this context the update runs ``threads - sampler_threads`` threads (at least one) while
    ``sampling()`` says the rollouts are still running, and takes its full ``threads`` back at
    the first decoder layer it enters after they finish, forward or backward. The switch happens
    on the update's own thread (torch's thread count is per Python thread), through a forward
    pre-hook on each layer and a gradient hook on its input.
    """

    def __init__(self, layers: list[Any], sampling: Callable[[], bool], sampler_threads: int):
        import torch

        self.layers, self.sampling = layers, sampling
        self.full = torch.get_num_threads()
        self.shared = max(1, self.full - sampler_threads)
        self._handles: list[Any] = []
        self._owner = 0

    def __enter__(self) -> "SharedCores":
        import torch

        self._owner = threading.get_ident()  # the sampler may run these layers too (HF path)
        if self.shared < self.full and self.sampling():
            torch.set_num_threads(self.shared)
            self._handles = [layer.register_forward_pre_hook(self._entering, with_kwargs=True)
                             for layer in self.layers]
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch

        for handle in self._handles:
            handle.remove()
        self._handles = []
        torch.set_num_threads(self.full)

    def _entering(self, _module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._widen()
        hidden = args[0] if args else kwargs.get("hidden_states")
        if getattr(hidden, "requires_grad", False):
            hidden.register_hook(self._widen_in_backward)

    def _widen_in_backward(self, _grad: Any) -> None:
        self._widen()

    def _widen(self) -> None:
        import torch

        if threading.get_ident() != self._owner:
            return
        if torch.get_num_threads() != self.full and not self.sampling():
            torch.set_num_threads(self.full)

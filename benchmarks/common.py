"""What every benchmark prints and how it repeats: the CPU it ran on, and medians of interleaved runs.

Numbers from a shared 2-core machine are noisy, so scripts report ratios against a baseline
measured in the same run, with each method repeated (interleaved with the others, so a burst of
load hits all of them) and summarised by its median.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any, Callable

import torch

from lightning_lab.inference.precision import BF16_FLAGS, cpu_info, native_bf16

INTERESTING_FLAGS = ("avx2", "avx512f", "avx512_vnni", *BF16_FLAGS, "amx_tile", "amx_int8")


def banner() -> str:
    """One line naming the CPU, the flags that decide kernel choice, and the thread setup."""
    name, flags = cpu_info()
    shown = " ".join(f for f in INTERESTING_FLAGS if f in flags) or "(no /proc/cpuinfo flags)"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"CPU: {name} | {os.cpu_count()} cores | flags: {shown} | native bf16: {native_bf16()} "
            f"| torch {torch.__version__}, {torch.get_num_threads()} threads | load avg {load:.1f}")


def interleaved(methods: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Run every method ``repeats`` times, round-robin; each call returns its own measurement."""
    results: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            results[name].append(fn())
    return results


def median(values: list[float]) -> float:
    return statistics.median(values)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def parse_args(cls: type, description: str) -> Any:
    """``cls()`` with each field settable as ``--field-name`` (type from its default)."""
    parser = argparse.ArgumentParser(description=description)
    for name, value in vars(cls()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    return cls(**vars(parser.parse_args()))


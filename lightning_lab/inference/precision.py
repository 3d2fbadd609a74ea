"""Which dtype the decode loop multiplies in, chosen from what the CPU can do natively.

Why: on a CPU with bf16 dot-product instructions (AVX512-BF16, AMX) a bf16 matmul of decode shape
runs several times faster than fp32, and matmuls are most of a decode step. Without them, bf16 is
emulated and slower than fp32, so ``"auto"`` keeps fp32 there. Only the decode loop's matmuls
change; weights, LoRA adapters, the KV cache and the trainer stay fp32 (see ``fast_llama``).
The update can opt into the same (``PPOConfig.update_dtype``: bf16 autocast of its matmuls).
"""

from __future__ import annotations

import platform
from functools import lru_cache

import torch

__all__ = ["DECODE_DTYPES", "cpu_info", "native_bf16", "resolve_dtype"]

DECODE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@lru_cache(maxsize=1)
def cpu_info() -> tuple[str, frozenset[str]]:
    """(model name, feature flags) of this CPU, from /proc/cpuinfo; empty flags elsewhere."""
    name, flags = platform.processor() or platform.machine(), frozenset()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and name in ("", platform.processor() or platform.machine()):
                    name = value.strip()
                elif key == "flags" and not flags:
                    flags = frozenset(value.split())
    except OSError:
        pass
    return name, flags


def native_bf16() -> bool:
    """True when the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX)."""
    return any(flag in cpu_info()[1] for flag in BF16_FLAGS)


def resolve_dtype(name: str, device: str = "cpu") -> torch.dtype:
    """A matmul dtype by name: ``"auto"`` is bf16 on a CPU with native bf16, else fp32; explicit
    names are taken as is."""
    if name == "auto":
        return torch.bfloat16 if device == "cpu" and native_bf16() else torch.float32
    if name not in DECODE_DTYPES:
        raise ValueError(f"matmul dtype must be one of auto, {', '.join(DECODE_DTYPES)}; got {name!r}")
    return DECODE_DTYPES[name]

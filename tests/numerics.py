"""Float comparisons that hold on any x86-64 CPU and thread count.

Two computations of the same value in float32 (batched vs row by row, shared prompt vs separate)
sum in different orders; how different depends on the CPU's kernels (AVX-512, AMX) and on the
number of threads. Elementwise ``allclose`` with a fixed ``atol`` fails on values that cancel
to near zero. The rule here: the largest difference must be small relative to the largest
magnitude of the tensor compared — a real bug (a wrong row, a missing gradient path) moves
values by O(1) of that magnitude.
"""

from __future__ import annotations

import torch


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = "") -> None:
    scale = expected.abs().max().item()
    diff = (actual - expected).abs().max().item()
    assert diff <= rtol * max(scale, 1e-12), (
        f"{what}: max |difference| {diff:.3g} exceeds {rtol:g} x max |value| {scale:.3g}")

"""Shared fixtures: the tiny model, and the path to ../shared data (tests skip without it).

``--device cuda`` runs the fixtures' models on a GPU (bf16 weights, the CUDA sampling and autocast
paths); CI never passes it. Tolerances are magnitude-relative, but tests written for fp32 CPU
equality may need bf16-sized tolerances there: what fails on CUDA is worth reading, not hiding.
"""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.exists():
        pytest.skip(f"benchmark slices not found at {SHARED} (read-only ../shared beside the repo)")
    return SHARED


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", choices=["cpu", "cuda"],
                     help="device of the tiny-model fixtures (default cpu; cuda needs a GPU)")


def pytest_configure(config):
    if config.getoption("--device") == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise pytest.UsageError("--device cuda: torch sees no CUDA device on this machine")


@pytest.fixture(scope="session")
def device(pytestconfig) -> str:
    return pytestconfig.getoption("--device")


@pytest.fixture
def tiny(device):
    import lightning_lab as ll

    return ll.models.load("tiny", device=device)


@pytest.fixture
def tiny_lora(device):
    import lightning_lab as ll

    return ll.models.load("tiny", lora=True, device=device)


@pytest.fixture(scope="module")
def policy():
    """A tiny LoRA policy, fresh per test module (the proxy tests serve it over HTTP)."""
    import lightning_lab as ll

    p = ll.models.load("tiny", lora=True)
    yield p
    p.close()

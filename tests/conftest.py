"""Shared fixtures: the tiny model, and the path to ../shared data (tests skip without it)."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.exists():
        pytest.skip(f"benchmark slices not found at {SHARED} (read-only ../shared beside the repo)")
    return SHARED


@pytest.fixture
def tiny():
    import lightning_lab as ll

    return ll.models.load("tiny")


@pytest.fixture
def tiny_lora():
    import lightning_lab as ll

    return ll.models.load("tiny", lora=True)

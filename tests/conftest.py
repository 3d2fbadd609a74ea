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


def sharpen(policy) -> None:
    """Scale the tiny model's (tied) output embeddings so its next-token distribution is peaked.

    A randomly initialised 64-wide model is near-uniform over 49k tokens (entropy ~10.8 nats);
    scaled by 8 it sits near 8 nats with a head of likely tokens, like a real LM, which is what
    makes a few PPO steps visibly move reward.
    """
    import torch

    with torch.no_grad():
        policy.model.get_input_embeddings().weight.mul_(8.0)


@pytest.fixture
def tiny():
    import lightning_lab as ll

    policy = ll.models.load("tiny")
    sharpen(policy)
    return policy


@pytest.fixture
def tiny_lora():
    import lightning_lab as ll

    policy = ll.models.load("tiny", lora=True)
    sharpen(policy)
    return policy

"""Where lightning-lab keeps derived files (converted models, generated databases)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """``$LIGHTNING_LAB_CACHE``, or ``~/.cache/lightning-lab``."""
    env = os.environ.get("LIGHTNING_LAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lightning-lab"

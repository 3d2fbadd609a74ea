"""Errors the user can fix, shared by every layer (the CLI exits 2 with their message)."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A value the user gave (a flag, a config field, a bind address) is invalid or unknown."""

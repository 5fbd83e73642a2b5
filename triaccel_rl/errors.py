"""Exceptions shared across the package, in a module that imports nothing of ours so that any module may use it."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A configuration value is out of its allowed range; the message names the value and the range."""

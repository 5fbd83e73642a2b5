"""Exceptions and the choice-enum base shared across the package.

This module imports nothing of ours, so that any module may use it.
"""

from __future__ import annotations

import enum
from typing import Any, Self

__all__ = ["ChoiceEnum", "ConfigError"]


class ConfigError(ValueError):
    """A configuration value is out of its allowed range; the message names the value and the range."""


class ChoiceEnum(enum.Enum):
    """An enum of lower-case string choices that users name in configs and on the command line.

    ``parse`` accepts a member or its value (surrounding spaces and case ignored) and otherwise raises a
    ``ConfigError`` that names the value and lists the allowed ones. A subclass words the first half of
    that message by overriding ``_unknown``.
    """

    @classmethod
    def parse(cls, value: Self | str) -> Self:
        """Turns ``"profile"`` into ``CostMode.PROFILE`` (say), with a clear error otherwise."""
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            allowed = ", ".join(str(member.value) for member in cls)
            raise ConfigError(f"{cls._unknown(value)}; allowed: {allowed}") from None

    @classmethod
    def _unknown(cls, value: Any) -> str:
        return f"unknown {cls.__name__} {value!r}"

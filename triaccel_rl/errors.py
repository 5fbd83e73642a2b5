"""Exceptions and the choice-enum base shared across the package.

This module imports nothing of ours, so that any module may use it.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any, Self

if TYPE_CHECKING:
    import torch

__all__ = ["ChoiceEnum", "ConfigError", "DetachedParametersError"]


class ConfigError(ValueError):
    """A configuration value is out of its allowed range; the message names the value and the range."""


class DetachedParametersError(RuntimeError):
    """Parameters whose ``.data`` no longer lives in the fused step's flat buffer (``params``: the parameters).

    Raised by ``FlatParameterStore.rebind_grads`` (through ``StepEngine.bind_grads``, with the parameters' names)
    when a model was moved or cast after the controller was built.
    """

    def __init__(self, params: list[torch.nn.Parameter], names: list[str] | None = None) -> None:
        self.params = params
        shown = names or [f"{tuple(p.shape)} {p.dtype} on {p.device}" for p in params]
        super().__init__(
            f"{len(params)} parameter(s) no longer live in the fused step's flat buffer: {', '.join(shown[:5])}"
            f"{' ...' if len(shown) > 5 else ''}. Their .data was replaced after the controller was built "
            "(model.to(...), .half(), .float(), a memory-format change): the fused step would update the flat "
            "buffer and the model would never see it. Move or cast the model before building the controller."
        )


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

"""Exceptions and the choice-enum base shared across the package.

This module imports nothing of ours, so that any module may use it.
"""

from __future__ import annotations

import enum
import math
import numbers
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # (typing.Self is Python 3.11's: for the annotations only, the package imports on 3.10)
    import torch
    from typing_extensions import Self

__all__ = [
    "ChoiceEnum",
    "ConfigError",
    "DetachedParametersError",
    "NoGoodStateError",
    "is_whole",
    "require_bool",
    "require_number",
    "require_whole",
]


class ConfigError(ValueError):
    """A configuration value is out of its allowed range; the message names the value and the range."""


class NoGoodStateError(RuntimeError):
    """The shield has no healthy state left to roll back to: every one it has failed (non-finite losses or buffers).

    Raised only with the shield on (``ControllerConfig.rollback``), by:

    - ``Controller(...)`` on a model whose trained weights or buffers hold NaN or inf (the starting copy would be of
      that state);
    - ``Controller.autocast``, ``backward`` or ``step``, the first after the weights or optimizer state were written
      from outside since the build or the last load (``model.load_state_dict``, an in-place write), where the
      trained weights or buffers now hold NaN or inf;
    - ``Controller.load_state_dict`` for a model loaded with non-finite trained weights or buffers;
    - ``Controller.step`` when a resumed run's starting state, the checkpoint's, fails twice in a row: a checkpoint
      saved between an update that broke the model and the rollback it would have brought;
    - ``Controller.step`` at a failure after ``ControllerConfig.max_rollbacks_in_a_row`` rollbacks in a row (no
      healthy interval, and no newer state confirmed, between them): the restored state keeps failing (an update from
      it that overflows, huge optimizer moments); the last confirmed state is restored, then the error raised.
    """


class DetachedParametersError(RuntimeError):
    """Parameters whose ``.data`` no longer lives in the fused step's flat buffer (``params``: the parameters).

    Raised by ``FlatParameterStore.rebind_grads`` (through ``StepEngine.bind_grads``, with the parameters' names)
    when a model was moved or cast, or a parameter's ``.data`` assigned, after the controller was built.
    """

    def __init__(self, params: list[torch.nn.Parameter], names: list[str] | None = None) -> None:
        self.params = params
        shown = names or [f"{tuple(p.shape)} {p.dtype} on {p.device}" for p in params]
        super().__init__(
            f"{len(params)} parameter(s) no longer live in the fused step's flat buffer: {', '.join(shown[:5])}"
            f"{' ...' if len(shown) > 5 else ''}. Their .data was replaced after the controller was built "
            "(model.to(...), .half(), .float(), a memory-format change, or an assignment to .data, which "
            "torch.nn.utils.vector_to_parameters makes): the fused step would update the flat buffer and the model "
            "would never see it. Move or cast the model before building the controller; to write new values into a "
            "parameter, copy them in place under torch.no_grad() (p.copy_(...)), which keeps it in the buffer."
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
            if not isinstance(value, str):  # str(None) was "none": ElasticConfig(lr_rule=None) turned the coupling off
                raise ValueError(value)
            return cls(value.strip().lower())
        except ValueError:
            allowed = ", ".join(str(member.value) for member in cls)
            raise ConfigError(f"{cls._unknown(value)}; allowed: {allowed}") from None

    @classmethod
    def _unknown(cls, value: Any) -> str:
        return f"unknown {cls.__name__} {value!r}"


def require_number(label: str, value: object, allowed: str, optional: bool = False) -> None:
    """Refuses a bool, a string, None (unless ``optional``) or any other non-number for ``label``, naming ``allowed``.

    The range itself is each caller's check (``ControllerConfig``'s, ``SignalConfig``'s); this one keeps ``True``
    (which compares as 1), ``"0.5"`` and a None where none is allowed (a ``TypeError`` from the comparison) out of it.
    """
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        none = ", or None" if optional else ""
        raise ConfigError(f"{label}={value!r} must be a number {allowed}{none}; got {type(value).__name__}")


def require_whole(label: str, value: object, allowed: str) -> None:
    """Refuses a bool, a float (2.5, NaN, even 2.0) or a non-number for the count ``label``, naming ``allowed``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{label}={value!r} must be a whole number {allowed}; got {type(value).__name__}")


def require_bool(label: str, value: object, optional: bool = False) -> None:
    """Refuses anything but True or False (or None, when ``optional``) for the switch ``label``."""
    if not (isinstance(value, bool) or (optional and value is None)):
        raise ConfigError(f"{label}={value!r} must be True or False{', or None' if optional else ''}")


def is_real(value: object) -> bool:
    """A real number, Python's or NumPy's, not a bool (``True`` compares as 1)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_finite_real(value: object) -> bool:
    """A finite real number, Python's or NumPy's, not a bool (np.float32 was refused as "must be a finite number").

    An integer too large for a float is not one (``math.isfinite`` raised OverflowError on 10 ** 400 from a JSON).
    """
    if not is_real(value):
        return False
    try:
        return math.isfinite(value)  # type: ignore[arg-type]
    except OverflowError:
        return False


def is_whole(value: object) -> bool:
    """An integer, Python's or NumPy's, not a bool.

    A helper rather than inline checks: mypy reads ``isinstance(x: int, Integral)`` as always False, and the code
    after such a check as unreachable (so unchecked).
    """
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)

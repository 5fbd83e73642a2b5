"""``SavedState``: the fields of a saved ``state_dict()``, each checked, for a ``load_state_dict`` that loads whole.

A ``load_state_dict`` reads every field through it before it sets anything, so a refused state leaves the object as
it was. Numbers come back as Python numbers and per-layer values as numpy arrays; a wrong field raises a
``ValueError`` that names the owner, the field and what was expected.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

__all__ = ["SavedState"]


class SavedState:
    """The checked fields of ``state``, a mapping ``owner.state_dict()`` returned.

    Args:
        state: the saved state.
        owner: what saved it, for the messages (``"the signal collector's state"``).
        keys: the fields it must hold.

    Raises:
        ValueError: ``state`` is not a mapping, or lacks one of ``keys`` (all missing ones are named).

    Example:
        >>> saved = SavedState({"steps": 3, "ema": [0.5, 1.0]}, "the state", ("steps", "ema"))
        >>> saved.count("steps"), saved.reals("ema", length=2).tolist()
        (3, [0.5, 1.0])
        >>> saved.count("ema")
        Traceback (most recent call last):
        ...
        ValueError: the state has ema [0.5, 1.0], not a whole number >= 0
    """

    def __init__(self, state: object, owner: str, keys: Iterable[str]) -> None:
        if not isinstance(state, Mapping):
            raise ValueError(f"{owner} must be the dict its state_dict() returned; got {type(state).__name__}")
        missing = [key for key in keys if key not in state]
        if missing:
            raise ValueError(f"{owner} lacks {', '.join(missing)}: pass the dict its state_dict() returned")
        self.state = state
        self.owner = owner

    def __getitem__(self, key: str) -> Any:
        return self.state[key]

    def count(self, key: str, least: int = 0) -> int:
        """The field as an int, a whole number >= ``least`` (not a bool or a float)."""
        value = self.state[key]
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
            raise ValueError(f"{self.owner} has {key} {value!r}, not a whole number >= {least}")
        return int(value)

    def real(self, key: str, *, nan: bool = False, least: float = -math.inf) -> float:
        """The field as a float: finite and >= ``least``, or NaN where ``nan`` allows it."""
        value = self.state[key]
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"{self.owner} has {key} {value!r}, not a number")
        try:
            number = float(value)
        except OverflowError:  # an int past float's range
            number = math.inf
        if math.isnan(number) and nan:
            return number
        if not (math.isfinite(number) and number >= least):
            allowed = f"a finite number >= {least}" if least > -math.inf else "a finite number"
            raise ValueError(f"{self.owner} has {key} {value!r}, not {allowed}{' or NaN' if nan else ''}")
        return number

    def reals(self, key: str, length: int | None = None, *, nan: bool = False) -> np.ndarray:
        """The field, a list of ``length`` numbers (None: any number of them), as a float64 array.

        Each finite, or NaN where ``nan`` allows it.
        """
        value = self.state[key]
        numeric = isinstance(value, (list, tuple)) and all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value
        )
        if not numeric or (length is not None and len(value) != length):
            expected = "a list of numbers" if length is None else f"a list of {length} numbers"
            raise ValueError(f"{self.owner} has {key} {_short(value)}, not {expected}")
        try:
            array = np.array(value, dtype=np.float64)
        except OverflowError:  # an int past float's range
            raise ValueError(f"{self.owner} has {key} with a value that is not finite") from None
        if not (np.isfinite(array) | (np.isnan(array) if nan else False)).all():
            raise ValueError(f"{self.owner} has {key} with a value that is not finite{' or NaN' if nan else ''}")
        return array

    def optional(self, key: str) -> bool:
        """Whether the field is set (not None)."""
        return self.state[key] is not None


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."

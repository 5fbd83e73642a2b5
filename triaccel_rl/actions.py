"""The action space and ``decode(raw) → Action``, the one place raw policy outputs become settings."""

from __future__ import annotations

import numpy as np
import torch
from gymnasium import spaces

from triaccel_rl.config import ControllerConfig
from triaccel_rl.types import Action, BatchMove, Precision

__all__ = ["action_space", "decode", "encode"]


def action_space(config: ControllerConfig) -> spaces.MultiDiscrete:
    """``MultiDiscrete``: a precision per group (fp32/bf16/fp16), an LR-scale index, a batch move.

    Example:
        >>> action_space(ControllerConfig()).nvec.tolist()
        [3, 3, 3, 3, 5, 3]
    """
    nvec = [len(Precision)] * config.n_groups + [len(config.lr_scales), len(BatchMove)]
    return spaces.MultiDiscrete(np.array(nvec, dtype=np.int64))


def decode(raw: np.ndarray | list[int], config: ControllerConfig) -> Action:
    """Turns a raw action vector into an ``Action``.

    Raises:
        ValueError: wrong length or a ragged list, a non-integer entry (a bool too, bare or in an array or tensor), or
            an entry outside its range (all named).
    """
    nvec = action_space(config).nvec
    if isinstance(raw, (list, tuple)):
        # asarray makes bools 1 and 0, those in 0-d arrays and tensors too (list(torch_bool_tensor) holds such)
        if any(_is_bool(v) for v in raw):
            raise ValueError(f"action {list(raw)} must hold integers; True and False are no action indices")
        if len(raw) == len(nvec):  # a Python int past int64 made an object array, refused as "got object"
            for i, v in enumerate(raw):
                if isinstance(v, int) and not 0 <= v < int(nvec[i]):
                    raise _out_of_range(i, v, nvec, config)
    if isinstance(raw, torch.Tensor):  # NumPy cannot read a bf16 tensor, nor one that requires grad
        raw = raw.detach().cpu().to(torch.float64 if raw.is_floating_point() else raw.dtype)
    try:
        values = np.asarray(raw)
    except ValueError as err:  # a ragged list: numpy's message named no action
        raise ValueError(
            f"action {raw!r} must be {len(nvec)} integers, one per entry of MultiDiscrete({nvec.tolist()})"
        ) from err
    if values.shape != nvec.shape:
        raise ValueError(f"action {values.tolist()} has shape {values.shape}; expected {tuple(nvec.shape)}")
    real = np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating)
    if values.dtype == np.bool_ or not real:  # True is no action index; 1+5j lost its 5j in the cast
        raise ValueError(f"action {values.tolist()} must hold integers; got {values.dtype}")
    if not np.issubdtype(values.dtype, np.integer):
        if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
            raise ValueError(f"action {values.tolist()} must hold integers")
    bad = np.flatnonzero((values < 0) | (values >= nvec))  # before a cast: 1e19 would wrap around in int64
    if len(bad):
        i = int(bad[0])
        raise _out_of_range(i, values[i].item(), nvec, config)
    values = values.astype(np.int64)
    k = config.n_groups
    return Action(
        group_precisions=tuple(Precision(int(v)) for v in values[:k]),
        lr_scale=float(config.lr_scales[int(values[k])]),
        batch_move=BatchMove(int(values[k + 1])),
    )


def encode(action: Action, config: ControllerConfig) -> np.ndarray:
    """The raw vector that decodes to ``action`` (its LR scale must be one of ``config.lr_scales``).

    Raises:
        ValueError: the LR scale or the group count does not fit ``config``.
    """
    if len(action.group_precisions) != config.n_groups:
        raise ValueError(f"action has {len(action.group_precisions)} groups; config has {config.n_groups}")
    if action.lr_scale not in config.lr_scales:
        raise ValueError(f"lr_scale={action.lr_scale!r} is not one of {config.lr_scales}")
    return np.array(
        [int(p) for p in action.group_precisions] + [config.lr_scales.index(action.lr_scale), int(action.batch_move)],
        dtype=np.int64,
    )


def _is_bool(value: object) -> bool:
    """True, False, or a bool wrapped in a numpy array or tensor (of any shape)."""
    dtype = getattr(value, "dtype", None)
    return isinstance(value, (bool, np.bool_)) or dtype == np.bool_ or dtype is torch.bool


def _out_of_range(index: int, value: float, nvec: np.ndarray, config: ControllerConfig) -> ValueError:
    return ValueError(
        f"action entry {index} = {_shown(value)} is outside [0, {int(nvec[index]) - 1}] "
        f"({_entry_name(index, config)}); the action space is MultiDiscrete({nvec.tolist()})"
    )


def _shown(value: float) -> str:
    """An entry as written: 3 for 3.0, 1e+19 as it is (an int64 cast would wrap it to a negative number)."""
    return str(int(value)) if abs(value) < 2**53 else repr(value)


def _entry_name(index: int, config: ControllerConfig) -> str:
    if index < config.n_groups:
        return f"precision of group {index}: 0=fp32, 1=bf16, 2=fp16"
    if index == config.n_groups:
        return f"LR-scale index into {config.lr_scales}"
    return "batch move: 0=shrink, 1=keep, 2=grow"

"""triaccel-rl: a controller for PyTorch training runs that picks per-layer precision, LR scale and batch size.

The user-facing names are imported lazily, so ``import triaccel_rl`` stays cheap and the Gymnasium
environment registers only when ``triaccel_rl.envs`` is imported.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "Action",
    "Controller",
    "ControllerConfig",
    "DetachedParametersError",
    "HardwareProfile",
    "HeuristicConfig",
    "MemoryBudget",
    "NoGoodStateError",
    "Precision",
    "TrainingRun",
    "UnrecoverableOOMError",
    "get_task",
]
__version__ = "0.1.0"

_LAZY = {
    "Action": "triaccel_rl.types",
    "Precision": "triaccel_rl.types",
    "Controller": "triaccel_rl.controller",
    "ControllerConfig": "triaccel_rl.config",
    "DetachedParametersError": "triaccel_rl.errors",
    "HardwareProfile": "triaccel_rl.config",
    "HeuristicConfig": "triaccel_rl.config",
    "MemoryBudget": "triaccel_rl.config",
    "NoGoodStateError": "triaccel_rl.errors",
    "TrainingRun": "triaccel_rl.training",
    "UnrecoverableOOMError": "triaccel_rl.elastic",
    "get_task": "triaccel_rl.tasks",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        try:
            module = importlib.import_module(_LAZY[name])
        except AttributeError as err:
            # Raised from here as it is, `from triaccel_rl import Controller` would report only "cannot import name
            # 'Controller'": Python reads an AttributeError from a module's __getattr__ as the name being absent.
            raise ImportError(
                f"triaccel_rl.{name}: importing {_LAZY[name]} failed: {type(err).__name__}: {err}", name=_LAZY[name]
            ) from err
        return getattr(module, name)
    raise AttributeError(f"module 'triaccel_rl' has no attribute {name!r}")

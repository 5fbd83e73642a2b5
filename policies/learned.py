"""``LearnedPolicy``: a stable-baselines3 policy loaded from its zip, checked against the expected spaces."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from gymnasium import spaces

from triaccel_rl.types import Precision

__all__ = ["SUPPORTED_ALGORITHMS", "LearnedPolicy", "PolicyLoadError"]

SUPPORTED_ALGORITHMS = ("ppo", "a2c")


class PolicyLoadError(ValueError):
    """A policy file cannot be used: missing, corrupt, another algorithm, or trained for other spaces."""


class LearnedPolicy:
    """A trained SB3 policy (PPO or A2C zip) with the common ``predict`` signature.

    Args:
        path: the ``.zip`` written by ``model.save`` (``triaccel-rl train-policy`` writes one).
        observation_space: the space the caller will feed; the zip's must equal it.
        action_space: the space the caller expects back; the zip's must equal it.
        algorithm: ``"ppo"``, ``"a2c"`` or ``"auto"`` (tries each).
        device: torch device for the policy network (``"cpu"`` is fastest for these small MLPs).

    Raises:
        PolicyLoadError: the file is missing or not an SB3 zip, or its spaces differ (both printed).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        observation_space: spaces.Space[Any] | None = None,
        action_space: spaces.Space[Any] | None = None,
        algorithm: str = "auto",
        device: str = "cpu",
    ) -> None:
        file = Path(path)
        if not file.is_file():
            raise PolicyLoadError(f"policy file {str(file)!r} does not exist")
        if not zipfile.is_zipfile(file):
            raise PolicyLoadError(f"policy file {str(file)!r} is not a zip written by stable-baselines3")
        algorithm = algorithm.lower()
        if algorithm != "auto" and algorithm not in SUPPORTED_ALGORITHMS:
            raise PolicyLoadError(
                f"algorithm {algorithm!r} not supported; allowed: auto, {', '.join(SUPPORTED_ALGORITHMS)}"
            )
        self.path = file
        self.model = _load(file, algorithm, device)
        self.initial_precision: Precision | None = None
        """The precision every layer starts in, before the first decision (None: the model's own, fp32);
        ``make_policy`` sets the heuristic's start precision."""
        for label, expected, found in (
            ("observation", observation_space, self.model.observation_space),
            ("action", action_space, self.model.action_space),
        ):
            if expected is not None and not _same_space(expected, found):
                raise PolicyLoadError(
                    f"policy {str(file)!r} was trained for {label} space {found}, but this environment has "
                    f"{expected}; retrain it with `triaccel-rl train-policy` for these settings"
                )
        self.observation_space = self.model.observation_space
        self.action_space = self.model.action_space
        self.name = f"learned:{file.name}"

    def predict(
        self,
        observation: np.ndarray,
        state: tuple[np.ndarray, ...] | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...] | None]:
        """Delegates to the SB3 model's ``predict``."""
        return self.model.predict(observation, state=state, episode_start=episode_start, deterministic=deterministic)


def _load(file: Path, algorithm: str, device: str) -> Any:
    from stable_baselines3 import A2C, PPO

    classes: dict[str, Any] = {"ppo": PPO, "a2c": A2C}
    names = list(classes) if algorithm == "auto" else [algorithm]
    errors = []
    for name in names:
        try:
            return classes[name].load(file, device=device)
        except Exception as err:  # SB3 raises many types for a wrong or corrupt file
            errors.append(f"{name}: {type(err).__name__}: {err}")
    raise PolicyLoadError(f"cannot load policy {str(file)!r} ({'; '.join(errors)[:500]})")


def _same_space(a: spaces.Space[Any], b: spaces.Space[Any]) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, spaces.MultiDiscrete) and isinstance(b, spaces.MultiDiscrete):
        return bool(np.array_equal(a.nvec, b.nvec))
    if isinstance(a, spaces.Box) and isinstance(b, spaces.Box):
        return a.shape == b.shape and bool(np.allclose(a.low, b.low) and np.allclose(a.high, b.high))
    return a == b

"""``StaticPolicy``: one fixed configuration for the whole run (the baselines users run today).

The executor's shield acts on it at each decision, as on every policy: in a ``Controller``, under fp16, an interval
with more than ``HeuristicConfig.max_overflow_rate`` of its steps skipped runs the next in bf16
(``max_overflow_rate=1.0`` turns that off). ``compare``'s static rows make no decisions (they are the baselines users
run: a plain fp16 row stays in fp16 however often it overflows), so the shield does not act there.
"""

from __future__ import annotations

import numpy as np

from triaccel_rl.actions import encode
from triaccel_rl.config import ControllerConfig
from triaccel_rl.observation import ObservationLayout
from triaccel_rl.shield import check_observation
from triaccel_rl.types import Action, BatchMove, Precision

__all__ = ["STATIC_PRESETS", "StaticPolicy"]

STATIC_PRESETS = ("fp32", "bf16", "fp16")


class StaticPolicy:
    """Always returns the same action: every group in one precision, LR scale 1, batch kept.

    Example:
        >>> StaticPolicy("bf16").predict(np.zeros(43, dtype=np.float32))[0].tolist()
        [1, 1, 1, 1, 2, 1]
    """

    def __init__(self, precision: str | Precision = "bf16", config: ControllerConfig | None = None) -> None:
        if isinstance(precision, str) and precision.lower() not in STATIC_PRESETS:
            raise ValueError(f"unknown static preset {precision!r}; allowed: {', '.join(STATIC_PRESETS)}")
        self.precision = Precision.parse(precision)
        if config is not None and not isinstance(config, ControllerConfig):  # a HeuristicConfig failed far away
            raise TypeError(f"config={config!r} must be a ControllerConfig")
        self.config = config or ControllerConfig()
        action = Action((self.precision,) * self.config.n_groups, 1.0, BatchMove.KEEP)
        self._raw = encode(action, self.config)
        self.initial_action = self._raw.copy()  # applied before the first step: static from the start
        self.name = f"static-{self.precision.name.lower()}"

    def predict(
        self,
        observation: np.ndarray,
        state: tuple[np.ndarray, ...] | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...] | None]:
        """Returns the fixed action (batched when ``observation`` is a batch).

        Raises:
            ValueError: an observation of another shape than the config's, or not of numbers (it answered any).
        """
        obs = check_observation(observation, ObservationLayout(self.config.n_groups).size)
        if obs.ndim == 2:
            return np.tile(self._raw, (obs.shape[0], 1)), state
        return self._raw.copy(), state

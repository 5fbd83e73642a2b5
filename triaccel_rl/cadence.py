"""``Cadence``: how many training steps until the next decision, so that deciding stays inside its budget.

A decision costs about the same whatever the interval (a probe forward, a rollback copy, reading the
interval's statistics, the policy, the executor), so its share of training time falls as the interval
grows. With a GPU step of a few milliseconds (captured CUDA graphs) a fixed 20-step interval would spend
more time deciding than the whole overhead budget allows. ``Cadence`` measures what decisions cost and
stretches the interval until they fit:

    steps = clip(ceil(decision_ms / (share * step_ms)), min_steps, min_steps * max_factor)

where ``decision_ms`` is the median cost of the last ``window`` decisions (the first one excluded: it pays
one-time costs such as capturing the probe's graph), ``step_ms`` the latest interval's training time per
step and ``share`` the decisions' part of the overhead budget: ``(1 - expensive_share) * budget_frac``
of ``SignalConfig`` (the scheduled estimator rounds keep the rest, under their own scheduler). With
``adaptive=False`` (modelled cost, the learning environment) the interval is ``min_steps``, always.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

__all__ = ["Cadence"]


class Cadence:
    """Steps until the next decision: at least ``min_steps``, more when decisions would exceed ``share``.

    Args:
        min_steps: the configured interval (``ControllerConfig.interval_steps``), >= 1.
        max_factor: the interval never exceeds ``min_steps * max_factor``; >= 1 (1 pins it).
        share: the share of training time decisions may take, in (0, 1).
        adaptive: measure and stretch (measured cost) or always return ``min_steps``.
        window: decisions whose median cost is used.

    Example:
        >>> cadence = Cadence(min_steps=20, max_factor=16, share=0.01)
        >>> cadence.record(decision_ms=30.0, train_ms=100.0, steps=20)  # the first decision: not used
        >>> cadence.steps
        20
        >>> cadence.record(decision_ms=9.0, train_ms=100.0, steps=20)  # 5 ms a step: 9 ms is 1% of 180 steps
        >>> cadence.steps
        180
    """

    def __init__(self, min_steps: int, max_factor: int, share: float, adaptive: bool = True, window: int = 8) -> None:
        if min_steps < 1:
            raise ValueError(f"min_steps={min_steps} must be >= 1")
        if max_factor < 1:
            raise ValueError(f"max_factor={max_factor} must be >= 1")
        if not (0.0 < share < 1.0):
            raise ValueError(f"share={share} must be in (0, 1)")
        if window < 1:
            raise ValueError(f"window={window} must be >= 1")
        self.min_steps = min_steps
        self.max_steps = min_steps * max_factor
        self.share = share
        self.adaptive = adaptive and max_factor > 1
        self._costs: deque[float] = deque(maxlen=window)
        self._step_ms = math.nan
        self._seen = 0

    def record(self, decision_ms: float, train_ms: float, steps: int) -> None:
        """Records one decision's cost and the training interval before it (``steps`` steps in ``train_ms``)."""
        self._seen += 1
        if steps > 0 and math.isfinite(train_ms) and train_ms > 0:
            self._step_ms = train_ms / steps
        if self._seen > 1 and math.isfinite(decision_ms) and decision_ms >= 0:
            self._costs.append(decision_ms)

    @property
    def decision_ms(self) -> float:
        """The median measured cost of a decision (NaN before the second decision)."""
        return statistics.median(self._costs) if self._costs else math.nan

    @property
    def steps(self) -> int:
        """Training steps until the next decision."""
        if not self.adaptive or not self._costs or not math.isfinite(self._step_ms):
            return self.min_steps
        needed = math.ceil(self.decision_ms / (self.share * self._step_ms))
        return max(self.min_steps, min(self.max_steps, needed))

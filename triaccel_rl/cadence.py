"""``Cadence``: how many training steps until the next decision, so that deciding stays inside its budget.

A decision costs about the same whatever the interval (a probe forward, a rollback copy, reading the
interval's statistics, the policy, the executor), so its share of training time falls as the interval
grows. With a GPU step of a few milliseconds (captured CUDA graphs) a fixed 20-step interval would spend
more time deciding than the whole overhead budget allows. ``Cadence`` measures what decisions cost and
stretches the interval until they fit, both at the steady state and over the whole run so far:

    steady = decision_ms / (share * step_ms)
    repay  = ((spent_ms + decision_ms) / share - trained_ms) / step_ms
    steps  = clip(ceil(max(steady, repay)), min_steps, min_steps * max_factor)

where ``decision_ms`` is the median cost of the last ``window`` decisions (the first one excluded from the
median: it pays one-time costs such as capturing the probe's graph), ``spent_ms`` what all decisions so far
cost (the first one included), ``trained_ms`` the training time so far, ``step_ms`` the latest interval's
training time per step and ``share`` the decisions' part of the overhead budget:
``(1 - expensive_share) * budget_frac`` of ``SignalConfig`` (the scheduled estimator rounds keep the rest,
under their own scheduler). ``steady`` keeps a typical decision within its share of its own interval;
``repay`` makes the next decision wait until the whole run's decisions, one-time costs included, fit their
share of the whole run's training (in a 10-second run, a 100-ms first decision is 1% by itself).

The cheap signals have a tighter budget of their own, ``cheap_share`` (``SignalConfig.cheap_budget_frac``): their
per-step recording plus their part of each decision (reducing the interval's statistics into a snapshot). With
``cheap_ms`` (that part) and ``recording_ms`` (the interval's recording) given beside each decision,

    cheap  = cheap_ms / (max(cheap_share - recording_share, cheap_share / 4) * step_ms)

joins the maximum, ``cheap_ms`` being the median of the recorded cheap parts (the first decision excluded) and
``recording_share`` the median of ``recording_ms / train_ms`` over the same window: the decisions get what the
recording, as measured, leaves of the cheap budget (at least a quarter of it; the recording keeps its own
budget by sampling steps, ``DeviceMoments(budget_frac=...)``). Where a decision is mostly other work (a probe
forward, a rollback copy) ``steady`` is the larger; where it is little more than the snapshot (a loop that only
reads signals), ``cheap``.

After a decision that changed the configuration, ``expedite()`` makes the interval that follows it
``min_steps`` long, whatever the stretch: a change is judged at the next decision, and a stretched interval
would leave a change made on one noisy reading in force for much of the run (ResNet-18 on the H200, 2026-12-02:
one probe-loss spike at 17% of the run lowered the LR to x0.75 and the next decision, 780 steps later at 72%,
raised it back; the seed reached its target 1.3x later than the static row). The decisions spent this way
count in ``spent_ms`` like any other, and ``repay`` stretches the later intervals to pay for them.

With ``adaptive=False`` (modelled cost, the learning environment) the interval is ``min_steps``, always.
"""

from __future__ import annotations

import math
import numbers
import statistics
from collections import deque
from collections.abc import Mapping
from typing import Any

from triaccel_rl.errors import is_whole
from triaccel_rl.state import SavedState

__all__ = ["Cadence"]


class Cadence:
    """Steps until the next decision: at least ``min_steps``, more when decisions would exceed ``share``.

    Args:
        min_steps: the configured interval (``ControllerConfig.interval_steps``), a whole number >= 1.
        max_factor: the interval never exceeds ``min_steps * max_factor``; a whole number >= 1 (1 pins it).
        share: the share of training time decisions may take, in (0, 1).
        adaptive: measure and stretch (measured cost) or always return ``min_steps``.
        window: decisions whose median cost is used, a whole number >= 1.
        cheap_share: the share of training time the cheap signals (recording and the decisions' part) may take,
            in (0, 1); None: no bound of its own.

    Example:
        >>> cadence = Cadence(min_steps=20, max_factor=16, share=0.01)
        >>> cadence.record(decision_ms=1.0, train_ms=100.0, steps=20)  # the first decision: not in the median
        >>> cadence.steps
        20
        >>> cadence.record(decision_ms=9.0, train_ms=1800.0, steps=20)  # 90 ms a step: 9 ms is 0.5% of 20 steps
        >>> cadence.steps
        20
        >>> cadence.record(decision_ms=9.0, train_ms=100.0, steps=20)  # 5 ms a step: 9 ms is 1% of 180 steps
        >>> cadence.steps
        180
        >>> cadence.record(decision_ms=500.0, train_ms=900.0, steps=180)  # the median stays 9 ms, but the
        >>> cadence.steps  # run's decisions now cost 519 ms of 2900: the longest interval, to repay them
        320
        >>> cadence.expedite()  # the decision just taken changed the configuration: judge it soon
        >>> cadence.record(decision_ms=9.0, train_ms=1600.0, steps=320)  # recording that decision
        >>> cadence.steps  # the interval after it
        20
        >>> cadence.record(decision_ms=9.0, train_ms=100.0, steps=20)  # the change judged: stretched again
        >>> cadence.steps
        320
        >>> signals_only = Cadence(min_steps=20, max_factor=8, share=0.01, cheap_share=0.004)
        >>> for _ in range(2):  # 0.9 ms decisions, all of it the snapshot, at 7.5 ms a step; recording took 0.1%
        ...     signals_only.record(decision_ms=0.9, train_ms=150.0, steps=20, cheap_ms=0.9, recording_ms=0.15)
        >>> signals_only.steps  # 0.9 / (0.01 * 7.5) = 12 steps would do; 0.9 / (0.003 * 7.5) = 40 are needed
        40
    """

    def __init__(
        self,
        min_steps: int,
        max_factor: int,
        share: float,
        adaptive: bool = True,
        window: int = 8,
        cheap_share: float | None = None,
    ) -> None:
        for name, value in (("min_steps", min_steps), ("max_factor", max_factor), ("window", window)):
            # NaN passed `value < 1` (and was the interval from then on); 1.5 made a float interval
            if not is_whole(value) or value < 1:
                raise ValueError(f"{name}={value!r} must be a whole number >= 1")
        if not _is_fraction(share):
            raise ValueError(f"share={share!r} must be in (0, 1)")
        if cheap_share is not None and not _is_fraction(cheap_share):
            raise ValueError(f"cheap_share={cheap_share!r} must be in (0, 1), or None")
        if not isinstance(adaptive, bool):  # "no" turned the stretch on
            raise ValueError(f"adaptive={adaptive!r} must be True or False")
        self.min_steps = min_steps
        self.max_steps = min_steps * max_factor
        self.share = share
        self.adaptive = adaptive and max_factor > 1
        self.cheap_share = cheap_share
        self._costs: deque[float] = deque(maxlen=window)
        self._cheap_costs: deque[float] = deque(maxlen=window)
        self._recording_shares: deque[float] = deque(maxlen=window)
        self._step_ms = math.nan
        self._seen = 0
        self._expedite = 0  # records left until an expedited interval is over (2: the decision not yet recorded)
        self.spent_ms = 0.0
        """What every recorded decision cost, the first one included."""
        self.trained_ms = 0.0
        """The training time recorded with them."""

    def record(
        self,
        decision_ms: float,
        train_ms: float,
        steps: int,
        cheap_ms: float | None = None,
        recording_ms: float = 0.0,
    ) -> None:
        """Records one decision's cost and the training interval before it (``steps`` steps in ``train_ms``).

        ``cheap_ms``: the part of ``decision_ms`` spent on the cheap signals (None: not measured).
        ``recording_ms``: what recording the interval's per-step statistics took (part of ``train_ms``).
        A cost that is NaN, infinite or negative is no measurement: it counts neither in ``spent_ms`` nor in the
        median (the decision still counts as seen, so a first decision measured so is still left out of the
        median); an interval with no steps or a training time that is not positive and finite leaves the step time
        and ``trained_ms`` as they were.
        """
        self._seen += 1
        self._expedite = max(self._expedite - 1, 0)
        if steps > 0 and math.isfinite(train_ms) and train_ms > 0:
            self._step_ms = train_ms / steps
            self.trained_ms += train_ms
        if math.isfinite(decision_ms) and decision_ms >= 0:
            self.spent_ms += decision_ms
            if self._seen > 1:
                self._costs.append(decision_ms)
        if cheap_ms is not None and math.isfinite(cheap_ms) and cheap_ms >= 0 and self._seen > 1:
            self._cheap_costs.append(cheap_ms)
            recorded = recording_ms / train_ms if train_ms > 0 and math.isfinite(recording_ms) else 0.0
            self._recording_shares.append(max(recorded, 0.0))

    def add_training(self, train_ms: float) -> None:
        """Adds training time that no decision followed (an interval passed over without a snapshot) to ``trained_ms``.

        ``repay`` weighs the decisions against all of the run's training, so time trained past a decision point
        counts too; the step time stays that of the recorded intervals. A time that is not positive and finite is
        no measurement and leaves ``trained_ms`` as it was, as in :meth:`record`.
        """
        if math.isfinite(train_ms) and train_ms > 0:
            self.trained_ms += train_ms

    def expedite(self) -> None:
        """Makes the interval after the decision just taken (recorded next) ``min_steps`` long."""
        self._expedite = 2

    def state_dict(self) -> dict[str, Any]:
        """What the next intervals' lengths depend on: the recorded costs, step time and totals, for a checkpoint."""
        return {
            "costs": list(self._costs),
            "cheap_costs": list(self._cheap_costs),
            "recording_shares": list(self._recording_shares),
            "step_ms": self._step_ms,
            "seen": self._seen,
            "expedite": self._expedite,
            "spent_ms": self.spent_ms,
            "trained_ms": self.trained_ms,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resumes from ``state_dict()``'s output (a window shorter than the saved one keeps the latest costs).

        Raises:
            ValueError: a missing field, or one of the wrong type or range (named).
        """
        saved = SavedState(state, "the cadence's state", _STATE_KEYS)
        windows = {}
        for key in ("costs", "cheap_costs", "recording_shares"):
            values = saved.reals(key)
            if (values < 0).any():
                raise ValueError(f"the cadence's state has {key} with a negative value: {values.tolist()}")
            windows[key] = values.tolist()
        if len(windows["cheap_costs"]) != len(windows["recording_shares"]):  # record() appends to both together
            raise ValueError(
                f"the cadence's state has {len(windows['cheap_costs'])} cheap_costs but "
                f"{len(windows['recording_shares'])} recording_shares: record() keeps one of each a decision"
            )
        step_ms = saved.real("step_ms", nan=True, least=0.0)
        if step_ms == 0:  # record() leaves NaN or a positive time; 0 passed and divided by zero at the next interval
            raise ValueError("the cadence's state has step_ms 0.0: a step takes a positive time (or NaN: none yet)")
        seen, expedite = saved.count("seen"), saved.count("expedite")
        if expedite > 2:
            raise ValueError(f"the cadence's state has expedite {expedite}, not 0, 1 or 2")
        spent_ms, trained_ms = saved.real("spent_ms", least=0.0), saved.real("trained_ms", least=0.0)
        for key, queue in (
            ("costs", self._costs),
            ("cheap_costs", self._cheap_costs),
            ("recording_shares", self._recording_shares),
        ):
            queue.clear()
            queue.extend(windows[key])
        self._step_ms, self._seen, self._expedite = step_ms, seen, expedite
        self.spent_ms, self.trained_ms = spent_ms, trained_ms

    @property
    def decision_ms(self) -> float:
        """The median measured cost of a decision (NaN before the second decision)."""
        return statistics.median(self._costs) if self._costs else math.nan

    @property
    def steps(self) -> int:
        """Training steps until the next decision."""
        if not self.adaptive or self._expedite or not self._costs or not math.isfinite(self._step_ms):
            return self.min_steps
        steady = self.decision_ms / (self.share * self._step_ms)
        repay = ((self.spent_ms + self.decision_ms) / self.share - self.trained_ms) / self._step_ms
        cheap = 0.0
        if self.cheap_share is not None and self._cheap_costs:
            left = max(self.cheap_share - statistics.median(self._recording_shares), self.cheap_share / 4)
            cheap = statistics.median(self._cheap_costs) / (left * self._step_ms)
        needed = max(steady, repay, cheap)
        if needed >= self.max_steps:  # also an overflowed inf, which math.ceil refuses
            return self.max_steps
        return max(self.min_steps, math.ceil(needed - 1e-9))  # an exact fit is not one step short


_STATE_KEYS = ("costs", "cheap_costs", "recording_shares", "step_ms", "seen", "expedite", "spent_ms", "trained_ms")
"""What ``Cadence.state_dict()`` holds."""


def _is_fraction(value: object) -> bool:
    """A real number (numpy's too, not a bool) in the open interval (0, 1); NaN is not."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and 0.0 < float(value) < 1.0

"""``RoundScheduler``: when to run the expensive estimators, and how big a round, to stay under the overhead budget.

Everything is in *charged* milliseconds: measured time in ``measured`` cost mode, modelled time in
``profile`` mode (so that an environment on a CPU stays deterministic for a seed and its rounds are
charged the way its steps are).

Adaptive schedule (a token bucket):

- credit = ``budget_frac * expensive_share * charged_train_ms - charged_round_ms``;
- a round's size is the largest rung of the ladder ``(micro-batches, probes)`` =
  (2, 1), (4, 1), (4, 2), (8, 2), (8, 4), (16, 4), (16, 8) (capped by the config) whose predicted cost
  fits ``budget_frac * expensive_share * step_ms * target_interval_steps``, or the smallest rung;
- a round runs at a decision point when the credit covers its predicted cost.

The first charged round runs at the first decision point whatever the credit (its cost is borrowed and
repaid by later training), so that the curvature signal has one source for the whole run. It measures
the costs that later predictions use (the collector runs an uncharged warm-up round just before it, so
that one-time costs such as cuDNN autotuning stay out of them): ``cost = m * noise_ms + p * probe_ms +
fixed_ms``, the three rates smoothed over rounds (``noise_ms`` per micro-batch gradient, ``probe_ms`` per
Hutchinson probe including its share of the first gradient, ``fixed_ms`` for sampling and sparsity).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from triaccel_rl.signals.config import Schedule, SignalConfig

__all__ = ["LADDER", "RoundCost", "RoundPlan", "RoundScheduler"]

LADDER: tuple[tuple[int, int], ...] = ((2, 1), (4, 1), (4, 2), (8, 2), (8, 4), (16, 4), (16, 8))
"""Round sizes ``(micro-batches, Hutchinson probes)`` in increasing cost."""

_RATE_SMOOTHING = 0.5


@dataclass(frozen=True)
class RoundPlan:
    """The size of one round.

    Attributes:
        n_microbatches: micro-batch gradients for the noise estimator, >= 2.
        n_probes: Hutchinson probes, >= 1.
        predicted_ms: the scheduler's predicted charged cost (NaN before the first measurement).
    """

    n_microbatches: int
    n_probes: int
    predicted_ms: float = math.nan


@dataclass(frozen=True)
class RoundCost:
    """Charged cost of a round, by part, in milliseconds.

    Attributes:
        noise_ms: the micro-batch gradients.
        hutchinson_ms: the gradient with a graph and the probes.
        other_ms: sampling, sparsity and bookkeeping.
    """

    noise_ms: float
    hutchinson_ms: float
    other_ms: float

    @property
    def total_ms(self) -> float:
        """All parts together."""
        return self.noise_ms + self.hutchinson_ms + self.other_ms


class RoundScheduler:
    """Decides at each decision point whether a round runs and how big it is.

    Args:
        config: the budget and the schedule.

    Example:
        >>> scheduler = RoundScheduler(SignalConfig())
        >>> scheduler.add_train(10.0, n_steps=1)
        >>> scheduler.plan()  # the first round is never refused
        RoundPlan(n_microbatches=2, n_probes=1, predicted_ms=nan)
    """

    def __init__(self, config: SignalConfig) -> None:
        self.config = config
        self.charged_train_ms = 0.0
        self.charged_round_ms = 0.0
        self.rounds = 0
        self.steps = 0
        self._steps_at_last_round = 0
        self._step_ms = math.nan  # smoothed charged time of one step
        self._noise_ms = math.nan
        self._probe_ms = math.nan
        self._fixed_ms = 0.0

    @property
    def ladder(self) -> list[tuple[int, int]]:
        """The rungs ``(micro-batches, probes)`` the config allows, in increasing cost."""
        config = self.config
        return [(m, p) for m, p in LADDER if m <= config.max_microbatches and p <= config.max_probes]

    def add_train(self, charged_ms: float, n_steps: int = 1) -> None:
        """Charges ``n_steps`` training steps that took ``charged_ms`` together."""
        if n_steps < 1 or not math.isfinite(charged_ms) or charged_ms < 0:
            return
        self.charged_train_ms += charged_ms
        self.steps += n_steps
        per_step = charged_ms / n_steps
        self._step_ms = per_step if math.isnan(self._step_ms) else 0.9 * self._step_ms + 0.1 * per_step

    @property
    def credit_ms(self) -> float:
        """Charged milliseconds the rounds may still spend now (negative while a borrowed round is repaid)."""
        allowance = self.config.budget_frac * self.config.expensive_share * self.charged_train_ms
        return allowance - self.charged_round_ms

    @property
    def round_overhead_frac(self) -> float:
        """Charged round time over charged training time so far."""
        return self.charged_round_ms / self.charged_train_ms if self.charged_train_ms > 0 else 0.0

    def predict_ms(self, n_microbatches: int, n_probes: int) -> float:
        """Predicted charged cost of a round of this size (NaN before the first measured round)."""
        return n_microbatches * self._noise_ms + n_probes * self._probe_ms + self._fixed_ms

    def plan(self) -> RoundPlan | None:
        """The round to run now, or None when none is due."""
        config = self.config
        if config.schedule is Schedule.FIXED:
            due = self.rounds == 0 or self.steps - self._steps_at_last_round >= config.fixed_interval_steps
            return RoundPlan(config.fixed_microbatches, config.fixed_probes) if due else None
        ladder = self.ladder
        if self.rounds == 0:
            m, p = ladder[0]
            return RoundPlan(m, p)
        target = config.budget_frac * config.expensive_share * self._step_ms * config.target_interval_steps
        chosen = ladder[0]
        for rung in ladder:
            if self.predict_ms(*rung) <= target:
                chosen = rung
        predicted = self.predict_ms(*chosen)
        if not math.isfinite(predicted) or predicted > self.credit_ms:
            return None
        return RoundPlan(chosen[0], chosen[1], predicted)

    def record(self, plan: RoundPlan, cost: RoundCost) -> None:
        """Charges a round that ran and updates the cost rates."""
        self.rounds += 1
        self._steps_at_last_round = self.steps
        self.charged_round_ms += cost.total_ms
        noise = cost.noise_ms / plan.n_microbatches
        probe = cost.hutchinson_ms / plan.n_probes
        if math.isnan(self._noise_ms):
            self._noise_ms, self._probe_ms, self._fixed_ms = noise, probe, cost.other_ms
        else:
            a = _RATE_SMOOTHING
            self._noise_ms = a * self._noise_ms + (1 - a) * noise
            self._probe_ms = a * self._probe_ms + (1 - a) * probe
            self._fixed_ms = a * self._fixed_ms + (1 - a) * cost.other_ms

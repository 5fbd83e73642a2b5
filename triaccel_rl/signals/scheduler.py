"""``RoundScheduler``: when to run the expensive estimators, and how big a round, to stay under the overhead budget.

Everything is in *charged* milliseconds: measured time in ``measured`` cost mode, modelled time in
``profile`` mode (so that an environment on a CPU stays deterministic for a seed and its rounds are
charged the way its steps are).

Adaptive schedule (a token bucket):

- credit = ``budget_frac * expensive_share * charged_train_ms - charged_round_ms``;
- a round's size is the largest rung of the ladder ``(micro-batches, probes)`` =
  (2, 1), (4, 1), (4, 2), (8, 2), (8, 4), (16, 4), (16, 8), (16, 16) (capped by the config) whose predicted cost
  fits ``budget_frac * expensive_share * step_ms * target_interval_steps``, or the smallest rung;
- a round runs at a decision point when the credit covers its predicted cost.

The first charged round (the smallest rung) may run before the credit covers it: its cost is borrowed
and repaid by later training, so that the curvature signal has one source for the whole run. How much
may be borrowed depends on what is known at the first decision point:

- the cost rates unknown (nothing measured yet) or the run's progress unknown (``progress`` None or 0):
  the first round runs whatever it costs;
- both known: the run's total charged training time is projected as ``charged_train_ms / progress``
  and the first round runs only when its predicted cost fits ``budget_frac * expensive_share *
  projected_total - charged_round_ms``; otherwise it is refused (``last_refusal`` says by how much) and
  asked again at the next decision point. A round that costs more than the budget allows over the
  whole run never runs, and the signals it would give stay unknown.

The rates are ``cost = m * noise_ms + p * probe_ms + fixed_ms``, smoothed over rounds (``noise_ms`` per
micro-batch gradient, ``probe_ms`` per Hutchinson probe including its share of the first gradient,
``fixed_ms`` for sampling and sparsity). Each charged round measures them. Before the first one they may
be seeded without charging anything (:meth:`RoundScheduler.seed_rates`): by the collector from its
warm-up round (run just before, so that one-time costs such as kernel loading are not taken for a round's
cost; its cost includes some of them, so it predicts high) or, on a GPU, from the rounds an earlier run of the
same model measured in this process. The first charged round's measurement replaces seeded rates. Where costs
are measured the warm-up's time is charged to the rounds' account (:meth:`RoundScheduler.charge`), without
counting a round: what the rounds cost the run, one-time costs included, stays within their share of the budget
over the run (in profile cost mode its cost is a CPU's, which models nothing: not charged).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from triaccel_rl.signals.config import Schedule, SignalConfig
from triaccel_rl.state import SavedState

__all__ = ["LADDER", "BudgetRefusal", "RoundCost", "RoundPlan", "RoundScheduler"]

LADDER: tuple[tuple[int, int], ...] = ((2, 1), (4, 1), (4, 2), (8, 2), (8, 4), (16, 4), (16, 8), (16, 16))
"""Round sizes ``(micro-batches, Hutchinson probes)`` in increasing cost. The last rung is beyond the default
``max_probes`` (8): the ``thorough`` preset's 16 reach it (before it was there, that setting changed nothing)."""

_RATE_SMOOTHING = 0.5
_SCHEDULER_STATE_KEYS = (
    "charged_train_ms",
    "charged_round_ms",
    "rounds",
    "steps",
    "steps_at_last_round",
    "step_ms",
    "noise_ms",
    "probe_ms",
    "fixed_ms",
    "rates_measured",
)
"""What ``RoundScheduler.state_dict()`` holds: its accounts and cost rates."""


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


@dataclass(frozen=True)
class BudgetRefusal:
    """Why the scheduler refused the first round: its predicted cost exceeds what the whole run's budget allows.

    Attributes:
        predicted_ms: the round's predicted charged cost.
        allowance_ms: ``budget_frac * expensive_share * charged_train_ms / progress - charged_round_ms``, the
            charged ms the rounds may borrow over the projected run.
        progress: the fraction of the training budget used when it was refused, in (0, 1].
    """

    predicted_ms: float
    allowance_ms: float
    progress: float


class RoundScheduler:
    """Decides at each decision point whether a round runs and how big it is.

    Args:
        config: the budget and the schedule.

    Attributes:
        last_refusal: why the latest :meth:`plan` refused a round for the whole run's budget (None when it
            did not).

    Example:
        >>> scheduler = RoundScheduler(SignalConfig())
        >>> scheduler.add_train(10.0, n_steps=1)
        >>> scheduler.plan()  # costs unknown: the first round runs whatever it costs
        RoundPlan(n_microbatches=2, n_probes=1, predicted_ms=nan)
        >>> scheduler.seed_rates(RoundPlan(2, 1), RoundCost(noise_ms=2.0, hutchinson_ms=3.0, other_ms=0.0))
        >>> scheduler.plan(progress=0.5)  # 0.01 * 10 / 0.5 = 0.2 ms allowed over the run; it costs 5
        >>> scheduler.last_refusal
        BudgetRefusal(predicted_ms=5.0, allowance_ms=0.2, progress=0.5)
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
        self._rates_measured = False  # False while the rates are unknown or only seeded
        self.last_refusal: BudgetRefusal | None = None

    @property
    def ladder(self) -> list[tuple[int, int]]:
        """The rungs ``(micro-batches, probes)`` the config allows, in increasing cost: ``LADDER``'s, each capped.

        Capped, not left out: with ``max_probes=1`` leaving out the rungs of more probes left out 8 and 16
        micro-batches too, so a ``max_microbatches`` of 8 or 16 changed nothing.
        """
        config = self.config
        rungs = [(min(m, config.max_microbatches), min(p, config.max_probes)) for m, p in LADDER]
        return list(dict.fromkeys(rungs))  # in order, each once

    def add_train(self, charged_ms: float, n_steps: int = 1) -> None:
        """Charges ``n_steps`` training steps that took ``charged_ms`` together.

        The steps count (the ``fixed`` schedule's cadence) whatever their time; a time that is negative or not
        finite (a broken timer reading) is not charged. An empty interval (``n_steps`` 0) counts no step and
        leaves the step time alone: its time over one step would read as a step of (about) 0 ms.

        Raises:
            ValueError: ``n_steps`` is negative.
        """
        if n_steps < 0:
            raise ValueError(f"n_steps={n_steps} must be >= 0")
        self.steps += n_steps
        if not math.isfinite(charged_ms) or charged_ms < 0:
            return
        self.charged_train_ms += charged_ms
        if n_steps == 0:
            return
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

    @property
    def rates_known(self) -> bool:
        """Whether the cost rates are known (measured by a charged round, or seeded)."""
        return not math.isnan(self._noise_ms)

    def allowance_ms(self, progress: float) -> float:
        """Charged ms the rounds may still spend over the whole run, projected from ``progress`` in (0, 1].

        ``budget_frac * expensive_share * charged_train_ms / progress - charged_round_ms``: the run's total
        charged training time projected from the share of the training budget used so far.
        """
        projected_train_ms = self.charged_train_ms / min(progress, 1.0)
        return self.config.budget_frac * self.config.expensive_share * projected_train_ms - self.charged_round_ms

    def plan(self, progress: float | None = None) -> RoundPlan | None:
        """The round to run now, or None when none is due.

        Args:
            progress: fraction of the training budget used, in [0, 1]; None or 0 when unknown. With the cost
                rates known, the first round runs only if it fits the budget of the whole run projected from
                it (see the module docstring; a refusal sets ``last_refusal``).
        """
        self.last_refusal = None
        config = self.config
        if config.schedule is Schedule.FIXED:
            due = self.rounds == 0 or self.steps - self._steps_at_last_round >= config.fixed_interval_steps
            return RoundPlan(config.fixed_microbatches, config.fixed_probes) if due else None
        ladder = self.ladder
        if self.rounds == 0:
            m, p = ladder[0]
            if not self.rates_known or progress is None or not progress > 0:
                # Nothing to predict or to project from: borrowed whatever it costs.
                return RoundPlan(m, p, self.predict_ms(m, p)) if self.rates_known else RoundPlan(m, p)
            predicted = self.predict_ms(m, p)
            allowance = self.allowance_ms(progress)
            if predicted > allowance:
                self.last_refusal = BudgetRefusal(predicted, allowance, min(progress, 1.0))
                return None
            return RoundPlan(m, p, predicted)
        target = config.budget_frac * config.expensive_share * self._step_ms * config.target_interval_steps
        chosen = ladder[0]
        for rung in ladder:
            if self.predict_ms(*rung) <= target:
                chosen = rung
        predicted = self.predict_ms(*chosen)
        if not math.isfinite(predicted) or predicted > self.credit_ms:
            return None
        return RoundPlan(chosen[0], chosen[1], predicted)

    def charge(self, charged_ms: float) -> None:
        """Charges time spent for the rounds outside a charged round (a warm-up), counting no round.

        It is repaid by later training like a borrowed round: the rounds' account then holds everything they cost
        the run. A time that is negative or not finite (a broken reading) is not charged.
        """
        if math.isfinite(charged_ms) and charged_ms > 0:
            self.charged_round_ms += charged_ms

    def seed_rates(self, plan: RoundPlan, cost: RoundCost) -> None:
        """Sets the cost rates from a round of size ``plan`` that cost ``cost``, charging nothing.

        For costs measured outside the charged rounds (a warm-up round, an earlier run of the same model);
        the first charged round's measurement replaces them.
        """
        self._noise_ms = cost.noise_ms / plan.n_microbatches
        self._probe_ms = cost.hutchinson_ms / plan.n_probes
        self._fixed_ms = cost.other_ms
        self._rates_measured = False

    def record(self, plan: RoundPlan, cost: RoundCost) -> None:
        """Charges a round that ran and updates the cost rates.

        A cost with a part that is negative or not finite (a broken reading) is not charged and leaves the rates as
        they were (a NaN made the credit and every prediction NaN, and no round ran again). With rates known the round
        counts; with none yet it does not, so that the next plan is a first round again, to measure them.
        """
        parts = (cost.noise_ms, cost.hutchinson_ms, cost.other_ms)
        readable = all(math.isfinite(part) and part >= 0 for part in parts)
        if not readable and not self.rates_known:
            return
        self.rounds += 1
        self._steps_at_last_round = self.steps
        if not readable:
            return
        self.charged_round_ms += cost.total_ms
        noise = cost.noise_ms / plan.n_microbatches
        probe = cost.hutchinson_ms / plan.n_probes
        if not self._rates_measured:  # the first measurement of this run replaces seeded rates
            self._noise_ms, self._probe_ms, self._fixed_ms = noise, probe, cost.other_ms
            self._rates_measured = True
        else:
            a = _RATE_SMOOTHING
            self._noise_ms = a * self._noise_ms + (1 - a) * noise
            self._probe_ms = a * self._probe_ms + (1 - a) * probe
            self._fixed_ms = a * self._fixed_ms + (1 - a) * cost.other_ms

    def state_dict(self) -> dict[str, Any]:
        """The accounts (charged training and round time, steps, rounds) and cost rates, for a checkpoint.

        NaN rates (before the first round) are saved as NaN. The config is not saved: it is the owner's.
        """
        return {
            "charged_train_ms": self.charged_train_ms,
            "charged_round_ms": self.charged_round_ms,
            "rounds": self.rounds,
            "steps": self.steps,
            "steps_at_last_round": self._steps_at_last_round,
            "step_ms": self._step_ms,
            "noise_ms": self._noise_ms,
            "probe_ms": self._probe_ms,
            "fixed_ms": self._fixed_ms,
            "rates_measured": self._rates_measured,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resumes from ``state_dict()``'s output. Every field is checked before any is set.

        Raises:
            ValueError: a missing field, or one of the wrong type or range (named).
        """
        saved = SavedState(state, "the round scheduler's state", _SCHEDULER_STATE_KEYS)
        rounds, steps, at_last = saved.count("rounds"), saved.count("steps"), saved.count("steps_at_last_round")
        if at_last > steps:
            raise ValueError(f"the round scheduler's state has steps_at_last_round {at_last} > steps {steps}")
        charged = {key: saved.real(key, least=0.0) for key in ("charged_train_ms", "charged_round_ms", "fixed_ms")}
        rates = {key: saved.real(key, nan=True, least=0.0) for key in ("step_ms", "noise_ms", "probe_ms")}
        measured = saved["rates_measured"]
        if not isinstance(measured, bool):
            raise ValueError(f"the round scheduler's state has rates_measured {measured!r}, not a bool")
        unknown = math.isnan(rates["noise_ms"])
        if unknown != math.isnan(rates["probe_ms"]) or (measured and unknown):
            raise ValueError(
                f"the round scheduler's state has noise_ms {rates['noise_ms']} and probe_ms {rates['probe_ms']} with "
                f"rates_measured {measured}: the rates are both known (numbers) or both unknown (NaN, not measured)"
            )
        self.rounds, self.steps, self._steps_at_last_round = rounds, steps, at_last
        self.charged_train_ms, self.charged_round_ms = charged["charged_train_ms"], charged["charged_round_ms"]
        self._step_ms, self._noise_ms, self._probe_ms = rates["step_ms"], rates["noise_ms"], rates["probe_ms"]
        self._fixed_ms, self._rates_measured = charged["fixed_ms"], measured
        self.last_refusal = None

"""``SignalConfig``: which signals are collected, the overhead budget, and how the expensive ones are scheduled."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from triaccel_rl.config import store_plain_numbers
from triaccel_rl.errors import ChoiceEnum, ConfigError, is_finite_real, require_bool, require_number, require_whole

__all__ = ["Schedule", "SignalConfig", "SignalMode"]


class SignalMode(ChoiceEnum):
    """Which estimators run.

    ``CHEAP``: only what the step statistics and the optimizer's state already hold (no extra pass).
    ``ALL``: also the scheduled rounds (Hutchinson curvature, micro-batch gradient noise, curvature sparsity).
    """

    CHEAP = "cheap"
    ALL = "all"

    @classmethod
    def _unknown(cls, value: Any) -> str:
        return f"unknown signal mode {value!r}"


class Schedule(ChoiceEnum):
    """How the scheduled rounds are timed and sized.

    ``ADAPTIVE``: a token bucket over charged time keeps the rounds within the budget and sizes them from
    their measured (or, in profile cost mode, modelled) cost. ``FIXED``: every ``fixed_interval_steps``
    steps at a fixed size, whatever it costs (deterministic; for tests and ablations).
    """

    ADAPTIVE = "adaptive"
    FIXED = "fixed"

    @classmethod
    def _unknown(cls, value: Any) -> str:
        return f"unknown schedule {value!r}"


class _Default(float):
    """A sub-budget its user left unset: derived from the other fields' final values, in ``__post_init__``.

    The derived value keeps the type, so ``dataclasses.replace`` (which passes every field on) leaves it unset and
    derives it again from the new values; a value set by hand is a plain number, checked as given.
    """


_DEFAULT_OBSERVE_FRAC = _Default(0.001)
_DEFAULT_CHEAP_FRAC = _Default(0.004)
_DEFAULT_BUDGET_FRAC = 0.02
"""The budget the two defaults above are shares of (5% and 20%)."""


@dataclass(frozen=True)
class SignalConfig:
    """Settings of the signal collector.

    A *round* is one run of the expensive estimators on a sub-batch: ``n_microbatches`` micro-batch
    gradients (gradient variance, noise scale, per-sample Fisher diagonal) and ``n_probes`` Hutchinson
    probes (Hessian trace per layer), then the sparsity of the Fisher diagonal. Rounds run only at
    decision points (snapshots).

    Attributes:
        mode: ``cheap`` or ``all`` (see :class:`SignalMode`).
        budget_frac: overhead budget, as a fraction of (charged) training time, in (0, 1).
        expensive_share: share of the budget the scheduled rounds may use, in (0, 1); the rest is left
            for what the scheduler cannot measure: the per-step cheap signals (timing them would need a
            host-device sync per step) and a round's side costs (the emptied GPU queue after its one
            sync). On an H200 with 0.75, rounds charged 1.3% of step time but the whole collector cost
            2.0% (ResNet-18) and 2.7% (cnn-fmnist) in ``experiments/bench_signals.py``, hence 0.5.
        schedule: ``adaptive`` or ``fixed`` (see :class:`Schedule`).
        target_interval_steps: the adaptive schedule sizes a round so that one fits the budget at least
            every this many optimizer steps (smaller rounds when steps are cheap); it runs a round as soon
            as the budget has room for it.
        micro_batch_size: the most samples a micro-batch of the gradient-noise estimator holds. A round keeps its
            planned number of micro-batches ``m`` and gives each ``min(micro_batch_size, n // m)`` of the ``n`` probe
            samples, so the shape is this size (and fixed, GPU kernels tuned for it) only where the probe batch holds
            ``m × micro_batch_size``; under two samples each, fewer micro-batches of two (one each under four
            samples). 1 gives per-sample gradients, which a batch norm in training mode refuses (it needs two samples
            for its batch statistics): where micro-batches would hold one sample, such a model's round is skipped.
        hutchinson_batch_size: samples in the Hutchinson sub-batch (capped by the samples available).
        max_microbatches: largest number of micro-batches in a round, >= 2.
        max_probes: largest number of Hutchinson probes in a round, >= 1.
        fixed_interval_steps: steps between rounds under the ``fixed`` schedule.
        fixed_microbatches: micro-batches per round under the ``fixed`` schedule, >= 2.
        fixed_probes: Hutchinson probes per round under the ``fixed`` schedule, >= 1.
        round_ema_decay: smoothing across rounds of the per-layer round estimates, in [0, 1) (0 = latest
            round only). Numerator and denominator of the noise scale are smoothed separately.
        small_threshold: a curvature coordinate counts as small when ``|d_i| <= small_threshold *
            mean|d|`` of its layer, in [0, 1].
        lr_factors: when True, the decision loop applies :func:`curvature_lr_factors` to the run at every
            snapshot (default off).
        lr_factor_exponent: exponent of the curvature ratio in the LR factors, > 0 (0.5 = square root).
        lr_factor_min: lower clip of the LR factors, in (0, 1].
        lr_factor_max: upper clip of the LR factors, >= 1.
        warmup_round: run the first round twice: the first time as a warm-up that pays the one-time costs (kernel
            loading and compilation, allocator growth: seconds on a GPU), reported in the overhead and, where costs are
            measured, charged to the rounds' budget (the later rounds wait until training has repaid it; in profile cost
            mode its time is a CPU's and is not charged). Its measured cost (one-time costs included, so on the high
            side) predicts the first charged round's, which then runs only if the whole run's budget allows it
            (:class:`RoundScheduler`); the first charged round's measurement replaces it. On a GPU in measured cost mode
            once per process and round shape, and in two passes, the second measuring the round without the one-time
            costs (which made the first 14x a round on EfficientNet-B0): later runs of the same model skip it and
            predict from the round costs measured earlier in the process. On a CPU and in profile cost mode every run
            has its warm-up, so that a run repeats for a seed whatever ran before it in the process.
        seed: seeds the sub-batch sampling and the Rademacher probes (combined with the run's seed).
        observe_budget_frac: share of step time that recording the per-step statistics may take in a
            ``Controller`` on a GPU, and in a ``TrainingRun`` a ``DecisionLoop`` drives (``compare``, the
            environment) on a GPU in measured mode, in (0, ``budget_frac``) (``DeviceMoments(budget_frac=...)``:
            one step in several is recorded when a recording costs more). None records every step. On a CPU, and in a
            ``TrainingRun`` in profile cost mode (whose observations must repeat for a seed), every step is recorded.
        cheap_budget_frac: share of training time the cheap signals may take, as measured, in
            (``observe_budget_frac``, ``budget_frac``]: recording the per-step statistics (sampled under
            ``observe_budget_frac``) and, at each decision point, reducing the interval's statistics into a
            snapshot. With measured cost the decision cadence keeps the sum by stretching the interval (the
            decisions get what the measured recording leaves: ``Cadence(cheap_share=...)``). The default, 0.4%,
            leaves room under the 0.5% target of issue 3 for what is not metered: the unsampled steps'
            bookkeeping (a few µs each) and device time beyond the host's (on an H200, 2026-12-01, about 0.07%
            of cnn-fmnist's 7.8-ms step). None: no bound of its own (decisions as a whole still keep to
            ``(1 - expensive_share) * budget_frac``).

    The two sub-budgets, when left unset, are derived from the final values of the fields that are set (also
    through ``dataclasses.replace``, which derives them again): under a ``budget_frac`` below 0.4% each takes its
    default's share of the default 2% budget (5% and 20% of ``budget_frac``); an unset ``cheap_budget_frac`` is
    its default, or ``observe_budget_frac`` plus the default's room for the reduction (0.3%, or 15% of a
    ``budget_frac`` below 0.4%) where that is more, at most ``budget_frac`` (so it rises smoothly with
    ``observe_budget_frac``); an unset ``observe_budget_frac`` under a smaller ``cheap_budget_frac``
    set by hand takes a quarter of it (the defaults' ratio). Only values set by hand are refused, with a message
    naming them.

    Example:
        >>> SignalConfig.preset("cheap").mode
        <SignalMode.CHEAP: 'cheap'>
    """

    mode: SignalMode = SignalMode.ALL
    budget_frac: float = 0.02
    expensive_share: float = 0.5
    schedule: Schedule = Schedule.ADAPTIVE
    target_interval_steps: int = 200
    micro_batch_size: int = 32
    hutchinson_batch_size: int = 128
    max_microbatches: int = 16
    max_probes: int = 8
    fixed_interval_steps: int = 100
    fixed_microbatches: int = 4
    fixed_probes: int = 2
    round_ema_decay: float = 0.5
    small_threshold: float = 0.01
    lr_factors: bool = False
    lr_factor_exponent: float = 0.5
    lr_factor_min: float = 0.5
    lr_factor_max: float = 2.0
    warmup_round: bool = True
    seed: int = 0
    observe_budget_frac: float | None = _DEFAULT_OBSERVE_FRAC
    cheap_budget_frac: float | None = _DEFAULT_CHEAP_FRAC

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", SignalMode.parse(self.mode))
        object.__setattr__(self, "schedule", Schedule.parse(self.schedule))
        # Types first: a NaN or fractional count passed every ">= 1" below (NaN compares False) and failed mid-run,
        # in the rounds' slicing; a string number, or None where None is not allowed, failed with a TypeError from
        # a comparison; True passed as 1. Each message names the field's range too.
        for name, allowed in _INT_FIELDS.items():
            require_whole(name, getattr(self, name), allowed)
        for name, allowed in _REAL_FIELDS.items():
            require_number(name, getattr(self, name), allowed, optional=name in _OPTIONAL_FIELDS)
        for name in ("lr_factors", "warmup_round"):
            require_bool(name, getattr(self, name))
        if not (0.0 < self.budget_frac < 1.0):
            raise ConfigError(f"budget_frac={self.budget_frac} must be in (0, 1)")
        self._derive_unset_budgets()
        if not (0.0 < self.expensive_share < 1.0):  # at 1 the decisions' share, 0, was refused later, by another name
            raise ConfigError(
                f"expensive_share={self.expensive_share} must be in (0, 1): the decisions (the cadence) take the rest"
            )
        if self.observe_budget_frac is not None and not (0.0 < self.observe_budget_frac < self.budget_frac):
            # Under cheap_budget_frac=None, 0.5 was taken: the recording alone could take 25 times the whole budget.
            raise ConfigError(
                f"observe_budget_frac={self.observe_budget_frac} must be in (0, budget_frac={self.budget_frac}), or "
                "None to record every step"
            )
        if self.cheap_budget_frac is not None:
            floor = self.observe_budget_frac or 0.0
            if not (floor < self.cheap_budget_frac <= self.budget_frac):
                raise ConfigError(
                    f"cheap_budget_frac={self.cheap_budget_frac} must be in (observe_budget_frac={floor}, "
                    f"budget_frac={self.budget_frac}], or None for no bound of its own"
                )
        for name in ("target_interval_steps", "micro_batch_size", "hutchinson_batch_size", "fixed_interval_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("max_microbatches", "fixed_microbatches"):
            if getattr(self, name) < 2:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 2 (a variance needs two micro-batches)")
        for name in ("max_probes", "fixed_probes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if not (0.0 <= self.round_ema_decay < 1.0):
            raise ConfigError(f"round_ema_decay={self.round_ema_decay} must be in [0, 1)")
        if not (0.0 <= self.small_threshold <= 1.0):
            raise ConfigError(f"small_threshold={self.small_threshold} must be in [0, 1]")
        if not (is_finite_real(self.lr_factor_exponent) and self.lr_factor_exponent > 0):
            raise ConfigError(f"lr_factor_exponent={self.lr_factor_exponent} must be a positive number")
        # An int past a float's range (10 ** 400) is below inf, but np.minimum raised an OverflowError on it mid-run.
        if not (0.0 < self.lr_factor_min <= 1.0 <= self.lr_factor_max and is_finite_real(self.lr_factor_max)):
            raise ConfigError(
                f"need 0 < lr_factor_min={self.lr_factor_min} <= 1 <= lr_factor_max={self.lr_factor_max} < inf"
            )
        store_plain_numbers(self)

    def _derive_unset_budgets(self) -> None:
        """Sets the sub-budgets left unset (``_Default``) from the final values of the others (see the class doc).

        Derived from the defaults each time, never from a value derived before: ``replace(config, budget_frac=...)``
        kept a sub-budget shrunk for the old budget, and a default that did not fit a value set by hand (``0.001``
        under ``observe_budget_frac=0.005``) was refused under a name its user never gave.
        """
        # A budget_frac under 0.4% was refused for fields its user never set: there the defaults scale with it.
        scale = self.budget_frac / _DEFAULT_BUDGET_FRAC if self.budget_frac < _DEFAULT_CHEAP_FRAC else 1.0
        if isinstance(self.observe_budget_frac, _Default):
            observe = float(_DEFAULT_OBSERVE_FRAC) * scale
            cheap_set = None if isinstance(self.cheap_budget_frac, _Default) else self.cheap_budget_frac
            if cheap_set is not None and 0.0 < cheap_set <= observe:  # NaN and the out-of-range are refused below
                observe = cheap_set * (_DEFAULT_OBSERVE_FRAC / _DEFAULT_CHEAP_FRAC)
            object.__setattr__(self, "observe_budget_frac", _Default(observe))
        if isinstance(self.cheap_budget_frac, _Default):
            cheap = float(_DEFAULT_CHEAP_FRAC) * scale
            observe_now = self.observe_budget_frac
            if observe_now is not None and is_finite_real(observe_now):  # NaN, inf, 10 ** 400: refused below, by name
                # At least the recording's own share plus the default's room for reducing the statistics; within the
                # budget (an observe_budget_frac at or over budget_frac is refused below). Applied only from the
                # default up (cheap <= observe), it would leave observe_budget_frac=0.0039 0.01% for the reduction
                # where 0.004 gets 0.3%: a jump, and under the floor this class documents.
                room = (_DEFAULT_CHEAP_FRAC - _DEFAULT_OBSERVE_FRAC) * scale
                cheap = min(self.budget_frac, max(cheap, observe_now + room))
            object.__setattr__(self, "cheap_budget_frac", _Default(cheap))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> SignalConfig:
        """Returns a named preset, with optional field overrides.

        Presets: ``default`` (all signals, 2% budget, adaptive); ``cheap`` (no scheduled rounds);
        ``fixed`` (all signals on a fixed, deterministic schedule whatever the cost); ``thorough``
        (10% budget, larger rounds).

        Raises:
            ConfigError: an unknown preset or override name (the message lists the allowed ones), or an override
                out of its range.
        """
        presets: dict[str, dict[str, Any]] = {
            "default": {},
            "cheap": {"mode": SignalMode.CHEAP},
            "fixed": {"schedule": Schedule.FIXED},
            "thorough": {"budget_frac": 0.1, "target_interval_steps": 100, "max_probes": 16},
        }
        if name not in presets:
            raise ConfigError(f"unknown signal preset {name!r}; allowed: {', '.join(presets)}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(overrides) - set(known))
        if unknown:  # replace() would raise a TypeError about __init__'s keyword arguments
            raise ConfigError(f"SignalConfig has no field(s) {unknown}; its fields: {', '.join(known)}")
        return replace(cls(), **{**presets[name], **overrides})


_INT_FIELDS = {
    "target_interval_steps": ">= 1",
    "micro_batch_size": ">= 1",
    "hutchinson_batch_size": ">= 1",
    "max_microbatches": ">= 2",
    "max_probes": ">= 1",
    "fixed_interval_steps": ">= 1",
    "fixed_microbatches": ">= 2",
    "fixed_probes": ">= 1",
    "seed": "(any sign)",
}
"""``SignalConfig``'s whole-number fields and their ranges (for the type check's message; ranges checked apart)."""

_REAL_FIELDS = {
    "budget_frac": "in (0, 1)",
    "expensive_share": "in (0, 1)",
    "round_ema_decay": "in [0, 1)",
    "small_threshold": "in [0, 1]",
    "lr_factor_exponent": "> 0",
    "lr_factor_min": "in (0, 1]",
    "lr_factor_max": "in [1, inf)",
    "observe_budget_frac": "in (0, budget_frac)",
    "cheap_budget_frac": "in (observe_budget_frac, budget_frac]",
}
"""``SignalConfig``'s number fields and their ranges (for the type check's message; the ranges are checked apart)."""

_OPTIONAL_FIELDS = frozenset({"observe_budget_frac", "cheap_budget_frac"})
"""The number fields that may be None (the others raised a ``TypeError`` from their range's comparison)."""

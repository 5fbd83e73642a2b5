"""``HeuristicPolicy``: our reconstruction of Tri-Accel's hand-written rules, reading the observation vector.

- **Precision** per group, from its relative sensitivity (log10 of peak curvature × gradient variance,
  minus the median over layers; ``triaccel_rl.observation.sensitivity``): the curvature is the
  Hutchinson Hessian trace per parameter once the collector has measured it, sharpened by how
  concentrated the layer's curvature diagonal is (``Signals.sparsity``), and the variance is the
  micro-batch estimate of the mini-batch gradient's variance (``triaccel_rl.signals``). Until a round
  has measured them (or when the overhead budget refuses rounds) both come from squared gradients, and the
  observation caps the relative sensitivity at the median: no group is raised on those alone. A group in fp32
  is lowered when its sensitivity falls under ``lower_below``; a lowered group (bf16 or fp16) returns to fp32
  when it rises over ``raise_above``. The band between the two is the hysteresis that stops a group hovering
  near one threshold from flipping. Nothing is lowered while the overflow rate is over
  ``max_overflow_rate``, and fp16 groups move to bf16 then (a group raised to fp32 goes to fp32 all the same).
  *Which* 16-bit format: bf16 (fp16 with
  ``use_fp16``); with ``HeuristicConfig.speed_trial`` (on by default), where step time is measured on a GPU the
  driver first times a few real training steps in bf16 and in fp16 (where it is charged from a GPU's profile, it
  reads the profile's charge for each instead) and the faster one is used from then on
  (:meth:`HeuristicPolicy.choose_low_precision`), the start precision included. A group already in the other
  16-bit format keeps it (the driver runs every 16-bit layer in the trial's format).
- **LR multiplier**, from stability: one rung down the ``lr_scales`` ladder when the probe loss rose by
  more than ``loss_rise_tolerance`` (a sharp region: the step overshoots the local curvature) or the overflow
  rate was over ``max_overflow_rate``; one rung back up when the multiplier is under 1.0 and the loss fell by
  more than ``loss_rise_tolerance`` (a rung above 1.0 is kept); otherwise kept. With
  ``HeuristicConfig.anneal_plateau`` (off by default; the ``heuristic-anneal`` row of
  ``experiments/gpu_benchmark.py``) it also anneals: from ``anneal_after`` of the budget on, an interval whose
  probe loss fell by less than ``anneal_plateau`` (a small rise included) takes ``anneal_rungs`` rungs down (one
  by default), and the rule no longer climbs back (a climb the shield stopped short between rungs goes on to its
  rung). A rise over ``loss_rise_tolerance``, or the overflow rate over its bound, takes the stability rule's one
  rung instead, late in the run too: with ``anneal_rungs=2`` a small rise cuts two rungs and a large one a single
  rung. With ``anneal_release_after`` the cuts are released from that share of the budget on: the rule climbs a
  rung a decision back to 1.0 whatever the loss's fall (a rise or overflow still steps down), and anneals no more.
  With ``anneal_by="batch"`` a plateau doubles the batch instead, the LR keeping its rung, as long as the batch rule
  may grow it (``max_batch_growth``, ``grow_below_usage``); once it may not, or the executor refused the doubling
  asked at the last decision (the batch is where it was), the plateau cuts the LR. That record is the one thing the
  policy carries between a run's decisions (:meth:`HeuristicPolicy.run_state`, in a ``Controller``'s checkpoint).
- **Batch**, from memory headroom and gradient noise: doubled while memory use is under
  ``grow_below_usage`` of the budget, the batch is under ``max_batch_over_noise`` (a tenth) of the
  gradient-noise scale (larger batches still help, at a cost of at most about 10% more samples;
  ``B_simple = tr(Sigma) / |G|^2`` from unbiased micro-batch estimates) and a doubling stays
  within ``max_batch_growth`` times the task's base batch; halved when memory use is over ``shrink_above_usage``,
  whatever the noise scale asks.
  With ``HeuristicConfig.ramp_batch_after`` (off by default; the ``heuristic-ramp`` rows of
  ``experiments/gpu_benchmark.py``) it also grows at every decision from that share of the budget on (and before
  ``ramp_batch_until``), whatever the noise estimate, up to ``max_batch_growth``: a late batch ramp. The move is
  on the *effective* batch: the executor refuses growth the memory model predicts over the usable budget, and a
  run whose budget shrinks (after an out-of-memory error) keeps its batch by accumulating micro-batches planned to
  fill ``elastic.fill_frac`` (0.9) of the budget. The defaults agree: 0.9 is under the 0.95 that reads as memory
  pressure, and a batch using under 0.45 of the budget still fits once doubled.

**At a threshold's edge** every comparison is strict, so a feature exactly at a threshold does not fire its rule: a
group at ``lower_below`` stays in fp32 and one at ``raise_above`` stays lowered; an overflow rate equal to
``max_overflow_rate`` (1 skipped step in 20 at the default 0.05) counts as stable; a loss change of exactly
``loss_rise_tolerance`` (either way) or of exactly ``-anneal_plateau`` keeps the LR; memory use exactly at
``grow_below_usage`` or ``shrink_above_usage`` keeps the batch, and so does a batch exactly at
``max_batch_over_noise`` of the noise scale. The shares of the run are the exception: annealing and the ramp start
at ``progress == anneal_after`` (``ramp_batch_after``), the release at ``anneal_release_after``, the ramp's last
decision is the one before ``ramp_batch_until``, and a doubling that lands exactly on ``max_batch_growth`` is taken.
The observation is float32, so each threshold is compared as the float32 nearest to it (in float64, 1/20 stored as
float32 is a little over 0.05).

**Features that are NaN** (not measured: ``FallbackPolicy`` hands such observations here) fire no rule that reads
them: nothing is lowered on an unknown overflow rate, the LR holds on an unknown loss trend (but for the climb
``anneal_release_after`` makes, which reads no trend) and the batch on an unknown memory use or noise scale. A
group's precision one-hot with no entry set reads as the start precision (``initial_precision``), an unknown LR
multiplier as the 1.0 rung, and one beyond the ladder as its nearer end.

Per-layer step sizes are not part of the action: the decision loop applies the collector's
curvature-scaled LR factors itself when ``SignalConfig.lr_factors`` is on.

**Ablations** (``parts``): a rule left out holds its knob at the neutral action — each group keeps its
current (majority) precision, the LR multiplier stays on its current rung, the batch is kept — so a
variant isolates what one rule contributes. The registered variants (``HEURISTIC_NAMES``, each a
``make_policy`` name and the policy's ``name``):

- ``heuristic``: all three rules.
- ``heuristic-precision``: the precision rule only (precision-adaptive).
- ``heuristic-elastic``: the batch rule only (memory-elastic batching).
- ``heuristic-second-order``: the LR rule only, plus the curvature-scaled per-layer LR factors, which
  are not part of the action: the policy says it needs them (``needs_lr_factors``) and whoever drives
  the run switches them on (``DecisionLoop.enable_lr_factors``; ``Controller`` does it itself).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from triaccel_rl.actions import encode
from triaccel_rl.config import ControllerConfig
from triaccel_rl.errors import is_finite_real
from triaccel_rl.observation import ObservationLayout
from triaccel_rl.shield import check_observation
from triaccel_rl.types import Action, BatchMove, Precision

__all__ = ["HEURISTIC_NAMES", "HEURISTIC_PARTS", "HeuristicPolicy", "fastest_16bit"]

HEURISTIC_PARTS = ("precision", "lr", "batch")
"""The heuristic's rules, one per knob: per-group precision, the LR multiplier, the batch size."""


@dataclass(frozen=True)
class _Variant:
    parts: frozenset[str]
    needs_lr_factors: bool = False


_VARIANTS = {
    "heuristic": _Variant(frozenset(HEURISTIC_PARTS)),
    "heuristic-precision": _Variant(frozenset({"precision"})),
    "heuristic-elastic": _Variant(frozenset({"batch"})),
    "heuristic-second-order": _Variant(frozenset({"lr"}), needs_lr_factors=True),
}

HEURISTIC_NAMES = tuple(_VARIANTS)
"""Registered names: the full heuristic and its ablations (see the module docstring)."""


class HeuristicPolicy:
    """Hand-written controller with hysteresis; thresholds in ``config.heuristic``.

    Args:
        config: thresholds (``config.heuristic``), the LR ladder and the action layout.
        parts: the rules that steer their knob, a non-empty subset of ``HEURISTIC_PARTS``; every other knob
            holds at the neutral action (current precision, current LR rung, batch kept).
        needs_lr_factors: the policy is meant to run with the curvature-scaled per-layer LR factors on
            (``SignalConfig.lr_factors``). They are not part of the action: the driver reads this flag.

    Attributes:
        name: the registered name (``HEURISTIC_NAMES``) of this ``(parts, needs_lr_factors)`` combination,
            or one spelling them out (``heuristic[lr+batch]``) for an unregistered one.

    Example:
        >>> policy = HeuristicPolicy()
        >>> action, _ = policy.predict(np.zeros(43, dtype=np.float32))
        >>> action.shape
        (6,)
        >>> HeuristicPolicy.from_name("heuristic-elastic").parts
        frozenset({'batch'})
    """

    def __init__(
        self,
        config: ControllerConfig | None = None,
        parts: Iterable[str] = HEURISTIC_PARTS,
        needs_lr_factors: bool = False,
    ) -> None:
        if isinstance(parts, str):
            raise ValueError(f"parts={parts!r} must be a collection of part names, e.g. {{{parts!r}}}")
        if not isinstance(parts, Iterable):
            raise ValueError(f"parts={parts!r} must be a collection of part names from {list(HEURISTIC_PARTS)}")
        if not isinstance(needs_lr_factors, bool):  # the text "False" turned them on
            raise ValueError(f"needs_lr_factors={needs_lr_factors!r} must be True or False")
        given, parts = parts, tuple(parts)  # read twice below: a generator was empty the second time
        if not all(isinstance(part, str) for part in parts):  # a list in it: "unhashable type: 'list'"
            raise ValueError(f"parts={given!r} must be a non-empty subset of {list(HEURISTIC_PARTS)} (names, str)")
        chosen = frozenset(parts)
        if not chosen or not chosen <= set(HEURISTIC_PARTS):
            raise ValueError(
                f"parts={sorted(chosen, key=repr)} must be a non-empty subset of {list(HEURISTIC_PARTS)} "
                "(for no adaptation at all, use a static policy)"
            )
        if config is not None and not isinstance(config, ControllerConfig):  # a HeuristicConfig, say
            raise TypeError(
                f"config={config!r} must be a ControllerConfig (its thresholds go in ControllerConfig(heuristic=...))"
            )
        self.config = config or ControllerConfig()
        self.layout = ObservationLayout(self.config.n_groups)
        self.parts = chosen
        self.needs_lr_factors = bool(needs_lr_factors)
        self.name = _name_of(_Variant(chosen, self.needs_lr_factors))
        self.initial_precision = Precision.parse(self.config.heuristic.start_precision)
        """Every controllable layer's precision before the first decision (the driver applies it)."""
        self.low_precision = Precision.FP16 if self.config.heuristic.use_fp16 else Precision.BF16
        """The 16-bit precision insensitive groups are lowered to (:meth:`choose_low_precision` may change it)."""
        # What a run carries from one decision to the next (annealing by batch: _growth_refused), for a checkpoint
        # (run_state): where the last decision's annealing asked a doubling (log2_batch), where one did not happen,
        # the last decision's share of its run (a smaller one starts another run), and the first two as they were
        # before that decision (a retry of it starts from there).
        self._growth_asked_at: float | None = None
        self._growth_refused_at: float | None = None
        self._last_progress = 0.0
        self._before_last: tuple[float | None, float | None] | None = None

    def wants_speed_trial(self, step_time_known: bool) -> bool:
        """Whether the driver should time the 16-bit precisions before the first decision.

        Only a policy whose precision rule runs (``precision`` in ``parts``) has a use for it, and only where
        step time tells the formats apart (``step_time_known``: measured on a GPU, or charged from a GPU's
        profile); ``HeuristicConfig.speed_trial`` turns it on (None: wherever it can run; True forces it, e.g.
        for a test on a CPU with measured time).
        """
        setting = self.config.heuristic.speed_trial
        return "precision" in self.parts and (step_time_known if setting is None else setting)

    def choose_low_precision(self, step_ms: Mapping[Precision, float]) -> Precision:
        """Lowers to the 16-bit precision with the shortest measured step from now on; returns it.

        The start precision follows when it is 16-bit. A tie keeps the current choice.

        Raises:
            ValueError: ``step_ms`` is empty, names fp32, or holds a time that is not positive and finite.
        """
        fastest = fastest_16bit(step_ms, self.low_precision)
        self.low_precision = fastest
        if self.initial_precision is not Precision.FP32:
            self.initial_precision = fastest
        return fastest

    @classmethod
    def from_name(cls, name: str, config: ControllerConfig | None = None) -> HeuristicPolicy:
        """The registered variant ``name`` (one of ``HEURISTIC_NAMES``).

        Raises:
            ValueError: an unknown name (the message lists the allowed ones).
        """
        variant = _VARIANTS.get(name) if isinstance(name, str) else None  # a list: "unhashable type: 'list'"
        if variant is None:
            raise ValueError(f"unknown heuristic {name!r}; allowed: {', '.join(HEURISTIC_NAMES)}")
        return cls(config, variant.parts, variant.needs_lr_factors)

    def predict(
        self,
        observation: np.ndarray,
        state: tuple[np.ndarray, ...] | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...] | None]:
        """Returns the raw action for ``observation`` (or a batch of them).

        The features are read as float32 holds them (a float64 observation rounded first), so a feature exactly at a
        threshold compares as the module docstring says whatever the array's type: a float64 0.95 was over 0.95's
        float32 (0.949999988) and shrank the batch.
        """
        obs = check_observation(observation, self.layout.size).astype(np.float32).astype(np.float64)
        if obs.ndim == 2:
            return np.stack([self._decide(row) for row in obs]), state
        return self._decide(obs, one_run=True), state

    def _decide(self, obs: np.ndarray, one_run: bool = False) -> np.ndarray:
        g = self.layout.globals
        overflow, max_overflow = obs[g("overflow_rate")], _as_observed(self.config.heuristic.max_overflow_rate)
        unstable = bool(overflow > max_overflow)
        may_lower = bool(overflow <= max_overflow)  # False for a NaN rate too: lower only on a known stable one
        current = [self._current_precision(obs, group) for group in range(self.layout.n_groups)]
        precisions = self._precisions(obs, current, unstable, may_lower) if "precision" in self.parts else current
        rung = self._current_rung(obs)
        refused = one_run and self._growth_refused(float(obs[g("log2_batch")]), float(obs[g("progress")]))
        move = self._batch_move(obs, refused) if "batch" in self.parts else BatchMove.KEEP
        # With anneal_by="batch" the batch's doubling is the plateau's cut, and the LR keeps its rung
        batch_annealed = move is BatchMove.GROW and self._plateau(obs) and self._batch_anneals() and not refused
        if "lr" in self.parts:
            rung = self._lr_rung(obs, rung, unstable, batch_annealed)
        if one_run:
            self._growth_asked_at = float(obs[g("log2_batch")]) if batch_annealed else None
        return encode(Action(tuple(precisions), self.config.lr_scales[rung], move), self.config)

    def _current_precision(self, obs: np.ndarray, group: int) -> Precision:
        """The group's precision from its one-hot; ``initial_precision`` when no entry is set (NaN counts as unset)."""
        one_hot = obs[self.layout.group(group, "is_fp32") : self.layout.group(group, "is_fp16") + 1]
        one_hot = np.nan_to_num(one_hot, nan=0.0)
        if not (one_hot > 0).any():
            return self.initial_precision
        return Precision(int(np.argmax(one_hot)))

    def _precisions(
        self, obs: np.ndarray, current: list[Precision], unstable: bool, may_lower: bool
    ) -> list[Precision]:
        rules = self.config.heuristic
        lower_below, raise_above = _as_observed(rules.lower_below), _as_observed(rules.raise_above)
        low = self.low_precision
        chosen = []
        for group, precision in enumerate(current):
            sensitivity = obs[self.layout.group(group, "rel_sensitivity")]
            new = precision
            if precision is Precision.FP32:
                if sensitivity < lower_below and may_lower:
                    new = low
            elif sensitivity > raise_above:
                new = Precision.FP32
            if unstable and new is Precision.FP16:
                new = Precision.BF16
            chosen.append(new)
        return chosen

    def _current_rung(self, obs: np.ndarray, floor: bool = False) -> int:
        """Index of the ``lr_scales`` rung nearest (in log ratio) to the current LR multiplier (``floor``: at or below).

        ``floor`` allows for the float32 observation's rounding.

        Between two rungs the shield stopped a move short: ``ControllerConfig`` keeps adjacent rungs less than
        ``max_lr_change ** 2`` apart, so the nearest rung is the one a single-rung move was going to. Annealing,
        which moves down only and by several rungs, reads the floor: the nearest could be above (0.67 on the way
        from 1.0 to 0.5 read as 0.75, and "keep" climbed back); but a multiplier a stopped climb left between rungs
        (a rung below times ``max_lr_change``) reads as the nearest, where the climb was going.

        NaN reads as the 1.0 rung; a multiplier beyond the ladder as its nearer end (2 ** a huge value overflowed
        to inf, and the log of its ratio raised ``math domain error``).
        """
        ladder = self.config.lr_scales
        log2_scale = float(obs[self.layout.globals("log2_lr_scale")])
        if math.isnan(log2_scale):
            return ladder.index(1.0)
        current_scale = 2.0 ** min(max(log2_scale, math.log2(ladder[0])), math.log2(ladder[-1]))
        nearest = int(np.argmin([abs(math.log(s / current_scale)) for s in ladder]))
        if not floor:
            return nearest
        below = max(i for i, s in enumerate(ladder) if s <= current_scale * (1 + 1e-6) or i == 0)
        # Between rungs after a climb the shield stopped short (the multiplier is a rung below times max_lr_change, and
        # no rung above over it): the nearest, as the plain rule reads it. The floor there cut the LR on a falling loss
        # (the "safe" preset's 0.75 -> 0.9375 climb read as 0.75 once annealing began).
        step = self.config.max_lr_change
        between = not math.isclose(ladder[below], current_scale, rel_tol=1e-5)
        climbed = any(math.isclose(current_scale / step, s, rel_tol=1e-5) for s in ladder)
        descended = any(math.isclose(current_scale * step, s, rel_tol=1e-5) for s in ladder)
        return nearest if between and climbed and not descended else below

    def _annealing(self, obs: np.ndarray) -> bool:
        """Whether annealing is on at this point of the run: past ``anneal_after``, before any release."""
        rules = self.config.heuristic
        progress = obs[self.layout.globals("progress")]
        release = rules.anneal_release_after
        released = release is not None and progress >= _as_observed(release)
        return rules.anneal_plateau is not None and progress >= _as_observed(rules.anneal_after) and not released

    def _plateau(self, obs: np.ndarray) -> bool:
        """Whether annealing is on and the last interval's probe loss fell by less than ``anneal_plateau``.

        A rise over ``loss_rise_tolerance`` or an overflow rate over its bound is no plateau but the stability rule's
        one rung down, which takes the LR's cut in its place.
        """
        rules = self.config.heuristic
        g = self.layout.globals
        trend = obs[g("loss_trend")]
        unstable = obs[g("overflow_rate")] > _as_observed(rules.max_overflow_rate)
        if not self._annealing(obs) or rules.anneal_plateau is None or unstable:
            return False
        return bool(-_as_observed(rules.anneal_plateau) < trend <= _as_observed(rules.loss_rise_tolerance))

    def _batch_anneals(self) -> bool:
        return self.config.heuristic.anneal_by == "batch" and "batch" in self.parts

    def _growth_refused(self, log2_batch: float, progress: float) -> bool:
        """Whether the doubling annealing asked for at the last decision did not happen, at this batch.

        The executor may refuse a growth the policy cannot see coming (``max_batch_size``, a dataset too small, the
        memory model's prediction): the batch is where it was. Annealing then cuts the LR at this batch instead of
        asking again at every plateau (which left the LR where it was for the rest of the run). Read only for a
        single run's observations (a 1-D ``predict``); a batch of observations from several runs has no one past,
        and a decision earlier in its run than the last (a policy used again for another run) starts afresh.
        """
        if progress == self._last_progress and self._before_last is not None:
            # The same decision asked again (a Ctrl-C or an error cut it short): from the state before it, or the
            # doubling it asked for would read as refused, and the retry would cut the LR instead
            asked, refused = self._before_last
        else:
            asked, refused = self._growth_asked_at, self._growth_refused_at
            if progress < self._last_progress:
                asked = refused = None
            self._before_last = (asked, refused)
        if not math.isnan(progress):
            self._last_progress = progress
        if asked is not None and log2_batch == asked:
            refused = log2_batch
        elif refused is not None and log2_batch != refused:
            refused = None  # the batch moved since: it may grow again
        self._growth_asked_at, self._growth_refused_at = asked, refused
        return refused is not None

    def run_state(self) -> dict[str, Any]:
        """What the policy carries from one decision of a run to the next, for a checkpoint (:meth:`load_run_state`).

        Annealing by batch's record of the doubling it last asked for (see ``HeuristicConfig.anneal_by``); numbers
        and ``None`` only.
        """
        return {
            "growth_asked_at": self._growth_asked_at,
            "growth_refused_at": self._growth_refused_at,
            "last_progress": self._last_progress,
            "before_last": None if self._before_last is None else list(self._before_last),
        }

    @staticmethod
    def check_run_state(state: object) -> None:
        """Raises a ValueError naming what in ``state`` is not what :meth:`run_state` returns; ``None`` passes."""
        if state is None:
            return
        if not isinstance(state, Mapping) or set(state) != set(_RUN_STATE_KEYS):
            raise ValueError(
                f"the heuristic's run state {state!r} must be a dict of {', '.join(_RUN_STATE_KEYS)} (run_state())"
            )

        def log2_batch_or_none(name: str, value: object) -> None:
            if value is not None and not is_finite_real(value):
                raise ValueError(f"the heuristic's run state {name}={value!r} must be a finite number or None")

        log2_batch_or_none("growth_asked_at", state["growth_asked_at"])
        log2_batch_or_none("growth_refused_at", state["growth_refused_at"])
        progress = state["last_progress"]
        if not (is_finite_real(progress) and 0.0 <= progress <= 1.0):
            raise ValueError(f"the heuristic's run state last_progress={progress!r} must be a number in [0, 1]")
        before = state["before_last"]
        if before is not None:
            if not isinstance(before, (list, tuple)) or len(before) != 2:
                raise ValueError(f"the heuristic's run state before_last={before!r} must be a pair or None")
            for value in before:
                log2_batch_or_none("before_last", value)

    def others_decided(self) -> None:
        """Drops the record of the doubling it asked for, and of one refused: another policy decided since.

        A ``FallbackPolicy``'s heuristic, whose spells the learned policy's decisions part, calls it at a spell's
        start. The batch it asked to double from may have moved and come back by the other policy's moves since: read as
        refused, the next plateau cut the LR where it should ask for the doubling again. The share of the run it last
        saw is kept (a later decision is the same run's).
        """
        self._growth_asked_at = self._growth_refused_at = self._before_last = None

    def load_run_state(self, state: Mapping[str, Any] | None) -> None:
        """Takes a run's state from a checkpoint (:meth:`run_state`'s); ``None``: a new run's. Checked first."""
        self.check_run_state(state)
        if state is None:
            self._growth_asked_at = self._growth_refused_at = self._before_last = None
            self._last_progress = 0.0
            return
        before = state["before_last"]
        number = _optional_float
        self._growth_asked_at, self._growth_refused_at = (
            number(state["growth_asked_at"]),
            number(state["growth_refused_at"]),
        )
        self._last_progress = float(state["last_progress"])
        self._before_last = None if before is None else (number(before[0]), number(before[1]))

    def _lr_rung(self, obs: np.ndarray, rung: int, unstable: bool, batch_annealed: bool = False) -> int:
        rules = self.config.heuristic
        trend = obs[self.layout.globals("loss_trend")]
        tolerance = _as_observed(rules.loss_rise_tolerance)
        if trend > tolerance or unstable:
            return max(rung - 1, 0)
        release = rules.anneal_release_after
        released = release is not None and obs[self.layout.globals("progress")] >= _as_observed(release)
        if self._annealing(obs):  # annealing: down on a plateau (unless the batch took the cut), never back up
            rung = self._current_rung(obs, floor=True)
            return max(rung - rules.anneal_rungs, 0) if self._plateau(obs) and not batch_annealed else rung
        if (released or trend < -tolerance) and self.config.lr_scales[rung] < 1.0:
            return rung + 1  # recovering (or annealing's cuts released): climb back towards the neutral scale
        return rung

    def _batch_move(self, obs: np.ndarray, growth_refused: bool = False) -> BatchMove:
        rules = self.config.heuristic
        g = self.layout.globals
        memory_use = obs[g("memory_use")]
        noise_over_batch = obs[g("log_noise_over_batch")]
        if memory_use > _as_observed(rules.shrink_above_usage):
            return BatchMove.SHRINK
        # A doubling that lands on max_batch_growth is taken: the feature is float32 (1e-7 off, up or down), and
        # batches one sample apart differ by more than 1e-4 in log2 at any batch under 10,000.
        room = obs[g("log2_batch")] + 1.0 <= math.log2(rules.max_batch_growth) + 1e-5
        quiet = noise_over_batch > _as_observed(-math.log10(rules.max_batch_over_noise))
        progress = obs[g("progress")]
        ramp = rules.ramp_batch_after is not None and (
            _as_observed(rules.ramp_batch_after) <= progress < _as_observed(rules.ramp_batch_until)
        )
        annealed = self._batch_anneals() and self._plateau(obs) and not growth_refused
        if room and (quiet or ramp or annealed) and memory_use < _as_observed(rules.grow_below_usage):
            return BatchMove.GROW
        return BatchMove.KEEP


_RUN_STATE_KEYS = ("growth_asked_at", "growth_refused_at", "last_progress", "before_last")


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _as_observed(threshold: float) -> float:
    """``threshold`` as the float32 observation holds it, so a feature exactly at a threshold compares equal to it.

    In float64, 1 skipped step in 20 (0.05), stored as float32 (0.0500000007), read as over a 0.05 bound.
    """
    return float(np.float32(threshold))


def _name_of(variant: _Variant) -> str:
    for name, registered in _VARIANTS.items():
        if registered == variant:
            return name
    spelled = "+".join(part for part in HEURISTIC_PARTS if part in variant.parts)
    return f"heuristic[{spelled}{', lr-factors' if variant.needs_lr_factors else ''}]"


def fastest_16bit(step_ms: Mapping[Precision, float], current: Precision) -> Precision:
    """The 16-bit precision with the shortest measured step; a tie keeps ``current``.

    Keys may be spelled as ``Precision.parse`` takes them (``"fp16"``, 2); the answer is a ``Precision``.

    Example:
        >>> fastest_16bit({Precision.BF16: 7.0, Precision.FP16: 5.8}, Precision.BF16).name
        'FP16'
        >>> fastest_16bit({"bf16": 6.0, "fp16": 6.0}, Precision.BF16).name
        'BF16'

    Raises:
        ValueError: ``step_ms`` is empty, names fp32 (in any spelling), no precision or one twice, or holds a time
            that is not a positive finite number.
    """
    if not isinstance(step_ms, Mapping):  # a list of pairs: "'list' object has no attribute 'items'"
        raise ValueError(f"step_ms={step_ms!r} must map precisions to step times in ms, e.g. {{'fp16': 5.0}}")
    if not step_ms:
        raise ValueError("step_ms is empty: time at least one 16-bit precision")
    timed: dict[Precision, float] = {}
    for key, ms in step_ms.items():
        precision = Precision.parse(key)
        if precision is Precision.FP32:
            raise ValueError(f"step_ms names fp32 ({key!r}); the trial chooses between 16-bit precisions")
        if isinstance(ms, bool) or not isinstance(ms, numbers.Real) or not (math.isfinite(ms) and ms > 0):
            raise ValueError(f"step_ms[{precision.name.lower()}]={ms!r} must be a positive finite number")
        if precision in timed:  # "bf16" and 1 both: the later silently replaced the other's time
            raise ValueError(f"step_ms names {precision.name.lower()} twice (the second as {key!r})")
        timed[precision] = float(ms)
    return min(timed, key=lambda p: (timed[p], p is not current))

"""``SignalCollector``: step statistics and scheduled estimator rounds → one ``Signals`` snapshot per decision.

Two tiers, both per layer (``Signals`` arrays follow ``TrainingRun.layers``):

**Cheap** (every step, no extra pass): from the step statistics the engine computes anyway, EMAs over
steps (decay ``ema_decay``, bias-corrected) of ``|g_l|^2`` and ``|g_l|`` of the mini-batch gradient.

- ``curvature_l = E[|g_l|^2] / n_l``: the mean diagonal of the mini-batch empirical Fisher
  ``diag(G G^T + Sigma / B)``.
- ``grad_variance_l = max(0, E[|g_l|^2] - |E[g_l]|^2) / n_l`` and ``snr_l``, ``noise_scale`` from
  ``|E[g]|^2`` = the optimizer's running mean (Adam's ``exp_avg``, SGD's momentum). This is biased
  (the running mean lags the moving parameters and is itself noisy), which is why the rounds below
  replace it whenever they have run. The bias is upward for the noise scale, so this estimate is
  capped at the batch size: on its own it never makes the batch look smaller than the noise scale.
  Where the optimizer keeps no running mean (plain SGD without momentum; a layer before its first update: NaN),
  ``E[|g_l|^2]`` is split evenly between signal and noise, a neutral guess: ``snr_l = 1`` and, where no layer's
  mean is known, a noise scale of the batch size, the observation's neutral values (``log_snr`` and
  ``log_noise_over_batch`` 0); ``extra["grad_mean_unknown_layers"]`` names those with a gradient. (Taking
  ``E[|g|^2]`` for ``|E[g]|^2`` read as no noise at all: variance 0, SNR 1e30, noise scale 0.) A layer whose
  ``E[|g_l|^2]`` is exactly 0 has no split to make (0/0): ``snr_l = 1``, neutral; where every layer's is (no step
  measured yet, as after an interval whose every step overflowed, or gradients exactly zero), the noise scale is the
  batch size too and every layer is named in ``extra["grad_mean_unknown_layers"]``, whatever the running mean.

**Scheduled rounds** (mode ``all``; on a sub-batch, at decision points, under the overhead budget, see
:class:`RoundScheduler`), with exact-in-expectation estimators (:mod:`triaccel_rl.signals.estimators`):

- ``hessian_trace_l``: Hutchinson estimate of ``tr(H_l)``; ``curvature_l = |tr(H_l)| / n_l`` (the
  magnitude: a negative-curvature block reacts to perturbations as strongly).
- From ``m`` micro-batch gradients: unbiased ``|G_l|^2`` and ``tr(Sigma_l)`` (per-sample covariance);
  ``grad_variance_l = tr(Sigma_l) / (B n_l)`` (per element, of the mini-batch gradient at the current
  batch size ``B``), ``snr_l = |G_l|^2 / (tr(Sigma_l) / B)`` (0/0, a layer whose gradient is exactly zero or
  unused: ``snr_l = 1``, neutral, as in the cheap tier), and the simple noise scale
  ``B_simple = sum_l tr(Sigma_l) / sum_l |G_l|^2`` (McCandlish et al. 2018).
- ``sparsity``: :func:`curvature_sparsity` of the Fisher diagonal: Adam's bias-corrected ``exp_avg_sq``
  (reused, no extra pass) when the optimizer keeps one, else the rounds' per-sample Fisher diagonal.

Smoothing across rounds: EMA with decay ``round_ema_decay``, bias-corrected per layer; the noise scale's
numerator and denominator are smoothed separately (a ratio of means, not a mean of ratios). When the rounds
do not resolve the mean gradient above its noise, the noise scale is the lower bound they do establish
(their sample count), never the unbounded ratio (``_resolved_noise_scale``).

Rounds too costly for the run: with the costs known (from the warm-up round, or on a GPU from an earlier
run of the same model in this process) and the run's progress known, a first round that the whole run's
budget cannot repay is refused (``extra["rounds_refused_for_budget"]``, logged once); the signals then
stay the cheap tier's, as before any round.

Bad input: a round whose loss or any estimate is non-finite is skipped (its cost still counts;
``extra["rounds_skipped"]``); so is, before any pass and at no cost, a round whose micro-batches would hold one
sample each (a probe batch of 2-3 samples) where a batch norm normalises with batch statistics (logged once; its
signals stay the cheap tier's); a layer with no gradient (unused by the loss) is measured as the exact zero
it is (``extra["unused_layers"]``); a layer frozen after the start keeps its last values. Every value in
a snapshot is finite. An interval with no steps (two snapshots in a row) measured neither time nor memory:
its snapshot repeats the latest measured step time and peak memory, with a zero step-time trend. Per-layer
input of another length than the layers' is refused (numpy would broadcast a single value to every layer).
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from triaccel_rl.errors import is_whole
from triaccel_rl.signals.config import SignalConfig, SignalMode
from triaccel_rl.signals.device import IntervalMoments
from triaccel_rl.signals.estimators import (
    curvature_lr_factors,
    curvature_sparsity,
    float_outputs,
    forked_rngs,
    frozen_batch_stats,
    gradient_moments,
    hutchinson,
)
from triaccel_rl.signals.scheduler import BudgetRefusal, RoundCost, RoundPlan, RoundScheduler
from triaccel_rl.state import SavedState
from triaccel_rl.types import CurvatureSparsity, LayerInfo, Precision, Signals, StepStats

if TYPE_CHECKING:
    from triaccel_rl.training import TrainingRun

__all__ = ["EstimatorSource", "RoundReport", "SignalCollector", "source_for_run"]

_log = logging.getLogger("triaccel_rl")

_TINY = 1e-30
_COLLECTOR_STATE_KEYS = (
    "n_steps",
    "overhead_ms",
    "train_ms",
    "cheap_ms",
    "sq_ema",
    "norm_ema",
    "loss_ema",
    "ema_weight",
    "previous_probe",
    "previous_step_ms",
    "previous_peak_bytes",
    "interval_steps",
    "interval_skipped",
    "interval_time_ms",
    "interval_peak",
)
"""What ``SignalCollector.state_dict()`` must hold (``"scheduler"`` and ``"rounds"`` too, since 2026-12-06)."""
_ROUNDS_STATE_KEYS = (
    "trace_ema",
    "grad_sq_ema",
    "cov_ema",
    "round_weight",
    "round_samples",
    "unused",
    "sparsity",
    "fisher_ema",
    "fisher_source",
    "estimator_ms",
    "warmup_ms",
    "rounds_skipped",
    "rounds_refused_for_budget",
    "first_round_prepared",
    "said_batch_norm_skip",
    "cpu_generator",
    "device_generator",
    "device_type",
)
"""What the ``"rounds"`` entry of ``SignalCollector.state_dict()`` holds."""
_SPARSITY = ("top1_share", "top10_share", "small_frac", "top10_ratio")
_PUBLIC_ROUND_COUNTS = ("estimator_ms", "warmup_ms", "rounds_skipped", "rounds_refused_for_budget")
"""The rounds state's fields that are public attributes of the collector; the others are ``_`` + the key."""
_NOISE_SCALE_MAX = 1e12  # samples; B_simple when the gradient is buried in noise

# Profile cost mode charges a round from the modelled fp32 step time: the gradient with a graph costs
# about 1.5 plain gradient passes, each Hutchinson probe (a double backward) about 7 (H200, ResNet-18 at
# batch 128 in fp32: 117 ms a probe against 17 ms a plain gradient; issue 3).
_PROFILE_GRAPH_GRADIENT_PASSES = 1.5
_PROFILE_PROBE_PASSES = 7.0


@dataclass(frozen=True)
class EstimatorSource:
    """What the scheduled rounds need from a run.

    Attributes:
        model: the model being trained.
        layer_params: the parameters of each layer, in the order of the collector's layers.
        loss_fn: ``(model outputs, targets) -> mean loss`` over the samples.
        inputs: samples the rounds draw sub-batches from (e.g. a held-out probe batch), on the model's device.
        targets: their targets.
        second_moment: returns, per layer, the optimizer's flat per-element second moment of the gradient
            (Adam's bias-corrected ``exp_avg_sq``) or None where it keeps none.
        modelled_pass_ms: charged ms of one fp32 forward+backward over ``n`` samples (profile cost mode);
            None charges the measured time.
        keep_modes: the rounds' forwards keep every module's train/eval mode (a user's loop, whose model may train in
            eval mode on purpose); False puts a model in eval mode in training mode for them, as ``TrainingRun`` trains.
    """

    model: nn.Module
    layer_params: Sequence[Sequence[nn.Parameter]]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    inputs: torch.Tensor
    targets: torch.Tensor
    second_moment: Callable[[], list[torch.Tensor | None]] | None = None
    modelled_pass_ms: Callable[[int], float] | None = None
    keep_modes: bool = False

    def __post_init__(self) -> None:
        if len(self.inputs) != len(self.targets):
            raise ValueError(f"inputs ({len(self.inputs)}) and targets ({len(self.targets)}) differ in length")
        if len(self.inputs) < 2:
            raise ValueError(f"the rounds need at least 2 samples to draw from; got {len(self.inputs)}")
        if not any(p.requires_grad for params in self.layer_params for p in params):
            raise ValueError("the model has no trainable parameters; nothing to estimate")


@dataclass(frozen=True)
class RoundReport:
    """What one round did.

    Attributes:
        plan: its size.
        cost: its charged cost by part.
        measured_ms: its wall time on this machine (with one host-device sync at the end).
        folded: True when its estimates were folded in; False when skipped (see ``reason``).
        reason: why it was skipped ("" when folded).
    """

    plan: RoundPlan
    cost: RoundCost
    measured_ms: float
    folded: bool
    reason: str = ""


def source_for_run(run: TrainingRun) -> EstimatorSource:
    """The estimator source of a ``TrainingRun``: its held-out probe batch, its loss, charged like its steps."""
    from triaccel_rl.config import CostMode

    fp32 = [Precision.FP32] * run.n_layers

    def modelled(n: int) -> float:
        return run.costs.step_ms(n, fp32, run.profile, run.include_fixed_cost)

    return EstimatorSource(
        model=run.model,
        layer_params=run.engine.layer_params,
        loss_fn=run.task.loss_fn,
        # The probe batch is held out of training: drawing from it consumes no training samples.
        inputs=run.probe_batch[0],
        targets=run.probe_batch[1],
        second_moment=run.engine.second_moment_diagonal,
        modelled_pass_ms=modelled if run.cost_mode is CostMode.PROFILE else None,
    )


class SignalCollector:
    """Accumulates step statistics, runs scheduled estimator rounds, and produces a ``Signals`` snapshot.

    Args:
        layers: the run's layers, in the order of the per-layer arrays.
        ema_decay: smoothing of per-step quantities, in (0, 1).
        memory_budget_bytes: the budget reported in the snapshot.
        config: modes, budget and schedule; ``SignalConfig()`` by default.
        param_counts: the parameter elements each layer's gradient statistics are summed over (the engine's
            ``layer_param_counts``: a weight tied between layers in its first only, none outside the optimizer),
            the per-element curvature and variance's divisors; each layer's ``n_params`` by default. A tied output
            layer divided its own bias's sums by the tied weight's size too. The snapshot's ``n_params``, which
            weighs each layer in the observation (its precision, its share), stays what the layer computes with.

    Attributes:
        overhead_ms: wall time spent on signals and decisions (cheap path, rounds, and what callers
            charge with :meth:`add_overhead`); ``overhead_ms / train_ms`` is the overhead fraction.
        train_ms: wall time of the training steps observed.
        estimator_ms: wall time of the rounds alone (the warm-up round included).
        warmup_ms: wall time of the warm-up round (``SignalConfig.warmup_round``; charged to the rounds' budget
            where costs are measured).
        rounds_skipped: rounds that were not folded in: a non-finite loss or estimate, or (skipped before any pass,
            at no cost) micro-batches of one sample through a batch norm in training mode.
        rounds_refused_for_budget: decision points at which the first round was refused because its
            predicted cost exceeds what the budget allows over the whole run (:class:`BudgetRefusal`).

    Example:
        >>> from triaccel_rl.types import LayerInfo
        >>> collector = SignalCollector([LayerInfo("fc", 10, True)], ema_decay=0.9, memory_budget_bytes=1 << 20)
        >>> collector.n_steps
        0
    """

    def __init__(
        self,
        layers: list[LayerInfo],
        ema_decay: float,
        memory_budget_bytes: int,
        config: SignalConfig | None = None,
        param_counts: Sequence[int] | None = None,
    ) -> None:
        if not (0.0 < ema_decay < 1.0):
            raise ValueError(f"ema_decay={ema_decay} must be in (0, 1)")
        if not layers:
            raise ValueError("no layers: the model has no trainable parameters")
        self.layers = layers
        self.ema_decay = ema_decay
        self.memory_budget_bytes = memory_budget_bytes
        self._config = config or SignalConfig()
        self.n_params = np.array([info.n_params for info in layers], dtype=np.float64)
        counts = self.n_params if param_counts is None else list(param_counts)
        if len(counts) != len(layers) or (param_counts is not None and any(not is_whole(n) or n < 0 for n in counts)):
            raise ValueError(f"param_counts={param_counts!r} must be {len(layers)} whole numbers >= 0, one per layer")
        # A layer that owns nothing (a tied head without a bias) has sums of 0: it reads 0, not NaN.
        self._per_element = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
        self.controllable = np.array([info.controllable for info in layers], dtype=bool)
        self.n_steps = 0
        self.overhead_ms = 0.0
        self.train_ms = 0.0
        self.estimator_ms = 0.0
        self.cheap_ms = 0.0
        """Wall ms of the cheap tier (``observe``, ``observe_interval``, ``snapshot``): part of ``overhead_ms``."""
        self.scheduler = RoundScheduler(self._config)
        self.source: EstimatorSource | None = None
        self.rounds_skipped = 0
        self.rounds_refused_for_budget = 0
        self.warmup_ms = 0.0
        self.last_round: RoundReport | None = None
        self._first_round_prepared = False
        self._said_batch_norm_skip = False  # logged once per collector, as a refusal for the budget is
        n = len(layers)
        self._sq_ema = np.zeros(n)
        self._norm_ema = np.zeros(n)
        self._loss_ema = math.nan
        self._ema_weight = 0.0  # for bias correction of the EMAs
        self._previous_probe = math.nan
        self._previous_step_ms = math.nan  # of the latest interval with steps
        self._previous_peak_bytes = 0
        self._interval_steps = 0
        self._interval_skipped = 0
        self._interval_time_ms = 0.0
        self._interval_peak = 0
        self._forget_rounds()
        self._cpu_generator = torch.Generator()
        self._device_generator: torch.Generator | None = None

    @property
    def config(self) -> SignalConfig:
        """Modes, budget and schedule; may be replaced mid-run (the scheduler keeps its accounts)."""
        return self._config

    @config.setter
    def config(self, value: SignalConfig) -> None:
        self._config = value
        self.scheduler.config = value

    # ------------------------------------------------------------------------------------ cheap tier

    def observe(self, stats: StepStats) -> None:
        """Folds one step's statistics in. Non-finite values are counted, never averaged in.

        Raises:
            ValueError: ``stats.grad_sq_sum`` does not have one entry per layer.
        """
        self._check_per_layer("stats.grad_sq_sum", stats.grad_sq_sum)
        start = time.perf_counter()
        self.n_steps += 1
        self._interval_steps += 1
        self._interval_time_ms += _readable_ms(stats.modelled_time_ms)
        self.train_ms += _readable_ms(stats.step_time_ms)  # one NaN reading made every later overhead_frac NaN
        self.scheduler.add_train(stats.modelled_time_ms)
        self._interval_peak = max(self._interval_peak, stats.memory_bytes)
        finite = np.isfinite(stats.grad_sq_sum).all() and math.isfinite(stats.loss)
        if stats.skipped or not finite:
            self._interval_skipped += 1
        else:
            self._fold_steps(stats.grad_sq_sum, np.sqrt(stats.grad_sq_sum), stats.loss, n_steps=1)
        self._charge_cheap(start)

    def observe_interval(
        self,
        moments: IntervalMoments,
        *,
        n_steps: int,
        train_ms: float,
        charged_ms: float | None = None,
        peak_bytes: int = 0,
        skipped: int | None = None,
        budget_lowered: bool = False,
    ) -> None:
        """Folds an interval of steps summed on the device (:class:`DeviceMoments`) in.

        The interval's means enter the step EMAs as the finite steps they stand for, ``n_steps * n_finite /
        n_observed`` steps of that value (``n_finite`` when every step was observed; exact when the per-step values
        are constant), so ``ema_decay`` is per optimizer step whatever ``DeviceMoments`` samples. Observed
        non-finite steps count as skipped, unless ``skipped`` gives the interval's count (from the optimizer's applied
        updates, which covers the steps ``DeviceMoments`` did not record when ``every_steps > 1``).

        Args:
            moments: the interval's flushed moments.
            n_steps: optimizer steps in the interval.
            train_ms: their wall time, in ms.
            charged_ms: their charged time (``train_ms`` by default).
            peak_bytes: peak memory in the interval.
            skipped: the interval's skipped steps, in [0, n_steps]; None counts the observed non-finite ones.
            budget_lowered: the memory budget was lowered in these steps (an out-of-memory recovery), and
                ``peak_bytes`` is of the steps since: the peaks observed before it, planned under the old budget, no
                longer count (read against the lowered one, they showed it full).

        Raises:
            ValueError: ``n_steps`` is negative, ``skipped`` is outside [0, n_steps], or the moments do not have
                one entry per layer.
        """
        if not is_whole(n_steps) or n_steps < 0:  # 2.5 went into the counts, and the state it saved was refused
            raise ValueError(f"n_steps={n_steps!r} must be a whole number >= 0")
        self._check_per_layer("moments.sq_norm", moments.sq_norm)
        self._check_per_layer("moments.norm", moments.norm)
        if skipped is not None and not (is_whole(skipped) and 0 <= skipped <= n_steps):
            raise ValueError(f"skipped={skipped!r} must be a whole number in [0, n_steps={n_steps}]")
        start = time.perf_counter()
        charged = train_ms if charged_ms is None else charged_ms
        self.n_steps += n_steps
        self._interval_steps += n_steps
        self._interval_time_ms += _readable_ms(charged)
        self.train_ms += _readable_ms(train_ms)
        self.scheduler.add_train(charged, n_steps=n_steps)
        self._interval_peak = peak_bytes if budget_lowered else max(self._interval_peak, peak_bytes)
        self._interval_skipped += moments.n_observed - moments.n_finite if skipped is None else skipped
        if moments.n_finite and np.isfinite(moments.sq_norm).all() and math.isfinite(moments.loss):
            # Folded in as the interval's finite optimizer steps (n_steps less the sampled steps' non-finite share),
            # not as the sampled steps alone (one in ``every_steps``, up to 64, set from the host's cost): ema_decay
            # stays per optimizer step, whatever DeviceMoments samples on this hardware.
            finite_steps = n_steps * moments.n_finite / max(moments.n_observed, moments.n_finite)
            self._fold_steps(moments.sq_norm, moments.norm, moments.loss, n_steps=max(finite_steps, 1.0))
        self._charge_cheap(start)

    # -------------------------------------------------------------------------------- rounds tier

    def attach(self, source: EstimatorSource, seed: int = 0) -> None:
        """Gives the collector what the scheduled rounds need; ``seed`` (with ``config.seed``) seeds them.

        Raises:
            ValueError: the source's layer count differs from the collector's.
        """
        if len(source.layer_params) != len(self.layers):
            raise ValueError(f"source has {len(source.layer_params)} layers; the collector has {len(self.layers)}")
        self.source = source
        combined = (self.config.seed * 1_000_003 + seed) % (2**63)
        self._cpu_generator.manual_seed(combined)
        device = source.inputs.device
        self._device_generator = torch.Generator(device=device)
        self._device_generator.manual_seed(combined + 1)

    def maybe_estimate(self, progress: float | None = None) -> RoundReport | None:
        """Runs a round if the mode is ``all``, a source is attached and the scheduler says one is due.

        One host-device sync at the end of a round (not per step).

        Args:
            progress: fraction of the training budget used, in [0, 1] (the value the snapshot gets); None or
                0 when unknown. With it, a first round too costly for the whole run's budget is refused
                (see :class:`RoundScheduler`).

        Raises:
            ValueError: the source's loss is not a scalar.
        """
        if self.config.mode is not SignalMode.ALL or self.source is None:
            return None
        source = self.source
        if not any(p.requires_grad for params in source.layer_params for p in params):
            return None  # documented skip: every parameter frozen since the start; nothing to measure
        plan = self.scheduler.plan(progress)
        if plan is not None and not self._first_round_prepared:
            plan = self._prepare_first_round(plan, source, progress)
        if plan is None:
            refusal = self.scheduler.last_refusal
            if refusal is not None:
                self._refused(refusal)
            return None
        report = self._timed_round(plan, source)
        # The round that ran (report.plan): smaller than the one asked for when the source has fewer samples than
        # micro-batches; its costs divided by the asked-for counts came out too low.
        self.scheduler.record(report.plan, report.cost)
        if _caches_round_costs(source):
            _ROUND_COSTS[_warmup_key(plan, source, self.config)] = (report.plan, report.cost)
        self.last_round = report
        return report

    def _prepare_first_round(
        self, plan: RoundPlan, source: EstimatorSource, progress: float | None
    ) -> RoundPlan | None:
        """Learns the round costs before the first charged round (warm-up round, cached costs), then plans again."""
        self._first_round_prepared = True
        key = _warmup_key(plan, source, self.config)
        caches = _caches_round_costs(source)
        cached = _ROUND_COSTS.get(key) if caches else None
        if cached is not None and not self.scheduler.rates_known:
            self.scheduler.seed_rates(*cached)
        # Skipped only where the costs are measured on a GPU and shared: in profile cost mode a GPU run skipped it
        # too (every CUDA round shape was marked), so a later same-seed run in the process folded one round fewer and
        # drew other sub-batches and probes from the seeded generators: another episode for the same seed.
        if self.config.warmup_round and not (caches and key in _WARMED_UP):
            # One-time costs (loading kernels, allocator growth for new shapes) would make the first charged
            # cost, and so every later prediction, too high: pay them in a warm-up round that predicts no round.
            # Measured on a GPU they are paid once per process and shape: a later run of the same model (the next
            # seed in ``compare``) skips the warm-up and predicts from the costs this process has measured.
            warmup = self._timed_round(plan, source)
            warmup_ms = warmup.measured_ms
            if caches:
                # Measured on a GPU, the first pass holds the one-time costs, which may dwarf a round: 16.5 s against
                # 1.15 s a round on EfficientNet-B0 (H100, 2026-12-06, scripts/round_cost_gpu.py). Predicted from it,
                # every round of a run whose budget held several was refused, and no charged round came to correct
                # it. A second pass, uncharged too and paid once per process and shape, measures a round as the run
                # pays it. (Elsewhere the costs are modelled, or a CPU's first pass is no outlier: one pass.)
                warmup = self._timed_round(plan, source)
                warmup_ms += warmup.measured_ms
            self.warmup_ms += warmup_ms
            if source.modelled_pass_ms is None:
                # The run pays it: charged to the rounds' account, the later rounds wait until training repays it
                # (the overhead budget holds the whole cost). A 20-epoch ResNet-18 run with a probe batch on an
                # H100 (2026-12-06) spent 2.4% of its training time on overhead with it uncharged, against 2%.
                # Modelled costs leave it out: a CPU's time for it models no GPU's.
                self.scheduler.charge(warmup_ms)
            if not self.scheduler.rates_known:
                # On a CPU it predicts high (it includes what is left of the one-time costs): it can only refuse a
                # round that would have fitted, never admit one that does not. The first charged round replaces it.
                self.scheduler.seed_rates(warmup.plan, warmup.cost)
            if caches:
                _WARMED_UP.add(key)
                _ROUND_COSTS.setdefault(key, (warmup.plan, warmup.cost))  # a charged round's measurement is better
        replanned = self.scheduler.plan(progress)
        if replanned is None:
            # No charged round can follow the warm-up: its estimates (folded) would pose as current for the
            # whole run. The signals stay the cheap tier's, as before any round.
            self._forget_rounds()
        return replanned

    def _refused(self, refusal: BudgetRefusal) -> None:
        """Counts a round refused for the whole run's budget; says so once per collector."""
        if self.rounds_refused_for_budget == 0:
            _log.info(
                "signal rounds are too costly for this run's budget: a round is predicted at %.1f ms, the "
                "budget allows %.1f ms over the whole run (projected at %.1f%% of it); the curvature and "
                "gradient-noise signals stay the cheap estimates",
                refusal.predicted_ms,
                refusal.allowance_ms,
                100 * refusal.progress,
            )
        self.rounds_refused_for_budget += 1

    def _timed_round(self, plan: RoundPlan, source: EstimatorSource) -> RoundReport:
        start = time.perf_counter()
        # cuDNN's autotuner (``cudnn.benchmark``) would time every algorithm for each new shape the round
        # meets (its sub-batches, double backward): a one-time 10+ s on ResNet-18 in the 2026-11-22 GPU
        # pilot, charged to the controller. The round runs on cuDNN's heuristics instead.
        with torch.backends.cudnn.flags(
            enabled=torch.backends.cudnn.enabled,
            benchmark=False,
            deterministic=torch.backends.cudnn.deterministic,
            allow_tf32=torch.backends.cudnn.allow_tf32,
        ):
            report = self._run_round(plan, source)
        elapsed = (time.perf_counter() - start) * 1e3
        self.overhead_ms += elapsed
        self.estimator_ms += elapsed
        self.rounds_skipped += int(not report.folded)
        return RoundReport(report.plan, report.cost, elapsed, report.folded, report.reason)

    # ------------------------------------------------------------------------------------- snapshot

    def snapshot(
        self,
        *,
        grad_mean_sq_norm: np.ndarray,
        probe_loss: float,
        batch_size: int,
        lr_scale: float,
        precisions: list[Precision],
        progress: float = 0.0,
    ) -> Signals:
        """Closes the interval and returns its ``Signals``; every value is finite.

        Args:
            grad_mean_sq_norm: per layer ``|E[g]|^2`` from the optimizer's running mean (NaN = unknown: the
                cheap tier then splits ``E[|g|^2]`` evenly, see the module doc); used by the cheap tier only.
            probe_loss: loss on the fixed probe batch now.
            batch_size: the batch size the next interval starts with.
            lr_scale: the current global LR multiplier.
            precisions: current per-layer precisions.
            progress: fraction of the training budget used, in [0, 1].

        Raises:
            ValueError: ``grad_mean_sq_norm`` or ``precisions`` does not have one entry per layer.
        """
        self._check_per_layer("grad_mean_sq_norm", grad_mean_sq_norm)
        self._check_per_layer("precisions", precisions)
        start = time.perf_counter()
        weight = max(self._ema_weight, _TINY)
        sq = self._sq_ema / weight  # bias-corrected E[|g|^2] per layer
        batch = max(int(batch_size), 1)
        hessian_trace: np.ndarray | None = None
        unknown_mean = np.zeros(len(self.layers), dtype=bool)  # layers with gradients but no running mean
        if self._round_weight.any():
            round_weight = np.maximum(self._round_weight, _TINY)
            hessian_trace = self._trace_ema / round_weight
            grad_sq = self._grad_sq_ema / round_weight  # unbiased |G_l|^2, may be < 0 under heavy noise
            cov = np.maximum(self._cov_ema / round_weight, 0.0)  # tr(Sigma_l), per sample
            curvature = np.abs(hessian_trace) / self._per_element
            variance = cov / (batch * self._per_element)
            signal = np.maximum(grad_sq, 0.0)
            # 0/0 (exactly zero gradients, or an unused layer): neutral, as the cheap tier reads it, not 0 (log_snr at
            # its floor, a jump from the cheap tier's 0 when the first round lands).
            snr = np.where((signal > 0) | (cov > 0), signal / np.maximum(cov / batch, _TINY), 1.0)
            noise_scale, resolved = _resolved_noise_scale(float(cov.sum()), float(grad_sq.sum()), self._round_samples)
            source = "hutchinson"
        else:
            known = np.isfinite(grad_mean_sq_norm)
            # E|g|^2 exactly 0 (no step folded yet, every one overflowed; or zero gradients) has no split: SNR 0/0.
            measured = sq > 0
            # Unknown: an even split, SNR 1 (E|g|^2 itself read as no noise at all, SNR 1e30 and a noise scale of 0,
            # which the observation took for a batch far above the noise scale).
            mean_sq = np.where(known, grad_mean_sq_norm, 0.5 * sq)
            mean_sq = np.minimum(mean_sq, sq)
            variance_sum = np.maximum(sq - mean_sq, 0.0)
            curvature = sq / self._per_element
            variance = variance_sum / self._per_element
            snr = np.where(measured, mean_sq / np.maximum(variance_sum, _TINY), 1.0)  # 0/0: neutral, not 0
            if measured.any():
                # Listed: the layers whose guessed split enters the noise scale (a zero E|g|^2 adds 0 to both sums).
                unknown_mean = ~known & measured
                # The running mean lags while the gradient turns (early in training above all), so this estimate
                # runs high, and a high noise scale is what grows the batch. Trusted one way only: up to the batch
                # size it may say the batch is above the noise scale, never that it is below (a round must).
                noise_scale = min(batch * variance_sum.sum() / max(mean_sq.sum(), _TINY), float(batch))
            else:
                # Nothing measured: B_simple is 0/0. The neutral guess, named unknown for every layer (the
                # Controller's adascale rule then takes it as unknown); not 0, which reads as a batch far above
                # the noise scale, with SNR 0 (log_snr at its floor).
                unknown_mean = np.ones(len(self.layers), dtype=bool)
                noise_scale = float(batch)
            resolved = False  # one-sided: never more than the batch
            source = "fisher"
        curvature = _finite_array(curvature)
        peak = curvature * self._sparsity.top10_ratio if self._sparsity is not None else curvature
        lr_factors = curvature_lr_factors(
            peak,
            exponent=self.config.lr_factor_exponent,
            min_factor=self.config.lr_factor_min,
            max_factor=self.config.lr_factor_max,
        )

        loss = self._loss_ema if math.isfinite(self._loss_ema) else math.nan
        probe_ok = math.isfinite(probe_loss)
        trend = 0.0
        # Relative to the previous loss's size: a loss that may be negative (a Gaussian NLL, an ELBO) read 0, a
        # plateau, at every decision after a negative one, and its rises went unseen (the heuristic's LR rules)
        if probe_ok and math.isfinite(self._previous_probe) and self._previous_probe != 0:
            trend = (probe_loss - self._previous_probe) / abs(self._previous_probe)
        if probe_ok:
            self._previous_probe = probe_loss
        step_ms, step_trend = self._previous_step_ms, 0.0
        if self._interval_steps:
            step_ms = self._interval_time_ms / self._interval_steps
            if math.isfinite(self._previous_step_ms) and self._previous_step_ms > 0:
                step_trend = (step_ms - self._previous_step_ms) / self._previous_step_ms
            self._previous_step_ms = step_ms
            self._previous_peak_bytes = self._interval_peak
        # else no step since the last snapshot: it measured neither time nor memory (its time over one step read as
        # a 0-ms step, -100%, and its peak as 0 bytes, all headroom); the latest measurements stand.
        overflow = self._interval_skipped / max(self._interval_steps, 1)
        signals = Signals(
            loss=_finite(loss, 1e6),
            loss_trend=_finite(trend, 1.0),
            probe_loss=_finite(probe_loss, 1e6),
            curvature=curvature,
            grad_variance=_finite_array(variance),
            grad_norm=_finite_array(self._norm_ema / weight),
            snr=_finite_array(snr),
            noise_scale=_finite(noise_scale, 0.0),
            memory_bytes=int(self._previous_peak_bytes),
            memory_budget_bytes=int(self.memory_budget_bytes),
            step_time_ms=_finite(step_ms, 0.0),
            step_time_trend=_finite(step_trend, 0.0),
            overflow_rate=overflow,
            batch_size=int(batch_size),
            lr_scale=float(lr_scale),
            precisions=np.array([int(p) for p in precisions], dtype=np.int64),
            n_params=self.n_params.copy(),
            controllable=self.controllable.copy(),
            progress=float(np.clip(_finite(progress, 0.0), 0.0, 1.0)),  # np.clip passes NaN through
            hessian_trace=None if hessian_trace is None else _finite_array(hessian_trace, neginf=-1e30),
            sparsity=self._sparsity,
            lr_factors=lr_factors,
            extra={
                "interval_steps": self._interval_steps,
                "probe_loss_finite": probe_ok,
                "curvature_source": source,
                "noise_scale_resolved": resolved,  # False: noise_scale is a bound (rounds' N, or the batch)
                "fisher_source": self._fisher_source,
                "rounds": self.scheduler.rounds,
                "rounds_skipped": self.rounds_skipped,
                "rounds_refused_for_budget": self.rounds_refused_for_budget,
                "round_overhead_frac": self.scheduler.round_overhead_frac,
                "estimator_ms": self.estimator_ms,
                "warmup_ms": self.warmup_ms,
                "unused_layers": [self.layers[i].name for i in np.flatnonzero(self._unused)]
                if self._unused.any()
                else [],
                # Their variance and SNR (and the noise scale's share) are the neutral even split, not measured.
                "grad_mean_unknown_layers": [self.layers[i].name for i in np.flatnonzero(unknown_mean)],
            },
        )
        self._interval_reset()
        self._charge_cheap(start)
        # Over training time, as compare's overhead_frac and its parts (over training plus overhead once: two
        # numbers both called "share of training time" that did not agree)
        signals.overhead_frac = self.overhead_ms / max(self.train_ms, _TINY)
        return signals

    def discard_interval(self) -> None:
        """Closes the interval without a snapshot: its step, skip, time and peak counts are read by no decision.

        For steps that say nothing of the settings decided next, such as a speed trial's (its fp16 candidate's
        skipped steps while the loss scale backs off would read as overflows of the format the trial chose). The
        running estimates keep the steps folded in (they are real training), and so do the run's totals.
        """
        self._interval_reset()

    @property
    def loss_ema(self) -> float:
        """Smoothed training loss over finite steps (NaN before the first one)."""
        return self._loss_ema

    def add_overhead(self, ms: float) -> None:
        """Charges work done for the signals outside this object (e.g. the probe loss) to the overhead."""
        self.overhead_ms += ms

    # ---------------------------------------------------------------------------------- rollbacks

    def estimates(self) -> dict[str, Any]:
        """The running estimates (the steps' and the rounds' EMAs, the sparsity), copied: what a rollback brings back.

        The interval that broke a model folds huge but finite losses and gradients in before its loss turns
        non-finite; kept after the rollback, they described the diverged run for tens of intervals (a learned policy
        fell back to the heuristic throughout). Counts, times and the last probe loss are not estimates: they stay.
        The rounds' Fisher diagonal is left as it is (model-sized, and used only for the sparsity, which comes back).
        """
        arrays = ("_sq_ema", "_norm_ema", "_trace_ema", "_grad_sq_ema", "_cov_ema", "_round_weight", "_unused")
        saved: dict[str, Any] = {name: getattr(self, name).copy() for name in arrays}
        for name in (
            "_loss_ema",
            "_ema_weight",
            "_round_samples",
            "_sparsity",
        ):  # numbers, and an object replaced whole
            saved[name] = getattr(self, name)
        return saved

    def restore_estimates(self, saved: dict[str, Any]) -> None:
        """Puts back what :meth:`estimates` returned (a copy of it: the same may be restored again)."""
        for name, value in saved.items():
            setattr(self, name, value.copy() if isinstance(value, np.ndarray) else value)

    # ---------------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The running estimates, counters and round accounts, for a checkpoint (``Controller.state_dict`` keeps it).

        Per-layer values as lists of floats, so ``torch.load(..., weights_only=True)`` reads them back. Beside the
        cheap tier's EMAs: the scheduler's accounts and cost rates (``"scheduler"``) and the rounds' state
        (``"rounds"``: their EMAs, sparsity and Fisher diagonal, counts and times, and the states of the generators
        that draw their sub-batches and probes; None without a source and rounds), so a resumed collector plans and
        draws the rounds the uninterrupted one would have. The Fisher diagonal's tensors (model-sized, only with a
        source whose optimizer keeps no second moment) are returned by reference, as ``torch.optim`` returns its
        state: no round changes them in place.
        """
        return {
            "n_steps": self.n_steps,
            "overhead_ms": self.overhead_ms,
            "train_ms": self.train_ms,
            "cheap_ms": self.cheap_ms,
            "sq_ema": self._sq_ema.tolist(),
            "norm_ema": self._norm_ema.tolist(),
            "loss_ema": self._loss_ema,
            "ema_weight": self._ema_weight,
            "previous_probe": self._previous_probe,
            "previous_step_ms": self._previous_step_ms,
            "previous_peak_bytes": self._previous_peak_bytes,
            "interval_steps": self._interval_steps,
            "interval_skipped": self._interval_skipped,
            "interval_time_ms": self._interval_time_ms,
            "interval_peak": self._interval_peak,
            "scheduler": self.scheduler.state_dict(),
            # None where no round can run or has run (no source attached): the generators' states are 5 kB
            "rounds": self._rounds_state() if self.source is not None or self.scheduler.rounds else None,
        }

    def _rounds_state(self) -> dict[str, Any]:
        sparsity = self._sparsity
        device = self._device_generator
        return {
            "trace_ema": self._trace_ema.tolist(),
            "grad_sq_ema": self._grad_sq_ema.tolist(),
            "cov_ema": self._cov_ema.tolist(),
            "round_weight": self._round_weight.tolist(),
            "round_samples": self._round_samples,
            "unused": self._unused.tolist(),
            "sparsity": None if sparsity is None else {name: getattr(sparsity, name).tolist() for name in _SPARSITY},
            "fisher_ema": None if self._fisher_ema is None else list(self._fisher_ema),
            "fisher_source": self._fisher_source,
            "estimator_ms": self.estimator_ms,
            "warmup_ms": self.warmup_ms,
            "rounds_skipped": self.rounds_skipped,
            "rounds_refused_for_budget": self.rounds_refused_for_budget,
            "first_round_prepared": self._first_round_prepared,
            "said_batch_norm_skip": self._said_batch_norm_skip,
            "cpu_generator": self._cpu_generator.get_state(),
            "device_generator": None if device is None else device.get_state(),
            "device_type": None if device is None else device.device.type,
        }

    @property
    def has_round_estimates(self) -> bool:
        """Whether a round's estimates are folded in (the snapshot's curvature and noise come from the rounds)."""
        return bool(self._round_weight.any())

    def forget_rounds(self) -> None:
        """Drops the rounds' estimates: the signals are the cheap tier's again, as before any round.

        For a run whose rounds stop for good (a checkpoint resumed without a probe batch): kept, the last round's
        estimates would pose as current for the rest of the run. The counts and times stay.
        """
        self._forget_rounds()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resumes from ``state_dict()``'s output, for a collector over the same layers.

        Every field is checked before any is set: a refused state leaves the collector as it was. A state saved before
        the rounds' were (2026-12-06; no ``"scheduler"`` or ``"rounds"``) resumes the rounds afresh, the scheduler's
        accounts taken from the steps and training time. The generators' states are loaded where this collector draws
        on a device of the same type (:meth:`attach` first); elsewhere they keep :meth:`attach`'s seeding.

        Raises:
            ValueError: a missing field, or one of the wrong type, range or length (named).
        """
        saved = SavedState(state, "the signal collector's state", _COLLECTOR_STATE_KEYS)
        rounds = self._checked_rounds(state["rounds"]) if state.get("rounds") is not None else None
        scheduler = RoundScheduler(self._config)
        if state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        n = len(self.layers)
        counts = {key: saved.count(key) for key in ("n_steps", "previous_peak_bytes", "interval_peak")}
        interval_steps = saved.count("interval_steps")
        interval_skipped = saved.count("interval_skipped")
        if interval_skipped > interval_steps:
            raise ValueError(
                f"the signal collector's state has interval_skipped {interval_skipped} > interval_steps "
                f"{interval_steps}"
            )
        times = {key: saved.real(key, least=0.0) for key in ("overhead_ms", "train_ms", "cheap_ms", "interval_time_ms")}
        emas = {key: saved.reals(key, n) for key in ("sq_ema", "norm_ema")}
        for key, values in emas.items():  # averages of squares and norms: a negative one read as negative curvature
            if (values < 0).any():
                raise ValueError(f"the signal collector's state has {key} {values.tolist()}: every value must be >= 0")
        ema_weight = saved.real("ema_weight", least=0.0)
        if ema_weight > 1.0:  # the weight of the averages' terms so far, 1 - decay**n
            raise ValueError(f"the signal collector's state has ema_weight {ema_weight}: it must be in [0, 1]")
        loss_ema, previous_probe = saved.real("loss_ema", nan=True), saved.real("previous_probe", nan=True)
        previous_step_ms = saved.real("previous_step_ms", nan=True, least=0.0)
        self.n_steps, self._previous_peak_bytes = counts["n_steps"], counts["previous_peak_bytes"]
        self._interval_peak = counts["interval_peak"]
        self._interval_steps, self._interval_skipped = interval_steps, interval_skipped
        self.overhead_ms, self.train_ms, self.cheap_ms = times["overhead_ms"], times["train_ms"], times["cheap_ms"]
        self._interval_time_ms = times["interval_time_ms"]
        self._sq_ema, self._norm_ema, self._ema_weight = emas["sq_ema"], emas["norm_ema"], ema_weight
        self._loss_ema, self._previous_probe, self._previous_step_ms = loss_ema, previous_probe, previous_step_ms
        if state.get("scheduler") is None:  # saved before the scheduler's accounts were: its steps and training time
            scheduler.add_train(self.train_ms, n_steps=self.n_steps)
        self.scheduler = scheduler
        self._forget_rounds()
        if rounds is not None:
            self._load_rounds(rounds)
        else:  # as a new collector's: no round has run
            self.estimator_ms = self.warmup_ms = 0.0
            self.rounds_skipped = self.rounds_refused_for_budget = 0
            self._first_round_prepared = self._said_batch_norm_skip = False

    def _checked_rounds(self, state: object) -> dict[str, Any]:
        """The ``"rounds"`` entry of a saved state, each field checked; nothing is set."""
        saved = SavedState(state, "the signal collector's rounds state", _ROUNDS_STATE_KEYS)
        n = len(self.layers)
        checked: dict[str, Any] = {key: saved.reals(key, n) for key in ("trace_ema", "grad_sq_ema", "cov_ema")}
        weight = saved.reals("round_weight", n)
        if ((weight < 0) | (weight > 1)).any():  # per layer, 1 - decay**rounds folded in
            raise ValueError(f"the signal collector's rounds state has round_weight {weight.tolist()}: each in [0, 1]")
        checked["round_weight"] = weight
        unused = saved["unused"]
        if not (isinstance(unused, (list, tuple)) and len(unused) == n and all(isinstance(u, bool) for u in unused)):
            raise ValueError(f"the signal collector's rounds state has unused {unused!r}, not a list of {n} bools")
        checked["unused"] = np.array(unused, dtype=bool)
        for key in ("round_samples", "rounds_skipped", "rounds_refused_for_budget"):
            checked[key] = saved.count(key)
        if weight.any() and checked["round_samples"] < 1:  # the noise scale's bound divides by it
            raise ValueError(
                "the signal collector's rounds state has round_samples 0 with rounds folded in (round_weight "
                f"{weight.tolist()}): a folded round drew >= 1 sample"
            )
        for key in ("estimator_ms", "warmup_ms"):
            checked[key] = saved.real(key, least=0.0)
        for key in ("first_round_prepared", "said_batch_norm_skip"):
            if not isinstance(saved[key], bool):
                raise ValueError(f"the signal collector's rounds state has {key} {saved[key]!r}, not a bool")
            checked[key] = saved[key]
        source = saved["fisher_source"]
        if source not in ("", "microbatch_rounds", "optimizer_second_moment"):
            raise ValueError(
                f"the signal collector's rounds state has fisher_source {source!r}: one of '', 'microbatch_rounds', "
                "'optimizer_second_moment'"
            )
        checked["fisher_source"] = source
        checked["sparsity"] = None
        if saved.optional("sparsity"):
            parts = SavedState(saved["sparsity"], "the signal collector's rounds sparsity", _SPARSITY)
            sparsity = CurvatureSparsity(*(parts.reals(name, n) for name in _SPARSITY))
            for name in _SPARSITY:
                values = getattr(sparsity, name)
                low, high = (1.0, math.inf) if name == "top10_ratio" else (0.0, 1.0)
                if ((values < low) | (values > high)).any():
                    raise ValueError(
                        f"the signal collector's rounds sparsity has {name} {values.tolist()}: each in [{low}, {high}]"
                    )
            checked["sparsity"] = sparsity
        fisher = saved["fisher_ema"]
        if fisher is not None and not (
            isinstance(fisher, (list, tuple))
            and len(fisher) == n
            and all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in fisher)
        ):
            raise ValueError(
                f"the signal collector's rounds state has fisher_ema of {type(fisher).__name__}: None or a list of {n} "
                "floating-point tensors, one a layer"
            )
        if fisher is not None and not all(t.dim() == 1 and bool(torch.isfinite(t).all()) for t in fisher):
            raise ValueError(
                "the signal collector's rounds state has fisher_ema with a tensor that is not 1-D or not finite: each "
                "layer's is its flat Fisher diagonal"
            )
        # On the rounds' device in float32, as they fold them (a CPU copy, from torch.load(map_location="cpu"), met
        # the GPU's round and raised; a float16 one stayed float16)
        where = self.source.inputs.device if self.source is not None else None
        checked["fisher_ema"] = None if fisher is None else [t.to(where, torch.float32) for t in fisher]
        checked["cpu_generator"] = _checked_generator_state(saved["cpu_generator"], torch.Generator(), "cpu_generator")
        checked["device_generator"] = None
        device = self._device_generator
        if saved.optional("device_generator") and device is not None and saved["device_type"] == device.device.type:
            scratch = torch.Generator(device=device.device)
            checked["device_generator"] = _checked_generator_state(
                saved["device_generator"], scratch, "device_generator"
            )
        return checked

    def _load_rounds(self, rounds: dict[str, Any]) -> None:
        """Sets what :meth:`_checked_rounds` returned."""
        for key, value in rounds.items():
            if key == "cpu_generator":
                self._cpu_generator.set_state(value)
            elif key == "device_generator":
                if value is not None and self._device_generator is not None:
                    self._device_generator.set_state(value)
            elif key in _PUBLIC_ROUND_COUNTS:
                setattr(self, key, value)
            else:
                setattr(self, f"_{key}", value)

    # -------------------------------------------------------------------------------------- private

    def _check_per_layer(self, name: str, values: np.ndarray | Sequence[object]) -> None:
        """Refuses per-layer input of another length than the layers' (a single value would broadcast to all)."""
        shape = values.shape if isinstance(values, np.ndarray) else (len(values),)
        if shape != (len(self.layers),):
            raise ValueError(f"{name} has shape {shape}; expected ({len(self.layers)},), one entry per layer")

    def _charge_cheap(self, start: float) -> None:
        """Charges the cheap tier's work since ``perf_counter()`` read ``start`` to its own and the whole overhead."""
        elapsed_ms = (time.perf_counter() - start) * 1e3
        self.overhead_ms += elapsed_ms
        self.cheap_ms += elapsed_ms

    def _forget_rounds(self) -> None:
        """Round estimates as before any round: EMAs across rounds with a bias-correction weight per layer."""
        n = len(self.layers)
        self._trace_ema = np.zeros(n)
        self._grad_sq_ema = np.zeros(n)
        self._cov_ema = np.zeros(n)
        self._round_weight = np.zeros(n)
        self._round_samples = 0  # samples behind the last folded round's gradient moments
        self._unused = np.zeros(n, dtype=bool)
        self._fisher_ema: list[torch.Tensor] | None = None
        self._fisher_source = ""
        self._sparsity: CurvatureSparsity | None = None

    def _fold_steps(self, sq: np.ndarray, norm: np.ndarray, loss: float, n_steps: float) -> None:
        keep = self.ema_decay**n_steps
        self._sq_ema = keep * self._sq_ema + (1 - keep) * sq
        self._norm_ema = keep * self._norm_ema + (1 - keep) * norm
        self._ema_weight = keep * self._ema_weight + (1 - keep)
        self._loss_ema = loss if math.isnan(self._loss_ema) else keep * self._loss_ema + (1 - keep) * loss

    def _run_round(self, plan: RoundPlan, source: EstimatorSource) -> RoundReport:
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "an estimator round needs gradients, which torch.inference_mode() forbids: run it outside that block"
            )
        # On a fork of the RNGs: a model's own randomness in the round's forwards (stochastic depth, RReLU, F.dropout)
        # drew from the run's stream, so later dropout masks hung on whether a round ran.
        with (
            forked_rngs(source.inputs.device),  # Python's and NumPy's streams too
            torch.enable_grad(),  # a decision made under torch.no_grad() (an evaluation block) builds no graph
        ):
            return self._run_round_with_grad(plan, source)

    def _run_round_with_grad(self, plan: RoundPlan, source: EstimatorSource) -> RoundReport:
        config = self.config
        device = source.inputs.device
        watch = _Stopwatch(device)
        watch.lap()
        n_available = len(source.inputs)
        micro = min(config.micro_batch_size, n_available // plan.n_microbatches)
        # The least a micro-batch may hold: two, unless one is what was asked for (a one-sample micro-batch fails in a
        # batch norm in training mode, which computes batch statistics; 24 probe samples and 16 micro-batches did).
        least = min(config.micro_batch_size, 2)
        if micro < least and n_available >= 2 * least:
            # Too few samples for the plan at that size: fewer micro-batches of ``least`` (fewer than planned, since
            # ``n_available < least * n_microbatches`` here; a micro_batch_size of 1 made it n_available // 2 of them).
            plan = RoundPlan(min(plan.n_microbatches, n_available // least), plan.n_probes, plan.predicted_ms)
            micro = least
        elif micro < 1:  # fewer samples than micro-batches, and under four: one a micro-batch, as many as there are
            plan = RoundPlan(min(plan.n_microbatches, n_available), plan.n_probes, plan.predicted_ms)
            micro = 1
        hutchinson_batch = min(config.hutchinson_batch_size, n_available)
        if (micro < 2 or hutchinson_batch < 2) and _normalises_over_the_batch(source.model, source.keep_modes):
            # One sample a micro-batch (a probe batch of 2-3 samples, or micro_batch_size=1), or a Hutchinson pass of
            # one (hutchinson_batch_size=1), through a batch norm that normalises with the batch's statistics:
            # BatchNorm1d refuses it ("Expected more than 1 value per channel"), which aborted the decision loop's
            # snapshot; elsewhere its statistics are the sample's own, not the function being trained. Per-sample
            # passes are valid without one, and run there as planned.
            return self._skipped_for_batch_norm(plan, n_available, "micro-batches" if micro < 2 else "Hutchinson pass")
        order = torch.randperm(n_available, generator=self._cpu_generator)
        noise_index = order[: plan.n_microbatches * micro].to(device)
        hutchinson_index = order[:hutchinson_batch].to(device)
        trainable = [any(p.requires_grad for p in params) for params in source.layer_params]
        # Adam's second moment is the Fisher diagonal for free; without it the rounds estimate one.
        optimizer_diagonal = source.second_moment() if source.second_moment is not None else None
        from_rounds = optimizer_diagonal is None or any(
            d is None for d, ok in zip(optimizer_diagonal, trainable, strict=True) if ok
        )

        def closure(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return source.loss_fn(float_outputs(source.model(x)), y)  # type: ignore[arg-type]

        watch.lap()
        with frozen_batch_stats(source.model, keep_modes=source.keep_modes):
            moments = gradient_moments(
                closure,
                source.inputs[noise_index],
                source.targets[noise_index],
                source.layer_params,
                plan.n_microbatches,
                fisher_diagonal=from_rounds,
            )
            watch.lap()
            # Hessian-vector products need a second derivative, which the fused attention kernels (flash,
            # memory-efficient; PyTorch's CPU flash attention) lack: attention runs in the math kernel here.
            with sdpa_kernel(SDPBackend.MATH):
                loss = closure(source.inputs[hutchinson_index], source.targets[hutchinson_index])
                estimate = hutchinson(loss, source.layer_params, plan.n_probes, generator=self._device_generator)
            watch.lap()
        n = len(self.layers)
        # Host-device sync: once per round, for every per-layer number at once.
        host = (
            torch.cat(
                [
                    estimate.trace,
                    moments.grad_sq_norm,
                    moments.trace_cov,
                    estimate.loss.detach().double().reshape(1),
                    moments.loss.detach().double().reshape(1),
                ]
            )
            .cpu()
            .numpy()
        )
        trace, grad_sq, cov = host[:n], host[n : 2 * n], host[2 * n : 3 * n]
        finite = bool(np.isfinite(host).all())
        reason = ""
        if finite:
            measured = np.array(trainable)
            self._fold_round(trace, grad_sq, cov, measured)
            self._round_samples = plan.n_microbatches * micro
            self._unused = measured & ~(estimate.used | moments.used)
            fisher_ema = None
            if from_rounds:
                assert moments.fisher_diagonal is not None
                self._fisher_source = "microbatch_rounds"
                fisher_ema = self._folded_fisher(moments.fisher_diagonal)
                diagonal = [e if ok and e.numel() else None for e, ok in zip(fisher_ema, trainable, strict=True)]
            else:
                assert optimizer_diagonal is not None
                self._fisher_source = "optimizer_second_moment"
                diagonal = [d if ok else None for d, ok in zip(optimizer_diagonal, trainable, strict=True)]
            try:
                self._sparsity = _sparsity_with_gaps(diagonal, config.small_threshold, self._sparsity)
            except ValueError as err:  # a non-finite optimizer moment or round diagonal: keep the previous pattern
                reason = f"sparsity not updated: {err}"
            else:
                # Kept only when finite: a non-finite entry (its float32 product can overflow where the float64 sums
                # above did not) stayed in the running mean for good, and no later round updated the sparsity.
                self._fisher_ema = fisher_ema if fisher_ema is not None else self._fisher_ema
        else:
            reason = "non-finite loss or estimate in the round; skipped"
        watch.lap()
        prepare_ms, noise_ms, hutchinson_ms, other_ms = watch.finish()
        if source.modelled_pass_ms is not None:
            noise_ms = plan.n_microbatches * source.modelled_pass_ms(micro)
            graph_passes = _PROFILE_GRAPH_GRADIENT_PASSES + _PROFILE_PROBE_PASSES * plan.n_probes
            cost = RoundCost(noise_ms, graph_passes * source.modelled_pass_ms(hutchinson_batch), 0.0)
        else:
            cost = RoundCost(noise_ms, hutchinson_ms, prepare_ms + other_ms)
        return RoundReport(plan, cost, 0.0, finite, reason)

    def _skipped_for_batch_norm(self, plan: RoundPlan, n_available: int, part: str) -> RoundReport:
        """A round skipped before any pass (it costs nothing): its ``part`` would hold one sample.

        ``part``: ``"micro-batches"`` or ``"Hutchinson pass"``.
        """
        if part == "micro-batches":
            what = f"micro-batches of one sample (from {n_available} probe samples, micro_batch_size="
            what += f"{self.config.micro_batch_size})"
        else:
            what = f"a Hutchinson pass of one sample (hutchinson_batch_size={self.config.hutchinson_batch_size})"
        reason = f"{what} through a batch norm in training mode, which needs two; skipped"
        if not self._said_batch_norm_skip:
            self._said_batch_norm_skip = True
            _log.info(
                "signal rounds skipped: %s; the curvature and gradient-noise signals stay the cheap estimates (a "
                "probe batch of at least 4 samples gives micro-batches of two, a hutchinson_batch_size of 2 or more a "
                "pass of two)",
                reason.removesuffix("; skipped"),
            )
        return RoundReport(plan, RoundCost(0.0, 0.0, 0.0), 0.0, False, reason)

    def _fold_round(self, trace: np.ndarray, grad_sq: np.ndarray, cov: np.ndarray, measured: np.ndarray) -> None:
        d = self.config.round_ema_decay
        keep = np.where(measured, d, 1.0)
        add = np.where(measured, 1.0 - d, 0.0)
        self._trace_ema = keep * self._trace_ema + add * trace
        self._grad_sq_ema = keep * self._grad_sq_ema + add * grad_sq
        self._cov_ema = keep * self._cov_ema + add * cov
        self._round_weight = keep * self._round_weight + add

    def _folded_fisher(self, round_fisher: list[torch.Tensor]) -> list[torch.Tensor]:
        """The running mean over rounds of the rounds' per-sample Fisher diagonal with this round's folded in.

        New tensors (the caller keeps them only if finite). No bias correction: the sparsity is invariant to a
        layer's scale. Per layer: a layer frozen this round (no entries) keeps its running mean for when it is
        unfrozen, and only a layer whose shape changed starts anew (before, one frozen layer restarted every
        layer's).
        """
        d = self.config.round_ema_decay
        old = self._fisher_ema if self._fisher_ema is not None and len(self._fisher_ema) == len(round_fisher) else None
        folded = []
        for index, new in enumerate(round_fisher):
            previous = old[index] if old is not None else None
            if not new.numel():
                folded.append(previous if previous is not None else new)
            elif previous is None or previous.shape != new.shape:
                folded.append(new * (1.0 - d))  # from zero, as every layer starts
            else:
                folded.append(previous.mul(d).add_(new, alpha=1.0 - d))  # the ops (and roundings) of the in-place fold
        return folded

    def _interval_reset(self) -> None:
        self._interval_steps = 0
        self._interval_skipped = 0
        self._interval_time_ms = 0.0
        self._interval_peak = 0


class _Stopwatch:
    """Laps of device work: CUDA events on a GPU (one sync in ``finish``), ``perf_counter`` on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.marks: list[object] = []

    def lap(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))  # the run's device, not the current one
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def finish(self) -> list[float]:
        """Milliseconds between consecutive marks."""
        if self.cuda:
            events = [e for e in self.marks if isinstance(e, torch.cuda.Event)]
            events[-1].synchronize()  # host-device sync: once per round
            return [float(a.elapsed_time(b)) for a, b in itertools.pairwise(events)]
        times = [float(t) for t in self.marks if isinstance(t, float)]
        return [(b - a) * 1e3 for a, b in itertools.pairwise(times)]


def _checked_generator_state(state: object, generator: torch.Generator, key: str) -> torch.Tensor:
    """``state`` if ``generator`` (a scratch one of the kind it is for) takes it, else a ValueError naming ``key``."""
    if not (isinstance(state, torch.Tensor) and state.dtype == torch.uint8 and state.dim() == 1):
        raise ValueError(
            f"the signal collector's rounds state has {key} {_briefly(state)}: a generator's state (a 1-D uint8 "
            "tensor, torch.Generator.get_state())"
        )
    try:
        generator.set_state(state)
    except RuntimeError as err:
        raise ValueError(
            f"the signal collector's rounds state has a {key} state this generator refuses: {err}"
        ) from None
    return state


def _briefly(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _resolved_noise_scale(trace_cov: float, grad_sq: float, samples: int) -> tuple[float, bool]:
    """``(B_simple, True)`` when the rounds resolved the mean gradient, else ``(samples, False)``, a lower bound.

    ``samples`` >= 1: every folded round sets it (``_round_samples``) before a snapshot reads the rounds.

    ``B_simple = tr(Sigma) / |G|^2``.

    The rounds' unbiased ``|G|^2`` is ``|mean g|^2 - tr(Sigma) / N`` over their ``N`` samples. When it does not
    exceed ``tr(Sigma) / N`` (the mean gradient is not above its own noise; early on, from two micro-batches,
    it can even be negative), the ratio is noise and can run to infinity, yet all the round shows is
    ``B_simple > N``: that lower bound is reported, so an unresolved round never reads as "grow the batch".

    Example:
        >>> _resolved_noise_scale(trace_cov=640.0, grad_sq=1.0, samples=64)  # |G|^2 = 1 is under 640 / 64 = 10
        (64.0, False)
        >>> _resolved_noise_scale(trace_cov=640.0, grad_sq=20.0, samples=64)  # 20 is over 10: resolved
        (32.0, True)
    """
    if grad_sq > trace_cov / samples:
        return min(trace_cov / grad_sq, _NOISE_SCALE_MAX), True
    return float(samples), False


_WARMED_UP: set[tuple[object, ...]] = set()
"""Round shapes whose one-time GPU costs this process has paid (see ``SignalCollector.maybe_estimate``).

Measured cost mode on a GPU only, as ``_ROUND_COSTS``: a skipped warm-up changes the rounds' random draws, so a run
that must repeat for a seed (on a CPU, in profile cost mode) runs its warm-up whatever ran before in the process.
"""

_ROUND_COSTS: dict[tuple[object, ...], tuple[RoundPlan, RoundCost]] = {}
"""The latest measured cost of a round of each shape (key ``_warmup_key``) in this process, GPU only.

The warm-up round's, then each charged round's: a later run of the same model starts with its costs known
(``RoundScheduler.seed_rates``). Never on a CPU nor in profile cost mode, so that those stay deterministic
for a seed whatever ran before in the process.
"""


def _normalises_over_the_batch(model: nn.Module, keep_modes: bool = False) -> bool:
    """Whether a forward under :func:`frozen_batch_stats` normalises with batch statistics somewhere.

    A batch norm in training mode does (the block puts a model in eval mode in training mode, every module, unless it
    ``keep_modes``), and so does one that tracks no running statistics, in either mode.
    """
    return any(
        isinstance(module, nn.modules.batchnorm._BatchNorm)
        and (module.training or (not model.training and not keep_modes) or module.running_mean is None)
        for module in model.modules()
    )


def _caches_round_costs(source: EstimatorSource) -> bool:
    """Whether rounds on this source share their measured costs through ``_ROUND_COSTS`` (measured, on a GPU)."""
    return source.inputs.device.type == "cuda" and source.modelled_pass_ms is None


def _warmup_key(plan: RoundPlan, source: EstimatorSource, config: SignalConfig) -> tuple[object, ...]:
    """What the warm-up's one-time costs depend on: device, model, parameter shapes and the round's batch shapes."""
    n_available = len(source.inputs)
    micro = max(1, min(config.micro_batch_size, n_available // plan.n_microbatches))
    params = tuple((tuple(p.shape), p.dtype) for layer in source.layer_params for p in layer)
    return (
        str(source.inputs.device),
        type(source.model).__qualname__,
        params,
        tuple(source.inputs.shape[1:]),
        source.inputs.dtype,
        micro,
        min(config.hutchinson_batch_size, n_available),
    )


def _sparsity_with_gaps(
    diagonals: Sequence[torch.Tensor | None], threshold: float, previous: CurvatureSparsity | None
) -> CurvatureSparsity:
    """Sparsity of the layers with a diagonal; layers without one keep their previous values (or flat ones)."""
    present = [i for i, d in enumerate(diagonals) if d is not None and d.numel() > 0]
    n = len(diagonals)
    if previous is not None and len(previous.top1_share) == n:
        top1, top10 = previous.top1_share.copy(), previous.top10_share.copy()
        small, ratio = previous.small_frac.copy(), previous.top10_ratio.copy()
    else:
        top1, top10, small, ratio = np.full(n, 0.01), np.full(n, 0.1), np.zeros(n), np.ones(n)
    measured = curvature_sparsity([diagonals[i] for i in present], threshold, layer_ids=present)  # type: ignore[misc]
    top1[present], top10[present] = measured.top1_share, measured.top10_share
    small[present], ratio[present] = measured.small_frac, measured.top10_ratio
    return CurvatureSparsity(top1, top10, small, ratio)


def _readable_ms(ms: float) -> float:
    """A time reading as charged: ``ms``, or 0 for one that is negative or not finite (a broken reading)."""
    return ms if math.isfinite(ms) and ms >= 0 else 0.0


def _finite(value: float, fallback: float) -> float:
    return float(value) if math.isfinite(value) else fallback


def _finite_array(values: np.ndarray, neginf: float = 0.0) -> np.ndarray:
    """``values`` with non-finite entries replaced; ``values`` itself when all are finite (callers pass new arrays)."""
    array = np.asarray(values, dtype=np.float64)
    if np.isfinite(array).all():  # the usual case, at a fraction of nan_to_num's cost (it runs every decision)
        return array
    return np.nan_to_num(array, nan=0.0, posinf=1e30, neginf=neginf)

"""``SignalCollector``: turns per-step ``StepStats`` into one ``Signals`` snapshot per decision interval.

Cheap signals only: everything comes from the step statistics the engine already computes and from the
optimizer's own running moments, so collecting costs no extra pass over the model.

Definitions (per layer ``l`` with ``n_l`` parameters; EMAs over steps with decay ``ema_decay``):

- ``curvature_l = E[|g_l|^2] / n_l``: the mean diagonal of the empirical Fisher, estimated from the
  squared mini-batch gradient (an upper proxy: it includes the mini-batch noise).
- ``grad_variance_l = max(0, E[|g_l|^2] - |E[g_l]|^2) / n_l``: the mean per-element variance of the
  mini-batch gradient across steps; ``E[g_l]`` is the optimizer's running mean (Adam's ``exp_avg`` or
  SGD's momentum buffer × (1 − momentum)).
- ``snr_l = |E[g_l]|^2 / (n_l * grad_variance_l)``.
- ``noise_scale = B * sum_l Var_l / sum_l |E[g_l]|^2``: the simple noise scale of McCandlish et al.
  (2018), ``tr(Sigma) / |G|^2``, since a mini-batch of ``B`` samples has covariance ``Sigma / B``.
"""

from __future__ import annotations

import math
import time

import numpy as np

from triaccel_rl.types import LayerInfo, Precision, Signals, StepStats

__all__ = ["SignalCollector"]

_TINY = 1e-30


class SignalCollector:
    """Accumulates step statistics and produces a ``Signals`` snapshot at each decision.

    Args:
        layers: the run's layers, in the order of the per-layer arrays.
        ema_decay: smoothing of per-step quantities, in (0, 1).
        memory_budget_bytes: the budget reported in the snapshot.

    Example:
        >>> from triaccel_rl.types import LayerInfo
        >>> collector = SignalCollector([LayerInfo("fc", 10, True)], ema_decay=0.9, memory_budget_bytes=1 << 20)
        >>> collector.n_steps
        0
    """

    def __init__(self, layers: list[LayerInfo], ema_decay: float, memory_budget_bytes: int) -> None:
        if not (0.0 < ema_decay < 1.0):
            raise ValueError(f"ema_decay={ema_decay} must be in (0, 1)")
        self.layers = layers
        self.ema_decay = ema_decay
        self.memory_budget_bytes = memory_budget_bytes
        self.n_params = np.array([info.n_params for info in layers], dtype=np.float64)
        self.controllable = np.array([info.controllable for info in layers], dtype=bool)
        self.n_steps = 0
        self.overhead_ms = 0.0
        self.train_ms = 0.0
        self._sq_ema = np.zeros(len(layers))
        self._norm_ema = np.zeros(len(layers))
        self._loss_ema = math.nan
        self._ema_weight = 0.0  # for bias correction of the EMAs
        self._previous_probe = math.nan
        self._previous_step_ms = math.nan
        self._interval_steps = 0
        self._interval_skipped = 0
        self._interval_time_ms = 0.0
        self._interval_peak = 0

    def observe(self, stats: StepStats) -> None:
        """Folds one step's statistics in. Non-finite values are counted, never averaged in."""
        start = time.perf_counter()
        self.n_steps += 1
        self._interval_steps += 1
        self._interval_time_ms += stats.modelled_time_ms
        self.train_ms += stats.step_time_ms
        self._interval_peak = max(self._interval_peak, stats.memory_bytes)
        finite = np.isfinite(stats.grad_sq_sum).all() and math.isfinite(stats.loss)
        if stats.skipped or not finite:
            self._interval_skipped += 1
        else:
            d = self.ema_decay
            self._sq_ema = d * self._sq_ema + (1 - d) * stats.grad_sq_sum
            self._norm_ema = d * self._norm_ema + (1 - d) * np.sqrt(stats.grad_sq_sum)
            self._ema_weight = d * self._ema_weight + (1 - d)
            self._loss_ema = stats.loss if math.isnan(self._loss_ema) else d * self._loss_ema + (1 - d) * stats.loss
        self.overhead_ms += (time.perf_counter() - start) * 1e3

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
            grad_mean_sq_norm: per layer ``|E[g]|^2`` from the optimizer's running mean (NaN = unknown).
            probe_loss: loss on the fixed probe batch now.
            batch_size: the batch size the next interval starts with.
            lr_scale: the current global LR multiplier.
            precisions: current per-layer precisions.
            progress: fraction of the training budget used, in [0, 1].
        """
        start = time.perf_counter()
        weight = max(self._ema_weight, _TINY)
        sq = self._sq_ema / weight  # bias-corrected E[|g|^2] per layer
        mean_sq = np.where(np.isfinite(grad_mean_sq_norm), grad_mean_sq_norm, sq)
        mean_sq = np.minimum(mean_sq, sq)
        variance_sum = np.maximum(sq - mean_sq, 0.0)
        curvature = sq / self.n_params
        variance = variance_sum / self.n_params
        snr = mean_sq / np.maximum(variance_sum, _TINY)
        noise_scale = batch_size * variance_sum.sum() / max(mean_sq.sum(), _TINY)

        loss = self._loss_ema if math.isfinite(self._loss_ema) else math.nan
        probe_ok = math.isfinite(probe_loss)
        trend = 0.0
        if probe_ok and math.isfinite(self._previous_probe) and self._previous_probe > 0:
            trend = (probe_loss - self._previous_probe) / self._previous_probe
        if probe_ok:
            self._previous_probe = probe_loss
        step_ms = self._interval_time_ms / max(self._interval_steps, 1)
        step_trend = 0.0
        if math.isfinite(self._previous_step_ms) and self._previous_step_ms > 0:
            step_trend = (step_ms - self._previous_step_ms) / self._previous_step_ms
        self._previous_step_ms = step_ms
        overflow = self._interval_skipped / max(self._interval_steps, 1)
        signals = Signals(
            loss=_finite(loss, 1e6),
            loss_trend=_finite(trend, 1.0),
            probe_loss=_finite(probe_loss, 1e6),
            curvature=_finite_array(curvature),
            grad_variance=_finite_array(variance),
            grad_norm=_finite_array(self._norm_ema / weight),
            snr=_finite_array(snr),
            noise_scale=_finite(noise_scale, 0.0),
            memory_bytes=int(self._interval_peak),
            memory_budget_bytes=int(self.memory_budget_bytes),
            step_time_ms=_finite(step_ms, 0.0),
            step_time_trend=_finite(step_trend, 0.0),
            overflow_rate=overflow,
            batch_size=int(batch_size),
            lr_scale=float(lr_scale),
            precisions=np.array([int(p) for p in precisions], dtype=np.int64),
            n_params=self.n_params.copy(),
            controllable=self.controllable.copy(),
            progress=float(np.clip(progress, 0.0, 1.0)),
            extra={"interval_steps": self._interval_steps, "probe_loss_finite": probe_ok},
        )
        self._interval_reset()
        self.overhead_ms += (time.perf_counter() - start) * 1e3
        signals.overhead_frac = self.overhead_ms / max(self.train_ms + self.overhead_ms, _TINY)
        return signals

    @property
    def loss_ema(self) -> float:
        """Smoothed training loss over finite steps (NaN before the first one)."""
        return self._loss_ema

    def add_overhead(self, ms: float) -> None:
        """Charges work done for the signals outside this object (e.g. the probe loss) to the overhead."""
        self.overhead_ms += ms

    def _interval_reset(self) -> None:
        self._interval_steps = 0
        self._interval_skipped = 0
        self._interval_time_ms = 0.0
        self._interval_peak = 0


def _finite(value: float, fallback: float) -> float:
    return float(value) if math.isfinite(value) else fallback


def _finite_array(values: np.ndarray) -> np.ndarray:
    return np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0, posinf=1e30, neginf=0.0)

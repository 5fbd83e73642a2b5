"""Signals of a live training run: curvature, gradient noise, curvature sparsity, memory and time, under a budget."""

from triaccel_rl.signals.collector import EstimatorSource, RoundReport, SignalCollector, source_for_run
from triaccel_rl.signals.config import Schedule, SignalConfig, SignalMode
from triaccel_rl.signals.device import DeviceMoments, IntervalMoments
from triaccel_rl.signals.estimators import (
    GradientMoments,
    HutchinsonEstimate,
    curvature_lr_factors,
    curvature_sparsity,
    frozen_batch_stats,
    gradient_moments,
    hutchinson,
)
from triaccel_rl.signals.scheduler import BudgetRefusal, RoundCost, RoundPlan, RoundScheduler

__all__ = [
    "BudgetRefusal",
    "DeviceMoments",
    "EstimatorSource",
    "GradientMoments",
    "HutchinsonEstimate",
    "IntervalMoments",
    "RoundCost",
    "RoundPlan",
    "RoundReport",
    "RoundScheduler",
    "Schedule",
    "SignalCollector",
    "SignalConfig",
    "SignalMode",
    "curvature_lr_factors",
    "curvature_sparsity",
    "frozen_batch_stats",
    "gradient_moments",
    "hutchinson",
    "source_for_run",
]

"""Signals of a live training run: gradient moments, curvature, noise scale, memory and time."""

from triaccel_rl.signals.collector import SignalCollector

__all__ = ["SignalCollector"]

"""The environment's reward: progress per unit of cost, minus penalties. A pure function."""

from __future__ import annotations

import math

from triaccel_rl.config import RewardConfig

__all__ = ["reward"]


def reward(
    *,
    previous_probe_loss: float,
    probe_loss: float,
    cost_ms: float,
    reference_cost_ms: float,
    overflow_rate: float,
    over_budget: bool,
    diverged: bool,
    config: RewardConfig,
) -> float:
    """Reward of one decision interval.

    ``r = progress_scale * (log L_prev - log L_now) * (reference_cost / cost)
    - nonfinite_penalty * overflow_rate - over_budget_penalty * [over budget]
    - divergence_penalty * [diverged]``, clipped to ``[-clip, clip]``.

    ``L`` is the loss on a fixed probe batch, so progress is not mini-batch noise. ``cost`` is the
    interval's time (measured, or modelled from a hardware profile); ``reference_cost`` is what the
    same number of steps costs at fp32 and the task's base batch, so a configuration that makes the same
    progress in half the time earns twice the reward.

    Example:
        >>> r = reward(previous_probe_loss=1.0, probe_loss=math.exp(-0.1), cost_ms=50.0, reference_cost_ms=100.0,
        ...            overflow_rate=0.0, over_budget=False, diverged=False, config=RewardConfig())
        >>> round(r, 6)
        2.0
    """
    if diverged or not math.isfinite(probe_loss):
        return -min(config.divergence_penalty, config.clip)
    if not (cost_ms > 0 and reference_cost_ms > 0):
        raise ValueError(f"costs must be positive; got cost_ms={cost_ms}, reference_cost_ms={reference_cost_ms}")
    progress = math.log(max(previous_probe_loss, 1e-12)) - math.log(max(probe_loss, 1e-12))
    value = config.progress_scale * progress * (reference_cost_ms / cost_ms)
    value -= config.nonfinite_penalty * overflow_rate
    value -= config.over_budget_penalty * float(over_budget)
    return float(min(config.clip, max(-config.clip, value)))

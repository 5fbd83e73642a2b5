"""The environment's reward: progress within a cost budget, minus penalties. A pure function."""

from __future__ import annotations

import math

from triaccel_rl.config import RewardConfig

__all__ = ["reward"]


def reward(
    *,
    previous_probe_loss: float,
    probe_loss: float,
    cost_ms: float,
    budget_left_ms: float,
    overflow_rate: float,
    over_budget: bool,
    diverged: bool,
    config: RewardConfig,
) -> float:
    """Reward of one decision interval of an episode with a fixed cost budget.

    ``r = progress_scale * (log L_prev - log L_now) * min(1, budget_left / cost)
    - nonfinite_penalty * overflow_rate - over_budget_penalty * [memory over budget]``, clipped to
    ``[-clip, clip]``. A diverged interval (or a non-finite probe loss) earns ``-min(divergence_penalty, clip)``
    alone: there is no progress to count.

    ``L`` is the loss on a fixed probe batch, so progress is not mini-batch noise. ``cost`` is the
    interval's charged time (measured, or modelled from a hardware profile) and ``budget_left`` what was
    left of the episode's time budget when the interval started. An episode ends when its budget is
    spent, so the return is the total log-loss drop reached within a fixed time: the dual of the time to
    reach a given loss, which is what users pay for. A configuration that takes more steps (a small batch
    pays the per-step overhead more often) gets fewer intervals out of the budget; nothing rewards a cheap
    interval for being cheap. The interval that overruns the budget counts only the share of its progress
    that fitted (``budget_left / cost``, linear within the interval), so a coarse last step earns nothing
    past the budget.

    Example:
        >>> r = reward(previous_probe_loss=1.0, probe_loss=math.exp(-0.1), cost_ms=50.0, budget_left_ms=25.0,
        ...            overflow_rate=0.0, over_budget=False, diverged=False, config=RewardConfig())
        >>> round(r, 6)  # 10 * 0.1 of progress, half of which fitted in the budget
        0.5
    """
    if diverged or not math.isfinite(probe_loss):
        return -min(config.divergence_penalty, config.clip)
    if not (cost_ms > 0 and budget_left_ms > 0):
        raise ValueError(
            f"cost_ms={cost_ms} and budget_left_ms={budget_left_ms} must be positive "
            "(an episode ends once its budget is spent)"
        )
    # Without these checks a NaN previous loss or overflow rate came out as -clip, as if the run had diverged.
    if not math.isfinite(previous_probe_loss):
        raise ValueError(
            f"previous_probe_loss={previous_probe_loss} must be finite (a non-finite probe loss ends the episode)"
        )
    if not 0.0 <= overflow_rate <= 1.0:
        raise ValueError(f"overflow_rate={overflow_rate} must be a fraction in [0, 1]")
    progress = math.log(max(previous_probe_loss, 1e-12)) - math.log(max(probe_loss, 1e-12))
    value = config.progress_scale * progress * min(1.0, budget_left_ms / cost_ms)
    value -= config.nonfinite_penalty * overflow_rate
    value -= config.over_budget_penalty * float(over_budget)
    return float(min(config.clip, max(-config.clip, value)))

"""The environment's reward: progress within a cost budget, minus penalties. A pure function."""

from __future__ import annotations

import math

import numpy as np

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
    divergence_loss: float,
    config: RewardConfig,
) -> float:
    """Reward of one decision interval of an episode with a fixed cost budget.

    ``r = progress_scale * (log L_prev - log L_now) * min(1, budget_left / cost)
    - nonfinite_penalty * overflow_rate - over_budget_penalty * [memory over budget]``, clipped to
    ``[-clip, clip]``. A diverged interval (or a non-finite probe loss) is charged as if its loss had ended at
    the divergence threshold ``L_div`` (``divergence_loss``: ``TriAccelEnv``'s ``divergence_factor`` × the
    episode's first probe loss), and the penalty on top:
    ``r = progress_scale * min(0, log L_prev - log L_div) * min(1, budget_left / cost)
    - nonfinite_penalty * overflow_rate - over_budget_penalty * [memory over budget] - divergence_penalty``,
    clipped the same. So it earns no more than any interval of the same step whose loss stayed at or under the
    threshold, and the reward falls with the loss across it: ``-divergence_penalty`` alone paid an overshoot
    (a loss rising 2.5x earned -9.2 where one rising a millionfold, diverged, earned -5).

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
        ...            overflow_rate=0.0, over_budget=False, diverged=False, divergence_loss=3.0, config=RewardConfig())
        >>> round(r, 6)  # 10 * 0.1 of progress, half of which fitted in the budget
        0.5
    """
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
    # A log-loss drop needs losses >= 0 (a negative one read as 1e-12: +clip); 0 itself is floored at 1e-12.
    for name, value in (("previous_probe_loss", previous_probe_loss), ("probe_loss", probe_loss)):
        if value < 0:
            raise ValueError(f"{name}={value} must be >= 0: the reward is the drop in the log of the probe loss")
    for name, flag in (("over_budget", over_budget), ("diverged", diverged)):
        if not isinstance(flag, bool | np.bool_):  # "no" failed in float() with a message naming neither
            raise ValueError(f"{name}={flag!r} must be True or False")
    if not 0.0 <= overflow_rate <= 1.0:
        raise ValueError(f"overflow_rate={overflow_rate} must be a fraction in [0, 1]")
    if not (math.isfinite(divergence_loss) and divergence_loss >= 0):
        raise ValueError(
            f"divergence_loss={divergence_loss} must be a finite probe loss >= 0 (the threshold above which the run "
            "counts as diverged)"
        )
    diverged = diverged or not math.isfinite(probe_loss)
    # A diverged interval's loss says nothing past the threshold: it is charged at the threshold, never above it.
    loss = divergence_loss if diverged else probe_loss
    progress = math.log(max(previous_probe_loss, 1e-12)) - math.log(max(loss, 1e-12))
    if diverged:
        progress = min(0.0, progress)  # a run that diverged made no progress, wherever its loss started
    value = config.progress_scale * progress * min(1.0, budget_left_ms / cost_ms)
    value -= config.nonfinite_penalty * overflow_rate
    value -= config.over_budget_penalty * float(over_budget)
    value -= config.divergence_penalty * float(diverged)
    return float(min(config.clip, max(-config.clip, value)))

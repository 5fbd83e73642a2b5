"""``HeuristicPolicy``: our reconstruction of Tri-Accel's hand-written rules, reading the observation vector.

- **Precision** per group, from its relative sensitivity (log10 of peak curvature × gradient variance,
  minus the median over layers; ``triaccel_rl.observation.sensitivity``): the curvature is the
  Hutchinson Hessian trace per parameter once the collector has measured it, sharpened by how
  concentrated the layer's curvature diagonal is (``Signals.sparsity``), and the variance is the
  micro-batch estimate of the mini-batch gradient's variance (``triaccel_rl.signals``). A group in fp32
  is lowered when its sensitivity falls under ``lower_below``; a lowered group returns to fp32 when it
  rises over ``raise_above``. The band between the two is the hysteresis that stops a group hovering
  near one threshold from flipping. Nothing is lowered while the overflow rate is over
  ``max_overflow_rate``, and fp16 groups move to bf16 then.
- **LR multiplier**, from stability: one rung down the ``lr_scales`` ladder when the probe loss rose by
  more than ``loss_rise_tolerance`` (a sharp region: the step overshoots the local curvature) or steps
  overflowed; one rung back up towards 1.0 when the loss falls steadily again; otherwise kept.
- **Batch**, from memory headroom and gradient noise: doubled while memory use is under
  ``grow_below_usage`` of the budget and the batch is below the gradient-noise scale (larger batches
  still help; ``B_simple = tr(Sigma) / |G|^2`` from unbiased micro-batch estimates); halved when memory
  use is over ``shrink_above_usage``. The move is on the *effective* batch: the executor refuses growth
  the memory model predicts over the usable budget, and a run whose budget shrinks (after an
  out-of-memory error) keeps its batch by accumulating micro-batches planned to fill ``elastic.fill_frac``
  (0.9) of the budget. The defaults agree: 0.9 is under the 0.95 that reads as memory pressure, and a
  batch using under 0.45 of the budget still fits once doubled.

Per-layer step sizes are not part of the action: the decision loop applies the collector's
curvature-scaled LR factors itself when ``SignalConfig.lr_factors`` is on.
"""

from __future__ import annotations

import math

import numpy as np

from triaccel_rl.actions import encode
from triaccel_rl.config import ControllerConfig
from triaccel_rl.observation import ObservationLayout
from triaccel_rl.types import Action, BatchMove, Precision

__all__ = ["HeuristicPolicy"]


class HeuristicPolicy:
    """Hand-written controller with hysteresis; thresholds in ``config.heuristic``.

    Example:
        >>> policy = HeuristicPolicy()
        >>> action, _ = policy.predict(np.zeros(43, dtype=np.float32))
        >>> action.shape
        (6,)
    """

    name = "heuristic"

    def __init__(self, config: ControllerConfig | None = None) -> None:
        self.config = config or ControllerConfig()
        self.layout = ObservationLayout(self.config.n_groups)

    def predict(
        self,
        observation: np.ndarray,
        state: tuple[np.ndarray, ...] | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...] | None]:
        """Returns the raw action for ``observation`` (or a batch of them)."""
        obs = np.asarray(observation, dtype=np.float64)
        if obs.ndim == 2:
            return np.stack([self._decide(row) for row in obs]), state
        if obs.shape != (self.layout.size,):
            raise ValueError(f"observation has shape {obs.shape}; expected ({self.layout.size},)")
        return self._decide(obs), state

    def _decide(self, obs: np.ndarray) -> np.ndarray:
        rules = self.config.heuristic
        layout = self.layout
        g = layout.globals
        overflow = obs[g("overflow_rate")]
        unstable = overflow > rules.max_overflow_rate
        low = Precision.FP16 if rules.use_fp16 else Precision.BF16

        precisions = []
        for group in range(layout.n_groups):
            current = Precision(
                int(np.argmax(obs[layout.group(group, "is_fp32") : layout.group(group, "is_fp16") + 1]))
            )
            sensitivity = obs[layout.group(group, "rel_sensitivity")]
            chosen = current
            if current is Precision.FP32:
                if sensitivity < rules.lower_below and not unstable:
                    chosen = low
            elif sensitivity > rules.raise_above:
                chosen = Precision.FP32
            if unstable and chosen is Precision.FP16:
                chosen = Precision.BF16
            precisions.append(chosen)

        scales = self.config.lr_scales
        current_scale = 2.0 ** obs[g("log2_lr_scale")]
        rung = int(np.argmin([abs(math.log(s / current_scale)) for s in scales]))
        trend = obs[g("loss_trend")]
        if trend > rules.loss_rise_tolerance or unstable:
            rung = max(rung - 1, 0)
        elif trend < -rules.loss_rise_tolerance and scales[rung] < 1.0:
            rung += 1  # recovering: climb back towards the neutral scale
        lr_scale = scales[rung]

        memory_use = obs[g("memory_use")]
        noise_over_batch = obs[g("log_noise_over_batch")]
        if memory_use > rules.shrink_above_usage:
            move = BatchMove.SHRINK
        elif memory_use < rules.grow_below_usage and noise_over_batch > -math.log10(rules.max_batch_over_noise):
            move = BatchMove.GROW
        else:
            move = BatchMove.KEEP
        return encode(Action(tuple(precisions), lr_scale, move), self.config)

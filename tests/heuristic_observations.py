"""Builds observations for heuristic tests: the features the heuristic reads are set, the rest stay 0."""

from typing import NamedTuple

import numpy as np

from triaccel_rl.actions import decode
from triaccel_rl.observation import ObservationLayout

LAYOUT = ObservationLayout(4)

FP32, BF16, FP16 = 0, 1, 2
SHRINK, KEEP, GROW = 0, 1, 2


def observation(
    sensitivities=(0.0, 0.0, 0.0, 0.0),
    precisions=(0, 0, 0, 0),
    overflow=0.0,
    memory_use=0.1,
    noise_over_batch=2.0,
    loss_trend=-0.05,
    lr_scale=1.0,
    log2_batch=0.0,
    progress=0.0,
    log2_lr_scale=None,
):
    """An observation for 4 groups with the given per-group relative sensitivities and precisions.

    A precision of None leaves the group's one-hot empty. ``log2_lr_scale`` (when given) is written as it is, in
    place of ``log2(lr_scale)``: for values no multiplier has (NaN, huge).
    """
    obs = np.zeros(LAYOUT.size, dtype=np.float32)
    obs[LAYOUT.globals("overflow_rate")] = overflow
    obs[LAYOUT.globals("memory_use")] = memory_use
    obs[LAYOUT.globals("log_noise_over_batch")] = noise_over_batch
    obs[LAYOUT.globals("loss_trend")] = loss_trend
    obs[LAYOUT.globals("log2_lr_scale")] = np.log2(lr_scale) if log2_lr_scale is None else log2_lr_scale
    obs[LAYOUT.globals("log2_batch")] = log2_batch
    obs[LAYOUT.globals("progress")] = progress
    for group, (s, p) in enumerate(zip(sensitivities, precisions, strict=True)):
        obs[LAYOUT.group(group, "rel_sensitivity")] = s
        if p is not None:
            obs[LAYOUT.group(group, "is_fp32") + p] = 1.0
    return obs


class Decision(NamedTuple):
    """A heuristic's action, decoded: precision code per group, the LR multiplier, the batch move's code."""

    precisions: tuple[int, ...]
    lr_scale: float
    batch: int


def decide(policy, **features):
    """``policy``'s decoded action for ``observation(**features)``."""
    action = decode(policy.predict(observation(**features))[0], policy.config)
    return Decision(tuple(int(p) for p in action.group_precisions), action.lr_scale, int(action.batch_move))

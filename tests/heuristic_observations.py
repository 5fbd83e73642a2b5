"""Builds observations for heuristic tests: the features the heuristic reads are set, the rest stay 0."""

import numpy as np

from triaccel_rl.observation import ObservationLayout

LAYOUT = ObservationLayout(4)


def observation(
    sensitivities,
    precisions=(0, 0, 0, 0),
    overflow=0.0,
    memory_use=0.1,
    noise_over_batch=2.0,
    loss_trend=-0.05,
    lr_scale=1.0,
    log2_batch=0.0,
    progress=0.0,
):
    """An observation for 4 groups with the given per-group relative sensitivities and precisions."""
    obs = np.zeros(LAYOUT.size, dtype=np.float32)
    obs[LAYOUT.globals("overflow_rate")] = overflow
    obs[LAYOUT.globals("memory_use")] = memory_use
    obs[LAYOUT.globals("log_noise_over_batch")] = noise_over_batch
    obs[LAYOUT.globals("loss_trend")] = loss_trend
    obs[LAYOUT.globals("log2_lr_scale")] = np.log2(lr_scale)
    obs[LAYOUT.globals("log2_batch")] = log2_batch
    obs[LAYOUT.globals("progress")] = progress
    for group, (s, p) in enumerate(zip(sensitivities, precisions, strict=True)):
        obs[LAYOUT.group(group, "rel_sensitivity")] = s
        obs[LAYOUT.group(group, "is_fp32") + p] = 1.0
    return obs

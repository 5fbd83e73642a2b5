"""``Signals`` → a fixed-size, normalised float32 vector that does not depend on the model's layer count.

Controllable layers are ranked by a sensitivity score and split into ``n_groups`` groups by quantile,
most sensitive first (group 0). The vector is the global features followed by the same block of
features for each group; :class:`ObservationLayout` names every index, so a hand-written policy can read
the vector as easily as a network.

Sensitivity of a layer: ``log10(peak_curvature * grad_variance)``, both per element (so already normalised
by parameter count). ``peak_curvature = curvature * top10_ratio``: the layer's mean curvature (Hutchinson
``|tr H_l| / n_l`` once measured, else the mini-batch Fisher mean) times how much sharper its sharpest
decile of coordinates is than its mean (``Signals.sparsity``; 1 when not measured). Rounding noise that is
not spread evenly over coordinates costs up to the peak, not the mean, so a layer with a few very sharp
coordinates is not mistaken for a flat one. A layer that owns no parameter element (a bias-free output head tied to
the embedding's weight, which the embedding owns) has no statistics of its own: it reads as the median measured layer,
not as the flattest. Grouping has hysteresis: scores are smoothed across decisions, and a layer keeps its group
while its smoothed score lies within ``margin`` (in log10 units) of that group's range.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from triaccel_rl.errors import is_real, is_whole
from triaccel_rl.state import SavedState
from triaccel_rl.types import Precision, Signals

__all__ = [
    "GLOBAL_FEATURES",
    "GROUP_FEATURES",
    "OBS_HIGH",
    "LayerGrouper",
    "ObservationLayout",
    "build_observation",
    "peak_curvature",
    "sensitivity",
]

OBS_HIGH = 10.0
"""Every feature lies in [-OBS_HIGH, OBS_HIGH] (the Box bounds)."""

_SCORE_CAP = 60.0
"""Where :meth:`LayerGrouper.update` puts an infinite sensitivity at the least: mirrors the floor, 2 × log10(1e-30)."""

GLOBAL_FEATURES = (
    "log_loss",  # log10 of the smoothed training loss
    "loss_trend",  # relative change of the probe loss over the last interval, clipped to [-1, 1]
    "log_noise_over_batch",  # log10(B_simple / batch_size): > 0 means the batch is below the noise scale
    "headroom",  # unused share of the memory budget, [0, 1]
    "memory_use",  # memory / budget, [0, 2]
    "log2_batch",  # log2(batch / base batch)
    "log2_lr_scale",  # log2 of the current LR multiplier
    "overflow_rate",  # share of skipped steps in the interval, [0, 1]
    "step_time_trend",  # relative change of step time, clipped to [-1, 1]
    "progress",  # share of the training budget used, [0, 1]
    "log_curvature",  # log10 of the parameter-weighted mean curvature (Hutchinson once measured), divided by 5
)
GROUP_FEATURES = (
    "rel_sensitivity",  # group's mean sensitivity (peak curvature x variance) minus the controllable median
    # (log10); at most 0 while the curvature is the cheap tier's (no estimator round yet)
    "log_curvature",  # log10 mean curvature of the group, divided by 5
    "log_variance",  # log10 mean per-element variance of the group's mini-batch gradient, divided by 5
    "log_snr",  # log10 of the parameter-weighted mean of the group's layers' signal-to-noise ratios
    # |G_l|^2 / (tr(Sigma_l) / B) (a mean of ratios, not the group's own ratio of sums: its large layers weigh most)
    "param_share",  # share of the controllable parameters in this group, [0, 1]
    "is_fp32",  # one-hot of the group's current (majority) precision
    "is_bf16",
    "is_fp16",
)


@dataclass(frozen=True)
class ObservationLayout:
    """Index arithmetic of the observation vector for ``n_groups`` groups.

    Example:
        >>> layout = ObservationLayout(n_groups=4)
        >>> layout.size
        43
        >>> layout.group(1, "is_bf16")
        25
    """

    n_groups: int

    def __post_init__(self) -> None:
        if not is_whole(self.n_groups) or self.n_groups < 1:
            raise ValueError(f"n_groups={self.n_groups!r} must be a whole number >= 1")

    @property
    def size(self) -> int:
        """Length of the observation vector."""
        return len(GLOBAL_FEATURES) + self.n_groups * len(GROUP_FEATURES)

    def globals(self, name: str) -> int:
        """Index of a global feature.

        Raises:
            ValueError: ``name`` is not in ``GLOBAL_FEATURES`` (the message lists them).
        """
        return _feature_index(GLOBAL_FEATURES, name, "global")

    def group(self, group: int, name: str) -> int:
        """Index of feature ``name`` of group ``group`` (0 = most sensitive).

        Raises:
            IndexError: ``group`` is not a whole number in ``[0, n_groups)``.
            ValueError: ``name`` is not in ``GROUP_FEATURES`` (the message lists them).
        """
        if not is_whole(group) or not (0 <= group < self.n_groups):
            raise IndexError(f"group {group!r} out of range [0, {self.n_groups})")  # 1.5 gave a float index
        return len(GLOBAL_FEATURES) + int(group) * len(GROUP_FEATURES) + _feature_index(GROUP_FEATURES, name, "group")

    @classmethod
    def for_size(cls, size: int) -> ObservationLayout | None:
        """The layout whose observation has ``size`` features, or None when no number of groups gives it.

        Example:
            >>> ObservationLayout.for_size(43)
            ObservationLayout(n_groups=4)
        """
        if not is_whole(size):  # 43.0 was told that n_groups=4.0 must be a whole number: it passed no n_groups
            raise ValueError(f"size={size!r} must be a whole number of observation features")
        n_groups, rest = divmod(int(size) - len(GLOBAL_FEATURES), len(GROUP_FEATURES))
        return cls(n_groups) if n_groups >= 1 and not rest else None

    def name(self, index: int) -> str:
        """The feature at ``index``: a global feature's name, or ``group <g> <name>``.

        Example:
            >>> ObservationLayout(n_groups=4).name(25)
            'group 1 is_bf16'
        """
        if not is_whole(index) or not (0 <= index < self.size):  # 12.0 raised tuple's TypeError, True read 1
            raise IndexError(f"feature {index!r} out of range [0, {self.size}): a whole number")
        index = int(index)
        if index < len(GLOBAL_FEATURES):
            return GLOBAL_FEATURES[index]
        group, feature = divmod(index - len(GLOBAL_FEATURES), len(GROUP_FEATURES))
        return f"group {group} {GROUP_FEATURES[feature]}"


class LayerGrouper:
    """Assigns controllable layers to ``n_groups`` sensitivity groups, with hysteresis.

    Args:
        controllable: mask of the layers whose precision the controller sets.
        n_groups: number of groups.
        smoothing: weight of the previous smoothed score, in [0, 1).
        margin: log10 distance outside its group's score range before a layer changes group.
        param_counts: the parameter elements each layer owns (the engine's ``layer_param_counts``: a weight tied
            between layers in its first only), one per layer; None: every layer owns some. A layer that owns none (a
            bias-free output head tied to the embedding's weight) has no gradient statistics of its own: the signals
            read 0 for it, which is no measurement, so it is held at the measured layers' median (see ``measured``).

    Attributes:
        measured: per-layer mask (over all layers) of those the signals measure: the layers owning a parameter element.
    """

    def __init__(
        self,
        controllable: np.ndarray,
        n_groups: int,
        smoothing: float = 0.5,
        margin: float = 0.15,
        param_counts: Sequence[int] | None = None,
    ):
        if not is_whole(n_groups) or n_groups < 1:
            raise ValueError(f"n_groups={n_groups!r} must be a whole number >= 1")
        if not is_real(smoothing) or not (0.0 <= smoothing < 1.0):
            raise ValueError(f"smoothing={smoothing!r} must be in [0, 1)")  # 1 never took in a new score; NaN: all NaN
        if not is_real(margin) or not (0.0 <= margin < math.inf):
            raise ValueError(f"margin={margin!r} must be a finite number >= 0 (log10 units)")
        self.indices = np.flatnonzero(controllable)
        if len(self.indices) == 0:
            raise ValueError(
                "the model has no controllable layer to group (nn.Linear, a convolution or nn.MultiheadAttention: the "
                "layers whose precision the controller sets); its matmuls run elsewhere (an nn.Embedding, an RNN, "
                "x @ w on a parameter): compute them through nn.Linear, or train this model without the controller"
            )
        if param_counts is None:
            self.measured = np.ones(len(controllable), dtype=bool)
        elif len(param_counts) != len(controllable) or any(not is_whole(n) or n < 0 for n in param_counts):
            raise ValueError(
                f"param_counts={param_counts!r} must be {len(controllable)} whole numbers >= 0, one per layer"
            )
        else:
            self.measured = np.array([n > 0 for n in param_counts], dtype=bool)
        self.n_groups = n_groups
        self.smoothing = smoothing
        self.margin = margin
        self._score: np.ndarray | None = None
        self.assignment = np.zeros(len(self.indices), dtype=np.int64)  # group of each controllable layer

    def update(self, signals: Signals) -> np.ndarray:
        """Re-ranks the layers from ``signals``; returns the group of each controllable layer.

        A non-finite score is no measurement: a NaN leaves the layer's smoothed score as it was (the finite layers'
        median at the first update), +inf counts as the highest finite score (at least 60, the floor's mirror).
        Smoothed in, either would stay for the rest of the run and pin the layer to one end of the ranking. A layer
        that owns no parameter element (not ``measured``) scores the measured layers' median at each update: its
        statistics' 0 read as the lowest score possible, and a policy lowered it first, for good.
        """
        raw = sensitivity(signals)[self.indices]
        measured = self.measured[self.indices]
        if not measured.all():
            finite = raw[measured & np.isfinite(raw)]
            raw = np.where(measured, raw, np.median(finite) if finite.size else math.nan)
        if not np.isfinite(raw).all():
            raw = self._finite(raw)
        if self._score is None:
            self._score = raw
            self.assignment = _quantile_groups(raw, self.n_groups)
            return self.assignment
        self._score = self.smoothing * self._score + (1 - self.smoothing) * raw
        proposed = _quantile_groups(self._score, self.n_groups)
        keep = proposed.copy()
        for group in range(self.n_groups):
            members = self._score[proposed == group]
            if len(members) == 0:
                continue
            low, high = members.min() - self.margin, members.max() + self.margin
            for i in np.flatnonzero(self.assignment == group):
                if low <= self._score[i] <= high:
                    keep[i] = group
        # Keeping layers in place must not empty a group the ranking fills (group 0's precision action then steered no
        # layer, and its features were its neighbour's): an emptied group takes back the layers the ranking puts in
        # it. With fewer layers than groups too: 3 layers in 4 groups could end as [2, 1, 2], group 0 empty.
        occupied = set(proposed.tolist())
        for group in occupied - set(keep.tolist()):
            keep[proposed == group] = group
        if set(keep.tolist()) != occupied:  # that emptied another: the ranking as it is
            keep = proposed
        self.assignment = keep
        return self.assignment

    def _finite(self, raw: np.ndarray) -> np.ndarray:
        finite = raw[np.isfinite(raw)]
        top = max(float(finite.max()), _SCORE_CAP) if finite.size else _SCORE_CAP
        held = self._score if self._score is not None else np.full(len(raw), np.median(finite) if finite.size else 0.0)
        return np.where(np.isnan(raw), held, np.minimum(raw, top))

    def state_dict(self) -> dict[str, Any]:
        """The smoothed scores (None before the first update) and the groups, for a checkpoint."""
        return {
            "score": None if self._score is None else self._score.tolist(),
            "assignment": self.assignment.tolist(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resumes from ``state_dict()``'s output, for a grouper over the same layers and groups.

        Raises:
            ValueError: a missing field, a score list of another length, or a group outside [0, n_groups).
        """
        saved = SavedState(state, "the layer grouper's state", ("score", "assignment"))
        n = len(self.indices)
        score = saved.reals("score", n) if saved.optional("score") else None
        groups = saved.reals("assignment", n)
        if not all(value.is_integer() and 0 <= value < self.n_groups for value in groups):
            raise ValueError(
                f"the layer grouper's state has groups outside 0..{self.n_groups - 1}: {groups.tolist()}: it was saved "
                f"with more groups than n_groups={self.n_groups} (ControllerConfig.n_groups, or another layer "
                "grouping); build the controller with the config the checkpoint was saved with"
            )
        self._score, self.assignment = score, groups.astype(np.int64)

    def layers_of(self, group: int) -> np.ndarray:
        """Layer indices (into the run's layers) currently in ``group``."""
        return self.indices[self.assignment == group]


def sensitivity(signals: Signals) -> np.ndarray:
    """Per-layer sensitivity ``log10(peak_curvature * grad_variance)`` (each factor floored at 1e-30)."""
    return np.log10(np.maximum(peak_curvature(signals), 1e-30)) + np.log10(np.maximum(signals.grad_variance, 1e-30))


def peak_curvature(signals: Signals) -> np.ndarray:
    """Per-layer mean curvature of the sharpest decile of coordinates: ``curvature * sparsity.top10_ratio``.

    Equals ``curvature`` while the sparsity is not measured.
    """
    sparsity = signals.sparsity
    if sparsity is None or np.shape(sparsity.top10_ratio) != np.shape(signals.curvature):
        return signals.curvature
    ratio = np.nan_to_num(np.asarray(sparsity.top10_ratio, dtype=np.float64), nan=1.0, posinf=1.0)
    return signals.curvature * np.maximum(ratio, 1.0)


def build_observation(
    signals: Signals, grouper: LayerGrouper, base_batch_size: int, layout: ObservationLayout
) -> np.ndarray:
    """The observation vector for ``signals`` (float32, shape ``[layout.size]``, within ±OBS_HIGH).

    Raises:
        ValueError: ``base_batch_size`` is not a whole number >= 1, or the layout has another number of groups than
            the grouper (the extra groups copied their neighbours' features, at the expected size).
    """
    if not is_whole(base_batch_size) or base_batch_size < 1:
        raise ValueError(f"base_batch_size={base_batch_size!r} must be a whole number >= 1")  # 0 divided by zero
    if layout.n_groups != grouper.n_groups:
        raise ValueError(f"the layout has {layout.n_groups} groups; the grouper {grouper.n_groups}: build both alike")
    obs = np.zeros(layout.size, dtype=np.float64)
    g = layout.globals
    # A layer owning no parameter element (a tied head: the weight is its embedding's) measures nothing: its
    # statistics read 0. Its curvature stays out of the mean; in its group it reads as the median measured layer.
    measured = grouper.measured
    counted = np.where(measured, signals.n_params, 0.0)
    weights = counted / max(counted.sum(), 1.0)
    obs[g("log_loss")] = math.log10(max(signals.loss, 1e-6))
    obs[g("loss_trend")] = np.clip(signals.loss_trend, -1, 1)
    ratio = signals.noise_scale / max(signals.batch_size, 1)
    obs[g("log_noise_over_batch")] = math.log10(max(ratio, 1e-6))
    obs[g("headroom")] = signals.headroom_frac
    budget = max(signals.memory_budget_bytes, 1)
    obs[g("memory_use")] = np.clip(signals.memory_bytes / budget, 0, 2)
    obs[g("log2_batch")] = math.log2(max(signals.batch_size, 1) / base_batch_size)
    obs[g("log2_lr_scale")] = math.log2(max(signals.lr_scale, 1e-6))
    obs[g("overflow_rate")] = signals.overflow_rate
    obs[g("step_time_trend")] = np.clip(signals.step_time_trend, -1, 1)
    obs[g("progress")] = signals.progress
    obs[g("log_curvature")] = math.log10(max(float(np.dot(weights, signals.curvature)), 1e-30)) / 5

    scores, curvature, variance, snr = sensitivity(signals), signals.curvature, signals.grad_variance, signals.snr
    reference = grouper.indices[measured[grouper.indices]]  # the controllable layers measured
    if len(reference) == 0:
        reference = grouper.indices
    median = float(np.median(scores[reference]))
    if not measured.all():
        scores, curvature, variance, snr = (
            np.where(measured, values, np.median(values[reference])) for values in (scores, curvature, variance, snr)
        )
    # Before any estimator round (or when the budget refuses them) curvature and variance both come from the
    # squared gradients, so the score is their square: it may say a group is less sensitive than the median,
    # never more (a round must), as the cheap noise scale may say the batch is above it, never below.
    one_sided = signals.extra.get("curvature_source") == "fisher"
    controllable_params = max(signals.n_params[grouper.indices].sum(), 1.0)
    for group in range(layout.n_groups):
        members = grouper.layers_of(group)
        if len(members) == 0:  # fewer layers than groups: borrow the nearest non-empty group's layers
            members = _nearest_members(grouper, group)
        w = signals.n_params[members]
        if w.sum() == 0:  # zero-size layers only (nn.Linear(8, 0)): weighed by 0 elements they read the floor, not
            # the measured median they hold (above); the precision one-hot counts them a layer each too
            w = np.ones(len(members))
        mean = lambda values, w=w: float(np.dot(w, values) / max(w.sum(), 1.0))  # noqa: E731
        relative = mean(scores[members]) - median
        obs[layout.group(group, "rel_sensitivity")] = min(relative, 0.0) if one_sided else relative
        obs[layout.group(group, "log_curvature")] = math.log10(max(mean(curvature[members]), 1e-30)) / 5
        obs[layout.group(group, "log_variance")] = math.log10(max(mean(variance[members]), 1e-30)) / 5
        obs[layout.group(group, "log_snr")] = math.log10(max(mean(snr[members]), 1e-6))
        obs[layout.group(group, "param_share")] = signals.n_params[grouper.layers_of(group)].sum() / controllable_params
        counts = np.bincount(signals.precisions[members], weights=w, minlength=len(Precision))
        obs[layout.group(group, "is_fp32") + int(np.argmax(counts))] = 1.0
    return np.clip(np.nan_to_num(obs, nan=0.0), -OBS_HIGH, OBS_HIGH).astype(np.float32)


def _feature_index(features: tuple[str, ...], name: str, kind: str) -> int:
    if name not in features:  # tuple.index said only "x not in tuple"
        raise ValueError(f"unknown {kind} feature {name!r}; the {kind} features: {', '.join(features)}")
    return features.index(name)


def _quantile_groups(scores: np.ndarray, n_groups: int) -> np.ndarray:
    """Group index per layer: the highest scores go to group 0, in ``n_groups`` near-equal chunks."""
    order = np.argsort(-scores, kind="stable")
    groups = np.empty(len(scores), dtype=np.int64)
    for group, chunk in enumerate(np.array_split(order, n_groups)):
        groups[chunk] = group
    return groups


def _nearest_members(grouper: LayerGrouper, group: int) -> np.ndarray:
    for distance in range(1, grouper.n_groups):
        for candidate in (group - distance, group + distance):
            if 0 <= candidate < grouper.n_groups and len(grouper.layers_of(candidate)):
                return grouper.layers_of(candidate)
    return grouper.indices

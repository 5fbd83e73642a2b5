"""Tests for triaccel_rl.observation: layout arithmetic, sensitivity grouping with hysteresis, the vector."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from triaccel_rl import observation
from triaccel_rl.observation import (
    GLOBAL_FEATURES,
    GROUP_FEATURES,
    OBS_HIGH,
    LayerGrouper,
    ObservationLayout,
    _quantile_groups,
    build_observation,
    peak_curvature,
    sensitivity,
)
from triaccel_rl.types import CurvatureSparsity, Precision, Signals


def make_signals(
    scores: list[float],
    *,
    controllable: list[bool] | None = None,
    precisions: list[int] | None = None,
    n_params: list[int] | None = None,
    **overrides: object,
) -> Signals:
    """Signals whose per-layer sensitivity ``log10(curvature * grad_variance)`` is exactly ``scores``.

    The score is put in the curvature (``10**score``) with unit gradient variance.
    """
    n = len(scores)
    fields: dict[str, object] = {
        "loss": 1.0,
        "loss_trend": 0.0,
        "probe_loss": 1.0,
        "curvature": np.array([10.0**s for s in scores]),
        "grad_variance": np.ones(n),
        "grad_norm": np.ones(n),
        "snr": np.ones(n),
        "noise_scale": 64.0,
        "memory_bytes": 512,
        "memory_budget_bytes": 1024,
        "step_time_ms": 10.0,
        "step_time_trend": 0.0,
        "overflow_rate": 0.0,
        "batch_size": 64,
        "lr_scale": 1.0,
        "precisions": np.array(precisions if precisions is not None else [0] * n, dtype=np.int64),
        "n_params": np.array(n_params if n_params is not None else [100] * n, dtype=np.int64),
        "controllable": np.array(controllable if controllable is not None else [True] * n),
    }
    fields.update(overrides)
    return Signals(**fields)  # type: ignore[arg-type]


# ---------------------------------------------------------------- layout


@pytest.mark.parametrize("n_groups", [1, 2, 4, 16])
def test_layout_size_and_unique_indices(n_groups: int) -> None:
    layout = ObservationLayout(n_groups)
    assert layout.size == 11 + 8 * n_groups
    indices = [layout.globals(name) for name in GLOBAL_FEATURES]
    indices += [layout.group(g, name) for g in range(n_groups) for name in GROUP_FEATURES]
    assert len(indices) == len(set(indices))
    assert sorted(indices) == list(range(layout.size))


def test_layout_exact_indices() -> None:
    layout = ObservationLayout(4)
    assert layout.size == 43
    assert layout.globals("log_loss") == 0
    assert layout.globals("log_curvature") == 10
    assert layout.group(0, "rel_sensitivity") == 11
    assert layout.group(1, "is_bf16") == 11 + 8 + 6
    assert layout.group(3, "is_fp16") == 42


def test_layout_names_every_index() -> None:
    layout = ObservationLayout(4)
    assert layout.name(0) == "log_loss" and layout.name(10) == "log_curvature"
    assert layout.name(layout.group(0, "rel_sensitivity")) == "group 0 rel_sensitivity"
    assert layout.name(layout.group(3, "is_fp16")) == "group 3 is_fp16"
    for index in range(layout.size):  # the inverse of globals() and group()
        name = layout.name(index)
        if name.startswith("group "):
            _, g, feature = name.split()
            assert layout.group(int(g), feature) == index
        else:
            assert layout.globals(name) == index
    with pytest.raises(IndexError, match=r"feature 43 out of range \[0, 43\)"):
        layout.name(43)


@pytest.mark.parametrize("bad", [12.0, True])
def test_layout_name_and_for_size_take_whole_numbers(bad: object) -> None:
    """Before: name(12.0) raised tuple's TypeError, name(True) read feature 1, and for_size(43.0) said n_groups=4.0
    must be a whole number, an argument the caller never passed."""
    with pytest.raises(IndexError, match=rf"^feature {bad!r} out of range \[0, 43\): a whole number$"):
        ObservationLayout(4).name(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=rf"^size={43.0 if bad == 12.0 else bad!r} must be a whole number"):
        ObservationLayout.for_size(43.0 if bad == 12.0 else bad)  # type: ignore[arg-type]
    assert ObservationLayout(4).name(np.int64(12)) == "group 0 log_curvature"
    assert ObservationLayout.for_size(np.int64(43)) == ObservationLayout(4)


@pytest.mark.parametrize("bad", [-1, 4])
def test_layout_group_out_of_range(bad: int) -> None:
    with pytest.raises(IndexError, match=rf"group {bad} out of range \[0, 4\)"):
        ObservationLayout(4).group(bad, "is_fp32")


@pytest.mark.parametrize("bad", [1.5, True, 1.0])
def test_layout_group_must_be_a_whole_number(bad: object) -> None:
    """Before the fix 1.5 passed the range check and gave the float index 26.0 (True gave group 1's)."""
    with pytest.raises(IndexError, match=rf"^group {bad!r} out of range \[0, 4\)$"):
        ObservationLayout(4).group(bad, "is_fp32")  # type: ignore[arg-type]
    assert ObservationLayout(4).group(np.int64(1), "is_bf16") == 25


def test_layout_unknown_feature_names_the_features() -> None:
    """``tuple.index`` said only "tuple.index(x): x not in tuple"."""
    with pytest.raises(ValueError, match=r"^unknown global feature 'overflow'; the global features: log_loss, "):
        ObservationLayout(4).globals("overflow")
    with pytest.raises(ValueError, match=r"^unknown group feature 'fp32'; the group features: rel_sensitivity, "):
        ObservationLayout(4).group(0, "fp32")


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, None])
def test_layout_needs_a_whole_number_of_groups(bad: object) -> None:
    """``ObservationLayout(0)`` had size 11 and no group; -1 a size of 3."""
    with pytest.raises(ValueError, match=rf"^n_groups={bad!r} must be a whole number >= 1$"):
        ObservationLayout(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_groups": 0}, r"n_groups=0 must be a whole number >= 1"),
        ({"smoothing": 1.0}, r"smoothing=1\.0 must be in \[0, 1\)"),
        ({"smoothing": float("nan")}, r"smoothing=nan must be in \[0, 1\)"),
        ({"smoothing": -0.1}, r"smoothing=-0\.1 must be in \[0, 1\)"),
        ({"margin": -0.1}, r"margin=-0\.1 must be a finite number >= 0"),
        ({"margin": float("inf")}, r"margin=inf must be a finite number >= 0"),
        ({"margin": float("nan")}, r"margin=nan must be a finite number >= 0"),
    ],
)
def test_grouper_settings_are_checked(kwargs: dict, message: str) -> None:
    """Before the fix each was taken: smoothing 1 never let a new score in, NaN made every score NaN."""
    with pytest.raises(ValueError, match=message):
        LayerGrouper(np.ones(4, dtype=bool), **{"n_groups": 2, **kwargs})
    assert LayerGrouper(np.ones(4, dtype=bool), 2, smoothing=0.0, margin=0.0).smoothing == 0.0  # the edges


@pytest.mark.parametrize("bad", [0, -64, 64.0])
def test_observation_needs_a_whole_base_batch(bad: object) -> None:
    """A base batch of 0 raised ZeroDivisionError from log2(batch / 0)."""
    signals = make_signals([0.0, 1.0])
    grouper = LayerGrouper(signals.controllable, 2)
    grouper.update(signals)
    with pytest.raises(ValueError, match=rf"^base_batch_size={bad!r} must be a whole number >= 1$"):
        build_observation(signals, grouper, bad, ObservationLayout(2))  # type: ignore[arg-type]


def test_layout_docstring_example() -> None:
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in finder.find(ObservationLayout, "ObservationLayout", globs=vars(observation).copy()):
        runner.run(test)
    assert runner.tries > 0 and runner.failures == 0


# ---------------------------------------------------------------- grouping


def test_quantile_groups_exact() -> None:
    scores = np.array([1.0, 5.0, 3.0, 2.0, 4.0, 0.0])
    assert _quantile_groups(scores, 3).tolist() == [2, 0, 1, 1, 0, 2]
    assert _quantile_groups(scores, 1).tolist() == [0] * 6


def test_quantile_groups_uneven_chunks_put_extra_in_first() -> None:
    # 5 layers into 2 groups: 3 most sensitive in group 0.
    assert _quantile_groups(np.array([0.0, 1.0, 2.0, 3.0, 4.0]), 2).tolist() == [1, 1, 0, 0, 0]


def test_quantile_groups_fewer_layers_than_groups() -> None:
    assert _quantile_groups(np.array([1.0, 2.0]), 4).tolist() == [1, 0]


def test_sensitivity_reads_the_peak_curvature_of_the_sharpest_decile() -> None:
    """``peak_curvature = curvature * top10_ratio``; a ratio under 1 or NaN reads as flat (1)."""
    ratio = np.array([1.0, 0.5, 100.0, np.nan])
    flat = np.zeros(4)  # the shares are not read
    signals = make_signals([3.0, 2.0, 1.0, 0.0], sparsity=CurvatureSparsity(flat, flat, flat, ratio))
    assert peak_curvature(signals).tolist() == [1000.0, 100.0, 1000.0, 1.0]
    assert sensitivity(signals).tolist() == [3.0, 2.0, 3.0, 0.0]
    grouper = LayerGrouper(signals.controllable, n_groups=2)
    assert grouper.update(signals).tolist() == [0, 1, 0, 1]  # layer 2 ranks with layer 0 on its peak
    layout = ObservationLayout(2)
    obs = build_observation(signals, grouper, base_batch_size=64, layout=layout)
    # Median score 2.5; group means 3 and 1. The curvature features stay the mean's: (1000 + 10) / 2 and (100 + 1) / 2.
    assert obs[layout.group(0, "rel_sensitivity")] == pytest.approx(0.5, abs=1e-6)
    assert obs[layout.group(1, "rel_sensitivity")] == pytest.approx(-1.5, abs=1e-6)
    assert obs[layout.group(0, "log_curvature")] == pytest.approx(math.log10(505.0) / 5, rel=1e-6)
    assert obs[layout.group(1, "log_curvature")] == pytest.approx(math.log10(50.5) / 5, rel=1e-6)


def test_sensitivity_is_log_product_with_floor() -> None:
    signals = make_signals([0.0, 0.0, 0.0])
    signals.curvature = np.array([100.0, 0.0, 1e-3])
    signals.grad_variance = np.array([10.0, 5.0, 0.0])
    assert sensitivity(signals).tolist() == [3.0, -30.0 + math.log10(5.0), -3.0 - 30.0]


def test_grouper_orders_by_sensitivity_most_sensitive_first() -> None:
    scores = [0.0, 7.0, 3.0, 5.0, 1.0, 6.0, 2.0, 4.0]
    grouper = LayerGrouper(np.ones(8, dtype=bool), n_groups=4)
    assignment = grouper.update(make_signals(scores))
    assert assignment.tolist() == [3, 0, 2, 1, 3, 0, 2, 1]
    assert grouper.layers_of(0).tolist() == [1, 5]
    assert grouper.layers_of(3).tolist() == [0, 4]


def test_a_loaded_grouper_regroups_as_the_saved_one() -> None:
    """The smoothed scores come back with the groups: after one more update both agree, where a fresh grouper (no
    smoothing history) would group by the last scores alone."""
    grouper = LayerGrouper(np.ones(4, dtype=bool), n_groups=2)
    grouper.update(make_signals([0.0, 1.0, 2.0, 3.0]))
    loaded = LayerGrouper(np.ones(4, dtype=bool), n_groups=2)
    loaded.load_state_dict(grouper.state_dict())
    fresh = LayerGrouper(np.ones(4, dtype=bool), n_groups=2)
    turned = make_signals([3.0, 2.0, 1.0, 0.0])
    expected = grouper.update(turned).tolist()
    assert loaded.update(turned).tolist() == expected == [1, 1, 0, 0]  # smoothed: every score 1.5, groups held
    assert fresh.update(turned).tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match=r"the layer grouper's state has score \[1\.0\], not a list of 4 numbers"):
        loaded.load_state_dict({**grouper.state_dict(), "score": [1.0]})


def test_keeping_layers_in_their_groups_never_empties_a_group() -> None:
    """With as many layers as groups, the hysteresis kept every layer but one in place and left group 0 empty: the
    most sensitive group's precision action steered no layer and its features were group 1's."""
    grouper = LayerGrouper(np.ones(3, dtype=bool), n_groups=3)
    assert grouper.update(make_signals([3.0, 2.0, 1.0])).tolist() == [0, 1, 2]
    assignment = grouper.update(make_signals([-3.0, 2.0, 2.8]))  # smoothed scores 0.0, 2.0, 1.9
    assert sorted(assignment.tolist()) == [0, 1, 2] and assignment.tolist() == [2, 0, 1]  # the ranking's groups
    stable = LayerGrouper(np.ones(4, dtype=bool), n_groups=2)  # a control: where no group empties, layers stay put
    stable.update(make_signals([0.0, 1.0, 2.0, 3.0]))
    assert stable.update(make_signals([3.0, 2.0, 1.0, 0.0])).tolist() == [1, 1, 0, 0]


def test_an_emptied_group_takes_back_its_ranked_layers_and_the_rest_keep_theirs() -> None:
    """5 layers, 3 groups, default smoothing 0.5 and margin 0.15. Without the reclaim the emptied group fell back to
    the plain ranking, dropping the hysteresis of every other layer (layer 3 below)."""
    grouper = LayerGrouper(np.ones(5, dtype=bool), n_groups=3)
    # First ranking 2.5 (layer 2), 1.4 (0) | 0.4 (3), -2.0 (1) | -2.4 (4): groups [0, 1, 0, 1, 2].
    assert grouper.update(make_signals([1.4, -2.0, 2.5, 0.4, -2.4])).tolist() == [0, 1, 0, 1, 2]
    # Smoothed (previous + raw) / 2: [-1.2, -1.3, 2.5, -0.9, -1.0], ranked 2, 3 | 4, 0 | 1: proposed [1, 2, 0, 0, 1].
    # Hysteresis (range ± 0.15): group 0's [-1.05, 2.65] keeps layer 2, not layer 0 (-1.2); group 1's [-1.35, -0.85]
    # keeps layers 1 (-1.3) and 3 (-0.9); group 2's [-1.45, -1.15] not layer 4 (-1.0). That is [1, 1, 0, 1, 1],
    # group 2 empty: it takes back its ranked layer 1, and layer 3 stays in group 1 (the ranking alone: group 0).
    assignment = grouper.update(make_signals([-3.8, -0.6, 2.5, -2.2, 0.4]))
    assert grouper._score is not None
    np.testing.assert_allclose(grouper._score, [-1.2, -1.3, 2.5, -0.9, -1.0], rtol=0, atol=1e-12)
    assert assignment.tolist() == [1, 2, 0, 1, 1]


def test_with_fewer_layers_than_groups_no_layer_shares_a_group_and_group_0_is_never_empty() -> None:
    """3 layers in 4 groups (the synthetic and mlp-fmnist tasks): layers kept in place within the margin ended as
    [2, 1, 2], group 0 (the most sensitive) empty, its precision action steering no layer and its features its
    neighbour's. The reclaim ran only with as many layers as groups."""
    grouper = LayerGrouper(np.ones(3, dtype=bool), n_groups=4, smoothing=0.0)
    assert grouper.update(make_signals([3.0, 2.0, 1.0])).tolist() == [0, 1, 2]
    # Ranked 1 > 2 > 0 now, each within the margin of its old group's: proposed [2, 0, 1], kept [2, 1, 2] before.
    assert grouper.update(make_signals([2.0, 2.2, 2.1])).tolist() == [2, 0, 1]
    rng = np.random.default_rng(0)
    for _ in range(300):  # noisy close scores: every update keeps three layers in three groups, group 0 among them
        assignment = grouper.update(make_signals((2.0 + 0.2 * rng.standard_normal(3)).tolist()))
        assert sorted(assignment.tolist()) == [0, 1, 2]


def test_grouper_ignores_non_controllable_layers() -> None:
    # Layer 1 (a norm) is the most sensitive but not controllable: it is in no group.
    scores = [1.0, 9.0, 3.0, 2.0, 0.0]
    controllable = [True, False, True, True, True]
    grouper = LayerGrouper(np.array(controllable), n_groups=2)
    grouper.update(make_signals(scores, controllable=controllable))
    assert grouper.indices.tolist() == [0, 2, 3, 4]
    assert grouper.layers_of(0).tolist() == [2, 3]
    assert grouper.layers_of(1).tolist() == [0, 4]


def test_grouper_needs_a_controllable_layer() -> None:
    with pytest.raises(
        ValueError, match=r"no controllable layer to group \(nn.Linear, .*compute them through nn.Linear"
    ):
        LayerGrouper(np.zeros(3, dtype=bool), n_groups=2)


def test_fewer_layers_than_groups_every_layer_grouped() -> None:
    grouper = LayerGrouper(np.ones(2, dtype=bool), n_groups=4)
    signals = make_signals([1.0, 2.0], n_params=[30, 10])
    assert grouper.update(signals).tolist() == [1, 0]
    layout = ObservationLayout(4)
    obs = build_observation(signals, grouper, base_batch_size=64, layout=layout)
    assert np.all(np.isfinite(obs))
    # Empty groups 2 and 3 borrow their nearest non-empty group (1) but own no parameters.
    for name in ("rel_sensitivity", "log_curvature", "log_variance", "log_snr", "is_fp32"):
        assert obs[layout.group(2, name)] == obs[layout.group(1, name)]
        assert obs[layout.group(3, name)] == obs[layout.group(1, name)]
    assert [obs[layout.group(g, "param_share")] for g in range(4)] == [0.25, 0.75, 0.0, 0.0]


def test_hysteresis_small_crossing_keeps_groups() -> None:
    # Default smoothing 0.5 and margin 0.15. First scores [4, 3, 2, 1] → groups [0, 0, 1, 1].
    grouper = LayerGrouper(np.ones(4, dtype=bool), n_groups=2)
    assert grouper.update(make_signals([4.0, 3.0, 2.0, 1.0])).tolist() == [0, 0, 1, 1]
    # Raw [4, 1, 2.2, 1] smooths to [4, 2.0, 2.1, 1]: layers 1 and 2 swap ranks by 0.1 < margin.
    assert grouper.update(make_signals([4.0, 1.0, 2.2, 1.0])).tolist() == [0, 0, 1, 1]
    assert grouper._score is not None
    np.testing.assert_allclose(grouper._score, [4.0, 2.0, 2.1, 1.0], rtol=0, atol=1e-12)


def test_hysteresis_big_move_changes_group() -> None:
    grouper = LayerGrouper(np.ones(4, dtype=bool), n_groups=2)
    grouper.update(make_signals([4.0, 3.0, 2.0, 1.0]))
    # Smooths to [4, 0, 4, 1]: layer 1 falls far below group 0, layer 2 rises far above group 1.
    assert grouper.update(make_signals([4.0, -3.0, 6.0, 1.0])).tolist() == [0, 1, 0, 1]


def test_hysteresis_margin_boundary_without_smoothing() -> None:
    grouper = LayerGrouper(np.ones(4, dtype=bool), n_groups=2, smoothing=0.0, margin=0.5)
    grouper.update(make_signals([4.0, 3.0, 2.0, 1.0]))
    # Layer 1 at 1.75 is 0.25 below group 0's new low end (2.0): within the margin → stays.
    assert grouper.update(make_signals([4.0, 1.75, 2.0, 1.0])).tolist() == [0, 0, 1, 1]
    # At 1.25 it is 0.75 below: beyond the margin → moves to group 1; layer 2 moves up.
    assert grouper.update(make_signals([4.0, 1.25, 2.0, 1.0])).tolist() == [0, 1, 0, 1]


def test_a_non_finite_score_does_not_stay_in_the_smoothed_ranking() -> None:
    """Before the fix one NaN curvature made the layer's smoothed score NaN for the rest of the run (0.5 * NaN + ...),
    ranked last: the most sensitive layer sat in the least sensitive group for good; +inf likewise stayed on top."""
    grouper = LayerGrouper(np.ones(4, dtype=bool), n_groups=2)
    assert grouper.update(make_signals([3.0, 2.0, 1.0, 0.0])).tolist() == [0, 0, 1, 1]
    missing = make_signals([3.0, 2.0, 1.0, 0.0])
    missing.curvature[0] = np.nan
    assert grouper.update(missing).tolist() == [0, 0, 1, 1]  # no measurement: the layer keeps its score
    assert grouper._score is not None
    np.testing.assert_array_equal(grouper._score, [3.0, 2.0, 1.0, 0.0])
    infinite = make_signals([3.0, 2.0, 1.0, 0.0])
    infinite.curvature[3] = np.inf
    assert grouper.update(infinite).tolist() == [0, 1, 1, 0]  # the top score, finite: (0 + 60) / 2 = 30
    np.testing.assert_array_equal(grouper._score, [3.0, 2.0, 1.0, 30.0])
    for _ in range(8):  # measured again, the layer's score decays back to its own
        assignment = grouper.update(make_signals([3.0, 2.0, 1.0, 0.0]))
    assert assignment.tolist() == [0, 0, 1, 1]
    assert grouper._score[3] == pytest.approx(30.0 / 2**8)
    # A first update with a NaN places the layer at the finite layers' median; with no finite score, at 0.
    first = LayerGrouper(np.ones(4, dtype=bool), n_groups=2)
    first.update(missing)
    np.testing.assert_array_equal(first._score, [1.0, 2.0, 1.0, 0.0])
    none = make_signals([0.0] * 4)
    none.curvature[:] = np.nan
    blind = LayerGrouper(np.ones(4, dtype=bool), n_groups=2)
    assert blind.update(none).tolist() == [0, 0, 1, 1]
    np.testing.assert_array_equal(blind._score, [0.0] * 4)


# ---------------------------------------------------------------- build_observation


def test_observation_float32_shape_bounds() -> None:
    signals = make_signals([3.0, 2.0, 1.0, 0.0])
    grouper = LayerGrouper(signals.controllable, n_groups=2)
    grouper.update(signals)
    layout = ObservationLayout(2)
    obs = build_observation(signals, grouper, base_batch_size=64, layout=layout)
    assert obs.dtype == np.float32
    assert obs.shape == (layout.size,)
    assert np.all(np.abs(obs) <= OBS_HIGH)


def test_observation_exact_values() -> None:
    # Groups of 2 layers: group 0 = layers 0, 1 (scores 3, 2) all bf16; group 1 = layers 2, 3 (1, 0) all fp16.
    signals = make_signals(
        [3.0, 2.0, 1.0, 0.0],
        precisions=[1, 1, 2, 2],
        n_params=[100, 100, 100, 100],
        grad_variance=np.array([100.0, 100.0, 10.0, 10.0]),
        loss=100.0,
        loss_trend=-0.25,
        noise_scale=2560.0,
        batch_size=256,
        memory_bytes=256,
        memory_budget_bytes=1024,
        lr_scale=0.5,
        overflow_rate=0.125,
        step_time_trend=3.0,
        progress=0.5,
    )
    grouper = LayerGrouper(signals.controllable, n_groups=2)
    grouper.update(signals)
    layout = ObservationLayout(2)
    obs = build_observation(signals, grouper, base_batch_size=64, layout=layout)
    g = layout.globals
    assert obs[g("log_loss")] == 2.0
    assert obs[g("loss_trend")] == -0.25
    assert obs[g("log_noise_over_batch")] == 1.0
    assert obs[g("headroom")] == 0.75
    assert obs[g("memory_use")] == 0.25
    assert obs[g("log2_batch")] == 2.0
    assert obs[g("log2_lr_scale")] == -1.0
    assert obs[g("overflow_rate")] == 0.125
    assert obs[g("step_time_trend")] == 1.0  # clipped
    assert obs[g("progress")] == 0.5
    # Mean curvature (1000 + 100 + 10 + 1) / 4, log10, / 5.
    assert obs[g("log_curvature")] == pytest.approx(math.log10(277.75) / 5, rel=1e-6)
    one_hot = slice(layout.group(0, "is_fp32"), layout.group(0, "is_fp16") + 1)
    assert obs[one_hot].tolist() == [0.0, 1.0, 0.0]
    one_hot = slice(layout.group(1, "is_fp32"), layout.group(1, "is_fp16") + 1)
    assert obs[one_hot].tolist() == [0.0, 0.0, 1.0]
    # Scores log10(curvature * variance) 5, 4 | 2, 1: median 3; group means 4.5 and 1.5.
    assert obs[layout.group(0, "rel_sensitivity")] == pytest.approx(1.5, abs=1e-6)
    assert obs[layout.group(1, "rel_sensitivity")] == pytest.approx(-1.5, abs=1e-6)
    assert obs[layout.group(0, "param_share")] == 0.5
    # Group means, log10, / 5: curvature (1000 + 100) / 2 and (10 + 1) / 2; variance 100 and 10.
    assert obs[layout.group(0, "log_curvature")] == pytest.approx(math.log10(550.0) / 5, rel=1e-6)
    assert obs[layout.group(1, "log_curvature")] == pytest.approx(math.log10(5.5) / 5, rel=1e-6)
    assert obs[layout.group(0, "log_variance")] == pytest.approx(0.4, rel=1e-6)
    assert obs[layout.group(1, "log_variance")] == pytest.approx(0.2, rel=1e-6)
    assert obs[layout.group(0, "log_snr")] == 0.0


def test_majority_precision_weighted_by_parameters() -> None:
    # One group: 3 small fp32 layers (10 params each) and one big bf16 layer (100 params) → bf16.
    signals = make_signals([1.0, 2.0, 3.0, 4.0], precisions=[0, 0, 0, 1], n_params=[10, 10, 10, 100])
    grouper = LayerGrouper(signals.controllable, n_groups=1)
    grouper.update(signals)
    layout = ObservationLayout(1)
    obs = build_observation(signals, grouper, base_batch_size=64, layout=layout)
    assert obs[layout.group(0, "is_fp32") : layout.group(0, "is_fp16") + 1].tolist() == [0.0, 1.0, 0.0]
    assert int(Precision.BF16) == 1


@pytest.mark.parametrize("extreme", [0.0, 1e300, float("inf"), float("nan")])
def test_observation_finite_for_extreme_signals(extreme: float) -> None:
    n = 4
    signals = make_signals(
        [0.0] * n,
        loss=extreme,
        loss_trend=extreme,
        probe_loss=extreme,
        noise_scale=extreme,
        step_time_trend=extreme,
        overflow_rate=extreme,
        lr_scale=extreme,
        progress=extreme,
        memory_bytes=0 if extreme == 0 else 10**30,
        memory_budget_bytes=0,
        batch_size=0,
    )
    signals.curvature = np.full(n, extreme)
    signals.grad_variance = np.full(n, extreme)
    signals.snr = np.full(n, extreme)
    signals.n_params = np.zeros(n, dtype=np.int64) if extreme == 0 else np.full(n, 10**12, dtype=np.int64)
    grouper = LayerGrouper(signals.controllable, n_groups=2)
    grouper.update(signals)
    layout = ObservationLayout(2)
    with np.errstate(all="ignore"):
        obs = build_observation(signals, grouper, base_batch_size=64, layout=layout)
    assert obs.dtype == np.float32
    assert np.all(np.isfinite(obs)), obs
    assert np.all(np.abs(obs) <= OBS_HIGH)


_any_float = st.floats(allow_nan=True, allow_infinity=True, width=64)


@settings(max_examples=75, deadline=None)
@given(
    per_layer=st.lists(st.tuples(_any_float, _any_float, _any_float), min_size=1, max_size=9),
    scalars=st.tuples(_any_float, _any_float, _any_float, _any_float, _any_float),
    ints=st.tuples(*(st.integers(min_value=0, max_value=2**62) for _ in range(3))),
    n_groups=st.integers(min_value=1, max_value=5),
)
def test_observation_always_in_bounds(
    per_layer: list[tuple[float, float, float]],
    scalars: tuple[float, float, float, float, float],
    ints: tuple[int, int, int],
    n_groups: int,
) -> None:
    n = len(per_layer)
    curvature, variance, snr = (np.array(column) for column in zip(*per_layer, strict=True))
    loss, trend, noise, lr_scale, progress = scalars
    signals = make_signals(
        [0.0] * n,
        loss=loss,
        loss_trend=trend,
        noise_scale=noise,
        lr_scale=lr_scale,
        progress=progress,
        step_time_trend=trend,
        overflow_rate=progress,
        memory_bytes=ints[0],
        memory_budget_bytes=ints[1],
        batch_size=ints[2],
        precisions=[i % 3 for i in range(n)],
    )
    signals.curvature, signals.grad_variance, signals.snr = curvature, variance, snr
    grouper = LayerGrouper(signals.controllable, n_groups=n_groups)
    layout = ObservationLayout(n_groups)
    with np.errstate(all="ignore"):
        grouper.update(signals)
        obs = build_observation(signals, grouper, base_batch_size=32, layout=layout)
    assert obs.dtype == np.float32
    assert obs.shape == (layout.size,)
    assert np.all(np.isfinite(obs))
    assert np.all(np.abs(obs) <= OBS_HIGH)
    # The one-hot of every group has exactly one 1.
    for group in range(n_groups):
        start = layout.group(group, "is_fp32")
        assert obs[start : start + 3].sum() == 1.0


@pytest.mark.parametrize(("source", "expected"), [("hutchinson", [1.0, -1.0]), ("fisher", [0.0, -1.0])])
def test_cheap_tier_sensitivity_never_reads_above_the_median(source: str, expected: list[float]) -> None:
    # Scores 3, 2 | 1, 0 as above: median 1.5, group means 2.5 and 0.5. From squared gradients alone
    # (no round) a group may read as less sensitive than the median, never as more.
    signals = make_signals([3.0, 2.0, 1.0, 0.0])
    signals.extra["curvature_source"] = source
    grouper = LayerGrouper(signals.controllable, n_groups=2)
    grouper.update(signals)
    layout = ObservationLayout(2)
    obs = build_observation(signals, grouper, base_batch_size=64, layout=layout)
    got = [float(obs[layout.group(group, "rel_sensitivity")]) for group in range(2)]
    assert got == pytest.approx(expected, abs=1e-6)


def test_a_layout_of_other_groups_than_the_grouper_is_refused() -> None:
    """The extra groups copied their neighbours' features and the vector had the expected size: nothing looked wrong."""
    signals = make_signals([0.0, 1.0, 2.0])
    grouper = LayerGrouper(signals.controllable, 2)
    grouper.update(signals)
    with pytest.raises(ValueError, match="the layout has 4 groups; the grouper 2"):
        build_observation(signals, grouper, 32, ObservationLayout(4))


def _one_group_observation(signals: Signals) -> tuple[np.ndarray, ObservationLayout]:
    grouper = LayerGrouper(signals.controllable, n_groups=1)
    grouper.update(signals)
    layout = ObservationLayout(1)
    return build_observation(signals, grouper, base_batch_size=64, layout=layout), layout


def test_memory_use_is_clipped_to_its_documented_range():
    obs, layout = _one_group_observation(make_signals([1.0, 2.0], memory_bytes=5000, memory_budget_bytes=1000))
    assert obs[layout.globals("memory_use")] == 2.0  # 5x the budget reads 2, the top of [0, 2]


def test_loss_trend_is_clipped_to_its_documented_range():
    """A loss that tripled (trend 3) reads 1 and a trend of -5 reads -1, the ends of [-1, 1]."""
    for trend, expected in ((3.0, 1.0), (-5.0, -1.0)):
        obs, layout = _one_group_observation(make_signals([1.0, 2.0], loss_trend=trend))
        assert obs[layout.globals("loss_trend")] == expected, trend


def test_group_features_are_weighted_by_parameters():
    """Scores 1 and 4 on 100 and 300 parameters (the median of the two is 2.5); a plain mean went unnoticed."""
    obs, layout = _one_group_observation(make_signals([1.0, 4.0], n_params=[100, 300]))
    assert obs[layout.group(0, "rel_sensitivity")] == pytest.approx((100 * 1 + 300 * 4) / 400 - 2.5, abs=1e-6)
    expected_curvature = math.log10((100 * 10 + 300 * 1e4) / 400) / 5
    assert obs[layout.group(0, "log_curvature")] == pytest.approx(expected_curvature, rel=1e-6)
    assert obs[layout.globals("log_curvature")] == pytest.approx(expected_curvature, rel=1e-6)  # over every layer


def test_the_relative_sensitivity_is_to_the_controllable_layers_median():
    """A norm's huge score must not move the median of the controllable 1, 2, 3 (the group's mean is 2)."""
    signals = make_signals([1.0, 2.0, 3.0, 50.0], controllable=[True, True, True, False])
    obs, layout = _one_group_observation(signals)
    assert obs[layout.group(0, "rel_sensitivity")] == pytest.approx(0.0, abs=1e-6)

"""Tests for triaccel_rl.actions (space, decode, encode) and triaccel_rl.reward (exact hand-computed values)."""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest
from gymnasium import spaces

from triaccel_rl.actions import action_space, decode, encode
from triaccel_rl.config import ControllerConfig, RewardConfig
from triaccel_rl.reward import reward
from triaccel_rl.types import Action, BatchMove, Precision

SMALL = ControllerConfig(n_groups=2, lr_scales=(0.5, 1.0, 2.0))


# ---------------------------------------------------------------- action space


def test_action_space_shape_default() -> None:
    space = action_space(ControllerConfig())
    assert isinstance(space, spaces.MultiDiscrete)
    assert space.nvec.tolist() == [3, 3, 3, 3, 5, 3]
    assert space.dtype == np.int64


def test_action_space_small() -> None:
    assert action_space(SMALL).nvec.tolist() == [3, 3, 3, 3]


def test_every_action_round_trips() -> None:
    nvec = action_space(SMALL).nvec.tolist()
    combos = list(itertools.product(*(range(n) for n in nvec)))
    assert len(combos) == 3 * 3 * 3 * 3
    decoded = set()
    for combo in combos:
        action = decode(np.array(combo), SMALL)
        p0, p1, lr_index, move = combo
        assert action == Action((Precision(p0), Precision(p1)), SMALL.lr_scales[lr_index], BatchMove(move))
        raw = encode(action, SMALL)
        assert raw.dtype == np.int64
        assert raw.tolist() == list(combo)
        assert action_space(SMALL).contains(raw)
        decoded.add(action)
    assert len(decoded) == len(combos)  # decode is injective


def test_decode_accepts_sampled_actions_and_lists() -> None:
    space = action_space(SMALL)
    space.seed(0)
    for _ in range(20):
        raw = space.sample()
        assert encode(decode(raw, SMALL), SMALL).tolist() == raw.tolist()
    assert decode([2, 0, 1, 0], SMALL) == Action((Precision.FP16, Precision.FP32), 1.0, BatchMove.SHRINK)


@pytest.mark.parametrize(
    ("raw", "index", "value", "high"),
    [([3, 0, 1, 1], 0, 3, 2), ([0, -1, 1, 1], 1, -1, 2), ([0, 0, 3, 1], 2, 3, 2), ([0, 0, 1, 7], 3, 7, 2)],
)
def test_out_of_range_entry_names_index_value_and_range(raw: list[int], index: int, value: int, high: int) -> None:
    with pytest.raises(ValueError, match=rf"action entry {index} = {value} is outside \[0, {high}\]") as info:
        decode(np.array(raw), SMALL)
    assert "MultiDiscrete([3, 3, 3, 3])" in str(info.value)


def test_out_of_range_entry_names_what_it_controls() -> None:
    config = ControllerConfig(n_groups=2)
    with pytest.raises(ValueError, match=r"precision of group 1: 0=fp32, 1=bf16, 2=fp16"):
        decode([0, 5, 0, 0], config)
    with pytest.raises(ValueError, match=r"outside \[0, 4\] \(LR-scale index into \(0.5, 0.75, 1.0, 1.25, 1.5\)\)"):
        decode([0, 0, 5, 0], config)
    with pytest.raises(ValueError, match=r"batch move: 0=shrink, 1=keep, 2=grow"):
        decode([0, 0, 0, 3], config)


@pytest.mark.parametrize("raw", [[0, 0, 1], [0, 0, 1, 1, 1], [[0, 0, 1, 1]]])
def test_wrong_length_rejected(raw: list[object]) -> None:
    with pytest.raises(ValueError, match=r"expected \(4,\)") as info:
        decode(np.array(raw), SMALL)
    assert f"has shape {np.array(raw).shape}" in str(info.value)


@pytest.mark.parametrize("raw", [[0.5, 0, 1, 1], [0, 0, 1, 1.25], [0, float("nan"), 1, 1], [0, 0, float("inf"), 1]])
def test_non_integer_floats_rejected(raw: list[float]) -> None:
    with pytest.raises(ValueError, match=r"must hold integers"):
        decode(np.array(raw), SMALL)


@pytest.mark.parametrize(
    ("raw", "dtype"),
    [(["0", "0", "1", "1"], "<U1"), ([False, False, True, True], "bool"), ([2 + 5j, 0, 1, 1], "complex128")],
)  # a complex entry was taken, its imaginary part dropped
def test_strings_and_booleans_are_no_action(raw: list[object], dtype: str) -> None:
    """A string array raised numpy's TypeError from the range check; booleans passed as 0 and 1."""
    with pytest.raises(ValueError, match=rf"must hold integers; got {dtype}"):
        decode(np.array(raw), SMALL)


def test_integral_floats_accepted() -> None:
    assert decode(np.array([1.0, 2.0, 2.0, 0.0]), SMALL) == Action(
        (Precision.BF16, Precision.FP16), 2.0, BatchMove.SHRINK
    )
    assert decode(np.array([0, 1, 0, 2], dtype=np.float32), SMALL).batch_move is BatchMove.GROW


def test_integral_float_out_of_range_still_named() -> None:
    with pytest.raises(ValueError, match=r"action entry 0 = 3 is outside \[0, 2\]"):
        decode(np.array([3.0, 0.0, 0.0, 0.0]), SMALL)
    # Cast to int64 first, 1e19 wrapped round and was reported as -9223372036854775808.
    with pytest.raises(ValueError, match=r"action entry 3 = 1e\+19 is outside \[0, 2\]"):
        decode([0, 0, 1, 1e19], SMALL)


def test_a_list_mixing_booleans_and_integers_is_no_action() -> None:
    """``np.asarray`` makes such a list int64, so the dtype check let True through as index 1."""
    with pytest.raises(ValueError, match=r"action \[True, 0, 1, 1\] must hold integers; True and False are no"):
        decode([True, 0, 1, 1], SMALL)
    assert decode([1, 0, 1, 1], SMALL).group_precisions == (Precision.BF16, Precision.FP32)  # the control


def test_encode_rejects_unknown_lr_scale() -> None:
    action = Action((Precision.FP32, Precision.FP32), 0.75, BatchMove.KEEP)
    with pytest.raises(ValueError, match=r"lr_scale=0.75 is not one of \(0.5, 1.0, 2.0\)"):
        encode(action, SMALL)


def test_an_action_takes_codes_and_names_and_refuses_what_is_neither() -> None:
    """``batch_move=2`` was read as "keep" by the executor's identity checks, silently; an integer precision failed
    deep in it on a missing attribute; "grow", 7 and None were accepted as "keep"."""
    action = Action((1, "fp16"), 1.0, 2)  # type: ignore[arg-type]
    assert action == Action((Precision.BF16, Precision.FP16), 1.0, BatchMove.GROW)
    assert action.batch_move is BatchMove.GROW and action.group_precisions[0] is Precision.BF16
    for move in ("grow", 7, None, True, 1.0):
        with pytest.raises(ValueError, match=rf"batch_move={move!r} must be a BatchMove: shrink \(0\), keep"):
            Action((Precision.FP32,), 1.0, move)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"unknown precision 'fp8'; allowed: fp32, bf16, fp16"):
        Action(("fp8",), 1.0, BatchMove.KEEP)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"group_precisions='bf16' must be a sequence of precisions"):
        Action("bf16", 1.0, BatchMove.KEEP)  # type: ignore[arg-type]


def test_an_actions_lr_scale_is_a_positive_finite_number() -> None:
    """``lr_scale=True`` was kept as True and encoded as the 1.0 rung; "1.0" gave "lr_scale 1.0 is not one of (...,
    1.0, ...)" from encode."""
    for bad in (True, "1.0", None, 0.0, -1.0, math.nan, math.inf, 10**400):  # 10**400: an OverflowError
        with pytest.raises(ValueError, match=rf"^lr_scale={re.escape(repr(bad))} must be a positive finite number"):
            Action((Precision.FP32,), bad, BatchMove.KEEP)  # type: ignore[arg-type]
    action = Action((Precision.FP32,), np.float32(0.5), BatchMove.KEEP)  # type: ignore[arg-type]
    assert type(action.lr_scale) is float and action.lr_scale == 0.5
    assert Action((Precision.FP32,), 2, BatchMove.KEEP).lr_scale == 2.0


def test_encode_rejects_wrong_group_count() -> None:
    action = Action((Precision.FP32,) * 3, 1.0, BatchMove.KEEP)
    with pytest.raises(ValueError, match=r"action has 3 groups; config has 2"):
        encode(action, SMALL)


# ---------------------------------------------------------------- reward

# A clip far out of reach, so these cases test the formula and not the clipping.
PLAIN = RewardConfig(
    progress_scale=1.0, nonfinite_penalty=2.0, over_budget_penalty=3.0, divergence_penalty=4.0, clip=1000.0
)


def call(
    *,
    previous: float = 1.0,
    now: float = 1.0,
    cost: float = 100.0,
    budget_left: float = 1000.0,
    overflow: float = 0.0,
    over_budget: bool = False,
    diverged: bool = False,
    divergence_loss: float = 3.0,
    config: RewardConfig = PLAIN,
) -> float:
    return reward(
        previous_probe_loss=previous,
        probe_loss=now,
        cost_ms=cost,
        budget_left_ms=budget_left,
        overflow_rate=overflow,
        over_budget=over_budget,
        diverged=diverged,
        divergence_loss=divergence_loss,
        config=config,
    )


def test_no_progress_no_penalty_is_zero() -> None:
    assert call() == 0.0


def test_progress_is_log_ratio() -> None:
    # e -> 1: log(e) - log(1) = 1, exactly representable arithmetic.
    assert call(previous=math.e, now=1.0) == 1.0
    assert call(previous=1.0, now=math.e) == -1.0


@pytest.mark.parametrize("cost", [1.0, 50.0, 100.0, 1000.0])
def test_progress_does_not_depend_on_cost_within_budget(cost: float) -> None:
    # The budget, not a progress/cost ratio, charges for time: a cheap interval earns no bonus.
    assert call(previous=math.e, now=1.0, cost=cost, budget_left=1000.0) == 1.0


@pytest.mark.parametrize(
    ("cost", "budget_left", "expected"), [(100.0, 50.0, 0.5), (200.0, 50.0, 0.25), (100.0, 100.0, 1.0)]
)
def test_overrunning_interval_counts_the_share_that_fitted(cost: float, budget_left: float, expected: float) -> None:
    assert call(previous=math.e, now=1.0, cost=cost, budget_left=budget_left) == expected


def test_penalties_are_not_prorated() -> None:
    # Half the interval fitted: half the progress (0.5) but the whole overflow penalty (2 * 0.25).
    assert call(previous=math.e, now=1.0, cost=100.0, budget_left=50.0, overflow=0.25) == 0.5 - 0.5


def test_progress_scale_multiplies() -> None:
    config = RewardConfig(progress_scale=10.0, clip=100.0)
    assert call(previous=math.e, now=1.0, config=config) == 10.0
    assert call(previous=math.e**2, now=1.0, config=config) == 20.0
    # Progress past the default clip of 100 is clipped.
    assert call(previous=math.e**20, now=1.0, config=RewardConfig(progress_scale=10.0)) == 100.0


def test_docstring_example() -> None:
    value = call(previous=1.0, now=math.exp(-0.1), cost=50.0, budget_left=25.0, config=RewardConfig())
    assert value == pytest.approx(0.5, abs=1e-12)


def test_penalties_subtract() -> None:
    assert call(overflow=0.25) == -0.5
    assert call(over_budget=True) == -3.0
    assert call(previous=math.e, now=1.0, overflow=0.5, over_budget=True) == 1.0 - 1.0 - 3.0


@pytest.mark.parametrize(("previous", "expected"), [(math.exp(100.0), 100.0), (math.exp(-100.0), -100.0)])
def test_clipped_at_clip(previous: float, expected: float) -> None:
    assert call(previous=previous, now=1.0, config=RewardConfig()) == expected


def test_custom_clip() -> None:
    config = RewardConfig(progress_scale=1.0, clip=0.5)
    assert call(previous=math.e, now=1.0, config=config) == 0.5
    assert call(previous=1.0, now=math.e, config=config) == -0.5


def test_penalties_also_clipped() -> None:
    config = RewardConfig(over_budget_penalty=50.0, clip=3.0)
    assert call(over_budget=True, config=config) == -3.0


def test_divergence_charges_the_threshold_not_the_loss_reached_and_keeps_the_other_penalties() -> None:
    # The loss reached (1.0, a drop) is not read: the interval is charged from e to the threshold 3, then 2 + 3 + 4.
    value = call(previous=math.e, now=1.0, overflow=1.0, over_budget=True, diverged=True, divergence_loss=3.0)
    assert value == pytest.approx(1.0 - math.log(3.0) - 2.0 - 3.0 - 4.0, rel=1e-12)


@pytest.mark.parametrize("now", [float("nan"), float("inf")])
def test_non_finite_probe_loss_counts_as_divergence(now: float) -> None:
    assert call(now=now, divergence_loss=3.0) == pytest.approx(-math.log(3.0) - 4.0, rel=1e-12)


def test_zero_probe_losses_are_floored_not_errors() -> None:
    # Both losses floored at 1e-12: log ratio 0.
    assert call(previous=0.0, now=0.0) == 0.0
    assert call(previous=1.0, now=0.0) == pytest.approx(math.log(1e12), rel=1e-15)


@pytest.mark.parametrize(("cost", "budget_left"), [(0.0, 100.0), (-1.0, 100.0), (100.0, 0.0), (float("nan"), 100.0)])
def test_non_positive_cost_or_spent_budget_raises(cost: float, budget_left: float) -> None:
    with pytest.raises(ValueError, match=r"must be positive \(an episode ends once its budget is spent\)") as info:
        call(cost=cost, budget_left=budget_left)
    assert f"cost_ms={cost} and budget_left_ms={budget_left}" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"previous": float("nan")}, r"previous_probe_loss=nan must be finite"),
        ({"previous": float("inf")}, r"previous_probe_loss=inf must be finite"),
        ({"overflow": float("nan")}, r"overflow_rate=nan must be a fraction in \[0, 1\]"),
        ({"overflow": 1.5}, r"overflow_rate=1.5 must be a fraction in \[0, 1\]"),
        ({"overflow": -0.25}, r"overflow_rate=-0.25 must be a fraction in \[0, 1\]"),
    ],
)
def test_a_non_finite_previous_loss_or_an_overflow_rate_outside_0_1_is_refused(kwargs: dict, message: str) -> None:
    """Before, a NaN previous loss or overflow rate passed through ``max(-clip, nan)`` as -clip: a divergence's reward
    for an input error; an overflow rate of 1.5 was charged as such."""
    with pytest.raises(ValueError, match=message):
        call(**kwargs)


def test_reward_is_float() -> None:
    assert type(call(previous=2.0, now=1.0)) is float


def test_divergence_reward_within_documented_clip() -> None:
    config = RewardConfig(divergence_penalty=50.0, clip=10.0)
    assert call(diverged=True, config=config) == -config.clip  # -50, clipped to -10


def test_a_diverged_interval_is_charged_the_progress_to_the_threshold_and_the_penalty() -> None:
    """Exact: L 1 -> diverged with threshold e^2 (PLAIN: progress_scale 1, penalties 2, 3, 4), half the interval
    within the budget: 1 * (0 - 2) * 0.5 - 2 * 0.25 - 3 - 4. The probe loss itself is not read (it may be NaN)."""
    for now in (math.nan, 1e6, math.inf):
        value = call(previous=1.0, now=now, cost=100.0, budget_left=50.0, overflow=0.25, over_budget=True,
                     diverged=True, divergence_loss=math.exp(2.0))  # fmt: skip
        assert value == pytest.approx(-1.0 - 0.5 - 3.0 - 4.0, rel=1e-12)
    # A non-finite probe loss is a divergence even when not flagged one.
    assert call(previous=1.0, now=math.nan, divergence_loss=math.exp(2.0)) == pytest.approx(-2.0 - 4.0, rel=1e-12)
    # A run whose loss began above the threshold makes no progress by diverging: the penalty alone.
    assert call(previous=10.0, diverged=True, divergence_loss=math.exp(2.0)) == -4.0


def test_the_reward_falls_with_the_loss_across_the_divergence_threshold() -> None:
    """The reviewer's case: L 1.0 -> 2.5 (not diverged) earned -9.16 and L 1.0 -> 1e6 (diverged) -5.0, so a policy
    was paid to overshoot. Now a diverged interval earns no more than one whose loss ended just under the threshold,
    for the default weights and the clipped ones."""
    for config in (RewardConfig(), RewardConfig(divergence_penalty=50.0, clip=10.0), PLAIN):
        for threshold in (1.5, 3.0, 20.0):
            under = call(previous=1.0, now=threshold * (1 - 1e-9), config=config, divergence_loss=threshold)
            over = call(previous=1.0, now=1e6, diverged=True, config=config, divergence_loss=threshold)
            expected = -config.progress_scale * math.log(threshold) - config.divergence_penalty
            assert over == pytest.approx(max(-config.clip, expected), rel=1e-12)
            assert over <= under
    default = RewardConfig()
    rose = call(previous=1.0, now=2.5, config=default)  # -9.163
    diverged = call(previous=1.0, now=1e6, diverged=True, config=default, divergence_loss=2.5)
    assert diverged == pytest.approx(-10.0 * math.log(2.5) - 5.0, rel=1e-12) and diverged < rose


def test_a_divergence_threshold_that_is_no_finite_loss_is_refused_by_name() -> None:
    for bad in (math.nan, math.inf, -1.0):
        with pytest.raises(ValueError, match=r"divergence_loss=.* must be a finite probe loss >= 0"):
            call(diverged=True, divergence_loss=bad)


# ---------------------------------------------------------------- budget episodes: halving the batch
FIXED_MS = 0.2
"""Per-step fixed time of the toy cost model (the shipped profile's ``fixed_ms``)."""
PER_SAMPLE_MS = 0.001
"""Per-sample compute time of the toy cost model."""
PROGRESS_PER_SAMPLE = 1e-4
"""Log probe-loss drop per trained sample: equal for every batch size in these episodes."""


def budget_episode_return(
    batch_size: int, budget_ms: float, interval_steps: int = 10, fixed_ms: float = FIXED_MS
) -> tuple[float, int]:
    """Return and step count of a toy episode run the way ``TriAccelEnv.step`` runs one.

    Each interval is cut to the steps the budget has left (rounded up), its log-loss drop is
    ``PROGRESS_PER_SAMPLE`` × samples, and the reward pro-rates the overrunning interval. A model with exact
    answers for the reward's arithmetic; ``tests/test_env.py::test_a_halved_batch_runs_more_steps_in_the_same_budget
    _and_the_overrun_earns_only_its_share`` drives the real environment the same way.
    """
    step_ms = fixed_ms + PER_SAMPLE_MS * batch_size
    config = RewardConfig(progress_scale=1.0, clip=1e9)
    spent = total = 0.0
    steps_taken = 0
    log_loss = 0.0
    while spent < budget_ms * (1 - 1e-9):
        left = budget_ms - spent
        steps = max(1, min(interval_steps, math.ceil(left / step_ms - 1e-9)))
        previous, log_loss = log_loss, log_loss - PROGRESS_PER_SAMPLE * batch_size * steps
        total += reward(previous_probe_loss=math.exp(previous), probe_loss=math.exp(log_loss),
                        cost_ms=steps * step_ms, budget_left_ms=left, overflow_rate=0.0, over_budget=False,
                        diverged=False, divergence_loss=3.0, config=config)  # fmt: skip
        spent += steps * step_ms
        steps_taken += steps
    return total, steps_taken


def test_halving_the_batch_earns_less_for_the_same_budget() -> None:
    # Budget: 16 intervals of 10 steps at batch 64 (0.264 ms a step) = 42.24 ms.
    budget = 16 * 10 * (FIXED_MS + PER_SAMPLE_MS * 64)
    base, base_steps = budget_episode_return(64, budget)
    half, half_steps = budget_episode_return(32, budget)
    # Batch 64: exactly 160 steps, 64 * 160 samples * 1e-4 = 1.024.
    assert base_steps == 160
    assert base == pytest.approx(1.024, rel=1e-12)
    # Batch 32 (0.232 ms a step): 182.07 steps fit; 183 run, the last pro-rated: 32e-4 * 42.24 / 0.232.
    assert half_steps == 183
    assert half == pytest.approx(32e-4 * budget / 0.232, rel=1e-9)  # 0.5826...
    assert half < base


def test_without_a_fixed_step_cost_halving_earns_the_same() -> None:
    # The control case: with cost proportional to samples, batch size alone changes nothing (1.024 each).
    budget = 16 * 10 * PER_SAMPLE_MS * 64
    base, _ = budget_episode_return(64, budget, fixed_ms=0.0)
    half, half_steps = budget_episode_return(32, budget, fixed_ms=0.0)
    assert half_steps == 320
    assert base == pytest.approx(1.024, rel=1e-12)
    assert half == pytest.approx(1.024, rel=1e-12)

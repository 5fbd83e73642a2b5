"""``SignalConfig`` refuses each bad value by name: the field, the value given and what is allowed.

The range checks of right-typed values have their cases in ``test_signal_scheduler.py``; these cover every field
against the values of the wrong kind (a bool where a number goes, NaN/inf, strings, None) and the ends of each
range, and that the defaults and some valid non-default values are taken as given.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import asdict, replace
from fractions import Fraction

import numpy as np
import pytest

from triaccel_rl.errors import ConfigError
from triaccel_rl.signals import Schedule, SignalConfig, SignalMode

_COUNTS = {
    "target_interval_steps": ">= 1",
    "micro_batch_size": ">= 1",
    "hutchinson_batch_size": ">= 1",
    "max_microbatches": ">= 2",
    "max_probes": ">= 1",
    "fixed_interval_steps": ">= 1",
    "fixed_microbatches": ">= 2",
    "fixed_probes": ">= 1",
}
_NUMBERS = {
    "budget_frac": "in (0, 1)",
    "expensive_share": "in (0, 1)",
    "round_ema_decay": "in [0, 1)",
    "small_threshold": "in [0, 1]",
    "lr_factor_exponent": "> 0",
    "lr_factor_min": "in (0, 1]",
    "lr_factor_max": "in [1, inf)",
}
_OPTIONAL_NUMBERS = {
    "observe_budget_frac": "in (0, budget_frac)",
    "cheap_budget_frac": "in (observe_budget_frac, budget_frac]",
}


def _type_cases() -> list[tuple[str, object, str]]:
    """(field, value, the whole message) for each value of the wrong kind."""
    cases: list[tuple[str, object, str]] = []
    for name, allowed in _COUNTS.items():
        for value in (True, False, 2.5, 2.0, math.nan, math.inf, "4", None):
            cases.append(
                (name, value, f"{name}={value!r} must be a whole number {allowed}; got {type(value).__name__}")
            )
    for value in (True, 1.5, math.nan, "0", None):
        cases.append(("seed", value, f"seed={value!r} must be a whole number (any sign); got {type(value).__name__}"))
    for name, allowed in _NUMBERS.items():
        for value in (True, False, "0.5", None, [0.5], 1j):
            cases.append((name, value, f"{name}={value!r} must be a number {allowed}; got {type(value).__name__}"))
    for name, allowed in _OPTIONAL_NUMBERS.items():
        for value in (True, False, "0.002", [0.002]):
            cases.append(
                (name, value, f"{name}={value!r} must be a number {allowed}, or None; got {type(value).__name__}")
            )
    for name in ("lr_factors", "warmup_round"):
        for value in (1, 0, "yes", "False", None):
            cases.append((name, value, f"{name}={value!r} must be True or False"))
    return cases


def _range_cases() -> list[tuple[str, object, str]]:
    """(field, value, the start of the message) for numbers of the right type out of their range (NaN, inf too)."""
    cases: list[tuple[str, object, str]] = []
    for name, floor in _COUNTS.items():
        least = int(floor.removeprefix(">= "))
        for value in (least - 1, -1):
            cases.append((name, value, f"{name}={value} must be >= {least}"))
    for value in (0.0, 1.0, -0.01, math.nan, math.inf):
        cases.append(("budget_frac", value, f"budget_frac={value} must be in (0, 1)"))
    for value in (0.0, 1.0, 1.01, math.nan, -math.inf):  # 1.0: the decisions' share 0 failed later, named "share"
        cases.append(("expensive_share", value, f"expensive_share={value} must be in (0, 1)"))
    for value in (1.0, -0.1, math.nan, math.inf):
        cases.append(("round_ema_decay", value, f"round_ema_decay={value} must be in [0, 1)"))
    for value in (-0.01, 1.5, math.nan, math.inf):
        cases.append(("small_threshold", value, f"small_threshold={value} must be in [0, 1]"))
    for value in (0.0, -1.0, math.nan, math.inf):
        cases.append(("lr_factor_exponent", value, f"lr_factor_exponent={value} must be a positive number"))
    for value in (0.0, 1.5, -0.5, math.nan):
        cases.append(("lr_factor_min", value, f"need 0 < lr_factor_min={value} <= 1 <= lr_factor_max=2.0 < inf"))
    for value in (0.9, math.nan, math.inf):
        cases.append(("lr_factor_max", value, f"need 0 < lr_factor_min=0.5 <= 1 <= lr_factor_max={value} < inf"))
    for value in (0.0, 1.0, 0.02, 0.5, math.nan, math.inf):  # 0.5 was taken under cheap_budget_frac=None
        message = f"observe_budget_frac={value} must be in (0, budget_frac=0.02), or None"
        cases.append(("observe_budget_frac", value, message))
    # (0.001 or 0.0005 alone are taken: the unset observe_budget_frac is derived under them.)
    for value in (0.0, -0.001, 0.021, math.nan, math.inf):
        cases.append(("cheap_budget_frac", value, f"cheap_budget_frac={value} must be in (observe_budget_frac=0.001, "))
    return cases


@pytest.mark.parametrize(("name", "value", "message"), _type_cases())
def test_a_value_of_the_wrong_kind_is_refused_by_name(name: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        SignalConfig(**{name: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "value", "message"), _range_cases())
def test_a_number_out_of_its_range_is_refused_by_name(name: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        SignalConfig(**{name: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("mode", None, "unknown signal mode None; allowed: cheap, all"),
        ("mode", True, "unknown signal mode True; allowed: cheap, all"),
        ("mode", Schedule.FIXED, "unknown signal mode <Schedule.FIXED: 'fixed'>; allowed: cheap, all"),
        ("schedule", 1, "unknown schedule 1; allowed: adaptive, fixed"),
        ("schedule", None, "unknown schedule None; allowed: adaptive, fixed"),
    ],
)
def test_an_unknown_choice_is_refused_with_the_allowed_ones(name: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        SignalConfig(**{name: value})  # type: ignore[arg-type]


def test_the_defaults_pass_and_are_unchanged() -> None:
    config = SignalConfig()
    assert asdict(config) == {
        "mode": SignalMode.ALL,
        "budget_frac": 0.02,
        "expensive_share": 0.5,
        "schedule": Schedule.ADAPTIVE,
        "target_interval_steps": 200,
        "micro_batch_size": 32,
        "hutchinson_batch_size": 128,
        "max_microbatches": 16,
        "max_probes": 8,
        "fixed_interval_steps": 100,
        "fixed_microbatches": 4,
        "fixed_probes": 2,
        "round_ema_decay": 0.5,
        "small_threshold": 0.01,
        "lr_factors": False,
        "lr_factor_exponent": 0.5,
        "lr_factor_min": 0.5,
        "lr_factor_max": 2.0,
        "warmup_round": True,
        "seed": 0,
        "observe_budget_frac": 0.001,
        "cheap_budget_frac": 0.004,
    }
    for name in ("default", "cheap", "fixed", "thorough"):
        SignalConfig.preset(name)


@pytest.mark.parametrize(
    "overrides",
    [
        # The ends of each range that are inside it.
        {"budget_frac": 0.999, "expensive_share": 0.999, "round_ema_decay": 0.0, "small_threshold": 1.0},
        {"small_threshold": 0.0, "lr_factor_min": 1.0, "lr_factor_max": 1.0, "lr_factor_exponent": 1e-9},
        {"max_microbatches": 2, "fixed_microbatches": 2, "max_probes": 1, "fixed_probes": 1},
        {"target_interval_steps": 1, "micro_batch_size": 1, "hutchinson_batch_size": 1, "fixed_interval_steps": 1},
        {"cheap_budget_frac": 0.02, "observe_budget_frac": 0.0019},
        # None where it is allowed; then cheap_budget_frac only needs to be above 0.
        {"observe_budget_frac": None, "cheap_budget_frac": None},
        {"observe_budget_frac": None, "cheap_budget_frac": 1e-6},
        # Whole-number floats and other real numbers where a number goes; ints where a float is the default.
        {"budget_frac": Fraction(1, 10), "lr_factor_max": 3, "lr_factor_min": 1, "round_ema_decay": 0},
        {"budget_frac": np.float64(0.05), "max_probes": np.int64(3), "micro_batch_size": np.int32(16)},
        {"seed": -7, "lr_factors": True, "warmup_round": False, "mode": "cheap", "schedule": "FIXED"},
        {"seed": 2**70, "max_microbatches": 1024, "lr_factor_max": 1e6},
    ],
)
def test_valid_non_default_values_are_taken(overrides: dict[str, object]) -> None:
    """Python's numbers as given; a NumPy number or a Fraction as the ``int`` or ``float`` it equals (a checkpoint
    holding a NumPy one failed ``torch.load(weights_only=True)``)."""
    config = replace(SignalConfig(), **overrides)
    for name, value in overrides.items():
        if name in ("mode", "schedule"):
            assert getattr(config, name).value == str(value).lower()
        else:
            if type(value) in (type(None), bool, int, float):
                expected = value
            else:
                expected = int(value) if isinstance(value, numbers.Integral) else float(value)
            assert getattr(config, name) == expected and type(getattr(config, name)) is type(expected)


def test_a_preset_override_of_an_unknown_field_is_refused_by_name() -> None:
    """It raised replace()'s TypeError ('unexpected keyword argument') before."""
    with pytest.raises(
        ConfigError, match=r"^SignalConfig has no field\(s\) \['budget'\]; its fields: mode, budget_frac"
    ):
        SignalConfig.preset("cheap", budget=0.1)
    with pytest.raises(ConfigError, match=r"^budget_frac=True must be a number in \(0, 1\); got bool$"):
        SignalConfig.preset("thorough", budget_frac=True)
    assert SignalConfig.preset("thorough", budget_frac=0.2).budget_frac == 0.2


def test_a_small_budget_scales_the_sub_budgets_left_at_their_defaults_and_checks_those_set() -> None:
    """``budget_frac=0.003`` was refused for cheap_budget_frac=0.004 and observe_budget_frac=0.001, fields its user
    never set. Left as they are, they now take their shares of the default 2% budget (5% and 20%); set by hand, the
    same values are still checked."""
    assert (SignalConfig().observe_budget_frac, SignalConfig().cheap_budget_frac) == (0.001, 0.004)  # unchanged
    small = SignalConfig(budget_frac=0.003)
    assert small.observe_budget_frac == pytest.approx(0.003 * 0.05, rel=1e-12)
    assert small.cheap_budget_frac == pytest.approx(0.003 * 0.2, rel=1e-12)
    assert replace(SignalConfig(), budget_frac=0.002).cheap_budget_frac == pytest.approx(0.0004, rel=1e-12)
    with pytest.raises(ConfigError, match=r"cheap_budget_frac=0.004 must be in"):
        SignalConfig(budget_frac=0.003, cheap_budget_frac=0.004)


def test_unset_sub_budgets_are_derived_from_the_final_values_and_only_those_set_are_refused() -> None:
    """``observe_budget_frac=0.005`` (and ``budget_frac=0.003, observe_budget_frac=0.001``) were refused for a
    ``cheap_budget_frac`` their user never set; ``replace(config, budget_frac=...)`` kept sub-budgets shrunk for the
    old budget, where a new config derived others."""
    # An unset cheap_budget_frac: the recording's share plus the default's 0.3% room (0.15 * 0.3% under a 0.3%
    # budget), at most budget_frac.
    room = 0.004 - 0.001  # the defaults' difference, computed as the config does
    larger = SignalConfig(observe_budget_frac=0.005)
    assert (larger.observe_budget_frac, larger.cheap_budget_frac) == (0.005, 0.005 + room)
    assert type(larger.observe_budget_frac) is float  # set by hand: kept as given
    small = SignalConfig(budget_frac=0.003, observe_budget_frac=0.001)
    assert small.cheap_budget_frac == pytest.approx(0.001 + room * 0.15, rel=1e-12)
    assert SignalConfig(observe_budget_frac=0.019).cheap_budget_frac == 0.02  # capped at the budget
    assert SignalConfig(observe_budget_frac=0.0005).cheap_budget_frac == 0.004  # the default where it fits
    assert SignalConfig(observe_budget_frac=None).cheap_budget_frac == 0.004
    # An unset observe_budget_frac under a smaller cheap_budget_frac set by hand: a quarter of it.
    assert SignalConfig(cheap_budget_frac=0.0005).observe_budget_frac == pytest.approx(0.000125, rel=1e-12)
    assert SignalConfig(cheap_budget_frac=0.01).observe_budget_frac == 0.001
    # replace() derives the unset ones again from the new values: the same as a fresh config.
    shrunk = SignalConfig(budget_frac=0.002)
    for budget in (0.05, 0.0001, 0.003):
        again, fresh = replace(shrunk, budget_frac=budget), SignalConfig(budget_frac=budget)
        assert (again.observe_budget_frac, again.cheap_budget_frac) == pytest.approx(
            (fresh.observe_budget_frac, fresh.cheap_budget_frac), rel=1e-12
        )
    assert replace(larger, observe_budget_frac=0.0001).cheap_budget_frac == 0.004
    assert replace(shrunk, observe_budget_frac=None).cheap_budget_frac == pytest.approx(0.0004, rel=1e-12)
    assert SignalConfig.preset("thorough", observe_budget_frac=0.05).cheap_budget_frac == 0.05 + room
    # Values set by hand that do not fit together are refused, by their values.
    with pytest.raises(ConfigError, match=r"^cheap_budget_frac=0.001 must be in \(observe_budget_frac=0.001, "):
        SignalConfig(observe_budget_frac=0.001, cheap_budget_frac=0.001)
    with pytest.raises(ConfigError, match=r"^observe_budget_frac=0.005 must be in \(0, budget_frac=0.003\)"):
        SignalConfig(budget_frac=0.003, observe_budget_frac=0.005)


def test_an_unset_cheap_budget_keeps_the_reductions_room_over_any_observe_budget_and_rises_smoothly() -> None:
    """Before the fix the room was added only from the default up (``observe_budget_frac >= 0.004``): below it the
    derived cheap_budget_frac stayed 0.4%, under the documented floor (``observe_budget_frac=0.0039`` left 0.01% for
    the reduction), and it jumped from 0.4% to 0.7% between 0.0039 and 0.004."""
    room = 0.004 - 0.001  # the defaults' difference, computed as the config does
    observed = [0.0005, 0.001, 0.002, 0.0035, 0.0039, 0.004, 0.005, 0.019]
    cheap = [SignalConfig(observe_budget_frac=value).cheap_budget_frac for value in observed]
    assert cheap == [min(0.02, max(0.004, value + room)) for value in observed]
    assert cheap[2] == pytest.approx(0.005, rel=1e-12) and cheap[4] == pytest.approx(0.0069, rel=1e-12)
    for value, derived in zip(observed, cheap, strict=True):
        assert derived - value >= room - 1e-15 or derived == 0.02  # the room, where the budget leaves it
    assert cheap == sorted(cheap)  # no step down
    assert cheap[5] - cheap[4] == pytest.approx(0.0001, rel=1e-9)  # no jump at the default: 0.0069, then 0.007
    # The range observe_budget_frac is documented with, (0, budget_frac), is the one enforced.
    with pytest.raises(ConfigError, match=r"^observe_budget_frac=0.05 must be in \(0, budget_frac=0.02\)"):
        SignalConfig(observe_budget_frac=0.05)
    assert "in (0, ``budget_frac``)" in " ".join((SignalConfig.__doc__ or "").split())

"""Config and precision-map inputs refused by name, or taken in every form the other inputs take.

``SignalConfig`` raised an OverflowError, naming no field, on an int past a float's range (``10 ** 400``, from a
JSON) for ``lr_factor_exponent`` and ``observe_budget_frac``, and took it for ``lr_factor_max`` to fail mid-run.
``LayerPrecision.set`` and ``StepEngine.set_precisions`` took a tensor as a container and refused its first element
as "unknown precision tensor(1)"; a float NumPy array's as "unknown precision np.float64(1.0)".
``HeuristicConfig.start_precision`` refused ``Precision.BF16``, ``"BF16"`` and ``" bf16"``, which ``Precision.parse``
takes.
"""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from triaccel_rl.config import HeuristicConfig
from triaccel_rl.engine import StepEngine
from triaccel_rl.errors import ConfigError
from triaccel_rl.precision import LayerPrecision
from triaccel_rl.signals import SignalConfig
from triaccel_rl.types import Precision

_HUGE = 10**400
"""An int too large for a float (``float(_HUGE)`` raises OverflowError), as a JSON config may hold."""

# ------------------------------------------------------------------------------------- SignalConfig


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("lr_factor_exponent", f"lr_factor_exponent={_HUGE} must be a positive number"),
        ("lr_factor_max", f"need 0 < lr_factor_min=0.5 <= 1 <= lr_factor_max={_HUGE} < inf"),
    ],
)
def test_an_int_past_a_floats_range_is_a_config_error_naming_its_field(name: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        SignalConfig(**{name: _HUGE})


@pytest.mark.parametrize("cheap", [{}, {"cheap_budget_frac": None}, {"cheap_budget_frac": 0.01}])
def test_a_huge_observe_budget_frac_is_refused_whether_or_not_the_cheap_budget_is_derived(cheap: dict) -> None:
    """The derivation of an unset ``cheap_budget_frac`` (``{}``) read it before the range check, and overflowed."""
    message = f"observe_budget_frac={_HUGE} must be in (0, budget_frac=0.02), or None to record every step"
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        SignalConfig(observe_budget_frac=_HUGE, **cheap)


def test_large_finite_lr_factors_are_still_taken_as_given() -> None:
    config = SignalConfig(lr_factor_exponent=10**6, lr_factor_max=10**300)
    assert (config.lr_factor_exponent, config.lr_factor_max) == (10**6, 10**300)
    assert SignalConfig(observe_budget_frac=0.005).cheap_budget_frac == pytest.approx(0.008)  # 0.005 + the 0.3% room


# ------------------------------------------------------------------------------------- precision maps


def _layer_precision() -> LayerPrecision:
    return LayerPrecision(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), "cpu")


_TENSOR_MESSAGE = (
    r"is a Tensor: give an ordered sequence \(a list, tuple or array\) with one precision per layer "
    r"\(2: \['0', '1'\]\) or per controllable layer \(2: \['0', '1'\]\), in that order$"
)


@pytest.mark.parametrize(
    ("precisions", "message"),
    [
        (torch.tensor([1, 0]), r"^precisions=tensor\(\[1, 0\]\) " + _TENSOR_MESSAGE),
        (
            torch.tensor([1, 0], dtype=torch.int32),
            r"^precisions=tensor\(\[1, 0\], dtype=torch.int32\) " + _TENSOR_MESSAGE,
        ),
        (
            np.array([1.0, 0.0]),
            r"^precisions=array\(\[1\., 0\.\]\) holds float64: give whole numbers \(0 fp32, 1 bf16, 2 fp16\) or the "
            r"names fp32, bf16, fp16, one a layer$",
        ),
        (np.array([True, False]), r"^precisions=array\(\[ True, False\]\) holds bool: give whole numbers "),
        (np.array([[1, 0]]), r"^precisions=array\(\[\[1, 0\]\]\) has 2 dimensions: give one, a precision a layer$"),
        (np.array(1), r"^precisions=array\(1\) has 0 dimensions: give one, a precision a layer$"),
    ],
)
def test_a_tensor_or_a_float_array_is_refused_as_a_map_by_its_type(precisions: object, message: str) -> None:
    precision = _layer_precision()
    with pytest.raises(ValueError, match=message):
        precision.set(precisions)  # type: ignore[arg-type]
    assert precision.precisions == [Precision.FP32, Precision.FP32]
    engine = StepEngine(precision.model, torch.optim.SGD(precision.model.parameters(), lr=0.1), torch.device("cpu"))
    with pytest.raises(ValueError, match=message):
        engine.set_precisions(precisions)  # type: ignore[arg-type]
    assert engine.precision.precisions == [Precision.FP32, Precision.FP32]


def test_integer_and_object_arrays_and_a_tensors_list_still_set_the_map() -> None:
    precision = _layer_precision()
    for precisions in (
        np.array([1, 2], dtype=np.uint8),
        np.array(["bf16", 2], dtype=object),
        torch.tensor([1, 2]).tolist(),
    ):
        precision.set(precisions)
        assert precision.precisions == [Precision.BF16, Precision.FP16]
        precision.set(["fp32", "fp32"])


# ------------------------------------------------------------------------------------- start_precision


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        (Precision.BF16, "bf16"),
        ("BF16", "bf16"),
        (" bf16", "bf16"),
        ("Fp16", "fp16"),
        (Precision.FP32, "fp32"),
        (2, "fp16"),
        (np.int64(0), "fp32"),
    ],
)
def test_start_precision_takes_what_precision_parse_takes_and_stores_the_name(given: object, stored: str) -> None:
    config = HeuristicConfig(start_precision=given)  # type: ignore[arg-type]
    assert config.start_precision == stored
    assert type(config.start_precision) is str  # as the field documents, not the Precision given
    assert replace(config, use_fp16=True).start_precision == stored


@pytest.mark.parametrize("given", ["int8", "", True, None, 1.0, 3])
def test_start_precision_refuses_what_is_no_precision_by_name(given: object) -> None:
    message = (
        f"start_precision={given!r} must be one of 'fp32', 'bf16', 'fp16' (any case), or a Precision "
        "(or its value, 0 to 2)"
    )
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        HeuristicConfig(start_precision=given)  # type: ignore[arg-type]

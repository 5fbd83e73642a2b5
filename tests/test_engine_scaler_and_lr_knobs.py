"""StepEngine keeps its loss scaler's tensors across a rollback and a load, and checks its LR knobs when set."""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from triaccel_rl.engine import StepEngine

CPU = torch.device("cpu")


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def _engine(fused: bool = False, lr: float = 0.1) -> tuple[nn.Module, StepEngine]:
    """A two-layer model and its engine: SGD with momentum, one param group a layer (``"layer"`` keys)."""
    model = _model()
    groups = [{"params": params, "layer": i} for i, params in enumerate(StepEngine.discover(model))]
    return model, StepEngine(model, torch.optim.SGD(groups, lr=lr, momentum=0.9), CPU, fused=fused)


def _loss(model: nn.Module, engine: StepEngine, seed: int, scale: float = 2.0**-6) -> torch.Tensor:
    """A seeded batch's loss, small enough (``scale``) that its gradient times a scale of 2**16 is finite in fp16."""
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.randn(6, 3, generator=generator), torch.randn(6, 2, generator=generator)
    with engine.precision.context():
        out = model(x)
    return (out.float() - y).pow(2).mean() * scale


def _scale_tensors(engine: StepEngine) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss scale and clean-step count tensors the engine's next fp16 step scales by and counts in."""
    if engine.fused:
        return engine._scale, engine._clean_steps
    scaler = engine._grad_scaler
    assert scaler is not None and scaler._scale is not None and scaler._growth_tracker is not None
    return scaler._scale, scaler._growth_tracker


def _fp16(engine: StepEngine) -> None:
    engine.set_precisions(["fp16"] * engine.n_layers)


def _overflow(model: nn.Module, engine: StepEngine, times: int = 1) -> None:
    """Steps on infinite losses: each is skipped (weights and momentum untouched) and halves the scale."""
    for _ in range(times):
        _, skipped = engine.backward_and_step(_loss(model, engine, 0, scale=math.inf))
        assert skipped


def _copy(state: dict[str, Any]) -> dict[str, Any]:
    """A deep copy through ``torch.save``, as a checkpoint file gives: two engines loading it share no tensor."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _assert_same_run(a: tuple[nn.Module, StepEngine], b: tuple[nn.Module, StepEngine]) -> None:
    for p, q in zip(a[0].parameters(), b[0].parameters(), strict=True):
        assert torch.equal(p, q), f"weights differ by {(p - q).abs().max().item():.3g}"
    for x, y in zip(_scale_tensors(a[1]), _scale_tensors(b[1]), strict=True):
        assert torch.equal(x, y), f"loss scaler state {x.item()} != {y.item()}"


@pytest.mark.parametrize("fused", [False, True])
def test_a_rollback_to_a_copy_from_before_any_fp16_step_keeps_the_scale_tensor(fused):
    """A CUDA graph captured at an fp16 step reads the scale through its address (``StepGraphs`` keys its graphs on
    the precisions alone): the reference path dropped its GradScaler at a rollback to a copy taken before any fp16
    step, and the next step made a new scale tensor, so the graph replayed the loss times the old, freed one."""
    model, engine = _engine(fused)
    copy_before_fp16 = engine.scaler_state()  # the reference path's is None: it has no scale yet
    _fp16(engine)
    _overflow(model, engine)
    scale, clean_steps = _scale_tensors(engine)
    address = scale.data_ptr()
    assert scale.item() == 2.0**15
    engine.load_scaler_state(copy_before_fp16)
    assert _scale_tensors(engine)[0] is scale and _scale_tensors(engine)[1] is clean_steps
    assert scale.item() == 2.0**16 and clean_steps.item() == 0  # a fresh scaler's
    engine.backward_and_step(_loss(model, engine, 1))
    assert _scale_tensors(engine)[0] is scale and scale.data_ptr() == address
    assert clean_steps.item() == 1

    fresh_model, fresh = _engine(fused)  # the same rollback on an engine that never overflowed
    copy_before_fp16 = fresh.scaler_state()
    _fp16(fresh)
    fresh.load_scaler_state(copy_before_fp16)
    fresh.backward_and_step(_loss(fresh_model, fresh, 1))
    _assert_same_run((model, engine), (fresh_model, fresh))


def test_load_state_dict_loads_the_scale_into_the_scalers_own_tensors():
    """The reference path installed a new GradScaler at ``load_state_dict`` (a resume mid-run), with the same hazard
    for a captured graph; now the loaded scale and clean-step count go into the tensors it scales by already."""
    source_model, source = _engine()
    _fp16(source)
    _overflow(source_model, source)
    for seed in (1, 2):
        source.backward_and_step(_loss(source_model, source, seed))
    state = source.state_dict()
    assert state["scaler"]["scale"] == 2.0**15 and state["scaler"]["_growth_tracker"] == 2

    model, engine = _engine()
    _fp16(engine)
    _overflow(model, engine, times=2)  # a scale of 2**14: neither the loaded one nor a fresh one
    scaler = engine._grad_scaler
    scale, clean_steps = _scale_tensors(engine)
    address = scale.data_ptr()
    engine.load_state_dict(_copy(state))
    assert engine._grad_scaler is scaler and _scale_tensors(engine) == (scale, clean_steps)
    assert scale.item() == 2.0**15 and clean_steps.item() == 2
    engine.backward_and_step(_loss(model, engine, 3))
    assert _scale_tensors(engine)[0] is scale and scale.data_ptr() == address

    fresh_model, fresh = _engine()
    fresh.load_state_dict(_copy(state))
    fresh.backward_and_step(_loss(fresh_model, fresh, 3))
    _assert_same_run((model, engine), (fresh_model, fresh))


def test_loading_a_state_saved_without_a_loss_scaler_resets_the_scalers_own_tensors():
    """A state saved before any fp16 step holds no scaler: the loading engine's goes back to a fresh one's scale and
    count in place (it was dropped, and the next fp16 step made new tensors)."""
    _, source = _engine()
    state = source.state_dict()
    assert state["scaler"] is None

    model, engine = _engine()
    _fp16(engine)
    _overflow(model, engine)
    scale, clean_steps = _scale_tensors(engine)
    engine.load_state_dict(_copy(state))  # fp32 again, as saved
    assert _scale_tensors(engine) == (scale, clean_steps)
    assert scale.item() == 2.0**16 and clean_steps.item() == 0
    _fp16(engine)
    engine.backward_and_step(_loss(model, engine, 1))
    assert _scale_tensors(engine)[0] is scale

    fresh_model, fresh = _engine()
    fresh.load_state_dict(_copy(state))
    _fp16(fresh)
    fresh.backward_and_step(_loss(fresh_model, fresh, 1))
    _assert_same_run((model, engine), (fresh_model, fresh))


@pytest.mark.parametrize(
    ("knob", "value", "allowed"),
    [
        ("lr_scale", math.nan, "a finite number > 0"),
        ("lr_scale", math.inf, "a finite number > 0"),
        ("lr_scale", -0.5, "a finite number > 0"),
        ("lr_scale", 0.0, "a finite number > 0"),
        ("lr_scale", True, "a finite number > 0"),
        ("lr_scale", "0.5", "a finite number > 0"),
        ("batch_lr_gain", np.float32(np.nan), "a finite number >= 0"),
        ("batch_lr_gain", -math.inf, "a finite number >= 0"),
        ("batch_lr_gain", -1.0, "a finite number >= 0"),
        ("batch_lr_gain", None, "a finite number >= 0"),
        ("lr_factors", np.array([np.nan, 1.0]), "2 finite numbers >= 0, one a layer"),
        ("lr_factors", [-1.0, 1.0], "2 finite numbers >= 0, one a layer"),
        ("lr_factors", (1.0, math.inf), "2 finite numbers >= 0, one a layer"),
        ("lr_factors", [1.0, 1.0, 1.0], "2 finite numbers >= 0, one a layer"),
        ("lr_factors", np.ones((2, 1)), "2 finite numbers >= 0, one a layer"),
        ("lr_factors", [True, 1.0], "2 finite numbers >= 0, one a layer"),
        ("lr_factors", 1.0, "2 finite numbers >= 0, one a layer"),
        ("lr_factors", "11", "2 finite numbers >= 0, one a layer"),
    ],
)
def test_an_lr_knob_outside_its_range_is_refused_when_set(knob, value, allowed):
    """A NaN factor or scale went into the group LRs and the weights on the reference path, a negative factor ran as
    a negative LR: refused at the assignment, naming the knob, the value and what is allowed, with nothing changed."""
    model, engine = _engine()
    lrs = engine.group_lrs()
    with pytest.raises(ValueError) as error:
        setattr(engine, knob, value)
    message = str(error.value)
    assert message.startswith(knob) and repr(value) in message and allowed in message, message
    assert engine.group_lrs() == lrs and np.array_equal(engine.lr_factors, [1.0, 1.0])
    assert (engine.lr_scale, engine.batch_lr_gain) == (1.0, 1.0)
    engine.backward_and_step(_loss(model, engine, 0))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_lr_knobs_take_numbers_in_range_and_keep_a_copy_of_the_factors():
    _, engine = _engine()
    factors = np.array([0.0, 2.0], dtype=np.float32)  # 0: a frozen layer's LR
    engine.lr_factors = factors
    engine.lr_scale = np.float64(0.5)
    engine.batch_lr_gain = 0.0  # a schedule's gain at its end
    factors[1] = -3.0  # the caller's array, changed after the set: the engine's copy is not
    assert engine.lr_factors.dtype == np.float64 and engine.lr_factors.tolist() == [0.0, 2.0]
    assert type(engine.lr_scale) is float and engine.lr_scale == 0.5 and engine.batch_lr_gain == 0.0
    assert engine.group_lrs() == [0.0, 0.0]
    engine.batch_lr_gain = np.float32(1.5)
    engine.lr_factors = [1, 0.25]
    assert engine.group_lrs() == [0.1 * (0.5 * 1.5) * 1.0, 0.1 * (0.5 * 1.5) * 0.25]


def test_a_checkpoint_with_a_zero_lr_factor_loads_through_the_checked_setters():
    _, source = _engine()
    source.lr_factors, source.lr_scale, source.batch_lr_gain = [0.0, 1.5], 0.75, 2.0
    _, engine = _engine()
    engine.load_state_dict(_copy(source.state_dict()))
    assert engine.lr_factors.tolist() == [0.0, 1.5] and (engine.lr_scale, engine.batch_lr_gain) == (0.75, 2.0)
    assert engine.group_lrs() == source.group_lrs()


def test_a_checkpoint_saved_at_a_schedules_end_with_a_zero_batch_gain_loads():
    """``schedule_gain`` reaches 0 at a schedule's end: the engine takes a gain of 0, and its checkpoint was refused."""
    _, source = _engine()
    source.batch_lr_gain = 0.0
    _, engine = _engine()
    engine.load_state_dict(_copy(source.state_dict()))
    assert engine.batch_lr_gain == 0.0 and engine.group_lrs() == [0.0, 0.0]
    state = _copy(source.state_dict())
    state["batch_lr_gain"] = -0.5
    with pytest.raises(ValueError, match=r"batch_lr_gain -0.5 must be a finite number >= 0"):
        engine.load_state_dict(state)
    state["lr_scale"], state["batch_lr_gain"] = 0.0, 1.0
    with pytest.raises(ValueError, match=r"lr_scale 0.0 must be a finite number > 0"):
        engine.load_state_dict(state)


def test_the_lr_factors_getter_is_a_read_only_view():
    """An entry written in place went into the LRs unchecked (a negative LR); set the whole array instead."""
    _, engine = _engine()
    with pytest.raises(ValueError, match="read-only"):
        engine.lr_factors[0] = -3.0
    assert engine.lr_factors.tolist() == [1.0, 1.0]
    engine.lr_factors = [0.5 if i == 0 else f for i, f in enumerate(engine.lr_factors)]
    assert engine.group_lrs() == [0.05, 0.1]

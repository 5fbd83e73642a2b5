"""A checkpoint whose optimizer param groups hold a hyper-parameter the update cannot take is refused at load, naming
the group, the field and the value, before anything is loaded.

Before, torch.optim's load put the saved groups in place unchecked: an ``lr`` of NaN trained the weights to NaN, an
``eps`` of ``'1e-8'`` raised a TypeError in the next update after part of it had run (the weights half-changed), and
``betas`` of one number a ValueError there.
"""

import copy
import math
import re

import pytest
import torch
from test_checkpoint_nonfinite_moments import (
    _assert_same,
    _fused_engine_and_state,
    _model_and_optimizer,
    _train,
    needs_fused,
)

import triaccel_rl as ta
from triaccel_rl.config import ControllerConfig

NAN, INF = float("nan"), float("inf")
NUMBER, BETAS = "a finite number >= 0.0", "a tuple of 2 finite numbers in [0.0, 1.0)"
ADAMW_NUMBER, ADAMW_BETAS = f"AdamW's update takes {NUMBER} there", f"AdamW's update takes {BETAS} there"
DAMAGED_GROUPS = [  # the optimizer, the field, the saved value, what the update takes, the live group's value
    ("adamw", "lr", NAN, NUMBER, "0.01"),
    ("adamw", "lr", "0.01", NUMBER, "0.01"),
    ("adamw", "lr", -0.01, NUMBER, "0.01"),
    ("adamw", "eps", "1e-8", NUMBER, "1e-08"),
    ("adamw", "eps", 10**30, NUMBER, "1e-08"),  # past int64, no torch Scalar: the update raised part-way
    ("adamw", "weight_decay", INF, NUMBER, "0.01"),
    ("adamw", "betas", (0.9,), BETAS, "(0.9, 0.999)"),
    ("adamw", "betas", (NAN, 0.999), BETAS, "(0.9, 0.999)"),
    ("adamw", "betas", [0.9, 1.0], BETAS, "(0.9, 0.999)"),  # beta 1: the bias correction 1 - beta**step is 0
    ("adamw", "amsgrad", "True", "a bool", "False"),
    ("adamw", "foreach", 3.5, "a bool or None", "None"),
    ("sgd", "momentum", -0.9, NUMBER, "0.9"),
    ("sgd", "dampening", NAN, NUMBER, "0"),
    ("sgd", "nesterov", 1, "a bool", "False"),
]


def _controller(kind, lr=None):
    model, optimizer = _model_and_optimizer(kind)
    if lr is not None:
        optimizer.param_groups[0]["lr"] = lr
    return model, ta.Controller(model, optimizer, policy="heuristic", config=ControllerConfig(interval_steps=5))


@pytest.mark.parametrize(("kind", "field", "value", "takes", "live"), DAMAGED_GROUPS)
def test_the_controller_refuses_a_damaged_param_group_and_stays_as_it_was(kind, field, value, takes, live):
    model, ctl = _controller(kind)
    _train(model, ctl, 7)
    saved = copy.deepcopy(ctl.state_dict())
    saved["engine"]["optimizer"]["param_groups"][0][field] = value
    _train(model, ctl, 3)  # the live run moves on from the saved state
    before = copy.deepcopy({"controller": ctl.state_dict(), "model": model.state_dict()})
    message = (
        f"the checkpoint's param group 0 has {field!r}: {value!r}; {'SGD' if kind == 'sgd' else 'AdamW'}'s update "
        f"takes {takes} there (this optimizer's group holds {live})"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        ctl.load_state_dict(saved)
    _assert_same(before, {"controller": ctl.state_dict(), "model": model.state_dict()})
    _train(model, ctl, 2)  # and trains on
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_values_torch_allows_still_load():
    """Ints where the live group holds floats, eps 0 and beta 0 (torch's constructors allow both), lists for tuples,
    and foreach or fused as a bool or None."""
    for kind, values in [
        ("adamw", {"lr": 0, "eps": 0.0, "betas": [0.0, 0.5], "foreach": False, "fused": None}),
        ("sgd", {"lr": 0.05, "momentum": 1, "dampening": 0.5, "weight_decay": 0, "foreach": None}),
    ]:
        model, ctl = _controller(kind)
        _train(model, ctl, 7)
        saved = copy.deepcopy(ctl.state_dict())
        saved["engine"]["optimizer"]["param_groups"][0].update(values)
        ctl.load_state_dict(saved)
        group = ctl.engine.optimizer.param_groups[0]
        assert {key: group[key] for key in values} == values
        _train(model, ctl, 2)


def test_a_tensor_lr_resumes_where_the_optimizer_holds_one():
    """torch.optim takes a one-element tensor LR: a checkpoint holding one loads into an optimizer built with one."""
    model, ctl = _controller("adamw", lr=torch.tensor(0.01))
    _train(model, ctl, 7)
    saved = copy.deepcopy({"controller": ctl.state_dict(), "model": model.state_dict()})
    model2, ctl2 = _controller("adamw", lr=torch.tensor(0.02))
    model2.load_state_dict(saved["model"])
    ctl2.load_state_dict(saved["controller"])
    lr = ctl2.engine.optimizer.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and lr.item() == pytest.approx(0.01)
    _train(model2, ctl2, 2)

    damaged = copy.deepcopy(saved["controller"])
    damaged["engine"]["optimizer"]["param_groups"][0]["lr"] = torch.tensor(NAN)
    message = (
        "the checkpoint's param group 0 has 'lr': tensor(nan); AdamW's update takes a finite number >= 0.0 (or a "
        "one-element tensor of one) there (this optimizer's group holds tensor(0.0100))"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        ctl2.load_state_dict(damaged)
    # A tensor where this optimizer holds a float is not the optimizer the run was saved with
    _, plain = _controller("adamw")
    message = (
        "the checkpoint's param group 0 has 'lr': tensor(0.0100); AdamW's update takes a finite number >= 0.0 there "
        "(this optimizer's group holds 0.01)"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        plain.load_state_dict(saved["controller"])


@needs_fused
def test_the_fused_step_refuses_a_damaged_param_group_in_either_load():
    """Its checkpoint's torch.optim groups (``torch_optimizer``), and a state given to ``optimizer.load_state_dict``."""
    model, engine = _fused_engine_and_state("adamw")
    saved = copy.deepcopy(engine.state_dict())
    saved["torch_optimizer"]["param_groups"][0]["lr"] = NAN
    before = copy.deepcopy({"engine": engine.state_dict(), "model": model.state_dict()})
    with pytest.raises(ValueError, match=re.escape(f"the checkpoint's param group 0 has 'lr': nan; {ADAMW_NUMBER}")):
        engine.load_state_dict(saved)
    _assert_same(before, {"engine": engine.state_dict(), "model": model.state_dict()})
    loaded = copy.deepcopy(engine.optimizer.state_dict())
    loaded["param_groups"][0]["betas"] = (0.9,)
    with pytest.raises(ValueError, match=re.escape(f"the loaded param group 0 has 'betas': (0.9,); {ADAMW_BETAS}")):
        engine.optimizer.load_state_dict(loaded)
    _assert_same(before, {"engine": engine.state_dict(), "model": model.state_dict()})


def test_the_signals_none_yet_markers_still_load_and_inf_is_refused():
    """NaN in ``loss_ema``, ``previous_probe``, ``previous_step_ms`` and the cadence's and scheduler's ``step_ms`` is
    their "none yet" marker (a run before its first decision, or without a probe batch, saves it): it loads."""
    model, ctl = _controller("adamw")
    _train(model, ctl, 3)  # before the first decision (interval_steps=5)
    saved = copy.deepcopy(ctl.state_dict())
    collector = saved["signals"]["collector"]
    markers = [collector[key] for key in ("loss_ema", "previous_probe", "previous_step_ms")]
    markers += [saved["signals"]["cadence"]["step_ms"], collector["scheduler"]["step_ms"]]
    assert all(math.isnan(value) for value in markers)
    model2, ctl2 = _controller("adamw")
    ctl2.load_state_dict(saved)
    _train(model2, ctl2, 4)
    assert math.isfinite(ctl2.state_dict()["signals"]["collector"]["loss_ema"])  # measured at the decision
    collector["loss_ema"] = INF
    message = "the signal collector's state has loss_ema inf, not a finite number or NaN"
    with pytest.raises(ValueError, match=re.escape(message)):
        ctl2.load_state_dict(saved)

"""The parameter numbers a checkpoint's optimizer param groups list, and numbers only the saved groups hold.

torch.optim's load pairs the saved groups' numbers with the optimizer's parameters in order and files each state entry
under its number. Before these checks, a number listed twice or not a whole number (a NaN) left a parameter with no
state, silently (its moments started from zero); a valid numbering other than 0, 1, 2, ... was refused as "saved for
another model" (the shapes were read at the number, not at its place); and a NaN ``initial_lr`` (a scheduler built
after the load reads it) loaded, to make every later LR NaN.
"""

import copy
import re

import pytest
import torch
from test_checkpoint_nonfinite_moments import _assert_same, _model_and_optimizer, _train

import triaccel_rl as ta
from triaccel_rl.config import ControllerConfig


def _trained(kind="adamw"):
    model, optimizer = _model_and_optimizer(kind)
    ctl = ta.Controller(model, optimizer, policy="fp32", config=ControllerConfig(interval_steps=5))
    _train(model, ctl, 7)
    return model, ctl


def _refused(ctl, model, saved, message):
    before = copy.deepcopy({"controller": ctl.state_dict(), "model": model.state_dict()})
    with pytest.raises(ValueError, match=re.escape(message)):
        ctl.load_state_dict(saved)
    _assert_same(before, {"controller": ctl.state_dict(), "model": model.state_dict()})


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (
            [float("nan"), 1, 2, 3],
            "the checkpoint's param group 0 lists parameter nan; torch.optim's state_dict() numbers parameters with "
            "whole numbers (0, 1, 2, ... in order)",
        ),
        (
            [0, 0, 2, 3],
            "the checkpoint's param groups list parameter 0 twice; torch.optim's state_dict() numbers each parameter "
            "once (0, 1, 2, ... in order)",
        ),
        (
            [4, 1, 2, 3],
            "the checkpoint's optimizer state has an entry for parameter 0, which its param groups do not list "
            "(they list [4, 1, 2, 3]): torch.optim's load would leave that state with no parameter",
        ),
    ],
)
def test_parameter_numbers_that_leave_a_parameter_without_its_state_are_refused(ids, message):
    model, ctl = _trained()
    saved = copy.deepcopy(ctl.state_dict())
    saved["engine"]["optimizer"]["param_groups"][0]["params"] = ids
    _train(model, ctl, 3)  # the live run moves on from the saved state
    _refused(ctl, model, saved, message)


def test_a_group_whose_params_is_not_a_list_is_refused():
    model, ctl = _trained()
    saved = copy.deepcopy(ctl.state_dict())
    saved["engine"]["optimizer"]["param_groups"][0]["params"] = 4
    message = (
        "the checkpoint's param group 0 has 'params': 4; torch.optim's state_dict() lists the group's parameters "
        "there, as numbers"
    )
    _refused(ctl, model, saved, message)


def test_another_numbering_of_the_same_state_resumes_as_the_usual_one():
    """Parameters 0 and 1 (the first layer's weight and bias, of other shapes) renumbered 1 and 0: torch.optim's load
    pairs them by place, so the run resumes exactly as from the usual numbering."""
    model, ctl = _trained()
    saved = copy.deepcopy({"controller": ctl.state_dict(), "model": model.state_dict()})
    renumbered = copy.deepcopy(saved["controller"])
    optimizer_state = renumbered["engine"]["optimizer"]
    optimizer_state["param_groups"][0]["params"] = [1, 0, 2, 3]
    optimizer_state["state"] = {
        {0: 1, 1: 0}.get(index, index): entry for index, entry in optimizer_state["state"].items()
    }
    resumed = []
    for state in (saved["controller"], renumbered):
        model2, optimizer2 = _model_and_optimizer("adamw")
        ctl2 = ta.Controller(model2, optimizer2, policy="fp32", config=ControllerConfig(interval_steps=5))
        model2.load_state_dict(saved["model"])
        ctl2.load_state_dict(state)
        _train(model2, ctl2, 3)
        resumed.append([p.detach().clone() for p in model2.parameters()])
    for usual, other in zip(*resumed, strict=True):
        assert torch.equal(usual, other)


def test_a_saved_initial_lr_the_live_group_lacks_is_checked_and_a_valid_one_loads():
    model, ctl = _trained()
    saved = copy.deepcopy(ctl.state_dict())
    assert "initial_lr" not in ctl.engine.optimizer.param_groups[0]
    saved["engine"]["optimizer"]["param_groups"][0]["initial_lr"] = float("nan")
    message = (
        "the checkpoint's param group 0 has 'initial_lr': nan; an LR scheduler built after the load starts from it, "
        "and takes a finite number >= 0.0 there"
    )
    _refused(ctl, model, saved, message)

    saved["engine"]["optimizer"]["param_groups"][0]["initial_lr"] = 0.01
    ctl.load_state_dict(saved)
    optimizer = ctl.engine.optimizer
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)  # built after the load
    assert optimizer.param_groups[0]["initial_lr"] == 0.01
    _train(model, ctl, 1)
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.005)

"""Tests for triaccel_rl.engine.StepEngine: the reference step's host work, a grad_transform's new gradients, and
the optimizer load pre-hook's messages."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import triaccel_rl.engine as engine_module
from triaccel_rl.engine import StepEngine

CPU = torch.device("cpu")


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


@pytest.mark.parametrize("max_grad_norm", [None, 0.05])
def test_an_unclipped_reference_step_takes_no_device_and_dtype_grouping(monkeypatch, max_grad_norm) -> None:
    """The grouping by device and dtype (a Python pass over the parameters) serves the clip's order only. Before the
    fix every reference step took it, clipping or not."""
    calls = []
    grouping = engine_module._device_dtype_groups
    monkeypatch.setattr(engine_module, "_device_dtype_groups", lambda tensors: calls.append(1) or grouping(tensors))
    model = _mlp()
    engine = StepEngine(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), CPU, fused=False)
    engine.max_grad_norm = max_grad_norm
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = torch.randn(6, 3, generator=generator), torch.randn(6, 2, generator=generator)
        engine.backward_and_step((model(x) - y).pow(2).mean())
    assert len(calls) == (0 if max_grad_norm is None else 3)  # a clipping step groups once (negative control)


class _WithSide(nn.Module):
    """A body and head the engine's optimizer holds, and a side layer the forward skips, held by a second optimizer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head, self.side = nn.Linear(6, 8), nn.Linear(8, 3), nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("case", ["non-finite-gradient-made", "gradient-made-on-a-skipped-step"])
@pytest.mark.parametrize("fused", [False, True])
def test_a_gradient_the_transform_makes_for_a_second_optimizer_is_checked_and_dropped(fused, case, precision) -> None:
    """``grad_transform`` gives a gradient to a second optimizer's parameter the backward did not reach (its ``.grad``
    None before). The second optimizer's overflow was taken before the transform only: a NaN gradient it made went
    unchecked on both paths (the update went in, the second optimizer's ``step()`` got the NaN), and on the fused path
    a step skipped for a NaN batch left the made gradient in place (the reference path drops every unheld gradient on
    a skip). Now either is an overflow of the second optimizer's: the step is skipped, its gradient dropped."""
    model = _WithSide()
    optimizer = torch.optim.SGD([*model.body.parameters(), *model.head.parameters()], lr=0.1)
    engine = StepEngine(model, optimizer, CPU, fused=fused)
    engine.set_precisions([precision] * engine.n_layers)
    fill = float("nan") if case == "non-finite-gradient-made" else 0.5

    def transform() -> None:
        assert model.side.weight.grad is None  # the backward did not reach it
        model.side.weight.grad = torch.full_like(model.side.weight, fill)

    engine.grad_transform = transform
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 6, generator=generator), torch.randint(0, 3, (16,), generator=generator)
    if case == "gradient-made-on-a-skipped-step":
        x = x * float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    with engine.precision.context():
        loss = nn.functional.cross_entropy(model(x).float(), y)
    _, skipped = engine.backward_and_step(loss)
    assert bool(skipped)
    assert model.side.weight.grad is None  # the second optimizer's step() skips the bad batch
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert engine.applied_steps() == 0
    if precision == "fp16":
        assert engine.loss_scale == 32768.0  # backed off, as for a second optimizer's overflow from the backward


def _corrupted(state: dict, what: str) -> dict:
    state = copy.deepcopy(state)
    if what == "groups":
        state["param_groups"][0]["params"] = state["param_groups"][0]["params"][:1]
    elif what == "lr":
        del state["param_groups"][0]["lr"]
    elif what == "entry":
        state["state"][7] = state["state"][0]
    elif what == "shape":
        state["state"][0]["momentum_buffer"] = torch.zeros(5, 5)
    elif what == "step":  # (SGD keeps no count: the check reads any 'step' a state has)
        state["state"][0]["step"] = -1
    elif what == "keys":
        del state["state"]
    return state


@pytest.mark.parametrize(
    ("what", "message"),
    [
        (
            "groups",
            r"the loaded optimizer state has param groups of \[1, 2\] parameters; this optimizer's has \[2, 2\]",
        ),
        ("lr", r"the loaded param group 0 lacks 'lr', which SGD's update reads"),
        (
            "entry",
            r"the loaded optimizer state has an entry for parameter 7, which its param groups do not list "
            r"\(they list 0 to 3\)",
        ),
        ("shape", r"the loaded optimizer state 'momentum_buffer' of parameter 0 has shape \(5, 5\); this model's"),
        ("step", r"the loaded optimizer state 'step' of parameter 0 is -1: a step count is a finite whole number >= 0"),
        ("keys", r"the loaded optimizer state lacks 'state'"),
    ],
)
def test_a_refused_direct_optimizer_load_names_the_loaded_state_not_a_checkpoint(what, message) -> None:
    """``optimizer.load_state_dict(bad)`` called by the user while the fused step runs, no checkpoint involved: the
    refusal said "the checkpoint's optimizer state ..." (before the fix); it names the loaded state, what is wrong with
    it and what is allowed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    groups = [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters())}]
    optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    engine = StepEngine(model, optimizer, CPU, fused=True)
    engine.backward_and_step(model(torch.randn(5, 3)).square().mean())
    state = optimizer.state_dict()
    with pytest.raises(ValueError, match=message) as refused:
        optimizer.load_state_dict(_corrupted(state, what))
    assert "checkpoint" not in str(refused.value)

"""Gradient accumulation with the gradients written in place between ``backward()`` and ``step()`` (a review).

A ``clip_grad_norm_`` ported from the plain loop (or a ``nan_to_num_``, a ``clamp_``) was taken for a reset: the step
recorded the last micro-batch's loss alone, and nothing was logged. Only a reset (a ``zero_grad()``, gradients zeroed)
drops the earlier ones.
"""

import logging

import pytest
import torch
from torch import nn

from triaccel_rl.config import ControllerConfig
from triaccel_rl.controller import Controller

MICRO_BATCHES = 4
STEPS = 3
WRITTEN_IN_PLACE = "written in place"
"""Part of the warning's text."""

EDITS = {
    "clip_grad_norm_": lambda model: torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e9),
    "nan_to_num_": lambda model: [p.grad.nan_to_num_() for p in model.parameters()],
    "clamp_": lambda model: [p.grad.clamp_(-1e9, 1e9) for p in model.parameters()],
}
"""In-place writes that change no value here: the loss and the update must be as without them."""


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)


def model_and_optimizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def micro_loss(model, i):
    x, y = data()
    part = slice(16 * i, 16 * (i + 1))
    return nn.functional.cross_entropy(model(x[part]), y[part]) / MICRO_BATCHES


def controlled_run(edit=None, before_micro_batch=MICRO_BATCHES - 1):
    """``STEPS`` steps of ``MICRO_BATCHES`` micro-batches; ``edit(model, optimizer)`` runs before the backward of
    micro-batch ``before_micro_batch`` (the last's: before ``ctl.step``). Returns the weights, the losses the engine's
    step was given, and each step's micro-losses from ``before_micro_batch`` on and from the first."""
    model, optimizer = model_and_optimizer()
    ctl = Controller(model, optimizer, policy="fp32", config=ControllerConfig(interval_steps=100))
    given, whole, tail = [], [], []
    step_after_backward = ctl.engine.step_after_backward_deferred

    def spy(loss, *args, **kwargs):
        given.append(loss.clone())
        return step_after_backward(loss, *args, **kwargs)

    ctl.engine.step_after_backward_deferred = spy
    for _ in range(STEPS):
        optimizer.zero_grad()
        losses = []
        for i in range(MICRO_BATCHES):
            with ctl.autocast():
                loss = micro_loss(model, i)
            losses.append(loss.detach())
            if edit is not None and i == before_micro_batch:
                edit(model, optimizer)
            ctl.backward(loss) if i < MICRO_BATCHES - 1 else ctl.step(loss)
        whole.append(_summed(losses))
        tail.append(_summed(losses[before_micro_batch:]))
    ctl.close()
    return [p.detach().clone() for p in model.parameters()], given, whole, tail


def plain_run(edit=None):
    """The plain loop of :func:`controlled_run`, ``edit(model)`` at the same point: before the last backward."""
    model, optimizer = model_and_optimizer()
    for _ in range(STEPS):
        optimizer.zero_grad()
        for i in range(MICRO_BATCHES):
            loss = micro_loss(model, i)
            if edit is not None and i == MICRO_BATCHES - 1:
                edit(model)
            loss.backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", list(EDITS))
def test_an_in_place_edit_before_step_keeps_the_earlier_micro_losses_and_warns_once(name, caplog):
    edit = EDITS[name]
    with caplog.at_level(logging.WARNING, logger="triaccel_rl"):
        _, given, whole, _ = controlled_run(lambda model, _: edit(model))
    assert len(given) == STEPS
    for got, want in zip(given, whole, strict=True):
        assert torch.equal(got, want), f"the step's loss {got.item()} is not the micro-losses' sum {want.item()}"
    warnings = [r for r in caplog.records if WRITTEN_IN_PLACE in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    message = warnings[0].getMessage()
    assert "max_grad_norm" in message and "grad_transform" in message


@pytest.mark.parametrize(
    "reset",
    [
        pytest.param(lambda model, optimizer: optimizer.zero_grad(set_to_none=True), id="optimizer-to-none"),
        pytest.param(lambda model, optimizer: optimizer.zero_grad(set_to_none=False), id="optimizer-in-place"),
        pytest.param(lambda model, optimizer: model.zero_grad(), id="model-to-none"),
        # In place, not through the optimizer's zero_grad (not counted): their zero values tell (a review of the fix)
        pytest.param(lambda model, optimizer: model.zero_grad(set_to_none=False), id="model-in-place"),
        pytest.param(lambda model, optimizer: torch.optim.SGD.zero_grad(optimizer, False), id="class-in-place"),
        pytest.param(lambda model, optimizer: [p.grad.zero_() for p in model.parameters()], id="by-hand"),
    ],
)
def test_a_zero_grad_between_micro_batches_still_drops_the_earlier_ones(reset, caplog):
    with caplog.at_level(logging.WARNING, logger="triaccel_rl"):
        _, given, _, tail = controlled_run(reset, before_micro_batch=2)
    for got, want in zip(given, tail, strict=True):
        assert torch.equal(got, want), f"the step's loss {got.item()} is not the last two micro-losses' {want.item()}"
    assert not any(WRITTEN_IN_PLACE in r.getMessage() for r in caplog.records)


def test_the_update_is_the_plain_loop_s_with_the_same_edit_at_the_same_point():
    """A clip that clips (the earlier micro-batches' gradients only, as the plain loop's at that point): the fix keeps
    the update, only the recorded loss changes."""
    clip = 0.05

    def edit(model):
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=clip)

    got, *_ = controlled_run(lambda model, _: edit(model))
    want = plain_run(edit)
    assert not all(torch.equal(a, b) for a, b in zip(want, plain_run(), strict=True))  # the clip clipped
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b), f"max |difference| {(a - b).abs().max().item()}"


def _summed(losses):
    """The micro-losses summed in order, as the controller sums them."""
    total = losses[0]
    for loss in losses[1:]:
        total = total + loss
    return total

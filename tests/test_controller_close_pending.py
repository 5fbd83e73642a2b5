"""``close()`` with a batch left part-way: its gradients, in the loss's own units (a review, 2026-12-07)."""

import os

import pytest
import torch
from torch import nn

from triaccel_rl import controller as controller_module
from triaccel_rl.controller import Controller
from triaccel_rl.engine import StepEngine

FP16_ERROR = 2e-3
"""The largest error of a gradient computed in fp16 (a 10-bit mantissa, 1e-3 apart), relative to its largest value."""

needs_triton = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs a GPU or Triton's interpreter (TRITON_INTERPRET=1 before triton is imported)",
)


class FusedEngine(StepEngine):
    """The fused step on a CPU (the Controller picks it only on CUDA by itself)."""

    def __init__(self, model, optimizer, device, fused=None):
        super().__init__(model, optimizer, device, fused=True)


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 20, generator=g), torch.randint(0, 5, (16,), generator=g)


def model_and_optimizer(head_only=False):
    """Three layers; ``head_only``: the optimizer holds the last alone (the others' gradients are a second loop's)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5))
    return model, torch.optim.SGD((model[4] if head_only else model).parameters(), lr=0.1)


def first_micro_batch_loss(model):
    """The first of two micro-batches' loss, ``loss / 2`` as a plain loop accumulates a mean."""
    x, y = data()
    return nn.functional.cross_entropy(model(x[:8]), y[:8]) / 2


def plain_grads(loss_of=first_micro_batch_loss):
    """The fp32 gradients of a plain loop's ``loss.backward()``."""
    model, _ = model_and_optimizer()
    loss_of(model).backward()
    return [p.grad for p in model.parameters()]


def left_after_backward(policy, head_only=False, loss_of=first_micro_batch_loss):
    """The gradients ``close()`` leaves after ``ctl.backward()`` of the first micro-batch, the loss scale, and
    whether the fused step ran."""
    model, optimizer = model_and_optimizer(head_only)
    with Controller(model, optimizer, policy=policy) as ctl:
        with ctl.autocast():
            loss = loss_of(model)
        ctl.backward(loss)
        scale = ctl.engine.loss_scale
    # the loop is left here (a break, an exception, the end of the data): the with block closes the controller
    return [p.grad for p in model.parameters()], scale, ctl.engine.fused


def assert_fp16_close(left, expected):
    for i, (got, want) in enumerate(zip(left, expected, strict=True)):
        error = ((got - want).abs().max() / want.abs().max()).item()
        assert error <= FP16_ERROR, f"parameter {i}: largest error {error:.3g} of its largest gradient"


@pytest.mark.parametrize("head_only", [False, True], ids=["all-held", "head-held"])
@pytest.mark.parametrize("engine", ["reference", pytest.param("fused", marks=needs_triton)])
def test_fp16_gradients_left_pending_are_the_loss_s_own_after_close(monkeypatch, engine, head_only):
    """They were the scaled loss's, 65536 times too large, and a plain loop going on applied them so. ``head-held``:
    the layers outside the optimizer had theirs unscaled as autograd made them, and stay so (not divided twice). The
    fused step's fp16 layers read 16-bit weight copies, whose gradients reach the flat fp32 buffer."""
    if engine == "fused":
        monkeypatch.setattr(controller_module, "StepEngine", FusedEngine)
    left, scale, fused = left_after_backward("fp16", head_only)
    assert scale == 2.0**16 and fused == (engine == "fused")
    assert_fp16_close(left, plain_grads())


def test_fp32_gradients_left_pending_are_the_plain_loop_s_bit_for_bit():
    left, scale, _ = left_after_backward("fp32")
    assert scale == 1.0
    for got, want in zip(left, plain_grads(), strict=True):
        assert torch.equal(got, want)


def test_overflowed_fp16_gradients_stay_infinite_and_the_rest_are_unscaled():
    """A gradient of 1e38 overflows fp32 at the scale (65536): it stays inf, for the loop to see."""

    def loss_of(model):
        return first_micro_batch_loss(model) + 1e38 * model[0].bias[0]

    left, *_ = left_after_backward("fp16", loss_of=loss_of)
    expected = plain_grads()
    assert left[1][0].item() == float("inf")
    rest = left[1][1:], expected[1][1:]
    assert_fp16_close([left[0], rest[0], *left[2:]], [expected[0], rest[1], *expected[2:]])


@pytest.mark.parametrize("policy", ["fp16", "fp32"])
def test_gradients_the_loop_made_after_resetting_a_pending_batch_are_untouched(policy):
    """``zero_grad()`` after ``ctl.backward()`` drops the batch: what a plain backward puts in ``.grad`` after it is
    the loop's own, left as it is (under fp16 not divided by the scale)."""
    model, optimizer = model_and_optimizer()
    with Controller(model, optimizer, policy=policy) as ctl:
        with ctl.autocast():
            loss = first_micro_batch_loss(model)
        ctl.backward(loss)
        optimizer.zero_grad(set_to_none=False)  # in place: the same tensors, a new version
        first_micro_batch_loss(model).backward()
        made = [p.grad.clone() for p in model.parameters()]
    for got, want in zip([p.grad for p in model.parameters()], made, strict=True):
        assert torch.equal(got, want)


def test_after_a_step_close_leaves_the_zeroed_gradients():
    model, optimizer = model_and_optimizer()
    with Controller(model, optimizer, policy="fp16") as ctl:
        with ctl.autocast():
            loss = first_micro_batch_loss(model)
        ctl.step(loss)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())

"""Parameters that become trainable after the controller is built, stepped by a second optimizer, under fp16."""

import os

import pytest
import torch
from torch import nn

import triaccel_rl as ta
from triaccel_rl import controller as controller_module
from triaccel_rl.engine import StepEngine
from triaccel_rl.types import Precision

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="the fused path needs a GPU or Triton's interpreter (TRITON_INTERPRET=1 before triton is imported)",
)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FP16_TOLERANCE = 1e-3
"""Largest parameter difference allowed between the fp16 run and the plain fp32 loop (measured: 6e-5)."""
STAGE_STEP = 3
"""The step at which the loop changes the model: a body unfrozen, or a head replaced."""


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).to(DEVICE)


def _batches(n: int = 7) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 6, generator=g).to(DEVICE), torch.randint(0, 3, (16,), generator=g).to(DEVICE))
            for _ in range(n)]  # fmt: skip


def _sgd(params) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def _unfreeze_body(model, i, second):
    """Stage 2 of a fine-tuning: the body, frozen at the build, trained from here by an optimizer of its own."""
    if i != STAGE_STEP:
        return second
    body = [*model[0].parameters(), *model[2].parameters()]
    for p in body:
        p.requires_grad_(True)
    return _sgd(body)


def _replace_head(model, i, second):
    """A head replaced mid-run, trained by a new optimizer (the controller's cannot take new parameters)."""
    if i != STAGE_STEP:
        return second
    torch.manual_seed(11)
    model[4] = nn.Linear(8, 3).to(DEVICE)
    return _sgd(model[4].parameters())


def _run(case: str, policy: str | None) -> nn.Sequential:
    """The loop of ``case``, plain (``policy`` None: loss.backward() and step()) or under a Controller."""
    model = _model()
    if case == "body-unfrozen":
        for layer in (model[0], model[2]):
            layer.requires_grad_(False)
        optimizer, change = _sgd(model[4].parameters()), _unfreeze_body
    else:
        optimizer, change = _sgd(model.parameters()), _replace_head
    ctl = None if policy is None else ta.Controller(model, optimizer, policy=policy)
    second = None
    for i, (x, y) in enumerate(_batches()):
        second = change(model, i, second)
        optimizer.zero_grad()
        if second is not None:
            second.zero_grad()
        if ctl is None:
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        else:
            with ctl.autocast():
                loss = nn.functional.cross_entropy(model(x).float(), y)
            ctl.step(loss)
        if second is not None:
            second.step()
    if ctl is not None:
        ctl.close()
    return model


@pytest.mark.parametrize("case", ["body-unfrozen", "head-replaced"])
@pytest.mark.parametrize("fused", [False, True])
def test_a_second_optimizer_over_parameters_trainable_after_the_build_steps_as_a_plain_loop(fused, case, monkeypatch):
    """Under fp16 a parameter trainable only after the build (a body frozen at the build and unfrozen, or a head
    replaced, ``model[4] = nn.Linear(...)``) and stepped by a second optimizer was never hooked: its optimizer stepped
    on the gradient times the loss scale (65536), the body's weights went NaN, the new head's far off (6e3 in 10
    steps). Now it is found at the next scaled backward and unscaled: the weights of a plain fp32 loop, within fp16's
    error."""
    monkeypatch.setattr(controller_module, "StepEngine", lambda *args, **kwargs: StepEngine(*args, fused=fused))
    plain = _run(case, None)
    controlled = _run(case, "fp16")
    for (name, expected), actual in zip(plain.named_parameters(), controlled.parameters(), strict=True):
        error = (expected.detach() - actual.detach()).abs().max().item()
        assert error <= FP16_TOLERANCE, f"{name}: max |difference| {error:.3g} from the plain loop"


@pytest.mark.parametrize("fused", [False, True])
def test_a_nonfinite_gradient_of_a_parameter_unfrozen_after_the_build_skips_the_step_and_is_dropped(fused):
    """Under fp16, the body frozen at the build and unfrozen, then a NaN in the body's gradient alone (the loss and the
    held head's gradients finite): the step is skipped, the scale backs off, and the body's gradients are None, so
    its optimizer's step() skips them too. Before the fix the engine never looked at them: the step went in, the scale
    stayed, and the second optimizer stepped on NaN."""
    model = _model()
    for layer in (model[0], model[2]):
        layer.requires_grad_(False)
    engine = StepEngine(model, _sgd(model[4].parameters()), DEVICE, fused=fused)
    engine.set_precisions([Precision.FP16] * engine.n_layers)
    (x, y), (x2, y2) = _batches(2)

    def step(x, y):
        with engine.precision.context():
            loss = nn.functional.cross_entropy(model(x).float(), y)
        return bool(engine.backward_and_step(loss)[1])

    assert not step(x, y)
    model[0].requires_grad_(True)
    handle = model[0].weight.register_hook(lambda grad: grad * float("nan"))
    scale = engine.loss_scale
    assert step(x2, y2)  # skipped
    handle.remove()
    assert engine.loss_scale == scale / 2
    assert all(p.grad is None for p in model[0].parameters())
    engine.remove()

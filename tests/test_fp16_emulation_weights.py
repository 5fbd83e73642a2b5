"""The CPU's emulated fp16 convolutions round their weight and bias through fp16, gradients included (as autocast)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import triaccel_rl as ta
from triaccel_rl.config import ControllerConfig, HeuristicConfig
from triaccel_rl.precision import LayerPrecision

FP16_MAX = 65504.0

CONVOLUTIONS = [
    (nn.Conv1d, F.conv1d, (4, 3, 9)),
    (nn.Conv2d, F.conv2d, (4, 3, 6, 5)),
    (nn.ConvTranspose2d, F.conv_transpose2d, (4, 3, 6, 5)),
]


def _emulated(conv: nn.Module) -> LayerPrecision:
    precision = LayerPrecision(conv, device_type="cpu")
    precision.set(["fp16"])
    assert precision._emulates_fp16
    return precision


@pytest.mark.parametrize(("make", "function", "shape"), CONVOLUTIONS, ids=["conv1d", "conv2d", "conv_transpose2d"])
def test_an_emulated_convolution_computes_on_fp16_weights_and_rounds_their_gradients(
    make: type[nn.Module], function: Any, shape: tuple[int, ...]
) -> None:
    """Its forward is the convolution of fp16-rounded input, weight and bias, summed in fp32 and rounded to fp16; the
    weight's and bias's gradients are the fp32 ones of that convolution, rounded to fp16. Before, the fp32 weights were
    computed on and their gradients kept every fp32 bit (the output differed from it by up to an fp16 rounding)."""
    torch.manual_seed(0)
    conv = make(3, 5, 3, padding=1)
    weight, bias = conv.weight, conv.bias
    x = torch.randn(*shape) * 3
    with _emulated(conv).context():
        out = conv(x)
    assert conv._parameters["weight"] is weight and conv._parameters["bias"] is bias  # put back after the forward
    grad_out = (torch.randn(out.shape) * 5).half()
    out.backward(grad_out)

    leaf_weight = weight.detach().half().float().requires_grad_()
    leaf_bias = bias.detach().half().float().requires_grad_()
    expected = function(x.half().float(), leaf_weight, leaf_bias, padding=1)
    expected.backward(grad_out.float())
    assert out.dtype == torch.float16 and torch.equal(out, expected.half())
    for name, got, want in (("weight", weight.grad, leaf_weight.grad), ("bias", bias.grad, leaf_bias.grad)):
        assert got is not None and want is not None and got.dtype == torch.float32
        rounded = want.half().float()
        assert torch.equal(got, rounded), f"{name}: differs by {(got - rounded).abs().max():.3g}"
    assert not torch.equal(weight.grad, leaf_weight.grad), "nothing left to round: the test cannot fail"
    assert weight.dtype == torch.float32 and not torch.equal(weight, weight.half().float())  # the fp32 weights stay


@pytest.mark.parametrize(
    ("x_value", "grad_value", "weight_grad", "bias_grad"),
    [
        (2.0**8, 2.0**7, float("inf"), 4 * 2.0**7),  # 4 positions of 256 x 128: 131072, above fp16's 65504
        (2.0**-8, 2.0**-24, 0.0, 4 * 2.0**-24),  # 4 x 2^-32: under fp16's least subnormal, 2^-24
    ],
    ids=["overflow", "underflow"],
)
def test_an_emulated_convolutions_weight_gradient_overflows_and_underflows_as_autocasts(
    x_value: float, grad_value: float, weight_grad: float, bias_grad: float
) -> None:
    """Sums of powers of two, exact in any order, so the emulation and ``torch.autocast("cpu", float16)`` agree bit for
    bit. The weight's gradient overflowed (or underflowed) in fp16 under autocast, so GradScaler skipped the step and
    backed its scale off; the emulation's kept it in fp32: 131072 (and 2^-30), which the controller stepped on."""
    runs = {}
    for emulated in (False, True):
        conv = nn.Conv2d(1, 2, 1)
        with torch.no_grad():
            conv.weight.fill_(2.0**-3)
            conv.bias.fill_(2.0**-2)
        x = torch.full((1, 1, 2, 2), x_value)
        if emulated:
            with _emulated(conv).context():
                out = conv(x)
        else:
            with torch.autocast("cpu", dtype=torch.float16):
                out = conv(x)
        out.backward(torch.full(out.shape, grad_value, dtype=torch.float16))
        assert conv.weight.grad is not None and conv.bias.grad is not None
        runs[emulated] = out, conv.weight.grad, conv.bias.grad
    assert runs[True][1].flatten().tolist() == [weight_grad] * 2
    assert runs[True][2].flatten().tolist() == [bias_grad] * 2
    for got, autocast in zip(runs[True], runs[False], strict=True):
        assert got.dtype == autocast.dtype and torch.equal(got, autocast)


def test_an_emulated_convolution_under_functional_call_rounds_the_callers_weights() -> None:
    """Autocast casts whatever tensor the convolution is given: so does the emulation, and the module's own
    parameters are back in place after the call."""
    torch.manual_seed(0)
    conv = nn.Conv1d(2, 3, 3)
    own = dict(conv.named_parameters())
    given = {name: (param.detach() * 3).requires_grad_() for name, param in own.items()}
    x = torch.randn(2, 2, 7)
    with _emulated(conv).context():
        out = torch.func.functional_call(conv, given, (x,))
    rounded = {name: tensor.detach().half().float() for name, tensor in given.items()}
    assert torch.equal(out, F.conv1d(x.half().float(), rounded["weight"], rounded["bias"]).half())
    out.float().square().sum().backward()
    for name, tensor in given.items():
        assert tensor.grad is not None and torch.equal(tensor.grad, tensor.grad.half().float()), name
        assert conv._parameters[name] is own[name] and own[name].grad is None, name


class _OneConvolution(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean((1, 2, 3))


def test_the_controllers_loss_scale_backs_off_as_gradscalers_on_an_overflowing_convolution_weight() -> None:
    """One convolution whose weight gradient, scaled by 65536, is 1.2e5 (every other gradient in fp16's range): amp's
    scale went 32768, 32768, 16384 (its weight gradient inf at the first and third steps); the controller's stayed
    65536 and stepped on every gradient, its weights 4.2e-3 from amp's after three steps."""
    torch.manual_seed(0)
    x = torch.rand(16, 3, 8, 8) * 4

    def make() -> _OneConvolution:
        torch.manual_seed(0)
        return _OneConvolution()

    model = make()
    out = model(x)
    target = out.detach() - 1.0
    F.mse_loss(out, target).backward()
    assert model.conv.weight.grad is not None
    factor = 1.2e5 / (model.conv.weight.grad.abs().max().item() * 65536)

    amp_model = make()
    optimizer = torch.optim.SGD(amp_model.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu")
    amp_scales = []
    for _ in range(3):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.mse_loss(amp_model(x).float(), target) * factor
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        amp_scales.append(scaler.get_scale())
    assert amp_scales == [32768.0, 32768.0, 16384.0]

    controlled = make()
    config = ControllerConfig(heuristic=HeuristicConfig(max_overflow_rate=1.0))
    optimizer = torch.optim.SGD(controlled.parameters(), lr=0.05, momentum=0.9)
    controller = ta.Controller(controlled, optimizer, policy="fp16", config=config)
    scales = []
    try:
        for _ in range(3):
            with controller.autocast():
                loss = F.mse_loss(controlled(x).float(), target) * factor
            controller.step(loss)
            state = controller.engine.scaler_state()
            assert state is not None
            scales.append(float(state[0]))
    finally:
        controller.close()
    assert scales == amp_scales
    for (name, got), want in zip(controlled.named_parameters(), amp_model.parameters(), strict=True):
        # amp's fp16 convolution sums the weight gradient at a lower precision than the emulation's fp32 (measured:
        # 1e-3 of the largest), which the last step's SGD update carries
        torch.testing.assert_close(got, want, rtol=0, atol=2e-4, msg=lambda m, n=name: f"{n}: {m}")

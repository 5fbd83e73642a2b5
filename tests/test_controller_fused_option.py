"""``Controller(fused=...)``: the update path a user picks (torch.optim's own step, or the fused Triton step).

On the CPU the fused step runs under Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest).
"""

import copy
import importlib.util
import io
import re

import pytest
import torch
from torch import nn

from triaccel_rl.config import ControllerConfig
from triaccel_rl.controller import Controller
from triaccel_rl.errors import ConfigError

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton installed")

FUSED_TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}
"""How far the fused step's weights may round from torch.optim's over a few fp32 steps (measured: 6e-8 at most)."""

CONFIG = ControllerConfig(interval_steps=4)


def build(optimizer_name="sgd", device="cpu"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).to(device)
    if optimizer_name == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    return model, optimizer


def batches(steps, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 8, generator=g).to(device), torch.randint(0, 3, (16,), generator=g).to(device))
        for _ in range(steps)
    ]


def train(model, optimizer, data, ctl=None):
    """``ctl.step`` over ``data``, or with ``ctl`` None the plain torch.optim loop; returns the final weights."""
    for x, y in data:
        if ctl is None:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        else:
            with ctl.autocast():
                loss = nn.functional.cross_entropy(model(x), y)
            ctl.step(loss)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_fused_false_runs_torch_optims_step_and_equals_a_plain_loop(device, optimizer_name):
    """The reference path, bit for bit the plain loop's in fp32, also on a GPU, where the default is the fused step."""
    data = batches(8, device)
    plain = train(*build(optimizer_name, device), data)
    model, optimizer = build(optimizer_name, device)
    with Controller(model, optimizer, policy="fp32", config=CONFIG, fused=False) as ctl:
        assert not ctl.engine.fused and ctl.engine.fused_optimizer is None
        controlled = train(model, optimizer, data, ctl)
    for a, b in zip(plain, controlled, strict=True):
        assert torch.equal(a, b), f"max difference {(a - b).abs().max().item():.3g}"
    if device == "cuda":  # the control: left to itself, a GPU's controller takes the fused step
        model, optimizer = build(optimizer_name, device)
        with Controller(model, optimizer, policy="fp32", config=CONFIG) as ctl:
            assert ctl.engine.fused


@needs_triton
@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_fused_true_runs_the_fused_step_on_the_cpu(optimizer_name):
    """Where the default is torch.optim's step: the fused one, within rounding of the plain loop."""
    data = batches(8)
    plain = train(*build(optimizer_name), data)
    model, optimizer = build(optimizer_name)
    with Controller(model, optimizer, policy="fp32", config=CONFIG, fused=True) as ctl:
        assert ctl.engine.fused and ctl.engine.fused_optimizer is not None
        controlled = train(model, optimizer, data, ctl)
    for a, b in zip(plain, controlled, strict=True):
        torch.testing.assert_close(b, a, **FUSED_TOLERANCE)
    model, optimizer = build(optimizer_name)
    with Controller(model, optimizer, policy="fp32", config=CONFIG) as ctl:  # the control: None is the CPU's default
        assert not ctl.engine.fused


@pytest.mark.parametrize("value", ["yes", 1, 0, "False"])
def test_a_fused_that_is_not_a_bool_or_none_is_refused_naming_it(value):
    model, optimizer = build()
    with pytest.raises(ConfigError, match=f"^fused={value!r} must be True or False, or None$"):
        Controller(model, optimizer, policy="fp32", fused=value)
    with Controller(model, optimizer, policy="fp32") as ctl:  # refused before anything hooked into the optimizer
        assert not ctl.engine.fused


@needs_triton
@pytest.mark.parametrize(
    ("make_optimizer", "reason"),
    [
        (
            lambda params: torch.optim.RMSprop(params, lr=0.01),
            "RMSprop (supported: SGD, AdamW, Adam without weight decay)",
        ),
        (
            lambda params: torch.optim.Adam(params, lr=0.01, weight_decay=0.01),
            "Adam (supported: SGD, AdamW, Adam without weight decay)",
        ),
        (
            lambda params: torch.optim.AdamW(params, lr=0.01, amsgrad=True),
            "param group 0 has amsgrad=True, which the fused step does not support",
        ),
    ],
)
def test_fused_true_with_an_optimizer_the_fused_step_cannot_run_is_refused_with_the_reason(make_optimizer, reason):
    """The engine's reason, as a ConfigError; the optimizer is left free for a controller on the reference path."""
    model, _ = build()
    optimizer = make_optimizer(model.parameters())
    message = f"fused=True, but the fused step cannot run this optimizer: {reason}"
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        Controller(model, optimizer, policy="fp32", fused=True)
    with Controller(model, optimizer, policy="fp32", fused=False) as ctl:
        assert not ctl.engine.fused
        train(model, optimizer, batches(2), ctl)


def test_fused_true_without_triton_is_refused_saying_so(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == "triton" else real_find_spec(name, *args)
    )
    model, optimizer = build()
    message = "fused=True, but the fused step cannot run this optimizer: Triton is not installed"
    with pytest.raises(ConfigError, match=f"^{re.escape(message)} "):
        Controller(model, optimizer, policy="fp32", fused=True)


def optimizer_states_equal(saved, loaded):
    """Whether two ``optimizer.state_dict()["state"]`` hold the same entries, tensors bit for bit."""
    if saved.keys() != loaded.keys():
        return False
    for index, entries in saved.items():
        if entries.keys() != loaded[index].keys():
            return False
        for key, value in entries.items():
            other = loaded[index][key]
            if not torch.equal(torch.as_tensor(value).cpu(), torch.as_tensor(other).cpu()):
                return False
    return True


@needs_triton
@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
@pytest.mark.parametrize("saved_fused", [True, False])
def test_a_checkpoint_resumes_on_the_other_path_with_its_moments(saved_fused, optimizer_name):
    """Saved with fused on, resumed with fused=False (and back): the moments come over exactly (the fused step saves
    them in torch.optim's layout too), and the resumed run goes on as the uninterrupted one, within rounding."""
    data = batches(9)
    model, optimizer = build(optimizer_name)
    with Controller(model, optimizer, policy="fp32", config=CONFIG, fused=saved_fused) as ctl:
        train(model, optimizer, data[:5], ctl)
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "controller": ctl.state_dict()}, buffer)
        saved_state = copy.deepcopy(optimizer.state_dict()["state"])
        assert saved_state, "no moments to carry over"
        uninterrupted = train(model, optimizer, data[5:], ctl)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    assert checkpoint["controller"]["engine"]["fused"] is saved_fused
    model, optimizer = build(optimizer_name)
    with Controller(model, optimizer, policy="fp32", config=CONFIG, fused=not saved_fused) as ctl:
        assert ctl.engine.fused is not saved_fused
        model.load_state_dict(checkpoint["model"])
        ctl.load_state_dict(checkpoint["controller"])
        assert ctl.steps == 5
        assert optimizer_states_equal(saved_state, optimizer.state_dict()["state"])
        resumed = train(model, optimizer, data[5:], ctl)
    for a, b in zip(uninterrupted, resumed, strict=True):
        torch.testing.assert_close(b, a, **FUSED_TOLERANCE)

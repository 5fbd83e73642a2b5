"""Tests that the refusals of changes made mid-run say what the user can do: the fused step's refusals of param group
changes name the way out for a Controller (``fused=False``, or ``fused=None`` from the changed optimizer), a checkpoint
of another layer count names the layers frozen when the controller was built, and a parameter detached from the fused
step's flat buffer by an assignment to ``.data`` (``vector_to_parameters``) names the in-place write that keeps it."""

from __future__ import annotations

import inspect
import logging
import os
import re
from collections.abc import Callable

import pytest
import torch
from torch import nn

import triaccel_rl as ta
from triaccel_rl import DetachedParametersError
from triaccel_rl import controller as controller_module
from triaccel_rl.engine import StepEngine, _fused_unsupported
from triaccel_rl.precision import find_layers

needs_triton = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="the fused step needs Triton's interpreter on a CPU"
)


class FusedEngine(StepEngine):  # the Controller picks the fused path only on CUDA by itself
    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, fused: bool | None = None
    ) -> None:
        super().__init__(model, optimizer, device, fused=True if fused is None else fused)


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def _weights_and_biases(model: nn.Module, **bias_options: float) -> list[dict]:
    named = list(model.named_parameters())
    return [
        {"params": [p for name, p in named if name.endswith("weight")]},
        {"params": [p for name, p in named if name.endswith("bias")], **bias_options},
    ]


def _step(ctl: ta.Controller, model: nn.Module, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 6, generator=generator), torch.randint(0, 3, (16,), generator=generator)
    with ctl.autocast():
        loss = nn.functional.cross_entropy(model(x), y)
    ctl.step(loss)


def _set(key: str, value: float, group: int = 0) -> Callable[[torch.optim.Optimizer], None]:
    def change(optimizer: torch.optim.Optimizer) -> None:
        optimizer.param_groups[group][key] = value

    return change


ADVICE = (
    "build the StepEngine or Controller with fused=False, which runs torch.optim's own step (an open Controller: "
    "close() it and build a new one"
)

# Each: the optimizer at the build, the change mid-run, the message's advice for a Controller, and the optimizer a
# new Controller is built from with the setting from the start (which the fused step runs or not: ``fused_after``).
CASES = {
    "adam weight decay": (
        lambda m: torch.optim.Adam(m.parameters(), lr=1e-2),
        _set("weight_decay", 0.01),
        "keep it at 0, or use AdamW, or " + ADVICE + "; one built with fused=None from an Adam with this weight decay "
        "takes the reference path by itself)",
        lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, weight_decay=0.01),
        False,
    ),
    "a layer's LRs apart": (
        lambda m: torch.optim.SGD(_weights_and_biases(m), lr=0.1, momentum=0.9),
        _set("lr", 0.02, group=1),
        "keep a layer's groups at one LR, or " + ADVICE + "; one built with fused=None from groups whose LRs differ "
        "already takes the reference path by itself)",
        lambda m: torch.optim.SGD(_weights_and_biases(m, lr=0.02), lr=0.1, momentum=0.9),
        False,
    ),
    "groups' momentum apart": (
        lambda m: torch.optim.SGD(_weights_and_biases(m), lr=0.1, momentum=0.9),
        _set("momentum", 0.5, group=1),
        "keep them equal, or " + ADVICE + "; one built with fused=None from groups whose 'momentum' differ already "
        "takes the reference path by itself)",
        lambda m: torch.optim.SGD(_weights_and_biases(m, momentum=0.5), lr=0.1, momentum=0.9),
        False,
    ),
    "maximize turned on": (
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
        _set("maximize", True),
        "turn it off, or " + ADVICE + "; one built with fused=None from groups with it on already takes the reference "
        "path by itself)",
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1, maximize=True),
        False,
    ),
    "momentum from 0": (
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
        _set("momentum", 0.9),
        "start with momentum > 0 (an open Controller: close() it and build a new one from an optimizer whose "
        "momentum is > 0), or " + ADVICE + ")",
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
        True,
    ),
}


@needs_triton
@pytest.mark.parametrize("case", CASES)
def test_a_fused_refusal_of_a_mid_run_change_says_what_a_controller_user_can_do(case, monkeypatch, caplog) -> None:
    """A Controller takes ``fused=False`` too: the refusals say so, and that a new one built with the setting from the
    start works; both pieces of advice work. The refused step moved nothing: no update raised part-way."""
    build, change, advice, rebuild, fused_after = CASES[case]
    assert "fused" in inspect.signature(ta.Controller).parameters
    assert "fused" not in ta.ControllerConfig.__dataclass_fields__
    monkeypatch.setattr(controller_module, "StepEngine", FusedEngine)
    model = _mlp()
    optimizer = build(model)
    ctl = ta.Controller(model, optimizer, policy="fp32")
    _step(ctl, model)
    change(optimizer)
    with caplog.at_level(logging.ERROR, logger="triaccel_rl"), pytest.raises(ValueError, match=re.escape(advice) + "$"):
        _step(ctl, model, seed=2)
    assert "raised part-way" not in caplog.text
    assert ctl.steps == 1
    ctl.close()
    # One advice followed: a new Controller on the changed optimizer, with fused=False
    with ta.Controller(model, optimizer, policy="fp32", fused=False) as ctl:
        assert not ctl.engine.fused
        _step(ctl, model, seed=2)
        _step(ctl, model, seed=3)
    # The other: a new Controller from an optimizer with the setting from the start. On a GPU it runs the
    # fused step where the optimizer allows it (``_fused_unsupported`` says ''), else the reference path.
    monkeypatch.setattr(controller_module, "StepEngine", FusedEngine if fused_after else StepEngine)
    model = _mlp()
    optimizer = rebuild(model)
    with ta.Controller(model, optimizer, policy="fp32") as ctl:
        assert (_fused_unsupported(optimizer, ctl.engine.layer_params) == "") is fused_after
        _step(ctl, model)
        _step(ctl, model, seed=2)
    assert torch.isfinite(torch.cat([p.detach().flatten() for p in model.parameters()])).all()


def _checkpoint_of(model: nn.Module) -> dict:
    with ta.Controller(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), policy="fp32") as ctl:
        _step(ctl, model)
        return ctl.state_dict()


def test_a_checkpoint_resumed_with_a_layer_frozen_before_the_build_names_the_frozen_layer() -> None:
    """Said "the checkpoint has 3 layers; this model has 2" of a model of 3 layers: the layer frozen when the
    controller was built is none of its layers. Now the message names it and says how to resume."""
    state = _checkpoint_of(_mlp())
    model = _mlp()
    model[0].requires_grad_(False)
    ctl = ta.Controller(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), policy="fp32")
    with pytest.raises(ValueError) as refused:
        ctl.load_state_dict(state)
    ctl.close()
    assert str(refused.value) == (
        "the checkpoint has 3 layers; this controller has 2, the model's layers that were trainable when it was built "
        "(not ['0'], frozen then). A layer frozen when the controller is built is not one of its layers: build it "
        "with the same model and parameters trainable as the run that saved the checkpoint, load the checkpoint, "
        "then freeze"
    )
    # The advice followed: built with every layer trainable, as the saving run was, loaded, then frozen
    model = _mlp()
    with ta.Controller(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), policy="fp32") as ctl:
        ctl.load_state_dict(state)
        model[0].requires_grad_(False)
        frozen = model[0].weight.detach().clone()
        _step(ctl, model, seed=2)
    assert torch.equal(model[0].weight.detach(), frozen)


def test_a_checkpoint_of_another_model_keeps_the_plain_count() -> None:
    """No layer of this model is frozen: the counts are the models' own, and the hint follows them."""
    state = _checkpoint_of(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)))
    model = _mlp()
    with ta.Controller(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), policy="fp32") as ctl:
        with pytest.raises(ValueError) as refused:
            ctl.load_state_dict(state)
    assert str(refused.value) == (
        "the checkpoint has 2 layers; this model has 3. A layer frozen when the controller is built is not one of "
        "its layers: build it with the same model and parameters trainable as the run that saved the checkpoint, "
        "load the checkpoint, then freeze"
    )


def test_modules_not_held_counts_an_attention_as_one_layer() -> None:
    """A frozen ``MultiheadAttention`` is one module not held (its ``out_proj`` is part of it, as ``find_layers``
    counts it); a held one hides its ``out_proj`` too."""
    from triaccel_rl.engine import _modules_not_held  # (imported here: the other tests run without it)

    model = nn.ModuleDict({"attention": nn.MultiheadAttention(4, 2), "head": nn.Linear(4, 2)})
    model["attention"].requires_grad_(False)
    layers = [info for _, _, info in find_layers(model)]
    assert _modules_not_held(model, layers) == ["attention"]
    model["attention"].requires_grad_(True)
    model["head"].requires_grad_(False)
    layers = [info for _, _, info in find_layers(model)]
    assert _modules_not_held(model, layers) == ["head"]


@needs_triton
def test_vector_to_parameters_on_the_fused_path_names_the_in_place_write(monkeypatch) -> None:
    """``vector_to_parameters`` assigns each parameter's ``.data``, which detaches it from the flat buffer: the error
    said only "Move or cast the model before building the controller". It now names the assignment and the in-place
    copy that keeps a parameter in the buffer, and that copy trains on."""
    monkeypatch.setattr(controller_module, "StepEngine", FusedEngine)
    model = _mlp()
    with ta.Controller(model, torch.optim.SGD(model.parameters(), lr=0.1), policy="fp32") as ctl:
        _step(ctl, model)
        values = torch.nn.utils.parameters_to_vector(model.parameters()).detach() * 0.5
        with torch.no_grad():
            for param, value in zip(model.parameters(), _split_like(values, model), strict=True):
                param.copy_(value)  # in place: kept
        _step(ctl, model, seed=2)
        torch.nn.utils.vector_to_parameters(values, model.parameters())
        with pytest.raises(DetachedParametersError) as refused:
            _step(ctl, model, seed=3)
    message = str(refused.value)
    assert message.startswith("6 parameter(s) no longer live in the fused step's flat buffer: 0.weight, 0.bias")
    assert "an assignment to .data, which torch.nn.utils.vector_to_parameters makes" in message
    assert message.endswith(
        "Move or cast the model before building the controller; to write new values into a parameter, copy them in "
        "place under torch.no_grad() (p.copy_(...)), which keeps it in the buffer."
    )


def _split_like(vector: torch.Tensor, model: nn.Module) -> list[torch.Tensor]:
    sizes = [p.numel() for p in model.parameters()]
    return [part.view_as(p) for part, p in zip(vector.split(sizes), model.parameters(), strict=True)]

"""Tests for triaccel_rl.engine.StepEngine: a parameter frozen mid-run sits the steps out on both paths, and param
group options the fused step does not run (``amsgrad``, ``maximize``) are refused when they arrive after the build."""

from __future__ import annotations

import copy
import os
import re

import pytest
import torch
from torch import nn

from triaccel_rl.engine import StepEngine

CPU = torch.device("cpu")
needs_triton = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="the fused step needs Triton's interpreter on a CPU"
)
FUSED = [False, pytest.param(True, marks=needs_triton)]


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _optimizer(kind: str, params, **options) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2, **options)
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2, **options)


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(16, 6, generator=generator), torch.randint(0, 3, (16,), generator=generator)) for _ in range(n)
    ]


def _engine_step(model: nn.Module, engine: StepEngine, x: torch.Tensor, y: torch.Tensor) -> None:
    with engine.precision.context():
        loss = nn.functional.cross_entropy(model(x), y)
    engine.backward_and_step(loss)


def _plain_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    optimizer.zero_grad()  # gradients to None: a frozen parameter's too
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


def _state_of(optimizer: torch.optim.Optimizer, indices: tuple[int, ...]) -> dict[int, dict[str, torch.Tensor]]:
    """Copies of the optimizer's state of parameters ``indices`` in torch.optim's layout (the fused step exports it)."""
    state = optimizer.state_dict()["state"]
    return {i: {key: torch.as_tensor(value).clone() for key, value in state[i].items()} for i in indices}


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_a_parameter_frozen_mid_run_is_left_alone_as_torch_leaves_it(kind, fused) -> None:
    """A layer frozen between steps (``requires_grad_(False)``) held a zero gradient, the engine zeroing in place:
    weight decay and momentum (Adam's moments and step count) moved it on, 0.03 (SGD) and 0.02 (AdamW) in 3 steps, on
    both paths, where a plain loop leaves it alone. Now its weights and state stay bit for bit as at the freeze, the
    other layer trains as in the plain loop, and unfrozen the layer trains again, as in the plain loop."""
    model, plain = _mlp(), _mlp()
    optimizer = _optimizer(kind, model.parameters())
    plain_optimizer = _optimizer(kind, plain.parameters())
    engine = StepEngine(model, optimizer, CPU, fused=fused)
    assert engine.fused is fused
    data = _batches(8)
    for x, y in data[:3]:
        _engine_step(model, engine, x, y)
        _plain_step(plain, plain_optimizer, x, y)
    for layer in (model[0], plain[0]):
        layer.requires_grad_(False)
    frozen = [p.detach().clone() for p in model[0].parameters()]
    frozen_state = _state_of(optimizer, (0, 1))  # model[0]'s weight and bias
    for x, y in data[3:6]:
        _engine_step(model, engine, x, y)
        _plain_step(plain, plain_optimizer, x, y)
    for p, before in zip(model[0].parameters(), frozen, strict=True):
        assert torch.equal(p.detach(), before), f"moved by {float((p.detach() - before).abs().max()):.3g}"
    for index, state in _state_of(optimizer, (0, 1)).items():
        for key, value in state.items():
            assert torch.equal(value, frozen_state[index][key]), f"parameter {index}'s {key} moved"
    for got, want in zip(model.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-5, atol=1e-6)
    for layer in (model[0], plain[0]):
        layer.requires_grad_(True)
    for x, y in data[6:]:
        _engine_step(model, engine, x, y)
        _plain_step(plain, plain_optimizer, x, y)
    assert not torch.equal(model[0].weight.detach(), frozen[0])
    for got, want in zip(model.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-5, atol=1e-6)


def _refusal(option: str) -> str:
    return re.escape(
        f"param group 0 has {option}=True, which the fused step does not support: turn it off, or build the StepEngine "
        "or Controller with fused=False"
    )


OPTIONS = [("sgd", "maximize"), ("adamw", "maximize"), ("adamw", "amsgrad")]


def _assert_same_state(got: dict, want: dict) -> None:
    assert got["param_groups"] == want["param_groups"]
    assert got["state"].keys() == want["state"].keys()
    for index, state in want["state"].items():
        assert got["state"][index].keys() == state.keys()
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(got["state"][index][key]), torch.as_tensor(value)), (index, key)


@needs_triton
@pytest.mark.parametrize(("kind", "option"), OPTIONS)
def test_a_loaded_state_turning_on_an_unsupported_option_is_refused_before_it_loads(kind, option) -> None:
    """A torch.optim state whose groups say ``amsgrad=True`` or ``maximize=True``, loaded into the optimizer the fused
    step drives, was taken and the option ignored: plain AdamW (``max_exp_avg_sq`` dropped, and the export then paired
    ``amsgrad=True`` with no ``max_exp_avg_sq``: a plain resume raised a KeyError) or a descent for ``maximize``. Now
    the load is refused by name, the optimizer's groups and state as they were."""
    data = _batches(3)
    source = _mlp()
    source_optimizer = _optimizer(kind, source.parameters(), **{option: True})
    for x, y in data[:2]:
        _plain_step(source, source_optimizer, x, y)
    model = _mlp()
    optimizer = _optimizer(kind, model.parameters())
    engine = StepEngine(model, optimizer, CPU, fused=True)
    _engine_step(model, engine, *data[2])
    before = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(ValueError, match=_refusal(option)):
        optimizer.load_state_dict(source_optimizer.state_dict())
    _assert_same_state(optimizer.state_dict(), before)
    assert optimizer.param_groups[0][option] is False


@needs_triton
@pytest.mark.parametrize(("kind", "option"), OPTIONS)
def test_an_engine_checkpoint_turning_on_an_unsupported_option_is_refused(kind, option) -> None:
    """The engine's own checkpoint path runs the same check: a reference-path run's state with the option on, and a
    fused run's state whose group was edited before the save, are refused, the engine's state as it was."""
    data = _batches(3)
    reference_model = _mlp()
    reference = StepEngine(
        reference_model, _optimizer(kind, reference_model.parameters(), **{option: True}), CPU, fused=False
    )
    edited_model = _mlp()
    edited = StepEngine(edited_model, _optimizer(kind, edited_model.parameters()), CPU, fused=True)
    for x, y in data[:2]:
        _engine_step(reference_model, reference, x, y)
        _engine_step(edited_model, edited, x, y)
    edited.optimizer.param_groups[0][option] = True
    model = _mlp()
    optimizer = _optimizer(kind, model.parameters())
    engine = StepEngine(model, optimizer, CPU, fused=True)
    _engine_step(model, engine, *data[2])
    before = copy.deepcopy(optimizer.state_dict())
    for saved in (reference.state_dict(), edited.state_dict()):
        with pytest.raises(ValueError, match=_refusal(option)):
            engine.load_state_dict(saved)
        _assert_same_state(optimizer.state_dict(), before)


@needs_triton
@pytest.mark.parametrize(("kind", "option"), OPTIONS)
def test_an_unsupported_option_set_on_a_group_mid_run_is_refused_at_the_next_step(kind, option) -> None:
    """``group["maximize"] = True`` between steps went unseen: the fused step kept descending (0.04 from the plain
    loop's ascent in 2 steps). Now the next step raises, naming it, with no update; turned off again, steps go on."""
    model = _mlp()
    optimizer = _optimizer(kind, model.parameters())
    engine = StepEngine(model, optimizer, CPU, fused=True)
    data = _batches(3)
    _engine_step(model, engine, *data[0])
    optimizer.param_groups[0][option] = True
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=_refusal(option)):
        _engine_step(model, engine, *data[1])
    for p, before in zip(model.parameters(), weights, strict=True):
        assert torch.equal(p.detach(), before)
    optimizer.param_groups[0][option] = False
    _engine_step(model, engine, *data[2])
    assert engine.applied_steps() == 2


@pytest.mark.parametrize(("kind", "option"), OPTIONS)
def test_the_build_refuses_an_unsupported_option_by_its_group(kind, option) -> None:
    model = _mlp()
    groups = [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters()), option: True}]
    with pytest.raises(ValueError, match=re.escape(f"cannot run this optimizer: param group 1 has {option}=True")):
        StepEngine(model, _optimizer(kind, groups), CPU, fused=True)

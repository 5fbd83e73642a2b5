"""On the fused step, ``optimizer.state`` is a live view between steps: a reset mid-run acts as in torch.optim."""

import collections
import logging
import os
from collections.abc import Callable

import pytest
import torch
from torch import nn

import triaccel_rl as ta
from triaccel_rl import controller as controller_module
from triaccel_rl.engine import StepEngine

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs a GPU or Triton's interpreter (TRITON_INTERPRET=1 before triton is imported)",
)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOLERANCE = 1e-6  # fp32: the fused kernels round differently from torch.optim's foreach ops (~6e-8 seen)
RESET_AT = 3  # the reset goes in before this step (0-based), after three steps built up the state
N_STEPS = 7

Reset = Callable[[nn.Sequential, torch.optim.Optimizer], None]


def clear(model: nn.Sequential, optimizer: torch.optim.Optimizer) -> None:
    optimizer.state.clear()


def new_dict(model: nn.Sequential, optimizer: torch.optim.Optimizer) -> None:
    optimizer.state = collections.defaultdict(dict)


def zero_in_place(model: nn.Sequential, optimizer: torch.optim.Optimizer) -> None:
    for entry in optimizer.state.values():
        for name, value in entry.items():
            if name != "step":
                value.zero_()


def del_last_layer(model: nn.Sequential, optimizer: torch.optim.Optimizer) -> None:
    for param in model[4].parameters():
        del optimizer.state[param]


def del_one_weight(model: nn.Sequential, optimizer: torch.optim.Optimizer) -> None:
    del optimizer.state[model[4].weight]


RESETS = {"clear": clear, "new_dict": new_dict, "zero_in_place": zero_in_place, "del_layer": del_last_layer}


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).to(DEVICE)


def build_optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    return torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.05)


def batches(n: int = N_STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 6, generator=g).to(DEVICE), torch.randint(0, 3, (16,), generator=g).to(DEVICE))
            for _ in range(n)]  # fmt: skip


def plain_run(kind: str, reset: Reset | None, data: list[tuple[torch.Tensor, torch.Tensor]]) -> nn.Sequential:
    model = mlp()
    optimizer = build_optimizer(kind, model)
    for i, (x, y) in enumerate(data):
        if i == RESET_AT and reset is not None:
            reset(model, optimizer)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model


def fused_engine(kind: str) -> tuple[nn.Sequential, torch.optim.Optimizer, StepEngine]:
    model = mlp()
    optimizer = build_optimizer(kind, model)
    return model, optimizer, StepEngine(model, optimizer, DEVICE, fused=True)


def fused_steps(model: nn.Module, engine: StepEngine, data: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for x, y in data:
        with engine.precision.context():
            loss = nn.functional.cross_entropy(model(x), y)
        _, skipped = engine.backward_and_step(loss)
        assert not skipped


def max_difference(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_the_state_is_a_live_view_of_the_fused_buffers_between_steps(kind: str) -> None:
    model, optimizer, engine = fused_engine(kind)
    assert len(optimizer.state) == 0  # as torch.optim's before its first step
    data = batches(3)
    fused_steps(model, engine, data[:2])
    params = list(model.parameters())
    assert len(optimizer.state) == len(params)
    fused = engine.fused_optimizer
    names = ["momentum_buffer"] if kind == "sgd" else ["exp_avg", "exp_avg_sq"]
    for param in params:
        entry = optimizer.state[param]
        assert sorted(entry) == sorted(names + ([] if kind == "sgd" else ["step"]))
        for name in names:  # a view into the fused buffer, not a copy
            buffer = getattr(fused, name)
            assert entry[name].untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr(), name
            assert entry[name].shape == param.shape
    plain = mlp()
    plain_optimizer = build_optimizer(kind, plain)
    for x, y in data[:2]:
        plain_optimizer.zero_grad()
        nn.functional.cross_entropy(plain(x), y).backward()
        plain_optimizer.step()
    for param, plain_param in zip(params, plain.parameters(), strict=True):
        for name in names:
            error = (optimizer.state[param][name] - plain_optimizer.state[plain_param][name]).abs().max().item()
            assert error <= TOLERANCE, f"{name}: {error}"
    if kind == "adamw":
        step = optimizer.state[params[0]]["step"]
        assert float(step) == 2.0
        saved = optimizer.state_dict()  # torch.optim's layout: a float32 count a parameter, on the CPU
        assert all(e["step"].dtype == torch.float32 and e["step"].device.type == "cpu" for e in saved["state"].values())
        assert float(saved["state"][0]["step"]) == 2.0
        fused_steps(model, engine, data[2:])  # the view stays live after state_dict(): no export needed
        assert float(optimizer.state[params[0]]["step"]) == 3.0
        assert float(saved["state"][0]["step"]) == 2.0  # the dict returned is not the live view


@pytest.mark.parametrize("reset", list(RESETS))
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_a_reset_mid_run_acts_as_in_torch_optim(kind: str, reset: str) -> None:
    data = batches()
    plain = plain_run(kind, RESETS[reset], data)
    unreset = plain_run(kind, None, data)
    model, optimizer, engine = fused_engine(kind)
    fused_steps(model, engine, data[:RESET_AT])
    RESETS[reset](model, optimizer)
    fused_steps(model, engine, data[RESET_AT:])
    assert max_difference(plain, unreset) > 1e-3  # the reset matters
    error = max_difference(model, plain)
    assert error <= TOLERANCE, f"max |fused - torch.optim| = {error} after {reset}"
    assert len(optimizer.state) == len(list(model.parameters()))  # the view is back after the step


def test_sgd_without_dampening_restarts_one_parameter_exactly() -> None:
    data = batches()
    plain = plain_run("sgd", del_one_weight, data)
    model, optimizer, engine = fused_engine("sgd")
    fused_steps(model, engine, data[:RESET_AT])
    del_one_weight(model, optimizer)
    fused_steps(model, engine, data[RESET_AT:])
    error = max_difference(model, plain)
    assert error <= TOLERANCE, f"max |fused - torch.optim| = {error}"


def test_adamw_warns_where_one_parameter_of_a_layer_loses_its_state(caplog: pytest.LogCaptureFixture) -> None:
    """One count a layer: the weight cannot restart at step 1 while its bias carries on at step 4."""
    model, optimizer, engine = fused_engine("adamw")
    data = batches()
    fused_steps(model, engine, data[:RESET_AT])
    del_one_weight(model, optimizer)
    with caplog.at_level(logging.WARNING):
        fused_steps(model, engine, data[RESET_AT : RESET_AT + 1])
    assert "parameters 4.weight of layer 2 hold no optimizer state while the rest of their layer does" in caplog.text
    assert "at the layer's step 3, not at step 1" in caplog.text
    assert torch.count_nonzero(optimizer.state[model[4].weight]["exp_avg"]) > 0  # started from zero, then stepped


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_a_state_cleared_after_the_last_step_is_what_state_dict_and_remove_give(kind: str) -> None:
    data = batches()
    model, optimizer, engine = fused_engine(kind)
    fused_steps(model, engine, data[:RESET_AT])
    optimizer.state.clear()
    assert optimizer.state_dict()["state"] == {}  # as torch.optim's after clear()
    assert engine.state_dict()["optimizer"]["steps"].tolist() == [RESET_AT, 0.0, 0.0, 0.0]  # the model's count stays
    engine.remove()
    assert len(optimizer.state) == 0
    for x, y in data[RESET_AT:]:  # plain torch.optim steps from the cleared state
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    error = max_difference(model, plain_run(kind, clear, data))
    assert error <= TOLERANCE, f"max |fused then torch.optim - torch.optim| = {error}"


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_remove_hands_back_standalone_copies_of_the_live_view(kind: str) -> None:
    model, optimizer, engine = fused_engine(kind)
    fused_steps(model, engine, batches(2))
    live = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in model.parameters()}
    engine.remove()
    for param in model.parameters():
        for name, value in optimizer.state[param].items():
            assert value._base is None, name  # its own storage, not a view of a fused buffer
            assert torch.equal(value.to(live[id(param)][name].dtype).cpu(), live[id(param)][name].cpu()), name
            if name == "step":
                assert value.dtype == torch.float32 and value.device.type == "cpu"


def test_a_controller_on_the_fused_step_follows_a_reset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(controller_module, "StepEngine", lambda *args: StepEngine(*args, fused=True))
    data = batches()
    model = mlp()
    optimizer = build_optimizer("adamw", model)
    ctl = ta.Controller(model, optimizer, policy="fp32", config=ta.ControllerConfig(interval_steps=3))
    try:
        assert ctl.engine.fused
        for i, (x, y) in enumerate(data):
            if i == RESET_AT:
                optimizer.state = collections.defaultdict(dict)
            optimizer.zero_grad()
            with ctl.autocast():
                loss = nn.functional.cross_entropy(model(x), y)
            ctl.step(loss)
    finally:
        ctl.close()
    error = max_difference(model, plain_run("adamw", new_dict, data))
    assert error <= TOLERANCE, f"max |Controller (fused) - torch.optim| = {error}"

"""On the fused step, ``optimizer.state`` is a live view between steps: a reset mid-run acts as in torch.optim."""

import collections
import copy
import io
import logging
import os
from collections.abc import Callable
from typing import Any

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
    monkeypatch.setattr(controller_module, "StepEngine", lambda *args, **kwargs: StepEngine(*args, fused=True))
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


@pytest.mark.parametrize("how", ["torch_save", "deepcopy"])
def test_an_optimizer_pickled_mid_run_resumes_in_a_plain_adamw(how: str) -> None:
    """Each parameter's ``step`` is a tensor of its own: a copy's plain AdamW advances each once a step."""
    data = batches()
    model, optimizer, engine = fused_engine("adamw")
    fused_steps(model, engine, data[:RESET_AT])
    if how == "torch_save":
        buffer = io.BytesIO()
        torch.save({"model": model, "optimizer": optimizer}, buffer)
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=False)
        copied_model, copied_optimizer = saved["model"], saved["optimizer"]
    else:
        copied_model, copied_optimizer = copy.deepcopy((model, optimizer))
    engine.remove()
    steps = [copied_optimizer.state[p]["step"] for p in copied_model.parameters()]
    assert [float(step) for step in steps] == [float(RESET_AT)] * len(steps)
    assert all(step.dtype == torch.float32 for step in steps)  # as torch.optim's
    assert len({step.untyped_storage().data_ptr() for step in steps}) == len(steps)  # none shared
    for x, y in data[RESET_AT:]:
        copied_optimizer.zero_grad()
        nn.functional.cross_entropy(copied_model(x), y).backward()
        copied_optimizer.step()
    assert [float(copied_optimizer.state[p]["step"]) for p in copied_model.parameters()] == [float(N_STEPS)] * 6
    error = max_difference(copied_model, plain_run("adamw", None, data))
    assert error <= TOLERANCE, f"max |fused, pickled, then torch.optim - torch.optim| = {error}"


def test_the_shown_step_follows_a_rollback_of_the_fused_state() -> None:
    model, optimizer, engine = fused_engine("adamw")
    data = batches()
    fused_steps(model, engine, data[:2])
    saved = copy.deepcopy(engine.fused_optimizer.state_dict())
    fused_steps(model, engine, data[2:4])
    assert float(optimizer.state[model[0].weight]["step"]) == 4.0
    engine.fused_optimizer.load_state_dict(saved)  # as RollbackGuard restores its copy
    engine.after_restore()
    assert [float(optimizer.state[p]["step"]) for p in model.parameters()] == [2.0] * 6


class TwoHeads(nn.Module):
    """A body and two heads, one taken a step: a head that has not stepped yet; ``frozen`` held by no step."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(6, 8)
        self.a = nn.Linear(8, 3)
        self.b = nn.Linear(8, 3)
        self.frozen = nn.Linear(8, 3).requires_grad_(False)
        self.to(DEVICE)

    def forward(self, x: torch.Tensor, head: str) -> torch.Tensor:
        out: torch.Tensor = getattr(self, head)(torch.relu(self.body(x)))
        return out


def delete_head(head: str) -> Callable[[TwoHeads, torch.optim.Optimizer], None]:
    def delete(model: TwoHeads, optimizer: torch.optim.Optimizer) -> None:
        for param in getattr(model, head).parameters():
            del optimizer.state[param]

    return delete


def read_frozen(model: TwoHeads, optimizer: torch.optim.Optimizer) -> None:
    assert not optimizer.state[model.frozen.weight]  # a logging loop's read: the defaultdict makes an empty entry


def two_head_run(
    kind: str,
    fused: bool,
    heads: str,
    edit_at: int,
    edit: Callable[[TwoHeads, torch.optim.Optimizer], None],
    momenta: list[float] | None = None,
) -> tuple[TwoHeads, StepEngine | None]:
    model = TwoHeads()
    optimizer: torch.optim.Optimizer
    if kind == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=0.5)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    engine = StepEngine(model, optimizer, DEVICE, fused=True) if fused else None
    for i, ((x, y), head) in enumerate(zip(batches(len(heads)), heads, strict=True)):
        if momenta is not None:
            optimizer.param_groups[0]["momentum"] = momenta[i]
        if i == edit_at:
            edit(model, optimizer)
        optimizer.zero_grad()
        if engine is None:
            nn.functional.cross_entropy(model(x, head), y).backward()
            optimizer.step()
        else:
            with engine.precision.context():
                loss = nn.functional.cross_entropy(model(x, head), y)
            assert not engine.backward_and_step(loss)[1]
    return model, engine


@pytest.mark.parametrize("edit", ["delete_a", "read_frozen"])
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_an_adoption_leaves_a_layer_that_has_not_stepped_at_its_start(
    kind: str, edit: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Head b first steps after the edit: adopted as a state, its zeros started SGD's momentum dampened."""
    edits = {"delete_a": delete_head("a"), "read_frozen": read_frozen}
    heads = "aaaabbbb"
    plain, _ = two_head_run(kind, False, heads, RESET_AT, edits[edit])
    adoptions: list[dict[str, Any]] = []
    adopt = StepEngine._adopt_optimizer_state

    def counted(engine: StepEngine, **kwargs: Any) -> None:
        adoptions.append(kwargs)
        adopt(engine, **kwargs)

    monkeypatch.setattr(StepEngine, "_adopt_optimizer_state", counted)
    model, engine = two_head_run(kind, True, heads, RESET_AT, edits[edit])
    error = max_difference(model, plain)
    assert error <= TOLERANCE, f"max |fused - torch.optim| = {error} after {edit}"
    counts = [8.0, 1.0 if edit == "delete_a" else 4.0, 4.0]  # body, a (restarted at step 3 by a delete), b
    assert engine is not None and engine.fused_optimizer.layer_step_counts.tolist() == counts
    assert len(adoptions) == (2 if edit == "delete_a" else 1)  # the build's; a read of a parameter not held is none


def test_an_adoption_leaves_a_layer_whose_momentum_has_not_started_waiting_for_it() -> None:
    """Head a took its steps at momentum 0: its first step with momentum takes the gradient, not a dampened part."""
    heads = "aaabbbab"
    momenta = [0.0] * 3 + [0.9] * 5
    plain, _ = two_head_run("sgd", False, heads, 6, delete_head("b"), momenta)
    model, _ = two_head_run("sgd", True, heads, 6, delete_head("b"), momenta)
    error = max_difference(model, plain)
    assert error <= TOLERANCE, f"max |fused - torch.optim| = {error}"

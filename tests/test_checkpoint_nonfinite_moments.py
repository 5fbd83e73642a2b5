"""A checkpoint whose optimizer moments hold NaN or inf is refused at load, naming the parameter and the field.

Before, it loaded: the first update after the resume had a finite loss, wrote NaN into the weights and confirmed the
resume's rollback copy as good, and every later failure rolled back to that poisoned copy, to the end of the run.
"""

import copy
import math
import os
import re

import pytest
import torch
from torch import nn

import triaccel_rl as ta
from triaccel_rl.config import ControllerConfig
from triaccel_rl.engine import StepEngine
from triaccel_rl.training import TrainingRun

DATA = (torch.randn(96, 8, generator=torch.Generator().manual_seed(0)), torch.arange(96) % 3)
POISONS = [
    ("adamw", "exp_avg_sq", float("nan")),
    ("adamw", "exp_avg", float("inf")),
    ("sgd", "momentum_buffer", float("nan")),
    ("sgd", "momentum_buffer", float("-inf")),
]
TORCH_LAYOUT = (
    "the checkpoint's optimizer state holds NaN or infinite values: {field!r} of parameter 2 (2.weight). The first "
    "update after the resume would write them into the weights; resume from an earlier checkpoint"
)


def _model_and_optimizer(kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    if kind == "sgd":
        return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, torch.optim.AdamW(model.parameters(), lr=0.01)


def _train(model, ctl, n_steps):
    steps = 0
    for x, y in ctl.loader(DATA, batch_size=16, epochs=4):
        with ctl.autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        ctl.step(loss)
        steps += 1
        if steps == n_steps:
            return


def _assert_same(before, after, path="state"):
    """Bit-equal nested states: tensors by ``torch.equal`` (dtype too), the rest by ``==``; the step time aside."""
    if isinstance(before, dict):
        assert before.keys() == after.keys(), path
        for key in before:
            if key != "interval_ms":  # the clock's, read at each state_dict()
                _assert_same(before[key], after[key], f"{path}[{key!r}]")
    elif isinstance(before, (list, tuple)):
        assert len(before) == len(after), path
        for index, (a, b) in enumerate(zip(before, after, strict=True)):
            _assert_same(a, b, f"{path}[{index}]")
    elif isinstance(before, torch.Tensor):
        assert before.dtype == after.dtype and torch.equal(before, after), path
    elif isinstance(before, float) and math.isnan(before):  # an estimate not measured yet
        assert isinstance(after, float) and math.isnan(after), path
    else:
        assert before == after, path


def _poisoned(engine_state, field, value):
    """A copy of an engine state (torch.optim's layout), ``field`` of parameter 2 (the second weight) at ``value``."""
    state = copy.deepcopy(engine_state)
    state["optimizer"]["state"][2][field].view(-1)[3] = value
    return state


@pytest.mark.parametrize(("kind", "field", "value"), POISONS)
def test_the_controller_refuses_non_finite_moments_and_stays_as_it_was(kind, field, value):
    model, optimizer = _model_and_optimizer(kind)
    ctl = ta.Controller(model, optimizer, policy="heuristic", config=ControllerConfig(interval_steps=5))
    _train(model, ctl, 7)
    saved = copy.deepcopy(ctl.state_dict())
    saved["engine"] = _poisoned(saved["engine"], field, value)
    _train(model, ctl, 3)  # the live run moves on from the saved state
    before = copy.deepcopy({"controller": ctl.state_dict(), "model": model.state_dict()})
    with pytest.raises(ValueError, match=re.escape(TORCH_LAYOUT.format(field=field))):
        ctl.load_state_dict(saved)
    _assert_same(before, {"controller": ctl.state_dict(), "model": model.state_dict()})
    _train(model, ctl, 2)  # and trains on
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_the_controller_still_resumes_from_a_finite_checkpoint():
    model, optimizer = _model_and_optimizer("adamw")
    ctl = ta.Controller(model, optimizer, policy="heuristic", config=ControllerConfig(interval_steps=5))
    _train(model, ctl, 7)
    saved = copy.deepcopy({"controller": ctl.state_dict(), "model": model.state_dict()})
    _train(model, ctl, 3)
    model.load_state_dict(saved["model"])
    ctl.load_state_dict(saved["controller"])
    _assert_same(saved["controller"]["engine"], ctl.state_dict()["engine"])
    assert ctl.steps == 7


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_training_runs_engine_refuses_non_finite_moments_and_stays_as_it_was(value):
    """``TrainingRun`` has no checkpoint of its own: its state is its engine's, loaded through the same check."""
    run = TrainingRun("synthetic", seed=0, device="cpu", batch_size=16)
    run.step()
    assert isinstance(run.optimizer, torch.optim.SGD)  # the synthetic task's
    field = "momentum_buffer"
    saved = copy.deepcopy(run.engine.state_dict())
    state = copy.deepcopy(saved)
    index = min(state["optimizer"]["state"])
    state["optimizer"]["state"][index][field].view(-1)[0] = value
    run.step()
    before = copy.deepcopy({"engine": run.engine.state_dict(), "model": run.model.state_dict()})
    params = [p for group in run.optimizer.param_groups for p in group["params"]]
    name = {id(p): name for name, p in run.model.named_parameters()}[id(params[index])]
    with pytest.raises(ValueError, match=re.escape(f"{field!r} of parameter {index} ({name})")):
        run.engine.load_state_dict(state)
    _assert_same(before, {"engine": run.engine.state_dict(), "model": run.model.state_dict()})
    run.engine.load_state_dict(saved)  # a finite one still loads
    _assert_same(saved, run.engine.state_dict())


needs_fused = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs a GPU or Triton's interpreter (TRITON_INTERPRET=1 before triton is imported)",
)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _fused_engine_and_state(kind, fused=True):
    model, optimizer = _model_and_optimizer(kind)
    model.to(DEVICE)
    engine = StepEngine(model, optimizer, DEVICE, fused=fused)
    x, y = DATA[0][:16].to(DEVICE), DATA[1][:16].to(DEVICE)
    engine.backward_and_step(nn.functional.cross_entropy(model(x), y))
    return model, engine


@needs_fused
@pytest.mark.parametrize(("kind", "field", "value"), POISONS[:3])
def test_the_fused_step_refuses_non_finite_moments_in_its_flat_buffers(kind, field, value):
    """The fused step keeps the moments in flat buffers of its own: its load names the parameter holding the value."""
    model, engine = _fused_engine_and_state(kind)
    saved = copy.deepcopy(engine.state_dict())
    second_weight = engine.store.param_slice(saved["optimizer"][field], 2)
    assert second_weight.numel() == model[2].weight.numel()
    second_weight[5] = value
    before = copy.deepcopy({"engine": engine.state_dict(), "model": model.state_dict()})
    message = f"checkpoint's {field} holds NaN or infinite values, in 2.weight: the first update would write them"
    with pytest.raises(ValueError, match=re.escape(message)):
        engine.load_state_dict(saved)
    _assert_same(before, {"engine": engine.state_dict(), "model": model.state_dict()})
    # A reference engine reads the same moments from the state's torch.optim layout (views of those buffers)
    _, reference = _fused_engine_and_state(kind, fused=False)
    with pytest.raises(ValueError, match=re.escape(TORCH_LAYOUT.format(field=field))):
        reference.load_state_dict(saved)


@needs_fused
def test_the_fused_step_names_non_finite_padding_and_loads_a_finite_state():
    _, engine = _fused_engine_and_state("adamw")
    saved = copy.deepcopy(engine.state_dict())
    engine.load_state_dict(saved)  # finite: loads
    padding = engine.store.layer_offsets[0] + engine.store.layer_numels[0]
    assert padding < engine.store.layer_offsets[1]
    saved["optimizer"]["exp_avg"][padding] = float("nan")
    with pytest.raises(
        ValueError, match=re.escape("checkpoint's exp_avg holds NaN or infinite values, in the padding")
    ):
        engine.load_state_dict(saved)


def _sparse_momentum_controller():
    """A Controller on an SGD whose frozen embedding's momentum is sparse (pre-trained in plain torch), 5 steps in."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.EmbeddingBag(50, 8, mode="mean", sparse=True), nn.Linear(8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randint(0, 50, (96, 5), generator=torch.Generator().manual_seed(1))
    y = torch.arange(96) % 3
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[:16]), y[:16]).backward()
        optimizer.step()
    model[0].weight.requires_grad_(False)  # fine-tune the head only
    controller = ta.Controller(model, optimizer, policy="heuristic", config=ControllerConfig(interval_steps=4))
    for step, (xb, yb) in enumerate(controller.loader((x, y), batch_size=16, epochs=1)):
        with controller.autocast():
            loss = nn.functional.cross_entropy(model(xb), yb)
        controller.step(loss)
        if step == 4:
            break
    return controller, optimizer, model


def test_a_sparse_moment_is_checked_by_its_values():
    """isfinite has no sparse kernel: the check raised a bare NotImplementedError on the Controller's own checkpoint."""
    controller, optimizer, model = _sparse_momentum_controller()
    momentum = optimizer.state[model[0].weight]["momentum_buffer"]
    assert momentum.is_sparse
    saved = copy.deepcopy(controller.state_dict())
    controller.load_state_dict(copy.deepcopy(saved))  # its own checkpoint loads
    broken = copy.deepcopy(saved)
    entry = next(e for e in broken["engine"]["optimizer"]["state"].values() if e["momentum_buffer"].is_sparse)
    values = entry["momentum_buffer"].coalesce()
    entry["momentum_buffer"] = torch.sparse_coo_tensor(
        values.indices(), torch.full_like(values.values(), math.nan), values.shape, check_invariants=True
    )
    with pytest.raises(ValueError, match=r"'momentum_buffer' of parameter 0 \(0\.weight\)"):
        controller.load_state_dict(broken)

"""An update that raised part-way counts as applied; a copy's released hooks do not outlive a cost measurement.

A step whose optimizer update raised part-way (out of memory where AdamW allocates its denominators) counts as a step
with its batch spent, and its update moved AdamW's step counts: the next decision read it as a skipped step, an
overflow (the heuristic cut the LR, and the shield left its rollback copy stale). And a deep copy of the model made
while a Controller was open, whose first forward after ``close()`` was a cost measurement (a new Controller's, or a
``CostModel.measure`` of its own), kept two idle forward hooks for good.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent / "elastic"))
from elastic_helpers import small_task

import triaccel_rl as ta
from triaccel_rl import controller as controller_module
from triaccel_rl import training as training_module
from triaccel_rl.config import ControllerConfig
from triaccel_rl.costs import CostModel
from triaccel_rl.elastic import UnrecoverableOOMError
from triaccel_rl.engine import StepEngine
from triaccel_rl.precision import find_layers
from triaccel_rl.training import TrainingRun

OOM = "out of memory: the optimizer update of step {} raised part-way"
DATA = (torch.randn(96, 8, generator=torch.Generator().manual_seed(0)), torch.arange(96) % 3)


class _FusedEngine(StepEngine):
    """The fused step on the CPU (Triton's interpreter): the Controller and TrainingRun pick it only on CUDA."""

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, fused: bool | None = None
    ) -> None:
        super().__init__(model, optimizer, device, fused=True)


def _needs_fused(fused: bool) -> None:
    if fused and not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("the fused step needs a GPU or Triton's interpreter")


def _raise_once(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, call: int, armed: bool = True) -> list[int]:
    """Has ``owner.name`` raise an out-of-memory error at its ``call``-th call (1-based) once the list is non-empty."""
    real = getattr(owner, name)
    calls: list[int] = [0] if armed else []

    def failing(*args: Any, **kwargs: Any) -> Any:
        if calls:
            calls[0] += 1
            if calls[0] == call:
                raise torch.OutOfMemoryError("CUDA out of memory (injected in the optimizer update)")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)
    return calls


def _after_the_update_kernel(monkeypatch: pytest.MonkeyPatch, engine: StepEngine, call: int) -> None:
    """The fused step's ``call``-th raises after its update kernel ran (rewriting the 16-bit copies allocates)."""
    _raise_once(monkeypatch, engine.fused_optimizer, "_recast_copies", call)


# ---------------------------------------------------------------------------------- Controller


@pytest.mark.parametrize("fused", [False, True])
def test_a_users_loop_reads_an_update_that_raised_part_way_as_applied(monkeypatch: pytest.MonkeyPatch, fused: bool):
    """The second of four steps runs out of memory in its update: the decision at step 4 reads no skip and no overflow,
    and the heuristic keeps the LR (it read an overflow rate of 0.25 and cut it to 0.75), as the shield refreshes its
    copy (it called the interval mixed). On the fused path the device counter has the update once, not twice."""
    _needs_fused(fused)
    if fused:
        monkeypatch.setattr(controller_module, "StepEngine", _FusedEngine)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, foreach=True)
    ctl = ta.Controller(model, optimizer, policy="heuristic", config=ControllerConfig(interval_steps=4))
    assert ctl.engine.fused == fused

    def train() -> None:
        for x, y in ctl.loader(DATA, batch_size=16, epochs=1):
            with ctl.autocast():
                loss = nn.functional.cross_entropy(model(x), y)
            ctl.step(loss)
            if ctl.decisions:
                return

    if fused:
        _after_the_update_kernel(monkeypatch, ctl.engine, 2)
    else:  # multi-tensor AdamW moves its step counts and both moments before allocating the denominators
        _raise_once(monkeypatch, torch, "_foreach_sqrt", 2)
    with pytest.raises(UnrecoverableOOMError, match=OOM.format(1)):
        train()
    monkeypatch.undo()
    assert ctl.engine.applied_steps() == ctl.steps == 2
    train()
    assert len(ctl.decisions) == 1 and ctl.steps == 4
    assert ctl.signals.overflow_rate == 0.0 and ctl.skipped_steps == 0
    assert ctl.decisions[0].lr_scale == 1.0
    assert ctl.engine.applied_steps() == 4
    if not fused:
        assert float(optimizer.state[model[0].weight]["step"]) == 4


def test_a_fused_step_that_fails_before_its_update_kernel_hands_its_batch_back(monkeypatch: pytest.MonkeyPatch):
    """An out-of-memory error in the fused step before its update kernel launched (taking the copies of the parameters
    that sit the step out allocates) moved nothing: the step is no step, and ``loader()`` serves its batch again. It was
    taken as a part-way update, the batch spent with no update."""
    _needs_fused(True)
    monkeypatch.setattr(controller_module, "StepEngine", _FusedEngine)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ctl = ta.Controller(model, optimizer, policy="heuristic", config=ControllerConfig(interval_steps=4))
    served: list[torch.Tensor] = []

    def train() -> None:
        for x, y in ctl.loader(DATA, batch_size=16, epochs=1):
            served.append(x)
            with ctl.autocast():
                loss = nn.functional.cross_entropy(model(x), y)
            ctl.step(loss)
            if ctl.decisions:
                return

    _raise_once(monkeypatch, ctl.engine.fused_optimizer, "_saved_slices", 2)
    with pytest.raises(torch.OutOfMemoryError):
        train()
    assert not ctl.engine.update_started and ctl.steps == ctl.engine.applied_steps() == 1
    monkeypatch.undo()
    train()
    assert torch.equal(served[2], served[1])  # the failed step's batch, served again
    assert len(ctl.decisions) == 1 and ctl.steps == ctl.engine.applied_steps() == 4 and ctl.skipped_steps == 0


# --------------------------------------------------------------------------------- TrainingRun


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("how", ["step", "train_interval"])
def test_a_run_counts_an_update_that_raised_part_way_as_no_skip(
    monkeypatch: pytest.MonkeyPatch, fused: bool, how: str
) -> None:
    """CPU AdamW updates parameter by parameter: an OOM at the second one's ``sqrt`` left the first one updated, and the
    run counted the step and one skip. On the fused path the update kernel ran before the error: counted once."""
    _needs_fused(fused)
    if fused:
        monkeypatch.setattr(training_module, "StepEngine", _FusedEngine)
    run = TrainingRun(small_task(optimizer="adamw", base_lr=2e-3), seed=0, device="cpu")
    assert run.engine.fused == fused
    run.step()
    if fused:
        _after_the_update_kernel(monkeypatch, run.engine, 1)
    else:  # armed from a step pre-hook: only calls inside the optimizer's update count
        armed = _raise_once(monkeypatch, torch.Tensor, "sqrt", 2, armed=False)
        run.optimizer.register_step_pre_hook(lambda *_: armed.append(0) if not armed else None)
    with pytest.raises(UnrecoverableOOMError, match=OOM.format(1)):
        run.step() if how == "step" else run.train_interval(3)
    monkeypatch.undo()
    assert run.steps == 2 and run.skipped_steps == 0
    assert run.engine.applied_steps() == 2
    assert run.train_interval(2).skipped == 0
    assert run.skipped_steps == 0 and run.engine.applied_steps() == run.steps == 4


# ------------------------------------------------------------------------------- copies' hooks


def _our_hooks(model: nn.Module) -> list[object]:
    """Every forward (pre-)hook on ``model`` and its flags: it has none of its own."""
    return [
        hook
        for module in model.modules()
        for hooks in (
            module._forward_pre_hooks,
            module._forward_hooks,
            module._forward_pre_hooks_with_kwargs,
            module._forward_hooks_with_kwargs,
            module._forward_hooks_always_called,
        )
        for hook in hooks.values()
    ]


def _copy_of_a_closed_controllers_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    ctl = ta.Controller(model, torch.optim.SGD(model.parameters(), lr=0.1), policy="fp32")
    ema = copy.deepcopy(model)  # an EMA or teacher copy, taken while the controller is open
    ctl.close()
    assert len(_our_hooks(ema)) == 8  # two layers' pre- and post-hooks, and their flags: idle now
    return ema


def test_a_copy_whose_first_forward_is_a_new_controllers_cost_measurement_sheds_the_old_hooks() -> None:
    """The measurement sets the forward hooks aside: a released pre-hook shed its post-hook from the set-aside dict,
    and the real one came back with no pre-hook left to shed it (two idle hooks at every forward for good)."""
    ema = _copy_of_a_closed_controllers_model()
    ctl = ta.Controller(ema, torch.optim.SGD(ema.parameters(), lr=0.1), policy="fp32")
    for x, y in ctl.loader(DATA, batch_size=16, epochs=1):  # the first batch: the cost measurement's forwards
        with ctl.autocast():
            loss = nn.functional.cross_entropy(ema(x), y)
        ctl.step(loss)
        break
    ctl.close()
    ema(DATA[0])  # the second controller's released pre-hooks shed theirs
    assert _our_hooks(ema) == []


def test_a_copys_own_cost_measurement_keeps_no_released_hook() -> None:
    ema = _copy_of_a_closed_controllers_model()
    CostModel.measure(ema, [info for _, _, info in find_layers(ema)], DATA[0][:1], optimizer_states=0)
    ema(DATA[0])
    assert _our_hooks(ema) == []

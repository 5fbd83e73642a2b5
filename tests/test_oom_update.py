"""An error part-way through the optimizer update spends its batch; an OOM retry draws the failed attempt's masks.

A step whose update raised after moving some parameters and their optimizer state (CPU AdamW updates parameter by
parameter; CUDA's multi-tensor AdamW writes both moments before allocating ``_foreach_sqrt``) used to hand its batch
back, so the batch went into those parameters twice. And a retry after an OOM in a forward pass drew other dropout
masks than the failed attempt, so the run left the fault-free one's path.
"""

from __future__ import annotations

import functools
import logging
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
from triaccel_rl.elastic import FaultPoint, UnrecoverableOOMError, inject_oom
from triaccel_rl.engine import StepEngine
from triaccel_rl.tasks import Task, synthetic_data
from triaccel_rl.training import TrainingRun

CPU = torch.device("cpu")
PARTIAL = "raised part-way: the parameters and optimizer state may be partly updated.*resume from the last checkpoint"


def _fail_on_call(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, call: int, error: BaseException) -> list[int]:
    """Has ``owner.name`` raise ``error`` at its ``call``-th call (1-based) after the returned list is armed."""
    real = getattr(owner, name)
    armed: list[int] = []

    def failing(*args: Any, **kwargs: Any) -> Any:
        if armed:
            armed[0] += 1
            if armed[0] == call:
                raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)
    return armed


def _arm_in_the_update(optimizer: torch.optim.Optimizer, armed: list[int]) -> None:
    """Arms the failure from a step pre-hook: only calls inside the optimizer's update count."""
    optimizer.register_step_pre_hook(lambda *_: armed.append(0) if not armed else None)


def _adamw_state(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> list[torch.Tensor]:
    state = optimizer.state[param]
    return [state["step"].clone(), state["exp_avg"].clone(), state["exp_avg_sq"].clone()]


# ------------------------------------------------------------------------------------- engine


@pytest.mark.parametrize("fused", [False, True])
def test_the_engine_tells_an_update_that_raised_part_way_from_one_that_never_began(
    monkeypatch: pytest.MonkeyPatch, fused: bool
) -> None:
    if fused and not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("the fused step needs a GPU or Triton's interpreter")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    engine = StepEngine(model, torch.optim.AdamW(model.parameters(), lr=0.1), CPU, fused=fused)
    x, y = torch.randn(6, 3), torch.randn(6, 2)

    def loss() -> torch.Tensor:
        return (model(x) - y).pow(2).mean()

    failures = [RuntimeError("a pre-hook failed")]
    handle = engine.optimizer.register_step_pre_hook(lambda *_: None if not failures else _raise(failures.pop()))
    with pytest.raises(RuntimeError, match="a pre-hook failed"):
        engine.backward_and_step(loss())
    handle.remove()
    assert not engine.update_started and not engine.update_reached

    oom = torch.OutOfMemoryError("out of memory (injected in the update)")
    if fused:  # after the update kernel: rewriting the 16-bit copies allocates
        monkeypatch.setattr(engine.fused_optimizer, "_recast_copies", lambda *_: _raise(oom))
    else:  # the second parameter's denominator, after the first parameter's whole update
        _arm_in_the_update(engine.optimizer, _fail_on_call(monkeypatch, torch.Tensor, "sqrt", 2, oom))
    with pytest.raises(torch.OutOfMemoryError):
        engine.backward_and_step(loss())
    assert engine.update_started and not engine.update_reached
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())  # none left for the next step
    monkeypatch.undo()
    engine.backward_and_step(loss())  # the next step starts clean
    assert engine.update_started and engine.update_reached


def _raise(error: BaseException) -> None:
    raise error


# ---------------------------------------------------------------------------------- TrainingRun


def test_an_oom_part_way_through_the_update_spends_the_batch_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU AdamW updates parameter by parameter: an OOM at the second one's ``sqrt`` left the first updated with the
    batch, which went back to the loader and was trained on again. Now the step counts and the loader moves on: the
    first parameter and its AdamW state are those of a fault-free twin after the same step, bit for bit."""
    task = small_task(optimizer="adamw", base_lr=2e-3)
    run, twin = TrainingRun(task, seed=0, device="cpu"), TrainingRun(task, seed=0, device="cpu")
    for each in (run, twin):
        each.step()
    oom = torch.OutOfMemoryError("CUDA out of memory (injected in the optimizer update)")
    _arm_in_the_update(run.optimizer, _fail_on_call(monkeypatch, torch.Tensor, "sqrt", 2, oom))
    with pytest.raises(UnrecoverableOOMError, match=f"out of memory: the optimizer update of step 1 {PARTIAL}"):
        run.step()
    monkeypatch.undo()
    twin.step()
    assert run.steps == twin.steps == 2 and run.lr_coupler.steps == twin.lr_coupler.steps == 2
    assert run.loader.state_dict() == twin.loader.state_dict()
    first, twin_first = next(run.model.parameters()), next(twin.model.parameters())
    assert torch.equal(first, twin_first)
    for mine, theirs in zip(_adamw_state(run.optimizer, first), _adamw_state(twin.optimizer, twin_first), strict=True):
        assert torch.equal(mine, theirs)
    run.step()
    twin.step()
    assert torch.equal(run.last_batch.indices, twin.last_batch.indices)  # the next batch, not the spent one again


def test_another_error_part_way_through_the_update_keeps_its_type_and_is_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    run = TrainingRun(small_task(optimizer="adamw"), seed=0, device="cpu")
    cursor = run.loader.cursor
    _arm_in_the_update(run.optimizer, _fail_on_call(monkeypatch, torch.Tensor, "sqrt", 2, ValueError("bad value")))
    with caplog.at_level(logging.ERROR, logger="triaccel_rl"), pytest.raises(ValueError, match="bad value"):
        run.step()
    assert run.steps == 1 and run.loader.cursor == cursor + run.batch_size
    assert any("optimizer update of step 0 raised part-way" in r.getMessage() for r in caplog.records)


def _dropout_task() -> Task:
    return Task(
        "dropout-mlp",
        "MLP with dropout",
        build_model=lambda: nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 10)),
        load_data=functools.partial(synthetic_data),
        base_batch_size=64,
        n_train=500,
        n_test=64,
    )


@pytest.mark.parametrize("phase", ["forward", "backward"])
def test_a_retry_after_an_oom_draws_the_failed_attempts_dropout_masks(phase: str) -> None:
    """The failed attempt's first micro-batch drew dropout masks: the retry drew the next ones, and the run trained
    on other masks than a fault-free run split the same way. Now the generators go back with the buffers."""

    def fault(point: FaultPoint) -> None:
        if point.step == 0 and point.attempt == 0 and point.micro_index == 1 and point.phase == phase:
            inject_oom(lambda _: True)(point)

    run = TrainingRun(_dropout_task(), seed=0, device="cpu", fault=fault)
    run.micro_batch_cap = 32
    plans = []
    for _ in range(3):
        run.step()
        plans.append(run.last_micro_batches)
    assert run.oom_events == 1 and plans[0] == [16, 16, 16, 16]
    # Built after the run's steps: the two draw from the process's generators, which building a run seeds
    twin = TrainingRun(_dropout_task(), seed=0, device="cpu")
    for plan in plans:
        twin.micro_batch_cap = plan[0]
        twin.step()
        assert twin.last_micro_batches == plan
    for mine, theirs in zip(run.model.parameters(), twin.model.parameters(), strict=True):
        assert torch.equal(mine, theirs), f"max |difference| {float((mine - theirs).abs().max()):.3g}"


# ---------------------------------------------------------------------------------- Controller

DATA = (torch.randn(96, 8, generator=torch.Generator().manual_seed(0)), torch.arange(96) % 3)


def _controller() -> tuple[nn.Module, torch.optim.Optimizer, ta.Controller]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, foreach=True)
    return model, optimizer, ta.Controller(model, optimizer, policy="fp32")


def _train(model: nn.Module, ctl: ta.Controller, served: list[torch.Tensor]) -> None:
    for x, y in ctl.loader(DATA, batch_size=16, epochs=2):
        served.append(x)
        with ctl.autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        ctl.step(loss)


def test_a_users_loop_counts_an_update_that_ran_out_of_memory_part_way_and_serves_the_next_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Multi-tensor AdamW (CUDA's) bumps the step counts and writes both moments before ``_foreach_sqrt`` allocates:
    an OOM there was no step, and the next ``loader()`` call served the batch again (13 AdamW steps for 12 batches)."""
    clean_model, _, clean_ctl = _controller()
    clean: list[torch.Tensor] = []
    _train(clean_model, clean_ctl, clean)
    model, optimizer, ctl = _controller()
    served: list[torch.Tensor] = []
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
    _fail_on_call(monkeypatch, torch, "_foreach_sqrt", 3, oom).append(0)  # armed: the third update's
    with pytest.raises(UnrecoverableOOMError, match=f"out of memory: the optimizer update of step 2 {PARTIAL}"):
        _train(model, ctl, served)
    monkeypatch.undo()
    assert ctl.steps == 3 and len(served) == 3
    _train(model, ctl, served)
    assert len(served) == len(clean) == ctl.steps == 12
    assert all(torch.equal(a, b) for a, b in zip(served, clean, strict=True))  # each batch once, in order
    assert float(optimizer.state[next(model.parameters())]["step"]) == 12

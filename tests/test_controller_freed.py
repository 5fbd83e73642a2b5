"""A closed, dropped Controller (and a dropped DecisionLoop) is freed by its last reference; decisions are bounded."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn

import triaccel_rl.controller
from triaccel_rl.config import ControllerConfig
from triaccel_rl.controller import Controller
from triaccel_rl.loop import DecisionLoop
from triaccel_rl.training import TrainingRun


def data(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    return x, (x[:, 0] + x[:, 1] > 0).long()


def model_and_optimizer() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def train(ctl: Controller, model: nn.Module, epochs: int = 1, nan_at: int | None = None) -> None:
    for x, y in ctl.loader(data(), batch_size=16, epochs=epochs):
        with ctl.autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        if ctl.steps == nan_at:
            loss = loss * float("nan")  # a skipped update
        ctl.step(loss)


def copy_tensor(guard) -> torch.Tensor:
    """One tensor of the guard's rollback copies."""
    copy = next(c for c in (guard._good, guard._unconfirmed, guard._spare) if c is not None)
    return next(leaf for leaf in copy.model.leaves if isinstance(leaf, torch.Tensor))


def test_a_closed_dropped_controller_is_freed_with_its_rollback_copy_and_data(collections, tmp_path):
    """The guard's callbacks held the Controller: a cycle that kept a closed one, its rollback copies, the loader's
    data, the probe and the engine until a full garbage collection (one set a stage of gradual unfreezing)."""
    model, opt = model_and_optimizer()
    x, y = data(64)
    ctl = Controller(
        model,
        opt,
        policy="heuristic",
        config=ControllerConfig(interval_steps=4),
        probe=(x, y),
        loss_fn=nn.functional.cross_entropy,
        log_dir=tmp_path,
    )
    train(ctl, model)
    assert ctl.guard is not None and ctl.steps == 16 and len(ctl.decisions) == 4
    ctl.close()
    freed = [weakref.ref(o) for o in (ctl, ctl.guard, copy_tensor(ctl.guard), ctl._loader, ctl.engine, ctl.collector)]
    del ctl
    assert [ref() is None for ref in freed] == [True] * len(freed)
    assert collections == []
    # The model and optimizer are the caller's, and train on in a plain loop.
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    opt.step()


def test_the_documented_reads_after_close_still_answer(collections):
    model, opt = model_and_optimizer()
    ctl = Controller(model, opt, policy="heuristic", config=ControllerConfig(interval_steps=4))
    train(ctl, model, nan_at=13)  # in the interval after the last decision (steps 12 to 15, closed at 16)
    ctl.close()
    ctl.close()  # twice: harmless
    assert ctl.steps == 16 and len(ctl.decisions) == 4
    assert ctl.skipped_steps == 1  # the open interval's, read at close()
    assert ctl.lr == opt.param_groups[0]["lr"] == 0.1  # the group's own: no multiplier after close
    assert ctl.rollbacks == 0
    assert ctl.decisions[-1].batch_size == 16
    with pytest.raises(RuntimeError, match="this controller is closed"):
        ctl.step(torch.zeros((), requires_grad=True))
    freed = weakref.ref(ctl)
    del ctl
    assert freed() is None and collections == []


def test_a_dropped_decision_loop_is_freed_with_its_rollback_copy(collections):
    run = TrainingRun("synthetic", device="cpu")
    loop = DecisionLoop(run, ControllerConfig(interval_steps=2), rollback=True)
    loop.train_interval()
    loop.snapshot(progress=0.1)
    assert loop.guard is not None
    freed = [weakref.ref(o) for o in (loop, loop.guard, copy_tensor(loop.guard), run.model)]
    run.close()
    del loop, run
    assert [ref() is None for ref in freed] == [True] * len(freed)
    assert collections == []


def test_decisions_keeps_the_latest_reports_only(monkeypatch):
    """``decisions`` grew by a report a decision for the whole run (about 1.5 KB each at 151 layers)."""
    monkeypatch.setattr(triaccel_rl.controller, "DECISIONS_KEPT", 3, raising=False)
    model, opt = model_and_optimizer()
    ctl = Controller(model, opt, policy="heuristic", config=ControllerConfig(interval_steps=2))
    made = []
    apply = ctl.executor.apply

    def recording_apply(*args, **kwargs):
        made.append(apply(*args, **kwargs))
        return made[-1]

    ctl.executor.apply = recording_apply
    train(ctl, model)
    ctl.close()
    assert len(made) == 8
    assert list(ctl.decisions) == made[-3:]
    assert ctl.decisions[-1] is made[-1]

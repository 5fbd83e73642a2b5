"""The shield's rollback inside DecisionLoop: a non-finite probe loss restores the last good state."""

import math

import torch

from triaccel_rl.config import ControllerConfig
from triaccel_rl.loop import DecisionLoop
from triaccel_rl.training import TrainingRun


def test_nonfinite_probe_loss_rolls_back_to_the_last_good_state(caplog):
    loop = DecisionLoop(TrainingRun("synthetic", seed=0, device="cpu"), ControllerConfig(interval_steps=3))
    loop.train_interval()
    good = loop.snapshot(progress=0.1)
    assert good.extra["rolled_back"] is False
    saved = [p.detach().clone() for p in loop.run.model.parameters()]
    momentum = {k: v["momentum_buffer"].clone() for k, v in loop.run.optimizer.state.items()}
    with torch.no_grad():  # corrupt the model the way a diverged update would
        next(loop.run.model.parameters()).fill_(float("inf"))
    with caplog.at_level("WARNING", logger="triaccel_rl"):
        signals = loop.snapshot(progress=0.2)
    assert signals.extra["rolled_back"] is True and signals.extra["rollbacks"] == 1
    assert "rolled back to the last good state" in caplog.text
    assert math.isfinite(signals.probe_loss)
    for before, after in zip(saved, loop.run.model.parameters(), strict=True):
        assert torch.equal(before, after)
    for key, state in loop.run.optimizer.state.items():
        assert torch.equal(momentum[key], state["momentum_buffer"])


def test_rollback_can_be_turned_off():
    loop = DecisionLoop(
        TrainingRun("synthetic", seed=0, device="cpu"), ControllerConfig(interval_steps=3, rollback=False)
    )
    loop.train_interval()
    loop.snapshot(progress=0.1)
    with torch.no_grad():
        next(loop.run.model.parameters()).fill_(float("nan"))
    signals = loop.snapshot(progress=0.2)
    assert signals.extra["rolled_back"] is False and signals.extra["rollbacks"] == 0
    assert not signals.extra["probe_loss_finite"]

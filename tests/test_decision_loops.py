"""The decision loops read only the steps a decision is about, and decide on time after an update that raised.

``DecisionLoop.train_interval`` called past a decision point with no snapshot starts the interval anew: its
snapshot read the passed-over steps with its own (their skips as overflows). And a ``Controller`` step whose update
raised part-way was counted but never fed: a loop that caught the error and went on got every decision a step late.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import triaccel_rl as ta
from triaccel_rl.config import ControllerConfig
from triaccel_rl.elastic import UnrecoverableOOMError
from triaccel_rl.loop import DecisionLoop
from triaccel_rl.training import TrainingRun

INTERVAL = 4

# ------------------------------------------------------------------------------------- DecisionLoop


def _loop_past_a_decision_point(discard: bool) -> tuple[DecisionLoop, list[int]]:
    """A loop after a first decision, a whole interval of fp16 steps that all overflow (in chunks of 3 and 1, no
    snapshot) and one interval of fp32 steps; ``discard`` calls ``discard_interval()`` between the two, the
    reference. Returns the loop and the passed-over chunks' skipped steps."""
    run = TrainingRun("synthetic", device="cpu", cost_mode="profile", seed=0)
    loop = DecisionLoop(run, ControllerConfig(interval_steps=INTERVAL), rollback=False)
    loop.train_interval()
    loop.snapshot(progress=0.1)
    n_controllable = len(run.precision.controllable_indices)
    run.set_precisions(["fp16"] * n_controllable)
    # A loss scale of 2**120 overflows every gradient: each step is skipped (and halves the scale)
    run.engine.load_scaler_state((torch.tensor(2.0**120), torch.tensor(0, dtype=torch.int32)))
    skipped = [loop.train_interval(max_steps=n).skipped for n in (3, 1)]
    assert loop.decision_due
    if discard:
        loop.discard_interval()
    run.set_precisions(["fp32"] * n_controllable)
    loop.train_interval()
    return loop, skipped


def test_a_snapshot_after_an_interval_passed_over_reads_only_its_own_steps() -> None:
    """Found in review: the restart kept the collector's counts, and the snapshot read 8 steps, 4 of them skipped (an
    overflow rate of 0.5, an LR cut for a run in fp32) and the fp16 steps' time in its step time."""
    loop, skipped = _loop_past_a_decision_point(discard=False)
    reference, _ = _loop_past_a_decision_point(discard=True)
    assert skipped == [3, 1]  # the passed-over steps did overflow
    signals, expected = loop.snapshot(progress=0.3), reference.snapshot(progress=0.3)
    assert signals.extra["interval_steps"] == expected.extra["interval_steps"] == INTERVAL
    assert signals.overflow_rate == expected.overflow_rate == 0.0
    assert signals.step_time_ms == expected.step_time_ms
    assert signals.memory_bytes == expected.memory_bytes
    np.testing.assert_array_equal(loop.observation(), reference.observation())
    # The passed-over steps are still the run's: in the collector's total and the cadence's training
    assert loop.collector.n_steps == reference.collector.n_steps == 3 * INTERVAL
    assert loop.cadence.trained_ms > 0


def test_running_estimates_keep_the_steps_passed_over() -> None:
    """Only the interval's counts go: the EMAs keep the passed-over steps, as ``discard_interval`` keeps a trial's."""
    run = TrainingRun("synthetic", device="cpu", cost_mode="profile", seed=0)
    loop = DecisionLoop(run, ControllerConfig(interval_steps=INTERVAL), rollback=False)
    loop.train_interval()
    loop.snapshot(progress=0.1)
    loop.train_interval()  # a whole interval, no snapshot
    before = loop.collector.estimates()
    loop.train_interval(max_steps=0)  # starts the interval anew, trains nothing
    after = loop.collector.estimates()
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert np.array_equal(after[name], value) if isinstance(value, np.ndarray) else after[name] == value, name
    assert loop.collector.n_steps == 2 * INTERVAL and not loop.decision_due


# --------------------------------------------------------------------------------------- Controller

DATA = (torch.randn(160, 8, generator=torch.Generator().manual_seed(0)), torch.arange(160) % 3)
FAILING_STEP = INTERVAL - 1  # the step on which the first decision falls due (0-based)


def _fail_in_the_update(
    monkeypatch: pytest.MonkeyPatch, optimizer: torch.optim.Optimizer, error: BaseException
) -> None:
    """Has step ``FAILING_STEP``'s AdamW update raise ``error`` at the last parameter's ``sqrt``: every moment has
    moved, and every parameter but the last (so the optimizer's running mean, which the decision reads, is a clean
    run's)."""
    real = torch.Tensor.sqrt
    calls: list[int] = []
    steps = [0]

    def arm(*_: Any) -> None:
        if steps[0] == FAILING_STEP:
            calls.append(0)
        steps[0] += 1

    def sqrt(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if calls:
            calls[0] += 1
            if calls[0] == len(list(optimizer.param_groups[0]["params"])):
                calls.clear()
                raise error
        return real(self, *args, **kwargs)

    optimizer.register_step_pre_hook(arm)
    monkeypatch.setattr(torch.Tensor, "sqrt", sqrt)


def _train(
    error: BaseException | None, monkeypatch: pytest.MonkeyPatch
) -> tuple[ta.Controller, list[tuple[int, np.ndarray]], tuple[int, int] | None]:
    """A user's loop over one epoch that catches ``error`` (None: none raised) and goes on.

    Returns the controller, each decision's ``(step, observation)``, and ``(steps, decisions)`` when the error was
    caught (None: no error).
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)  # parameter by parameter
    config = ControllerConfig(interval_steps=INTERVAL, cost_mode="profile")  # modelled step times: repeatable
    ctl = ta.Controller(model, optimizer, policy="heuristic", config=config)
    decisions: list[tuple[int, np.ndarray]] = []
    predict = ctl.policy.predict

    def recording(observation: np.ndarray, *args: Any, **kwargs: Any) -> Any:
        decisions.append((ctl.steps, observation.copy()))
        return predict(observation, *args, **kwargs)

    monkeypatch.setattr(ctl.policy, "predict", recording)
    if error is not None:
        _fail_in_the_update(monkeypatch, optimizer, error)
    caught: tuple[int, int] | None = None
    for x, y in ctl.loader(DATA, batch_size=16, epochs=1):
        with ctl.autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        try:
            ctl.step(loss)
        except (ValueError, UnrecoverableOOMError):
            caught = (ctl.steps, len(ctl.decisions))
    monkeypatch.undo()
    return ctl, decisions, caught


def test_a_decision_due_on_an_update_that_raised_part_way_comes_on_time(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Found in review: the step counted, its loss and gradient statistics were not fed and its decision was not
    taken; a loop that caught the error and went on decided at steps 5 and 9 (a clean run at 4 and 8), the first
    decision reading the step after the failed one in its place."""
    clean, clean_decisions, no_error = _train(None, monkeypatch)
    with caplog.at_level(logging.ERROR, logger="triaccel_rl"):
        ctl, decisions, caught = _train(ValueError("injected in the update"), monkeypatch)
    assert no_error is None
    assert any("optimizer update of step 3 raised part-way" in r.getMessage() for r in caplog.records)
    assert caught == (INTERVAL, 1)  # the step counted, and its decision was taken before the error went on
    assert ctl.steps == clean.steps == 10
    assert [step for step, _ in decisions] == [step for step, _ in clean_decisions] == [INTERVAL, 2 * INTERVAL]
    # The first decision reads the clean run's statistics: the failing step's loss and gradients, not the next step's
    np.testing.assert_array_equal(decisions[0][1], clean_decisions[0][1])
    assert ctl.skipped_steps == clean.skipped_steps == 0  # the part-way update is no skipped step


def test_an_oom_part_way_through_the_update_still_raises_before_any_decision(monkeypatch: pytest.MonkeyPatch) -> None:
    """After an OOM the error is ``UnrecoverableOOMError`` and nothing runs before it: a decision's work would
    allocate on a device that just ran out, and its own OOM would hide it. A loop that goes on makes that decision
    before its next forward (what the step left is finished at the next ``autocast()``), at the clean run's steps."""
    oom = torch.OutOfMemoryError("CUDA out of memory (injected in the update)")
    _, decisions, caught = _train(oom, monkeypatch)
    assert caught == (INTERVAL, 0)
    assert [step for step, _ in decisions] == [INTERVAL, 2 * INTERVAL]

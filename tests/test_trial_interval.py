"""The speed trial's steps are read by no decision: the first comes a whole interval after the trial.

The trial runs bf16, then fp16, whose loss scale backs off from 2**16 by skipping steps. Read by the first decision,
those skips cut the LR of a run that kept bf16 (which never overflows), and moved a run that chose fp16 back to bf16.
The trial is forced on the CPU, its timings pinned so that bf16 wins, and the inputs scaled so that fp16 overflows.
"""

import io
from dataclasses import replace

import pytest
import torch
from torch import nn
from triaccel_rl.policies.heuristic import HeuristicPolicy

import triaccel_rl as ta
from triaccel_rl import compare
from triaccel_rl.config import ControllerConfig, CostMode, HeuristicConfig
from triaccel_rl.loop import DecisionLoop
from triaccel_rl.training import TrainingRun
from triaccel_rl.types import Precision

INTERVAL = 4
TRIAL_STEPS = 8  # 2 warm-up and 2 timed steps in bf16, then in fp16
FP16_SKIPS = 4  # every fp16 step of the trial: the loss scale halves from 2**16 at each
DATA = (torch.randn(640, 8, generator=torch.Generator().manual_seed(0)) * 50, torch.arange(640) % 3)
TRIAL = ControllerConfig(interval_steps=INTERVAL, heuristic=HeuristicConfig(speed_trial=True, speed_trial_steps=2))


@pytest.fixture(autouse=True)
def bf16_wins(monkeypatch):
    """Pins the trial's timings (the CPU's clock would pick either): bf16 1 ms a step, fp16 2 ms."""
    choose = HeuristicPolicy.choose_low_precision
    pinned = {Precision.BF16: 1.0, Precision.FP16: 2.0}
    monkeypatch.setattr(HeuristicPolicy, "choose_low_precision", lambda self, step_ms: choose(self, pinned))


def build(config=TRIAL):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, ta.Controller(model, optimizer, policy="heuristic", config=config)


def train_to_first_decision(model, ctl, stop_after=None):
    """Trains until the first decision (or ``stop_after`` steps); returns the steps taken by then."""
    for x, y in ctl.loader(DATA, batch_size=16, epochs=1):
        with ctl.autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        ctl.step(loss)
        if ctl.decisions or ctl.steps == stop_after:
            return ctl.steps
    raise AssertionError("the epoch ended with no decision")


def resumed(model, ctl, config=TRIAL):
    """A new controller (and model) loaded from ``ctl``'s checkpoint, as a restarted process would."""
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "controller": ctl.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer)
    model2, ctl2 = build(config)
    model2.load_state_dict(state["model"])
    ctl2.load_state_dict(state["controller"])
    return model2, ctl2


def test_the_first_decision_after_a_trial_that_kept_bf16_reads_no_overflow():
    """Found in review: the first decision came one step after the trial, read its 4 fp16 skips in 9 steps as an
    overflow rate of 0.44 and cut the LR of a run in bf16."""
    model, ctl = build()
    assert train_to_first_decision(model, ctl) == TRIAL_STEPS + INTERVAL
    assert ctl.speed_trial["chosen"] == float(Precision.BF16) and ctl.precisions == [Precision.BF16] * 2
    assert ctl.signals.extra["interval_steps"] == INTERVAL
    assert ctl.signals.overflow_rate == 0.0
    assert ctl.decisions[0].lr_scale == 1.0
    assert ctl.skipped_steps == FP16_SKIPS  # the trial's skips are the run's, counted at its end
    assert ctl.cadence.trained_ms > 0  # the trial's time counts in the training the decisions are weighed against


@pytest.mark.parametrize(
    ("saved_at", "first_decision"),
    [
        (3, 3 + TRIAL_STEPS + INTERVAL),  # mid-trial: the trial starts over after the resume
        (TRIAL_STEPS, TRIAL_STEPS + INTERVAL),  # just after its end
        (TRIAL_STEPS + 2, TRIAL_STEPS + INTERVAL),  # inside the first interval after it
    ],
    ids=["mid-trial", "at-its-end", "after-it"],
)
def test_a_checkpoint_around_the_trial_resumes_to_a_first_decision_an_interval_after_it(saved_at, first_decision):
    model, ctl = build()
    train_to_first_decision(model, ctl, stop_after=saved_at)
    assert not ctl.decisions and (ctl._trial is None) == (saved_at >= TRIAL_STEPS)
    model2, ctl2 = resumed(model, ctl)
    assert train_to_first_decision(model2, ctl2) == first_decision
    assert ctl2.signals.extra["interval_steps"] == INTERVAL and ctl2.signals.overflow_rate == 0.0
    assert ctl2.decisions[0].lr_scale == 1.0
    # Mid-trial, the steps before the checkpoint trained in bf16: only the trial run again skips.
    assert ctl2.skipped_steps == FP16_SKIPS


def test_a_checkpoint_taken_in_the_trials_fp16_steps_resumed_where_no_trial_runs_reads_none_of_them():
    """Resumed where no trial runs (a GPU checkpoint on the CPU), the trial ends at the load: its open interval, fp16
    skips included, was read by the first decision, one step after the resume."""
    model, ctl = build()
    saved_at = TRIAL_STEPS - 2  # 2 of the fp16 candidate's steps, both skipped
    train_to_first_decision(model, ctl, stop_after=saved_at)
    assert ctl._trial is not None and ctl._trial.candidate is Precision.FP16
    model2, ctl2 = resumed(model, ctl, config=ControllerConfig(interval_steps=INTERVAL))  # the CPU's default: no trial
    assert ctl2._trial is None and ctl2.precisions == [Precision.BF16] * 2
    assert train_to_first_decision(model2, ctl2) == saved_at + INTERVAL
    assert ctl2.signals.extra["interval_steps"] == INTERVAL and ctl2.signals.overflow_rate == 0.0
    assert ctl2.decisions[0].lr_scale == 1.0
    assert ctl2.skipped_steps == 2  # the trial's, counted at the load


def test_discarding_the_loops_interval_moves_the_next_decision_a_whole_interval_on(monkeypatch):
    train = TrainingRun.train_interval

    def ten_ms_a_step(self, *args, **kwargs):  # a controlled clock: exact sums
        stats = train(self, *args, **kwargs)
        return replace(stats, train_ms=10.0 * stats.steps)

    monkeypatch.setattr(TrainingRun, "train_interval", ten_ms_a_step)
    loop = DecisionLoop(TrainingRun("synthetic", seed=0, device="cpu"), ControllerConfig(interval_steps=3))
    loop.time_precisions(["bf16", "fp16"], steps=2, warmup_steps=1)  # 6 steps, past an interval's end
    assert loop.cadence.trained_ms == 30.0  # the first 3 steps, passed over with no decision
    loop.discard_interval()
    assert not loop.decision_due
    while not loop.decision_due:
        loop.train_interval()
    assert loop.run.steps == 6 + 3
    signals = loop.snapshot(progress=0.1)
    assert signals.extra["interval_steps"] == 3
    assert loop.cadence.trained_ms == 60.0  # the trial's 6 steps, none of them read by the snapshot
    loop.discard_interval()  # right after a snapshot nothing is open: the interval it closed is still recorded
    loop.train_interval(max_steps=0)
    assert loop.cadence.trained_ms == 90.0


def test_compares_first_snapshot_after_a_trial_reads_an_interval_not_the_trial(monkeypatch):
    """Found in review: the cadence's interval restarted after the trial, but the collector's first snapshot read all
    the trial's steps (12 of them where the interval was 3), fp16's skips included."""
    seen = []
    snapshot = DecisionLoop.snapshot

    def spy(self, progress):
        signals = snapshot(self, progress)
        seen.append((self.run.steps, signals.extra["interval_steps"]))
        return signals

    monkeypatch.setattr(DecisionLoop, "snapshot", spy)
    config = ControllerConfig(interval_steps=3)
    config = replace(config, heuristic=replace(config.heuristic, speed_trial=True, speed_trial_steps=3))
    result = compare.run_controller(
        "synthetic", "heuristic", 0, epochs=0.3, cost_mode=CostMode.MEASURED, config=config, eval_every=1000
    )
    trial_steps = 2 * (2 + 3)  # not a whole number of intervals: a decision point fell 2 steps into the trial's last
    assert result.speed_trial["chosen"] == float(Precision.BF16)
    assert seen[0] == (trial_steps + 3, 3)

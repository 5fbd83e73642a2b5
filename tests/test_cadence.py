"""The decision cadence: intervals stretch so that decisions stay within their share of the overhead budget."""

import math
import re

import pytest

from triaccel_rl.cadence import Cadence
from triaccel_rl.config import ConfigError, ControllerConfig
from triaccel_rl.loop import DecisionLoop
from triaccel_rl.training import TrainingRun


def test_interval_is_the_decision_cost_over_the_share_of_a_step():
    cadence = Cadence(min_steps=10, max_factor=100, share=0.02)
    cadence.record(decision_ms=0.0, train_ms=10_000.0, steps=2500)  # a long run so far: nothing to repay
    assert cadence.steps == 10 and cadence.decision_ms != cadence.decision_ms  # NaN: nothing measured yet
    cadence.record(decision_ms=6.0, train_ms=40.0, steps=10)  # 4 ms a step: 6 / (0.02 * 4) = 75 steps
    assert cadence.decision_ms == 6.0 and cadence.steps == 75
    cadence.record(decision_ms=7.0, train_ms=60.0, steps=20)  # 3 ms a step, median 6.5 ms: 108.33 -> 109
    assert cadence.decision_ms == 6.5 and cadence.steps == 109


def test_one_time_costs_are_repaid_before_the_interval_returns_to_its_steady_length():
    cadence = Cadence(min_steps=10, max_factor=10_000, share=0.02)
    cadence.record(decision_ms=500.0, train_ms=40.0, steps=10)  # the first decision captures graphs
    cadence.record(decision_ms=6.0, train_ms=40.0, steps=10)  # 512 ms of decisions against 80 ms trained
    assert cadence.spent_ms == 506.0 and cadence.trained_ms == 80.0
    assert cadence.steps == 6380  # ((506 + 6) / 0.02 - 80) / 4 ms a step
    cadence.record(decision_ms=6.0, train_ms=25_520.0, steps=6380)  # repaid: 518 ms is 2% of 25,900 ms
    assert cadence.steps == 75  # back to 6 / (0.02 * 4)


def test_an_exact_fit_is_not_one_step_short():
    """0.3 ms a decision at 0.5 ms a step and a 1% share needs exactly 60 steps, but 0.1 * 3 / (0.01 * 0.5) is
    60.00000000000001 in floating point: rounding that up gave 61, a step longer than the share asks for."""
    cadence = Cadence(min_steps=20, max_factor=16, share=0.01)
    cadence.record(decision_ms=0.0, train_ms=1000.0, steps=20)  # the first decision: not in the median
    cadence.record(decision_ms=0.1 * 3, train_ms=10.0, steps=20)  # 0.5 ms a step
    assert 0.1 * 3 / (0.01 * 0.5) > 60
    assert cadence.steps == 60


def test_the_median_ignores_one_slow_decision():
    cadence = Cadence(min_steps=1, max_factor=1000, share=0.01)
    cadence.record(decision_ms=0.0, train_ms=100_000.0, steps=100_000)  # 1 ms a step, long enough to repay
    for cost in (2.0, 2.0, 90.0, 2.0):
        cadence.record(decision_ms=cost, train_ms=10.0, steps=10)
    assert cadence.decision_ms == 2.0 and cadence.steps == 200


def test_interval_is_clipped_to_its_bounds_and_fixed_when_not_adaptive():
    cheap = Cadence(min_steps=20, max_factor=8, share=0.01)
    expensive = Cadence(min_steps=20, max_factor=8, share=0.01)
    fixed = Cadence(min_steps=20, max_factor=8, share=0.01, adaptive=False)
    for cadence, cost in ((cheap, 0.001), (expensive, 1e6), (fixed, 1e6)):
        for _ in range(3):
            cadence.record(decision_ms=cost, train_ms=100.0, steps=20)
    assert (cheap.steps, expensive.steps, fixed.steps) == (20, 160, 20)
    pinned = Cadence(min_steps=20, max_factor=1, share=0.01)
    for _ in range(3):
        pinned.record(decision_ms=1e6, train_ms=100.0, steps=20)
    assert pinned.steps == 20


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_steps": 0}, "min_steps=0 must be a whole number >= 1"),
        ({"max_factor": 0}, "max_factor=0 must be a whole number >= 1"),
        ({"share": 0.0}, "share=0.0 must be in (0, 1)"),
        ({"share": 1.5}, "share=1.5 must be in (0, 1)"),
        ({"window": 0}, "window=0 must be a whole number >= 1"),
        # Before the fix NaN passed `value < 1`: a NaN min_steps was the interval, a NaN max_factor turned the
        # stretch off; 1.5 made the interval a float, True passed as 1.
        ({"min_steps": float("nan")}, "min_steps=nan must be a whole number >= 1"),
        ({"min_steps": 2.5}, "min_steps=2.5 must be a whole number >= 1"),
        ({"min_steps": True}, "min_steps=True must be a whole number >= 1"),
        ({"max_factor": float("nan")}, "max_factor=nan must be a whole number >= 1"),
        ({"max_factor": 1.5}, "max_factor=1.5 must be a whole number >= 1"),
        ({"window": float("inf")}, "window=inf must be a whole number >= 1"),
        ({"share": float("nan")}, "share=nan must be in (0, 1)"),
        ({"share": "0.01"}, "share='0.01' must be in (0, 1)"),
        ({"share": True}, "share=True must be in (0, 1)"),
        ({"cheap_share": "0.01"}, "cheap_share='0.01' must be in (0, 1), or None"),
        ({"adaptive": "no"}, "adaptive='no' must be True or False"),  # truthy: the stretch was on
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        Cadence(**{"min_steps": 10, "max_factor": 4, "share": 0.01, **kwargs})


@pytest.mark.parametrize(("field", "value"), [("max_interval_factor", 0), ("snapshot_every", 0)])
def test_config_rejects_bad_cadence_and_snapshot_settings(field, value):
    with pytest.raises(ConfigError, match=f"{field}={value} must be >= 1"):
        ControllerConfig(**{field: value})


def _intervals(loop, n, decision_ms, action=None):
    """Steps of each of ``n`` intervals; each decision costs ``decision_ms`` and applies ``action(i)`` if given."""
    steps = []
    for decision in range(n):
        before = loop.run.steps
        loop.train_interval()
        steps.append(loop.run.steps - before)
        loop.snapshot(progress=0.1)
        loop.collector.add_overhead(decision_ms)  # what a slow policy and executor would cost
        if action is not None:
            loop.apply(action(decision))
    return steps


def test_decision_loop_stretches_its_interval_when_decisions_are_expensive():
    config = ControllerConfig(interval_steps=2, max_interval_factor=3)
    slow = DecisionLoop(TrainingRun("synthetic", seed=0, device="cpu"), config, adaptive_interval=True)
    # Decision 1 is not measured; from the third interval on, the measured cost dwarfs any CPU step.
    assert _intervals(slow, 4, decision_ms=1e6) == [2, 2, 6, 6]
    fixed = DecisionLoop(TrainingRun("synthetic", seed=0, device="cpu"), config)  # CPU default: fixed
    assert _intervals(fixed, 4, decision_ms=1e6) == [2, 2, 2, 2]


def test_decision_loop_keeps_its_snapshots_within_the_cheap_signals_share():
    from triaccel_rl.signals import SignalConfig

    config = ControllerConfig(interval_steps=2, max_interval_factor=3, signals=SignalConfig(cheap_budget_frac=0.002))
    loop = DecisionLoop(TrainingRun("synthetic", seed=0, device="cpu"), config, adaptive_interval=True)
    assert loop.cadence.cheap_share == 0.002

    def slow_snapshot() -> None:  # seen by the cheap rule alone (the decision is cheap)
        loop.collector.cheap_ms += 1e3

    assert _steps_between_snapshots(loop, 4, after_snapshot=slow_snapshot) == [2, 2, 6, 6]


def _steps_between_snapshots(loop: DecisionLoop, n: int, after_snapshot=lambda: None) -> list[int]:
    """The steps each of ``n`` intervals trained, a snapshot after each (then ``after_snapshot()``)."""
    steps = []
    for _ in range(n):
        before = loop.run.steps
        loop.train_interval()
        steps.append(loop.run.steps - before)
        loop.snapshot(progress=0.1)
        after_snapshot()
    return steps


def test_decision_loop_counts_the_intervals_folding_in_its_cheap_share(monkeypatch):
    """Folding a chunk's moments into the collector is the cheap tier's work (the Controller's decision window holds
    it), but the loop took its mark after the fold: a second of folding an interval stretched nothing."""
    from triaccel_rl.signals import SignalCollector, SignalConfig

    config = ControllerConfig(interval_steps=2, max_interval_factor=3, signals=SignalConfig(cheap_budget_frac=0.002))
    loop = DecisionLoop(TrainingRun("synthetic", seed=0, device="cpu"), config, adaptive_interval=True)
    observe = SignalCollector.observe_interval

    def slow_fold(self, *args, **kwargs):
        observe(self, *args, **kwargs)
        self.cheap_ms += 1e3  # as if the fold had taken a second
        self.overhead_ms += 1e3

    monkeypatch.setattr(SignalCollector, "observe_interval", slow_fold)
    assert _steps_between_snapshots(loop, 4) == [2, 2, 6, 6]
    assert loop.cadence.spent_ms >= 2 * 1e3  # the measured decisions (the first is not) carry their folds


def test_an_interval_trained_in_chunks_ends_at_the_same_decision_point():
    config = ControllerConfig(interval_steps=2, max_interval_factor=3)
    loop = DecisionLoop(TrainingRun("synthetic", seed=0, device="cpu"), config, adaptive_interval=True)
    between = []
    for _ in range(4):
        before = loop.run.steps
        while not loop.decision_due:  # chunks of one step, as evaluation points would cut them
            loop.train_interval(max_steps=1)
        between.append(loop.run.steps - before)
        loop.snapshot(progress=0.1)
        loop.collector.add_overhead(1e6)
    assert between == [2, 2, 6, 6]  # as in one piece: chunk boundaries cost nothing the cadence counts


def test_steps_trained_past_a_decision_point_without_a_snapshot_count_in_trained_ms(monkeypatch):
    """A speed trial crosses decision points without a snapshot; the loop started each interval anew and dropped its
    time, so the cadence weighed the decisions against part of the run's training (80 of 160 ms here)."""
    from dataclasses import replace

    train = TrainingRun.train_interval

    def ten_ms_a_step(self, *args, **kwargs):  # a controlled clock: exact sums
        stats = train(self, *args, **kwargs)
        return replace(stats, train_ms=10.0 * stats.steps)

    monkeypatch.setattr(TrainingRun, "train_interval", ten_ms_a_step)
    config = ControllerConfig(interval_steps=4, max_interval_factor=2)
    loop = DecisionLoop(TrainingRun("synthetic", seed=0, device="cpu"), config, adaptive_interval=True)
    _, chunks = loop.time_precisions(["bf16", "fp32"], steps=4, warmup_steps=1)  # 10 steps, past 2 interval ends
    assert sum(chunk.steps for chunk in chunks) == 10
    for _ in range(2):
        while not loop.decision_due:
            loop.train_interval()
        loop.snapshot(progress=0.1)
    loop.train_interval(max_steps=0)  # records the last decision, trains nothing
    assert loop.run.steps == 16
    assert loop.cadence.trained_ms == 160.0
    assert loop.cadence.state_dict()["step_ms"] == 10.0


def test_training_added_without_a_decision_counts_only_when_it_is_a_measurement():
    cadence = Cadence(min_steps=4, max_factor=2, share=0.01)
    for train_ms in (30.0, math.nan, math.inf, -1.0, 0.0):
        cadence.add_training(train_ms)
    assert cadence.trained_ms == 30.0
    assert math.isnan(cadence.state_dict()["step_ms"])  # the step time comes from recorded intervals only


@pytest.mark.parametrize("progress", ["0.5", None, True])
def test_a_snapshot_refuses_a_progress_that_is_no_number_before_it_probes(monkeypatch, progress):
    """Found in review: "0.5" raised a TypeError deep in the estimators and None "must be real number", after the
    probe, the rollback copy and the estimators had run and the interval was closed (no decision was due any more)."""
    loop = DecisionLoop(TrainingRun("synthetic", seed=0, device="cpu"), ControllerConfig(interval_steps=2))
    loop.train_interval()
    probes = []
    monkeypatch.setattr(loop.run, "probe_loss", lambda: probes.append(1) or 1.0)
    with pytest.raises(ValueError, match=rf"^progress={re.escape(repr(progress))} must be a real number"):
        loop.snapshot(progress=progress)  # type: ignore[arg-type]
    assert probes == [] and loop.decision_due and loop.signals is None
    assert loop.snapshot(progress=0.5).progress == 0.5 and probes == [1]  # the interval is still there to close


def test_timing_precisions_trains_every_chunk_and_leaves_the_last_candidate_on():
    from triaccel_rl.types import Precision

    loop = DecisionLoop(TrainingRun("synthetic", seed=0, device="cpu"), ControllerConfig(interval_steps=4))
    step_ms, chunks = loop.time_precisions((Precision.BF16, Precision.FP16), steps=3, warmup_steps=2)
    assert set(step_ms) == {Precision.BF16, Precision.FP16} and all(ms > 0 for ms in step_ms.values())
    assert sum(chunk.steps for chunk in chunks) == loop.run.steps == 10  # 2 x (2 + 3), across interval ends
    assert set(loop.run.precisions) == {Precision.FP16}
    with pytest.raises(ValueError, match="candidates is empty"):
        loop.time_precisions((), steps=3)
    with pytest.raises(ValueError, match="candidates is empty"):  # an empty iterator is truthy: it timed nothing
        loop.time_precisions(iter(()), steps=3)  # type: ignore[arg-type]
    for bad in (None, "bf16"):  # None raised a TypeError; "bf16" named the precision 'b'
        with pytest.raises(ValueError, match=rf"^candidates={bad!r}: give a sequence of precisions to time"):
            loop.time_precisions(bad, steps=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps=0 must be >= 1"):
        loop.time_precisions((Precision.BF16,), steps=0)


def test_timing_precisions_parses_every_candidate_before_training():
    from triaccel_rl.types import Precision

    run = TrainingRun("synthetic", seed=0, device="cpu")
    loop = DecisionLoop(run, ControllerConfig(interval_steps=4))
    before = list(run.precisions)
    for bad in (["bf16", "fp9"], [Precision.BF16, 42]):  # the first candidate trained and stayed on, then it failed
        with pytest.raises(ValueError, match="allowed: fp32, bf16, fp16"):
            loop.time_precisions(bad, steps=1, warmup_steps=0)
        assert run.steps == 0 and run.precisions == before
    step_ms, chunks = loop.time_precisions(["bf16", Precision.BF16, "fp16"], steps=1, warmup_steps=0)
    assert list(step_ms) == [Precision.BF16, Precision.FP16]  # keyed by Precision, the one named twice timed once
    assert run.steps == sum(chunk.steps for chunk in chunks) == 2


@pytest.mark.parametrize(
    ("counts", "message"),
    [
        ({"steps": 2.5}, "steps=2.5 must be >= 1, a whole number"),
        ({"steps": True}, "steps=True must be >= 1, a whole number"),
        ({"steps": 2, "warmup_steps": 0.5}, "warmup_steps=0.5 must be >= 0, a whole number"),
        ({"steps": 2, "warmup_steps": False}, "warmup_steps=False must be >= 0, a whole number"),
        ({"steps": 2, "warmup_steps": -1}, "warmup_steps=-1 must be >= 0, a whole number"),
    ],
)
def test_timing_precisions_refuses_a_step_count_that_is_not_whole_before_training(counts, message):
    from triaccel_rl.types import Precision

    run = TrainingRun("synthetic", seed=0, device="cpu")
    loop = DecisionLoop(run, ControllerConfig(interval_steps=3))
    before = list(run.precisions)
    with pytest.raises(ValueError, match=re.escape(message)):
        loop.time_precisions((Precision.BF16, Precision.FP16), **counts)
    assert run.steps == 0 and run.precisions == before  # nothing trained, the precision left as it was


def test_cheap_share_stretches_an_interval_that_is_mostly_the_snapshot():
    cadence = Cadence(min_steps=20, max_factor=8, share=0.01, cheap_share=0.004)
    cadence.record(decision_ms=0.0, train_ms=100_000.0, steps=20_000)  # 5 ms a step, nothing to repay
    cadence.record(decision_ms=2.0, train_ms=100.0, steps=20, cheap_ms=0.5)  # the snapshot: 0.5 / (0.004 * 5) = 25
    assert cadence.steps == 40  # the whole decision needs more: 2 / (0.01 * 5)
    cadence.record(decision_ms=2.0, train_ms=100.0, steps=20, cheap_ms=1.5)
    cadence.record(decision_ms=2.0, train_ms=100.0, steps=20, cheap_ms=1.5)  # median 1.5: 1.5 / (0.004 * 5) = 75
    assert cadence.steps == 75


def test_the_decisions_get_what_the_measured_recording_leaves_of_the_cheap_share():
    cadence = Cadence(min_steps=10, max_factor=100, share=0.5, cheap_share=0.004)
    cadence.record(decision_ms=0.0, train_ms=1e6, steps=1_000_000)  # 1 ms a step, nothing to repay
    for recording_ms in (0.01, 0.02, 0.02):  # 0.1%, 0.2%, 0.2% of 10 ms: median 0.2%
        cadence.record(decision_ms=0.1, train_ms=10.0, steps=10, cheap_ms=0.1, recording_ms=recording_ms)
    assert cadence.steps == 50  # 0.1 / ((0.004 - 0.002) * 1)
    for _ in range(8):  # recording alone over the budget: the decisions keep a quarter of it
        cadence.record(decision_ms=0.1, train_ms=10.0, steps=10, cheap_ms=0.1, recording_ms=1.0)
    assert cadence.steps == 100  # 0.1 / (0.001 * 1)


def test_cheap_part_of_the_first_decision_is_not_in_the_median():
    cadence = Cadence(min_steps=10, max_factor=100, share=0.5, cheap_share=0.01)
    cadence.record(decision_ms=100.0, train_ms=1e6, steps=10, cheap_ms=100.0)
    assert cadence.steps == 10  # nothing measured after the first decision
    cadence.record(decision_ms=0.5, train_ms=10.0, steps=10, cheap_ms=0.5)  # 1 ms a step: 0.5 / 0.01 = 50
    assert cadence.steps == 50


@pytest.mark.parametrize("share", [0.0, 1.0, -0.1, float("nan")])
def test_cheap_share_out_of_range_is_refused(share):
    with pytest.raises(ValueError, match="cheap_share"):
        Cadence(min_steps=1, max_factor=2, share=0.01, cheap_share=share)


def test_a_decision_that_changes_the_configuration_is_judged_after_the_shortest_interval():
    from triaccel_rl.actions import encode
    from triaccel_rl.types import Action, BatchMove, Precision

    config = ControllerConfig(interval_steps=2, max_interval_factor=3)
    loop = DecisionLoop(TrainingRun("synthetic", seed=0, device="cpu"), config, adaptive_interval=True)
    precisions = tuple(Precision.FP32 for _ in range(config.n_groups))
    keep = encode(Action(precisions, 1.0, BatchMove.KEEP), config)
    lower = encode(Action(precisions, 0.75, BatchMove.KEEP), config)
    # The fourth decision lowers the LR; the later ones hold it.
    steps = _intervals(loop, 6, decision_ms=1e6, action=lambda decision: lower if decision >= 3 else keep)
    assert loop.run.lr_scale == 0.75
    assert steps == [2, 2, 6, 6, 2, 6]  # the interval after the change is the shortest, then stretched again


def test_a_cost_that_is_no_measurement_counts_nowhere():
    cadence = Cadence(min_steps=10, max_factor=100, share=0.02)
    cadence.record(decision_ms=0.0, train_ms=10_000.0, steps=2500)  # 4 ms a step, nothing to repay
    for cost in (math.nan, math.inf, -1.0):
        cadence.record(decision_ms=cost, train_ms=40.0, steps=10)
    assert (cadence.spent_ms, cadence.trained_ms, cadence.steps) == (0.0, 10_120.0, 10)
    assert math.isnan(cadence.decision_ms)
    cadence.record(decision_ms=6.0, train_ms=math.nan, steps=10)  # no training time: the step time stays 4 ms
    cadence.record(decision_ms=6.0, train_ms=80.0, steps=0)  # no steps: likewise
    assert (cadence.spent_ms, cadence.trained_ms, cadence.decision_ms) == (12.0, 10_120.0, 6.0)
    assert cadence.steps == 75  # 6 / (0.02 * 4)


def test_decisions_that_cost_nothing_keep_the_shortest_interval():
    cadence = Cadence(min_steps=10, max_factor=100, share=0.02)
    for _ in range(5):
        cadence.record(decision_ms=0.0, train_ms=0.4, steps=10)  # 0.04 ms a step: any cost would stretch it
    assert (cadence.decision_ms, cadence.steps) == (0.0, 10)


def test_a_cost_too_large_to_divide_gives_the_longest_interval():
    """Before the fix 1e308 ms over 0.01 of a 5-ms step overflowed to inf and math.ceil raised OverflowError."""
    cadence = Cadence(min_steps=20, max_factor=8, share=0.01)
    cadence.record(decision_ms=0.0, train_ms=100.0, steps=20)
    cadence.record(decision_ms=1e308, train_ms=100.0, steps=20)
    assert cadence.steps == 160


def test_interval_of_one_step_stretches_in_whole_steps():
    cadence = Cadence(min_steps=1, max_factor=5, share=0.5)
    cadence.record(decision_ms=0.0, train_ms=1e6, steps=1000)  # 1000 ms a step: nothing to repay
    cadence.record(decision_ms=1000.0, train_ms=1000.0, steps=1)  # 1000 / (0.5 * 1000) = 2 exactly: not 3
    assert cadence.steps == 2
    cadence.record(decision_ms=1000.0, train_ms=300.0, steps=1)  # median 1000 ms / (0.5 * 300) = 6.67: clipped to 5
    assert cadence.steps == 5


def test_expedite_twice_in_a_row_and_without_stretch():
    cadence = Cadence(min_steps=10, max_factor=100, share=0.02)
    cadence.record(decision_ms=0.0, train_ms=10_000.0, steps=2500)
    cadence.record(decision_ms=6.0, train_ms=40.0, steps=10)
    assert cadence.steps == 75
    cadence.expedite()  # a change
    cadence.record(decision_ms=6.0, train_ms=300.0, steps=75)
    assert cadence.steps == 10
    cadence.expedite()  # the change judged, and changed again
    cadence.record(decision_ms=6.0, train_ms=40.0, steps=10)
    assert cadence.steps == 10
    cadence.record(decision_ms=6.0, train_ms=40.0, steps=10)  # no change this time: stretched again
    assert cadence.steps == 75
    fixed = Cadence(min_steps=10, max_factor=100, share=0.02, adaptive=False)
    fixed.expedite()
    fixed.record(decision_ms=1e6, train_ms=40.0, steps=10)
    assert fixed.steps == 10


def test_a_loaded_cadence_stretches_as_the_saved_one_does():
    """Saved with an expedited interval pending and one-time costs still to repay: the loaded cadence gives the same
    intervals at every later decision (a fresh one would return min_steps until it had measured two decisions)."""
    record = {"cheap_ms": 0.5, "recording_ms": 0.1}
    cadence = Cadence(min_steps=10, max_factor=10_000, share=0.02, cheap_share=0.004)
    cadence.record(decision_ms=500.0, train_ms=40.0, steps=10, **record)
    cadence.record(decision_ms=6.0, train_ms=40.0, steps=10, **record)
    cadence.expedite()
    loaded = Cadence(min_steps=10, max_factor=10_000, share=0.02, cheap_share=0.004)
    loaded.load_state_dict(cadence.state_dict())
    assert loaded.steps == cadence.steps == 10  # expedited
    for decision_ms, train_ms, steps in ((6.0, 40.0, 10), (7.0, 30.0, 10), (6.0, 25_520.0, 6380)):
        for each in (cadence, loaded):
            each.record(decision_ms=decision_ms, train_ms=train_ms, steps=steps, **record)
        assert loaded.steps == cadence.steps and loaded.decision_ms == cadence.decision_ms
    assert cadence.steps > 10  # stretched: the comparison above was not of min_steps alone
    with pytest.raises(ValueError, match="the cadence's state lacks seen, expedite"):
        loaded.load_state_dict({k: v for k, v in cadence.state_dict().items() if k not in ("seen", "expedite")})
    with pytest.raises(ValueError, match=r"the cadence's state has step_ms -4\.0, not a finite number >= 0\.0 or NaN"):
        loaded.load_state_dict({**cadence.state_dict(), "step_ms": -4.0})
    # 0 passed the range and divided by zero at the next interval's `steps` (record() never leaves it)
    with pytest.raises(ValueError, match=r"the cadence's state has step_ms 0\.0: a step takes a positive time"):
        loaded.load_state_dict({**cadence.state_dict(), "step_ms": 0.0})
    # the two windows record() fills together: one emptied was taken, and `steps` raised StatisticsError
    before = loaded.state_dict()
    with pytest.raises(ValueError, match="has 4 cheap_costs but 0 recording_shares"):
        loaded.load_state_dict({**cadence.state_dict(), "recording_shares": []})
    assert loaded.state_dict() == before  # refused before anything was replaced


def test_the_controller_charges_a_decisions_whole_wall_time(monkeypatch):
    """The shield's buffer check, its rollback copy and the running-mean read ran between the interval's end and the
    next interval unseen: each slowed by 20 ms here, the cadence's spent time and the overhead rose by none of it
    (DecisionLoop charges all three)."""
    import time

    import torch
    from torch import nn

    from triaccel_rl import controller as controller_module
    from triaccel_rl.engine import StepEngine
    from triaccel_rl.shield import BufferCheck, RollbackGuard

    def slowed(fn):
        def wrapper(*args, **kwargs):
            time.sleep(0.02)
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(BufferCheck, "__call__", slowed(BufferCheck.__call__))
    monkeypatch.setattr(RollbackGuard, "healthy", slowed(RollbackGuard.healthy))
    monkeypatch.setattr(StepEngine, "grad_mean_sq_norm", slowed(StepEngine.grad_mean_sq_norm))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    ctl = controller_module.Controller(
        model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), policy="fp32",
        config=ControllerConfig(interval_steps=4), device="cpu",
    )  # fmt: skip
    x, y = torch.randn(128, 8), torch.randint(0, 2, (128,))
    for xb, yb in ctl.loader((x, y), batch_size=16, epochs=1):
        with ctl.autocast():
            loss = nn.functional.cross_entropy(model(xb), yb)
        ctl.step(loss)
    decisions = len(ctl.decisions)
    assert decisions == 2
    assert ctl.cadence.spent_ms >= decisions * 3 * 20 and ctl.collector.overhead_ms >= ctl.cadence.spent_ms
    ctl.close()

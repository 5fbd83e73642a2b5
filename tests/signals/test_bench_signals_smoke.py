"""Smoke test of experiments/bench_signals.py: runs --smoke on the CPU and checks the JSON rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from triaccel_rl.experiment import cpu_machine

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "bench_signals.py"
FIELDS = {
    "device", "model", "step_ms_base", "step_ms_cheap", "step_ms_all", "overhead_all_frac", "overhead_cheap_frac",
    "date", "commit", "command", "noise_floor_frac", "step_ms_engine_sync", "expensive_share",
    "overhead_all_frac_paired", "overhead_cheap_frac_paired", "noise_floor_frac_paired", "paired_iqr",
    "rounds_share_of_train_frac", "overhead_cheap_frac_ab", "overhead_all_frac_ab", "overhead_parts_ms_per_step",
    "steps_per_decision", "isolated_call_ms", "overhead_cheap_frac_isolated", "host_ms_per_step",
    "observed_step_share", "observe_every_steps", "observe_budget_frac", "host_detail_ms_per_step",
}  # fmt: skip


def _run_smoke(output: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """Runs the benchmark with ``--smoke`` and ``flags`` into ``output``; fails the test on a non-zero exit."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # set by tests/conftest.py
    # One torch thread, as the test itself runs (tests/signals/conftest.py): the rows' device names the threads
    env["OMP_NUM_THREADS"] = "1"
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", *flags, "--output", str(output)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, f"benchmark failed:\n{completed.stdout}\n{completed.stderr}"
    return completed


def test_smoke_run_writes_rows_and_keeps_other_devices(tmp_path: Path) -> None:
    output = tmp_path / "signals_overhead.json"
    other = {"device": "NVIDIA H100", "model": "resnet18", "step_ms_base": 1.0}
    output.write_text(json.dumps([other]))
    completed = _run_smoke(output)
    assert "| device | model |" in completed.stdout and "paired medians over repeats" in completed.stdout
    rows = json.loads(output.read_text())
    assert rows[0] == other  # rows of another device are kept
    measured = rows[1:]
    assert [row["model"] for row in measured] == ["resnet18", "cnn-fmnist"]
    for row in measured:
        missing = FIELDS - row.keys()
        assert not missing, f"row lacks {missing}"
        assert row["device"] == cpu_machine()
        for key in ("step_ms_base", "step_ms_cheap", "step_ms_all", "step_ms_engine_sync"):
            assert row[key] > 0, f"{key} = {row[key]}"
        assert row["last_round"] is not None  # the all configuration ran at least one estimator round
        # The attributed cheap overhead is the collector's timed work per step over the base step; on a CPU all of
        # it is host time (the clock is the host's, so no device part is added to it).
        cheap = row["overhead_parts_ms_per_step"]["cheap"]
        assert cheap["observe"] > 0 and cheap["decision"] > 0 and cheap["device"] == 0 and cheap["overlap"] == 0
        assert row["overhead_cheap_frac_sum"] == row["overhead_cheap_frac"]  # nothing counted twice on a CPU
        assert abs(row["overhead_cheap_frac"] - (cheap["observe"] + cheap["decision"]) / row["step_ms_base"]) < 1e-12
        spent = row["overhead_parts_ms_per_step"]["all"]
        assert row["overhead_all_frac"] >= (spent["observe"] + spent["decision"]) / row["step_ms_base"]
        assert row["steps_per_decision"]["cheap"] >= 4  # the smoke run's least interval
        calls = row["isolated_call_ms"]
        assert calls["observe"] > 0 and calls["decision"] > 0
        implied = calls["observe"] * row["observed_step_share"] + calls["decision"] / row["steps_per_decision"]["cheap"]
        assert abs(row["overhead_cheap_frac_isolated"] - implied / row["step_ms_base"]) < 1e-12
        # The host breakdown splits the same timed calls: sampled + unsampled is the observe part, and what
        # DeviceMoments timed of the sampled calls (from inside them) is part of what the benchmark timed.
        detail = row["host_detail_ms_per_step"]["cheap"]
        assert abs(detail["observe_sampled"] + detail["observe_unsampled"] - cheap["observe"]) < 1e-9
        assert 0 < detail["observe_self_measured"] <= detail["observe_sampled"]
        assert min(detail["gc_in_observe"], detail["gc_in_decision"]) >= 0
        assert detail["gc_in_observe"] <= detail["gc_total"] + 1e-12
        assert row["host_detail_ms_per_step"]["base"]["observe_sampled"] == 0  # no collector, nothing recorded


def test_paired_overhead_is_the_median_ratio_and_its_spread() -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import bench_signals
    finally:
        sys.path.remove(str(SCRIPT.parent))
    # Ratios 0.02, 0.01, 0.5, 0.03: the slow third window moves the spread, not the median.
    median, iqr = bench_signals.paired_overhead([102.0, 101.0, 150.0, 103.0], [100.0] * 4)
    assert abs(median - 0.025) < 1e-12 and abs(iqr - (0.1475 - 0.0175)) < 1e-12
    assert bench_signals.paired_overhead([110.0], [100.0]) == (0.10000000000000009, 0.0)


def _bench_module():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import bench_signals
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return bench_signals


class _DeviceClock:
    """A GPU clock whose marks are numbers of device milliseconds."""

    cuda = True

    def sync(self) -> None:
        pass

    def elapsed(self, start: float, end: float) -> float:
        return end - start


def test_a_region_that_queues_device_work_counts_the_larger_of_its_host_and_device_time() -> None:
    runner = _bench_module().Runner.__new__(_bench_module().Runner)
    runner.clock = _DeviceClock()
    runner._observe_host_s, runner._decision_host_s = 0.003, 0.010  # 3 ms in observe calls, 10 ms at decisions
    # A host-bound sampled observe (2 ms host, the device 2.5 ms behind it) and a GPU-bound flush (1 ms host, 4 ms
    # of device work): counted at 2.5 and 4 ms, not 4.5 and 5 as a plain sum would.
    runner._cost_marks = [(10.0, 12.5, 0.002), (20.0, 24.0, 0.001)]
    costs = runner.take_costs()
    assert costs == {"observe": 3.0, "decision": 10.0, "device": 6.5, "overlap": 3.0}
    host_only = (3.0 - 2.0) + (10.0 - 1.0)  # the calls that queue no device work: their host time
    assert costs["observe"] + costs["decision"] + costs["device"] - costs["overlap"] == host_only + 2.5 + 4.0
    assert runner.take_costs() == {"observe": 0.0, "decision": 0.0, "device": 0.0, "overlap": 0.0}  # reset


def test_smoke_run_through_the_engine_records_the_steps_own_statistics(tmp_path: Path) -> None:
    output = tmp_path / "signals_overhead.json"
    plain = {"device": cpu_machine(), "model": "cnn-fmnist", "path": "plain", "step_ms_base": 1.0}
    output.write_text(json.dumps([plain]))
    _run_smoke(output, "--engine", "--models", "cnn-fmnist")
    rows = json.loads(output.read_text())
    assert rows[0] == plain  # the plain loop's row for the same device and model is kept beside it
    (row,) = rows[1:]
    assert row["path"] == "engine" and row["dtype"] == "fp32"  # the CPU runs the engine's reference path in fp32
    assert row["last_round"] is not None and row["overhead_parts_ms_per_step"]["cheap"]["observe"] > 0


def test_gc_timer_times_collections_only_while_entered() -> None:
    import gc

    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import bench_signals
    finally:
        sys.path.remove(str(SCRIPT.parent))
    timer = bench_signals.GcTimer()
    gc.collect()  # not entered: not counted
    assert (timer.collections, timer.paused_s) == (0, 0.0)
    with timer:
        gc.collect()  # a full collection: one start/stop pair of callbacks
    assert timer.collections == 1 and timer.paused_s > 0
    gc.collect()
    assert timer.collections == 1  # the callback is gone after the block

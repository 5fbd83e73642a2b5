"""Smoke test of experiments/bench_elastic.py: runs --smoke on the CPU and checks the JSON it writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from triaccel_rl.experiment import cpu_machine

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "bench_elastic.py"
FIELDS = {
    "device", "budget_bytes", "peak_bytes", "budget_use_frac", "oom_events", "samples_seen", "samples_expected",
    "date", "commit", "command", "checks", "batch_finder", "budgeted_run", "oom_run",
}  # fmt: skip


def test_smoke_run_passes_its_checks_and_writes_the_fields(tmp_path: Path) -> None:
    output = tmp_path / "elastic_batch.json"
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, f"benchmark failed:\n{completed.stdout}\n{completed.stderr}"
    result = json.loads(output.read_text())
    assert FIELDS <= result.keys(), f"missing {FIELDS - result.keys()}"
    assert result["device"] == cpu_machine()  # one torch thread here (tests/elastic/conftest.py) as in --smoke
    # A command that runs again from the repository root (it was the bare script name and the joined argv)
    assert result["command"] == f"python experiments/bench_elastic.py --smoke --output {output}"
    assert set(result["checks"].values()) == {"PASS"}
    assert result["samples_seen"] == result["samples_expected"] > 0
    assert 0.85 <= result["budget_use_frac"] <= 1.0
    assert result["peak_bytes"] <= result["budget_bytes"]
    assert len(result["budgeted_run"]["micro_batches_first_step"]) >= 2  # the batch really was split
    assert result["oom_run"]["oom_events"] >= 1
    assert result["oom_run"]["samples_seen"] == result["oom_run"]["samples_expected"]
    assert completed.stdout.rstrip().splitlines()[-1].startswith("| OOM recovery |")  # the table comes last


def test_a_nan_loss_is_written_as_null(monkeypatch, tmp_path: Path) -> None:
    """A run whose loss went NaN or infinite is written as strict JSON, the loss as null (before, ``NaN``)."""
    import math

    import torch
    from experiment_scripts import import_experiment, strict_json

    bench = import_experiment("bench_elastic")
    run = {"effective_batch": 8, "micro_batches_first_step": [4, 4], "micro_batches_last_step": [4, 4], "steps": 1,
           "peak_bytes": 400, "first_step_peak_bytes": 400, "oom_events": 0, "samples_seen": 8,
           "samples_expected": 8, "samples_exact": True, "truncated": False, "wall_s": 0.1, "samples_per_s": 80.0,
           "first_loss": math.nan, "last_loss": math.inf}  # fmt: skip
    monkeypatch.setattr(bench, "find_largest_batch", lambda *a: {"batch_size": 8, "peak_bytes": 1000, "tried": {}})
    monkeypatch.setattr(bench, "run_budgeted", lambda *a: {**run, "budget_bytes": 500, "budget_use_frac": 0.95})
    monkeypatch.setattr(bench, "run_oom_recovery", lambda *a: {**run, "oom_events": 1, "final_budget_bytes": 500})
    threads = torch.get_num_threads()  # --smoke runs on one thread
    try:
        output = tmp_path / "elastic_batch.json"
        assert bench.main(["--smoke", "--output", str(output)]) == 0
    finally:
        torch.set_num_threads(threads)
    result = strict_json(output.read_text())
    for part in ("budgeted_run", "oom_run"):
        assert result[part]["first_loss"] is None and result[part]["last_loss"] is None, part

"""Smoke test of experiments/bench_elastic.py: runs --smoke on the CPU and checks the JSON it writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
    assert result["device"] == "cpu"
    assert set(result["checks"].values()) == {"PASS"}
    assert result["samples_seen"] == result["samples_expected"] > 0
    assert 0.85 <= result["budget_use_frac"] <= 1.0
    assert result["peak_bytes"] <= result["budget_bytes"]
    assert len(result["budgeted_run"]["micro_batches_first_step"]) >= 2  # the batch really was split
    assert result["oom_run"]["oom_events"] >= 1
    assert result["oom_run"]["samples_seen"] == result["oom_run"]["samples_expected"]
    assert completed.stdout.rstrip().splitlines()[-1].startswith("| OOM recovery |")  # the table comes last

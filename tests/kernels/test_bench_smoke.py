"""Smoke test of experiments/bench_fused_step.py: runs --smoke on the CPU and checks the JSON rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from triaccel_rl.experiment import cpu_machine

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "bench_fused_step.py"
FIELDS = {
    "device", "date", "commit", "command", "n_elements", "optimizer", "fused_ms", "unfused_ms", "speedup",
    "achieved_GBps", "copy_GBps", "bandwidth_frac",
}  # fmt: skip


@pytest.mark.usefixtures("one_torch_thread")  # as --smoke runs: its rows' device names the thread count
def test_smoke_run_writes_rows_away_from_the_recorded_results(tmp_path: Path) -> None:
    """With the default ``--output`` (the recorded GPU results, relative to the working folder) a smoke run wrote its 4
    CPU rows over them; it goes to the temp folder instead, and says so."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TMPDIR": str(temp)}
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,  # the default output path, relative, lands here if the smoke run writes it
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, f"benchmark failed:\n{completed.stdout}\n{completed.stderr}"
    assert not (tmp_path / "experiments" / "results" / "fused_step.json").exists()
    output = temp / "triaccel-rl-smoke" / "fused_step.json"
    assert f"--smoke: --output {output} (not the recorded experiments/results/fused_step.json)" in completed.stderr
    assert "check: PASS" in completed.stdout
    rows = json.loads(output.read_text())
    assert {(r["set"], r["optimizer"]) for r in rows} == {
        (s, o) for s in ("resnet18", "gpt2_124m") for o in ("sgd", "adamw")
    }
    for row in rows:
        missing = FIELDS - row.keys()
        assert not missing, f"row lacks {missing}"
        assert row["device"] == cpu_machine() and row["n_elements"] > 0
        assert row["command"] == "python experiments/bench_fused_step.py --smoke"  # as given
        for key in ("fused_ms", "unfused_ms", "speedup", "achieved_GBps", "copy_GBps", "bandwidth_frac"):
            assert row[key] > 0, f"{key} = {row[key]}"

"""Smoke test of experiments/lr_lookahead_probe.py: one task, two LR factors, a few decisions."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from experiment_scripts import import_experiment


@pytest.fixture(scope="module")
def probe():  # type: ignore[no-untyped-def]
    return import_experiment("lr_lookahead_probe")


def test_probe_writes_each_runs_signals_and_the_aucs(probe, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "lookahead.json"
    args = probe.Args(tasks="synthetic", factors="0.5,2", seeds=1, share=0.1, out=str(out))
    record = probe.main(args)
    written = json.loads(out.read_text())
    assert written["auc_pooled"] == record["auc_pooled"]
    assert [(r["task"], r["factor"], r["seed"]) for r in written["runs"]] == [
        ("synthetic", 0.5, 0),
        ("synthetic", 2.0, 0),
    ]
    for run in written["runs"]:
        assert run["ratios"] and all(math.isfinite(r) for r in run["ratios"])
        assert run["lookahead"] == pytest.approx(float(np.median(run["ratios"])))
        assert run["loss_drop"] == pytest.approx(float(np.median(run["trends"])))
    # One run on each side: the pooled AUC is 1 or 0 (or 0.5 on a tie), whichever way the two values fall.
    low, high = (written["per_task"]["synthetic"][k]["lookahead"] for k in ("0.5", "2"))
    assert written["auc_pooled"]["lookahead"] == (1.0 if low > high else 0.0 if low < high else 0.5)
    assert written["command"].startswith("python experiments/lr_lookahead_probe.py --tasks synthetic")
    # The same seed and factor give the same run.
    again = probe.probe_run("synthetic", 0.5, 0, args)
    assert again["ratios"] == written["runs"][0]["ratios"]


def test_auc_counts_ties_half_and_needs_both_groups(probe) -> None:  # type: ignore[no-untyped-def]
    assert probe.auc([1.0, 2.0], [0.0]) == 1.0
    assert probe.auc([0.0], [1.0, 2.0]) == 0.0
    assert probe.auc([1.0], [1.0]) == 0.5
    with pytest.raises(ValueError, match="at least one value"):
        probe.auc([], [1.0])


def test_probe_rejects_bad_settings(probe, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="--factors '1,-2': '-2' must be positive"):
        probe.main(probe.Args(tasks="synthetic", factors="1,-2", out=str(tmp_path / "x.json")))
    with pytest.raises(ValueError, match="--share 0"):
        probe.main(probe.Args(tasks="synthetic", share=0.0, out=str(tmp_path / "x.json")))
    with pytest.raises(ValueError, match="unknown task 'no-such-task'"):
        probe.main(probe.Args(tasks="no-such-task", out=str(tmp_path / "x.json")))

"""Smoke test of experiments/lr_lookahead_probe.py: one task, two LR factors, a few decisions."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from experiment_scripts import import_experiment, strict_json


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
        stability = run["log_stability_per_decision"]
        assert len(stability) == len(run["ratios"]) and all(math.isfinite(v) for v in stability)
        assert run["log_stability"] == pytest.approx(float(np.median(stability)))
    # One run on each side: the pooled AUC is 1 or 0 (or 0.5 on a tie), whichever way the two values fall.
    low, high = (written["per_task"]["synthetic"][k]["lookahead"] for k in ("0.5", "2"))
    assert written["auc_pooled"]["lookahead"] == (1.0 if low > high else 0.0 if low < high else 0.5)
    assert written["command"].startswith("python experiments/lr_lookahead_probe.py --tasks synthetic")
    # The same seed and factor give the same run.
    again = probe.probe_run("synthetic", 0.5, 0, args)
    assert again["ratios"] == written["runs"][0]["ratios"]


def test_workers_give_the_same_runs(probe, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Two processes side by side (the script run as a user runs it, so the workers can import it) give the runs
    one process gives, in the same order."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "experiments" / "lr_lookahead_probe.py"
    settings = ["--tasks", "synthetic", "--factors", "0.5,2", "--seeds", "2", "--share", "0.05"]
    subprocess.run([sys.executable, str(script), *settings, "--workers", "2", "--out", str(tmp_path / "two.json")],
                   check=True, capture_output=True)  # fmt: skip
    one = probe.main(
        probe.Args(tasks="synthetic", factors="0.5,2", seeds=2, share=0.05, out=str(tmp_path / "one.json"))
    )
    from triaccel_rl.compare import json_safe

    # The file holds a NaN ratio (a decision of no loss drop) as null: compared as written, not as returned.
    assert json.loads((tmp_path / "two.json").read_text())["runs"] == json_safe(one["runs"])
    with pytest.raises(ValueError, match="--workers 0 must be >= 1"):
        probe.main(probe.Args(tasks="synthetic", workers=0, out=str(tmp_path / "x.json")))


def test_a_feature_not_measured_is_written_as_null(probe, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``--sharpness-iters 0`` leaves ``log_stability`` NaN in every run and every cell; the file is strict JSON.

    Before, ``json.dumps`` wrote ``NaN``, which strict parsers refuse."""
    out = tmp_path / "lookahead.json"
    record = probe.main(probe.Args(tasks="synthetic", factors="0.5,2", seeds=1, share=0.05, sharpness_iters=0,
                                   out=str(out)))  # fmt: skip
    assert all(math.isnan(run["log_stability"]) for run in record["runs"])  # what main returns keeps the NaN
    written = strict_json(out.read_text())
    assert [run["log_stability"] for run in written["runs"]] == [None, None]
    assert {cell["log_stability"] for cell in written["per_task"]["synthetic"].values()} == {None}
    assert "log_stability" not in written["auc_pooled"]  # not measured: no AUC
    assert all(run["log_stability_per_decision"] == [] for run in written["runs"])


def _quadratic_run(optimizer_kind: str, curvatures: list[float]):  # type: ignore[no-untyped-def]
    """A stand-in for a TrainingRun whose probe loss is ``0.5 * sum(a_i * w_i**2)``: its Hessian is ``diag(a)``."""
    from types import SimpleNamespace

    import torch

    weight = torch.nn.Parameter(torch.ones(len(curvatures)))
    model = torch.nn.Module()
    model.weight = weight
    a = torch.tensor(curvatures)
    if optimizer_kind == "adamw":
        optimizer = torch.optim.AdamW([weight], lr=0.01, betas=(0.9, 0.99), eps=1e-8)
    else:
        optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9, nesterov=True)
    return SimpleNamespace(
        engine=SimpleNamespace(fused=False),
        optimizer=optimizer,
        model=model,
        _probe_x=None,
        _probe_y=None,
        _probe_body=lambda x, y: 0.5 * (a * weight * weight).sum(),
    )


def test_stability_ratio_is_lr_times_the_top_eigenvalue_over_the_threshold(probe) -> None:  # type: ignore[no-untyped-def]
    import torch

    sgd = _quadratic_run("sgd", [3.0, 0.5, 1.0])
    assert probe.stability_ratio(sgd, iters=60, seed=0) == pytest.approx(0.1 * 3.0 / (3.8 / 2.8), rel=1e-4)

    # A negative eigenvalue of larger magnitude than the largest: found first, then shifted away.
    saddle = _quadratic_run("sgd", [-5.0, 2.0, 1.0])
    assert probe.stability_ratio(saddle, iters=150, seed=0) == pytest.approx(0.1 * 2.0 / (3.8 / 2.8), rel=1e-4)

    # AdamW: the Hessian preconditioned by 1 / (sqrt(v_hat) + eps); here v_hat = (4, 1, 100) after 2 steps.
    adamw = _quadratic_run("adamw", [3.0, 0.5, 1.0])
    (weight,) = adamw.optimizer.param_groups[0]["params"]
    v_hat = torch.tensor([4.0, 1.0, 100.0])
    adamw.optimizer.state[weight] = {"step": torch.tensor(2.0), "exp_avg_sq": v_hat * (1 - 0.99**2)}
    preconditioned = max(3.0 / 2.0, 0.5 / 1.0, 1.0 / 10.0)
    assert probe.stability_ratio(adamw, iters=60, seed=0) == pytest.approx(0.01 * preconditioned / 38.0, rel=1e-4)

    fused = _quadratic_run("sgd", [1.0])
    fused.engine.fused = True
    with pytest.raises(ValueError, match="reference path"):
        probe.stability_ratio(fused, iters=1, seed=0)


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


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tasks": " , "}, "--tasks ' , ' is empty"),
        ({"epochs": 0.0}, "--epochs 0.0 must be a positive finite number"),
        ({"interval_steps": 0}, "--interval-steps 0 must be >= 1"),
        ({"sharpness_iters": -1}, "--sharpness-iters -1 must be >= 0"),
        ({"device": "mps"}, "--device 'mps'; allowed: cpu, cuda"),
        ({"seeds": 0}, "--seeds 0 must be >= 1"),
    ],
)
def test_probe_refuses_bad_settings_before_any_run(probe, monkeypatch, tmp_path, overrides, message) -> None:  # type: ignore[no-untyped-def]
    """Before the fix ``--interval-steps 0`` divided by zero inside the first run, ``--epochs 0`` still ran an interval
    a run, and an empty ``--tasks`` failed in the AUC after making the output folder."""

    def no_run(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("a run started before the settings were checked")

    monkeypatch.setattr(probe, "probe_run", no_run)
    out = tmp_path / "probe" / "x.json"
    with pytest.raises(ValueError) as raised:
        probe.main(probe.Args(**{"tasks": "synthetic", "out": str(out), **overrides}))
    assert message in str(raised.value)
    assert not out.parent.exists()

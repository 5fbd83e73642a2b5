"""Smoke test of experiments/batch_headroom.py: one held-out task, a fraction of an epoch, every kind of row."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from experiment_scripts import import_experiment


@pytest.fixture(scope="module")
def headroom():  # type: ignore[no-untyped-def]
    return import_experiment("batch_headroom")


def test_rows_parse_and_bad_rows_are_named(headroom) -> None:  # type: ignore[no-untyped-def]
    assert headroom.parse_row("heuristic") == ("heuristic", 1, None, 1.0)
    assert headroom.parse_row("heuristic-anneal") == ("heuristic-anneal", 1, None, 1.0)
    assert headroom.parse_row("bf16-x4-sqrt") == ("bf16", 4, "sqrt", 1.0)
    assert headroom.parse_row("bf16-lr1.5") == ("bf16", 1, None, 1.5)
    with pytest.raises(ValueError, match=r"row 'bf16-x2-cubic'; allowed: heuristic, heuristic-anneal, bf16, bf16-x<k>"):
        headroom.parse_row("bf16-x2-cubic")


def test_larger_batch_rows_start_at_k_times_the_batch_with_the_lr_of_their_rule(headroom, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "headroom.json"
    args = headroom.Args(
        tasks="deep-mlp-synthetic",
        rows="bf16,bf16-x2-linear,bf16-x2-sqrt,bf16-lr2,heuristic-anneal",
        seeds=1,
        epochs=0.1,
        out=str(out),
    )
    headroom.main(args)
    document = json.loads(out.read_text())
    summary = document["summary"]["deep-mlp-synthetic"]
    base = summary["bf16"]
    assert summary["bf16-x2-linear"]["batch_first"] == summary["bf16-x2-sqrt"]["batch_first"] == 2 * base["batch_first"]
    assert summary["bf16-lr2"]["batch_first"] == base["batch_first"]
    assert summary["bf16-x2-linear"]["lr_first"] == pytest.approx(2 * base["lr_first"])
    assert summary["bf16-x2-sqrt"]["lr_first"] == pytest.approx(math.sqrt(2) * base["lr_first"])
    assert summary["bf16-lr2"]["lr_first"] == pytest.approx(2 * base["lr_first"])
    costs = document["step_costs_ms"]["deep-mlp-synthetic"]
    assert costs["x1"] < costs["x2"] < costs["x4"] and costs["fixed"] > 0
    assert {run["row"] for run in document["runs"]} == set(summary)
    with pytest.raises(ValueError, match="row 'bf16-x0-linear'"):  # checked before any run
        headroom.main(headroom.Args(tasks="deep-mlp-synthetic", rows="bf16,bf16-x0-linear", out=str(out)))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tasks": "deep-mlp-synthetic,dwcnn-fmnst"}, "--tasks: unknown task 'dwcnn-fmnst'; allowed: "),
        ({"tasks": " , "}, "--tasks ' , ' is empty"),
        ({"rows": ""}, "--rows '' is empty"),
        ({"rows": "bf16,bf16-lr0"}, "row 'bf16-lr0'; allowed: "),
        ({"seeds": 0}, "--seeds 0 must be >= 1"),
        ({"seeds": -1}, "--seeds -1 must be >= 1"),
        ({"interval_steps": 0}, "--interval-steps 0 must be >= 1"),
        ({"eval_every": 0}, "--eval-every 0 must be >= 1"),
        ({"eval_every_steps": -1}, "--eval-every-steps -1 must be >= 0"),
        ({"epochs": 0.0}, "--epochs 0.0 must be a positive finite number"),
        ({"epochs": math.inf}, "--epochs inf must be a positive finite number"),
    ],
)
def test_bad_arguments_are_refused_by_name_before_any_run(
    headroom, monkeypatch, tmp_path: Path, overrides, message
) -> None:  # type: ignore[no-untyped-def]
    """Before the fix an unknown second task stopped the job after the first task's runs (none written), and
    ``--seeds 0``, ``--seeds -1`` or an empty list wrote a results file of no runs."""
    import triaccel_rl.compare

    def no_run(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("a run started before the arguments were checked")

    monkeypatch.setattr(triaccel_rl.compare, "run_controller", no_run)
    out = tmp_path / "headroom.json"
    with pytest.raises(ValueError) as raised:
        headroom.main(headroom.Args(**{"tasks": "deep-mlp-synthetic", "rows": "bf16", "out": str(out), **overrides}))
    assert message in str(raised.value)
    assert not out.exists()


def test_the_results_record_device_date_commit_and_command(headroom, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "headroom.json"
    headroom.main(headroom.Args(tasks="deep-mlp-synthetic", rows="bf16", seeds=1, epochs=0.05, out=str(out)))
    document = json.loads(out.read_text())
    from triaccel_rl.experiment import cpu_machine

    assert document["device"] == cpu_machine() and document["commit"] and len(document["date"]) == 10
    assert document["command"].startswith("python experiments/batch_headroom.py")
    assert document["args"]["epochs"] == 0.05 and len(document["runs"]) == 1


def test_repeated_names_run_once_and_a_folder_as_out_is_refused_before_any_run(headroom, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``--tasks a,a --rows bf16,bf16`` ran seed 0 four times and listed it four times "per seed"; ``--out`` naming a
    folder failed after every run, and nothing was written."""
    args = headroom.Args(tasks="deep-mlp-synthetic,deep-mlp-synthetic", rows="bf16,bf16", out=str(tmp_path / "r.json"))
    assert headroom.check_args(args) == (["deep-mlp-synthetic"], ["bf16"])
    with pytest.raises(ValueError, match=r"--out .*is a folder"):
        headroom.check_args(headroom.Args(tasks="deep-mlp-synthetic", rows="bf16", out=str(tmp_path)))


def test_bench_env_refuses_bad_arguments_before_measuring(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``--steps 0`` wrote 0.0 env steps/s, ``--n-envs 0`` raised an IndexError, and an unknown or blank task name
    failed after the earlier tasks' measurements, which were lost."""
    bench_env = import_experiment("bench_env")
    for kwargs, message in (
        ({"steps": 0}, "--steps 0 must be >= 1"),
        ({"n_envs": 0}, "--n-envs 0 must be >= 1"),
        ({"tasks": "synthetic,nope"}, "unknown 'nope'"),
        ({"tasks": " , "}, "empty"),
        ({"out": str(tmp_path)}, "is a folder"),
    ):
        with pytest.raises((SystemExit, ValueError), match=message):
            bench_env.main(bench_env.Args(**kwargs))


def test_bench_env_records_its_commit_as_every_experiment_does(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Its rows had the device, date and command but no commit, which BENCHMARKS.md quotes for each figure."""
    import json

    from triaccel_rl.experiment import git_commit

    bench_env = import_experiment("bench_env")
    out = tmp_path / "env.json"
    bench_env.main(bench_env.Args(tasks="synthetic", n_envs=1, steps=2, interval_steps=2, out=str(out)))
    (row,) = json.loads(out.read_text())
    assert row["commit"] == git_commit() and row["task"] == "synthetic" and row["env_steps_per_s"] > 0

"""Smoke test of experiments/lr_budget_probe.py: one task, two multipliers, a short budget."""

from __future__ import annotations

import json

import pytest
from experiment_scripts import import_experiment


@pytest.fixture(scope="module")
def probe():  # type: ignore[no-untyped-def]
    return import_experiment("lr_budget_probe")


def test_probe_writes_one_return_per_task_and_multiplier(probe, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "probe.json"
    args = probe.Args(
        tasks="synthetic", multipliers="1,2", seeds=2, budget_intervals=3.0, interval_steps=2, out=str(out)
    )
    record = probe.main(args)
    written = json.loads(out.read_text())
    assert written["returns"] == record["returns"]
    cells = written["returns"]["synthetic"]
    assert set(cells) == {"1", "2"} and all(cell["std"] >= 0 for cell in cells.values())
    # The return is the episode's summed reward: the same seed and multiplier give the same number.
    assert probe.episode_return("synthetic", 1.0, 0, args) + probe.episode_return("synthetic", 1.0, 1, args) == (
        pytest.approx(2 * cells["1"]["mean"])
    )
    assert written["command"].startswith("python experiments/lr_budget_probe.py --tasks synthetic")


def test_probe_rejects_bad_multipliers(probe, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit, match="must be positive numbers"):
        probe.main(probe.Args(tasks="synthetic", multipliers="1,-2", out=str(tmp_path / "x.json")))


def test_probe_grows_the_batch_up_to_each_cap(probe, tmp_path) -> None:  # type: ignore[no-untyped-def]
    args = probe.Args(
        tasks="synthetic", multipliers="1", batch_caps="1,4", seeds=1, budget_intervals=3.0, interval_steps=2,
        out=str(tmp_path / "caps.json"),
    )  # fmt: skip
    record = probe.main(args)
    assert set(record["returns"]["synthetic"]) == {"1", "1/b4"}
    # Cap 1 is the multiplier-only episode; a cap of 4 changes the run (two doublings), so its return differs.
    assert record["returns"]["synthetic"]["1"]["mean"] == pytest.approx(probe.episode_return("synthetic", 1.0, 0, args))
    assert record["returns"]["synthetic"]["1/b4"]["mean"] != record["returns"]["synthetic"]["1"]["mean"]
    with pytest.raises(SystemExit, match="must be numbers >= 1"):
        probe.main(probe.Args(tasks="synthetic", batch_caps="0.5", out=str(tmp_path / "x.json")))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tasks": "synthetic,mlp-fmnst"}, "--tasks: unknown task 'mlp-fmnst'; allowed: "),
        ({"tasks": ","}, "--tasks=',' is empty"),
        ({"multipliers": "1,x"}, "--multipliers='1,x' must be positive numbers, comma-separated"),
        ({"multipliers": ""}, "--multipliers='' must be positive numbers"),
        ({"multipliers": "1,inf"}, "--multipliers='1,inf' must be positive numbers"),
        ({"batch_caps": "1,two"}, "--batch-caps='1,two' must be numbers >= 1"),
        ({"seeds": 0}, "--seeds=0 must be >= 1"),
        ({"seeds": -3}, "--seeds=-3 must be >= 1"),
        ({"interval_steps": 0}, "--interval-steps=0 must be >= 1"),
        ({"budget_intervals": 0.0}, "--budget-intervals=0.0 must be a positive finite number"),
    ],
)
def test_bad_arguments_are_refused_by_name_before_any_episode(probe, monkeypatch, tmp_path, overrides, message) -> None:  # type: ignore[no-untyped-def]
    """Before the fix an unknown second task stopped the job after the first task's episodes (none written),
    ``--seeds 0`` wrote NaN means, and ``--multipliers 1,x`` raised float()'s bare ``ValueError``."""

    def no_episode(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("an episode ran before the arguments were checked")

    monkeypatch.setattr(probe, "episode_return", no_episode)
    out = tmp_path / "probe.json"
    with pytest.raises(SystemExit) as raised:
        probe.main(probe.Args(**{"tasks": "synthetic", "out": str(out), **overrides}))
    assert message in str(raised.value)
    assert not out.exists()

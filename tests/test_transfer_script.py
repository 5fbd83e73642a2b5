"""``experiments/transfer.py``'s arguments and results file, with ``compare`` replaced by a stand-in (no training)."""

import json
import pathlib

import pytest
from experiment_scripts import import_experiment

import triaccel_rl.compare as compare_module
from triaccel_rl.compare import RunResult

transfer = import_experiment("transfer")
A, B = "synthetic", "deep-mlp-synthetic"


@pytest.fixture
def calls(monkeypatch):
    """``compare`` answers at once, each run's final metric its seed / 10; ``calls`` lists what it was asked."""
    asked: list[tuple[str, str, list[int]]] = []

    def fake_compare(task, controllers, seeds, **kwargs):
        asked.append((task.name, controllers[0], list(seeds)))
        run = {"time_s": 1.0, "wall_s": 1.0, "time_to_target_s": None, "peak_bytes": 1, "precision_changes": 0,
               "batch_changes": 0, "lr_changes": 0, "skipped_steps": 0, "overhead_frac": 0.0, "steps": 5}  # fmt: skip
        return [RunResult(controller=controllers[0], seed=seed, final_metric=seed / 10, **run) for seed in seeds]

    monkeypatch.setattr(compare_module, "compare", fake_compare)
    return asked


def _main(out, **kwargs):
    return transfer.main(
        transfer.Args(**{"controllers": "bf16,fp16", "seeds": 1, "out": str(out), "plots": "", **kwargs})
    )


def _runs(document):
    return [(run["task"], run["controller"], run["seed"]) for run in document["runs"]]


def test_reuse_keeps_the_runs_of_other_tasks_made_with_the_same_settings(calls, tmp_path):
    """Before the fix a ``--reuse --tasks B`` run after a run on task A left only B's runs in the file."""
    out = tmp_path / "transfer.json"
    _main(out, tasks=A)
    document = _main(out, tasks=B, reuse=True)
    assert calls == [(A, "bf16", [0]), (A, "fp16", [0]), (B, "bf16", [0]), (B, "fp16", [0])]  # A not run again
    assert _runs(document) == [(A, "bf16", 0), (A, "fp16", 0), (B, "bf16", 0), (B, "fp16", 0)]
    assert json.loads(out.read_text()) == document
    assert list(document["summary"]) == [A, B]
    # Another budget: A's runs were made with other settings, so they go; B's too, and B runs again.
    calls.clear()
    document = _main(out, tasks=B, reuse=True, epochs=1.0)
    assert calls == [(B, "bf16", [0]), (B, "fp16", [0])]
    assert _runs(document) == [(B, "bf16", 0), (B, "fp16", 0)] and list(document["summary"]) == [B]


def test_reuse_keeps_another_tasks_runs_tuned_on_the_same_lr_grid(calls, tmp_path):
    out = tmp_path / "transfer.json"
    first = _main(out, tasks=A, tune_lr="1,2")
    assert first["lr_grid"][A]["chosen"] == 1.0  # neither factor reaches: the first, soonest on equal charges
    document = _main(out, tasks=B, tune_lr="1,2", reuse=True)
    assert _runs(document)[:2] == [(A, "bf16", 0), (A, "fp16", 0)] and list(document["lr_grid"]) == [A, B]
    assert document["lr_grid"][A] == first["lr_grid"][A]
    document = _main(out, tasks=B, tune_lr="1,3", reuse=True)  # another grid: A's runs were not tuned alike
    assert [task for task, _, _ in _runs(document)] == [B, B] and list(document["lr_grid"]) == [B]


@pytest.mark.parametrize("tasks", [f"{A},{A}", f"{A}, {B},{A}"])
def test_a_task_listed_twice_counts_its_runs_once(calls, tmp_path, tasks):
    """Before the fix ``--reuse`` took a task's runs from the file once per listing: its summary had seed 0 twice."""
    out = tmp_path / "transfer.json"
    order = list(dict.fromkeys(t.strip() for t in tasks.split(",")))
    _main(out, tasks=",".join(order))
    calls.clear()
    document = _main(out, tasks=tasks, reuse=True)
    assert calls == []  # every run reused
    assert _runs(document) == [(task, controller, 0) for task in order for controller in ("bf16", "fp16")]
    assert [row["seeds"] for rows in document["summary"].values() for row in rows.values()] == [[0]] * 2 * len(order)


def test_fresh_beside_one_of_its_tasks_counts_that_tasks_runs_once(calls, tmp_path):
    from triaccel_rl.tasks import FRESH_HELD_OUT_TASKS

    out, first = tmp_path / "transfer.json", FRESH_HELD_OUT_TASKS[1]
    _main(out, tasks="fresh", controllers="bf16")
    document = _main(out, tasks=f"{first},fresh", controllers="bf16", reuse=True)
    expected = [first, *(task for task in FRESH_HELD_OUT_TASKS if task != first)]
    assert [task for task, _, _ in _runs(document)] == expected and list(document["summary"]) == expected
    assert calls == [(task, "bf16", [0]) for task in FRESH_HELD_OUT_TASKS]  # the first invocation's only


def test_an_interrupted_write_leaves_the_results_file_whole(calls, monkeypatch, tmp_path):
    """The file is rewritten after each controller: written in place, an interrupted write left half of it."""
    out = tmp_path / "transfer.json"
    _main(out, tasks=A)
    saved = out.read_text()
    write_text = pathlib.Path.write_text

    def interrupted(path, text, *args, **kwargs):
        write_text(path, text[: len(text) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(pathlib.Path, "write_text", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _main(out, tasks=B, reuse=True)
    monkeypatch.undo()
    assert out.read_text() == saved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["transfer.json"]  # no temporary file left beside it


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"out": "{folder}"}, "--out {folder}: is a folder; give a file path such as {folder}/transfer.json"),
        ({"out": ""}, "--out '': is empty; give a file path such as transfer.json"),
        ({"out": "{folder}", "calibrate": True}, "--out {folder}: is a folder; give a file path such as "),
        ({"calibrate": True, "lr_factor": -1.0}, "--lr-factor -1.0 must be positive"),
        ({"plots_only": True, "out": "{folder}/t.json"}, "--plots-only with --plots '': nothing to do; give --plots"),
    ],
)
def test_bad_arguments_are_refused_before_any_run(calls, monkeypatch, tmp_path, kwargs, message):
    """Before the fix a folder or '' as ``--out`` failed after the first controller's runs, ``--calibrate`` ran at a
    negative ``--lr-factor`` (the task refused its LR), and ``--plots-only --plots ''`` drew into the current folder."""
    folder = tmp_path / "outdir"
    folder.mkdir()
    monkeypatch.chdir(tmp_path)
    kwargs = {key: value.format(folder=folder) if isinstance(value, str) else value for key, value in kwargs.items()}
    args = transfer.Args(**{"tasks": A, "seeds": 1, "out": str(tmp_path / "t.json"), "plots": "", **kwargs})
    with pytest.raises(ValueError) as raised:
        transfer.main(args)
    assert message.format(folder=folder) in str(raised.value)
    assert calls == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outdir"] and not any(folder.iterdir())

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import triaccel_rl.compare as compare_module
from triaccel_rl.compare import check_comparison, compare, row_names, run_controller


def record_runs(monkeypatch):
    """Replaces ``run_controller`` with one that records ``(controller, seed)``: compare's seeds, without training."""
    runs = []

    def fake_run(task, controller, seed, **kwargs):
        runs.append((controller, seed))
        return (controller, seed)

    monkeypatch.setattr(compare_module, "run_controller", fake_run)
    return runs


@pytest.mark.parametrize(
    "seeds",
    [np.array([0]), np.arange(2), torch.arange(2), np.array([3, 1], dtype=np.uint8), [np.int64(0), torch.tensor(1)]],
    ids=["numpy-one", "numpy-two", "torch-two", "numpy-uint8", "list-of-scalars"],
)
def test_seeds_given_as_an_array_or_tensor_run_as_python_ints(monkeypatch, seeds):
    """``np.array([0])`` was refused as "need at least one seed", ``np.arange(2)`` and ``torch.arange(2)`` raised
    numpy's and torch's "ambiguous" errors, and a tensor's entries were refused as no whole numbers."""
    runs = record_runs(monkeypatch)
    expected = [int(seed) for seed in seeds]
    check_comparison("synthetic", ["fp32"], seeds)
    compare("synthetic", ["fp32", "bf16"], seeds, show_progress=False)
    assert runs == [(c, seed) for c in ("fp32", "bf16") for seed in expected]
    assert all(type(seed) is int for _, seed in runs)  # not numpy scalars or 0-d tensors, in results and JSON


@pytest.mark.parametrize(
    ("seeds", "message"),
    [
        (np.array([], dtype=np.int64), "need at least one seed"),
        (torch.tensor([], dtype=torch.int64), "need at least one seed"),
        (np.array(2), "seeds=array(2): give a list such as [0, 1]"),
        (torch.tensor(2), "seeds=tensor(2): give a list such as [0, 1]"),
        (np.array([0.0, 1.0]), "seeds [0.0, 1.0]: seed=0.0 must be a whole number in [0, 2**63 - 20001]"),
        (torch.tensor([0, 1]) > 0, "seeds [False, True]: seed=False must be a whole number in [0, 2**63 - 20001]"),
        (np.array([True]), "seeds [True]: seed=True must be a whole number in [0, 2**63 - 20001]"),
        (np.array([1, -1]), "seeds [1, -1]: seed=-1 must be a whole number in [0, 2**63 - 20001]"),
        (torch.tensor([1, 1]), "seeds [1, 1] repeat [1]: give each seed once"),
    ],
)
def test_an_array_or_tensor_of_seeds_that_is_empty_or_holds_no_whole_numbers_is_refused_by_name(
    monkeypatch, seeds, message
):
    runs = record_runs(monkeypatch)
    for call in (check_comparison, lambda *args: compare(*args, show_progress=False)):
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            call("synthetic", ["fp32"], seeds)
    assert runs == []


def test_a_path_controller_is_checked_and_named_as_its_str():
    """``[Path("heuristic")]`` failed in ``'PosixPath' object has no attribute 'startswith'``, though
    ``Controller(policy=Path(...))`` takes one and a policy zip is a path."""
    from triaccel_rl.policies import pretrained_policy_path

    shipped = pretrained_policy_path()
    names = ["heuristic", "learned:policy.zip", "plain-fp32"]  # a zip is named by its file name
    assert (
        row_names([Path("heuristic"), shipped, Path("plain-fp32")])
        == names
        == row_names(["heuristic", str(shipped), "plain-fp32"])
    )
    check_comparison("synthetic", [Path("heuristic"), shipped], [0])
    with pytest.raises(ValueError, match=r"^controllers heuristic, heuristic would all be reported as row heuristic"):
        check_comparison("synthetic", [Path("heuristic"), "heuristic"], [0])


def test_a_path_controller_runs_as_its_str():
    from triaccel_rl.policies import pretrained_policy_path

    shipped = pretrained_policy_path()
    by_path, by_str = (
        compare("synthetic", [c], [0], epochs=0.1, show_progress=False)[0] for c in (shipped, str(shipped))
    )
    assert by_path.controller == "learned:policy.zip"
    clocked = {"wall_s": 0.0, "overhead_frac": 0.0, "overhead_parts": {}}  # measured by a clock: differ run to run
    assert dataclasses.replace(by_path, **clocked) == dataclasses.replace(by_str, **clocked)


@pytest.mark.parametrize(("entry", "shown"), [(3, "3 (int)"), (b"fp32", "b'fp32' (bytes)"), (None, "None (NoneType)")])
def test_a_controller_neither_a_str_nor_a_path_is_refused_by_name(monkeypatch, entry, shown):
    runs = record_runs(monkeypatch)
    message = (
        f"controllers=['fp32', {entry!r}]: entry {shown} is no policy name or path; give each as a str or an "
        "os.PathLike of one (a policy zip), e.g. ['fp32', 'heuristic']"
    )
    for call in (
        lambda controllers: check_comparison("synthetic", controllers, [0]),
        lambda controllers: compare("synthetic", controllers, [0], show_progress=False),
        row_names,
    ):
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            call(["fp32", entry])
    assert runs == []


def test_a_log_dir_that_names_no_folder_is_refused_before_any_run(monkeypatch):
    """``log_dir=5`` raised pathlib's bare "expected str, bytes or os.PathLike object, not int" after rows had run."""
    runs = record_runs(monkeypatch)
    message = r"^log_dir=5 \(int\) names no folder: give a str or a Path$"
    with pytest.raises(TypeError, match=message):
        compare("synthetic", ["fp32", "plain-fp32"], [0], show_progress=False, log_dir=5)
    assert runs == []
    with pytest.raises(TypeError, match=message):
        run_controller("synthetic", "fp32", 0, epochs=0.1, device="cpu", log_dir=5)  # the real one


@pytest.mark.parametrize(
    ("log_dir", "message"),
    [
        ("", r"^log_dir='' names no folder: give one for the TensorBoard logs, or None for none$"),
        ("FILE", r"^log_dir='.*/FILE' is a file; give a folder for the TensorBoard logs$"),
    ],
    ids=["empty", "a-file"],
)
def test_an_empty_log_dir_or_a_file_is_refused_before_any_run(monkeypatch, tmp_path, log_dir, message):
    """``log_dir=""`` wrote SummaryWriter's own ``./runs/<date>_<host>`` (compare: ``./fp32-seed0``), unasked; a file
    failed in TensorBoard's makedirs (FileExistsError, NotADirectoryError). The Controller refused both already."""
    monkeypatch.chdir(tmp_path)
    if log_dir:
        log_dir = str(tmp_path / log_dir)
        Path(log_dir).write_text("kept")
    runs = record_runs(monkeypatch)
    with pytest.raises(ValueError, match=message):
        compare("synthetic", ["fp32", "bf16"], [0], show_progress=False, log_dir=log_dir)
    assert runs == []
    with pytest.raises(ValueError, match=message):
        run_controller("synthetic", "fp32", 0, epochs=0.1, device="cpu", log_dir=log_dir)  # the real one
    assert sorted(p.name for p in tmp_path.iterdir()) == (["FILE"] if log_dir else [])

"""Experiment records: the commit is this project's checkout's, and every record names the machine it ran on."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import pytest
from experiment_scripts import import_experiment

import triaccel_rl.experiment

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not on PATH")


def _git(folder: Path, *arguments: str) -> str:
    command = [
        "git",
        "-c",
        "user.email=test@example.com",
        "-c",
        "user.name=test",
        "-c",
        "commit.gpgsign=false",
        *arguments,
    ]
    return subprocess.run(command, cwd=folder, capture_output=True, text=True, check=True).stdout.strip()


def _commit_all(folder: Path) -> str:
    """Makes ``folder`` a git repository of one commit holding its files; that commit's short hash."""
    _git(folder, "init", "-q")
    _git(folder, "add", ".")
    _git(folder, "commit", "-q", "-m", "files")
    return _git(folder, "rev-parse", "--short", "HEAD")


def _experiment_module_at(package: Path) -> ModuleType:
    """``triaccel_rl/experiment.py`` copied into ``package`` and imported from there (its ``__file__`` is the copy)."""
    package.mkdir(parents=True)
    shutil.copy(triaccel_rl.experiment.__file__, package / "experiment.py")
    spec = importlib.util.spec_from_file_location("copied_experiment", package / "experiment.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _without_commit_env(monkeypatch) -> None:
    """No ``$COMMIT`` / ``$TRIACCEL_COMMIT``: git_commit() reads the checkout."""
    for name in ("COMMIT", "TRIACCEL_COMMIT"):
        monkeypatch.delenv(name, raising=False)


@needs_git
def test_git_commit_ignores_a_repository_the_package_is_installed_inside(tmp_path, monkeypatch):
    """A copy installed in a venv inside the user's own git project recorded that project's commit, "+dirty" with it."""
    _without_commit_env(monkeypatch)
    project = tmp_path / "userproj"
    project.mkdir()
    (project / ".gitignore").write_text(".venv/\n")
    (project / "mine.txt").write_text("x\n")
    _commit_all(project)
    (project / "mine.txt").write_text("x\ny\n")  # the user's uncommitted edit
    experiment = _experiment_module_at(project / ".venv" / "site-packages" / "triaccel_rl")
    assert experiment.git_commit() == "unknown"
    assert experiment.git_commit(short=False) == "unknown"
    monkeypatch.setenv("TRIACCEL_COMMIT", "0c67b2b")  # the hash a copy without its own git is told
    assert experiment.git_commit() == "0c67b2b"


@needs_git
def test_git_commit_reads_the_checkout_that_holds_the_package(tmp_path, monkeypatch):
    """The package at the top of its own checkout gets that checkout's commit, inside another repository too."""
    _without_commit_env(monkeypatch)
    outer = tmp_path / "outer"
    outer.mkdir()
    (outer / "other.txt").write_text("x\n")
    _commit_all(outer)
    checkout = outer / "vendored" / "triaccel-rl"
    experiment = _experiment_module_at(checkout / "triaccel_rl")
    head = _commit_all(checkout)
    assert experiment.git_commit() == head
    assert experiment.git_commit(short=False) == _git(checkout, "rev-parse", "HEAD")
    (checkout / "triaccel_rl" / "experiment.py").write_text("# edited\n")
    assert experiment.git_commit() == f"{head}+dirty"


def test_lr_budget_probe_records_the_cpu_it_ran_on(tmp_path, monkeypatch):
    """Its record had no device; BENCHMARKS.md gives every figure's device, date, commit and command."""
    probe = import_experiment("lr_budget_probe")
    monkeypatch.setattr(probe, "episode_return", lambda *args: 0.5)  # the record, not the episodes, is under test
    out = tmp_path / "probe.json"
    record = probe.main(probe.Args(tasks="synthetic", multipliers="1", seeds=1, out=str(out)))
    written = json.loads(out.read_text())
    assert written["device"] == record["device"] == triaccel_rl.experiment.cpu_machine()
    assert {"device", "date", "commit", "command"} <= set(written)

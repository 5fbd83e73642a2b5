"""Portability: the package on a platform without fork, import errors, the recorded commit, the partial results file."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from triaccel_rl import cli, experiment
from triaccel_rl.experiment import partial_path


def _python(code: str) -> subprocess.CompletedProcess[str]:
    """``code`` run by this interpreter in a fresh process (the package not yet imported there)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def test_the_package_imports_where_os_has_no_fork():
    """Windows has no ``os.register_at_fork``: ``_pickled_hooks`` called it at import, and no Controller imported."""
    done = _python(
        """
        import os
        import torch  # its own Windows paths are its own: only the package's are simulated
        del os.fork, os.register_at_fork
        from triaccel_rl import Controller
        from triaccel_rl import _pickled_hooks
        hook = _pickled_hooks.named(lambda: None)
        print(Controller.__name__, hook.__name__ == f"hook_{_pickled_hooks._PROCESS}_0")
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["Controller", "True"]


def test_a_lazy_name_whose_module_fails_with_an_attribute_error_names_that_module():
    """``from triaccel_rl import Controller`` said only "cannot import name 'Controller'": Python reads an
    AttributeError out of a module's ``__getattr__`` as the name being absent, and the cause was dropped."""
    done = _python(
        """
        import importlib.abc
        import importlib.machinery
        import sys

        class Failing(importlib.abc.MetaPathFinder, importlib.abc.Loader):
            def find_spec(self, name, path, target=None):
                return importlib.machinery.ModuleSpec(name, self) if name == "triaccel_rl.controller" else None

            def create_module(self, spec):
                return None

            def exec_module(self, module):
                raise AttributeError("module 'os' has no attribute 'register_at_fork'")

        sys.meta_path.insert(0, Failing())
        try:
            from triaccel_rl import Controller
        except ImportError as err:
            print(err)
            print(err.name)
            print(repr(err.__cause__))
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "triaccel_rl.Controller: importing triaccel_rl.controller failed: AttributeError: module 'os' has no "
        "attribute 'register_at_fork'",
        "triaccel_rl.controller",
        "AttributeError(\"module 'os' has no attribute 'register_at_fork'\")",
    ]


def test_a_name_the_package_lacks_is_still_absent():
    import triaccel_rl

    assert not hasattr(triaccel_rl, "Controllr")
    with pytest.raises(ImportError, match="cannot import name 'Controllr'"):
        exec("from triaccel_rl import Controllr")


def _no_git(root, *arguments):
    raise subprocess.CalledProcessError(128, ["git", *arguments])


def test_a_checkout_records_its_own_commit_whatever_the_commit_variables_say(monkeypatch):
    """``$COMMIT`` was read first inside a checkout too: a shell's or CI's own variable (a commit message, say) was
    recorded as the commit of the code that ran."""
    monkeypatch.setattr(experiment, "_git", lambda root, *a: "abc1234" if a[0] == "rev-parse" else "")
    monkeypatch.setenv("COMMIT", "Fix typo in README")
    monkeypatch.setenv("TRIACCEL_COMMIT", "0c67b2b")
    assert experiment.git_commit() == "abc1234"


def test_without_git_the_commit_variables_are_read_triaccel_commit_first(monkeypatch):
    """A device copy without git reads what ``scripts/device-visit.sh`` exports; the generic ``$COMMIT`` beat ours."""
    monkeypatch.setattr(experiment, "_git", _no_git)
    monkeypatch.setenv("COMMIT", "Fix typo in README")
    monkeypatch.setenv("TRIACCEL_COMMIT", "0c67b2b")
    assert experiment.git_commit() == "0c67b2b"
    monkeypatch.setenv("TRIACCEL_COMMIT", "")  # empty: not set
    assert experiment.git_commit() == "Fix typo in README"
    monkeypatch.delenv("COMMIT")
    assert experiment.git_commit() == "unknown"


def test_without_a_git_program_the_commit_variable_is_read(monkeypatch):
    def no_program(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", "git")

    monkeypatch.setattr(subprocess, "run", no_program)
    monkeypatch.setenv("COMMIT", "Fix typo in README")
    monkeypatch.setenv("TRIACCEL_COMMIT", "0c67b2b")
    assert experiment.git_commit(short=False) == "0c67b2b"


@pytest.mark.parametrize(
    ("out", "partial"),
    [
        ("runs/compare/results.json", "runs/compare/results.partial.json"),
        ("sw/lr0.1", "sw/lr0.1.partial.json"),
        ("sw/lr0.2", "sw/lr0.2.partial.json"),
        ("results", "results.partial.json"),
        ("r.tar.json", "r.tar.partial.json"),
        ("r.txt", "r.txt.partial.json"),
    ],
)
def test_the_partial_file_of_each_out(out, partial):
    assert partial_path(Path(out)) == Path(partial)


def test_two_comparisons_of_a_sweep_keep_their_own_partial_files(tmp_path, capsys, monkeypatch):
    """``--out sw/lr0.1`` and ``sw/lr0.2`` both kept their runs in ``sw/lr0.partial.json``: the second comparison moved
    the first's live file aside as an earlier comparison's."""
    import triaccel_rl.compare

    real = triaccel_rl.compare.run_controller

    def fails_in_bf16(task, controller, *args, **kwargs):
        if controller == "bf16":
            raise RuntimeError("CUDA out of memory (injected)")
        return real(task, controller, *args, **kwargs)

    monkeypatch.setattr(triaccel_rl.compare, "run_controller", fails_in_bf16)
    for out in ("lr0.1", "lr0.2"):
        argv = ["compare", "--task", "synthetic", "--controllers", "fp32,bf16", "--seeds", "1", "--epochs", "0.2",
                "--no-progress", "--log-dir", "", "--out", str(tmp_path / "sw" / out)]  # fmt: skip
        with pytest.raises(RuntimeError, match="injected"):
            cli.main(argv)
    assert "moved to" not in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "sw").iterdir()) == ["lr0.1.partial.json", "lr0.2.partial.json"]
    for out in ("lr0.1", "lr0.2"):
        kept = json.loads((tmp_path / "sw" / f"{out}.partial.json").read_text())
        assert kept["meta"]["command"].endswith(f"--out {tmp_path / 'sw' / out}")
        assert [run["controller"] for run in kept["runs"]] == ["static-fp32"]

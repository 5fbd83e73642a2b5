"""Runs the examples in the public docstrings, so the documentation cannot drift from the code."""

import doctest
import importlib

import pytest

MODULES = [
    "triaccel_rl.actions",
    "triaccel_rl.compare",
    "triaccel_rl.config",
    "triaccel_rl.controller",
    "triaccel_rl.costs",
    "triaccel_rl.executor",
    "triaccel_rl.experiment",
    "triaccel_rl.loader",
    "triaccel_rl.loop",
    "triaccel_rl.models",
    "triaccel_rl.observation",
    "triaccel_rl.precision",
    "triaccel_rl.reward",
    "triaccel_rl.tasks",
    "triaccel_rl.training",
    "triaccel_rl.policies.static",
    "triaccel_rl.policies.heuristic",
    "triaccel_rl.envs.training_env",
    "triaccel_rl.cadence",
    "triaccel_rl.rl",
    "triaccel_rl.shield",
    "triaccel_rl.state",
    "triaccel_rl.signals.collector",
    "triaccel_rl.signals.config",
    "triaccel_rl.signals.device",
    "triaccel_rl.signals.estimators",
    "triaccel_rl.signals.scheduler",
    "triaccel_rl.policies.learned",
    "triaccel_rl.kernels.cast",
    "triaccel_rl.kernels.flat_store",
    "triaccel_rl.kernels.optim",
]
PACKAGES = ["triaccel_rl", "triaccel_rl.signals", "triaccel_rl.envs", "triaccel_rl.kernels", "triaccel_rl.policies"]
"""Every package of the distribution (pyproject.toml's ``packages``; three of them map top-level folders)."""


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no docstring examples left to run"
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples failed in {name}"


def test_every_module_with_examples_runs_them():
    """A module whose docstrings hold examples is in this file's list or in the elastic modules' doctest file."""
    import pkgutil
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "elastic"))
    try:
        from test_elastic_doctests import MODULES as ELASTIC_MODULES
    finally:
        sys.path.pop(0)
    with_examples = []
    for package in PACKAGES:
        for info in pkgutil.iter_modules(importlib.import_module(package).__path__, package + "."):
            module = importlib.import_module(info.name)
            if module.__file__ and ">>> " in Path(module.__file__).read_text():
                with_examples.append(info.name)
    assert {"triaccel_rl.memory", "triaccel_rl.kernels.optim", "triaccel_rl.policies.static"} <= set(with_examples)
    missing = sorted(set(with_examples) - set(MODULES) - set(ELASTIC_MODULES))
    assert not missing, f"docstring examples that no test runs: {missing}"

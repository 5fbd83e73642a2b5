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
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no docstring examples left to run"
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples failed in {name}"

"""Runs the docstring examples of the memory-elastic modules."""

import doctest
import importlib

import pytest

MODULES = ["triaccel_rl.elastic", "triaccel_rl.memory", "triaccel_rl.policies.batch_finder"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no docstring examples"
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples failed in {name}"

"""The package's top-level names: each resolves to the object its module defines."""

from __future__ import annotations

import importlib

import pytest

import triaccel_rl


@pytest.mark.parametrize("name", triaccel_rl.__all__)
def test_each_top_level_name_is_its_modules_object(name: str) -> None:
    module = importlib.import_module(triaccel_rl._LAZY[name])
    assert getattr(triaccel_rl, name) is getattr(module, name)
    assert name in module.__all__


def test_the_errors_a_step_raises_are_top_level_names() -> None:
    """``ctl.step`` documents both; a loop that catches them should not need the defining module's path."""
    from triaccel_rl import NoGoodStateError, UnrecoverableOOMError
    from triaccel_rl.elastic import UnrecoverableOOMError as defined
    from triaccel_rl.errors import NoGoodStateError as defined_too

    assert UnrecoverableOOMError is defined and NoGoodStateError is defined_too

"""Imports ``experiments/`` scripts for their smoke tests (a plain module: several conftest modules share a name)."""

import importlib
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any


def import_experiment(name: str) -> ModuleType:
    """The script ``experiments/<name>.py`` as a module (the folder is on ``sys.path`` only while importing)."""
    scripts = str(Path(__file__).resolve().parents[1] / "experiments")
    sys.path.insert(0, scripts)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(scripts)


def strict_json(text: str) -> Any:
    """``json.loads`` that refuses ``NaN``, ``Infinity`` and ``-Infinity``, as strict parsers (JavaScript, jq) do."""

    def refuse(constant: str) -> Any:
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)

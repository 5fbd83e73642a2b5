"""Plumbing shared by the scripts in ``experiments/``: ``@dataclass Args`` → command line, and the git commit."""

from __future__ import annotations

import argparse
import os
import subprocess
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["git_commit", "parse_args"]

T = TypeVar("T")
_TYPES: dict[str, type] = {"int": int, "float": float, "str": str}


def parse_args(cls: type[T], argv: Sequence[str] | None = None, description: str | None = None) -> T:
    """Builds ``cls`` (a dataclass of int, float, str and bool fields) from ``--field-name`` flags.

    A bool field is a flag that sets it; the others take a value and default to the field's default.

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass
        ... class Args:
        ...     steps: int = 3
        ...     smoke: bool = False
        >>> parse_args(Args, ["--steps", "5", "--smoke"])
        Args(steps=5, smoke=True)
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(cls):  # type: ignore[arg-type]
        flag = f"--{f.name.replace('_', '-')}"
        kind = str(f.type)
        if kind in ("bool", str(bool)):
            parser.add_argument(flag, action="store_true")
        elif kind in _TYPES:
            parser.add_argument(flag, type=_TYPES[kind], default=f.default)
        else:
            raise TypeError(f"field {f.name!r} has type {kind}; allowed: bool, {', '.join(_TYPES)}")
    values: dict[str, Any] = vars(parser.parse_args(argv))
    return cls(**values)


def git_commit(short: bool = True) -> str:
    """The checkout's commit; ``$COMMIT`` or ``$TRIACCEL_COMMIT`` where there is no git (a device copy)."""
    for name in ("COMMIT", "TRIACCEL_COMMIT"):
        if os.environ.get(name):
            return os.environ[name]
    command = ["git", "rev-parse", *(["--short"] if short else []), "HEAD"]
    try:
        return subprocess.run(
            command, cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"

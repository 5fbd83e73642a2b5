"""Kernel tests: Triton's CPU interpreter stands in for a GPU when there is none; CUDA cases are marked gpu."""

from __future__ import annotations

import os
import sys

import pytest
import torch

# triton.jit reads TRITON_INTERPRET when a function is defined, Triton's own helpers included, so it only
# takes effect if set before triton is first imported. With a GPU the compiled kernels are tested on CUDA
# tensors instead (and CPU tensors take the PyTorch reference path).
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_report_header(config: pytest.Config) -> str:
    """Says which implementation the CPU cases of the kernel tests exercise."""
    from triaccel_rl.kernels._common import INTERPRET_AT_IMPORT

    if torch.cuda.is_available():
        return "kernel tests: compiled Triton kernels on CUDA, PyTorch reference path on CPU tensors"
    if INTERPRET_AT_IMPORT:
        return "kernel tests: Triton interpreter on CPU tensors"
    return (
        "kernel tests: PyTorch reference path only (triton was imported before TRITON_INTERPRET=1 could be "
        "set; run tests/kernels on its own, or set TRITON_INTERPRET=1 in the environment, to test the kernels)"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Runs every test taking a ``device`` argument on the CPU, and on CUDA (marked gpu) when present."""
    if "device" in metafunc.fixturenames:
        devices: list[object] = ["cpu"]
        if torch.cuda.is_available():
            devices.append(pytest.param("cuda", marks=pytest.mark.gpu))
        metafunc.parametrize("device", devices)


@pytest.fixture
def reference_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes the wrappers take the plain-PyTorch reference path for CPU tensors (no interpreter)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")

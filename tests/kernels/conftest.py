"""Kernel tests: Triton's CPU interpreter stands in for a GPU when there is none; CUDA cases are marked gpu."""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

# triton.jit reads TRITON_INTERPRET when a kernel is defined, so it must be set before the kernels are
# imported. With a GPU the compiled kernels are tested on CUDA tensors instead (and CPU tensors take the
# PyTorch reference path).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_KERNEL_MODULES = [
    "triaccel_rl.kernels._common",
    "triaccel_rl.kernels.cast",
    "triaccel_rl.kernels.grad_stats",
    "triaccel_rl.kernels.adamw_step",
    "triaccel_rl.kernels.sgd_step",
    "triaccel_rl.kernels.flat_store",
    "triaccel_rl.kernels.optim",
    "triaccel_rl.kernels",
]


def _rebuild_kernels_for_interpreter() -> None:
    """Reloads the kernel modules if another test imported them before TRITON_INTERPRET was set here."""
    common = sys.modules.get("triaccel_rl.kernels._common")
    wants_interpreter = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if common is None or common.INTERPRET_AT_IMPORT == wants_interpreter:
        return
    for name in _KERNEL_MODULES:
        if name in sys.modules:
            importlib.reload(sys.modules[name])


_rebuild_kernels_for_interpreter()


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

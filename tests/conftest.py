"""Shared fixtures; GPU tests are skipped on machines without CUDA."""

from __future__ import annotations

import os

import pytest
import torch

# The kernel tests run the Triton kernels on CPU tensors through Triton's interpreter, which reads this
# variable when triton is first imported: set it here, before any test module imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

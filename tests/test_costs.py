"""The cost model's measurement leaves NumPy's generator alone, and its accounting counts buffers (2026-12-07)."""

import numpy as np
import pytest
import torch
from torch import nn

from triaccel_rl.config import HardwareProfile
from triaccel_rl.costs import CostModel, buffer_bytes, saved_bytes_per_sample
from triaccel_rl.precision import find_layers
from triaccel_rl.types import Precision


class _NumPyLayerDrop(nn.Module):
    """Draws from NumPy's global generator at every forward, as a layer drop written with ``np.random`` does."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if np.random.rand() < 0.5:  # noqa: NPY002 (the global stream is the one such a model draws from)
            h = torch.relu(h)
        return self.b(h)


def _layers(model: nn.Module) -> list:
    return [info for _, _, info in find_layers(model)]


@pytest.mark.parametrize("measure", ["CostModel.measure", "saved_bytes_per_sample"])
def test_a_measurement_leaves_numpys_global_generator_where_it_was(measure: str) -> None:
    """The measuring forwards drew from NumPy's global stream and left it moved: the run's first draw after them was
    another than without them (0.5449 for 0.5488 at seed 0)."""
    model = _NumPyLayerDrop()
    np.random.seed(0)  # noqa: NPY002
    without = np.random.rand()  # noqa: NPY002
    np.random.seed(0)  # noqa: NPY002
    if measure == "CostModel.measure":
        CostModel.measure(model, _layers(model), torch.zeros(1, 4), optimizer_states=1)
    else:
        saved_bytes_per_sample(model, _layers(model), torch.zeros(1, 4))
    assert np.random.rand() == without  # noqa: NPY002


class _Tabled(nn.Module):
    """A 64 x 64 fp32 table (16,384 bytes), as a buffer or as a frozen parameter, and a view of it as a buffer."""

    def __init__(self, table_as_buffer: bool) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)  # 72 parameters
        self.norm = nn.BatchNorm1d(8)  # 16 parameters; buffers: mean and variance (8 fp32 each), the int64 count
        table = torch.zeros(64, 64)
        if table_as_buffer:
            self.register_buffer("table", table)
        else:
            self.table = nn.Parameter(table, requires_grad=False)
        self.proj.register_buffer("mask", table.detach()[:8, :8])  # shares the table's storage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x) + self.proj.mask[0] + self.table[0, :8])


TABLE_BYTES = 64 * 64 * 4
NORM_BUFFER_BYTES = 8 * 4 * 2 + 8
STATIC_BYTES = (72 + 16) * 4 * 3  # weights, gradients and one optimizer state tensor, fp32


@pytest.mark.parametrize("table_as_buffer", [True, False], ids=["buffer", "frozen-parameter"])
def test_buffers_count_in_the_fixed_bytes_each_storage_once(table_as_buffer: bool) -> None:
    """Buffers were in no term: a 16 MiB causal mask as a buffer added 0 bytes, as a frozen parameter all of them.
    A table counts the same either way; its view, registered as a buffer too, adds nothing."""
    model = _Tabled(table_as_buffer)
    costs = CostModel.measure(model, _layers(model), torch.zeros(1, 8), optimizer_states=1)
    assert costs.static_bytes == STATIC_BYTES
    assert costs.fixed_bytes([Precision.FP32] * 2) == STATIC_BYTES + TABLE_BYTES + NORM_BUFFER_BYTES
    assert (costs.frozen_bytes, costs.buffer_bytes) == (
        (0, TABLE_BYTES + NORM_BUFFER_BYTES) if table_as_buffer else (TABLE_BYTES, NORM_BUFFER_BYTES)
    )
    assert costs.fixed_bytes([Precision.BF16] * 2) == STATIC_BYTES + TABLE_BYTES + NORM_BUFFER_BYTES + 88 * 2
    profile = HardwareProfile.load()
    per_sample = costs.per_sample_bytes([Precision.FP32] * 2, profile)
    assert costs.memory_bytes(3, [Precision.FP32] * 2, profile) == int(
        STATIC_BYTES + TABLE_BYTES + NORM_BUFFER_BYTES + 3 * per_sample
    )


def test_buffer_bytes_count_a_storage_once_whole_and_leave_a_parameters_to_the_parameters() -> None:
    model = nn.Module()
    model.a = nn.Module()
    model.b = nn.Module()
    mask = torch.ones(10, 10, dtype=torch.bool)  # 100 bytes
    model.a.register_buffer("mask", mask)
    model.b.register_buffer("mask", mask)  # the same tensor in two modules
    model.b.register_buffer("rows", mask[:2])  # a view: its storage is the mask's
    model.b.register_buffer("part", torch.zeros(10, dtype=torch.float64)[:3])  # holds its whole storage, 80 bytes
    model.weight = nn.Parameter(torch.zeros(4))
    model.b.register_buffer("weight_view", model.weight.detach()[:2])  # counted with the parameters
    model.b.register_buffer("sparse", torch.eye(3).to_sparse())  # no storage to read: not counted, and no error
    assert buffer_bytes(model) == 100 + 80
    assert buffer_bytes(nn.Linear(3, 3)) == 0

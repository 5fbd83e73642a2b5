"""Triton kernels that execute the controller's decisions: fused optimizer steps, casts, gradient statistics.

Import as ``triaccel_rl.kernels``. Every kernel has a plain-PyTorch ``*_reference`` twin; the host wrappers
run the Triton kernel on CUDA tensors or when ``TRITON_INTERPRET=1`` was set before this package was
imported, and the reference otherwise, so everything works on a CPU-only machine.
"""

from triaccel_rl.kernels._common import (
    N_STAT_ROWS,
    SEGMENT_ALIGN_ELEMENTS,
    PrecisionCode,
    StatRow,
    new_step_state,
)
from triaccel_rl.kernels.adamw_step import fused_adamw_step, fused_adamw_step_reference
from triaccel_rl.kernels.cast import cast_to_low_precision, cast_to_low_precision_reference, nan_encodings
from triaccel_rl.kernels.flat_store import FlatParameterStore
from triaccel_rl.kernels.grad_stats import layer_grad_stats, layer_grad_stats_reference
from triaccel_rl.kernels.optim import AdamWOptions, FusedAdamW, FusedSGD, SGDOptions, StepResult
from triaccel_rl.kernels.sgd_step import fused_sgd_step, fused_sgd_step_reference

__all__ = [
    "N_STAT_ROWS",
    "SEGMENT_ALIGN_ELEMENTS",
    "AdamWOptions",
    "FlatParameterStore",
    "FusedAdamW",
    "FusedSGD",
    "PrecisionCode",
    "SGDOptions",
    "StatRow",
    "StepResult",
    "cast_to_low_precision",
    "cast_to_low_precision_reference",
    "fused_adamw_step",
    "fused_adamw_step_reference",
    "fused_sgd_step",
    "fused_sgd_step_reference",
    "layer_grad_stats",
    "layer_grad_stats_reference",
    "nan_encodings",
    "new_step_state",
]

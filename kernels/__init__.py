"""Triton kernels that execute the controller's decisions: fused optimizer steps, casts, gradient statistics.

Import as ``triaccel_rl.kernels``. Every kernel has a plain-PyTorch ``*_reference`` twin; the host wrappers
run the Triton kernel on CUDA tensors or when ``TRITON_INTERPRET=1`` was set before this package was
imported, and the reference otherwise, so everything works on a CPU-only machine.

Design: flat buffers rather than a pointer table. ``FlatParameterStore`` moves all parameters, grads and
the bf16/fp16 weight copies into flat buffers, each layer padded to whole 4096-element segments, with a
per-segment layer table. A fused step is then two launches over contiguous memory (statistics pass, update
pass), each block inside one layer (one load finds its LR factor and precision code; per-layer statistics
need one atomic per block), with 16-byte vector accesses and no per-tensor pointer indirection. The price
is the padding (under 1 % for ResNet-18 and GPT-2 shapes) and that parameters must be re-pointed at views.
The update pass skips itself on the device when the statistics pass counted a non-finite gradient, so
there is no host sync; see ``optim`` and ``adamw_step``.
"""

from triaccel_rl.kernels._common import (
    GPU_LAUNCH_CONFIGS,
    N_STAT_ROWS,
    SEGMENT_ALIGN_ELEMENTS,
    PrecisionCode,
    StatRow,
    log_betas,
    new_step_state,
)
from triaccel_rl.kernels.adamw_step import fused_adamw_step, fused_adamw_step_reference
from triaccel_rl.kernels.cast import cast_to_low_precision, cast_to_low_precision_reference, nan_encodings
from triaccel_rl.kernels.flat_store import DetachedParametersError, FlatParameterStore, is_dense
from triaccel_rl.kernels.grad_stats import layer_grad_stats, layer_grad_stats_reference
from triaccel_rl.kernels.optim import AdamWOptions, FusedAdamW, FusedSGD, SGDOptions, StepResult
from triaccel_rl.kernels.sgd_step import fused_sgd_step, fused_sgd_step_reference

__all__ = [
    "GPU_LAUNCH_CONFIGS",
    "N_STAT_ROWS",
    "SEGMENT_ALIGN_ELEMENTS",
    "AdamWOptions",
    "DetachedParametersError",
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
    "is_dense",
    "layer_grad_stats",
    "layer_grad_stats_reference",
    "log_betas",
    "nan_encodings",
    "new_step_state",
]

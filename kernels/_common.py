"""Shared constants and the one dispatch rule (Triton kernel or PyTorch reference) of the kernels package."""

from __future__ import annotations

import enum
import os

import torch

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_NUM_WARPS",
    "INTERPRET_AT_IMPORT",
    "N_STAT_ROWS",
    "PARAM_ALIGN_ELEMENTS",
    "SEGMENT_ALIGN_ELEMENTS",
    "PrecisionCode",
    "StatRow",
    "check_block_size",
    "new_step_state",
    "_use_triton",
]

SEGMENT_ALIGN_ELEMENTS = 4096
"""Every layer's segment of the flat buffers starts at a multiple of this many elements and is padded to
one, so a kernel block of ``BLOCK`` elements (``BLOCK`` divides this) always lies inside one layer. The
padding costs at most ``SEGMENT_ALIGN_ELEMENTS - 1`` elements a layer (about 1 % for ResNet-18 with one
layer per parameter tensor)."""

PARAM_ALIGN_ELEMENTS = 16
"""Inside a layer segment every parameter starts at a multiple of 16 elements (64 B in fp32, 32 B in the
16-bit copies), which keeps cuBLAS and cuDNN on their aligned fast paths."""

DEFAULT_BLOCK_SIZE = 4096
"""Elements per program of the element-wise kernels. 4096 keeps the interpreter (about 0.7 ms a program)
fast and, with 8 warps, gives each GPU thread 16 fp32 elements: four 16-byte loads per tensor in flight."""

DEFAULT_NUM_WARPS = 8
"""Warps per program on the GPU (ignored by the interpreter)."""

INTERPRET_AT_IMPORT = os.environ.get("TRITON_INTERPRET", "0") == "1"
"""Whether the ``@triton.jit`` kernels were built for Triton's CPU interpreter: ``triton.jit`` reads
``TRITON_INTERPRET`` when a kernel is defined, so it must be set before this package is imported."""


class PrecisionCode(enum.IntEnum):
    """Per-layer precision code read by the fused optimizer kernels (same values as ``types.Precision``)."""

    FP32 = 0
    BF16 = 1
    FP16 = 2


class StatRow(enum.IntEnum):
    """Rows of the per-step statistics buffer, a float32 tensor of shape ``[N_STAT_ROWS, n_layers]``.

    Rows marked *int32* hold integers and must be read through ``stats.view(torch.int32)``. Every
    gradient statistic is of the unscaled gradient ``g = grad * inv_scale``, and the float sums and the
    maximum skip non-finite elements (they are counted in ``GRAD_NONFINITE`` instead), so a single
    overflow leaves the other statistics usable.
    """

    GRAD_SQ_SUM = 0
    """Sum of ``g**2`` over the layer's finite gradient elements."""
    GRAD_ABS_MAX = 1
    """Largest ``|g|`` over the layer's finite gradient elements (0 for an all-zero layer)."""
    GRAD_SUM = 2
    """Sum of ``g`` over the layer's finite gradient elements."""
    GRAD_NONFINITE = 3
    """int32: count of the layer's non-finite (inf or NaN) gradient elements."""
    GRAD_DOT_MOMENTUM = 4
    """Sum of ``g * m_prev``: gradient times the momentum buffer (SGD) or first moment (AdamW) as it was
    before this step; with ``MOMENTUM_SQ_SUM`` and ``GRAD_SQ_SUM`` gives the cosine between the gradient
    and its history. 0 when the step was skipped."""
    MOMENTUM_SQ_SUM = 5
    """Sum of ``m_new**2``, the updated momentum buffer or first moment. 0 when the step was skipped."""
    SECOND_MOMENT_SUM = 6
    """AdamW only: sum of ``v_new``, the updated second moment. With the first moment, the per-layer
    gradient variance is ``sum(v_hat) - sum(m_hat**2)`` (bias-corrected by ``1 - beta**step``).
    0 for SGD and when the step was skipped."""
    NONFINITE_TOTAL = 7
    """int32, column 0 only: non-finite gradient elements over all layers; the update kernels skip the
    step when it is not 0."""


N_STAT_ROWS = len(StatRow)


def check_block_size(block_size: int, segment_align: int) -> None:
    """Raises ``ValueError`` unless ``block_size`` is a power of two that divides ``segment_align``."""
    if block_size <= 0 or block_size & (block_size - 1) or segment_align % block_size:
        raise ValueError(
            f"block_size must be a power of two dividing the segment alignment {segment_align}, "
            f"got {block_size}"
        )


def new_step_state(device: torch.device | str, beta1: float = 0.0, beta2: float = 0.0) -> torch.Tensor:
    """Makes the device-side step counter of a fused optimizer: float64, shape ``[3, 3]``.

    Rows 0 and 1 are two slots of ``(applied_steps, beta1**applied_steps, beta2**applied_steps)``; a step
    reads one slot and its first program writes the other, so the counter advances only for steps that
    were not skipped, without a host sync and without a read/write race between programs. Row 2 holds
    the constants ``(0, beta1, beta2)`` in float64 (Triton passes Python floats as float32), so the
    bias-correction powers are exact float64 products.

    Args:
        device: where the optimizer state lives.
        beta1: AdamW's first-moment decay (0 for SGD).
        beta2: AdamW's second-moment decay (0 for SGD).

    Returns:
        The zero-step state, with both slots at ``(0, 1, 1)``.
    """
    state = torch.tensor(
        [[0.0, 1.0, 1.0], [0.0, 1.0, 1.0], [0.0, beta1, beta2]], dtype=torch.float64, device=device
    )
    return state


def _use_triton(tensor: torch.Tensor) -> bool:
    """Whether to run the Triton kernel (True) or the PyTorch reference (False) on ``tensor``.

    Triton for CUDA tensors, and for any tensor when ``TRITON_INTERPRET=1`` (Triton's CPU interpreter);
    otherwise the vectorised PyTorch reference, so the package works on a CPU-only machine.

    Raises:
        RuntimeError: ``TRITON_INTERPRET=1`` is set now but was not when this package was imported, so
            the kernels were compiled for a GPU and cannot run on the interpreter.
    """
    if tensor.is_cuda:
        return True
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        if not INTERPRET_AT_IMPORT:
            raise RuntimeError(
                "TRITON_INTERPRET=1 was set after triaccel_rl.kernels was imported; set it before the "
                "first import (triton.jit reads it when a kernel is defined)"
            )
        return True
    return False

"""Per-layer gradient statistics (sum of squares, abs max, sum, non-finite count) in one pass over the flat grads.

This is pass 1 of a fused optimizer step: it reads the gradients once (4 B an element) and, besides the
statistics, counts the non-finite elements over all layers into ``StatRow.NONFINITE_TOTAL``, which the
update kernel of pass 2 reads on the device to decide whether to skip the step. Layout: the flat buffer is
cut into segments of ``segment_align`` elements, ``chunk_layer[c]`` names the layer that owns segment ``c``
(layers are padded to whole segments, the padding holds zeros), so each program's block lies in one layer
and adds its partial results with one atomic per statistic. Float sums are accumulated with atomics in
arbitrary order, so they are not bit-reproducible from run to run (relative differences near 1e-7); the
maximum and the counts are exact.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triaccel_rl.kernels._common import (
    N_STAT_ROWS,
    SEGMENT_ALIGN_ELEMENTS,
    StatRow,
    _use_triton,
    check_block_size,
    check_flat_layout,
    inv_scale_arguments,
    launch_config,
    require,
)

__all__ = ["layer_grad_stats", "layer_grad_stats_reference"]

# Rows of the statistics buffer, as compile-time constants the kernel can read.
_SQ_SUM_ROW = tl.constexpr(int(StatRow.GRAD_SQ_SUM))
_ABS_MAX_ROW = tl.constexpr(int(StatRow.GRAD_ABS_MAX))
_SUM_ROW = tl.constexpr(int(StatRow.GRAD_SUM))
_NONFINITE_ROW = tl.constexpr(int(StatRow.GRAD_NONFINITE))
_NONFINITE_TOTAL_ROW = tl.constexpr(int(StatRow.NONFINITE_TOTAL))


@triton.jit
def _layer_grad_stats_kernel(
    grad_ptr,
    chunk_layer_ptr,
    stats_ptr,
    stats_bits_ptr,
    inv_scale_ptr,
    inv_scale_value,
    n_elements,
    n_layers,
    INV_SCALE_FROM_PTR: tl.constexpr,
    BLOCKS_PER_SEGMENT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Adds one block's statistics of ``grad * inv_scale`` into its layer's slots with atomics."""
    pid = tl.program_id(0)
    layer = tl.load(chunk_layer_ptr + pid // BLOCKS_PER_SEGMENT)
    if INV_SCALE_FROM_PTR:
        inv_scale = tl.load(inv_scale_ptr)
    else:
        inv_scale = inv_scale_value
    offsets = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0) * inv_scale
    # Exponent all ones <=> inf or NaN; tested on the bits so no float comparison with NaN is involved.
    finite = (grad.to(tl.uint32, bitcast=True) & 0x7F800000) != 0x7F800000
    grad_finite = tl.where(finite, grad, 0.0)
    n_nonfinite = tl.sum((~finite).to(tl.int32), axis=0)
    # Relaxed atomics: the results are read only after the kernel has finished.
    tl.atomic_add(stats_ptr + _SQ_SUM_ROW * n_layers + layer, tl.sum(grad_finite * grad_finite, axis=0), sem="relaxed")
    tl.atomic_add(stats_ptr + _SUM_ROW * n_layers + layer, tl.sum(grad_finite, axis=0), sem="relaxed")
    # |g| >= 0, and non-negative floats order like their int32 bit patterns, so an integer max works.
    abs_max_bits = tl.max(tl.abs(grad_finite), axis=0).to(tl.int32, bitcast=True)
    tl.atomic_max(stats_bits_ptr + _ABS_MAX_ROW * n_layers + layer, abs_max_bits, sem="relaxed")
    has_nonfinite = n_nonfinite > 0
    nonfinite_ptr = stats_bits_ptr + _NONFINITE_ROW * n_layers + layer
    tl.atomic_add(nonfinite_ptr, n_nonfinite, mask=has_nonfinite, sem="relaxed")
    tl.atomic_add(stats_bits_ptr + _NONFINITE_TOTAL_ROW * n_layers, n_nonfinite, mask=has_nonfinite, sem="relaxed")


def layer_grad_stats(
    grads: torch.Tensor,
    chunk_layer: torch.Tensor,
    n_layers: int,
    inv_scale: float | torch.Tensor = 1.0,
    out: torch.Tensor | None = None,
    *,
    segment_align: int = SEGMENT_ALIGN_ELEMENTS,
    block_size: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Computes per-layer statistics of the unscaled flat gradient ``grads * inv_scale``.

    Fills rows ``GRAD_SQ_SUM``, ``GRAD_ABS_MAX``, ``GRAD_SUM``, ``GRAD_NONFINITE`` and
    ``NONFINITE_TOTAL`` of the statistics buffer (see ``StatRow``); the other rows are left at 0 for the
    update kernel. Runs the Triton kernel on CUDA tensors or under ``TRITON_INTERPRET=1``, else the
    reference. No host sync.

    Args:
        grads: flat float32 gradient buffer, length a multiple of ``segment_align``.
        chunk_layer: int32 ``[len(grads) // segment_align]``, the layer owning each segment.
        n_layers: number of layers (``chunk_layer`` values are in ``[0, n_layers)``).
        inv_scale: loss-scale reciprocal, a float or a one-element float32 tensor on ``grads``' device.
        out: optional float32 ``[N_STAT_ROWS, n_layers]`` buffer to fill (it is zeroed first).
        segment_align: elements per segment of the layout.
        block_size: elements per program, a power of two dividing ``segment_align`` (None: the default
            of ``GPU_LAUNCH_CONFIGS``, or one segment under the interpreter).
        num_warps: warps per program on the GPU (None: the default).

    Returns:
        The float32 statistics buffer of shape ``[N_STAT_ROWS, n_layers]``.
    """
    check_flat_layout(grads, chunk_layer, n_layers, segment_align)
    block_size, num_warps = launch_config("grad_stats", grads, block_size, num_warps, segment_align)
    check_block_size(block_size, segment_align)
    # Checked on both paths, before ``out`` is touched (the reference path took a float64 or integer tensor)
    inv_scale_ptr, inv_scale_value, inv_scale_from_ptr = inv_scale_arguments(inv_scale, grads)
    if out is None:
        out = torch.zeros((N_STAT_ROWS, n_layers), dtype=torch.float32, device=grads.device)
    else:
        require(
            out.shape == (N_STAT_ROWS, n_layers) and out.dtype == torch.float32,
            f"out must be float32 [{N_STAT_ROWS}, {n_layers}], got {out.dtype} {tuple(out.shape)}",
        )
        require(out.is_contiguous() and out.device == grads.device, "out must be contiguous, on grads' device")
        out.zero_()
    if not _use_triton(grads):
        out.copy_(layer_grad_stats_reference(grads, chunk_layer, n_layers, inv_scale, segment_align=segment_align))
        return out
    n_elements = grads.numel()
    if n_elements == 0:
        return out
    grid = (n_elements // block_size,)
    _layer_grad_stats_kernel[grid](
        grads,
        chunk_layer,
        out,
        out.view(torch.int32),
        inv_scale_ptr,
        inv_scale_value,
        n_elements,
        n_layers,
        INV_SCALE_FROM_PTR=inv_scale_from_ptr,
        BLOCKS_PER_SEGMENT=segment_align // block_size,
        BLOCK=block_size,
        num_warps=num_warps,
    )
    return out


def layer_grad_stats_reference(
    grads: torch.Tensor,
    chunk_layer: torch.Tensor,
    n_layers: int,
    inv_scale: float | torch.Tensor = 1.0,
    *,
    segment_align: int = SEGMENT_ALIGN_ELEMENTS,
) -> torch.Tensor:
    """Plain-PyTorch ``layer_grad_stats``: per-segment reductions, then ``index_add_``/``scatter_reduce_``.

    Vectorised over the flat buffer (no per-layer Python loop), so it also serves as the CPU fallback.

    Returns:
        A new float32 ``[N_STAT_ROWS, n_layers]`` buffer, laid out as ``layer_grad_stats`` fills it.
    """
    check_flat_layout(grads, chunk_layer, n_layers, segment_align)
    inv_scale_arguments(inv_scale, grads)  # the kernel path's check of it
    stats = torch.zeros((N_STAT_ROWS, n_layers), dtype=torch.float32, device=grads.device)
    stats_bits = stats.view(torch.int32)
    grad = (grads * inv_scale).view(-1, segment_align)
    finite = torch.isfinite(grad)
    grad_finite = torch.where(finite, grad, torch.zeros_like(grad))
    layer = chunk_layer.long()
    stats[StatRow.GRAD_SQ_SUM].index_add_(0, layer, (grad_finite * grad_finite).sum(dim=1))
    stats[StatRow.GRAD_SUM].index_add_(0, layer, grad_finite.sum(dim=1))
    abs_max = stats[StatRow.GRAD_ABS_MAX]
    abs_max.scatter_reduce_(0, layer, grad_finite.abs().amax(dim=1), reduce="amax")
    nonfinite = (~finite).sum(dim=1, dtype=torch.int32)
    stats_bits[StatRow.GRAD_NONFINITE].index_add_(0, layer, nonfinite)
    stats_bits[StatRow.NONFINITE_TOTAL, 0] = nonfinite.sum(dtype=torch.int32)
    return stats

"""Fused SGD update (momentum, Nesterov, weight decay) over the flat parameter buffer, with skip and copies.

The SGD counterpart of ``adamw_step``, with the same layout, launch and skip rule (see that module): pass 2
of a fused step, one launch over the flat buffers, each program in one layer, all loads and stores masked
off when pass 1 counted a non-finite gradient. Per element it reads p, g and the momentum buffer (12 B)
and writes p and the buffer (8 B), plus the 2 B low-precision copy where the layer's code asks for one.
A layer's first applied step with momentum sets its momentum buffer to the gradient, as ``torch.optim.SGD`` does a
parameter's (its buffer is made at the first step that uses momentum): that is read from the device-side step counts
(one a layer) and, where given, the steps each layer took at momentum 0 before its buffer started, so no host sync is
needed for it either. Launches per step: the counts' snapshot copy and the update kernel.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl
from triaccel_rl.kernels._common import (
    SEGMENT_ALIGN_ELEMENTS,
    StatRow,
    _use_triton,
    advance_step_counts,
    advance_step_counts_reference,
    check_block_size,
    check_step_buffers,
    inv_scale_arguments,
    launch_config,
    segment_weight_decay,
    weight_decay_arguments,
    write_low_precision_copies_reference,
)
from triaccel_rl.kernels.cast import _fp32_to_bf16_bits, _fp32_to_fp16_bits, nan_encodings

__all__ = ["fused_sgd_step", "fused_sgd_step_reference"]

# Rows of the statistics buffer, as compile-time constants the kernel can read.
_NONFINITE_TOTAL_ROW = tl.constexpr(int(StatRow.NONFINITE_TOTAL))
_DOT_MOMENTUM_ROW = tl.constexpr(int(StatRow.GRAD_DOT_MOMENTUM))
_MOMENTUM_SQ_SUM_ROW = tl.constexpr(int(StatRow.MOMENTUM_SQ_SUM))


@triton.jit
def _fused_sgd_step_kernel(
    param_ptr,
    grad_ptr,
    momentum_buffer_ptr,
    bf16_bits_ptr,
    fp16_bits_ptr,
    chunk_layer_ptr,
    lr_factor_ptr,
    precision_code_ptr,
    stats_ptr,
    stats_bits_ptr,
    step_state_ptr,
    steps_before_momentum_ptr,
    inv_scale_ptr,
    inv_scale_value,
    lr,
    momentum,
    one_minus_dampening,
    weight_decay_ptr,
    weight_decay_value,
    n_elements,
    n_layers,
    USE_MOMENTUM: tl.constexpr,
    TRACK_MOMENTUM_START: tl.constexpr,
    NESTEROV: tl.constexpr,
    USE_WEIGHT_DECAY: tl.constexpr,
    DECAY_PER_SEGMENT: tl.constexpr,
    INV_SCALE_FROM_PTR: tl.constexpr,
    BF16_NAN: tl.constexpr,
    FP16_NAN: tl.constexpr,
    BLOCKS_PER_SEGMENT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Applies one SGD step to ``BLOCK`` elements of one layer, unless the step is skipped."""
    pid = tl.program_id(0)
    segment = pid // BLOCKS_PER_SEGMENT
    layer = tl.load(chunk_layer_ptr + segment)
    apply = tl.load(stats_bits_ptr + _NONFINITE_TOTAL_ROW * n_layers) == 0

    # The counts (see _common.advance_step_counts): a layer's first step with momentum starts its momentum buffer.
    layer_steps = advance_step_counts(step_state_ptr, chunk_layer_ptr, pid, segment, layer, apply, n_layers,
                                      BLOCKS_PER_SEGMENT)  # fmt: skip
    is_first_step = layer_steps == 0.0
    if TRACK_MOMENTUM_START:
        # The steps a layer took at momentum 0 before its buffer started: read only at momentum > 0, written (by the
        # layer's first program, as its count) only at momentum 0, so no program reads a value another is writing.
        steps_before_momentum = tl.load(steps_before_momentum_ptr + layer)
        is_first_step = layer_steps == steps_before_momentum
        if not USE_MOMENTUM:
            previous_layer = tl.load(chunk_layer_ptr + tl.maximum(segment - 1, 0))
            is_layer_writer = (pid % BLOCKS_PER_SEGMENT == 0) & ((segment == 0) | (previous_layer != layer))
            takes_part = tl.load(step_state_ptr + 2 * (n_layers + 1) + 1 + layer) != 0.0
            without_buffer = apply & takes_part & is_first_step
            tl.store(steps_before_momentum_ptr + layer,
                     tl.where(without_buffer, steps_before_momentum + 1.0, steps_before_momentum),
                     mask=is_layer_writer)  # fmt: skip

    if INV_SCALE_FROM_PTR:
        inv_scale = tl.load(inv_scale_ptr)
    else:
        inv_scale = inv_scale_value
    layer_lr = lr * tl.load(lr_factor_ptr + layer)

    offsets = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    # A skipped step masks every element off by shrinking the valid range to nothing (not `mask & apply`:
    # Triton 3.9's interpreter rejects the dtype of a mask combined with a scalar flag).
    mask = offsets < tl.where(apply, n_elements, 0)
    grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0) * inv_scale
    param = tl.load(param_ptr + offsets, mask=mask, other=0.0)

    # Same operation order as torch.optim.SGD's single-tensor path.
    direction = grad
    if USE_WEIGHT_DECAY:
        if DECAY_PER_SEGMENT:
            weight_decay = tl.load(weight_decay_ptr + segment)
        else:
            weight_decay = weight_decay_value
        direction = direction + weight_decay * param
    if USE_MOMENTUM:
        momentum_buffer = tl.load(momentum_buffer_ptr + offsets, mask=mask, other=0.0)
        new_momentum_buffer = tl.where(
            is_first_step, direction, momentum_buffer * momentum + one_minus_dampening * direction
        )
        tl.store(momentum_buffer_ptr + offsets, new_momentum_buffer, mask=mask)
        if NESTEROV:
            direction = direction + momentum * new_momentum_buffer
        else:
            direction = new_momentum_buffer
        dot_momentum = tl.sum(grad * momentum_buffer, axis=0)
        tl.atomic_add(stats_ptr + _DOT_MOMENTUM_ROW * n_layers + layer, dot_momentum, mask=apply, sem="relaxed")
        momentum_sq_sum = tl.sum(new_momentum_buffer * new_momentum_buffer, axis=0)
        tl.atomic_add(stats_ptr + _MOMENTUM_SQ_SUM_ROW * n_layers + layer, momentum_sq_sum, mask=apply, sem="relaxed")
    param = param - layer_lr * direction

    tl.store(param_ptr + offsets, param, mask=mask)
    code = tl.load(precision_code_ptr + layer)
    # Uniform branches on the layer's code: fp32 layers skip the rounding arithmetic altogether.
    if code == 1:
        tl.store(bf16_bits_ptr + offsets, _fp32_to_bf16_bits(param, BF16_NAN), mask=mask)
    if code == 2:
        tl.store(fp16_bits_ptr + offsets, _fp32_to_fp16_bits(param, FP16_NAN), mask=mask)


def fused_sgd_step(
    params: torch.Tensor,
    grads: torch.Tensor,
    momentum_buffer: torch.Tensor,
    bf16_copy: torch.Tensor,
    fp16_copy: torch.Tensor,
    chunk_layer: torch.Tensor,
    lr_factors: torch.Tensor,
    precision_codes: torch.Tensor,
    stats: torch.Tensor,
    step_state: torch.Tensor,
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float | torch.Tensor = 0.0,
    nesterov: bool = False,
    inv_scale: float | torch.Tensor = 1.0,
    steps_before_momentum: torch.Tensor | None = None,
    segment_align: int = SEGMENT_ALIGN_ELEMENTS,
    block_size: int | None = None,
    num_warps: int | None = None,
    on_launch: Callable[[], None] | None = None,
) -> None:
    """Applies one SGD step in place to the flat buffers, or nothing if ``stats`` reports a non-finite grad.

    Runs the Triton kernel on CUDA tensors or under ``TRITON_INTERPRET=1``, else the reference. No host
    sync. Call ``layer_grad_stats`` on the same ``stats`` first: it provides the skip decision.

    Args:
        params: flat float32 master weights, updated in place.
        grads: flat float32 gradients, still multiplied by the loss scale.
        momentum_buffer: flat float32 momentum buffer apart from ``params`` and ``grads``, updated in place
            (untouched and not checked when ``momentum == 0``).
        bf16_copy: flat bfloat16 buffer; segments of layers with precision code 1 get ``params.to(bf16)``.
        fp16_copy: flat float16 buffer; segments of layers with precision code 2 get ``params.to(fp16)``.
        chunk_layer: int32 ``[len(params) // segment_align]``, the layer owning each segment.
        lr_factors: float32 ``[n_layers]``, per-layer multipliers of ``lr``.
        precision_codes: integer ``[n_layers]``: 0 fp32 (no copy), 1 bf16, 2 fp16 (``PrecisionCode``).
        stats: float32 ``[N_STAT_ROWS, n_layers]`` from ``layer_grad_stats``; this adds the rows
            ``GRAD_DOT_MOMENTUM`` and ``MOMENTUM_SQ_SUM`` (0 without momentum).
        step_state: float64 ``[4, 1 + n_layers]`` from ``new_step_state``; the model's count and those of the
            layers taking part (its row 2) advance in place when the step is applied. A layer's first applied step
            starts its momentum buffer with the gradient, as ``torch.optim.SGD`` does a parameter's.
        lr: global learning rate (the layer's rate is ``lr * lr_factors[layer]``).
        momentum: momentum factor, >= 0.
        dampening: dampening of the gradient's contribution to the momentum buffer, in [0, 1].
        weight_decay: L2 penalty added to the gradient, >= 0: a float, or a float32 ``[n_segments]`` tensor on
            the buffers' device giving each segment its own (see ``FlatParameterStore``'s ``groups``).
        nesterov: use Nesterov momentum.
        inv_scale: loss-scale reciprocal, a float or a one-element float32 tensor on the buffers' device.
        steps_before_momentum: float64 ``[n_layers]`` on the buffers' device, or None: the applied steps each layer
            took at momentum 0 before its momentum buffer started, advanced in place by a step at momentum 0 for a
            layer still without one. A layer's buffer then starts (with the gradient, undampened) at its first applied
            step with momentum, as ``torch.optim.SGD``'s does under a momentum schedule from 0. None: at its first
            applied step (the counts alone).
        segment_align: elements per segment of the layout.
        block_size: elements per program, a power of two dividing ``segment_align`` (None: the default
            of ``GPU_LAUNCH_CONFIGS``, or one segment under the interpreter).
        num_warps: warps per program on the GPU (None: the default).
        on_launch: called once every argument is checked, right before the first write to a buffer: a fused
            optimizer marks its update as begun there (an error or a Ctrl-C before it moved nothing).
    """
    check_step_buffers(
        params, grads, [momentum_buffer] if momentum != 0.0 else [], bf16_copy, fp16_copy, chunk_layer, lr_factors,
        precision_codes, stats, step_state, segment_align,
    )  # fmt: skip
    _check_steps_before_momentum(steps_before_momentum, lr_factors)
    block_size, num_warps = launch_config("sgd_step", params, block_size, num_warps, segment_align)
    check_block_size(block_size, segment_align)
    use_triton = _use_triton(params)
    inv_scale_ptr, inv_scale_value, inv_scale_from_ptr = inv_scale_arguments(inv_scale, params)
    decay_ptr, decay_value, decay_per_segment, use_decay = weight_decay_arguments(weight_decay, params, segment_align)
    bf16_nan, fp16_nan = nan_encodings(params.device)  # a probe, once per device type (a sync on CUDA)
    if on_launch is not None:
        on_launch()
    if not use_triton:
        fused_sgd_step_reference(
            params, grads, momentum_buffer, bf16_copy, fp16_copy, chunk_layer, lr_factors, precision_codes,
            stats, step_state, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, inv_scale=inv_scale, steps_before_momentum=steps_before_momentum,
            segment_align=segment_align,
        )  # fmt: skip
        return
    n_elements = params.numel()
    if n_elements == 0:  # nothing to update; the counts still advance where the step applies, as on the reference path
        apply = stats.view(torch.int32)[StatRow.NONFINITE_TOTAL, 0] == 0
        before = advance_step_counts_reference(step_state, apply)
        if momentum == 0.0 and steps_before_momentum is not None:
            _advance_steps_before_momentum(steps_before_momentum, before, step_state, apply)
        return
    step_state[1].copy_(step_state[0])  # the snapshot every program reads (one tiny device copy)
    grid = (n_elements // block_size,)
    _fused_sgd_step_kernel[grid](
        params,
        grads,
        momentum_buffer,
        bf16_copy.view(torch.int16),
        fp16_copy.view(torch.int16),
        chunk_layer,
        lr_factors,
        precision_codes,
        stats,
        stats.view(torch.int32),
        step_state,
        step_state if steps_before_momentum is None else steps_before_momentum,  # (unread when None)
        inv_scale_ptr,
        inv_scale_value,
        lr,
        momentum,
        1.0 - dampening,
        decay_ptr,
        decay_value,
        n_elements,
        lr_factors.numel(),
        USE_MOMENTUM=momentum != 0.0,
        TRACK_MOMENTUM_START=steps_before_momentum is not None,
        NESTEROV=nesterov,
        USE_WEIGHT_DECAY=use_decay,
        DECAY_PER_SEGMENT=decay_per_segment,
        INV_SCALE_FROM_PTR=inv_scale_from_ptr,
        BF16_NAN=bf16_nan,
        FP16_NAN=fp16_nan,
        BLOCKS_PER_SEGMENT=segment_align // block_size,
        BLOCK=block_size,
        num_warps=num_warps,
    )


def fused_sgd_step_reference(
    params: torch.Tensor,
    grads: torch.Tensor,
    momentum_buffer: torch.Tensor,
    bf16_copy: torch.Tensor,
    fp16_copy: torch.Tensor,
    chunk_layer: torch.Tensor,
    lr_factors: torch.Tensor,
    precision_codes: torch.Tensor,
    stats: torch.Tensor,
    step_state: torch.Tensor,
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float | torch.Tensor = 0.0,
    nesterov: bool = False,
    inv_scale: float | torch.Tensor = 1.0,
    steps_before_momentum: torch.Tensor | None = None,
    segment_align: int = SEGMENT_ALIGN_ELEMENTS,
) -> None:
    """Plain-PyTorch ``fused_sgd_step`` (same arguments, same in-place effects), vectorised per segment.

    Skips with ``torch.where`` on a 0-dim device flag, like ``fused_adamw_step_reference``: no host sync.
    """
    check_step_buffers(
        params, grads, [momentum_buffer] if momentum != 0.0 else [], bf16_copy, fp16_copy, chunk_layer, lr_factors,
        precision_codes, stats, step_state, segment_align,
    )  # fmt: skip
    _check_steps_before_momentum(steps_before_momentum, lr_factors)
    # The kernel path's checks of the two, before the counts move (a float64 tensor passed here and failed there)
    inv_scale_arguments(inv_scale, params)
    weight_decay_arguments(weight_decay, params, segment_align)
    apply = stats.view(torch.int32)[StatRow.NONFINITE_TOTAL, 0] == 0
    layer = chunk_layer.long()
    layer_steps = advance_step_counts_reference(step_state, apply)
    first_steps = layer_steps if steps_before_momentum is None else layer_steps - steps_before_momentum
    is_first_step = (first_steps == 0.0)[layer].unsqueeze(1)  # [n_segments, 1]
    if momentum == 0.0 and steps_before_momentum is not None:
        _advance_steps_before_momentum(steps_before_momentum, layer_steps, step_state, apply)

    layer_lr = (lr * lr_factors)[layer].unsqueeze(1)  # [n_segments, 1]
    grad = grads.view(-1, segment_align) * inv_scale
    param = params.view(-1, segment_align)
    direction = grad
    if isinstance(weight_decay, torch.Tensor) or weight_decay != 0.0:
        direction = direction + segment_weight_decay(weight_decay) * param
    if momentum != 0.0:
        buffer = momentum_buffer.view(-1, segment_align)
        new_buffer = torch.where(is_first_step, direction, buffer * momentum + (1.0 - dampening) * direction)
        n_layers = lr_factors.numel()
        zero = torch.zeros((), dtype=torch.float32, device=params.device)
        for row, per_segment in [
            (StatRow.GRAD_DOT_MOMENTUM, (grad * buffer).sum(dim=1)),
            (StatRow.MOMENTUM_SQ_SUM, (new_buffer * new_buffer).sum(dim=1)),
        ]:
            per_layer = torch.zeros(n_layers, dtype=torch.float32, device=params.device)
            per_layer.index_add_(0, layer, per_segment)
            stats[row] += torch.where(apply, per_layer, zero)
        direction = direction + momentum * new_buffer if nesterov else new_buffer
        buffer.copy_(torch.where(apply, new_buffer, buffer))
    new_param = param - layer_lr * direction

    write_low_precision_copies_reference(new_param, bf16_copy, fp16_copy, precision_codes[layer], apply)
    param.copy_(torch.where(apply, new_param, param))


def _advance_steps_before_momentum(
    steps_before_momentum: torch.Tensor, layer_steps: torch.Tensor, step_state: torch.Tensor, apply: torch.Tensor
) -> None:
    """Counts a step at momentum 0 for the layers taking part that have no momentum buffer yet (reference paths).

    ``layer_steps`` holds each layer's count before the step; a layer has no buffer while its count equals its
    ``steps_before_momentum``.
    """
    without_buffer = apply & (step_state[2, 1:] != 0.0) & (layer_steps == steps_before_momentum)
    steps_before_momentum.copy_(torch.where(without_buffer, steps_before_momentum + 1.0, steps_before_momentum))


def _check_steps_before_momentum(steps_before_momentum: torch.Tensor | None, lr_factors: torch.Tensor) -> None:
    """Raises a ValueError unless ``steps_before_momentum`` is None or float64 ``[n_layers]`` on the buffers' device."""
    if steps_before_momentum is None:
        return
    if (
        steps_before_momentum.dtype != torch.float64
        or steps_before_momentum.shape != lr_factors.shape
        or steps_before_momentum.device != lr_factors.device
        or not steps_before_momentum.is_contiguous()  # the kernel reads and writes it at ptr + layer
    ):
        raise ValueError(
            f"steps_before_momentum must be contiguous float64 of shape {tuple(lr_factors.shape)} (one a layer) on "
            f"{lr_factors.device}; got {steps_before_momentum.dtype} {tuple(steps_before_momentum.shape)} on "
            f"{steps_before_momentum.device}"
            + ("" if steps_before_momentum.is_contiguous() else f", strides {steps_before_momentum.stride()}")
        )

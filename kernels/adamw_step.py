"""Fused AdamW update over the flat parameter buffer: unscale, skip on overflow, per-layer LR, low-precision copy.

This is pass 2 of a fused step (pass 1 is ``grad_stats.layer_grad_stats``). One launch covers every
parameter: the buffers are flat fp32 (master weights, grads, ``exp_avg``, ``exp_avg_sq``), each layer
padded to whole segments of ``segment_align`` elements, and ``chunk_layer`` maps a segment to its layer, so
a program reads its layer's LR factor and precision code once. Per element it reads p, g, m, v (16 B) and
writes p, m, v (12 B) plus a 2 B bf16 or fp16 copy for layers whose precision code is 1 or 2.

Skipping without a host sync: every program reads the non-finite count that pass 1 left in
``stats[NONFINITE_TOTAL, 0]`` and, when it is not 0, masks all its loads and stores off, so parameters,
moments, copies and the step counts stay bit-for-bit unchanged (the promise ``GradScaler`` makes). The
bias corrections use device-side step counts, one for the model and one a layer (see
``_common.new_step_state``), that only advance on applied steps, a layer's only when it took part. Launches
per step: the counts' snapshot copy (8 bytes a layer) and the update kernel.
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

__all__ = ["fused_adamw_step", "fused_adamw_step_reference"]

# Rows of the statistics buffer, as compile-time constants the kernel can read.
_NONFINITE_TOTAL_ROW = tl.constexpr(int(StatRow.NONFINITE_TOTAL))
_DOT_MOMENTUM_ROW = tl.constexpr(int(StatRow.GRAD_DOT_MOMENTUM))
_MOMENTUM_SQ_SUM_ROW = tl.constexpr(int(StatRow.MOMENTUM_SQ_SUM))
_SECOND_MOMENT_SUM_ROW = tl.constexpr(int(StatRow.SECOND_MOMENT_SUM))


@triton.jit
def _fused_adamw_step_kernel(
    param_ptr,
    grad_ptr,
    exp_avg_ptr,
    exp_avg_sq_ptr,
    bf16_bits_ptr,
    fp16_bits_ptr,
    chunk_layer_ptr,
    lr_factor_ptr,
    precision_code_ptr,
    stats_ptr,
    stats_bits_ptr,
    step_state_ptr,
    inv_scale_ptr,
    inv_scale_value,
    lr,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    weight_decay_ptr,
    weight_decay_value,
    n_elements,
    n_layers,
    DECAY_PER_SEGMENT: tl.constexpr,
    INV_SCALE_FROM_PTR: tl.constexpr,
    BF16_NAN: tl.constexpr,
    FP16_NAN: tl.constexpr,
    BLOCKS_PER_SEGMENT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Applies one AdamW step to ``BLOCK`` elements of one layer, unless the step is skipped."""
    pid = tl.program_id(0)
    segment = pid // BLOCKS_PER_SEGMENT
    layer = tl.load(chunk_layer_ptr + segment)
    apply = tl.load(stats_bits_ptr + _NONFINITE_TOTAL_ROW * n_layers) == 0

    layer_steps = advance_step_counts(step_state_ptr, chunk_layer_ptr, pid, segment, layer, apply, n_layers,
                                      BLOCKS_PER_SEGMENT)  # fmt: skip

    # The layer's own count sets its bias corrections, as torch.optim's per-parameter ``step`` does (a layer that
    # sits the step out is restored afterwards: its values here do not matter).
    new_layer_steps = layer_steps + 1.0
    log_betas_row = step_state_ptr + 3 * (n_layers + 1)
    bias_correction1 = (1.0 - tl.exp(new_layer_steps * tl.load(log_betas_row))).to(tl.float32)
    bias_correction2 = (1.0 - tl.exp(new_layer_steps * tl.load(log_betas_row + 1))).to(tl.float32)
    bias_correction2_sqrt = tl.sqrt(bias_correction2)
    if INV_SCALE_FROM_PTR:
        inv_scale = tl.load(inv_scale_ptr)
    else:
        inv_scale = inv_scale_value
    layer_lr = lr * tl.load(lr_factor_ptr + layer)
    step_size = layer_lr / bias_correction1
    if DECAY_PER_SEGMENT:
        weight_decay = tl.load(weight_decay_ptr + segment)
    else:
        weight_decay = weight_decay_value
    decay = 1.0 - layer_lr * weight_decay

    offsets = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    # A skipped step masks every element off by shrinking the valid range to nothing (not `mask & apply`:
    # Triton 3.9's interpreter rejects the dtype of a mask combined with a scalar flag).
    mask = offsets < tl.where(apply, n_elements, 0)
    grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0) * inv_scale
    param = tl.load(param_ptr + offsets, mask=mask, other=0.0)
    exp_avg = tl.load(exp_avg_ptr + offsets, mask=mask, other=0.0)
    exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=mask, other=0.0)

    # Same operation order as torch.optim.AdamW's single-tensor path on the CPU. Its ``exp_avg.lerp_(grad,
    # 1 - beta1)`` takes the form that is exact at its end for a weight >= 0.5 (m = g at beta1 = 0 however large the
    # old m), a uniform branch on a scalar; its CPU ``addcmul_(grad, grad, value=1 - beta2)`` multiplies
    # ``(1 - beta2) * g`` by g, which stays finite for |g| up to ~5e20 where ``g * g`` overflows from ~1.8e19 (an
    # inf moment never trains again). torch's CUDA addcmul is ``fma(1 - beta2, g * g, v)`` and does overflow there:
    # on every device this kernel keeps the CPU's order.
    param = param * decay
    if one_minus_beta1 >= 0.5:
        new_exp_avg = grad - (grad - exp_avg) * (1.0 - one_minus_beta1)
    else:
        new_exp_avg = exp_avg + one_minus_beta1 * (grad - exp_avg)
    new_exp_avg_sq = exp_avg_sq * beta2 + one_minus_beta2 * grad * grad
    denom = tl.sqrt(new_exp_avg_sq) / bias_correction2_sqrt + eps
    param = param - step_size * (new_exp_avg / denom)

    tl.store(param_ptr + offsets, param, mask=mask)
    tl.store(exp_avg_ptr + offsets, new_exp_avg, mask=mask)
    tl.store(exp_avg_sq_ptr + offsets, new_exp_avg_sq, mask=mask)
    code = tl.load(precision_code_ptr + layer)
    # Uniform branches on the layer's code: fp32 layers skip the rounding arithmetic altogether.
    if code == 1:
        tl.store(bf16_bits_ptr + offsets, _fp32_to_bf16_bits(param, BF16_NAN), mask=mask)
    if code == 2:
        tl.store(fp16_bits_ptr + offsets, _fp32_to_fp16_bits(param, FP16_NAN), mask=mask)

    dot_momentum = tl.sum(grad * exp_avg, axis=0)
    tl.atomic_add(stats_ptr + _DOT_MOMENTUM_ROW * n_layers + layer, dot_momentum, mask=apply, sem="relaxed")
    momentum_sq_sum = tl.sum(new_exp_avg * new_exp_avg, axis=0)
    tl.atomic_add(stats_ptr + _MOMENTUM_SQ_SUM_ROW * n_layers + layer, momentum_sq_sum, mask=apply, sem="relaxed")
    second_moment_sum = tl.sum(new_exp_avg_sq, axis=0)
    tl.atomic_add(stats_ptr + _SECOND_MOMENT_SUM_ROW * n_layers + layer, second_moment_sum, mask=apply, sem="relaxed")


def fused_adamw_step(
    params: torch.Tensor,
    grads: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    bf16_copy: torch.Tensor,
    fp16_copy: torch.Tensor,
    chunk_layer: torch.Tensor,
    lr_factors: torch.Tensor,
    precision_codes: torch.Tensor,
    stats: torch.Tensor,
    step_state: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float | torch.Tensor,
    inv_scale: float | torch.Tensor = 1.0,
    segment_align: int = SEGMENT_ALIGN_ELEMENTS,
    block_size: int | None = None,
    num_warps: int | None = None,
    on_launch: Callable[[], None] | None = None,
) -> None:
    """Applies one AdamW step in place to the flat buffers, or nothing if ``stats`` reports a non-finite grad.

    Runs the Triton kernel on CUDA tensors or under ``TRITON_INTERPRET=1``, else the reference. No host
    sync. Call ``layer_grad_stats`` on the same ``stats`` first: it provides the skip decision.

    Args:
        params: flat float32 master weights, updated in place.
        grads: flat float32 gradients, still multiplied by the loss scale.
        exp_avg: flat float32 first moment, updated in place.
        exp_avg_sq: flat float32 second moment, updated in place.
        bf16_copy: flat bfloat16 buffer; segments of layers with precision code 1 get ``params.to(bf16)``.
        fp16_copy: flat float16 buffer; segments of layers with precision code 2 get ``params.to(fp16)``.
        chunk_layer: int32 ``[len(params) // segment_align]``, the layer owning each segment.
        lr_factors: float32 ``[n_layers]``, per-layer multipliers of ``lr``.
        precision_codes: integer ``[n_layers]``: 0 fp32 (no copy), 1 bf16, 2 fp16 (``PrecisionCode``).
        stats: float32 ``[N_STAT_ROWS, n_layers]`` from ``layer_grad_stats``; this adds the rows
            ``GRAD_DOT_MOMENTUM``, ``MOMENTUM_SQ_SUM`` and ``SECOND_MOMENT_SUM``.
        step_state: float64 ``[4, 1 + n_layers]`` from ``new_step_state``, with ``beta1`` and ``beta2``; the
            model's count and those of the layers taking part (its row 2) advance in place when the step is applied.
        lr: global learning rate (the layer's rate is ``lr * lr_factors[layer]``).
        beta1: first-moment decay in [0, 1).
        beta2: second-moment decay in [0, 1).
        eps: denominator term, > 0.
        weight_decay: decoupled weight decay (the parameter is multiplied by ``1 - layer_lr * weight_decay``): a
            float, or a float32 ``[n_segments]`` tensor on the buffers' device giving each segment its own (see
            ``FlatParameterStore``'s ``groups``).
        inv_scale: loss-scale reciprocal, a float or a one-element float32 tensor on the buffers' device.
        segment_align: elements per segment of the layout.
        block_size: elements per program, a power of two dividing ``segment_align`` (None: the default
            of ``GPU_LAUNCH_CONFIGS``, or one segment under the interpreter).
        num_warps: warps per program on the GPU (None: the default).
        on_launch: called once every argument is checked, right before the first write to a buffer: a fused
            optimizer marks its update as begun there (an error or a Ctrl-C before it moved nothing).
    """
    check_step_buffers(
        params, grads, [exp_avg, exp_avg_sq], bf16_copy, fp16_copy, chunk_layer, lr_factors,
        precision_codes, stats, step_state, segment_align,
    )  # fmt: skip
    block_size, num_warps = launch_config("adamw_step", params, block_size, num_warps, segment_align)
    check_block_size(block_size, segment_align)
    use_triton = _use_triton(params)
    inv_scale_ptr, inv_scale_value, inv_scale_from_ptr = inv_scale_arguments(inv_scale, params)
    decay_ptr, decay_value, decay_per_segment, _ = weight_decay_arguments(weight_decay, params, segment_align)
    bf16_nan, fp16_nan = nan_encodings(params.device)  # a probe, once per device type (a sync on CUDA)
    if on_launch is not None:
        on_launch()
    if not use_triton:
        fused_adamw_step_reference(
            params, grads, exp_avg, exp_avg_sq, bf16_copy, fp16_copy, chunk_layer, lr_factors,
            precision_codes, stats, step_state, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
            weight_decay=weight_decay, inv_scale=inv_scale, segment_align=segment_align,
        )  # fmt: skip
        return
    n_elements = params.numel()
    if n_elements == 0:  # nothing to update; the counts still advance where the step applies, as on the reference path
        advance_step_counts_reference(step_state, stats.view(torch.int32)[StatRow.NONFINITE_TOTAL, 0] == 0)
        return
    step_state[1].copy_(step_state[0])  # the snapshot every program reads (one tiny device copy)
    grid = (n_elements // block_size,)
    _fused_adamw_step_kernel[grid](
        params,
        grads,
        exp_avg,
        exp_avg_sq,
        bf16_copy.view(torch.int16),
        fp16_copy.view(torch.int16),
        chunk_layer,
        lr_factors,
        precision_codes,
        stats,
        stats.view(torch.int32),
        step_state,
        inv_scale_ptr,
        inv_scale_value,
        lr,
        1.0 - beta1,
        beta2,
        1.0 - beta2,
        eps,
        decay_ptr,
        decay_value,
        n_elements,
        lr_factors.numel(),
        DECAY_PER_SEGMENT=decay_per_segment,
        INV_SCALE_FROM_PTR=inv_scale_from_ptr,
        BF16_NAN=bf16_nan,
        FP16_NAN=fp16_nan,
        BLOCKS_PER_SEGMENT=segment_align // block_size,
        BLOCK=block_size,
        num_warps=num_warps,
    )


def fused_adamw_step_reference(
    params: torch.Tensor,
    grads: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    bf16_copy: torch.Tensor,
    fp16_copy: torch.Tensor,
    chunk_layer: torch.Tensor,
    lr_factors: torch.Tensor,
    precision_codes: torch.Tensor,
    stats: torch.Tensor,
    step_state: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float | torch.Tensor,
    inv_scale: float | torch.Tensor = 1.0,
    segment_align: int = SEGMENT_ALIGN_ELEMENTS,
) -> None:
    """Plain-PyTorch ``fused_adamw_step`` (same arguments, same in-place effects), vectorised per segment.

    The skip uses ``torch.where`` on a 0-dim device flag, so it needs no host sync either: when the flag
    says skip, every buffer is rewritten with its own old values, which leaves its bits unchanged.
    """
    check_step_buffers(
        params, grads, [exp_avg, exp_avg_sq], bf16_copy, fp16_copy, chunk_layer, lr_factors,
        precision_codes, stats, step_state, segment_align,
    )  # fmt: skip
    # The kernel path's checks of the two, before the counts move (a float64 tensor passed here and failed there)
    inv_scale_arguments(inv_scale, params)
    weight_decay_arguments(weight_decay, params, segment_align)
    apply = stats.view(torch.int32)[StatRow.NONFINITE_TOTAL, 0] == 0
    layer = chunk_layer.long()

    layer_steps = advance_step_counts_reference(step_state, apply)[layer].unsqueeze(1) + 1.0  # [n_segments, 1]
    log_beta = step_state[3, :2]
    bias_correction1 = (1.0 - torch.exp(layer_steps * log_beta[0])).float()
    bias_correction2_sqrt = (1.0 - torch.exp(layer_steps * log_beta[1])).float().sqrt()

    layer_lr = (lr * lr_factors)[layer].unsqueeze(1)  # [n_segments, 1]
    step_size = layer_lr / bias_correction1
    decay = 1.0 - layer_lr * segment_weight_decay(weight_decay)
    grad = grads.view(-1, segment_align) * inv_scale
    param = params.view(-1, segment_align)
    first = exp_avg.view(-1, segment_align)
    second = exp_avg_sq.view(-1, segment_align)

    new_param = param * decay
    # torch.optim.AdamW's own operations on the CPU, so the same order (see the kernel): lerp exact at its end for a
    # weight >= 0.5, and ``((1 - beta2) * g) * g``, finite where ``g * g`` overflows. The factor goes into the first
    # operand because torch's CUDA addcmul computes ``fma(value, t1 * t2, self)``, and ``g * g`` is what overflows.
    new_first = torch.lerp(first, grad, 1.0 - beta1)
    new_second = torch.addcmul(second * beta2, grad * (1.0 - beta2), grad)
    denom = new_second.sqrt() / bias_correction2_sqrt + eps
    new_param = new_param - step_size * (new_first / denom)

    n_layers = lr_factors.numel()
    zero = torch.zeros((), dtype=torch.float32, device=params.device)
    for row, per_segment in [
        (StatRow.GRAD_DOT_MOMENTUM, (grad * first).sum(dim=1)),
        (StatRow.MOMENTUM_SQ_SUM, (new_first * new_first).sum(dim=1)),
        (StatRow.SECOND_MOMENT_SUM, new_second.sum(dim=1)),
    ]:
        per_layer = torch.zeros(n_layers, dtype=torch.float32, device=params.device).index_add_(0, layer, per_segment)
        stats[row] += torch.where(apply, per_layer, zero)

    write_low_precision_copies_reference(new_param, bf16_copy, fp16_copy, precision_codes[layer], apply)
    param.copy_(torch.where(apply, new_param, param))
    first.copy_(torch.where(apply, new_first, first))
    second.copy_(torch.where(apply, new_second, second))

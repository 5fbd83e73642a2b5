"""Shared constants and the one dispatch rule (Triton kernel or PyTorch reference) of the kernels package."""

from __future__ import annotations

import enum
import math
import os

import torch
import triton
import triton.language as tl

__all__ = [
    "GPU_LAUNCH_CONFIGS",
    "INTERPRETER_BLOCK_SIZE",
    "INTERPRET_AT_IMPORT",
    "N_STAT_ROWS",
    "PARAM_ALIGN_ELEMENTS",
    "SEGMENT_ALIGN_ELEMENTS",
    "PrecisionCode",
    "StatRow",
    "_use_triton",
    "advance_step_counts",
    "advance_step_counts_reference",
    "check_block_size",
    "check_flat_layout",
    "check_step_buffers",
    "inv_scale_arguments",
    "launch_config",
    "log_betas",
    "new_step_state",
    "segment_weight_decay",
    "weight_decay_arguments",
    "write_low_precision_copies_reference",
]

SEGMENT_ALIGN_ELEMENTS = 4096
"""Every layer's segment of the flat buffers starts at a multiple of this many elements and is padded to
one, so a kernel block of ``BLOCK`` elements (``BLOCK`` divides this) always lies inside one layer. The
padding costs up to ``SEGMENT_ALIGN_ELEMENTS - 1`` elements a layer at its end, plus up to
``PARAM_ALIGN_ELEMENTS - 1`` a parameter inside it (each starts aligned), and a whole segment for a layer of
empty parameters or each extra param group of a layer: 0.7 % extra for ResNet-18 with one layer per module
(41 layers), 0.15 % for GPT-2 small (75 layers)."""

PARAM_ALIGN_ELEMENTS = 16
"""Inside a layer segment every parameter starts at a multiple of 16 elements (64 B in fp32, 32 B in the
16-bit copies), which keeps cuBLAS and cuDNN on their aligned fast paths."""

GPU_LAUNCH_CONFIGS = {
    "grad_stats": (4096, 4),
    "adamw_step": (1024, 4),
    "sgd_step": (2048, 4),
    "cast": (4096, 8),
}
"""Default ``(block_size, num_warps)`` of each kernel on a GPU, measured on an H200 (triton 3.6) with GPT-2
small shapes (124M elements). The statistics pass wants big blocks: its per-block atomics all land on a few
addresses per layer and serialise (1024-element blocks made it 1.9x slower). The AdamW update wants small
ones: 1024 elements with 4 warps reached 4.1 TB/s against 3.3 TB/s with 4096 and 8 warps (more programs in
flight per multiprocessor hide the latency of the per-program scalar loads and atomics). SGD is flat in
between."""

INTERPRETER_BLOCK_SIZE = SEGMENT_ALIGN_ELEMENTS
"""Block size of every kernel under ``TRITON_INTERPRET=1``, where each program costs about a millisecond of
Python whatever its size: one program per segment keeps the CPU tests fast."""

INTERPRET_AT_IMPORT = os.environ.get("TRITON_INTERPRET", "0") == "1" and type(tl.sum).__name__ != "JITFunction"
"""Whether the kernels can run on Triton's CPU interpreter. ``triton.jit`` reads ``TRITON_INTERPRET`` when a
function is defined, Triton's own helpers (``tl.sum``) included, so it must be set before ``triton`` is
first imported; otherwise ``tl.sum`` is a compiled-mode ``JITFunction`` and the interpreter cannot call it."""


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
    """Sum of ``m_new**2``, the updated momentum buffer or first moment. 0 when the step was skipped. For a layer
    that sat the step out (no parameter of it got a gradient: ``FlatParameterStore.take_params_without_grad``) the
    kernel's update is put back afterwards but this row (and ``SECOND_MOMENT_SUM``) keeps what it computed."""
    SECOND_MOMENT_SUM = 6
    """AdamW only: sum of ``v_new``, the updated second moment. With the first moment, the per-layer
    gradient variance is ``sum(v_hat) - sum(m_hat**2)`` (bias-corrected by ``1 - beta**step``).
    0 for SGD and when the step was skipped."""
    NONFINITE_TOTAL = 7
    """int32, column 0 only: non-finite gradient elements over all layers; the update kernels skip the
    step when it is not 0."""


N_STAT_ROWS = len(StatRow)


def require(condition: bool, message: str) -> None:
    """Raises a ``ValueError`` with ``message`` unless ``condition``: the kernels' argument checks.

    They were ``assert`` statements, which ``python -O`` strips: a strided input then gave silently wrong values.
    """
    if not condition:
        raise ValueError(message)


def check_block_size(block_size: int, segment_align: int) -> None:
    """Raises ``ValueError`` unless ``block_size`` is a power of two that divides ``segment_align``."""
    if block_size <= 0 or block_size & (block_size - 1) or segment_align % block_size:
        raise ValueError(
            f"block_size must be a power of two dividing the segment alignment {segment_align}, got {block_size}"
        )


def new_step_state(
    device: torch.device | str, beta1: float = 0.0, beta2: float = 0.0, *, n_layers: int
) -> torch.Tensor:
    """Makes the device-side step counters of a fused optimizer: float64, shape ``[4, 1 + n_layers]``.

    Column 0 counts the model's applied steps; column ``1 + l`` counts layer ``l``'s, which a step advances
    only where the layer took part (``torch.optim`` keeps a count a parameter and skips a parameter whose
    gradient is ``None``, so AdamW's bias corrections and SGD's first momentum buffer follow each one's own
    count). The rows:

    - 0: the live counts. Program 0 alone writes column 0, the first program of each layer that layer's column.
    - 1: a snapshot of row 0 that the step wrappers take (one tiny copy) before the update launch and every
      program reads, so no program reads a count another one is advancing.
    - 2: 1 where layer ``l`` takes the next step, 0 where it sits out (column 0 is unused, 1).
    - 3: ``(log(beta1), log(beta2), 0, ...)``: AdamW's bias corrections are ``1 - exp(steps * log(beta))``,
      ``torch.optim``'s ``1 - beta**steps`` at the current betas; float64 here because Triton passes Python
      floats as float32.

    Args:
        device: where the optimizer state lives.
        beta1: AdamW's first-moment decay (0 for SGD).
        beta2: AdamW's second-moment decay (0 for SGD).
        n_layers: layers of the store, >= 1.

    Returns:
        The zero-step state: no steps counted, every layer taking part.
    """
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    state = torch.zeros(4, 1 + n_layers, dtype=torch.float64)
    state[2] = 1.0
    state[3, :2] = torch.tensor(log_betas(beta1, beta2), dtype=torch.float64)
    return state.to(device)


def advance_step_counts_reference(step_state: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """The reference paths' count update: row 0 into the snapshot row 1, then row 0 advanced where the step applies.

    Args:
        step_state: float64 ``[4, 1 + n_layers]`` from ``new_step_state``.
        apply: 0-dim bool, False when the step is skipped (then no count moves).

    Returns:
        float64 ``[n_layers]``: each layer's count before this step (a view of the snapshot).
    """
    step_state[1].copy_(step_state[0])
    before = step_state[1]
    step_state[0] = torch.where(apply & (step_state[2] != 0.0), before + 1.0, before)  # row 2's column 0 is 1
    return before[1:]


def log_betas(beta1: float, beta2: float) -> tuple[float, float]:
    """``(log(beta1), log(beta2))``, ``-inf`` for a beta of 0 (whose powers are all 0): row 3 of the step state.

    Raises:
        ValueError: a beta is outside [0, 1) (a beta of 1 would make the bias corrections divide by 0).
    """
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {beta}")
    log1, log2 = (math.log(beta) if beta > 0.0 else -math.inf for beta in (beta1, beta2))
    return log1, log2


@triton.jit
def advance_step_counts(
    step_state_ptr, chunk_layer_ptr, pid, segment, layer, apply, n_layers, BLOCKS_PER_SEGMENT: tl.constexpr
):
    """The update kernels' count update (layout in ``new_step_state``); returns the layer's count before this step.

    Every program reads the snapshot row 1; program 0 alone writes the model's count, the first program of each layer
    that layer's (where row 2 says the layer takes part), so no two programs race.
    """
    width = n_layers + 1
    steps = tl.load(step_state_ptr + width)
    layer_steps = tl.load(step_state_ptr + width + 1 + layer)
    takes_part = tl.load(step_state_ptr + 2 * width + 1 + layer) != 0.0
    previous_layer = tl.load(chunk_layer_ptr + tl.maximum(segment - 1, 0))
    is_layer_writer = (pid % BLOCKS_PER_SEGMENT == 0) & ((segment == 0) | (previous_layer != layer))
    tl.store(step_state_ptr, tl.where(apply, steps + 1.0, steps), mask=pid == 0)
    advance = apply & takes_part
    tl.store(step_state_ptr + 1 + layer, tl.where(advance, layer_steps + 1.0, layer_steps), mask=is_layer_writer)
    return layer_steps


def launch_config(
    kernel: str,
    tensor: torch.Tensor,
    block_size: int | None,
    num_warps: int | None,
    segment_align: int | None = None,
) -> tuple[int, int]:
    """Resolves a kernel's ``(block_size, num_warps)``: the caller's values, else the defaults for the backend.

    Args:
        kernel: a key of ``GPU_LAUNCH_CONFIGS``.
        tensor: a tensor the kernel works on (CUDA: GPU defaults; CPU: the interpreter's).
        block_size: elements per program, or None for the default.
        num_warps: warps per program, or None for the default.
        segment_align: the layout's segment, which a block must divide: the default block is capped at the
            largest power of two dividing it (a store of 64-element segments could not step at the default 4096).
    """
    default_block, default_warps = GPU_LAUNCH_CONFIGS[kernel] if tensor.is_cuda else (INTERPRETER_BLOCK_SIZE, 4)
    if segment_align is not None and segment_align > 0:
        default_block = min(default_block, segment_align & -segment_align)
    return (default_block if block_size is None else block_size, default_warps if num_warps is None else num_warps)


def check_flat_layout(grads: torch.Tensor, chunk_layer: torch.Tensor, n_layers: int, segment_align: int) -> None:
    """Asserts the flat-buffer contract of the kernels: fp32 flat grads in whole segments, int32 chunk table."""
    require(grads.dtype == torch.float32, f"grads must be float32, got {grads.dtype}")
    require(grads.dim() == 1 and grads.is_contiguous(), "grads must be a flat contiguous buffer")
    require(
        grads.numel() % segment_align == 0,
        f"flat length {grads.numel()} is not a multiple of the segment alignment {segment_align}",
    )
    require(chunk_layer.dtype == torch.int32 and chunk_layer.is_contiguous(), "chunk_layer must be int32")
    require(
        chunk_layer.numel() == grads.numel() // segment_align,
        f"chunk_layer has {chunk_layer.numel()} entries, the buffer {grads.numel() // segment_align} segments",
    )
    require(chunk_layer.device == grads.device, f"chunk_layer is on {chunk_layer.device}, grads on {grads.device}")
    require(n_layers >= 1, f"n_layers must be >= 1, got {n_layers}")


def check_step_buffers(
    params: torch.Tensor,
    grads: torch.Tensor,
    states: list[torch.Tensor],
    bf16_copy: torch.Tensor,
    fp16_copy: torch.Tensor,
    chunk_layer: torch.Tensor,
    lr_factors: torch.Tensor,
    precision_codes: torch.Tensor,
    stats: torch.Tensor,
    step_state: torch.Tensor,
    segment_align: int,
) -> int:
    """Asserts the contract of a fused optimizer step's buffers and returns the number of layers."""
    n_layers = lr_factors.numel()
    check_flat_layout(grads, chunk_layer, n_layers, segment_align)
    for name, tensor in [("params", params), *((f"state {i}", s) for i, s in enumerate(states))]:
        require(tensor.dtype == torch.float32, f"{name} must be float32, got {tensor.dtype}")
        require(tensor.shape == grads.shape and tensor.is_contiguous(), f"{name} must match grads' flat shape")
        require(tensor.device == grads.device, f"{name} is on {tensor.device}, grads on {grads.device}")
    for name, tensor, dtype in [("bf16_copy", bf16_copy, torch.bfloat16), ("fp16_copy", fp16_copy, torch.float16)]:
        require(tensor.dtype == dtype, f"{name} must be {dtype}, got {tensor.dtype}")
        require(tensor.shape == grads.shape and tensor.is_contiguous(), f"{name} must match grads' flat shape")
        require(tensor.device == grads.device, f"{name} is on {tensor.device}, grads on {grads.device}")
    # The kernels write params, the states and the copies element by element: a buffer sharing memory with another
    # would take both writes (the copies may share one buffer: a layer's segment holds one type's bits).
    flat = [("params", params), ("grads", grads), *((f"state {i}", s) for i, s in enumerate(states))]
    for i, (name, tensor) in enumerate([*flat, ("bf16_copy", bf16_copy), ("fp16_copy", fp16_copy)]):
        for other_name, other in flat[:i]:
            require(not _overlap(tensor, other), f"{name} shares memory with {other_name}: each needs its own buffer")
    require(
        bf16_copy.data_ptr() == fp16_copy.data_ptr() or not _overlap(bf16_copy, fp16_copy),
        "bf16_copy and fp16_copy overlap without being one buffer",
    )
    require(lr_factors.dtype == torch.float32 and lr_factors.dim() == 1, "lr_factors must be float32 [n_layers]")
    require(
        precision_codes.shape == (n_layers,),
        f"precision_codes must have shape [{n_layers}], got {tuple(precision_codes.shape)}",
    )
    require(
        not precision_codes.is_floating_point() and precision_codes.dtype != torch.bool,
        f"precision_codes must be an integer tensor, got {precision_codes.dtype}",
    )
    require(
        stats.shape == (N_STAT_ROWS, n_layers) and stats.dtype == torch.float32,
        f"stats must be float32 [{N_STAT_ROWS}, {n_layers}], got {stats.dtype} {tuple(stats.shape)}",
    )
    require(
        step_state.shape == (4, 1 + n_layers) and step_state.dtype == torch.float64,
        f"step_state must be float64 [4, {1 + n_layers}] (new_step_state), got {step_state.dtype} "
        f"{tuple(step_state.shape)}",
    )
    for name, tensor in [
        ("lr_factors", lr_factors),
        ("precision_codes", precision_codes),
        ("stats", stats),
        ("step_state", step_state),
    ]:
        require(tensor.device == grads.device, f"{name} is on {tensor.device}, grads on {grads.device}")
        require(tensor.is_contiguous(), f"{name} must be contiguous")
    return n_layers


def inv_scale_arguments(inv_scale: float | torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, float, bool]:
    """Splits a loss-scale reciprocal into the kernels' ``(inv_scale_ptr, inv_scale_value, FROM_PTR)``.

    A device tensor (e.g. ``1 / GradScaler.get_scale()`` kept on the GPU) is read by the kernel, so no
    host sync is needed; a Python float is passed by value and ``like`` stands in as the unused pointer.

    Args:
        inv_scale: multiplier that unscales the gradients, a float or a one-element float32 tensor.
        like: a tensor on the kernel's device.

    Returns:
        The pointer argument, the value argument and whether the kernel reads the pointer.
    """
    if isinstance(inv_scale, torch.Tensor):
        require(inv_scale.numel() == 1, f"inv_scale tensor must have one element, got {inv_scale.numel()}")
        require(inv_scale.dtype == torch.float32, f"inv_scale tensor must be float32, got {inv_scale.dtype}")
        require(inv_scale.device == like.device, f"inv_scale is on {inv_scale.device}, buffers on {like.device}")
        return inv_scale, 1.0, True
    return like, float(inv_scale), False


def weight_decay_arguments(
    weight_decay: float | torch.Tensor, like: torch.Tensor, segment_align: int
) -> tuple[torch.Tensor, float, bool, bool]:
    """Splits a weight decay into the kernels' ``(weight_decay_ptr, weight_decay_value, PER_SEGMENT, USE)``.

    A float applies to every element; a float32 ``[n_segments]`` tensor on the buffers' device gives each
    segment its own (``FlatParameterStore(groups=...)`` puts parameters of different decay in different
    segments), read by the kernel once per program. ``USE`` is False when no element decays (a tensor counts
    as decaying: reading it on the host would sync).

    Args:
        weight_decay: the decay, a float or a float32 ``[len(like) // segment_align]`` tensor.
        like: a flat buffer of the step, on the kernel's device.
        segment_align: elements per segment of the layout.

    Returns:
        The pointer argument, the value argument, whether the kernel reads the pointer, and whether it decays.
    """
    if isinstance(weight_decay, torch.Tensor):
        n_segments = like.numel() // segment_align
        require(
            weight_decay.shape == (n_segments,),
            f"a weight_decay tensor must have one entry a segment ({n_segments}), got {tuple(weight_decay.shape)}",
        )
        require(weight_decay.dtype == torch.float32, f"weight_decay tensor must be float32, got {weight_decay.dtype}")
        require(
            weight_decay.device == like.device, f"weight_decay is on {weight_decay.device}, buffers on {like.device}"
        )
        require(weight_decay.is_contiguous(), "weight_decay tensor must be contiguous")
        return weight_decay, 0.0, True, True
    return like, float(weight_decay), False, float(weight_decay) != 0.0


def segment_weight_decay(weight_decay: float | torch.Tensor) -> float | torch.Tensor:
    """The reference paths' weight decay: a float as is, a per-segment tensor as a ``[n_segments, 1]`` column."""
    return weight_decay.unsqueeze(1) if isinstance(weight_decay, torch.Tensor) else weight_decay


def write_low_precision_copies_reference(
    new_param: torch.Tensor,
    bf16_copy: torch.Tensor,
    fp16_copy: torch.Tensor,
    segment_codes: torch.Tensor,
    apply: torch.Tensor,
) -> None:
    """Reference for the copy part of the fused steps: rounds ``new_param`` into the requested copies.

    Args:
        new_param: updated fp32 weights viewed as ``[n_segments, segment_align]``.
        bf16_copy: flat bfloat16 copy buffer; segments with code ``BF16`` are written.
        fp16_copy: flat float16 copy buffer; segments with code ``FP16`` are written.
        segment_codes: ``[n_segments]`` precision code of each segment's layer.
        apply: 0-dim bool, False when the step is skipped (then nothing changes).
    """
    for buffer, code, dtype in [
        (bf16_copy, PrecisionCode.BF16, torch.bfloat16),
        (fp16_copy, PrecisionCode.FP16, torch.float16),
    ]:
        segments = buffer.view(new_param.shape)
        write = apply & (segment_codes == int(code)).unsqueeze(1)
        segments.copy_(torch.where(write, new_param.to(dtype), segments))


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two contiguous tensors share any byte of memory."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    a_start, b_start = a.data_ptr(), b.data_ptr()
    return a_start < b_start + b.numel() * b.element_size() and b_start < a_start + a.numel() * a.element_size()


def _use_triton(tensor: torch.Tensor) -> bool:
    """Whether to run the Triton kernel (True) or the PyTorch reference (False) on ``tensor``.

    Triton for CUDA tensors, and for any tensor when ``TRITON_INTERPRET=1`` (Triton's CPU interpreter);
    otherwise the vectorised PyTorch reference, so the package works on a CPU-only machine.

    Raises:
        RuntimeError: ``TRITON_INTERPRET=1`` is set now but was not when triton or this package was
            imported, so the kernels were built for a GPU and cannot run on the interpreter.
    """
    if tensor.is_cuda:
        return True
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        if not INTERPRET_AT_IMPORT:
            raise RuntimeError(
                "TRITON_INTERPRET=1 was set after triton or triaccel_rl.kernels was imported; set it before "
                "the first import of either (triton.jit reads it when a function is defined)"
            )
        return True
    return False

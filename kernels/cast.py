"""fp32 → bf16/fp16 cast with round-to-nearest-even done in integer arithmetic, bit-identical to ``Tensor.to``.

The rounding is written out on the fp32 bit pattern instead of using Triton's float cast, for two reasons:
Triton's CPU interpreter truncates fp32 → bf16 instead of rounding, and an explicit rule is the same on
every backend. Inf, denormals, fp16 overflow to inf and negative zero follow IEEE 754 round-to-nearest-even,
as PyTorch does. NaN is the one case where PyTorch itself differs between backends (a CPU with AVX2/AVX-512
writes bf16 NaN as ``0xFFFF``, without them ``0x7FC0``, CUDA its own canonical NaN), so the NaN encoding
each device's ``Tensor.to`` produces is probed once per device type (a host sync, once per process) and
passed to the kernels as a compile-time constant. The ``@triton.jit`` helpers ``_fp32_to_bf16_bits`` and
``_fp32_to_fp16_bits`` are shared with the fused optimizer kernels.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triaccel_rl.kernels._common import _use_triton, launch_config, require

__all__ = [
    "NAN_KEEPS_PAYLOAD",
    "cast_to_low_precision",
    "cast_to_low_precision_reference",
    "nan_encodings",
]

NAN_KEEPS_PAYLOAD = -1
"""NaN encoding code: the result keeps the input's sign and top payload bits and sets the quiet bit
(x86 F16C and AVX-512 behaviour); any other code is the fixed 16-bit pattern every NaN becomes."""

_LOW_PRECISION_DTYPES = (torch.bfloat16, torch.float16)


@triton.jit
def _cast_to_low_precision_kernel(
    x_ptr,
    out_bits_ptr,
    n_elements,
    TO_BF16: tl.constexpr,
    NAN_BITS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Rounds ``BLOCK`` fp32 elements of ``x`` to bf16 or fp16, storing the 16-bit patterns as int16."""
    pid = tl.program_id(0)
    offsets = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    if TO_BF16:
        bits = _fp32_to_bf16_bits(x, NAN_BITS)
    else:
        bits = _fp32_to_fp16_bits(x, NAN_BITS)
    tl.store(out_bits_ptr + offsets, bits, mask=mask)


def cast_to_low_precision(
    x: torch.Tensor,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
    *,
    block_size: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Rounds an fp32 tensor to bf16 or fp16, bit-identical to ``x.to(dtype)`` on the same device.

    (One exception, under Triton's interpreter only: a 0-dim NaN, which PyTorch's scalar path on the CPU encodes
    otherwise than its vectorised one, ``0x7fc0`` against ``0xffff`` in bf16; the kernel follows the vectorised one.)

    Runs the Triton kernel on CUDA tensors or under ``TRITON_INTERPRET=1``, else the reference.

    Args:
        x: contiguous float32 tensor, any shape.
        dtype: ``torch.bfloat16`` or ``torch.float16``.
        out: optional contiguous tensor of ``x``'s shape, dtype and device to write into.
        block_size: elements per program, a power of two (None: the backend's default).
        num_warps: warps per program on the GPU (None: the default).

    Returns:
        ``out`` (or a new tensor) holding ``x`` rounded to nearest even.

    Raises:
        ValueError: ``x`` is not a contiguous float32 tensor, ``dtype`` not a 16-bit type, ``out`` not of ``x``'s
            shape, ``dtype`` and device or not contiguous, or ``block_size`` not a power of two.

    Example:
        >>> x = torch.tensor([1.0, 1.00390625, -0.0, float("inf")])
        >>> cast_to_low_precision(x, torch.bfloat16).tolist()
        [1.0, 1.0, -0.0, inf]
    """
    require(x.dtype == torch.float32, f"x must be float32, got {x.dtype}")
    require(x.is_contiguous(), "x must be contiguous")
    require(dtype in _LOW_PRECISION_DTYPES, f"dtype must be bfloat16 or float16, got {dtype}")
    if block_size is not None and (block_size <= 0 or block_size & (block_size - 1)):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    if out is None:
        out = torch.empty_like(x, dtype=dtype)
    require(out.shape == x.shape, f"out has shape {tuple(out.shape)}, x has {tuple(x.shape)}")
    require(
        out.dtype == dtype and out.device == x.device and out.is_contiguous(),
        f"out must be a contiguous {dtype} tensor on {x.device}",
    )
    if not _use_triton(x):
        out.copy_(cast_to_low_precision_reference(x, dtype))
        return out
    n_elements = x.numel()
    if n_elements == 0:
        return out
    block_size, num_warps = launch_config("cast", x, block_size, num_warps)
    bf16_nan, fp16_nan = nan_encodings(x.device)
    grid = (triton.cdiv(n_elements, block_size),)
    _cast_to_low_precision_kernel[grid](
        x,
        out.view(torch.int16),
        n_elements,
        TO_BF16=dtype == torch.bfloat16,
        NAN_BITS=bf16_nan if dtype == torch.bfloat16 else fp16_nan,
        BLOCK=block_size,
        num_warps=num_warps,
    )
    return out


def cast_to_low_precision_reference(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The specification of ``cast_to_low_precision``: PyTorch's own ``x.to(dtype)``."""
    return x.to(dtype)


def nan_encodings(device: torch.device | str) -> tuple[int, int]:
    """How ``Tensor.to`` on ``device``'s type writes NaN in bf16 and fp16, as kernel NaN codes.

    Probes PyTorch once per device type with NaNs of both signs and several payloads (on CUDA this is a
    host sync, once per process) and returns, for bf16 and then fp16, either ``NAN_KEEPS_PAYLOAD`` or the
    fixed 16-bit pattern every NaN becomes.
    """
    return _probe_nan_encodings(torch.device(device).type)


@functools.cache
def _probe_nan_encodings(device_type: str) -> tuple[int, int]:
    """Cached body of ``nan_encodings``, keyed by device type ("cpu", "cuda")."""
    patterns = [0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FA00000, 0xFFFFFFFF, 0x7FC12345, 0xFF812345]
    # 1-D and several vectors long, so PyTorch takes the same (vectorised) path as for real tensors;
    # a 0-dim tensor takes a scalar path that on CPU can encode NaN differently.
    signed = [p - (1 << 32) if p >= 1 << 31 else p for p in patterns] * 8
    bits = torch.tensor(signed, dtype=torch.int32, device=device_type)
    x = bits.view(torch.float32)
    encodings = []
    for dtype, keep_payload in (
        (torch.bfloat16, _bf16_nan_keeping_payload),
        (torch.float16, _fp16_nan_keeping_payload),
    ):
        got = [v & 0xFFFF for v in x.to(dtype).view(torch.int16).tolist()]  # host sync, once per process
        if all(g == keep_payload(p) for g, p in zip(got, patterns * 8, strict=True)):
            encodings.append(NAN_KEEPS_PAYLOAD)
        elif len(set(got)) == 1:
            encodings.append(got[0])
        else:
            # An encoding this module does not model; keep the payload, which at least preserves sign.
            encodings.append(NAN_KEEPS_PAYLOAD)
    return encodings[0], encodings[1]


def _bf16_nan_keeping_payload(bits: int) -> int:
    """bf16 pattern of the fp32 NaN ``bits`` when sign and top payload bits are kept, quiet bit set."""
    return (bits >> 16) | 0x0040


def _fp16_nan_keeping_payload(bits: int) -> int:
    """fp16 pattern of the fp32 NaN ``bits`` when sign and top payload bits are kept, quiet bit set."""
    return ((bits >> 16) & 0x8000) | 0x7E00 | ((bits >> 13) & 0x3FF)


@triton.jit
def _fp32_to_bf16_bits(x, NAN_BITS: tl.constexpr):
    """bf16 bit patterns (as int16) of fp32 ``x``, rounded to nearest even; NaN per ``NAN_BITS``."""
    bits = x.to(tl.uint32, bitcast=True)
    # Adding 0x7FFF plus the lowest kept bit rounds the 16 dropped bits to nearest even; a carry into the
    # exponent is the correct result, including the overflow of the largest finite values to inf.
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
    if NAN_BITS < 0:
        nan = (bits >> 16) | 0x0040
    else:
        nan = tl.full(x.shape, NAN_BITS, tl.uint32)
    result = tl.where(is_nan, nan, rounded)
    return result.to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def _fp32_to_fp16_bits(x, NAN_BITS: tl.constexpr):
    """fp16 bit patterns (as int16) of fp32 ``x``, rounded to nearest even; NaN per ``NAN_BITS``."""
    bits = x.to(tl.uint32, bitcast=True)
    sign = (bits >> 16) & 0x8000
    magnitude = bits & 0x7FFFFFFF
    # Normal fp16 (|x| >= 2**-14): rebias the exponent (127 - 15 = 112, i.e. 0x38000000) and round the 13
    # dropped mantissa bits to nearest even; a carry into the exponent is correct, up to inf at 65520.
    normal = (magnitude - 0x38000000 + 0xFFF + ((magnitude >> 13) & 1)) >> 13
    # Subnormal fp16 (|x| < 2**-14): the value is mantissa * 2**(exponent - 150) and the fp16 unit is
    # 2**-24, so shift the 24-bit mantissa right by 126 - exponent (>= 14 here) and round to nearest even.
    # The shift is clamped to [1, 31] (shifts of 32 or more are undefined); lanes outside this range use
    # another branch, and fp32 denormals (exponent 0) round to 0 either way.
    exponent = (magnitude >> 23).to(tl.int32)
    shift = tl.minimum(tl.maximum(126 - exponent, 1), 31).to(tl.uint32)
    mantissa = (magnitude & 0x7FFFFF) | 0x800000
    quotient = mantissa >> shift
    remainder = mantissa - (quotient << shift)
    half = tl.full(x.shape, 1, tl.uint32) << (shift - 1)
    round_up = (remainder > half) | ((remainder == half) & ((quotient & 1) == 1))
    subnormal = quotient + round_up.to(tl.uint32)
    finite = tl.where(magnitude >= 0x38800000, normal, subnormal)
    finite = tl.where(magnitude >= 0x477FF000, 0x7C00, finite)  # rounds to or past 65536: inf
    result = sign | finite
    is_nan = magnitude > 0x7F800000
    if NAN_BITS < 0:
        nan = sign | 0x7E00 | ((magnitude >> 13) & 0x3FF)
    else:
        nan = tl.full(x.shape, NAN_BITS, tl.uint32)
    result = tl.where(is_nan, nan, result)
    return result.to(tl.uint16).to(tl.int16, bitcast=True)

"""cast_to_low_precision is bit-identical to Tensor.to(dtype) for special, random and awkward-sized inputs."""

from __future__ import annotations

import pytest
import torch
from _kernel_helpers import assert_bits_equal
from triaccel_rl.kernels import cast_to_low_precision

LOW_PRECISION = [torch.bfloat16, torch.float16]


def _from_bits(bits: list[int]) -> torch.Tensor:
    """fp32 tensor with the given unsigned 32-bit patterns."""
    signed = [b - (1 << 32) if b >= 1 << 31 else b for b in bits]
    return torch.tensor(signed, dtype=torch.int32).view(torch.float32)


def _special_values() -> torch.Tensor:
    """Zeros, denormals, rounding ties, overflow boundaries, infinities and NaNs of both signs."""
    values = [
        0.0, 1.0, 0.1, 1 / 3, 2.0**-126, 2.0**-149, 2.0**-127 * 1.5,  # fp32 min normal, denormals
        2.0**-24, 2.0**-25, 3 * 2.0**-25, 2.0**-25 * (1 + 2.0**-20), 2.0**-26,  # fp16 subnormal ties
        2.0**-14, 2.0**-14 * (1 - 2.0**-12), 2.0**-15 * 1.5, 6.1e-5, 1e-7, 1e-8,  # fp16 normal/subnormal edge
        65504.0, 65519.0, 65519.99, 65520.0, 65536.0, 1e5,  # fp16 max, round-to-inf boundary
        1 + 2.0**-8, 1 + 3 * 2.0**-8, 1 + 2.0**-8 + 2.0**-20, 1 + 2.0**-11, 1 + 3 * 2.0**-11,  # ties
        3.3895313892515355e38, 3.3961e38, 3.4028234663852886e38,  # bf16 max, round-to-inf in bf16
        float("inf"),
    ]  # fmt: skip
    positive = torch.tensor(values, dtype=torch.float32)
    nans = _from_bits([0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FA00000, 0xFFFFFFFF, 0x7FC12345, 0xFF812345])
    return torch.cat([positive, -positive, nans])


def _random_values(n: int, seed: int) -> torch.Tensor:
    """Uniformly random bit patterns (every class of fp32) and normal values across many exponents."""
    generator = torch.Generator().manual_seed(seed)
    bits = torch.randint(-(2**31), 2**31, (n,), generator=generator, dtype=torch.int64).to(torch.int32)
    exponents = torch.randint(-30, 20, (n,), generator=generator).float()
    scaled = torch.randn(n, generator=generator) * torch.exp2(exponents)
    return torch.cat([bits.view(torch.float32), scaled])


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_special_values_bit_exact(device: str, dtype: torch.dtype) -> None:
    x = _special_values().to(device)
    assert_bits_equal(cast_to_low_precision(x, dtype), x.to(dtype), f"cast to {dtype} of special values")


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_random_values_bit_exact(device: str, dtype: torch.dtype) -> None:
    x = _random_values(60_000, seed=1).to(device)
    assert_bits_equal(cast_to_low_precision(x, dtype), x.to(dtype), f"cast to {dtype} of random values")


@pytest.mark.parametrize("n_elements", [1, 7, 4095, 4097, 3 * 4096 + 5])
def test_awkward_sizes_and_out_argument(device: str, n_elements: int) -> None:
    x = _random_values(n_elements, seed=n_elements)[:n_elements].to(device).view(1, n_elements)
    for dtype in LOW_PRECISION:
        out = torch.full_like(x, 7.0, dtype=dtype)
        result = cast_to_low_precision(x, dtype, out=out)
        assert result is out
        assert_bits_equal(out, x.to(dtype), f"cast to {dtype}, {n_elements} elements")


def test_small_block_size(device: str) -> None:
    x = _random_values(3000, seed=3).to(device)
    for dtype in LOW_PRECISION:
        got = cast_to_low_precision(x, dtype, block_size=1024)
        assert_bits_equal(got, x.to(dtype), f"cast to {dtype} with block_size 1024")


@pytest.mark.usefixtures("reference_path")
def test_cpu_reference_path_bit_exact() -> None:
    x = torch.cat([_special_values(), _random_values(1000, seed=4)])
    for dtype in LOW_PRECISION:
        assert_bits_equal(cast_to_low_precision(x, dtype), x.to(dtype), f"reference path cast to {dtype}")


def test_rejects_wrong_inputs() -> None:
    with pytest.raises(ValueError, match="float32"):  # ValueErrors: asserts go under python -O
        cast_to_low_precision(torch.zeros(4, dtype=torch.float64), torch.bfloat16)
    with pytest.raises(ValueError, match="contiguous"):
        cast_to_low_precision(torch.zeros(4, 4).t(), torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        cast_to_low_precision(torch.zeros(4), torch.float32)


@pytest.mark.parametrize("block_size", [0, 3, -4])
def test_rejects_a_block_size_not_a_power_of_two(block_size: int) -> None:
    """Before the fix: ZeroDivisionError for 0, the interpreter's "arange's range must be a power of 2" for 3."""
    with pytest.raises(ValueError, match=f"block_size must be a power of two, got {block_size}"):
        cast_to_low_precision(torch.zeros(10), torch.bfloat16, block_size=block_size)

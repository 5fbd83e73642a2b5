"""Helpers shared by the kernel tests: model-like parameter layouts and bit-exact comparisons."""

from __future__ import annotations

import torch
from triaccel_rl.kernels import FlatParameterStore

# Tolerance of the fused optimizers against torch.optim after many steps, and of float sums (float32
# arithmetic in another order); maxima, counts and low-precision copies are compared exactly.
PARAM_RTOL = 1e-5
PARAM_ATOL = 1e-6
SUM_RTOL = 1e-5


def make_layers(shapes: list[list[tuple[int, ...]]], device: str, seed: int = 0) -> list[list[torch.nn.Parameter]]:
    """One list of random float32 parameters per layer, with the given shapes."""
    generator = torch.Generator().manual_seed(seed)
    return [
        [torch.nn.Parameter(torch.randn(shape, generator=generator).to(device)) for shape in layer] for layer in shapes
    ]


def clone_layers(layers: list[list[torch.nn.Parameter]]) -> list[list[torch.nn.Parameter]]:
    """Independent copies of ``layers`` (for a reference optimizer)."""
    return [[torch.nn.Parameter(p.detach().clone()) for p in layer] for layer in layers]


def fill_grads(store: FlatParameterStore, generator: torch.Generator, scale: float = 1.0) -> list[torch.Tensor]:
    """Writes random gradients times ``scale`` into the store's param.grad views; returns the unscaled ones."""
    unscaled = []
    for layer in store.layers:
        for p in layer:
            g = torch.randn(p.shape, generator=generator).to(p.device)
            assert p.grad is not None
            p.grad.copy_(g * scale)
            unscaled.append(g)
    return unscaled


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Asserts two 16- or 32-bit float tensors have identical bit patterns, printing the first mismatches."""
    int_dtype = torch.int16 if actual.element_size() == 2 else torch.int32
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    a = actual.contiguous().view(int_dtype)
    e = expected.contiguous().view(int_dtype)
    bad = (a != e).nonzero().flatten()
    if bad.numel():
        mask = (1 << (8 * actual.element_size())) - 1
        first = [(int(i), hex(int(a[i]) & mask), hex(int(e[i]) & mask)) for i in bad[:5].tolist()]
        raise AssertionError(f"{what}: {bad.numel()} of {a.numel()} elements differ (index, got, want): {first}")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Asserts |actual - expected| <= PARAM_ATOL + PARAM_RTOL * |expected| everywhere, printing the worst error."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    abs_err = (a - e).abs()
    allowed = PARAM_ATOL + PARAM_RTOL * e.abs()
    worst = int((abs_err / allowed).argmax()) if a.numel() else 0
    if a.numel() and not bool((abs_err <= allowed).all()):
        got, want = float(a.flatten()[worst]), float(e.flatten()[worst])
        raise AssertionError(
            f"{what}: max abs err {float(abs_err.max()):.3g}; worst element {worst}: got {got!r}, want {want!r}, "
            f"err {abs(got - want):.3g} > atol {PARAM_ATOL} + rtol {PARAM_RTOL} * |want|"
        )

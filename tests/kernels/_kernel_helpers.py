"""Helpers shared by the kernel tests: model-like parameter layouts and bit-exact comparisons."""

from __future__ import annotations

import torch
from triaccel_rl.kernels import FlatParameterStore, StatRow

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
    a = actual.contiguous().view(int_dtype).flatten()
    e = expected.contiguous().view(int_dtype).flatten()
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


def assert_stats_close(
    got: torch.Tensor,
    want: torch.Tensor,
    store: FlatParameterStore,
    grads: torch.Tensor,
    inv_scale: float,
    momentum_before: torch.Tensor | None,
    what: str,
) -> None:
    """Compares two statistics buffers: counts and maxima exactly, float sums within SUM_RTOL * sum(|terms|).

    A float32 sum in another order can differ by a few ulps of the sum of the absolute terms, not of the
    (possibly cancelling) sum itself, so that is the scale of the tolerance.
    """
    bits_got, bits_want = got.view(torch.int32), want.view(torch.int32)
    for row in (StatRow.GRAD_NONFINITE, StatRow.NONFINITE_TOTAL, StatRow.GRAD_ABS_MAX):
        assert torch.equal(bits_got[row], bits_want[row]), f"{what}: {row.name} {got[row]} != {want[row]}"
    layer = store.chunk_layer.long()

    def per_layer(values: torch.Tensor) -> torch.Tensor:
        segments = values.double().view(-1, store.segment_align).sum(dim=1)
        return torch.zeros(store.n_layers, dtype=torch.float64, device=values.device).index_add_(0, layer, segments)

    g = grads.double() * inv_scale
    g = torch.where(torch.isfinite(g), g, torch.zeros_like(g))
    scales = {
        StatRow.GRAD_SQ_SUM: per_layer(g * g),
        StatRow.GRAD_SUM: per_layer(g.abs()),
        StatRow.MOMENTUM_SQ_SUM: want[StatRow.MOMENTUM_SQ_SUM].double(),
        StatRow.SECOND_MOMENT_SUM: want[StatRow.SECOND_MOMENT_SUM].double(),
    }
    if momentum_before is not None:
        scales[StatRow.GRAD_DOT_MOMENTUM] = per_layer((g * momentum_before.double()).abs())
    for row, scale in scales.items():
        err = (got[row].double() - want[row].double()).abs()
        bad = err > SUM_RTOL * scale + 1e-30
        assert not bool(bad.any()), (
            f"{what}: {row.name} err {float(err.max()):.3g} > {SUM_RTOL} * sum(|terms|) in layers "
            f"{bad.nonzero().flatten().tolist()[:5]}"
        )

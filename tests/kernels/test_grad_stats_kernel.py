"""layer_grad_stats against per-layer float64 sums on awkward layouts with zeros, denormals, inf and NaN."""

from __future__ import annotations

import pytest
import torch
from _kernel_helpers import SUM_RTOL, make_layers
from triaccel_rl.kernels import FlatParameterStore, StatRow, layer_grad_stats, layer_grad_stats_reference

LAYOUTS = {
    "single_element": [[(1,)]],
    "awkward": [[(4095,)], [(4097,)], [(3, 5, 7), (2,)]],
    "tiny_and_large": [[(3,)] for _ in range(12)] + [[(90, 101)]],
    "empty_parameters": [[(0,), (3,)], [(2, 0, 5)], [(1,), (0, 4)]],  # a layer of one empty parameter, too
}


def _store_with_grads(layout: list[list[tuple[int, ...]]], device: str, seed: int) -> FlatParameterStore:
    store = FlatParameterStore(make_layers(layout, device, seed))
    generator = torch.Generator().manual_seed(seed)
    for layer in store.layers:
        for p in layer:
            assert p.grad is not None
            p.grad.copy_(torch.randn(p.shape, generator=generator).to(device) * 1024)
    return store


def _expected(store: FlatParameterStore, inv_scale: float) -> dict[str, list[float]]:
    """Statistics computed layer by layer in float64 from the param.grad views."""
    out: dict[str, list[float]] = {"sq_sum": [], "abs_max": [], "sum": [], "nonfinite": [], "abs_sum": []}
    for layer in store.layers:
        grads = [p.grad for p in layer if p.grad is not None]
        # A layer without elements has the statistics of a zero: 0 everywhere.
        g = torch.cat([x.flatten() for x in grads] + [torch.zeros(1, device=store.device)]).double() * inv_scale
        finite = torch.isfinite(g)
        gf = torch.where(finite, g, 0.0)
        out["sq_sum"].append(float((gf * gf).sum()))
        out["abs_max"].append(float(gf.abs().max()))
        out["sum"].append(float(gf.sum()))
        out["abs_sum"].append(float(gf.abs().sum()))
        out["nonfinite"].append(int((~finite).sum()))
    return out


def _check(stats: torch.Tensor, store: FlatParameterStore, inv_scale: float, what: str) -> None:
    want = _expected(store, inv_scale)
    got = stats.cpu()
    bits = got.view(torch.int32)
    for layer in range(store.n_layers):
        sq, want_sq = float(got[StatRow.GRAD_SQ_SUM, layer]), want["sq_sum"][layer]
        assert abs(sq - want_sq) <= SUM_RTOL * want_sq, f"{what} layer {layer}: sq_sum {sq} vs {want_sq}"
        total, want_total = float(got[StatRow.GRAD_SUM, layer]), want["sum"][layer]
        err = abs(total - want_total)
        assert err <= SUM_RTOL * want["abs_sum"][layer], f"{what} layer {layer}: sum err {err:.3g}"
        # The maximum is exact: |g| of a float32 is a float32, and the unscale here is by a power of two.
        assert float(got[StatRow.GRAD_ABS_MAX, layer]) == want["abs_max"][layer], f"{what} layer {layer}: abs_max"
        assert int(bits[StatRow.GRAD_NONFINITE, layer]) == want["nonfinite"][layer], f"{what} layer {layer}: count"
    assert int(bits[StatRow.NONFINITE_TOTAL, 0]) == sum(want["nonfinite"]), f"{what}: total non-finite count"
    for row in (StatRow.GRAD_DOT_MOMENTUM, StatRow.MOMENTUM_SQ_SUM, StatRow.SECOND_MOMENT_SUM):
        assert not got[row].any(), f"{what}: row {row.name} should be left at 0"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_matches_float64_per_layer(device: str, layout: str) -> None:
    store = _store_with_grads(LAYOUTS[layout], device, seed=len(layout))
    stats = layer_grad_stats(store.grads, store.chunk_layer, store.n_layers, inv_scale=1 / 1024)
    _check(stats, store, 1 / 1024, f"kernel, {layout}")
    reference = layer_grad_stats_reference(store.grads, store.chunk_layer, store.n_layers, inv_scale=1 / 1024)
    _check(reference, store, 1 / 1024, f"reference, {layout}")


def test_edge_values(device: str) -> None:
    store = _store_with_grads(LAYOUTS["awkward"], device, seed=5)
    grads = [g.view(-1) for layer in range(store.n_layers) for g in store.param_views(store.grads, layer)]
    grads[0][:100] = 0.0
    grads[0][100:110] = 1e-40  # fp32 denormals
    grads[0][110] = -0.0
    grads[1][7] = float("nan")
    grads[1][8] = float("inf")
    grads[1][4096] = float("-inf")  # in the layer's second segment
    grads[3][:] = 0.0  # a whole parameter of zeros
    stats = layer_grad_stats(store.grads, store.chunk_layer, store.n_layers, inv_scale=1.0)
    _check(stats, store, 1.0, "edge values")
    bits = stats.view(torch.int32).cpu()
    assert bits[StatRow.GRAD_NONFINITE].tolist() == [0, 3, 0]
    assert torch.isfinite(stats).all(), "float statistics must skip non-finite elements"


def test_all_zero_grads(device: str) -> None:
    store = FlatParameterStore(make_layers(LAYOUTS["awkward"], device))
    stats = layer_grad_stats(store.grads, store.chunk_layer, store.n_layers)
    assert not stats.any(), f"zero grads gave non-zero statistics: {stats}"


def test_inv_scale_tensor_equals_float(device: str) -> None:
    store = _store_with_grads(LAYOUTS["awkward"], device, seed=6)
    by_value = layer_grad_stats(store.grads, store.chunk_layer, store.n_layers, inv_scale=0.25)
    inv_scale = torch.tensor(0.25, device=device)
    by_tensor = layer_grad_stats(store.grads, store.chunk_layer, store.n_layers, inv_scale=inv_scale)
    # Same arithmetic in the same order: equal apart from the order of the atomic additions.
    torch.testing.assert_close(by_tensor, by_value, rtol=SUM_RTOL, atol=0.0)
    assert torch.equal(
        by_tensor.view(torch.int32)[StatRow.GRAD_ABS_MAX], by_value.view(torch.int32)[StatRow.GRAD_ABS_MAX]
    )


def test_out_buffer_is_zeroed_and_reused(device: str) -> None:
    store = _store_with_grads(LAYOUTS["awkward"], device, seed=7)
    out = torch.full((len(StatRow), store.n_layers), 5.0, device=device)
    result = layer_grad_stats(store.grads, store.chunk_layer, store.n_layers, 1 / 1024, out=out)
    assert result is out
    _check(out, store, 1 / 1024, "into a dirty out buffer")


@pytest.mark.parametrize("path", ["kernel", "reference"])
@pytest.mark.parametrize(
    ("inv_scale", "message"),
    [
        (torch.tensor(2), "inv_scale tensor must be float32, got torch.int64"),
        (torch.tensor([0.5], dtype=torch.float64), "inv_scale tensor must be float32, got torch.float64"),
        (torch.tensor([0.5, 0.5]), "inv_scale tensor must have one element, got 2"),
    ],
)
def test_an_inv_scale_of_another_dtype_is_refused_on_both_paths_leaving_out_alone(
    monkeypatch: pytest.MonkeyPatch, path: str, inv_scale: torch.Tensor, message: str
) -> None:
    """Before the fix the reference path (a CPU without the interpreter) took an integer or float64 ``inv_scale``
    that the kernel path refuses; ``layer_grad_stats_reference`` took it too."""
    if path == "reference":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    grads, chunk_layer = torch.ones(32), torch.tensor([0, 1], dtype=torch.int32)
    out = torch.full((len(StatRow), 2), 5.0)
    with pytest.raises(ValueError, match=message):
        layer_grad_stats(grads, chunk_layer, 2, inv_scale, out=out, segment_align=16)
    assert torch.equal(out, torch.full((len(StatRow), 2), 5.0))
    with pytest.raises(ValueError, match=message):
        layer_grad_stats_reference(grads, chunk_layer, 2, inv_scale, segment_align=16)

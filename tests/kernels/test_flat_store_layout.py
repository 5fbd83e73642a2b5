"""FlatParameterStore with non-contiguous dense parameters (channels-last): layout, values, refusals."""

import pytest
import torch
from triaccel_rl.kernels import FlatParameterStore, is_dense


def test_is_dense_accepts_permuted_layouts_and_refuses_gaps():
    assert is_dense(torch.zeros(2, 3, 4, 5))
    assert is_dense(torch.zeros(2, 3, 4, 5).to(memory_format=torch.channels_last))
    assert is_dense(torch.zeros(4, 6).t())
    assert is_dense(torch.zeros(1, 3, 1, 1).to(memory_format=torch.channels_last))
    assert not is_dense(torch.zeros(4, 6)[:, ::2])
    assert not is_dense(torch.zeros(3).expand(4, 3))


def test_store_keeps_channels_last_strides_and_values():
    weight = torch.nn.Parameter(torch.randn(8, 3, 3, 3).to(memory_format=torch.channels_last))
    bias = torch.nn.Parameter(torch.randn(8))
    expected = weight.detach().clone()
    store = FlatParameterStore([[weight, bias]])
    assert weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(weight.detach(), expected)
    assert weight.grad is not None and weight.grad.stride() == weight.stride()
    # The flat segment holds the weight in its memory order: NHWC.
    assert torch.equal(store.params[: weight.numel()], expected.permute(0, 2, 3, 1).reshape(-1))
    (weight * 2.0).sum().backward()  # accumulates into the flat grad buffer in place
    assert torch.all(store.grads[: weight.numel()] == 2.0)


def test_store_refuses_a_parameter_with_gaps():
    sliced = torch.nn.Parameter(torch.zeros(4, 6)[:, ::2])
    with pytest.raises(ValueError, match=r"must be dense \(contiguous or channels-last\), got strides \(6, 2\)"):
        FlatParameterStore([[sliced]])


def test_layer_sq_sums_equal_each_layers_sum_of_squares():
    torch.manual_seed(0)
    # Layers of awkward sizes, one spanning several segments, one empty: padding must add nothing.
    layers = [
        [torch.nn.Parameter(torch.randn(3, 5)), torch.nn.Parameter(torch.randn(7))],
        [],
        [torch.nn.Parameter(torch.randn(3 * 64 + 11))],
        [torch.nn.Parameter(torch.randn(1))],
    ]
    store = FlatParameterStore(layers, segment_align=64)
    want = torch.tensor(
        [sum(float(p.detach().double().square().sum()) for p in layer) for layer in layers], dtype=torch.float64
    )
    got = store.layer_sq_sums(store.params)
    assert got.dtype == torch.float64 and got.shape == (4,)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0.0)

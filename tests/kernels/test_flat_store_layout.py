"""FlatParameterStore with non-contiguous dense parameters (channels-last): layout, values, refusals."""

import pytest
import torch
from triaccel_rl.kernels import FlatParameterStore, is_dense


def test_is_dense_accepts_permuted_layouts_and_refuses_gaps():
    assert is_dense(torch.zeros(2, 3, 4, 5))
    assert is_dense(torch.zeros(2, 3, 4, 5).to(memory_format=torch.channels_last))
    assert is_dense(torch.zeros(4, 6).t())
    assert is_dense(torch.zeros(1, 3, 1, 1).to(memory_format=torch.channels_last))
    assert is_dense(torch.zeros(2, 0, 5))  # empty: strides (5, 5, 1) were refused before the fix
    assert is_dense(torch.zeros(4, 6)[:, ::2][:, :0])
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


def _store_and_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    return FlatParameterStore([list(model[0].parameters()), list(model[1].parameters())]), model


def test_gradients_set_to_none_come_back_as_zeroed_views_without_a_kernel_when_the_buffer_is_clean():
    store, model = _store_and_model()
    params = list(model.parameters())
    for p in params:
        p.grad = None  # a user's optimizer.zero_grad() after the fused step's store.zero_grad()
    version = store.grads._version
    assert store.rebind_grads() == len(params)
    assert store.grads._version == version  # nothing written: the buffer held zeros already
    assert all(p.grad is not None and p.grad.data_ptr() >= store.grads.data_ptr() and not p.grad.any() for p in params)


def test_gradients_set_to_none_over_a_written_buffer_are_zeroed_and_ones_put_in_place_are_copied():
    store, model = _store_and_model()
    params = list(model.parameters())
    model(torch.randn(5, 4)).sum().backward()  # accumulates into the views
    assert store.grads.any()
    replacement = torch.full_like(params[1], 7.0)
    for p in params:
        p.grad = None  # dropped without a step: the buffer still holds the last backward's gradients
    params[1].grad = replacement
    store.rebind_grads()
    assert not any(p.grad.any() for i, p in enumerate(params) if i != 1)
    assert torch.equal(params[1].grad, replacement) and params[1].grad is not replacement
    store.zero_grad()
    assert not store.grads.any()


def test_parameters_without_a_gradient_after_set_to_none_are_the_ones_autograd_did_not_reach():
    store, model = _store_and_model()
    params = list(model.parameters())
    assert store.take_params_without_grad() == []  # nothing set to None yet
    for p in params:
        p.grad = None
    store.rebind_grads()
    model[0](torch.randn(5, 4)).sum().backward()  # the second layer takes no part
    assert store.take_params_without_grad() == [2, 3]  # its weight and bias, in the store's order
    assert store.take_params_without_grad() == []  # the record is cleared
    assert torch.equal(store.param_slice(store.params, 3), params[3].detach().reshape(-1))
    # A gradient put in place of None counts as one; a backward that reached no hook at all counts as all reached
    # (a replayed CUDA graph runs no Python hook: leaving every parameter alone would stop training).
    for p in params:
        p.grad = None
    params[2].grad = torch.ones_like(params[2])
    store.rebind_grads()
    model[0](torch.randn(5, 4)).sum().backward()
    assert store.take_params_without_grad() == [3]
    # ... and so does one put in place of the zeroed view a rebind gave it (a step pre-hook adding a term to every
    # gradient, after a zero_grad to None): it was copied into the buffer, then put back as a gradient never given.
    for p in params:
        p.grad = None
    store.rebind_grads()
    params[3].grad = torch.full_like(params[3], 2.0)
    model[0](torch.randn(5, 4)).sum().backward()
    assert store.rebind_grads() == 1
    assert store.take_params_without_grad() == [2]
    assert params[3].grad.data_ptr() == store.param_view(store.grads, 3).data_ptr()  # the view again, holding it
    assert torch.equal(params[3].grad, torch.full_like(params[3], 2.0))
    for p in params:
        p.grad = None
    store.rebind_grads()
    assert store.take_params_without_grad() == []
    store.remove_grad_hooks()
    for p in params:
        p.grad = None
    store.rebind_grads()
    model[0](torch.randn(5, 4)).sum().backward()  # the hooks are gone, reinstalled by this rebind
    assert store.take_params_without_grad() == [2, 3]


def test_a_gradient_given_after_one_found_none_after_the_backward_is_stepped_with():
    """Before the fix, a parameter whose gradient was None after the backward stayed recorded as having none after a
    gradient was given to it and copied in: the fused step put it back, ignoring that gradient."""
    from triaccel_rl.kernels import FusedSGD

    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    store = FlatParameterStore([[p], [q]], segment_align=16)
    optimizer = FusedSGD(store)
    (p.sum() + q.sum()).backward()
    p.grad = None
    store.rebind_grads(after_backward=True)  # p: no gradient this step, recorded
    p.grad = torch.full((3,), 1.0)  # ... then given one after all, copied into the flat buffer
    store.rebind_grads()
    optimizer.step(lr=0.5)
    assert p.detach().tolist() == [0.5, 0.5, 0.5]
    assert q.detach().tolist() == [0.5, 0.5, 0.5]


def test_store_refuses_parameters_sharing_memory_and_takes_apart_views_of_one_tensor():
    """Before the fix, two parameters over overlapping memory were copied to two places of the flat buffer and
    silently stopped sharing their elements (an update of one no longer showed in the other)."""
    base = torch.arange(10.0)
    overlapping = [torch.nn.Parameter(base[:6]), torch.nn.Parameter(base[4:])]
    with pytest.raises(
        ValueError, match=r"parameters 0 and 2 \(in the order of layers\) share memory, shapes \(6,\) and \(6,\)"
    ):
        FlatParameterStore([[overlapping[0]], [torch.nn.Parameter(torch.zeros(2)), overlapping[1]]])
    whole = torch.nn.Parameter(torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"parameters 0 and 1 .* shapes \(4, 3\) and \(3,\)"):
        FlatParameterStore([[whole, torch.nn.Parameter(whole.data[2])]])
    apart = [torch.nn.Parameter(base[:4]), torch.nn.Parameter(base[4:])]  # one tensor's two halves
    store = FlatParameterStore([apart])
    assert [p.detach().tolist() for p in apart] == [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0, 8.0, 9.0]]
    assert store.layer_numels == (10,)


def test_store_refuses_a_flat_list_of_parameters_and_non_leaf_tensors():
    """A flat list passed as ``layers`` made each parameter a "layer" whose rows, non-leaf views, were re-pointed at the
    buffer: the optimizer trained copies and the model never changed."""
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"layers holds a tensor where a list of parameters belongs"):
        FlatParameterStore(list(model.parameters()))
    weight = model.weight.detach().clone().requires_grad_()
    with pytest.raises(
        ValueError, match=r"must hold leaf tensors \(parameters\), got non-leaf ones of shapes \[\(2, 3\)\]"
    ):
        FlatParameterStore([[weight * 2]])
    assert FlatParameterStore([list(model.parameters())]).layer_numels[0] >= 8  # one list per layer: taken


def test_store_refuses_parameters_on_several_devices():
    with pytest.raises(ValueError, match=r"parameters are on several devices: \['cpu', 'meta'\]"):
        FlatParameterStore([[torch.nn.Parameter(torch.zeros(3))], [torch.nn.Parameter(torch.zeros(3, device="meta"))]])


def test_a_generator_of_layers_builds_the_store_as_a_list_of_them():
    """Before the fix the first check used the generator up, and the store said "layers hold no parameters"."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    from_list = FlatParameterStore([list(m.parameters()) for m in model.children()])
    from_generator = FlatParameterStore(list(m.parameters()) for m in model.children())
    assert list(from_generator.layer_numels) == list(from_list.layer_numels) == [8, 3]
    assert torch.equal(from_generator.params, from_list.params)


@pytest.mark.parametrize("shared_copy", [False, True])
@pytest.mark.parametrize("codes", [[7, 1], [1, 2, 0], ["x", 1], [1.5, 1], [True, 1]])
def test_refresh_low_precision_refuses_codes_out_of_range_with_separate_copies_too(shared_copy, codes):
    """Separate copies ignored ``codes`` and refused nothing, though the docstring promised a ValueError; a shared
    copy refused 'x' with int()'s parse error and truncated 1.5 to 1."""
    store = FlatParameterStore([[torch.nn.Parameter(torch.ones(4))], [torch.nn.Parameter(torch.ones(4))]],
                               shared_copy=shared_copy)  # fmt: skip
    with pytest.raises(ValueError, match=r"^codes must give each of the 2 layers 0, 1 or 2; got "):
        store.refresh_low_precision(codes)
    store.refresh_low_precision([0, 2])  # a valid map still refreshes

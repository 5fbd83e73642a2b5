"""FusedSGD/FusedAdamW against torch.optim over many steps, checkpoints, and the FlatParameterStore plumbing."""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import pytest
import torch
from _kernel_helpers import assert_bits_equal, assert_close, clone_layers, fill_grads, make_layers
from triaccel_rl.kernels import AdamWOptions, FlatParameterStore, FusedAdamW, FusedSGD, SGDOptions

# A small CNN's parameter shapes, one layer per module, plus a 0-dim parameter as its own layer.
MODEL_LAYERS: list[list[tuple[int, ...]]] = [
    [(8, 3, 3, 3), (8,)],  # conv1
    [(8,), (8,)],  # batch norm
    [(16, 8, 3, 3), (16,)],  # conv2
    [(10, 256), (10,)],  # classifier
    [()],  # a learned scalar
]
VARIANTS: dict[str, tuple[str, dict[str, Any], int]] = {
    # name: (optimizer, hyper-parameters, steps under the kernel path)
    "adamw": ("adamw", {"weight_decay": 0.01, "eps": 1e-8}, 20),
    # beta1 = 0 (its log is -inf: every bias correction 1) with a short second-moment memory and a large eps.
    "adamw_beta1_zero": ("adamw", {"beta1": 0.0, "beta2": 0.5, "eps": 1e-3, "weight_decay": 0.0}, 8),
    "adamw_beta2_zero": ("adamw", {"beta1": 0.5, "beta2": 0.0, "weight_decay": 0.1}, 8),
    "sgd_nesterov_wd": ("sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-2}, 20),
    "sgd_dampening": ("sgd", {"momentum": 0.8, "dampening": 0.25}, 20),
    "sgd_plain": ("sgd", {}, 20),
    "sgd_heavy_ball_wd": ("sgd", {"momentum": 0.5, "weight_decay": 0.1}, 8),
    "sgd_nesterov": ("sgd", {"momentum": 0.99, "nesterov": True}, 8),
    "sgd_wd_only": ("sgd", {"weight_decay": 0.5}, 8),
}
LOSS_SCALE = 1024.0


def _fused(optimizer: str, store: FlatParameterStore, hyper: dict[str, Any]) -> FusedSGD | FusedAdamW:
    if optimizer == "adamw":
        return FusedAdamW(store, **hyper)
    return FusedSGD(store, **hyper)


def _torch_optimizer(
    optimizer: str, layers: list[list[torch.nn.Parameter]], factors: list[float], hyper: dict[str, Any]
) -> torch.optim.Optimizer:
    """torch.optim with one param group per layer, its lr being the layer's factor (times lr, set per step)."""
    groups = [{"params": layer, "lr": f} for layer, f in zip(layers, factors, strict=True)]
    if optimizer == "adamw":
        betas = (hyper.get("beta1", 0.9), hyper.get("beta2", 0.999))
        rest = {key: value for key, value in hyper.items() if key not in ("beta1", "beta2")}
        return torch.optim.AdamW(groups, betas=betas, **rest)
    return torch.optim.SGD(groups, lr=1.0, **hyper)


def _run_against_torch(device: str, variant: str, n_steps: int) -> None:
    optimizer, hyper, _ = VARIANTS[variant]
    layers = make_layers(MODEL_LAYERS, device, seed=11)
    torch_layers = clone_layers(layers)
    store = FlatParameterStore(layers)
    fused = _fused(optimizer, store, hyper)
    factors = [0.5 + 0.25 * i for i in range(store.n_layers)]
    reference = _torch_optimizer(optimizer, torch_layers, factors, hyper)
    lr_factors = torch.tensor(factors, dtype=torch.float32, device=device)
    generator = torch.Generator().manual_seed(12)
    inv_scale = torch.tensor(1 / LOSS_SCALE, device=device)

    for step in range(n_steps):
        lr = 0.01 * (1.0 + 0.1 * step)  # a schedule: the LR is a per-step argument
        codes = torch.tensor([(step + i) % 3 for i in range(store.n_layers)], dtype=torch.int32, device=device)
        grads = fill_grads(store, generator, scale=LOSS_SCALE)
        for p, g in zip((p for layer in torch_layers for p in layer), grads, strict=True):
            p.grad = g.clone()
        for group, factor in zip(reference.param_groups, factors, strict=True):
            group["lr"] = lr * factor
        result = fused.step(lr, lr_factors, codes, inv_scale=inv_scale if step % 2 else 1 / LOSS_SCALE)
        reference.step()
        assert not bool(result.skipped)

        for i, (layer, torch_layer) in enumerate(zip(layers, torch_layers, strict=True)):
            for j, (p, q) in enumerate(zip(layer, torch_layer, strict=True)):
                assert_close(p, q, f"{variant} step {step} layer {i} param {j}")
            code = int(codes[i])
            if code:
                dtype = torch.bfloat16 if code == 1 else torch.float16
                for p, copy in zip(layer, store.low_precision_params(i, dtype), strict=True):
                    assert_bits_equal(copy, p.detach().to(dtype), f"{variant} step {step} layer {i} {dtype} copy")
    assert float(fused.step_count) == n_steps


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kernel_matches_torch_optim(device: str, variant: str) -> None:
    _run_against_torch(device, variant, VARIANTS[variant][2])


@pytest.mark.usefixtures("reference_path")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cpu_reference_path_matches_torch_optim(variant: str) -> None:
    _run_against_torch("cpu", variant, VARIANTS[variant][2])


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_state_dict_round_trip(device: str, optimizer: str) -> None:
    hyper = VARIANTS["adamw" if optimizer == "adamw" else "sgd_nesterov_wd"][1]
    stores, optimizers = [], []
    for _ in range(2):
        store = FlatParameterStore(make_layers(MODEL_LAYERS, device, seed=21))
        stores.append(store)
        optimizers.append(_fused(optimizer, store, hyper))
    generator = torch.Generator().manual_seed(22)
    for _ in range(2):
        fill_grads(stores[0], generator)
        optimizers[0].step(0.01)
    checkpoint = optimizers[0].state_dict()
    stores[1].params.copy_(stores[0].params)
    optimizers[1].load_state_dict(checkpoint)
    assert float(optimizers[1].step_count) == 2.0
    for store, opt in zip(stores, optimizers, strict=True):
        store.grads.copy_(stores[0].grads)
        opt.step(0.01)
    assert torch.equal(stores[0].params, stores[1].params), "resumed optimizer diverged from the original"

    other = FusedSGD(stores[1]) if optimizer == "adamw" else FusedAdamW(stores[1])
    with pytest.raises(ValueError, match="optimizer"):
        other.load_state_dict(checkpoint)


def test_counts_follow_many_sets_of_idle_layers_past_the_cached_rows() -> None:
    """Experts routed anew each step: 80 steps, each with its own set of idle layers (more sets than the optimizer
    keeps rows for); every layer's count is the number of steps it took part in, the model's every step."""
    from triaccel_rl.kernels.optim import _MAX_CACHED_FLAG_ROWS

    layers = make_layers([[(4,)] for _ in range(8)], "cpu", seed=51)
    store = FlatParameterStore(layers)
    optimizer = FusedSGD(store, momentum=0.9)
    generator = torch.Generator().manual_seed(52)
    took_part = [0] * 8
    seen = set()
    for _ in range(80):
        while True:  # a set of idle layers not seen before, not all of them
            idle = frozenset(int(i) for i in torch.nonzero(torch.rand(8, generator=generator) < 0.5).flatten())
            if idle not in seen and len(idle) < 8:
                break
        seen.add(idle)
        for p in (q for layer in layers for q in layer):
            p.grad = None
        store.rebind_grads()
        loss = sum((p * p).sum() for i, layer in enumerate(layers) if i not in idle for p in layer)
        loss.backward()
        optimizer.step(0.01)
        for i in range(8):
            took_part[i] += i not in idle
    assert optimizer.layer_step_counts.tolist() == [float(n) for n in took_part]
    assert float(optimizer.step_count) == 80.0
    assert len(optimizer._sitting_out_flags) == _MAX_CACHED_FLAG_ROWS
    store.remove_grad_hooks()


def test_a_step_state_needs_a_layer() -> None:
    from triaccel_rl.kernels import new_step_state

    with pytest.raises(ValueError, match="n_layers must be >= 1, got 0"):
        new_step_state("cpu", n_layers=0)
    # A beta of 1 made log(beta) 0 and every bias correction 1 - exp(0) = 0 (a division by 0 in the update).
    with pytest.raises(ValueError, match=r"beta2 must be in \[0, 1\), got 1\.0"):
        new_step_state("cpu", 0.9, 1.0, n_layers=1)
    state = new_step_state("cpu", 0.9, 0.0, n_layers=2)
    assert state.shape == (4, 3) and state[2].tolist() == [1.0, 1.0, 1.0]
    assert state[3, 0].item() == pytest.approx(math.log(0.9)) and state[3, 1].item() == -math.inf  # beta2 = 0


def test_checkpoints_keep_each_layers_count_and_older_ones_load() -> None:
    """``steps`` round-trips the per-layer counts; a checkpoint from before them (``step_state``: the model's count
    and its beta powers) gives every layer the model's count; counts for other layers are refused, nothing changed."""
    store = FlatParameterStore(make_layers(MODEL_LAYERS, "cpu", seed=23))
    optimizer = FusedAdamW(store)
    counts = torch.tensor([5.0, 5.0, 3.0, 5.0, 0.0, 5.0], dtype=torch.float64)
    optimizer._step_state[0].copy_(counts)
    checkpoint = optimizer.state_dict()
    assert torch.equal(checkpoint["steps"], counts)
    resumed = FusedAdamW(FlatParameterStore(make_layers(MODEL_LAYERS, "cpu", seed=23)))
    resumed.load_state_dict(checkpoint)
    assert torch.equal(resumed._step_state[0], counts)

    older = {key: value for key, value in checkpoint.items() if key != "steps"}
    older["step_state"] = torch.tensor([4.0, 0.9**4, 0.999**4], dtype=torch.float64)
    resumed.load_state_dict(older)
    assert resumed._step_state[0].tolist() == [4.0] * 6

    wrong = dict(checkpoint, steps=torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"checkpoint's steps has shape \(4,\); this store has 5 layers"):
        resumed.load_state_dict(wrong)
    with pytest.raises(ValueError, match="lacks the step counts"):
        resumed.load_state_dict({key: value for key, value in checkpoint.items() if key != "steps"})
    assert resumed._step_state[0].tolist() == [4.0] * 6, "a refused checkpoint changed the counts"


def test_flat_store_views_and_backward() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    values = [p.detach().clone() for p in model.parameters()]
    store = FlatParameterStore([list(model[0].parameters()), list(model[2].parameters())])
    assert store.layer_numels == (5 * 7 + 7, 7 * 3 + 3)
    assert store.n_elements == 2 * store.segment_align
    for p, v in zip(model.parameters(), values, strict=True):
        assert torch.equal(p.detach(), v), "values changed while moving into the flat buffer"
        assert p.untyped_storage().data_ptr() == store.params.untyped_storage().data_ptr()
    model(torch.randn(4, 5)).square().sum().backward()
    for p in model.parameters():
        assert p.grad is not None
        assert p.grad.untyped_storage().data_ptr() == store.grads.untyped_storage().data_ptr()
    flat_grads_norm = store.grads.norm()
    assert torch.allclose(flat_grads_norm, torch.cat([p.grad.flatten() for p in model.parameters()]).norm())
    padding = torch.ones(store.n_elements, dtype=torch.bool)
    for layer in range(store.n_layers):
        for view in store.param_views(store.params, layer):
            start = view.storage_offset()
            padding[start : start + view.numel()] = False
    assert not store.params[padding].any() and not store.grads[padding].any(), "padding must stay zero"
    store.zero_grad()
    assert not store.grads.any()
    store.refresh_low_precision()
    for layer in range(store.n_layers):
        for dtype in (torch.bfloat16, torch.float16):
            for p, copy in zip(store.layers[layer], store.low_precision_params(layer, dtype), strict=True):
                assert_bits_equal(copy, p.detach().to(dtype), f"refreshed {dtype} copy of layer {layer}")


def test_flat_store_rejects_bad_parameters() -> None:
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="twice"):
        FlatParameterStore([[p], [p]])
    with pytest.raises(ValueError, match="float32"):
        FlatParameterStore([[torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))]])
    with pytest.raises(ValueError, match="empty"):
        FlatParameterStore([])


NAN, INF = float("nan"), float("inf")
BAD_OPTIONS: list[tuple[str, dict[str, Any], str]] = [
    ("sgd", {"nesterov": True}, "nesterov needs momentum > 0"),
    ("sgd", {"momentum": -0.1}, r"momentum must be a finite number >= 0, got -0\.1"),
    ("sgd", {"momentum": NAN}, "momentum must be a finite number >= 0, got nan"),
    ("sgd", {"momentum": INF}, "momentum must be a finite number >= 0, got inf"),
    ("sgd", {"dampening": 1.5}, r"dampening must be in \[0, 1\], got 1\.5"),
    ("sgd", {"dampening": NAN}, r"dampening must be in \[0, 1\], got nan"),
    ("sgd", {"weight_decay": INF}, "weight_decay must be a finite number >= 0.*got inf"),
    ("sgd", {"weight_decay": "0.1"}, "weight_decay must be a finite number >= 0.*got '0.1'"),
    ("adamw", {"weight_decay": NAN}, "weight_decay must be a finite number >= 0.*got nan"),
    ("adamw", {"weight_decay": (0.1, None)}, r"weight_decay must be .*got \(0\.1, None\)"),
    ("adamw", {"beta1": -0.1}, r"beta1 must be in \[0, 1\), got -0\.1"),
    ("adamw", {"beta2": 1.0}, r"beta2 must be in \[0, 1\), got 1\.0"),
    ("adamw", {"beta2": NAN}, r"beta2 must be in \[0, 1\), got nan"),
    ("adamw", {"eps": 0.0}, "eps must be a finite number > 0, got 0.0"),
    ("adamw", {"eps": NAN}, "eps must be a finite number > 0, got nan"),
    ("adamw", {"eps": INF}, "eps must be a finite number > 0, got inf"),
    ("adamw", {"block_size": 3000}, "block_size must be a power of two dividing the segment alignment 4096"),
]


@pytest.mark.parametrize(("optimizer", "hyper", "message"), BAD_OPTIONS)
def test_options_out_of_range_are_refused_by_name(optimizer: str, hyper: dict[str, Any], message: str) -> None:
    """Before the fix, NaN or infinite momentum, eps and weight decay were accepted (and a string decay failed with
    "could not convert string to float: '.'"); the update then wrote NaN into every weight."""
    store = FlatParameterStore([[torch.nn.Parameter(torch.zeros(3))]])
    with pytest.raises(ValueError, match=message):
        _fused(optimizer, store, hyper)


BAD_STEPS: list[tuple[dict[str, Any], str]] = [
    ({"lr": -0.1}, r"lr must be a finite number >= 0, got float -0\.1"),
    ({"lr": NAN}, "lr must be a finite number >= 0, got float nan"),
    ({"lr": INF}, "lr must be a finite number >= 0, got float inf"),
    ({"lr": None}, "lr must be a finite number >= 0, got NoneType None"),  # a TypeError from the comparison
    ({"lr": "0.1"}, "lr must be a finite number >= 0, got str '0.1'"),
    ({"inv_scale": 0.0}, r"inv_scale must be a finite number > 0 \(1 / the loss scale\), got float 0\.0"),
    ({"inv_scale": -1.0}, "inv_scale must be a finite number > 0 .*got float -1.0"),
    ({"inv_scale": NAN}, "inv_scale must be a finite number > 0 .*got float nan"),
    ({"inv_scale": None}, "inv_scale must be a finite number > 0 .*got NoneType None"),
    # Values, read on CPU tensors (no sync): a NaN factor gave NaN weights in an applied step, code 7 stale copies
    ({"lr_factors": torch.tensor([NAN, 1.0])}, r"lr_factors must be finite numbers >= 0; got \[nan, 1\.0\]"),
    ({"lr_factors": torch.tensor([1.0, -3.0])}, r"lr_factors must be finite numbers >= 0; got \[1\.0, -3\.0\]"),
    ({"precision_codes": torch.tensor([0, 7], dtype=torch.int32)}, r"precision_codes must be 0 .* got \[0, 7\]"),
    ({"max_grad_norm": 0.0}, r"max_grad_norm must be a number > 0 \(or None for no clipping\), got float 0\.0"),
    ({"max_grad_norm": NAN}, "max_grad_norm must be a number > 0 .*got float nan"),
    # A tensor: bool(tensor > 0) synced, and one of several elements failed as ambiguous
    (
        {"max_grad_norm": torch.ones(2)},
        r"max_grad_norm must be a number > 0 .*got torch\.Tensor tensor\(\[1\., 1\.\]\)",
    ),
    ({"max_grad_norm": True}, "max_grad_norm must be a number > 0 .*got bool True"),
    ({"lr_factors": torch.ones(3)}, r"lr_factors must have one entry a layer, shape \(2,\); got \(3,\)"),
    ({"precision_codes": torch.zeros(1, dtype=torch.int32)}, r"precision_codes must .* shape \(2,\); got \(1,\)"),
    # Refused by the update once the step had begun (an AssertionError, the record of gradient-less parameters gone)
    ({"lr_factors": torch.ones(2, dtype=torch.float64)}, "lr_factors must be a contiguous float32 tensor on cpu"),
    ({"precision_codes": torch.zeros(2)}, "precision_codes must be a contiguous int8, .* or int64 tensor on cpu"),
    # torch compares no uint16/32/64: a NotImplementedError ("ge_cpu" not implemented for 'UInt16') until 2026-12-06
    *(
        ({"precision_codes": torch.zeros(2, dtype=dtype)}, f"precision_codes must be .* got {dtype} on cpu")
        for dtype in (torch.uint16, torch.uint32, torch.uint64)
    ),
    ({"inv_scale": torch.ones((), dtype=torch.float64)}, "inv_scale must be a float or a one-element float32"),
    ({"skip": torch.zeros((), dtype=torch.int32)}, "skip must be a one-element bool tensor on cpu"),
    # Not tensors: an AttributeError ('list' object has no attribute 'shape'), or for NumPy float32 "must be a ...
    # float32 tensor; got float32"; now the type received is named.
    ({"lr_factors": [1.0, 0.5]}, "^lr_factors must be a contiguous float32 tensor on cpu; got list$"),
    ({"lr_factors": np.ones(2, dtype=np.float32)}, "^lr_factors must be .* float32 tensor on cpu; got numpy.ndarray$"),
    ({"precision_codes": [0, 1]}, "^precision_codes must be a contiguous int8, .* tensor on cpu; got list$"),
    ({"skip": True}, "^skip must be a one-element bool tensor on cpu; got bool$"),
]


@pytest.mark.parametrize(("arguments", "message"), BAD_STEPS)
def test_step_arguments_out_of_range_are_refused_by_name(arguments: dict[str, Any], message: str) -> None:
    """Nothing changes. Before the fix, a NaN or infinite LR and a NaN, zero or negative inv_scale were accepted (NaN
    weights, or gradients ascended), and lr_factors of the wrong length was reported as precision_codes' shape."""
    store = FlatParameterStore([[torch.nn.Parameter(torch.ones(3))], [torch.nn.Parameter(torch.ones(2))]])
    optimizer = FusedSGD(store, momentum=0.9)
    store.grads.fill_(1.0)
    before = store.params.clone()
    with pytest.raises(ValueError, match=message):
        optimizer.step(**{"lr": 0.1, **arguments})
    assert torch.equal(store.params, before) and float(optimizer.step_count) == 0.0


@pytest.mark.usefixtures("reference_path")
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_one_element_inv_scale_of_any_shape_steps_as_a_float(optimizer: str) -> None:
    """Before the fix a (1, 1, 1) ``inv_scale`` broadcast the CPU path's gradients to 3-D and raised there, after the
    step counts had moved (a retry's AdamW bias corrections were a step ahead)."""
    results = []
    for inv_scale in (0.5, torch.full((1, 1, 1), 0.5)):
        store = FlatParameterStore(make_layers(MODEL_LAYERS, "cpu", seed=66))
        fused = _fused(optimizer, store, {})
        fill_grads(store, torch.Generator().manual_seed(67))
        fused.step(0.1, inv_scale=inv_scale)
        results.append((store.params.clone(), float(fused.step_count)))
    assert torch.equal(results[0][0], results[1][0]) and results[0][1] == results[1][1] == 1.0


def test_a_refused_step_keeps_the_record_of_the_parameters_without_a_gradient() -> None:
    """A parameter the backward did not reach takes no decay, also on the step after a refused one (it took it)."""
    a, b = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    store = FlatParameterStore([[a], [b]])
    optimizer = FusedSGD(store, weight_decay=0.5)
    a.grad = b.grad = None  # optimizer.zero_grad(set_to_none=True)
    store.rebind_grads()
    (a * 1.0).sum().backward()  # b gets no gradient: torch.optim would leave it alone
    with pytest.raises(ValueError, match="lr_factors must be a contiguous float32"):
        optimizer.step(0.1, lr_factors=torch.ones(2, dtype=torch.float64))
    optimizer.step(0.1)
    assert torch.equal(b.detach(), torch.ones(4)) and not torch.equal(a.detach(), torch.ones(4))


def test_a_store_of_small_segments_steps_at_the_default_block_size() -> None:
    """The default block (4096 elements) was refused by a store of 64-element segments: it is capped at them."""
    p = torch.nn.Parameter(torch.ones(10))
    store = FlatParameterStore([[p]], segment_align=64)
    optimizer = FusedSGD(store, momentum=0.9)
    p.grad.fill_(1.0)
    optimizer.step(0.1)
    assert torch.allclose(p.detach(), torch.full((10,), 0.9))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_an_infinite_max_grad_norm_clips_nothing() -> None:
    """Gradients whose sum of squares overflows float32 (finite, so the step is applied): ``max_grad_norm=inf`` is the
    step without clipping. Before the fix, the clip coefficient was inf / inf = NaN and every weight became NaN."""
    stores = [FlatParameterStore([[torch.nn.Parameter(torch.ones(3))]]) for _ in range(2)]
    optimizers = [FusedSGD(store) for store in stores]
    for store, optimizer, max_grad_norm in zip(stores, optimizers, [INF, None], strict=True):
        store.grads[:3] = 1e30  # finite; squared, inf
        result = optimizer.step(1e-30, max_grad_norm=max_grad_norm)
        assert not bool(result.skipped)
    assert stores[0].params[:3].tolist() == [0.0, 0.0, 0.0]
    assert_bits_equal(stores[0].params, stores[1].params, "max_grad_norm=inf against no clipping")


# Gradients where the order of AdamW's arithmetic decides the result: (1 - beta2) * (g * g) overflows float32 for |g|
# from ~1.8e19 where torch's ((1 - beta2) * g) * g (addcmul) stays finite up to ~5.8e20; and at beta1 = 0 the
# first moment m + 1 * (g - m) loses g next to a large old m, where torch's lerp (weight >= 0.5) gives g exactly.
ORDER_CASES: dict[str, tuple[list[float], dict[str, Any]]] = {
    "second_moment_of_a_huge_gradient": ([1e20, 1.0, 1.0, 1.0], {}),
    "first_moment_at_beta1_zero": ([1e8, 1.0], {"beta1": 0.0, "beta2": 0.99}),
}


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the gradient's sum of squares (a stat)
@pytest.mark.parametrize("case", list(ORDER_CASES))
def test_adamw_computes_its_moments_in_torch_optims_order(device: str, case: str) -> None:
    """Weight and both moments as torch.optim.AdamW's on the CPU: bit for bit there, within the optimizer tolerance
    on a GPU (Triton contracts a * b + c into one fma). Before the fix, a gradient of 1e20 left the second moment
    inf (that weight never moved again), and at beta1 = 0 the first moment after 1e8 then 1.0 was 0, not 1.

    The reference stays on the CPU on every device: torch's CUDA addcmul is ``fma(1 - beta2, g * g, v)``, which
    overflows at 1e20 itself (on an H100, 2026-12-05: its weight stayed 1.0 where the CPU's moved to 0.99)."""
    grads, hyper = ORDER_CASES[case]
    p = torch.nn.Parameter(torch.ones(1, device=device))
    q = torch.nn.Parameter(torch.ones(1))
    store = FlatParameterStore([[p]])
    fused = FusedAdamW(store, weight_decay=0.0, **hyper)
    betas = (hyper.get("beta1", 0.9), hyper.get("beta2", 0.999))
    reference = torch.optim.AdamW([q], lr=1e-2, betas=betas, eps=1e-8, weight_decay=0.0, foreach=False)
    for step, g in enumerate(grads):
        p.grad.fill_(g)
        q.grad = torch.full((1,), g)
        assert not bool(fused.step(1e-2).skipped)
        reference.step()
        state = reference.state[q]
        for got, want, what in [
            (p.detach(), q.detach(), "param"),
            (fused.exp_avg[:1], state["exp_avg"], "exp_avg"),
            (fused.exp_avg_sq[:1], state["exp_avg_sq"], "exp_avg_sq"),
        ]:
            compare = assert_bits_equal if device == "cpu" else assert_close
            compare(got.cpu(), want, f"{case} step {step} {what}")
    assert math.isfinite(float(fused.exp_avg_sq[0]))
    if hyper.get("beta1") == 0.0:
        assert float(fused.exp_avg[0]) == 1.0  # the last gradient, exactly


@pytest.mark.usefixtures("reference_path")
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("case", list(ORDER_CASES))
def test_cpu_reference_path_computes_adamw_moments_in_torch_optims_order(case: str) -> None:
    test_adamw_computes_its_moments_in_torch_optims_order("cpu", case)


# The usual recipe: decay on the weights, none on biases, norm parameters and scalars (dim <= 1), so every layer
# with a bias is split across two groups.
DECAYS = (0.05, 0.0)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_per_group_weight_decay_matches_torch_optim(device: str, optimizer: str) -> None:
    _run_per_group_decay(device, optimizer)


@pytest.mark.usefixtures("reference_path")
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_cpu_reference_path_per_group_weight_decay_matches_torch_optim(optimizer: str) -> None:
    _run_per_group_decay("cpu", optimizer)


def _run_per_group_decay(device: str, optimizer: str) -> None:
    layers = make_layers(MODEL_LAYERS, device, seed=31)
    torch_layers = clone_layers(layers)
    groups = [[0 if p.dim() > 1 else 1 for p in layer] for layer in layers]
    store = FlatParameterStore(layers, groups=groups)
    hyper: dict[str, Any] = {"momentum": 0.9, "nesterov": True} if optimizer == "sgd" else {}
    fused = _fused(optimizer, store, {**hyper, "weight_decay": DECAYS})
    factors = [0.5 + 0.25 * i for i in range(store.n_layers)]
    torch_groups = [
        {"params": [q for q, g in zip(layer, layer_groups, strict=True) if g == group], "lr": factor,
         "weight_decay": DECAYS[group], "layer": i}
        for i, (layer, layer_groups, factor) in enumerate(zip(torch_layers, groups, factors, strict=True))
        for group in sorted(set(layer_groups))
    ]  # fmt: skip
    reference = (
        torch.optim.AdamW(torch_groups) if optimizer == "adamw" else torch.optim.SGD(torch_groups, lr=1.0, **hyper)
    )
    lr_factors = torch.tensor(factors, dtype=torch.float32, device=device)
    generator = torch.Generator().manual_seed(32)
    for step in range(6):
        lr = 0.05 * (1.0 + 0.1 * step)
        grads = fill_grads(store, generator)
        for p, g in zip((p for layer in torch_layers for p in layer), grads, strict=True):
            p.grad = g.clone()
        for group in reference.param_groups:
            group["lr"] = lr * factors[group["layer"]]
        fused.step(lr, lr_factors)
        reference.step()
        for i, (layer, torch_layer) in enumerate(zip(layers, torch_layers, strict=True)):
            for j, (p, q) in enumerate(zip(layer, torch_layer, strict=True)):
                assert_close(p, q, f"{optimizer} step {step} layer {i} param {j}")
    # A decayed weight moved differently from the same run without decay: the decay was applied, per group.
    undecayed = make_layers(MODEL_LAYERS, device, seed=31)
    plain_store = FlatParameterStore(undecayed)
    plain = _fused(optimizer, plain_store, {**hyper, "weight_decay": 0.0})
    generator = torch.Generator().manual_seed(32)
    for step in range(6):
        fill_grads(plain_store, generator)
        plain.step(0.05 * (1.0 + 0.1 * step), lr_factors)
    # (Close, not equal: on a GPU the two kernel specialisations may contract multiply-adds differently.)
    assert float((layers[0][0] - undecayed[0][0]).detach().abs().max()) > 1e-3, "the decayed weight was not decayed"
    assert_close(layers[0][1], undecayed[0][1], "the bias (weight decay 0) against the undecayed run")


def test_store_groups_start_new_segments() -> None:
    layers = make_layers(MODEL_LAYERS, "cpu", seed=33)
    plain = FlatParameterStore(make_layers(MODEL_LAYERS, "cpu", seed=33))
    groups = [[0 if p.dim() > 1 else 1 for p in layer] for layer in layers]
    store = FlatParameterStore(layers, groups=groups)
    align = store.segment_align
    # conv1, conv2 and the classifier hold a weight and a bias: a second segment each; the norm layer and the
    # scalar are in group 1 alone.
    assert store.layer_lengths == (2 * align, align, 2 * align, 2 * align, align)
    assert store.chunk_group.tolist() == [0, 1, 1, 0, 1, 0, 1, 1]
    assert store.chunk_layer.tolist() == [0, 0, 1, 2, 2, 3, 3, 4]
    assert store.n_groups == 2 and plain.n_groups == 1 and not plain.chunk_group.any()
    # Each parameter's view sits in a segment of its group, and the views keep the order of ``layers``.
    for layer, layer_groups in enumerate(groups):
        for view, p, group in zip(
            store.param_views(store.params, layer), store.layers[layer], layer_groups, strict=True
        ):
            assert torch.equal(view, p.detach())
            assert int(store.chunk_group[view.storage_offset() // align]) == group
    with pytest.raises(ValueError, match="groups must give each parameter"):
        FlatParameterStore(make_layers(MODEL_LAYERS, "cpu"), groups=[[0]] * len(MODEL_LAYERS))
    with pytest.raises(ValueError, match="non-negative"):
        FlatParameterStore(make_layers(MODEL_LAYERS, "cpu"), groups=[[-1] * len(layer) for layer in MODEL_LAYERS])


def test_per_group_weight_decay_is_validated(tmp_path: Any) -> None:
    layers = make_layers(MODEL_LAYERS, "cpu", seed=34)
    store = FlatParameterStore(layers, groups=[[0 if p.dim() > 1 else 1 for p in layer] for layer in layers])
    with pytest.raises(ValueError, match=r"weight_decay gives 1 values .* groups 0\.\.1"):
        FusedSGD(store, weight_decay=(0.1,))
    with pytest.raises(ValueError, match=r"weight_decay must be a finite number >= 0.*-0\.1"):
        FusedAdamW(store, weight_decay=(0.1, -0.1))
    # A checkpoint of the same store loads; one of a store laid out without the groups does not (other sizes).
    optimizer = FusedAdamW(store, weight_decay=DECAYS)
    optimizer.load_state_dict(optimizer.state_dict())
    other = FusedAdamW(FlatParameterStore(make_layers(MODEL_LAYERS, "cpu", seed=34)), weight_decay=0.0)
    with pytest.raises(ValueError, match="another parameter layout"):
        optimizer.load_state_dict(other.state_dict())
    assert optimizer.options.weight_decay == DECAYS, "a refused checkpoint changed the options"


# The classifier layer (index 3) sits out steps 0, 1, 3 and 5 (a branch not taken), after a user's
# zero_grad(set_to_none=True): torch.optim skips a parameter whose gradient is None (no decay, no momentum, no
# step counted); the fused step must leave it alone too. Its first step comes late, at the model's third.
SITTING_LAYER = 3
SITS_OUT_AT = {0, 1, 3, 5}


@pytest.mark.parametrize("what", ["layer", "weight"])
@pytest.mark.parametrize("variant", ["sgd_nesterov_wd", "sgd_dampening", "adamw"])
def test_a_parameter_without_a_gradient_is_left_alone_as_torch_optim_does(device: str, variant: str, what: str) -> None:
    """``what``: the whole classifier layer sits out (then every parameter matches torch.optim at every step), or
    its weight alone (the layer's count, advanced by the bias, then stands for the weight's: AdamW's bias corrections
    and SGD's late first momentum buffer with dampening differ from torch.optim's for that weight, see the README)."""
    optimizer, hyper, _ = VARIANTS[variant]
    layers = make_layers(MODEL_LAYERS, device, seed=41)
    torch_layers = clone_layers(layers)
    store = FlatParameterStore(layers)
    fused = _fused(optimizer, store, hyper)
    factors = [1.0] * store.n_layers
    reference = _torch_optimizer(optimizer, torch_layers, factors, hyper)
    lr_factors = torch.ones(store.n_layers, dtype=torch.float32, device=device)
    codes = torch.tensor([1, 0, 2, 1, 0], dtype=torch.int32, device=device)  # the classifier keeps a bf16 copy
    store.refresh_low_precision(codes.tolist())  # as the engine does before the first forward
    generator = torch.Generator().manual_seed(42)
    params = [p for layer in layers for p in layer]
    torch_params = [q for layer in torch_layers for q in layer]
    sitting_out = layers[SITTING_LAYER] if what == "layer" else layers[SITTING_LAYER][:1]
    state_name = "momentum_buffer" if optimizer == "sgd" else "exp_avg"
    exact = what == "layer" or variant == "sgd_nesterov_wd"
    for step in range(7):
        lr = 0.01 * (1.0 + 0.1 * step)
        for group in reference.param_groups:
            group["lr"] = lr
        for p in params:
            p.grad = None  # optimizer.zero_grad(set_to_none=True)
        store.rebind_grads()
        sits = step in SITS_OUT_AT
        loss = torch.zeros((), device=device)
        for p, q in zip(params, torch_params, strict=True):
            g = torch.randn(p.shape, generator=generator).to(device)
            if sits and any(p is idle for idle in sitting_out):
                q.grad = None
                continue
            loss = loss + (p * g).sum()  # autograd accumulates g into the view, as a real backward does
            q.grad = g.clone()
        loss.backward()
        views = store.param_views(getattr(fused, state_name), SITTING_LAYER)
        before = [(p.detach().clone(), views[j].clone()) for j, p in enumerate(sitting_out)]
        fused.step(lr, lr_factors, codes)
        reference.step()
        if sits:  # untouched: weights, optimizer state and 16-bit copy
            copies = store.low_precision_params(SITTING_LAYER, torch.bfloat16)
            for j, (p, (weight, state)) in enumerate(zip(sitting_out, before, strict=True)):
                assert_bits_equal(p.detach(), weight, f"{variant} step {step}: parameter {j} sitting out")
                assert_bits_equal(views[j], state, f"{variant} step {step}: its {state_name}")
                assert_bits_equal(copies[j], p.detach().to(torch.bfloat16), f"{variant} step {step}: its bf16 copy")
        for i, (layer, torch_layer) in enumerate(zip(layers, torch_layers, strict=True)):
            for j, (p, q) in enumerate(zip(layer, torch_layer, strict=True)):
                if not exact and p is sitting_out[0] and step >= 2:
                    continue  # its own count differs from its layer's: see the docstring
                assert_close(p, q, f"{variant}/{what} step {step} layer {i} param {j}")
    counts = fused.layer_step_counts.tolist()
    sat_out = len(SITS_OUT_AT) if what == "layer" else 0
    assert counts == [7.0, 7.0, 7.0, 7.0 - sat_out, 7.0], counts
    assert float(fused.step_count) == 7.0
    if not exact:  # the weight moved on the steps it took part in
        assert not torch.equal(sitting_out[0].detach(), make_layers(MODEL_LAYERS, device, seed=41)[SITTING_LAYER][0])
    store.remove_grad_hooks()
    assert store.take_params_without_grad() == []


@pytest.mark.usefixtures("reference_path")
def test_cpu_reference_path_leaves_a_parameter_without_a_gradient_alone() -> None:
    test_a_parameter_without_a_gradient_is_left_alone_as_torch_optim_does("cpu", "adamw", "layer")


@pytest.mark.parametrize("built_with_momentum", [False, True])
def test_an_sgd_checkpoint_brings_its_momentum_buffer_or_leaves_none(built_with_momentum: bool) -> None:
    """A checkpoint with momentum loads into a FusedSGD built without (and one without into one with): the next steps
    match the checkpoint's optimizer exactly, as torch.optim.SGD's load_state_dict does.

    Before the fix, the optimizer built without momentum kept the params as its (unused) buffer, loaded momentum 0.9
    and skipped the checkpoint's buffer: the kernel then wrote the momentum buffer into the weights."""
    source_momentum = 0.0 if built_with_momentum else 0.9
    source_store = FlatParameterStore(make_layers(MODEL_LAYERS, "cpu", seed=61))
    source = FusedSGD(source_store, momentum=source_momentum)
    generator = torch.Generator().manual_seed(62)
    fill_grads(source_store, generator)
    source.step(0.1)
    store = FlatParameterStore(make_layers(MODEL_LAYERS, "cpu", seed=61))
    store.params.copy_(source_store.params)
    loaded = FusedSGD(store, momentum=0.9 - source_momentum)
    loaded.load_state_dict(source.state_dict())
    assert loaded.options.momentum == source_momentum
    assert (loaded.momentum_buffer is store.params) == (source_momentum == 0.0)
    for _ in range(2):
        fill_grads(source_store, generator)
        store.grads.copy_(source_store.grads)
        source.step(0.1)
        loaded.step(0.1)
        assert_bits_equal(store.params, source_store.params, "params after loading the checkpoint")


def test_an_sgd_checkpoint_taken_while_a_schedule_holds_momentum_at_0_keeps_its_buffer() -> None:
    """A schedule holding the momentum at 0 (OneCycleLR's ``base_momentum=0``) leaves the buffer unread; a checkpoint
    then, loaded (a resume, or a rollback to a copy taken then), dropped it, and every step after the momentum came
    back raised. Now the steps go on as torch.optim.SGD's, which keeps the buffer through the same sequence."""
    store = FlatParameterStore(make_layers(MODEL_LAYERS, "cpu", seed=64))
    params = [p for layer in make_layers(MODEL_LAYERS, "cpu", seed=64) for p in layer]
    n_layers = len(MODEL_LAYERS)

    def views(buffer: torch.Tensor) -> list[torch.Tensor]:
        return [view for layer in range(n_layers) for view in store.param_views(buffer, layer)]

    reference = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    fused = FusedSGD(store, momentum=0.9)
    generator = torch.Generator().manual_seed(65)

    def step(momentum: float) -> None:
        fused.options = SGDOptions(momentum=momentum)
        reference.param_groups[0]["momentum"] = momentum
        fill_grads(store, generator)
        for p, view in zip(params, views(store.grads), strict=True):
            p.grad = view.clone()
        fused.step(0.1)
        reference.step()

    for momentum in (0.9, 0.9, 0.0):
        step(momentum)
    state = fused.state_dict()
    assert "momentum_buffer" in state and state["options"]["momentum"] == 0.0
    fused.load_state_dict({key: value.clone() if torch.is_tensor(value) else value for key, value in state.items()})
    assert fused.momentum_buffer is not store.params
    for momentum in (0.0, 0.9, 0.9):
        step(momentum)
    for p, view in zip(params, views(store.params), strict=True):
        assert_close(view, p, "params after loading a checkpoint taken at momentum 0")


def _run_nesterov_through_momentum_0(device: str) -> None:
    """Nesterov SGD whose momentum a schedule takes to 0 and back (OneCycleLR's ``base_momentum=0``), against torch."""
    from dataclasses import replace

    shapes = [[(6, 5), (6,)], [(3,)]]
    store = FlatParameterStore(make_layers(shapes, device, seed=71))
    params = [p for layer in make_layers(shapes, device, seed=71) for p in layer]
    reference = torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True)
    fused = FusedSGD(store, momentum=0.9, nesterov=True)
    generator = torch.Generator().manual_seed(72)
    for momentum in (0.9, 0.0, 0.0, 0.9):
        fused.options = replace(fused.options, momentum=momentum)  # as the engine follows a schedule
        reference.param_groups[0]["momentum"] = momentum
        for p, view in zip(
            params, (v for i in range(len(shapes)) for v in store.param_views(store.grads, i)), strict=True
        ):
            view.copy_(torch.randn(view.shape, generator=generator).to(device))
            p.grad = view.clone()
        fused.step(0.1)
        reference.step()
    for p, view in zip(
        params, (v for i in range(len(shapes)) for v in store.param_views(store.params, i)), strict=True
    ):
        assert_close(view, p, "params after a nesterov momentum schedule through 0")


def test_nesterov_sgd_steps_as_torch_through_a_momentum_of_0(device: str) -> None:
    """Before the fix, SGDOptions refused nesterov at momentum 0 on every options object: the engine's ``replace``
    for a schedule reaching 0 raised mid-run, where torch.optim.SGD (which checks only when built) steps plain SGD."""
    _run_nesterov_through_momentum_0(device)


@pytest.mark.usefixtures("reference_path")
def test_cpu_reference_path_steps_nesterov_sgd_through_a_momentum_of_0() -> None:
    _run_nesterov_through_momentum_0("cpu")


def test_nesterov_is_refused_when_built_without_momentum_or_with_dampening() -> None:
    store = FlatParameterStore([[torch.nn.Parameter(torch.zeros(3))]])
    with pytest.raises(
        ValueError, match=r"nesterov needs momentum > 0 and dampening == 0 .*got momentum 0\.9 and dampening 0\.1"
    ):
        FusedSGD(store, momentum=0.9, dampening=0.1, nesterov=True)


def test_sgd_without_a_momentum_buffer_refuses_a_momentum_set_later() -> None:
    """Momentum set on an optimizer built without (as a momentum schedule would) is refused, nothing written.

    Before the fix, the params stood in for the missing buffer and the kernel wrote the buffer into them."""
    store = FlatParameterStore(make_layers(MODEL_LAYERS, "cpu", seed=63))
    optimizer = FusedSGD(store)
    optimizer.options = SGDOptions(momentum=0.9)
    store.grads.normal_()
    before = store.params.clone()
    with pytest.raises(ValueError, match=r"momentum is 0\.9, but this FusedSGD keeps no momentum buffer"):
        optimizer.step(0.1)
    assert torch.equal(store.params, before)


def test_fused_sgd_step_refuses_a_momentum_buffer_sharing_the_params() -> None:
    """The kernel writes params and buffer element by element: one memory for both is refused by name."""
    from triaccel_rl.kernels import fused_sgd_step, layer_grad_stats, new_step_state

    store = FlatParameterStore(make_layers(MODEL_LAYERS, "cpu", seed=64))
    stats = layer_grad_stats(store.grads, store.chunk_layer, store.n_layers)
    codes = torch.zeros(store.n_layers, dtype=torch.int32)
    step_state = new_step_state("cpu", n_layers=store.n_layers)
    args = (store.bf16_copy, store.fp16_copy, store.chunk_layer, torch.ones(store.n_layers), codes, stats, step_state)
    with pytest.raises(ValueError, match="state 0 shares memory with params"):
        fused_sgd_step(store.params, store.grads, store.params, *args, lr=0.1, momentum=0.9)
    fused_sgd_step(store.params, store.grads, store.params, *args, lr=0.1)  # without momentum it is never read


def test_a_checkpoint_of_other_parameter_shapes_of_the_same_layer_sizes_is_refused() -> None:
    """A layer of a (3,) and a (5,) parameter against one of a (5,) and a (3,): the layer sizes and buffer lengths
    agree, the elements do not. Before the fix the state loaded, each parameter taking another's moments."""
    source = FusedAdamW(FlatParameterStore(make_layers([[(3,), (5,)]], "cpu", seed=71)))
    source.store.grads.normal_()
    source.step(0.1)
    target = FusedAdamW(FlatParameterStore(make_layers([[(5,), (3,)]], "cpu", seed=71)))
    with pytest.raises(
        ValueError, match=r"parameter 0 \(in the store's order\) has shape \(3,\) at element 0 there, \(5,\) at"
    ):
        target.load_state_dict(source.state_dict())
    assert not target.exp_avg.any() and float(target.step_count) == 0.0, "a refused checkpoint changed the state"
    older = {key: value for key, value in source.state_dict().items() if key != "param_layout"}
    FusedAdamW(FlatParameterStore(make_layers([[(3,), (5,)]], "cpu", seed=71))).load_state_dict(older)


@pytest.mark.parametrize("saved_channels_last", [False, True])
def test_a_checkpoint_loads_into_a_model_of_the_other_memory_format(saved_channels_last: bool) -> None:
    """The moments follow each element, not its place in memory: a run saved channels-last resumes contiguous (and
    the other way) and steps exactly as the run it came from. Before the fix the flat state loaded as it was, each
    conv weight's moments permuted against its elements."""

    def conv_layers(channels_last: bool) -> list[list[torch.nn.Parameter]]:
        layers = make_layers([[(4, 3, 2, 2), (4,)], [(5,)]], "cpu", seed=72)
        if channels_last:
            layers[0][0] = torch.nn.Parameter(layers[0][0].detach().to(memory_format=torch.channels_last))
        return layers

    generator = torch.Generator().manual_seed(73)
    stores = [
        FlatParameterStore(conv_layers(saved_channels_last)),
        FlatParameterStore(conv_layers(not saved_channels_last)),
    ]
    optimizers = [FusedAdamW(store) for store in stores]
    fill_grads(stores[0], generator)
    optimizers[0].step(0.1)
    params, resumed_params = ([p for layer in store.layers for p in layer] for store in stores)
    for mine, theirs in zip(resumed_params, params, strict=True):
        mine.data.copy_(theirs.detach())
    saved = io.BytesIO()
    torch.save(optimizers[0].state_dict(), saved)
    saved.seek(0)
    optimizers[1].load_state_dict(torch.load(saved, weights_only=True))  # plain data: the safe loader takes it
    for _ in range(2):
        for store in stores:
            store.zero_grad()
        for p, q in zip(params, resumed_params, strict=True):
            g = torch.randn(p.shape, generator=generator)
            p.grad.copy_(g)
            q.grad.copy_(g)
        for optimizer in optimizers:
            optimizer.step(0.1)
        for p, q in zip(params, resumed_params, strict=True):
            assert torch.equal(p.detach(), q.detach()), "the resumed run of the other memory format diverged"
    assert stores[1].layers[0][0].is_contiguous(memory_format=torch.channels_last) != saved_channels_last


def test_a_skip_flag_of_any_one_element_shape_skips_and_the_gradient_rows_stay() -> None:
    """A (1, 1) flag passed the argument check and then failed in the add; the per-layer rows are the gradient's."""
    p = torch.nn.Parameter(torch.ones(10))
    store = FlatParameterStore([[p]])
    optimizer = FusedSGD(store, momentum=0.9)
    p.grad.fill_(1.0)
    for shape in ((), (1,), (1, 1)):
        result = optimizer.step(0.1, skip=torch.ones(shape, dtype=torch.bool))
        assert bool(result.skipped) and int(result.nonfinite_total) == 1 and int(result.grad_nonfinite.sum()) == 0
    assert torch.equal(p.detach(), torch.ones(10)) and float(optimizer.step_count) == 0.0


def test_flat_store_names_what_a_layer_holds_instead_of_parameters() -> None:
    """A module in place of its parameters raised "'Linear' object has no attribute 'shape'", generators "has no
    len()" (and were used up), and fractional group ids were cut (0.5 and 1.9 became groups 0 and 1)."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    with pytest.raises(ValueError, match=r"layers must hold parameters \(tensors\), got Linear: give each layer's"):
        FlatParameterStore([[model[0]], [model[1]]])  # type: ignore[list-item]
    store = FlatParameterStore([m.parameters() for m in model.children()])  # type: ignore[misc]
    assert store.n_layers == 2 and [len(store.param_views(store.params, i)) for i in range(2)] == [2, 2]
    assert torch.equal(store.param_views(store.params, 1)[0], model[1].weight.detach())
    for bad in ([[0.5, 1.9], [0, 0]], [[True, 0], [0, 0]]):
        with pytest.raises(ValueError, match="groups must be non-negative ints"):
            FlatParameterStore([list(m.parameters()) for m in model.children()], groups=bad)  # type: ignore[arg-type]


def _run_dampened_sgd_through_a_momentum_schedule_from_0(device: str) -> None:
    """Dampened SGD whose momentum starts at 0 (a schedule; OneCycleLR's ``base_momentum=0``), against torch.

    Two steps at momentum 0, a skipped step (non-finite gradient) at 0.9, then momentum: torch.optim.SGD starts the
    buffer at the first step that uses momentum, with the undampened gradient. The optimizer is checkpointed and
    rebuilt from the checkpoint before the momentum starts, and the momentum goes back to 0 and returns (torch
    carries on from the buffer it kept)."""
    shapes = [[(6, 5), (6,)], [(3,)]]
    store = FlatParameterStore(make_layers(shapes, device, seed=81))
    params = [p for layer in make_layers(shapes, device, seed=81) for p in layer]
    reference = torch.optim.SGD(params, lr=0.1, momentum=0.9, dampening=0.5)
    fused = FusedSGD(store, momentum=0.9, dampening=0.5)
    generator = torch.Generator().manual_seed(82)

    def views(buffer: torch.Tensor) -> list[torch.Tensor]:
        return [view for layer in range(len(shapes)) for view in store.param_views(buffer, layer)]

    for step, momentum in enumerate((0.0, 0.0, 0.9, 0.9, 0.9, 0.0, 0.9)):
        if step == 2:  # a resume: the steps before the momentum started must come with the checkpoint
            state = fused.state_dict()
            fused = FusedSGD(store, momentum=0.9, dampening=0.5)
            fused.load_state_dict(state)
        fused.options = SGDOptions(momentum=momentum, dampening=0.5)
        reference.param_groups[0]["momentum"] = momentum
        for p, view in zip(params, views(store.grads), strict=True):
            view.copy_(torch.randn(view.shape, generator=generator).to(device))
            p.grad = view.clone()
        if step == 2:  # skipped: no buffer starts, no count moves
            store.grads[0] = math.inf
            assert bool(fused.step(0.1).skipped)
            continue
        fused.step(0.1)
        reference.step()
        for p, view in zip(params, views(store.params), strict=True):
            assert_close(view, p, f"params after step {step} at momentum {momentum}")
    assert fused.state_dict()["steps_before_momentum"].tolist() == [2.0, 2.0]


def test_dampened_sgd_starts_its_momentum_buffer_as_torch_under_a_schedule_from_0(device: str) -> None:
    """Before the fix, the kernel started the buffer at a layer's first applied step, momentum or not: its first step
    with momentum took the dampened branch (0.5 x the gradient into a zero buffer), where torch.optim.SGD takes the
    gradient whole, and the weights drifted apart from then on."""
    _run_dampened_sgd_through_a_momentum_schedule_from_0(device)


@pytest.mark.usefixtures("reference_path")
def test_cpu_reference_path_starts_a_dampened_momentum_buffer_as_torch_under_a_schedule_from_0() -> None:
    _run_dampened_sgd_through_a_momentum_schedule_from_0("cpu")


def test_an_sgd_checkpoint_without_steps_before_momentum_still_loads() -> None:
    """A checkpoint from before the field: every layer's buffer started at its first step (0 steps before), and a
    field of the wrong length is refused by name, nothing changed."""
    store = FlatParameterStore(make_layers(MODEL_LAYERS, "cpu", seed=83))
    fused = FusedSGD(store, momentum=0.9, dampening=0.5)
    fused.options = SGDOptions(momentum=0.0, dampening=0.5)
    fill_grads(store, torch.Generator().manual_seed(84))
    fused.step(0.1)
    state = fused.state_dict()
    assert state["steps_before_momentum"].tolist() == [1.0] * len(MODEL_LAYERS)
    with pytest.raises(ValueError, match=r"steps_before_momentum has shape \(2,\); this store has 5 layers"):
        fused.load_state_dict({**state, "steps_before_momentum": torch.zeros(2, dtype=torch.float64)})
    assert fused.state_dict()["steps_before_momentum"].tolist() == [1.0] * len(MODEL_LAYERS)
    fused.load_state_dict({key: value for key, value in state.items() if key != "steps_before_momentum"})
    assert fused.state_dict()["steps_before_momentum"].tolist() == [0.0] * len(MODEL_LAYERS)


def test_a_weight_decay_set_short_after_construction_is_refused_before_anything_moves():
    """Options set after construction (as a schedule's are) were not checked against the store's groups: a decay
    tuple one short raised an IndexError in the update, after the record of the parameters without a gradient was
    taken, and the retried step decayed a parameter that got none (torch.optim leaves it alone)."""
    from dataclasses import replace

    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    store = FlatParameterStore([[a], [b]], groups=[[0], [1]])
    optimizer = FusedSGD(store, momentum=0.9, weight_decay=(0.5, 0.5))
    optimizer.options = replace(optimizer.options, weight_decay=(0.5,))
    store.zero_grad()
    a.grad.fill_(1.0)
    b.grad = None
    store.rebind_grads(after_backward=True)
    with pytest.raises(ValueError, match=r"weight_decay gives 1 values \(one a group\)"):
        optimizer.step(0.1)
    optimizer.options = replace(optimizer.options, weight_decay=(0.5, 0.5))
    optimizer.step(0.1)
    assert b.detach().tolist() == [1.0] * 3 and a.detach().tolist() == torch.full((3,), 0.85).tolist()


@pytest.mark.parametrize("value", [-1.0, 0.0, math.inf, math.nan])
def test_an_inv_scale_tensor_out_of_range_is_refused_on_the_cpu_as_a_float_is(value):
    """A float -1 was refused, the same as a CPU tensor stepped up the gradient (weights 1.09 where 0.89 was due)."""
    p = torch.nn.Parameter(torch.ones(4))
    optimizer = FusedSGD(FlatParameterStore([[p]]), weight_decay=0.1)
    p.grad.fill_(1.0)
    with pytest.raises(ValueError, match=r"^inv_scale must be a finite number > 0 \(1 / the loss scale\); got tensor"):
        optimizer.step(0.1, inv_scale=torch.tensor(value))
    assert p.detach().tolist() == [1.0] * 4


def test_a_strided_steps_before_momentum_is_refused_by_name():
    """The kernel reads and writes it at ``ptr + layer``: a strided view was read at the wrong elements (a layer took
    the dampened branch) and written at the wrong ones, where the reference path read it by its strides."""
    from triaccel_rl.kernels import fused_sgd_step, layer_grad_stats, new_step_state

    segment, n_layers = 16, 3
    n = segment * n_layers
    chunk = torch.arange(n_layers, dtype=torch.int32)
    params, grads = torch.zeros(n), torch.ones(n)
    stats = layer_grad_stats(grads, chunk, n_layers, segment_align=segment)
    backing = torch.full((2 * n_layers,), 5.0, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"steps_before_momentum must be contiguous float64 .* strides \(2,\)"):
        fused_sgd_step(
            params, grads, torch.zeros(n), torch.zeros(n, dtype=torch.bfloat16), torch.zeros(n, dtype=torch.float16),
            chunk, torch.ones(n_layers), torch.zeros(n_layers, dtype=torch.int32), stats,
            new_step_state("cpu", n_layers=n_layers), lr=1.0, momentum=0.9, dampening=0.5,
            steps_before_momentum=backing[::2], segment_align=segment,
        )  # fmt: skip
    assert params.tolist() == [0.0] * n


def test_options_store_one_element_tensors_as_floats_and_refuse_larger_ones():
    """torch.optim takes tensor betas: as kernel scalars they failed with a Triton type error (until 2026-12-06)."""
    adamw = AdamWOptions(torch.tensor(0.5), torch.tensor(0.25), torch.tensor(0.125), torch.tensor(0.0625))
    assert (adamw.beta1, adamw.beta2, adamw.eps, adamw.weight_decay) == (0.5, 0.25, 0.125, 0.0625)
    assert all(type(value) is float for value in (adamw.beta1, adamw.beta2, adamw.eps, adamw.weight_decay))
    sgd = SGDOptions(torch.tensor(0.5), torch.tensor(0.25), torch.tensor(0.125))
    assert (sgd.momentum, sgd.dampening, sgd.weight_decay) == (0.5, 0.25, 0.125)
    assert all(type(value) is float for value in (sgd.momentum, sgd.dampening, sgd.weight_decay))
    with pytest.raises(
        ValueError, match=r"beta1 must be a number or a one-element tensor, got a tensor of shape \(2,\)"
    ):
        AdamWOptions(beta1=torch.tensor([0.9, 0.9]))
    with pytest.raises(ValueError, match=r"momentum must be a number or a one-element tensor"):
        SGDOptions(momentum=torch.zeros(3))


def test_fused_adamw_with_tensor_betas_steps_as_with_floats():
    layers = make_layers([[(5,), (3,)]], "cpu")
    twin = clone_layers(layers)
    results = []
    for params, betas in ((layers, (torch.tensor(0.9), torch.tensor(0.99))), (twin, (0.9, 0.99))):
        store = FlatParameterStore(params)
        optimizer = FusedAdamW(store, beta1=betas[0], beta2=betas[1], eps=torch.tensor(1e-8))
        fill_grads(store, torch.Generator().manual_seed(1))
        optimizer.step(lr=0.01)
        results.append(store.params.clone())
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("make", [lambda s: FusedSGD(s, momentum=0.9), lambda s: FusedAdamW(s)], ids=["sgd", "adamw"])
def test_a_layer_sitting_out_gets_its_copy_in_the_code_it_takes_that_step(make, shared):
    """A layer without a gradient whose code changes that step: its copy is its restored weights in the new type.

    The copies were restored with the weights, so the layer kept the copy from before the change (zeros, new to bf16)
    until 2026-12-06. A fp32 layer's copy, and every copy on a skipped step, stays as it was.
    """
    torch.manual_seed(0)
    a, b, c = (torch.nn.Parameter(torch.randn(5)) for _ in range(3))
    store = FlatParameterStore([[a], [b], [c]], shared_copy=shared)
    optimizer = make(store)
    (a.sum() + b.sum() + c.sum()).backward()
    optimizer.step(0.1)  # every layer fp32: no copy written
    store.zero_grad()
    for dtype, code in ((torch.bfloat16, 1), (torch.float16, 2)):
        before = store.bf16_copy.view(torch.int16).clone()
        a.grad = b.grad = c.grad = None
        store.rebind_grads()
        a.sum().backward()  # b and c sit the step out; b changes to bf16 or fp16, c stays fp32
        weights = b.detach().clone()
        result = optimizer.step(0.1, precision_codes=torch.tensor([0, code, 0], dtype=torch.int32))
        assert not bool(result.skipped) and torch.equal(b.detach(), weights)
        assert_bits_equal(store.low_precision_params(1, dtype)[0], weights.to(dtype), "the restored copy")
        assert torch.equal(store.param_slice(store.bf16_copy.view(torch.int16), 2), store.param_slice(before, 2))
        # A skipped step (an infinite gradient in layer 0) leaves the copies as they were, the restored one's too.
        store.zero_grad()
        after = store.bf16_copy.view(torch.int16).clone(), store.fp16_copy.view(torch.int16).clone()
        a.grad = b.grad = c.grad = None
        store.rebind_grads()
        (a.sum() * math.inf).backward()
        other = 2 if code == 1 else 1
        result = optimizer.step(0.1, precision_codes=torch.tensor([0, other, 0], dtype=torch.int32))
        assert bool(result.skipped)
        assert torch.equal(store.bf16_copy.view(torch.int16), after[0])
        assert torch.equal(store.fp16_copy.view(torch.int16), after[1])
        store.zero_grad()

"""Tests for triaccel_rl.engine.StepEngine: gradient statistics, non-finite skips, loss scaling, LRs, moments."""

from __future__ import annotations

import copy
import io
import math
import re
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from triaccel_rl.engine import StepEngine, check_precision_supported, layer_parameters
from triaccel_rl.types import Precision

CPU = torch.device("cpu")
MOMENTUM = 0.9


def tiny_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def sgd_engine(model: nn.Module | None = None, lr: float = 0.1) -> tuple[nn.Module, StepEngine]:
    model = model if model is not None else tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM)
    return model, StepEngine(model, optimizer, CPU)


def batch(seed: int, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=generator), torch.randn(n, 2, generator=generator)


def loss_of(model: nn.Module, engine: StepEngine, seed: int, scale: float = 1.0) -> torch.Tensor:
    x, y = batch(seed)
    with engine.precision.context():
        out = model(x)
    return (out.float() - y).pow(2).mean() * scale


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[list[torch.Tensor], dict[str, Any]]:
    params = [p.detach().clone() for p in model.parameters()]
    state = {
        str(i): {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
        for i, s in optimizer.state_dict()["state"].items()
    }
    return params, state


def assert_unchanged(model: nn.Module, optimizer: torch.optim.Optimizer, before: tuple[list, dict]) -> None:
    params, state = before
    for old, new in zip(params, model.parameters(), strict=True):
        assert torch.equal(old, new), "a parameter changed on a skipped step"
    now = {str(i): s for i, s in optimizer.state_dict()["state"].items()}
    assert now.keys() == state.keys()
    for key, entries in state.items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, now[key][name]), f"optimizer state {key}/{name} changed on a skipped step"
            else:
                assert value == now[key][name]


def warm_up(model: nn.Module, engine: StepEngine, n_steps: int = 3) -> None:
    for seed in range(n_steps):
        _, skipped = engine.backward_and_step(loss_of(model, engine, seed))
        assert not skipped


# ---------------------------------------------------------------- gradient statistics


def test_grad_stats_exact_on_set_gradients() -> None:
    model, engine = sgd_engine()
    first, last = model[0], model[2]
    # Integer gradients whose per-parameter squared sums are perfect squares: the norm-based sum is exact.
    first.weight.grad = torch.tensor([[3.0, 0, 0], [0, -4, 0], [0, 0, 0], [0, 0, 0]])  # 25
    first.bias.grad = torch.tensor([1.0, -2.0, 2.0, 0.0])  # 9
    last.weight.grad = torch.tensor([[2.0, -6.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0]])  # 49
    last.bias.grad = None  # no gradient counts as zeros
    stats = engine.grad_stats()
    assert stats.sq_sum.tolist() == [34.0, 49.0]
    assert stats.abs_max.tolist() == [4.0, 6.0]
    assert stats.nonfinite.tolist() == [0.0, 0.0]
    assert stats.sq_sum.dtype == torch.float32


def test_grad_stats_counts_nonfinite_per_layer() -> None:
    model, engine = sgd_engine()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model[0].weight.grad[1, 2] = float("nan")
    model[0].bias.grad[0] = float("inf")
    model[2].weight.grad[0, 0] = float("-inf")
    model[2].bias.grad[:] = float("nan")
    stats = engine.grad_stats()
    assert stats.nonfinite.tolist() == [2.0, 3.0]
    assert not torch.isfinite(stats.sq_sum).any()


def test_grad_stats_exact_from_backward() -> None:
    # One Linear(3, 1) and loss = sum of outputs: dW = column sums of x, db = batch size. With
    # x = [[1, 1, 1], [0, 1, 1]]: dW = [1, 2, 2] (|dW|^2 = 9), db = [2] (4).
    model = nn.Sequential(nn.Linear(3, 1))
    _, engine = sgd_engine(model)
    stats, skipped = engine.backward_and_step(model(torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 1.0]])).sum())
    assert not skipped
    assert stats.sq_sum.tolist() == [13.0]
    assert stats.abs_max.tolist() == [2.0]
    assert stats.nonfinite.tolist() == [0.0]


def test_grad_stats_match_float64_reference_after_backward() -> None:
    model, engine = sgd_engine()
    reference = tiny_model().double()
    x, y = batch(1)
    (reference(x.double()) - y.double()).pow(2).mean().backward()
    stats, _ = engine.backward_and_step((model(x) - y).pow(2).mean())
    expected_sq = [
        sum(float(p.grad.square().sum()) for p in layer.parameters()) for layer in (reference[0], reference[2])
    ]
    expected_max = [
        max(float(p.grad.abs().max()) for p in layer.parameters()) for layer in (reference[0], reference[2])
    ]
    # float32 backward and a sqrt-then-square round trip against float64: agreement to float32 precision.
    np.testing.assert_allclose(stats.sq_sum.numpy(), expected_sq, rtol=1e-5)
    np.testing.assert_allclose(stats.abs_max.numpy(), expected_max, rtol=1e-5)
    assert stats.nonfinite.tolist() == [0.0, 0.0]


def test_step_zeroes_gradients_in_place() -> None:
    model, engine = sgd_engine()
    engine.backward_and_step(loss_of(model, engine, 0))
    for p in model.parameters():
        assert p.grad is not None
        assert torch.equal(p.grad, torch.zeros_like(p))


# ---------------------------------------------------------------- non-finite skips


def test_nan_loss_skips_and_leaves_params_and_state_bitwise() -> None:
    model, engine = sgd_engine()
    warm_up(model, engine)  # momentum buffers exist
    before = snapshot(model, engine.optimizer)
    stats, skipped = engine.backward_and_step(loss_of(model, engine, 10) * float("nan"))
    assert skipped
    assert stats.nonfinite[1].item() == 4 * 2 + 2  # the whole last layer's gradient is NaN
    assert_unchanged(model, engine.optimizer, before)
    # The run goes on: the next finite step updates again.
    _, skipped = engine.backward_and_step(loss_of(model, engine, 11))
    assert not skipped
    assert not torch.equal(before[0][0], model[0].weight)


def test_nan_loss_on_first_step_creates_no_state() -> None:
    model, engine = sgd_engine()
    before = snapshot(model, engine.optimizer)
    _, skipped = engine.backward_and_step(loss_of(model, engine, 0) * float("nan"))
    assert skipped
    assert_unchanged(model, engine.optimizer, before)
    assert len(engine.optimizer.state) == 0


def test_inf_in_one_gradient_skips() -> None:
    model, engine = sgd_engine()
    warm_up(model, engine)
    before = snapshot(model, engine.optimizer)

    def poison(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[1, 3] = float("inf")
        return grad

    handle = model[2].weight.register_hook(poison)
    stats, skipped = engine.backward_and_step(loss_of(model, engine, 10))
    handle.remove()
    assert skipped
    assert stats.nonfinite.tolist() == [0.0, 1.0]
    assert_unchanged(model, engine.optimizer, before)


def test_fp16_layer_uses_grad_scaler_and_halves_on_overflow() -> None:
    model, engine = sgd_engine()
    assert engine.grad_scaler is None
    engine.set_precisions(["fp16", "fp32"])
    scaler = engine.grad_scaler
    assert scaler is not None
    assert engine.grad_scaler is scaler  # one scaler, kept across steps
    initial = scaler.get_scale()
    assert initial == 65536.0
    # A small loss keeps the scaled fp16 gradients in range: a normal step, scale kept.
    _, skipped = engine.backward_and_step(loss_of(model, engine, 0, scale=1e-3))
    assert not skipped
    assert scaler.get_scale() == initial
    before = snapshot(model, engine.optimizer)
    handle = model[0].weight.register_hook(lambda grad: grad * float("inf"))
    stats, skipped = engine.backward_and_step(loss_of(model, engine, 1, scale=1e-3))
    handle.remove()
    assert skipped
    # The first layer's 12 weight gradients are all non-finite (inf, or 0 * inf = NaN); its bias and the last layer
    # (whose gradients the hook does not touch) stay finite.
    assert stats.nonfinite.tolist() == [12.0, 0.0]
    assert scaler.get_scale() == initial / 2
    assert_unchanged(model, engine.optimizer, before)
    # Back to fp32: no scaler.
    engine.set_precisions(["fp32", "fp32"])
    assert engine.grad_scaler is None


def test_gradients_reported_unscaled_under_fp16() -> None:
    model, engine = sgd_engine()
    reference_model, reference_engine = sgd_engine()
    reference_engine.set_precisions(["fp32", "fp32"])
    engine.set_precisions(["fp32", "fp16"])  # fp16 only on the last layer: the first layer's grad is fp32 maths
    stats, _ = engine.backward_and_step(loss_of(model, engine, 0, scale=1e-3))
    reference, _ = reference_engine.backward_and_step(loss_of(reference_model, reference_engine, 0, scale=1e-3))
    # fp16 compute of the last layer perturbs the gradients at the 1e-3 level, never by the 65536 scale.
    np.testing.assert_allclose(stats.sq_sum.numpy(), reference.sq_sum.numpy(), rtol=2e-2)


def test_inf_loss_with_finite_gradients_skips_without_scaler() -> None:
    model, engine = sgd_engine()
    warm_up(model, engine)
    before = snapshot(model, engine.optimizer)
    _, skipped = engine.backward_and_step(loss_of(model, engine, 10) + torch.tensor(float("inf")))
    assert skipped
    assert_unchanged(model, engine.optimizer, before)


def test_inf_loss_with_finite_gradients_skips_with_scaler() -> None:
    model, engine = sgd_engine()
    engine.set_precisions(["fp16", "fp32"])
    warm_up(model, engine)
    before = snapshot(model, engine.optimizer)
    _, skipped = engine.backward_and_step(loss_of(model, engine, 10, scale=1e-3) + torch.tensor(float("inf")))
    assert skipped
    assert_unchanged(model, engine.optimizer, before)


def test_non_scalar_loss_raises_naming_shape() -> None:
    model, engine = sgd_engine()
    before = snapshot(model, engine.optimizer)
    x, _ = batch(0)
    with pytest.raises(ValueError, match=r"loss must be a scalar tensor; got shape \(6, 2\)"):
        engine.backward_and_step(model(x))
    with pytest.raises(ValueError, match=r"got shape \(1,\)"):
        engine.backward_and_step(model(x).sum().reshape(1))
    assert_unchanged(model, engine.optimizer, before)


# ---------------------------------------------------------------- learning rates


def test_group_lrs_exact() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    params = StepEngine.discover(model)
    optimizer = torch.optim.SGD(
        [
            {"params": params[0], "lr": 0.5, "layer": 0},
            {"params": params[2], "lr": 0.25, "layer": 2},
            {"params": params[1], "lr": 1.0},  # no "layer" key: per-layer factor not applied
        ],
        lr=0.1,
    )
    engine = StepEngine(model, optimizer, CPU)
    assert engine.group_lrs() == [0.5, 0.25, 1.0]
    engine.lr_scale = 1.5
    engine.batch_lr_gain = 2.0
    engine.lr_factors = np.array([0.25, 8.0, 4.0])
    for _ in range(2):  # reading twice does not compound: always from the groups' own LRs
        assert engine.group_lrs() == [0.375, 3.0, 3.0]
    assert [group["lr"] for group in optimizer.param_groups] == [0.5, 0.25, 1.0]  # the owner's, untouched
    optimizer.param_groups[1]["lr"] = 0.125  # as a scheduler would
    assert engine.group_lrs() == [0.375, 1.5, 3.0]


def test_step_uses_the_scaled_lr() -> None:
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)  # no momentum: p -= lr * g
    engine = StepEngine(model, optimizer, CPU)
    engine.lr_scale = 0.5
    engine.batch_lr_gain = 0.5
    before = [p.detach().clone() for p in model.parameters()]
    grads: list[torch.Tensor] = []
    handles = [p.register_hook(lambda grad: grads.append(grad.clone()) or grad) for p in model.parameters()]
    engine.backward_and_step(loss_of(model, engine, 0))
    for handle in handles:
        handle.remove()
    assert optimizer.param_groups[0]["lr"] == 0.5  # put back for the owner (a scheduler) after the update
    assert engine.group_lrs() == [0.125]
    # Hooks fire in reverse order of use: last layer's bias/weight first.
    by_shape = {tuple(g.shape): g for g in grads}
    for old, p in zip(before, model.parameters(), strict=True):
        assert torch.equal(p.detach(), old.add(by_shape[tuple(p.shape)], alpha=-0.125))


# ---------------------------------------------------------------- optimizer moments


def record_grads(model: nn.Module) -> tuple[dict[int, list[torch.Tensor]], list[Any]]:
    recorded: dict[int, list[torch.Tensor]] = {id(p): [] for p in model.parameters()}
    handles = []
    for p in model.parameters():

        def hook(grad: torch.Tensor, key: int = id(p)) -> None:
            recorded[key].append(grad.detach().double().clone())

        handles.append(p.register_hook(hook))
    return recorded, handles


def test_grad_mean_sq_norm_nan_before_first_step() -> None:
    _, engine = sgd_engine()
    assert np.isnan(engine.grad_mean_sq_norm()).all()


def test_grad_mean_sq_norm_sgd_momentum() -> None:
    model, engine = sgd_engine()
    recorded, handles = record_grads(model)
    n_steps = 4
    warm_up(model, engine, n_steps)
    for handle in handles:
        handle.remove()
    expected = []
    for layer in layer_parameters(model, engine.layers):
        total = 0.0
        for p in layer:
            # Momentum buffer by hand: buf_1 = g_1, buf_t = mu * buf_{t-1} + g_t (dampening 0).
            buf = recorded[id(p)][0]
            for grad in recorded[id(p)][1:]:
                buf = MOMENTUM * buf + grad
            assert torch.allclose(buf.float(), engine.optimizer.state[p]["momentum_buffer"], rtol=1e-5, atol=1e-7)
            total += (1 - MOMENTUM) ** 2 * float(buf.square().sum())
        expected.append(total)
    measured = engine.grad_mean_sq_norm()
    assert measured.dtype == np.float64
    # The engine sums float32 squares: agreement to float32 precision.
    np.testing.assert_allclose(measured, expected, rtol=1e-5)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize(("momentum", "dampening"), [(0.9, 0.0), (0.9, 0.9), (0.9, 0.5), (0.5, 1.0)])
def test_grad_mean_sq_norm_of_a_constant_gradient_is_its_square_with_dampening(
    fused: bool, momentum: float, dampening: float
) -> None:
    """A gradient that never changes is its own mean: after the buffer settles, |E g|^2 = |g|^2 exactly. The dampening
    was left out of the buffer's factor, so at d = mu = 0.9 the engine read 0.3 for 30 (100x low) on both paths."""
    import os

    if fused and not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("the fused step needs a GPU or Triton's interpreter")
    device = torch.device("cuda" if fused and torch.cuda.is_available() else "cpu")
    model = nn.Linear(5, 1, bias=False).to(device)
    direction = torch.arange(1.0, 6.0, device=device)  # the loss is w . c: the gradient c, |c|^2 = 55
    engine = StepEngine(model, torch.optim.SGD(model.parameters(), lr=1e-3, momentum=momentum, dampening=dampening),
                        device, fused=fused)  # fmt: skip
    for _ in range(200):  # mu^199: settled to float precision
        engine.backward_and_step((model.weight[0] * direction).sum())
    measured = engine.grad_mean_sq_norm()
    if dampening == 1.0:  # the buffer keeps the first gradient alone: no mean to read
        assert np.isnan(measured).all()
    else:
        np.testing.assert_allclose(measured, [55.0], rtol=1e-4)


def test_grad_mean_sq_norm_no_momentum_is_nan() -> None:
    model = tiny_model()
    params = StepEngine.discover(model)
    optimizer = torch.optim.SGD(
        [{"params": params[0], "momentum": MOMENTUM}, {"params": params[1], "momentum": 0.0}], lr=0.1
    )
    engine = StepEngine(model, optimizer, CPU)
    warm_up(model, engine, 2)
    measured = engine.grad_mean_sq_norm()
    # The momentum layer's running mean of the gradient is (1 - mu) * buf, as in test_grad_mean_sq_norm_sgd_momentum.
    buffers = [optimizer.state[p]["momentum_buffer"].double() for p in params[0]]
    assert measured[0] == pytest.approx((1 - MOMENTUM) ** 2 * sum(float(b.square().sum()) for b in buffers), rel=1e-6)
    assert np.isnan(measured[1])  # no momentum buffer: no running mean to read


def test_grad_mean_sq_norm_adamw_bias_corrected() -> None:
    model = tiny_model()
    betas = (0.8, 0.99)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=betas, weight_decay=0.1)
    engine = StepEngine(model, optimizer, CPU)
    recorded, handles = record_grads(model)
    n_steps = 3
    warm_up(model, engine, n_steps)
    for handle in handles:
        handle.remove()
    beta = betas[0]
    expected = []
    for layer in layer_parameters(model, engine.layers):
        total = 0.0
        for p in layer:
            exp_avg = torch.zeros_like(recorded[id(p)][0])
            for grad in recorded[id(p)]:
                exp_avg = beta * exp_avg + (1 - beta) * grad
            assert torch.allclose(exp_avg.float(), optimizer.state[p]["exp_avg"], rtol=1e-5, atol=1e-7)
            total += float(exp_avg.square().sum()) / (1 - beta**n_steps) ** 2
        expected.append(total)
    np.testing.assert_allclose(engine.grad_mean_sq_norm(), expected, rtol=1e-5)


# ---------------------------------------------------------------- device support


def test_bf16_rejected_on_cuda_without_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args, **kwargs: "Fake GPU 9000")
    with pytest.raises(ValueError, match=r"precision bf16 is not supported on Fake GPU 9000; allowed: fp32, fp16"):
        check_precision_supported(Precision.BF16, torch.device("cuda"))
    check_precision_supported(Precision.FP16, torch.device("cuda"))
    check_precision_supported(Precision.FP32, torch.device("cuda"))
    check_precision_supported(Precision.BF16, CPU)  # the CPU path never asks CUDA


def test_bf16_only_emulated_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A V100 or T4: ``is_bf16_supported()`` says yes by default (emulated), and the executor's way out of an
    overflowing fp16 then went to emulated bf16, never to fp32. Native bf16 is asked for now."""

    def emulated_only(including_emulation: bool = True) -> bool:
        return including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", emulated_only)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args, **kwargs: "Tesla V100")
    with pytest.raises(ValueError, match=r"precision bf16 is not supported on Tesla V100"):
        check_precision_supported(Precision.BF16, torch.device("cuda"))


def test_bf16_support_is_asked_of_the_run_s_device_not_the_current_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine with an A100 as cuda:0 (current) and a V100 as cuda:1: bf16 on cuda:1 was allowed."""
    import contextlib

    current = [0]

    @contextlib.contextmanager
    def on(device: torch.device):  # torch.cuda.device: makes ``device`` the current one inside
        before, current[0] = current[0], device.index
        try:
            yield
        finally:
            current[0] = before

    monkeypatch.setattr(torch.cuda, "device", on)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: current[0] == 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"GPU {torch.device(device).index}")
    check_precision_supported(Precision.BF16, torch.device("cuda:0"))
    check_precision_supported(Precision.BF16, torch.device("cuda"))  # no index: the current device
    with pytest.raises(ValueError, match=r"precision bf16 is not supported on GPU 1; allowed: fp32, fp16"):
        check_precision_supported(Precision.BF16, torch.device("cuda:1"))
    assert current == [0]  # the current device is put back


def test_bf16_allowed_on_cuda_with_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    check_precision_supported(Precision.BF16, torch.device("cuda"))


def test_set_precisions_validates() -> None:
    _, engine = sgd_engine()
    with pytest.raises(ValueError, match=r"unknown precision 'int8'"):
        engine.set_precisions(["int8", "fp32"])
    with pytest.raises(ValueError, match=r"got 3 precisions; expected 2"):
        engine.set_precisions(["fp32"] * 3)
    engine.set_precisions([Precision.BF16, 2])
    assert engine.precision.precisions == [Precision.BF16, Precision.FP16]


def test_applied_steps_count_updates_and_not_skipped_steps() -> None:
    model, engine = sgd_engine()
    assert engine.applied_steps() == 0
    engine.backward_and_step(loss_of(model, engine, 0))
    _, skipped = engine.backward_and_step(loss_of(model, engine, 1, scale=float("nan")))
    assert skipped
    engine.backward_and_step(loss_of(model, engine, 2))
    assert engine.applied_steps() == 2


@pytest.mark.parametrize("precision", [Precision.FP32, Precision.FP16])
def test_an_optimizer_step_that_raises_leaves_the_next_step_clean(precision: Precision) -> None:
    """A user's step pre-hook raises once: the step raises, and the engine is left as before it.

    Before, the update was counted as applied, the gradients stayed (to be added to the next step's), and under fp16
    the GradScaler was left after unscale_() without update(): every later step raised "unscale_() has already been
    called". Now the next step is the one a run without the failure takes from the same weights.
    """
    runs = []
    for flaky in (True, False):
        model, engine = sgd_engine()
        engine.set_precisions([precision, Precision.FP32])
        failures = [RuntimeError("a transient failure in a step hook")] if flaky else []

        def hook(*_: Any, failures: list[Exception] = failures) -> None:
            if failures:
                raise failures.pop()

        engine.optimizer.register_step_pre_hook(hook)
        if flaky:
            before = [p.detach().clone() for p in model.parameters()]
            with pytest.raises(RuntimeError, match="transient failure"):
                engine.backward_and_step(loss_of(model, engine, 0))
            assert engine.applied_steps() == 0
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
            assert all(p.grad is None or not p.grad.any() for p in model.parameters())
        engine.backward_and_step(loss_of(model, engine, 1))
        assert engine.applied_steps() == 1
        runs.append([p.detach().clone() for p in model.parameters()])
    for after_failure, clean in zip(*runs, strict=True):
        assert torch.equal(after_failure, clean)


def test_trainable_parameters_outside_the_optimizer_get_unscaled_gradients_under_fp16() -> None:
    from users_loop import unheld_gradients_under_fp16

    unheld_gradients_under_fp16(fused=False, device=CPU)


@pytest.mark.parametrize("fused", [False, True])
def test_a_step_post_hook_that_raises_after_the_update_leaves_it_counted_and_the_gradients_gone(fused: bool) -> None:
    """A post-hook runs after the update: the reference path did not count the applied update, the fused path left
    its gradients for the next step (and the loss scale unmoved). ``update_reached`` says the batch was trained on."""
    import os

    if fused and not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("the fused step needs a GPU or Triton's interpreter")
    model = tiny_model()
    engine = StepEngine(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=MOMENTUM), CPU, fused=fused)
    failures = [RuntimeError("a post-hook failed")]

    def post_hook(*_: Any) -> None:
        if failures:
            raise failures.pop()

    engine.optimizer.register_step_post_hook(post_hook)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="a post-hook failed"):
        engine.backward_and_step(loss_of(model, engine, 0))
    assert engine.update_reached and engine.applied_steps() == 1
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    engine.backward_and_step(loss_of(model, engine, 1))
    assert engine.applied_steps() == 2


def _scheduled_run(through_engine: bool, steps: int = 6) -> list[torch.Tensor]:
    """SGD with momentum under a StepLR schedule: plain torch, or through the engine at multiplier 1."""
    torch.manual_seed(0)
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.1)
    engine = StepEngine(model, optimizer, CPU) if through_engine else None
    for i in range(steps):
        if engine is None:
            optimizer.zero_grad()
            x, y = batch(i)
            (model(x) - y).pow(2).mean().backward()
            optimizer.step()
        else:
            engine.backward_and_step(loss_of(model, engine, i))
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * 0.1**3)  # the schedule ran its course
    return [p.detach().clone() for p in model.parameters()]


def test_a_users_lr_scheduler_keeps_working_under_the_engine() -> None:
    """The engine multiplies the LR the scheduler sets: at multiplier 1 the run is plain torch's, bit for bit."""
    for plain, engined in zip(_scheduled_run(False), _scheduled_run(True), strict=True):
        assert torch.equal(plain, engined)


@pytest.mark.parametrize("max_norm", [0.05, 100.0])  # binding, and too loose to bind
def test_gradient_clipping_is_torchs_clip_grad_norm(max_norm: float) -> None:
    """The engine's ``max_grad_norm`` against ``clip_grad_norm_`` between backward and step in a plain loop."""
    finals = {}
    for through_engine in (False, True):
        torch.manual_seed(0)
        model = tiny_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        engine = StepEngine(model, optimizer, CPU) if through_engine else None
        if engine is not None:
            engine.max_grad_norm = max_norm
        for i in range(4):
            x, y = batch(i)
            if engine is None:
                optimizer.zero_grad()
                (model(x) - y).pow(2).mean().backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
                optimizer.step()
            else:
                engine.backward_and_step(loss_of(model, engine, i))
        finals[through_engine] = [p.detach().clone() for p in model.parameters()]
    for plain, engined in zip(finals[False], finals[True], strict=True):
        assert torch.equal(engined, plain), f"differs by {(engined - plain).abs().max():.3g}"
    if max_norm < 1:  # negative control: the clip binds, so an unclipped run ends elsewhere
        torch.manual_seed(0)
        model = tiny_model()
        engine = StepEngine(model, torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9), CPU)
        for i in range(4):
            engine.backward_and_step(loss_of(model, engine, i))
        assert max((a - b).abs().max().item() for a, b in zip(finals[True], model.parameters(), strict=True)) > 1e-3


class _MixedDtypes(nn.Module):
    """float64 layers around a float32 one: ``clip_grad_norm_`` stacks the norms grouped by dtype, in float64."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first, self.middle, self.last = nn.Linear(8, 16).double(), nn.Linear(16, 16), nn.Linear(16, 3).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(torch.relu(self.middle(torch.relu(self.first(x)).float())).double())


@pytest.mark.parametrize("mixed", [False, True])
def test_gradient_clipping_of_a_float64_model_is_clip_grad_norms_bits(mixed: bool) -> None:
    """torch clips float64 gradients with a float64 total norm and coefficient. Before the fix the engine clipped from
    float32 norms: a float64 MLP then ended ~1e-9 from the plain loop, not its bits."""
    generator = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(16, 8, generator=generator, dtype=torch.float64), torch.randint(0, 3, (16,), generator=generator))
        for _ in range(4)
    ]
    finals = {}
    for through_engine in (False, True):
        torch.manual_seed(0)
        model = _MixedDtypes() if mixed else nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).double()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        engine = StepEngine(model, optimizer, CPU) if through_engine else None
        if engine is not None:
            engine.max_grad_norm = 0.1
        for x, y in data:
            optimizer.zero_grad()
            _clipped_step(engine, model, optimizer, nn.functional.cross_entropy(model(x), y), 0.1)
        finals[through_engine] = [p.detach().clone() for p in model.parameters()]
    for plain, engined in zip(finals[False], finals[True], strict=True):
        assert torch.equal(engined, plain), f"differs by {(engined - plain).abs().max():.3g}"


def _clipped_step(engine, model, optimizer, loss, max_norm) -> None:
    """The engine's step (its ``max_grad_norm`` set), or, with ``engine`` None, a plain loop's clipping step."""
    if engine is None:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
    else:
        engine.backward_and_step(loss)


# ---------------------------------------------------------------- against plain torch loops, bit for bit


def _branchy_model(n_layers: int = 24) -> nn.Module:
    """Many small layers, every third skipped by the forward: a user's ``zero_grad()`` leaves their gradients None."""

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(3, 3) for _ in range(n_layers))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for i, layer in enumerate(self.layers):
                if i % 3 != 1:
                    x = torch.tanh(layer(x))
            return x[:, :2]

    torch.manual_seed(0)
    return Branchy()


def test_gradient_clipping_leaves_out_parameters_without_gradients_as_torch_does() -> None:
    """A user's loop that zeroes the gradients to None, with layers the forward skips. Before the fix the engine put
    their norms (0) in the total, whose rounding then differed from ``clip_grad_norm_``'s: not its bits."""
    finals = {}
    for through_engine in (False, True):
        model = _branchy_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        engine = StepEngine(model, optimizer, CPU) if through_engine else None
        if engine is not None:
            engine.max_grad_norm = 0.01
        for i in range(3):
            x, y = batch(i)
            optimizer.zero_grad()
            _clipped_step(engine, model, optimizer, (model(x) - y).pow(2).mean(), 0.01)
        finals[through_engine] = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(finals[False], finals[True], strict=True))


def _plain_scaled_lrs(optimizer: torch.optim.Optimizer, multiplier: float, factors: list[float]) -> list[float]:
    """What a plain loop sets before ``optimizer.step()``: each group's LR x scale x gain x its layer's factor."""
    own = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * multiplier * (factors[group["layer"]] if "layer" in group else 1.0)
    return own


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_scaled_lrs_under_a_scheduler_are_a_plain_loops_bit_for_bit(optimizer_name: str) -> None:
    """Per-layer groups (one without a "layer" key), LR scale, batch gain and per-layer factors, a scheduler moving
    every group's LR: six steps equal a plain loop setting the product before each ``optimizer.step()`` and putting
    the scheduler's LR back after it; the groups hold the scheduler's LRs between steps."""
    factors = [0.5, 1.0, 3.0]
    finals, lrs = {}, {}
    for through_engine in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
        params = StepEngine.discover(model)
        groups = [{"params": params[0], "layer": 0}, {"params": params[1]}, {"params": params[2], "layer": 2}]
        optimizer = (
            torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=1e-2)
            if optimizer_name == "sgd"
            else torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1)
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, [lambda s: 0.9**s, lambda s: 1.0 / (s + 1), lambda s: 1.5]
        )
        engine = StepEngine(model, optimizer, CPU) if through_engine else None
        if engine is not None:
            engine.lr_scale, engine.batch_lr_gain, engine.lr_factors = 0.7, 1.3, np.array(factors)
        seen = []
        for i in range(6):
            x, y = batch(i)
            loss = (model(x) - y).pow(2).mean()
            if engine is None:
                optimizer.zero_grad()
                loss.backward()
                own = _plain_scaled_lrs(optimizer, 0.7 * 1.3, factors)
                optimizer.step()
                for group, lr in zip(optimizer.param_groups, own, strict=True):
                    group["lr"] = lr
            else:
                engine.backward_and_step(loss)
            scheduler.step()
            seen.append([group["lr"] for group in optimizer.param_groups])
            assert seen[-1] == scheduler.get_last_lr()
        finals[through_engine], lrs[through_engine] = [p.detach().clone() for p in model.parameters()], seen
    assert lrs[True] == lrs[False]
    for name, a, b in zip(["w0", "b0", "ln_w", "ln_b", "w2", "b2"], finals[False], finals[True], strict=True):
        assert torch.equal(a, b), f"{name} differs by {(a - b).abs().max():.3g}"


def test_loss_scaling_is_a_plain_grad_scaler_loops_bit_for_bit() -> None:
    """Every layer fp16 (one autocast region, as a plain loop's), a scaler loaded with a growth interval of 3: the
    scale grows after 3 clean steps, halves on an overflowed step (skipped: parameters and moments untouched), and
    the parameters, moments and scaler state equal a plain ``GradScaler`` loop's after each step."""
    scaler_state = {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 3,
                    "_growth_tracker": 0}  # fmt: skip
    model, plain_model = tiny_model(), tiny_model()
    engine = StepEngine(model, torch.optim.AdamW(model.parameters(), lr=1e-2), CPU)
    engine.set_precisions(["fp16", "fp16"])
    state = engine.state_dict()
    engine.load_state_dict({**state, "scaler": scaler_state})
    plain_optimizer = torch.optim.AdamW(plain_model.parameters(), lr=1e-2)
    plain_scaler = torch.amp.GradScaler("cpu")
    plain_scaler.load_state_dict(scaler_state)
    overflow_at = 4
    scales = []
    for i in range(7):
        x, y = batch(i)
        boost = 1e8 if i == overflow_at else 1.0  # x 1024 overflows the fp16 backward
        with engine.precision.context():
            loss = (model(x).float() - y).pow(2).mean() * boost
        before = snapshot(model, engine.optimizer)
        _, skipped = engine.backward_and_step(loss)
        assert skipped == (i == overflow_at)
        if skipped:
            assert_unchanged(model, engine.optimizer, before)
        with torch.autocast("cpu", dtype=torch.float16):
            plain_loss = (plain_model(x).float() - y).pow(2).mean() * boost
        plain_optimizer.zero_grad()
        plain_scaler.scale(plain_loss).backward()
        plain_scaler.unscale_(plain_optimizer)
        plain_scaler.step(plain_optimizer)
        plain_scaler.update()
        scales.append(engine.loss_scale)
        assert engine.grad_scaler.state_dict() == plain_scaler.state_dict()
        for a, b in zip(model.parameters(), plain_model.parameters(), strict=True):
            assert torch.equal(a, b)
    assert scales == [1024.0, 1024.0, 2048.0, 2048.0, 1024.0, 1024.0, 1024.0]
    for p, q in zip(model.parameters(), plain_model.parameters(), strict=True):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(engine.optimizer.state[p][key], plain_optimizer.state[q][key]), key


def test_an_adamw_skipped_step_leaves_its_step_count_and_moments() -> None:
    model = tiny_model()
    engine = StepEngine(model, torch.optim.AdamW(model.parameters(), lr=1e-2), CPU)
    warm_up(model, engine, 2)
    before = snapshot(model, engine.optimizer)
    _, skipped = engine.backward_and_step(loss_of(model, engine, 5) * float("nan"))
    assert skipped
    assert_unchanged(model, engine.optimizer, before)
    assert all(float(state["step"]) == 2 for state in engine.optimizer.state.values())


@pytest.mark.parametrize("layer", [-1, 2, 1.0, "0", True])
def test_a_param_groups_layer_key_outside_the_layers_is_refused_by_name(layer: Any) -> None:
    """Before the fix -1 took the last layer's factor on the reference path (none on the fused one), and 2 raised an
    IndexError at the first step."""
    model = tiny_model()
    params = StepEngine.discover(model)
    optimizer = torch.optim.SGD([{"params": params[0], "layer": 0}, {"params": params[1], "layer": layer}], lr=0.1)
    with pytest.raises(ValueError, match=rf"param group 1 has 'layer': {layer!r}; .* an integer in \[0, 2\)"):
        StepEngine(model, optimizer, CPU)


# ---------------------------------------------------------------- checkpoints of the reference path


def _adamw_engine() -> tuple[nn.Module, StepEngine]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    params = StepEngine.discover(model)
    optimizer = torch.optim.AdamW(
        [{"params": params[i], "layer": i, "lr": 1e-2 * (i + 1)} for i in range(3)], weight_decay=0.05
    )
    return model, StepEngine(model, optimizer, CPU)


def _train(model: nn.Module, engine: StepEngine, seeds: range) -> None:
    for seed in seeds:
        engine.backward_and_step(loss_of(model, engine, seed, scale=1e-2))


def _saved(engine: StepEngine) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(engine.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer)


def test_a_reference_checkpoint_resumes_the_run_bit_for_bit() -> None:
    """Moments, step counts, loss scaler, precisions and LR knobs: a resumed engine trains on as the uninterrupted."""
    model, engine = _adamw_engine()
    engine.set_precisions(["fp16", "bf16"])
    engine.lr_scale, engine.batch_lr_gain, engine.lr_factors = 0.5, 2.0, np.array([1.0, 0.25, 3.0])
    _train(model, engine, range(3))
    engine.grad_scaler.update(512.0)  # off its default, so that a fresh scaler would differ
    saved, weights = _saved(engine), copy.deepcopy(model.state_dict())
    _train(model, engine, range(3, 6))

    resumed_model, resumed = _adamw_engine()
    resumed_model.load_state_dict(weights)
    resumed.load_state_dict(saved)
    assert resumed.precision.precisions == [Precision.FP16, Precision.FP32, Precision.BF16]
    assert (resumed.lr_scale, resumed.batch_lr_gain, resumed.lr_factors.tolist()) == (0.5, 2.0, [1.0, 0.25, 3.0])
    assert resumed.loss_scale == 512.0
    _train(resumed_model, resumed, range(3, 6))
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert engine.grad_scaler.state_dict() == resumed.grad_scaler.state_dict()
    for p, q in zip(model.parameters(), resumed_model.parameters(), strict=True):
        for key, value in engine.optimizer.state[p].items():
            assert torch.equal(value, resumed.optimizer.state[q][key]), key


def test_a_checkpoint_without_a_loss_scaler_drops_the_engines() -> None:
    """Before the fix an engine that had scaled (here backed off to 2) kept its scaler on loading a state saved with
    none, so a later fp16 layer started from the wrong scale (the saved run would start a fresh one at 2**16)."""
    model, engine = _adamw_engine()
    saved = _saved(engine)
    assert saved["scaler"] is None
    engine.set_precisions(["fp16", "fp32"])
    _train(model, engine, range(1))
    engine.grad_scaler.update(2.0)
    engine.load_state_dict(saved)
    assert engine.grad_scaler is None and engine.loss_scale == 1.0
    engine.set_precisions(["fp16", "fp32"])
    assert engine.loss_scale == 2.0**16


def test_a_rollback_to_the_copy_taken_at_a_resume_puts_back_the_resumed_loss_scale() -> None:
    """``GradScaler.load_state_dict`` keeps the scale aside until its first ``scale()``: ``scaler_state()`` found no
    scale to copy right after a resume, and a rollback to the copy taken then dropped the scaler, so the scale
    started again at 65536 instead of the checkpoint's 1024."""
    model, engine = sgd_engine()
    engine.set_precisions(["fp16", "fp16"])
    warm_up(model, engine, 1)
    engine.grad_scaler.update(1024.0)  # one clean step counted, at a scale a fresh scaler would not have
    saved = _saved(engine)

    resumed_model, resumed = sgd_engine()
    resumed.load_state_dict(saved)
    copy_at_resume = resumed.scaler_state()  # what a rollback copy taken now records
    assert copy_at_resume is not None
    assert (float(copy_at_resume[0]), int(copy_at_resume[1])) == (1024.0, 1)
    assert resumed.backward_and_step(loss_of(resumed_model, resumed, 0) * float("nan"))[1]
    assert resumed.loss_scale == 512.0
    resumed.load_scaler_state(copy_at_resume)  # the rollback
    assert resumed.loss_scale == 1024.0
    assert resumed.state_dict()["scaler"]["_growth_tracker"] == 1


def _corrupt(state: dict[str, Any], what: str) -> dict[str, Any]:
    state = copy.deepcopy(state)
    if what.startswith("no "):
        del state[what[3:]]
    elif what == "precision code":
        state["precisions"][0] = 7
    elif what == "lr_factors":
        state["lr_factors"] = state["lr_factors"][:2]
    elif what == "lr_scale":
        state["lr_scale"] = float("nan")
    elif what == "scaler":
        del state["scaler"]["growth_interval"]
    elif what == "optimizer groups":
        state["optimizer"]["param_groups"][0]["params"] = [0]
    elif what == "optimizer moment":
        state["optimizer"]["state"][0]["exp_avg"] = "0.0"
    elif what == "optimizer entry":
        state["optimizer"]["state"][1] = [1.0]
    elif what == "precisions":
        state["precisions"] = 1
    elif what == "lr_factors text":
        state["lr_factors"] = "ab"
    elif what.startswith("layer key "):  # torch.optim's load_state_dict copies the saved key into the live group
        state["optimizer"]["param_groups"][0]["layer"] = int(what[len("layer key ") :])
    elif what.startswith("scaler "):
        state["scaler"][what[len("scaler ") :]] = "x"
    elif what.startswith("group without "):
        del state["optimizer"]["param_groups"][1][what[len("group without ") :]]
    return state


@pytest.mark.parametrize(
    ("what", "message"),
    [
        ("no lr_factors", r"the engine state lacks 'lr_factors': it is not \(all of\) the dict StepEngine.state_dict"),
        ("no fused", r"lacks 'fused'"),
        ("precision code", r"unknown precision 7; allowed: fp32, bf16, fp16"),
        ("lr_factors", r"lr_factors \[1.0, 0.25\] are not 3 finite numbers >= 0"),
        ("lr_scale", r"lr_scale nan must be a finite number > 0"),
        ("scaler", r"the checkpoint's scaler lacks 'growth_interval'"),
        (
            "optimizer groups",
            r"the checkpoint's optimizer state has param groups of \[1, 2, 2\] parameters; "
            r"this optimizer's has \[2, 2, 2\]",
        ),
        # Before the fix these loaded, and the next step raised (a str has no mul_, full() takes no str scale).
        ("optimizer moment", r"optimizer state 'exp_avg' of parameter 0 is str, not a tensor, number or None"),
        ("optimizer entry", r"optimizer state of parameter 1 is list, not a dict"),
        ("scaler scale", r"the checkpoint's scaler has scale 'x', not a normal float32 > 0"),
        ("scaler _growth_tracker", r"the checkpoint's scaler has _growth_tracker 'x', not a whole number in \[0, 2"),
        ("scaler growth_interval", r"the checkpoint's scaler has growth_interval 'x', not a whole number in \[1, 2"),
        # Before the fix: TypeError "object of type 'int' has no len()" and numpy's "could not convert string".
        ("precisions", r"the checkpoint's precisions 1 are not a list of 3 precision codes"),
        ("lr_factors text", r"lr_factors 'ab' are not 3 finite numbers >= 0"),
        # Before the fix 7 loaded and the next step raised an IndexError; -1 took the last layer's factor (reference)
        ("layer key 7", r"the checkpoint's param group 0 has 'layer': 7; .* an integer in \[0, 3\)"),
        ("layer key -1", r"the checkpoint's param group 0 has 'layer': -1; .* an integer in \[0, 3\)"),
        # Before the fix these loaded (the fused path refused them) and the next step raised a bare KeyError
        ("group without lr", r"the checkpoint's param group 1 lacks 'lr', which AdamW's update reads"),
        ("group without betas", r"the checkpoint's param group 1 lacks 'betas', which AdamW's update reads"),
    ],
)
def test_a_refused_checkpoint_leaves_the_engine_as_it_was(what: str, message: str) -> None:
    """Each check runs before anything loads: before the fix a bad precision code or scaler raised after the optimizer
    state was replaced, a missing key raised a bare KeyError, and short lr_factors loaded (an IndexError later)."""
    model, engine = _adamw_engine()
    engine.set_precisions(["fp16", "bf16"])
    engine.lr_factors = np.array([1.0, 0.25, 3.0])
    _train(model, engine, range(2))
    good = _saved(engine)
    _train(model, engine, range(2, 4))  # the engine moves on from the saved state
    before = _saved(engine)
    with pytest.raises(ValueError, match=message):
        engine.load_state_dict(_corrupt(good, what))
    after = _saved(engine)
    assert after.keys() == before.keys()
    for key in before:
        if key == "optimizer":
            for index, entry in before[key]["state"].items():
                for name, value in entry.items():
                    assert torch.equal(value, after[key]["state"][index][name]), (index, name)
            assert before[key]["param_groups"] == after[key]["param_groups"]
        else:
            assert before[key] == after[key], key


def test_a_checkpoint_without_the_flags_an_older_torch_did_not_save_still_loads() -> None:
    """The check of the saved param groups' keys asks for the hyper-parameters only: flags a checkpoint of an older
    torch lacks (``foreach``, ``fused``, ...) torch.optim's load fills in, and such a checkpoint resumes as before."""
    model, engine = _adamw_engine()
    _train(model, engine, range(2))
    saved = _saved(engine)
    for group in saved["optimizer"]["param_groups"]:
        del group["fused"], group["foreach"], group["capturable"]
    engine.load_state_dict(saved)
    assert [group["fused"] for group in engine.optimizer.param_groups] == [None, None, None]
    _train(model, engine, range(2, 3))


def _hook_counts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, int, int]:
    forward = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    grad = sum(len(p._backward_hooks or {}) for p in model.parameters()) + sum(
        p._post_accumulate_grad_hooks is not None and len(p._post_accumulate_grad_hooks) for p in model.parameters()
    )
    return forward, grad, len(optimizer._optimizer_step_pre_hooks)


@pytest.mark.parametrize(
    ("make", "fused", "message"),
    [
        (lambda m: torch.optim.RMSprop(m.parameters(), lr=0.1), True, "fused=True, but the fused step cannot run"),
        (lambda m: torch.optim.SGD(m[0].parameters(), lr=0.1), None, None),  # a partial optimizer is fine: control
        (lambda m: torch.optim.SGD([{"params": m[0].parameters(), "layer": 5}], lr=0.1), None, "'layer': 5"),
        (lambda m: torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), None, "holds none of the"),
        # Trainable parameters beside the model's: the first step called them "frozen when the controller was built"
        (
            lambda m: torch.optim.SGD([*m.parameters(), *nn.Linear(3, 4).parameters()], lr=0.1),
            None,
            r"holds 2 trainable parameters that are not Sequential's \(shapes \[\(4, 3\), \(4,\)\]\)",
        ),
        # Frozen ones beside the model's are fine: control
        (
            lambda m: torch.optim.SGD([*m.parameters(), *nn.Linear(3, 4).requires_grad_(False).parameters()], lr=0.1),
            None,
            None,
        ),
        # L-BFGS's step needs a closure: every step raised torch's TypeError, and the applied count still rose
        (lambda m: torch.optim.LBFGS(m.parameters(), lr=0.1), None, r"LBFGS.step\(\) needs a closure"),
    ],
)
def test_a_refused_engine_leaves_no_hooks_on_the_model_or_optimizer(make, fused, message):
    """The user catches the error and trains on: their model and optimizer must run as before."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = make(model)
    before = _hook_counts(model, optimizer)
    if message is None:
        engine = StepEngine(model, optimizer, torch.device("cpu"), fused=fused)
        assert _hook_counts(model, optimizer) != before  # the control: a built engine does hook in
        engine.remove()
    else:
        with pytest.raises(ValueError, match=message):
            StepEngine(model, optimizer, torch.device("cpu"), fused=fused)
    assert _hook_counts(model, optimizer) == before
    x = torch.randn(3, 4)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    closure()
    optimizer.step(closure)  # the engine's guard is gone: no "second update" error


def test_an_optimizer_subclass_calling_super_step_is_scaled_and_counted_once() -> None:
    """torch wraps both classes' step() with the hook runner (once an SGD has been built in the process), so the hooks
    ran twice an update: the LR multipliers went in twice and stayed (the LR halved at every step at lr_scale 0.5),
    and two updates were counted."""
    torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1)  # SGD.step wrapped too
    applied = []

    class MySGD(torch.optim.SGD):
        def step(self, closure=None):  # type: ignore[no-untyped-def, override]
            applied.append(self.param_groups[0]["lr"])
            return super().step(closure)

    model = tiny_model()
    engine = StepEngine(model, MySGD(model.parameters(), lr=0.1), CPU)
    engine.lr_scale = 0.5
    warm_up(model, engine, 3)
    assert applied == [0.05] * 3
    assert engine.optimizer.param_groups[0]["lr"] == 0.1 and engine.applied_steps() == 3


def test_an_adafactor_checkpoint_with_factored_state_resumes_as_the_uninterrupted_run() -> None:
    """Adafactor keeps ``row_var``/``col_var`` factored, shaped (4, 1) and (1, 3) for a (4, 3) weight: the check that
    every state tensor has its parameter's shape refused the engine's own checkpoint as "saved for another model"."""

    def build() -> tuple[nn.Module, StepEngine]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
        params = StepEngine.discover(model)
        optimizer = torch.optim.Adafactor([{"params": p, "layer": i} for i, p in enumerate(params)], lr=1e-2)
        return model, StepEngine(model, optimizer, CPU)

    model, engine = build()
    _train(model, engine, range(3))
    saved = _saved(engine)
    assert saved["optimizer"]["state"][0]["row_var"].shape == (4, 1)
    resumed_model, resumed = build()
    resumed_model.load_state_dict(model.state_dict())
    resumed.load_state_dict(saved)
    _train(model, engine, range(3, 5))
    _train(resumed_model, resumed, range(3, 5))
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)
    wrong = copy.deepcopy(saved)
    wrong["optimizer"]["state"][0]["row_var"] = torch.zeros(3, 1)  # (3, 1) broadcasts to no (4, 3)
    with pytest.raises(ValueError, match=r"'row_var' of parameter 0 has shape \(3, 1\)"):
        build()[1].load_state_dict(wrong)


class _FrozenSparseLookup(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(30, 8, sparse=True).requires_grad_(False)  # a pretrained table, frozen
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(x).mean(1))


@pytest.mark.parametrize("fused", [False, True])
def test_a_frozen_sparse_embedding_is_taken_and_refused_once_unfrozen(fused: bool) -> None:
    """A frozen ``nn.Embedding(sparse=True)`` makes no gradient: it was refused, though the plain loop trains beside
    it. Unfrozen later, its sparse gradient is refused at the next step, before anything is updated."""
    import os

    if fused and not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("the fused step needs a GPU or Triton's interpreter")
    generator = torch.Generator().manual_seed(1)
    data = [(torch.randint(0, 30, (8, 5), generator=generator), torch.randint(0, 4, (8,), generator=generator))]
    data *= 2
    plain = _FrozenSparseLookup()
    optimizer = torch.optim.SGD(plain.parameters(), lr=0.1)
    for x, y in data:
        optimizer.zero_grad()
        nn.functional.cross_entropy(plain(x), y).backward()
        optimizer.step()
    model = _FrozenSparseLookup()
    engine = StepEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), CPU, fused=fused)
    for x, y in data:
        engine.backward_and_step(nn.functional.cross_entropy(model(x), y))
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):  # the fused kernel rounds in its own order
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7 if fused else 0)
    model.emb.requires_grad_(True)
    x, y = data[0]
    with pytest.raises(ValueError, match=r"parameters \['emb.weight'\] have gradients, but they were frozen"):
        engine.backward_and_step(nn.functional.cross_entropy(model(x), y))
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7 if fused else 0)  # nothing was updated


@pytest.mark.parametrize("precisions", [{0: "bf16", 1: "fp32"}, {"bf16"}])
def test_set_precisions_refuses_a_dict_or_a_set_naming_the_layers(precisions: Any) -> None:
    """The engine parsed the map into a list before LayerPrecision.set saw it: a dict's keys (0 and 1: fp32 and bf16)
    or a set's hash order became the map. Now refused as LayerPrecision.set refuses it, the map left as it was."""
    _, engine = sgd_engine()
    with pytest.raises(
        ValueError,
        match=rf"precisions={re.escape(repr(precisions))} is a {type(precisions).__name__}: give an ordered sequence "
        r"\(a list, tuple or array\) with one precision per layer \(2: \['0', '2'\]\) or per controllable layer "
        r"\(2: \['0', '2'\]\), in that order",
    ):
        engine.set_precisions(precisions)
    assert engine.precision.precisions == [Precision.FP32, Precision.FP32]
    engine.set_precisions(np.array(["bf16", "fp32"]))
    assert engine.precision.precisions == [Precision.BF16, Precision.FP32]


def test_the_fused_steps_lr_shares_follow_the_groups_lrs_bit_for_bit() -> None:
    """Each layer's LR share (its group's LR over the first group's) is taken by indexing an array of the layers' group
    positions, made once: under a scheduler moving the LRs, after ``optimizer.load_state_dict()`` (new group dicts), and
    for a layer with no parameter in the optimizer (share 1), the shares are Python's float quotients, bit for bit."""
    import os

    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("the fused step needs a GPU or Triton's interpreter")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2), nn.Linear(2, 2))
    params = StepEngine.discover(model)  # the last layer's are left to another optimizer
    groups = [{"params": params[0], "lr": 0.3}, {"params": params[2], "lr": 0.7}, {"params": params[1], "lr": 0.1}]
    optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    engine = StepEngine(model, optimizer, CPU, fused=True)
    assert [len(p) for p in engine.layer_params] == [2, 2, 2, 0]

    def shares(lrs: list[float]) -> list[float]:  # layers 0, 1, 2 in groups 0, 2, 1; layer 3 in none
        reference = lrs[0] if lrs[0] > 0 else 1.0
        return [lrs[0] / reference, lrs[2] / reference, lrs[1] / reference, 1.0]

    assert engine._layer_base.tolist() == shares([0.3, 0.7, 0.1])
    for lrs in ([0.29, 0.69, 0.11], [0.0, 0.7, 0.1], [1 / 3, 2 / 7, 0.1]):  # a scheduler's moves (reference 0: 1)
        for group, lr in zip(optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        engine._read_group_lrs()
        assert engine._layer_base.tolist() == shares(lrs)
    saved = optimizer.state_dict()
    saved["param_groups"][1]["lr"] = 0.3
    optimizer.load_state_dict(saved)
    engine._read_group_lrs()
    assert engine._layer_base.tolist() == shares([1 / 3, 0.3, 0.1])
    engine.remove()


@pytest.mark.parametrize("bad", [-1.0, math.nan, 2.5, 10**400])
def test_a_reference_checkpoints_step_count_that_is_no_count_is_refused_before_loading(bad):
    """AdamW's ``step`` of -1 loaded on the reference path, and its next update divided by zero in the bias
    correction (ZeroDivisionError); NaN or 2.5 loaded too. Refused by name, nothing loaded."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine = StepEngine(model, optimizer, CPU)
    engine.backward_and_step(model(torch.randn(5, 4)).square().mean())
    state = copy.deepcopy(engine.state_dict())
    state["optimizer"]["state"][0]["step"] = torch.tensor(bad) if isinstance(bad, float) else bad  # (an int: no tensor)
    kept = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(ValueError, match=r"optimizer state 'step' of parameter 0 is .*: a step count is"):
        engine.load_state_dict(state)
    assert optimizer.state_dict()["state"][0]["step"] == kept["state"][0]["step"] == 1

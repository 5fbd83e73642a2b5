"""The fused Triton step inside StepEngine, against the reference path (interpreter on CPU, compiled on GPU)."""

import copy
import os
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from triaccel_rl.engine import StepEngine, _fused_unsupported
from triaccel_rl.types import Precision

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs a GPU or Triton's interpreter (TRITON_INTERPRET=1 before triton is imported)",
)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_and_optimizer(optimizer_kind: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(DEVICE)
    groups = [{"params": list(m.parameters()), "layer": i} for i, m in enumerate([model[0], model[2]])]
    if optimizer_kind == "sgd":
        optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    else:
        optimizer = torch.optim.AdamW(groups, lr=1e-2, weight_decay=1e-2)
    return model, optimizer


def make(optimizer_kind: str, fused: bool):
    model, optimizer = model_and_optimizer(optimizer_kind)
    return model, StepEngine(model, optimizer, DEVICE, fused=fused)


def batches(n=6):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 6, generator=g).to(DEVICE), torch.randint(0, 3, (16,), generator=g).to(DEVICE))
            for _ in range(n)]  # fmt: skip


def _run_steps(model, engine, data):
    for x, y in data:
        with engine.precision.context():
            loss = nn.functional.cross_entropy(model(x), y)
        engine.backward_and_step(loss)


def _weights(model):
    """The model's parameters, copied to the CPU."""
    return [p.detach().cpu().clone() for p in model.parameters()]


def _plain_steps(model, optimizer, data):
    """Plain torch.optim steps, no engine."""
    for x, y in data:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_fused_engine_matches_reference(kind):
    runs = {}
    for fused in (False, True):
        model, engine = make(kind, fused)
        assert engine.fused is fused
        engine.lr_factors = [0.5 if i == 1 else f for i, f in enumerate(engine.lr_factors)]
        stats = []
        for x, y in batches():
            with engine.precision.context():
                loss = nn.functional.cross_entropy(model(x), y)
            grads, skipped = engine.backward_and_step(loss)
            assert not skipped
            stats.append(grads.sq_sum.cpu())
        runs[fused] = (_weights(model), stats, engine.grad_mean_sq_norm())
    for a, b in zip(runs[False][0], runs[True][0], strict=True):
        err = (a - b).abs().max().item()
        assert err < 1e-5, f"{kind}: parameters differ by {err:.3g} (tolerance 1e-5)"
    for a, b in zip(runs[False][1], runs[True][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.tensor(runs[False][2]), torch.tensor(runs[True][2]), rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_the_fused_step_applies_the_batch_lr_gain_as_torch_optim_at_the_scaled_lr(kind):
    data = batches(3)
    model, engine = make(kind, True)
    engine.batch_lr_gain = 2.0  # as after a batch change under the linear rule
    _run_steps(model, engine, data)
    reference, optimizer = model_and_optimizer(kind)
    for group in optimizer.param_groups:
        group["lr"] *= 2.0
    _plain_steps(reference, optimizer, data)
    for fused, plain in zip(_weights(model), _weights(reference), strict=True):
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)


def test_fused_skip_keeps_everything_and_fp16_scale_backs_off():
    model, engine = make("sgd", True)
    engine.set_precisions([Precision.FP16, Precision.FP32])
    x, y = batches(1)[0]
    with engine.precision.context():
        loss = nn.functional.cross_entropy(model(x), y)
    engine.backward_and_step(loss)
    before = [p.detach().clone() for p in model.parameters()]
    momentum = engine.fused_optimizer.momentum_buffer.clone()
    scale = engine.loss_scale
    with engine.precision.context():
        loss = nn.functional.cross_entropy(model(x), y) * float("nan")
    _, skipped = engine.backward_and_step(loss)
    assert skipped
    for a, b in zip(before, model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(momentum, engine.fused_optimizer.momentum_buffer)
    assert engine.loss_scale == scale / 2
    assert engine.applied_steps() == 1  # the device counter: the first step applied, the second skipped


@pytest.mark.parametrize("fused", [True, False])
def test_the_loss_scale_a_rollback_copy_takes_is_put_back_as_it_was_and_can_be_put_back_again(fused):
    """``scaler_state`` and ``load_scaler_state``, which a rollback uses: the skipped steps after the copy halved the
    scale and reset its clean-step count; putting the copy back restores both, and the copy is not consumed."""
    model, engine = make("sgd", fused)
    engine.set_precisions([Precision.FP16, Precision.FP32])
    state = engine.state_dict()
    state["scaler"] = (
        {"scale": 1024.0, "clean_steps": 7}
        if fused
        else {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
              "_growth_tracker": 7}
    )  # fmt: skip
    engine.load_state_dict(state)
    x, y = batches(1)[0]
    _run_steps(model, engine, [(x, y)])  # a clean step: 8 clean steps at 1024
    saved = engine.scaler_state()

    def clean_steps():
        scaler = engine.state_dict()["scaler"]
        return int(scaler["clean_steps"] if fused else scaler["_growth_tracker"])

    for _ in range(2):
        for _ in range(3):  # three skipped steps: 128, and the count restarted
            with engine.precision.context():
                loss = nn.functional.cross_entropy(model(x), y) * float("nan")
            assert engine.backward_and_step(loss)[1]
        assert (engine.loss_scale, clean_steps()) == (128.0, 0)
        held = engine._scale if fused else engine.grad_scaler._scale
        engine.load_scaler_state(saved)
        assert (engine.loss_scale, clean_steps()) == (1024.0, 8)
        assert (engine._scale if fused else engine.grad_scaler._scale) is held  # in place: graphs read its address


def test_a_reference_rollback_copy_taken_before_any_scaled_step_puts_back_no_scaler():
    """No fp16 step before the copy: no scale to keep. Put back, the next fp16 layer starts a fresh one (65536)."""
    model, engine = make("sgd", False)
    assert engine.scaler_state() is None
    engine.set_precisions([Precision.FP16, Precision.FP32])
    x, y = batches(1)[0]
    with engine.precision.context():
        loss = nn.functional.cross_entropy(model(x), y) * float("nan")
    engine.backward_and_step(loss)
    assert engine.loss_scale == 2.0**15
    engine.load_scaler_state(None)
    assert engine.loss_scale == 2.0**16


_BAD_SCALERS = [
    # Before the fix these passed the check: a scale past float32's range became inf (every step skipped, for
    # good, on the fused path; the first step raised on the reference path), a count past int32's raised half
    # way through the load.
    ("scale", 1e39, r"scaler has scale 1e\+39, not a normal float32 > 0 \(from 1\.175e-38 to 3\.403e\+38\)"),
    ("clean_steps", 2**40, r"scaler has clean_steps 1099511627776, not a whole number in \[0, 2\*\*31\)"),
    ("scale", 0.0, r"scaler has scale 0\.0, not a normal float32 > 0"),
    ("scale", torch.tensor([1.0, 2.0]), r"scaler has scale tensor\(\[1\., 2\.\]\), not a normal float32 > 0"),
    # And these (found by the session's audit): 1e-50 loaded as a scale of 0 (every step skipped for good), a
    # subnormal one too, and factors GradScaler itself refuses
    ("scale", 1e-50, r"scaler has scale 1e-50, not a normal float32 > 0"),
    ("scale", 1e-40, r"scaler has scale 1e-40, not a normal float32 > 0"),
    ("growth_factor", 0.5, r"scaler has growth_factor 0\.5, not a number > 1"),
    ("backoff_factor", 1.0, r"scaler has backoff_factor 1\.0, not a number in \(0, 1\)"),
]


@pytest.mark.parametrize(
    ("fused", "key", "value", "message"),
    [
        (fused, *case)
        for fused in (True, False)
        for case in _BAD_SCALERS
        if not (fused and case[0].endswith("_factor"))  # the fused step's scaler state holds no factors
    ],
)
def test_a_loss_scaler_state_out_of_range_is_refused_before_anything_loads(fused, key, value, message):
    _, engine = make("sgd", fused)
    engine.set_precisions([Precision.FP16, Precision.FP32])
    state = engine.state_dict()
    if fused:
        state["scaler"][key] = value
    else:  # the reference path's GradScaler keeps the count as _growth_tracker
        state["scaler"] = {"scale": 2.0**16, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                           "_growth_tracker": 0, {"clean_steps": "_growth_tracker"}.get(key, key): value}  # fmt: skip
        message = message.replace("clean_steps", "_growth_tracker")
    _, fresh = make("sgd", fused)
    with pytest.raises(ValueError, match=message):
        fresh.load_state_dict(state)
    assert fresh.precision.precisions == [Precision.FP32, Precision.FP32]  # nothing loaded
    assert fresh.loss_scale == 1.0


@pytest.mark.parametrize("fused", [True, False])
def test_a_loss_scale_saved_as_a_one_element_tensor_loads_on_both_paths(fused):
    """A scale of shape (1,) passed the check, then the fused load raised half way (a shape mismatch in the copy),
    and on the reference path the first step raised from ``torch.full``."""
    model, engine = make("sgd", fused)
    engine.set_precisions([Precision.FP16, Precision.FP32])
    state = engine.state_dict()
    if fused:
        state["scaler"] = {"scale": torch.tensor([1024.0]), "clean_steps": torch.tensor([3], dtype=torch.int32)}
    else:
        state["scaler"] = {"scale": torch.tensor([1024.0]), "growth_factor": 2.0, "backoff_factor": 0.5,
                           "growth_interval": 2000, "_growth_tracker": 3}  # fmt: skip
    engine.load_state_dict(state)
    _run_steps(model, engine, batches(1))
    assert engine.loss_scale == 1024.0
    scaler = engine.state_dict()["scaler"]
    assert int(scaler["clean_steps"] if fused else scaler["_growth_tracker"]) == 4


@pytest.mark.parametrize("fused", [False, True])
def test_a_second_optimizers_overflow_skips_the_step_backs_off_the_scale_and_its_step(fused):
    """fp16, the body held by the engine's optimizer and the head by a second one stepped in the user's loop: the
    head's gradients (nearest the loss) overflow at the first scales. Before the fix the engine checked only its own:
    the head's optimizer stepped on inf, the scale never backed off for it, and every step after was skipped (64 of
    64, the head NaN). Now the step is skipped, the scale backs off, and the head's gradients are None, so its
    optimizer skips them, as ``GradScaler.step`` would: the losses and scales of a plain AMP loop."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(128, 10, generator=g) * 30).to(DEVICE)
    y = x[:, :4].argmax(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 4)).to(DEVICE)
    body = torch.optim.SGD(model[0].parameters(), lr=1e-3)
    head = torch.optim.SGD(model[2].parameters(), lr=1e-2, momentum=0.9)
    engine = StepEngine(model, body, DEVICE, fused=fused)
    engine.set_precisions([Precision.FP16, Precision.FP16])
    scales, skips = [], []
    for i in range(0, 128, 16):
        with engine.precision.context():
            loss = nn.functional.cross_entropy(model(x[i : i + 16]), y[i : i + 16])
        skipped = engine.backward_and_step(loss)[1]
        skips.append(bool(skipped))
        if skipped:
            assert all(p.grad is None for p in model[2].parameters())
        head.step()
        head.zero_grad()
        scales.append(engine.loss_scale)
    assert skips[0] and not skips[-1] and scales[-1] < 2.0**16  # it overflowed, backed off, and trains on
    assert scales == [2.0**16 / 2 ** sum(skips[: k + 1]) for k in range(len(skips))]
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.mark.parametrize("bad", ["nan-batch", "nan-in-the-second-optimizers-gradient"])
@pytest.mark.parametrize("precision", [Precision.FP32, Precision.BF16, Precision.FP16])
@pytest.mark.parametrize("fused", [False, True])
def test_a_skipped_step_drops_a_second_optimizers_gradients_in_every_precision(fused, precision, bad):
    """The head held by the engine, the body by the user's own SGD with momentum. One bad batch (a NaN input; or a
    NaN in the body's gradient alone, the loss and the head's gradients finite) skips the step in every precision and
    sets the body's gradients to None, so the user's ``step()`` leaves the body's weights and momentum as they were.
    Before the fix that held under fp16 only: in fp32 and bf16 the body's weights and momentum went NaN for good (a
    rollback restores the weights, not another optimizer's momentum: every later interval rolled back)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(DEVICE)
    body = torch.optim.SGD(model[0].parameters(), lr=0.1, momentum=0.9)
    engine = StepEngine(model, torch.optim.SGD(model[2].parameters(), lr=0.1), DEVICE, fused=fused)
    engine.set_precisions([precision, precision])
    data = batches(3)

    def step(x, y):
        with engine.precision.context():
            loss = nn.functional.cross_entropy(model(x).float(), y)
        skipped = engine.backward_and_step(loss)[1]
        body.step()
        body.zero_grad()
        return skipped

    assert not step(*data[0])  # a momentum buffer for the body
    before = _weights(model)
    momentum = [body.state[p]["momentum_buffer"].clone() for p in model[0].parameters()]
    x, y = data[1]
    if bad == "nan-batch":
        x = x * float("nan")
        handle = None
    else:
        handle = model[0].weight.register_hook(lambda grad: grad * float("nan"))
    with engine.precision.context():
        loss = nn.functional.cross_entropy(model(x).float(), y)
    assert engine.backward_and_step(loss)[1]  # skipped
    assert all(p.grad is None for p in model[0].parameters())  # the second optimizer's step() skips them
    body.step()
    if handle is not None:
        handle.remove()
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(model), strict=True))
    for p, buffer in zip(model[0].parameters(), momentum, strict=True):
        assert torch.equal(body.state[p]["momentum_buffer"], buffer)
    assert not step(*data[2])  # and both train on
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.mark.parametrize("case", ["group-added", "parameter-unfrozen"])
@pytest.mark.parametrize("fused", [False, True])
def test_a_refused_step_leaves_no_gradient_for_the_next_update(fused, case):
    """A step the engine refuses (a param group added, or a frozen parameter unfrozen, since it was built) raised
    before the block that zeroes a failed step's gradients: the refused batch's gradients stayed in ``.grad`` (every
    parameter's, 3.1 for the new group's weight) and went into the first update of the controller built next, as the
    error advises. Now every gradient is zero after the refusal."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(DEVICE)
    model[0].requires_grad_(False)
    if case == "group-added":
        optimizer = torch.optim.SGD(model[2].parameters(), lr=0.1)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # the frozen layer in the optimizer too
    engine = StepEngine(model, optimizer, DEVICE, fused=fused)
    data = batches(2)
    _run_steps(model, engine, data[:1])
    model[0].requires_grad_(True)
    if case == "group-added":
        optimizer.add_param_group({"params": list(model[0].parameters())})
    with pytest.raises(ValueError, match="param groups; it had 1" if case == "group-added" else "have gradients"):
        _run_steps(model, engine, data[1:])
    assert all(not p.grad.any() for p in model.parameters())


@pytest.mark.parametrize("fused", [False, True])
def test_a_second_optimizers_empty_parameter_under_fp16_steps(fused):
    """The overflow check of the unheld gradients took their infinity norm, which torch refuses for an empty tensor:
    every step raised (the second audit of this session's fix)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3), nn.Linear(6, 0)).to(DEVICE)
    engine = StepEngine(model, torch.optim.SGD(model[0].parameters(), lr=0.1), DEVICE, fused=fused)
    engine.set_precisions([Precision.FP16, Precision.FP16])
    x, y = batches(1)[0]
    with engine.precision.context():
        loss = nn.functional.cross_entropy(model[0](x), y) + model[1](x).float().sum()
    assert not engine.backward_and_step(loss)[1]
    assert model[1].weight.grad is not None and model[1].weight.grad.shape == (0, 6)


@pytest.mark.parametrize("deferred", [False, True])
def test_a_non_finite_loss_over_finite_gradients_is_skipped_on_both_paths(deferred):
    """An infinite loss term without a gradient leaves the gradients finite: the update is skipped on both paths.

    Before, the fused step decided from the gradients alone and applied the update (weights moved by 2e-2) while
    reporting it skipped. The loss scale stays, as GradScaler keeps it: its gradients did not overflow.
    """
    x, y = batches(1)[0]
    for fused in (False, True):
        model, engine = make("sgd", fused)
        engine.set_precisions([Precision.FP16, Precision.FP32])
        before = _weights(model)
        with engine.precision.context():
            loss = nn.functional.cross_entropy(model(x), y) + torch.tensor(float("inf"), device=DEVICE)
        engine.bind_grads()
        engine.scale_loss(loss).backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        step = engine.step_after_backward_deferred if deferred else engine.step_after_backward
        _, skipped = step(loss.detach())
        assert bool(skipped) and engine.applied_steps() == 0
        assert all(torch.equal(a, b) for a, b in zip(before, _weights(model), strict=True))
        assert engine.loss_scale == 2.0**16
        assert not engine.optimizer.state_dict()["state"]  # no momentum buffer: no update ever ran


def test_a_step_pre_hook_that_raises_under_fp16_counts_no_clean_step():
    """Reference path: ``GradScaler.update()`` ran after a pre-hook raised and counted the step that did not go in as
    clean: the growth tracker read 39 after 38 applied steps, and the scale would double a step early."""
    model, engine = make("sgd", False)
    engine.set_precisions([Precision.FP16, Precision.FP32])
    calls = []

    def refuse_once(optimizer, args, kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    engine.optimizer.register_step_pre_hook(refuse_once)
    for x, y in batches(4):
        with engine.precision.context():
            loss = nn.functional.cross_entropy(model(x), y)
        try:
            engine.backward_and_step(loss)
        except KeyboardInterrupt:
            pass
    assert engine.applied_steps() == 3
    assert engine.state_dict()["scaler"]["_growth_tracker"] == 3


def test_a_step_hook_that_raises_leaves_the_next_fused_step_clean():
    """As on the reference path (test_engine): a pre-hook raising once leaves no gradient behind for the next step."""
    data = batches(2)
    runs = []
    for flaky in (True, False):
        model, engine = make("sgd", True)
        failures = [RuntimeError("a transient failure in a step hook")] if flaky else []

        def hook(*_, failures=failures):
            if failures:
                raise failures.pop()

        engine.optimizer.register_step_pre_hook(hook)
        if flaky:
            with pytest.raises(RuntimeError, match="transient failure"):
                _run_steps(model, engine, data[:1])
            assert engine.applied_steps() == 0 and not engine.store.grads.any()
        _run_steps(model, engine, data[1:])
        runs.append(_weights(model))
    for after_failure, clean in zip(*runs, strict=True):
        assert torch.equal(after_failure, clean)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_an_update_launch_that_raises_leaves_no_gradient_for_the_next_fused_step(kind):
    """The fused update's launch raising (its first call allocates and compiles the kernels: an out-of-memory error,
    a Ctrl-C) was past the guard that zeroes a failed step's gradients: the failed batch's gradients went into the
    next update (0.0376 off the run without that batch). Now the run equals the one never given that batch."""
    data = batches(3)
    runs = []
    for flaky in (True, False):
        model, engine = make(kind, True)
        _run_steps(model, engine, data[:1])
        if flaky:
            launch = engine.fused_optimizer.step

            def fail_once(*args, engine=engine, launch=launch, **kwargs):
                engine.fused_optimizer.step = launch
                raise torch.OutOfMemoryError("out of memory in the update")

            engine.fused_optimizer.step = fail_once
            with pytest.raises(torch.OutOfMemoryError, match="out of memory in the update"):
                _run_steps(model, engine, data[1:2])
            assert not engine.update_reached and engine.applied_steps() == 1
            assert all(not p.grad.any() for p in model.parameters())
        _run_steps(model, engine, data[2:])
        runs.append(_weights(model))
    for after_failure, clean in zip(*runs, strict=True):
        assert torch.equal(after_failure, clean)


def test_unsupported_optimizers_are_named():
    model = nn.Linear(2, 2)
    layers = [list(model.parameters())]
    assert "RMSprop" in _fused_unsupported(torch.optim.RMSprop(model.parameters()), layers)
    assert "amsgrad" in _fused_unsupported(torch.optim.AdamW(model.parameters(), amsgrad=True), layers)
    split = torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias], "momentum": 0.5}], lr=0.1)
    assert "momentum" in _fused_unsupported(split, layers)
    with pytest.raises(ValueError, match="fused=True, but the fused step cannot run this optimizer: RMSprop"):
        StepEngine(model, torch.optim.RMSprop(model.parameters()), torch.device("cpu"), fused=True)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_tensor_hyper_parameters_step_as_torch_optim(kind):
    """torch.optim takes one-element tensors for its hyper-parameters: the fused step reads them as floats.

    AdamW's tensor betas failed the first fused step with a Triton type error (until 2026-12-06); two param groups
    holding equal betas as distinct tensors were refused as differing.
    """
    t = torch.tensor

    def build(params):
        if kind == "sgd":
            return torch.optim.SGD(params, lr=t(0.1), momentum=t(0.9), dampening=t(0.1), weight_decay=t(1e-2))
        groups = [
            {"params": params[:2], "betas": (t(0.9), t(0.99))},
            {"params": params[2:], "betas": (t(0.9), t(0.99))},
        ]
        return torch.optim.AdamW(groups, lr=t(1e-2), eps=t(1e-6), weight_decay=t(0.1))

    model, _ = model_and_optimizer(kind)
    reference = copy.deepcopy(model)
    optimizer, plain = build(list(model.parameters())), build(list(reference.parameters()))
    engine = StepEngine(model, optimizer, DEVICE, fused=True)
    engine._check_group_settings(optimizer.param_groups)  # equal tensors in two groups are one value
    data = batches(3)
    _run_steps(model, engine, data)
    _plain_steps(reference, plain, data)
    for fused, expected in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-6)


def test_options_the_fused_step_refuses_fall_back_with_the_reason():
    """AdamW(eps=0) and SGD(dampening=1.5) are valid torch.optim: the reason is given, not an error at construction.

    ``_fused_unsupported`` approved them and ``StepEngine`` then raised from the fused options (until 2026-12-06):
    with ``fused=None`` the reference path runs (on a GPU with the warning naming the reason, test_gpu_training),
    with ``fused=True`` the refusal names it.
    """
    for make_optimizer, reason in [
        (lambda p: torch.optim.AdamW(p, lr=1e-2, eps=0.0), "eps must be a finite number > 0, got 0.0"),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=1.5), "dampening must be in [0, 1], got 1.5"),
    ]:
        model = nn.Linear(3, 2).to(DEVICE)
        reference = copy.deepcopy(model)
        assert _fused_unsupported(make_optimizer(model.parameters()), [list(model.parameters())]) == reason
        with pytest.raises(
            ValueError, match=re.escape(f"fused=True, but the fused step cannot run this optimizer: {reason}")
        ):
            StepEngine(model, make_optimizer(model.parameters()), DEVICE, fused=True)
        engine = StepEngine(model, make_optimizer(model.parameters()), DEVICE, fused=None)
        assert not engine.fused
        x = torch.ones(4, 3, device=DEVICE)
        engine.backward_and_step(model(x).square().mean())
        plain = make_optimizer(reference.parameters())
        reference(x).square().mean().backward()
        plain.step()
        for p, q in zip(model.parameters(), reference.parameters(), strict=True):
            assert torch.equal(p, q)


def test_fused_engine_keeps_channels_last_weights_and_matches_reference():
    """A channels-last model runs on the fused path: its weights, grads and 16-bit copies stay channels-last."""
    runs = {}
    for fused in (False, True):
        torch.manual_seed(0)
        conv = nn.Conv2d(3, 8, 3).to(DEVICE).to(memory_format=torch.channels_last)
        head = nn.Linear(8, 3).to(DEVICE)
        model = nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)
        groups = [{"params": list(m.parameters()), "layer": i} for i, m in enumerate([conv, head])]
        engine = StepEngine(model, torch.optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=True), DEVICE, fused=fused)
        assert engine.fused is fused
        g = torch.Generator().manual_seed(2)
        for _ in range(3):
            x = torch.randn(4, 3, 6, 6, generator=g).to(DEVICE).contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, 3, (4,), generator=g).to(DEVICE)
            with engine.precision.context():
                loss = nn.functional.cross_entropy(model(x), y)
            assert not engine.backward_and_step(loss)[1]
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        if fused:
            assert conv.weight.grad is not None and conv.weight.grad.stride() == conv.weight.stride()
            assert engine.store.low_precision_params(0, torch.bfloat16)[0].stride() == conv.weight.stride()
        runs[fused] = _weights(model)
    for a, b in zip(runs[False], runs[True], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class _CountCasts(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts ``aten._to_copy`` calls (dtype casts), by the shape of what is cast."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default:
            self.shapes.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


def _forward_and_grads(model, engine, x, y):
    with engine.precision.context():
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    engine.zero_grad()
    return loss.detach(), grads


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_bf16_layers_compute_on_the_copies_the_fused_step_writes(kind):
    model, engine = make(kind, True)
    engine.set_precisions([Precision.BF16, Precision.FP32])
    data = batches(4)
    for x, y in data[:3]:
        with engine.precision.context():
            loss = nn.functional.cross_entropy(model(x), y)
        engine.backward_and_step(loss)
    weight, bias = model[0].weight, model[0].bias
    copy_weight, copy_bias = engine.store.low_precision_params(0, torch.bfloat16)
    assert torch.equal(copy_weight, weight.detach().to(torch.bfloat16)), "the step left a stale bf16 copy"
    assert torch.equal(copy_bias, bias.detach().to(torch.bfloat16))
    x, y = data[3]
    with _CountCasts() as casts:
        with engine.precision.context():
            model(x)
    assert tuple(weight.shape) not in casts.shapes and tuple(bias.shape) not in casts.shapes, casts.shapes
    loss_copies, grads_copies = _forward_and_grads(model, engine, x, y)
    engine.precision.use_weight_copies(None)  # autocast casts the fp32 weights instead
    with _CountCasts() as casts:
        with engine.precision.context():
            model(x)
    assert tuple(weight.shape) in casts.shapes  # the cast the copies save
    loss_cast, grads_cast = _forward_and_grads(model, engine, x, y)
    assert torch.equal(loss_copies, loss_cast)
    for a, b in zip(grads_copies, grads_cast, strict=True):
        assert a.dtype == torch.float32 and torch.equal(a, b), f"gradients differ by {(a - b).abs().max():.3g}"
    assert model[0]._parameters["weight"] is weight  # the parameters are back after every forward


def test_lowering_a_layer_mid_run_or_changing_weights_refreshes_its_copy():
    model, engine = make("sgd", True)
    for x, y in batches(2):  # fp32 steps: the copies are not written
        with engine.precision.context():
            loss = nn.functional.cross_entropy(model(x), y)
        engine.backward_and_step(loss)
    assert not torch.equal(engine.store.low_precision_params(1, torch.bfloat16)[0], model[2].weight.detach().bfloat16())
    engine.set_precisions([Precision.FP32, Precision.BF16])
    assert torch.equal(engine.store.low_precision_params(1, torch.bfloat16)[0], model[2].weight.detach().bfloat16())
    engine.set_precisions([Precision.FP32, Precision.FP16])
    assert torch.equal(engine.store.low_precision_params(1, torch.float16)[0], model[2].weight.detach().half())
    with torch.no_grad():
        model[2].weight.mul_(0.5)  # e.g. a rollback or a loaded checkpoint
    engine.refresh_weight_copies()
    assert torch.equal(engine.store.low_precision_params(1, torch.float16)[0], model[2].weight.detach().half())
    engine.set_precisions([Precision.FP32, Precision.BF16])  # back to bf16: its segment holds bf16 bits again
    assert torch.equal(engine.store.low_precision_params(1, torch.bfloat16)[0], model[2].weight.detach().bfloat16())


def test_weights_written_outside_the_fused_step_are_noticed_and_their_copies_refreshed():
    model, engine = make("sgd", True)
    engine.set_precisions([Precision.BF16, Precision.BF16])
    assert not engine.sync_weight_copies()  # just derived
    for x, y in batches(2):  # the fused step writes weights and copies together: nothing to refresh
        with engine.precision.context():
            loss = nn.functional.cross_entropy(model(x), y)
        engine.backward_and_step(loss)
        assert not engine.sync_weight_copies()
    state = {name: torch.full_like(value, 0.25) for name, value in model.state_dict().items()}
    model.load_state_dict(state)  # a user loads a checkpoint mid-run
    copy = engine.store.low_precision_params(0, torch.bfloat16)[0]
    assert not torch.equal(copy, model[0].weight.detach().bfloat16())  # stale until synced
    assert engine.sync_weight_copies()
    assert torch.equal(copy, torch.full_like(copy, 0.25))
    assert not engine.sync_weight_copies()  # once


@pytest.mark.parametrize("into", ["a new engine", "an engine that took steps at momentum 0"])
def test_a_dampened_sgd_resumed_before_its_momentum_started_starts_it_as_torch(into):
    """Momentum 0 for two steps, then 0.9 (dampening 0.5), resumed at step 2 from ``optimizer.state_dict()``: the
    fused step exported its zero buffers as started ones (torch.optim holds none yet), so the first step with momentum
    after the resume took the dampened branch, 0.1 off torch's weights."""
    torch.manual_seed(1)
    data = [(torch.randn(5, 4, device=DEVICE), torch.randn(5, 3, device=DEVICE)) for _ in range(5)]
    momentum = [0.0, 0.0, 0.9, 0.9, 0.9]

    def build(fused):
        torch.manual_seed(0)
        model = nn.Linear(4, 3).to(DEVICE)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=0.5)
        return model, optimizer, StepEngine(model, optimizer, DEVICE, fused=True) if fused else None

    def step(model, optimizer, engine, i):
        for group in optimizer.param_groups:
            group["momentum"] = momentum[i]
        x, y = data[i]
        loss = (model(x) - y).square().mean()
        if engine is None:
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        else:
            loss.backward()
            engine.step_after_backward(loss)
            engine.zero_grad()

    reference = build(fused=False)
    for i in range(5):
        step(*reference, i)
    model, optimizer, engine = build(fused=True)
    for i in range(2):
        step(model, optimizer, engine, i)
    saved = {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(optimizer.state_dict())}
    assert saved["optimizer"]["state"] == {}  # no buffer yet, as torch.optim's
    if into == "a new engine":
        engine.remove()
        model, optimizer, engine = build(fused=True)
    else:
        for i in range(2):  # two more steps at momentum 0: its own count of them is 2 past the checkpoint's
            step(model, optimizer, engine, i)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    for i in range(2, 5):
        step(model, optimizer, engine, i)
    torch.testing.assert_close(model.weight, reference[0].weight, rtol=0, atol=1e-6)


@pytest.mark.parametrize("fused", [False, True])
def test_a_loss_built_before_the_last_update_is_refused_as_the_plain_loop_refuses_it(fused):
    """A GAN's slip: a loss kept across an update, then stepped. Torch raises for its saved fp32 weights; before the
    fix the fused step, writing through raw pointers, left the version counters alone and stepped it silently."""
    model, engine = make("sgd", fused)
    (x0, y0), (x1, y1) = batches(2)
    stale = nn.functional.cross_entropy(model(x0), y0)
    engine.backward_and_step(nn.functional.cross_entropy(model(x1), y1))
    weights = _weights(model)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        engine.backward_and_step(stale)
    assert all(torch.equal(a, b) for a, b in zip(weights, _weights(model), strict=True))  # nothing stepped
    assert not engine.sync_weight_copies()  # the step's own writes are no outside write


def test_a_precision_map_set_past_the_engine_is_noticed_before_the_next_forward():
    """``engine.precision.set`` is public: before the fix the next forward read the segments' old bf16 bits as fp16
    (outputs 26 off on a small MLP), and a later ``set_precisions`` of the same map saw no change to repair. The set
    itself re-derives the copies now (``LayerPrecision.use_weight_copies``'s listener)."""
    model, engine = make("sgd", True)
    engine.set_precisions([Precision.BF16, Precision.BF16])
    _run_steps(model, engine, batches(2))
    engine.precision.set([Precision.FP16, Precision.FP16])
    for layer, module in enumerate([model[0], model[2]]):
        for low, p in zip(engine.store.low_precision_params(layer, torch.float16), module.parameters(), strict=True):
            assert torch.equal(low, p.detach().half())
    assert not engine.sync_weight_copies()  # re-derived as the map was set: nothing left for the next forward


def test_group_lrs_a_scheduler_moves_together_copy_the_layer_factors_once(monkeypatch):
    """Two groups at 3e-4 and 1e-3 under a cosine schedule: their ratio in float64 wobbles in its last bits, which
    before the fix copied the factors from pageable memory (a wait for the GPU there) on 12 of 40 steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(DEVICE)
    optimizer = torch.optim.AdamW(
        [{"params": model[0].parameters(), "lr": 3e-4}, {"params": model[2].parameters(), "lr": 1e-3}]
    )
    engine = StepEngine(model, optimizer, DEVICE, fused=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=100)
    copies = []
    copy_ = torch.Tensor.copy_

    def counting_copy(self, *args, **kwargs):
        if self is engine._factors:
            copies.append(args[0].clone())
        return copy_(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "copy_", counting_copy)
    for x, y in batches(40):
        with engine.precision.context():
            loss = nn.functional.cross_entropy(model(x), y)
        engine.backward_and_step(loss)
        scheduler.step()
    assert len(copies) == 1
    assert torch.equal(copies[0].cpu(), torch.tensor([1.0, 1e-3 / 3e-4], dtype=torch.float32))


def test_a_forward_that_raises_leaves_the_parameters_in_place():
    model, engine = make("sgd", True)
    engine.set_precisions([Precision.BF16, Precision.BF16])
    params = dict(model.named_parameters())
    with pytest.raises(RuntimeError, match=r"mat1 and mat2 shapes cannot be multiplied \(4x5 and 6x8\)"):
        with engine.precision.context():
            model(torch.randn(4, 5, device=DEVICE))  # wrong width: the first layer raises inside its forward
    assert dict(model.named_parameters()) == params
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())


def test_a_run_reading_weight_copies_equals_one_that_casts(monkeypatch):
    """A whole decision loop, a layer lowered mid-run and a rollback included: the copies never go stale."""
    from triaccel_rl import training
    from triaccel_rl.config import ControllerConfig
    from triaccel_rl.loop import DecisionLoop

    class FusedEngine(StepEngine):  # TrainingRun picks the fused path only on CUDA by itself
        def __init__(self, model, optimizer, device, fused=None):
            super().__init__(model, optimizer, device, fused=True)

    monkeypatch.setattr(training, "StepEngine", FusedEngine)
    finals = {}
    for copies in (True, False):
        run = training.TrainingRun("synthetic", seed=0, device=DEVICE, cuda_graphs=False)
        assert run.engine.fused
        if not copies:
            run.engine.precision.use_weight_copies(None)  # autocast casts the fp32 weights
        loop = DecisionLoop(run, ControllerConfig(interval_steps=3, snapshot_every=2), adaptive_interval=False)
        rollbacks = 0
        for interval in range(6):
            loop.train_interval()
            if interval == 1:  # lowered mid-run: these layers' copies were last written at construction
                run.set_precisions([Precision.BF16] * len(run.engine.precision.controllable_indices))
            if interval == 3:  # a diverged update: the rollback restores an older copy of the weights
                with torch.no_grad():
                    next(run.model.parameters()).fill_(float("nan"))
                # Written outside the fused step: the probe (which reads the copies on a GPU) must see it.
            rollbacks += loop.snapshot(progress=interval / 6).extra["rolled_back"]
        assert rollbacks == 1
        finals[copies] = [p.detach().clone() for p in run.model.parameters()]
    for with_copies, with_casts in zip(finals[True], finals[False], strict=True):
        assert torch.equal(with_copies, with_casts), f"differ by {(with_copies - with_casts).abs().max():.3g}"


def test_one_16_bit_buffer_serves_bf16_and_fp16_layers():
    model, engine = make("sgd", True)
    store = engine.store
    assert store.shared_copy and store.fp16_copy.data_ptr() == store.bf16_copy.data_ptr()  # 2 bytes a parameter
    engine.set_precisions([Precision.BF16, Precision.FP16])
    for x, y in batches(3):  # each layer's segment written in its own type by the same steps
        with engine.precision.context():
            loss = nn.functional.cross_entropy(model(x), y)
        engine.backward_and_step(loss)
    assert torch.equal(store.low_precision_params(0, torch.bfloat16)[0], model[0].weight.detach().bfloat16())
    assert torch.equal(store.low_precision_params(1, torch.float16)[0], model[2].weight.detach().half())
    engine.set_precisions([Precision.FP16, Precision.BF16])  # both switch type: both segments rewritten
    assert torch.equal(store.low_precision_params(0, torch.float16)[0], model[0].weight.detach().half())
    assert torch.equal(store.low_precision_params(1, torch.bfloat16)[0], model[2].weight.detach().bfloat16())


def _bits(tensor):
    return tensor.view(torch.int16)


@pytest.mark.parametrize("codes", [[1, 2, 0], [2, 2, 1], [2, 0, 2], [0, 0, 0]])
def test_a_shared_copy_holds_each_layers_bits_in_its_own_type(codes):
    from triaccel_rl.kernels import FlatParameterStore

    torch.manual_seed(0)
    layers = [[nn.Parameter(torch.randn(n, device=DEVICE))] for n in (5, 300, 7)]
    store = FlatParameterStore(layers, shared_copy=True)
    store.bf16_copy.view(torch.int16).fill_(0x5A5A)  # no segment may keep these bits
    store.refresh_low_precision(codes)
    # One launch writes the whole buffer in the type more layers want (bf16 on a tie), then the others' segments.
    whole = torch.float16 if codes.count(2) > codes.count(1) else torch.bfloat16
    for layer, code in enumerate(codes):
        dtype = {0: whole, 1: torch.bfloat16, 2: torch.float16}[code]  # an fp32 layer's bits: never read
        (view,) = store.low_precision_params(layer, dtype)
        assert torch.equal(_bits(view), _bits(layers[layer][0].detach().to(dtype))), f"layer {layer}, code {code}"


def test_a_shared_copy_refuses_codes_that_do_not_fit():
    from triaccel_rl.kernels import FlatParameterStore

    store = FlatParameterStore([[nn.Parameter(torch.ones(3, device=DEVICE))]], shared_copy=True)
    with pytest.raises(ValueError, match=r"codes must give each of the 1 layers 0, 1 or 2; got \[3\]"):
        store.refresh_low_precision([3])
    with pytest.raises(ValueError, match="each of the 1 layers"):
        store.refresh_low_precision([1, 1])


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_the_fused_step_adopts_the_state_the_torch_optimizer_already_holds(kind):
    """A run resumed the usual way (``optimizer.load_state_dict``, then the engine) keeps its moments and step count.

    Three plain torch.optim steps, then three engine steps: the fused path must end where the reference path does,
    which reads the same torch.optim state; started from zero moments it would not.
    """
    data = batches(6)
    finals = {}
    for fused in (False, True, None):  # None: the fused path with the state cleared, the old behaviour
        model, optimizer = model_and_optimizer(kind)
        for x, y in data[:3]:  # before the engine: the moments a checkpoint would hold
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        if fused is None:
            optimizer.state.clear()
        engine = StepEngine(model, optimizer, DEVICE, fused=fused is not False)
        for x, y in data[3:]:
            with engine.precision.context():
                loss = nn.functional.cross_entropy(model(x), y)
            engine.backward_and_step(loss)
        finals[fused] = _weights(model)
        if fused is True and kind == "adamw":
            assert engine.fused_optimizer.step_count.item() == 6  # 3 torch.optim steps, then 3 fused ones
    for reference, adopted in zip(finals[False], finals[True], strict=True):
        torch.testing.assert_close(adopted, reference, rtol=1e-5, atol=1e-6)
    assert max((a - b).abs().max().item() for a, b in zip(finals[False], finals[None], strict=True)) > 1e-3


@pytest.mark.parametrize("kind", ["sgd-dampening", "adamw"])
def test_the_fused_step_adopts_each_layers_own_step_count(kind):
    """A ``torch.optim`` state whose two heads took different numbers of steps (trained one at a time) is adopted
    with each layer's own count, and the run carries on as ``torch.optim``'s does, late first steps included."""
    from users_loop import TwoHeads, train_heads_plainly

    def build():
        torch.manual_seed(0)
        model = TwoHeads(width=6, hidden=8).to(DEVICE)
        if kind == "adamw":
            return model, torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
        return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.01)

    data = batches(8)
    heads = ["b", "b", "a", "b", "a", "a", "b", "a"]
    plain, plain_optimizer = build()
    train_heads_plainly(plain, plain_optimizer, data, heads)
    model, optimizer = build()
    train_heads_plainly(model, optimizer, data[:2], heads[:2])  # head a has no state yet
    engine = StepEngine(model, optimizer, DEVICE, fused=True)
    # body, a, b. SGD's state holds no count: a momentum buffer says one step or more, which is all its update reads.
    adopted = [2.0, 0.0, 2.0] if kind == "adamw" else [1.0, 0.0, 1.0]
    assert engine.fused_optimizer.layer_step_counts.tolist() == adopted
    for (x, y), head in zip(data[2:], heads[2:], strict=True):
        optimizer.zero_grad(set_to_none=True)
        with engine.precision.context():
            loss = nn.functional.cross_entropy(model(x, head), y)
        engine.backward_and_step(loss)
    assert engine.fused_optimizer.layer_step_counts.tolist() == [adopted[0] + 6, 4.0, adopted[2] + 2]
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, plain.get_parameter(name), msg=name)
    engine.remove()


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_the_users_optimizer_state_dict_holds_the_fused_state_in_torch_layout(kind, tmp_path):
    """``optimizer.state_dict()`` on the fused path equals the reference path's, which is plain ``torch.optim``'s.

    The state is saved the usual way, loaded into a fresh optimizer that plain ``torch.optim`` then steps: it ends
    where the reference path does. Fresh, before any step, the state is empty as in ``torch.optim``.
    """
    data = batches(6)
    saved = {}
    for fused in (False, True):
        model, engine = make(kind, fused)
        assert engine.optimizer.state_dict()["state"] == {}
        _run_steps(model, engine, data[:3])
        state = engine.optimizer.state_dict()
        torch.save({"model": model.state_dict(), "optimizer": state}, tmp_path / f"{fused}.pt")
        saved[fused] = state["state"]
    assert sorted(saved[True]) == sorted(saved[False]) == [0, 1, 2, 3]
    for index, reference in saved[False].items():
        assert sorted(saved[True][index]) == sorted(reference)
        for key, value in reference.items():
            torch.testing.assert_close(saved[True][index][key].cpu(), value.cpu(), rtol=1e-5, atol=1e-7)
            assert saved[True][index][key].shape == value.shape
    finals = {}
    for fused in (False, True):  # resumed with plain torch.optim, no engine
        model, optimizer = model_and_optimizer(kind)
        checkpoint = torch.load(tmp_path / f"{fused}.pt")
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        _plain_steps(model, optimizer, data[3:])
        finals[fused] = _weights(model)
    for reference, resumed in zip(finals[False], finals[True], strict=True):
        torch.testing.assert_close(resumed, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_loading_the_users_optimizer_mid_run_loads_into_the_fused_step(kind):
    """``optimizer.load_state_dict`` after the engine is built replaces the fused state, as it would ``torch.optim``'s.

    Run A: 3 steps, saved. Run B: 2 other steps, then A's model and optimizer state loaded, then 3 steps: it must
    end where A does after its 3 more steps. A negative control (B without the optimizer load) must not.
    """
    data = batches(9)
    model, engine = make(kind, True)
    _run_steps(model, engine, data[:3])
    checkpoint = {"model": {k: v.clone() for k, v in model.state_dict().items()},
                  "optimizer": copy.deepcopy(engine.optimizer.state_dict())}  # fmt: skip
    _run_steps(model, engine, data[3:6])
    reference = _weights(model)
    finals = {}
    for load_optimizer in (True, False):
        model, engine = make(kind, True)
        _run_steps(model, engine, data[6:8])  # moments and a step count the load must replace
        with torch.no_grad():
            model.load_state_dict(checkpoint["model"])
        engine.refresh_weight_copies()
        if load_optimizer:
            engine.optimizer.load_state_dict(checkpoint["optimizer"])
            if kind == "adamw":  # each layer's count is the checkpoint's; the engine's own count of updates stays
                assert engine.fused_optimizer.layer_step_counts.tolist() == [3.0, 3.0]
            assert engine.applied_steps() == 2
        _run_steps(model, engine, data[3:6])
        finals[load_optimizer] = _weights(model)
    for expected, resumed in zip(reference, finals[True], strict=True):
        torch.testing.assert_close(resumed, expected, rtol=1e-5, atol=1e-6)
    assert max((a - b).abs().max().item() for a, b in zip(reference, finals[False], strict=True)) > 1e-4


def _optimizer_snapshot(engine):
    """The user's optimizer's groups (less their parameters) and state, and the fused buffers and counts, copied."""
    optimizer, fused = engine.optimizer, engine.fused_optimizer
    groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    state = [{k: v.clone() for k, v in optimizer.state[p].items()} for g in optimizer.param_groups for p in g["params"]]
    buffers = [getattr(fused, name).clone() for name in fused._buffer_names] + [fused._step_state.clone()]
    return groups, state, buffers


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_a_refused_load_of_the_users_optimizer_changes_nothing_and_training_goes_on_as_never_given_it(kind):
    """Another model's optimizer state loaded into the user's optimizer while the fused step runs: torch.optim put
    its param groups (LR 5.0) and state in place, then the post-hook that copies the state into the fused buffers
    raised a bare RuntimeError (a size mismatch), and training went on at LR 5. Now a ValueError naming the state
    that does not fit is raised before anything changes, and the run equals one never given that state."""
    data = batches(5)
    torch.manual_seed(0)
    other = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).to(DEVICE)
    groups = [{"params": list(m.parameters()), "layer": i} for i, m in enumerate([other[0], other[2]])]
    other_optimizer = (
        torch.optim.SGD(groups, lr=5.0, momentum=0.5, nesterov=True, weight_decay=1e-3)
        if kind == "sgd"
        else torch.optim.AdamW(groups, lr=5.0, weight_decay=1e-2)
    )
    other_engine = StepEngine(other, other_optimizer, DEVICE, fused=True)
    _run_steps(other, other_engine, data[:1])
    other_state = copy.deepcopy(other_optimizer.state_dict())
    runs = []
    for given in (True, False):
        model, engine = make(kind, True)
        _run_steps(model, engine, data[1:3])
        if given:
            before = _optimizer_snapshot(engine)
            with pytest.raises(
                ValueError,
                match=r"the loaded optimizer state '(momentum_buffer|exp_avg)' of parameter 0 has shape "
                r"\(16, 6\); this model's parameter has \(8, 6\): it was saved for another model",
            ):
                engine.optimizer.load_state_dict(other_state)
            after = _optimizer_snapshot(engine)
            assert after[0] == before[0]
            for a, b in zip(after[1] + after[2], before[1] + before[2], strict=True):
                assert _kept_equal(a, b)
        _run_steps(model, engine, data[3:])
        runs.append(_weights(model))
    for after_refusal, clean in zip(*runs, strict=True):
        assert torch.equal(after_refusal, clean)


def _kept_equal(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return torch.equal(a, b)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_after_a_state_dict_round_trip_the_fused_step_follows_the_new_param_groups(kind):
    """``optimizer.load_state_dict`` puts new group dicts in ``param_groups``: the fused step reads those.

    Before, it kept the dicts of before the load: a scheduler's LR of 0 from step 3 was ignored (the weights moved by
    2e-2) while ``group_lrs()`` said 0, and a later weight-decay change raised a KeyError. Both paths, a round trip
    after step 1, must end equal; the applied-update count carries on across the load (SGD's went back to 1, and a
    Controller then counted applied updates as skipped and raised).
    """
    data = batches(5)
    finals = {}
    for fused in (False, True):
        model, engine = make(kind, fused)
        scheduler = torch.optim.lr_scheduler.LambdaLR(engine.optimizer, lambda step: 1.0 if step < 3 else 0.0)
        for step, (x, y) in enumerate(data):
            if step == 1:
                engine.optimizer.load_state_dict(copy.deepcopy(engine.optimizer.state_dict()))
            if step == 3:
                for group in engine.optimizer.param_groups:  # a weight-decay schedule's change (the KeyError)
                    group["weight_decay"] = 0.0
                frozen = _weights(model)
            with engine.precision.context():
                loss = nn.functional.cross_entropy(model(x), y)
            engine.backward_and_step(loss)
            scheduler.step()
        assert engine.applied_steps() == 5
        assert all(torch.equal(a, b) for a, b in zip(frozen, _weights(model), strict=True))  # LR 0 from step 3
        finals[fused] = _weights(model)
    for reference, fused_weights in zip(finals[False], finals[True], strict=True):
        torch.testing.assert_close(fused_weights, reference, rtol=1e-5, atol=1e-6)


def test_removing_the_engine_leaves_its_state_in_the_users_optimizer():
    """After ``remove()``, plain ``optimizer.step()`` carries on from the fused moments, as on the reference path."""
    data = batches(6)
    finals = {}
    for fused in (False, True):
        model, engine = make("adamw", fused)
        _run_steps(model, engine, data[:3])
        engine.remove()
        optimizer = engine.optimizer
        assert len(optimizer._optimizer_state_dict_pre_hooks) == 0
        _plain_steps(model, optimizer, data[3:])
        finals[fused] = _weights(model)
    for reference, handed_back in zip(finals[False], finals[True], strict=True):
        torch.testing.assert_close(handed_back, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_the_fused_step_follows_a_users_lr_scheduler(kind):
    """A warm-up from LR 0 then a step decay, set on the optimizer between steps: fused and reference paths agree.

    The engine multiplies the scheduled LR (here by 0.5); the groups keep the scheduler's values on both paths.
    """
    data = batches(6)
    finals, lrs = {}, {}
    for fused in (False, True):
        model, engine = make(kind, fused)
        engine.lr_scale = 0.5
        engine.lr_factors = [0.25 if i == 1 else f for i, f in enumerate(engine.lr_factors)]
        scheduler = torch.optim.lr_scheduler.LambdaLR(engine.optimizer, lambda step: [0.0, 1.0, 1.0, 0.1][min(step, 3)])
        seen = []
        for x, y in data:
            with engine.precision.context():
                loss = nn.functional.cross_entropy(model(x), y)
            seen.append(engine.group_lrs())
            engine.backward_and_step(loss)
            with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()" would be an error
                warnings.simplefilter("error")
                scheduler.step()
        finals[fused] = _weights(model)
        lrs[fused] = seen
        groups = engine.optimizer.param_groups
        assert [g["lr"] for g in groups] == pytest.approx([g["initial_lr"] * 0.1 for g in groups])  # the scheduler's
    assert lrs[True] == lrs[False] and lrs[True][0] == [0.0, 0.0]
    for reference, fused in zip(finals[False], finals[True], strict=True):
        torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6)
    model, engine = make(kind, True)  # negative control: the same run without the scheduler ends elsewhere
    engine.lr_scale = 0.5
    engine.lr_factors = [0.25 if i == 1 else f for i, f in enumerate(engine.lr_factors)]
    _run_steps(model, engine, data)
    unscheduled = [p.detach().cpu() for p in model.parameters()]
    assert max((a - b).abs().max().item() for a, b in zip(finals[True], unscheduled, strict=True)) > 1e-3


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_the_fused_step_clips_the_gradient_norm_as_the_reference_path(kind):
    data = batches(5)
    finals = {}
    for fused in (False, True):
        model, engine = make(kind, fused)
        engine.max_grad_norm = 0.2  # binds: these gradients' norms are about 1
        _run_steps(model, engine, data)
        finals[fused] = _weights(model)
    for reference, fused in zip(finals[False], finals[True], strict=True):
        torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6)
    model, engine = make(kind, True)  # negative control: unclipped
    _run_steps(model, engine, data)
    assert (
        max((a - b.detach().cpu()).abs().max().item() for a, b in zip(finals[True], model.parameters(), strict=True))
        > 1e-4
    )
    with pytest.raises(ValueError, match="max_grad_norm must be a number > 0"):
        engine.fused_optimizer.step(0.1, max_grad_norm=0.0)


def test_a_users_zero_grad_does_not_detach_the_gradients_from_the_fused_step(monkeypatch):
    """``optimizer.zero_grad()`` (``set_to_none=True``) or ``model.zero_grad()`` in a controlled loop, as most loops
    have: the run is the one without them. Before the fix only weight decay moved the model: it never learned."""
    import triaccel_rl as ta
    from triaccel_rl import controller as controller_module

    class FusedEngine(StepEngine):  # the Controller picks the fused path only on CUDA by itself
        def __init__(self, model, optimizer, device, fused=None):
            super().__init__(model, optimizer, device, fused=True)

    monkeypatch.setattr(controller_module, "StepEngine", FusedEngine)
    data = batches(4)
    finals = {}
    for zero in (None, "optimizer", "model"):
        model, optimizer = model_and_optimizer("sgd")
        ctl = ta.Controller(model, optimizer, policy="fp32")
        initial = [p.detach().clone() for p in model.parameters()]
        for x, y in data:
            if zero is not None:
                (optimizer if zero == "optimizer" else model).zero_grad()
                assert all(p.grad is None for p in model.parameters())  # the hazard is real
            with ctl.autocast():
                loss = nn.functional.cross_entropy(model(x), y)
            ctl.step(loss)
        finals[zero] = _weights(model)
        assert max((a.cpu() - b).abs().max().item() for a, b in zip(initial, finals[zero], strict=True)) > 1e-3
    for zero in ("optimizer", "model"):
        for a, b in zip(finals[None], finals[zero], strict=True):
            assert torch.equal(a, b), zero
    engine = make("adamw", True)[1]  # the engine's own backward_and_step rebinds too
    for p in engine.model.parameters():
        p.grad = None
    with engine.precision.context():
        loss = nn.functional.cross_entropy(engine.model(data[0][0]), data[0][1])
    assert not engine.backward_and_step(loss)[1]
    assert engine.store.rebind_grads() == 0  # every gradient is the store's view again
    assert engine.store.grads.abs().sum() == 0  # and zeroed after the update, as always


def test_step_hooks_on_the_users_optimizer_run_around_each_fused_step():
    """An EMA of the weights in a post-hook, as users register it: the fused path's EMA is the reference path's."""
    data = batches(4)
    emas, calls = {}, {}
    for fused in (False, True):
        model, engine = make("sgd", fused)
        ema = [p.detach().clone() for p in model.parameters()]
        seen = []

        def pre_hook(optimizer, args, kwargs, seen=seen):
            seen.append("pre")

        def post_hook(optimizer, args, kwargs, ema=ema, model=model, seen=seen):
            seen.append("post")
            with torch.no_grad():
                for average, p in zip(ema, model.parameters(), strict=True):
                    average.mul_(0.5).add_(p.detach(), alpha=0.5)

        engine.optimizer.register_step_pre_hook(pre_hook)
        engine.optimizer.register_step_post_hook(post_hook)
        _run_steps(model, engine, data)
        emas[fused], calls[fused] = [a.cpu() for a in ema], seen
    assert calls[True] == calls[False] == ["pre", "post"] * 4
    for reference, fused in zip(emas[False], emas[True], strict=True):
        torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hook_kind", ["replaces-the-gradient", "warms-the-lr-up"])
def test_what_a_step_pre_hook_does_applies_to_the_fused_step_it_precedes(hook_kind):
    """A hook clamping gradients out of place (``p.grad = p.grad.clamp(...)``) was ignored by the fused step, and its
    tensor went into the next step's gradient; an LR a hook set (a warm-up written as a hook) applied a step late.
    Both paths now match a plain ``torch.optim`` loop."""
    data = batches(3)

    def hook(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            if hook_kind == "warms-the-lr-up":
                group["lr"] = group.setdefault("step_count", 0) * 0.05 + 0.01
                group["step_count"] += 1
            else:
                for p in group["params"]:
                    p.grad = p.grad.clamp(-1e-3, 1e-3)

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(DEVICE)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.5)
        optimizer.register_step_pre_hook(hook)
        return model, optimizer

    model, optimizer = build()
    _plain_steps(model, optimizer, data)
    plain = _weights(model)
    for fused in (False, True):
        model, optimizer = build()
        _run_steps(model, StepEngine(model, optimizer, DEVICE, fused=fused), data)
        for got, want in zip(_weights(model), plain, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hook_kind", ["pre-hook-warm-up", "post-hook-decay"])
def test_an_lr_a_step_hook_writes_is_the_base_the_lr_scale_rides_on_on_both_paths(hook_kind):
    """The reference path set the scaled LRs before ``optimizer.step()`` and put the own ones back after it: a
    pre-hook's LR was applied without the multipliers (0.02, not 0.02 x 0.5) and a post-hook's decay was undone (it
    never fell). Both paths now match a plain loop at half the hook's LR, and the groups keep what the hooks wrote."""
    data = batches(4)

    def hook(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            group["lr"] = 0.02 if hook_kind == "pre-hook-warm-up" else group["lr"] * 0.5

    def build(lr, hook):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(DEVICE)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.5)
        register = (
            optimizer.register_step_pre_hook if hook_kind == "pre-hook-warm-up" else optimizer.register_step_post_hook
        )
        register(hook)
        return model, optimizer

    # The plain loop at half the LR: the hook's writes halved too
    def half_hook(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            group["lr"] = 0.01 if hook_kind == "pre-hook-warm-up" else group["lr"] * 0.5

    model, optimizer = build(0.5, half_hook)
    _plain_steps(model, optimizer, data)
    plain = _weights(model)
    for fused in (False, True):
        model, optimizer = build(1.0, hook)
        engine = StepEngine(model, optimizer, DEVICE, fused=fused)
        engine.lr_scale = 0.5
        _run_steps(model, engine, data)
        for got, want in zip(_weights(model), plain, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert optimizer.param_groups[0]["lr"] == (0.02 if hook_kind == "pre-hook-warm-up" else 1.0 / 2**4)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_a_backward_with_create_graph_updates_the_fused_path_as_torch_optim(kind):
    """``backward(create_graph=True)`` (a gradient penalty's first pass) makes autograd accumulate out of place, into a
    new ``param.grad``: the fused step read the flat buffer it no longer views, all zeros, and moved nothing."""
    data = batches(3)

    def run(fused):
        model, engine = make(kind, fused)
        for x, y in data:
            engine.bind_grads()
            with engine.precision.context():
                loss = nn.functional.cross_entropy(model(x), y)
            engine.scale_loss(loss).backward(create_graph=True)
            assert not engine.step_after_backward(loss.detach())[1]
        return _weights(model)

    model, optimizer = model_and_optimizer(kind)
    _plain_steps(model, optimizer, data)
    for got, reference, plain in zip(run(True), run(False), _weights(model), strict=True):
        torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-6)


def test_a_gradient_a_pre_hook_gives_a_layer_the_loss_did_not_reach_is_applied():
    """After ``zero_grad()`` (to ``None``) a layer outside the loss has no gradient; a pre-hook adding a term to every
    gradient gives it one. The fused step copied it into the flat buffer, then put the layer back as one without a
    gradient (weights and state restored): the reference path and ``torch.optim`` apply it."""

    def l1_hook(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            for p in group["params"]:
                extra = 0.5 * torch.sign(p.detach())
                p.grad = extra if p.grad is None else p.grad + extra

    heads, x = {}, batches(1)[0][0]
    for fused in (False, True):
        model, optimizer = model_and_optimizer("sgd")
        optimizer.register_step_pre_hook(l1_hook)
        engine = StepEngine(model, optimizer, DEVICE, fused=fused)
        head = model[2].weight.detach().clone()
        optimizer.zero_grad()
        with engine.precision.context():
            loss = model[0](x).square().mean()  # the head is not in this loss
        engine.backward_and_step(loss)
        heads[fused] = (model[2].weight.detach() - head).cpu()
    assert heads[False].abs().min() > 0  # every head weight moved by the hook's term
    torch.testing.assert_close(heads[True], heads[False], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("zeroed_before", [False, True])
def test_a_gradient_set_to_none_between_backward_and_step_leaves_its_layer_alone(zeroed_before):
    """``torch.optim`` skips a ``None`` gradient (no decay, no momentum). The fused step, reading it at the step, took
    it as one the backward gave when no hook had been in place to see the backward (no ``zero_grad()`` to ``None``
    before, which installs them), and decayed the head."""
    moved = {}
    for fused in (False, True):
        model, optimizer = model_and_optimizer("sgd")  # weight decay 1e-3, momentum
        engine = StepEngine(model, optimizer, DEVICE, fused=fused)
        x, y = batches(1)[0]
        if zeroed_before:
            optimizer.zero_grad()
        engine.bind_grads()
        head = model[2].weight.detach().clone()
        with engine.precision.context():
            loss = nn.functional.cross_entropy(model(x), y)
        engine.scale_loss(loss).backward()
        model[2].weight.grad = model[2].bias.grad = None  # the head sits this step out
        assert not engine.step_after_backward(loss.detach())[1]
        moved[fused] = float((model[2].weight.detach() - head).abs().max())
    assert moved[False] == moved[True] == 0.0


def test_a_refused_step_leaves_no_record_of_gradients_found_none_for_the_next_step():
    """A step whose head gradient was set to None after the backward, then refused (the groups' momenta split): the
    record that the head had no gradient outlived it, and the next step, whose backward gave the head one, put the
    head back untrained."""
    model, optimizer = model_and_optimizer("sgd")
    engine = StepEngine(model, optimizer, DEVICE, fused=True)
    x, y = batches(1)[0]
    engine.bind_grads()
    nn.functional.cross_entropy(model(x), y).backward()
    model[2].weight.grad = model[2].bias.grad = None
    optimizer.param_groups[1]["momentum"] = 0.5
    with pytest.raises(ValueError, match="momentum"):
        engine.step_after_backward(torch.tensor(1.0, device=DEVICE))
    optimizer.param_groups[1]["momentum"] = 0.9
    head = model[2].weight.detach().clone()
    engine.bind_grads()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert not engine.step_after_backward(loss.detach())[1]
    assert (model[2].weight.detach() - head).abs().max() > 0


def _no_decay_recipe(kind, decay=0.05):
    """The usual recipe: weights decayed, biases not (every layer of the model split across two param groups)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(DEVICE)
    groups = [
        {"params": [p for p in model.parameters() if p.dim() > 1], "weight_decay": decay},
        {"params": [p for p in model.parameters() if p.dim() <= 1], "weight_decay": 0.0},
    ]
    if kind == "sgd":
        return model, torch.optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=True)
    return model, torch.optim.AdamW(groups, lr=1e-2)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_no_decay_on_biases_runs_on_the_fused_path_as_torch_optim(kind):
    """Before, a layer split across param groups sent the whole run to the reference path."""
    data = batches(6)
    model, optimizer = _no_decay_recipe(kind)
    _plain_steps(model, optimizer, data)
    expected, expected_state = _weights(model), optimizer.state_dict()["state"]
    model, optimizer = _no_decay_recipe(kind)
    engine = StepEngine(model, optimizer, DEVICE, fused=True)
    assert engine.store.n_groups == 2 and engine.fused_optimizer.options.weight_decay == (0.05, 0.0)
    _run_steps(model, engine, data)
    for got, want in zip(_weights(model), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    state = optimizer.state_dict()["state"]  # the fused moments, per parameter, as torch.optim holds them
    assert state.keys() == expected_state.keys()
    for index, entry in expected_state.items():
        for name, want in entry.items():
            torch.testing.assert_close(state[index][name], want, rtol=1e-5, atol=1e-6)
    # Negative control: decaying the biases too ends elsewhere.
    model, optimizer = _no_decay_recipe(kind)
    optimizer.param_groups[1]["weight_decay"] = 0.05
    _run_steps(model, StepEngine(model, optimizer, DEVICE, fused=True), data)
    biases = [p for p in model.parameters() if p.dim() <= 1]
    assert max((b.detach().cpu() - e).abs().max().item() for b, e in zip(biases, expected[1::2], strict=True)) > 1e-6


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_the_fused_step_follows_a_weight_decay_schedule_that_keeps_the_groups_apart(kind):
    data = batches(6)
    runs = []
    for fused in (None, True):
        model, optimizer = _no_decay_recipe(kind)
        engine = StepEngine(model, optimizer, DEVICE, fused=True) if fused else None
        for step, (x, y) in enumerate(data):
            optimizer.param_groups[0]["weight_decay"] = 0.05 * (1 + step)  # the decayed group's decay grows
            if engine is None:
                _plain_steps(model, optimizer, [(x, y)])
            else:
                _run_steps(model, engine, [(x, y)])
        runs.append(_weights(model))
    for got, want in zip(runs[1], runs[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_changes_the_fused_layout_cannot_follow_are_refused_with_nothing_changed():
    data = batches(2)
    model, optimizer = _no_decay_recipe("sgd")
    engine = StepEngine(model, optimizer, DEVICE, fused=True)
    _run_steps(model, engine, data[:1])
    before = _weights(model)
    optimizer.param_groups[1]["lr"] = 0.05  # the biases' LR apart from their weights': one LR a layer
    with pytest.raises(
        ValueError, match=r"layer '0' has parameters in param groups whose LRs now differ \(\[0.05, 0.1\]\)"
    ):
        _run_steps(model, engine, data[1:])
    assert all(torch.equal(a, b) for a, b in zip(_weights(model), before, strict=True))

    model, optimizer = _no_decay_recipe("sgd", decay=0.0)  # one decay class: one segment a layer
    engine = StepEngine(model, optimizer, DEVICE, fused=True)
    before = _weights(model)
    optimizer.param_groups[0]["weight_decay"] = 0.1
    with pytest.raises(ValueError, match=r"weight decays changed to \[0.1, 0.0\].*built for \[0.0, 0.0\]"):
        _run_steps(model, engine, data[1:])
    assert all(torch.equal(a, b) for a, b in zip(_weights(model), before, strict=True))
    assert float(engine.fused_optimizer.step_count) == 0


def test_optimizers_the_fused_step_cannot_follow_are_named():
    model = nn.Linear(2, 2)
    layers = [list(model.parameters())]
    apart = torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias], "lr": 0.01}], lr=0.1)
    reason = "a layer's parameters are in param groups of different LRs or 'layer' keys"
    assert _fused_unsupported(apart, layers) == reason
    partial = torch.optim.SGD([model.weight], lr=0.1)  # the bias trains elsewhere, or not at all
    assert _fused_unsupported(partial, layers) == "a trainable parameter is in no param group"
    adam = torch.optim.Adam([{"params": [model.weight]}, {"params": [model.bias], "weight_decay": 0.1}])
    assert "Adam" in _fused_unsupported(adam, layers)
    recipe = torch.optim.AdamW([{"params": [model.weight]}, {"params": [model.bias], "weight_decay": 0.0}])
    assert _fused_unsupported(recipe, layers) == ""


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_per_layer_lr_factors_apply_to_groups_with_a_layer_key_on_both_paths(kind):
    """A user's optimizer has no "layer" keys: per-layer factors leave it alone on the fused path as on the reference
    one (the fused path applied them to every layer before, so the two paths trained differently)."""
    data = batches(4)
    finals = {}
    for fused in (False, True):
        model, optimizer = _no_decay_recipe(kind)  # no "layer" keys
        engine = StepEngine(model, optimizer, DEVICE, fused=fused)
        engine.lr_factors = [0.25 if i == 0 else f for i, f in enumerate(engine.lr_factors)]
        _run_steps(model, engine, data)
        finals[fused] = _weights(model)
    model, optimizer = _no_decay_recipe(kind)
    _plain_steps(model, optimizer, data)
    for reference, fused, plain in zip(finals[False], finals[True], _weights(model), strict=True):
        torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    # With "layer" keys the factor applies (test_fused_engine_matches_reference): here it moves layer 0.
    model, engine = make(kind, True)
    engine.lr_factors = [0.25 if i == 0 else f for i, f in enumerate(engine.lr_factors)]
    _run_steps(model, engine, data)
    unfactored_model, unfactored = make(kind, True)
    _run_steps(unfactored_model, unfactored, data)
    assert (_weights(model)[0] - _weights(unfactored_model)[0]).abs().max().item() > 1e-4


def test_a_model_moved_or_cast_after_the_engine_is_named_not_silently_left_untrained():
    """``model.to(memory_format=...)`` or ``.double()`` after the engine is built replaces the parameters' ``.data``:
    the fused step would update its flat buffer and the model would never change. The next step says so."""
    from triaccel_rl import DetachedParametersError  # (also triaccel_rl.kernels')

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3).to(DEVICE)
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).to(DEVICE)
    engine = StepEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), DEVICE, fused=True)
    x, y = torch.randn(8, 3, 6, 6, device=DEVICE), torch.randint(0, 3, (8,), device=DEVICE)
    engine.backward_and_step(nn.functional.cross_entropy(model(x), y))  # in place: fine
    flat_before = engine.store.params.clone()
    model.to(memory_format=torch.channels_last)  # the conv weight gets new, channels-last data
    with pytest.raises(DetachedParametersError, match=r"1 parameter\(s\) no longer live .*: 0.weight\. .*model\.to"):
        engine.backward_and_step(nn.functional.cross_entropy(model(x), y))
    assert torch.equal(engine.store.params, flat_before), "a refused step changed the weights"
    model.double()  # every parameter
    with pytest.raises(DetachedParametersError, match=r"4 parameter\(s\)"):
        engine.bind_grads()


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
def test_parameters_the_optimizer_gains_after_the_engine_are_named_not_silently_frozen(fused):
    """A param group added later, or a layer unfrozen later, would be trained by ``optimizer.step()`` and never by the
    fused step, whose flat store holds what was trainable when it was built; on the reference path, by
    ``optimizer.step()`` outside the engine (unclipped, a NaN unchecked). Both paths refuse it, changing nothing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(DEVICE)
    model[0].weight.grad = torch.ones_like(model[0].weight)  # a stale gradient from before the freeze: harmless
    model[0].weight.requires_grad_(False)  # frozen, but in the optimizer (model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = StepEngine(model, optimizer, DEVICE, fused=fused)
    (x, y), *_ = batches(1)
    _run_steps(model, engine, [(x, y)])  # frozen: no gradient, nothing to say
    model[0].weight.requires_grad_(True)  # unfrozen: torch.optim would train it now
    before = _weights(model)
    with pytest.raises(ValueError, match=r"parameters \['0.weight'\] have gradients, but they were frozen"):
        _run_steps(model, engine, [(x, y)])
    assert all(torch.equal(a, b) for a, b in zip(_weights(model), before, strict=True))

    model, optimizer = model_and_optimizer("sgd")
    extra = nn.Parameter(torch.zeros(3, device=DEVICE))
    engine = StepEngine(model, optimizer, DEVICE, fused=fused)
    optimizer.add_param_group({"params": [extra], "layer": 2})
    # The parameters named and a way on (a later stage: a new controller); it named neither until 2026-12-06
    with pytest.raises(ValueError, match=r"the optimizer has 3 param groups; it had 2 when the controller was built .*"
                       r"\(parameters \[\(3,\)\]\).*close\(\) this controller and build a new one"):  # fmt: skip
        _run_steps(model, engine, batches(1))
    engine.remove()
    model, _ = model_and_optimizer("sgd")
    optimizer = torch.optim.SGD([{"params": list(model[0].parameters()), "layer": 0}], lr=0.1)
    engine = StepEngine(model, optimizer, DEVICE, fused=fused)
    optimizer.add_param_group({"params": [model[2].weight], "layer": 1})  # a model's own parameter, by its name
    with pytest.raises(ValueError, match=r"\(parameters \['2\.weight'\]\)"):
        _run_steps(model, engine, batches(1))


class _TiedLM(nn.Module):
    """An embedding and an output projection sharing one weight, as GPT-2 ties them."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.mid = nn.Linear(8, 8)
        self.out = nn.Linear(8, 20, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(torch.relu(self.mid(self.emb(x))))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_tied_weights_train_once_on_the_fused_path_as_on_the_reference_path(precision):
    """A tied weight belongs to its first layer (updated once); the layer sharing it computes with it in its own
    precision. Before, the fused path refused the model ("a parameter appears twice")."""
    g = torch.Generator().manual_seed(3)
    data = [(torch.randint(0, 20, (16,), generator=g).to(DEVICE), torch.randint(0, 20, (16,), generator=g).to(DEVICE))
            for _ in range(4)]  # fmt: skip
    finals = {}
    for fused in (False, True):
        torch.manual_seed(0)
        model = _TiedLM().to(DEVICE)
        engine = StepEngine(model, torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9), DEVICE, fused=fused)
        assert [len(params) for params in engine.layer_params] == [1, 2, 0]  # the tied weight in "emb" only
        engine.set_precisions([precision] * sum(info.controllable for info in engine.layers))
        _run_steps(model, engine, data)
        assert model.out.weight is model.emb.weight
        finals[fused] = _weights(model)
    for reference, fused in zip(finals[False], finals[True], strict=True):
        torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6)
    if precision == "fp32":  # and both are torch.optim's run of the tied model
        torch.manual_seed(0)
        model = _TiedLM().to(DEVICE)
        _plain_steps(model, torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9), data)
        for fused, plain in zip(finals[True], _weights(model), strict=True):
            torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_the_fused_step_follows_a_momentum_schedule_as_the_reference_path(kind):
    """``OneCycleLR`` cycles SGD's momentum (Adam's beta1) by default. The fused step read them once, when built, so
    such a run trained differently on a GPU; AdamW's bias corrections follow the current beta1, as torch's do."""
    data = batches(6)
    finals, seen = {}, {}
    for fused in (False, True):
        model, engine = make(kind, fused)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(engine.optimizer, max_lr=0.05, total_steps=len(data))
        momenta = []
        for x, y in data:
            momenta.append(engine.optimizer.param_groups[0]["momentum" if kind == "sgd" else "betas"])
            _run_steps(model, engine, [(x, y)])
            scheduler.step()
        finals[fused], seen[fused] = _weights(model), momenta
    assert seen[True] == seen[False] and len(set(seen[True])) > 2  # the momentum moved at every step
    for reference, fused in zip(finals[False], finals[True], strict=True):
        torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6)


def test_momentum_changes_the_fused_step_cannot_follow_are_refused():
    model, engine = make("sgd", True)
    engine.optimizer.param_groups[1]["momentum"] = 0.5  # the groups apart
    with pytest.raises(ValueError, match=r"param groups' 'momentum' now differ \(\[0.9, 0.5\]\)"):
        _run_steps(model, engine, batches(1))
    model = nn.Linear(6, 3).to(DEVICE)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # no momentum: no buffer
    engine = StepEngine(model, optimizer, DEVICE, fused=True)
    optimizer.param_groups[0]["momentum"] = 0.9
    with pytest.raises(ValueError, match=r"SGD's momentum went from 0 to 0\.9"):
        _run_steps(model, engine, batches(1))


def test_a_users_optimizer_step_beside_the_fused_step_is_refused():
    model, engine = make("adamw", True)
    _run_steps(model, engine, batches(1))
    with pytest.raises(RuntimeError, match="this would be a second update"):
        engine.optimizer.step()  # AdamW would move every weight again from the fused step's gradients
    engine.remove()
    engine.optimizer.step()  # handed back: the user's optimizer steps on its own


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("saved_fused", [False, True], ids=["cpu-to-fused", "fused-to-cpu"])
def test_a_checkpoint_resumes_on_the_other_update_path(kind, saved_fused):
    """A CPU run's checkpoint resumes on the fused step (its torch.optim state adopted, its GradScaler's scale
    carried), and a fused step's on the reference path (from the torch.optim layout it also saves)."""
    data = batches(6)
    model, engine = make(kind, saved_fused)
    engine.set_precisions(["fp16", "fp16"])  # a loss scale to carry
    _run_steps(model, engine, data[:3])
    if saved_fused:
        engine._scale.fill_(1024.0)  # a scale of its own, not the default a fresh engine would start with
    else:
        engine.grad_scaler.update(1024.0)
    state = copy.deepcopy(engine.state_dict())  # as torch.save would keep it (the live state moves on)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    _run_steps(model, engine, data[3:])
    expected = _weights(model)

    model, engine = make(kind, not saved_fused)
    model.load_state_dict(weights)
    engine.load_state_dict(state)
    assert engine.loss_scale == 1024.0
    _run_steps(model, engine, data[3:])
    for got, want in zip(_weights(model), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    model, fresh = make(kind, not saved_fused)  # negative control: without the optimizer state it ends elsewhere
    model.load_state_dict(weights)
    _run_steps(model, fresh, data[3:])
    assert max((a - b).abs().max().item() for a, b in zip(_weights(model), expected, strict=True)) > 1e-4
    if saved_fused:  # a fused checkpoint saved before the torch.optim layout was saved with it
        old = {key: value for key, value in state.items() if key != "torch_optimizer"}
        with pytest.raises(ValueError, match="made with the fused step, before its state was also saved"):
            make(kind, False)[1].load_state_dict(old)


def test_a_controlled_static_loop_on_the_fused_step_is_the_users_own_loop(monkeypatch):
    """The README's list on the fused step, through the Controller: no decay on biases, OneCycleLR cycling the LR and
    beta1, clipping, an EMA hook, tied weights, zero_grad; equal to the user's plain loop within float rounding."""
    from users_loop import controlled_loop, plain_loop, users_data

    import triaccel_rl.controller as controller_module
    from triaccel_rl.config import ControllerConfig
    from triaccel_rl.controller import Controller

    data = users_data(DEVICE)
    plain, plain_ema = plain_loop(data, DEVICE)
    monkeypatch.setattr(controller_module, "StepEngine", lambda *args, **kwargs: StepEngine(*args, fused=True))
    model, ctl, ema = controlled_loop(data, Controller, ControllerConfig(interval_steps=5), DEVICE)
    assert ctl.engine.fused
    for got, want in zip(_weights(model), plain, strict=True):
        torch.testing.assert_close(got, want.cpu(), rtol=1e-4, atol=1e-5)
    for got, want in zip(ema, plain_ema, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("optimizer_kind", ["sgd", "sgd-dampening", "adamw"])
def test_a_branch_not_taken_after_set_to_none_is_left_alone_as_by_torch_optim(monkeypatch, optimizer_kind):
    """Two heads trained one at a time, ``optimizer.zero_grad()`` (``set_to_none=True``) before each step: the idle
    head takes no decay and no momentum and counts no step, so the run equals plain ``torch.optim``'s, head b's late
    first step included (AdamW's bias corrections of its step 1; SGD's momentum buffer started from its gradient)."""
    from users_loop import TwoHeads, train_heads_controlled, train_heads_plainly

    import triaccel_rl as ta
    from triaccel_rl import controller as controller_module

    class FusedEngine(StepEngine):  # the Controller picks the fused path only on CUDA by itself
        def __init__(self, model, optimizer, device, fused=None):
            super().__init__(model, optimizer, device, fused=True)

    def build():
        torch.manual_seed(0)
        model = TwoHeads(width=6, hidden=8).to(DEVICE)
        if optimizer_kind == "adamw":
            return model, torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
        dampening = 0.3 if optimizer_kind == "sgd-dampening" else 0.0
        return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=dampening, weight_decay=0.01)

    monkeypatch.setattr(controller_module, "StepEngine", FusedEngine)
    data = batches(6)
    heads = ["a", "b", "b", "a", "b", "a"]
    plain, plain_optimizer = build()
    train_heads_plainly(plain, plain_optimizer, data, heads)
    model, optimizer = build()
    with ta.Controller(model, optimizer, policy="fp32") as ctl:
        assert ctl.engine.fused
        train_heads_controlled(ctl, model, optimizer, data, heads)
        assert ctl.engine.fused_optimizer.layer_step_counts.tolist() == [6.0, 3.0, 3.0]  # body, a, b
        saved = optimizer.state_dict()["state"]  # the user's view of the fused state
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, plain.get_parameter(name), msg=name)
    for index, want in plain_optimizer.state_dict()["state"].items():  # AdamW: each head's own count
        assert saved[index].keys() == want.keys()
        for key, value in want.items():
            torch.testing.assert_close(saved[index][key].cpu(), value.cpu(), msg=f"parameter {index}'s {key}")


@pytest.mark.parametrize("policy", ["fp32", "fp16"])
def test_after_set_to_none_the_backward_hands_over_autograds_own_gradients_and_the_step_binds_them(monkeypatch, policy):
    """A user's ``zero_grad()`` leaves the gradients ``None`` through the backward: autograd's own tensors, no add
    into the flat buffer's views and no hook a parameter; the step copies them in and binds the views again, and
    the run equals plain ``torch.optim``'s (under fp16, with a ``GradScaler`` that never overflows)."""
    import triaccel_rl as ta
    from triaccel_rl import controller as controller_module

    class FusedEngine(StepEngine):
        def __init__(self, model, optimizer, device, fused=None):
            super().__init__(model, optimizer, device, fused=True)

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(DEVICE)
        return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)

    monkeypatch.setattr(controller_module, "StepEngine", FusedEngine)
    data = batches(4)
    plain, plain_optimizer = build()
    for x, y in data:
        plain_optimizer.zero_grad()
        nn.functional.cross_entropy(plain(x), y).backward()
        plain_optimizer.step()
    model, optimizer = build()
    in_buffer: list[bool] = []  # per parameter and backward: was the gradient autograd accumulated a view?
    with ta.Controller(model, optimizer, policy=policy) as ctl:
        store = ctl.engine.store
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(
                lambda q: in_buffer.append(q.grad.untyped_storage().data_ptr() == store.grads.data_ptr())
            )
        for x, y in data:
            optimizer.zero_grad()
            assert all(p.grad is None for p in model.parameters())
            with ctl.autocast():
                loss = nn.functional.cross_entropy(model(x), y)
            ctl.step(loss)
            views = [view for _, view, _ in store._grad_views]
            assert all(p.grad is view for p, view in zip(model.parameters(), views, strict=True))
        assert store._grad_hooks == {}
    assert in_buffer == [False] * (4 * len(list(model.parameters())))
    for name, param in model.named_parameters():
        torch.testing.assert_close(
            param,
            plain.get_parameter(name),
            msg=name,
            atol=1e-3 if policy == "fp16" else None,
            rtol=1e-3 if policy == "fp16" else None,
        )


@pytest.mark.parametrize("policy", ["fp32", "fp16"])
def test_gradient_accumulation_and_a_partial_optimizer_on_the_fused_step(monkeypatch, policy):
    """The fused step's device-side loss scale under ``Controller.backward`` (two micro-batches update as one step of
    both), with an optimizer over the head alone (the body trainable, outside the flat store, left unchanged)."""
    from users_loop import controlled_step

    import triaccel_rl.controller as controller_module
    from triaccel_rl.config import ControllerConfig
    from triaccel_rl.controller import Controller

    monkeypatch.setattr(controller_module, "StepEngine", lambda *args, **kwargs: StepEngine(*args, fused=True))
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 6, generator=generator).to(DEVICE), torch.randint(0, 3, (64,), generator=generator)
    y = y.to(DEVICE)
    finals = []
    for accumulate in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(DEVICE)
        body = [p.detach().clone() for p in model[0].parameters()]
        optimizer = torch.optim.SGD(model[2].parameters(), lr=0.1, momentum=0.9)
        ctl = Controller(model, optimizer, policy=policy, config=ControllerConfig(interval_steps=3))
        assert ctl.engine.fused and ctl.engine.layer_params[0] == []
        for i in range(4):
            controlled_step(ctl, model, x[16 * i : 16 * (i + 1)], y[16 * i : 16 * (i + 1)], 2 if accumulate else 1)
        assert ctl.steps == 4 and ctl.engine.applied_steps() == 4
        assert all(torch.equal(a, b) for a, b in zip(body, model[0].parameters(), strict=True)), "the body moved"
        finals.append(_weights(model))
        ctl.close()
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if policy == "fp32" else {"rtol": 2e-3, "atol": 1e-4}
    for whole, accumulated in zip(*finals, strict=True):
        torch.testing.assert_close(accumulated, whole, **tolerance)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_after_a_rollback_the_fused_step_takes_the_groups_hyperparameters_not_the_copys(kind):
    """The rollback restores the fused optimizer's state, its options included (the copy's momentum or betas, and weight
    decay). The param groups, which the restore leaves alone, had moved on (a momentum schedule, say) and stayed put
    after: the fused step kept the copy's options for good, since it re-reads the groups only when they change."""
    from triaccel_rl.shield import RollbackGuard

    model, engine = make(kind, fused=True)
    guard = RollbackGuard(model, engine.state_holder, after_restore=engine.after_restore)
    data = batches(4)
    _run_steps(model, engine, data[:2])
    guard.save()
    for group in engine.optimizer.param_groups:  # what a schedule does between the copy and the restore
        group["weight_decay"] = 0.0
        if kind == "sgd":
            group["momentum"] = 0.5
        else:
            group["betas"] = (0.8, 0.99)
    _run_steps(model, engine, data[2:])  # the fused step takes them in
    options = engine.fused_optimizer.options
    assert options.weight_decay == 0.0 and (options.momentum == 0.5 if kind == "sgd" else options.beta1 == 0.8)
    assert guard.restore()
    options = engine.fused_optimizer.options
    assert options.weight_decay == 0.0  # the groups', not the copy's (1e-3 or 1e-2)
    if kind == "sgd":
        assert options.momentum == 0.5
    else:
        assert (options.beta1, options.beta2) == (0.8, 0.99)
    engine.remove()


def test_trainable_parameters_outside_the_optimizer_get_unscaled_gradients_on_the_fused_path():
    """As on the reference path (test_engine.py): the fused path's scaled backward unscales them too."""
    from users_loop import unheld_gradients_under_fp16

    unheld_gradients_under_fp16(fused=True, device=DEVICE)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_a_fused_checkpoint_resumes_on_the_fused_step_with_its_saved_param_groups(kind):
    """The fused optimizer's own state holds no param group: a fused resume kept the new run's LR (a scheduler's
    move lost) while the kernel took the saved momentum, and the run went elsewhere (4e-2 on SGD)."""
    data = batches(5)
    model, engine = make(kind, True)
    _run_steps(model, engine, data[:2])
    moved = {"lr": 0.02, "momentum": 0.5} if kind == "sgd" else {"lr": 3e-3, "betas": (0.8, 0.99)}
    for group in engine.optimizer.param_groups:  # a scheduler moved them
        group.update(moved)
    _run_steps(model, engine, data[2:3])
    state = copy.deepcopy(engine.state_dict())
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    _run_steps(model, engine, data[3:])
    expected = _weights(model)

    model, engine = make(kind, True)  # built with the first settings
    model.load_state_dict(weights)
    engine.load_state_dict(state)
    assert all(group[key] == value for group in engine.optimizer.param_groups for key, value in moved.items())
    _run_steps(model, engine, data[3:])
    for got, want in zip(_weights(model), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("edit", ["split-layer-lrs", "betas-differ"])
def test_a_checkpoint_whose_param_groups_the_fused_step_refuses_is_refused_before_anything_loads(edit):
    """The fused load applied the saved groups after the fused state: a layout the fused step refuses (a layer's
    decay and no-decay groups at different LRs) raised part-way, with the saved moments already in the buffers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(DEVICE)
    weights = [p for p in model.parameters() if p.dim() > 1]
    biases = [p for p in model.parameters() if p.dim() == 1]
    groups = [{"params": weights, "weight_decay": 1e-2}, {"params": biases, "weight_decay": 0.0}]
    engine = StepEngine(model, torch.optim.AdamW(groups, lr=1e-3), DEVICE, fused=True)
    _run_steps(model, engine, batches(2))
    state = copy.deepcopy(engine.state_dict())
    _run_steps(model, engine, batches(1))  # the engine moves on from the checkpoint
    saved_groups = state["torch_optimizer"]["param_groups"]
    if edit == "split-layer-lrs":
        saved_groups[1]["lr"] = 5e-4  # the biases' group only
        message = "LRs now differ"
    else:
        saved_groups[1]["betas"] = (0.5, 0.999)
        message = "'betas' now differ"
    before = copy.deepcopy(engine.state_dict())
    with pytest.raises(ValueError, match=message):
        engine.load_state_dict(state)
    with pytest.raises(ValueError, match=message):
        engine.check_state_dict(state)
    after = engine.state_dict()
    assert [g["lr"] for g in engine.optimizer.param_groups] == [1e-3, 1e-3]
    for index, entry in before["torch_optimizer"]["state"].items():  # the moments and counts as they were
        for field, value in entry.items():
            torch.testing.assert_close(after["torch_optimizer"]["state"][index][field], value, rtol=0, atol=0)
    _run_steps(model, engine, batches(1))  # and it still steps
    engine.remove()


def test_the_fused_second_moment_diagonal_is_the_reference_path_s_element_for_element():
    """It returned each layer's padded segment of the flat buffer (4096 entries for a 56-element layer, most of
    them zeros), which the curvature-sparsity signals read as a spike on a sea of zeros."""
    diagonals = {}
    for fused in (False, True):
        model, engine = make("adamw", fused)
        _run_steps(model, engine, batches(3))
        diagonals[fused] = [d.cpu() for d in engine.second_moment_diagonal()]
    assert [d.numel() for d in diagonals[True]] == [56, 27]
    for reference, fused in zip(diagonals[False], diagonals[True], strict=True):
        torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-12)


def test_fused_sgd_reports_nan_momentum_norms_before_a_layer_s_first_step():
    """As the reference path does (no momentum buffer yet): the fused SGD reported 0, a measurement it never made."""
    for fused in (False, True):
        model, engine = make("sgd", fused)
        assert np.isnan(engine.grad_mean_sq_norm()).all()
        _run_steps(model, engine, batches(1))
        assert np.isfinite(engine.grad_mean_sq_norm()).all()


class _TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head_a, self.head_b = nn.Linear(6, 8), nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x, head):
        features = torch.relu(self.body(x))
        return (
            self.head_a(features) + self.head_b(features) if head == "both" else getattr(self, f"head_{head}")(features)
        )


@pytest.mark.parametrize("case", ["unused-head-zeroed-alone", "body-frozen-mid-run"])
def test_parameters_left_without_a_gradient_are_left_alone_on_the_fused_path_as_by_torch_optim(case):
    """A head the step's loss leaves out, zeroed alone (``head_b.zero_grad()``), was decayed and moved by momentum
    on the fused path (only the zeroed parameters were watched, and none of them got a gradient, which read as no
    hook having run); a body frozen mid-run with its gradients set to None raised (a hook on a frozen parameter)."""
    data = batches(3)
    weights = {}
    for fused in (False, True):
        torch.manual_seed(0)
        model = _TwoHeads().to(DEVICE)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
        engine = StepEngine(model, optimizer, DEVICE, fused=fused)
        left = model.head_b if case == "unused-head-zeroed-alone" else model.body
        for i, (x, y) in enumerate(data):
            # Step 0 reaches every parameter: one that never had a gradient is bound to zeros on the fused path from
            # the start, and decayed there, where torch.optim skips it (left as it is: see the note on the store).
            head = ("both", "b", "a")[i]
            if i == 2:
                for p in left.parameters():
                    p.requires_grad_(case == "unused-head-zeroed-alone")
                    p.grad = None
                before = _weights(left)
            with engine.precision.context():
                loss = nn.functional.cross_entropy(model(x, head), y)
            engine.backward_and_step(loss)
        assert all(torch.equal(a, b) for a, b in zip(_weights(left), before, strict=True))
        weights[fused] = _weights(model)
    for reference, fused_weights in zip(weights[False], weights[True], strict=True):
        torch.testing.assert_close(fused_weights, reference, rtol=1e-5, atol=1e-6)


def test_betas_set_to_a_list_mid_run_are_taken_as_a_tuple():
    """``group["betas"] = [0.85, 0.999]`` (torch.optim takes a list) raised ``unhashable type: 'list'`` on the
    fused step; both paths now take it alike."""
    data = batches(3)
    weights = {}
    for fused in (False, True):
        model, engine = make("adamw", fused)
        _run_steps(model, engine, data[:1])
        for group in engine.optimizer.param_groups:
            group["betas"] = [0.85, 0.999]
        _run_steps(model, engine, data[1:])
        weights[fused] = _weights(model)
    for reference, fused_weights in zip(weights[False], weights[True], strict=True):
        torch.testing.assert_close(fused_weights, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_a_parameter_of_no_elements_trains_on_both_paths():
    """``nn.Linear(0, 3)`` (an optional block with no features): the reference path's gradient maximum raised (an
    empty tensor has no infinity norm) at every step; the fused path trained."""

    class WithEmpty(nn.Module):
        def __init__(self):
            super().__init__()
            self.extra, self.fc = nn.Linear(0, 3), nn.Linear(6, 3)

        def forward(self, x):
            return self.fc(x) + self.extra(x[:, :0])

    x, y = batches(1)[0]
    torch.manual_seed(0)
    plain = WithEmpty().to(DEVICE)
    _plain_steps(plain, torch.optim.SGD(plain.parameters(), lr=0.1), [(x, y)])
    for fused in (False, True):
        torch.manual_seed(0)
        model = WithEmpty().to(DEVICE)
        engine = StepEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), DEVICE, fused=fused)
        with engine.precision.context():
            loss = nn.functional.cross_entropy(model(x), y)
        grads, skipped = engine.backward_and_step(loss)
        assert not skipped and grads.abs_max.shape == (engine.n_layers,)
        for got, want in zip(_weights(model), _weights(plain), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_layer_the_optimizer_holds_nothing_of_has_no_second_moment_on_either_path():
    """A head fine-tuned alone: the fused path's ``torch.cat`` of no views raised; the reference path gives None."""
    diagonals = {}
    for fused in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(DEVICE)
        engine = StepEngine(model, torch.optim.AdamW(model[2].parameters(), lr=1e-2), DEVICE, fused=fused)
        _run_steps(model, engine, batches(2))
        diagonals[fused] = engine.second_moment_diagonal()
    assert [d is None for d in diagonals[True]] == [d is None for d in diagonals[False]] == [True, False]
    torch.testing.assert_close(diagonals[True][1].cpu(), diagonals[False][1].cpu(), rtol=1e-5, atol=1e-12)


def test_a_layer_yet_to_take_a_step_has_no_second_moment_on_either_path():
    """Before the first update, and for a layer frozen through it: the fused path gave zeros where the reference path
    (and the docstring) give None, so the signals read a measurement of zero curvature on one path only."""
    diagonals = {}
    for fused in (False, True):
        model, engine = make("adamw", fused)
        before = engine.second_moment_diagonal()
        for p in model[0].parameters():  # the first update trains the head alone
            p.requires_grad_(False)
            p.grad = None  # on the fused path bound to zeros from the start, which would take part in the step
        _run_steps(model, engine, batches(1))
        diagonals[fused] = (before, engine.second_moment_diagonal())
    for reference, fused_diagonals in zip(diagonals[False], diagonals[True], strict=True):
        assert [d is None for d in fused_diagonals] == [d is None for d in reference]
    assert diagonals[True][0] == [None, None] and diagonals[True][1][0] is None
    torch.testing.assert_close(diagonals[True][1][1].cpu(), diagonals[False][1][1].cpu(), rtol=1e-5, atol=1e-12)


def test_the_fused_loss_scale_grows_only_where_it_stays_finite_as_grad_scalers():
    """A scale of 2**127 one clean step from growing: GradScaler keeps it (doubled it would be inf) and restarts the
    count. The fused path doubled it to inf, after which every step was skipped (its scaled loss not finite)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).to(DEVICE)
    engine = StepEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), DEVICE, fused=True)
    engine.set_precisions(["fp16", "fp32"])
    state = engine.state_dict()
    state["scaler"] = {"scale": 2.0**127, "clean_steps": 1999}
    engine.load_state_dict(state)
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0**127, growth_interval=2000)
    scaler.load_state_dict({**scaler.state_dict(), "_growth_tracker": 1999})
    p = torch.nn.Parameter(torch.ones(1, device=DEVICE))
    reference = torch.optim.SGD([p], lr=0.1)
    x, y = torch.randn(8, 4, device=DEVICE) * 1e-30, torch.randint(0, 2, (8,), device=DEVICE)  # finite when scaled
    for step in range(3):
        with engine.precision.context():
            loss = nn.functional.cross_entropy(model(x), y)
        _, skipped = engine.backward_and_step(loss)
        reference.zero_grad()
        scaler.scale((p * 1e-30).sum()).backward()  # a clean step for GradScaler too
        scaler.step(reference)
        scaler.update()
        assert not skipped, f"step {step}"
        assert engine.loss_scale == scaler.get_scale() == 2.0**127, f"step {step}"
        assert int(engine.state_dict()["scaler"]["clean_steps"]) == scaler.state_dict()["_growth_tracker"]


def _adamw_decay_groups(device=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)).to(device or "cpu")
    groups = [
        {"params": [model[0].weight, model[2].weight], "weight_decay": 0.05},
        {"params": [model[0].bias, model[2].bias], "weight_decay": 0.0},
    ]
    return model, torch.optim.AdamW(groups, lr=1e-2)


def _engine_step(model, engine, seed):
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 4, generator=generator), torch.randint(0, 2, (8,), generator=generator)
    device = next(model.parameters()).device
    engine.backward_and_step(nn.functional.cross_entropy(model(x.to(device)), y.to(device)))


def test_a_reference_checkpoint_the_fused_step_cannot_run_is_refused_before_it_loads():
    """A layer's decay and no-decay groups at different LRs (a warm-up of the biases only) passed check_state_dict and
    were refused by the optimizer's load hook after the groups and moments had been replaced: every later step
    raised."""
    model, optimizer = _adamw_decay_groups()
    reference = StepEngine(model, optimizer, torch.device("cpu"), fused=False)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda s: 1.0, lambda s: min(1.0, (s + 1) / 10)])
    _engine_step(model, reference, 0)
    warmup.step()
    saved = reference.state_dict()
    model, optimizer = _adamw_decay_groups(DEVICE)
    fused = StepEngine(model, optimizer, DEVICE, fused=True)
    _engine_step(model, fused, 1)
    before = copy.deepcopy(fused.fused_optimizer.state_dict())
    for call in (fused.check_state_dict, fused.load_state_dict):
        with pytest.raises(ValueError, match=r"layer '0' has parameters in param groups whose LRs now differ"):
            call(saved)
    after = fused.fused_optimizer.state_dict()
    for key, value in before.items():
        if torch.is_tensor(value):
            assert torch.equal(value, after[key]), key
    assert [group["lr"] for group in optimizer.param_groups] == [0.01, 0.01]
    _engine_step(model, fused, 2)  # the engine still steps


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (None, "the checkpoint's optimizer state is NoneType, not a dict of kind, options, layer_numels, steps"),
        ([1, 2], "the checkpoint's optimizer state is list, not a dict"),
        ("no-options", "the checkpoint's optimizer state lacks 'options'"),
    ],
)
def test_a_fused_checkpoints_malformed_optimizer_entry_is_refused_by_the_check(bad, message):
    """It passed check_state_dict and the load raised an AttributeError or KeyError."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).to(DEVICE)
    engine = StepEngine(model, torch.optim.AdamW(model.parameters(), lr=0.01), DEVICE, fused=True)
    engine.backward_and_step(model(torch.randn(3, 4, device=DEVICE)).sum())
    state = engine.state_dict()
    if bad == "no-options":
        bad = {k: v for k, v in state["optimizer"].items() if k != "options"}
    with pytest.raises(ValueError, match=re.escape(message)):
        engine.check_state_dict({**state, "optimizer": bad})


def test_grad_mean_sq_norm_reads_no_sgd_formula_into_rmsprops_momentum():
    """RMSprop keeps a ``momentum_buffer`` (a preconditioned average) and no ``dampening``: a KeyError at every
    Controller decision."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    engine = StepEngine(model, torch.optim.RMSprop(model.parameters(), lr=0.01, momentum=0.9), torch.device("cpu"))
    engine.backward_and_step(model(torch.randn(3, 4)).sum())
    assert np.isnan(engine.grad_mean_sq_norm()).all()


def test_the_fused_loss_scale_doubles_after_2000_clean_steps_as_grad_scalers():
    """The only growth test started at 2**127, where growth is held: 1000 steps, or x4, went unnoticed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).to(DEVICE)
    engine = StepEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), DEVICE, fused=True)
    engine.set_precisions(["fp16", "fp32"])
    x, y = torch.randn(8, 4, device=DEVICE), torch.randint(0, 2, (8,), device=DEVICE)

    def steps_from(clean_steps: int, n: int) -> list[float]:
        state = engine.state_dict()
        state["scaler"] = {"scale": 1024.0, "clean_steps": clean_steps}
        engine.load_state_dict(state)
        scales = []
        for _ in range(n):
            with engine.precision.context():
                loss = nn.functional.cross_entropy(model(x), y)
            engine.backward_and_step(loss)
            scales.append(engine.loss_scale)
        return scales

    assert steps_from(998, 3) == [1024.0] * 3  # 999 to 1001 clean steps: no growth before 2000
    assert steps_from(1999, 1) == [2048.0]  # GradScaler(growth_factor=2, growth_interval=2000)
    assert int(engine.state_dict()["scaler"]["clean_steps"]) == 0
    assert steps_from(2500, 2) == [2048.0, 2048.0]  # a loaded count past the interval grows at once, and restarts
    assert int(engine.state_dict()["scaler"]["clean_steps"]) == 1


def _clamp_everything(model, bound):
    return lambda: torch.nn.utils.clip_grad_value_(model.parameters(), bound)


@pytest.mark.parametrize("optimizer_kind", ["sgd", "adamw"])
def test_grad_transform_sees_unscaled_gradients_under_fp16_on_both_paths(optimizer_kind):
    """``grad_transform`` is where a plain loop's ``clip_grad_value_`` goes under fp16: after the unscale, before the
    update. A step pre-hook sees the scaled gradients on the fused path (65536 times the unscaled), so a clamp there
    clipped nearly every element to the bound; the transform clamps the same values on both paths."""
    data = batches(4)
    runs = {}
    for fused in (False, True):
        model, engine = make(optimizer_kind, fused)
        engine.set_precisions(["fp16", "fp16"])
        seen = []
        clamp = _clamp_everything(model, 0.01)

        def transform(model=model, seen=seen, clamp=clamp):
            seen.append(max(p.grad.abs().max().item() for p in model.parameters()))
            clamp()

        engine.grad_transform = transform
        _run_steps(model, engine, data)
        assert engine.loss_scale == 65536.0  # scaled all along: nothing overflowed
        runs[fused] = seen, _weights(model)
    for (seen, weights), (seen_fused, weights_fused) in zip([runs[False]], [runs[True]], strict=True):
        assert len(seen) == len(seen_fused) == 4
        assert 0.01 < max(seen) < 100.0  # unscaled magnitudes, not 65536 times them
        np.testing.assert_allclose(seen_fused, seen, rtol=1e-3)
        for a, b in zip(weights, weights_fused, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fused", [False, True])
def test_grad_transform_clamps_as_a_plain_loop_does_in_fp32(fused):
    """fp32: the transform's clamp before the update is ``loss.backward(); clip_grad_value_(...); optimizer.step()``."""
    data = batches(4)
    model, optimizer = model_and_optimizer("sgd")
    for x, y in data:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        torch.nn.utils.clip_grad_value_(model.parameters(), 0.02)
        optimizer.step()
    model_c, engine = make("sgd", fused)
    engine.grad_transform = _clamp_everything(model_c, 0.02)
    _run_steps(model_c, engine, data)
    for a, b in zip(_weights(model), _weights(model_c), strict=True):
        torch.testing.assert_close(b, a, rtol=0 if not fused else 1e-5, atol=0 if not fused else 1e-7)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_an_overflow_the_transform_clamps_away_still_skips_the_step(fused, precision):
    """A clamp turns an infinite gradient finite; ``unscale_`` had recorded the overflow, so a plain loop's
    ``scaler.step`` skips, and the scale backs off. Injected: one weight's gradient made infinite on its way in."""
    model, engine = make("sgd", fused)
    engine.set_precisions([precision] * 2)
    engine.grad_transform = _clamp_everything(model, 0.01)
    before = _weights(model)
    handle = model[0].weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    x, y = batches(1)[0]
    with engine.precision.context():
        loss = nn.functional.cross_entropy(model(x), y)
    _, skipped = engine.backward_and_step(loss)
    handle.remove()
    assert skipped
    for a, b in zip(before, _weights(model), strict=True):
        assert torch.equal(a, b)
    assert engine.applied_steps() == 0
    if precision == "fp16":
        assert engine.loss_scale == 32768.0


@pytest.mark.parametrize("fused", [False, True])
def test_a_second_optimizers_overflow_the_transform_clamps_still_skips_the_step(fused):
    """The body outside the engine's optimizer (a second one's); its gradient made infinite on the way in, the
    transform clamping everything. The fused path took the second optimizer's overflow after the transform, found
    none, stepped the head and kept the scale; the reference path skipped, as a plain GradScaler loop does."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(DEVICE)
    engine = StepEngine(model, torch.optim.SGD(model[2].parameters(), lr=0.1), DEVICE, fused=fused)
    engine.set_precisions(["fp16", "fp16"])
    engine.grad_transform = _clamp_everything(model, 0.01)
    head = _weights(model)[2:]
    handle = model[0].weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    x, y = batches(1)[0]
    with engine.precision.context():
        loss = nn.functional.cross_entropy(model(x).float(), y)
    _, skipped = engine.backward_and_step(loss)
    handle.remove()
    assert skipped and engine.loss_scale == 32768.0
    assert all(torch.equal(a, b) for a, b in zip(head, _weights(model)[2:], strict=True))
    assert model[0].weight.grad is None  # dropped: the second optimizer's step skips it


@pytest.mark.parametrize("fused", [False, True])
def test_the_transform_sees_a_branch_not_taken_as_none_on_both_paths(fused):
    """After ``zero_grad(set_to_none=True)`` a layer the forward skips has no gradient. The fused path had bound its
    zeroed view before the transform: noise added to every gradient reached it, and through the clip's total every
    other parameter's step (0.0130 against 0.0122 on the reference path)."""

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.unused, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.a(x))

    torch.manual_seed(0)
    model = Branchy().to(DEVICE)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = StepEngine(model, optimizer, DEVICE, fused=fused)
    engine.max_grad_norm = 0.5
    seen = []

    def transform():
        seen.append(model.unused.weight.grad)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.add_(0.1)

    engine.grad_transform = transform
    before = model.unused.weight.detach().clone()
    optimizer.zero_grad(set_to_none=True)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    engine.backward_and_step(model(x).square().mean())
    assert seen == [None]
    assert torch.equal(model.unused.weight.detach(), before)  # left alone, as torch.optim leaves it
    # The plain loop's step: the transform's noise on the gradients there were, then clip_grad_norm_, then SGD.
    torch.manual_seed(0)
    plain = Branchy().to(DEVICE)
    plain_optimizer = torch.optim.SGD(plain.parameters(), lr=0.1)
    plain_optimizer.zero_grad(set_to_none=True)
    plain(x).square().mean().backward()
    for p in plain.parameters():
        if p.grad is not None:
            p.grad.add_(0.1)
    torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.5)
    plain_optimizer.step()
    torch.testing.assert_close(model.head.weight, plain.head.weight, rtol=1e-5, atol=1e-7)

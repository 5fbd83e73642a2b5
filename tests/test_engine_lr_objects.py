"""StepEngine's LR multipliers on tensor LRs and on Rprop, and the fused step's refusal of ``differentiable``."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch
from torch import nn

from triaccel_rl import Controller, ControllerConfig
from triaccel_rl.engine import StepEngine, _fused_unsupported

CPU = torch.device("cpu")
MakeOptimizer = Callable[[nn.Module], torch.optim.Optimizer]
TENSOR_LR_OPTIMIZERS = [torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam]


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def _batches(n_steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 8, generator=generator), torch.randint(0, 4, (16,), generator=generator))
            for _ in range(n_steps)]  # fmt: skip


def _plain_loop(make_optimizer: MakeOptimizer, n_steps: int) -> nn.Module:
    model = _model()
    optimizer = make_optimizer(model)
    for x, y in _batches(n_steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model


def _controller_loop(
    make_optimizer: MakeOptimizer, n_steps: int, lr_scale: float = 1.0
) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = _model()
    optimizer = make_optimizer(model)
    # No decision inside the run: the LR multiplier stays the one set here
    with Controller(model, optimizer, policy="fp32", config=ControllerConfig(interval_steps=1000)) as ctl:
        ctl.engine.lr_scale = lr_scale
        for x, y in _batches(n_steps):
            optimizer.zero_grad()
            with ctl.autocast():
                loss = nn.functional.cross_entropy(model(x), y)
            ctl.step(loss)
    return model, optimizer


def _assert_equal_weights(model: nn.Module, reference: nn.Module) -> None:
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b), f"{name}: max |difference| {(a - b).abs().max().item():.3g} (expected bit-equal)"


@pytest.mark.parametrize("kind", TENSOR_LR_OPTIMIZERS, ids=lambda kind: kind.__name__)
def test_a_tensor_lr_trains_as_the_plain_loop_and_stays_the_users_tensor(kind):
    lr = torch.tensor(0.01)
    model, optimizer = _controller_loop(lambda m: kind(m.parameters(), lr=lr), 10)
    _assert_equal_weights(model, _plain_loop(lambda m: kind(m.parameters(), lr=torch.tensor(0.01)), 10))
    assert optimizer.param_groups[0]["lr"] is lr


@pytest.mark.parametrize("kind", TENSOR_LR_OPTIMIZERS, ids=lambda kind: kind.__name__)
def test_a_scaled_tensor_lr_trains_as_the_plain_loop_at_the_scaled_tensor(kind):
    # Exact: the engine multiplies the float32 tensor by the multiplier once, as the plain loop's LR is made here
    lr = torch.tensor(0.01)
    model, optimizer = _controller_loop(lambda m: kind(m.parameters(), lr=lr), 10, lr_scale=0.3)
    _assert_equal_weights(model, _plain_loop(lambda m: kind(m.parameters(), lr=torch.tensor(0.01) * 0.3), 10))
    assert optimizer.param_groups[0]["lr"] is lr
    assert torch.equal(lr, torch.tensor(0.01))


class _RecordingAdamW(torch.optim.AdamW):
    """AdamW that keeps the LRs its param groups hold inside ``step()``: the ones the update applies."""

    def step(self, closure=None):  # type: ignore[override]
        self.step_lrs = [group["lr"] for group in self.param_groups]
        return super().step(closure)


def test_a_tensor_lr_is_scaled_for_the_step_as_a_tensor_of_its_dtype_and_the_users_one_comes_back():
    model = _model()
    lr = torch.tensor(0.01, dtype=torch.float64)
    groups = [{"params": params, "layer": i} for i, params in enumerate(StepEngine.discover(model))]
    optimizer = _RecordingAdamW(groups, lr=lr)
    engine = StepEngine(model, optimizer, CPU, fused=False)
    engine.lr_scale = 0.5
    engine.lr_factors = [2.0, 3.0]  # layer 0's whole multiplier is 1
    x, y = _batches(1)[0]
    engine.backward_and_step(nn.functional.cross_entropy(model(x), y))
    engine.remove()
    own, scaled = optimizer.step_lrs
    assert own is lr
    assert isinstance(scaled, torch.Tensor) and scaled.dtype == torch.float64 and scaled.device == lr.device
    assert torch.equal(scaled, lr * 1.5)
    assert all(group["lr"] is lr for group in optimizer.param_groups)


def test_a_float_lr_is_still_applied_as_the_float_the_engine_reports():
    model = _model()
    groups = [{"params": params, "layer": i} for i, params in enumerate(StepEngine.discover(model))]
    optimizer = _RecordingAdamW(groups, lr=0.01)
    engine = StepEngine(model, optimizer, CPU, fused=False)
    engine.lr_scale = 0.5
    engine.lr_factors = [2.0, 3.0]
    expected = engine.group_lrs()
    x, y = _batches(1)[0]
    engine.backward_and_step(nn.functional.cross_entropy(model(x), y))
    engine.remove()
    assert optimizer.step_lrs == expected == [0.01 * 0.5 * 2.0, 0.01 * 0.5 * 3.0]
    assert [group["lr"] for group in optimizer.param_groups] == [0.01, 0.01]


def test_rprop_which_reads_its_lr_once_is_warned_about_once(caplog):
    model = _model()
    with caplog.at_level("WARNING", logger="triaccel_rl"):
        Controller(model, torch.optim.Rprop(model.parameters(), lr=0.01), policy="fp32").close()
    warnings = [r.getMessage() for r in caplog.records if "cannot act on it" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("Rprop reads its param groups' lr only to set each parameter's first step size")


@pytest.mark.parametrize(
    "make_optimizer",
    [lambda m: torch.optim.SGD(m.parameters(), lr=0.1), lambda m: torch.optim.AdamW(m.parameters(), lr=0.01)],
    ids=["SGD", "AdamW"],
)
def test_an_optimizer_reading_its_lr_at_each_step_is_not_warned_about(make_optimizer, caplog):
    model = _model()
    with caplog.at_level("WARNING", logger="triaccel_rl"):
        Controller(model, make_optimizer(model), policy="fp32").close()
    assert "cannot act on it" not in caplog.text


needs_triton = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs a GPU or Triton's interpreter (TRITON_INTERPRET=1 before triton is imported)",
)


@needs_triton
def test_the_fused_step_refuses_a_differentiable_optimizer_naming_the_option():
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, differentiable=True)
    expected = "param group 0 has differentiable=True, which the fused step does not support"
    assert _fused_unsupported(optimizer, StepEngine.discover(model)) == expected  # the default falls back on it
    with pytest.raises(ValueError, match=f"^fused=True, but the fused step cannot run this optimizer: {expected}$"):
        StepEngine(model, optimizer, CPU, fused=True)


@needs_triton
def test_a_group_made_differentiable_after_the_build_is_refused_at_the_next_fused_step():
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    engine = StepEngine(model, optimizer, CPU, fused=True)
    optimizer.param_groups[0]["differentiable"] = True
    x, y = _batches(1)[0]
    with pytest.raises(ValueError, match=r"param group 0 has differentiable=True.*with fused=False"):
        engine.backward_and_step(nn.functional.cross_entropy(model(x), y))
    engine.remove()


def test_a_tensor_lr_with_foreach_set_on_the_group_is_refused_as_the_plain_loop_refuses_it():
    def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
        optimizer = torch.optim.AdamW(model.parameters(), lr=torch.tensor(0.01))  # (with foreach=True: refused here)
        optimizer.param_groups[0]["foreach"] = True  # as a loaded state's group can hold it
        return optimizer

    message = "lr as a Tensor is not supported for capturable=False and foreach=True"
    with pytest.raises(RuntimeError, match=message):
        _plain_loop(make_optimizer, 1)
    with pytest.raises(RuntimeError, match=message):
        _controller_loop(make_optimizer, 1)

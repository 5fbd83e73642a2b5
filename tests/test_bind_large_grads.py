"""Large parameters' gradients bound to the flat buffer before the backward (``FlatParameterStore.bind_large_grads``).

After a user's ``zero_grad()`` the fused step lets autograd hand over its own gradients and copies them into the flat
buffer after the backward; a parameter of ``BIND_BEFORE_BACKWARD_ELEMENTS`` elements or more (where such parameters
hold ``BIND_BEFORE_BACKWARD_TOTAL`` elements together) gets its zeroed view bound before the backward instead, so
that its gradient is not held twice at the backward's end. These tests lower the thresholds (``_large_from``) so that
a small model has large parameters.
"""

from __future__ import annotations

import os

import pytest
import torch
import triaccel_rl.kernels.flat_store as flat_store
from torch import nn
from triaccel_rl.kernels.flat_store import FlatParameterStore

import triaccel_rl.controller as controller_module
from triaccel_rl.config import ControllerConfig
from triaccel_rl.controller import Controller
from triaccel_rl.engine import StepEngine

needs_fused = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs a GPU or Triton's interpreter (TRITON_INTERPRET=1 before triton is imported)",
)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _large_from(monkeypatch: pytest.MonkeyPatch, elements: int, total: int = 0) -> None:
    """Parameters of ``elements`` or more count as large, where they hold ``total`` elements together."""
    monkeypatch.setattr(flat_store, "BIND_BEFORE_BACKWARD_ELEMENTS", elements)
    monkeypatch.setattr(flat_store, "BIND_BEFORE_BACKWARD_TOTAL", total)


def _hooks(param: torch.Tensor) -> int:
    return len(param._post_accumulate_grad_hooks or {})


class _TwoHeads(nn.Module):
    """A body and two heads; ``head`` picks the one the loss goes through (heads taking turns)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 8)  # weight 48 elements: large at the threshold below; bias 8: small
        self.heads = nn.ModuleList([nn.Linear(8, 3), nn.Linear(8, 3)])  # weights 24 elements each: large

    def forward(self, x: torch.Tensor, head: int) -> torch.Tensor:
        return self.heads[head](torch.relu(self.body(x)))


def test_the_large_none_gradients_are_bound_and_hooked_before_the_backward_and_the_small_ones_copied_after(
    monkeypatch,
):
    _large_from(monkeypatch, 16)
    torch.manual_seed(0)
    model = _TwoHeads()
    reference = _TwoHeads()
    reference.load_state_dict(model.state_dict())
    store = FlatParameterStore([list(m.parameters()) for m in (model.body, *model.heads)])
    params = list(store._params_in_order)
    large = [p for p in params if p.numel() >= 16]
    assert [p.numel() for p in large] == [48, 24, 24]
    views = dict(zip(map(id, params), store._grad_views_in_order, strict=True))
    for p in params:
        p.grad = None
    assert store.bind_large_grads() == 3
    assert all(p.grad is views[id(p)] and _hooks(p) == 1 for p in large)
    assert all(p.grad is None and _hooks(p) == 0 for p in params if p.numel() < 16)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    model(x, head=1).square().sum().backward()
    reference(x, head=1).square().sum().backward()
    assert all(p.grad is views[id(p)] for p in large)  # autograd added into the buffer
    assert store.rebind_grads(after_backward=True) == 3  # the body's and head 1's biases copied in; head 0's None
    # Head 0 (weight large, bias small) got no gradient: left out of the step, as torch.optim skips a None gradient
    head0 = [i for i, p in enumerate(params) if any(p is q for q in model.heads[0].parameters())]
    assert store.take_params_without_grad() == head0
    for p, want in zip(params, [*reference.body.parameters(), *reference.heads.parameters()], strict=True):
        assert p.grad is views[id(p)]
        assert torch.equal(p.grad, want.grad if want.grad is not None else torch.zeros_like(p)), p.shape
    # The gradients still bound, nothing is bound again and the record stays empty
    assert store.bind_large_grads() == 0
    assert store.take_params_without_grad() == []


def test_a_backward_cut_short_before_its_step_leaves_no_record_of_which_large_parameters_it_reached(monkeypatch):
    """A batch whose step never came (a Ctrl-C, an error in a later micro-batch): ``zero_grad`` drops the record its
    backward left with the bound gradients, and the next backward tells again. Kept, head 0's weight read as reached
    by a next backward that went through head 1 only, and took weight decay and momentum on a zero gradient."""
    _large_from(monkeypatch, 16)
    model = _TwoHeads()
    store = FlatParameterStore([list(m.parameters()) for m in (model.body, *model.heads)])
    params = list(store._params_in_order)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    for p in params:
        p.grad = None
    store.bind_large_grads()
    model(x, head=0).sum().backward()  # its step never comes
    store.zero_grad()
    assert store.bind_large_grads() == 3  # zero_grad set the large ones' gradients back to None: watched again
    model(x, head=1).sum().backward()
    store.rebind_grads(after_backward=True)
    head0 = [i for i, p in enumerate(params) if any(p is q for q in model.heads[0].parameters())]
    assert store.take_params_without_grad() == head0
    assert torch.count_nonzero(store.grads[: store.layer_lengths[0]]) > 0  # the body's gradient: the second backward's


def test_nothing_is_bound_below_the_threshold_nor_for_a_frozen_parameter(monkeypatch):
    _large_from(monkeypatch, 40)
    model = _TwoHeads()
    model.body.weight.requires_grad_(False)  # the one large parameter, frozen after the store is built below
    store = FlatParameterStore([list(m.parameters()) for m in (model.body, *model.heads)])
    for p in model.parameters():
        p.grad = None
    assert store.bind_large_grads() == 0
    assert all(p.grad is None and _hooks(p) == 0 for p in model.parameters())


@pytest.mark.parametrize(("total", "watched"), [(96, 3), (97, 0)])
def test_large_parameters_are_watched_only_where_they_hold_the_total_together(monkeypatch, total, watched):
    """The body's 48-element weight and the heads' 24-element ones: 96 elements together."""
    _large_from(monkeypatch, 16, total)
    model = _TwoHeads()
    store = FlatParameterStore([list(m.parameters()) for m in (model.body, *model.heads)])
    for p in model.parameters():
        p.grad = None
    assert store.bind_large_grads() == watched
    assert sum(p.grad is not None for p in model.parameters()) == watched


def test_bind_large_grads_checks_the_parameters_are_attached_first(monkeypatch):
    _large_from(monkeypatch, 16)
    model = _TwoHeads()
    store = FlatParameterStore([list(m.parameters()) for m in (model.body, *model.heads)])
    for p in model.parameters():
        p.grad = None
    model.heads[0].weight.data = model.heads[0].weight.data.clone()  # what model.to(...) does
    with pytest.raises(flat_store.DetachedParametersError):
        store.bind_large_grads()
    assert all(p.grad is None for p in model.parameters())  # nothing changed


def _heads_taking_turns(ctl: Controller | None, model: _TwoHeads, optimizer: torch.optim.Optimizer, steps: int) -> None:
    """A plain loop's port: ``zero_grad()`` first, the loss through one head a step; ``ctl`` None: torch.optim's."""
    generator = torch.Generator().manual_seed(2)
    for step in range(steps):
        x = torch.randn(16, 6, generator=generator).to(DEVICE)
        y = torch.randint(0, 3, (16,), generator=generator).to(DEVICE)
        optimizer.zero_grad()
        if ctl is None:
            nn.functional.cross_entropy(model(x, head=step % 2), y).backward()
            optimizer.step()
            continue
        with ctl.autocast():
            loss = nn.functional.cross_entropy(model(x, head=step % 2), y)
        ctl.step(loss)


def _build(monkeypatch) -> tuple[_TwoHeads, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = _TwoHeads().to(DEVICE)
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.05)


@needs_fused
@pytest.mark.parametrize("threshold", [16, 0, 1 << 20], ids=["some-large", "all-large", "none-large"])
def test_heads_taking_turns_train_as_under_torch_optim_whichever_gradients_are_bound_before_the_backward(
    monkeypatch, threshold
):
    """The head left out of a step's loss takes no weight decay and no momentum, as under ``torch.optim``, whether its
    gradient is bound before the backward (hooked) or left to autograd (found ``None`` after it)."""
    _large_from(monkeypatch, threshold)

    class FusedEngine(StepEngine):  # the Controller picks the fused path only on CUDA by itself
        def __init__(self, model, optimizer, device, fused=None):
            super().__init__(model, optimizer, device, fused=True)

    monkeypatch.setattr(controller_module, "StepEngine", FusedEngine)
    plain, plain_optimizer = _build(monkeypatch)
    _heads_taking_turns(None, plain, plain_optimizer, 6)
    model, optimizer = _build(monkeypatch)
    bound_during_backward: list[bool] = []
    with Controller(model, optimizer, policy="fp32", config=ControllerConfig(interval_steps=4)) as ctl:
        store = ctl.engine.store
        model.heads[1].weight.register_post_accumulate_grad_hook(  # registered after the store's: sees its binding
            lambda p: bound_during_backward.append(p.grad.untyped_storage().data_ptr() == store.grads.data_ptr())
        )
        _heads_taking_turns(ctl, model, optimizer, 6)
        assert len(store._large) == {16: 3, 0: 6, 1 << 20: 0}[threshold]
    assert bound_during_backward == [threshold <= 24] * 3  # head 1's weight: 24 elements, on steps 1, 3 and 5
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, plain.get_parameter(name), msg=name)


@needs_fused
def test_a_batch_left_part_way_at_close_leaves_an_unreached_large_gradient_none(monkeypatch):
    """A loop that ``break``s after a micro-batch's backward and goes on with ``optimizer.step()`` after ``close()``:
    the head that micro-batch did not reach has no gradient, as in the plain loop, whatever its size. Bound before the
    backward, its zeroed view was handed back as a zero gradient, and the step gave it momentum and weight decay."""
    _large_from(monkeypatch, 16)
    model, optimizer = _build(monkeypatch)
    ctl = Controller(model, optimizer, policy="fp32", fused=True, config=ControllerConfig(interval_steps=1000))
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    optimizer.zero_grad()
    with ctl.autocast():
        loss = nn.functional.cross_entropy(model(x, head=0), torch.zeros(8, dtype=torch.long, device=DEVICE))
    ctl.backward(loss)
    ctl.close()
    assert model.heads[1].weight.grad is None and model.heads[1].bias.grad is None
    assert model.heads[0].weight.grad is not None and model.heads[0].weight.grad.abs().sum() > 0


@needs_fused
def test_a_step_cut_short_after_the_copy_treats_large_and_small_gradients_alike(monkeypatch):
    """A loop zeroing after each step, heads taking turns; a Ctrl-C at step 3's launch (its backward done, the
    gradients copied in), and the loop goes on. The run does not depend on which parameters count as large: the error
    path's ``zero_grad`` had set the large reached gradients to ``None`` (their head sat the next step out) where the
    small ones stayed zeroed views (their head took momentum and weight decay)."""
    from interrupts import interrupt_once
    from triaccel_rl.kernels.optim import _FusedOptimizer

    def run(elements: int) -> torch.Tensor:
        with monkeypatch.context() as patch:
            _large_from(patch, elements)
            model, optimizer = _build(patch)
            ctl = Controller(model, optimizer, policy="fp32", fused=True, config=ControllerConfig(interval_steps=1000))
            fired = interrupt_once(patch, _FusedOptimizer, "_launching", lambda: ctl.steps == 3)
            generator = torch.Generator().manual_seed(2)
            for step in range(5):
                x = torch.randn(16, 6, generator=generator).to(DEVICE)
                y = torch.randint(0, 3, (16,), generator=generator).to(DEVICE)
                try:
                    with ctl.autocast():
                        ctl.step(nn.functional.cross_entropy(model(x, head=step % 2), y))
                    optimizer.zero_grad()
                except KeyboardInterrupt:
                    continue
            assert fired
            ctl.close()
            return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(run(16), run(1 << 40))

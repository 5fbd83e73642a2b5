"""Notebook use: a Controller held past ``del`` is reachable, dropped ones leave nothing on the optimizer; its repr."""

from __future__ import annotations

import gc
import os
from types import TracebackType
from typing import Any

import pytest
import torch
from torch import nn

import triaccel_rl as ta
from triaccel_rl.controller import _CountedZeroGrad, driving
from triaccel_rl.engine import StepEngine
from triaccel_rl.errors import NoGoodStateError

CONFIG = ta.ControllerConfig(interval_steps=2)
REFUSED = r"driven by another open controller .*triaccel_rl\.controller\.driving\(optimizer\)\.close\(\)"


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))


def sgd(model: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def train(ctl: ta.Controller, model: nn.Module, n_steps: int = 4, stop_at: int | None = None) -> None:
    g = torch.Generator().manual_seed(1)
    for step in range(n_steps):
        x = torch.randn(16, 8, generator=g)
        if step == stop_at:
            raise KeyboardInterrupt  # Ctrl-C in the cell
        with ctl.autocast():
            loss = nn.functional.cross_entropy(model(x), (x[:, 0] > x[:, 1]).long())
        ctl.step(loss)


def hook_counts(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    events = ("step", "state_dict", "load_state_dict")
    names = [f"_optimizer_{event}_{when}_hooks" for event in events for when in ("pre", "post")]
    return {name: len(getattr(optimizer, name)) for name in names}


def zero_grad_depth(optimizer: torch.optim.Optimizer) -> int:
    depth, wrapper = 0, optimizer.__dict__.get("zero_grad")
    while isinstance(wrapper, _CountedZeroGrad):
        depth, wrapper = depth + 1, wrapper._own
    return depth


NO_HOOKS = dict.fromkeys(hook_counts(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)), 0)
ONE_CONTROLLERS = {**NO_HOOKS, "_optimizer_step_pre_hooks": 2, "_optimizer_step_post_hooks": 1}


def test_driving_finds_the_open_controller_of_an_optimizer() -> None:
    model = mlp()
    optimizer, other = sgd(model), sgd(model)
    assert driving(optimizer) is None
    ctl = ta.Controller(model, optimizer, policy="fp32", config=CONFIG)
    assert driving(optimizer) is ctl
    assert driving(other) is None
    ctl.close()
    assert driving(optimizer) is None


def test_a_controller_a_traceback_holds_after_del_is_reached_and_closed() -> None:
    """As IPython keeps an interrupted cell's traceback (sys.last_traceback): ``del ctl`` freed nothing, and the refusal
    named a ``ctl.close()`` the user had no name for."""
    model = mlp()
    optimizer = sgd(model)
    ctl = ta.Controller(model, optimizer, policy="fp32", config=CONFIG)
    kept: TracebackType | None = None
    try:
        train(ctl, model, stop_at=3)
    except KeyboardInterrupt as interrupt:
        kept = interrupt.__traceback__  # its frames hold ctl
    del ctl
    gc.collect()
    with pytest.raises(ValueError, match=REFUSED):
        ta.Controller(model, optimizer, policy="fp32", config=CONFIG)
    held = driving(optimizer)
    assert held is not None and held.steps == 3
    held.close()
    del held
    assert hook_counts(optimizer) == NO_HOOKS
    new = ta.Controller(model, optimizer, policy="fp32", config=CONFIG)
    train(new, model)
    assert new.steps == 4
    new.close()
    assert kept is not None


def test_dropped_controllers_leave_no_hooks_or_wrappers_on_the_optimizer() -> None:
    """After 20 notebook re-runs the optimizer held 40 step pre-hooks, 20 post-hooks and 20 nested zero_grad wrappers,
    all called at every step; a later close() left them."""
    model = mlp()
    optimizer = sgd(model)
    for _ in range(3):
        ctl = ta.Controller(model, optimizer, policy="fp32", config=CONFIG)
        train(ctl, model, n_steps=2)
        del ctl
        gc.collect()
    # Each build took off those before it; the last one's stay until the next Controller on the optimizer is built
    assert hook_counts(optimizer) == ONE_CONTROLLERS
    assert zero_grad_depth(optimizer) == 1
    ctl = ta.Controller(model, optimizer, policy="fp32", config=CONFIG)
    assert hook_counts(optimizer) == ONE_CONTROLLERS
    assert zero_grad_depth(optimizer) == 1 and optimizer.__dict__["zero_grad"] is ctl._zero_grads
    optimizer.zero_grad()
    assert ctl._zero_grads.calls == 1
    train(ctl, model)
    assert ctl.steps == 4
    ctl.close()
    assert hook_counts(optimizer) == NO_HOOKS
    assert "zero_grad" not in optimizer.__dict__


def test_a_refused_second_controller_leaves_the_open_ones_hooks() -> None:
    model = mlp()
    optimizer = sgd(model)
    first = ta.Controller(model, optimizer, policy="fp32", config=CONFIG)
    gc.collect()
    with pytest.raises(ValueError, match=REFUSED):
        ta.Controller(model, optimizer, policy="fp32", config=CONFIG)
    assert hook_counts(optimizer) == ONE_CONTROLLERS
    assert zero_grad_depth(optimizer) == 1 and optimizer.__dict__["zero_grad"] is first._zero_grads
    train(first, model)
    assert first.steps == 4
    first.close()
    assert hook_counts(optimizer) == NO_HOOKS


class _Owner:
    """Stands in for a Controller: something a wrapper holds weakly."""


def test_unused_zero_grad_wrappers_are_spliced_out_of_the_chain_and_used_ones_kept() -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1)
    user_calls: list[int] = []
    torch_zero_grad = optimizer.zero_grad

    def own(*args: Any, **kwargs: Any) -> None:  # the user's own wrapper, at the bottom
        user_calls.append(1)
        torch_zero_grad(*args, **kwargs)

    optimizer.zero_grad = own  # type: ignore[method-assign]
    owners = [_Owner() for _ in range(5)]
    wrappers = [_CountedZeroGrad(optimizer, owner) for owner in owners]  # (bottom to top)
    wrappers[3].remove()  # closed while wrapped again: it stays in the chain, unused
    del owners[0], owners[1]  # wrappers 0 and 2 dead (owners now: 1, 3, 4)
    gc.collect()
    _CountedZeroGrad.drop_unused(optimizer)
    chain, current = [], optimizer.__dict__.get("zero_grad")
    while isinstance(current, _CountedZeroGrad):
        chain.append(current)
        current = current._own
    assert chain == [wrappers[4], wrappers[1]]
    assert current is own and wrappers[1]._zero_grad is own
    optimizer.zero_grad()
    assert [w.calls for w in wrappers] == [0, 1, 0, 0, 1]
    assert user_calls == [1]
    del owners[2]  # the top one dead too: the optimizer's zero_grad is the next one down again
    gc.collect()
    _CountedZeroGrad.drop_unused(optimizer)
    assert optimizer.__dict__["zero_grad"] is wrappers[1]


needs_triton = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs a GPU or Triton's interpreter (TRITON_INTERPRET=1 before triton is imported)",
)


@needs_triton
def test_a_dropped_fused_engines_state_dict_hooks_go_at_the_next_build() -> None:
    model = mlp()
    optimizer = sgd(model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    engine = StepEngine(model, optimizer, device, fused=True)
    assert all(count == 1 for name, count in hook_counts(optimizer).items() if "state_dict" in name)
    del engine
    gc.collect()
    engine = StepEngine(model, optimizer, device, fused=False)
    assert hook_counts(optimizer) == ONE_CONTROLLERS
    engine.remove()
    assert hook_counts(optimizer) == NO_HOOKS


def test_repr_is_one_short_line_in_every_state() -> None:
    model = mlp()
    ctl = ta.Controller(model, sgd(model), policy="fp32", config=CONFIG)
    assert repr(ctl) == "<Controller policy='static-fp32' steps=0 decisions=0 open device=cpu>"
    train(ctl, model)
    assert repr(ctl) == "<Controller policy='static-fp32' steps=4 decisions=2 open device=cpu>"
    ctl.close()
    assert repr(ctl) == "<Controller policy='static-fp32' steps=4 decisions=2 closed device=cpu>"
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")  # refused part-way through the construction (the rollback's first copy)
    with pytest.raises(NoGoodStateError) as refused:
        ta.Controller(model, sgd(model), policy="fp32", config=CONFIG)
    half_built = next(frame.locals["self"] for frame in refused.traceback if frame.name == "__init__")
    assert repr(half_built) == "<Controller policy='static-fp32' steps=0 decisions=0 not built device=cpu>"
    bare = ta.Controller.__new__(ta.Controller)
    assert repr(bare) == "<Controller policy='?' steps=0 decisions=0 not built device=?>"

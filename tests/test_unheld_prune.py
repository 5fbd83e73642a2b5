"""Under fp16 the engine stops watching trainable parameters outside its optimizer once they leave the model."""

import gc
import weakref

import pytest
import torch
from test_unheld_midrun import DEVICE, FP16_TOLERANCE, pytestmark  # noqa: F401  (pytestmark: the same skip)
from torch import nn

import triaccel_rl as ta
from triaccel_rl import controller as controller_module
from triaccel_rl.engine import StepEngine
from triaccel_rl.types import Precision

N_HEADS = 50
"""How many times the head is replaced in the leak test."""


def _body() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU()).to(DEVICE)


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(16, 6, generator=g).to(DEVICE), torch.randint(0, 3, (16,), generator=g).to(DEVICE)


def _sgd(params) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def _new_head(step: int) -> nn.Linear:
    torch.manual_seed(100 + step)
    return nn.Linear(8, 3).to(DEVICE)


def _run_replacing_the_head(policy: str | None, n_steps: int, head_at=_new_head):
    """A body trained by the held optimizer; at each step a head set as ``model[4]`` and trained by one of its own.

    Returns the model, and, before the controller is closed, the steps whose head weight is still alive (the last
    step's head aside), the ids of the parameters the engine watches, and its count of unscaling hooks.
    """
    model = _body()
    body_optimizer = _sgd(model.parameters())
    ctl = None if policy is None else ta.Controller(model, body_optimizer, policy=policy)
    model.append(head_at(-1))
    heads = []
    for step in range(n_steps):
        model[4] = head_at(step)
        heads.append(weakref.ref(model[4].weight))
        head_optimizer = _sgd(model[4].parameters())
        body_optimizer.zero_grad()
        x, y = _batch(step)
        if ctl is None:
            nn.functional.cross_entropy(model(x), y).backward()
            body_optimizer.step()
        else:
            with ctl.autocast():
                loss = nn.functional.cross_entropy(model(x).float(), y)
            ctl.step(loss)
        head_optimizer.step()
    gc.collect()
    alive = [step for step, head in enumerate(heads[:-1]) if head() is not None]
    watched = set() if ctl is None else set(ctl.engine._unheld_ids)
    hooks = 0 if ctl is None else len(ctl.engine._unheld_hooks)
    if ctl is not None:
        ctl.close()
    return model, alive, watched, hooks


def test_a_head_replaced_at_every_step_is_freed_and_only_the_live_head_is_watched():
    """50 heads, each trained by an optimizer of its own (its gradient never zeroed): the 49 old ones are collected
    while the controller runs, and it watches and hooks the live head's 2 parameters alone. Before, it held every
    head it had watched until close(): 49 alive, 100 watched parameters and hooks."""
    model, alive, watched, hooks = _run_replacing_the_head("fp16", N_HEADS)
    assert alive == [], f"old heads {alive[:5]} (of {len(alive)}) still alive"
    assert watched == {id(p) for p in model[4].parameters()}
    assert hooks == 2


@pytest.mark.parametrize("fused", [False, True])
def test_a_head_replaced_at_every_step_trains_as_a_plain_loop(fused, monkeypatch):
    """The body and the last head after 6 steps of a head replaced at each: the weights of a plain fp32 loop."""
    monkeypatch.setattr(controller_module, "StepEngine", lambda *args, **kwargs: StepEngine(*args, fused=fused))
    plain = _run_replacing_the_head(None, 6)[0]
    controlled = _run_replacing_the_head("fp16", 6)[0]
    for (name, expected), actual in zip(plain.named_parameters(), controlled.parameters(), strict=True):
        error = (expected.detach() - actual.detach()).abs().max().item()
        assert error <= FP16_TOLERANCE, f"{name}: max |difference| {error:.3g} from the plain loop"


def test_a_head_taken_out_and_put_back_is_unscaled_once():
    """Two heads kept by the user and set in turn (multi-task): each is unwatched when taken out and watched again,
    with one hook, when put back, so its optimizer steps on the loss's own gradient as in a plain loop."""
    torch.manual_seed(7)
    plain_heads = [nn.Linear(8, 3).to(DEVICE) for _ in range(2)]
    torch.manual_seed(7)
    controlled_heads = [nn.Linear(8, 3).to(DEVICE) for _ in range(2)]
    plain = _run_replacing_the_head(None, 6, head_at=lambda step: plain_heads[step % 2])[0]
    controlled = _run_replacing_the_head("fp16", 6, head_at=lambda step: controlled_heads[step % 2])[0]
    pairs = [
        ("body", plain[:4], controlled[:4]),
        ("head 0", plain_heads[0], controlled_heads[0]),
        ("head 1", plain_heads[1], controlled_heads[1]),
    ]
    for name, plain_part, controlled_part in pairs:
        for expected, actual in zip(plain_part.parameters(), controlled_part.parameters(), strict=True):
            error = (expected.detach() - actual.detach()).abs().max().item()
            assert error <= FP16_TOLERANCE, f"{name}: max |difference| {error:.3g} from the plain loop"


def _engine(model: nn.Sequential) -> StepEngine:
    engine = StepEngine(model, _sgd(model[0].parameters()), DEVICE, fused=False)
    engine.set_precisions([Precision.FP16] * engine.n_layers)
    return engine


def _backward(engine: StepEngine, model: nn.Sequential, step: int) -> None:
    x, y = _batch(step)
    with engine.precision.context():
        loss = nn.functional.cross_entropy(model(x).float(), y)
    engine.scale_loss(loss).backward()


def test_a_parameter_trainable_at_the_build_and_removed_from_the_model_is_dropped():
    """model[2], trainable at the build and held by a second optimizer, watched there; replaced: unwatched at the
    next scaled backward, and its unscaling hook removed (a gradient it gets elsewhere is not divided by the scale)."""
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(DEVICE)
    engine = _engine(model)
    old = list(model[2].parameters())
    assert set(engine._unheld_ids) == {id(p) for p in old}
    assert all(len(p._backward_hooks or {}) == 1 for p in old)
    model[2] = nn.Linear(8, 3).to(DEVICE)
    _backward(engine, model, 0)
    assert set(engine._unheld_ids) == {id(p) for p in model[2].parameters()}
    assert len(engine._unheld_params) == len(engine._unheld_hooks) == 2
    assert all(len(p._backward_hooks or {}) == 0 for p in old)
    engine.remove()


def test_a_head_replaced_between_accumulated_backward_passes_is_dropped_after_the_step():
    """Gradient accumulation, the head replaced between two backward passes: the old head's gradient, pending for
    the step, stays watched (checked, and dropped on a skip) until the first scaled backward after the step."""
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(DEVICE)
    engine = _engine(model)
    old_ids = {id(p) for p in model[2].parameters()}
    _backward(engine, model, 0)
    model[2] = nn.Linear(8, 3).to(DEVICE)
    new_ids = {id(p) for p in model[2].parameters()}
    _backward(engine, model, 1)
    assert set(engine._unheld_ids) == old_ids | new_ids
    engine.step_after_backward(0.0)
    _backward(engine, model, 2)
    assert set(engine._unheld_ids) == new_ids
    assert len(engine._unheld_hooks) == 2
    engine.remove()

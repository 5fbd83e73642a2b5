"""A Controller garbage-collected without close() leaves its model free for the next one; an open one still refuses."""

from __future__ import annotations

import copy
import gc
import os
import sys
import weakref
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

import triaccel_rl as ta
from triaccel_rl.engine import StepEngine
from triaccel_rl.errors import NoGoodStateError
from triaccel_rl.precision import LayerPrecision, driven_modules

DRIVEN = r"modules \['0', '2'\] \(of 2\) of Sequential are driven by another open Controller"
NO_HOOKS = [(0, 0), (0, 0), (0, 0), (0, 0)]
ONE_CONTROLLERS = [(0, 0), (1, 1), (0, 0), (1, 1)]  # a pre-hook and a forward hook on each Linear, none on the ReLU


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))


def hook_counts(model: nn.Module) -> list[tuple[int, int]]:
    return [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()]


def sgd(model: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def batches(n_steps: int = 6) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    for _ in range(n_steps):
        x = torch.randn(16, 8, generator=g)
        yield x, (x[:, 0] > x[:, 1]).long()


def train_controlled(ctl: ta.Controller, model: nn.Module, fail_at: int | None = None) -> None:
    for step, (x, y) in enumerate(batches()):
        with ctl.autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        if step == fail_at:
            raise FloatingPointError("the trial diverged (the user's own check)")
        ctl.step(loss)


@pytest.fixture
def unraisable(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """What a finalizer raised (Python reports it to ``sys.unraisablehook`` and goes on)."""
    raised: list[object] = []
    monkeypatch.setattr(sys, "unraisablehook", raised.append)
    return raised


def drop_by_del(model: nn.Module) -> weakref.ref[LayerPrecision]:
    ctl = ta.Controller(model, sgd(model), policy="bf16", config=ta.ControllerConfig(interval_steps=2))
    train_controlled(ctl, model)
    precision = weakref.ref(ctl.engine.precision)
    del ctl
    return precision


def drop_in_a_trial_that_raised(model: nn.Module) -> weakref.ref[LayerPrecision]:
    precisions: list[weakref.ref[LayerPrecision]] = []

    def trial() -> None:  # a sweep's trial function: the Controller built without `with`, never closed
        ctl = ta.Controller(model, sgd(model), policy="heuristic", config=ta.ControllerConfig(interval_steps=2))
        precisions.append(weakref.ref(ctl.engine.precision))
        train_controlled(ctl, model, fail_at=4)
        ctl.close()

    with pytest.raises(FloatingPointError, match="diverged"):
        trial()
    return precisions[0]


@pytest.mark.parametrize("drop", [drop_by_del, drop_in_a_trial_that_raised], ids=["del", "trial-raised"])
def test_a_dropped_unclosed_controller_frees_the_model_for_a_new_one(
    drop: Callable[[nn.Module], weakref.ref[LayerPrecision]], unraisable: list[object]
) -> None:
    model = mlp()
    old_precision = drop(model)
    gc.collect()
    assert old_precision() is None  # the model's hooks no longer hold it
    assert driven_modules(model) == []
    assert hook_counts(model) == ONE_CONTROLLERS  # released, still on the model: shed when the next one goes in
    plain = copy.deepcopy(model)  # the dropped one's weights, its released hooks carried along (idle)
    plain_optimizer = sgd(plain)

    optimizer = sgd(model)
    with ta.Controller(model, optimizer, policy="fp32", config=ta.ControllerConfig(interval_steps=2)) as ctl:
        assert hook_counts(model) == ONE_CONTROLLERS  # the new one's alone
        assert driven_modules(model) == ["0", "2"]
        for x, y in batches():
            optimizer.zero_grad()
            with ctl.autocast():
                loss = nn.functional.cross_entropy(model(x), y)
            ctl.step(loss)
            plain_optimizer.zero_grad()
            nn.functional.cross_entropy(plain(x), y).backward()
            plain_optimizer.step()
        assert ctl.steps == 6
    assert hook_counts(model) == NO_HOOKS
    assert hook_counts(plain) == NO_HOOKS  # the copy shed the released hooks at its first forward
    for want, got in zip(plain.parameters(), model.parameters(), strict=True):
        assert torch.equal(want, got), (want - got).abs().max().item()
    assert unraisable == []


def test_an_open_controller_still_refuses_a_second_one(unraisable: list[object]) -> None:
    model = mlp()
    first = ta.Controller(model, sgd(model), policy="bf16")
    gc.collect()  # alive: its hooks stay live
    with pytest.raises(ValueError, match=DRIVEN):
        ta.Controller(model, sgd(model), policy="fp32")
    assert hook_counts(model) == ONE_CONTROLLERS
    assert driven_modules(model) == ["0", "2"]
    first.close()
    assert hook_counts(model) == NO_HOOKS
    assert unraisable == []


def test_close_then_drop_releases_nothing_twice(unraisable: list[object]) -> None:
    model = mlp()
    first = ta.Controller(model, sgd(model), policy="bf16")
    train_controlled(first, model)
    finalizer = first.engine.precision._release_when_collected
    assert finalizer is not None and finalizer.alive
    first.close()
    assert not finalizer.alive  # close() cancelled it
    assert hook_counts(model) == NO_HOOKS
    first.close()  # twice: harmless
    second = ta.Controller(model, sgd(model), policy="fp32")
    del first
    gc.collect()  # the closed one dropped while the second drives the model: the second's hooks are untouched
    assert hook_counts(model) == ONE_CONTROLLERS
    assert driven_modules(model) == ["0", "2"]
    with pytest.raises(ValueError, match=DRIVEN):
        ta.Controller(model, sgd(model), policy="fp32")
    train_controlled(second, model)
    assert second.steps == 6
    second.close()
    assert hook_counts(model) == NO_HOOKS
    assert unraisable == []


def test_a_refused_controller_leaves_no_finalizer_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[LayerPrecision] = []
    register = LayerPrecision.release_when_collected

    def recording(self: LayerPrecision, owner: object) -> None:
        built.append(self)
        register(self, owner)

    monkeypatch.setattr(LayerPrecision, "release_when_collected", recording)
    model = mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")  # refused after the engine is built (the rollback's starting copy)
    with pytest.raises(NoGoodStateError, match="when the Controller was built"):
        ta.Controller(model, sgd(model), policy="fp32")
    assert len(built) == 1 and built[0]._release_when_collected is None
    assert hook_counts(model) == NO_HOOKS


def test_a_dropped_step_engine_frees_the_model_too() -> None:
    model = mlp()
    engine = StepEngine(model, sgd(model), torch.device("cpu"), fused=False)
    assert driven_modules(model) == ["0", "2"]
    del engine
    gc.collect()
    assert driven_modules(model) == []
    ta.Controller(model, sgd(model), policy="fp32").close()
    assert hook_counts(model) == NO_HOOKS


needs_triton = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs a GPU or Triton's interpreter (TRITON_INTERPRET=1 before triton is imported)",
)


def plain_steps(model: nn.Module, optimizer: torch.optim.Optimizer, n: int) -> None:
    for x, y in batches(n):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


@needs_triton
@pytest.mark.parametrize("kind", ["adam", "sgd", "sgd-no-momentum"])
@pytest.mark.parametrize("exported_mid_run", [False, True])
def test_a_dropped_fused_engine_hands_its_state_back_as_remove_does(
    kind: str, exported_mid_run: bool, unraisable: list[object]
) -> None:
    """The fused step keeps the moments in its own buffers: dropped unremoved, its engine took them along, and a new
    one on the optimizer started them from zero, silently (a review of the release above). A mid-run
    ``optimizer.state_dict()`` left views there with the step count of then."""

    def build() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = mlp()
        if kind == "adam":
            return model, torch.optim.Adam(model.parameters(), lr=1e-2)
        return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9 if kind == "sgd" else 0.0)

    results = []
    for drop in (False, True):
        model, optimizer = build()
        engine = StepEngine(model, optimizer, torch.device("cpu"), fused=True)
        for step, (x, y) in enumerate(batches(4)):
            with engine.precision.context():
                loss = nn.functional.cross_entropy(model(x), y)
            engine.backward_and_step(loss)
            if exported_mid_run and step == 1:
                optimizer.state_dict()
        store = engine.store
        if not drop:
            engine.remove()
        del engine
        gc.collect()
        assert all(p.untyped_storage().nbytes() == p.nbytes for p in model.parameters())
        assert store.params.numel() == 0  # freed, SGD's stand-in for a momentum buffer too
        plain_steps(model, optimizer, 3)  # on in a plain loop
        results.append(([p.detach().clone() for p in model.parameters()], optimizer.state_dict()))
    (removed, removed_state), (dropped, dropped_state) = results
    assert unraisable == []
    for a, b in zip(removed, dropped, strict=True):
        assert torch.equal(a, b)
    assert [sorted(entry) for entry in removed_state["state"].values()] == [
        sorted(entry) for entry in dropped_state["state"].values()
    ]

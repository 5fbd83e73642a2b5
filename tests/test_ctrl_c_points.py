"""A Ctrl-C at any point of a step, then the training cell run again with the same Controller, ends as if none came.

A notebook user interrupts a cell and runs it again: ``loader()`` serves the batch again where its update did not go in,
and the next ``backward()`` or ``step()`` finishes what a step whose update went in left undone. Each test injects a
``KeyboardInterrupt`` at one named point of one step and compares the weights, the steps and the decisions with the
uninterrupted run's, exactly (fp32 policy), on the reference path and on the fused step under Triton's interpreter.
Before, a Ctrl-C in the post-update zeroing left the batch's gradients for the next update; one as the step was counted
left the interval a step short, refused with ``skipped=-1`` at every later interval's end; one in the step's statistics
or at the interval's end lost the decision; one before the update began was reported as an update raised part-way, and
its batch dropped; one between the backward and the update read the last step's flags, and counted the batch as
trained on.
"""

import logging
import os

import pytest
import torch
import triaccel_rl.kernels.flat_store as flat_store
from interrupts import interrupt_once
from torch import nn

import triaccel_rl.controller as controller_module
from triaccel_rl.config import ControllerConfig
from triaccel_rl.controller import Controller
from triaccel_rl.elastic import BatchLRCoupler
from triaccel_rl.engine import StepEngine
from triaccel_rl.loader import ElasticLoader
from triaccel_rl.shield import RollbackGuard
from triaccel_rl.signals import DeviceMoments, SignalCollector

_STEPS, _DECISIONS = 12, 4  # two epochs of 96 samples in batches of 16; a decision every 3 steps

_fused_param = pytest.param(
    True,
    marks=pytest.mark.skipif(
        not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
        reason="needs a GPU or Triton's interpreter (TRITON_INTERPRET=1 before triton is imported)",
    ),
    id="fused",
)


def _data():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(96, 8, generator=generator), torch.randint(0, 3, (96,), generator=generator)


def _build(monkeypatch, fused):
    if fused:

        class FusedEngine(StepEngine):  # the Controller picks the fused path only on CUDA by itself
            def __init__(self, model, optimizer, device, fused=None):
                super().__init__(model, optimizer, device, fused=True)

        monkeypatch.setattr(controller_module, "StepEngine", FusedEngine)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ctl = Controller(model, optimizer, policy="fp32", config=ControllerConfig(interval_steps=3))
    assert ctl.engine.fused is fused
    return model, ctl


def _train(model, ctl, accumulate=False):
    """The notebook cell: two epochs from the run's place."""
    x, y = _data()
    for xb, yb in ctl.loader((x, y), batch_size=16, epochs=2):
        with ctl.autocast():
            if accumulate:  # two micro-batches: the first through backward()
                ctl.backward(nn.functional.cross_entropy(model(xb[:8]), yb[:8]) / 2)
                ctl.step(nn.functional.cross_entropy(model(xb[8:]), yb[8:]) / 2)
            else:
                ctl.step(nn.functional.cross_entropy(model(xb), yb))


def _outcome(model, ctl):
    outcome = torch.cat([p.detach().flatten() for p in model.parameters()]), ctl.steps, ctl.decision_count
    ctl.close()
    return outcome


def _run_again_as_uninterrupted(model, ctl, expected, caplog, where=""):
    """The cell run again ends as the uninterrupted run (weights bit for bit, steps, decisions), with no part-way
    update reported."""
    with caplog.at_level(logging.ERROR, logger="triaccel_rl"):
        _train(model, ctl)
    assert "raised part-way" not in caplog.text
    weights, steps, decisions = _outcome(model, ctl)
    expected_weights, expected_steps, expected_decisions = expected
    assert (steps, decisions) == (expected_steps, expected_decisions)
    difference = (weights - expected_weights).abs().max().item()
    assert torch.equal(weights, expected_weights), f"a Ctrl-C{where}: weights {difference:.3g} off"


def _uninterrupted(monkeypatch, fused, accumulate=False):
    with monkeypatch.context() as patch:
        model, ctl = _build(patch, fused)
        _train(model, ctl, accumulate)
        return _outcome(model, ctl)


# (where, the method entered there, the run's steps counted when it is: the third step closes the first interval)
_POINTS = [
    ("the post-update gradient zeroing", StepEngine, "zero_grad", 2, True),
    ("the step's count (the LR coupler's rung)", BatchLRCoupler, "advance", 2, True),
    ("the step's statistics", DeviceMoments, "observe_layers", 3, True),
    ("the step's memory reading", Controller, "predicted_memory_bytes", 3, True),
    ("the interval's fold into the signals", SignalCollector, "observe_interval", 3, True),
    ("the shield's rollback copy", RollbackGuard, "save", 3, True),
    ("between the backward and the update", StepEngine, "step_after_backward_deferred", 2, False),
    ("the LRs scaled before the update", StepEngine, "_apply_scaled_lrs", 2, False),
]


@pytest.mark.parametrize("fused", [False, _fused_param])
@pytest.mark.parametrize(("where", "owner", "name", "at_steps", "update_in"), _POINTS, ids=[p[0] for p in _POINTS])
def test_a_ctrl_c_then_the_cell_run_again_ends_as_the_uninterrupted_run(
    monkeypatch, caplog, fused, where, owner, name, at_steps, update_in
):
    if fused and name == "_apply_scaled_lrs":
        pytest.skip("the fused step writes no LRs into the param groups")
    expected_weights, expected_steps, expected_decisions = _uninterrupted(monkeypatch, fused)
    assert (expected_steps, expected_decisions) == (_STEPS, _DECISIONS)
    model, ctl = _build(monkeypatch, fused)
    # Where the update went in, after it only (the zeroing also runs before a step, after a Ctrl-C)
    fired = interrupt_once(
        monkeypatch,
        owner,
        name,
        lambda: ctl.steps == at_steps and (ctl.engine.update_reached or not update_in),
    )
    with pytest.raises(KeyboardInterrupt):
        _train(model, ctl)
    assert fired, f"no Ctrl-C came in {where}"
    assert ctl.steps == at_steps + (update_in and at_steps == 2)  # counted where its update went in
    _run_again_as_uninterrupted(
        model, ctl, (expected_weights, expected_steps, expected_decisions), caplog, where=f" in {where}"
    )


def test_a_ctrl_c_as_a_micro_batch_is_recorded_leaves_no_gradient_for_the_batch_served_again(monkeypatch):
    """``backward()`` cut short after its backward: the batch is served again whole, its gradients once."""
    expected_weights, expected_steps, expected_decisions = _uninterrupted(monkeypatch, False, accumulate=True)
    model, ctl = _build(monkeypatch, False)
    fired = interrupt_once(monkeypatch, Controller, "_grad_mark", lambda: ctl.steps == 2)
    with pytest.raises(KeyboardInterrupt):
        _train(model, ctl, accumulate=True)
    assert fired and ctl.steps == 2
    _train(model, ctl, accumulate=True)
    weights, steps, decisions = _outcome(model, ctl)
    assert (steps, decisions) == (expected_steps, expected_decisions)
    assert torch.equal(weights, expected_weights), f"weights {(weights - expected_weights).abs().max().item():.3g} off"


# (where, the method, whether the Ctrl-C comes as it returns, the run's steps then): a batch every 16 of 96 samples
_LOADER_POINTS = [
    ("a batch taken, not yet recorded as served", ElasticLoader, "next", True, 2),
    ("the next epoch's order drawn", ElasticLoader, "_permutation", False, 6),
]


@pytest.mark.parametrize(
    ("where", "owner", "name", "on_return", "at_steps"), _LOADER_POINTS, ids=[p[0] for p in _LOADER_POINTS]
)
def test_a_ctrl_c_as_the_loader_hands_out_a_batch_serves_that_batch_again(
    monkeypatch, where, owner, name, on_return, at_steps
):
    """Before, the loader's place moved past the batch before it was recorded as served: the run trained 11 of 12
    steps; cut short as the next epoch began, it went on at the epoch after it (6 steps)."""
    expected_weights, expected_steps, expected_decisions = _uninterrupted(monkeypatch, False)
    model, ctl = _build(monkeypatch, False)
    fired = interrupt_once(monkeypatch, owner, name, lambda: ctl.steps == at_steps, on_return)
    with pytest.raises(KeyboardInterrupt):
        _train(model, ctl)
    assert fired and ctl.steps == at_steps, f"no Ctrl-C came in {where}"
    _train(model, ctl)
    weights, steps, decisions = _outcome(model, ctl)
    assert (steps, decisions) == (expected_steps, expected_decisions)
    assert torch.equal(weights, expected_weights), f"weights {(weights - expected_weights).abs().max().item():.3g} off"


def _use_fused_engine(monkeypatch):
    class FusedEngine(StepEngine):  # the Controller picks the fused path only on CUDA by itself
        def __init__(self, model, optimizer, device, fused=None):
            super().__init__(model, optimizer, device, fused=True)

    monkeypatch.setattr(controller_module, "StepEngine", FusedEngine)


def _build_fused(monkeypatch, make_optimizer):
    """``_build``'s fused run, with the optimizer ``make_optimizer(model.parameters())`` makes."""
    _use_fused_engine(monkeypatch)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    ctl = Controller(
        model, make_optimizer(model.parameters()), policy="fp32", config=ControllerConfig(interval_steps=3)
    )
    assert ctl.engine.fused
    return model, ctl


_OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01),
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.01),
}


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("fused", [_fused_param])
def test_a_ctrl_c_in_the_fused_launchers_checks_serves_the_batch_again(monkeypatch, caplog, fused, kind):
    """The launcher checks its buffers before its kernel writes a byte: a Ctrl-C there is no update begun.

    Before, the update was marked as begun before the launcher's checks: the batch was taken as spent (the run a step
    short) with nothing moved.
    """
    import triaccel_rl.kernels.adamw_step as adamw_module
    import triaccel_rl.kernels.sgd_step as sgd_module

    with monkeypatch.context() as patch:
        model, ctl = _build_fused(patch, _OPTIMIZERS[kind])
        _train(model, ctl)
        expected_weights, expected_steps, expected_decisions = _outcome(model, ctl)
    model, ctl = _build_fused(monkeypatch, _OPTIMIZERS[kind])
    launcher = sgd_module if kind == "sgd" else adamw_module
    fired = interrupt_once(monkeypatch, launcher, "check_step_buffers", lambda: ctl.steps == 2)
    with pytest.raises(KeyboardInterrupt):
        _train(model, ctl)
    assert fired and ctl.steps == 2
    assert not ctl.engine.update_started
    _run_again_as_uninterrupted(model, ctl, (expected_weights, expected_steps, expected_decisions), caplog)


@pytest.mark.parametrize("fused", [_fused_param])
def test_a_ctrl_c_before_the_fused_launch_keeps_the_record_of_parameters_without_a_gradient(monkeypatch, fused):
    """A head the loss leaves out, its gradient set to ``None`` after each step: no update decays it, retry or not.

    Before, the step cleared the record of the parameters without a gradient before the launch: the batch served
    again after a Ctrl-C found it empty, and its update decayed the head.
    """
    from triaccel_rl.kernels.optim import _FusedOptimizer

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
            self.head = nn.Linear(16, 3)
            self.other_head = nn.Linear(16, 3)  # trained elsewhere: this loss leaves it out

        def forward(self, x):
            return self.head(self.body(x))

    def build():
        torch.manual_seed(1)
        model = TwoHeads()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.1)
        return model, Controller(model, optimizer, policy="fp32", config=ControllerConfig(interval_steps=3))

    def train(model, ctl):
        x, y = _data()
        for xb, yb in ctl.loader((x, y), batch_size=16, epochs=2):
            ctl.step(nn.functional.cross_entropy(model(xb), yb))
            model.other_head.zero_grad(set_to_none=True)

    _use_fused_engine(monkeypatch)
    model, ctl = build()
    train(model, ctl)
    expected_weights, expected_steps, _ = _outcome(model, ctl)
    model, ctl = build()
    fired = interrupt_once(monkeypatch, _FusedOptimizer, "_saved_slices", lambda: ctl.steps == 2)
    with pytest.raises(KeyboardInterrupt):
        train(model, ctl)
    assert fired and ctl.steps == 2
    train(model, ctl)
    weights, steps, _ = _outcome(model, ctl)
    assert steps == expected_steps
    assert torch.equal(weights, expected_weights), f"weights {(weights - expected_weights).abs().max().item():.3g} off"


def _train_zeroing(model, ctl, accumulate, fail_at=None):
    """A plain loop's port: ``optimizer.zero_grad()`` after each step (gradients to ``None``); with ``fail_at``, the
    batch at that step raises (an out-of-memory error, say) between its first micro-batch's backward and the step."""
    x, y = _data()
    for xb, yb in ctl.loader((x, y), batch_size=16, epochs=2):
        with ctl.autocast():
            if accumulate:
                ctl.backward(nn.functional.cross_entropy(model(xb[:8]), yb[:8]) / 2)
                if ctl.steps == fail_at:
                    raise RuntimeError("out of memory in the second micro-batch")
                ctl.step(nn.functional.cross_entropy(model(xb[8:]), yb[8:]) / 2)
            else:
                ctl.step(nn.functional.cross_entropy(model(xb), yb))
        ctl.engine.optimizer.zero_grad()


@pytest.mark.parametrize("fused", [False, _fused_param])
@pytest.mark.parametrize("accumulate", [False, True], ids=["ctrl-c-before-the-update", "error-between-micro-batches"])
@pytest.mark.parametrize("bound_before", [False, True], ids=["own-gradients", "large-bound-before"])
def test_a_batch_cut_short_after_its_backward_leaves_no_gradient_to_the_next_in_a_loop_setting_them_to_none(
    monkeypatch, fused, accumulate, bound_before
):
    """After a user's ``zero_grad()`` the backward hands over autograd's own gradients, outside the flat buffer until
    the step copies them in: a batch cut short between the two (a Ctrl-C before the update; an error after the first
    micro-batch's backward) left them for the batch served again to add to, and its update took them twice.
    ``bound_before``: the weights count as large (``FlatParameterStore.bind_large_grads``), their views bound and
    hooked before the backward; the batch served again must find them zeroed and watched again."""
    if bound_before:
        monkeypatch.setattr(flat_store, "BIND_BEFORE_BACKWARD_ELEMENTS", 48)  # the 8x16 and 16x3 weights
        monkeypatch.setattr(flat_store, "BIND_BEFORE_BACKWARD_TOTAL", 0)
    model, ctl = _build(monkeypatch, fused)
    _train_zeroing(model, ctl, accumulate)
    expected_weights, expected_steps, _ = _outcome(model, ctl)
    model, ctl = _build(monkeypatch, fused)
    if accumulate:
        with pytest.raises(RuntimeError, match="out of memory"):
            _train_zeroing(model, ctl, accumulate, fail_at=2)
    else:
        fired = interrupt_once(monkeypatch, StepEngine, "step_after_backward_deferred", lambda: ctl.steps == 2)
        with pytest.raises(KeyboardInterrupt):
            _train_zeroing(model, ctl, accumulate)
        assert fired
    assert ctl.steps == 2
    _train_zeroing(model, ctl, accumulate)
    weights, steps, _ = _outcome(model, ctl)
    assert steps == expected_steps
    assert torch.equal(weights, expected_weights), f"weights {(weights - expected_weights).abs().max().item():.3g} off"


def _build_fused_sgd(grad_transform=None, param_groups=False):
    """A Controller built with ``fused=True``; the SGD's param groups the two layers' (``param_groups``) or one."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    params = (
        [{"params": model[0].parameters()}, {"params": model[2].parameters()}] if param_groups else model.parameters()
    )
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    config = ControllerConfig(interval_steps=3)
    ctl = Controller(model, optimizer, policy="fp32", config=config, grad_transform=grad_transform, fused=True)
    assert ctl.engine.fused
    return model, optimizer, ctl


def _first_batch(ctl):
    x, y = _data()
    for xb, _ in ctl.loader((x, y), batch_size=16, epochs=2):
        return xb.clone()


@pytest.mark.parametrize("fused", [_fused_param])
def test_a_ctrl_c_in_the_grad_transform_on_the_fused_path_serves_the_batch_again(monkeypatch, caplog, fused):
    """The transform runs before the launch: a Ctrl-C in it moved nothing, and the batch goes back.

    Before, the fused step read the last step's launch as its own: the step was reported as an update raised part-way,
    counted, and its batch never trained on.
    """
    calls, interrupt_at = [], [None]

    def clamp():  # the uninterrupted run's transform too; the Ctrl-C comes in its call ``interrupt_at``
        calls.append(True)
        if len(calls) == interrupt_at[0]:
            raise KeyboardInterrupt
        with torch.no_grad():
            for param in model.parameters():
                param.grad.clamp_(-0.5, 0.5)

    model, _, ctl = _build_fused_sgd(clamp)
    _train(model, ctl)
    expected_weights, expected_steps, expected_decisions = _outcome(model, ctl)
    calls.clear()
    interrupt_at[0] = 3  # step 2's
    model, _, ctl = _build_fused_sgd(clamp)
    with caplog.at_level(logging.ERROR, logger="triaccel_rl"), pytest.raises(KeyboardInterrupt):
        _train(model, ctl)
    assert len(calls) == 3 and ctl.steps == 2
    assert not ctl.engine.update_started
    _run_again_as_uninterrupted(model, ctl, (expected_weights, expected_steps, expected_decisions), caplog)


@pytest.mark.parametrize("fused", [_fused_param])
def test_a_mid_run_change_the_fused_step_refuses_serves_the_batch_again(caplog, fused):
    """A group's momentum set apart mid-run: the fused step refuses it before its launch, and the batch goes back.

    The user sets it back and runs the cell again: the run ends as the one that never changed it. Before, the refusal
    was reported as an update raised part-way, counted, and its batch never trained on.
    """
    model, _, ctl = _build_fused_sgd(param_groups=True)
    _train(model, ctl)
    expected_weights, expected_steps, expected_decisions = _outcome(model, ctl)
    model, optimizer, ctl = _build_fused_sgd(param_groups=True)
    x, y = _data()
    with caplog.at_level(logging.ERROR, logger="triaccel_rl"), pytest.raises(ValueError, match="'momentum' now differ"):
        for xb, yb in ctl.loader((x, y), batch_size=16, epochs=2):
            if ctl.steps == 2:
                optimizer.param_groups[1]["momentum"] = 0.5
                refused_batch = xb.clone()
            with ctl.autocast():
                ctl.step(nn.functional.cross_entropy(model(xb), yb))
    assert ctl.steps == 2
    assert not ctl.engine.update_started
    optimizer.param_groups[1]["momentum"] = 0.9  # the user's fix
    assert torch.equal(_first_batch(ctl), refused_batch)  # served again (a loop broken out of gives it back too)
    _run_again_as_uninterrupted(model, ctl, (expected_weights, expected_steps, expected_decisions), caplog)

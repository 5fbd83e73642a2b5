"""The shield's rollback inside DecisionLoop: a non-finite probe loss restores the last good state."""

import copy
import math
import os

import numpy as np
import pytest
import torch

from triaccel_rl.actions import encode
from triaccel_rl.config import ControllerConfig, HeuristicConfig
from triaccel_rl.loop import DecisionLoop
from triaccel_rl.training import TrainingRun
from triaccel_rl.types import Action, BatchMove, Precision


def test_nonfinite_probe_loss_rolls_back_to_the_last_good_state(caplog):
    loop = DecisionLoop(TrainingRun("synthetic", seed=0, device="cpu"), ControllerConfig(interval_steps=3))
    loop.train_interval()
    good = loop.snapshot(progress=0.1)
    assert good.extra["rolled_back"] is False
    saved = [p.detach().clone() for p in loop.run.model.parameters()]
    momentum = {k: v["momentum_buffer"].clone() for k, v in loop.run.optimizer.state.items()}
    with torch.no_grad():  # corrupt the model the way a diverged update would
        next(loop.run.model.parameters()).fill_(float("inf"))
    with caplog.at_level("WARNING", logger="triaccel_rl"):
        signals = loop.snapshot(progress=0.2)
    assert signals.extra["rolled_back"] is True and signals.extra["rollbacks"] == 1
    assert "rolled back to the last good state" in caplog.text
    assert math.isfinite(signals.probe_loss)
    for before, after in zip(saved, loop.run.model.parameters(), strict=True):
        assert torch.equal(before, after)
    for key, state in loop.run.optimizer.state.items():
        assert torch.equal(momentum[key], state["momentum_buffer"])


def test_a_non_finite_running_statistic_rolls_back_though_the_probe_loss_is_finite(caplog):
    """The probe normalises by its batch's statistics, so a broken running statistic shows only at evaluation: the
    decision checks the buffers too."""
    from triaccel_rl.tasks import get_task

    task = get_task("cnn-fmnist", n_train=512, n_test=64)  # a subset: the whole set took 10 s to load and probe
    loop = DecisionLoop(TrainingRun(task, seed=0, device="cpu"), ControllerConfig(interval_steps=2))
    loop.train_interval()
    loop.snapshot(progress=0.1)
    bn = loop.run.model.bn
    saved = bn.running_var.clone()
    bn.running_var[0] = float("nan")
    with caplog.at_level("WARNING", logger="triaccel_rl"):
        signals = loop.snapshot(progress=0.2)
    assert signals.extra["rolled_back"] is True and math.isfinite(signals.probe_loss)
    assert "non-finite values in buffers ['bn.running_var']" in caplog.text
    assert torch.equal(bn.running_var, saved)


def test_rollback_can_be_turned_off():
    loop = DecisionLoop(
        TrainingRun("synthetic", seed=0, device="cpu"), ControllerConfig(interval_steps=3, rollback=False)
    )
    loop.train_interval()
    loop.snapshot(progress=0.1)
    with torch.no_grad():
        next(loop.run.model.parameters()).fill_(float("nan"))
    signals = loop.snapshot(progress=0.2)
    assert signals.extra["rolled_back"] is False and signals.extra["rollbacks"] == 0
    assert not signals.extra["probe_loss_finite"]


def test_snapshots_reuse_their_tensors_and_follow_a_changing_optimizer_state():
    from torch import nn

    from triaccel_rl.shield import RollbackGuard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    guard = RollbackGuard(model, optimizer)
    guard.save()  # before the first step: the optimizer has no state yet
    first_model_leaves = list(guard._good.model.leaves)

    def train_step():
        model(torch.randn(8, 3)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    train_step()
    guard.save()  # the optimizer state appeared: a new structure, copied afresh
    assert all(a is b for a, b in zip(guard._good.model.leaves, first_model_leaves, strict=True))
    momentum_leaves = [leaf for leaf in guard._good.optimizer.leaves if isinstance(leaf, torch.Tensor)]

    train_step()
    train_step()
    guard.save()  # same structure: copied into the same tensors
    tensors = [leaf for leaf in guard._good.optimizer.leaves if isinstance(leaf, torch.Tensor)]
    assert len(tensors) == 6 and all(a is b for a, b in zip(tensors, momentum_leaves, strict=True))
    saved_params = [p.detach().clone() for p in model.parameters()]
    saved_momentum = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    saved_buffers = [b.clone() for b in model.buffers()]
    train_step()
    assert guard.restore()
    for p, want, momentum in zip(model.parameters(), saved_params, saved_momentum, strict=True):
        assert torch.equal(p.detach(), want)
        assert torch.equal(optimizer.state[p]["momentum_buffer"], momentum)
    for buffer, want in zip(model.buffers(), saved_buffers, strict=True):
        assert torch.equal(buffer, want)


def _train_decisions(loop, n):
    """Runs ``n`` intervals, each closed by a snapshot; returns the parameters after each, by step."""
    params = {}
    for _ in range(n):
        loop.train_interval()
        loop.snapshot(progress=0.1)
        params[loop.run.steps] = [p.detach().clone() for p in loop.run.model.parameters()]
    return params


def _count_saves(loop, monkeypatch):
    saves = []
    save = loop.guard.save
    monkeypatch.setattr(loop.guard, "save", lambda: (saves.append(loop.run.steps), save())[1])
    return saves


def test_the_rollback_copy_is_refreshed_every_snapshot_every_healthy_decisions(monkeypatch):
    config = ControllerConfig(interval_steps=2, snapshot_every=3)
    loop = DecisionLoop(TrainingRun("synthetic", seed=0, device="cpu"), config)
    saves = _count_saves(loop, monkeypatch)
    params = _train_decisions(loop, 9)
    assert saves == [2, 8, 14]  # decisions 1 (the first copy), 4 and 7
    with torch.no_grad():
        next(loop.run.model.parameters()).fill_(float("nan"))
    signals = loop.snapshot(progress=0.2)
    assert signals.extra["rolled_back"] is True
    # The copy of decision 7 (step 14), two intervals old: at most snapshot_every intervals are lost.
    for want, got in zip(params[14], loop.run.model.parameters(), strict=True):
        assert torch.equal(want, got.detach())
    assert not torch.equal(params[18][0], params[14][0])  # the test would pass vacuously otherwise


def test_a_decision_that_changes_the_configuration_refreshes_the_copy(monkeypatch):
    config = ControllerConfig(interval_steps=2, snapshot_every=100)
    loop = DecisionLoop(TrainingRun("synthetic", seed=0, device="cpu"), config)
    saves = _count_saves(loop, monkeypatch)
    _train_decisions(loop, 2)
    assert saves == [2]
    keep = encode(Action(group_precisions(loop), loop.run.lr_scale, BatchMove.KEEP), config)
    loop.apply(keep)
    assert saves == [2]  # nothing changed: no copy
    loop.apply(encode(Action(group_precisions(loop), 0.75, BatchMove.KEEP), config))
    assert loop.run.lr_scale == 0.75 and saves == [2, 4]  # the LR changed: the healthy state at step 4 is copied
    loop.apply(encode(Action(group_precisions(loop), 1.0, BatchMove.KEEP), config))
    assert saves == [2, 4]  # copied already at this decision


def group_precisions(loop):
    """The precision of every group now (the run starts with one precision everywhere)."""
    (precision,) = set(loop.run.precisions)
    return (precision,) * loop.config.n_groups


def test_an_offload_that_fails_keeps_the_copy_on_the_device(monkeypatch, caplog):
    from torch import nn

    from triaccel_rl import shield

    model = nn.Linear(3, 2)
    guard = shield.RollbackGuard(model, torch.optim.SGD(model.parameters(), lr=0.1), offload=True)

    def refuse(leaf, offload):
        if offload:
            raise RuntimeError("cudaHostAlloc failed")  # what a locked-memory limit gives
        return leaf.detach().clone() if isinstance(leaf, torch.Tensor) else leaf

    monkeypatch.setattr(shield, "_copy_leaf", refuse)
    with caplog.at_level("WARNING", logger="triaccel_rl"):
        guard.save()
    assert "pinned host memory failed" in caplog.text and guard.offload is False
    weight = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    assert guard.restore() and torch.equal(model.weight, weight)


def test_healthy_refreshes_the_copy_every_n_calls():
    from torch import nn

    from triaccel_rl.shield import RollbackGuard

    model = nn.Linear(2, 1)
    guard = RollbackGuard(model, torch.optim.SGD(model.parameters(), lr=0.1), every=3)
    taken = []
    for call in range(7):
        with torch.no_grad():
            model.weight.fill_(float(call))
        guard.healthy()
        taken.append(guard.copy_is_current)
    assert taken == [True, False, False, True, False, False, True]  # calls 0, 3 and 6 copy
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    assert guard.restore() and float(model.weight.detach()[0, 0]) == 6.0
    # 1.5 and NaN passed the old `every < 1` check; NaN then never refreshed the copy after the first.
    for bad in (0, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match=rf"every={bad!r} must be a whole number >= 1"):
            RollbackGuard(model, torch.optim.SGD(model.parameters(), lr=0.1), every=bad)


def test_the_copy_is_allocated_before_training_and_the_first_decision_still_refreshes_it():
    """``reserve()`` at construction: the first decision copies into the same tensors, the state it closes on."""
    loop = DecisionLoop(TrainingRun("synthetic", seed=0, device="cpu"), ControllerConfig(interval_steps=3))
    assert loop.guard.has_snapshot and not loop.guard.copy_is_current
    start = [p.detach().clone() for p in loop.run.model.parameters()]
    reserved = [leaf for leaf in loop.guard._good.model.leaves if isinstance(leaf, torch.Tensor)]
    loop.train_interval()
    loop.snapshot(progress=0.1)
    assert loop.guard.copy_is_current
    copied = [leaf for leaf in loop.guard._good.model.leaves if isinstance(leaf, torch.Tensor)]
    assert all(a is b for a, b in zip(copied, reserved, strict=True))  # no new allocation at the decision
    params = list(loop.run.model.parameters())
    assert not torch.equal(params[0].detach(), start[0])  # the interval trained
    for snap, p in zip(copied, loop.run.model.state_dict().values(), strict=True):
        assert torch.equal(snap, p)


def test_a_non_finite_first_interval_rolls_back_to_the_starting_state():
    loop = DecisionLoop(TrainingRun("synthetic", seed=0, device="cpu"), ControllerConfig(interval_steps=3))
    start = [p.detach().clone() for p in loop.run.model.parameters()]
    loop.train_interval()
    with torch.no_grad():
        next(loop.run.model.parameters()).fill_(float("nan"))
    signals = loop.snapshot(progress=0.1)
    assert signals.extra["rolled_back"] is True and math.isfinite(signals.probe_loss)
    for want, p in zip(start, loop.run.model.parameters(), strict=True):
        assert torch.equal(want, p.detach())


def test_a_restore_keeps_the_lr_an_lr_scheduler_has_set_since_the_copy():
    from torch import nn

    from triaccel_rl.shield import RollbackGuard

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    guard = RollbackGuard(model, optimizer)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    guard.save()
    saved = [p.detach().clone() for p in model.parameters()]
    scheduler.step()
    scheduler.step()
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    assert guard.restore()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.025)  # the schedule's, not the copy's 0.1
    for want, p in zip(saved, model.parameters(), strict=True):
        assert torch.equal(want, p.detach())


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_a_restore_keeps_the_momentum_a_one_cycle_schedule_has_set_since_the_copy(kind):
    """OneCycleLR cycles SGD's momentum (AdamW's beta1) against the LR. The restore kept the schedule's LR but put the
    copy's momentum back, which the optimizer then used until the schedule's next step; the moments come back."""
    from torch import nn

    from triaccel_rl.shield import RollbackGuard

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    if kind == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1.0, total_steps=10)
    guard = RollbackGuard(model, optimizer)

    def step():
        model(torch.randn(4, 3)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()

    step()
    guard.save()
    moments = copy.deepcopy(optimizer.state_dict()["state"])
    for _ in range(3):
        step()
    now = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    key = "momentum" if kind == "sgd" else "betas"
    assert now[key] != moments_group(guard)[key]  # the schedule moved it: the check below can fail
    assert guard.restore()
    assert {k: v for k, v in optimizer.param_groups[0].items() if k != "params"} == now
    for index, state in moments.items():
        for name, value in state.items():
            assert torch.equal(optimizer.state[optimizer.param_groups[0]["params"][index]][name], value), name


def moments_group(guard):
    """The hyperparameters the guard's copy holds for the first param group."""
    return guard._good.optimizer.tree()["param_groups"][0]


class _WithRunningStats(torch.nn.Module):
    """Batch norm (persistent buffers, an integer count among them) and a non-persistent running mean of the outputs."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
        self.register_buffer("output_mean", torch.zeros(2), persistent=False)

    def forward(self, x):
        y = self.body(x)
        with torch.no_grad():
            self.output_mean.mul_(0.9).add_(0.1 * y.mean(0))
        return y


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
        lambda params: torch.optim.AdamW(params, lr=1e-2, amsgrad=True),
    ],
    ids=["sgd", "adamw"],
)
def test_a_restore_is_bit_identical_and_training_goes_on_as_if_nothing_happened(make_optimizer):
    """Parameters, every buffer (a non-persistent one too: the state dict leaves it out, so a restore never repaired
    it and ``nonfinite_buffers`` asked for a rollback at every decision), the optimizer's whole state; and the steps
    after the restore are the steps the run took from the copy."""
    from triaccel_rl.shield import RollbackGuard, nonfinite_buffers

    torch.manual_seed(0)
    model = _WithRunningStats()
    optimizer = make_optimizer(model.parameters())
    guard = RollbackGuard(model, optimizer)
    batches = [torch.randn(8, 3) for _ in range(6)]

    def train(xs):
        for x in xs:
            model(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()

    train(batches[:2])
    guard.save()
    saved = {name: t.clone() for name, t in [*model.named_parameters(), *model.named_buffers()]}
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    train(batches[2:4])
    reference = copy.deepcopy((model, optimizer))  # trains on from the copy: restored, the run must follow it
    with torch.no_grad():
        model.body[0].weight.fill_(float("nan"))
        model.body[1].running_var.fill_(float("inf"))
        model.output_mean.fill_(float("nan"))
    assert nonfinite_buffers(model) == ["output_mean", "body.1.running_var"]
    assert guard.restore()
    assert nonfinite_buffers(model) == []
    now = dict([*model.named_parameters(), *model.named_buffers()])
    assert set(now) == set(saved)
    for name, want in saved.items():
        assert now[name].dtype == want.dtype and torch.equal(now[name], want), name
    state = optimizer.state_dict()
    assert state["param_groups"] == saved_optimizer["param_groups"]
    assert state["state"].keys() == saved_optimizer["state"].keys()
    for index, entries in state["state"].items():
        assert entries.keys() == saved_optimizer["state"][index].keys()
        for key, value in entries.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(saved_optimizer["state"][index][key])), key
    ref_model, ref_optimizer = reference
    ref_model.load_state_dict(saved, strict=False)  # the reference goes back to the copy the way a user would
    ref_model.output_mean.copy_(saved["output_mean"])
    ref_optimizer.load_state_dict(saved_optimizer)
    train(batches[4:])
    for x in batches[4:]:
        ref_model(x).square().mean().backward()
        ref_optimizer.step()
        ref_optimizer.zero_grad()
    for (name, a), b in zip([*model.named_parameters(), *model.named_buffers()],
                            [*ref_model.parameters(), *ref_model.buffers()], strict=True):  # fmt: skip
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ("swapped", r"model must be a torch\.nn\.Module; got SGD$"),
        ("model None", r"model must be a torch\.nn\.Module; got NoneType$"),
        (
            "optimizer None",
            r"optimizer must be an optimizer \(an object with state_dict\(\) and load_state_dict\(\), "
            r"e\.g\. a torch\.optim\.Optimizer\); got NoneType$",
        ),
        ("optimizer a module", r"optimizer must be an optimizer .*; got Linear$"),
        ("offload a string", r"offload='no' must be True or False"),
        ("after_restore not callable", r"after_restore=3 must be callable \(or None\)"),
        ("save_extra alone", r"save_extra and load_extra go together"),
    ],
)
def test_the_guard_refuses_bad_arguments_by_name(arguments, message):
    """Each was taken: the swapped pair failed at the first copy with "unexpected keyword argument 'keep_vars'", None
    with an AttributeError, a module as the optimizer and offload='no' (truthy) ran, and a non-callable after_restore
    raised "'int' object is not callable" at the first restore, after the state was loaded."""
    from triaccel_rl.shield import RollbackGuard

    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    call = {
        "swapped": lambda: RollbackGuard(optimizer, model),
        "model None": lambda: RollbackGuard(None, optimizer),
        "optimizer None": lambda: RollbackGuard(model, None),
        "optimizer a module": lambda: RollbackGuard(model, model),
        "offload a string": lambda: RollbackGuard(model, optimizer, offload="no"),
        "after_restore not callable": lambda: RollbackGuard(model, optimizer, after_restore=3),
        "save_extra alone": lambda: RollbackGuard(model, optimizer, save_extra=dict),
    }[arguments]
    with pytest.raises(TypeError, match=message):
        call()
    RollbackGuard(model, optimizer, offload=False, every=2, after_restore=lambda: None)  # the control: taken


@pytest.mark.parametrize("name", ["rollback", "adaptive_interval"])
def test_a_decision_loops_switches_are_true_false_or_none(name):
    """rollback="no" turned the rollback on (a non-empty string is true)."""
    run = TrainingRun("synthetic", seed=0, device="cpu")
    with pytest.raises(ValueError, match=rf"{name}='no' must be True, False or None"):
        DecisionLoop(run, ControllerConfig(), **{name: "no"})


def test_a_decision_loop_refuses_a_config_or_max_steps_of_the_wrong_kind():
    """A dict or None config failed on ``.rollback`` (an AttributeError); max_steps=-2 was refused as the inner
    ``n_steps=-2``, after the cadence's pending record had been taken."""
    run = TrainingRun("synthetic", seed=0, device="cpu")
    for bad in ({"interval_steps": 3}, None):
        with pytest.raises(TypeError, match=r"^config=.* must be a ControllerConfig, e\.g\. ControllerConfig"):
            DecisionLoop(run, bad)
    loop = DecisionLoop(run, ControllerConfig(interval_steps=5))
    loop.train_interval()
    loop.snapshot(0.1)
    for bad in (-2, 1.5):  # 0 is a budget already spent (compare's speed trial can take a whole run)
        with pytest.raises(ValueError, match=rf"^max_steps={bad!r} must be a whole number >= 0"):
            loop.train_interval(max_steps=bad)
    assert loop._decided  # the decision's record is still pending: the next interval records it
    assert loop.train_interval(max_steps=2).steps == 2


def test_a_controller_refreshes_its_rollback_copy_right_after_a_decision_that_changes_the_configuration():
    """``ControllerConfig.snapshot_every`` promises a copy right after a change, so a rollback never crosses one:
    DecisionLoop took it, the Controller did not (a rollback after the LR change at step 12 went back to step 4)."""
    import numpy as np
    import torch
    from torch import nn

    from triaccel_rl.config import ControllerConfig
    from triaccel_rl.controller import Controller

    class LowerTheLrAtTheThirdDecision:
        name = "scripted"

        def __init__(self) -> None:
            self.decisions = 0

        def predict(self, observation, state=None, episode_start=None, deterministic=False):
            self.decisions += 1
            return np.array([0, 0, 0, 0, 1 if self.decisions >= 3 else 2, 1]), None  # LR rung 1 (x0.75), else x1

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    config = ControllerConfig(interval_steps=4, max_interval_factor=1, snapshot_every=100)
    ctl = Controller(model, torch.optim.SGD(model.parameters(), lr=0.1), policy=LowerTheLrAtTheThirdDecision(),
                     config=config)  # fmt: skip
    x = torch.randn(512, 8, generator=torch.Generator().manual_seed(0))
    weights = {}
    for xb, yb in ctl.loader((x, (x[:, 0] > 0).long()), batch_size=16):
        ctl.step(nn.functional.cross_entropy(model(xb), yb))
        weights[ctl.steps] = model[0].weight.detach().clone()
        if ctl.steps == 20:
            break
    assert [d.changed for d in ctl.decisions] == [False, False, True, False, False]
    with torch.no_grad():
        model[0].weight.fill_(float("nan"))
    assert ctl.guard is not None and ctl.guard.restore("a test")
    assert torch.equal(model[0].weight, weights[12])  # the decision at step 12 changed the LR
    ctl.close()


class _Keep:
    """fp32 everywhere, LR x1, the batch kept: no decision changes anything."""

    name = "keep"

    def predict(self, observation, state=None, episode_start=None, deterministic=False):
        return np.array([0, 0, 0, 0, 2, 1]), None


def test_the_controller_restores_a_state_whose_loss_was_finite_not_the_copy_after_the_update_that_blew_up(caplog):
    """Loss w² with SGD at LR 500: each step multiplies w by -999, from w = 999³. The first interval's 4 losses are
    finite (9.9e17 .. 9.9e35), and its last update leaves w = 999⁷, whose loss overflows fp32. That state was copied
    as the interval's end was healthy, and every rollback restored it (loss inf again: 3 rollbacks, no recovery). The
    copy now waits for the next interval's first loss; until then the start is what a rollback restores."""
    from triaccel_rl.controller import Controller

    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(999.0**3)
    optimizer = torch.optim.SGD(model.parameters(), lr=500.0)
    ctl = Controller(model, optimizer, policy=_Keep(), config=ControllerConfig(interval_steps=4, max_interval_factor=1))
    restored = []
    for x, _ in ctl.loader((torch.ones(32, 1), torch.zeros(32, 1)), batch_size=4, epochs=1):
        before = ctl.rollbacks
        ctl.step((model(x) ** 2).mean())
        if ctl.rollbacks > before:
            restored.append(model.weight.item())
    ctl.close()
    start = torch.tensor(999.0**3).item()  # fp32
    assert ctl.rollbacks == 1 and restored == [start]  # steps 5-8 inf: back to the start, whose loss is finite
    assert math.isfinite(torch.tensor(restored[0], dtype=torch.float32).square().item())


def test_a_rollback_brings_back_the_signals_estimates_with_the_weights():
    """The interval that diverged folded its huge, still finite losses and gradients into the collector's EMAs and the
    run's noise EMAs before its probe loss turned NaN: after the rollback the observation described the diverged run
    (log_loss at its cap of 10, log_curvature 4, a noise scale of 3.7e27) for 40 intervals, where the shipped policy
    fell back to the heuristic. Now they are the copy's, as the weights are."""
    run = TrainingRun("synthetic", seed=0, device="cpu")
    loop = DecisionLoop(run, ControllerConfig(interval_steps=5))
    loop.train_interval()
    loop.snapshot(0.1)
    healthy = loop.observation()
    estimates, noise = loop.collector.estimates(), run.noise_estimates
    run.lr_scale = 5000.0  # diverges within the interval
    loop.train_interval()
    signals = loop.snapshot(0.2)
    assert signals.extra["rolled_back"]
    restored = loop.collector.estimates()
    for name, value in estimates.items():
        assert (
            np.array_equal(restored[name], value, equal_nan=True)
            if isinstance(value, np.ndarray)
            else (
                restored[name] is value or restored[name] == value or (math.isnan(value) and math.isnan(restored[name]))
            )
        ), name
    assert np.array_equal(run.noise_estimates, noise)
    after = loop.observation()
    for feature in ("log_loss", "log_curvature"):
        assert after[loop.layout.globals(feature)] == healthy[loop.layout.globals(feature)], feature


def test_a_rollback_brings_back_the_loss_scale_the_interval_s_skipped_steps_cut():
    """Every skipped step of the interval that broke the model halved the loss scale, for a cause the copy's state did
    not have: it came back from the rollback at 0.0625 where the copy's was 65536 (2000 clean steps a doubling to grow
    back, small gradients of fp16 layers lost to underflow meanwhile). Now the scale comes back with the weights."""
    run = TrainingRun("synthetic", seed=0, device="cpu")
    loop = DecisionLoop(run, ControllerConfig(interval_steps=20, max_interval_factor=1))
    run.set_precisions(["fp16"] * len(run.precision.controllable_indices))
    loop.train_interval()
    loop.snapshot(0.1)  # healthy: the copy is taken here
    copied = run.engine.grad_scaler.state_dict()
    with torch.no_grad():  # an update blew the model up (as in the first test)
        next(run.model.parameters()).fill_(float("inf"))
    loop.train_interval()  # every step skipped
    assert run.engine.loss_scale == copied["scale"] / 2**20
    assert loop.snapshot(0.2).extra["rolled_back"]
    assert run.engine.grad_scaler.state_dict() == copied
    loop.train_interval()
    assert run.engine.loss_scale == copied["scale"]  # the restored model's steps are clean: nothing skipped


def test_the_controllers_rollback_brings_back_its_signals_estimates():
    """As for the decision loop: the loss EMA a Controller's rollback left was the blown-up interval's."""
    from triaccel_rl.controller import Controller

    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(999.0**3)
    optimizer = torch.optim.SGD(model.parameters(), lr=500.0)
    ctl = Controller(model, optimizer, policy=_Keep(), config=ControllerConfig(interval_steps=4, max_interval_factor=1))
    start = ctl.collector.loss_ema
    assert math.isnan(start)  # the copy of the start: no loss folded in yet
    for x, _ in ctl.loader((torch.ones(32, 1), torch.zeros(32, 1)), batch_size=4, epochs=1):
        before = ctl.rollbacks
        ctl.step((model(x) ** 2).mean())
        if ctl.rollbacks > before:
            break
    assert ctl.rollbacks == 1 and math.isnan(ctl.collector.loss_ema)  # not the first interval's 1e35
    ctl.close()


def test_the_controllers_rollback_brings_back_the_loss_scale():
    """As for the decision loop: the scale the blown-up interval's skipped steps had halved stayed halved."""
    from triaccel_rl.controller import Controller

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    ctl = Controller(model, optimizer, policy="fp16", config=ControllerConfig(interval_steps=4, max_interval_factor=1))
    data = (torch.randn(64, 4), torch.randn(64, 1))
    scales = []
    for step, (x, y) in enumerate(ctl.loader(data, batch_size=4, epochs=1), start=1):
        if step == 9:  # two healthy intervals are behind: the copy at the first one's end is confirmed
            with torch.no_grad():
                model[0].weight.fill_(float("inf"))
        with ctl.autocast():
            loss = torch.nn.functional.mse_loss(model(x).float(), y) * 1e-4  # no overflow at 65536
        ctl.step(loss)
        scales.append(ctl.engine.state_dict()["scaler"]["scale"])
        if ctl.rollbacks:
            break
    assert ctl.rollbacks == 1 and scales[:8] == [2.0**16] * 8 and scales[-2] == 2.0**13  # three steps skipped
    # The copy's (the shield has the layers in bf16 now, but a layer back in fp16 scales by it)
    assert scales[-1] == 2.0**16
    ctl.close()


def test_the_controllers_copy_carries_the_estimates_of_its_own_state():
    """The copy at an interval's end was taken before the interval's moments were folded in: it carried the
    estimates of one interval before its weights (after step 4, the loss EMA of step 2)."""
    from triaccel_rl.controller import Controller

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = ControllerConfig(interval_steps=2, max_interval_factor=1, snapshot_every=1)
    ctl = Controller(model, optimizer, policy=_Keep(), config=config)
    data = (torch.randn(64, 8, generator=torch.Generator().manual_seed(0)), torch.arange(64) % 3)
    for x, y in ctl.loader(data, batch_size=8, epochs=1):
        ctl.step(torch.nn.functional.cross_entropy(model(x), y))
        if ctl.steps in (2, 4, 6):
            copy = ctl.guard._unconfirmed or ctl.guard._good
            assert ctl.guard.copy_is_current and copy.extra[0]["_loss_ema"] == ctl.collector.loss_ema, ctl.steps
    ctl.close()


def test_a_confirmed_copy_is_kept_until_the_next_one_is_confirmed():
    """RollbackGuard(confirm=True): save() takes a copy to confirm, restore() brings back the last confirmed one."""
    from triaccel_rl.shield import RollbackGuard

    model = torch.nn.Linear(1, 1, bias=False)
    guard = RollbackGuard(model, torch.optim.SGD(model.parameters(), lr=0.1), confirm=True)
    weights = []
    for value in (1.0, 2.0, 3.0):
        with torch.no_grad():
            model.weight.fill_(value)
        guard.save()
        if value < 3.0:
            guard.confirm()
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    assert guard.has_unconfirmed and guard.restore()
    weights.append(model.weight.item())
    assert weights == [2.0] and not guard.has_unconfirmed  # 3.0 was never confirmed: dropped
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    assert guard.restore() and model.weight.item() == 2.0


class _LowerTheLrAtTheThirdDecision:
    name = "scripted"

    def __init__(self):
        self.decisions = 0

    def predict(self, observation, state=None, episode_start=None, deterministic=False):
        self.decisions += 1
        return np.array([0, 0, 0, 0, 1 if self.decisions >= 3 else 2, 1]), None


@pytest.mark.parametrize("snapshot_every", [1, 100])
def test_the_first_failure_after_a_change_goes_back_to_the_change_and_a_second_to_the_last_confirmed_state(
    snapshot_every,
):
    """The LR changes at step 12; steps 13-16 are NaN. The change's copy (step 12) is restored, though no loss was seen
    on it (the change may be what failed), not step 4's or 8's, crossing the change (found in review). Steps 17-20
    NaN again from it: then to the last confirmed state."""
    from triaccel_rl.controller import Controller

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    config = ControllerConfig(interval_steps=4, max_interval_factor=1, snapshot_every=snapshot_every)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ctl = Controller(model, optimizer, policy=_LowerTheLrAtTheThirdDecision(), config=config)
    x = torch.randn(512, 8, generator=torch.Generator().manual_seed(0))
    weights, restored = {0: model[0].weight.detach().clone()}, []
    for xb, yb in ctl.loader((x, (x[:, 0] > 0).long()), batch_size=16):
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        if 12 <= ctl.steps < 20:  # steps 13-20: every loss non-finite
            loss = loss * float("nan")
        before = ctl.rollbacks
        ctl.step(loss)
        weights[ctl.steps] = model[0].weight.detach().clone()
        if ctl.rollbacks > before:
            restored.append([s for s in (0, 4, 8, 12) if torch.equal(model[0].weight, weights[s])])
        if ctl.steps == 20:
            break
    ctl.close()
    assert ctl.decisions[2].changed and ctl.rollbacks == 2
    # every interval: step 8's copy, confirmed by steps 9-12; every 100th: the first (step 4), confirmed by 5-8
    assert restored == [[12], [8] if snapshot_every == 1 else [4]]


def test_the_controllers_two_copies_are_allocated_once_and_reused_by_a_resume():
    """Found in review: load_state_dict's reserve() allocated a third copy while the two were still held."""
    from triaccel_rl.controller import Controller

    model = torch.nn.Linear(4, 2)
    ctl = Controller(model, torch.optim.SGD(model.parameters(), lr=0.1), policy="fp32")
    guard = ctl.guard

    def storages():
        copies = [guard._good, guard._spare, guard._unconfirmed]
        return {
            leaf.untyped_storage().data_ptr()
            for copy in copies
            if copy is not None
            for part in (copy.model, copy.transient, copy.optimizer)
            for leaf in part.leaves
            if isinstance(leaf, torch.Tensor) and leaf.numel()
        }

    held = storages()
    assert guard._good is not None and guard._spare is not None and guard._unconfirmed is None
    assert len(held) == 2 * 2  # weight and bias, twice
    ctl.load_state_dict(ctl.state_dict())
    assert storages() == held  # the same tensors, nothing allocated


def test_a_rollback_brings_back_the_estimator_round_measured_on_the_copys_weights():
    """The decision's copy took the estimates before the decision's round folded in, though the round measured the
    copy's own weights: a rollback to it forgot the round (the curvature went back to the Fisher proxy)."""
    from triaccel_rl.signals import SignalConfig

    run = TrainingRun("synthetic", seed=0, device="cpu")
    signals = SignalConfig(schedule="fixed", fixed_interval_steps=3, warmup_round=False)
    loop = DecisionLoop(run, ControllerConfig(interval_steps=3, snapshot_every=1, signals=signals))
    for k in range(1, 30):
        rounds = loop.collector.scheduler.rounds
        loop.train_interval()
        loop.snapshot(progress=k / 30)
        if loop.collector.scheduler.rounds > rounds:
            break
    assert loop.collector.scheduler.rounds == 1
    after_round = copy.deepcopy(loop.collector.estimates())
    with torch.no_grad():
        next(run.model.parameters()).fill_(float("nan"))  # the next interval diverges
    snapshot = loop.snapshot(progress=(k + 1) / 30)
    assert snapshot.extra["rolled_back"]
    restored = loop.collector.estimates()
    for name in ("_trace_ema", "_round_weight"):
        np.testing.assert_array_equal(restored[name], after_round[name])
    assert snapshot.extra.get("curvature_source") == "hutchinson"


@pytest.mark.parametrize("resumed", [False, True])
def test_a_resumed_guard_reuses_the_two_reserved_copies(resumed):
    """After ``resume()`` the first ``confirm()`` dropped the spare, and the next copy allocated a whole new one (pinned
    host memory on a GPU, the cost ``reserve()`` keeps out of training time)."""
    from triaccel_rl.shield import RollbackGuard

    def storages(guard):
        return {
            leaf.untyped_storage().data_ptr()
            for held in (guard._good, guard._spare, guard._unconfirmed)
            if held is not None
            for part in (held.model, held.transient, held.optimizer)
            for leaf in part.leaves
            if isinstance(leaf, torch.Tensor) and leaf.numel()
        }

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    guard = RollbackGuard(model, torch.optim.SGD(model.parameters(), lr=0.1), confirm=True)
    guard.reserve()
    reserved = storages(guard)
    if resumed:
        guard.resume()
    for _ in range(3):  # as Controller._shield: an update confirms, a healthy interval copies
        guard.confirm()
        guard.healthy()
        assert storages(guard) == reserved


@pytest.mark.parametrize(
    ("overflow_rule", "sampled"),
    [(True, False), (False, False), (False, True)],
    ids=["bf16-after-overflow", "fp16-throughout", "fp16-rows-sampled"],
)
def test_fp16_overflow_at_finite_losses_is_no_rollback_and_the_scale_backs_off_as_gradscalers(overflow_rule, sampled):
    """A summed loss over unnormalised features needs 11 halvings of 65536, more than an interval's 4 steps: each
    interval of nothing but skipped steps was rolled back and its scale put back to 65536 (until 2026-12-06), so fp16
    never trained (60 of 120 steps skipped where GradScaler skips 11). Now nothing is restored, and with the overflow
    rule off the run is the plain fp16 autocast + GradScaler loop's, bit for bit. ``sampled``: the statistics' rows
    sampled under a time budget, as on a GPU, so that intervals record no loss (the first fix read those as
    non-finite, and rolled back as before)."""
    from triaccel_rl.controller import Controller

    n, batch = 24, 64
    generator = torch.Generator().manual_seed(1)
    x, y = 40 * torch.randn(n * batch, 8, generator=generator), torch.randint(0, 3, (n * batch,), generator=generator)

    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        return model, torch.optim.Adam(model.parameters(), lr=1e-3)

    def loss_of(model, k):
        rows = slice(batch * k, batch * (k + 1))
        return torch.nn.functional.cross_entropy(model(x[rows]), y[rows], reduction="sum")

    model, optimizer = make()
    scaler, plain_skipped = torch.amp.GradScaler("cpu"), 0
    for k in range(n):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = loss_of(model, k)
        before = scaler.get_scale()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        plain_skipped += scaler.get_scale() < before
    assert plain_skipped == 9 and scaler.get_scale() == 2.0**7  # more halvings than an interval has steps

    controlled, controlled_optimizer = make()
    heuristic = HeuristicConfig(max_overflow_rate=0.05 if overflow_rule else 1.0)
    config = ControllerConfig(interval_steps=4, max_interval_factor=1, heuristic=heuristic)
    ctl = Controller(controlled, controlled_optimizer, policy="fp16", config=config)
    if sampled:
        ctl.observe_budget_frac = 1e-9  # a row every DeviceMoments.max_every_steps (64) steps: 1 of 6 intervals
    for k in range(n):
        controlled_optimizer.zero_grad()
        with ctl.autocast():
            loss = loss_of(controlled, k)
        ctl.step(loss)
    assert ctl.rollbacks == 0
    if sampled:
        assert ctl._moments is not None and ctl._moments.every_steps == 64
    if overflow_rule:  # an interval in bf16 after the first two overflowed; fp16 again, at the scale it fell to
        assert ctl.skipped_steps == plain_skipped and ctl.precisions[0] is Precision.FP16
    else:
        assert ctl.skipped_steps == plain_skipped and ctl.engine.loss_scale == scaler.get_scale()
        for mine, plain in zip(controlled.parameters(), model.parameters(), strict=True):
            assert torch.equal(mine, plain)
    ctl.close()


FP16_THROUGHOUT = ControllerConfig(
    interval_steps=4, max_interval_factor=1, snapshot_every=1, heuristic=HeuristicConfig(max_overflow_rate=1.0)
)
"""Decisions every 4 steps, a copy at each, and no move out of fp16 under overflow: fp16 as GradScaler runs it."""


def _classifier(policy, config, n=256, model=None):
    """A controller over a small classifier (``model``, or Linear-ReLU-Linear), SGD at 0.01, and ``n`` inputs."""
    from triaccel_rl.controller import Controller

    torch.manual_seed(0)
    if model is None:
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    ctl = Controller(model, torch.optim.SGD(model.parameters(), lr=0.01), policy=policy, config=config)
    return ctl, model, torch.randn(n, 8, generator=torch.Generator().manual_seed(0))


def test_an_fp16_interval_of_nan_losses_that_recorded_no_row_is_rolled_back():
    """With the statistics' rows sampled (a row every 64 steps, as on a GPU) an interval may record no loss at all:
    NaN losses from step 9 on read as fp16's loss-scale back-off at finite losses, nothing was restored and the
    weights stayed NaN. The interval's last loss speaks for the steps it did not record."""
    ctl, model, x = _classifier("fp16", FP16_THROUGHOUT, n=512)
    ctl.observe_budget_frac = 1e-9  # a row every DeviceMoments.max_every_steps (64) steps
    for xb, yb in ctl.loader((x, (x[:, 0] > 0).long()), batch_size=16):
        if ctl.steps == 8:
            with torch.no_grad():
                model[0].weight.fill_(float("nan"))  # from step 9 on every loss is NaN
        with ctl.autocast():
            loss = torch.nn.functional.cross_entropy(model(xb).float(), yb)
        ctl.step(loss)
        if ctl.steps == 20:
            break
    ctl.close()
    assert ctl._moments is not None and ctl._moments.every_steps == 64
    assert ctl.rollbacks == 1 and bool(torch.isfinite(model[0].weight).all())


def test_an_fp16_interval_of_nan_losses_ending_in_an_overflow_is_a_divergence_not_a_back_off(caplog):
    """Steps 5-7 NaN losses, step 8 a finite loss whose fp16 gradients overflow: every update skipped. Counting every
    recorded step's loss as finite (n_finite_loss = n_recorded) read the interval as loss-scale back-off at finite
    losses, and nothing was restored."""
    ctl, model, x = _classifier("fp16", FP16_THROUGHOUT)
    with caplog.at_level("WARNING", logger="triaccel_rl"):
        for xb, yb in ctl.loader((x, (x[:, 0] > 0).long()), batch_size=16):
            with ctl.autocast():
                loss = torch.nn.functional.cross_entropy(model(xb).float(), yb)
            if 4 <= ctl.steps < 7:
                loss = loss * float("nan")  # steps 5-7
            elif ctl.steps == 7:
                loss = loss * 1e6  # step 8: finite, its fp16 gradients overflow
            ctl.step(loss)
            if ctl.steps == 8:
                break
    ctl.close()
    assert ctl.skipped_steps == 4 and ctl.rollbacks == 1
    assert "non-finite loss: rolled back to the last good state (rollback 1)" in caplog.text


@pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs a GPU or Triton's interpreter (TRITON_INTERPRET=1 before triton is imported)",
)
def test_on_the_fused_step_a_rollback_restarts_the_intervals_applied_step_count(monkeypatch):
    """The fused step counts applied updates on the device, and a rollback restores that counter: the next interval's
    skipped steps were counted from the count before the rollback, so steps 7-8 read as skipped (4 skipped, a second
    rollback for "non-finite gradients at finite losses"). Steps 5-6 NaN: 2 skipped, 1 rollback."""
    import triaccel_rl.controller as controller_module
    from triaccel_rl.engine import StepEngine

    class FusedEngine(StepEngine):  # the Controller picks the fused path only on CUDA by itself
        def __init__(self, model, optimizer, device, fused=None):
            super().__init__(model, optimizer, device, fused=True)

    monkeypatch.setattr(controller_module, "StepEngine", FusedEngine)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    config = ControllerConfig(interval_steps=2, max_interval_factor=1, snapshot_every=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    ctl = controller_module.Controller(model, optimizer, policy="fp32", config=config)
    assert ctl.engine.fused
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    for xb, yb in ctl.loader((x, (x[:, 0] > 0).long()), batch_size=8, epochs=1):
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        if 4 <= ctl.steps < 6:
            loss = loss * float("nan")  # steps 5-6: back to the copy after step 4
        ctl.step(loss)
    ctl.close()
    assert (ctl.steps, ctl.skipped_steps, ctl.rollbacks) == (8, 2, 1)


def test_a_buffer_broken_in_an_fp16_back_off_interval_is_still_rolled_back(caplog):
    """fp16, steps 5-8 every update skipped at finite losses (the loss scale backs off, no rollback), and step 6's
    batch overflowed a batch-norm's running variance: the back-off excuse covered the broken buffer, nothing was
    restored and the model evaluated to NaN from then on. A broken buffer is rolled back whatever else happened."""
    torch.manual_seed(0)
    norm_first = torch.nn.Sequential(
        torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)
    )
    ctl, model, x = _classifier("fp16", FP16_THROUGHOUT, model=norm_first)
    with caplog.at_level("WARNING", logger="triaccel_rl"):
        for xb, yb in ctl.loader((x, (x[:, 0] > 0).long()), batch_size=16):
            if ctl.steps == 5:
                xb = xb * 1e20  # its variance overflows fp32: running_var inf, the normalised batch finite
            with ctl.autocast():
                loss = torch.nn.functional.cross_entropy(model(xb).float(), yb)
            if 4 <= ctl.steps < 8:
                loss = loss * 1e6  # steps 5-8: fp16 gradients overflow at every scale tried
            assert torch.isfinite(loss)
            ctl.step(loss)
            if ctl.steps == 8:
                break
    ctl.close()
    assert ctl.skipped_steps == 4 and ctl.rollbacks == 1
    assert "non-finite values in buffers ['0.running_var']: rolled back" in caplog.text
    assert bool(torch.isfinite(model[0].running_var).all())


def test_only_fp16_excuses_an_interval_of_skipped_updates_at_finite_losses(caplog):
    """bf16 has no loss scale to back off: an interval whose every update is skipped for non-finite gradients at
    finite losses is a divergence, rolled back. Excusing it as for fp16 left the run with no update and no rollback."""
    config = ControllerConfig(interval_steps=4, max_interval_factor=1, snapshot_every=1)
    ctl, model, x = _classifier("bf16", config)
    assert not ctl.engine.precision.needs_grad_scaler
    with caplog.at_level("WARNING", logger="triaccel_rl"):
        for xb, yb in ctl.loader((x, (x[:, 0] > 0).long()), batch_size=16):
            with ctl.autocast():
                loss = torch.nn.functional.cross_entropy(model(xb).float(), yb)
            if 4 <= ctl.steps < 8:  # steps 5-8: a finite loss (sqrt(0) = 0) with an infinite gradient
                b = model[2].bias[0]
                loss = loss + torch.sqrt(b - b.detach())
            ctl.step(loss)
            if ctl.steps == 8:
                break
    ctl.close()
    assert ctl.skipped_steps == 4 and ctl.rollbacks == 1
    assert "non-finite gradients at finite losses: rolled back to the last good state (rollback 1)" in caplog.text


def _restores(policy, config, loss_of_step, steps):
    """Trains ``steps`` steps of a small classifier under ``policy``, each step's loss passed through
    ``loss_of_step(step, loss)`` (``step`` counted from 0); returns the controller and, for each rollback, the
    decision steps (multiples of 4) whose weights the restored state equals."""
    from triaccel_rl.controller import Controller

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    ctl = Controller(model, torch.optim.SGD(model.parameters(), lr=0.01 if policy == "fp16" else 0.1), policy, config)
    x = torch.randn(512, 8, generator=torch.Generator().manual_seed(0))
    weights, restored = {0: model[0].weight.detach().clone()}, []
    for xb, yb in ctl.loader((x, (x[:, 0] > 0).long()), batch_size=16):
        with ctl.autocast():
            loss = loss_of_step(ctl.steps, torch.nn.functional.cross_entropy(model(xb).float(), yb))
        before = ctl.rollbacks
        ctl.step(loss)
        weights[ctl.steps] = model[0].weight.detach().clone()
        if ctl.rollbacks > before:
            restored.append([s for s in range(0, ctl.steps, 4) if torch.equal(model[0].weight, weights[s])])
        if ctl.steps == steps:
            break
    ctl.close()
    return ctl, restored


def test_an_fp16_back_off_interval_keeps_the_copy_it_began_from():
    """Steps 5-8 are nothing but fp16 loss-scale back-off (finite losses, every update skipped), steps 9-12 healthy,
    13-16 NaN. The back-off interval dropped the copy of step 4 it began from, so steps 9-12 confirmed nothing and the
    failure went back past it. Now 9-12 confirm step 4's copy (the same weights as step 8's: nothing was applied)."""

    def loss_of_step(step, loss):
        if 4 <= step < 8:
            return loss * 1e6  # steps 5-8: finite, fp16 gradients overflow at every scale tried
        return loss * float("nan") if 12 <= step < 16 else loss  # steps 13-16 diverge

    ctl, restored = _restores("fp16", FP16_THROUGHOUT, loss_of_step, 16)
    assert ctl.skipped_steps == 8 and ctl.rollbacks == 1
    assert restored == [[4, 8]]


def test_a_restored_change_copy_is_confirmed_by_the_next_healthy_interval():
    """As above, with snapshot_every=1: the LR changes at step 12, steps 13-16 NaN go back to the change's copy, steps
    17-20 are healthy from it, and 21-24 NaN. The restored change copy was never confirmed, so the second failure went
    back to step 8's copy, undoing the healthy interval's proof and crossing the change. Now it returns to step 12's
    (its weights also step 16's, the restored state)."""

    def loss_of_step(step, loss):  # steps 13-16 and 21-24 non-finite, 17-20 healthy
        return loss * float("nan") if 12 <= step < 16 or 20 <= step < 24 else loss

    config = ControllerConfig(interval_steps=4, max_interval_factor=1, snapshot_every=1)
    ctl, restored = _restores(_LowerTheLrAtTheThirdDecision(), config, loss_of_step, 24)
    assert ctl.decisions[2].changed and ctl.rollbacks == 2
    assert restored == [[12], [12, 16]]


@pytest.mark.parametrize(("failing", "expected"), [(range(12, 16), [[12]]), (range(12, 20), [[12], [4]])])
def test_a_change_decided_after_a_mixed_interval_is_copied_and_restored_once(failing, expected):
    """``snapshot_every`` promises a copy right after a change, so that a rollback never crosses one. A mixed interval
    (step 10 skipped, the rest applied: what an fp16 loss-scale overflow makes, routinely) took none at the LR change
    decided at its end, and the failure at steps 13-16 went back past it, to step 4. Its copy is of finite weights and
    buffers and is confirmed only by an update applied on it, like any change's copy: the first failure goes back to
    it (step 12), a second straight after to the last confirmed state (step 4; every second interval is copied)."""

    def loss_of_step(step, loss):  # step 10 skipped (a mixed interval), then the failing steps diverge
        return loss * float("nan") if step == 9 or step in failing else loss

    config = ControllerConfig(interval_steps=4, max_interval_factor=1, snapshot_every=2)
    ctl, restored = _restores(_LowerTheLrAtTheThirdDecision(), config, loss_of_step, failing.stop)
    assert ctl.decisions[2].changed and ctl.skipped_steps == 1 + len(failing) and ctl.rollbacks == len(expected)
    assert restored == expected

"""A decision that raises (a Ctrl-C in the policy or in the snapshot) is made at the next step, not lost.

Until 2026-12-07 the interval was closed and its decision dropped: carried on in the same Controller, or saved and
resumed, the next decision came an interval late, and a run whose policy raised the LR at step 4 trained four more
steps at x1.0. The decision stays due, in the Controller and in its checkpoint, and the next ``backward()`` or
``step()`` makes it before its update, where the uninterrupted run's took effect. One cut short after the executor
applied its action is finished from there: before, the retry asked the policy again and applied a second action (the
batch grown twice, the change reported as none), or, cut short after it was counted, lost its report.
"""

import copy
from collections import deque

import numpy as np
import pytest
import torch
from interrupts import interrupt_once
from torch import nn

from triaccel_rl.cadence import Cadence
from triaccel_rl.config import ControllerConfig, HeuristicConfig
from triaccel_rl.controller import Controller
from triaccel_rl.shield import RollbackGuard
from triaccel_rl.signals import SignalCollector

_LR_UP = np.array([0, 0, 0, 0, 4, 1])  # fp32 everywhere, LR x1.5, the batch kept


class _RaiseLR:
    """Sets LR x1.5 at every decision; records each observation it is called with; raises ``error`` once if set."""

    name = "raise-lr"

    def __init__(self, error: type[BaseException] | None = None) -> None:
        self.error = error
        self.observations: list[np.ndarray] = []

    def predict(self, observation, state=None, episode_start=None, deterministic=False):
        self.observations.append(np.array(observation, copy=True))
        if self.error is not None:
            error, self.error = self.error, None
            raise error("interrupted in the policy")
        return _LR_UP.copy(), None


def _data():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(200, 8, generator=generator), torch.randint(0, 3, (200,), generator=generator)


def _build(policy):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, Controller(model, optimizer, policy=policy, config=ControllerConfig(interval_steps=4))


def _train(model, ctl, lr_scales, accumulate=False):
    """Two epochs of 16-sample batches from the run's place; the LR multiplier after each step goes to lr_scales."""
    x, y = _data()
    for xb, yb in ctl.loader((x, y), batch_size=16, epochs=2):
        if accumulate:  # two micro-batches: the first through backward()
            half = len(xb) // 2
            ctl.backward(nn.functional.cross_entropy(model(xb[:half]), yb[:half]) / 2)
            ctl.step(nn.functional.cross_entropy(model(xb[half:]), yb[half:]) / 2)
        else:
            ctl.step(nn.functional.cross_entropy(model(xb), yb))
        lr_scales.append(ctl.engine.lr_scale)


def _params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _uninterrupted(accumulate=False):
    policy = _RaiseLR()
    model, ctl = _build(policy)
    lr_scales: list[float] = []
    _train(model, ctl, lr_scales, accumulate)
    seen = ctl.cadence.state_dict()["seen"]
    ctl.close()
    return _params(model), lr_scales, ctl.decision_count, seen, policy.observations


def _interrupted(ctl, model, lr_scales, error, accumulate=False):
    """Trains until ``error`` comes out of the first decision (at step 4, after its update), which stays due."""
    with pytest.raises(error):
        _train(model, ctl, lr_scales, accumulate)
    assert (ctl.steps, ctl.decision_count, ctl.engine.lr_scale) == (4, 0, 1.0)


def _snapshot_raising_once(ctl, error):
    """Makes ``ctl.collector.snapshot`` raise ``error`` at its first call, before it reads anything."""
    snapshot = ctl.collector.snapshot

    def raise_once(**kwargs):
        ctl.collector.snapshot = snapshot
        raise error("interrupted in the snapshot")

    ctl.collector.snapshot = raise_once


@pytest.mark.parametrize("accumulate", [False, True])
def test_a_ctrl_c_in_the_policy_carried_on_decides_as_the_uninterrupted_run(accumulate):
    expected, expected_lr_scales, decisions, seen, observations = _uninterrupted(accumulate)
    assert expected_lr_scales[2:5] == [1.0, 1.5, 1.5]  # x1.5 from step 4's decision on
    policy = _RaiseLR(KeyboardInterrupt)
    model, ctl = _build(policy)
    lr_scales: list[float] = []
    _interrupted(ctl, model, lr_scales, KeyboardInterrupt, accumulate)
    _train(model, ctl, lr_scales, accumulate)  # made before step 5's update (in backward() when accumulating)
    assert torch.equal(_params(model), expected)
    assert lr_scales == expected_lr_scales[:3] + expected_lr_scales[4:]  # (step 4 raised before its record)
    assert ctl.decision_count == decisions
    assert ctl.cadence.state_dict()["seen"] == seen  # the cadence recorded each decision once
    # The retry decided from the observation the interrupted call was given, not from an emptied interval
    assert len(policy.observations) == len(observations) + 1
    np.testing.assert_array_equal(policy.observations[1], policy.observations[0])
    ctl.close()


def test_a_ctrl_c_in_the_policy_saved_and_resumed_decides_as_the_uninterrupted_run():
    expected, expected_lr_scales, decisions, _, _ = _uninterrupted()
    model, ctl = _build(_RaiseLR(KeyboardInterrupt))
    lr_scales: list[float] = []
    _interrupted(ctl, model, lr_scales, KeyboardInterrupt)
    state, weights = copy.deepcopy(ctl.state_dict()), copy.deepcopy(model.state_dict())
    ctl.close()
    assert state["signals"]["decision_due"] is True
    resumed_model, resumed = _build(_RaiseLR())
    resumed_model.load_state_dict(weights)
    resumed.load_state_dict(state)
    _train(resumed_model, resumed, lr_scales)
    assert torch.equal(_params(resumed_model), expected)
    assert lr_scales == expected_lr_scales[:3] + expected_lr_scales[4:]  # (step 4 raised before its record)
    assert resumed.decision_count == decisions  # the first made by the resumed controller
    resumed.close()


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
@pytest.mark.parametrize("resume", [False, True])
def test_an_exception_in_the_snapshot_leaves_the_decision_due(error, resume):
    expected, expected_lr_scales, decisions, seen, observations = _uninterrupted()
    policy = _RaiseLR()
    model, ctl = _build(policy)
    _snapshot_raising_once(ctl, error)
    lr_scales: list[float] = []
    _interrupted(ctl, model, lr_scales, error)
    assert policy.observations == []  # the policy was not reached
    if resume:
        state, weights = copy.deepcopy(ctl.state_dict()), copy.deepcopy(model.state_dict())
        ctl.close()
        model, ctl = _build(policy)
        model.load_state_dict(weights)
        ctl.load_state_dict(state)
    _train(model, ctl, lr_scales)
    assert torch.equal(_params(model), expected)
    assert lr_scales == expected_lr_scales[:3] + expected_lr_scales[4:]  # (step 4 raised before its record)
    assert ctl.decision_count == decisions
    if not resume:
        assert ctl.cadence.state_dict()["seen"] == seen
        # The snapshot that raised read nothing: the retry observes the interval as the uninterrupted run did, but
        # for the step time's trend (wall clock) and the progress (read a batch later, once the next one is served)
        moving = [ctl.layout.globals(name) for name in ("step_time_trend", "progress")]
        same = np.ones(ctl.layout.size, dtype=bool)
        same[moving] = False
        np.testing.assert_array_equal(policy.observations[0][same], observations[0][same])
    ctl.close()


def test_a_checkpoint_without_decision_due_loads_with_none_due():
    """Saved before the key: none due, so a decision lost before the save stays lost (the next comes at step 8)."""
    model, ctl = _build(_RaiseLR(KeyboardInterrupt))
    lr_scales: list[float] = []
    _interrupted(ctl, model, lr_scales, KeyboardInterrupt)
    state, weights = copy.deepcopy(ctl.state_dict()), copy.deepcopy(model.state_dict())
    ctl.close()
    del state["signals"]["decision_due"]
    resumed_model, resumed = _build(_RaiseLR())
    resumed_model.load_state_dict(weights)
    resumed.load_state_dict(state)
    assert resumed.state_dict()["signals"]["decision_due"] is False
    _train(resumed_model, resumed, lr_scales)
    assert lr_scales[:7] == [1.0] * 6 + [1.5]  # steps 1-3 and 5-8: x1.5 from step 8's decision
    for wrong, message in (
        ({"decision_due": 1}, "decision_due 1, not a bool"),
        ({"decision_due": True, "interval_steps": 2, "interval_applied": 2}, "a decision due and interval_steps 2"),
    ):
        with pytest.raises(ValueError, match=message):
            resumed.load_state_dict({**state, "signals": {**state["signals"], **wrong}})
    resumed.close()


# The heuristic's first decision, at step 3, changes two settings: the LR a rung down (a plateau: annealing from the
# start), the batch doubled (a ramp from the start) to 32, the data's largest (an eighth of 256 samples)
_HEURISTIC = HeuristicConfig(anneal_plateau=0.5, anneal_after=0.0, ramp_batch_after=0.0, max_batch_growth=4.0)


def _build_heuristic():
    """The model and its Controller, whose rollback copies are counted: the steps taken when each was (``copies``)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    config = ControllerConfig(interval_steps=3, heuristic=_HEURISTIC)
    ctl = Controller(model, optimizer, policy="heuristic", config=config)
    copies, save = [], ctl.guard.save

    def counted_save():
        save()
        copies.append(ctl.steps)

    ctl.guard.save = counted_save
    return model, ctl, copies


def _train_heuristic(model, ctl):
    """Two epochs of 256 samples in batches of 16, doubled by the first decision, from the run's place."""
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 8, generator=generator), torch.randint(0, 3, (256,), generator=generator)
    for xb, yb in ctl.loader((x, y), batch_size=16, epochs=2):
        with ctl.autocast():
            ctl.step(nn.functional.cross_entropy(model(xb), yb))


def _heuristic_outcome(model, ctl, copies):
    cadence = ctl.cadence.state_dict()
    outcome = {
        "weights": _params(model),
        "settings": (ctl.steps, ctl.engine.lr_scale, ctl.batch_size, ctl.decision_count),
        "copies": copies,
        "cadence": (cadence["seen"], cadence["expedite"]),
        "decisions": list(ctl.decisions),
    }
    ctl.close()
    return outcome


def _assert_same_run(outcome, expected):
    assert outcome["settings"] == expected["settings"]  # steps, LR multiplier, batch size, decisions made
    assert outcome["cadence"] == expected["cadence"]  # each decision recorded once, each change expedited once
    assert outcome["decisions"] == expected["decisions"]  # each report as the uninterrupted run's
    assert outcome["copies"] == expected["copies"]  # each rollback copy taken once
    difference = (outcome["weights"] - expected["weights"]).abs().max().item()
    assert torch.equal(outcome["weights"], expected["weights"]), f"weights {difference:.3g} off"


class _Decisions(deque):
    """``Controller.decisions`` as it is, but an instance whose ``append`` a test can patch."""


def _uninterrupted_heuristic():
    model, ctl, copies = _build_heuristic()
    _train_heuristic(model, ctl)
    expected = _heuristic_outcome(model, ctl, copies)
    first = expected["decisions"][0]
    assert (first.lr_scale, first.batch_size, first.changed, first.refused) == (0.75, 32, True, [])
    assert expected["settings"] == (18, 0.5, 32, 6)  # 3 steps of 16, then 15 of 32
    assert expected["copies"] == [3, 6, 18]  # an interval end, a change, 4 intervals on (snapshot_every)
    return expected


# (where, the method, on return, the steps and LR multiplier then): the first time it runs once the decision's action
# was applied. The first decision's change needs no copy (its interval's end took one); the second's
# does (snapshot_every=4 took none at that interval's end). A Ctrl-C as the copy returns reads as one in it, which
# takes the copy again at the retry: after it, it comes where the decision's time is charged.
_APPLIED_POINTS = [
    ("right after the action was applied", Cadence, "expedite", False, 3, 0.75),
    ("after the change was expedited", Cadence, "expedite", True, 3, 0.75),
    ("before the rollback copy after the change", RollbackGuard, "save", False, 6, 0.5),
    ("after the rollback copy after the change", SignalCollector, "add_overhead", False, 6, 0.5),
    ("before the report is kept", _Decisions, "append", False, 3, 0.75),
    ("after the report is kept", _Decisions, "append", True, 3, 0.75),
]


@pytest.mark.parametrize(
    ("where", "owner", "name", "on_return", "at_steps", "lr_scale"),
    _APPLIED_POINTS,
    ids=[p[0] for p in _APPLIED_POINTS],
)
def test_a_ctrl_c_after_the_action_was_applied_finishes_that_decision_once(
    monkeypatch, where, owner, name, on_return, at_steps, lr_scale
):
    expected = _uninterrupted_heuristic()
    model, ctl, copies = _build_heuristic()
    ctl.decisions = _Decisions(maxlen=ctl.decisions.maxlen)
    owner = {_Decisions: ctl.decisions, RollbackGuard: ctl.guard}.get(owner, owner)  # the instances' own
    applied = (at_steps, lr_scale)
    fired = interrupt_once(monkeypatch, owner, name, lambda: (ctl.steps, ctl.engine.lr_scale) == applied, on_return)
    with pytest.raises(KeyboardInterrupt):
        _train_heuristic(model, ctl)
    assert fired, f"no Ctrl-C came {where}"
    assert (ctl.steps, ctl.engine.lr_scale, ctl.batch_size) == (at_steps, lr_scale, 32)  # the action is in
    _train_heuristic(model, ctl)  # the cell run again
    _assert_same_run(_heuristic_outcome(model, ctl, copies), expected)


def test_a_checkpoint_after_the_action_was_applied_holds_the_decision_made(monkeypatch):
    """Saved with the decision part-made, the resumed run does not decide it again (its batch grown twice)."""
    expected = _uninterrupted_heuristic()
    model, ctl, copies = _build_heuristic()
    fired = interrupt_once(monkeypatch, Cadence, "expedite", lambda: True, on_return=False)
    with pytest.raises(KeyboardInterrupt):
        _train_heuristic(model, ctl)
    assert fired
    state, weights = copy.deepcopy(ctl.state_dict()), copy.deepcopy(model.state_dict())
    assert state["signals"]["decision_due"] is False
    assert (ctl.decision_count, ctl.decisions[-1]) == (1, expected["decisions"][0])
    _train_heuristic(model, ctl)  # this process carries on too, the decision made once
    _assert_same_run(_heuristic_outcome(model, ctl, copies), expected)
    resumed_model, resumed, resumed_copies = _build_heuristic()
    resumed_model.load_state_dict(weights)
    resumed.load_state_dict(state)
    _train_heuristic(resumed_model, resumed)
    outcome = _heuristic_outcome(resumed_model, resumed, resumed_copies)
    assert torch.equal(outcome["weights"], expected["weights"])
    assert outcome["settings"] == (*expected["settings"][:3], 5)  # the decisions made after the resume
    assert outcome["decisions"] == expected["decisions"][1:]

"""The shield's bound on rollbacks in a row: a restored state that keeps failing stops the run with an error.

A state whose loss is finite but whose next updates overflow (or whose optimizer moments are huge) passed every check
of the copy and was restored at every failure, the run neither training nor stopping (found 2026-12-07). Now
``ControllerConfig.max_rollbacks_in_a_row`` rollbacks with no healthy interval between are the last: the next failure
raises ``NoGoodStateError``, with the state restored. Every loop here is bounded, so a run that never raises fails
rather than hangs.
"""

import copy
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from triaccel_rl.config import ConfigError, ControllerConfig
from triaccel_rl.controller import Controller
from triaccel_rl.errors import NoGoodStateError
from triaccel_rl.loop import DecisionLoop
from triaccel_rl.tasks import get_task
from triaccel_rl.training import TrainingRun


class _Keep:
    """fp32 everywhere, LR x1, the batch kept: no decision changes anything."""

    name = "keep"

    def predict(self, observation, state=None, episode_start=None, deterministic=False):
        return np.array([0, 0, 0, 0, 2, 1]), None


def _overflowing_controller(config):
    """Loss w² under SGD at LR 500 from w = 1e18: the first loss (1e36) is finite, its update makes w about -1e21,
    whose loss overflows fp32. Each failure goes back to the start, whose first update overflows again."""
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1e18)
    optimizer = torch.optim.SGD(model.parameters(), lr=500.0)
    return model, Controller(model, optimizer, policy=_Keep(), config=config)


@pytest.mark.parametrize("bound", [None, 1])
def test_a_start_state_whose_first_update_overflows_raises_after_the_bound(bound, caplog):
    """Each start gives one applied update (a mixed interval), then an interval of inf losses restores the start: a
    failure every 8 steps. The (bound + 1)-th raises at step 8 * (bound + 1); the default bound is 4."""
    config = ControllerConfig(interval_steps=4, max_interval_factor=1)
    if bound is not None:
        config = replace(config, max_rollbacks_in_a_row=bound)
    expected = 4 if bound is None else bound
    model, ctl = _overflowing_controller(config)
    start = model.weight.detach().clone()
    with pytest.raises(NoGoodStateError) as raised:
        for x, _ in ctl.loader((torch.ones(64, 1), torch.zeros(64, 1)), batch_size=4, epochs=4):
            ctl.step((model(x) ** 2).mean())
            assert ctl.steps < 8 * (expected + 2), "no NoGoodStateError: the start was restored for good"
    message = str(raised.value)
    assert f"max_rollbacks_in_a_row={expected}" in message
    assert f"after {expected} rollbacks in a row" in message
    assert "lower the learning rate" in message and "earlier checkpoint" in message
    assert ctl.rollbacks == expected and ctl.steps == 8 * (expected + 1)
    assert torch.equal(model.weight, start)  # the state the rollbacks restored: finite, usable
    logged = [record.getMessage() for record in caplog.records if "restored" in record.getMessage()
              or "rolled back" in record.getMessage()]  # fmt: skip
    # The last restore is no rollback: it logged "(rollback 5)" beside the error's "after 4 rollbacks"
    assert logged[-2:] == [f"non-finite loss: rolled back to the last good state (rollback {expected})",
                           "non-finite loss: the last good state restored, and the run stops"]  # fmt: skip
    ctl.close()


def _classifier(config, n=512):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    ctl = Controller(model, torch.optim.AdamW(model.parameters(), lr=0.01), policy=_Keep(), config=config)
    g = torch.Generator().manual_seed(1)
    return model, ctl, (torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g))


def _train(model, ctl, data, until):
    for xb, yb in ctl.loader(data, batch_size=16, epochs=8):
        ctl.step(nn.functional.cross_entropy(model(xb), yb))
        if ctl.steps == until:
            return


def test_a_checkpoint_with_huge_optimizer_moments_raises_after_the_bound_with_the_resumed_state_restored():
    """exp_avg 1e30 (finite, so the load takes it): every update throws the weights far enough that the batch norm's
    running variance overflows; each interval confirms the resumed copy and breaks the buffer again."""
    config = ControllerConfig(interval_steps=5, max_interval_factor=1)
    model, ctl, data = _classifier(config)
    _train(model, ctl, data, until=17)
    state = copy.deepcopy(ctl.state_dict())
    moments = state["engine"]["optimizer"]["state"]
    first = sorted(moments)[0]
    moments[first]["exp_avg"].fill_(1e30)
    moments[first]["exp_avg_sq"].fill_(1e-30)
    weights = copy.deepcopy(model.state_dict())
    ctl.load_state_dict(state)
    with pytest.raises(NoGoodStateError, match=r"max_rollbacks_in_a_row=4") as raised:
        _train(model, ctl, data, until=17 + 5 * 7)  # the fifth failing interval ends at step 17 + 3 + 4 * 5 = 40
    assert "non-finite values in buffers" in str(raised.value)
    assert ctl.rollbacks == 4 and ctl.steps == 40
    for name, value in model.state_dict().items():  # the resumed state, restored: finite weights and buffers
        assert torch.isfinite(value.float()).all(), name
        assert torch.equal(value, weights[name]), name
    ctl.close()


def test_failures_separated_by_healthy_intervals_never_raise_and_all_count():
    """Intervals 2, 4, 6, 8 and 10 all NaN: five rollbacks, more than the bound of 1, but never two in a row."""
    config = ControllerConfig(interval_steps=4, max_interval_factor=1, max_rollbacks_in_a_row=1)
    model, ctl, data = _classifier(config)
    for xb, yb in ctl.loader(data, batch_size=16, epochs=2):
        loss = nn.functional.cross_entropy(model(xb), yb)
        if ctl.steps // 4 + 1 in (2, 4, 6, 8, 10):
            loss = loss * float("nan")
        ctl.step(loss)
        if ctl.steps == 48:
            break
    assert (ctl.steps, ctl.rollbacks, ctl.skipped_steps) == (48, 5, 20)
    ctl.close()


def test_the_count_of_rollbacks_in_a_row_is_in_the_checkpoint():
    config = ControllerConfig(interval_steps=4, max_interval_factor=1)
    model, ctl = _overflowing_controller(config)
    for x, _ in ctl.loader((torch.ones(64, 1), torch.zeros(64, 1)), batch_size=4, epochs=1):
        ctl.step((model(x) ** 2).mean())
        if ctl.steps == 16:  # two failures, no healthy interval
            break
    state = ctl.state_dict()
    assert (state["rollbacks"], state["rollbacks_in_a_row"]) == (2, 2)
    ctl.close()
    model, ctl = _overflowing_controller(config)
    ctl.load_state_dict(state)
    assert ctl.state_dict()["rollbacks_in_a_row"] == 2
    older = {key: value for key, value in state.items() if key != "rollbacks_in_a_row"}  # saved before the bound
    ctl.load_state_dict(older)
    assert ctl.state_dict()["rollbacks_in_a_row"] == 0
    with pytest.raises(ValueError, match=r"rollbacks_in_a_row 3 is more than its rollbacks 2"):
        ctl.load_state_dict({**state, "rollbacks_in_a_row": 3})
    ctl.close()


def _failing_loop(bound):
    """A run at LR 1e12: every interval from the start diverges, and its probe loss is non-finite."""
    task = replace(get_task("synthetic"), base_lr=1e12)
    config = ControllerConfig(interval_steps=3)
    if bound is not None:
        config = replace(config, max_rollbacks_in_a_row=bound)
    return DecisionLoop(TrainingRun(task, seed=0, device="cpu"), config)


def test_a_decision_loop_is_not_bounded_its_row_runs_to_its_budget():
    """``compare``'s loop keeps restoring a state that keeps failing, to the row's budget: the row ends as a miss with
    the restored state's metric, where an error would end the whole comparison."""
    loop = _failing_loop(1)
    start = [p.detach().clone() for p in loop.run.model.parameters()]
    for decision in range(4):
        loop.train_interval()
        assert loop.snapshot(progress=0.1 * decision).extra["rolled_back"]
    assert loop.guard is not None and loop.guard.rollbacks == 4
    for before, after in zip(start, loop.run.model.parameters(), strict=True):
        assert torch.equal(before, after)


def test_a_decision_loops_failures_separated_by_healthy_decisions_never_raise():
    config = ControllerConfig(interval_steps=3, max_rollbacks_in_a_row=1)
    loop = DecisionLoop(TrainingRun("synthetic", seed=0, device="cpu"), config)
    for decision in range(7):
        loop.train_interval()
        if decision % 2:
            with torch.no_grad():  # decisions 1, 3 and 5 see a diverged model
                next(loop.run.model.parameters()).fill_(float("inf"))
        signals = loop.snapshot(progress=0.1 * decision)
        assert signals.extra["rolled_back"] is bool(decision % 2) and math.isfinite(signals.probe_loss)
    assert loop.guard is not None and loop.guard.rollbacks == 3


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "max_rollbacks_in_a_row=0 must be >= 1"),
        (-1, "max_rollbacks_in_a_row=-1 must be >= 1"),
        (1.5, "max_rollbacks_in_a_row=1.5 must be a whole number >= 1; got float"),
        (True, "max_rollbacks_in_a_row=True must be a whole number >= 1; got bool"),
    ],
)
def test_the_bound_is_a_whole_number_at_least_1(value, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        ControllerConfig(max_rollbacks_in_a_row=value)


class _Alternate:
    """fp32 everywhere, the LR rung 0.75 / 1.0 in turn: every decision is a change, and takes a copy."""

    name = "alternate"

    def __init__(self):
        self.decisions = 0

    def predict(self, observation, state=None, episode_start=None, deterministic=False):
        self.decisions += 1
        return np.array([0, 0, 0, 0, 1 if self.decisions % 2 else 2, 1]), None


def test_stopping_after_a_change_leaves_the_last_confirmed_state_not_the_changes_copy():
    """A change after a mixed interval copies its blown-up weights (finite, every loss from them inf): that copy never
    trained. Where the bound's failure followed such a change, the model was left on it (loss inf), and a caller who
    caught the error and lowered the LR failed again at once. Now the last confirmed state is left, and trains on."""
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1e18)
    start = model.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=500.0)
    ctl = Controller(model, optimizer, policy=_Alternate(), config=ControllerConfig(interval_steps=4,
                                                                                    max_interval_factor=1))  # fmt: skip
    data = (torch.ones(400, 1), torch.zeros(400, 1))
    with pytest.raises(NoGoodStateError, match="after 4 rollbacks in a row"):
        for x, _ in ctl.loader(data, batch_size=4, epochs=1):
            ctl.step((model(x) ** 2).mean())
    assert torch.equal(model.weight, start) and ctl.rollbacks == 4
    for group in optimizer.param_groups:
        group["lr"] = 0.1  # the error's advice
    for x, _ in ctl.loader(data, batch_size=4, epochs=1):
        ctl.step((model(x) ** 2).mean())
    assert ctl.steps >= 100 and 0 < model.weight.abs().item() < 1e18  # trained on, from the confirmed state
    ctl.close()


def test_failures_between_which_newer_states_train_never_raise():
    """One skipped step in every interval and every 4th interval all non-finite, with a change (and its copy) at each
    decision: each rollback restores a newer state that then trains on (its copy confirmed). The count ends there:
    the 5th rollback raised 'the state they restore keeps failing' before."""
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    ctl = Controller(model, torch.optim.SGD(model.parameters(), lr=0.05), policy=_Alternate(),
                     config=ControllerConfig(interval_steps=4, max_interval_factor=1))  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4096, 8, generator=generator)
    y = x @ torch.randn(8, 1, generator=generator)
    restored = []
    restore = ctl.guard.restore

    def spy(*args, **kwargs):
        done = restore(*args, **kwargs)
        restored.append(model.weight.detach().clone())
        return done

    ctl.guard.restore = spy
    for xb, yb in ctl.loader((x, y), batch_size=16, epochs=4):
        interval, position = divmod(ctl.steps, 4)
        loss = nn.functional.mse_loss(model(xb), yb)
        ctl.step(loss * float("nan") if position == 0 or interval % 4 == 3 else loss)
        if ctl.steps >= 200:
            break
    assert ctl.steps == 200 and ctl.rollbacks == len(restored) >= 10
    assert len({tuple(w.flatten().tolist()) for w in restored}) == len(restored)  # a newer state each time
    ctl.close()

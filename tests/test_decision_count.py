"""``Controller.decision_count`` counts every decision, while ``Controller.decisions`` keeps the latest reports only."""

import pytest
import torch
from torch import nn

import triaccel_rl as ta
from triaccel_rl import controller as controller_module
from triaccel_rl.config import ControllerConfig

DATA = (torch.randn(80, 8, generator=torch.Generator().manual_seed(0)), torch.arange(80) % 3)  # 10 steps an epoch


def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, ta.Controller(model, optimizer, policy="heuristic", config=ControllerConfig(interval_steps=1))


def train(model, ctl, steps):
    """``steps`` steps of two epochs over DATA; returns the latest report after each step."""
    latest = []
    for step, (x, y) in enumerate(ctl.loader(DATA, batch_size=8, epochs=2), start=1):
        with ctl.autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        ctl.step(loss)
        latest.append(ctl.decisions[-1])
        if step == steps:
            break
    return latest


@pytest.fixture
def three_kept(monkeypatch):
    monkeypatch.setattr(controller_module, "DECISIONS_KEPT", 3)


def test_every_decision_is_counted_past_the_kept_reports(three_kept):
    model, ctl = build()
    assert ctl.decision_count == 0
    latest = train(model, ctl, 10)  # a decision every step
    assert ctl.steps == ctl.decision_count == 10
    assert len(ctl.decisions) == 3 and list(ctl.decisions) == latest[-3:]
    assert len({id(report) for report in latest}) == 10  # a new report at each step: ten decisions
    with pytest.raises(AttributeError):
        ctl.decision_count = 0  # read-only
    ctl.close()
    assert ctl.decision_count == 10


def test_a_resume_counts_the_decisions_made_since_the_controller_was_built(three_kept):
    model, ctl = build()
    train(model, ctl, 5)
    model_state, state = model.state_dict(), ctl.state_dict()
    ctl.close()
    model, resumed = build()
    model.load_state_dict(model_state)
    resumed.load_state_dict(state)
    assert resumed.steps == 5 and resumed.decision_count == 0 and len(resumed.decisions) == 0
    train(model, resumed, 4)
    assert resumed.steps == 9 and resumed.decision_count == 4 and len(resumed.decisions) == 3

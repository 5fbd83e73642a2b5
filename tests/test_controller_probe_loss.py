"""The probe batch's loss in a user's loop: with ``probe=``, each decision reads the loss on it, as ``compare`` does."""

import logging
import math

import pytest
import torch
from torch import nn

import triaccel_rl as ta
from triaccel_rl.config import ControllerConfig
from triaccel_rl.signals import SignalConfig

DATA = (torch.randn(96, 8, generator=torch.Generator().manual_seed(0)), torch.arange(96) % 3)  # 6 steps an epoch
PROBE = (torch.randn(32, 8, generator=torch.Generator().manual_seed(1)), torch.arange(32) % 3)
CHEAP = SignalConfig(mode="cheap")  # no estimator rounds: the probe's loss alone


class Net(nn.Module):
    """Batch norm (train-mode statistics, running ones updated) and dropout (random masks): what the probe must
    leave as it found them."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.25), nn.Linear(16, 3))

    def forward(self, x):
        return self.body(x)


def run(probe, policy="fp32", on_decision=None, signals=CHEAP, prepare=None):
    """Two epochs in a user's loop; ``on_decision(model, ctl)`` after each decision; ``prepare(ctl)`` before."""
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = ControllerConfig(interval_steps=2, signals=signals)
    loss_fn = nn.functional.cross_entropy if probe is not None else None
    ctl = ta.Controller(model, optimizer, policy=policy, config=config, probe=probe, loss_fn=loss_fn)
    if prepare is not None:
        prepare(ctl)
    for x, y in ctl.loader(DATA, batch_size=16, epochs=2):
        with ctl.autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        decisions = len(ctl.decisions)
        ctl.step(loss)
        if on_decision is not None and len(ctl.decisions) > decisions:
            on_decision(model, ctl)
    return model, ctl


def test_each_decision_reads_the_probe_batchs_loss_on_the_weights_it_decides_on():
    """The value a hand-written forward gets from the model as it stands at the decision: batch norm on the probe's
    own statistics (train mode, as the model trains), dropout held (a deterministic function of the weights, as
    ``TrainingRun.probe_loss``'s)."""
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = ControllerConfig(interval_steps=2, signals=CHEAP)
    ctl = ta.Controller(
        model, optimizer, policy="fp32", config=config, probe=PROBE, loss_fn=nn.functional.cross_entropy
    )
    measured, expected = ctl._probe_loss, []

    def probe_loss_and_reference():
        buffers = [b.clone() for b in model.buffers()]
        dropout = model.body[3]
        dropout.eval()
        with torch.no_grad():
            expected.append(float(nn.functional.cross_entropy(model(PROBE[0]), PROBE[1])))
        dropout.train()
        for buffer, saved in zip(model.buffers(), buffers, strict=True):
            buffer.copy_(saved)  # the hand-run forward updated the running statistics: put back
        return measured()

    ctl._probe_loss = probe_loss_and_reference
    read = []
    for x, y in ctl.loader(DATA, batch_size=16, epochs=2):
        with ctl.autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        decisions = len(ctl.decisions)
        ctl.step(loss)
        if len(ctl.decisions) > decisions:
            read.append(ctl.signals.probe_loss)
    assert len(expected) == len(read) == 6
    assert read == expected  # the same forward, bit for bit
    assert read[-1] != ctl.collector.loss_ema


def test_without_a_probe_the_decisions_read_the_smoothed_training_loss():
    read = []
    run(None, on_decision=lambda model, ctl: read.append((ctl.signals.probe_loss, ctl.collector.loss_ema)))
    assert len(read) == 6 and all(probe == ema for probe, ema in read)


def test_the_probe_loss_leaves_the_weights_the_statistics_and_the_random_streams_alone():
    """With a static policy (its decisions read no signal) a run with a probe trains bit for bit as one without:
    batch-norm running statistics frozen for the probe's forward, dropout's masks drawn on a fork."""
    trained = []
    for probe in (PROBE, None):
        model, ctl = run(probe)
        assert len(ctl.decisions) == 6
        trained.append([t.detach().clone() for t in (*model.parameters(), *model.buffers())] + [torch.rand(3)])
    assert all(torch.equal(a, b) for a, b in zip(*trained, strict=True))


def test_the_heuristic_reads_the_probe_loss_trend():
    """Its loss trend is the probe loss's relative change between decisions."""
    losses, trends = [], []

    def record(model, ctl):
        losses.append(ctl.signals.probe_loss)
        trends.append(ctl.signals.loss_trend)

    run(PROBE, policy="heuristic", on_decision=record)
    assert len(losses) == 6
    for previous, now, trend in zip(losses, losses[1:], trends[1:], strict=False):
        assert trend == pytest.approx((now - previous) / previous, rel=1e-6)


def test_a_probe_loss_out_of_memory_falls_back_to_the_smoothed_loss_and_training_goes_on(monkeypatch, caplog):
    calls, read = [], []

    def loss_or_oom(outputs, targets):
        calls.append(len(targets))
        if len(calls) == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return nn.functional.cross_entropy(outputs, targets)

    def oom_at_the_second(ctl):
        ctl._probe = (*ctl._probe[:2], loss_or_oom)

    with caplog.at_level(logging.WARNING, logger="triaccel_rl"):
        run(
            PROBE,
            prepare=oom_at_the_second,
            on_decision=lambda model, ctl: read.append((ctl.signals.probe_loss, ctl.collector.loss_ema)),
        )
    assert calls == [32, 32] and len(read) == 6
    assert "the probe batch's loss ran out of memory" in caplog.text
    assert read[0][0] != read[0][1] and all(probe == ema for probe, ema in read[1:])
    assert all(math.isfinite(probe) for probe, _ in read)

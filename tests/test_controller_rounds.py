"""Estimator rounds in a user's own loop: ``Controller(..., probe=(inputs, targets), loss_fn=...)``.

The rounds (Hutchinson curvature, micro-batch gradient noise) ran only in ``compare``'s runs until 2026-12-06: a
user's loop has no held-out probe batch, so the heuristic's rules that wait for a measured value stayed still there.
"""

import io
import logging
import random
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import triaccel_rl as ta
from triaccel_rl.config import ControllerConfig
from triaccel_rl.signals import SignalConfig

DATA = (torch.randn(96, 8, generator=torch.Generator().manual_seed(0)), torch.arange(96) % 3)  # 6 steps an epoch
PROBE = (torch.randn(32, 8, generator=torch.Generator().manual_seed(1)), torch.arange(32) % 3)
# A round every 4 steps whatever it costs (the adaptive schedule prices rounds by the clock), no warm-up round.
ROUNDS = SignalConfig(schedule="fixed", fixed_interval_steps=4, warmup_round=False)


def build(policy="heuristic", probe=PROBE, signals=ROUNDS, snapshot_every=1):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    config = ControllerConfig(interval_steps=2, signals=signals, snapshot_every=snapshot_every)
    loss_fn = nn.functional.cross_entropy if probe is not None else None
    return model, ta.Controller(model, optimizer, policy=policy, config=config, probe=probe, loss_fn=loss_fn)


def static_with_rounds(model, probe, loss_fn):
    """An fp32 static policy (its decisions read no signal) over SGD at LR 0.1, rounds every 4 steps on ``probe``."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = ControllerConfig(interval_steps=2, signals=ROUNDS)
    return ta.Controller(model, optimizer, policy="fp32", config=config, probe=probe, loss_fn=loss_fn)


def train(model, ctl, epochs=4, stop_after=None, on_stop=None, loss_at=None):
    """Trains through ``ctl.loader``; ``on_stop()`` after ``stop_after`` steps; ``loss_at(step, loss)`` may edit it."""
    steps = 0
    for x, y in ctl.loader(DATA, batch_size=16, epochs=epochs):
        with ctl.autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        if loss_at is not None:
            loss = loss_at(steps, loss)
        ctl.step(loss)
        steps += 1
        if steps == stop_after:
            on_stop()
    return steps


def checkpoint(model, ctl):
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "controller": ctl.state_dict()}, buffer)
    buffer.seek(0)
    return buffer


def test_the_rounds_measure_the_exact_hessian_trace_in_a_users_loop():
    """A bias-free linear layer under the mean squared error has the Hessian ``2 / (N k) * I_k (x) sum_n x_n x_n^T``
    whatever its weights; with one-hot probe inputs it is diagonal, so Hutchinson's estimate is exact: the trace is
    ``2 / N * sum_n |x_n|^2`` = 2 / 4 * (1 + 4 + 9 + 16) = 15 over 12 weights. Without a probe the curvature is the
    cheap tier's (squared gradients), as before."""
    inputs = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    probe = (inputs, torch.zeros(4, 3))
    generator = torch.Generator().manual_seed(0)
    data = (torch.randn(32, 4, generator=generator), torch.randn(32, 3, generator=generator))
    signals = SignalConfig(schedule="fixed", fixed_interval_steps=2, warmup_round=False, hutchinson_batch_size=4)
    for with_probe in (True, False):
        torch.manual_seed(0)
        model = nn.Linear(4, 3, bias=False)
        ctl = ta.Controller(
            model,
            torch.optim.SGD(model.parameters(), lr=0.05),
            policy="fp32",
            config=ControllerConfig(interval_steps=2, signals=signals),
            probe=probe if with_probe else None,
            loss_fn=nn.functional.mse_loss if with_probe else None,
        )
        for x, y in ctl.loader(data, batch_size=8, epochs=2):
            with ctl.autocast():
                loss = nn.functional.mse_loss(model(x), y)
            ctl.step(loss)
        assert ctl.signals is not None
        if with_probe:
            assert ctl.signals.extra["curvature_source"] == "hutchinson" and ctl.signals.extra["rounds"] == 4
            assert ctl.signals.hessian_trace is not None
            assert ctl.signals.hessian_trace[0] == pytest.approx(15.0, rel=1e-6)
            assert ctl.signals.curvature[0] == pytest.approx(15.0 / 12, rel=1e-6)
        else:
            assert ctl.signals.extra["curvature_source"] == "fisher" and ctl.signals.extra["rounds"] == 0
            assert ctl.signals.curvature[0] != pytest.approx(15.0 / 12, rel=1e-2)


def test_the_rounds_leave_the_training_run_as_it_would_be_without_them():
    """The rounds draw from the probe batch on a fork of the random streams and leave the weights and the optimizer
    alone: with a static policy (whose decisions read no signal) the weights trained are bit-identical with and
    without rounds. Their time is not the cadence's to weigh."""
    trained = []
    for probe in (PROBE, None):
        model, ctl = build(policy="fp32", probe=probe)
        train(model, ctl, epochs=2)
        assert ctl.signals is not None
        assert ctl.signals.extra["rounds"] == (3 if probe is not None else 0)
        # The rounds have their own budget (the scheduler's): the cadence weighs the decisions' other work alone.
        assert ctl.cadence.spent_ms <= ctl.collector.overhead_ms - ctl.collector.estimator_ms
        trained.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*trained, strict=True))


def test_a_run_with_rounds_resumed_mid_interval_decides_and_measures_as_the_uninterrupted_run():
    """Checkpointed 7 steps in and resumed into new objects: the same decisions, the same weights, and the rounds'
    estimates bit-identical to the run never interrupted (the rounds' EMAs, the scheduler's accounts and the
    generators that draw the rounds' sub-batches and probes come back with the checkpoint)."""
    model, ctl = build()
    saved = []
    assert train(model, ctl, stop_after=7, on_stop=lambda: saved.append(checkpoint(model, ctl))) == 24
    assert ctl.signals is not None and ctl.signals.hessian_trace is not None
    decided = [(d.lr_scale, d.batch_size, d.precisions) for d in ctl.decisions]

    model2, ctl2 = build()
    state = torch.load(saved[0], weights_only=True)
    model2.load_state_dict(state["model"])
    ctl2.load_state_dict(state["controller"])
    assert train(model2, ctl2) == 24 - 7
    assert [(d.lr_scale, d.batch_size, d.precisions) for d in ctl2.decisions] == decided[3:]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters(), strict=True))
    assert ctl2.signals is not None and ctl2.signals.hessian_trace is not None
    assert np.array_equal(ctl2.signals.hessian_trace, ctl.signals.hessian_trace)
    assert ctl2.signals.noise_scale == ctl.signals.noise_scale
    assert ctl2.signals.extra["rounds"] == ctl.signals.extra["rounds"] == 6


def test_the_control_without_the_rounds_state_a_resumed_run_measures_otherwise():
    """The control for the test above: the checkpoint's rounds state dropped (as a checkpoint saved before it was),
    the resumed run starts its rounds afresh, and its estimates differ."""
    model, ctl = build()
    saved = []
    train(model, ctl, stop_after=7, on_stop=lambda: saved.append(checkpoint(model, ctl)))
    state = torch.load(saved[0], weights_only=True)
    del state["controller"]["signals"]["collector"]["rounds"]
    model2, ctl2 = build()
    model2.load_state_dict(state["model"])
    ctl2.load_state_dict(state["controller"])
    train(model2, ctl2)
    assert ctl.signals is not None and ctl2.signals is not None
    assert ctl2.signals.extra["rounds"] == 6  # the scheduler's accounts were kept
    assert ctl.signals.hessian_trace is not None and ctl2.signals.hessian_trace is not None
    assert not np.array_equal(ctl2.signals.hessian_trace, ctl.signals.hessian_trace)


def test_a_checkpoint_with_rounds_resumed_without_a_probe_drops_their_estimates_and_says_so(caplog):
    """A controller with no probe batch runs no round: the checkpoint's round estimates, kept, would have posed as
    current for the rest of the run. They are dropped, with a log line, and the signals are the cheap tier's."""
    model, ctl = build()
    saved = []
    train(model, ctl, stop_after=8, on_stop=lambda: saved.append(checkpoint(model, ctl)))
    state = torch.load(saved[0], weights_only=True)
    model2, ctl2 = build(probe=None)
    model2.load_state_dict(state["model"])
    with caplog.at_level(logging.INFO, logger="triaccel_rl"):
        ctl2.load_state_dict(state["controller"])
    assert "estimator-round signals are dropped: this controller has no probe batch" in caplog.text
    assert not ctl2.collector.has_round_estimates
    train(model2, ctl2)
    assert ctl2.signals is not None and ctl2.signals.extra["curvature_source"] == "fisher"


def test_a_rollback_brings_back_the_round_measured_on_the_copys_weights():
    """The shield's copy is taken at an interval's end and the round runs at the decision after it, on the same
    weights: the copy takes that round's estimates with it (``refresh_extra``), so the snapshot after a rollback to it
    reads that round. Decisions every 2 steps, a copy at every healthy one, rounds at steps 2, 8, ...: the copy of step
    2 is confirmed by steps 3-4, steps 5-6 are made non-finite and rolled back to it, and the decision at step 6 (no
    round due) reads the round of step 2. Before, it read the estimates from before that round: none."""
    signals = SignalConfig(schedule="fixed", fixed_interval_steps=6, warmup_round=False)
    model, ctl = build(signals=signals, snapshot_every=1)
    traces = {}

    def loss_at(step, loss):
        if ctl.signals is not None:
            trace = ctl.signals.hessian_trace
            traces.setdefault(ctl.steps, None if trace is None else trace.copy())
        return loss * float("nan") if step in (4, 5) else loss

    train(model, ctl, epochs=2, loss_at=loss_at)
    assert ctl.rollbacks == 1
    assert traces[2] is not None and traces[4] is not None and np.array_equal(traces[4], traces[2])
    assert traces[6] is not None and np.array_equal(traces[6], traces[2])


@pytest.mark.parametrize(
    ("probe", "loss_fn", "error", "message"),
    [
        (PROBE, None, ValueError, "probe was given without loss_fn: the estimator rounds need both"),
        (None, nn.functional.cross_entropy, ValueError, "loss_fn was given without probe"),
        (PROBE, "cross_entropy", TypeError, "loss_fn='cross_entropy' must be a callable"),
        (PROBE[0], nn.functional.cross_entropy, TypeError, "probe must be a pair of tensors"),
        ((PROBE[0], [0, 1]), nn.functional.cross_entropy, TypeError, "probe must be a pair of tensors"),
        ((PROBE[0], PROBE[1][:5]), nn.functional.cross_entropy, ValueError, r"inputs \(32, 8\) and targets \(5,\)"),
        ((PROBE[0][:1], PROBE[1][:1]), nn.functional.cross_entropy, ValueError, "at least 2"),
        (PROBE, lambda out: out.sum(), ValueError, "loss_fn.*failed on two probe samples: TypeError"),
        (PROBE, lambda out, y: out.sum(1), ValueError, "a 0-dim tensor; it returned tensor"),
        (PROBE, lambda out, y: out.sum().reshape(1), ValueError, "a 0-dim tensor; it returned tensor"),
        (PROBE, lambda out, y: out.sum().detach(), ValueError, "has no graph to the model's parameters"),
    ],
)
def test_a_bad_probe_or_loss_fn_is_refused_by_name_before_the_engine_hooks_in(probe, loss_fn, error, message):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(error, match=message):
        ta.Controller(model, optimizer, policy="fp32", probe=probe, loss_fn=loss_fn)
    assert not model._forward_pre_hooks and not optimizer._optimizer_step_pre_hooks  # nothing hooked in


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_a_run_with_rounds_resumes_as_the_uninterrupted_run():
    """On the fused step, with the rounds' probes drawn by a CUDA generator whose state the checkpoint carries: a run
    resumed 7 steps in measures the uninterrupted run's Hessian trace bit for bit. A fixed interval (profile cost
    mode: no speed trial, no cadence stretched by the clock) and a static policy keep the decisions at the same
    steps."""
    probe = tuple(t.cuda() for t in PROBE)
    data = tuple(t.cuda() for t in DATA)

    def run_from(state=None, stop_after=None):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).cuda()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        config = ControllerConfig(interval_steps=2, signals=ROUNDS, cost_mode="profile")
        ctl = ta.Controller(model, optimizer, "bf16", config, probe=probe, loss_fn=nn.functional.cross_entropy)
        assert ctl.engine.fused
        if state is not None:
            model.load_state_dict(state["model"])
            ctl.load_state_dict(state["controller"])
        saved = []
        for x, y in ctl.loader(data, batch_size=16, epochs=4):
            with ctl.autocast():
                loss = nn.functional.cross_entropy(model(x), y)
            ctl.step(loss)
            if ctl.steps == stop_after:
                saved.append(checkpoint(model, ctl))
        return ctl, saved

    ctl, saved = run_from(stop_after=7)
    state = torch.load(saved[0], weights_only=True)
    rounds = state["controller"]["signals"]["collector"]["rounds"]
    assert rounds["device_type"] == "cuda" and rounds["device_generator"] is not None
    resumed, _ = run_from(state)
    assert ctl.signals is not None and resumed.signals is not None and ctl.signals.hessian_trace is not None
    assert resumed.signals.extra["rounds"] == ctl.signals.extra["rounds"] == 6
    assert np.array_equal(resumed.signals.hessian_trace, ctl.signals.hessian_trace)


def _one_hot_loop(model, probe, policy="fp32", lr=0.05, step_inside_autocast=False):
    """Trains ``model`` (4 inputs, 3 outputs) under MSE with rounds on ``probe`` at every decision; returns the
    controller."""
    generator = torch.Generator().manual_seed(0)
    data = (torch.randn(32, 4, generator=generator), torch.randn(32, 3, generator=generator))
    signals = SignalConfig(schedule="fixed", fixed_interval_steps=2, warmup_round=False, hutchinson_batch_size=4)
    ctl = ta.Controller(
        model,
        torch.optim.SGD(model.parameters(), lr=lr),
        policy=policy,
        config=ControllerConfig(interval_steps=2, signals=signals),
        probe=probe,
        loss_fn=nn.functional.mse_loss,
    )
    for x, y in ctl.loader(data, batch_size=8, epochs=2):
        with ctl.autocast():
            loss = nn.functional.mse_loss(model(x), y)
            if step_inside_autocast:
                ctl.step(loss)
        if not step_inside_autocast:
            ctl.step(loss)
    return ctl


ONE_HOT_PROBE = (torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0])), torch.zeros(4, 3))


def test_a_step_inside_autocast_measures_the_rounds_in_fp32_as_one_outside():
    """``ctl.step(loss)`` inside ``with ctl.autocast():`` (one context around the loop body) ran the decision's round
    in the bf16 map; the rounds run in fp32 with the hooks idle wherever the step is called: the same exact trace as
    the step outside (15, see the first test), and the same estimates bit for bit."""
    traces = []
    for inside in (False, True):
        torch.manual_seed(0)
        ctl = _one_hot_loop(nn.Linear(4, 3, bias=False), ONE_HOT_PROBE, policy="bf16", step_inside_autocast=inside)
        assert ctl.signals is not None and ctl.signals.hessian_trace is not None
        traces.append(ctl.signals.hessian_trace)
    assert traces[1][0] == pytest.approx(15.0, rel=1e-6)
    assert np.array_equal(traces[0], traces[1])


def test_a_model_trained_in_eval_mode_is_measured_in_eval_mode():
    """A batch norm frozen in eval mode (fine-tuning; no affine parameters, so the linear layer is the only one) is a
    per-channel affine map: after a bias-free linear layer on
    one-hot inputs the linear layer's Hessian is still diagonal, its trace ``2 / (N k) * sum_c 1 / (var_c + eps) *
    sum_n |x_n|^2``. The rounds put the model in training mode (batch statistics: another function) until
    2026-12-06."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.BatchNorm1d(3, affine=False))
    running_var = torch.tensor([1.0, 4.0, 16.0])
    model[1].running_var.copy_(running_var)
    model.eval()
    ctl = _one_hot_loop(model, ONE_HOT_PROBE, lr=0.0)
    assert not model.training and not model[1].training
    expected = 2 / (4 * 3) * 30 * float((1 / (running_var + model[1].eps)).sum())
    assert ctl.signals is not None and ctl.signals.hessian_trace is not None
    assert ctl.signals.hessian_trace[0] == pytest.approx(expected, rel=1e-5)


def test_a_model_returning_a_tuple_gets_its_rounds():
    """``loss_fn`` is given what the model returns (a tuple here), its tensors in float32: ``.float()`` on the tuple
    refused the probe at construction."""

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Linear(8, 16), nn.Linear(16, 3)

        def forward(self, x):
            h = torch.relu(self.body(x))
            return self.head(h), h.pow(2).mean()

    def loss_fn(outputs, y):
        logits, penalty = outputs
        return nn.functional.cross_entropy(logits, y) + 0.01 * penalty

    torch.manual_seed(0)
    model = TwoHeads()
    ctl = static_with_rounds(model, PROBE, loss_fn)
    for x, y in ctl.loader(DATA, batch_size=16, epochs=1):
        with ctl.autocast():
            ctl.step(loss_fn(model(x), y))
    assert ctl.signals is not None and ctl.signals.extra["curvature_source"] == "hutchinson"


def test_the_probe_check_and_the_rounds_leave_pythons_and_numpys_random_streams_alone():
    """A model drawing from Python's ``random`` and NumPy's global generator in its forward (layer drop): trained with
    rounds and without, the same weights and the same next draws (only torch's streams were forked until
    2026-12-06)."""

    class LayerDrop(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 3)

        def forward(self, x):
            h = torch.relu(self.a(x))
            if random.random() < 0.5 and np.random.rand() < 0.9:  # noqa: NPY002 (a user's model)
                h = h + torch.relu(self.b(h))
            return self.c(h)

    results = []
    for probe in (PROBE, None):
        torch.manual_seed(0)
        random.seed(0)
        np.random.seed(0)  # noqa: NPY002
        model = LayerDrop()
        ctl = static_with_rounds(model, probe, nn.functional.cross_entropy if probe is not None else None)
        train(model, ctl, epochs=1)
        assert ctl.signals is not None and ctl.signals.extra["rounds"] == (2 if probe is not None else 0)
        results.append(([p.detach().clone() for p in model.parameters()], random.random(), np.random.rand()))  # noqa: NPY002
    (with_rounds, *draws), (without, *draws_without) = results
    assert draws == draws_without
    assert all(torch.equal(a, b) for a, b in zip(with_rounds, without, strict=True))


def test_the_probe_is_a_copy_of_the_callers_tensors():
    """Written after the Controller was built (a buffer the loop reuses), the caller's tensors do not change the
    probe (``.to(device)`` on the same device returned them as they were)."""
    inputs, targets = PROBE[0].clone(), PROBE[1].clone()
    _, ctl = build(probe=(inputs, targets))
    inputs.zero_()
    targets.fill_(7)
    assert ctl.collector.source is not None
    assert torch.equal(ctl.collector.source.inputs, PROBE[0]) and torch.equal(ctl.collector.source.targets, PROBE[1])


class _Checkpointed(nn.Module):
    """A block under ``torch.utils.checkpoint``, reentrant or not."""

    def __init__(self, reentrant):
        super().__init__()
        self.reentrant = reentrant
        self.pre, self.block, self.head = (
            nn.Linear(8, 16),
            nn.Sequential(nn.Linear(16, 16), nn.Tanh()),
            nn.Linear(16, 3),
        )

    def forward(self, x):
        h = torch.relu(self.pre(x))
        h = torch.utils.checkpoint.checkpoint(self.block, h, use_reentrant=self.reentrant)
        return self.head(h)


def test_a_model_the_rounds_cannot_differentiate_is_refused_at_construction_by_its_cause():
    """Reentrant activation checkpointing refuses ``torch.autograd.grad``, which the rounds take: every decision raised
    out of ``step()`` after the update. Now the construction's check takes a gradient and a Hessian-vector product on
    two probe samples and names the cause; the non-reentrant form runs its rounds."""
    torch.manual_seed(0)
    model = _Checkpointed(reentrant=True)
    with pytest.raises(ValueError, match="activation checkpointing with use_reentrant=True is the usual cause"):
        ta.Controller(
            model, torch.optim.SGD(model.parameters(), lr=0.1), probe=PROBE, loss_fn=nn.functional.cross_entropy
        )
    model = _Checkpointed(reentrant=False)
    ctl = ta.Controller(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        config=ControllerConfig(interval_steps=2, signals=ROUNDS),
        probe=PROBE,
        loss_fn=nn.functional.cross_entropy,
    )
    train(model, ctl, epochs=1)
    assert ctl.signals is not None and ctl.signals.extra["curvature_source"] == "hutchinson"


def test_the_cost_measurement_does_not_warn_that_a_reentrant_checkpoints_gradients_will_be_none():
    """The cost model's one-sample forward runs under ``no_grad``, where a reentrant checkpoint warns "None of the
    inputs have requires_grad=True. Gradients will be None": about that forward only, read as a fault in training."""
    torch.manual_seed(0)
    model = _Checkpointed(reentrant=True)
    ctl = ta.Controller(model, torch.optim.SGD(model.parameters(), lr=0.1), policy="bf16")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x, y = next(iter(ctl.loader(DATA, batch_size=16)))
        with ctl.autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        ctl.step(loss)
    assert ctl.costs is not None
    assert not [w for w in caught if "None of the inputs have requires_grad" in str(w.message)]


def test_a_round_out_of_memory_stops_the_rounds_and_training_goes_on(monkeypatch, caplog):
    """An out-of-memory error in a round (injected at the second) raised out of ``step()`` after its update: the
    decision was lost, and every later one. Now the rounds stop for the run, with a warning saying what to shrink,
    their estimates are dropped, and the decisions go on from the cheap signals."""
    model, ctl = build()
    calls = []
    real_round = ctl.collector._run_round

    def round_or_oom(plan, source):
        calls.append(plan)
        if len(calls) == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_round(plan, source)

    monkeypatch.setattr(ctl.collector, "_run_round", round_or_oom)
    with caplog.at_level(logging.WARNING, logger="triaccel_rl"):
        assert train(model, ctl, epochs=2) == 12
    assert len(calls) == 2 and len(ctl.decisions) == 6
    assert "an estimator round ran out of memory on the probe batch: the rounds stop for this run" in caplog.text
    assert ctl.collector.source is None and not ctl.collector.has_round_estimates
    assert ctl.signals is not None and ctl.signals.extra["curvature_source"] == "fisher"

"""The decision loop with the signals: rounds at snapshots, determinism, the LR-factor switch, Adam reuse."""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from triaccel_rl.config import ControllerConfig
from triaccel_rl.loop import DecisionLoop
from triaccel_rl.signals import SignalConfig
from triaccel_rl.tasks import Task, get_task, synthetic_data
from triaccel_rl.training import TrainingRun


def make_loop(task: str = "synthetic", seed: int = 0, **task_overrides: object) -> DecisionLoop:
    run = TrainingRun(get_task(task, n_train=1024, **task_overrides), seed=seed, device="cpu", cost_mode="profile")
    return DecisionLoop(run, ControllerConfig(interval_steps=4))


def run_intervals(loop: DecisionLoop, n: int) -> list:
    snapshots = []
    for i in range(n):
        loop.train_interval()
        snapshots.append(loop.snapshot(progress=i / n))
    return snapshots


def test_default_loop_measures_curvature_noise_and_sparsity() -> None:
    loop = make_loop()
    signals = run_intervals(loop, 3)[-1]
    assert signals.extra["curvature_source"] == "hutchinson"
    assert signals.extra["fisher_source"] == "microbatch_rounds"  # SGD keeps no second moment
    assert signals.extra["rounds"] >= 1
    assert signals.hessian_trace is not None and signals.sparsity is not None
    assert signals.noise_scale > 0
    obs = loop.observation()
    assert obs.shape == (43,) and np.all(np.isfinite(obs))
    collector = loop.collector
    assert collector.estimator_ms > 0 and collector.overhead_ms >= collector.estimator_ms
    assert 0 < collector.overhead_ms / collector.train_ms  # what compare reports as overhead_frac
    # The snapshot's (TensorBoard's controller/overhead_frac) is the same share: it was over training plus overhead
    assert signals.overhead_frac == pytest.approx(collector.overhead_ms / collector.train_ms, rel=1e-12)


def test_same_seed_same_signals_in_profile_mode() -> None:
    """Every estimate the rounds feed, not only the curvature (before, a nondeterministic noise scale, trace or
    sparsity would have passed)."""
    first, second = (run_intervals(make_loop(seed=3), 4) for _ in range(2))
    assert first[-1].extra["rounds"] >= 1 and first[-1].hessian_trace is not None
    for a, b in zip(first, second, strict=True):
        for name in ("curvature", "grad_variance", "grad_norm", "snr", "lr_factors", "hessian_trace"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
        assert (a.loss, a.probe_loss, a.noise_scale, a.step_time_ms) == (
            b.loss,
            b.probe_loss,
            b.noise_scale,
            b.step_time_ms,
        )
        assert (a.sparsity is None) == (b.sparsity is None)
        if a.sparsity is not None and b.sparsity is not None:
            np.testing.assert_array_equal(a.sparsity.top10_ratio, b.sparsity.top10_ratio)
            np.testing.assert_array_equal(a.sparsity.small_frac, b.sparsity.small_frac)


def test_lr_factors_off_by_default_and_applied_when_switched_on() -> None:
    loop = make_loop()
    run_intervals(loop, 2)
    assert loop.run.lr_factors.tolist() == [1.0] * loop.run.n_layers
    loop.collector.config = replace(loop.collector.config, lr_factors=True)
    signals = run_intervals(loop, 1)[-1]
    assert signals.lr_factors is not None
    np.testing.assert_array_equal(loop.run.lr_factors, signals.lr_factors)
    assert np.all((signals.lr_factors >= 0.5) & (signals.lr_factors <= 2.0))
    assert not np.all(signals.lr_factors == 1.0)


def test_adamw_second_moment_is_reused_for_sparsity() -> None:
    loop = make_loop(optimizer="adamw", base_lr=1e-3)
    signals = run_intervals(loop, 2)[-1]
    assert signals.extra["fisher_source"] == "optimizer_second_moment"
    assert signals.sparsity is not None


def test_cheap_mode_through_the_loop() -> None:
    loop = make_loop()
    loop.collector.config = SignalConfig.preset("cheap")
    signals = run_intervals(loop, 2)[-1]
    assert signals.extra["curvature_source"] == "fisher" and signals.extra["rounds"] == 0
    assert loop.collector.estimator_ms == 0.0


@pytest.mark.parametrize("n_groups", [1, 4])
def test_observation_finite_with_all_signals(n_groups: int) -> None:
    run = TrainingRun(get_task("synthetic", n_train=1024), seed=0, device="cpu", cost_mode="profile")
    loop = DecisionLoop(run, ControllerConfig(interval_steps=3, n_groups=n_groups))
    run_intervals(loop, 3)
    obs = loop.observation()
    assert obs.shape == (11 + 8 * n_groups,) and np.all(np.isfinite(obs))


def test_loop_passes_progress_and_a_round_too_costly_for_the_run_is_refused() -> None:
    loop = make_loop()
    loop.train_interval()
    # Half the budget used after one 4-step interval: a run of 8 steps, 1% of which pays for no round.
    signals = loop.snapshot(progress=0.5)
    assert signals.extra["rounds_refused_for_budget"] == 1 and signals.extra["rounds"] == 0
    assert signals.extra["curvature_source"] == "fisher" and signals.hessian_trace is None
    assert loop.collector.warmup_ms > 0  # the warm-up measured the cost it was refused on
    assert np.all(np.isfinite(loop.observation()))


def test_the_loop_records_the_per_step_statistics_under_its_configs_observe_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The run sampled under the default SignalConfig's 0.1% whatever ``config.signals.observe_budget_frac`` said
    (None too, "every step recorded"). ``measures_memory`` is forced here to stand in for a GPU in measured mode."""
    monkeypatch.setattr(TrainingRun, "measures_memory", property(lambda self: True))
    monkeypatch.setattr(TrainingRun, "calibrate_memory", lambda self, *args, **kwargs: None)
    run = TrainingRun("synthetic", seed=0, device="cpu")
    assert run.observe_budget_frac == 0.001  # the default SignalConfig's, before a loop drives it
    for configured in (None, 0.005, 0.001):
        DecisionLoop(run, ControllerConfig(signals=SignalConfig(observe_budget_frac=configured)))
        assert run.observe_budget_frac == configured
    monkeypatch.undo()  # a CPU run in measured mode: every step recorded, whatever the config
    cpu = TrainingRun("synthetic", seed=0, device="cpu")
    DecisionLoop(cpu, ControllerConfig(signals=SignalConfig(observe_budget_frac=0.005)))
    assert cpu.observe_budget_frac is None


def test_the_runs_observe_budget_reaches_its_recorder_and_is_checked() -> None:
    run = TrainingRun("synthetic", seed=0, device="cpu")
    run.train_interval(1)  # makes the recorder
    assert run._moments is not None and run._moments.budget_frac is None
    run.observe_budget_frac = 0.005
    assert run._moments.budget_frac == 0.005
    run._moments.every_steps = 8  # as a budget may have set it
    run.observe_budget_frac = None
    assert (run._moments.budget_frac, run._moments.every_steps) == (None, 1)
    for value in (0.0, 1.0, float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match=r"^observe_budget_frac=.* must be a number in \(0, 1\), or None"):
            run.observe_budget_frac = value  # type: ignore[assignment]
    assert run.observe_budget_frac is None


@pytest.mark.parametrize("batch_norm", [True, False])
def test_a_probe_too_small_for_micro_batches_of_two_skips_the_round_only_through_a_batch_norm(
    batch_norm: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """24 training samples leave a probe batch of 3: micro-batches of one sample, which BatchNorm1d in training mode
    refuses ("Expected more than 1 value per channel"), raised out of the snapshot and aborting the loop. Now that round
    is skipped before any pass, counted, given its reason and logged; without a batch norm, per-sample gradients are
    valid and the round runs and is folded, as before."""

    def build() -> nn.Module:
        norm: nn.Module = nn.BatchNorm1d(16) if batch_norm else nn.Identity()
        return nn.Sequential(nn.Linear(32, 16), norm, nn.ReLU(), nn.Linear(16, 10))

    torch.manual_seed(0)
    task = Task("bn1d-mlp", "MLP, BatchNorm1d or not", build, synthetic_data, base_batch_size=4, n_train=24, n_test=16)
    run = TrainingRun(task, device="cpu", seed=0, cost_mode="profile")
    assert len(run.probe_batch[1]) == 3
    loop = DecisionLoop(run, ControllerConfig(interval_steps=2))
    loop.train_interval()
    with caplog.at_level(logging.INFO, logger="triaccel_rl"):
        signals = loop.snapshot(progress=0.0)  # unknown: no round is refused for the run's budget
    report = loop.collector.last_round
    assert report is not None
    if batch_norm:
        assert not report.folded and "batch norm" in report.reason
        assert report.cost.total_ms == 0.0
        # The warm-up round and the first charged round: both skipped; the signals are the cheap tier's.
        assert signals.extra["rounds_skipped"] == 2 and signals.extra["curvature_source"] == "fisher"
        assert signals.hessian_trace is None
        assert sum("signal rounds skipped" in message for message in caplog.messages) == 1  # once, not per round
    else:
        assert report.folded and report.reason == ""
        assert signals.extra["rounds_skipped"] == 0 and signals.extra["curvature_source"] == "hutchinson"
        assert signals.hessian_trace is not None and "signal rounds skipped" not in caplog.text
    assert np.all(np.isfinite(loop.observation()))

"""SignalCollector: rounds folded into snapshots, noise scale end to end, bad input, the device path."""

from __future__ import annotations

import io
import itertools
import logging
import math
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from triaccel_rl.engine import StepEngine
from triaccel_rl.observation import LayerGrouper, ObservationLayout, build_observation
from triaccel_rl.signals import (
    BudgetRefusal,
    DeviceMoments,
    EstimatorSource,
    IntervalMoments,
    RoundCost,
    RoundPlan,
    Schedule,
    SignalCollector,
    SignalConfig,
    gradient_moments,
    hutchinson,
)
from triaccel_rl.types import LayerInfo, Precision, Signals, StepStats

EVERY_STEP = SignalConfig(schedule=Schedule.FIXED, fixed_interval_steps=1, fixed_microbatches=4, fixed_probes=2)


def fake_stats(n_layers: int, *, sq: float = 1.0, loss: float = 1.0, skipped: bool = False) -> StepStats:
    return StepStats(
        loss=loss,
        batch_size=64,
        step_time_ms=10.0,
        modelled_time_ms=10.0,
        memory_bytes=100,
        skipped=skipped,
        grad_sq_sum=np.full(n_layers, sq),
        grad_abs_max=np.ones(n_layers),
        grad_nonfinite=np.zeros(n_layers),
        lr=0.1,
    )


def snapshot(collector: SignalCollector, batch_size: int = 64) -> Signals:
    n = len(collector.layers)
    return collector.snapshot(
        grad_mean_sq_norm=np.full(n, np.nan),
        probe_loss=1.0,
        batch_size=batch_size,
        lr_scale=1.0,
        precisions=[Precision.FP32] * n,
    )


def assert_all_finite(signals: Signals) -> None:
    for name in ("curvature", "grad_variance", "grad_norm", "snr", "lr_factors"):
        values = getattr(signals, name)
        assert np.all(np.isfinite(values)), f"{name} = {values}"
    for name in ("loss", "loss_trend", "probe_loss", "noise_scale", "overhead_frac"):
        assert math.isfinite(getattr(signals, name)), f"{name} = {getattr(signals, name)}"
    if signals.hessian_trace is not None:
        assert np.all(np.isfinite(signals.hessian_trace))
    if signals.sparsity is not None:
        for values in (signals.sparsity.top1_share, signals.sparsity.top10_share, signals.sparsity.small_frac):
            assert np.all((values >= 0) & (values <= 1))


def mlp_collector(
    model: nn.Module, layers: list[list[nn.Parameter]], config: SignalConfig, n_samples: int = 256
) -> tuple[SignalCollector, EstimatorSource]:
    infos = [LayerInfo(f"layer{i}", sum(p.numel() for p in params), True) for i, params in enumerate(layers)]
    collector = SignalCollector(infos, ema_decay=0.9, memory_budget_bytes=1 << 30, config=config)
    generator = torch.Generator().manual_seed(0)
    source = EstimatorSource(
        model=model,
        layer_params=layers,
        loss_fn=nn.functional.cross_entropy,
        inputs=torch.randn(n_samples, 4, generator=generator),
        targets=torch.randint(0, 3, (n_samples,), generator=generator),
    )
    collector.attach(source, seed=0)
    return collector, source


class WithUnused(nn.Module):
    """A Linear-ReLU-Linear whose third Linear is registered but never used in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 8)
        self.second = nn.Linear(8, 3)
        self.unused = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.relu(self.first(x)))

    def layers(self) -> list[list[nn.Parameter]]:
        return [list(self.first.parameters()), list(self.second.parameters()), list(self.unused.parameters())]


# ---------------------------------------------------------------- rounds in snapshots


def test_round_estimates_enter_the_snapshot_with_their_definitions() -> None:
    torch.manual_seed(0)
    model = WithUnused()
    collector, _source = mlp_collector(model, model.layers()[:2], replace(EVERY_STEP, round_ema_decay=0.0))
    collector.observe(fake_stats(2))
    report = collector.maybe_estimate()
    assert report is not None and report.folded and report.measured_ms > 0
    signals = snapshot(collector, batch_size=64)
    assert signals.extra["curvature_source"] == "hutchinson"
    assert signals.extra["fisher_source"] == "microbatch_rounds"
    assert signals.hessian_trace is not None and signals.sparsity is not None and signals.lr_factors is not None
    assert_all_finite(signals)
    # Definitions: curvature = |tr H| / n; variance = tr(Sigma) / (B n); SNR = |G|^2 / (tr(Sigma) / B);
    # noise = sum tr(Sigma) / sum |G|^2 when the round resolved |G|^2, else the round's sample count (a lower
    # bound). With round_ema_decay 0 the folded moments are the last round's own (the rounds' estimators are
    # checked against references in test_signal_estimators).
    np.testing.assert_allclose(signals.curvature, np.abs(signals.hessian_trace) / signals.n_params)
    cov = np.maximum(collector._cov_ema / collector._round_weight, 0.0)
    grad_sq = collector._grad_sq_ema / collector._round_weight
    assert np.all(cov[:2] > 0)  # both layers measured
    np.testing.assert_allclose(signals.grad_variance, cov / (64 * signals.n_params))
    np.testing.assert_allclose(signals.snr, np.maximum(grad_sq, 0.0) / (cov / 64))
    samples = collector._round_samples
    resolved = grad_sq.sum() > cov.sum() / samples
    expected_noise = cov.sum() / grad_sq.sum() if resolved else samples
    assert signals.noise_scale == pytest.approx(expected_noise, rel=1e-12)
    assert collector.estimator_ms > 0 and collector.overhead_ms >= collector.estimator_ms
    # The cheap tier's time (observe, snapshot) is the rest of the collector's own work.
    assert collector.cheap_ms > 0 and abs(collector.overhead_ms - collector.estimator_ms - collector.cheap_ms) < 1e-9


def test_a_round_runs_under_no_grad_and_is_refused_under_inference_mode() -> None:
    """A decision made inside ``torch.no_grad()`` (an evaluation block) once failed: "loss does not depend on any
    trainable parameter". Inference mode cannot give gradients at all: it is named."""

    def collector() -> SignalCollector:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        layers = [list(model[0].parameters()), list(model[2].parameters())]
        infos = [LayerInfo(f"l{i}", sum(p.numel() for p in ps), True) for i, ps in enumerate(layers)]
        made = SignalCollector(infos, 0.9, 1 << 30, SignalConfig(schedule=Schedule.FIXED, fixed_interval_steps=1))
        x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
        made.attach(EstimatorSource(model, layers, nn.functional.cross_entropy, x, y))
        return made

    with torch.no_grad():
        report = collector().maybe_estimate(0.1)
    assert report is not None and report.folded
    refused = collector()
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"torch\.inference_mode\(\) forbids"):
        refused.maybe_estimate(0.1)


def test_round_folding_is_ema_with_bias_correction() -> None:
    torch.manual_seed(0)
    model = WithUnused()
    layers = model.layers()[:2]
    config = replace(EVERY_STEP, round_ema_decay=0.5, warmup_round=False)
    collector, source = mlp_collector(model, layers, config)
    traces = []
    for _ in range(3):
        collector.observe(fake_stats(2))
        collector.maybe_estimate()
        traces.append(collector._trace_ema / collector._round_weight)
    # Reproduce the three rounds' raw traces with the same random streams and fold them by hand.
    replay, _ = mlp_collector(model, layers, config)
    raw = []
    for _ in range(3):
        order = torch.randperm(len(source.inputs), generator=replay._cpu_generator)
        index = order[:128]
        loss = nn.functional.cross_entropy(model(source.inputs[index]), source.targets[index])
        raw.append(hutchinson(loss, layers, 2, generator=replay._device_generator).trace.numpy())
    expected_last = (0.25 * raw[0] * 0.5 + 0.5 * raw[1] * 0.5 + raw[2] * 0.5) / (1 - 0.5**3)
    np.testing.assert_allclose(traces[-1], expected_last, rtol=1e-6)


def test_warmup_round_is_folded_and_charged_where_costs_are_measured() -> None:
    torch.manual_seed(0)
    model = WithUnused()
    collector, _ = mlp_collector(model, model.layers()[:2], replace(EVERY_STEP, round_ema_decay=0.5))
    collector.observe(fake_stats(2))
    report = collector.maybe_estimate()
    assert report is not None
    assert collector.scheduler.rounds == 1 and collector.warmup_ms > 0
    assert collector.estimator_ms == pytest.approx(collector.warmup_ms + report.measured_ms)
    # What the run paid for the rounds, the warm-up included: the later rounds wait until training repays it.
    assert collector.scheduler.charged_round_ms == pytest.approx(collector.warmup_ms + report.cost.total_ms)
    assert collector.scheduler.rounds == 1  # the warm-up counts no round
    np.testing.assert_allclose(collector._round_weight, 1 - 0.5**2)  # both rounds' estimates are kept
    collector.observe(fake_stats(2))
    collector.maybe_estimate()
    assert collector.scheduler.rounds == 2 and collector.estimator_ms > collector.warmup_ms + report.measured_ms


def ema_mean_and_standard_error(values: np.ndarray, decay: float) -> tuple[np.ndarray, np.ndarray]:
    """The bias-corrected EMA of i.i.d. rows ``values[k]`` (oldest first) and its standard error per column.

    Weights ``w_k = (1 - decay) decay^(n - 1 - k) / (1 - decay^n)`` sum to 1; the EMA's variance is
    ``sigma^2 sum w_k^2`` with ``sigma^2`` the rows' sample variance.
    """
    n = len(values)
    weights = (1 - decay) * decay ** np.arange(n - 1, -1, -1) / (1 - decay**n)
    mean = weights @ values
    return mean, np.sqrt(values.var(axis=0, ddof=1) * np.sum(weights**2))


def test_noise_scale_end_to_end_on_linear_regression_within_its_standard_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the collector: rounds of 16 micro-batches of 64 drawn without replacement from a pool of N samples,
    smoothed over rounds (numerator and denominator separately), against the pool's exact moments.

    Per-sample gradients are closed-form, ``g_i = x_i (x_i . w - y_i)``. Drawing ``n = m b`` of the ``N`` without
    replacement, ``b * sum(s2)`` is unbiased for ``T``, the trace of the pool's covariance with ``1 / (N - 1)``, and the
    ``|G|^2`` estimate for ``|G_pool|^2 - T / N``; the Hutchinson trace of the sub-batch loss for the pool's mean
    ``|x_i|^2``. Each is checked within 4 standard errors of the smoothed mean (from the recorded rounds' spread and the
    EMA's weights), and so is ``B_simple`` (delta method, with the two moments' covariance). Before, the comparison
    was with the infinite population's closed form within 15%.
    """
    from triaccel_rl.signals import collector as collector_module

    records: list[tuple[float, float, float]] = []
    real_moments, real_hutchinson = collector_module.gradient_moments, collector_module.hutchinson
    last: list[tuple[float, float]] = []

    def moments_recorded(*args: object, **kwargs: object) -> object:
        moments = real_moments(*args, **kwargs)  # type: ignore[arg-type]
        last.append((float(moments.trace_cov.sum()), float(moments.grad_sq_norm.sum())))
        return moments

    def hutchinson_recorded(*args: object, **kwargs: object) -> object:
        estimate = real_hutchinson(*args, **kwargs)  # type: ignore[arg-type]
        records.append((*last.pop(), float(estimate.trace.sum())))
        return estimate

    monkeypatch.setattr(collector_module, "gradient_moments", moments_recorded)
    monkeypatch.setattr(collector_module, "hutchinson", hutchinson_recorded)
    d, noise_std, pool = 8, 0.5, 16384
    generator = torch.Generator().manual_seed(0)
    w_star = torch.randn(d, generator=generator)
    delta = torch.randn(d, generator=generator)
    delta /= delta.norm()
    model = nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_((w_star + delta)[None])
    x = torch.randn(pool, d, generator=generator)
    y = x @ w_star + noise_std * torch.randn(pool, generator=generator)
    decay = 0.98
    config = SignalConfig(
        schedule=Schedule.FIXED,
        fixed_interval_steps=1,
        fixed_microbatches=16,
        fixed_probes=1,
        micro_batch_size=64,
        hutchinson_batch_size=16,
        round_ema_decay=decay,
    )
    collector = SignalCollector([LayerInfo("linear", d, True)], 0.9, 1 << 30, config)
    collector.attach(
        EstimatorSource(model, [[model.weight]], lambda out, t: 0.5 * (out.squeeze(1) - t).square().mean(), x, y)
    )
    for _ in range(300):
        collector.observe(fake_stats(1))
        collector.maybe_estimate()
    signals = snapshot(collector, batch_size=32)
    assert signals.extra["noise_scale_resolved"] is True and signals.hessian_trace is not None
    assert len(records) == 301  # the warm-up round, folded too, and 300 charged ones
    # The pool's exact moments, in float64.
    xd, yd = x.double(), y.double()
    per_sample = xd * (xd @ model.weight.detach().double()[0] - yd)[:, None]
    trace_cov = float(per_sample.var(0, unbiased=True).sum())
    grad_sq = float(per_sample.mean(0).square().sum()) - trace_cov / pool
    hessian_trace = float(xd.square().sum(1).mean())
    values = np.array(records)
    mean, standard_error = ema_mean_and_standard_error(values, decay)
    # What the snapshot reports is that smoothed mean: B_simple = T / |G|^2, variance T / (B n), trace as is.
    assert signals.noise_scale == pytest.approx(mean[0] / mean[1], rel=1e-5)
    assert signals.grad_variance[0] == pytest.approx(mean[0] / (32 * d), rel=1e-5)
    assert signals.hessian_trace[0] == pytest.approx(mean[2], rel=1e-5)
    for name, got, exact, error in zip(
        ("T", "|G|^2", "tr H"), mean, (trace_cov, grad_sq, hessian_trace), standard_error, strict=True
    ):
        assert 4 * error < 0.2 * exact, f"{name}: 4 standard errors ({4 * error:.3g}) are not a test"
        assert abs(got - exact) <= 4 * error, f"{name}: {got:.4f} vs exact {exact:.4f}, standard error {error:.4f}"
    # B_simple, by the delta method: Var(A / B) = (Var A - 2 R Cov(A, B) + R^2 Var B) / B^2.
    ratio = mean[0] / mean[1]
    covariance = np.cov(values[:, 0], values[:, 1], ddof=1)
    weights_sq = (standard_error[0] ** 2) / covariance[0, 0]
    ratio_error = math.sqrt(
        weights_sq * (covariance[0, 0] - 2 * ratio * covariance[0, 1] + ratio**2 * covariance[1, 1]) / mean[1] ** 2
    )
    exact_ratio = trace_cov / grad_sq
    assert 4 * ratio_error < 0.1 * exact_ratio
    assert abs(ratio - exact_ratio) <= 4 * ratio_error, f"B_simple {ratio:.3f} vs {exact_ratio:.3f} ± {ratio_error:.3f}"


def test_adam_second_moment_feeds_sparsity() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    engine = StepEngine(model, torch.optim.AdamW(model.parameters(), lr=1e-3), torch.device("cpu"))
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    engine.backward_and_step(nn.functional.cross_entropy(model(x), y))
    collector = SignalCollector(engine.layers, 0.9, 1 << 30, EVERY_STEP)
    collector.attach(
        EstimatorSource(model, engine.layer_params, nn.functional.cross_entropy, x, y, engine.second_moment_diagonal)
    )
    collector.observe(fake_stats(2))
    collector.maybe_estimate()
    signals = snapshot(collector)
    assert signals.extra["fisher_source"] == "optimizer_second_moment"
    from triaccel_rl.signals import curvature_sparsity

    expected = curvature_sparsity([d for d in engine.second_moment_diagonal() if d is not None])
    assert signals.sparsity is not None
    np.testing.assert_array_equal(signals.sparsity.top10_share, expected.top10_share)


def test_sparsity_gaps_keep_their_values_and_the_lr_factors_read_the_peak_curvature() -> None:
    """A layer without a diagonal this round keeps its previous sparsity (flat, ratio 1, before any); the LR factors
    are taken from ``curvature * top10_ratio``, the sharpest decile's mean curvature."""
    from triaccel_rl.signals.collector import _sparsity_with_gaps

    sharp = torch.tensor([5.0] + [3.0] * 9)  # mass 32, mean 3.2: the top decile (5) is 1.5625 times the mean
    first = _sparsity_with_gaps([sharp, None, torch.ones(10)], 0.01, None)
    assert first.top10_ratio.tolist() == [1.5625, 1.0, 1.0]
    assert first.top10_share.tolist() == [5 / 32, 0.1, 0.1] and first.small_frac.tolist() == [0.0, 0.0, 0.0]
    later = _sparsity_with_gaps([None, sharp, None], 0.01, first)
    assert later.top10_ratio.tolist() == [1.5625, 1.5625, 1.0]
    collector = SignalCollector(
        [LayerInfo(name, 10, True) for name in "abc"], 0.9, 1 << 20, SignalConfig.preset("cheap")
    )
    collector.observe(fake_stats(3, sq=1.0))  # curvature 1 / 10 for every layer
    collector._sparsity = first  # as a round sets it
    signals = snapshot(collector)
    assert signals.curvature.tolist() == [0.1, 0.1, 0.1] and signals.sparsity is first
    # Peaks [0.15625, 0.1, 0.1], median 0.1: factors sqrt(0.1 / peak) = [0.8, 1, 1] (the mean curvature: all 1).
    assert signals.lr_factors is not None
    np.testing.assert_allclose(signals.lr_factors, [0.8, 1.0, 1.0], rtol=1e-12)


def test_cheap_mode_runs_no_round() -> None:
    torch.manual_seed(0)
    model = WithUnused()
    collector, _ = mlp_collector(model, model.layers()[:2], SignalConfig.preset("cheap"))
    collector.observe(fake_stats(2))
    assert collector.maybe_estimate() is None
    signals = snapshot(collector)
    assert signals.extra["curvature_source"] == "fisher"
    assert signals.hessian_trace is None and signals.sparsity is None
    np.testing.assert_allclose(signals.curvature, 1.0 / signals.n_params)


class TiedLM(nn.Module):
    """An embedding whose weight the output layer shares (a language model's tied head), the head with its own bias."""

    def __init__(self, head_bias: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 16)
        self.mid = nn.Linear(16, 16)
        self.head = nn.Linear(16, 100, bias=head_bias)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mid(self.emb(x))))


@pytest.mark.parametrize("head_bias", [True, False])
def test_a_tied_layers_signals_are_per_element_of_what_it_owns(head_bias: bool) -> None:
    """The head's gradient sums cover its bias alone (the tied weight is the embedding's), but the collector divided
    them by the tied weight's size too: 1,700 elements for 100, its curvature and variance 17x low, so a tied head
    read as the least sensitive layer. A head that owns nothing reads 0, not NaN."""
    from triaccel_rl.controller import Controller

    model = TiedLM(head_bias)
    ctl = Controller(model, torch.optim.SGD(model.parameters(), lr=0.1), policy="fp32", device="cpu")
    owned = [1600, 272, 100 if head_bias else 0]
    assert ctl.engine.layer_param_counts == owned
    assert [info.n_params for info in ctl.engine.layers] == [1600, 272, 1700 if head_bias else 1600]
    np.testing.assert_array_equal(ctl.collector._per_element, np.maximum(owned, 1))
    ctl.close()
    infos = ctl.engine.layers
    collector = SignalCollector(infos, 0.9, 1 << 30, SignalConfig.preset("cheap"), param_counts=owned)
    sq = np.array([3.0, 5.0, 7.0 if head_bias else 0.0])
    collector.observe(replace(fake_stats(3), grad_sq_sum=sq))
    signals = snapshot(collector)
    np.testing.assert_allclose(signals.curvature, sq / np.maximum(owned, 1))  # E|g|^2 per owned element
    # The observation weighs a layer by what it computes with: a head owning nothing still shows its precision.
    np.testing.assert_array_equal(signals.n_params, [info.n_params for info in infos])
    for bad in ([1, 2], [1, 2, -1], [1, 2, 2.5], [1, 2, True]):
        with pytest.raises(ValueError, match=r"param_counts=.* must be 3 whole numbers >= 0, one per layer"):
            SignalCollector(infos, 0.9, 1 << 30, param_counts=bad)


@pytest.mark.parametrize("every_steps", [1, 10, 50])
def test_an_intervals_moments_fold_in_per_optimizer_step_whatever_the_sampling(every_steps: int) -> None:
    """|g|^2 = 1 for 100 steps, then 100 for 100, in two intervals: E|g|^2 by a per-step EMA (decay 0.9), exactly.
    Folded in as the sampled steps alone, one in ``every_steps``, it read 74.4 at every 10th step and 55.7 at every
    50th where every step observed read 100.0: the smoothing hung on the host's cost."""
    collector = SignalCollector([LayerInfo("fc", 1, True)], 0.9, 1 << 20, SignalConfig.preset("cheap"))
    sampled = 100 // every_steps
    for value in (1.0, 100.0):
        moments = IntervalMoments(np.array([value]), np.array([value**0.5]), 1.0, sampled, sampled)
        collector.observe_interval(moments, n_steps=100, train_ms=100.0)
    keep = 0.9**100
    expected = (keep * (1 - keep) * 1.0 + (1 - keep) * 100.0) / (1 - keep * keep)  # bias-corrected EMA
    signals = collector.snapshot(grad_mean_sq_norm=np.array([np.nan]), probe_loss=1.0, batch_size=8, lr_scale=1.0,
                                 precisions=[Precision.FP32])  # fmt: skip
    assert signals.curvature[0] == pytest.approx(expected, rel=1e-12)  # E|g|^2 per element, one element


# ---------------------------------------------------------------- bad input


def test_no_trainable_parameters_is_a_clear_error() -> None:
    model = nn.Linear(3, 2)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        EstimatorSource(model, [list(model.parameters())], nn.functional.mse_loss, torch.ones(4, 3), torch.ones(4, 2))
    with pytest.raises(ValueError, match="no trainable parameters"):
        SignalCollector([], 0.9, 1 << 20)
    with pytest.raises(ValueError, match="no trainable parameters"):
        StepEngine(model, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), torch.device("cpu"))
    loss = (model(torch.ones(2, 3)) ** 2).sum()
    with pytest.raises(
        ValueError, match=r"^loss does not depend on any trainable parameter \(it has no gradient graph\)$"
    ):
        hutchinson(loss, [list(model.parameters())], 1)


def test_non_scalar_loss_is_a_clear_error() -> None:
    model = nn.Linear(3, 2)
    per_sample = model(torch.ones(4, 3)).square().sum(1)
    with pytest.raises(ValueError, match=r"loss must be a scalar tensor .*got \(4,\)"):
        hutchinson(per_sample, [list(model.parameters())], 1)
    with pytest.raises(ValueError, match=r"loss must be a scalar tensor"):
        gradient_moments(lambda x, y: model(x).sum(1), torch.ones(4, 3), torch.ones(4), [list(model.parameters())], 2)
    # Through the collector: a loss_fn without reduction is refused at the first round.
    torch.manual_seed(0)
    net = WithUnused()
    collector, source = mlp_collector(net, net.layers()[:2], EVERY_STEP)
    collector.attach(replace(source, loss_fn=_per_sample_ce))
    collector.observe(fake_stats(2))
    with pytest.raises(ValueError, match="loss must be a scalar tensor"):
        collector.maybe_estimate()


def _per_sample_ce(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(outputs, targets, reduction="none")


def test_non_finite_round_is_skipped_and_nothing_leaks() -> None:
    torch.manual_seed(0)
    model = WithUnused()
    layers = model.layers()[:2]
    collector, _source = mlp_collector(model, layers, EVERY_STEP)
    collector.observe(fake_stats(2))
    assert collector.maybe_estimate().folded  # type: ignore[union-attr]
    before = collector._trace_ema.copy()
    with torch.no_grad():
        model.first.weight[0, 0] = float("nan")
    collector.observe(fake_stats(2, sq=float("nan"), loss=float("nan")))
    report = collector.maybe_estimate()
    assert report is not None and not report.folded and "non-finite" in report.reason
    assert collector.rounds_skipped == 1
    np.testing.assert_array_equal(collector._trace_ema, before)
    signals = snapshot(collector)
    assert_all_finite(signals)
    assert signals.overflow_rate == 0.5  # the NaN step is counted, not averaged in
    grouper = LayerGrouper(signals.controllable, n_groups=2)
    grouper.update(signals)
    obs = build_observation(signals, grouper, 64, ObservationLayout(2))
    assert np.all(np.isfinite(obs))


def test_unused_layer_measures_exact_zero_and_is_reported() -> None:
    torch.manual_seed(0)
    model = WithUnused()
    collector, _ = mlp_collector(model, model.layers(), EVERY_STEP)
    collector.observe(fake_stats(3))
    report = collector.maybe_estimate()
    assert report is not None and report.folded
    signals = snapshot(collector)
    assert_all_finite(signals)
    assert signals.extra["unused_layers"] == ["layer2"]
    assert signals.hessian_trace is not None and signals.hessian_trace[2] == 0.0
    assert signals.curvature[2] == 0.0 and signals.grad_variance[2] == 0.0
    assert signals.lr_factors is not None and signals.lr_factors[2] == 1.0  # no curvature: neutral factor
    assert signals.sparsity is not None and signals.sparsity.small_frac[2] == 1.0  # all-zero diagonal


def test_layer_frozen_after_start_keeps_its_values() -> None:
    torch.manual_seed(0)
    model = WithUnused()
    layers = model.layers()[:2]
    collector, _ = mlp_collector(model, layers, EVERY_STEP)
    collector.observe(fake_stats(2))
    collector.maybe_estimate()
    frozen_trace = float(collector._trace_ema[0] / collector._round_weight[0])
    for p in model.first.parameters():
        p.requires_grad_(False)
    collector.observe(fake_stats(2))
    report = collector.maybe_estimate()
    assert report is not None and report.folded
    signals = snapshot(collector)
    assert_all_finite(signals)
    assert signals.hessian_trace is not None and signals.hessian_trace[0] == pytest.approx(frozen_trace)
    for p in model.parameters():
        p.requires_grad_(False)
    collector.observe(fake_stats(2))
    assert collector.maybe_estimate() is None  # every parameter frozen: documented skip, no error


def test_engine_skips_non_finite_gradients_and_the_collector_counts_them() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    engine = StepEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.device("cpu"))
    collector = SignalCollector(engine.layers, 0.9, 1 << 20, SignalConfig.preset("cheap"))
    stats, skipped = engine.backward_and_step(model(torch.full((2, 3), float("inf"))).sum())
    assert skipped
    collector.observe(fake_stats(1, sq=float(stats.sq_sum[0]), skipped=True))
    signals = snapshot(collector)
    assert_all_finite(signals)
    assert signals.overflow_rate == 1.0


# ---------------------------------------------------------------- device path


def test_device_moments_match_engine_statistics_and_skip_non_finite() -> None:
    """Non-finite steps are left out of the means but counted: ``n_finite_loss`` counts the recorded steps whose loss
    was finite whatever their gradients (the Controller reads ``n_finite_loss == n_recorded`` as fp16's loss-scale
    back-off, not a divergence: counting every row there excused an interval of NaN losses). An interval with no
    finite step has a NaN loss, not 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    engine = StepEngine(model, torch.optim.SGD(model.parameters(), lr=0.01), torch.device("cpu"))
    moments = DeviceMoments(engine.layer_params)
    expected, losses = [], []
    for seed in range(3):
        x = torch.randn(16, 4, generator=torch.Generator().manual_seed(seed))
        loss = model(x).square().mean()
        loss.backward()
        moments.observe(loss)
        expected.append(engine.grad_stats().sq_sum.numpy().astype(np.float64))
        losses.append(loss.item())
        engine.optimizer.zero_grad()
    moments.observe(torch.tensor(float("nan")))  # a non-finite loss
    model[0].weight.grad = torch.full_like(model[0].weight, float("nan"))
    moments.observe(torch.tensor(1.0))  # a finite loss, non-finite gradients
    result = moments.flush()
    assert (result.n_finite, result.n_observed) == (3, 5)
    assert (result.n_recorded, result.n_finite_loss) == (5, 4)
    assert result.loss == pytest.approx(np.mean(losses), rel=1e-6)
    np.testing.assert_allclose(result.sq_norm, np.mean(expected, axis=0), rtol=1e-6)
    np.testing.assert_allclose(result.norm, np.mean(np.sqrt(expected), axis=0), rtol=1e-6)
    assert moments.flush().n_observed == 0  # flushed sums start again
    moments.observe(torch.tensor(float("nan")))
    only_non_finite = moments.flush()
    assert (only_non_finite.n_finite, only_non_finite.n_recorded, only_non_finite.n_finite_loss) == (0, 1, 0)
    assert math.isnan(only_non_finite.loss)


def test_device_moments_lagged_flush_returns_the_previous_interval() -> None:
    model = nn.Linear(3, 2)
    moments = DeviceMoments([[model.weight, model.bias]])
    results = []
    for interval in range(6):  # the two staging buffers and the two device sums are each reused
        model.zero_grad()
        model(torch.ones(1, 3)).sum().backward()
        for _ in range(interval % 2 + 1):  # 1 or 2 steps: sums must restart from zero every interval
            moments.observe(torch.tensor(float(interval)))
        results.append(moments.flush_lagged())
    assert results[0] is None
    assert [r.loss for r in results[1:] if r is not None] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert [r.n_observed for r in results[1:] if r is not None] == [1, 2, 1, 2, 1]
    assert [r.sq_norm[0] for r in results[1:] if r is not None] == [pytest.approx(8.0)] * 5
    assert all(r.recorded_ms > 0 for r in results[1:] if r is not None)  # the interval's own recording time


def test_device_moments_take_an_fp16_gradients_norm_past_fp16s_range() -> None:
    """|g| = 1e5 is finite, but not in fp16 (at most 65504): the norm, taken in the gradient's dtype, was inf, the
    step read as non-finite (n_finite 0) and counted as skipped."""
    param = nn.Parameter(torch.zeros(10_000, dtype=torch.float16))
    param.grad = torch.full((10_000,), 1000.0, dtype=torch.float16)
    moments = DeviceMoments([[param]])
    moments.observe(torch.tensor(1.0))
    result = moments.flush()
    assert (result.n_observed, result.n_finite) == (1, 1)
    assert result.sq_norm[0] == pytest.approx(1e10, rel=1e-4)  # summed in float32


def test_device_moments_record_a_float64_models_norms_in_float64() -> None:
    """A float64 model's observe raised (its norms were asked for in float32, a narrowing torch refuses) and left a
    zero row behind, flushed as a finite step of zero norms and zero loss."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    loss = model(torch.randn(4, 3, dtype=torch.float64)).pow(2).mean()
    loss.backward()
    moments = DeviceMoments([[model.weight], [model.bias]])
    moments.observe(loss)
    result = moments.flush()
    assert (result.n_observed, result.n_finite, result.loss) == (1, 1, loss.item())
    for layer, param in enumerate((model.weight, model.bias)):
        assert param.grad is not None
        norm = torch.linalg.vector_norm(param.grad).item()  # float64, as the rows are
        assert result.norm[layer] == pytest.approx(norm, rel=1e-15)
        assert result.sq_norm[layer] == pytest.approx(norm**2, rel=1e-15)


def test_device_moments_a_call_that_raises_in_its_norms_counts_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The row was taken before the norms: a raise in them left it as a zero row, a finite step of loss 0."""
    model = nn.Linear(3, 2)
    model(torch.ones(1, 3)).sum().backward()  # |grad|^2 = 2 * (3 + 1) = 8
    moments = DeviceMoments([[model.weight, model.bias]], budget_frac=0.5)
    moments.observe(torch.tensor(2.0))
    state = (moments._calls, moments._observed, moments._last_sampled_at, moments._last_sampled_call)

    def failing_norm(*args: object, **kwargs: object) -> None:
        raise RuntimeError("norm failed")

    with monkeypatch.context() as patch:
        patch.setattr(torch, "_foreach_norm", failing_norm)
        with pytest.raises(RuntimeError, match="norm failed"):
            moments.observe(torch.tensor(5.0))
    assert (moments._calls, moments._observed, moments._last_sampled_at, moments._last_sampled_call) == state
    assert moments._tensor_rows is not None and moments._tensor_rows.used == 1
    moments.observe(torch.tensor(4.0))
    result = moments.flush()
    assert (result.n_observed, result.n_finite, result.loss) == (2, 2, 3.0)
    assert result.sq_norm[0] == pytest.approx(8.0)


def test_device_moments_sampling_and_full_buffer() -> None:
    model = nn.Linear(3, 2)
    moments = DeviceMoments([[model.weight, model.bias]], every_steps=2, capacity=2)
    for step in range(7):  # observes steps 0, 2, 4, 6; the buffer of 2 rows is folded when full
        model.zero_grad()
        (float(step + 1) * model(torch.ones(1, 3))).sum().backward()
        moments.observe(torch.tensor(float(step)))
    result = moments.flush()
    assert (result.n_observed, result.n_finite) == (4, 4)
    assert result.loss == pytest.approx((0 + 2 + 4 + 6) / 4)
    # |grad|^2 of weight and bias: (step + 1)^2 * (3 + 1) per output row, 2 rows.
    assert result.sq_norm[0] == pytest.approx(8 * (1 + 9 + 25 + 49) / 4)


def test_device_moments_buffer_grows_and_stops_at_max_rows() -> None:
    model = nn.Linear(3, 2)
    moments = DeviceMoments([[model.weight, model.bias]], capacity=1, max_rows=4)
    model(torch.ones(1, 3)).sum().backward()  # |grad|^2 = 2 * (3 + 1) = 8
    for step in range(6):  # rows 1 -> 2 -> 4; steps 4 and 5 find the buffer at max_rows and are not recorded
        moments.observe(torch.tensor(float(step)))
    result = moments.flush()
    assert (result.n_observed, result.n_finite) == (4, 4)
    assert result.loss == pytest.approx((0 + 1 + 2 + 3) / 4) and result.sq_norm[0] == pytest.approx(8.0)
    moments.observe(torch.tensor(7.0))  # the next interval records again
    assert moments.flush().loss == pytest.approx(7.0)


def test_device_moments_budget_sets_the_sampling_from_measured_costs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each sampled call costs 1 ms of host time and a step 10 ms in all: 1 / (0.02 * 10) -> one step in 5."""
    clock = [0.0]
    monkeypatch.setattr("triaccel_rl.signals.device.time.perf_counter", lambda: clock[0])
    norm = torch._foreach_norm

    def slow_norm(tensors: list[torch.Tensor], *args: object, **kwargs: object) -> tuple[torch.Tensor, ...]:
        clock[0] += 1e-3  # the call's host cost
        return norm(tensors, *args, **kwargs)

    def steps(n: int, step_s: float) -> None:
        for _ in range(n):
            start = clock[0]
            moments.observe(torch.tensor(1.0))
            clock[0] = start + step_s  # the rest of the step

    monkeypatch.setattr(torch, "_foreach_norm", slow_norm)
    model = nn.Linear(3, 2)
    model(torch.ones(1, 3)).sum().backward()
    moments = DeviceMoments([[model.weight, model.bias]], budget_frac=0.02, max_every_steps=8)
    assert moments.every_steps == 1
    steps(10, 10e-3)
    first = moments.flush()
    assert first.n_observed == 10 and first.recorded_ms == pytest.approx(10.0)  # what the budget limits: 1 ms each
    assert moments.every_steps == 5
    clock[0] += 60.0  # a pause in the loop (an evaluation, another job) is not taken for slow steps
    steps(60, 20e-3)  # steps of 20 ms: calls 11, 16, ..., 66 sampled
    second = moments.flush()
    assert second.n_observed == 12 and second.recorded_ms == pytest.approx(12.0)  # the unsampled calls cost nothing
    # The last 16 sampled calls saw steps of 10 ms (4), the pause (1) and 20 ms (11): median 20 ms, 1 / (0.02 * 20).
    assert moments.every_steps == 3
    moments.budget_frac = 1e-4  # 1 ms in 20 ms would need one step in 500: capped
    steps(10, 20e-3)
    assert moments.flush().n_observed == 3  # of calls 71-80: 73, 76 and 79 (one in 3 counts from the first call)
    assert moments.every_steps == 8
    with pytest.raises(ValueError, match=r"budget_frac=1.5 must be in \(0, 1\)"):
        DeviceMoments([[model.weight]], budget_frac=1.5)
    with pytest.raises(ValueError, match="max_rows=2 must be >= capacity=4"):
        DeviceMoments([[model.weight]], capacity=4, max_rows=2)


def test_device_moments_unsampled_call_touches_neither_tensors_nor_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unsampled call only counts: it would raise here if it read the clock or used its arguments."""
    model = nn.Linear(3, 2)
    moments = DeviceMoments([[model.weight, model.bias]], every_steps=3, budget_frac=0.5)
    moments.observe_layers(torch.tensor(2.0), torch.tensor([4.0]))  # the first call is sampled

    def no_clock() -> float:
        raise AssertionError("an unsampled call read the clock")

    monkeypatch.setattr("triaccel_rl.signals.device.time.perf_counter", no_clock)
    unusable = object()  # neither detach() nor shape: any use raises AttributeError
    moments.observe_layers(unusable, unusable)  # type: ignore[arg-type]
    moments.observe(unusable)  # type: ignore[arg-type]
    assert moments.samples_next  # calls 2 and 3 were counted: the 4th is sampled
    result = moments.flush()
    assert (result.n_observed, result.loss, result.sq_norm[0]) == (1, 2.0, 4.0)
    with pytest.raises(ValueError, match=r"layer_sq must be a tensor of shape \(1,\); got \(2,\)"):
        DeviceMoments([[model.weight]]).observe_layers(torch.tensor(1.0), torch.ones(2))


def test_device_moments_a_refused_call_leaves_the_sampling_clock_as_it_was() -> None:
    """A refused call kept its clock reading, and the next sampled call divided by zero calls since it."""
    moments = DeviceMoments([[nn.Linear(3, 2).weight]], budget_frac=0.5)
    with pytest.raises(ValueError, match=r"layer_sq must be a tensor of shape \(1,\); got \(2,\)"):
        moments.observe_layers(torch.tensor(1.0), torch.ones(2))
    moments.observe_layers(torch.tensor(1.0), torch.ones(1))  # sampled (the first counted call)
    moments.observe_layers(torch.tensor(3.0), torch.ones(1))
    result = moments.flush()
    assert (result.n_observed, result.loss) == (2, 2.0)


@pytest.mark.parametrize("call", ["observe", "observe_layers", "observe_layers_shape"])
def test_device_moments_a_refused_call_leaves_no_state_even_with_a_full_clock(
    call: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the fix, a per-sample loss (not one number) was refused only after its call was counted and a row
    taken: the interval's mean loss took a zero (2.0 read as 1.0). And a refused call once the 16 recent step times
    were full pushed the oldest one out for good (the undo only popped what it had added)."""
    clock = [0.0]
    monkeypatch.setattr("triaccel_rl.signals.device.time.perf_counter", lambda: clock[0])
    model = nn.Linear(3, 2)
    model(torch.ones(1, 3)).sum().backward()
    moments = DeviceMoments([[model.weight, model.bias]], budget_frac=0.5)
    for step in range(20):  # more sampled calls than the 16 step times kept, of distinct lengths
        clock[0] += 1e-3 * (step + 1)
        moments.observe_layers(torch.tensor(2.0), torch.ones(1))
    state = (moments._calls, moments._observed, moments._last_sampled_at, moments._last_sampled_call)
    steps = list(moments._recent_steps)
    clock[0] += 1.0
    refused = r"loss must be a one-element tensor .*shape \(4,\)|layer_sq must be a tensor of shape"
    with pytest.raises(ValueError, match=refused):
        if call == "observe":
            moments.observe(torch.ones(4))
        elif call == "observe_layers":
            moments.observe_layers(torch.ones(4), torch.ones(1))
        else:
            moments.observe_layers(torch.tensor(2.0), torch.ones(3))
    assert (moments._calls, moments._observed, moments._last_sampled_at, moments._last_sampled_call) == state
    assert list(moments._recent_steps) == steps
    result = moments.flush()
    assert (result.n_observed, result.n_finite, result.loss) == (20, 20, 2.0)


def test_device_moments_budget_holds_when_intervals_see_one_sampled_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sampled calls alternate 0.5 and 1.5 ms in 10-ms steps, four steps an interval: one sampled call each.

    Sized from each interval's own call, ``every_steps`` would swing between 3 and 8 and the recording would take
    2.7% of the time against a 2% budget; sized from the mean of the recent calls (1 ms) it holds at 5.
    """
    clock = [0.0]
    monkeypatch.setattr("triaccel_rl.signals.device.time.perf_counter", lambda: clock[0])
    costs = itertools.cycle([0.5e-3, 1.5e-3])
    norm = torch._foreach_norm

    def slow_norm(tensors: list[torch.Tensor], *args: object, **kwargs: object) -> tuple[torch.Tensor, ...]:
        clock[0] += next(costs)
        return norm(tensors, *args, **kwargs)

    monkeypatch.setattr(torch, "_foreach_norm", slow_norm)
    model = nn.Linear(3, 2)
    model(torch.ones(1, 3)).sum().backward()
    moments = DeviceMoments([[model.weight, model.bias]], budget_frac=0.02, max_every_steps=64)
    history, recorded_ms = [], 0.0
    for _ in range(40):
        for _ in range(4):
            step_start = clock[0]
            moments.observe(torch.tensor(1.0))
            clock[0] = step_start + 10e-3  # a 10-ms step, the call included
        recorded_ms += moments.flush().recorded_ms
        history.append(moments.every_steps)
    assert history == [5] * 40
    share = recorded_ms / (40 * 4 * 10.0)
    assert share == pytest.approx(0.0215625)  # 2%, plus the first interval's four calls before any cost was known


def test_observe_interval_takes_the_skipped_count_it_is_given() -> None:
    infos = [LayerInfo("a", 10, True)]
    collector = SignalCollector(infos, 0.9, 1 << 20, SignalConfig.preset("cheap"))
    recorded = IntervalMoments(np.full(1, 4.0), np.full(1, 2.0), 2.0, n_finite=2, n_observed=2)  # 2 of 8 recorded
    collector.observe_interval(recorded, n_steps=8, train_ms=80.0, skipped=3)
    assert snapshot(collector).overflow_rate == pytest.approx(3 / 8)
    with pytest.raises(ValueError, match=r"skipped=9 must be a whole number in \[0, n_steps=8\]"):
        collector.observe_interval(recorded, n_steps=8, train_ms=80.0, skipped=9)


@pytest.mark.parametrize(
    ("probe_losses", "trends"),
    [
        ([2.0, 1.0, 1.5], [0.0, -0.5, 0.5]),
        ([-2.0, -1.0, -1.5], [0.0, 0.5, -0.5]),  # a negative loss (a Gaussian NLL): its rise from -2 to -1 is +50%
        ([-0.5, 0.5, 0.0, 1.0], [0.0, 2.0, -1.0, 0.0]),  # across 0; after a loss of exactly 0, unknown
    ],
)
def test_the_loss_trend_is_the_change_relative_to_the_previous_loss_s_size(probe_losses, trends) -> None:
    """A negative previous loss read a trend of 0, a plateau, whatever came next: the heuristic's LR rules saw no rise
    (a review: an NLL's rise from -0.17 to 0.31 went unseen). Clipped to [-1, 1] only in the observation."""
    collector = SignalCollector([LayerInfo("a", 10, True)], 0.9, 1 << 20, SignalConfig.preset("cheap"))
    measured = IntervalMoments(np.full(1, 4.0), np.full(1, 2.0), 2.0, n_finite=4, n_observed=4)
    got = []
    for probe_loss in probe_losses:
        collector.observe_interval(measured, n_steps=4, train_ms=40.0)
        got.append(
            collector.snapshot(
                grad_mean_sq_norm=np.full(1, np.nan),
                probe_loss=probe_loss,
                batch_size=8,
                lr_scale=1.0,
                precisions=[Precision.FP32],
            ).loss_trend
        )
    assert got == trends


def test_an_interval_without_steps_repeats_the_latest_step_time_and_peak() -> None:
    """Before the fix, a snapshot after no step read its time over one step: a 0-ms step, a -100% trend, and a
    peak of 0 bytes (the whole budget free); the scheduler also counted the empty interval as a step."""
    collector = SignalCollector([LayerInfo("a", 10, True)], 0.9, 1 << 20, SignalConfig.preset("cheap"))
    measured = IntervalMoments(np.full(1, 4.0), np.full(1, 2.0), 2.0, n_finite=4, n_observed=4)
    collector.observe_interval(measured, n_steps=4, train_ms=40.0, peak_bytes=500)
    first = snapshot(collector)
    assert (first.step_time_ms, first.step_time_trend, first.memory_bytes) == (10.0, 0.0, 500)
    empty = IntervalMoments(np.zeros(1), np.zeros(1), math.nan, n_finite=0, n_observed=0)
    collector.observe_interval(empty, n_steps=0, train_ms=0.0)
    for signals in (snapshot(collector), snapshot(collector)):  # an empty interval, then no call at all
        assert (signals.step_time_ms, signals.step_time_trend, signals.memory_bytes) == (10.0, 0.0, 500)
        assert signals.overflow_rate == 0.0 and signals.extra["interval_steps"] == 0
    assert collector.scheduler.steps == 4 and collector.n_steps == 4
    collector.observe_interval(measured, n_steps=4, train_ms=80.0, peak_bytes=300)
    last = snapshot(collector)
    assert (last.step_time_ms, last.step_time_trend, last.memory_bytes) == (20.0, 1.0, 300)  # against the 10 ms
    with pytest.raises(ValueError, match="n_steps=-1 must be a whole number >= 0"):
        collector.observe_interval(empty, n_steps=-1, train_ms=0.0)


def test_per_layer_input_of_another_length_is_refused() -> None:
    """Before the fix, numpy broadcast one value to every layer (a statistic of one layer, or of none, read as
    every layer's), and a precision list of the wrong length went into the snapshot as it was."""
    collector = SignalCollector([LayerInfo("a", 10, True), LayerInfo("b", 10, True)], 0.9, 1 << 20)
    with pytest.raises(ValueError, match=r"stats.grad_sq_sum has shape \(1,\); expected \(2,\)"):
        collector.observe(fake_stats(1))
    one_layer = IntervalMoments(np.full(1, 4.0), np.full(1, 2.0), 2.0, n_finite=1, n_observed=1)
    with pytest.raises(ValueError, match=r"moments.sq_norm has shape \(1,\); expected \(2,\)"):
        collector.observe_interval(one_layer, n_steps=1, train_ms=1.0)
    assert collector.n_steps == 0 and collector.scheduler.steps == 0  # refused before anything was counted
    with pytest.raises(ValueError, match=r"grad_mean_sq_norm has shape \(3,\)"):
        collector.snapshot(
            grad_mean_sq_norm=np.ones(3), probe_loss=1.0, batch_size=8, lr_scale=1.0, precisions=[Precision.FP32] * 2
        )
    with pytest.raises(ValueError, match=r"precisions has shape \(1,\)"):
        collector.snapshot(
            grad_mean_sq_norm=np.ones(2), probe_loss=1.0, batch_size=8, lr_scale=1.0, precisions=[Precision.FP32]
        )


def test_observe_interval_equals_per_step_folding_for_constant_values() -> None:
    infos = [LayerInfo("a", 10, True), LayerInfo("b", 20, True)]
    per_step = SignalCollector(infos, 0.9, 1 << 20, SignalConfig.preset("cheap"))
    per_interval = SignalCollector(infos, 0.9, 1 << 20, SignalConfig.preset("cheap"))
    for _ in range(5):
        per_step.observe(fake_stats(2, sq=4.0, loss=2.0))
    per_interval.observe_interval(
        IntervalMoments(np.full(2, 4.0), np.full(2, 2.0), 2.0, n_finite=5, n_observed=5), n_steps=5, train_ms=50.0
    )
    a, b = snapshot(per_step), snapshot(per_interval)
    np.testing.assert_allclose(a.curvature, b.curvature)
    np.testing.assert_allclose(a.grad_norm, b.grad_norm)
    assert a.loss == pytest.approx(b.loss)
    assert per_interval.train_ms == 50.0 and per_interval.n_steps == 5


def test_grad_norm_is_the_bias_corrected_ema_of_the_step_norms() -> None:
    """Norms 2 then 4 (squared 4, 16) at decay 0.9: (0.9 * 0.1 * 2 + 0.1 * 4) / (0.9 * 0.1 + 0.1) = 0.58 / 0.19, the
    mean of the norms, not the root of the mean square (sqrt(1.96 / 0.19) = 3.21)."""
    collector = SignalCollector([LayerInfo("a", 10, True)], 0.9, 1 << 20, SignalConfig.preset("cheap"))
    collector.observe(fake_stats(1, sq=4.0))
    assert snapshot(collector).grad_norm.tolist() == pytest.approx([2.0], rel=1e-12)
    collector.observe(fake_stats(1, sq=16.0))
    collector.observe(fake_stats(1, sq=math.inf))  # not finite: counted as skipped, not averaged in
    assert snapshot(collector).grad_norm.tolist() == pytest.approx([0.58 / 0.19], rel=1e-12)


def test_device_moments_observe_layers_equals_observe() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    engine = StepEngine(model, torch.optim.SGD(model.parameters(), lr=0.01), torch.device("cpu"))
    by_params, by_layers = DeviceMoments(engine.layer_params), DeviceMoments(engine.layer_params, capacity=2)
    for seed in range(5):  # capacity 2: observe_layers folds its buffer twice on the way
        x = torch.randn(16, 4, generator=torch.Generator().manual_seed(seed))
        loss = model(x).square().mean()
        loss.backward()
        by_params.observe(loss)
        by_layers.observe_layers(loss, engine.grad_stats().sq_sum)
        engine.optimizer.zero_grad()
    by_layers.observe_layers(torch.tensor(float("nan")), torch.zeros(2))  # counted, not added
    a, b = by_params.flush(), by_layers.flush()
    assert (b.n_finite, b.n_observed) == (5, 6)
    np.testing.assert_allclose(b.sq_norm, a.sq_norm, rtol=1e-5)
    np.testing.assert_allclose(b.norm, a.norm, rtol=1e-5)
    assert b.loss == pytest.approx(a.loss)
    with pytest.raises(ValueError, match=r"layer_sq must be a tensor of shape \(2,\); got \(3,\)"):
        by_layers.observe_layers(loss, torch.zeros(3))


def test_warmup_key_names_what_one_time_costs_depend_on() -> None:
    from triaccel_rl.signals.collector import _warmup_key
    from triaccel_rl.signals.scheduler import RoundPlan

    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    layer_params = [list(model[0].parameters()), list(model[2].parameters())]

    def key(n_inputs: int, plan: RoundPlan, **config: int) -> tuple[object, ...]:
        source = EstimatorSource(
            model, layer_params, nn.functional.cross_entropy, torch.zeros(n_inputs, 4), torch.zeros(n_inputs).long()
        )
        return _warmup_key(plan, source, SignalConfig(**config))

    base = key(64, RoundPlan(2, 1))
    assert base == key(64, RoundPlan(2, 4))  # more probes: the same shapes
    assert base != key(64, RoundPlan(8, 1))  # smaller micro-batches: new shapes
    assert base != key(64, RoundPlan(2, 1), hutchinson_batch_size=8)
    assert base[0] == "cpu" and base[-2:] == (32, 64)  # micro-batch min(32, 64 // 2), Hutchinson min(128, 64)


def test_the_cheap_noise_scale_is_exact_below_the_batch_and_capped_at_it() -> None:
    """Cheap source: B * (E|g|^2 - |m|^2) / |m|^2 from the optimizer's running mean m, trusted only up to B."""
    collector = SignalCollector([LayerInfo("a", 10, True), LayerInfo("b", 10, True)], 0.9, 1 << 30)
    for _ in range(5):
        collector.observe(fake_stats(2, sq=1.0))  # E|g_l|^2 = 1 per layer (bias-corrected EMA of constants)

    def noise(mean_sq: float, batch: int) -> float:
        signals = collector.snapshot(
            grad_mean_sq_norm=np.full(2, mean_sq), probe_loss=1.0, batch_size=batch, lr_scale=1.0,
            precisions=[Precision.FP32] * 2,
        )  # fmt: skip
        assert signals.extra["curvature_source"] == "fisher" and signals.extra["noise_scale_resolved"] is False
        return signals.noise_scale

    assert noise(0.8, batch=64) == pytest.approx(64 * 0.2 / 0.8)  # 16: below the batch, reported as is
    assert noise(0.01, batch=64) == 64.0  # 6336 uncapped: a lagging running mean must not grow the batch


def test_an_unknown_running_mean_reads_as_an_even_split_not_as_no_noise() -> None:
    """Plain SGD keeps no running mean (NaN): E|g|^2 stood in for |E g|^2, so the cheap tier reported no noise at all
    (variance 0, SNR 1e30, noise scale 0) and the observation a log SNR at its bound and a batch far above the noise
    scale. Now the neutral even split: SNR 1, the noise scale the batch, both the observation's neutral 0."""
    collector = SignalCollector([LayerInfo("a", 40, True), LayerInfo("b", 9, True)], 0.9, 1 << 30)
    for _ in range(5):
        collector.observe(fake_stats(2, sq=2.0))  # E|g_l|^2 = 2 per layer, exactly (bias-corrected EMA of constants)

    def cheap(mean_sq: list[float]) -> Signals:
        return collector.snapshot(
            grad_mean_sq_norm=np.array(mean_sq), probe_loss=1.0, batch_size=32, lr_scale=1.0,
            precisions=[Precision.FP32] * 2,
        )  # fmt: skip

    signals = cheap([math.nan, math.nan])
    assert signals.grad_variance.tolist() == [1.0 / 40, 1.0 / 9]  # half of E|g|^2, per element
    assert signals.snr.tolist() == [1.0, 1.0] and signals.noise_scale == 32.0
    assert signals.extra["grad_mean_unknown_layers"] == ["a", "b"]
    grouper, layout = LayerGrouper(signals.controllable, 2), ObservationLayout(2)
    observation = build_observation(signals, grouper, 32, layout)
    assert observation[layout.globals("log_noise_over_batch")] == 0.0
    assert [observation[layout.group(g, "log_snr")] for g in range(2)] == [0.0, 0.0]
    # One layer known: it is measured as before, the other split evenly.
    mixed = cheap([1.5, math.nan])
    assert mixed.grad_variance.tolist() == [0.5 / 40, 1.0 / 9] and mixed.snr.tolist() == [1.5 / 0.5, 1.0]
    assert mixed.noise_scale == 32 * 1.5 / 2.5 and mixed.extra["grad_mean_unknown_layers"] == ["b"]
    assert cheap([0.5, 1.0]).extra["grad_mean_unknown_layers"] == []


def test_with_nothing_measured_the_cheap_tier_gives_the_neutral_split_not_zero() -> None:
    """An fp16 interval whose every step overflowed folds no statistics (E|g|^2 = 0) and leaves the running means
    unknown: SNR and noise scale 0/0 came out 0, the observation's log_snr and log_noise_over_batch at their floor -6,
    and no layer named unknown (the Controller took the 0 for a measurement). Now the neutral split, as for an
    unknown running mean: SNR 1, the noise scale the batch, every layer named."""
    collector = SignalCollector([LayerInfo("a", 40, True), LayerInfo("b", 9, True)], 0.9, 1 << 30)
    overflowed = replace(
        fake_stats(2, skipped=True), grad_sq_sum=np.full(2, np.inf), grad_abs_max=np.full(2, np.inf),
        grad_nonfinite=np.ones(2),
    )  # fmt: skip
    for _ in range(20):
        collector.observe(overflowed)
    signals = collector.snapshot(
        grad_mean_sq_norm=np.full(2, np.nan), probe_loss=2.0, batch_size=32, lr_scale=1.0,
        precisions=[Precision.FP16] * 2,
    )  # fmt: skip
    assert signals.overflow_rate == 1.0 and signals.curvature.tolist() == [0.0, 0.0]
    assert signals.noise_scale == 32.0 and signals.snr.tolist() == [1.0, 1.0]
    assert signals.extra["grad_mean_unknown_layers"] == ["a", "b"]
    grouper, layout = LayerGrouper(signals.controllable, 2), ObservationLayout(2)
    observation = build_observation(signals, grouper, 32, layout)
    assert observation[layout.globals("log_noise_over_batch")] == 0.0
    assert [observation[layout.group(g, "log_snr")] for g in range(2)] == [0.0, 0.0]


def test_exactly_zero_gradients_read_as_unknown_and_neutral() -> None:
    """E|g|^2 exactly 0 with a known running mean of 0: B_simple and the SNR are 0/0, undefined, so neutral (SNR 1,
    the noise scale the batch, every layer named unknown); a zero layer beside a measured one keeps SNR 1 and adds
    nothing to the measured noise scale, which stays known."""
    collector = SignalCollector([LayerInfo("a", 40, True), LayerInfo("b", 9, True)], 0.9, 1 << 30)

    def cheap(sq: list[float], mean_sq: list[float]) -> Signals:
        collector.observe(replace(fake_stats(2), grad_sq_sum=np.array(sq)))
        return collector.snapshot(
            grad_mean_sq_norm=np.array(mean_sq), probe_loss=1.0, batch_size=32, lr_scale=1.0,
            precisions=[Precision.FP32] * 2,
        )  # fmt: skip

    zero = cheap([0.0, 0.0], [0.0, 0.0])
    assert zero.noise_scale == 32.0 and zero.snr.tolist() == [1.0, 1.0]
    assert zero.extra["grad_mean_unknown_layers"] == ["a", "b"]
    grouper, layout = LayerGrouper(zero.controllable, 2), ObservationLayout(2)
    observation = build_observation(zero, grouper, 32, layout)
    assert observation[layout.globals("log_noise_over_batch")] == 0.0
    assert [observation[layout.group(g, "log_snr")] for g in range(2)] == [0.0, 0.0]
    # One layer measured (the EMA over the two steps: bias-corrected E|g_a|^2 = 2 * 0.1 / 0.19): its split is
    # exact, the zero layer's neutral, and the noise scale, measured, is named known.
    mixed = cheap([4.0, 0.0], [1.5, 0.0])
    sq_a = 0.4 / 0.19
    assert mixed.snr[0] == pytest.approx(1.5 / (sq_a - 1.5)) and mixed.snr[1] == 1.0
    assert mixed.noise_scale == pytest.approx(32 * (sq_a - 1.5) / 1.5) and mixed.noise_scale < 32
    assert mixed.extra["grad_mean_unknown_layers"] == []


# ---------------------------------------------- rounds too costly for the run, costs kept in the process


def modelled_collector(config: SignalConfig) -> SignalCollector:
    """A collector whose rounds are charged from a modelled pass of 1 ms a sample (profile cost mode).

    256 samples: a (2, 1) round costs 2 micro-batches of 32 (64 ms) + (1.5 + 7) passes over 128 (1088 ms).
    """
    torch.manual_seed(0)
    model = WithUnused()
    collector, source = mlp_collector(model, model.layers()[:2], config)
    collector.attach(replace(source, modelled_pass_ms=float), seed=0)
    return collector


ROUND_2_1_MS = 2 * 32.0 + (1.5 + 7.0) * 128.0


def test_warmup_round_predicts_the_first_round_that_then_fits_the_run() -> None:
    collector = modelled_collector(SignalConfig())
    for _ in range(20):
        collector.observe(fake_stats(2))  # 10 ms each: 200 ms charged
    # At progress 0.001 the run is projected at 200 s: 1% of it, 2000 ms, covers the 1152 ms round.
    report = collector.maybe_estimate(progress=0.001)
    assert collector.warmup_ms > 0
    assert report is not None and report.plan.predicted_ms == ROUND_2_1_MS  # predicted from the warm-up
    assert report.cost.total_ms == ROUND_2_1_MS and collector.scheduler.rounds == 1
    assert collector.rounds_refused_for_budget == 0
    # Modelled costs charge the round alone: the warm-up's time is the CPU's, which models no GPU's.
    assert collector.scheduler.charged_round_ms == ROUND_2_1_MS


def test_round_too_costly_for_the_run_is_refused_counted_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    collector = modelled_collector(SignalConfig())
    grouper = LayerGrouper(collector.controllable, 2)
    with caplog.at_level(logging.INFO, logger="triaccel_rl"):
        for progress in (0.25, 0.5):
            for _ in range(20):
                collector.observe(fake_stats(2))
            # 200 ms charged at 0.25, 400 ms at 0.5: the run is projected at 800 ms, 1% of it is 8 ms.
            assert collector.maybe_estimate(progress=progress) is None
    assert collector.scheduler.rounds == 0 and collector.scheduler.charged_round_ms == 0.0
    assert collector.rounds_refused_for_budget == 2
    assert collector.scheduler.last_refusal == BudgetRefusal(ROUND_2_1_MS, 8.0, 0.5)
    messages = [r.getMessage() for r in caplog.records if r.name == "triaccel_rl"]
    assert len(messages) == 1 and "too costly for this run's budget" in messages[0]
    assert "1152.0 ms" in messages[0] and "8.0 ms" in messages[0]
    # The signals the rounds would give stay unknown, as before any round: the cheap tier's, all finite.
    signals = snapshot(collector)
    assert signals.extra["rounds_refused_for_budget"] == 2 and signals.extra["rounds"] == 0
    assert signals.extra["curvature_source"] == "fisher" and signals.hessian_trace is None
    assert_all_finite(signals)
    grouper.update(signals)
    assert np.all(np.isfinite(build_observation(signals, grouper, 64, ObservationLayout(2))))


def test_round_costs_are_kept_only_where_measured_on_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from triaccel_rl.signals import collector as collector_module

    monkeypatch.setattr(collector_module, "_ROUND_COSTS", {})
    collector = modelled_collector(SignalConfig())
    measured, _ = mlp_collector(WithUnused(), WithUnused().layers()[:2], SignalConfig())
    assert collector.source is not None and measured.source is not None
    assert not collector_module._caches_round_costs(collector.source)  # CPU, profile mode
    assert not collector_module._caches_round_costs(measured.source)  # CPU, measured: still deterministic
    for each in (collector, measured):
        each.observe(fake_stats(2))
        assert each.maybe_estimate() is not None
    assert collector_module._ROUND_COSTS == {}


def test_next_run_of_the_same_model_starts_with_the_measured_costs(monkeypatch: pytest.MonkeyPatch) -> None:
    from triaccel_rl.signals import collector as collector_module
    from triaccel_rl.signals.collector import _warmup_key

    # The GPU path on a CPU: the device check says "cached here"; fresh process-wide state.
    monkeypatch.setattr(collector_module, "_caches_round_costs", lambda source: True)
    monkeypatch.setattr(collector_module, "_ROUND_COSTS", {})
    torch.manual_seed(0)
    model = WithUnused()
    first, source = mlp_collector(model, model.layers()[:2], SignalConfig())
    first.observe(fake_stats(2))
    report = first.maybe_estimate()  # progress unknown: borrowed, as before
    assert report is not None
    key = _warmup_key(report.plan, source, first.config)
    assert collector_module._ROUND_COSTS == {key: (report.plan, report.cost)}  # the charged round's, not the warm-up's
    # The next run (a new collector, same model and shapes) knows the cached cost before it runs anything: one
    # over the budget (set here, so the refusal does not hang on this machine's timing) is refused from it alone.
    collector_module._ROUND_COSTS[key] = (report.plan, RoundCost(noise_ms=10.0, hutchinson_ms=30.0, other_ms=10.0))
    second, _ = mlp_collector(model, model.layers()[:2], SignalConfig())
    for _ in range(10):
        second.observe(fake_stats(2))  # 100 ms charged: at progress 1 the budget allows 1 ms
    assert second.maybe_estimate(progress=1.0) is None
    assert second.scheduler.last_refusal == BudgetRefusal(50.0, 1.0, 1.0)
    assert second.scheduler.rounds == 0 and second.rounds_refused_for_budget == 1
    tiny_cost = RoundCost(noise_ms=0.25, hutchinson_ms=0.5, other_ms=0.25)
    # A cached cost that fits is admitted with exactly that prediction.
    collector_module._ROUND_COSTS[key] = (RoundPlan(2, 1), tiny_cost)
    third, _ = mlp_collector(model, model.layers()[:2], SignalConfig())
    for _ in range(10):
        third.observe(fake_stats(2))
    admitted = third.maybe_estimate(progress=1.0)
    assert admitted is not None and admitted.plan.predicted_ms == 1.0
    assert collector_module._ROUND_COSTS[key] == (admitted.plan, admitted.cost)  # then replaced by the measurement


def test_a_profile_mode_run_has_its_warm_up_round_whatever_the_process_warmed_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before the fix a round shape was marked warmed up after any CUDA run's warm-up, profile cost mode included, and
    a later same-seed run in the process skipped its warm-up round: one round fewer folded, other sub-batches and
    probes drawn from the seeded generators, other signals (another episode for the seed). No GPU here: the mark is
    set by hand, as such a run left it."""
    from triaccel_rl.signals import collector as collector_module
    from triaccel_rl.signals.collector import _warmup_key

    monkeypatch.setattr(collector_module, "_WARMED_UP", set())
    monkeypatch.setattr(collector_module, "_ROUND_COSTS", {})

    def run() -> tuple[SignalCollector, Signals]:
        collector = modelled_collector(SignalConfig())
        for _ in range(20):
            collector.observe(fake_stats(2))
        assert collector.maybe_estimate(progress=0.001) is not None
        return collector, snapshot(collector)

    first, signals = run()
    assert first.warmup_ms > 0 and first.source is not None
    assert collector_module._WARMED_UP == set()  # profile mode marks nothing
    key = _warmup_key(RoundPlan(2, 1), first.source, first.config)
    collector_module._WARMED_UP.add(key)  # what a profile-mode run on a GPU left before the fix
    second, again = run()
    assert second.warmup_ms > 0  # the warm-up ran again
    np.testing.assert_array_equal(again.curvature, signals.curvature)
    assert (again.noise_scale, again.extra["rounds"]) == (signals.noise_scale, signals.extra["rounds"])


def test_a_measured_gpu_run_marks_its_round_shape_and_the_next_run_skips_the_warm_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where the costs are measured on a GPU and shared (``_caches_round_costs``), and only there, the one-time costs
    are paid once per process: the warm-up marks the round shape and a later run of the model skips it."""
    from triaccel_rl.signals import collector as collector_module
    from triaccel_rl.signals.collector import _warmup_key

    monkeypatch.setattr(collector_module, "_caches_round_costs", lambda source: True)  # the GPU path on a CPU
    monkeypatch.setattr(collector_module, "_WARMED_UP", set())
    monkeypatch.setattr(collector_module, "_ROUND_COSTS", {})
    torch.manual_seed(0)
    model = WithUnused()
    first, source = mlp_collector(model, model.layers()[:2], SignalConfig())
    first.observe(fake_stats(2))
    report = first.maybe_estimate()
    assert report is not None and first.warmup_ms > 0
    assert collector_module._WARMED_UP == {_warmup_key(report.plan, source, first.config)}
    second, _ = mlp_collector(model, model.layers()[:2], SignalConfig())
    second.observe(fake_stats(2))
    assert second.maybe_estimate() is not None and second.warmup_ms == 0.0


def test_on_a_gpu_the_warm_up_predicts_a_round_from_a_second_pass_without_the_one_time_costs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On an H100 the first round on EfficientNet-B0 took 16.5 s, the next ones 1.15 s each: predicted from the first,
    every round of a run whose budget held several was refused, and no charged round came to correct the prediction.
    Where the costs are measured on a GPU the warm-up now runs two passes, the second predicting the rounds. (The
    first pass's one-time costs stand in a round's cost here, set by hand: no GPU.)"""
    from triaccel_rl.signals import collector as collector_module

    monkeypatch.setattr(collector_module, "_caches_round_costs", lambda source: True)  # the GPU path on a CPU
    monkeypatch.setattr(collector_module, "_WARMED_UP", set())
    monkeypatch.setattr(collector_module, "_ROUND_COSTS", {})
    torch.manual_seed(0)
    model = WithUnused()
    collector, _ = mlp_collector(model, model.layers()[:2], SignalConfig())
    one_time, steady = RoundCost(noise_ms=0.0, hutchinson_ms=1000.0, other_ms=0.0), RoundCost(0.25, 0.5, 0.25)
    costs = [one_time]
    real_round = collector._timed_round

    def timed_round(plan: RoundPlan, source: EstimatorSource) -> Any:
        report = real_round(plan, source)
        costs.append(steady)
        return replace(report, cost=costs[-2], measured_ms=costs[-2].total_ms)

    monkeypatch.setattr(collector, "_timed_round", timed_round)
    for _ in range(10):
        collector.observe(fake_stats(2))  # 100 ms charged, at progress 0.0005: a run of 200 s, 2000 ms of rounds
    report = collector.maybe_estimate(progress=0.0005)
    # The warm-up's two passes (1001 ms) are charged: 999 ms are left, which hold the steady round (1 ms) and would
    # not hold a round predicted from the first pass (1000 ms).
    assert report is not None and report.plan.predicted_ms == 1.0  # predicted from the second pass
    assert len(costs) == 4  # two warm-up passes, then the charged round
    assert collector.scheduler.rounds == 1 and collector.rounds_refused_for_budget == 0
    assert collector.warmup_ms == 1001.0 and collector.scheduler.charged_round_ms == 1002.0


@pytest.mark.parametrize(("n_samples", "n_micro"), [(5, 2), (3, 3)])
def test_a_round_smaller_than_asked_is_charged_at_its_own_size(n_samples: int, n_micro: int) -> None:
    """A source with fewer samples than the plan's micro-batches runs fewer micro-batches, of two samples (one each
    under four samples); the scheduler divided the round's cost by the micro-batches asked for, and its rates came out
    too low."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    layers = [list(model[0].parameters()), list(model[2].parameters())]
    config = SignalConfig(schedule=Schedule.FIXED, fixed_interval_steps=1, fixed_microbatches=8, fixed_probes=2)
    collector, _ = mlp_collector(model, layers, config, n_samples=n_samples)
    collector.observe(fake_stats(2))
    report = collector.maybe_estimate()
    assert report is not None and report.plan.n_microbatches == n_micro  # 8 asked for
    assert collector.scheduler._noise_ms == report.cost.noise_ms / n_micro
    assert collector.scheduler._probe_ms == report.cost.hutchinson_ms / 2


def test_a_round_on_few_samples_through_a_batch_norm_runs_micro_batches_of_two() -> None:
    """24 probe samples and 16 micro-batches: one sample each, which a batch norm in training mode refuses ("Expected
    more than 1 value per channel"), raised out of maybe_estimate; now 12 micro-batches of 2."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    layers = [list(model[0].parameters()), list(model[1].parameters()), list(model[3].parameters())]
    config = SignalConfig(schedule=Schedule.FIXED, fixed_interval_steps=1, fixed_microbatches=16, fixed_probes=2)
    collector, _ = mlp_collector(model, layers, config, n_samples=24)
    collector.observe(fake_stats(3))
    report = collector.maybe_estimate()
    assert report is not None and report.folded and report.plan.n_microbatches == 12


@pytest.mark.parametrize(
    ("state", "skipped"),
    [("training", True), ("model in eval", True), ("frozen in eval", False), ("no running statistics", True)],
)
def test_micro_batches_of_one_sample_are_skipped_only_where_a_batch_norm_uses_batch_statistics(
    state: str, skipped: bool
) -> None:
    """3 samples give micro-batches of one: a batch norm that normalises with the batch's statistics refused them,
    raised out of maybe_estimate; now the round is skipped before any pass, at no cost. The frozen_batch_stats block
    puts a model in eval mode in training mode; one that tracks no running statistics uses batch statistics in either
    mode; one its user froze in eval mode (running statistics) takes per-sample gradients, and its round runs."""
    torch.manual_seed(0)
    norm = nn.BatchNorm1d(8, track_running_stats=state != "no running statistics")
    model = nn.Sequential(nn.Linear(4, 8), norm, nn.ReLU(), nn.Linear(8, 3))
    if state == "model in eval":
        model.eval()
    elif state != "training":
        norm.eval()
    layers = [list(model[0].parameters()), list(model[1].parameters()), list(model[3].parameters())]
    config = SignalConfig(schedule=Schedule.FIXED, fixed_microbatches=3, fixed_probes=1, warmup_round=False)
    collector, _ = mlp_collector(model, layers, config, n_samples=3)
    collector.observe(fake_stats(3))
    report = collector.maybe_estimate()
    assert report is not None and report.plan.n_microbatches == 3
    assert report.folded is not skipped and collector.rounds_skipped == int(skipped)
    if skipped:
        assert report.cost == RoundCost(0.0, 0.0, 0.0) and "batch norm in training mode" in report.reason
    assert snapshot(collector).extra["curvature_source"] == ("fisher" if skipped else "hutchinson")


@pytest.mark.parametrize("norm", [True, False])
def test_a_hutchinson_pass_of_one_sample_is_skipped_only_through_a_batch_norm(norm: bool) -> None:
    """``hutchinson_batch_size=1`` on 64 probe samples: micro-batches of two, but the Hutchinson pass of one sample
    raised in BatchNorm1d out of maybe_estimate; now the round is skipped and says why. Without a batch norm it runs."""
    torch.manual_seed(0)
    middle: nn.Module = nn.BatchNorm1d(8) if norm else nn.Tanh()
    model = nn.Sequential(nn.Linear(4, 8), middle, nn.ReLU(), nn.Linear(8, 3))
    layers = [list(m.parameters()) for m in model if list(m.parameters())]
    config = SignalConfig(
        schedule=Schedule.FIXED, fixed_microbatches=4, fixed_probes=1, warmup_round=False, hutchinson_batch_size=1
    )
    collector, _ = mlp_collector(model, layers, config, n_samples=64)
    collector.observe(fake_stats(len(layers)))
    report = collector.maybe_estimate()
    assert report is not None and report.folded is not norm and collector.rounds_skipped == int(norm)
    if norm:
        assert "a Hutchinson pass of one sample (hutchinson_batch_size=1)" in report.reason


@pytest.mark.parametrize(("n_samples", "n_micro"), [(256, 4), (3, 3)])
def test_micro_batches_of_one_sample_run_as_planned_never_more(n_samples: int, n_micro: int) -> None:
    """``micro_batch_size=1`` made every round take ``n_samples // 2`` micro-batches of two (128 instead of the 4
    planned): the fallback for a probe batch too small for the plan fired on the size itself. Now one sample each, as
    many micro-batches as planned (as there are samples, when fewer)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    config = SignalConfig(schedule=Schedule.FIXED, fixed_microbatches=4, fixed_probes=1, micro_batch_size=1)
    collector, _ = mlp_collector(model, [[model.weight], [model.bias]], replace(config, warmup_round=False), n_samples)
    forwards: list[int] = []
    model.register_forward_hook(lambda module, args, output: forwards.append(len(args[0])))
    collector.observe(fake_stats(2))
    report = collector.maybe_estimate()
    assert report is not None and report.folded and report.plan.n_microbatches == n_micro
    assert forwards == [1] * n_micro + [min(n_samples, 128)]  # the micro-batches, then the Hutchinson sub-batch


def test_a_non_finite_round_fisher_is_not_kept_and_a_frozen_layer_restarts_no_other(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rounds' Fisher diagonal (SGD: no second moment to reuse), smoothed over rounds. Before the fix, (1) a round
    whose diagonal had a non-finite entry while its float64 sums were finite (a float32 overflow) folded it into the
    running mean for good: that round and every later one reported "sparsity not updated"; (2) freezing one layer
    restarted every layer's running mean from zero."""
    from triaccel_rl.signals import collector as collector_module

    real = collector_module.gradient_moments
    rounds: list = []
    poison = [False]

    def recording(*args: object, **kwargs: object) -> object:
        moments = real(*args, **kwargs)
        if poison[0]:
            assert moments.fisher_diagonal is not None
            bad = [f.clone() for f in moments.fisher_diagonal]
            bad[0][0] = float("inf")
            moments = replace(moments, fisher_diagonal=bad)
        rounds.append(moments)
        return moments

    monkeypatch.setattr(collector_module, "gradient_moments", recording)
    torch.manual_seed(0)
    model = WithUnused()
    d = 0.5
    collector, _ = mlp_collector(model, model.layers()[:2], replace(EVERY_STEP, round_ema_decay=d, warmup_round=False))

    def one_round() -> str:
        collector.observe(fake_stats(2))
        report = collector.maybe_estimate()
        assert report is not None and report.folded
        return report.reason

    assert one_round() == ""
    kept = [f.clone() for f in collector._fisher_ema]
    sparsity = collector._sparsity
    poison[0] = True
    assert one_round().startswith("sparsity not updated")
    assert collector._sparsity is sparsity
    for now, before in zip(collector._fisher_ema, kept, strict=True):
        assert torch.equal(now, before)
    poison[0] = False
    assert one_round() == ""  # the next finite round updates the sparsity again
    expected = [
        before.mul(d).add_(new, alpha=1 - d) for before, new in zip(kept, rounds[-1].fisher_diagonal, strict=True)
    ]
    for now, want in zip(collector._fisher_ema, expected, strict=True):
        torch.testing.assert_close(now, want, rtol=0, atol=0)
    # Freezing the first layer: the second folds on from its running mean; the first keeps its own.
    before_freeze = [f.clone() for f in collector._fisher_ema]
    for p in model.first.parameters():
        p.requires_grad_(False)
    assert one_round() == ""
    assert torch.equal(collector._fisher_ema[0], before_freeze[0])
    second = before_freeze[1].mul(d).add_(rounds[-1].fisher_diagonal[1], alpha=1 - d)
    torch.testing.assert_close(collector._fisher_ema[1], second, rtol=0, atol=0)


def _moments_steps(moments: DeviceMoments, model: nn.Linear, steps: range) -> None:
    for step in steps:
        model.zero_grad()
        (float(step + 1) * model(torch.ones(1, 3))).sum().backward()
        layer_sq = torch.stack([model.weight.grad.square().sum(), model.bias.grad.square().sum()])
        moments.observe_layers(torch.tensor(float(step)), layer_sq)


def test_device_moments_resumed_mid_interval_flush_what_the_uninterrupted_ones_do() -> None:
    """Saved after 3 sampled steps of 1 in 2 (steps 0, 2, 4 of 5), loaded into new moments: the interval's rows, its
    call count (the next sampled step is still step 6) and the sampling come back, and the flush is bit-identical."""
    model = nn.Linear(3, 2)
    layers = [[model.weight], [model.bias]]
    moments = DeviceMoments(layers, every_steps=2, capacity=2)
    _moments_steps(moments, model, range(5))
    state = moments.state_dict()
    assert state["layer_rows"].shape == (3, 3) and (state["calls"], state["observed"]) == (5, 3)
    resumed = DeviceMoments(layers, capacity=2)  # every_steps and the rows come from the state
    resumed.load_state_dict(state)
    for each in (moments, resumed):
        _moments_steps(each, model, range(5, 9))
    expected, got = moments.flush(), resumed.flush()
    assert (got.n_observed, got.n_finite, got.loss) == (expected.n_observed, expected.n_finite, expected.loss)
    assert (got.n_observed, got.loss) == (5, (0 + 2 + 4 + 6 + 8) / 5)
    assert np.array_equal(got.sq_norm, expected.sq_norm) and np.array_equal(got.norm, expected.norm)
    with pytest.raises(ValueError, match=r"layer_rows \(3, 3\), not None or a float tensor of shape \(rows, 2\)"):
        DeviceMoments([[model.weight, model.bias]]).load_state_dict(state)  # one layer, not two


def test_a_loaded_collector_snapshots_what_the_saved_one_does() -> None:
    """The cheap tier's EMAs, loss trend and step-time history come back: the next snapshots are identical."""
    layers = [LayerInfo("a", 10, True), LayerInfo("b", 20, True)]
    collector = SignalCollector(layers, ema_decay=0.9, memory_budget_bytes=1 << 20)
    for step in range(5):
        collector.observe(fake_stats(2, sq=1.0 + step, loss=2.0 - 0.1 * step))
    snapshot(collector)
    collector.observe(fake_stats(2, sq=9.0, loss=1.2))  # an open interval, saved too
    resumed = SignalCollector(layers, ema_decay=0.9, memory_budget_bytes=1 << 20)
    resumed.load_state_dict(collector.state_dict())
    for each in (collector, resumed):
        each.observe(fake_stats(2, sq=3.0, loss=1.1))
    expected, got = snapshot(collector), snapshot(resumed)
    for name in ("loss", "loss_trend", "step_time_ms", "step_time_trend", "memory_bytes", "overflow_rate"):
        assert getattr(got, name) == getattr(expected, name), name
    for name in ("curvature", "grad_variance", "grad_norm", "snr"):
        assert np.array_equal(getattr(got, name), getattr(expected, name)), name
    assert got.extra["interval_steps"] == 2
    with pytest.raises(ValueError, match=r"sq_ema \[1\.0, 2\.0, 3\.0\], not a list of 2 numbers"):
        resumed.load_state_dict({**collector.state_dict(), "sq_ema": [1.0, 2.0, 3.0]})


def _round_collector(optimizer: str = "sgd") -> tuple[SignalCollector, nn.Module, StepEngine]:
    """A collector with a source over a small model: SGD keeps no second moment (the rounds' Fisher diagonal), Adam
    does (its own)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    params = model.parameters()
    opt = torch.optim.SGD(params, lr=0.1) if optimizer == "sgd" else torch.optim.Adam(params, lr=0.1)
    engine = StepEngine(model, opt, torch.device("cpu"))
    collector = SignalCollector(engine.layers, ema_decay=0.9, memory_budget_bytes=1 << 20, config=EVERY_STEP)
    x, y = torch.randn(32, 4, generator=torch.Generator().manual_seed(0)), torch.arange(32) % 2
    source = EstimatorSource(
        model, engine.layer_params, nn.functional.cross_entropy, x, y, second_moment=engine.second_moment_diagonal
    )
    collector.attach(source, seed=3)
    return collector, model, engine


def _round_and_snapshot(collector: SignalCollector) -> Signals:
    collector.observe(fake_stats(len(collector.layers)))
    assert collector.maybe_estimate() is not None
    return snapshot(collector)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_collector_that_ran_rounds_resumes_its_rounds_as_the_uninterrupted_one(optimizer: str) -> None:
    """Saved after two rounds (through ``torch.save`` and ``weights_only`` loading), loaded into a new collector on
    the same source: its rounds draw the same sub-batches and probes and fold into the same EMAs, so the next
    snapshots are bit-identical, and so are the scheduler's accounts. Until 2026-12-06 such a collector refused to be
    saved (a Controller ran no rounds)."""
    collector, _, _ = _round_collector(optimizer)
    for _ in range(2):
        _round_and_snapshot(collector)
    buffer = io.BytesIO()
    torch.save(collector.state_dict(), buffer)
    buffer.seek(0)
    resumed, _, _ = _round_collector(optimizer)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.has_round_estimates and resumed.scheduler.rounds == 2
    for _ in range(2):
        expected, got = _round_and_snapshot(collector), _round_and_snapshot(resumed)
        assert got.hessian_trace is not None and expected.hessian_trace is not None
        assert np.array_equal(got.hessian_trace, expected.hessian_trace)
        for name in ("curvature", "grad_variance", "snr", "lr_factors"):
            assert np.array_equal(getattr(got, name), getattr(expected, name)), name
        assert got.noise_scale == expected.noise_scale
        assert got.sparsity is not None and expected.sparsity is not None
        assert np.array_equal(got.sparsity.top10_ratio, expected.sparsity.top10_ratio)
        for key in ("rounds", "rounds_skipped", "fisher_source"):
            assert got.extra[key] == expected.extra[key], key
    counts = ("rounds", "steps", "steps_at_last_round", "charged_train_ms")  # the round costs are measured: they vary
    assert [resumed.scheduler.state_dict()[k] for k in counts] == [collector.scheduler.state_dict()[k] for k in counts]


def test_the_control_a_collector_whose_generators_are_not_resumed_draws_other_rounds() -> None:
    """The control for the test above: the same state with the generators' states of a fresh collector (seeded as at
    attach) draws other sub-batches and probes, so the next round's estimates differ."""
    collector, _, _ = _round_collector()
    for _ in range(2):
        _round_and_snapshot(collector)
    state = collector.state_dict()
    fresh, _, _ = _round_collector()
    state["rounds"] = {**state["rounds"], "cpu_generator": fresh.state_dict()["rounds"]["cpu_generator"]}
    resumed, _, _ = _round_collector()
    resumed.load_state_dict(state)
    expected, got = _round_and_snapshot(collector), _round_and_snapshot(resumed)
    assert got.hessian_trace is not None and expected.hessian_trace is not None
    assert not np.array_equal(got.hessian_trace, expected.hessian_trace)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("rounds", "round_weight"), [0.5, 1.5], r"round_weight \[0\.5, 1\.5\]: each in \[0, 1\]"),
        (("rounds", "unused"), [0, 0], r"unused \[0, 0\], not a list of 2 bools"),
        (("rounds", "trace_ema"), [1.0, math.nan], "trace_ema with a value that is not finite"),
        (("rounds", "fisher_source"), "adam", "fisher_source 'adam': one of"),
        (("rounds", "fisher_ema"), [torch.zeros(2)], "fisher_ema of list: None or a list of 2 floating-point tensors"),
        (
            ("rounds", "cpu_generator"),
            torch.zeros(3),
            r"cpu_generator a tensor of shape \(3,\) and dtype torch\.float32",
        ),
        (
            ("rounds", "cpu_generator"),
            torch.zeros(3, dtype=torch.uint8),
            "a cpu_generator state this generator refuses",
        ),
        (
            ("rounds", "sparsity"),
            {"top1_share": [1.0] * 2},
            "rounds sparsity lacks top10_share, small_frac, top10_ratio",
        ),
        (("rounds", "round_samples"), 0, "round_samples 0 with rounds folded in"),
        (("rounds", "fisher_ema"), [torch.full((40,), math.nan), torch.ones(18)], "not 1-D or not finite"),
        (("rounds", "fisher_ema"), [torch.ones(4, 10), torch.ones(18)], "not 1-D or not finite"),
        (
            ("rounds", "sparsity"),
            {"top1_share": [0.5, 0.5], "top10_share": [0.5, 0.5], "small_frac": [0.1, 0.1], "top10_ratio": [0.5, 2.0]},
            r"top10_ratio \[0\.5, 2\.0\]: each in \[1\.0, inf\]",
        ),
        (
            ("rounds", "sparsity"),
            {"top1_share": [0.5, 0.5], "top10_share": [0.5, 0.5], "small_frac": [1.5, 0.1], "top10_ratio": [1.0, 2.0]},
            r"small_frac \[1\.5, 0\.1\]: each in \[0\.0, 1\.0\]",
        ),
        (("scheduler", "rates_measured"), 1, "rates_measured 1, not a bool"),
        (("scheduler", "noise_ms"), math.nan, "the rates are both known"),
        (("scheduler", "steps_at_last_round"), 10**6, r"steps_at_last_round 1000000 > steps 2"),
    ],
)
def test_a_bad_rounds_state_is_refused_by_name_and_leaves_the_collector_as_it_was(path, value, message) -> None:
    collector, _, _ = _round_collector()
    for _ in range(2):
        _round_and_snapshot(collector)
    state = collector.state_dict()
    before = collector.state_dict()
    state[path[0]] = {**state[path[0]], path[1]: value}
    with pytest.raises(ValueError, match=message):
        collector.load_state_dict(state)
    after = collector.state_dict()
    assert after["scheduler"] == before["scheduler"]
    for key in ("trace_ema", "round_weight", "unused", "round_samples", "fisher_source"):
        assert after["rounds"][key] == before["rounds"][key], key
    assert torch.equal(after["rounds"]["cpu_generator"], before["rounds"]["cpu_generator"])


def test_a_loaded_fisher_diagonal_is_float32_on_the_rounds_device() -> None:
    """A Fisher diagonal saved in float16 (or on another device: ``torch.load(map_location=...)``) is loaded as the
    rounds fold it, float32 on their device; it stayed float16 for good, and another device's raised at the next
    round."""
    collector, _, _ = _round_collector()
    _round_and_snapshot(collector)
    state = collector.state_dict()
    fisher = state["rounds"]["fisher_ema"]
    assert fisher is not None
    state["rounds"] = {**state["rounds"], "fisher_ema": [t.half() for t in fisher]}
    resumed, _, _ = _round_collector()
    resumed.load_state_dict(state)
    loaded = resumed.state_dict()["rounds"]["fisher_ema"]
    assert [t.dtype for t in loaded] == [torch.float32] * len(fisher)
    assert all(torch.equal(a, b.half().float()) for a, b in zip(loaded, fisher, strict=True))
    _round_and_snapshot(resumed)


def test_a_state_saved_before_the_rounds_were_resumes_the_rounds_afresh() -> None:
    """A state of before 2026-12-06 (no ``"scheduler"`` or ``"rounds"``) loads: no round estimates, and the scheduler's
    accounts are the steps and training time the state holds, so the first round is planned as in the saved run."""
    collector, _, _ = _round_collector()
    for _ in range(3):
        collector.observe(fake_stats(len(collector.layers)))
    state = collector.state_dict()
    del state["scheduler"], state["rounds"]
    resumed, _, _ = _round_collector()
    _round_and_snapshot(resumed)  # rounds it had are dropped by the load
    resumed.load_state_dict(state)
    assert not resumed.has_round_estimates and resumed.estimator_ms == 0.0
    assert (resumed.scheduler.steps, resumed.scheduler.charged_train_ms, resumed.scheduler.rounds) == (3, 30.0, 0)
    assert snapshot(resumed).extra["curvature_source"] == "fisher"


def test_a_broken_time_reading_or_progress_leaves_the_snapshot_finite() -> None:
    """One NaN step time made overhead_frac NaN in every later snapshot (the collector promises finite ones); a NaN
    progress went through np.clip as it was."""
    layers = [LayerInfo("a", 10, True)]
    collector = SignalCollector(layers, ema_decay=0.9, memory_budget_bytes=1 << 20)
    collector.observe(replace(fake_stats(1), step_time_ms=math.nan, modelled_time_ms=math.nan))
    collector.observe(fake_stats(1))
    n = len(layers)
    signals = collector.snapshot(grad_mean_sq_norm=np.full(n, np.nan), probe_loss=1.0, batch_size=64, lr_scale=1.0,
                                 precisions=[Precision.FP32] * n, progress=math.nan)  # fmt: skip
    assert math.isfinite(signals.overhead_frac) and signals.progress == 0.0
    assert signals.step_time_ms == 5.0  # the readable 10 ms over the interval's 2 steps
    assert math.isfinite(snapshot(collector).overhead_frac)


def test_a_round_leaves_the_training_runs_random_stream_where_it_was() -> None:
    """A model's own randomness in the round's forwards (RReLU's slopes here; stochastic depth, ``F.dropout``) drew
    from the global generator: later dropout masks hung on whether a round ran."""

    class Randomised(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.second = nn.Linear(4, 8), nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.first(x)
            return self.second(h * torch.rand_like(h) if self.training else h)  # the model's own draw

    torch.manual_seed(0)
    model = Randomised()
    layers = [list(model.first.parameters()), list(model.second.parameters())]
    collector, _source = mlp_collector(model, layers, EVERY_STEP)
    collector.observe(fake_stats(2))
    state = torch.get_rng_state()
    report = collector.maybe_estimate()
    assert report is not None and report.folded
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"every_steps": 2.5}, "every_steps=2.5 must be a whole number >= 1"),  # sampled 1 call in 5
        ({"every_steps": True}, "every_steps=True must be a whole number >= 1"),
        ({"capacity": 1.5}, "capacity=1.5 must be a whole number >= 1"),  # a TypeError at the first observe()
        ({"max_every_steps": 0.5}, "max_every_steps=0.5 must be a whole number >= 1"),
    ],
)
def test_device_moments_refuse_counts_that_are_not_whole(arguments: dict[str, object], message: str) -> None:
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=message):
        DeviceMoments([[model.weight, model.bias]], **arguments)  # type: ignore[arg-type]


def test_an_interval_of_a_fractional_step_count_is_refused() -> None:
    """2.5 steps went into the counts, and the state the collector then saved was refused by its own load."""
    model = nn.Linear(3, 2)
    infos = [LayerInfo("layer0", 8, True)]
    collector = SignalCollector(infos, ema_decay=0.9, memory_budget_bytes=1 << 30, config=EVERY_STEP)
    moments = DeviceMoments([[model.weight, model.bias]])
    model(torch.ones(1, 3)).sum().backward()
    moments.observe(torch.tensor(1.0))
    interval = moments.flush()
    with pytest.raises(ValueError, match=r"n_steps=2\.5 must be a whole number >= 0"):
        collector.observe_interval(interval, n_steps=2.5, train_ms=10.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"skipped=0.5 must be a whole number in \[0, n_steps=2\]"):
        collector.observe_interval(interval, n_steps=2, train_ms=10.0, skipped=0.5)  # type: ignore[arg-type]
    assert collector.n_steps == 0
    collector.observe_interval(interval, n_steps=np.int64(2), train_ms=10.0, skipped=1)  # numpy's whole numbers pass
    assert collector.n_steps == 2


def _linear_moments(**kwargs):
    from torch import nn

    from triaccel_rl.signals import DeviceMoments

    torch.manual_seed(0)
    model = nn.Linear(3, 2).to(kwargs.pop("dtype", torch.float32))
    return model, DeviceMoments([[model.weight, model.bias]], **kwargs)


def test_a_refused_observe_layers_call_counts_nothing():
    """A NumPy array passed the shape check and left a zero row, read as a finite step; a list counted the call."""
    _, moments = _linear_moments()
    for bad in (np.array([4.0]), [4.0]):
        with pytest.raises(ValueError, match=r"layer_sq must be a tensor of shape \(1,\); got "):
            moments.observe_layers(torch.tensor(5.0), bad)  # type: ignore[arg-type]
    moments.observe_layers(torch.tensor(5.0), torch.tensor([4.0]))
    result = moments.flush()
    assert (result.n_observed, result.n_finite, result.sq_norm.tolist(), result.loss) == (1, 1, [4.0], 5.0)


def test_device_moments_loaded_into_a_used_instance_restart_their_sampling_clock():
    """The clock of the calls before the load was kept: the next sampled call divided by zero."""
    model, moments = _linear_moments(budget_frac=0.5)

    def step():
        model.zero_grad()
        loss = model(torch.randn(4, 3)).sum()
        loss.backward()
        return loss

    for _ in range(3):
        moments.observe(step())
    saved = moments.state_dict()
    moments.observe(step())
    moments.load_state_dict(saved)
    for _ in range(3):
        moments.observe(step())
    assert all(t > 0 for t in moments._recent_steps)
    assert moments.flush().n_observed == 6


def test_a_lagged_flush_keeps_float64_rows_in_float64():
    """The host buffer was float32: a float64 model's norm of 1e39 became inf and its step was dropped."""
    model, lagged = _linear_moments(dtype=torch.float64)
    _, direct = _linear_moments(dtype=torch.float64)
    direct._params = lagged._params
    results = []
    for scale in (1.0, 1e39):
        model.zero_grad()
        loss = (model(torch.randn(4, 3, dtype=torch.float64)) * scale).sum()
        loss.backward()
        lagged.observe(loss)
        direct.observe(loss)
        results.append((direct.flush(), lagged.flush_lagged()))
    final = lagged.flush_lagged()
    for want, got in zip([r[0] for r in results], [results[1][1], final], strict=True):
        assert got.n_finite == want.n_finite == 1 and got.sq_norm.tolist() == want.sq_norm.tolist()


def test_an_infinite_gradient_row_is_dropped_without_a_numpy_warning():
    import warnings

    model, moments = _linear_moments()
    model.weight.grad = torch.full_like(model.weight, float("inf"))
    model.bias.grad = torch.zeros_like(model.bias)
    moments.observe(torch.tensor(1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert moments.flush().n_finite == 0

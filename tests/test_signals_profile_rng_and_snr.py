"""Profiling seeds only the generators it restores, and the rounds tier reads a 0/0 SNR as neutral.

``measure_profile`` called ``torch.manual_seed(0)`` per precision, which also seeded every CUDA device's generator
(queued for CUDA's start on a CPU), outside the fork that restores the CPU's or the profiled GPU's only. And the
rounds tier's ``snr_l = |G_l|^2 / (tr(Sigma_l) / B)`` came out 0 for a layer whose gradient is exactly zero (or that
the loss does not use), where the cheap tier reads that 0/0 as 1: its ``log_snr`` fell to the floor when the first
round landed.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from triaccel_rl import profiling
from triaccel_rl.models import SmallResNet
from triaccel_rl.observation import LayerGrouper, ObservationLayout, build_observation
from triaccel_rl.signals import EstimatorSource, Schedule, SignalCollector, SignalConfig
from triaccel_rl.types import LayerInfo, Precision, Signals, StepStats

# ------------------------------------------------------------------------------------- measure_profile


def test_a_cpu_profile_seeds_only_the_generators_it_draws_from(monkeypatch) -> None:
    """No CUDA generator is seeded behind the caller; each precision's model still starts from seed 0's weights."""
    seeded_cuda: list[int] = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: seeded_cuda.append(seed))
    first_weights: list[torch.Tensor] = []

    def fake_time_steps(model: nn.Module, *args: object) -> tuple[float, float]:
        first_weights.append(next(model.parameters()).detach().clone())
        return 1.0, 1.0

    monkeypatch.setattr(profiling, "_time_steps", fake_time_steps)
    profiling.measure_profile("cpu", batch_size=2, steps=1, small=True)
    assert seeded_cuda == []
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(0)
        expected = next(SmallResNet(3, (8, 16), 10).parameters()).detach()
    assert len(first_weights) == len(Precision) + 1  # each precision's ResNet, then the fixed-cost MLP
    for weights in first_weights[:-1]:
        assert torch.equal(weights, expected)


# ------------------------------------------------------------------------------------- rounds tier SNR


class _ZeroAndUnused(nn.Module):
    """``live`` has a gradient; ``zero``'s is exactly zero (its output times 0); ``unused`` is never called."""

    def __init__(self) -> None:
        super().__init__()
        self.live = nn.Linear(4, 3)
        self.zero = nn.Linear(4, 3)
        self.unused = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.live(x) + 0.0 * self.zero(x)


def _step() -> StepStats:
    return StepStats(1.0, 8, 1.0, 1.0, 0, False, np.array([0.3, 0.0, 0.0]), np.ones(3), np.zeros(3), 0.1)


def _snapshot(collector: SignalCollector, batch_size: int) -> Signals:
    return collector.snapshot(
        grad_mean_sq_norm=np.array([0.1, 0.0, 0.0]), probe_loss=1.0, batch_size=batch_size, lr_scale=1.0,
        precisions=[Precision.FP32] * 3,
    )  # fmt: skip


def test_the_rounds_tier_reads_a_zero_over_zero_snr_as_neutral_as_the_cheap_tier() -> None:
    torch.manual_seed(0)
    model = _ZeroAndUnused()
    layer_params = [list(model.live.parameters()), list(model.zero.parameters()), list(model.unused.parameters())]
    infos = [LayerInfo(name, 15, True) for name in ("live", "zero", "unused")]
    config = SignalConfig(schedule=Schedule.FIXED, fixed_interval_steps=1, warmup_round=False)
    collector = SignalCollector(infos, ema_decay=0.9, memory_budget_bytes=1 << 20, config=config)
    collector.observe(_step())
    cheap = _snapshot(collector, batch_size=8)
    assert cheap.extra["curvature_source"] == "fisher" and cheap.snr[1:].tolist() == [1.0, 1.0]

    generator = torch.Generator().manual_seed(1)
    inputs, targets = torch.randn(32, 4, generator=generator), torch.randint(0, 3, (32,), generator=generator)
    collector.attach(EstimatorSource(model, layer_params, nn.functional.cross_entropy, inputs, targets))
    collector.observe(_step())
    report = collector.maybe_estimate(progress=0.2)
    assert report is not None and report.folded
    rounds = _snapshot(collector, batch_size=8)
    assert rounds.extra["curvature_source"] == "hutchinson" and rounds.extra["unused_layers"] == ["unused"]
    grad_sq = collector._grad_sq_ema / collector._round_weight
    cov = np.maximum(collector._cov_ema / collector._round_weight, 0.0)
    assert grad_sq[1:].tolist() == [0.0, 0.0] and cov[1:].tolist() == [0.0, 0.0] and cov[0] > 0  # 0/0 exactly
    assert rounds.snr[1:].tolist() == [1.0, 1.0]
    # A measured layer as before: here its unbiased |G|^2 is under its noise (< 0), SNR 0, which 0/0 is not.
    assert grad_sq[0] < 0 and rounds.snr[0] == 0.0
    # Grouped alone, each 0/0 layer's log_snr is the observation's neutral 0, not its floor -6.
    grouper, layout = LayerGrouper(rounds.controllable, n_groups=3), ObservationLayout(3)
    grouper.update(rounds)
    observation = build_observation(rounds, grouper, 8, layout)
    groups = {int(grouper.layers_of(g)[0]): g for g in range(3)}
    assert [observation[layout.group(groups[layer], "log_snr")] for layer in range(3)] == [-6.0, 0.0, 0.0]

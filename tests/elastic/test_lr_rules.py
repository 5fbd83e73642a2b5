"""LR coupling to the effective batch: the rules' exact values, warm-up after large rises, and their use."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from elastic_helpers import small_task
from torch import nn

from triaccel_rl.config import ConfigError, ControllerConfig, ElasticConfig, LRRule
from triaccel_rl.controller import Controller
from triaccel_rl.elastic import BatchLRCoupler, lr_gain, resolve_lr_rule
from triaccel_rl.training import TrainingRun


@pytest.mark.parametrize(
    ("rule", "batch", "base", "noise", "expected"),
    [
        (LRRule.LINEAR, 256, 64, None, 4.0),
        (LRRule.LINEAR, 16, 64, None, 0.25),
        (LRRule.SQRT, 256, 64, None, 2.0),
        (LRRule.SQRT, 16, 64, None, 0.5),
        (LRRule.NONE, 256, 64, None, 1.0),
        # AdaScale: (1 + B_noise / B0) / (1 + B_noise / B)
        (LRRule.ADASCALE, 256, 64, 64.0, (1 + 1) / (1 + 0.25)),  # 1.6
        (LRRule.ADASCALE, 256, 64, 0.0, 1.0),  # noise-free gradient: no gain from a bigger batch
        (LRRule.ADASCALE, 256, 64, None, 1.0),  # unknown noise scale counts as 0
        (LRRule.ADASCALE, 32, 64, 64.0, (1 + 1) / (1 + 2)),  # a smaller batch lowers the LR
        (LRRule.ADASCALE, 64, 64, 123.0, 1.0),  # the base batch has gain 1 whatever the noise
    ],
)
def test_gain_values(rule: LRRule, batch: int, base: int, noise: float | None, expected: float) -> None:
    assert lr_gain(rule, batch, base, noise) == pytest.approx(expected, rel=1e-12)


def test_adascale_lies_between_one_and_linear() -> None:
    assert lr_gain(LRRule.ADASCALE, 256, 64, 1e12) == pytest.approx(4.0, rel=1e-9)  # noise-dominated: linear
    for noise in (1.0, 30.0, 500.0):
        for batch in (64, 128, 1024):
            gain = lr_gain(LRRule.ADASCALE, batch, 64, noise)
            assert 1.0 <= gain <= batch / 64 + 1e-12


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: lr_gain(LRRule.LINEAR, 0, 64), "batch sizes must be positive"),
        (lambda: lr_gain(LRRule.ADASCALE, 64, 64, -1.0), "noise_scale=-1.0 must be >= 0"),
        (lambda: lr_gain(LRRule.AUTO, 64, 64), "must be resolved first"),
    ],
)
def test_gain_bad_input(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_auto_resolves_by_optimizer() -> None:
    params = [nn.Parameter(torch.zeros(2))]
    assert resolve_lr_rule(LRRule.AUTO, torch.optim.SGD(params, lr=0.1)) is LRRule.LINEAR
    assert resolve_lr_rule(LRRule.AUTO, torch.optim.AdamW(params)) is LRRule.SQRT
    assert resolve_lr_rule(LRRule.AUTO, torch.optim.Adam(params)) is LRRule.SQRT
    assert resolve_lr_rule(LRRule.ADASCALE, torch.optim.AdamW(params)) is LRRule.ADASCALE


def test_lr_rule_parsing_and_config_errors() -> None:
    assert LRRule.parse("SQRT") is LRRule.SQRT
    assert ElasticConfig(lr_rule="adascale").lr_rule is LRRule.ADASCALE  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="lr_rule='cubic'; allowed: linear, sqrt, none, adascale, auto"):
        LRRule.parse("cubic")
    for kwargs, message in [
        ({"warmup_above": 1.0}, "warmup_above=1.0 must be a ratio > 1"),
        ({"warmup_steps": -1}, "warmup_steps=-1 must be >= 0"),
        ({"fill_frac": 0.0}, r"fill_frac=0.0 must be in \(0, 1\]"),
        ({"oom_budget_factor": 1.5}, r"oom_budget_factor=1.5 must be in \(0, 1\]"),
        ({"max_oom_retries": 0}, "max_oom_retries=0 must be >= 1"),
    ]:
        with pytest.raises(ConfigError, match=message):
            ElasticConfig(**kwargs)  # type: ignore[arg-type]


def test_warmup_ramps_linearly_after_a_large_rise() -> None:
    coupler = BatchLRCoupler(LRRule.LINEAR, base_batch_size=64, batch_size=64, warmup_above=1.5, warmup_steps=4)
    assert coupler.advance() == 1.0
    assert coupler.change(256) == 1.0  # in force until the next step
    assert coupler.warming_up
    assert [coupler.advance() for _ in range(5)] == [1.75, 2.5, 3.25, 4.0, 4.0]
    assert not coupler.warming_up


def test_lower_gain_and_small_rises_apply_at_once() -> None:
    coupler = BatchLRCoupler(LRRule.LINEAR, base_batch_size=64, batch_size=256, warmup_above=1.5, warmup_steps=4)
    coupler.advance()
    assert coupler.change(128) == 2.0  # a drop: at once
    assert coupler.change(160) == 2.5  # ×1.25 < 1.5: at once
    assert coupler.advance() == 2.5
    sqrt = BatchLRCoupler(LRRule.SQRT, base_batch_size=64, batch_size=64, warmup_above=1.5, warmup_steps=4)
    sqrt.advance()
    assert sqrt.change(128) == pytest.approx(math.sqrt(2))  # a doubling under sqrt is ×1.41: no warm-up


def test_changes_before_the_first_step_apply_at_once() -> None:
    coupler = BatchLRCoupler(LRRule.LINEAR, base_batch_size=64, batch_size=64, warmup_steps=4)
    assert coupler.change(1024) == 16.0
    assert coupler.advance() == 16.0


def test_interrupted_warmup_restarts_from_the_gain_in_force() -> None:
    coupler = BatchLRCoupler(LRRule.LINEAR, base_batch_size=64, batch_size=64, warmup_above=1.5, warmup_steps=4)
    coupler.advance()
    coupler.change(256)
    assert coupler.advance() == 1.75
    assert coupler.change(1024) == 1.75  # ×16 from 1.75 over 4 steps
    assert [coupler.advance() for _ in range(4)] == pytest.approx([5.3125, 8.875, 12.4375, 16.0])
    assert coupler.change(1024) == 16.0  # the same batch again changes nothing


def test_run_applies_the_rule_with_warmup_to_the_optimizer() -> None:
    run = TrainingRun(small_task(), seed=0, device="cpu", elastic=ElasticConfig(warmup_steps=2))
    assert run.lr_rule is LRRule.LINEAR  # AUTO with SGD
    base = run.task.base_lr
    assert run.step().lr == pytest.approx(base)
    run.batch_size = 128  # ×2 ≥ 1.5: warmed up over 2 steps
    lrs = [run.step().lr for _ in range(3)]
    assert lrs == pytest.approx([base * 1.5, base * 2.0, base * 2.0])
    assert run.engine.group_lrs()[0] == pytest.approx(base * 2.0)
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(base)  # the group keeps its own (scheduler's) LR
    run.batch_size = 32  # a drop applies at once
    assert run.step().lr == pytest.approx(base * 0.5)


def test_run_sqrt_rule_for_adamw_and_explicit_override() -> None:
    task = small_task(optimizer="adamw", base_lr=1e-3)
    run = TrainingRun(task, seed=0, device="cpu", batch_size=256)
    assert run.lr_rule is LRRule.SQRT
    assert run.lr == pytest.approx(1e-3 * math.sqrt(256 / 64))
    run.lr_rule = "linear"  # type: ignore[assignment]
    assert run.lr == pytest.approx(1e-3 * 4)


def test_run_adascale_uses_its_own_noise_estimate() -> None:
    run = TrainingRun(small_task(), seed=0, device="cpu", elastic=ElasticConfig(lr_rule=LRRule.ADASCALE))
    assert run.noise_scale is None  # nothing measured yet
    for _ in range(5):
        run.step()
    noise = run.noise_scale
    assert noise is not None and noise > 0 and np.isfinite(noise)
    run.batch_size = 96  # ×1.5 in batch: the AdaScale gain rises by less than 1.5, so no warm-up
    expected = lr_gain(LRRule.ADASCALE, 96, 64, run.noise_scale)
    assert run.engine.batch_lr_gain == pytest.approx(expected, rel=1e-6)
    assert 1.0 <= expected < 1.5


def _controller(rule: str | None, optimizer: str = "sgd") -> tuple[Controller, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1) if optimizer == "sgd" else torch.optim.AdamW(model.parameters())
    return Controller(model, opt, policy="fp32", config=ControllerConfig(interval_steps=1000), lr_rule=rule), opt


def test_controller_uses_the_same_rules() -> None:
    ctl, _ = _controller(None, "adamw")
    assert ctl.lr_rule is LRRule.SQRT  # AUTO, as in TrainingRun
    ctl, opt = _controller("linear")
    data = (torch.randn(256, 8), torch.randint(0, 2, (256,)))
    loader = ctl.loader(data, batch_size=16)
    x, y = next(loader)
    ctl.step(nn.functional.cross_entropy(ctl.model(x), y))
    ctl.batch_size = 64  # ×4 after the first step: warmed up over config.elastic.warmup_steps (10)
    x, y = next(loader)
    ctl.step(nn.functional.cross_entropy(ctl.model(x), y))
    assert ctl.engine.batch_lr_gain == pytest.approx(1 + 3 / 10)
    assert ctl.lr == pytest.approx(0.1 * 1.3)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="lr_rule='cubic'; allowed: linear, sqrt, none"):
        _controller("cubic")


@pytest.mark.parametrize("bad", [1.0, 0.5, float("nan")])
def test_the_coupler_refuses_a_warmup_threshold_that_is_no_ratio_above_one(bad: float) -> None:
    """NaN passed the check (every comparison with it is false) and then no rise was ever warmed up."""
    with pytest.raises(ValueError, match=rf"need warmup_above > 1 and warmup_steps >= 0; got {bad}, 4"):
        BatchLRCoupler(LRRule.LINEAR, base_batch_size=64, batch_size=64, warmup_above=bad, warmup_steps=4)

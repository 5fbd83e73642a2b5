"""Signal-config plumbing: ``ControllerConfig.signals`` reaches every collector; loop and run fixes."""

import subprocess
import sys
from dataclasses import fields

import numpy as np
import pytest
import torch
from torch import nn

import triaccel_rl.config
import triaccel_rl.errors
from triaccel_rl.config import ConfigError, ControllerConfig, HeuristicConfig
from triaccel_rl.controller import Controller
from triaccel_rl.engine import StepEngine
from triaccel_rl.loop import DecisionLoop
from triaccel_rl.signals import SignalConfig, SignalMode
from triaccel_rl.tasks import get_task
from triaccel_rl.training import TrainingRun

# ---------------------------------------------------------------- ConfigError and the import cycle


def test_config_error_lives_in_errors_and_is_re_exported():
    assert triaccel_rl.config.ConfigError is triaccel_rl.errors.ConfigError
    assert issubclass(ConfigError, ValueError)
    assert "ConfigError" in triaccel_rl.config.__all__


@pytest.mark.parametrize(
    "imports",
    [
        "import triaccel_rl.signals; import triaccel_rl.config",
        "import triaccel_rl.signals.config; import triaccel_rl.config",
        "import triaccel_rl.config; import triaccel_rl.signals",
    ],
)
def test_signals_and_config_import_in_either_order(imports):
    """``signals.config`` imports ``ConfigError`` from ``config``, and ``config`` uses ``SignalConfig``."""
    code = f"{imports}; print(triaccel_rl.config.ControllerConfig().signals.mode.value)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "all"


# ---------------------------------------------------------------- ControllerConfig.signals


def test_signals_default_and_presets():
    assert ControllerConfig().signals == SignalConfig()
    assert ControllerConfig(signals="cheap").signals == SignalConfig.preset("cheap")
    assert ControllerConfig.preset("safe", signals="fixed").signals == SignalConfig.preset("fixed")
    for preset in ("default", "safe", "aggressive"):
        assert ControllerConfig.preset(preset).signals == SignalConfig()
    custom = SignalConfig(budget_frac=0.05, lr_factors=True)
    assert ControllerConfig(signals=custom).signals is custom


def test_signals_of_the_wrong_type_are_rejected():
    with pytest.raises(ConfigError, match=r"signals=\{'mode': 'cheap'\} must be a SignalConfig or the name"):
        ControllerConfig(signals={"mode": "cheap"})  # type: ignore[arg-type]


def test_unknown_signal_preset_is_named():
    with pytest.raises(ConfigError, match="unknown signal preset 'quick'; allowed: default, cheap"):
        ControllerConfig(signals="quick")


def test_heuristic_config_keeps_only_used_fields():
    names = {f.name for f in fields(HeuristicConfig)}
    assert not names & {"lr_scale_low_curvature", "lr_scale_high_curvature"}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"loss_rise_tolerance": -0.01}, r"loss_rise_tolerance=-0.01 must be a number in \[0, 1\)"),
        ({"loss_rise_tolerance": float("nan")}, r"loss_rise_tolerance=nan must be a number in \[0, 1\)"),
        # the observation clips the loss trend to [-1, 1]: a rise of any size never passed 1 (the LR was never cut)
        ({"loss_rise_tolerance": 1.0}, r"loss_rise_tolerance=1.0 must be a number in \[0, 1\) \(the observation"),
        ({"max_batch_over_noise": 0.0}, r"max_batch_over_noise=0.0 must be a number in \(1e-10, 1e6\]"),
        ({"max_batch_over_noise": float("inf")}, r"max_batch_over_noise=inf must be a number in \(1e-10, 1e6\]"),
        # log10(noise / batch) is read from -6 to 10: the batch never grew, or grew whatever the noise
        ({"max_batch_over_noise": 1e-10}, r"max_batch_over_noise=1e-10 must be a number in \(1e-10, 1e6\]"),
        ({"max_batch_over_noise": 2e6}, r"max_batch_over_noise=2000000.0 must be a number in \(1e-10, 1e6\]"),
        # in float32, as the heuristic compares them: 0.99999999 is 1.0 there, -log10(1.00000001e-10) is 10.0
        ({"loss_rise_tolerance": 0.99999999}, r"loss_rise_tolerance=0.99999999 must be a number in \[0, 1\)"),
        ({"max_batch_over_noise": 1.00000001e-10}, r"max_batch_over_noise=1.00000001e-10 must be a number in"),
    ],
)
def test_heuristic_config_checks_the_lr_and_noise_thresholds(overrides, message):
    with pytest.raises(ConfigError, match=message):
        HeuristicConfig(**overrides)


# ---------------------------------------------------------------- DecisionLoop


def make_loop(**config_overrides) -> DecisionLoop:
    run = TrainingRun(get_task("synthetic", n_train=1024), seed=0, device="cpu", cost_mode="profile")
    return DecisionLoop(run, ControllerConfig(interval_steps=4, **config_overrides))


def test_loop_passes_the_signal_config_to_its_collector():
    loop = make_loop(signals="cheap")
    assert loop.collector.config is loop.config.signals
    loop.train_interval()
    signals = loop.snapshot(progress=0.0)
    assert loop.collector.config.mode is SignalMode.CHEAP
    assert signals.extra["rounds"] == 0 and signals.extra["curvature_source"] == "fisher"


def test_snapshot_reports_a_lowered_memory_budget():
    loop = make_loop(signals="cheap")
    loop.train_interval()
    assert loop.snapshot(progress=0.0).memory_budget_bytes == loop.run.memory_budget_bytes
    lowered = loop.run.memory_budget_bytes // 3  # what the run does after an out-of-memory error
    loop.run.memory_budget_bytes = lowered
    loop.train_interval()
    assert loop.snapshot(progress=0.1).memory_budget_bytes == lowered


def test_enable_lr_factors_applies_them_from_the_next_snapshot():
    loop = make_loop(signals="cheap")
    loop.train_interval()
    loop.snapshot(progress=0.0)
    assert loop.run.lr_factors.tolist() == [1.0] * loop.run.n_layers
    loop.enable_lr_factors()
    assert loop.config.signals.lr_factors and loop.collector.config.lr_factors
    assert loop.collector.config.mode is SignalMode.CHEAP  # only the flag changed
    loop.train_interval()
    signals = loop.snapshot(progress=0.1)
    assert signals.lr_factors is not None
    assert not np.all(signals.lr_factors == 1.0)  # factors were computed (not the all-ones default)...
    np.testing.assert_array_equal(loop.run.lr_factors, signals.lr_factors)  # ...and applied


def test_lr_factors_on_through_the_config():
    loop = make_loop(signals=SignalConfig.preset("cheap", lr_factors=True))
    loop.train_interval()
    signals = loop.snapshot(progress=0.0)
    assert signals.lr_factors is not None and not np.all(signals.lr_factors == 1.0)
    np.testing.assert_array_equal(loop.run.lr_factors, signals.lr_factors)


# ---------------------------------------------------------------- TrainingRun.probe_batch


def test_probe_batch_is_the_held_out_batch():
    run = TrainingRun(get_task("synthetic", n_train=1024), seed=0, device="cpu")
    x, y = run.probe_batch
    assert len(x) == len(y) > 0 and x.device == run.device
    with torch.no_grad():
        expected = float(run.task.loss_fn(run.model(x).float(), y))
    assert run.probe_loss() == pytest.approx(expected)
    with pytest.raises(AttributeError):
        run.probe_batch = (x, y)  # type: ignore[misc]


# ---------------------------------------------------------------- Controller


def data(n=256):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    return x, (x[:, 0] + x[:, 1] > 0).long()


def model_and_per_layer_optimizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    groups = [{"params": params, "layer": i} for i, params in enumerate(StepEngine.discover(model))]
    return model, torch.optim.SGD(groups, lr=0.1)


def train(ctl, model):
    for x, y in ctl.loader(data(), batch_size=16):
        with ctl.autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        ctl.step(loss)


def test_controller_passes_the_signal_config_to_its_collector():
    model, opt = model_and_per_layer_optimizer()
    ctl = Controller(model, opt, policy="fp32", config=ControllerConfig(interval_steps=4, signals="cheap"))
    assert ctl.collector.config is ctl.config.signals
    assert ctl.collector.config.mode is SignalMode.CHEAP
    train(ctl, model)
    assert ctl.engine.lr_factors.tolist() == [1.0] * 3  # off by default


def test_controller_applies_lr_factors_for_the_second_order_heuristic():
    model, opt = model_and_per_layer_optimizer()
    ctl = Controller(model, opt, policy="heuristic-second-order", config=ControllerConfig(interval_steps=4))
    assert ctl.config.signals.lr_factors and ctl.collector.config.lr_factors
    train(ctl, model)
    assert ctl.signals is not None and ctl.signals.lr_factors is not None
    np.testing.assert_array_equal(ctl.engine.lr_factors, ctl.signals.lr_factors)
    assert not np.all(ctl.engine.lr_factors == 1.0)
    # The factors reach the per-layer LRs of the next update (the engine scales the groups' own LRs).
    x, y = data(16)
    with ctl.autocast():
        loss = nn.functional.cross_entropy(model(x), y)
    ctl.step(loss)
    assert ctl.steps % ctl.config.interval_steps != 0  # no decision after the update changed the factors
    multiplier = ctl.engine.lr_scale * ctl.engine.batch_lr_gain
    for group, applied, factor in zip(opt.param_groups, ctl.engine.group_lrs(), ctl.engine.lr_factors, strict=True):
        assert applied == pytest.approx(group["lr"] * multiplier * factor)


def test_lr_factors_on_an_optimizer_without_layer_keys_are_named_in_a_warning(caplog):
    model, _ = model_and_per_layer_optimizer()
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    with caplog.at_level("WARNING", logger="triaccel_rl"):
        Controller(model, plain, policy="heuristic-second-order", config=ControllerConfig(interval_steps=4))
    assert "per-layer LR factors are on, but they apply to param groups carrying a 'layer' key" in caplog.text
    caplog.clear()
    model, per_layer = model_and_per_layer_optimizer()
    with caplog.at_level("WARNING", logger="triaccel_rl"):
        Controller(model, per_layer, policy="heuristic-second-order", config=ControllerConfig(interval_steps=4))
    assert "LR factors" not in caplog.text

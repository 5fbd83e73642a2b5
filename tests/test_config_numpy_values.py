"""NumPy numbers given to the config dataclasses are stored as Python ``int`` and ``float``.

The checks took them and the configs kept them as given: ``ema_decay=np.float32(0.9)`` or
``SignalConfig(fixed_microbatches=np.int64(4))`` put NumPy scalars into ``Controller.state_dict()``, whose checkpoint
``torch.load`` refused (``weights_only``, its default since torch 2.6); ``SignalConfig(seed=np.int64(0))`` overflowed
the collector's int64 seed mixing when it attached, and ``fixed_probes=np.int64(2)`` failed the first decision with a
TypeError (a ``numpy.bool`` as ``retain_graph``).
"""

import dataclasses
import io

import numpy as np
import pytest
import torch
from torch import nn

import triaccel_rl as ta
from triaccel_rl.config import ControllerConfig, ElasticConfig, HeuristicConfig, MemoryBudget, RewardConfig
from triaccel_rl.signals import SignalConfig

CONFIGS = [
    MemoryBudget(bytes=1 << 20),
    HeuristicConfig(anneal_plateau=0.05, anneal_release_after=0.9, ramp_batch_after=0.5),
    RewardConfig(),
    ElasticConfig(),
    ControllerConfig(),
    # The sub-budgets set by hand: left unset, they hold a sentinel default (tested apart)
    SignalConfig(observe_budget_frac=0.001, cheap_budget_frac=0.004, seed=7),
]

DATA = (torch.randn(96, 8, generator=torch.Generator().manual_seed(0)), torch.arange(96) % 3)  # 6 steps an epoch
PROBE = (torch.randn(32, 8, generator=torch.Generator().manual_seed(1)), torch.arange(32) % 3)


def numpy_numbers(config, float_type=np.float64):
    """``config`` with each of its ``int`` and ``float`` fields given as a NumPy scalar, and those scalars by name."""
    given = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if type(value) is int:  # not bool, None, enums, tuples, nested configs or sentinel defaults
            given[f.name] = np.int64(value)
        elif type(value) is float:
            given[f.name] = float_type(value)
    return dataclasses.replace(config, **given), given


def numpy_leaves(state, path="state"):
    """The paths of the NumPy scalars and arrays in a nested state dict."""
    if isinstance(state, dict):
        return [leaf for key, value in state.items() for leaf in numpy_leaves(value, f"{path}[{key!r}]")]
    if isinstance(state, list | tuple):
        return [leaf for i, value in enumerate(state) for leaf in numpy_leaves(value, f"{path}[{i}]")]
    return [path] if isinstance(state, np.generic | np.ndarray) else []


@pytest.mark.parametrize("float_type", [np.float32, np.float64])  # np.float64 is a subclass of float
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
def test_each_config_stores_numpy_numbers_as_python_ones(config, float_type):
    converted, given = numpy_numbers(config, float_type)
    assert len(given) >= 3
    for name, value in given.items():
        stored = getattr(converted, name)
        expected_type = int if isinstance(value, np.integer) else float
        assert type(stored) is expected_type, f"{type(config).__name__}.{name}={stored!r}"
        assert stored == expected_type(value)


def test_numpy_lr_scales_are_stored_as_python_floats():
    config = ControllerConfig(lr_scales=tuple(np.float32(s) for s in (0.5, 0.75, 1.0, 1.25, 1.5)))
    assert config.lr_scales == (0.5, 0.75, 1.0, 1.25, 1.5)
    assert all(type(s) is float for s in config.lr_scales)
    assert ControllerConfig(lr_scales=[np.int64(1), np.int64(2)]).lr_scales == (1, 2)
    assert all(type(s) is int for s in ControllerConfig(lr_scales=[np.int64(1), np.int64(2)]).lr_scales)


def test_the_signal_sub_budgets_left_unset_are_still_derived():
    """The sentinel defaults (float subclasses) are no NumPy numbers: kept, so ``replace`` derives them again."""
    config = SignalConfig(budget_frac=np.float64(0.002))
    assert type(config.budget_frac) is float
    assert config.observe_budget_frac == 0.001 * (0.002 / 0.02)
    wider = dataclasses.replace(config, budget_frac=0.02)
    assert (wider.observe_budget_frac, wider.cheap_budget_frac) == (0.001, 0.004)


def train_past_a_decision(config):
    """A heuristic Controller with rounds on a probe batch, over 8 steps of a tiny model (decisions every 2)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    ctl = ta.Controller(
        model, optimizer, policy="heuristic", config=config, probe=PROBE, loss_fn=nn.functional.cross_entropy
    )
    for x, y in ctl.loader(DATA, batch_size=16, epochs=2):
        with ctl.autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        ctl.step(loss)
        if ctl.steps == 8:
            break
    return ctl


FIXED = SignalConfig(schedule="fixed", fixed_interval_steps=2, warmup_round=False)


@pytest.mark.parametrize(
    "config",
    [
        ControllerConfig(interval_steps=2, ema_decay=np.float32(0.9), signals=FIXED),
        ControllerConfig(interval_steps=2, signals=dataclasses.replace(FIXED, fixed_microbatches=np.int64(4))),
        ControllerConfig(interval_steps=2, signals=dataclasses.replace(FIXED, fixed_probes=np.int64(2))),
        ControllerConfig(interval_steps=2, signals=dataclasses.replace(FIXED, seed=np.int64(3))),
        ControllerConfig(interval_steps=2, signals=SignalConfig(warmup_round=False, micro_batch_size=np.int64(8))),
    ],
    ids=["ema_decay", "fixed_microbatches", "fixed_probes", "seed", "adaptive-micro_batch_size"],
)
def test_a_controller_with_numpy_config_values_trains_and_its_checkpoint_loads(config):
    ctl = train_past_a_decision(config)
    try:
        assert len(ctl.decisions) >= 2
        state = ctl.state_dict()
        assert numpy_leaves(state) == []
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        assert torch.load(buffer, weights_only=True).keys() == state.keys()
    finally:
        ctl.close()


def test_numpy_config_values_decide_as_the_python_values_do():
    """Every number of every config as a NumPy scalar: the same decisions, rounds and state as the Python numbers."""
    python = ControllerConfig(
        interval_steps=2,
        signals=dataclasses.replace(FIXED, observe_budget_frac=0.001, cheap_budget_frac=0.004),
    )
    given = {name: getattr(python, name) for name in ("memory", "heuristic", "elastic", "signals")}
    numpy_config, _ = numpy_numbers(
        dataclasses.replace(python, **{name: numpy_numbers(value)[0] for name, value in given.items()})
    )
    assert numpy_config == python
    runs = [train_past_a_decision(config) for config in (python, numpy_config)]
    try:
        decided = [[(d.lr_scale, d.batch_size, d.precisions) for d in ctl.decisions] for ctl in runs]
        assert len(decided[0]) >= 2
        assert decided[0] == decided[1]
        assert runs[0].signals.extra["rounds"] == runs[1].signals.extra["rounds"] == 4
        assert numpy_leaves(runs[1].state_dict()) == []
    finally:
        for ctl in runs:
            ctl.close()

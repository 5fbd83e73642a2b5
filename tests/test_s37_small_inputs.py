"""Inputs a review found refused with a message naming something else, or taken silently (2026-12-07)."""

import math

import numpy as np
import pytest
import torch
from triaccel_rl.envs.training_env import TriAccelEnv

from triaccel_rl.actions import decode
from triaccel_rl.config import ControllerConfig, LRRule, RewardConfig
from triaccel_rl.elastic import BatchLRCoupler
from triaccel_rl.reward import reward

CONFIG = ControllerConfig()


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.tensor([0, 1, 1, 1, 4, 1], dtype=torch.bfloat16),  # NumPy raised "unsupported ScalarType"
        lambda: torch.tensor([0.0, 1.0, 1.0, 1.0, 4.0, 1.0], requires_grad=True),  # "Can't call numpy()"
        lambda: torch.tensor([0, 1, 1, 1, 4, 1]),
    ],
    ids=["bf16", "requires-grad", "int64"],
)
def test_an_action_as_a_tensor_decodes_as_its_integers(make):
    assert decode(make(), CONFIG) == decode([0, 1, 1, 1, 4, 1], CONFIG)


def test_a_fractional_bf16_tensor_is_refused_by_name():
    with pytest.raises(ValueError, match=r"action \[0\.5, 1\.0, 1\.0, 1\.0, 4\.0, 1\.0\] must hold integers"):
        decode(torch.tensor([0.5, 1, 1, 1, 4, 1], dtype=torch.bfloat16), CONFIG)


def _reward(**overrides):
    kwargs = {"previous_probe_loss": 1.0, "probe_loss": 0.9, "cost_ms": 10.0, "budget_left_ms": 10.0,
              "overflow_rate": 0.0, "over_budget": False, "diverged": False, "divergence_loss": 3.0,
              "config": RewardConfig()}  # fmt: skip
    return reward(**{**kwargs, **overrides})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"probe_loss": -1.0}, "probe_loss=-1.0 must be >= 0: the reward is the drop in the log of the probe loss"),
        ({"previous_probe_loss": -0.5}, "previous_probe_loss=-0.5 must be >= 0"),
        ({"diverged": "no"}, "diverged='no' must be True or False"),
        ({"over_budget": 0}, "over_budget=0 must be True or False"),
    ],
)
def test_a_negative_loss_or_a_flag_that_is_no_bool_is_refused_by_name(overrides, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
        _reward(**overrides)


def test_the_documented_rewards_stand():
    assert _reward() == pytest.approx(10 * (math.log(1.0) - math.log(0.9)))
    assert _reward(probe_loss=0.0) == RewardConfig().clip  # 0 is floored at 1e-12, as documented
    assert _reward(diverged=np.bool_(True)) < 0  # NumPy's bool is a bool


def test_a_coupler_state_naming_its_rule_as_the_enum_loads():
    coupler = BatchLRCoupler(LRRule.LINEAR, base_batch_size=64, batch_size=64)
    coupler.change(128)
    state = {**coupler.state_dict(), "rule": LRRule.LINEAR}  # was refused as "for rule <LRRule.LINEAR> ... 'linear'"
    fresh = BatchLRCoupler(LRRule.LINEAR, base_batch_size=64, batch_size=64)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == coupler.state_dict()
    with pytest.raises(ValueError, match="is for rule 'sqrt' at base batch 64; this one is 'linear'"):
        fresh.load_state_dict({**coupler.state_dict(), "rule": "sqrt"})
    with pytest.raises(ValueError, match="is for rule 'nope'"):
        fresh.load_state_dict({**coupler.state_dict(), "rule": "nope"})


def test_the_environment_says_when_its_probe_loss_is_a_stand_in():
    """A non-finite probe loss reads as 1e6 in the signals; info said nothing of it, at reset too."""
    env = TriAccelEnv(task="synthetic", config=ControllerConfig(interval_steps=2), lr_range=(1e30, 1e30))
    _, info = env.reset(seed=0)
    assert info["probe_loss_finite"] is False and info["probe_loss"] == 1e6
    env.close()
    env = TriAccelEnv(task="synthetic", config=ControllerConfig(interval_steps=2))
    _, info = env.reset(seed=0)
    assert info["probe_loss_finite"] is True and info["probe_loss"] < 10
    *_, info = env.step(np.array([0, 0, 0, 0, 2, 1]))
    assert info["probe_loss_finite"] is True
    env.close()

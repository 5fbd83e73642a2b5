"""Refusals that name the fix a new user needs: a ``TensorDataset`` for ``loader()``, a policy for other groups."""

import re

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset
from triaccel_rl.policies import LearnedPolicy, PolicyLoadError, pretrained_policy_path

from triaccel_rl.config import ControllerConfig
from triaccel_rl.controller import Controller
from triaccel_rl.observation import OBS_HIGH

TODAYS_HINT = "For a list of (x, y) samples, pass the tensors (torch.stack(xs), torch.stack(ys))"


def _model_and_optimizer():
    model = nn.Linear(4, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


@pytest.mark.parametrize(
    ("tensors", "hint"),
    [
        # Before the fix the 2-tensor case got the list-of-samples hint, though the dataset already holds the pair.
        ((torch.randn(8, 4), torch.zeros(8, dtype=torch.long)), "Pass its tensors: ctl.loader(dataset.tensors, ...)"),
        ((torch.randn(8, 4), torch.zeros(8), torch.ones(8)), TODAYS_HINT),  # no pair to pass: today's hint
    ],
)
def test_a_tensor_dataset_is_refused_naming_its_tensors(tensors, hint):
    model, optimizer = _model_and_optimizer()
    with Controller(model, optimizer, policy="fp32", device="cpu") as ctl:
        message = f"dataset must be a pair (inputs, labels) of tensors; got a TensorDataset. {hint}"
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            next(iter(ctl.loader(TensorDataset(*tensors), batch_size=4)))


def test_a_list_of_samples_keeps_its_hint():
    model, optimizer = _model_and_optimizer()
    samples = [(torch.randn(4), torch.tensor(0)) for _ in range(3)]
    with Controller(model, optimizer, policy="fp32", device="cpu") as ctl:
        message = f"dataset must be a pair (inputs, labels) of tensors; got a list of 3 items (tuple). {TODAYS_HINT}"
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            next(iter(ctl.loader(samples, batch_size=2)))


def test_the_pretrained_policy_under_other_groups_names_both_n_groups():
    """Before the fix the refusal compared 43 features with 27 and said to run it "with the settings it was trained
    for" without naming the setting."""
    model, optimizer = _model_and_optimizer()
    message = (
        f"policy {str(pretrained_policy_path())!r} was trained for observation space Box(-10.0, 10.0, (43,), float32), "
        "n_groups=4; this configuration has Box(-10.0, 10.0, (27,), float32), n_groups=2: run it with the settings it "
        "was trained for, ControllerConfig(n_groups=4) (`triaccel-rl train-policy` trains for the default LR ladder "
        "and layer groups only)"
    )
    with pytest.raises(PolicyLoadError, match=f"^{re.escape(message)}$"):
        Controller(model, optimizer, policy="pretrained", device="cpu", config=ControllerConfig(n_groups=2))


@pytest.mark.parametrize(
    ("low", "size"),
    [
        (-OBS_HIGH, 44),  # 44 features: no number of groups gives it
        (-1.0, 43),  # the size of 4 groups, other bounds: the groups are not what differs
    ],
)
def test_an_observation_space_of_no_other_layout_keeps_todays_message(low, size):
    expected = gym.spaces.Box(low, OBS_HIGH, (size,), np.float32)
    path = pretrained_policy_path()
    message = (
        f"policy {str(path)!r} was trained for observation space Box(-10.0, 10.0, (43,), float32), but this "
        f"environment has {expected}: run it with the settings it was trained for (`triaccel-rl train-policy` trains "
        "for the default LR ladder and layer groups only)"
    )
    with pytest.raises(PolicyLoadError, match=f"^{re.escape(message)}$"):
        LearnedPolicy(path, expected)

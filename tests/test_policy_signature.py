"""Every policy's ``predict`` has the one signature of ``types.Policy`` (STYLE.md rule 4)."""

import inspect

import numpy as np
import pytest
from triaccel_rl.policies.batch_finder import BatchFinderPolicy
from triaccel_rl.policies.heuristic import HeuristicPolicy
from triaccel_rl.policies.learned import LearnedPolicy
from triaccel_rl.policies.static import StaticPolicy

from triaccel_rl.config import ControllerConfig
from triaccel_rl.rl import LrOracleTeacher
from triaccel_rl.shield import FallbackPolicy
from triaccel_rl.types import Policy


def _names_and_defaults(function):
    return [(p.name, p.default) for p in inspect.signature(function).parameters.values()]


@pytest.mark.parametrize(
    "policy", [StaticPolicy, BatchFinderPolicy, HeuristicPolicy, LearnedPolicy, FallbackPolicy, LrOracleTeacher]
)
def test_predict_has_the_one_policy_signature(policy):
    assert _names_and_defaults(policy.predict) == _names_and_defaults(Policy.predict)


class _ConstantBase:
    """bf16 in every group, LR x1, keep the batch; records the ``deterministic`` it was asked for."""

    action = np.array([1, 1, 1, 1, 2, 1])

    def predict(self, observation, state=None, episode_start=None, deterministic=False):
        self.deterministic = deterministic
        return np.tile(self.action, (len(observation), 1)), state


class _FakeVenv:
    num_envs = 2

    def get_attr(self, name):
        assert name == "base_lr_factor"
        return [0.5, 1.6]


def test_lr_oracle_teacher_is_deterministic_whatever_it_is_given():
    config = ControllerConfig()
    base = _ConstantBase()
    teacher = LrOracleTeacher(base, _FakeVenv(), config.lr_scales, config.n_groups)
    observation = np.zeros((2, 43), dtype=np.float32)
    actions = [teacher.predict(observation=observation, deterministic=flag)[0] for flag in (False, True)]
    assert base.deterministic is True  # the base is asked for its deterministic action both times
    expected = np.tile(_ConstantBase.action, (2, 1))
    expected[:, config.n_groups] = [4, 1]  # the rungs nearest 1 / 0.5 (x1.5, the top) and 1 / 1.6 (x0.75)
    for action in actions:
        np.testing.assert_array_equal(action, expected)

"""A policy zip someone else made is loaded without unpickling anything in it (SB3 would run the code it holds)."""

import base64
import json
import pickle
import re
import zipfile

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.save_util import load_from_zip_file
from triaccel_rl.policies import LearnedPolicy, PolicyLoadError, make_policy, pretrained_policy_path

from triaccel_rl.actions import action_space
from triaccel_rl.config import ControllerConfig
from triaccel_rl.observation import OBS_HIGH, ObservationLayout

OBSERVATIONS = gym.spaces.Box(-OBS_HIGH, OBS_HIGH, (ObservationLayout(4).size,), np.float32)
ACTIONS = action_space(ControllerConfig())


class _WritesFile:
    """Unpickled, writes ``path``: what any code in a pickle could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return exec, (f"open({str(self.path)!r}, 'w').write('pwned')",)


class _OwnActivation(torch.nn.ReLU):
    """A class of the file author's own, which only unpickling could rebuild."""


def _payload(path):
    return base64.b64encode(pickle.dumps(_WritesFile(path))).decode()


def _rewritten(source, target, change):
    """A copy of the zip ``source`` at ``target`` whose settings (its ``data`` member) went through ``change``."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w") as copy:
        for name in original.namelist():
            member = original.read(name)
            if name == "data":
                settings = json.loads(member)
                change(settings)
                member = json.dumps(settings).encode()
            copy.writestr(name, member)
    return target


def _observations(count):
    return np.random.default_rng(0).uniform(-3, 3, (count, OBSERVATIONS.shape[0])).astype(np.float32)


def _trained(path, algorithm_class, **kwargs):
    """A zip of a few steps of training on random observations: cheap, and its weights are not the initial ones."""

    class Env(gym.Env):
        observation_space, action_space = OBSERVATIONS, ACTIONS

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            return self.observation_space.sample(), {}

        def step(self, action):
            return self.observation_space.sample(), float(action[0]), False, False, {}

    algorithm_class("MlpPolicy", Env(), n_steps=8, seed=0, device="cpu", **kwargs).learn(16).save(path)
    return path


def test_an_extra_pickled_entry_is_refused_without_running_it(tmp_path):
    """The review's repro: the shipped zip with one more pickled entry ran its code when loaded, then loaded."""
    written = tmp_path / "pwned.txt"
    evil = _rewritten(
        pretrained_policy_path(),
        tmp_path / "evil.zip",
        lambda settings: settings.update(extra_note={":type:": "x", ":serialized:": _payload(written)}),
    )
    message = (
        f"policy {str(evil)!r}: its 'extra_note' is a pickled object ('x'); the loader does not unpickle objects from "
        "a policy file (that would run any code the file holds)"
    )
    for load in (LearnedPolicy, lambda path: make_policy(str(path))):
        with pytest.raises(PolicyLoadError, match=f"^{re.escape(message)}$"):
            load(evil)
    assert not written.exists()


def test_a_space_whose_pickle_is_a_payload_is_rebuilt_from_its_readable_fields(tmp_path):
    written = tmp_path / "pwned.txt"
    evil = _rewritten(
        pretrained_policy_path(),
        tmp_path / "evil.zip",
        lambda settings: settings["observation_space"].update({":serialized:": _payload(written)}),
    )
    policy = LearnedPolicy(evil, OBSERVATIONS, ACTIONS)
    assert not written.exists()
    assert policy.observation_space == OBSERVATIONS and policy.action_space == ACTIONS
    shipped = LearnedPolicy(pretrained_policy_path())
    observations = _observations(8)
    np.testing.assert_array_equal(
        policy.predict(observations, deterministic=True)[0], shipped.predict(observations, deterministic=True)[0]
    )
    load_from_zip_file(evil)  # SB3's own loader runs the payload: the test's zip is a live one
    assert written.read_text() == "pwned"


@pytest.mark.parametrize(
    ("algorithm_class", "kwargs"),
    [
        (PPO, {"batch_size": 8}),
        (A2C, {}),  # its policy_kwargs always pickle RMSprop
        (PPO, {"batch_size": 8, "policy_kwargs": {"activation_fn": torch.nn.ReLU, "net_arch": [16]}}),
    ],
)
def test_a_freshly_trained_zip_predicts_as_sb3s_own_load_of_it(tmp_path, algorithm_class, kwargs):
    path = _trained(tmp_path / "policy.zip", algorithm_class, **kwargs)
    policy = LearnedPolicy(path, OBSERVATIONS, ACTIONS)
    reference = algorithm_class.load(path, device="cpu")
    assert type(policy.model) is algorithm_class
    assert type(policy.model.policy.optimizer) is type(reference.policy.optimizer)
    observations = _observations(16)
    np.testing.assert_array_equal(
        policy.predict(observations, deterministic=True)[0], reference.predict(observations, deterministic=True)[0]
    )


def test_the_shipped_policy_predicts_as_sb3s_own_load_of_it():
    policy = LearnedPolicy(pretrained_policy_path(), OBSERVATIONS, ACTIONS)
    reference = PPO.load(pretrained_policy_path(), device="cpu")
    assert policy.observation_space == reference.observation_space
    assert policy.action_space == reference.action_space
    observations = _observations(16)
    np.testing.assert_array_equal(
        policy.predict(observations, deterministic=True)[0], reference.predict(observations, deterministic=True)[0]
    )


def test_an_activation_of_the_authors_own_is_refused(tmp_path):
    path = _trained(tmp_path / "own.zip", PPO, batch_size=8, policy_kwargs={"activation_fn": _OwnActivation})
    with pytest.raises(PolicyLoadError) as caught:
        LearnedPolicy(path)
    assert str(caught.value) == (
        f"policy {str(path)!r}: its 'policy_kwargs' is a dict holding activation_fn={_OwnActivation}, not a torch "
        "optimizer or activation or an SB3 feature extractor; the loader does not unpickle objects from a policy file "
        "(that would run any code the file holds)"
    )


def _edit(settings, key, field, value):
    settings[key][field] = value


@pytest.mark.parametrize(
    ("key", "field", "value", "message"),
    [
        (
            "observation_space",
            "low",
            "[-10. -10. -10. ... -10. -10. -10.]",
            r"its 'observation_space' \(<class 'gymnasium.spaces.box.Box'>\) cannot be rebuilt from the readable "
            r"fields beside its pickle \(ValueError: numpy printed it summarised, without all its values",
        ),
        (
            "observation_space",
            "_shape",
            [44],
            r"its 'observation_space' .* \(ValueError: 43 values printed for shape \(44,\)\)",
        ),
        (
            "action_space",
            ":type:",
            "<class 'gymnasium.spaces.multi_binary.MultiBinary'>",
            r"its 'action_space' is a pickled <class 'gymnasium.spaces.multi_binary.MultiBinary'>: only Box, "
            r"Discrete and MultiDiscrete spaces are rebuilt; the loader does not unpickle",
        ),
        (
            "policy_class",
            "__module__",
            "my_policies",
            r"its 'policy_class' is a class of module 'my_policies', not stable-baselines3's MlpPolicy "
            r"\(stable_baselines3.common.policies\); the loader does not unpickle",
        ),
    ],
)
def test_a_pickled_entry_that_cannot_be_rebuilt_is_refused_by_name(tmp_path, key, field, value, message):
    path = _rewritten(
        pretrained_policy_path(), tmp_path / "edited.zip", lambda settings: _edit(settings, key, field, value)
    )
    with pytest.raises(PolicyLoadError, match=rf"^policy {re.escape(repr(str(path)))}: {message}"):
        LearnedPolicy(path)

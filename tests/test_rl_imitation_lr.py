"""The warm start's own step size (``imitate(learning_rate=...)``, ``train_policy(warm_start_learning_rate=...)``,
``train-policy --warm-start-lr``, ``train_pretrained.py --warm-start-lr``): the imitation stepped PPO's optimizer at
PPO's rate, so a rate that fits the teacher in 20 passes (3e-3) was PPO's too."""

import copy
import dataclasses
import json
import math
import re

import gymnasium as gym
import numpy as np
import pytest
import torch
from experiment_scripts import import_experiment

from triaccel_rl.actions import action_space
from triaccel_rl.cli import main
from triaccel_rl.config import ControllerConfig
from triaccel_rl.observation import OBS_HIGH, ObservationLayout
from triaccel_rl.rl import imitate, train_policy

_N_FEATURES = ObservationLayout(ControllerConfig().n_groups).size


class _Spaces(gym.Env):
    """The spaces of ``TriAccel-v0``, for building PPO; never stepped (imitate reads ``_FakeVenv``)."""

    observation_space = gym.spaces.Box(-OBS_HIGH, OBS_HIGH, (_N_FEATURES,), np.float32)
    action_space = action_space(ControllerConfig())


class _FakeVenv:
    """Two environments of seeded observations and rewards, an episode ending every fourth decision: the same
    decisions for every instance, in milliseconds (a real environment trains a model at each step)."""

    num_envs = 2

    def __init__(self):
        self.rng = np.random.default_rng(0)
        self.t = 0

    def _obs(self):
        return self.rng.uniform(-2, 2, (self.num_envs, _N_FEATURES)).astype(np.float32)

    def reset(self):
        return self._obs()

    def step(self, action):
        self.t += 1
        rewards = self.rng.normal(size=self.num_envs).astype(np.float32)
        return self._obs(), rewards, np.full(self.num_envs, self.t % 4 == 0), [{}] * self.num_envs


class _ReadingTeacher:
    """A fixed teacher that reads its input: the first group's precision and the LR rung follow two features' signs."""

    def predict(self, observation, state=None, episode_start=None, deterministic=False):
        observation = np.asarray(observation)
        action = np.tile(np.array([1, 1, 1, 1, 2, 1]), (len(observation), 1))
        action[:, 0] = np.where(observation[:, 0] > 0, 2, 0)
        action[:, 4] = np.where(observation[:, 1] > 0, 4, 0)
        return action, state


def _model(learning_rate=3e-4):
    from stable_baselines3 import PPO

    return PPO("MlpPolicy", _Spaces(), n_steps=32, batch_size=16, learning_rate=learning_rate, seed=0, device="cpu")


def _imitate_as_before(model, venv, teacher, n_steps, epochs=200, batch_size=64, gamma=0.99):
    """``imitate`` as it was before its ``learning_rate`` (the model's optimizer, at its rate): the path None keeps."""
    observations, actions, rewards, dones = [], [], [], []
    obs = venv.reset()
    for _ in range(max(1, n_steps // venv.num_envs)):
        action, _ = teacher.predict(obs, deterministic=True)
        action = np.asarray(action).reshape(venv.num_envs, -1)
        observations.append(obs)
        actions.append(action)
        obs, reward, done, _ = venv.step(action)
        rewards.append(reward)
        dones.append(done)
    returns = np.zeros((len(rewards), venv.num_envs), dtype=np.float32)
    running = np.zeros(venv.num_envs, dtype=np.float32)
    for t in reversed(range(len(rewards))):
        running = rewards[t] + gamma * running * (1.0 - dones[t])
        returns[t] = running
    policy = model.policy
    obs_t = torch.as_tensor(np.concatenate(observations), dtype=torch.float32)
    act_t = torch.as_tensor(np.concatenate(actions), dtype=torch.long)
    ret_t = torch.as_tensor(returns.reshape(-1), dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    policy.set_training_mode(True)
    for _ in range(epochs):
        for index in torch.randperm(len(obs_t), generator=generator).split(batch_size):
            values, log_prob, _ = policy.evaluate_actions(obs_t[index], act_t[index])
            loss = -log_prob.mean() + 0.5 * torch.nn.functional.mse_loss(values.flatten(), ret_t[index])
            policy.optimizer.zero_grad()
            loss.backward()
            policy.optimizer.step()
    policy.set_training_mode(False)
    with torch.no_grad():
        values, log_prob, _ = policy.evaluate_actions(obs_t, act_t)
        predicted = policy.get_distribution(obs_t).mode()
    return {
        "decisions": len(act_t),
        "nll": float(-log_prob.mean()),
        "value_mse": float(torch.nn.functional.mse_loss(values.flatten(), ret_t)),
        "agreement": float((predicted == act_t).all(dim=1).float().mean()),
    }


def _assert_same(a, b):
    """Equal nested state (dicts, lists, tensors bit for bit, numbers)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    else:
        assert a == b


_FIT = {"n_steps": 64, "epochs": 20, "batch_size": 16}  # 64 decisions, 4 updates a pass: 80 updates


@pytest.mark.usefixtures("one_torch_thread")
def test_without_a_rate_it_fits_as_before_with_the_models_optimizer():
    today, before = _model(), _model()
    fit = imitate(today, _FakeVenv(), _ReadingTeacher(), **_FIT)
    expected = _imitate_as_before(before, _FakeVenv(), _ReadingTeacher(), **_FIT)
    assert fit == expected
    _assert_same(today.policy.state_dict(), before.policy.state_dict())
    _assert_same(today.policy.optimizer.state_dict(), before.policy.optimizer.state_dict())
    assert today.policy.optimizer.state_dict()["state"][0]["step"] == 80  # PPO's optimizer took the fit's steps


@pytest.mark.usefixtures("one_torch_thread")
def test_a_rate_of_its_own_leaves_ppos_optimizer_as_it_was():
    model = _model()
    policy = model.policy
    # Moments of its own first, so that "as it was" is not just "empty"
    policy.optimizer.zero_grad()
    sum(p.square().sum() for p in policy.parameters()).backward()
    policy.optimizer.step()
    optimizer_before = copy.deepcopy(policy.optimizer.state_dict())
    weights_before = copy.deepcopy(policy.state_dict())
    imitate(model, _FakeVenv(), _ReadingTeacher(), learning_rate=3e-3, **_FIT)
    _assert_same(policy.optimizer.state_dict(), optimizer_before)
    assert policy.optimizer.param_groups[0]["lr"] == 3e-4
    assert not torch.equal(policy.action_net.weight, weights_before["action_net.weight"])  # the fit stepped


@pytest.mark.usefixtures("one_torch_thread")
def test_the_fit_runs_at_the_rate_given():
    # At PPO's own rate, a fresh optimizer of PPO's kind and settings steps as PPO's did: the same weights
    at_ppos, by_ppos = _model(), _model()
    imitate(at_ppos, _FakeVenv(), _ReadingTeacher(), learning_rate=3e-4, **_FIT)
    imitate(by_ppos, _FakeVenv(), _ReadingTeacher(), **_FIT)
    _assert_same(at_ppos.policy.state_dict(), by_ppos.policy.state_dict())
    assert at_ppos.policy.optimizer.state_dict()["state"] == {}  # PPO starts with no moments
    # A higher rate fits the same teacher further in the same passes, whatever PPO's own
    low = imitate(_model(), _FakeVenv(), _ReadingTeacher(), learning_rate=3e-4, **_FIT)
    high = imitate(_model(), _FakeVenv(), _ReadingTeacher(), learning_rate=3e-3, **_FIT)
    assert high["nll"] < low["nll"] - 0.5, (low, high)
    assert high["agreement"] > low["agreement"], (low, high)


class _Untouchable:
    num_envs = 2

    def reset(self):
        raise AssertionError("the teacher's decisions were collected before the rate was refused")


@pytest.mark.parametrize("bad", [0, -1e-3, math.nan, math.inf, False, "1e-3"])
def test_a_bad_rate_is_refused_by_name_before_anything_runs(bad, tmp_path):
    with pytest.raises(ValueError, match=re.escape(f"learning_rate={bad!r} must be a finite number > 0")):
        imitate(_model(), _Untouchable(), _ReadingTeacher(), n_steps=8, learning_rate=bad)
    message = f"warm_start_learning_rate={bad!r} must be a finite number > 0, the warm start's own Adam step size"
    with pytest.raises(ValueError, match=re.escape(message)):
        train_policy(["synthetic"], total_timesteps=8, warm_start="heuristic", warm_start_learning_rate=bad,
                     out=tmp_path / "p.zip")  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_the_cli_flag_names_itself(tmp_path, capsys):
    argv = ["train-policy", "--tasks", "synthetic", "--timesteps", "8", "--warm-start", "heuristic",
            "--warm-start-lr", "-1", "--out", str(tmp_path / "p.zip"), "--log-dir", ""]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--warm-start-lr -1.0 must be a finite number > 0, the warm start's own Adam step size\n" in err
    assert not (tmp_path / "p.zip").exists()


@pytest.mark.usefixtures("one_torch_thread", "frozen_gc")
def test_the_cli_warm_starts_at_the_rate_and_records_it(tmp_path, capsys):
    """The rate reaches the imitation and warm_start.json, and PPO's saved optimizer took PPO's updates only."""
    from stable_baselines3 import PPO

    out = tmp_path / "p.zip"
    argv = ["train-policy", "--tasks", "synthetic", "--timesteps", "16", "--n-envs", "1", "--vec", "dummy",
            "--n-steps", "16", "--batch-size", "16", "--interval-steps", "2", "--max-decisions", "3",
            "--budget-intervals", "2", "--torch-threads", "1", "--warm-start", "heuristic", "--warm-start-steps", "4",
            "--warm-start-epochs", "3", "--warm-start-lr", "0.003", "--out", str(out), "--log-dir", "",
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "warm_start.json").read_text())
    assert record["learning_rate"] == 0.003 and record["epochs"] == 3 and record["decisions"] == 4
    optimizer = PPO.load(out, device="cpu").policy.optimizer
    # One update of 16 decisions, SB3's 10 epochs of one minibatch: 10 steps (13 with the imitation's 3 passes)
    assert optimizer.state_dict()["state"][0]["step"] == 10
    assert optimizer.param_groups[0]["lr"] == 3e-4


def test_train_pretrained_passes_the_rate_and_the_card_shows_it(tmp_path, monkeypatch):
    import triaccel_rl.rl

    train_pretrained = import_experiment("train_pretrained")
    given = []

    class _Stop(Exception):
        pass

    def record(*args, **kwargs):
        given.append(kwargs["warm_start_learning_rate"])
        raise _Stop

    monkeypatch.setattr(triaccel_rl.rl, "train_policy", record)
    for args in (train_pretrained.Args(warm_start="heuristic", warm_start_lr=3e-3), train_pretrained.Args()):
        with pytest.raises(_Stop):
            train_pretrained.main(dataclasses.replace(args, run_dir=str(tmp_path), ship_dir=""))
    assert given == [3e-3, None]  # the default 0: PPO's optimizer, as the shipped policy's command ran
    assert "--warm-start-lr 0.003" in train_pretrained.command_line("x.py", train_pretrained.Args(warm_start_lr=3e-3))

    facts = {
        "args": dataclasses.asdict(train_pretrained.Args()), "command": "python experiments/train_pretrained.py",
        "training_tasks": ["synthetic"], "held_out_tasks": ["mlp-fmnist"], "timesteps_trained": 32, "wall_s": 1.0,
        "env_steps_per_s": 32.0, "shipped_from_checkpoint": None, "profile": "h200", "machine": "cpu",
        "commit": "abc", "date": "2026-12-07", "evaluations": [],
        "warm_start": {"teacher": "heuristic", "decisions": 8, "epochs": 20, "nll": 1.0, "value_mse": 1.0,
                       "agreement": 0.5, "learning_rate": 0.003},
    }  # fmt: skip

    def warm_row(facts):
        card = train_pretrained.model_card(facts)
        return next(line for line in card.splitlines() if line.startswith("| warm start |"))

    assert warm_row(facts) == (
        "| warm start | imitation of `heuristic` on 8 of its decisions before PPO (`triaccel_rl.rl.imitate`, Adam at "
        "`learning_rate=0.003` of its own; afterwards the deterministic policy matched 50% of them in every "
        "component) |"
    )
    del facts["warm_start"]["learning_rate"]  # PPO's optimizer: the row as before
    assert warm_row(facts) == (
        "| warm start | imitation of `heuristic` on 8 of its decisions before PPO (`triaccel_rl.rl.imitate`; "
        "afterwards the deterministic policy matched 50% of them in every component) |"
    )

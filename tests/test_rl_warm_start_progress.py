"""The warm start's progress bars (``imitate(progress_bar=...)``, ``train-policy --warm-start``): the teacher's
decisions were collected, and the fit run, with no output at all, minutes before PPO's bar appeared (228 s at 96
decisions)."""

import sys

import pytest
import torch
from triaccel_rl.policies import make_policy

from triaccel_rl.cli import main
from triaccel_rl.config import RewardConfig
from triaccel_rl.rl import env_config, imitate, make_env_fns


def _imitate_on_synthetic(progress_bar):
    """A fresh PPO imitating the heuristic for 4 decisions of one seeded ``synthetic`` environment, 3 passes."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv

    venv = DummyVecEnv(make_env_fns(["synthetic"], 1, 3, 2, reward_config=RewardConfig(budget_intervals=2)))
    venv.seed(0)
    model = PPO("MlpPolicy", venv, n_steps=8, batch_size=4, seed=0, device="cpu")
    try:
        fit = imitate(model, venv, make_policy("heuristic", env_config(2)), n_steps=4, epochs=3, batch_size=2,
                      progress_bar=progress_bar)  # fmt: skip
    finally:
        venv.close()
    return fit, model.policy.state_dict()


@pytest.mark.usefixtures("one_torch_thread", "frozen_gc")
def test_imitate_shows_its_bars_when_asked_nothing_otherwise_and_fits_the_same(capsys):
    capsys.readouterr()
    shown_fit, shown_weights = _imitate_on_synthetic(progress_bar=True)
    shown = capsys.readouterr()
    quiet_fit, quiet_weights = _imitate_on_synthetic(progress_bar=False)
    quiet = capsys.readouterr()

    # The last state of each bar, full; the collection's first, before its reset trains an interval
    lines = shown.err.split("\n")
    assert lines[0].split("\r")[1].startswith("warm start: teacher's decisions:   0%|")
    assert lines[0].split("\r")[-1].startswith("warm start: teacher's decisions: 100%|")
    assert "| 4/4 [" in lines[0].split("\r")[-1]
    assert lines[1].split("\r")[-1].startswith("warm start: fit: 100%|") and "| 3/3 [" in lines[1]
    assert shown.out == ""
    assert quiet.err == "" and quiet.out == ""

    # The bars only count: the same decisions, the same fit, bit for bit
    assert shown_fit == quiet_fit and shown_fit["decisions"] == 4
    assert shown_weights.keys() == quiet_weights.keys()
    for name, weight in shown_weights.items():
        assert torch.equal(weight, quiet_weights[name]), name


@pytest.mark.usefixtures("one_torch_thread", "frozen_gc")
def test_train_policy_cli_shows_the_warm_start_before_ppo_unless_no_progress(tmp_path, capsys, monkeypatch):
    argv = ["train-policy", "--tasks", "synthetic", "--timesteps", "8", "--n-envs", "1", "--vec", "dummy",
            "--n-steps", "8", "--batch-size", "8", "--interval-steps", "2", "--max-decisions", "3",
            "--budget-intervals", "2", "--torch-threads", "1", "--warm-start", "heuristic", "--warm-start-steps", "4",
            "--warm-start-epochs", "3", "--log-dir", ""]  # fmt: skip
    capsys.readouterr()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # the command draws its bars on a terminal only
    assert main([*argv, "--out", str(tmp_path / "shown" / "p.zip")]) == 0
    err = capsys.readouterr().err
    warm_start, _, ppo = err.partition("train-policy:")
    assert "warm start: teacher's decisions: 100%" in warm_start and "| 4/4 [" in warm_start
    assert "warm start: fit: 100%" in warm_start and "| 3/3 [" in warm_start
    assert "8/8" in ppo

    assert main([*argv, "--out", str(tmp_path / "quiet" / "p.zip"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "warm start:" not in err and "\r" not in err

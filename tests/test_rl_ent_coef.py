"""PPO's entropy bonus and step size (``train_policy(ent_coef=..., learning_rate=...)``, ``train-policy --ent-coef``,
``--learning-rate``): kept in the zip, replaced by a resume that gives them, refused by name when out of range."""

import math
import re

import numpy as np
import pytest

from triaccel_rl.cli import main
from triaccel_rl.rl import train_policy

_TINY = {"vec": "dummy", "n_envs": 1, "max_decisions": 3, "interval_steps": 2, "budget_intervals": 2,
         "torch_threads": 1, "n_steps": 8, "batch_size": 4}  # fmt: skip


def _ent_coef(path):
    from stable_baselines3 import PPO

    return PPO.load(path, device="cpu").ent_coef


@pytest.mark.usefixtures("one_torch_thread")
def test_the_bonus_is_trained_with_saved_and_kept_or_replaced_by_a_resume(tmp_path):
    out = train_policy(["synthetic"], total_timesteps=8, ent_coef=0.05, out=tmp_path / "a" / "p.zip", **_TINY)
    assert _ent_coef(out) == 0.05
    kept = train_policy(["synthetic"], total_timesteps=8, resume=out, out=tmp_path / "b" / "p.zip", **_TINY)
    assert _ent_coef(kept) == 0.05  # a resume without one keeps the policy's own
    replaced = train_policy(["synthetic"], total_timesteps=8, ent_coef=0, resume=out, out=tmp_path / "c" / "p.zip",
                            **_TINY)  # fmt: skip
    assert _ent_coef(replaced) == 0.0
    default = train_policy(["synthetic"], total_timesteps=8, out=tmp_path / "d" / "p.zip", **_TINY)
    assert _ent_coef(default) == 0.0  # SB3's default


def test_the_bonus_changes_what_ppo_learns(tmp_path):
    """The bonus reaches PPO's loss: the same run with and without it ends with other weights."""
    from stable_baselines3 import PPO

    weights = []
    for coef in (0.0, 1.0):
        path = train_policy(["synthetic"], total_timesteps=8, ent_coef=coef, out=tmp_path / f"{coef}" / "p.zip",
                            **_TINY)  # fmt: skip
        weights.append(PPO.load(path, device="cpu").policy.action_net.weight.detach().clone())
    assert not np.allclose(weights[0].numpy(), weights[1].numpy())


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf, True, "0.1", np.bool_(False)])
def test_a_bad_bonus_is_refused_by_name_before_any_environment(bad):
    with pytest.raises(ValueError, match=re.escape(f"ent_coef={bad!r} must be a finite number >= 0")):
        train_policy(["synthetic"], total_timesteps=8, ent_coef=bad, **_TINY)


def test_the_cli_flag_names_itself(tmp_path, capsys):
    argv = ["train-policy", "--tasks", "synthetic", "--timesteps", "8", "--ent-coef", "-1",
            "--out", str(tmp_path / "p.zip"), "--log-dir", ""]  # fmt: skip
    assert main(argv) == 2
    assert "--ent-coef -1.0 must be a finite number >= 0" in capsys.readouterr().err
    assert not (tmp_path / "p.zip").exists()


def test_a_resume_takes_any_real_number_as_a_float(tmp_path):
    """A resume passed the value as given to PPO: a Fraction failed in its loss, a NumPy float was saved as one."""
    from fractions import Fraction

    out = train_policy(["synthetic"], total_timesteps=8, out=tmp_path / "a" / "p.zip", **_TINY)
    for given, folder in ((Fraction(1, 20), "b"), (np.float32(0.25), "c")):
        resumed = train_policy(["synthetic"], total_timesteps=8, ent_coef=given, resume=out,
                               out=tmp_path / folder / "p.zip", **_TINY)  # fmt: skip
        saved = _ent_coef(resumed)
        assert type(saved) is float and saved == float(given)


def test_the_card_shows_the_shipped_checkpoints_own_bonus(tmp_path):
    """Shipped with --from-checkpoint, the card read the bonus (and the sizes) from the script's flags, not the zip."""
    from experiment_scripts import import_experiment

    train_pretrained = import_experiment("train_pretrained")
    checkpoint = train_policy(["synthetic"], total_timesteps=8, ent_coef=0.05, out=tmp_path / "run" / "policy.zip",
                              **_TINY)  # fmt: skip
    args = train_pretrained.Args(from_checkpoint=str(checkpoint), run_dir=str(tmp_path / "run"))  # flags not repeated
    facts = train_pretrained._facts(args, ("synthetic",), ("x",), checkpoint, tmp_path / "run", 1.0, "abc", None)
    assert facts["ppo"] == {"n_steps": 8, "batch_size": 4, "ent_coef": 0.05, "learning_rate": 3e-4}
    row = next(line for line in train_pretrained.model_card(facts).splitlines() if line.startswith("| algorithm |"))
    assert row == "| algorithm | PPO, `n_steps=8` per env, `batch_size=4`, `ent_coef=0.05`, other SB3 defaults |"


def test_the_step_size_is_trained_with_saved_and_kept_or_replaced_by_a_resume(tmp_path):
    from stable_baselines3 import PPO

    out = train_policy(["synthetic"], total_timesteps=8, learning_rate=1e-3, out=tmp_path / "a" / "p.zip", **_TINY)
    model = PPO.load(out, device="cpu")
    assert model.learning_rate == 1e-3 and model.lr_schedule(1.0) == 1e-3
    assert model.policy.optimizer.param_groups[0]["lr"] == 1e-3  # the updates ran at it
    kept = PPO.load(train_policy(["synthetic"], total_timesteps=8, resume=out, out=tmp_path / "b" / "p.zip", **_TINY))
    assert kept.learning_rate == 1e-3 and kept.policy.optimizer.param_groups[0]["lr"] == 1e-3
    given = train_policy(["synthetic"], total_timesteps=8, learning_rate=np.float32(0.5), resume=out,
                         out=tmp_path / "c" / "p.zip", **_TINY)  # fmt: skip
    replaced = PPO.load(given, device="cpu")
    assert type(replaced.learning_rate) is float and replaced.learning_rate == 0.5
    assert replaced.policy.optimizer.param_groups[0]["lr"] == 0.5  # the resumed updates ran at the new one


@pytest.mark.parametrize("bad", [0, -1e-3, math.nan, math.inf, False, "1e-3"])
def test_a_bad_step_size_is_refused_by_name(bad):
    with pytest.raises(ValueError, match=re.escape(f"learning_rate={bad!r} must be a finite number > 0")):
        train_policy(["synthetic"], total_timesteps=8, learning_rate=bad, **_TINY)

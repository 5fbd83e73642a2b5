import json
import re
import warnings
import zipfile
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from triaccel_rl.policies import LearnedPolicy, PolicyLoadError, make_policy

from triaccel_rl.actions import action_space
from triaccel_rl.config import ControllerConfig
from triaccel_rl.observation import ObservationLayout
from triaccel_rl.rl import train_policy

pytestmark = pytest.mark.usefixtures("frozen_gc")  # every environment reset runs gc.collect()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo") / "policy.zip"
    path = train_policy(
        ["synthetic"],
        total_timesteps=256,
        n_envs=2,
        vec="dummy",
        max_decisions=8,
        interval_steps=2,
        n_steps=128,
        batch_size=64,
        seed=0,
        out=out,
        log_dir=tmp_path_factory.mktemp("tb"),
        torch_threads=1,
    )
    return path


def test_ppo_trains_saves_and_reloads_identically(trained):
    from stable_baselines3 import PPO

    assert trained.is_file()
    model = PPO.load(trained, device="cpu")
    assert model.num_timesteps == 256  # two rollouts of 128 steps in each of 2 environments
    policy = LearnedPolicy(trained)
    observations = np.random.default_rng(0).uniform(-2, 2, (16, 43)).astype(np.float32)
    expected, _ = model.predict(observations, deterministic=True)
    actions, _ = policy.predict(observations, deterministic=True)
    np.testing.assert_array_equal(actions, expected)
    assert action_space(ControllerConfig()).contains(actions[0])


def test_shipped_name_wraps_the_policy_with_an_ood_fallback(trained, caplog):
    from triaccel_rl.policies import HeuristicPolicy

    from triaccel_rl.rl import obs_stats_path
    from triaccel_rl.shield import FallbackPolicy, ObservationStats

    stats = ObservationStats.load(obs_stats_path(trained))
    assert stats.n_observations == 256  # every observation trained on, none twice
    policy = make_policy(str(trained))
    assert isinstance(policy, FallbackPolicy)
    inside = np.array(stats.low, dtype=np.float32)  # a corner of the training range: in distribution
    np.testing.assert_array_equal(
        policy.predict(inside, deterministic=True)[0], policy.policy.predict(inside, deterministic=True)[0]
    )
    assert policy.fallbacks == 0
    far = np.array(stats.high, dtype=np.float32) + 5 * (np.array(stats.high) - np.array(stats.low) + 1)
    far = np.clip(far, -10, 10).astype(np.float32)
    far[0] = 10.0 if stats.high[0] < 4 else -10.0
    with caplog.at_level("WARNING", logger="triaccel_rl"):
        action, _ = policy.predict(far, deterministic=True)
    np.testing.assert_array_equal(action, HeuristicPolicy().predict(far)[0])
    assert policy.fallbacks == 1
    assert "outside the policy's training data" in caplog.text
    (feature,) = policy.fallback_features  # the log and the count name the feature furthest out
    index, distance = stats.worst_feature(far)
    assert feature == ObservationLayout(4).name(index) and distance > 1.0
    assert f"feature {feature} = " in caplog.text


def test_tensorboard_curves_are_written_and_a_resumed_run_continues_them(tmp_path, monkeypatch):
    """SB3 writes an update's ``train/*`` values with the next rollout's curves, at its end; a final dump wrote the last
    update's: the updates on 8 and on 16 steps both landed at 16 ([16, 16, 24])."""
    from stable_baselines3 import PPO
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    real_train, losses = PPO.train, []

    def record(self):
        real_train(self)
        losses.append((self.num_timesteps, self.logger.name_to_value["train/loss"]))

    monkeypatch.setattr(PPO, "train", record)
    out = tmp_path / "p.zip"
    common = {"n_steps": 8, "batch_size": 4, "out": out, "log_dir": tmp_path / "tb", **_TINY}
    train_policy(["synthetic"], total_timesteps=16, eval_tasks=["synthetic"], eval_every=8, **common)
    train_policy(["synthetic"], total_timesteps=8, resume=out, **common)
    (run,) = (tmp_path / "tb").iterdir()  # the resumed run writes on in the first one's folder
    events = EventAccumulator(str(run))
    events.Reload()
    steps = {tag: [point.step for point in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert steps["rollout/ep_rew_mean"] == [8, 16, 24]  # one point a rollout, the step count running on
    assert steps["eval/mean_reward"] == [8, 16]
    # Each update's loss once, at the steps it trained on (TensorBoard keeps float32)
    assert [(p.step, p.value) for p in events.Scalars("train/loss")] == [
        (step, float(np.float32(loss))) for step, loss in losses
    ]
    assert [step for step, _ in losses] == [8, 16, 24]


def test_policy_for_other_spaces_is_rejected(trained):
    import gymnasium as gym

    other = ControllerConfig(n_groups=2)
    with pytest.raises(PolicyLoadError, match=r"trained for observation space Box.*\(43,\).*has Box.*\(27,\)"):
        LearnedPolicy(trained, gym.spaces.Box(-10, 10, (27,), np.float32), action_space(other))


def test_bad_training_arguments():
    with pytest.raises(ValueError, match="unknown task"):
        train_policy(["nope"], total_timesteps=10)
    with pytest.raises(ValueError, match="batch_size=512 exceeds the rollout size"):
        train_policy(["synthetic"], total_timesteps=10, n_envs=1, n_steps=128, batch_size=512)
    # Each refused before any environment starts (SB3 raised an AssertionError, a worker died, or it trained on).
    bad = [
        ({"batch_size": 1}, "batch_size=1 must be a whole number >= 2"),
        ({"eval_every": -5}, "eval_every=-5 must be a whole number >= 0 (0: none)"),
        ({"checkpoint_every": -1}, "checkpoint_every=-1 must be a whole number >= 0 (0: none)"),
        ({"torch_threads": 0}, "torch_threads=0 must be a whole number >= 1"),
        ({"seed": -1}, "seed=-1 must be a whole number in [0, 4294967295]"),  # failed after the environments started
        ({"seed": 2**32}, "seed=4294967296 must be a whole number in [0, 4294967295]"),
        ({"resume": "/nonexistent/policy.zip"}, "resume='/nonexistent/policy.zip': no such policy zip"),
        ({"eval_tasks": ["synthetic"]}, "eval_tasks=synthetic and eval_every=0: give both"),
        ({"eval_every": 64}, "eval_every=64 and eval_tasks=(none): give both"),  # the CLI names --eval-tasks now
        # SB3's "Error: the file ... wasn't a zip-file", after a warning about a stats file beside it.
        ({"resume": __file__}, f"resume={__file__!r} is not a zip file"),
        ({"config": ControllerConfig(n_groups=2)}, "config: the training environments run env_config"),
        ({"out": "runs/policy-v1.2"}, "out='runs/policy-v1.2' must name a .zip file"),  # SB3 saved policy-v1.2.zip
        # A worker's traceback and "Connection reset by peer" (subprocess workers), or a late failure, before.
        ({"max_decisions": 0}, "max_decisions=0 must be a whole number >= 1"),
        # Imitated one decision and recorded -100 in warm_start.json.
        (
            {"warm_start": "heuristic", "warm_start_steps": -100},
            "warm_start_steps=-100 and warm_start_epochs=200 must be whole numbers >= 1",
        ),
        # Sizes that are not whole: batch_size=4.5 failed in SB3 after a whole rollout, n_envs=1.5 named no argument,
        # checkpoint_every=2.5 was taken.
        ({"batch_size": 4.5}, "batch_size=4.5 must be a whole number >= 2"),
        ({"n_envs": 1.5}, "n_envs=1.5 must be a whole number >= 1"),
        ({"checkpoint_every": 2.5}, "checkpoint_every=2.5 must be a whole number >= 0"),
        ({"warm_start": "heuristic", "warm_start_epochs": 2.5}, "warm_start_epochs=2.5 must be whole numbers >= 1"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=re.escape(message)):
            train_policy(["synthetic"], total_timesteps=10, **{"n_envs": 1, "n_steps": 8, "batch_size": 4, **kwargs})


class _ConstantTeacher:
    """Always the same action: bf16 in every group, LR x1, keep the batch."""

    action = np.array([1, 1, 1, 1, 2, 1])

    def predict(self, observation, state=None, episode_start=None, deterministic=False):
        return np.tile(self.action, (len(observation), 1)), state


@pytest.mark.usefixtures("one_torch_thread")
def test_imitate_fits_the_teacher_and_warm_start_writes_its_fit(tmp_path):
    import json

    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv

    from triaccel_rl.config import RewardConfig
    from triaccel_rl.rl import imitate, make_env_fns

    fns = make_env_fns(["synthetic"], 1, None, 2, reward_config=RewardConfig(budget_intervals=2))
    venv = DummyVecEnv(fns)
    venv.seed(0)
    model = PPO("MlpPolicy", venv, n_steps=32, batch_size=16, seed=0, device="cpu")
    fit = imitate(model, venv, _ConstantTeacher(), n_steps=24, epochs=30, batch_size=8)
    venv.close()
    # A constant action is learnt exactly: every collected decision's mode is the teacher's.
    assert fit["agreement"] == 1.0
    assert set(fit) == {"decisions", "nll", "value_mse", "agreement"} and fit["decisions"] == 24
    actions, _ = model.predict(np.zeros((4, 43), dtype=np.float32), deterministic=True)
    np.testing.assert_array_equal(actions, np.tile(_ConstantTeacher.action, (4, 1)))

    out = train_policy(["synthetic"], total_timesteps=32, n_envs=1, vec="dummy", interval_steps=2, n_steps=32,
                       batch_size=16, out=tmp_path / "p.zip", warm_start="heuristic", warm_start_steps=8,
                       budget_intervals=2)  # fmt: skip
    record = json.loads((out.parent / "warm_start.json").read_text())
    assert record["teacher"] == "heuristic" and record["decisions"] == 8
    assert 0.0 <= record["agreement"] <= 1.0
    # Imitated in whole rounds of the environments: 3 asked of 2 environments imitated 2 (and 3 was recorded)
    out = train_policy(["synthetic"], total_timesteps=32, n_envs=2, vec="dummy", interval_steps=2, n_steps=16,
                       batch_size=16, out=tmp_path / "q.zip", warm_start="heuristic", warm_start_steps=3,
                       budget_intervals=2)  # fmt: skip
    assert json.loads((out.parent / "warm_start.json").read_text())["decisions"] == 2


@pytest.mark.usefixtures("one_torch_thread")
def test_a_diverged_warm_start_fit_is_written_as_null(monkeypatch, tmp_path):
    """An imitation whose losses went NaN or infinite is written to warm_start.json as strict JSON, the losses as null
    (before, ``json.dumps`` wrote ``NaN`` and ``Infinity``, which strict parsers refuse)."""
    import math

    from experiment_scripts import strict_json

    import triaccel_rl.rl

    monkeypatch.setattr(
        triaccel_rl.rl,
        "imitate",
        lambda *a, **k: {"decisions": 8, "nll": math.inf, "value_mse": math.nan, "agreement": 0.5},
    )
    out = train_policy(["synthetic"], total_timesteps=32, n_envs=1, vec="dummy", interval_steps=2, n_steps=32,
                       batch_size=16, out=tmp_path / "p.zip", warm_start="heuristic", warm_start_steps=8,
                       budget_intervals=2)  # fmt: skip
    record = strict_json((out.parent / "warm_start.json").read_text())
    assert record == {"teacher": "heuristic", "decisions": 8, "epochs": record["epochs"], "nll": None,
                      "value_mse": None, "agreement": 0.5}  # fmt: skip


class _ProgressTeacher:
    """Reads its input: LR x1.5 in the first half of the budget, x1 after (the observation's ``progress``)."""

    progress = ObservationLayout(ControllerConfig().n_groups).globals("progress")

    def __init__(self):
        self.given = []

    def predict(self, observation, state=None, episode_start=None, deterministic=False):
        lr = np.where(np.asarray(observation)[:, self.progress] < 0.5, 4, 2)
        self.given += lr.tolist()
        return np.stack([np.array([1, 1, 1, 1, rung, 1]) for rung in lr]), state


@pytest.mark.usefixtures("one_torch_thread")
def test_imitate_fits_a_teacher_that_reads_its_input():
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv

    from triaccel_rl.config import RewardConfig
    from triaccel_rl.rl import imitate, make_env_fns

    fns = make_env_fns(["synthetic"], 1, None, 2, reward_config=RewardConfig(budget_intervals=6))
    venv = DummyVecEnv(fns)
    venv.seed(0)
    model = PPO("MlpPolicy", venv, n_steps=32, batch_size=16, seed=0, device="cpu")
    teacher = _ProgressTeacher()
    fit = imitate(model, venv, teacher, n_steps=48, epochs=1500, batch_size=48)  # updates: as 200 passes of 1024
    venv.close()
    majority = max(teacher.given.count(4), teacher.given.count(2)) / len(teacher.given)
    assert majority <= 0.8  # the teacher's actions are mixed: a constant cannot score what follows
    assert fit["agreement"] >= 0.95


class _FakeVenv:
    """Two environments whose episodes had their LR multiplied by the given factors."""

    num_envs = 2

    def __init__(self, factors):
        self.factors = factors

    def get_attr(self, name):
        assert name == "base_lr_factor"
        return list(self.factors)


def test_lr_oracle_teacher_undoes_each_episodes_mistuning():
    from triaccel_rl.rl import LrOracleTeacher

    config = ControllerConfig()  # lr_scales (0.5, 0.75, 1.0, 1.25, 1.5), 4 groups: the LR index is action[4]
    teacher = LrOracleTeacher(_ConstantTeacher(), _FakeVenv([0.5, 1.6]), config.lr_scales, config.n_groups)
    # 1 / factor, nearest rung in log: 2.5 -> 1.5, 1.4 -> 1.5, 1.0 -> 1.0, 0.8 -> 0.75, 0.5 -> 0.5, 1.18 -> 1.25.
    assert [teacher.rung_for(f) for f in (0.4, 0.7, 1.0, 1.25, 2.0, 0.85)] == [4, 4, 2, 1, 0, 3]
    actions, _ = teacher.predict(np.zeros((2, 43), dtype=np.float32))
    expected = np.tile(_ConstantTeacher.action, (2, 1))
    expected[:, 4] = [4, 1]  # factor 0.5 -> x2 wanted, the ladder's top 1.5; factor 1.6 -> 0.625, nearest 0.75 (log)
    np.testing.assert_array_equal(actions, expected)


def test_env_exposes_its_episodes_lr_factor_through_the_task_cycle():
    from stable_baselines3.common.vec_env import DummyVecEnv

    from triaccel_rl.config import RewardConfig
    from triaccel_rl.rl import make_env_fns

    fns = make_env_fns(["synthetic"], 1, None, 2, reward_config=RewardConfig(budget_intervals=2), lr_range=(0.5, 2.0))
    venv = DummyVecEnv(fns)
    venv.seed(3)
    venv.reset()
    (factor,) = venv.get_attr("base_lr_factor")
    assert factor == venv.reset_infos[0]["base_lr_factor"] and 0.5 <= factor <= 2.0 and factor != 1.0
    venv.close()


def test_learned_policy_starts_where_the_heuristic_starts(trained):
    """Before its first decision (one interval in) a learned policy runs in the heuristic's start precision."""
    from dataclasses import replace

    from triaccel_rl.compare import run_controller
    from triaccel_rl.config import HeuristicConfig
    from triaccel_rl.types import Precision

    assert LearnedPolicy(trained).initial_precision is None  # loaded bare: the model's own precision
    assert make_policy(str(trained)).initial_precision is Precision.BF16  # wrapped in the fallback, as shipped
    fp16_start = replace(ControllerConfig(), heuristic=HeuristicConfig(start_precision="fp16"))
    assert make_policy(str(trained), fp16_start).initial_precision is Precision.FP16
    # In a run, the first interval (before any decision) trains in that precision: the trace's first row.
    untried = ControllerConfig(interval_steps=4, heuristic=HeuristicConfig(speed_trial=False))
    result = run_controller("synthetic", str(trained), 0, epochs=0.2, config=untried, device="cpu")
    assert set(result.trace[0]["precisions"]) == {int(Precision.BF16)}
    # With the speed trial (on by default), in the format it picks: the shipped profile charges fp16 less.
    tried = run_controller("synthetic", str(trained), 0, epochs=0.2, config=ControllerConfig(interval_steps=4))
    assert set(tried.trace[0]["precisions"]) == {int(Precision.FP16)}


class _Stub:
    """A policy whose action is a function of the observation."""

    def __init__(self, act):
        self.act = act

    def predict(self, obs, state=None, episode_start=None, deterministic=False):
        return np.stack([self.act(row) for row in obs]), state


def _stats(n_groups=4):
    from triaccel_rl.shield import ObservationStats

    size = ObservationLayout(n_groups).size
    return ObservationStats(tuple([-1.0] * size), tuple([1.0] * size), 10)


def test_action_spread_tells_a_constant_policy_from_one_that_reads_its_input():
    from triaccel_rl.rl import action_spread

    constant = action_spread(_Stub(lambda row: np.array([0, 1, 1, 1, 4, 1])), _stats(), samples=500)
    assert (constant.distinct, constant.mode, constant.mode_share) == (1, (0, 1, 1, 1, 4, 1), 1.0)
    assert constant.entry_mode_share == (1.0,) * 6

    layout = ObservationLayout(4)
    one_hot = [layout.group(0, name) for name in ("is_fp32", "is_bf16", "is_fp16")]

    def follows_group_0(row):  # keeps group 0 where it is; raises the LR when the loss feature is positive
        return np.array([int(np.argmax(row[one_hot])), 1, 1, 1, 3 if row[layout.globals("log_loss")] > 0 else 2, 1])

    spread = action_spread(_Stub(follows_group_0), _stats(), samples=3000)
    assert spread.distinct == 6  # 3 precisions x 2 LR rungs: the one-hots are valid and drawn uniformly
    assert 1 / 6 <= spread.mode_share < 0.2
    assert spread.entry_mode_share[1:4] == (1.0, 1.0, 1.0) and spread.entry_mode_share[5] == 1.0
    assert 0.3 < spread.entry_mode_share[0] < 0.37 and 0.45 < spread.entry_mode_share[4] < 0.55


def test_action_spread_rejects_bad_input():
    from triaccel_rl.rl import action_spread
    from triaccel_rl.shield import ObservationStats

    stub = _Stub(lambda row: np.zeros(6, dtype=np.int64))
    with pytest.raises(ValueError, match="samples=0 must be a whole number >= 1"):
        action_spread(stub, _stats(), samples=0)
    # Not whole numbers: NumPy's TypeError ("'float' object cannot be interpreted as an integer") named no argument
    for samples in (10.0, 2.5, True):
        with pytest.raises(ValueError, match=rf"^samples={samples!r} must be a whole number >= 1$"):
            action_spread(stub, _stats(), samples=samples)
    assert action_spread(stub, _stats(), samples=np.int64(3)).samples == 3  # NumPy's integers are whole numbers
    with pytest.raises(ValueError, match="observation stats have 5 features"):
        action_spread(stub, ObservationStats((0.0,) * 5, (1.0,) * 5, 1))


@pytest.mark.usefixtures("one_torch_thread")
def test_training_warns_when_the_policy_it_trained_is_a_constant(tmp_path, monkeypatch, caplog):
    import triaccel_rl.rl as rl

    seen = []

    def constant(policy, stats, samples=2048, seed=0):
        seen.append(len(stats.low))
        return rl.ActionSpread(samples, 1, (0, 1, 1, 1, 4, 1), 1.0, (1.0,) * 6)

    monkeypatch.setattr(rl, "action_spread", constant)
    with caplog.at_level("WARNING", logger="triaccel_rl"):
        train_policy(["synthetic"], total_timesteps=16, n_envs=1, vec="dummy", max_decisions=4, interval_steps=2,
                     n_steps=16, batch_size=8, seed=0, out=tmp_path / "policy.zip")  # fmt: skip
    assert seen == [ObservationLayout(ControllerConfig().n_groups).size]  # run on the saved stats
    assert "takes the same action [0, 1, 1, 1, 4, 1] on all 2048 observations" in caplog.text
    assert "learned a constant" in caplog.text


_TINY = {"vec": "dummy", "n_envs": 1, "max_decisions": 3, "interval_steps": 2, "budget_intervals": 2,
         "torch_threads": 1}  # fmt: skip


def _tasks_and_seed(record: Path) -> dict:
    """The held-out tasks and seed an ``evaluations.json`` records (it records what defines their episodes too)."""
    recorded = json.loads(record.read_text())
    return {"tasks": recorded["tasks"], "seed": recorded["seed"]}


def test_training_without_a_log_dir_leaves_no_folder_in_the_temp_dir(tmp_path, monkeypatch):
    """Without ``log_dir`` SB3 configured its default logger, which made an empty ``SB3-<time>`` folder in the temp
    dir at every call: the test suite left 1410 of them in /tmp."""
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    train_policy(["synthetic"], total_timesteps=8, n_steps=8, batch_size=4, out=tmp_path / "p.zip", **_TINY)
    assert list(scratch.iterdir()) == []
    assert (tmp_path / "p.zip").is_file()


def test_checkpoints_carry_the_observation_range_they_were_trained_on(tmp_path):
    """Checkpoints were SB3's bare zips: loaded, they had no out-of-distribution fallback, and a run resumed from one
    saved the range of its own observations only (the first run's were lost)."""
    import torch
    from stable_baselines3 import PPO

    from triaccel_rl.shield import FallbackPolicy, ObservationStats

    train_policy(["synthetic"], total_timesteps=16, n_steps=8, batch_size=4, checkpoint_every=8,
                 out=tmp_path / "policy.zip", **_TINY)  # fmt: skip
    folder = tmp_path / "checkpoints"
    # Each is taken after the update on its rollout (once, before: step 8's held untrained weights under the name
    # of 8 steps, and step 16's the first rollout's update under 16, so a run resumed from it skipped the second).
    assert sorted(p.name for p in folder.iterdir()) == [
        "policy_16_steps.obs.json", "policy_16_steps.zip", "policy_8_steps.obs.json", "policy_8_steps.zip"]  # fmt: skip
    assert ObservationStats.load(folder / "policy_8_steps.obs.json").n_observations == 8
    stats = ObservationStats.load(folder / "policy_16_steps.obs.json")
    assert stats.n_observations == 16  # the two rollouts its weights were trained on
    assert PPO.load(folder / "policy_16_steps.zip", device="cpu").num_timesteps == 16
    final = PPO.load(tmp_path / "policy.zip", device="cpu")
    saved = PPO.load(folder / "policy_16_steps.zip", device="cpu")
    for a, b in zip(final.policy.parameters(), saved.policy.parameters(), strict=True):
        assert torch.equal(a, b)  # the last checkpoint is the finished policy
    assert stats.lr_scales == ControllerConfig().lr_scales
    assert isinstance(make_policy(str(folder / "policy_16_steps.zip")), FallbackPolicy)

    resumed = train_policy(["synthetic"], total_timesteps=8, resume=folder / "policy_16_steps.zip",
                           out=tmp_path / "resumed.zip", **_TINY)  # fmt: skip
    assert ObservationStats.load(resumed.with_suffix(".obs.json")).n_observations == 24  # 16 before, 8 now


def test_an_interrupted_run_keeps_a_checkpoint_it_resumes_from(tmp_path, monkeypatch, caplog):
    """Ctrl-C lost everything since the last periodic checkpoint (all of it without --checkpoint-every), and with
    subprocess workers (which the signal stops too) closing them raised over the KeyboardInterrupt."""
    from stable_baselines3 import PPO

    from triaccel_rl.shield import ObservationStats

    real_train, calls = PPO.train, []

    def interrupted_on_the_second_update(self):
        calls.append(self.num_timesteps)
        if len(calls) == 2:
            for process in self.env.processes:  # as the terminal's SIGINT stops the workers
                process.terminate()
                process.join()
            raise KeyboardInterrupt
        real_train(self)

    monkeypatch.setattr(PPO, "train", interrupted_on_the_second_update)
    out = tmp_path / "policy.zip"
    with (
        caplog.at_level("WARNING", logger="triaccel_rl"),
        pytest.raises(KeyboardInterrupt),
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        train_policy(["synthetic"], total_timesteps=64, n_envs=2, vec="subproc", n_steps=4, batch_size=4,
                     max_decisions=3, interval_steps=2, budget_intervals=2, torch_threads=1, out=out,
                     eval_tasks=["synthetic"], eval_every=64)  # fmt: skip
    # SB3's "Training and eval env are not of the same type" (subprocess training, in-process evaluation) is dropped.
    assert not [w for w in caught if "not of the same type" in str(w.message)]
    assert calls == [8, 16]
    # Interrupted in the update on the second rollout: the weights are the first update's, and the checkpoint says
    # 8 steps (it said 16: a run resumed from it would have skipped the second rollout).
    checkpoint = tmp_path / "checkpoints" / "policy_8_steps.zip"
    assert (
        f"training interrupted at step 16: saved {checkpoint}, the weights of the last update (8 steps), and its "
        f"observation stats {checkpoint.with_suffix('.obs.json')}; continue with resume={checkpoint}"
    ) in caplog.text
    assert not out.exists()  # the finished policy's name is left for a finished policy
    assert PPO.load(checkpoint, device="cpu").num_timesteps == 8
    assert ObservationStats.load(checkpoint.with_suffix(".obs.json")).n_observations == 8  # the rollout trained on

    monkeypatch.setattr(PPO, "train", real_train)
    resumed = train_policy(["synthetic"], total_timesteps=8, n_steps=8, batch_size=4, resume=checkpoint, out=out,
                           **_TINY)  # fmt: skip
    assert PPO.load(resumed, device="cpu").num_timesteps == 16  # the step count continues
    assert ObservationStats.load(resumed.with_suffix(".obs.json")).n_observations == 16


def test_a_policy_whose_final_save_fails_keeps_its_weights_as_a_checkpoint(tmp_path, caplog):
    """A folder where the zip goes (or a full disk): the whole run trained, then the save raised and the weights were
    lost (only Ctrl-C kept a checkpoint)."""
    from stable_baselines3 import PPO

    out = tmp_path / "policy.zip"
    out.mkdir()
    with caplog.at_level("ERROR", logger="triaccel_rl"), pytest.raises(OSError):
        train_policy(["synthetic"], total_timesteps=8, n_steps=8, batch_size=4, out=out, **_TINY)
    checkpoint = tmp_path / "checkpoints" / "policy_8_steps.zip"
    assert f"saving the policy to {out} failed: the trained weights are in {checkpoint}" in caplog.text
    assert PPO.load(checkpoint, device="cpu").num_timesteps == 8


def test_interrupted_inside_an_update_the_checkpoint_holds_the_last_whole_update(tmp_path, monkeypatch):
    """Ctrl-C between two gradient steps of PPO's update saved the half-updated weights, under the file name of the
    last whole update's checkpoint (which it overwrote)."""
    from stable_baselines3 import PPO

    common = {"n_steps": 8, "batch_size": 4, "seed": 3, **_TINY}
    whole = train_policy(["synthetic"], total_timesteps=8, out=tmp_path / "one" / "policy.zip", **common)
    gradient_steps = 2 * 10  # a rollout of 8 in minibatches of 4, PPO's 10 epochs
    real_step, calls = torch.optim.Adam.step, []

    def interrupted_in_the_second_update(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == gradient_steps + 3:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", interrupted_in_the_second_update)
    with pytest.raises(KeyboardInterrupt):
        train_policy(["synthetic"], total_timesteps=64, out=tmp_path / "two" / "policy.zip", checkpoint_every=8,
                     **common)  # fmt: skip
    saved = PPO.load(tmp_path / "two" / "checkpoints" / "policy_8_steps.zip", device="cpu").policy.state_dict()
    expected = PPO.load(whole, device="cpu").policy.state_dict()
    assert saved.keys() == expected.keys()
    for name in saved:
        assert torch.equal(saved[name], expected[name]), name


def test_a_resumed_run_draws_from_its_seed_and_the_steps_trained(tmp_path, monkeypatch, first_run):
    """PPO.load seeded the environments and PPO with the seed saved in the zip: a resumed run ignored ``seed`` and
    replayed the first run's episodes from its start."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv

    common = {"n_steps": 8, "batch_size": 4, **_TINY}
    first = first_run(["synthetic"], total_timesteps=8, out=tmp_path / "a" / "policy.zip", seed=0, **common)
    real_seed, seeds = DummyVecEnv.seed, []

    def record(self, seed=None):
        seeds.append(seed)
        return real_seed(self, seed)

    monkeypatch.setattr(DummyVecEnv, "seed", record)
    resumed = train_policy(["synthetic"], total_timesteps=8, out=tmp_path / "b" / "policy.zip", seed=7, resume=first,
                           **common)  # fmt: skip
    assert seeds[-1] == 7 + 8  # the last seeding before the rollouts: the saved zip's 0 was the last before
    assert PPO.load(resumed, device="cpu").seed == 15
    # Near the top of the seed range it wraps round (2**32 + 4 was refused by NumPy: the resume failed)
    top = train_policy(["synthetic"], total_timesteps=8, out=tmp_path / "c" / "policy.zip", seed=2**32 - 4,
                       resume=first, **common)  # fmt: skip
    assert seeds[-1] == 4 and PPO.load(top, device="cpu").seed == 4


def test_a_resumed_run_checkpoints_at_the_runs_multiples(tmp_path):
    """The schedule counted steps from the resume: resumed at 24 with checkpoints every 16, the run wrote one 16 steps
    after the resume (40) and none at 32 or at 48, where its multiples fall."""
    common = {"n_steps": 8, "batch_size": 4, "checkpoint_every": 16, "eval_every": 16, "eval_tasks": ["synthetic"]}
    first = train_policy(["synthetic"], total_timesteps=24, out=tmp_path / "policy.zip", **common, **_TINY)
    train_policy(["synthetic"], total_timesteps=24, out=tmp_path / "policy.zip", resume=first, **common, **_TINY)
    written = sorted((tmp_path / "checkpoints").glob("*.zip"), key=lambda path: int(path.stem.split("_")[1]))
    assert [path.name for path in written] == ["policy_16_steps.zip", "policy_32_steps.zip", "policy_48_steps.zip"]
    # And so do the evaluations (they fell at 16 and 40: SB3 counts its calls from the resume)
    assert np.load(tmp_path / "eval" / "evaluations.npz")["timesteps"].tolist() == [16, 32, 48]


def test_resuming_keeps_the_earlier_evaluations(tmp_path, caplog, first_run):
    """SB3's EvalCallback rewrites evaluations.npz from its own history: a resumed run replaced the first run's
    evaluations with its own."""
    out = tmp_path / "policy.zip"
    evaluations = tmp_path / "eval" / "evaluations.npz"
    common = {"n_steps": 8, "batch_size": 4, "out": out, "eval_every": 8, **_TINY}
    first_run(["synthetic"], total_timesteps=16, eval_tasks=["synthetic"], **common)
    first = dict(np.load(evaluations))
    assert first["timesteps"].tolist() == [8, 16]
    train_policy(["synthetic"], total_timesteps=8, eval_tasks=["synthetic"], resume=out, **common)
    resumed = dict(np.load(evaluations))
    assert resumed["timesteps"].tolist() == [8, 16, 24]
    np.testing.assert_array_equal(resumed["results"][:2], first["results"])
    np.testing.assert_array_equal(resumed["ep_lengths"][:2], first["ep_lengths"])
    # Two held-out episodes an evaluation cannot share the arrays of one: the old file is moved aside, kept.
    with caplog.at_level("WARNING", logger="triaccel_rl"):
        train_policy(["synthetic"], total_timesteps=8, eval_tasks=["synthetic", "synthetic"], resume=out, **common)
    aside = tmp_path / "eval" / "evaluations_until_24_steps.npz"
    assert f"moved it to {aside}" in caplog.text
    assert np.load(aside)["timesteps"].tolist() == [8, 16, 24]
    assert np.load(evaluations)["timesteps"].tolist() == [32]


def test_a_run_resumed_from_an_earlier_checkpoint_keeps_what_it_replaces(tmp_path, caplog):
    """Resumed from the 8-step checkpoint into its own folder, the run overwrote the first run's 16-step checkpoint,
    left its 24- and 32-step ones among the new, and dropped its evaluations past 8, all unsaid."""
    out = tmp_path / "policy.zip"
    common = {"n_steps": 8, "batch_size": 4, "out": out, "checkpoint_every": 8, "eval_every": 8, **_TINY}
    train_policy(["synthetic"], total_timesteps=32, eval_tasks=["synthetic"], **common)
    checkpoints = tmp_path / "checkpoints"
    first_16 = (checkpoints / "policy_16_steps.zip").read_bytes()
    with caplog.at_level("WARNING", logger="triaccel_rl"):
        train_policy(
            ["synthetic"], total_timesteps=8, eval_tasks=["synthetic"], resume=checkpoints / "policy_8_steps.zip",
            **common,
        )  # fmt: skip
    aside = checkpoints / "replaced_after_8_steps"
    assert sorted(p.name for p in aside.glob("*.zip")) == [f"policy_{n}_steps.zip" for n in (16, 24, 32)]
    assert (aside / "policy_16_steps.zip").read_bytes() == first_16 and (aside / "policy_16_steps.obs.json").is_file()
    assert sorted(p.name for p in checkpoints.glob("*.zip")) == ["policy_16_steps.zip", "policy_8_steps.zip"]
    kept = tmp_path / "eval" / "evaluations_replaced_after_8_steps.npz"
    assert np.load(kept)["timesteps"].tolist() == [8, 16, 24, 32]
    assert np.load(tmp_path / "eval" / "evaluations.npz")["timesteps"].tolist() == [8, 16]
    assert "moved to" in caplog.text and f"is kept as {kept}" in caplog.text


def test_a_second_resume_from_the_same_checkpoint_keeps_what_the_first_set_aside(tmp_path, caplog, first_run):
    """Two runs resumed from one checkpoint into its folder: the second moved the first resumed run's checkpoints
    into replaced_after_8_steps/ over the original run's, which the first had put there, and copied its evaluations
    over theirs: the original run's weights and evaluations past step 8 were lost, unsaid."""
    out = tmp_path / "policy.zip"
    common = {"n_steps": 8, "batch_size": 4, "out": out, "checkpoint_every": 8, "eval_every": 8,
              "eval_tasks": ["synthetic"], **_TINY}  # fmt: skip
    checkpoints, evaluations = tmp_path / "checkpoints", tmp_path / "eval"
    start = checkpoints / "policy_8_steps.zip"
    first_run(["synthetic"], total_timesteps=24, **common)
    original_16 = (checkpoints / "policy_16_steps.zip").read_bytes()
    train_policy(["synthetic"], total_timesteps=8, resume=start, **common)
    resumed_16 = (checkpoints / "policy_16_steps.zip").read_bytes()
    assert resumed_16 != original_16
    with caplog.at_level("WARNING", logger="triaccel_rl"):
        train_policy(["synthetic"], total_timesteps=8, resume=start, **common)
    first, second = checkpoints / "replaced_after_8_steps", checkpoints / "replaced_after_8_steps_2"
    assert sorted(p.name for p in first.glob("*.zip")) == ["policy_16_steps.zip", "policy_24_steps.zip"]
    assert (first / "policy_16_steps.zip").read_bytes() == original_16
    assert sorted(p.name for p in second.iterdir()) == ["policy_16_steps.obs.json", "policy_16_steps.zip"]
    assert (second / "policy_16_steps.zip").read_bytes() == resumed_16
    assert f"moved to {second}" in caplog.text
    assert np.load(evaluations / "evaluations_replaced_after_8_steps.npz")["timesteps"].tolist() == [8, 16, 24]
    kept = evaluations / "evaluations_replaced_after_8_steps_2.npz"
    assert np.load(kept)["timesteps"].tolist() == [8, 16] and f"is kept as {kept}" in caplog.text


def test_a_checkpoint_set_aside_is_not_resumed_into_its_folder(tmp_path, caplog, first_run):
    """Resumed into its folder, a checkpoint set aside in replaced_after_8_steps/ continued among the replacing run's
    checkpoints past 8 (two runs' weights in checkpoints/), and its run's evaluations were not found: the curve
    restarted at the resume."""
    out = tmp_path / "run" / "policy.zip"
    common = {"n_steps": 8, "batch_size": 4, "checkpoint_every": 8, "eval_every": 8, "eval_tasks": ["synthetic"],
              **_TINY}  # fmt: skip
    checkpoints = out.parent / "checkpoints"
    first_run(["synthetic"], total_timesteps=24, out=out, **common)
    train_policy(["synthetic"], total_timesteps=8, out=out, resume=checkpoints / "policy_8_steps.zip", **common)
    set_aside = checkpoints / "replaced_after_8_steps" / "policy_24_steps.zip"
    before = sorted(path.relative_to(out.parent) for path in out.parent.rglob("*"))
    message = f"resume='{set_aside}' is a checkpoint a later run set aside in '{checkpoints}'"
    with pytest.raises(ValueError, match=re.escape(message) + ".*resume it into another out folder"):
        train_policy(["synthetic"], total_timesteps=8, out=out, resume=set_aside, **common)
    # However out is spelled
    with pytest.raises(ValueError, match=re.escape(f"resume='{set_aside}' is a checkpoint a later run set aside")):
        train_policy(["synthetic"], total_timesteps=8, out=out.parent / ".." / "run" / "policy.zip", resume=set_aside,
                     **common)  # fmt: skip
    assert sorted(path.relative_to(out.parent) for path in out.parent.rglob("*")) == before  # nothing moved
    with caplog.at_level("WARNING", logger="triaccel_rl"):  # into another folder: resumed, and said what is not
        train_policy(["synthetic"], total_timesteps=8, out=tmp_path / "other" / "policy.zip", resume=set_aside,
                     **common)  # fmt: skip
    assert f"resume={set_aside} is a checkpoint a later run set aside: its run's evaluations are not" in caplog.text
    assert sorted(p.name for p in (tmp_path / "other" / "checkpoints").glob("*.zip")) == ["policy_32_steps.zip"]


def test_evaluations_moved_aside_twice_at_one_step_keep_both(tmp_path, caplog):
    """A curve of other held-out settings goes to evaluations_until_<N>_steps.npz (and .json): a second one moved
    aside at the same step went over the first."""
    from types import SimpleNamespace

    from triaccel_rl.rl import _continue_evaluations

    folder = tmp_path / "eval"
    folder.mkdir()
    file = folder / "evaluations.npz"
    callback = SimpleNamespace(log_path=str(folder / "evaluations"), n_eval_episodes=1)
    for seed in (0, 1):
        np.savez(file, timesteps=np.array([8]), results=np.array([[float(seed)]]), ep_lengths=np.array([[3]]))
        file.with_suffix(".json").write_text(json.dumps({"tasks": ["synthetic"], "seed": seed}))
        with caplog.at_level("WARNING", logger="triaccel_rl"):
            _continue_evaluations(callback, file, 8, {"tasks": ["synthetic"], "seed": 5})
    first, second = folder / "evaluations_until_8_steps.npz", folder / "evaluations_until_8_steps_2.npz"
    assert np.load(first)["results"].tolist() == [[0.0]] and np.load(second)["results"].tolist() == [[1.0]]
    assert json.loads(second.with_suffix(".json").read_text())["seed"] == 1
    assert f"moved it to {second}" in caplog.text and not file.exists()


@pytest.mark.parametrize(
    ("cut", "why"),
    [
        ("truncated", "BadZipFile: File is not a zip file"),
        ("missing_array", "KeyError: 'ep_lengths is not a file in the archive'"),
    ],
)
def test_evaluations_that_cannot_be_read_are_set_aside_not_continued(tmp_path, caplog, cut, why):
    """SB3 rewrites evaluations.npz in place at each evaluation: cut short by a Ctrl-C or a full disk mid-write, it
    stopped the resume with a bare zipfile.BadZipFile naming no file (an array missing: a KeyError)."""
    from types import SimpleNamespace

    from triaccel_rl.rl import _continue_evaluations

    folder = tmp_path / "eval"
    folder.mkdir()
    file = folder / "evaluations.npz"
    if cut == "truncated":
        np.savez(file, timesteps=np.array([8]), results=np.array([[0.0]]), ep_lengths=np.array([[3]]))
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    else:
        np.savez(file, timesteps=np.array([8]), results=np.array([[0.0]]))
    file.with_suffix(".json").write_text(json.dumps({"tasks": ["synthetic"], "seed": 0}))
    broken = file.read_bytes()
    # Another run's file (resumed into another folder): left where it is
    other = SimpleNamespace(log_path=str(tmp_path / "b" / "evaluations"), n_eval_episodes=1)
    with caplog.at_level("WARNING", logger="triaccel_rl"):
        _continue_evaluations(other, file, 8, {"tasks": ["synthetic"], "seed": 0})
    assert f"{file} holds evaluations that cannot be read ({why}): not continued" in caplog.text
    assert file.read_bytes() == broken and not hasattr(other, "evaluations_timesteps")
    # The run's own: set aside, with its record, and its curve starts over
    callback = SimpleNamespace(log_path=str(folder / "evaluations"), n_eval_episodes=1)
    with caplog.at_level("WARNING", logger="triaccel_rl"):
        _continue_evaluations(callback, file, 8, {"tasks": ["synthetic"], "seed": 0})
    aside = folder / "evaluations_until_8_steps.npz"
    assert f"{file} holds evaluations that cannot be read ({why}): moved it to {aside}" in caplog.text
    assert aside.read_bytes() == broken and aside.with_suffix(".json").is_file()
    assert not file.exists() and not file.with_suffix(".json").exists()
    assert not hasattr(callback, "evaluations_timesteps")


def test_an_evaluation_cut_short_while_written_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    """SB3 rewrote evaluations.npz in place: a Ctrl-C or a full disk mid-write left the file cut short, every earlier
    evaluation lost, and a resume of the run stopped by it."""
    real_savez = np.savez

    def disk_full_on_the_second(file, **arrays):
        if len(arrays["timesteps"]) < 2:
            return real_savez(file, **arrays)
        Path(f"{file}.npz").write_bytes(b"PK\x03\x04 cut short")  # np.savez adds the suffix
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full_on_the_second)
    with pytest.raises(OSError, match="No space left on device"):
        train_policy(["synthetic"], total_timesteps=8, n_steps=4, batch_size=4, out=tmp_path / "policy.zip",
                     eval_every=4, eval_tasks=["synthetic"], **_TINY)  # fmt: skip
    assert np.load(tmp_path / "eval" / "evaluations.npz")["timesteps"].tolist() == [4]
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["evaluations.json", "evaluations.npz"]


def test_resume_and_out_spelled_differently_keep_the_first_runs_evaluations(tmp_path, monkeypatch, caplog, first_run):
    """An absolute resume beside a relative out (one file, spelled two ways) was taken for another run's
    evaluations: those past the checkpoint were dropped without a copy, and a curve of other held-out settings was
    written over instead of moved aside."""
    monkeypatch.chdir(tmp_path)
    common = {"n_steps": 8, "batch_size": 4, "out": Path("policy.zip"), "checkpoint_every": 8, "eval_every": 8,
              "eval_tasks": ["synthetic"], **_TINY}  # fmt: skip
    first_run(["synthetic"], total_timesteps=16, **common)
    train_policy(["synthetic"], total_timesteps=8, resume=tmp_path / "checkpoints" / "policy_8_steps.zip", **common)
    kept = tmp_path / "eval" / "evaluations_replaced_after_8_steps.npz"
    assert np.load(kept)["timesteps"].tolist() == [8, 16]
    assert np.load(tmp_path / "eval" / "evaluations.npz")["timesteps"].tolist() == [8, 16]
    with caplog.at_level("WARNING", logger="triaccel_rl"):  # another seed: another curve
        train_policy(["synthetic"], total_timesteps=8, resume=tmp_path / "policy.zip", seed=1, **common)
    aside = tmp_path / "eval" / "evaluations_until_16_steps.npz"  # named as resume is spelled
    assert np.load(aside)["timesteps"].tolist() == [8, 16] and f"moved it to {aside}" in caplog.text
    assert np.load(tmp_path / "eval" / "evaluations.npz")["timesteps"].tolist() == [24]


def test_a_run_resumed_without_checkpoint_every_sets_the_replaced_checkpoints_aside(
    tmp_path, monkeypatch, caplog, first_run
):
    """Resumed from an earlier checkpoint without checkpoint_every, the checkpoints past it stayed in place, and the
    Ctrl-C checkpoint overwrote the first run's of its step count with other weights, unsaid."""
    from stable_baselines3 import PPO

    common = {"n_steps": 8, "batch_size": 4, "out": tmp_path / "policy.zip", **_TINY}
    first_run(["synthetic"], total_timesteps=24, checkpoint_every=8, **common)
    checkpoints = tmp_path / "checkpoints"
    first_16 = (checkpoints / "policy_16_steps.zip").read_bytes()
    real_train, calls = PPO.train, []

    def interrupted_on_the_second_update(self):
        calls.append(self.num_timesteps)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_train(self)

    monkeypatch.setattr(PPO, "train", interrupted_on_the_second_update)
    with caplog.at_level("WARNING", logger="triaccel_rl"), pytest.raises(KeyboardInterrupt):
        train_policy(["synthetic"], total_timesteps=24, seed=5, resume=checkpoints / "policy_8_steps.zip", **common)
    assert calls == [16, 24]  # interrupted in the update on 24 steps: the checkpoint holds the one on 16
    aside = checkpoints / "replaced_after_8_steps"
    assert sorted(p.name for p in aside.glob("*.zip")) == ["policy_16_steps.zip", "policy_24_steps.zip"]
    assert (aside / "policy_16_steps.zip").read_bytes() == first_16 and f"moved to {aside}" in caplog.text
    assert sorted(p.name for p in checkpoints.glob("*.zip")) == ["policy_16_steps.zip", "policy_8_steps.zip"]
    assert (checkpoints / "policy_16_steps.zip").read_bytes() != first_16  # the resumed run's, beside its start


def test_a_new_run_into_an_earlier_runs_folder_sets_its_checkpoints_and_evaluations_aside(tmp_path, caplog, first_run):
    """A new run (no resume) wrote its evaluations.json over the earlier run's, labelling that run's evaluations.npz
    as its own (a resume of it then continued them), and left that run's checkpoints past its own end among its own."""
    out = tmp_path / "policy.zip"
    common = {"n_steps": 8, "batch_size": 4, "out": out, "checkpoint_every": 8, **_TINY}
    first_run(["synthetic"], total_timesteps=16, seed=0, eval_tasks=["synthetic"], eval_every=8, **common)
    checkpoints, evaluations = tmp_path / "checkpoints", tmp_path / "eval"
    first = {name: (checkpoints / name).read_bytes() for name in ("policy_8_steps.zip", "policy_16_steps.zip")}
    with caplog.at_level("WARNING", logger="triaccel_rl"):  # no evaluation falls in its 8 steps
        train_policy(["synthetic"], total_timesteps=8, seed=5, eval_tasks=["deep-mlp-synthetic"], eval_every=64,
                     **common)  # fmt: skip
    aside = checkpoints / "replaced_after_0_steps"
    assert {p.name: p.read_bytes() for p in aside.glob("*.zip")} == first  # all of them, its 8 steps' too
    assert sorted(p.name for p in aside.glob("*.obs.json")) == ["policy_16_steps.obs.json", "policy_8_steps.obs.json"]
    assert [p.name for p in checkpoints.glob("*.zip")] == ["policy_8_steps.zip"]  # the new run's
    assert (checkpoints / "policy_8_steps.zip").read_bytes() != first["policy_8_steps.zip"]
    kept = evaluations / "evaluations_replaced_after_0_steps.npz"
    assert np.load(kept)["timesteps"].tolist() == [8, 16]
    assert _tasks_and_seed(kept.with_suffix(".json")) == {"tasks": ["synthetic"], "seed": 0}
    assert not (evaluations / "evaluations.npz").exists()
    assert _tasks_and_seed(evaluations / "evaluations.json") == {"tasks": ["deep-mlp-synthetic"], "seed": 5}
    said = caplog.text
    assert f"{checkpoints} held 2 checkpoints of an earlier run, which this new run (not resumed) replaces" in said
    assert f"replaces: moved to {aside}\n" in said
    assert f"held an earlier run's evaluations, which this new run (not resumed) replaces: moved to {kept}" in said
    assert "resumed from an earlier checkpoint" not in said


def test_a_str_where_a_task_list_goes_is_refused_naming_the_argument():
    """A str was iterated as the tasks 's', 'y', ...: "unknown task 's'" named neither the argument nor the fix."""
    from triaccel_rl.rl import make_env_fns

    common = {"total_timesteps": 8, "n_envs": 1, "vec": "dummy", "n_steps": 8, "batch_size": 8}
    message = "tasks='synthetic' is a str: give a list of task names, e.g. ['synthetic']"
    with pytest.raises(ValueError, match=re.escape(message)):
        train_policy("synthetic", **common)
    with pytest.raises(ValueError, match=re.escape(f"eval_{message}")):
        train_policy(["synthetic"], eval_tasks="synthetic", eval_every=8, **common)
    with pytest.raises(ValueError, match=re.escape(message)):
        make_env_fns("synthetic", 1, 2, 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_envs": 0}, "n_envs=0 must be a whole number >= 1"),
        ({"n_envs": 1.5}, "n_envs=1.5 must be a whole number >= 1"),
        ({"torch_threads": 0}, "torch_threads=0 must be a whole number >= 1 (or None: PyTorch's default)"),
        ({"torch_threads": 2.5}, "torch_threads=2.5 must be a whole number >= 1"),
    ],
)
def test_make_env_fns_checks_its_sizes_in_the_caller(kwargs, message):
    """n_envs=0 gave no factory at all, and torch_threads=0 failed in every subprocess worker."""
    from triaccel_rl.rl import make_env_fns

    arguments = {"tasks": ["synthetic"], "n_envs": 2, "max_decisions": 2, "interval_steps": 2, **kwargs}
    with pytest.raises(ValueError, match=re.escape(message)):
        make_env_fns(**arguments)


def test_a_resumed_run_with_other_held_out_tasks_does_not_extend_the_old_curve(tmp_path, caplog, first_run):
    """One held-out task each, so the episode counts matched: the other task's scores were appended to the curve."""
    out = tmp_path / "policy.zip"
    common = {"n_steps": 8, "batch_size": 4, "out": out, "eval_every": 8, **_TINY}
    first_run(["synthetic"], total_timesteps=16, eval_tasks=["synthetic"], **common)
    assert _tasks_and_seed(tmp_path / "eval" / "evaluations.json") == {"tasks": ["synthetic"], "seed": 0}
    with caplog.at_level("WARNING", logger="triaccel_rl"):
        train_policy(["synthetic"], total_timesteps=8, eval_tasks=["deep-mlp-synthetic"], resume=out, **common)
    aside = tmp_path / "eval" / "evaluations_until_16_steps.npz"
    assert f"moved it to {aside}" in caplog.text
    assert np.load(aside)["timesteps"].tolist() == [8, 16]
    assert np.load(tmp_path / "eval" / "evaluations.npz")["timesteps"].tolist() == [24]
    assert json.loads((tmp_path / "eval" / "evaluations.json").read_text())["tasks"] == ["deep-mlp-synthetic"]


def test_a_policy_behind_a_symlink_keeps_its_range_beside_its_file(tmp_path):
    """The zip was written through the link and its stats beside the link: v1.zip's new weights sat beside
    v1.obs.json's old range, and the loader read latest.obs.json, another run's."""
    from triaccel_rl.shield import obs_stats_path

    common = {"n_steps": 8, "batch_size": 4, **_TINY}
    real = train_policy(["synthetic"], total_timesteps=8, out=tmp_path / "v1.zip", **common)
    link = tmp_path / "latest.zip"
    link.symlink_to(real)
    assert obs_stats_path(link) == tmp_path / "v1.obs.json"
    train_policy(["synthetic"], total_timesteps=8, out=link, resume=link, **common)
    assert link.is_symlink() and not (tmp_path / "latest.obs.json").exists()
    stats = json.loads((tmp_path / "v1.obs.json").read_text())
    assert stats["n_observations"] == 16  # both runs' observations, beside the weights that trained on them
    from triaccel_rl.shield import FallbackPolicy

    assert isinstance(make_policy(str(link)), FallbackPolicy)


def test_a_zip_with_a_damaged_member_is_named(trained, tmp_path):
    """SB3 turns a bad CRC into "the file ... wasn't a zip-file": the file is a zip, one member is damaged."""
    import zipfile

    bad = tmp_path / "bad.zip"
    data = bytearray(Path(trained).read_bytes())
    with zipfile.ZipFile(trained) as archive:
        info = archive.getinfo("policy.pth")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 10  # inside its stored bytes
    data[start : start + 50] = bytes(50)
    bad.write_bytes(bytes(data))
    with pytest.raises(PolicyLoadError, match=r"its member 'policy.pth' is damaged \(its bytes fail their CRC check\)"):
        make_policy(str(bad))


def test_a_zip_member_torch_cannot_read_is_named_without_torchs_advice(trained, tmp_path):
    """A policy.pth of other bytes (its CRC valid): torch's message advised weights_only=False, which would unpickle
    whatever the damaged file holds."""
    import zipfile

    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(trained) as source, zipfile.ZipFile(bad, "w") as target:
        for name in source.namelist():
            target.writestr(name, b"garbage" if name == "policy.pth" else source.read(name))
    with pytest.raises(PolicyLoadError) as caught:
        make_policy(str(bad))
    assert str(caught.value) == (
        f"cannot load policy {str(bad)!r}: its member 'policy.pth' cannot be read as a torch state dict "
        "(UnpicklingError): the file is damaged or was not written by stable-baselines3; save or copy the policy again"
    )


def test_a_run_resumed_into_another_folder_keeps_the_first_runs_evaluations(tmp_path, first_run):
    """The history was read from the new run's folder: resumed from a checkpoint of run a into run b, b's
    evaluations started at the resume, and a's were left out."""
    common = {"n_steps": 8, "batch_size": 4, "eval_every": 8, "eval_tasks": ["synthetic"], **_TINY}
    first_run(["synthetic"], total_timesteps=16, out=tmp_path / "a" / "policy.zip", checkpoint_every=8, **common)
    first = dict(np.load(tmp_path / "a" / "eval" / "evaluations.npz"))
    checkpoint = tmp_path / "a" / "checkpoints" / "policy_16_steps.zip"
    train_policy(["synthetic"], total_timesteps=8, out=tmp_path / "b" / "policy.zip", resume=checkpoint, **common)
    resumed = dict(np.load(tmp_path / "b" / "eval" / "evaluations.npz"))
    assert resumed["timesteps"].tolist() == [8, 16, 24]
    np.testing.assert_array_equal(resumed["results"][:2], first["results"])
    assert dict(np.load(tmp_path / "a" / "eval" / "evaluations.npz"))["timesteps"].tolist() == [8, 16]  # untouched
    # Into a folder holding another run's evaluations: that run's were continued as a's (a's lost); now a's are
    # continued, and the other run's are moved aside, kept
    other = train_policy(["synthetic"], total_timesteps=16, out=tmp_path / "c" / "other.zip", seed=5, **common)
    theirs = dict(np.load(other.parent / "eval" / "evaluations.npz"))
    train_policy(["synthetic"], total_timesteps=8, out=tmp_path / "c" / "policy.zip", resume=checkpoint, **common)
    resumed = dict(np.load(tmp_path / "c" / "eval" / "evaluations.npz"))
    assert resumed["timesteps"].tolist() == [8, 16, 24]
    np.testing.assert_array_equal(resumed["results"][:2], first["results"])
    kept = dict(np.load(tmp_path / "c" / "eval" / "evaluations.before_policy.npz"))
    np.testing.assert_array_equal(kept["results"], theirs["results"])


def test_another_runs_evaluations_moved_aside_keep_their_record_of_tasks_and_seed(tmp_path, first_run):
    """Resumed into a folder holding another run's evaluations, the run moved that run's evaluations.npz aside and
    left its evaluations.json, which it then overwrote with its own: the curve set aside lost its tasks and seed."""
    common = {"n_steps": 8, "batch_size": 4, "eval_every": 8, "eval_tasks": ["synthetic"], **_TINY}
    first = first_run(["synthetic"], total_timesteps=8, out=tmp_path / "a" / "policy.zip", **common)
    train_policy(["synthetic"], total_timesteps=16, out=tmp_path / "b" / "policy.zip", seed=3, **common)
    evaluations = tmp_path / "b" / "eval"
    (evaluations / "evaluations.before_policy_2.json").write_text("{}")  # a name taken beside the next free .npz
    for _ in range(2):  # the second moves the first resume's curve aside
        train_policy(["synthetic"], total_timesteps=8, out=tmp_path / "b" / "policy.zip", resume=first, **common)
    theirs = evaluations / "evaluations.before_policy.npz"
    assert np.load(theirs)["timesteps"].tolist() == [8, 16]
    assert _tasks_and_seed(theirs.with_suffix(".json")) == {"tasks": ["synthetic"], "seed": 3}
    again = evaluations / "evaluations.before_policy_3.npz"  # _2 is taken by a stray .json, not written over
    assert np.load(again)["timesteps"].tolist() == [8, 16]
    assert _tasks_and_seed(again.with_suffix(".json")) == {"tasks": ["synthetic"], "seed": 0}
    assert _tasks_and_seed(evaluations / "evaluations.json") == {"tasks": ["synthetic"], "seed": 0}


def test_resumed_observation_stats_are_checked_before_training(trained, tmp_path, caplog):
    """Stats of another LR ladder (or none recorded) or of another number of features failed the merge after the whole
    run, leaving the new zip beside the old stats; stats that could not be read did the same."""
    import json
    import shutil

    zip_path = tmp_path / "policy.zip"
    shutil.copyfile(trained, zip_path)
    stats = json.loads(trained.with_suffix(".obs.json").read_text())
    for ladder in ([0.5, 1.0, 2.0, 3.0, 4.0], None):
        zip_path.with_suffix(".obs.json").write_text(json.dumps({**stats, "lr_scales": ladder}))
        message = f"record the LR ladder {ladder}, and the training environments run [0.5, 0.75, 1.0, 1.25, 1.5]"
        with pytest.raises(ValueError, match=re.escape(message)):
            train_policy(["synthetic"], total_timesteps=8, resume=zip_path, out=tmp_path / "new.zip", **_TINY)
    # Another policy's stats (2 groups: 27 features): the merge failed after training, leaving the zip without stats.
    zip_path.with_suffix(".obs.json").write_text(json.dumps({**stats, "low": stats["low"][:27],
                                                             "high": stats["high"][:27]}))  # fmt: skip
    message = (
        f"resume={str(zip_path)!r}: its observation stats {str(zip_path.with_suffix('.obs.json'))!r} hold 27 features, "
        "and the training environments' observations have 43: they are another policy's stats"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        train_policy(["synthetic"], total_timesteps=8, resume=zip_path, out=tmp_path / "new.zip", **_TINY)
    zip_path.with_suffix(".obs.json").write_text("{")
    with pytest.raises(ValueError, match="are not valid JSON"):
        train_policy(["synthetic"], total_timesteps=8, resume=zip_path, out=tmp_path / "new.zip", **_TINY)
    assert not (tmp_path / "new.zip").exists()
    # A zip named without ".zip" and with a dot in its name: its stats were looked for at policy_lr0.obs.json
    dotted = tmp_path / "policy_lr0.5.zip"
    shutil.copyfile(trained, dotted)
    dotted.with_suffix(".obs.json").write_text(json.dumps({**stats, "lr_scales": None}))
    with pytest.raises(ValueError, match=re.escape("policy_lr0.5.obs.json' record the LR ladder None")):
        train_policy(
            ["synthetic"], total_timesteps=8, resume=tmp_path / "policy_lr0.5", out=tmp_path / "n.zip", **_TINY
        )


def test_a_resume_zip_that_is_no_ppo_policy_for_these_spaces_is_refused_by_name(trained, tmp_path):
    """A truncated zip passed is_zipfile (an SB3 zip holds zips) and SB3 raised a bare AssertionError; a zip for other
    spaces got SB3's mismatch naming no file; an A2C zip resumed silently as PPO, keeping A2C's optimizer."""
    from stable_baselines3 import A2C, PPO

    data = trained.read_bytes()
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(data[: len(data) // 2])
    other = tmp_path / "cartpole.zip"
    PPO("MlpPolicy", gym.make("CartPole-v1"), n_steps=8, batch_size=8, device="cpu").save(other)
    a2c = tmp_path / "a2c.zip"
    A2C("MlpPolicy", _spaces_env(trained), device="cpu").save(a2c)
    cases = [
        (truncated, rf"^cannot load policy {re.escape(repr(str(truncated)))}"),
        (other, rf"^policy {re.escape(repr(str(other)))} was trained for observation space Box\(.*\(4,\)"),
        (a2c, rf"^policy {re.escape(repr(str(a2c)))} was saved by A2C, not PPO"),
    ]
    for resume, message in cases:
        assert zipfile.is_zipfile(resume)
        with pytest.raises(ValueError, match=message):
            train_policy(["synthetic"], total_timesteps=8, resume=resume, out=tmp_path / "new.zip", **_TINY)
        assert not (tmp_path / "new.zip").exists()


def _spaces_env(policy: Path):
    """A stand-in environment with ``policy``'s spaces (for building another algorithm's zip on them)."""
    from stable_baselines3 import PPO

    model = PPO.load(policy, device="cpu")

    class Spaces(gym.Env):
        observation_space, action_space = model.observation_space, model.action_space

        def reset(self, *, seed=None, options=None):
            return self.observation_space.sample(), {}

        def step(self, action):
            return self.observation_space.sample(), 0.0, True, False, {}

    return Spaces()


def test_resuming_at_another_interval_is_said_and_the_stats_record_no_interval(tmp_path, caplog, first_run):
    """Resumed at another interval than the policy was trained at (the shipped policy's 10 with the command line's
    default 20), training went on silently, and the saved stats recorded interval None."""
    from triaccel_rl.rl import obs_stats_path
    from triaccel_rl.shield import ObservationStats

    common = {"n_steps": 8, "batch_size": 4, **_TINY}  # interval_steps=2
    first = first_run(["synthetic"], total_timesteps=8, out=tmp_path / "policy.zip", **common)
    with caplog.at_level("WARNING", logger="triaccel_rl"):
        other = train_policy(["synthetic"], total_timesteps=8, resume=first, out=tmp_path / "other.zip",
                             **{**common, "interval_steps": 3})  # fmt: skip
    assert (
        f"resume={str(first)!r} was trained deciding every 2 optimizer steps (its observation stats "
        f"{obs_stats_path(first)} say so), and this run decides every 3: it goes on at another interval, and the "
        "observation stats it saves record none; to go on at the policy's own, pass interval_steps=2 "
        "(--interval-steps 2 on the command line)"
    ) in caplog.text
    assert ObservationStats.load(obs_stats_path(other)).interval_steps is None
    caplog.clear()
    with caplog.at_level("WARNING", logger="triaccel_rl"):
        same = train_policy(["synthetic"], total_timesteps=8, resume=first, out=tmp_path / "same.zip", **common)
    assert "was trained deciding every" not in caplog.text
    assert ObservationStats.load(obs_stats_path(same)).interval_steps == 2  # one interval, recorded


def test_interrupted_in_the_warm_start_it_says_nothing_was_kept(tmp_path, monkeypatch, caplog):
    """Ctrl-C in the warm start's imitation (minutes of the teacher's decisions) saved nothing and logged nothing,
    though an interrupted run says what it kept."""
    import triaccel_rl.rl as rl

    def interrupted(model, venv, teacher, n_steps, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(rl, "imitate", interrupted)
    with caplog.at_level("WARNING", logger="triaccel_rl"), pytest.raises(KeyboardInterrupt):
        train_policy(["synthetic"], total_timesteps=8, n_steps=8, batch_size=4, out=tmp_path / "policy.zip",
                     warm_start="heuristic", **_TINY)  # fmt: skip
    assert caplog.messages == [
        "training interrupted in the warm start, while imitating heuristic (before PPO's first step): nothing saved "
        f"(no checkpoint, no {tmp_path / 'warm_start.json'}; the imitation is not kept half done): run again to start "
        "over"
    ]
    assert list(tmp_path.iterdir()) == []


class _Constant:
    """A policy answering one action for one observation."""

    def __init__(self, action):
        self.action = np.array(action)

    def predict(self, obs, state=None, episode_start=None, deterministic=False):
        assert np.shape(obs) == (ObservationLayout(4).size,)
        return self.action.copy(), state


def test_the_fallback_threshold_is_one_range_width_beyond_the_edge_and_the_learned_policy_returns(caplog):
    """At exactly ``max_distance`` (1.0: one training range width past the edge; a feature that never varied counts
    a width of 0.1) the learned policy still acts; just past it the heuristic does; back inside, the learned policy."""
    from triaccel_rl.shield import FallbackPolicy, ObservationStats

    size = ObservationLayout(4).size
    low, high = [0.0] * size, [0.5] * size
    low[3] = high[3] = 0.25  # never varied in training
    learned, heuristic = _Constant([0, 0, 0, 0, 2, 1]), _Constant([1, 1, 1, 1, 2, 1])
    policy = FallbackPolicy(learned, heuristic, ObservationStats(tuple(low), tuple(high), 10))
    assert policy.max_distance == 1.0

    def with_feature(index, value):
        obs = np.full(size, 0.25, dtype=np.float32)
        obs[index] = value
        return obs

    chosen = []
    with caplog.at_level("WARNING", logger="triaccel_rl"):
        for index, value in [(0, 0.25), (0, 1.0), (0, -0.5), (3, 0.35), (3, 0.15), (0, 1.0 + 1e-6), (3, 0.15 - 1e-6),
                             (0, 0.25)]:  # fmt: skip
            chosen.append("learned" if policy.predict(with_feature(index, value))[0][0] == 0 else "heuristic")
    assert chosen == ["learned"] * 5 + ["heuristic"] * 2 + ["learned"]
    assert policy.fallbacks == 2 and policy.fallback_features == {"log_loss": 1, "headroom": 1}
    assert "outside the policy's training data" in caplog.text


def test_the_fallback_is_logged_once_a_spell(caplog):
    """A warning when observations leave the training range, an info line when they come back; the decisions in
    between at debug level. Before, every decision out of distribution logged a warning (a run far from its training
    data printed one each interval)."""
    from triaccel_rl.shield import FallbackPolicy, ObservationStats

    size = ObservationLayout(4).size
    policy = FallbackPolicy(
        _Constant([0, 0, 0, 0, 2, 1]), _Constant([1, 1, 1, 1, 2, 1]), ObservationStats((0.0,) * size, (0.5,) * size, 10)
    )
    inside, outside = np.full(size, 0.25, dtype=np.float32), np.full(size, 5.0, dtype=np.float32)
    with caplog.at_level("DEBUG", logger="triaccel_rl"):
        for obs in (inside, outside, outside, outside, inside, inside, outside, inside):
            policy.predict(obs)
    logged = [(r.levelname, r.getMessage().split(":")[0]) for r in caplog.records if r.name == "triaccel_rl"]
    # (5 - 0.5) / 0.5: nine range widths past the edge; the first feature named where all are as far out
    out = (
        "observation 9.0000 range widths outside the policy's training data "
        "(limit 1; feature log_loss = 5, trained on [0, 0.5])"
    )
    back = "observations back within the policy's training data after {} decision(s) by the heuristic"
    assert logged == [
        ("WARNING", out), ("DEBUG", out), ("DEBUG", out), ("INFO", back.format(3)),
        ("WARNING", out), ("INFO", back.format(1)),
    ]  # fmt: skip
    assert policy.fallbacks == 4


def test_every_held_out_evaluation_runs_the_same_episodes(tmp_path, monkeypatch):
    """The evaluation environments were never seeded: each evaluation drew new runs from OS entropy, so the curve mixed
    the policy's progress with the draw and two runs of one seed evaluated differently. With the policy held still
    (no updates), every evaluation now scores alike."""
    from stable_baselines3 import PPO

    monkeypatch.setattr(PPO, "train", lambda self: None)
    train_policy(["synthetic"], total_timesteps=24, n_steps=8, batch_size=4, eval_tasks=["synthetic"], eval_every=8,
                 out=tmp_path / "policy.zip", **_TINY)  # fmt: skip
    saved = np.load(tmp_path / "eval" / "evaluations.npz")
    assert saved["timesteps"].tolist() == [8, 16, 24]
    results = saved["results"][:, 0]
    assert np.isfinite(results).all() and results.tolist() == [results[0]] * 3


def test_the_evaluation_at_a_step_count_scores_the_checkpoint_of_that_count(tmp_path):
    """SB3 evaluated in the middle of a rollout, before its update: the evaluation stamped N scored the weights trained
    on one rollout fewer (at 4 the initial weights) while the checkpoint of N held those trained on N, and the final
    weights were never evaluated. Each evaluation now scores policy_N_steps.zip, on the same seeded episodes."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.evaluation import evaluate_policy
    from stable_baselines3.common.vec_env import DummyVecEnv

    from triaccel_rl.config import RewardConfig
    from triaccel_rl.rl import make_env_fns

    held_out = ["deep-mlp-synthetic"]
    # seed 1: at seed 0 the checkpoints of 8 and 12 score alike (0.029618), and the test could not tell them apart
    train_policy(["synthetic"], total_timesteps=12, n_steps=4, batch_size=4, seed=1, checkpoint_every=4,
                 eval_tasks=held_out, eval_every=4, out=tmp_path / "policy.zip", **_TINY)  # fmt: skip
    saved = np.load(tmp_path / "eval" / "evaluations.npz")
    assert saved["timesteps"].tolist() == [4, 8, 12]

    def evaluate(policy_zip):  # as train_policy evaluates: the held-out environments seeded with its seed, on its
        threads = torch.get_num_threads()  # one thread (_TINY's torch_threads): on two, the proxy task's sums round
        torch.set_num_threads(1)  # otherwise, and the scores differed in the 5th figure
        try:
            env = DummyVecEnv(make_env_fns(held_out, 1, 3, 2, None, reward_config=RewardConfig(budget_intervals=2)))
            env.seed(1)
            rewards, _ = evaluate_policy(PPO.load(policy_zip, device="cpu"), env, n_eval_episodes=1,
                                         deterministic=True, return_episode_rewards=True)  # fmt: skip
            env.close()
        finally:
            torch.set_num_threads(threads)
        return rewards

    scores = [evaluate(tmp_path / "checkpoints" / f"policy_{n}_steps.zip") for n in (4, 8, 12)]
    assert scores[0] != scores[1] != scores[2]  # each update changed the scores: the test tells the weights apart
    assert saved["results"].tolist() == scores
    assert scores[2] == evaluate(tmp_path / "policy.zip")  # the final weights, evaluated


@pytest.mark.usefixtures("one_torch_thread")
def test_progress_bar_counts_the_environment_steps_on_stderr(tmp_path, capsys):
    """SB3's own bar needs ``rich`` (not installed: progress_bar=True raised ImportError); ours is tqdm."""
    train_policy(["synthetic"], total_timesteps=16, n_envs=2, vec="dummy", max_decisions=4, interval_steps=2,
                 n_steps=8, batch_size=8, out=tmp_path / "policy.zip", progress_bar=True)  # fmt: skip
    captured = capsys.readouterr()
    assert "train-policy: 100%" in captured.err and "16/16" in captured.err
    assert "train-policy" not in captured.out


@pytest.mark.usefixtures("one_torch_thread")
def test_steps_asked_short_of_a_whole_rollout_are_rounded_up_and_said(tmp_path, capsys, caplog):
    """64 steps asked at 128 a rollout trained 128: the bar lost its total at 64 and counted on, and nothing said so."""
    caplog.set_level("INFO", logger="triaccel_rl")
    train_policy(["synthetic"], total_timesteps=12, n_envs=2, vec="dummy", max_decisions=4, interval_steps=2,
                 n_steps=8, batch_size=8, out=tmp_path / "policy.zip", progress_bar=True)  # fmt: skip
    assert "total_timesteps=12 rounds up to 16: PPO trains whole rollouts of n_steps x n_envs = 16 steps" in caplog.text
    assert "16/16" in capsys.readouterr().err


def test_a_resumed_run_interrupted_before_it_trains_keeps_its_step_count(tmp_path, monkeypatch, first_run):
    """A Ctrl-C in learn()'s first reset (each environment trains an interval there: slow) saved the resumed weights as
    a 0-step checkpoint: the count of the steps already trained was read only when training started."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv

    first = first_run(["synthetic"], total_timesteps=16, out=tmp_path / "policy.zip", n_steps=8, batch_size=4,
                      **_TINY)  # fmt: skip

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(DummyVecEnv, "reset", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_policy(["synthetic"], total_timesteps=16, out=tmp_path / "again.zip", resume=first, **_TINY)
    (checkpoint,) = (tmp_path / "checkpoints").glob("again_*.zip")
    assert checkpoint.name == "again_16_steps.zip" and PPO.load(checkpoint, device="cpu").num_timesteps == 16


@pytest.mark.parametrize("fault", ["writing the zip", "moving the stats"])
def test_an_interrupted_final_save_keeps_the_policy_it_resumed_from(tmp_path, monkeypatch, fault, first_run):
    """The zip was written in place and before its stats: a Ctrl-C in the final save of a run resumed from its own
    ``out`` (the command line's default) left a truncated zip that did not load, and the trained weights were lost."""
    import os

    import stable_baselines3.common.save_util as save_util
    from stable_baselines3 import PPO

    from triaccel_rl.shield import ObservationStats

    out = tmp_path / "policy.zip"
    common = {"n_steps": 8, "batch_size": 4, "out": out, **_TINY}
    first_run(["synthetic"], total_timesteps=8, **common)
    before = {name: (tmp_path / name).read_bytes() for name in ("policy.zip", "policy.obs.json")}
    real_torch_save, real_replace, faults = save_util.th.save, os.replace, []

    def once(*args):  # Ctrl-C at the first call only: the checkpoint after it is written
        if faults:
            return None
        faults.append(args)
        raise KeyboardInterrupt

    def torch_save(*args, **kwargs):
        once(*args)
        return real_torch_save(*args, **kwargs)

    def replace(source, target):
        if str(target).endswith(".obs.json"):
            once(source, target)
        return real_replace(source, target)

    if fault == "writing the zip":
        monkeypatch.setattr(save_util.th, "save", torch_save)
    else:  # the zip is written, not yet moved over the policy: it must not land beside the old stats
        monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        train_policy(["synthetic"], total_timesteps=8, resume=out, **common)
    assert len(faults) == 1
    assert {name: (tmp_path / name).read_bytes() for name in before} == before  # the resumed policy, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "policy.obs.json", "policy.zip"]  # no temp
    checkpoint = tmp_path / "checkpoints" / "policy_16_steps.zip"  # the trained weights, kept
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["policy_16_steps.obs.json", "policy_16_steps.zip"]
    assert PPO.load(checkpoint, device="cpu").num_timesteps == 16
    assert ObservationStats.load(checkpoint.with_suffix(".obs.json")).n_observations == 16


def test_a_checkpoint_interrupted_while_rewritten_keeps_the_one_of_that_name(tmp_path, monkeypatch):
    """Ctrl-C in a rollout rewrites the checkpoint of the last update, often the periodic one of the same name: it was
    written in place, so a second interruption (or a full disk) there destroyed the good checkpoint."""
    import stable_baselines3.common.save_util as save_util
    from stable_baselines3 import PPO

    real_train, real_torch_save, kept = PPO.train, save_util.th.save, {}
    folder = tmp_path / "checkpoints"

    def interrupted_in_the_second_update(self):
        if self.num_timesteps < 16:
            return real_train(self)
        kept.update({p.name: p.read_bytes() for p in folder.iterdir()})  # the periodic checkpoint at 8 steps
        monkeypatch.setattr(save_util.th, "save", failing_save)
        raise KeyboardInterrupt

    def failing_save(*args, **kwargs):
        raise KeyboardInterrupt  # a second Ctrl-C while the handler saves

    monkeypatch.setattr(PPO, "train", interrupted_in_the_second_update)
    with pytest.raises(KeyboardInterrupt):
        train_policy(["synthetic"], total_timesteps=64, n_steps=8, batch_size=4, checkpoint_every=8,
                     out=tmp_path / "policy.zip", **_TINY)  # fmt: skip
    assert sorted(kept) == ["policy_8_steps.obs.json", "policy_8_steps.zip"]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == kept  # whole, and no temporary file left
    monkeypatch.setattr(save_util.th, "save", real_torch_save)
    assert PPO.load(folder / "policy_8_steps.zip", device="cpu").num_timesteps == 8


def test_a_new_policy_interrupted_before_its_first_update_says_it_saved_no_stats(tmp_path, monkeypatch, caplog):
    """The Ctrl-C line said the checkpoint was saved "and its observation stats" where none were written; and another
    run's stats of the same name stayed beside the new weights."""
    from stable_baselines3.common.vec_env import DummyVecEnv

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    stale = folder / "policy_0_steps.obs.json"
    stale.write_text("{}")  # another run's, of the name this checkpoint takes

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(DummyVecEnv, "reset", interrupted)
    with caplog.at_level("WARNING", logger="triaccel_rl"), pytest.raises(KeyboardInterrupt):
        train_policy(["synthetic"], total_timesteps=8, n_steps=8, batch_size=4, out=tmp_path / "policy.zip", **_TINY)
    checkpoint = folder / "policy_0_steps.zip"
    assert (
        f"saved {checkpoint}, the weights of the last update (0 steps), without observation stats (no update has "
        f"recorded a range: it loads without the fallback); continue with resume={checkpoint}"
    ) in caplog.text
    assert [p.name for p in folder.iterdir()] == ["policy_0_steps.zip"]


def test_torch_threads_hold_for_the_call_only_with_environments_in_process(tmp_path, monkeypatch):
    """The environment factory set ``torch_threads`` in the process it ran in: with environments in the caller's
    process (one environment, or ``vec="dummy"``), the caller's thread count stayed changed after the call."""
    from stable_baselines3 import PPO

    real_train, during = PPO.train, []

    def record(self):
        during.append(torch.get_num_threads())
        if len(during) == 2:
            raise KeyboardInterrupt
        real_train(self)

    monkeypatch.setattr(PPO, "train", record)
    caller = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        train_policy(["synthetic"], total_timesteps=8, n_steps=8, batch_size=4, out=tmp_path / "a.zip", **_TINY)
        assert during == [1]  # _TINY's torch_threads, for the call's duration
        assert torch.get_num_threads() == 3
        with pytest.raises(KeyboardInterrupt):  # and when the call raises
            train_policy(["synthetic"], total_timesteps=8, n_steps=8, batch_size=4, out=tmp_path / "b.zip", **_TINY)
        assert during == [1, 1]
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(caller)


class _SeedStub(gym.Env):
    """An environment whose reset draws nothing: its generator stays as seeded."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(1, dtype=np.float32), {}


def test_every_worker_and_task_draws_from_a_seed_of_its_own():
    """SB3 seeds worker i with seed + i, and the task cycle seeded its k-th task seed + k: worker 0's second task and
    worker 1's first drew the same run seed and LR factor. Task k of worker i now draws from seed + k * n_envs + i."""
    from triaccel_rl.config import RewardConfig
    from triaccel_rl.rl import TaskCycleEnv, make_env_fns

    cycle = TaskCycleEnv([_SeedStub() for _ in range(3)], seed_stride=2)
    cycle.reset(seed=1)  # worker 1 of 2
    for k, env in enumerate(cycle.envs):
        expected = gym.utils.seeding.np_random(1 + 2 * k)[0].bit_generator.state
        assert env.unwrapped.np_random.bit_generator.state == expected, k
    with pytest.raises(ValueError, match=re.escape("seed_stride=0 must be a whole number >= 1")):
        TaskCycleEnv([_SeedStub()], seed_stride=0)

    # 3 tasks on 2 workers, as the shipped policy trained
    tasks = ["synthetic", "deep-mlp-synthetic", "synthetic"]
    fns = make_env_fns(tasks, 2, None, 2, lr_range=(0.4, 1.0), reward_config=RewardConfig(budget_intervals=2),
                       task_overrides={"n_train": 256})  # fmt: skip
    draws = []
    for worker, make in enumerate(fns):
        env = make()
        for episode in range(2):  # as SB3 resets after venv.seed(0): worker i's first reset seeded i, then none
            _, info = env.reset(seed=worker if episode == 0 else None)
            inner = env.env.envs[env.env.current].unwrapped
            draws.append((worker, info["task"], inner.loop.run.seed, info["base_lr_factor"]))
        env.close()
    assert [(worker, task) for worker, task, _, _ in draws] == [
        (0, "synthetic"), (0, "deep-mlp-synthetic"), (1, "deep-mlp-synthetic"), (1, "synthetic")]  # fmt: skip
    assert len({run_seed for _, _, run_seed, _ in draws}) == 4
    assert len({factor for _, _, _, factor in draws}) == 4


_S, _D, _T = "synthetic", "deep-mlp-synthetic", "transformer-seq"


@pytest.mark.parametrize(
    ("tasks", "n_envs", "expected"),
    [([_S, _D, _T], 2, [[_S, _D, _T], [_D, _T, _S]]), ([_S, _D], 3, [[_S, _D], [_D, _S], [_S, _D]])],
)
def test_every_worker_cycles_through_every_task(tasks, n_envs, expected):
    """Worker i cycled through tasks i, i + n_envs, ... only: 3 tasks on 2 workers (the shipped policy's training)
    gave the first task half the episodes and the others a quarter each. Each worker now cycles through every task,
    rotated by i, and every (worker, task) pair keeps a seed of its own (seed + k * n_envs + i for its k-th task)."""
    from collections import Counter

    from triaccel_rl.config import RewardConfig
    from triaccel_rl.rl import TaskCycleEnv, make_env_fns

    cycles, strides = [], []
    for make in make_env_fns(tasks, n_envs, None, 2, reward_config=RewardConfig(budget_intervals=2)):
        env = make().env  # inside the Monitor
        cycle = env.envs if isinstance(env, TaskCycleEnv) else [env]  # or a worker's one task
        cycles.append([inner.unwrapped.task.name for inner in cycle])
        strides.append(getattr(env, "seed_stride", None))
        env.close()
    assert cycles == expected
    share = Counter()
    for names in cycles:
        for name in names:
            share[name] += 1 / len(names) / n_envs  # the worker's share of the episodes, over the workers
    assert share == pytest.approx(dict.fromkeys(tasks, 1 / len(tasks)))
    # SB3 seeds worker i with seed + i (here 0 + i), and its cycle seeds its k-th task that + k * stride
    seeds = {(i, name): i + k * strides[i] for i, names in enumerate(cycles) for k, name in enumerate(names)}
    assert len(seeds) == len(set(seeds.values())) == len(tasks) * n_envs


def test_a_run_resumed_from_an_earlier_checkpoint_drops_the_replaced_runs_tensorboard_points(tmp_path):
    """Resumed from the 8-step checkpoint with the same log_dir, SB3 went on writing the first run's TensorBoard run:
    its points past 8 stayed among the new run's (eval/mean_reward at 8, 16 and 16 again)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "policy.zip"
    common = {"n_steps": 8, "batch_size": 4, "out": out, "checkpoint_every": 8, "eval_every": 8,
              "eval_tasks": ["synthetic"], "log_dir": tmp_path / "tb", **_TINY}  # fmt: skip
    train_policy(["synthetic"], total_timesteps=16, **common)
    train_policy(["synthetic"], total_timesteps=8, resume=tmp_path / "checkpoints" / "policy_8_steps.zip", **common)
    (run,) = (tmp_path / "tb").iterdir()
    events = EventAccumulator(str(run))
    events.Reload()
    evaluations = np.load(tmp_path / "eval" / "evaluations.npz")
    curve = zip(evaluations["timesteps"].tolist(), evaluations["results"].mean(axis=1), strict=True)
    # The resumed run's evaluations only, each once (TensorBoard keeps float32)
    assert [(p.step, p.value) for p in events.Scalars("eval/mean_reward")] == [
        (step, float(np.float32(mean))) for step, mean in curve
    ]
    assert [p.step for p in events.Scalars("eval/mean_reward")] == [8, 16]
    assert [p.step for p in events.Scalars("train/loss")] == [8, 16]
    assert [p.step for p in events.Scalars("rollout/ep_rew_mean")] == [8, 16]


def test_a_resume_evaluating_other_episodes_does_not_extend_the_old_curve(tmp_path, caplog, first_run):
    """evaluations.json recorded the held-out tasks and seed only: a resume whose episodes had another budget (8
    intervals where the curve's had 2) carried the curve on. A record of that older form says nothing of its episodes:
    it is moved aside too."""
    out = tmp_path / "policy.zip"
    common = {"total_timesteps": 8, "n_steps": 8, "batch_size": 4, "out": out, "eval_every": 8,
              "eval_tasks": ["synthetic"], **_TINY}  # fmt: skip
    evaluations = tmp_path / "eval" / "evaluations.npz"
    first_run(["synthetic"], **common)
    recorded = json.loads(evaluations.with_suffix(".json").read_text())
    assert (recorded["interval_steps"], recorded["max_decisions"]) == (2, 3)
    assert recorded["env"]["reward_config"]["budget_intervals"] == 2
    with caplog.at_level("WARNING", logger="triaccel_rl"):
        train_policy(["synthetic"], resume=out, **{**common, "budget_intervals": 8})
    aside = tmp_path / "eval" / "evaluations_until_8_steps.npz"
    assert f"moved it to {aside}" in caplog.text
    assert np.load(aside)["timesteps"].tolist() == [8]
    assert json.loads(aside.with_suffix(".json").read_text()) == recorded
    assert np.load(evaluations)["timesteps"].tolist() == [16]
    assert json.loads(evaluations.with_suffix(".json").read_text())["env"]["reward_config"]["budget_intervals"] == 8
    evaluations.with_suffix(".json").write_text(json.dumps({"tasks": ["synthetic"], "seed": 0}))  # the older form
    train_policy(["synthetic"], resume=out, **{**common, "budget_intervals": 8})
    assert np.load(tmp_path / "eval" / "evaluations_until_16_steps.npz")["timesteps"].tolist() == [16]
    assert np.load(evaluations)["timesteps"].tolist() == [24]


def test_a_run_resumed_into_another_runs_folder_sets_all_its_checkpoints_aside(tmp_path, caplog):
    """Resumed from run a's 8-step checkpoint into run b's folder, the run moved aside only b's checkpoints past 8: b's
    own 8-step checkpoint stayed among the new run's."""
    common = {"n_steps": 8, "batch_size": 4, "checkpoint_every": 8, **_TINY}
    train_policy(["synthetic"], total_timesteps=8, out=tmp_path / "a" / "policy.zip", **common)
    train_policy(["synthetic"], total_timesteps=16, out=tmp_path / "b" / "policy.zip", seed=3, **common)
    checkpoints = tmp_path / "b" / "checkpoints"
    theirs = {name: (checkpoints / name).read_bytes() for name in ("policy_8_steps.zip", "policy_16_steps.zip")}
    with caplog.at_level("WARNING", logger="triaccel_rl"):
        train_policy(["synthetic"], total_timesteps=8, out=tmp_path / "b" / "policy.zip",
                     resume=tmp_path / "a" / "checkpoints" / "policy_8_steps.zip", **common)  # fmt: skip
    aside = checkpoints / "replaced_after_0_steps"
    assert {p.name: p.read_bytes() for p in aside.glob("*.zip")} == theirs
    assert sorted(p.name for p in checkpoints.glob("*.zip")) == ["policy_16_steps.zip"]  # the resumed run's only
    assert f"{checkpoints} held 2 checkpoints of another run, which this run (resumed from " in caplog.text
    assert f"not this folder's) replaces: moved to {aside}\n" in caplog.text


def test_the_last_episodes_summary_is_read_through_the_task_cycle():
    """ARCHITECTURE.md: venv.get_attr("episode_summary") reads the last episode's summary; through make_env_fns with
    several tasks (TaskCycleEnv) it raised AttributeError."""
    from stable_baselines3.common.vec_env import DummyVecEnv

    from triaccel_rl.config import RewardConfig
    from triaccel_rl.rl import make_env_fns

    fns = make_env_fns(["synthetic", "synthetic"], 1, None, 5, reward_config=RewardConfig(budget_intervals=1))
    venv = DummyVecEnv(fns)
    venv.seed(0)
    venv.reset()
    assert venv.get_attr("episode_summary") == [None]  # no episode has ended
    done = [False]
    while not done[0]:
        _, _, done, _ = venv.step(np.array([[1, 1, 1, 1, 2, 1]]))
    cycle = venv.envs[0].unwrapped
    assert cycle.current == 1  # auto-reset moved on to the second task
    (summary,) = venv.get_attr("episode_summary")
    assert summary == cycle.envs[0].unwrapped.episode_summary and set(summary) == {"overhead_frac", "wall_time_ms"}
    venv.close()


def test_a_new_run_sets_an_earlier_runs_warm_start_record_aside_and_a_resume_keeps_it(tmp_path, caplog):
    """A new run into an earlier run's folder left that run's warm_start.json beside its own policy, which a warm start
    of its own then overwrote."""
    out = tmp_path / "policy.zip"
    common = {"total_timesteps": 8, "n_steps": 8, "batch_size": 4, "out": out, **_TINY}
    warm = {"warm_start": "heuristic", "warm_start_steps": 2, "warm_start_epochs": 1}
    record = tmp_path / "warm_start.json"
    train_policy(["synthetic"], seed=0, **warm, **common)
    first = record.read_text()
    with caplog.at_level("WARNING", logger="triaccel_rl"):
        train_policy(["synthetic"], seed=1, **{**warm, "warm_start_steps": 3}, **common)
    aside = tmp_path / "warm_start_replaced_after_0_steps.json"
    assert aside.read_text() == first
    assert json.loads(record.read_text())["decisions"] == 3  # the new run's own
    said = f"{record} held an earlier run's warm start, which this new run (not resumed) replaces: moved to {aside}"
    assert said in caplog.text
    second = record.read_text()
    train_policy(["synthetic"], resume=out, **common)
    assert record.read_text() == second and sorted(p.name for p in tmp_path.glob("warm_start*.json")) == [
        "warm_start.json",
        "warm_start_replaced_after_0_steps.json",
    ]

"""The shipped pretrained policy, a tiny end-to-end training run, depth independence, and bad policy input."""

import dataclasses
import json
import math
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
import triaccel_rl.envs  # noqa: F401  (registers TriAccel-v0)
from experiment_scripts import import_experiment
from torch import nn
from triaccel_rl.policies import HeuristicPolicy, LearnedPolicy, PolicyLoadError, make_policy, pretrained_policy_path
from triaccel_rl.policies.learned import policy_view

from triaccel_rl.actions import action_space
from triaccel_rl.config import ConfigError, ControllerConfig, HeuristicConfig
from triaccel_rl.controller import Controller
from triaccel_rl.observation import OBS_HIGH, ObservationLayout
from triaccel_rl.rl import TaskCycleEnv, obs_stats_path, train_policy
from triaccel_rl.shield import CONSTANT_FEATURE_WIDTH, FallbackPolicy, ObservationStats
from triaccel_rl.tasks import FRESH_HELD_OUT_TASKS, HELD_OUT_TASKS, TRAINING_TASKS
from triaccel_rl.types import Precision

REPO = Path(__file__).resolve().parents[1]
CONFIG = ControllerConfig()
OBSERVATION_SPACE = gym.spaces.Box(-OBS_HIGH, OBS_HIGH, (ObservationLayout(CONFIG.n_groups).size,), np.float32)
ACTION_SPACE = action_space(CONFIG)


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    """A few dozen PPO steps in-process, cycling two tasks of different depth through one environment."""
    out = tmp_path_factory.mktemp("tiny") / "policy.zip"
    return train_policy(
        ["synthetic", "deep-mlp-synthetic"],
        total_timesteps=48,
        n_envs=1,
        vec="dummy",
        max_decisions=3,
        interval_steps=2,
        n_steps=24,
        batch_size=12,
        seed=0,
        out=out,
        torch_threads=1,
    )


def test_pretrained_loads_by_name_with_the_ood_fallback():
    policy = make_policy("pretrained", CONFIG, OBSERVATION_SPACE, ACTION_SPACE)
    assert isinstance(policy, FallbackPolicy)  # the shipped .obs.json turns on the shield's fallback
    assert isinstance(policy.policy, LearnedPolicy)
    assert pretrained_policy_path().with_suffix(".obs.json").is_file()
    assert pretrained_policy_path().stat().st_size < 1_000_000, "the shipped zip should stay under 1 MB"


def test_pretrained_predicts_valid_actions_on_the_env_observation():
    env = gym.make("TriAccel-v0", task="synthetic", config=ControllerConfig(interval_steps=2), max_decisions=3)
    policy = make_policy("pretrained", CONFIG, env.observation_space, env.action_space)
    observation, _ = env.reset(seed=0)
    actions = []
    for _ in range(3):
        action, _ = policy.predict(observation, deterministic=True)
        assert env.action_space.contains(np.asarray(action)), action
        actions.append(np.asarray(action).tolist())
        observation, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            break
    # Inside its observation range (no fallback to the heuristic), the shipped policy's constant action (issue 6,
    # MODEL_CARD.md): groups, most sensitive first, fp32, bf16, bf16, bf16; LR x1.5; batch kept.
    assert isinstance(policy, FallbackPolicy) and policy.fallbacks == 0
    assert actions == [[0, 1, 1, 1, 4, 1]] * 3


def test_controller_takes_pretrained_by_name():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    ctl = Controller(model, optimizer, policy="pretrained", config=ControllerConfig(interval_steps=2), device="cpu")
    assert isinstance(ctl.policy, FallbackPolicy)
    x, y = torch.randn(256, 8), torch.randint(0, 3, (256,))
    before = [p.detach().clone() for p in model.parameters()]
    seen = 0
    for xb, yb in ctl.loader((x, y), batch_size=32, epochs=1):
        with ctl.autocast():
            loss = nn.functional.cross_entropy(model(xb), yb)
        ctl.step(loss)
        seen += len(yb)
    ctl.close()
    # The policy decided every 2 steps (each decision the pretrained policy's or, out of its range, the heuristic's)
    # and training went on: every sample seen once, the weights moved and stayed finite.
    assert seen == len(y)
    assert len(ctl.decisions) == ctl.steps // 2 and ctl.steps >= 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_loading_the_pretrained_policy_keeps_the_global_random_generators():
    """SB3's load seeds torch, numpy and random with the zip's seed; the user's generators must not move."""
    import random

    torch.manual_seed(12345)
    np.random.seed(12345)  # noqa: NPY002 (the global generator is the point)
    random.seed(12345)
    expected = (torch.get_rng_state(), np.random.get_state(), random.getstate())  # noqa: NPY002
    make_policy("pretrained", CONFIG, OBSERVATION_SPACE, ACTION_SPACE)
    assert torch.equal(torch.get_rng_state(), expected[0])
    numpy_state = np.random.get_state()  # noqa: NPY002
    assert numpy_state[0] == expected[1][0] and np.array_equal(numpy_state[1], expected[1][1])
    assert numpy_state[2:] == expected[1][2:]
    assert random.getstate() == expected[2]


class _RecordingModel:
    """Stands in for the SB3 model: records what it is shown and answers a fixed action."""

    def __init__(self, action):
        self.action = np.asarray(action)
        self.seen = []

    def predict(self, observation, state=None, episode_start=None, deterministic=False):
        self.seen.append(np.array(observation, copy=True))
        return self.action.copy(), state


def test_policy_view_shows_fp16_groups_as_bf16():
    layout = ObservationLayout(n_groups=3)
    obs = np.full(layout.size, 0.25, dtype=np.float32)
    for group, (fp32, bf16, fp16) in enumerate([(1, 0, 0), (0, 1, 0), (0, 0, 1)]):
        for name, value in (("is_fp32", fp32), ("is_bf16", bf16), ("is_fp16", fp16)):
            obs[layout.group(group, name)] = value
    view = policy_view(obs, layout)
    one_hot = [[float(view[layout.group(g, n)]) for n in ("is_fp32", "is_bf16", "is_fp16")] for g in range(3)]
    assert one_hot == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]
    others = [i for i in range(layout.size) if not layout.name(i).endswith(("is_bf16", "is_fp16"))]
    assert np.array_equal(view[others], obs[others])  # nothing else moves
    assert obs[layout.group(2, "is_fp16")] == 1.0  # the caller's observation is left alone


def test_learned_policy_runs_its_16_bit_groups_in_the_format_the_speed_trial_found_faster():
    learned = LearnedPolicy(pretrained_policy_path(), OBSERVATION_SPACE, ACTION_SPACE)
    assert [learned.wants_speed_trial(gpu) for gpu in (True, False)] == [True, False]  # as the heuristic
    learned.speed_trial = False
    assert [learned.wants_speed_trial(gpu) for gpu in (True, False)] == [False, False]
    layout = ObservationLayout(CONFIG.n_groups)
    obs = np.zeros(layout.size, dtype=np.float32)
    for group in range(layout.n_groups):
        obs[layout.group(group, "is_fp16")] = 1.0  # every group already runs in fp16
    learned.model = _RecordingModel([0, 1, 2, 1, 2, 1])  # fp32, bf16, fp16, bf16; LR index 2; keep the batch
    action, _ = learned.predict(obs, deterministic=True)
    assert action.tolist() == [0, 1, 2, 1, 2, 1] and np.array_equal(learned.model.seen[-1], obs)  # no trial: as is

    learned.initial_precision = Precision.BF16
    assert learned.choose_low_precision({Precision.BF16: 7.0, Precision.FP16: 5.8}) is Precision.FP16
    assert learned.initial_precision is Precision.FP16  # a 16-bit start follows
    action, _ = learned.predict(obs, deterministic=True)
    assert action.tolist() == [0, 2, 2, 2, 2, 1]  # 16-bit groups run as fp16; the LR and batch entries untouched
    assert np.array_equal(learned.model.seen[-1], policy_view(obs, layout))  # it saw the groups as bf16
    assert learned.choose_low_precision({Precision.BF16: 5.0, Precision.FP16: 5.8}) is Precision.BF16
    action, _ = learned.predict(obs, deterministic=True)
    assert action.tolist() == [0, 1, 1, 1, 2, 1]  # and as bf16 where the trial found bf16 faster

    fp32_start = LearnedPolicy(pretrained_policy_path(), OBSERVATION_SPACE, ACTION_SPACE)
    fp32_start.choose_low_precision({Precision.BF16: 7.0, Precision.FP16: 5.8})
    assert fp32_start.initial_precision is None  # no start precision set: the model's own (fp32) stays
    with pytest.raises(ValueError, match="step_ms names fp32"):
        fp32_start.choose_low_precision({Precision.FP32: 1.0})


def test_a_tie_in_the_speed_trial_keeps_the_learned_policys_current_format():
    """The docstring said a tie keeps bf16: it keeps the format the policy runs in, bf16 before any trial, fp16 after
    a trial that chose it or where make_policy pinned fp16 (the heuristic's use_fp16)."""
    tie = {Precision.BF16: 5.0, Precision.FP16: 5.0}
    learned = LearnedPolicy(pretrained_policy_path(), OBSERVATION_SPACE, ACTION_SPACE)
    assert learned.choose_low_precision(tie) is Precision.BF16  # no trial yet
    learned.choose_low_precision({Precision.BF16: 6.0, Precision.FP16: 5.0})
    assert learned.choose_low_precision(tie) is Precision.FP16
    pinned = make_policy("pretrained", ControllerConfig(heuristic=HeuristicConfig(use_fp16=True)), OBSERVATION_SPACE,
                         ACTION_SPACE)  # fmt: skip
    assert pinned.choose_low_precision(tie) is Precision.FP16
    doc = " ".join((LearnedPolicy.choose_low_precision.__doc__ or "").split())
    assert "A tie keeps the current format" in doc and "A tie keeps bf16" not in doc


def test_pretrained_gives_the_speed_trial_to_the_policy_and_its_fallback():
    policy = make_policy("pretrained", CONFIG, OBSERVATION_SPACE, ACTION_SPACE)
    assert isinstance(policy, FallbackPolicy) and policy.initial_precision is Precision.BF16
    assert [policy.wants_speed_trial(gpu) for gpu in (True, False)] == [True, False]
    assert policy.choose_low_precision({Precision.BF16: 7.0, Precision.FP16: 5.8}) is Precision.FP16
    assert policy.policy.low_precision is Precision.FP16 and policy.fallback.low_precision is Precision.FP16
    assert policy.initial_precision is Precision.FP16
    off = ControllerConfig(heuristic=HeuristicConfig(speed_trial=False))
    assert not make_policy("pretrained", off, OBSERVATION_SPACE, ACTION_SPACE).wants_speed_trial(True)


def test_model_card_names_the_training_tasks_and_the_command():
    card = (REPO / "triaccel_rl" / "pretrained" / "MODEL_CARD.md").read_text()
    for task in (*TRAINING_TASKS, *HELD_OUT_TASKS):
        assert f"`{task}`" in card, task
    assert "python experiments/train_pretrained.py" in card
    assert "environment steps trained" in card
    fresh = card[card.index("## Evaluation on the fresh held-out tasks") :]
    for task in FRESH_HELD_OUT_TASKS:
        assert f"| {task} | pretrained |" in fresh, task


def test_tiny_training_run_gives_a_policy_that_loads(tiny_policy):
    assert tiny_policy.is_file() and obs_stats_path(tiny_policy).is_file()
    policy = make_policy(str(tiny_policy), CONFIG, OBSERVATION_SPACE, ACTION_SPACE)
    assert isinstance(policy, FallbackPolicy)
    assert policy.stats.n_observations == 48  # two rollouts of 24 decisions


def test_one_policy_runs_on_models_of_different_depth(tiny_policy):
    policy = LearnedPolicy(tiny_policy, OBSERVATION_SPACE, ACTION_SPACE)
    depths = {}
    for task in ("synthetic", "deep-mlp-synthetic"):  # 3 vs 7 controllable Linear layers
        env = gym.make("TriAccel-v0", task=task, config=ControllerConfig(interval_steps=2), max_decisions=2)
        observation, info = env.reset(seed=1)
        depths[task] = info["n_layers"]
        assert observation.shape == OBSERVATION_SPACE.shape
        for _ in range(2):
            action, _ = policy.predict(observation, deterministic=True)
            assert env.action_space.contains(np.asarray(action))
            observation, reward, _, _, _ = env.step(action)
            assert np.isfinite(reward)
    assert depths["synthetic"] != depths["deep-mlp-synthetic"], depths


def test_task_cycle_env_visits_every_task_and_passes_the_checkers():
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    def make(task):
        return gym.make("TriAccel-v0", task=task, config=ControllerConfig(interval_steps=2), max_decisions=2)

    env = TaskCycleEnv([make("synthetic"), make("deep-mlp-synthetic")])
    resets = [env.reset(seed=0 if k == 0 else None) for k in range(3)]
    assert [info["task"] for _, info in resets] == ["synthetic", "deep-mlp-synthetic", "synthetic"]
    # The environment left behind is closed: one run lives at a time (each task's run stayed in memory before).
    assert env.envs[1].unwrapped.loop is None and env.envs[0].unwrapped.loop is not None
    env.reset()  # on deep-mlp-synthetic; then a seeded reset (SB3's seed() then reset()) closed nothing: two runs
    env.reset(seed=1)
    assert env.envs[1].unwrapped.loop is None and env.envs[0].unwrapped.loop is not None
    env.reset(seed=0)
    env.reset()
    env.reset()
    # Closing changes no episode: a lone environment on the same generator, never closed, gives the same ones.
    alone = make("synthetic")
    alone.unwrapped.np_random = gym.utils.seeding.np_random(0)[0]
    alone.reset()
    assert np.array_equal(alone.reset()[0], resets[2][0])
    assert env.envs[0].unwrapped.render() is None  # Gymnasium's convention for render_mode None: it raised
    check_env(env, skip_render_check=True)  # (no spec for its other render modes: a TaskCycleEnv is not made)
    sb3_check_env(env)
    with pytest.raises(ValueError, match="same observation and action spaces"):
        TaskCycleEnv([make("synthetic"), gym.make("TriAccel-v0", config=ControllerConfig(n_groups=2))])


def test_policy_for_other_spaces_is_refused_by_the_controller(tmp_path):
    from stable_baselines3 import PPO

    class Other(gym.Env):
        observation_space = gym.spaces.Box(-1, 1, (5,), np.float32)
        action_space = gym.spaces.Discrete(2)

    path = tmp_path / "other.zip"
    PPO("MlpPolicy", Other(), n_steps=8, batch_size=8, device="cpu").save(path)
    model = nn.Linear(4, 2)
    with pytest.raises(PolicyLoadError, match=r"trained for observation space Box.*\(5,\).*\(43,\)"):
        Controller(model, torch.optim.SGD(model.parameters(), lr=0.1), policy=str(path), device="cpu")


def test_truncated_policy_zip_is_a_clear_error(tiny_policy, tmp_path):
    broken = tmp_path / "broken.zip"
    data = tiny_policy.read_bytes()
    broken.write_bytes(data[: len(data) // 2])  # an interrupted download or copy
    # The .pth members are zips too, so the cut file still opens as a zip: SB3 said only "No data found"
    with pytest.raises(
        PolicyLoadError,
        match=r"broken\.zip': it holds no 'data' member: not a whole stable-baselines3 zip \(truncated\?\); save or "
        r"copy the policy again$",
    ):
        make_policy(str(broken))


def test_an_interrupted_stats_save_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    """The stats were written in place: a save cut short left a file that did not load, and its policy with it."""
    path = tmp_path / "policy.obs.json"
    old = ObservationStats((0.0, 1.0), (1.0, 2.0), 5)
    old.save(path)
    real_write = Path.write_text

    def cut_short(self, text, *args, **kwargs):
        real_write(self, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", cut_short)
    with pytest.raises(KeyboardInterrupt):
        ObservationStats((0.0, 0.0), (3.0, 3.0), 9).save(path)
    monkeypatch.undo()
    assert ObservationStats.load(path) == old
    assert [p.name for p in tmp_path.iterdir()] == ["policy.obs.json"]  # the half-written temporary file was left
    ObservationStats((0.0, 0.0), (3.0, 3.0), 9).save(path)
    assert ObservationStats.load(path).n_observations == 9


def test_observation_stats_with_missing_fields_are_a_clear_error(tiny_policy, tmp_path):
    zip_path = tmp_path / "policy.zip"
    shutil.copyfile(tiny_policy, zip_path)
    zip_path.with_suffix(".obs.json").write_text(json.dumps({"low": [0.0] * 43}))
    with pytest.raises(ValueError, match=r"lack \['high', 'n_observations'\]"):
        make_policy(str(zip_path), CONFIG, OBSERVATION_SPACE, ACTION_SPACE)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (json.dumps({"low": [0.0] * 2, "high": [1.0] * 2, "n_observations": 4}), "hold 2 features; this .* 43"),
        ("{'low': [0.0]}", "are not valid JSON"),
        (json.dumps({"low": [0.0] * 43, "high": [1.0] * 42, "n_observations": 4}), "got 43 and 42 values"),
        (json.dumps({"low": ["x"], "high": [1.0], "n_observations": 4}), r"low \['x'\] must be a list of numbers"),
        # Before the fix these loaded: a string's characters as features, a bool as 1, a count truncated or negative
        (json.dumps({"low": "00", "high": "11", "n_observations": 4}), r"low '00' must be a list of numbers"),
        (json.dumps({"low": [True], "high": [1.0], "n_observations": 4}), r"low \[True\] must be a list of numbers"),
        (json.dumps({"low": [0.0], "high": [1.0], "n_observations": 4, "lr_scales": "12"}), r"lr_scales '12' must"),
        (json.dumps({"low": [0.0], "high": [1.0], "n_observations": -5}), r"n_observations -5 must be a whole number"),
        (json.dumps({"low": [0.0], "high": [1.0], "n_observations": 2.9}), r"n_observations 2\.9 must be a whole"),
        (json.dumps({"low": [0.0], "high": [1.0], "n_observations": True}), r"n_observations True must be a whole"),
        # NaN passed "low <= high", and every observation, the range's centre too, went to the heuristic
        ('{"low": [NaN, 0.0], "high": [1.0, 1.0], "n_observations": 4}', r"feature 0 has the range \[nan, 1.0\]"),
        ('{"low": [0.0], "high": [1.0], "n_observations": 4, "lr_scales": [1.0, NaN]}', r"lr_scales \[1.0, nan\]"),
        *(
            (
                f'{{"low": [0.0], "high": [1.0], "n_observations": 4, "interval_steps": {bad}}}',
                f"interval_steps {shown}",
            )
            for bad, shown in (("0", "0"), ("2.5", "2.5"), ("true", "True"), ('"10"', "'10'"))
        ),
    ],
)
def test_observation_stats_that_cannot_serve_the_policy_are_refused_on_loading(tiny_policy, tmp_path, text, message):
    """Stats of another length once loaded, then failed at the first decision (or never, in a run too short to
    decide); a file that is not JSON raised the parser's bare message."""
    zip_path = tmp_path / "policy.zip"
    shutil.copyfile(tiny_policy, zip_path)
    zip_path.with_suffix(".obs.json").write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        make_policy(str(zip_path), CONFIG, OBSERVATION_SPACE, ACTION_SPACE)
    assert "policy.obs.json" in str(info.value)


@pytest.mark.parametrize(
    ("broken", "why"),
    [
        ("binary", "'utf-8' codec can't decode byte 0xff in position 0: invalid start byte"),
        ("unreadable", "[Errno 5] Input/output error"),
    ],
)
def test_observation_stats_that_cannot_be_read_are_refused_naming_the_file(tmp_path, monkeypatch, broken, why):
    """A binary .obs.json raised the decoder's bare "'utf-8' codec can't decode byte 0xff", and a read that failed
    the bare OSError: neither named the file (from make_policy, compare or train-policy --resume)."""
    zip_path = tmp_path / "policy.zip"
    shutil.copyfile(pretrained_policy_path(), zip_path)
    stats = zip_path.with_suffix(".obs.json")
    stats.write_bytes(b"\xff\xfe\x00garbage")
    if broken == "unreadable":
        stats.write_text(pretrained_policy_path().with_suffix(".obs.json").read_text())

        def failing_read(self, *args, **kwargs):
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(Path, "read_text", failing_read)
    message = f"observation stats {str(stats)!r} cannot be read: {why}"
    with pytest.raises(ValueError, match=re.escape(message) + "$"):
        ObservationStats.load(stats)
    with pytest.raises(ValueError, match=re.escape(message)):
        make_policy(str(zip_path), CONFIG, OBSERVATION_SPACE, ACTION_SPACE)


def test_resuming_widens_the_observation_range_and_takes_new_rollout_sizes(tiny_policy, tmp_path):
    """``--resume P --out P`` once replaced P's observation range by the resumed run's alone (its fallback then sent
    observations of the first run to the heuristic), and ignored new ``n_steps``/``batch_size``."""
    from stable_baselines3 import PPO

    before = ObservationStats.load(tiny_policy.with_suffix(".obs.json"))
    out = train_policy(["synthetic"], total_timesteps=16, n_envs=1, vec="dummy", max_decisions=3, interval_steps=2,
                       n_steps=16, batch_size=8, seed=1, out=tmp_path / "resumed.zip", resume=tiny_policy,
                       torch_threads=1)  # fmt: skip
    after = ObservationStats.load(out.with_suffix(".obs.json"))
    assert after.n_observations == before.n_observations + 16
    assert all(a <= b for a, b in zip(after.low, before.low, strict=True))
    assert all(a >= b for a, b in zip(after.high, before.high, strict=True))
    assert after.lr_scales == before.lr_scales
    assert before.interval_steps == after.interval_steps == 2  # the interval trained at, recorded by both runs
    model = PPO.load(out, device="cpu")
    assert (model.n_steps, model.batch_size) == (16, 8)


def test_a_policy_run_with_another_lr_ladder_of_the_same_length_is_refused():
    """The spaces match (5 rungs either way), but the aggressive preset's rung 4 is x2.0 where the policy had x1.5."""
    aggressive = ControllerConfig.preset("aggressive")
    assert len(aggressive.lr_scales) == len(CONFIG.lr_scales) and aggressive.lr_scales != CONFIG.lr_scales
    with pytest.raises(PolicyLoadError, match=r"trained with LR multipliers \[0.5, 0.75, 1.0, 1.25, 1.5\].*"
                       r"this configuration's are \[0.5, 0.75, 1.0, 1.5, 2.0\]"):  # fmt: skip
        make_policy("pretrained", aggressive, OBSERVATION_SPACE, ACTION_SPACE)
    assert ObservationStats.load(pretrained_policy_path().with_suffix(".obs.json")).lr_scales == CONFIG.lr_scales


def test_a_policy_run_with_a_shorter_lr_ladder_names_the_ladders():
    """The "safe" preset's 3 rungs made another action space: the error said the spaces differ and to retrain,
    naming neither ladder (the "aggressive" preset's 5 got the clear one)."""
    safe = ControllerConfig.preset("safe")
    with pytest.raises(PolicyLoadError, match=r"trained with LR multipliers \[0.5, 0.75, 1.0, 1.25, 1.5\].*"
                       r"this configuration's are \[0.75, 1.0, 1.25\].*--lr-scales.*`triaccel-rl train-policy` trains "
                       r"policies for the default ladder and groups only"):  # fmt: skip
        make_policy("pretrained", safe)  # (it said to retrain with train-policy, which has no ladder to give)


def test_observation_stats_without_a_ladder_still_load(tiny_policy, tmp_path):
    """A stats file from before the ladder was recorded: loaded, and nothing to check the ladder against."""
    zip_path = tmp_path / "policy.zip"
    shutil.copyfile(tiny_policy, zip_path)
    stats = json.loads(tiny_policy.with_suffix(".obs.json").read_text())
    assert stats.pop("lr_scales") == list(ControllerConfig(interval_steps=2).lr_scales)  # what training records
    zip_path.with_suffix(".obs.json").write_text(json.dumps(stats))
    policy = make_policy(str(zip_path), ControllerConfig.preset("aggressive"), OBSERVATION_SPACE, ACTION_SPACE)
    assert isinstance(policy, FallbackPolicy) and policy.stats.lr_scales is None


def test_profile_with_missing_fields_is_a_clear_error_in_the_env_and_training(tmp_path):
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"device": "x", "time_factor": {"fp32": 1.0, "bf16": 0.5, "fp16": 0.5}}))
    with pytest.raises(ConfigError, match=r"lacks the fields \['memory_factor', 'fixed_ms', 'throughput_scale'\]"):
        gym.make("TriAccel-v0", task="synthetic", profile=str(profile))
    with pytest.raises(ConfigError, match=r"lacks the fields \['memory_factor', 'fixed_ms', 'throughput_scale'\]"):
        train_policy(["synthetic"], total_timesteps=8, n_envs=1, vec="dummy", n_steps=8, batch_size=8,
                     out=tmp_path / "p.zip", profile=str(profile))  # fmt: skip


def test_train_pretrained_smoke(tmp_path):
    script = REPO / "experiments" / "train_pretrained.py"
    # An earlier run's warm start in the reused run dir: the card reported it as this run's (which had none)
    (tmp_path / "warm_start.json").write_text(json.dumps({"teacher": "heuristic", "decisions": 8}))
    done = subprocess.run(
        [sys.executable, str(script), "--smoke", "--run-dir", str(tmp_path), "--lr-range", "0.5,2"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    facts = json.loads((tmp_path / "training.json").read_text())
    assert facts["args"]["lr_range"] == "0.5,2"
    assert facts["timesteps_trained"] >= 32 and facts["env_steps_per_s"] > 0
    assert facts["warm_start"] is None
    train_pretrained = import_experiment("train_pretrained")
    card = train_pretrained.model_card(facts)
    assert "| environments | 1 × `DummyVecEnv`" in card  # it said SubprocVecEnv
    assert "| seeds | PPO seed 0; worker `i`'s `k`-th task seeded `0 + k * 1 + i` |" in card  # it said `0 + i`
    LearnedPolicy(tmp_path / "policy.zip", OBSERVATION_SPACE, ACTION_SPACE)


def test_the_card_names_the_commit_that_trained_not_the_one_at_the_end(tiny_policy, tmp_path, monkeypatch):
    """The commit was read when the card was written, after training: a commit made during a 15-minute run was
    named as the code that trained."""
    import triaccel_rl.rl

    train_pretrained = import_experiment("train_pretrained")
    head = ["at-start"]
    monkeypatch.setattr(train_pretrained, "git_commit", lambda: head[0])

    def fake_train_policy(*args, out, **kwargs):
        head[0] = "committed-while-training"
        shutil.copyfile(tiny_policy, out)
        shutil.copyfile(tiny_policy.with_suffix(".obs.json"), Path(out).with_suffix(".obs.json"))
        return Path(out)

    monkeypatch.setattr(triaccel_rl.rl, "train_policy", fake_train_policy)
    facts = train_pretrained.main(train_pretrained.Args(run_dir=str(tmp_path), ship_dir=""))
    assert facts["commit"] == "at-start"


def _fake_training(tiny_policy, outs):
    """A ``train_policy`` that records its ``out`` and puts ``tiny_policy`` there, with an evaluation if asked."""

    def fake_train_policy(*args, out, eval_every=0, **kwargs):
        outs.append(Path(out))
        shutil.copyfile(tiny_policy, out)
        shutil.copyfile(obs_stats_path(tiny_policy), obs_stats_path(out))
        if eval_every > 0:
            time.sleep(0.05)  # training takes time: a file time is on a coarser clock than time.time()
            (Path(out).parent / "eval").mkdir(exist_ok=True)
            np.savez(Path(out).parent / "eval" / "evaluations.npz", timesteps=np.array([eval_every]),
                     results=np.array([[2.0, 4.0]]), ep_lengths=np.array([[3, 3]]))  # fmt: skip
        return Path(out)

    return fake_train_policy


def test_a_smoke_run_trains_into_a_temporary_folder_unless_given_one(tiny_policy, tmp_path, monkeypatch, capsys):
    """--smoke kept the default --run-dir: run from the repository, the plumbing check wrote over the real run's
    policy and training.json in runs/pretrained (the script's docstring said a temporary folder)."""
    import tempfile

    import triaccel_rl.rl

    train_pretrained = import_experiment("train_pretrained")
    monkeypatch.setattr(train_pretrained, "git_commit", lambda: "test")
    outs: list[Path] = []
    monkeypatch.setattr(triaccel_rl.rl, "train_policy", _fake_training(tiny_policy, outs))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    train_pretrained.main(train_pretrained.Args(smoke=True))
    assert not (tmp_path / "runs").exists()
    assert outs[0].parent.parent == tmp_path / "tmp" and (outs[0].parent / "training.json").is_file()
    assert f"--smoke: --run-dir {outs[0].parent} (not the default runs/pretrained)" in capsys.readouterr().err
    train_pretrained.main(train_pretrained.Args(smoke=True, run_dir="mine"))  # one given is taken
    assert outs[1] == Path("mine") / "policy.zip" and (tmp_path / "mine" / "training.json").is_file()


def test_training_json_records_only_this_runs_evaluations(tiny_policy, tmp_path, monkeypatch):
    """A reused run dir keeps an earlier run's eval/evaluations.npz: a run that evaluated nothing (--eval-every 0, as
    --smoke sets) recorded those evaluations as its own in training.json, and so in the model card's table."""
    import os

    import triaccel_rl.rl

    train_pretrained = import_experiment("train_pretrained")
    monkeypatch.setattr(train_pretrained, "git_commit", lambda: "test")
    monkeypatch.setattr(triaccel_rl.rl, "train_policy", _fake_training(tiny_policy, []))
    earlier = tmp_path / "eval" / "evaluations.npz"
    earlier.parent.mkdir()
    np.savez(earlier, timesteps=np.array([1024]), results=np.array([[13.0, 9.0]]), ep_lengths=np.array([[16, 16]]))
    os.utime(earlier, (time.time() - 60, time.time() - 60))  # an earlier run's
    facts = train_pretrained.main(train_pretrained.Args(run_dir=str(tmp_path), ship_dir="", eval_every=0))
    assert facts["evaluations"] == []
    assert json.loads((tmp_path / "training.json").read_text())["evaluations"] == []
    facts = train_pretrained.main(train_pretrained.Args(run_dir=str(tmp_path), ship_dir="", eval_every=8))
    assert facts["evaluations"] == [{"timesteps": 8, "mean_reward": 3.0, "std_reward": 1.0}]  # its own are recorded


def test_a_checkpoint_shipped_records_only_its_runs_evaluations_and_time(tiny_policy, tmp_path, monkeypatch):
    """--from-checkpoint took the run dir's evaluations as they were (a finished earlier run's, where the interrupted
    run was killed before its first evaluation) and timed training from the oldest TensorBoard run's start."""
    import os

    train_pretrained = import_experiment("train_pretrained")
    monkeypatch.setattr(train_pretrained, "git_commit", lambda: "test")
    monkeypatch.setattr(
        train_pretrained, "_stats_from_rollouts", lambda zip_path, tasks, args: shutil.copyfile(
            obs_stats_path(tiny_policy), obs_stats_path(zip_path))
    )  # fmt: skip
    now = int(time.time())
    for run, began in (("PPO_1", now - 100), ("PPO_2", now - 20)):  # an earlier run's, then the interrupted run's
        (tmp_path / "tensorboard" / run).mkdir(parents=True)
        (tmp_path / "tensorboard" / run / f"events.out.tfevents.{began}.host.1.0").write_bytes(b"")
    checkpoint = tmp_path / "checkpoints" / "policy_48_steps.zip"  # tiny_policy trained 48 steps
    checkpoint.parent.mkdir()
    shutil.copyfile(tiny_policy, checkpoint)
    os.utime(checkpoint, (now - 5, now - 5))
    evaluations = tmp_path / "eval" / "evaluations.npz"
    evaluations.parent.mkdir()

    def ship(steps: list[int], written: int) -> dict:
        np.savez(evaluations, timesteps=np.array(steps), results=np.array([[1.0, 3.0]] * len(steps)),
                 ep_lengths=np.array([[3, 3]] * len(steps)))  # fmt: skip
        os.utime(evaluations, (written, written))
        args = train_pretrained.Args(run_dir=str(tmp_path), ship_dir="", from_checkpoint=str(checkpoint))
        return train_pretrained.main(args)

    facts = ship([8, 16, 24], written=now - 50)  # the earlier run's, written before the interrupted run started
    assert facts["evaluations"] == [] and facts["timesteps_trained"] == 48
    assert facts["wall_s"] == 15  # from PPO_2's start to the checkpoint's write (PPO_1's gave 95)
    facts = ship([24, 48, 72], written=now - 10)  # the interrupted run's: 72 scored weights after the checkpoint's
    assert [evaluation["timesteps"] for evaluation in facts["evaluations"]] == [24, 48]
    os.utime(checkpoint, (now - 30, now - 30))  # before the newest run started: an earlier run's checkpoint
    with pytest.raises(SystemExit, match="written before the newest TensorBoard run started"):
        ship([8], written=now - 10)


def test_the_card_says_what_a_run_before_2026_12_05_did():
    """The shipped policy's card said each worker cycled through every training task and nothing of which weights its
    evaluations scored: trained before 2026-12-05, its 2 workers shared 3 tasks 50/25/25, and each evaluation scored
    the weights one rollout before its step count. Its training.json lacks the facts a later run records."""
    train_pretrained = import_experiment("train_pretrained")
    facts = json.loads((REPO / "experiments/results/issue6_2026-12-05/retrained_training.json").read_text())
    card = train_pretrained.model_card(facts)
    said = [
        "(trained before `8a0b6a5` (2026-12-05), when each worker cycled through only some of them, one per episode: "
        "worker 0 through `synthetic`, `cnn-fmnist`; worker 1 through `mlp-fmnist`, `synthetic`; so each task's share "
        "of the episodes was `synthetic` 50%, `mlp-fmnist` 25%, `cnn-fmnist` 25%. Since then every worker cycles "
        "through all of them: the command above trains on equal shares now, and does not give these weights again)",
        "each row scores the weights one rollout (128 × 2 = 256 steps) before its step count (the 4096 row scored the "
        "weights trained on 3840 steps), and the final weights were not evaluated.",
    ]
    shipped = (REPO / "triaccel_rl" / "pretrained" / "MODEL_CARD.md").read_text()
    for text in said:
        assert text in card and text in shipped
    later = train_pretrained.model_card({**facts, "evaluated_after_update": True, "every_worker_every_task": True})
    assert "| `synthetic`, `mlp-fmnist`, `cnn-fmnist` (each worker cycles through them, one per episode) |" in later
    assert "`EvalCallback`, each row on the weights trained on its step count (the checkpoint of that count):" in later
    assert "Produced before 2026-12-05" not in later and "trained before 2026-12-05" not in later


def test_a_card_shows_only_the_evaluations_of_the_policy_it_describes():
    """A retrained policy's card showed the shipped policy's evaluation tables (and its MISSED target check) as its
    own: ``transfer.json`` was read whatever policy its runs had scored."""
    import hashlib

    train_pretrained = import_experiment("train_pretrained")
    facts = json.loads((REPO / "experiments/results/issue6_2026-12-05/retrained_training.json").read_text())
    shipped = hashlib.sha256((REPO / "triaccel_rl/pretrained/policy.zip").read_bytes()).hexdigest()
    held = {
        r["policy_sha256"]
        for r in json.loads((REPO / "experiments/results/transfer.json").read_text())["runs"]
        if r["controller"] == "pretrained"
    }
    assert held == {shipped}  # the recorded evaluation is of the shipped zip
    card = train_pretrained.model_card(facts, policy_sha256=shipped)
    assert "Issue 6's target check" in card and "Not run yet for this policy" not in card
    other = train_pretrained.model_card(facts, policy_sha256="0" * 64)
    assert "Issue 6's target check" not in other
    for name in ("transfer.json", "transfer_fresh.json"):
        assert other.count(f"Not run yet for this policy (sha256 000000000000; `{name}` holds") == 1
    assert f"holds the evaluation of policy {shipped[:12]}" in other


def test_a_relative_ship_dir_is_the_repositorys_wherever_the_script_runs(tmp_path, monkeypatch):
    """Run from another folder, the default ship_dir made a stray copy there and printed "shipped"."""
    train_pretrained = import_experiment("train_pretrained")
    monkeypatch.chdir(tmp_path)
    assert train_pretrained._ship_dir(train_pretrained.Args()) == REPO / "triaccel_rl" / "pretrained"
    assert train_pretrained._ship_dir(train_pretrained.Args(ship_dir=str(tmp_path))) == tmp_path


def test_the_model_card_reads_training_json_with_null_numbers(tmp_path):
    """training.json holds a NaN evaluation or warm-start fit as null (strict JSON): the card written from the file
    (``--card-only``) reads it as "n/a", as the card written at the end of training reads the NaN it still holds.
    Before, ``json.dumps`` wrote ``NaN``, and the card's ``format`` of a null raised ``TypeError``."""
    from triaccel_rl.compare import json_safe

    train_pretrained = import_experiment("train_pretrained")
    facts = {
        "args": {**dataclasses.asdict(train_pretrained.Args()), "warm_start_epochs": 1},
        "command": "python experiments/train_pretrained.py", "training_tasks": ["synthetic"],
        "held_out_tasks": ["mlp-fmnist"], "timesteps_trained": 32, "wall_s": 1.0, "env_steps_per_s": 32.0,
        "shipped_from_checkpoint": None, "profile": "h200", "machine": "cpu", "commit": "abc", "date": "2026-12-05",
        "warm_start": {"teacher": "heuristic", "decisions": 8, "epochs": 1, "nll": math.inf, "value_mse": math.nan,
                       "agreement": math.nan},
        "evaluations": [{"timesteps": 16, "mean_reward": math.nan, "std_reward": math.nan},
                        {"timesteps": 32, "mean_reward": 1.5, "std_reward": 0.25}],
    }  # fmt: skip
    with_nan = train_pretrained.model_card(facts)
    read_back = json.loads(json.dumps(json_safe(facts), allow_nan=False))
    assert read_back["evaluations"][0]["mean_reward"] is None
    card = train_pretrained.model_card(read_back)
    assert card == with_nan
    assert "| 16 | n/a ± n/a |" in card and "| 32 | 1.50 ± 0.25 |" in card
    assert "matched n/a of them" in card


def test_train_pretrained_reads_the_lr_range():
    sys.path.insert(0, str(REPO / "experiments"))
    try:
        import train_pretrained
    finally:
        sys.path.remove(str(REPO / "experiments"))
    assert train_pretrained._lr_range(train_pretrained.Args(lr_range="0.5,2")) == (0.5, 2.0)
    assert train_pretrained._lr_range(train_pretrained.Args()) is None
    with pytest.raises(SystemExit, match="--lr-range '2': expected LOW,HIGH"):
        train_pretrained._lr_range(train_pretrained.Args(lr_range="2"))


def test_transfer_smoke(tmp_path):
    sys.path.insert(0, str(REPO / "experiments"))
    try:
        import transfer
    finally:
        sys.path.remove(str(REPO / "experiments"))
    out = tmp_path / "transfer.json"
    plots = tmp_path / "plots"
    document = transfer.main(transfer.Args(smoke=True, out=str(out), plots=str(plots)))
    saved = json.loads(out.read_text())
    png = plots / "transfer_deep-mlp-synthetic.png"
    assert png.stat().st_size > 10_000  # three panels drawn
    png.unlink()
    assert transfer.main(transfer.Args(out=str(out), plots=str(plots), plots_only=True)) == saved  # nothing re-run
    assert png.stat().st_size > 10_000
    assert set(saved["summary"]["deep-mlp-synthetic"]) == {"heuristic", "bf16"}
    assert saved["target_check"]["met"] is None  # no learned row in the smoke run
    assert saved["learned_vs_heuristic_time_gain"] is None
    assert len(document["runs"]) == 2
    assert saved["command"].startswith("python experiments/transfer.py")
    assert saved["device"] and saved["commit"] and saved["date"] == time.strftime("%Y-%m-%d")
    # --reuse keeps the runs of the seeds asked for only: a file holding seed 1 too (from a run of --seeds 2) once
    # put it in the summary of a --seeds 1 job
    extra = {**saved["runs"][0], "seed": 1}
    out.write_text(json.dumps({**saved, "runs": [*saved["runs"], extra]}))
    reused = transfer.main(transfer.Args(smoke=True, reuse=True, out=str(out), plots=""))
    assert sorted((run["controller"], run["seed"]) for run in reused["runs"]) == [("bf16", 0), ("heuristic", 0)]
    assert reused["runs"] == saved["runs"]  # reused, not run again
    # Times in ms to 4 figures: at .3f seconds the held-out rows, 6.297 ms and 6.034 ms, both read 0.006
    assert "time to target (ms, modelled H200)" in transfer.format_table(saved["summary"])
    assert [transfer._fmt(t) for t in (0.006297, 0.006034, None)] == ["6.297", "6.034", "–"]
    fake = {
        "t": {
            name: {"time_to_target_charged_s_mean": t, "final_metric_mean": acc}
            for name, t, acc in [("pretrained", 0.8, 0.90), ("heuristic", 1.0, 0.9), ("bf16", 0.78, 0.902)]
        }
    }
    check = transfer.target_check(fake)
    assert check["met"] is True, check["lines"]
    fake["t"]["pretrained"]["time_to_target_charged_s_mean"] = 0.95
    assert transfer.target_check(fake)["met"] is False
    # --judge: a candidate zip's row judged instead (rows are keyed by the --controllers spec: its path)
    fake["t"]["runs/candidate.zip"] = {**fake["t"].pop("pretrained"), "time_to_target_charged_s_mean": 0.8}
    assert transfer.target_check(fake)["lines"] == ["target check: missing rows (need pretrained, heuristic, bf16)"]
    assert transfer.target_check(fake, "runs/candidate.zip")["met"] is True
    # A task without the judged row: not judged on the others alone (a job stopped after its first task said MET)
    fake["u"] = {name: dict(row) for name, row in fake["t"].items() if name != "runs/candidate.zip"}
    partial = transfer.target_check(fake, "runs/candidate.zip")
    assert partial["met"] is None and partial["missing"] == {"u": ["runs/candidate.zip"]}
    assert (
        partial["lines"][-1]
        == "not judged: rows missing on u (no runs/candidate.zip): the margins above are of 1 of 2 tasks"
    )
    with pytest.raises(ValueError, match=r"--judge 'learned:candidate.zip' is none of --controllers: heuristic, bf16"):
        transfer.main(transfer.Args(smoke=True, judge="learned:candidate.zip", out=str(out), plots=""))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tasks": " , "}, "--tasks ' , ' is empty"),
        ({"controllers": ","}, "--controllers ',' is empty"),
        ({"controllers": "heuristic,no-such-controller"}, "no-such-controller"),
    ],
)
def test_transfer_refuses_bad_tasks_and_controllers_before_any_run(kwargs, message, monkeypatch):
    """A bad second controller used to stop the job after the first controller's runs on the first task."""
    import triaccel_rl.compare as compare_module

    transfer = import_experiment("transfer")

    def no_runs(*args, **kw):
        raise AssertionError("compare ran before the arguments were checked")

    monkeypatch.setattr(compare_module, "compare", no_runs)
    with pytest.raises(ValueError, match=re.escape(message)):
        transfer.main(transfer.Args(out="", plots="", **kwargs))


def test_transfer_tunes_each_tasks_lr_on_a_static_grid(monkeypatch):
    """``--tune-lr``: the factor reaching the target on the most seeds wins, then the soonest; a miss costs its run."""
    from types import SimpleNamespace

    import triaccel_rl.compare as compare_module

    sys.path.insert(0, str(REPO / "experiments"))
    try:
        import transfer
    finally:
        sys.path.remove(str(REPO / "experiments"))
    # Per LR factor, each seed's (time to target or None, whole-run time): x2 reaches soonest but misses a seed.
    outcomes = {1.0: [(5.0, 9.0), (6.0, 9.0)], 2.0: [(2.0, 9.0), (None, 9.0)], 3.0: [(4.0, 9.0), (4.0, 9.0)]}
    seen_lrs = []
    from triaccel_rl.tasks import get_task

    base_lr = get_task("deep-mlp-synthetic").base_lr

    def fake_compare(task, controllers, seeds, **kwargs):
        factor = task.base_lr / base_lr
        seen_lrs.append(factor)
        return [SimpleNamespace(time_to_target_s=t, time_s=run, final_metric=0.8) for t, run in outcomes[factor]]

    monkeypatch.setattr(compare_module, "compare", fake_compare)
    grid = transfer.tune_lr("deep-mlp-synthetic", [1.0, 2.0, 3.0], transfer.Args(seeds=2), ControllerConfig())
    assert seen_lrs == pytest.approx([1.0, 2.0, 3.0])
    assert grid["chosen"] == 3.0  # x2's charged mean is 5.5 with a miss; x3 reaches on both seeds, sooner than x1
    assert [row["reach_rate"] for row in grid["rows"]] == [1.0, 0.5, 1.0]
    assert grid["rows"][1]["time_to_target_charged_s_mean"] == 5.5
    with pytest.raises(ValueError, match=r"--tune-lr '1,0': '0' must be positive"):
        transfer.main(transfer.Args(tune_lr="1,0", smoke=True, out="", plots=""))


def test_calibration_target_is_98_percent_rounded_down_to_half_a_point():
    transfer = import_experiment("transfer")
    assert [transfer.calibration_target(a) for a in (0.8537, 0.9, 1.0, 0.5)] == [0.835, 0.88, 0.98, 0.49]


def test_calibrate_runs_static_fp32_on_the_calibration_seed_for_each_fresh_task(monkeypatch, tmp_path):
    """``--calibrate --tasks fresh``: one static fp32 run per fresh task, on a seed no comparison uses."""
    from types import SimpleNamespace

    import triaccel_rl.compare as compare_module

    transfer = import_experiment("transfer")
    calls = []

    def fake_compare(task, controllers, seeds, **kwargs):
        calls.append((task.name, controllers, seeds, kwargs["epochs"]))
        return [SimpleNamespace(final_metric=0.9)]

    monkeypatch.setattr(compare_module, "compare", fake_compare)
    out = tmp_path / "calibration.json"
    document = transfer.main(transfer.Args(calibrate=True, tasks="fresh", out=str(out), plots=""))
    assert calls == [(name, ["fp32"], [transfer.CALIBRATION_SEED], 2.0) for name in FRESH_HELD_OUT_TASKS]
    assert transfer.CALIBRATION_SEED not in range(transfer.Args().seeds)
    assert json.loads(out.read_text()) == document
    assert document["tasks"] == {name: {"final_metric": 0.9, "target_metric": 0.88} for name in FRESH_HELD_OUT_TASKS}


def test_the_fresh_held_out_tasks_targets_are_the_recorded_calibrations():
    """The registered targets are what the rule gives on the committed calibration run, nothing tuned after it."""
    from triaccel_rl.tasks import get_task

    transfer = import_experiment("transfer")
    calibration = json.loads((REPO / "experiments" / "results" / "fresh_held_out_calibration.json").read_text())
    assert set(calibration["tasks"]) == set(FRESH_HELD_OUT_TASKS)
    for name in FRESH_HELD_OUT_TASKS:
        recorded = calibration["tasks"][name]
        assert recorded["target_metric"] == transfer.calibration_target(recorded["final_metric"])
        assert get_task(name).target_metric == recorded["target_metric"], name
    assert not set(FRESH_HELD_OUT_TASKS) & {*TRAINING_TASKS, *HELD_OUT_TASKS}


def test_the_shipped_observation_stats_match_the_shipped_zip_and_its_model_card():
    """The ``.obs.json`` beside the shipped zip describes that zip: its observation size, the decisions it trained on
    (the model card's count), the LR ladder of its action space, ranges within the observation bounds."""
    from stable_baselines3 import PPO

    zip_path = pretrained_policy_path()
    stats = ObservationStats.load(zip_path.with_suffix(".obs.json"))
    model = PPO.load(zip_path, device="cpu")
    assert model.observation_space.shape == (len(stats.low),) == (len(stats.high),) == OBSERVATION_SPACE.shape
    assert model.action_space.nvec.tolist() == [3, 3, 3, 3, len(stats.lr_scales), 3]
    card = (REPO / "triaccel_rl" / "pretrained" / "MODEL_CARD.md").read_text()
    assert f"| environment steps trained | {stats.n_observations} decisions" in card
    assert stats.n_observations == model.num_timesteps == 4096
    # The interval it was trained at: the card's env settings, and what it tells a Controller's user to pass.
    assert stats.interval_steps == 10 and f"| env settings | `interval_steps={stats.interval_steps}`" in card
    assert f"`config=ControllerConfig(interval_steps={stats.interval_steps})`" in card
    assert all(-OBS_HIGH <= lo <= hi <= OBS_HIGH for lo, hi in zip(stats.low, stats.high, strict=True))
    layout = ObservationLayout(CONFIG.n_groups)
    for group in range(layout.n_groups):
        for name in ("is_fp32", "is_bf16", "is_fp16"):
            index = layout.group(group, name)
            assert (stats.low[index], stats.high[index]) == (0.0, 1.0), (group, name)


@pytest.mark.parametrize(
    ("feature", "value", "decides"),
    [
        ("log2_batch", 6.0, "learned"),  # trained on [-2, 2]: exactly one width (4) past the edge
        ("log2_batch", 6.0001, "heuristic"),
        ("log2_batch", -6.0, "learned"),
        ("log2_batch", -6.0001, "heuristic"),
        # never varied (0 throughout): a width of 0.1 (at 1, an interval whose every step overflowed stayed learned)
        ("overflow_rate", 0.1, "learned"),
        ("overflow_rate", 0.1001, "heuristic"),
        ("overflow_rate", 1.0, "heuristic"),
    ],
)
def test_the_shipped_policy_falls_back_just_past_one_range_width(feature, value, decides):
    """README: more than one training range width past the edge on any feature goes to the heuristic."""
    policy = make_policy("pretrained", CONFIG, OBSERVATION_SPACE, ACTION_SPACE)
    layout = ObservationLayout(CONFIG.n_groups)
    obs = (np.array(policy.stats.low) + np.array(policy.stats.high)) / 2  # float64: the edges exact
    obs[layout.globals(feature)] = value
    action, _ = policy.predict(obs, deterministic=True)
    learned = [0, 1, 1, 1, 4, 1]  # the shipped policy's constant action (its model card)
    assert (action.tolist() == learned) == (decides == "learned")
    assert policy.fallbacks == (decides == "heuristic")
    if decides == "heuristic":
        assert action.tolist() == HeuristicPolicy(CONFIG).predict(obs)[0].tolist()


_PAST_TWO_IN_20 = float(np.nextafter(np.float32(0.1), np.float32(1)))  # the float32 just over 2 steps in 20


@pytest.mark.parametrize(
    ("rate", "decides"),
    [(1 / 20, "learned"), (2 / 20, "learned"), (_PAST_TWO_IN_20, "heuristic"), (3 / 20, "heuristic")],
)
def test_the_shipped_policy_keeps_two_overflowing_steps_in_20_of_a_float32_observation(rate, decides):
    """README and ``CONSTANT_FEATURE_WIDTH``: only a rate *over* 10% goes to the heuristic. The Controller's
    observation is float32, where 2/20 reads 0.1000000015, 1.0000000149 widths out: it fell back."""
    policy = make_policy("pretrained", CONFIG, OBSERVATION_SPACE, ACTION_SPACE)
    layout = ObservationLayout(CONFIG.n_groups)
    obs = ((np.array(policy.stats.low) + np.array(policy.stats.high)) / 2).astype(np.float32)
    obs[layout.globals("overflow_rate")] = rate
    action, _ = policy.predict(obs, deterministic=True)
    assert policy.fallbacks == (decides == "heuristic")
    heuristic = HeuristicPolicy(CONFIG).predict(obs)[0].tolist()
    assert action.tolist() == ([0, 1, 1, 1, 4, 1] if decides == "learned" else heuristic)  # the card's constant action


@pytest.mark.parametrize("max_distance", [1.0, 0.5, 2.0])
def test_an_observation_at_the_edge_or_its_float32_is_in_and_the_next_float32_out(max_distance):
    """Both ends of a range, of one that never varied too, whether float32 rounds the edge up or down."""
    stats = ObservationStats((0.0, 0.0, 1.0), (0.3, 0.0, 1.7), 5)
    widths = (0.3, CONSTANT_FEATURE_WIDTH, 0.7)
    rounded = set()
    for feature, (low, high, width) in enumerate(zip(stats.low, stats.high, widths, strict=True)):
        for edge, away in ((high + max_distance * width, np.inf), (low - max_distance * width, -np.inf)):
            as_float32 = float(np.float32(edge))
            rounded.add(np.sign(as_float32 - edge) * np.sign(away))  # 1: rounded outwards, -1: inwards, 0: exact
            outer = max(edge, as_float32) if away > 0 else min(edge, as_float32)
            for value, beyond in (
                (edge, False),  # exact, in float64
                (as_float32, False),  # as a float32 observation holds it
                (float(np.nextafter(np.float32(outer), np.float32(away))), True),  # the next float32 out
            ):
                obs = np.array([0.0, 0.0, 1.0])
                obs[feature] = value
                assert stats.beyond(obs, max_distance) is beyond, (feature, edge, value)
    assert rounded >= {1.0, -1.0}  # float32 rounded some edges out, some in
    assert stats.beyond(np.array([0.0, np.nan, 1.0]), 1.0) and stats.beyond(np.array([np.inf, 0.0, 1.0]), 1.0)


def test_a_learned_policy_run_at_another_interval_than_its_training_says_so_once(monkeypatch, caplog):
    """The shipped policy was trained deciding every 10 steps; ``Controller(policy="pretrained")`` decides every 20 by
    default (and stretches that on a GPU), and nothing said so."""
    import triaccel_rl.policies

    monkeypatch.setattr(triaccel_rl.policies, "_intervals_noted", set())
    said = (
        "policy 'pretrained' was trained deciding every 10 optimizer steps; this configuration decides every 20 (on a "
        "GPU, possibly more: ControllerConfig.max_interval_factor). ControllerConfig(interval_steps=10) decides as in "
        "its training"
    )
    with caplog.at_level("INFO", logger="triaccel_rl"):
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        with Controller(model, torch.optim.SGD(model.parameters(), lr=0.1), policy="pretrained") as ctl:
            assert ctl.config.interval_steps == 20  # the default, unchanged
        make_policy("pretrained", CONFIG, OBSERVATION_SPACE, ACTION_SPACE)  # the same mismatch: said already
        make_policy("pretrained", ControllerConfig(interval_steps=10), OBSERVATION_SPACE, ACTION_SPACE)  # as trained
    notes = [r for r in caplog.records if "was trained deciding every" in r.getMessage()]
    assert [(r.levelname, r.getMessage()) for r in notes] == [("INFO", said)]


def test_merged_observation_stats_keep_an_interval_both_record():
    ranges = ((0.0,), (1.0,), 4)
    ten = ObservationStats(*ranges, interval_steps=10)
    assert ten.merged(ObservationStats(*ranges, interval_steps=10)).interval_steps == 10
    assert ten.merged(ObservationStats(*ranges, interval_steps=20)).interval_steps is None  # mixed: unknown
    assert ten.merged(ObservationStats(*ranges)).interval_steps is None  # one predates the record: unknown


def test_observation_stats_of_another_ladder_or_size_are_not_merged():
    """A resumed run's range merged into one of another LR ladder would serve the policy actions it never trained on."""
    ranges = ((0.0, 1.0), (1.0, 2.0), 4)
    stats = ObservationStats(*ranges, lr_scales=(0.5, 1.0))
    with pytest.raises(ValueError, match=r"^cannot merge observation stats of 2 features \(LR ladder \(0\.5, 1\.0\)\) "
                       r"with stats of 2 \(LR ladder \(0\.5, 2\.0\)\)$"):  # fmt: skip
        stats.merged(ObservationStats(*ranges, lr_scales=(0.5, 2.0)))
    with pytest.raises(ValueError, match=r"LR ladder \(0\.5, 1\.0\)\) with stats of 2 \(LR ladder None\)$"):
        stats.merged(ObservationStats(*ranges))
    with pytest.raises(ValueError, match=r"^cannot merge observation stats of 2 features .* with stats of 1 "):
        stats.merged(ObservationStats((0.0,), (1.0,), 4, lr_scales=(0.5, 1.0)))
    both = stats.merged(ObservationStats((-1.0, 1.5), (0.5, 3.0), 6, lr_scales=(0.5, 1.0)))
    assert both == ObservationStats((-1.0, 1.0), (1.0, 3.0), 10, lr_scales=(0.5, 1.0))


@pytest.mark.parametrize(
    ("observations", "shape"),
    [(np.zeros((0, 3)), r"\(0, 3\)"), (np.zeros(3), r"\(3,\)"), (np.zeros((2, 3, 1)), r"\(2, 3, 1\)")],
)
def test_observation_stats_need_a_non_empty_2d_array(observations, shape):
    with pytest.raises(ValueError, match=rf"^need a non-empty \[n, features\] array; got shape {shape}$"):
        ObservationStats.from_observations(observations)
    stats = ObservationStats.from_observations(np.array([[0.0, 2.0], [1.0, -1.0]]))
    assert stats == ObservationStats((0.0, -1.0), (1.0, 2.0), 2)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_observation_stats_refuse_non_finite_observations(bad):
    """A NaN bound switched the out-of-range fallback off for its feature (every comparison false), and ``save`` wrote
    a file ``load`` refused."""
    with pytest.raises(ValueError, match=r"observations hold NaN or infinite values in feature 1 \(of 1 such"):
        ObservationStats.from_observations(np.array([[0.0, 2.0], [1.0, bad]]))


def test_a_candidate_zip_retrained_in_place_is_not_reused(tmp_path):
    """Only ``pretrained`` was hashed: a candidate zip retrained at its path (``--judge``) reused the old zip's runs."""
    transfer = import_experiment("transfer")
    zip_path = tmp_path / "candidate.zip"
    zip_path.write_bytes(b"first weights")
    first = transfer._sha(str(zip_path))
    zip_path.write_bytes(b"retrained weights")
    assert first is not None and transfer._sha(str(zip_path)) not in (None, first)
    assert transfer._sha("heuristic") is None

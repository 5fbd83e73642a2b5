"""TriAccelEnv: a sliver of budget ends the episode; float32 arguments; small training sets refused by name."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
from triaccel_rl.envs import TriAccelEnv

from triaccel_rl.config import ControllerConfig, RewardConfig

KEEP_FP32 = np.array([0, 0, 0, 0, 2, 1])  # fp32 everywhere, LR x1, keep the batch
GROW_FP32 = np.array([0, 0, 0, 0, 2, 2])  # the same, doubling the batch


def _episode(env: TriAccelEnv, actions: list[np.ndarray]) -> tuple[dict, list[dict]]:
    """Steps ``actions`` (the last one repeated) until the episode ends; returns reset's info and each step's."""
    _, start = env.reset(seed=0)
    infos: list[dict] = []
    while True:
        _, _, terminated, truncated, info = env.step(actions[min(len(infos), len(actions) - 1)])
        infos.append(info)
        if terminated or truncated:
            assert terminated and not truncated  # the budget ends it
            return start, infos


def test_an_interval_a_hair_cheaper_than_the_reference_ends_the_episode_at_its_budget():
    """bf16 then fp32 left 0.06% of a step of the 12-step budget: a fourth decision then trained a whole step, past the
    budget by 8%, for a reward of 1.3e-4."""
    env = TriAccelEnv(task="synthetic", config=ControllerConfig(interval_steps=4),
                      reward_config=RewardConfig(budget_intervals=3), task_overrides={"n_train": 1024})  # fmt: skip
    start, infos = _episode(env, [np.array([1, 1, 0, 0, 2, 1]), KEEP_FP32])
    assert [i["steps"] for i in infos] == [4, 4, 4]
    left_ms = start["budget_ms"] - infos[-1]["spent_ms"]
    step_ms = env.loop.run.planned_step_ms()
    assert 0 < left_ms < 0.01 * step_ms  # a sliver, forfeited
    assert "test_accuracy" in infos[-1]
    env.close()


@pytest.mark.parametrize(
    ("budget_steps", "steps"),
    [
        (4 + 2.005, [4, 2]),  # the cut takes no step of which 0.5% fits (it took a third, for 0.5% of its reward)
        (8.005, [4, 4]),  # the whole interval leaves 0.5% of a step: spent (a third decision trained one step)
        (4 + 2.02, [4, 3]),  # 2% of a step fits: the step is taken and pro-rated
    ],
)
def test_a_budget_left_under_a_hundredth_of_a_step_is_spent(budget_steps, steps):
    interval_steps = 4
    env = TriAccelEnv(task="synthetic", config=ControllerConfig(interval_steps=interval_steps),
                      reward_config=RewardConfig(budget_intervals=budget_steps / interval_steps),
                      task_overrides={"n_train": 1024})  # fmt: skip
    start, infos = _episode(env, [KEEP_FP32])
    step_ms = start["reference_interval_ms"] / interval_steps  # fp32 at the base batch throughout
    assert [i["steps"] for i in infos] == steps
    assert infos[-1]["spent_ms"] == pytest.approx(sum(steps) * step_ms, rel=1e-12)
    env.close()


def test_a_numpy_float32_divergence_factor_is_taken_as_the_python_float():
    """np.float32(3.0) was stored as it came: reset's threshold overflowed a float32 cast (a RuntimeWarning) and was
    rounded to float32."""
    losses = []
    for factor in (3.0, np.float32(3.0)):
        env = TriAccelEnv(task="synthetic", config=ControllerConfig(interval_steps=1), divergence_factor=factor)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _, info = env.reset(seed=0)
        assert type(env.divergence_factor) is float and type(info["divergence_loss"]) is float
        assert info["divergence_loss"] == 3.0 * info["initial_probe_loss"]
        losses.append(info["divergence_loss"])
        env.close()
    assert losses[0] == losses[1]


def test_a_base_batch_larger_than_the_training_split_is_refused_when_the_env_is_built():
    """The probe holds 8 of 64 samples out: the 56 left were refused only at reset, by batch and sample count."""
    message = (
        "n_train=64 leaves task 'synthetic' 56 training samples (8 held out for the probe loss), fewer than its "
        "base_batch_size=64: give n_train >= 73 (task_overrides={'n_train': ...}) or a smaller base_batch_size"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        TriAccelEnv(task="synthetic", task_overrides={"n_train": 64})
    TriAccelEnv(task="synthetic", task_overrides={"n_train": 73})  # 64 training samples: a batch of 64 fits


@pytest.mark.parametrize(
    ("config", "n_train", "refusal"),
    [
        (ControllerConfig(interval_steps=1), 100,
         "batch 64 is above the data's largest batch 11 (an eighth of the training samples)"),
        (ControllerConfig(interval_steps=1, max_batch_size=32), 1024, "batch 64 is above max_batch_size=32"),
    ],
)  # fmt: skip
def test_a_grow_of_a_batch_above_its_largest_size_says_so(config, n_train, refusal):
    """It read "batch 64 already at its largest allowed size 11", of a batch above that size."""
    env = TriAccelEnv(task="synthetic", config=config, task_overrides={"n_train": n_train})
    env.reset(seed=0)
    info = env.step(GROW_FP32)[4]
    assert info["refused"] == [refusal] and info["batch_size"] == 64  # kept, not cut to the limit
    env.close()

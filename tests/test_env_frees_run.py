"""TriAccelEnv frees the last episode's run by reference counting, with no full garbage collection at each reset."""

from __future__ import annotations

import weakref

import numpy as np
from torch import nn
from triaccel_rl.envs import TriAccelEnv

from triaccel_rl.config import ControllerConfig
from triaccel_rl.tasks import get_task
from triaccel_rl.training import TrainingRun

MIXED = np.array([1, 2, 0, 1, 2, 1])  # bf16, fp16, fp32, bf16; LR x1; keep the batch: every kind of hook acts


def small_env(**task_overrides) -> TriAccelEnv:
    config = ControllerConfig(interval_steps=3)
    overrides = {"n_train": 1024, **task_overrides}
    return TriAccelEnv(task="synthetic", config=config, max_decisions=4, task_overrides=overrides)


def test_reset_and_close_free_the_last_run_without_a_garbage_collection(collections):
    """Each reset ran a full ``gc.collect()`` to free the model, in a cycle through its precision hooks: 0.1 to 1 s
    with torch, Triton and SB3 loaded, 14 s of a 22-s ``train_policy``."""
    env = small_env()
    env.reset(seed=0)
    first = weakref.ref(env.loop.run.model)
    first_data = weakref.ref(env.loop.run.loader)
    env.step(MIXED)
    env.reset(seed=1)
    assert first() is None and first_data() is None
    second = weakref.ref(env.loop.run.model)
    env.step(MIXED)
    env.close()
    assert second() is None
    assert collections == []


def test_a_model_in_a_cycle_of_its_own_is_still_freed_at_reset(collections):
    """A task's model may hold a cycle the run's close cannot break: the env then collects, once a reset."""

    def build_model() -> nn.Module:
        model = get_task("synthetic").build_model()
        model.owner = [model]  # a cycle of the model's own
        return model

    env = small_env(build_model=build_model)
    env.reset(seed=0)
    first = weakref.ref(env.loop.run.model)
    env.reset(seed=1)
    assert first() is None
    assert collections == [2]  # one full collection, at the reset
    env.close()


def test_an_episode_after_a_freed_run_is_a_fresh_environments():
    env = small_env()
    env.reset(seed=0)
    env.step(MIXED)
    obs, info = env.reset(seed=1)  # the last run freed by reference counting, before this one is built
    fresh = small_env()
    expected_obs, expected_info = fresh.reset(seed=1)
    np.testing.assert_array_equal(obs, expected_obs)
    assert info == expected_info
    step, expected = env.step(MIXED), fresh.step(MIXED)
    np.testing.assert_array_equal(step[0], expected[0])
    assert step[1:] == expected[1:]
    env.close()
    fresh.close()


def test_a_closed_training_run_holds_no_hooks_and_is_freed_by_its_last_reference(collections):
    run = TrainingRun(get_task("synthetic", n_train=1024), seed=0)
    assert run.n_layers == 3
    run.set_precisions(["bf16", "fp16", "fp32"])
    run.train_interval(2)
    run.close()
    run.close()  # twice: harmless
    hooked = [name for name, m in run.model.named_modules() if m._forward_pre_hooks or m._forward_hooks]
    assert hooked == []
    model = weakref.ref(run.model)
    del run
    assert model() is None
    assert collections == []

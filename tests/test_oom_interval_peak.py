"""An out-of-memory error mid-interval lowers the budget; the interval's memory use is read from the steps after it.

The steps before the error, planned under the old budget, read as the lowered budget full (use 0.997): the heuristic
halved the batch at the next decision, where an error at an interval's first step kept it, micro-batched (found
2026-12-07).
"""

import dataclasses
import logging

import pytest
from triaccel_rl.envs.training_env import TriAccelEnv
from triaccel_rl.policies import HeuristicPolicy

from triaccel_rl.config import ControllerConfig
from triaccel_rl.elastic import inject_oom
from triaccel_rl.loop import DecisionLoop
from triaccel_rl.tasks import get_task
from triaccel_rl.training import TrainingRun

_CONFIG = ControllerConfig(interval_steps=4, min_batch_size=8)


def _half_the_device_from(run, step):
    """From ``step`` on, a micro-batch over half the batch runs out of memory (another process took memory)."""
    hold = run.batch_size // 2
    run.fault = inject_oom(lambda point: point.step >= step and point.micro_batch_size > hold)


@pytest.mark.parametrize("first_failing_step", [6, 8], ids=["mid-interval", "interval-start"])
def test_the_heuristic_keeps_the_batch_after_an_out_of_memory_error_wherever_it_falls(first_failing_step, caplog):
    caplog.set_level(logging.ERROR, logger="triaccel_rl")
    env = TriAccelEnv(task="synthetic", config=_CONFIG, max_decisions=4, task_overrides={"n_train": 2000})
    observation, _ = env.reset(seed=1)
    run = env.loop.run
    assert run.batch_size == 64
    _half_the_device_from(run, first_failing_step)
    policy = HeuristicPolicy(_CONFIG)
    for _ in range(3):
        observation, *_ = env.step(policy.predict(observation)[0])
        signals = env.loop.signals
        assert signals.memory_bytes <= 0.95 * signals.memory_budget_bytes
    assert run.oom_events == 1 and run.batch_size == 64 and run.last_micro_batches == [32, 32]
    env.close()


def test_an_interval_split_at_an_evaluation_reads_only_the_steps_after_the_error():
    """compare trains an interval in pieces (up to an evaluation step): the error in the second piece drops the first
    piece's peaks too, which the collector had already taken."""
    task = dataclasses.replace(get_task("synthetic"), n_train=2000)
    loop = DecisionLoop(TrainingRun(task, seed=1, device="cpu"), _CONFIG)
    _half_the_device_from(loop.run, 2)
    loop.train_interval(max_steps=2)  # steps 0, 1: the old budget, whole batches
    # Steps 2, 3: an error at each. Step 2's 64 fails (the budget drops to the 64's prediction) and runs as 32 + 32;
    # step 3 plans 45 under that budget, which fails too (the budget drops to the 45's), and runs as 22 + 22 + 20.
    loop.train_interval()
    run = loop.run
    assert run.oom_events == 2 and run.last_micro_batches == [22, 22, 20]
    signals = loop.snapshot(progress=0.1)
    assert signals.memory_budget_bytes == run.memory_budget_bytes == run.predicted_memory_bytes(45) == 113_664
    whole_batch = run.predicted_memory_bytes(64)  # the first piece's steps, under the old budget
    assert signals.memory_budget_bytes < whole_batch
    # The peak of what ran after the last error: step 3's 22s, not step 2's 32s (104_824 bytes) nor the 64s.
    assert signals.memory_bytes == run.predicted_memory_bytes(22) == 98_024

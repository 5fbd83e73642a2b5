"""Gradient accumulation: a batch split into micro-batches gives the unsplit step's update.

Exact up to the order of floating-point sums on models without batch norm; with batch norm each
micro-batch is normalised by its own statistics, so the update differs (documented caveat, pinned here).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from elastic_helpers import max_abs_difference, parameters_of, small_task
from torch import nn

from triaccel_rl.config import MemoryBudget
from triaccel_rl.elastic import plan_micro_batches
from triaccel_rl.tasks import Task, TaskData
from triaccel_rl.training import TrainingRun

# fp32 on the CPU: splitting a mean over 64 samples into 2-8 partial sums moves each gradient element by
# a few ulps; over 6 steps the parameters stay within this bound.
ATOL = 2e-6


def run_steps(task: Task, cap: int | None, n_steps: int = 6, batch_size: int = 64) -> tuple[TrainingRun, list]:
    run = TrainingRun(task, seed=0, device="cpu", batch_size=batch_size)
    run.micro_batch_cap = cap
    stats = [run.step() for _ in range(n_steps)]
    return run, stats


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("cap", [32, 16, 27, 1])  # even splits, an uneven one (27 + 27 + 10), one sample each
def test_split_batch_matches_unsplit(optimizer: str, cap: int) -> None:
    # 500 samples: 438 in the loader, so six steps of 64 stay in the first epoch.
    task = small_task(n_train=500, optimizer=optimizer, base_lr=0.05 if optimizer == "sgd" else 2e-3)
    whole, whole_stats = run_steps(task, cap=None)
    split, split_stats = run_steps(task, cap=cap)
    assert whole.last_micro_batches == [64]
    assert split.last_micro_batches == plan_micro_batches(64, cap)
    difference = max_abs_difference(parameters_of(whole), parameters_of(split))
    assert difference <= ATOL, f"{optimizer}, micro-batch {cap}: parameters differ by {difference:.3g}"
    for a, b in zip(whole_stats, split_stats, strict=True):
        assert b.batch_size == a.batch_size == 64
        assert b.loss == pytest.approx(a.loss, rel=1e-6)  # the batch's mean loss, not a micro-batch's
        assert b.grad_sq_sum == pytest.approx(a.grad_sq_sum, rel=1e-5)  # statistics of the full gradient


def test_budget_below_the_batch_splits_it_and_keeps_the_effective_batch() -> None:
    probe = TrainingRun(small_task(), seed=0, device="cpu")
    per_sample = probe.predicted_memory_bytes(2) - probe.predicted_memory_bytes(1)
    # Usable memory (90% of the budget) for about 20 samples.
    budget = int((probe.predicted_memory_bytes(0) + 20.5 * per_sample) / 0.9)
    run = TrainingRun(small_task(), seed=0, device="cpu", memory=MemoryBudget(bytes=budget))
    stats = run.step()
    assert stats.batch_size == 64 == run.batch_size  # the effective batch is the policy's
    assert run.last_micro_batches == [20, 20, 20, 4]
    assert stats.memory_bytes == run.predicted_memory_bytes(20) <= run.usable_memory_bytes
    assert run.predicted_memory_bytes(21) > run.usable_memory_bytes


def test_accumulation_costs_the_extra_launches_in_modelled_time() -> None:
    whole = TrainingRun(small_task(), seed=0, device="cpu", cost_mode="profile")
    split = TrainingRun(small_task(), seed=0, device="cpu", cost_mode="profile")
    split.micro_batch_cap = 16
    extra = split.step().modelled_time_ms - whole.step().modelled_time_ms
    assert extra == pytest.approx(3 * whole.profile.fixed_ms)  # 4 micro-batches: 3 more fixed costs


def _bn_task() -> Task:
    def data(n_train: int | None, n_test: int | None, seed: int) -> TaskData:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(200, 8, generator=g)
        return TaskData(x, (x[:, 0] > 0).long(), x[:32], (x[:32, 0] > 0).long())

    return Task(
        "bn-mlp",
        "an MLP with batch norm",
        build_model=lambda: nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2)),
        load_data=data,
        base_batch_size=64,
    )


def test_batch_norm_makes_micro_batches_differ_documented_caveat() -> None:
    whole, _ = run_steps(_bn_task(), cap=None, n_steps=2)
    split, _ = run_steps(_bn_task(), cap=16, n_steps=2)
    assert max_abs_difference(parameters_of(whole), parameters_of(split)) > 100 * ATOL


def test_a_batch_norm_model_trains_where_a_split_would_leave_one_sample() -> None:
    """33 samples at micro-batches of 16 were planned [16, 16, 1], and batch norm refuses one sample a channel in
    training ("Expected more than 1 value per channel"): every step raised. A one-sample remainder takes one more."""
    assert plan_micro_batches(33, 16) == [16, 15, 2]
    assert plan_micro_batches(9, 4) == [4, 3, 2] and plan_micro_batches(5, 2) == [2, 2, 1]  # 2: nothing to take
    assert plan_micro_batches(1, 16) == [1] and plan_micro_batches(32, 16) == [16, 16]
    run, stats = run_steps(_bn_task(), cap=16, n_steps=2, batch_size=33)
    assert run.last_micro_batches == [16, 15, 2] and all(s.batch_size == 33 for s in stats)


@pytest.mark.parametrize(("batch", "cap"), [(10.0, 4), (10, 4.0), (True, 4), (0, 4), (10, 0)])
def test_a_micro_batch_plan_needs_whole_positive_sizes(batch: object, cap: object) -> None:
    """10.0 raised a TypeError (a float length of a list) where the docstring promises a ValueError."""
    with pytest.raises(ValueError, match=r"need whole numbers batch_size >= 1 and max_micro_batch >= 1"):
        plan_micro_batches(batch, cap)  # type: ignore[arg-type]
    assert plan_micro_batches(10, 4) == [4, 4, 2]


def test_a_micro_batch_plan_of_more_than_2_to_the_20_micro_batches_is_refused_by_name() -> None:
    """10**30 samples raised a bare OverflowError ("cannot fit 'int' into an index-sized integer"), and 10**9 at 1
    built a list of a billion micro-batches. Up to ``MAX_MICRO_BATCHES`` (2**20) is planned, one more is refused."""
    assert plan_micro_batches(2**20, 1) == [1] * 2**20
    assert plan_micro_batches(2**20 * 4, 4)[-1] == 4
    with pytest.raises(ValueError) as refused:
        plan_micro_batches(10**30, 4)
    assert str(refused.value) == (
        f"batch_size={10**30} at max_micro_batch=4 is {10**30 // 4} micro-batches; at most 1048576 (2**20) are "
        "planned for one step: pass a smaller batch or a larger micro-batch"
    )
    with pytest.raises(ValueError) as refused:
        plan_micro_batches(2**20 + 1, 1)
    assert str(refused.value) == (
        "batch_size=1048577 at max_micro_batch=1 is 1048577 micro-batches; at most 1048576 (2**20) are planned for one "
        "step: pass a smaller batch or a larger micro-batch"
    )


def _augmented_conv_task() -> Task:
    """A small convolutional task with ``crop_flip`` and no batch norm, on 400 Fashion-MNIST images."""
    from triaccel_rl.tasks import crop_flip, fashion_mnist_data

    def build() -> nn.Module:
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 28 * 28, 10))

    return Task(
        name="tiny-conv-augmented",
        description="a convolution and a linear layer, crop and flip",
        build_model=build,
        load_data=fashion_mnist_data,
        base_batch_size=64,
        n_train=400,
        n_test=64,
        augment=crop_flip,
    )


def test_augmentation_is_drawn_once_a_step_however_the_batch_is_split_or_retried() -> None:
    """Before, each micro-batch drew its own crops and flips, and a retry after an OOM drew again: a split run ended
    0.10 away from the unsplit one, a run with one recovered OOM 0.04 away. Now both are the unsplit run, up to
    the order of sums (each run is built just before it trains: the augmentation draws from the global RNG)."""
    from triaccel_rl.elastic import inject_oom

    def train(cap: int | None, fault: object = None, augment: bool = True) -> list[torch.Tensor]:
        task = _augmented_conv_task() if augment else replace(_augmented_conv_task(), augment=None)
        run = TrainingRun(task, seed=0, device="cpu", fault=fault)  # type: ignore[arg-type]
        run.micro_batch_cap = cap
        for _ in range(4):
            run.step()
        return parameters_of(run)

    whole = train(None)
    assert max_abs_difference(whole, train(16)) <= ATOL
    oom = inject_oom(lambda p: p.step == 1 and p.attempt == 0 and p.micro_index == 0 and p.phase == "forward")
    assert max_abs_difference(whole, train(None, oom)) <= ATOL
    assert max_abs_difference(whole, train(None, augment=False)) > 1e-3  # a control: the draws do matter
    # Drawn before the step's undo begins, an augmentation that raised (a Ctrl-C) kept the batch from the loader
    run = TrainingRun(_augmented_conv_task(), seed=0, device="cpu")
    before = run.loader.state_dict()

    def interrupted(x: torch.Tensor) -> torch.Tensor:
        raise KeyboardInterrupt

    run.task = replace(run.task, augment=interrupted)
    with pytest.raises(KeyboardInterrupt):
        run.step()
    assert run.loader.state_dict() == before


@pytest.mark.parametrize("bad", [2.5, 0, -3, True, float("nan"), "8"])
def test_a_micro_batch_cap_that_is_no_whole_number_of_samples_is_refused(bad: object) -> None:
    """2.5 made the planner bisect for ever; 0 and -3 split every batch into one-sample micro-batches, silently."""
    run = TrainingRun(small_task(), seed=0, device="cpu")
    with pytest.raises(ValueError, match=rf"micro_batch_cap={bad!r} must be None or a whole number of samples >= 1"):
        run.micro_batch_cap = bad  # type: ignore[assignment]
    assert run.micro_batch_cap is None
    run.micro_batch_cap = 16
    run.step()
    assert run.last_micro_batches == [16, 16, 16, 16]
    with pytest.raises(ValueError, match=r"limit=2.5 must be a whole number of samples"):
        run.memory_model.max_batch_size(10**9, run.precisions, 2.5)  # type: ignore[arg-type]


def test_a_remainder_of_one_at_a_micro_batch_of_three_is_not_left_alone() -> None:
    assert plan_micro_batches(7, 3) == [3, 2, 2]  # not [3, 3, 1]: batch norm cannot train on one sample

"""The batch-finder baseline: power-of-two search, fixed batch, linear LR; usable in ``compare`` and the CLI."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from elastic_helpers import small_task
from triaccel_rl.policies import BatchFinderPolicy, make_policy

from triaccel_rl.cli import main
from triaccel_rl.compare import run_controller
from triaccel_rl.config import ControllerConfig, LRRule, MemoryBudget
from triaccel_rl.elastic import find_batch_size
from triaccel_rl.training import TrainingRun
from triaccel_rl.types import Precision


@pytest.mark.parametrize(
    ("capacity", "limit", "start", "expected"),
    [(50, 4096, 1, 32), (64, 4096, 1, 64), (10_000, 100, 1, 64), (0, 64, 1, 0), (50, 4096, 8, 32), (5, 64, 8, 0)],
)
def test_power_of_two_search(capacity: int, limit: int, start: int, expected: int) -> None:
    tried: list[int] = []

    def fits(size: int) -> bool:
        tried.append(size)
        return size <= capacity

    assert find_batch_size(fits, limit=limit, start=start) == expected
    assert all(b == 2 * a for a, b in itertools.pairwise(tried))  # doubling, as Lightning does
    assert all(size <= limit for size in tried)


@pytest.mark.parametrize("start", [0, 3, 128])
def test_search_start_must_be_a_power_of_two_below_the_limit(start: int) -> None:
    with pytest.raises(ValueError, match=rf"start={start} must be a power of two in \[1, limit=64\]"):
        find_batch_size(lambda size: True, limit=64, start=start)


def test_names_precisions_and_unknown_names() -> None:
    assert make_policy("batch-finder").precision is Precision.FP32  # type: ignore[attr-defined]
    assert make_policy("batch-finder-bf16").precision is Precision.BF16  # type: ignore[attr-defined]
    assert make_policy("Batch-Finder-FP16").name == "batch-finder-fp16"  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="unknown batch finder 'batch-finder-fp8'"):
        BatchFinderPolicy("batch-finder-fp8")
    with pytest.raises(ValueError, match=r"unknown policy .finder.; allowed: .*batch-finder, batch-finder-bf16"):
        make_policy("finder")


def test_prepare_fixes_the_largest_power_of_two_that_fits_with_linear_lr() -> None:
    task = small_task(n_train=5000)  # loader 4375 samples: the data allows batches up to 546
    probe = TrainingRun(task, seed=0, device="cpu")
    budget = probe.predicted_memory_bytes(200)  # 128 fits, 256 does not
    run = TrainingRun(task, seed=0, device="cpu", memory=MemoryBudget(bytes=budget))
    policy = BatchFinderPolicy("batch-finder", ControllerConfig())
    assert policy.prepare(run) == 128 == run.batch_size == policy.batch_size
    assert run.lr_rule is LRRule.LINEAR
    assert run.lr == pytest.approx(task.base_lr * 128 / task.base_batch_size)
    assert not run.memory_elastic and run.micro_batch_size() == 128  # no accumulation for the baseline
    # Without a memory limit it stops at the data's bound (max_batch_size) and the config's.
    free = TrainingRun(task, seed=0, device="cpu")
    assert BatchFinderPolicy("batch-finder", ControllerConfig()).prepare(free) == 512
    capped = TrainingRun(task, seed=0, device="cpu")
    assert BatchFinderPolicy("batch-finder", ControllerConfig(max_batch_size=100)).prepare(capped) == 64


def test_compare_runs_the_baseline_beside_the_elastic_controller() -> None:
    task = small_task(n_train=1500)
    results = {
        name: run_controller(task, name, seed=0, epochs=1.0, config=ControllerConfig(interval_steps=4))
        for name in ("batch-finder-bf16", "heuristic")
    }
    finder = results["batch-finder-bf16"]
    assert finder.controller == "batch-finder-bf16"
    assert finder.batch_changes == 0
    assert {row["batch_size"] for row in finder.trace} == {128}  # loader 1313 // 8 = 164 -> 128, fixed
    assert finder.oom_events == 0
    assert results["heuristic"].steps > 0


def test_cli_compare_accepts_batch_finder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results.json"
    code = main(
        [
            "compare",
            "--task",
            "synthetic",
            "--controllers",
            "batch-finder,heuristic",
            "--seeds",
            "1",
            "--epochs",
            "0.5",
            "--log-dir",
            "",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0, capsys.readouterr().err
    rows = json.loads(out.read_text())["rows"]
    assert {row["controller"] for row in rows} == {"batch-finder", "heuristic"}


def test_controller_refuses_the_batch_finder_with_a_hint() -> None:
    import torch
    from torch import nn

    from triaccel_rl.controller import Controller

    model = nn.Linear(4, 2)
    with pytest.raises(ValueError, match=r"'batch-finder' is a compare baseline .* pass the batch to loader\(\)"):
        Controller(model, torch.optim.SGD(model.parameters(), lr=0.1), policy="batch-finder")


@pytest.mark.parametrize(("limit", "shown"), [(0, "0"), (-4, "-4"), (64.0, "64.0"), (True, "True")])
def test_search_limit_must_be_a_whole_number_of_one_or_more(limit: object, shown: str) -> None:
    """Before the fix, a limit of 0 was reported as a bad start ("start=1 must be a power of two in [1, limit=0]")."""
    with pytest.raises(ValueError, match=rf"limit={shown} must be a whole number >= 1 \(the largest batch to try\)"):
        find_batch_size(lambda size: True, limit=limit)  # type: ignore[arg-type]


def test_search_start_of_another_type_is_refused_by_value() -> None:
    """Before the fix, a float start raised a TypeError from ``start & (start - 1)``."""
    with pytest.raises(ValueError, match=r"start=2.0 must be a power of two in \[1, limit=64\]"):
        find_batch_size(lambda size: True, limit=64, start=2.0)  # type: ignore[arg-type]
    assert find_batch_size(lambda size: True, limit=np.int64(100), start=np.int64(4)) == 64


def test_search_stops_at_the_first_failure_even_if_a_larger_size_would_fit() -> None:
    """Lightning's power mode: the doubling stops at the first size that does not fit."""
    tried: list[int] = []

    def fits(size: int) -> bool:
        tried.append(size)
        return size != 8

    assert find_batch_size(fits, limit=64) == 4 and tried == [1, 2, 4, 8]


class _FakeRun:
    """A run whose memory holds ``capacity`` samples (``BatchFinderTarget``)."""

    def __init__(self, capacity: int, max_batch_size: int) -> None:
        self.capacity, self.max_batch_size = capacity, max_batch_size
        self.memory_elastic, self.lr_rule, self.batch_size = True, LRRule.SQRT, 64
        self.memory_budget_bytes = 1000 * capacity
        self.tried: list[int] = []

    def fits_in_budget(self, batch_size: int) -> bool:
        self.tried.append(batch_size)
        return batch_size <= self.capacity


def test_prepare_when_nothing_fits_names_the_budget_and_changes_nothing() -> None:
    run = _FakeRun(capacity=0, max_batch_size=512)
    policy = BatchFinderPolicy("batch-finder", ControllerConfig())
    with pytest.raises(ValueError, match="one sample does not fit the memory budget of 0 bytes; raise the budget"):
        policy.prepare(run)  # type: ignore[arg-type]
    assert run.tried == [2, 1] and policy.batch_size is None  # one sample only where two do not fit
    assert (run.memory_elastic, run.lr_rule, run.batch_size) == (True, LRRule.SQRT, 64)


@pytest.mark.parametrize(
    ("capacity", "data_limit", "config_limit", "expected", "tried"),
    [
        # From two samples (a batch norm refuses one), as Lightning's finder.
        (10**6, 1000, 4096, 512, [2, 4, 8, 16, 32, 64, 128, 256, 512]),  # everything fits: the data's bound
        (10**6, 1024, 4096, 1024, [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]),  # a power of two is reached
        (10**6, 1000, 100, 64, [2, 4, 8, 16, 32, 64]),  # the config's bound
        (1, 1000, 4096, 1, [2, 1]),  # one sample only where two do not fit
        (10**6, 1, 4096, 1, [1]),  # a data set of fewer than 16 samples: batch 1
    ],
)
def test_prepare_bounds(capacity: int, data_limit: int, config_limit: int, expected: int, tried: list[int]) -> None:
    run = _FakeRun(capacity=capacity, max_batch_size=data_limit)
    policy = BatchFinderPolicy("batch-finder", ControllerConfig(min_batch_size=1, max_batch_size=config_limit))
    assert policy.prepare(run) == expected == run.batch_size  # type: ignore[arg-type]
    assert run.tried == tried and not run.memory_elastic and run.lr_rule is LRRule.LINEAR

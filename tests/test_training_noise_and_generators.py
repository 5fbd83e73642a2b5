"""TrainingRun: the noise EMAs of steps cut into intervals, and the generators a given-up step puts back."""

import dataclasses

import numpy as np
import pytest
import torch

from triaccel_rl.elastic import FaultPoint
from triaccel_rl.tasks import Task, get_task
from triaccel_rl.training import TrainingRun

_DECAY = 0.9  # training._NOISE_EMA_DECAY


def _still_run() -> TrainingRun:
    """A run whose every step has the same gradient: the whole training set a batch, an LR too small to move it."""
    task = dataclasses.replace(get_task("synthetic", n_train=256, n_test=64), base_lr=1e-30)
    run = TrainingRun(task, seed=0, device="cpu", cost_mode="profile")
    run.batch_size = len(run.loader)
    return run


def test_an_interval_folds_its_steps_into_the_noise_ema_as_that_many_steps():
    """Before: one fold of decay 0.9 a call however many steps it ran, so 10 steps in one call left the EMAs' weight
    at 0.1, cut 3, 3, 3, 1 (as compare cuts at evaluations) at 0.34, one at a time at 0.65."""
    runs = {}
    for name, chunks in {"whole": [10], "cut": [3, 3, 3, 1], "one at a time": [1] * 10}.items():
        run = runs[name] = _still_run()
        for n_steps in chunks:
            run.train_interval(n_steps)
        assert run.steps == 10
    stepped = _still_run()
    for _ in range(10):
        stepped.step()
    runs["step()"] = stepped
    weight = 1 - _DECAY**10
    assert runs["whole"].noise_estimates[0] == weight  # from zeros in one fold: exact
    sample = runs["whole"].noise_estimates / weight  # [1, B * |g_B|^2, B], the same every step
    assert sample[2] == pytest.approx(len(stepped.loader), rel=1e-12)
    for name, run in runs.items():
        estimates = run.noise_estimates
        assert estimates == pytest.approx(weight * sample, rel=1e-6), name
        assert run.noise_scale == pytest.approx(runs["whole"].noise_scale, rel=1e-6), name


def test_the_fold_of_k_steps_at_a_constant_sample_is_k_single_folds():
    run = _still_run()
    start = np.array([0.5, 300.0, 40.0])
    run.noise_estimates = start
    run._observe_noise(64.0, 2.0, n_steps=7)
    folded = run.noise_estimates
    run.noise_estimates = start
    for _ in range(7):
        run._observe_noise(64.0, 2.0)
    sample = np.array([1.0, 128.0, 64.0])
    assert folded == pytest.approx(_DECAY**7 * start + (1 - _DECAY**7) * sample, rel=1e-15)
    assert folded == pytest.approx(run.noise_estimates, rel=1e-12)


def _noisy(x: torch.Tensor) -> torch.Tensor:
    return x + 0.5 * torch.randn_like(x)


def _train(task: Task, n_steps: int = 12, fault=None) -> TrainingRun:
    """Trains to ``n_steps`` steps, carrying on past a step that raises (undone, its batch handed back)."""
    run = TrainingRun(task, seed=0, device="cpu", cost_mode="profile", fault=fault)
    while run.steps < n_steps:
        try:
            run.step()
        except RuntimeError:
            pass
    return run


def _assert_same_run(a: TrainingRun, b: TrainingRun) -> None:
    assert (a.steps, a.samples_seen) == (b.steps, b.samples_seen)
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb), f"max |diff| {(pa - pb).abs().max().item():.3g}"


def test_a_step_given_up_puts_back_the_generators_from_before_its_augmentation():
    """Before: the generators went back only to after the augmentation's draw, so the batch served again drew anew and
    every later draw moved (max |param diff| 0.013 after 12 steps)."""
    task = dataclasses.replace(get_task("synthetic"), augment=_noisy)
    raised = []

    def fault(point: FaultPoint) -> None:
        if point.step == 3 and point.phase == "forward" and not raised:
            raised.append(point)
            raise RuntimeError("transient error")

    plain = _train(task)
    after_plain = torch.randn(4)
    interrupted = _train(task, fault=fault)
    after_interrupted = torch.randn(4)
    assert raised
    _assert_same_run(plain, interrupted)
    assert torch.equal(after_plain, after_interrupted)  # the generators end where they did


def test_an_augmentation_that_raises_puts_back_what_it_drew():
    """Before: its batch went back to the loader, but the generators stayed past its draw."""
    calls = []

    def flaky(x: torch.Tensor) -> torch.Tensor:
        noise = torch.randn_like(x)
        calls.append(len(x))
        if len(calls) == 4:
            raise RuntimeError("transient error in the augmentation")
        return x + 0.5 * noise

    plain = _train(dataclasses.replace(get_task("synthetic"), augment=_noisy))
    after_plain = torch.randn(4)
    interrupted = _train(dataclasses.replace(get_task("synthetic"), augment=flaky))
    after_interrupted = torch.randn(4)
    assert len(calls) == 13
    _assert_same_run(plain, interrupted)
    assert torch.equal(after_plain, after_interrupted)

"""The plain-loop baseline: what a user's own PyTorch loop does, measured like the controller rows."""

import math

import pytest
import torch

from triaccel_rl.compare import run_controller
from triaccel_rl.config import ControllerConfig
from triaccel_rl.plain import run_plain
from triaccel_rl.tasks import Task


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_plain_loop_equals_the_static_row_step_for_step(precision):
    # Same seed, data order, schedule and evaluation points: a plain torch.optim loop (with GradScaler in fp16) and
    # TrainingRun's static row (per-layer param groups and autocast, reference path on a CPU) train the same model.
    plain = run_plain("synthetic", 0, precision=precision, epochs=1.5, eval_every_steps=10, device="cpu")
    row = run_controller(
        "synthetic", precision, 0, epochs=1.5, device="cpu", schedule=True, eval_every=1,
        config=ControllerConfig(interval_steps=10),
    )  # fmt: skip
    assert plain.controller == f"plain-{precision}"
    assert plain.steps == row.steps == 84
    assert [c[1] for c in plain.curve] == [c[1] for c in row.curve]
    assert plain.final_metric == row.final_metric
    assert plain.skipped_steps == row.skipped_steps == 0
    # wall_s is the training intervals' measured time in both (the plain row's took in its evaluations too)
    assert plain.wall_s == plain.time_s and 0 < row.wall_s < 60


def test_plain_loop_and_the_static_row_trace_the_same_lr_at_the_same_steps():
    """Both traces' lr is the LR the last step applied: the static row recorded TrainingRun.lr, the next step's, a
    step of the schedule later (at 1 epoch, 0.15126 where the plain row's 0.16807 was applied)."""
    plain = run_plain("synthetic", 0, precision="fp32", epochs=0.3, batch_size=256, eval_every_steps=2, device="cpu")
    row = run_controller(
        "synthetic", "fp32", 0, epochs=0.3, batch_size=256, device="cpu", schedule=True, eval_every=1,
        config=ControllerConfig(interval_steps=2),
    )  # fmt: skip
    assert plain.steps == row.steps == 5
    assert [c[1] for c in plain.curve] == [c[1] for c in row.curve]
    assert len(plain.trace) == len(row.trace) == 3
    assert [t["lr"] for t in row.trace] == [t["lr"] for t in plain.trace]
    assert row.trace[-1]["lr"] == 0.0  # the last step applies the schedule's end


def test_plain_loop_equals_the_static_row_at_a_budget_of_no_whole_number_of_batches_and_a_constant_lr():
    """1.2 epochs is 4300 samples, 67.2 batches of 64: the plain loop cut its last batch to 12 samples, the static row
    trained a whole one, and at a constant LR (compare runs plain rows without a schedule) their ends differed."""
    plain = run_plain("synthetic", 0, precision="fp32", epochs=1.2, eval_every_steps=10, device="cpu", schedule=False)
    row = run_controller(
        "synthetic", "fp32", 0, epochs=1.2, device="cpu", schedule=False, eval_every=1,
        config=ControllerConfig(interval_steps=10),
    )  # fmt: skip
    assert plain.steps == row.steps == 68
    assert [c[1] for c in plain.curve] == [c[1] for c in row.curve]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"warmup_frac": 1.0}, r"warmup_frac=1.0 must be in \[0, 1\)"),  # a ZeroDivisionError at the last step
        ({"warmup_frac": 1.5}, r"warmup_frac=1.5 must be in \[0, 1\)"),  # never decayed
        ({"warmup_frac": -0.5}, r"warmup_frac=-0.5 must be in \[0, 1\)"),  # scaled the LR down
        ({"eval_every_steps": 2.5}, "eval_every_steps=2.5 must be a whole number >= 1"),  # a TypeError in range()
        ({"batch_size": 10**6}, "batch_size=1000000 is more than the 3584 training samples"),  # trained at LR 781
    ],
)
def test_plain_loop_refuses_settings_that_train_otherwise_than_asked(arguments, message):
    with pytest.raises(ValueError, match=message):
        run_plain("synthetic", 0, epochs=0.1, device="cpu", **arguments)


@pytest.mark.parametrize("seed", [2**64, -1, 1.5, "3", True])
def test_plain_loop_refuses_a_bad_seed_by_its_own_name_as_a_run_does(seed):
    """2**64 failed in torch.manual_seed ("Overflow when unpacking long long"), the others in the data loader."""
    with pytest.raises(ValueError, match=r"^run_plain: seed=.* must be a whole number in \[0, 2\*\*63 - 20001\]$"):
        run_plain("synthetic", seed, epochs=0.1, device="cpu")


def test_plain_loop_refuses_a_task_with_one_training_sample_as_a_run_does():
    from dataclasses import replace

    from triaccel_rl.tasks import get_task

    task = replace(get_task("synthetic"), name="synthetic-1", n_train=1)  # the probe would take the only sample
    with pytest.raises(ValueError, match=r"task 'synthetic-1' has 1 training sample.*needs n_train >= 2"):
        run_plain(task, 0, epochs=1.0, batch_size=1, device="cpu")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"channels_last": "no"}, TypeError, r"^channels_last='no' must be True or False$"),  # taken as True
        ({"schedule": "no"}, TypeError, r"^schedule='no' must be True or False$"),
        ({"lr_scale": True}, ValueError, r"^lr_scale=True must be a positive finite number$"),  # taken as 1.0
        ({"lr_scale": "0.5"}, ValueError, r"^lr_scale='0.5' must be a positive finite number$"),  # a bare TypeError
        ({"epochs": "1"}, ValueError, r"^epochs='1' must be a positive finite number$"),
        ({"epochs": True}, ValueError, r"^epochs=True must be a positive finite number$"),
        ({"warmup_frac": "0.1"}, ValueError, r"^warmup_frac='0.1' must be a number in \[0, 1\)$"),
        ({"task": 5}, TypeError, r"^task=5 must be a Task or a registered task name, e.g. 'synthetic'$"),
    ],
)
def test_plain_loop_refuses_settings_of_the_wrong_type_by_name_as_a_run_does(kwargs, error, message):
    """Found in review: these trained (a truthy string as True, True as an LR scale of 1.0) or failed with a bare
    TypeError or AttributeError naming no setting; TrainingRun and run_controller refuse each by name."""
    arguments = {"task": "synthetic", "epochs": 0.1, **kwargs}
    with pytest.raises(error, match=message):
        run_plain(arguments.pop("task"), 0, device="cpu", **arguments)


def test_plain_loop_records_its_lr_scale_as_a_float():
    """A NumPy scale is recorded as the float it is (the curve and trace go to JSON)."""
    import numpy as np

    result = run_plain("synthetic", 0, epochs=0.1, lr_scale=np.float32(0.5), device="cpu")
    assert type(result.curve[-1][3]) is float and result.curve[-1][3] == 0.5
    assert type(result.trace[-1]["lr_scale"]) is float


def test_plain_loop_takes_a_numpy_batch_size():
    import numpy as np

    assert run_plain("synthetic", 0, epochs=0.1, batch_size=np.int64(32), device="cpu").steps == 12


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_plain_loop_clips_as_the_static_row_does(precision):
    # clip_grad_norm_ after GradScaler's unscale_ in the plain loop, the engine's clipping in the static row: with a
    # norm that binds at every step the two still train the same model; unclipped, the run ends elsewhere.
    common = {"epochs": 1.0, "device": "cpu"}
    plain = run_plain("synthetic", 0, precision=precision, eval_every_steps=10, max_grad_norm=0.05, **common)
    row = run_controller(
        "synthetic", precision, 0, schedule=True, eval_every=1, config=ControllerConfig(interval_steps=10),
        max_grad_norm=0.05, **common,
    )  # fmt: skip
    unclipped = run_plain("synthetic", 0, precision=precision, eval_every_steps=10, **common)
    assert plain.steps == row.steps == unclipped.steps
    assert [c[1] for c in plain.curve] == [c[1] for c in row.curve]
    assert max(abs(a[1] - b[1]) for a, b in zip(plain.curve, unclipped.curve, strict=True)) > 0.02
    for bad in (-1, float("inf")):  # one rule with Controller's and compare's (check_max_grad_norm)
        with pytest.raises(ValueError, match=f"max_grad_norm={bad} must be a positive finite number"):
            run_plain("synthetic", 0, max_grad_norm=bad, **common)


def test_plain_fp16_loop_skips_a_non_finite_step_and_counts_it(monkeypatch):
    # GradScaler skips the step whose loss is inf (the parameters keep their values) and lowers its scale.
    clean = run_plain("synthetic", 0, precision="fp16", epochs=0.5, eval_every_steps=100, device="cpu")
    calls = {"n": 0}
    loss_fn = Task.loss_fn

    def faulty(self, logits, labels):
        calls["n"] += 1
        loss = loss_fn(self, logits, labels)
        return loss * float("inf") if calls["n"] == 5 else loss

    monkeypatch.setattr(Task, "loss_fn", faulty)
    result = run_plain("synthetic", 0, precision="fp16", epochs=0.5, eval_every_steps=100, device="cpu")
    assert calls["n"] >= result.steps
    assert clean.skipped_steps == 0 and result.skipped_steps == 1
    assert result.steps == clean.steps
    assert math.isfinite(result.final_metric) and result.final_metric > 0.3  # trained on after the skip


def test_plain_fp16_loop_reads_no_scale_back_a_step(monkeypatch):
    """The skip was told from the scale read after every step (get_scale(): a host-device sync on a GPU, a second one
    a step beside GradScaler's own, inside the timed loop); now from the updates the optimizer applied."""
    reads = {"n": 0}
    get_scale = torch.amp.GradScaler.get_scale

    def counted(self):
        reads["n"] += 1
        return get_scale(self)

    monkeypatch.setattr(torch.amp.GradScaler, "get_scale", counted)
    result = run_plain("synthetic", 0, precision="fp16", epochs=0.5, eval_every_steps=100, device="cpu")
    assert result.steps > 10 and reads["n"] == 0


def test_plain_loop_reports_time_to_target_and_stops_at_the_time_cap():
    full = run_plain("synthetic", 0, precision="fp32", epochs=2, eval_every_steps=8, device="cpu")
    assert full.time_to_target_s is not None  # synthetic's 0.8 is reached in two epochs
    first_hit = next(t for t, metric, *_ in full.curve if metric >= 0.8)
    assert full.time_to_target_s == first_hit
    capped = run_plain("synthetic", 0, precision="fp32", epochs=2, eval_every_steps=8, device="cpu", max_time_s=1e-6)
    assert capped.steps == 8 and len(capped.curve) == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"precision": "int8"}, r"precision='int8'; allowed: fp32, bf16, fp16"),
        ({"epochs": 0}, r"epochs=0 must be a positive finite number"),
        ({"lr_scale": float("nan")}, r"lr_scale=nan must be a positive finite number"),
        ({"batch_size": 0}, r"batch_size=0 must be a positive integer"),
        ({"eval_every_steps": 0}, r"eval_every_steps=0 must be a whole number >= 1"),
        ({"max_time_s": -1.0}, r"max_time_s=-1.0 must be a positive number of seconds"),
        ({"max_time_s": "5"}, r"max_time_s='5' must be a positive number of seconds"),
    ],
)
def test_plain_loop_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        run_plain("synthetic", 0, device="cpu", **kwargs)


def test_a_cpu_plain_run_seeds_only_the_generators_it_draws_from(monkeypatch):
    """``torch.manual_seed`` also seeded every CUDA device's generator (queued for CUDA's start), behind a CPU run's
    caller; TrainingRun seeds only the run's. The initial weights stay those of the same seed."""
    seeded_cuda = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: seeded_cuda.append(seed))
    plain = run_plain("synthetic", 3, precision="fp32", epochs=0.2, eval_every_steps=2, device="cpu")
    assert seeded_cuda == [] and plain.steps >= 1

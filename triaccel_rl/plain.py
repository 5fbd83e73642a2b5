"""What users run today: a plain PyTorch training loop with one static configuration, as a baseline row.

The comparison's static rows (``static-bf16``, ``static-fp16``, ...) run through ``TrainingRun``, so they
share Tri-Accel's executor: the fused Triton optimizer step, captured CUDA graphs, device-side statistics.
That isolates what the *controller* adds, but says nothing about what the whole tool adds over the loop
a careful user writes. ``run_plain`` is that loop, with nothing of ours on the training path:

    model.to(memory_format=torch.channels_last); optimizer = task.make_optimizer(model.parameters())
    for each batch:
        with torch.autocast("cuda", dtype=torch.bfloat16):   # fp16: torch.float16, and a GradScaler
            loss = loss_fn(model(augment(x)).float(), y)
        loss.backward()                                          # (max_grad_norm: clip_grad_norm_ here)
        optimizer.step(); optimizer.zero_grad(set_to_none=True)

It shares with the other rows only what makes the rows comparable: the task's data split, sample order
(``ElasticLoader`` with the same seed), augmentation, loss, LR (base LR × ``lr_scale`` × the batch rule's
gain, with the same warm-up-then-decay schedule) and the measurement (CUDA-event time of the training
steps only, test accuracy in fp32 every ``eval_every_steps`` steps, the allocator's peak of the steps, 0 on a CPU;
NVML's reading at the same points).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from triaccel_rl.compare import NvmlPeak, RunResult, check_epoch_budget
from triaccel_rl.config import LRRule
from triaccel_rl.elastic import lr_gain, release_memory, resolve_lr_rule
from triaccel_rl.engine import check_max_grad_norm
from triaccel_rl.errors import is_real, is_whole
from triaccel_rl.loader import ElasticLoader
from triaccel_rl.precision import find_layers
from triaccel_rl.tasks import Task, check_seed, get_task
from triaccel_rl.training import (
    IntervalTimer,
    check_time_cap,
    evaluate_accuracy,
    probe_count,
    resolve_device,
    schedule_gain,
    seed_run_generators,
)
from triaccel_rl.types import Precision

__all__ = ["PLAIN_PRECISIONS", "run_plain"]

PLAIN_PRECISIONS = ("fp32", "bf16", "fp16")
"""The precisions a plain loop runs in: no autocast (fp32), bf16 autocast, or fp16 autocast with ``GradScaler``."""


def run_plain(
    task: Task | str,
    seed: int,
    *,
    precision: str = "bf16",
    epochs: float = 1.0,
    batch_size: int | None = None,
    lr_scale: float = 1.0,
    channels_last: bool = True,
    schedule: bool = True,
    warmup_frac: float = 0.15,
    eval_every_steps: int = 50,
    device: str | torch.device | None = None,
    max_time_s: float | None = None,
    max_grad_norm: float | None = None,
) -> RunResult:
    """Trains ``task`` with a plain PyTorch loop in one static ``precision`` and measures it like ``run_controller``.

    Args:
        task: task or its registered name.
        seed: seeds the model, the data order and the augmentation.
        precision: ``fp32``, ``bf16`` (autocast) or ``fp16`` (autocast and ``torch.amp.GradScaler``, as its
            documentation shows: a step with a non-finite gradient is skipped and the scale lowered).
        epochs: training budget in epochs.
        batch_size: samples per step (the task's base batch by default).
        lr_scale: LR multiplier on the task's base LR at its base batch (the batch rule's gain applies on top).
        channels_last: channels-last model and inputs.
        schedule: linear warm-up over ``warmup_frac`` of the budget, then linear decay to zero.
        warmup_frac: share of the budget spent warming up.
        eval_every_steps: steps between test evaluations (time to target is read at these points).
        device: ``cpu``, ``cuda`` or ``None`` (CUDA when available).
        max_time_s: stop once the training time passes this many seconds (``None``: train all ``epochs``).
        max_grad_norm: clip the gradient's total norm to this with ``torch.nn.utils.clip_grad_norm_`` between the
            backward and the step (with fp16, after ``scaler.unscale_``, as GradScaler's documentation shows).
            ``None``: no clipping.

    Raises:
        ValueError: a seed that is no whole number in [0, 2**63 - 20001], an unknown precision, a budget, batch, LR
            scale, interval or clipping norm that is not a positive number (a bool or text included), a batch above
            the training set, or a warm-up share that is not a number in [0, 1).
        TypeError: ``task`` is neither a ``Task`` nor a name, or ``channels_last`` or ``schedule`` is not a bool.
    """
    # Checked as TrainingRun and run_controller check them: task=5 failed with an AttributeError, "no" was taken as
    # True, lr_scale=True as 1.0 (and recorded as True in the curve), and text raised a bare TypeError.
    if not isinstance(task, (Task, str)):
        raise TypeError(f"task={task!r} must be a Task or a registered task name, e.g. 'synthetic'")
    task = get_task(task) if isinstance(task, str) else task
    seed = check_seed("run_plain", seed)  # before the seeding, whose overflow message names nothing
    if precision not in PLAIN_PRECISIONS:
        raise ValueError(f"precision={precision!r}; allowed: {', '.join(PLAIN_PRECISIONS)}")
    for name, value in (("epochs", epochs), ("lr_scale", lr_scale)):
        if not (is_real(value) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name}={value!r} must be a positive finite number")
    lr_scale = float(lr_scale)
    for name, flag in (("channels_last", channels_last), ("schedule", schedule)):
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"{name}={flag!r} must be True or False")
    if not (is_whole(eval_every_steps) and eval_every_steps >= 1):  # 2.5 failed with a TypeError in range()
        raise ValueError(f"eval_every_steps={eval_every_steps!r} must be a whole number >= 1")
    if not is_real(warmup_frac):
        raise ValueError(f"warmup_frac={warmup_frac!r} must be a number in [0, 1)")
    if not (math.isfinite(warmup_frac) and 0.0 <= warmup_frac < 1.0):  # as TrainingRun: 1.0 divided by zero at the end
        raise ValueError(f"warmup_frac={warmup_frac!r} must be in [0, 1)")
    batch = task.base_batch_size if batch_size is None else batch_size
    if not (is_whole(batch) and batch >= 1):
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    batch = int(batch)
    check_time_cap(max_time_s)
    max_grad_norm = check_max_grad_norm(max_grad_norm)
    device = resolve_device(device)
    release_memory(device)  # earlier runs' garbage must not count in this run's peak

    # The generators the run draws from, as TrainingRun seeds them: torch.manual_seed also seeded every CUDA device's
    # (queued for CUDA's start where it had not started), behind a CPU run's caller.
    seed_run_generators(seed, device)
    model = task.build_model().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    optimizer = task.make_optimizer(model.parameters())
    base_lr = task.base_lr * lr_scale * lr_gain(resolve_lr_rule(LRRule.AUTO, optimizer), batch, task.base_batch_size)
    data = task.data(seed)
    if len(data.train_x) < 2:  # as TrainingRun: the loader's "empty dataset" error named neither the task nor the size
        raise ValueError(
            f"task {task.name!r} has {len(data.train_x)} training sample(s): a run holds one out for its probe loss "
            "and trains on the rest, so it needs n_train >= 2"
        )
    n_probe = probe_count(len(data.train_x))  # TrainingRun's default held-out probe: the same samples skipped
    loader = ElasticLoader(data.train_x[:-n_probe].to(device), data.train_y[:-n_probe].to(device), seed=seed)
    test_x, test_y = data.test_x.to(device), data.test_y.to(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    # Updates applied, counted on the host: GradScaler calls optimizer.step() only for finite gradients. Reading the
    # scale after each step instead (get_scale()) was a second host-device sync a step, in the timed loop.
    applied = [0]
    counter = optimizer.register_step_post_hook(lambda *_: applied.__setitem__(0, applied[0] + 1))
    layers = [info for _, _, info in find_layers(model)]
    codes = [int(Precision.parse(precision)) if info.controllable else 0 for info in layers]

    total_samples = int(epochs * len(loader))
    check_epoch_budget(epochs, len(loader))
    if batch > len(loader):  # as TrainingRun: never served, the LR gain followed it (10**6 trained at LR 781)
        raise ValueError(
            f"batch_size={batch} is more than the {len(loader)} training samples: a step serves at most an epoch"
        )
    timer = IntervalTimer(device)
    time_s = 0.0
    steps = samples = 0
    peak = 0
    nvml = NvmlPeak(device)
    curve: list[tuple[float, float, int, float, float]] = []
    trace: list[dict[str, Any]] = []
    time_to_target: float | None = None
    low_share = float(np.mean([c != 0 for c in codes])) if dtype is not None else 0.0
    while samples < total_samples:
        model.train()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        timer.start()
        for _ in range(eval_every_steps):
            if samples >= total_samples:
                break
            # Whole batches to the end, as TrainingRun takes them: a last batch cut to the budget made the two
            # runs differ wherever the budget is no whole number of batches (with a constant LR, in compare)
            next_batch = loader.next(batch)
            samples += len(next_batch.y)
            # As TrainingRun: the schedule's progress counts the batch about to be trained on.
            lr = base_lr * (schedule_gain(samples / len(loader), epochs, warmup_frac) if schedule else 1.0)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x = next_batch.x if task.augment is None else task.augment(next_batch.x)
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = task.loss_fn(model(x).float(), next_batch.y)
            scaler.scale(loss).backward()
            if max_grad_norm is not None:
                scaler.unscale_(optimizer)  # a no-op without fp16
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            scaler.step(optimizer)  # with fp16: one host-device sync a step, inside GradScaler
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            steps += 1
        time_s += timer.stop() / 1e3  # one host-device sync per evaluation interval, as the other rows
        interval_peak = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0  # reset above
        peak = max(peak, interval_peak)
        nvml.read()
        metric = evaluate_accuracy(model, test_x, test_y)
        curve.append((time_s, metric, batch, lr_scale, low_share))
        trace.append(
            {"time_s": time_s, "batch_size": batch, "lr_scale": lr_scale, "memory_bytes": interval_peak,
             "probe_loss": float("nan"), "noise_scale": None, "lr": lr, "precisions": codes}
        )  # fmt: skip
        if time_to_target is None and metric >= task.target_metric:
            time_to_target = time_s
        if max_time_s is not None and time_s >= max_time_s:
            break
    counter.remove()
    return RunResult(
        controller=f"plain-{precision}",
        seed=seed,
        final_metric=curve[-1][1],
        time_s=time_s,
        wall_s=time_s,  # the training intervals' measured time, as run_controller's (evaluations left out)
        time_to_target_s=time_to_target,
        peak_bytes=peak,
        precision_changes=0,
        batch_changes=0,
        lr_changes=0,
        skipped_steps=steps - applied[0],
        overhead_frac=0.0,
        steps=steps,
        curve=curve,
        trace=trace,
        layer_names=[info.name for info in layers],
        mean_step_ms=1e3 * time_s / max(steps, 1),
        nvml_bytes=nvml.bytes,
        nvml_scope=nvml.scope,
    )

"""Compare controllers × seeds on a task: time to target, final metric, memory, changes; table, JSON, TensorBoard."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from triaccel_rl.actions import action_space, decode
from triaccel_rl.config import ControllerConfig, CostMode, HardwareProfile
from triaccel_rl.elastic import release_memory
from triaccel_rl.engine import check_max_grad_norm
from triaccel_rl.errors import is_real, is_whole
from triaccel_rl.executor import sixteen_bit_formats
from triaccel_rl.experiment import PrecisionMapScalars, check_log_dir, tqdm_disable, write_text_atomic
from triaccel_rl.loop import DecisionLoop
from triaccel_rl.memory import nvml_used_bytes
from triaccel_rl.observation import OBS_HIGH
from triaccel_rl.policies import make_policy, run_without_bf16
from triaccel_rl.signals import SignalMode
from triaccel_rl.tasks import Task, check_seed, get_task
from triaccel_rl.training import IntervalStats, TrainingRun, check_time_cap, probe_count, resolve_device
from triaccel_rl.types import Policy, Precision, Signals

__all__ = [
    "NvmlPeak",
    "RunResult",
    "bootstrap_ci",
    "check_comparison",
    "check_epoch_budget",
    "compare",
    "format_table",
    "json_safe",
    "row_names",
    "run_controller",
    "summarize",
    "write_json",
]

_log = logging.getLogger("triaccel_rl")


@dataclass
class RunResult:
    """One controller on one seed.

    Attributes:
        controller: the controller's name (``static-bf16``, ``heuristic``, ``learned:policy.zip``).
        seed: the run's seed.
        final_metric: test accuracy at the end, in [0, 1].
        time_s: charged training time (measured, or modelled from the hardware profile), seconds.
        wall_s: wall-clock training time on this machine, seconds.
        time_to_target_s: charged time at the first evaluation whose test metric is at or above the task's target
            (None: never). Read at that evaluation, not interpolated between evaluations, so it is as fine as their
            spacing; a run that falls below the target afterwards keeps it.
        peak_bytes: peak memory (allocator on GPU, accounting on CPU).
        nvml_bytes: on a GPU, the most NVML reported at the evaluation points (``memory.nvml_used_bytes``: the
            CUDA context, the allocator's whole reserve and the libraries' allocations); None where NVML cannot
            read (a CPU run, no driver).
        nvml_scope: ``"process"`` (this process's entry) or ``"device"`` (the whole device's use); "" with no reading.
        precision_changes: decisions that changed some layer's precision.
        batch_changes: decisions that changed the batch size.
        lr_changes: decisions that changed the LR multiplier.
        skipped_steps: updates skipped for non-finite gradients.
        overhead_frac: time spent on signals and decisions over training time (not a share of the total: a
            run of a few steps can read over 1).
        steps: optimizer steps taken.
        curve: ``(time_s, test_metric, batch_size, lr_scale, low_precision_share)`` at each evaluation;
            ``low_precision_share`` is the share of all the model's layers (``layer_names``; those whose precision is
            not controlled stay fp32) in bf16 or fp16, as ``Controller`` logs it.
        trace: one row per decision: ``time_s``, ``batch_size``, ``lr_scale``, ``memory_bytes``, ``probe_loss``,
            ``noise_scale``, ``lr`` and ``precisions`` (per-layer codes 0 fp32, 1 bf16, 2 fp16). In both, ``lr_scale``
            is the LR multiplier on the task's base LR, the same in every row: the starting ``lr_scale`` given to
            :func:`run_controller` times the policy's rung; neither the batch rule's gain nor the schedule is in it
            (the trace's ``lr`` is the LR applied: the global LR of the last step before the row, as
            :func:`~triaccel_rl.plain.run_plain`'s trace holds it).
        layer_names: names of the layers, in the order of ``trace[i]["precisions"]``.
        oom_events: out-of-memory errors recovered during the run.
        mean_step_ms: mean charged time of one optimizer step, in ms.
        fallbacks: decisions a learned policy handed to the heuristic (out-of-distribution observations).
        fallback_features: those decisions by the feature furthest outside the policy's training range
            (``ObservationLayout.name``), so a run shows what a model does that the training tasks did not.
        overhead_parts: ``overhead_frac`` by part (``triaccel_rl.loop.OVERHEAD_PARTS``, plus ``other``: the
            per-interval bookkeeping of the cheap signals).
        speed_trial: the ms a step of each 16-bit precision before the first decision (measured; in profile cost
            mode, looked up in the profile) and the ``chosen`` one's code (1 bf16, 2 fp16), when the policy asked for
            the trial; else empty.
    """

    controller: str
    seed: int
    final_metric: float
    time_s: float
    wall_s: float
    time_to_target_s: float | None
    peak_bytes: int
    precision_changes: int
    batch_changes: int
    lr_changes: int
    skipped_steps: int
    overhead_frac: float
    steps: int
    curve: list[tuple[float, float, int, float, float]] = field(default_factory=list)
    trace: list[dict[str, Any]] = field(default_factory=list)
    layer_names: list[str] = field(default_factory=list)
    oom_events: int = 0
    mean_step_ms: float = 0.0
    fallbacks: int = 0
    overhead_parts: dict[str, float] = field(default_factory=dict)
    speed_trial: dict[str, float] = field(default_factory=dict)
    fallback_features: dict[str, int] = field(default_factory=dict)
    nvml_bytes: int | None = None
    nvml_scope: str = ""


class NvmlPeak:
    """The largest NVML reading of a run's device so far (``memory.nvml_used_bytes``), read at chosen points.

    Rows compared side by side read it at the same evaluation points; the allocator's reserve only grows within a
    run, so the last reading is about the run's footprint.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.bytes: int | None = None
        self.scope = ""

    def read(self) -> None:
        """Takes a reading (nothing on a CPU or without NVML)."""
        reading = nvml_used_bytes(self.device)
        if reading is not None and (self.bytes is None or reading[0] > self.bytes):
            self.bytes, self.scope = reading


def run_controller(
    task: Task | str,
    controller: str | Policy,
    seed: int,
    *,
    epochs: float = 1.0,
    config: ControllerConfig | None = None,
    cost_mode: CostMode | str | None = None,
    profile: HardwareProfile | str | os.PathLike[str] | None = None,
    device: str | None = None,
    eval_every: int = 5,
    log_dir: str | os.PathLike[str] | None = None,
    progress: tqdm | None = None,
    batch_size: int | None = None,
    lr_scale: float = 1.0,
    channels_last: bool = False,
    schedule: bool = False,
    max_time_s: float | None = None,
    eval_every_steps: int | None = None,
    max_grad_norm: float | None = None,
) -> RunResult:
    """Trains ``task`` for ``epochs`` epochs under ``controller`` and measures it.

    Time is the charged time of the training steps; for adaptive controllers in ``measured`` mode it also
    includes the controller's own work (probe loss, signals, decision), which a static configuration
    would not do. In ``profile`` mode that overhead is reported (``overhead_frac``) but not added, since
    CPU wall time does not convert to GPU time.

    Args:
        task: task or its registered name.
        controller: a static preset, ``heuristic`` (or an ablation), ``batch-finder``, ``pretrained``, a path
            to an SB3 zip, or a policy object.
        seed: seeds the model, the data order and the subset.
        epochs: training budget in epochs (fractional allowed).
        config: decision interval, groups, bounds.
        cost_mode: ``measured`` or ``profile``; default measured on a GPU, profile on a CPU.
        profile: hardware profile for ``profile`` mode: a ``HardwareProfile`` or its JSON's path (the shipped one by
            default).
        device: ``cpu``, ``cuda`` or None (CUDA when available).
        eval_every: evaluate the test metric every this many decisions (when ``eval_every_steps`` is None).
        log_dir: TensorBoard folder for this run (None: no logging; ``""`` or a file is refused). At each
            evaluation, the curve's point: ``test/metric``, ``controller/batch_size``, ``controller/lr_scale`` and
            ``controller/low_precision_share`` against the optimizer step, and ``test/metric_vs_time_us`` against
            the charged time in microseconds; at each decision, the trace's row: ``train/probe_loss`` (none where
            the trace holds None), ``memory/peak_bytes`` and ``controller/overhead_frac``, against the step, and
            the row's precision map, a scalar a controllable layer (``precision/<index>_<layer name>``, valued 0 fp32,
            1 bf16, 2 fp16: :class:`~triaccel_rl.experiment.PrecisionMapScalars`) at the first row and where the map
            changed; at the end, where matplotlib is installed, the map's heat map as the image ``precision/map``.
        progress: a tqdm bar (in epochs) to advance as training proceeds.
        batch_size: starting batch size (the task's by default).
        lr_scale: starting LR multiplier on the task's base LR. A static row keeps it; for an adaptive policy it is
            folded into the base LR and the run starts at multiplier 1, the neutral rung of the policy's LR ladder.
            Either way the curve, the trace and TensorBoard report the multiplier on the task's base LR (the folded
            start times the rung), so rows started alike report alike.
        channels_last: channels-last memory format for model and inputs.
        schedule: warm-up then linear decay of the LR over ``epochs`` (else a constant LR).
        max_time_s: stop early once the charged time passes this many seconds (a slow baseline that has
            not reached the target by then is reported as a miss; ``None``: train all ``epochs``).
        eval_every_steps: evaluate every this many optimizer steps instead, whatever the decision
            interval (which may stretch on a GPU, ``ControllerConfig.max_interval_factor``) and through a speed
            trial's steps: rows compared side by side then read time to target at the same steps, as ``run_plain``
            does.
        max_grad_norm: clip the gradient's total norm to this at every update (``StepEngine.max_grad_norm``, as
            ``Controller(max_grad_norm=...)``); None: no clipping.
    """
    task = get_task(task) if isinstance(task, str) else task
    config = config or ControllerConfig()
    _check_run_settings(epochs, eval_every, eval_every_steps, max_grad_norm, max_time_s)
    check_log_dir(log_dir)
    if not (is_real(lr_scale) and math.isfinite(lr_scale) and lr_scale > 0):  # folded first, it was named base_lr
        raise ValueError(f"lr_scale={lr_scale!r} must be a positive finite number")
    if not isinstance(schedule, (bool, np.bool_)):  # "no" was taken as True
        raise TypeError(f"schedule={schedule!r} must be True or False")
    # A finished run's model, optimizer state and captured graphs sit in reference cycles (hooks) until the
    # collector runs: free them now, or this run's peak memory would include the previous run's.
    release_memory(resolve_device(device))
    policy = _policy(controller, config)
    # A policy object passed in (a name builds a fresh one a run) is reused across runs: the precision settings a
    # speed trial or a GPU without bf16 changes are put back after the run, and its fallback counts are this run's.
    settings = _precision_settings(policy)
    new_run = getattr(policy, "new_run", None)
    if new_run is not None:  # a FallbackPolicy's spells: the run's first fallback is warned of
        new_run()
    fallbacks_before = int(getattr(policy, "fallbacks", 0))
    features_before = dict(getattr(policy, "fallback_features", {}))
    writer = None
    try:
        adaptive = getattr(policy, "initial_action", None) is None and getattr(policy, "prepare", None) is None
        folded = 1.0  # the multiplier folded into the base LR: reported times the run's, so rows compare on one base LR
        if adaptive and lr_scale != 1.0:
            # A policy's LR ladder is relative to where the run starts: the starting multiplier goes into the base LR,
            # or the heuristic would read x0.5 as a rung it lowered and climb back to x1 (H200, 2026-12-02).
            task, folded, lr_scale = replace(task, base_lr=task.base_lr * lr_scale), lr_scale, 1.0
        run = TrainingRun(
            task,
            seed=seed,
            device=device,
            memory=config.memory,
            profile=profile,
            cost_mode="measured",
            elastic=config.elastic,
            batch_size=batch_size,
            channels_last=channels_last,
            schedule_epochs=epochs if schedule else None,
        )
        if cost_mode is None:
            cost_mode = CostMode.MEASURED if run.device.type == "cuda" else CostMode.PROFILE
        run.cost_mode = CostMode.parse(cost_mode)
        run.engine.max_grad_norm = max_grad_norm
        # A static row reads no signals: only the cheap ones run (its snapshots feed the trace and plots).
        cheap = replace(config, signals=replace(config.signals, mode=SignalMode.CHEAP))
        loop = DecisionLoop(run, config if adaptive else cheap)
        if getattr(policy, "needs_lr_factors", False):  # the second-order ablation: curvature-scaled LR per layer
            loop.enable_lr_factors()
        name = str(getattr(policy, "name", controller))
        writer = _writer(log_dir)
        precision_map = PrecisionMapScalars(run.layers)
        samples_per_epoch = len(run.loader)  # samples per epoch
        total_samples = int(epochs * samples_per_epoch)
        check_epoch_budget(epochs, samples_per_epoch)
        time_ms = wall_ms = 0.0
        bar_left = epochs  # this run's share of the progress bar
        curve: list[tuple[float, float, int, float, float]] = []
        trace: list[dict[str, Any]] = []
        changes = {"precision": 0, "batch": 0, "lr": 0}
        peak = 0
        nvml = NvmlPeak(run.device)
        decision = 0
        observation = None
        next_eval = eval_every_steps  # None: evaluate at every eval_every-th decision

        def evaluate(finished: bool) -> None:
            """Reads the test metric at the charged time so far: a point of the curve, and of TensorBoard's."""
            nvml.read()  # outside the charged time, at the same steps in every row
            shown = getattr(progress, "postfix", None)  # a disabled bar has none
            if finished and progress is not None:  # the bar is full; the final evaluation can take a while on a CPU
                progress.set_postfix_str(f"{shown or ''}, final evaluation".lstrip(", "))
            try:
                metric = run.evaluate()
            finally:
                if finished and progress is not None:
                    progress.set_postfix_str(shown or "")
            low = float(np.mean([p is not Precision.FP32 for p in run.precisions]))
            curve.append((time_ms / 1e3, metric, run.batch_size, folded * run.lr_scale, low))
            if writer is not None:  # the curve's point, as the JSON holds it (every evaluation, the first included)
                step = run.steps
                writer.add_scalar("test/metric", metric, step)
                writer.add_scalar("test/metric_vs_time_us", metric, _time_step_us(curve[-1][0]))
                writer.add_scalar("controller/batch_size", run.batch_size, step)
                writer.add_scalar("controller/lr_scale", curve[-1][3], step)
                writer.add_scalar("controller/low_precision_share", low, step)

        initial = getattr(policy, "initial_action", None)
        if initial is not None:  # a static configuration holds from the first step, not from a decision
            loop.executor.start(decode(initial, config), run)
        run.lr_scale = lr_scale  # after the static action, whose ladder would otherwise move it
        # A GPU without bf16 (a V100 or T4) has one 16-bit format: the policy starts and lowers in it; no trial runs.
        formats = sixteen_bit_formats(run.device)
        if Precision.BF16 not in formats and adaptive:
            run_without_bf16(policy)
        start = getattr(policy, "initial_precision", None)
        if start is not None:  # an adaptive policy's starting precision (the heuristic starts from bf16)
            run.set_precisions([start] * len(run.precision.controllable_indices))
        prepare = getattr(policy, "prepare", None)
        if prepare is not None:  # the batch-finder baseline searches and fixes its batch before training
            prepare(run)
        speed_trial: dict[str, float] = {}
        wants_trial = getattr(policy, "wants_speed_trial", None)
        # Step time tells the 16-bit formats apart where it is measured on a GPU or charged from a GPU's profile (a
        # CPU's clock would not: bf16 is about 10x slower than fp32 there).
        step_time_known = run.cost_mode is CostMode.PROFILE or (
            run.cost_mode is CostMode.MEASURED and run.device.type == "cuda"
        )
        if adaptive and len(formats) > 1 and wants_trial is not None and wants_trial(step_time_known):
            if run.cost_mode is CostMode.PROFILE:  # the profile says what a step costs: look it up, train nothing
                step_ms = {precision: run.modelled_step_ms(precision=precision) for precision in formats}
            else:  # which format is faster depends on the model and the GPU: time both on real training steps
                steps = getattr(policy, "config", config).heuristic.speed_trial_steps  # the policy's own setting

                def trial_chunk(max_steps: int) -> IntervalStats:
                    """A chunk of the trial, stopped at the next evaluation step and evaluated there.

                    Training like any other (charged, on the progress bar), cut so that this row reads time to target
                    at the same steps as the others: uncut, a 20-step trial put its first evaluation at step 21 where
                    theirs were at 5, 10, 15 and 20. Past the run's budget, the last evaluation is left to the end.
                    """
                    nonlocal time_ms, wall_ms, bar_left, next_eval
                    if next_eval is not None and run.steps < next_eval:
                        to_eval = next_eval - run.steps
                        max_steps = min(max_steps, to_eval)
                    chunk = loop.train_interval(max_steps=max_steps)
                    time_ms += chunk.charged_ms
                    wall_ms += chunk.train_ms
                    bar_left = _advance(progress, chunk.samples / samples_per_epoch, bar_left)
                    if (
                        next_eval is not None
                        and eval_every_steps is not None
                        and run.steps >= next_eval
                        and run.samples_seen < total_samples
                    ):
                        evaluate(finished=False)
                        next_eval = _next_multiple(run.steps, eval_every_steps)
                    return chunk

                step_ms, _ = loop.time_precisions(formats, steps, train=trial_chunk)
                # The first decision comes a whole interval after the trial and reads none of its steps: the fp16
                # candidate's skipped steps (its loss scale backing off from 2**16) read as overflows, and cut the LR
                # of a run that kept bf16.
                loop.discard_interval()
            chosen = policy.choose_low_precision(step_ms)  # the start precision follows when it is 16-bit
            # None (a LearnedPolicy not built by make_policy): the model's own, fp32, as the run started; it was passed
            # on as None, and set_precisions refused it when the trial ended.
            start = policy.initial_precision
            run.set_precisions([Precision.FP32 if start is None else start] * len(run.precision.controllable_indices))
            speed_trial = {precision.name.lower(): ms for precision, ms in step_ms.items()}
            speed_trial["chosen"] = float(chosen)
        finished = False
        decide = False  # a snapshot is waiting for its decision
        applied_lr = _applied_lr(run) if run.steps else run.lr  # the trace's lr (a speed trial may have trained)
        signals: Signals | None = None
        while not finished:
            if decide and adaptive:  # a static row holds its setting: no decisions
                assert observation is not None
                decide_start = time.perf_counter()
                raw, _ = policy.predict(observation, deterministic=True)
                before = (run.batch_size, run.lr_scale)
                report = loop.apply(raw)  # unconverted: decode refuses True and False among the entries
                decision_ms = (time.perf_counter() - decide_start) * 1e3
                loop.collector.add_overhead(decision_ms)
                loop.overhead_parts_ms["decision"] += decision_ms
                if run.cost_mode is CostMode.MEASURED:  # before the steps it precedes: charged at the next snapshot, it
                    # was missing from the times of the evaluations in between (a time to target read there was low)
                    time_ms += decision_ms
                changes["precision"] += int(report.changed_precision > 0)
                changes["batch"] += int(report.batch_size != before[0])
                changes["lr"] += int(report.lr_scale != before[1])
            decide = False
            remaining_steps = math.ceil((total_samples - run.samples_seen) / run.batch_size)
            if next_eval is not None:
                remaining_steps = min(remaining_steps, max(next_eval - run.steps, 1))
            # A speed trial longer than a tiny run's whole budget leaves nothing (and no negative count) to train.
            interval = loop.train_interval(max_steps=max(remaining_steps, 0))
            if interval.steps:  # read before the snapshot, whose rollback, and the decision, may change the gain
                applied_lr = _applied_lr(run)
            time_ms += interval.charged_ms
            wall_ms += interval.train_ms
            bar_left = _advance(progress, interval.samples / samples_per_epoch, bar_left)
            done = run.samples_seen >= total_samples
            evaluate_now = False
            if loop.decision_due or done:
                overhead_before = loop.collector.overhead_ms
                signals = loop.snapshot(progress=min(1.0, run.samples_seen / total_samples))
                if adaptive and run.cost_mode is CostMode.MEASURED:
                    # This snapshot is the controller's cost: charged (its decision is, once made).
                    time_ms += loop.collector.overhead_ms - overhead_before
                peak = max(peak, signals.memory_bytes)
                trace.append(
                    {
                        "time_s": time_ms / 1e3,
                        "batch_size": run.batch_size,
                        "lr_scale": folded * run.lr_scale,
                        "memory_bytes": signals.memory_bytes,
                        # None where it was not finite (the signals cap it at 1e6 for the observation, which a diverging
                        # run's finite losses exceed: the trace would not tell them apart).
                        "probe_loss": signals.probe_loss if signals.extra.get("probe_loss_finite", True) else None,
                        "noise_scale": signals.noise_scale,
                        "lr": applied_lr,
                        "precisions": [int(p) for p in run.precisions],
                    }
                )
                if (
                    writer is not None
                ):  # the trace's row, as the JSON holds it (a probe loss it holds as None: no point)
                    row, step = trace[-1], run.steps
                    if row["probe_loss"] is not None:
                        writer.add_scalar("train/probe_loss", row["probe_loss"], step)
                    writer.add_scalar("memory/peak_bytes", row["memory_bytes"], step)
                    writer.add_scalar("controller/overhead_frac", signals.overhead_frac, step)
                    precision_map.write(writer, row["precisions"], step)  # the precision map's column, if changed
                observation = loop.observation()
                decide = True
                decision += 1
                evaluate_now = next_eval is None and decision % eval_every == 0
            if next_eval is not None and eval_every_steps is not None and run.steps >= next_eval:
                evaluate_now = True
                next_eval = _next_multiple(run.steps, eval_every_steps)
            finished = done or (max_time_s is not None and time_ms / 1e3 >= max_time_s)
            if finished and not decide:  # stopped by the time cap between decision points: close the interval
                signals = loop.snapshot(progress=min(1.0, run.samples_seen / total_samples))
                peak = max(peak, signals.memory_bytes)
            if evaluate_now or finished:
                evaluate(finished)
        # The first evaluation at or above the target, at its own time: not interpolated between evaluations (the time
        # is a multiple of the evaluation spacing), and kept if a later evaluation falls below.
        time_to_target = next((time_s for time_s, metric, *_ in curve if metric >= task.target_metric), None)
        result = RunResult(
            controller=name,
            seed=seed,
            final_metric=curve[-1][1],
            time_s=time_ms / 1e3,
            wall_s=wall_ms / 1e3,
            time_to_target_s=time_to_target,
            peak_bytes=int(peak),
            precision_changes=changes["precision"],
            batch_changes=changes["batch"],
            lr_changes=changes["lr"],
            skipped_steps=run.skipped_steps,
            overhead_frac=float(loop.collector.overhead_ms / max(loop.collector.train_ms, 1e-9)),
            steps=run.steps,
            curve=curve,
            trace=trace,
            layer_names=[info.name for info in run.layers],
            oom_events=int(getattr(run, "oom_events", 0)),
            mean_step_ms=time_ms / max(run.steps, 1),
            fallbacks=int(getattr(policy, "fallbacks", 0)) - fallbacks_before,
            overhead_parts=_overhead_parts(loop),
            speed_trial=speed_trial,
            fallback_features={
                feature: count - features_before.get(feature, 0)
                for feature, count in getattr(policy, "fallback_features", {}).items()
                if count > features_before.get(feature, 0)
            },
            nvml_bytes=nvml.bytes,
            nvml_scope=nvml.scope,
        )
        if writer is not None:
            _log_precision_map_image(writer, result)
        return result
    finally:
        if writer is not None:  # a run that raised too: its event file is flushed and its handle let go
            writer.close()
        for owner, name, value in settings:
            setattr(owner, name, value)


def _next_multiple(step: int, every: int) -> int:
    """The first multiple of ``every`` past ``step``: the next step at which ``eval_every_steps`` evaluates."""
    return (step // every + 1) * every


def _precision_settings(policy: Any) -> list[tuple[Any, str, Any]]:
    """The start and 16-bit precisions a run may change, as ``(object, name, value)``, to be set back in that order.

    Read with ``getattr`` (a property's or a class attribute's value too), on ``policy`` first, then on the two a
    ``FallbackPolicy`` wraps: set back in this order, a wrapper's setter (which sets both it wraps to one value) runs
    first and each wrapped object then gets its own value back (the wrapper's None had reached the heuristic beside).
    """
    owners = [policy, getattr(policy, "policy", None), getattr(policy, "fallback", None)]
    return [
        (owner, name, getattr(owner, name))
        for owner in owners
        if owner is not None
        for name in ("initial_precision", "low_precision")
        if hasattr(owner, name)
    ]


def _applied_lr(run: TrainingRun) -> float:
    """The global LR the run's last step applied (before per-layer factors), as ``run_plain``'s trace records it.

    ``TrainingRun.lr`` is the next step's, a step of the schedule (and of a batch warm-up) later: the static row's
    trace read it and differed from the plain row's at every point of the same steps. Each step sets the engine's gain
    (the batch rule's gain times the schedule's) before its update, so until a decision changes it, it is the last
    step's.
    """
    return run.task.base_lr * run.lr_scale * run.engine.batch_lr_gain


def _advance(progress: tqdm | None, epochs: float, left: float) -> float:
    """Advances the bar by ``epochs``, capped at ``left`` (what is left of the run's share) and at the bar's total.

    Returns what is left of the share then. A run trains whole steps, so a fractional budget's last step trains past
    it: uncapped, each run's overshoot took later runs' share, and the bar read 100% as the last run started.
    """
    step = min(epochs, left)
    if progress is not None:
        progress.update(step if progress.total is None else min(step, max(progress.total - progress.n, 0.0)))
    return left - step


def _overhead_parts(loop: DecisionLoop) -> dict[str, float]:
    """The loop's overhead by part, as fractions of training time; ``other`` is what no part timed."""
    train_ms = max(loop.collector.train_ms, 1e-9)
    parts = {name: ms / train_ms for name, ms in loop.overhead_parts_ms.items()}
    parts["other"] = max(loop.collector.overhead_ms / train_ms - sum(parts.values()), 0.0)
    return parts


def check_comparison(
    task: str | Task,
    controllers: Sequence[str | os.PathLike[str]],
    seeds: Sequence[int],
    *,
    epochs: float = 1.0,
    config: ControllerConfig | None = None,
    cost_mode: CostMode | str | None = None,
    device: str | None = None,
    eval_every: int = 5,
    eval_every_steps: int | None = None,
    max_grad_norm: float | None = None,
) -> Task:
    """The checks :func:`compare` makes before its first run, on the same arguments; returns the task.

    The CLI calls it before it makes any output folder, so that a comparison refused for its arguments leaves none.

    Raises:
        ValueError: as :func:`compare` does before any run starts.
    """
    return _checked_comparison(
        task,
        controllers,
        seeds,
        epochs=epochs,
        config=config,
        cost_mode=cost_mode,
        device=device,
        eval_every=eval_every,
        eval_every_steps=eval_every_steps,
        max_grad_norm=max_grad_norm,
    )[0]


def _checked_comparison(
    task: str | Task,
    controllers: Sequence[str | os.PathLike[str]],
    seeds: Sequence[int],
    *,
    epochs: float,
    config: ControllerConfig | None,
    cost_mode: CostMode | str | None,
    device: str | None,
    eval_every: int,
    eval_every_steps: int | None,
    max_grad_norm: float | None,
) -> tuple[Task, list[str], list[int]]:
    """:func:`check_comparison`'s checks; the task, and the controllers and seeds as the runs take them (str, int)."""
    from triaccel_rl.plain import PLAIN_PRECISIONS  # plain.py imports this module

    controllers, seeds = _controller_list(controllers), _seed_list(seeds)
    task_obj = task if isinstance(task, Task) else get_task(task)
    config = config or ControllerConfig()
    plain = [c for c in controllers if _is_plain_row(c)]
    for controller in controllers:  # fail fast on a bad name or zip, before any run starts
        if controller in plain:
            _check_plain_row(controller)
        else:
            try:
                _policy(controller, config)
            except ValueError as err:
                if not str(err).startswith("unknown policy"):
                    raise
                plains = ", ".join(f"plain-{p}" for p in PLAIN_PRECISIONS)  # rows of compare's own
                raise ValueError(f"{err}, or a plain loop: {plains}") from None
    if plain:
        on_gpu = resolve_device(device).type == "cuda"
        mode = (
            CostMode.parse(cost_mode) if cost_mode is not None else (CostMode.MEASURED if on_gpu else CostMode.PROFILE)
        )
        if mode is not CostMode.MEASURED:
            raise ValueError(
                f"{', '.join(plain)} measure a plain loop's real time, but this comparison charges modelled time "
                "(cost mode 'profile', the default on a CPU): use cost mode 'measured' (--cost-mode measured)"
            )
    if not controllers:  # ran nothing and returned [] (a header-only table)
        raise ValueError("need at least one controller: name one of the controllers compare takes")
    if not seeds:
        raise ValueError("need at least one seed")
    repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1})
    if repeated:  # their runs would all train, then summarize() refuses two results for one seed
        raise ValueError(f"seeds {seeds} repeat {repeated}: give each seed once")
    _check_run_settings(epochs, eval_every, eval_every_steps, max_grad_norm)
    if epochs < 1:  # under one epoch the budget may come to no sample at all: the task's data says (its loads cache)
        n_train = len(task_obj.data(seeds[0]).train_y)
        check_epoch_budget(epochs, n_train - probe_count(n_train))  # a run trains on what its probe leaves
    resolve_device(device)  # a bad device string, or cuda on a machine without one
    names = _row_names(controllers, config)
    files = [_safe(name) for name in names]  # a row's TensorBoard folders and plot files are named so
    shared = {name for name in files if files.count(name) > 1}
    if shared:  # their runs would merge into one row, or share a TensorBoard folder and plot files
        clash = [(c, name) for c, name, file in zip(controllers, names, files, strict=True) if file in shared]
        rows = ", ".join(sorted({name for _, name in clash}))
        zips = any(c.endswith(".zip") for c, _ in clash)
        raise ValueError(
            f"controllers {', '.join(c for c, _ in clash)} would all be reported as row {rows}"
            + (" (one file name)" if len({name for _, name in clash}) > 1 else "")
            + ": list each once"
            + (" (a policy zip is named by its file name: give two policies different file names)" if zips else "")
        )
    return task_obj, controllers, seeds


def compare(
    task: str | Task,
    controllers: Sequence[str | os.PathLike[str]],
    seeds: Sequence[int],
    *,
    epochs: float = 1.0,
    config: ControllerConfig | None = None,
    cost_mode: CostMode | str | None = None,
    device: str | None = None,
    log_dir: str | os.PathLike[str] | None = None,
    show_progress: bool | None = None,
    eval_every: int = 5,
    eval_every_steps: int | None = None,
    max_grad_norm: float | None = None,
    profile: HardwareProfile | str | os.PathLike[str] | None = None,
    on_result: Callable[[list[RunResult]], None] | None = None,
) -> list[RunResult]:
    """Runs every controller on every seed of ``task`` in this process; returns one result per run.

    ``profile`` prices steps in ``profile`` cost mode (the shipped H200 profile by default; a plain row measures).
    ``on_result`` is called with the results so far after each run (the CLI keeps a partial results file with it, so
    a failure in a late run loses none of the earlier ones).

    ``task`` is a registered name or a ``Task`` (e.g. one with its base LR overridden, ``get_task(name,
    base_lr=...)``). A controller is a policy name or a policy zip's path (a str or an ``os.PathLike``); ``seeds`` a
    list, tuple, 1-D array or tensor of whole numbers. ``eval_every`` and ``eval_every_steps`` are
    :func:`run_controller`'s. A controller ``plain-fp32``, ``plain-bf16`` or ``plain-fp16`` is a user's own PyTorch
    loop in that precision (:func:`triaccel_rl.plain.run_plain`, with this comparison's constant LR and evaluation
    steps: every ``eval_every_steps``, else every ``eval_every`` × ``config.interval_steps`` steps). It measures real
    time, so it needs ``cost_mode="measured"`` (the default on a GPU): beside rows charged modelled time its seconds
    would mean something else. ``max_grad_norm`` clips every row's gradient norm the same way (:func:`run_controller`'s;
    a plain row calls ``clip_grad_norm_``), so a comparison can run a recipe that clips.

    ``show_progress`` draws a tqdm bar over the epochs on stderr: True always, False never, None (the default) only
    where stderr is a terminal (:func:`~triaccel_rl.experiment.tqdm_disable`). Log records reach your handlers as they
    are: one writing to the same terminal prints into the bar's line unless it writes through ``tqdm.write``
    (``tqdm.contrib.logging.logging_redirect_tqdm`` makes it; ``triaccel-rl``'s handler does).

    Raises:
        ValueError: an unknown task or controller, a plain row in modelled time, ``controllers`` given as one str or
            ``seeds`` as a count (give lists: ``["fp32"]``, ``[0, 1]``), a controller neither a str nor a path, a seed
            not a whole number, or a non-positive ``epochs``, ``eval_every``, ``eval_every_steps`` or
            ``max_grad_norm``, before any run starts; a ``log_dir`` that names no folder (:func:`check_log_dir
            <triaccel_rl.experiment.check_log_dir>`: ``""`` or a file; a TypeError for one neither a str nor a path).
    """
    from triaccel_rl.plain import run_plain  # plain.py imports this module

    profile = HardwareProfile.resolve(profile)  # a path is read (and refused) before any run
    check_log_dir(log_dir)
    task_obj, controllers, seeds = _checked_comparison(  # the runs go over what the checks saw
        task,
        controllers,
        seeds,
        epochs=epochs,
        config=config,
        cost_mode=cost_mode,
        device=device,
        eval_every=eval_every,
        eval_every_steps=eval_every_steps,
        max_grad_norm=max_grad_norm,
    )
    config = config or ControllerConfig()
    plain = [c for c in controllers if _is_plain_row(c)]
    total = epochs * len(controllers) * len(seeds)
    results = []
    # Fixed decimals, enough for the total's first two figures ({n:.3g} switched to 1.5e+03 past 1000 epochs)
    digits = 1 if total >= 1 else max(1, 1 - math.floor(math.log10(total)))
    count = f"{{n:.{digits}f}}/{{total:.{digits}f}}"
    bar_format = "{l_bar}{bar}| " + count + " epochs [{elapsed}<{remaining}{postfix}]"
    disable = tqdm_disable(show_progress)
    with tqdm(total=total, disable=disable, desc=f"compare {task_obj.name}", bar_format=bar_format) as bar:
        for controller in controllers:
            for seed in seeds:
                bar.set_postfix_str(f"{controller} seed {seed}")
                run_log = None if log_dir is None else Path(log_dir) / f"{_safe(controller)}-seed{seed}"
                if controller in plain:
                    results.append(
                        run_plain(
                            task_obj,
                            seed,
                            precision=controller.removeprefix("plain-"),
                            epochs=epochs,
                            schedule=False,  # as run_controller's default here: a constant LR
                            channels_last=False,
                            eval_every_steps=eval_every_steps or eval_every * config.interval_steps,
                            device=device,
                            max_grad_norm=max_grad_norm,
                        )
                    )
                    _log_curve(run_log, results[-1])
                    _advance(bar, epochs, epochs)
                    if on_result is not None:
                        on_result(list(results))
                    continue
                results.append(
                    run_controller(
                        task_obj,
                        controller,
                        seed,
                        epochs=epochs,
                        config=config,
                        cost_mode=cost_mode,
                        device=device,
                        log_dir=run_log,
                        progress=bar,
                        eval_every=eval_every,
                        eval_every_steps=eval_every_steps,
                        max_grad_norm=max_grad_norm,
                        profile=profile,
                    )
                )
                if on_result is not None:
                    on_result(list(results))
    return results


def bootstrap_ci(
    values: Sequence[float], confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``values``.

    The recipe, so that a table can be reproduced: ``n_resamples`` resamples of ``len(values)`` values drawn with
    replacement by ``numpy.random.default_rng(seed).integers``, the mean of each as :func:`summarize` takes a row's
    (``statistics.fmean``: ``math.fsum``, then divided by the count), and their ``(1 - confidence) / 2`` and
    ``(1 + confidence) / 2`` quantiles by ``numpy.percentile``'s default (linear interpolation between order
    statistics). Equal values thus give an interval of exactly the row's mean (numpy's pairwise mean of six 0.5988
    is 0.5987999999999999, ``fmean``'s 0.5988: the interval lay an ulp below it). With one value the interval is
    that value (it says nothing of the spread: ``summarize`` reports None there). With two or three values a 95%
    interval is ``(min, max)``, each as the mean of ``n`` copies of itself (``fmean([0.1] * 3)`` is
    0.10000000000000002): the resample of ``n`` copies of the smallest (largest) value has chance ``n**-n`` (1/4,
    1/27), above the 2.5% tail, so 2000 resamples hold more than 2.5% of each (the seeded draw is checked by the
    tests).

    Raises:
        ValueError: no value, a non-finite value, ``confidence`` outside (0, 1) or ``n_resamples`` < 1.

    Example:
        >>> bootstrap_ci([1.0, 1.0, 1.0])
        (1.0, 1.0)
        >>> bootstrap_ci([2.0, 4.0])
        (2.0, 4.0)
    """
    data = np.asarray(values, dtype=float)
    if len(data) == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if not np.isfinite(data).all():
        raise ValueError(f"bootstrap_ci needs finite values; got {list(values)}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence} must be in (0, 1), e.g. 0.95")
    if not is_whole(n_resamples) or n_resamples < 1:
        raise ValueError(f"n_resamples={n_resamples!r} must be a positive integer")
    if len(data) == 1:
        return float(data[0]), float(data[0])
    rng = np.random.default_rng(seed)
    resamples = data[rng.integers(0, len(data), (int(n_resamples), len(data)))].tolist()
    means = np.array([statistics.fmean(resample) for resample in resamples])  # as the row's mean: never an ulp off
    tail = (1.0 - confidence) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def summarize(results: Sequence[RunResult], reference: str | None = None) -> list[dict[str, Any]]:
    """Aggregates results per controller (one row each, in the order the controllers first appear).

    Statistics over a row's seeds: the mean; the sample standard deviation (``ddof=1``), None with one seed; the
    95% confidence interval of the mean (``*_ci95``, ``[low, high]``: :func:`bootstrap_ci`'s percentile bootstrap,
    2000 resamples, seed 0), None with fewer than two values or a non-finite one.

    Time to target is averaged over the seeds that reached it (a conditional mean: ``reach_rate`` says how many;
    ``time_to_target_s`` lists every seed's, None for a miss; a time that is no finite number counts as a miss).
    ``rank`` orders the rows that reached the target on every seed by their mean time to it, as the table prints it
    (3 significant digits; 1: the fastest; equal times share a rank, the next rank skips); a row that missed on some
    seed has none (None), whatever its mean over the seeds that reached.

    Every row holds the same keys, whatever the seeds and the reference: ``controller``, ``seeds``;
    ``final_metric_mean``, ``final_metric_std``, ``final_metric_ci95``; ``time_s_mean``, ``time_s_std``,
    ``time_s_ci95``; ``time_to_target_s_mean``, ``time_to_target_s_ci95`` (both over the seeds that reached),
    ``time_to_target_s``, ``reach_rate``, ``rank``; ``time_ratio``, ``time_to_target_ratio``; ``peak_bytes_mean``,
    ``nvml_bytes_mean`` (None unless every seed has a reading); ``precision_changes_mean``, ``batch_changes_mean``,
    ``lr_changes_mean``, ``overhead_frac_mean``, ``overhead_parts_mean``, ``wall_s_mean``, ``mean_step_ms``,
    ``skipped_steps_mean``, ``oom_events_total``, ``fallbacks_total``. Times in seconds, the metric in [0, 1].

    ``time_ratio`` is the row's mean time over the ``reference`` row's; ``time_to_target_ratio`` its mean time to
    target over the reference's, only where both rows reached the target on every seed (means over different
    subsets of seeds would not compare). A ratio is None without a reference, or where the reference's mean is not
    a positive finite number. Rows may run different seeds (issue 7's 5 seeds where the spread is wide, fp32's one):
    means, ranks and ratios are then over each row's own seeds; give only finished rows (as the CLI's partial file
    does) where a row still running would be ranked on the seeds it has so far.

    Raises:
        ValueError: ``reference`` is not a row, or a controller has two results for one seed.
    """
    by_controller: dict[str, list[RunResult]] = {}
    for result in results:
        runs = by_controller.setdefault(result.controller, [])
        if any(run.seed == result.seed for run in runs):  # a result kept twice (merged files) would count double
            raise ValueError(f"controller {result.controller!r} has two results for seed {result.seed}")
        runs.append(result)
    rows: list[dict[str, Any]] = []
    for name, runs in by_controller.items():
        # A time that is no finite number (NaN from a broken run) is a miss: it once counted as reached, and
        # sorting the rows' means with a NaN among them scrambled every rank.
        to_target = [_finite_or_none(r.time_to_target_s) for r in runs]
        reached = [t for t in to_target if t is not None]
        finals = [r.final_metric for r in runs]
        times = [r.time_s for r in runs]
        rows.append(
            {
                "controller": name,
                "seeds": [r.seed for r in runs],
                "final_metric_mean": statistics.fmean(finals),
                "final_metric_std": _std(finals),
                "time_s_mean": statistics.fmean(times),
                "time_s_std": _std(times),
                "time_to_target_s_mean": statistics.fmean(reached) if reached else None,
                "reach_rate": len(reached) / len(runs),
                "peak_bytes_mean": statistics.fmean(r.peak_bytes for r in runs),
                "nvml_bytes_mean": (
                    statistics.fmean(r.nvml_bytes for r in runs if r.nvml_bytes is not None)
                    if all(r.nvml_bytes is not None for r in runs)
                    else None
                ),
                "precision_changes_mean": statistics.fmean(r.precision_changes for r in runs),
                "batch_changes_mean": statistics.fmean(r.batch_changes for r in runs),
                "lr_changes_mean": statistics.fmean(r.lr_changes for r in runs),
                "overhead_frac_mean": statistics.fmean(r.overhead_frac for r in runs),
                "overhead_parts_mean": {
                    part: statistics.fmean(r.overhead_parts.get(part, 0.0) for r in runs)
                    for part in dict.fromkeys(part for r in runs for part in r.overhead_parts)  # every run's parts
                },
                "wall_s_mean": statistics.fmean(r.wall_s for r in runs),
                "final_metric_ci95": _ci95(finals),
                "time_s_ci95": _ci95(times),
                "time_to_target_s_ci95": _ci95(reached),
                "time_to_target_s": to_target,
                "mean_step_ms": statistics.fmean(r.mean_step_ms for r in runs),
                "skipped_steps_mean": statistics.fmean(r.skipped_steps for r in runs),
                "oom_events_total": sum(r.oom_events for r in runs),
                "fallbacks_total": sum(r.fallbacks for r in runs),
            }
        )
    # Ranked on the times as the table prints them (3 significant digits): times it prints alike share a rank (one
    # seed's 0.020010 s and 0.020003 s were ranked 4 and 2 beside a column of 0.02).
    shown = [float(f"{row['time_to_target_s_mean']:.3g}") if row["reach_rate"] == 1.0 else None for row in rows]
    always = sorted(seconds for seconds in shown if seconds is not None)
    for row, seconds in zip(rows, shown, strict=True):
        row["rank"] = 1 + always.index(seconds) if seconds is not None else None
    ref: dict[str, Any] | None = None
    if reference is not None:
        ref = next((row for row in rows if row["controller"] == reference), None)
        if ref is None:
            raise ValueError(f"reference {reference!r} is not among {[row['controller'] for row in rows]}")
    for row in rows:
        row["time_ratio"] = row["time_to_target_ratio"] = None
        if ref is None:
            continue
        row["time_ratio"] = _ratio(row["time_s_mean"], ref["time_s_mean"])
        if row["reach_rate"] == 1.0 and ref["reach_rate"] == 1.0:
            row["time_to_target_ratio"] = _ratio(row["time_to_target_s_mean"], ref["time_to_target_s_mean"])
    return rows


def format_table(rows: Sequence[dict[str, Any]], time_label: str = "time (s)", reference: str | None = None) -> str:
    r"""A Markdown table of ``summarize`` rows, one line per row, every line of the header's eleven cells.

    ``final acc`` and the time are ``mean ± sample std`` over the seeds (``± —``: one seed, no spread measured), and
    ``time 95% CI`` is the bootstrap interval of the time's mean (``—``: one seed); ``to target`` is the mean over
    the seeds that reached it (``reached`` says how many; ``—``: none did); ``rank`` is among the rows that reached
    the target on every seed (``—``: not ranked); ``peak memory`` is ``—`` where it was not measured (0 bytes: a
    plain loop on a CPU). The last cell is the row's ``time_ratio`` and ``time_to_target_ratio`` against the
    ``reference`` row that ``summarize`` was given (named in the header; ``—`` where a ratio is None). A ``|`` in a
    controller's name is escaped (``\|``), so it cannot add a cell.
    """
    versus = "vs " + ("reference" if reference is None else reference.replace("|", "\\|")) + " (time / to target)"
    header = (
        f"| controller | final acc | {time_label} | time 95% CI | to target (s) | reached | rank | peak memory | "
        f"changes prec/batch/LR | overhead | {versus} |"
    )
    lines = [header, "|" + "---|" * 11]

    def ratio(value: float | None) -> str:
        return "—" if value is None else f"{value:.2f}"

    for row in rows:
        to_target = "—" if row["time_to_target_s_mean"] is None else f"{row['time_to_target_s_mean']:.3g}"
        nvml = "" if row.get("nvml_bytes_mean") is None else f" (NVML {_bytes(row['nvml_bytes_mean'])})"
        peak = _bytes(row["peak_bytes_mean"]) if row["peak_bytes_mean"] > 0 else "—"  # 0: not measured (a CPU)
        final_std = "—" if row["final_metric_std"] is None else f"{100 * row['final_metric_std']:.2f}"
        time_std = "—" if row["time_s_std"] is None else f"{row['time_s_std']:.2g}"
        ci = row["time_s_ci95"]
        time_ci = "—" if ci is None else f"{ci[0]:.3g}–{ci[1]:.3g}"
        controller = str(row["controller"]).replace("|", "\\|")
        lines.append(
            f"| {controller} | {100 * row['final_metric_mean']:.2f} ± {final_std} "
            f"| {row['time_s_mean']:.3g} ± {time_std} | {time_ci} | {to_target} | {100 * row['reach_rate']:.0f}% "
            f"| {'—' if row.get('rank') is None else row['rank']} "
            f"| {peak}{nvml} | {row['precision_changes_mean']:.1f} / "
            f"{row['batch_changes_mean']:.1f} / {row['lr_changes_mean']:.1f} | {100 * row['overhead_frac_mean']:.2f}% "
            f"| {ratio(row['time_ratio'])} / {ratio(row['time_to_target_ratio'])} |"
        )
    return "\n".join(lines)


def write_json(
    results: Sequence[RunResult], rows: Sequence[dict[str, Any]], path: str | os.PathLike[str], **meta: Any
) -> None:
    """Writes the runs and the summary rows as strict JSON, with ``meta`` (task, device, date, command...).

    The file holds ``{"meta": {"date": "YYYY-MM-DD", **meta}, "rows": [...], "runs": [...]}``: ``rows`` as
    :func:`summarize` returns them (its docstring lists the keys), ``runs`` one object per :class:`RunResult` with
    its fields as keys. Tuples are written as lists, NumPy numbers as plain ones, and a number that is not finite
    (NaN, ±inf) as ``null``: Python's ``NaN`` and ``Infinity`` are not JSON, and strict parsers refuse them. The
    file is written beside ``path`` and moved over it (:func:`triaccel_rl.experiment.write_text_atomic`, through a
    symlink to its file), so a reader never sees half of one (the CLI rewrites its partial results after every run).

    Raises:
        TypeError: a value JSON cannot hold (in ``meta``, say), named by ``json``.
        ValueError: ``path`` is an existing file that is not a regular one (a device such as ``/dev/null``, a FIFO),
            which the move would replace.
    """
    payload = {
        "meta": {"date": time.strftime("%Y-%m-%d"), **meta},
        "rows": list(rows),
        "runs": [asdict(r) for r in results],
    }
    write_text_atomic(path, json.dumps(json_safe(payload), indent=2, allow_nan=False) + "\n")


def json_safe(value: Any) -> Any:
    """``value`` made fit for strict JSON: non-finite floats as None, tuples as lists, NumPy numbers as Python's.

    ``json.dumps(json_safe(x), allow_nan=False)`` then writes what every parser reads (``json.dumps`` alone writes
    ``NaN`` and ``Infinity``, which strict parsers refuse, and fails on NumPy integers and arrays).

    Example:
        >>> json_safe({"ci": (0.5, float("nan")), "n": np.int64(3), "map": np.array([0.0, np.inf])})
        {'ci': [0.5, None], 'n': 3, 'map': [0.0, None]}
    """
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def check_epoch_budget(epochs: float, samples_per_epoch: int) -> None:
    """Raises ``ValueError`` when ``epochs`` of the task come to less than one training sample."""
    if samples_per_epoch < 1:  # otherwise a ZeroDivisionError in the message below
        raise ValueError(
            f"the task has {samples_per_epoch} training samples (those the probe batch leaves): give it more data"
        )
    if int(epochs * samples_per_epoch) < 1:
        raise ValueError(
            f"epochs={epochs} is less than one sample of this task's {samples_per_epoch} training samples: "
            f"give at least {_least_epochs(samples_per_epoch)}"
        )


def _least_epochs(samples_per_epoch: int) -> str:
    """The least epochs of two significant figures that come to one sample, as ``check_epoch_budget`` counts.

    Rounded up, not to the nearest: 1/11488 printed as 8.7e-05, which comes to 0.9995 samples and was refused again.
    """
    least = 1 / samples_per_epoch
    unit = 10.0 ** (math.floor(math.log10(least)) - 1)
    figures = math.ceil(least / unit)
    while int(float(f"{figures * unit:.2g}") * samples_per_epoch) < 1:  # the printed value must itself be taken
        figures += 1
    return f"{figures * unit:.2g}"


def _check_run_settings(
    epochs: float,
    eval_every: int,
    eval_every_steps: int | None,
    max_grad_norm: float | None,
    max_time_s: float | None = None,
) -> None:
    """Raises ``ValueError`` naming the first setting a run cannot use."""
    if not (is_real(epochs) and epochs > 0 and math.isfinite(epochs)):  # NaN included; "1" raised a bare TypeError
        raise ValueError(f"epochs={epochs!r} must be a positive finite number")
    check_time_cap(max_time_s)
    # A float spacing failed deep in the first interval (eval_every_steps=2.5), or evaluated at the decisions that
    # happened to be its multiples (eval_every=1.5: every third); True counted as 1.
    if not is_whole(eval_every) or eval_every < 1:
        raise ValueError(f"eval_every={eval_every!r} must be >= 1, a whole number of decisions")
    if eval_every_steps is not None and (not is_whole(eval_every_steps) or eval_every_steps < 1):
        raise ValueError(
            f"eval_every_steps={eval_every_steps!r} must be >= 1, a whole number of steps (or None: every eval_every "
            "decisions)"
        )
    check_max_grad_norm(max_grad_norm)


def row_names(controllers: Sequence[str | os.PathLike[str]], config: ControllerConfig | None = None) -> list[str]:
    """The row each controller's runs are reported under, in order.

    ``fp32`` is ``static-fp32``, a zip ``learned:<file name>`` (the shipped one ``pretrained``), a plain loop its
    own name.

    Raises:
        ValueError: an unknown controller, as :func:`compare` would, or one name given as a str, not in a list.
    """
    return _row_names(_controller_list(controllers), config)


def _row_names(controllers: list[str], config: ControllerConfig | None) -> list[str]:
    """:func:`row_names` of controllers already read as str."""
    config = config or ControllerConfig()
    names = []
    for controller in controllers:
        if _is_plain_row(controller):
            _check_plain_row(controller)
            names.append(controller)
        else:
            names.append(str(getattr(_policy(controller, config), "name", controller)))
    return names


def _is_plain_row(controller: str) -> bool:
    """Whether ``controller`` names a plain loop's row (``plain-fp32``...): a ``plain-`` name that is not a policy zip.

    A zip named ``plain-policy.zip`` was taken for a plain row and refused as an unknown one.
    """
    return controller.startswith("plain-") and not controller.lower().endswith(".zip")  # a zip as make_policy reads it


def _controller_list(controllers: Sequence[str | os.PathLike[str]]) -> list[str]:
    """``controllers`` as a list of str, a path (to a policy zip) as its str; raises a ValueError naming the argument.

    A str was read as its letters (``"fp32"``: "unknown policy 'f'"), and a ``Path`` failed in a bare AttributeError
    (``'PosixPath' object has no attribute 'startswith'``), though ``Controller(policy=...)`` takes one.
    """
    if isinstance(controllers, str):
        raise ValueError(f"controllers={controllers!r}: give a list, e.g. [{controllers!r}]")
    # A generator passed every check (the first read it up, unknown names unseen) and failed in len() at the runs
    if isinstance(controllers, Iterator) or not isinstance(controllers, Iterable):
        raise ValueError(f"controllers={controllers!r}: give a list such as ['fp32', 'heuristic']")
    names = []
    for controller in controllers:
        name = os.fspath(controller) if isinstance(controller, os.PathLike) else controller
        if not isinstance(name, str):  # a bytes path too: make_policy reads a str
            raise ValueError(
                f"controllers={controllers!r}: entry {controller!r} ({type(controller).__name__}) is no policy name or "
                "path; give each as a str or an os.PathLike of one (a policy zip), e.g. ['fp32', 'heuristic']"
            )
        names.append(name)
    return names


def _seed_list(seeds: Iterable[int]) -> list[int]:
    """``seeds`` as a list of Python ints (from a list, tuple, array or tensor); raises a ValueError naming it.

    A count of seeds failed in a TypeError, and so did a generator, read up by the checks. An array's entries are
    numpy scalars and a tensor's 0-d tensors: each is read as a Python number, so that an integer one is taken and a
    bool or float one refused (a tensor's integer was refused, and ``if not seeds`` said ``np.array([0])`` held no
    seed, or raised numpy's or torch's "ambiguous" error on two).
    """
    # An iterator (a generator) too: the checks before the runs read it, and left the runs none (a TypeError on len())
    if (
        isinstance(seeds, (str, Iterator))
        or not isinstance(seeds, Iterable)
        or (isinstance(seeds, (np.ndarray, torch.Tensor)) and seeds.ndim == 0)  # iterating one raises a TypeError
    ):
        raise ValueError(f"seeds={seeds!r}: give a list such as [0, 1]")
    values = [
        seed.item() if isinstance(seed, (np.generic, np.ndarray, torch.Tensor)) and seed.ndim == 0 else seed
        for seed in seeds
    ]
    # Each checked before any run trains: -1 was refused after the rows before it had run
    return [check_seed(f"seeds {values}", seed) for seed in values]


def _check_plain_row(controller: str) -> None:
    """Raises a ValueError naming ``controller``, a ``plain-`` row, unless it names a plain loop's precision."""
    from triaccel_rl.plain import PLAIN_PRECISIONS  # plain.py imports this module

    if controller.removeprefix("plain-") not in PLAIN_PRECISIONS:
        allowed = ", ".join(f"plain-{p}" for p in PLAIN_PRECISIONS)
        raise ValueError(f"unknown plain-loop row {controller!r}; allowed: {allowed}")


def _policy(controller: str | Policy, config: ControllerConfig) -> Any:
    import gymnasium as gym

    from triaccel_rl.observation import ObservationLayout

    size = ObservationLayout(config.n_groups).size
    return make_policy(
        controller, config, gym.spaces.Box(-OBS_HIGH, OBS_HIGH, (size,), np.float32), action_space(config)
    )


def _log_curve(log_dir: str | os.PathLike[str] | None, result: RunResult) -> None:
    """Writes a finished run's evaluation points to TensorBoard (a plain loop's, which has no writer of its own).

    The tags are two of those ``run_controller`` writes live: the test metric against time in microseconds (the one
    to read across rows) and the peak memory, at the last step (a static loop has no batch, LR or precision moves to
    log). A peak of 0 was not measured (a plain loop on a CPU has no allocator to read): no point, as the table's dash.
    """
    writer = _writer(log_dir)
    if writer is None:
        return
    for time_s, metric, *_ in result.curve:
        writer.add_scalar("test/metric_vs_time_us", metric, _time_step_us(time_s))
    if result.peak_bytes > 0:  # a 0.0 point drew a measured zero
        writer.add_scalar("memory/peak_bytes", result.peak_bytes, result.steps)
    writer.close()


def _log_precision_map_image(writer: Any, result: RunResult) -> None:
    """Adds ``result``'s precision map heat map (``plot_comparison``'s) to TensorBoard's images at its last step.

    Only where matplotlib is installed (the ``plots`` extra); without it, the per-layer scalars hold the same series.
    Drawn once a run, after training, on the host, charged nowhere: 1 s for 82 layers over 200 decisions on 2 CPU cores.
    """
    if not result.trace or importlib.util.find_spec("matplotlib") is None:
        return
    from triaccel_rl.plots import precision_map_image  # it imports this module

    try:
        image = precision_map_image(result)
    except Exception as err:  # a picture of what the scalars hold already: never worth the run's result
        _log.warning("the precision map's image for TensorBoard was not drawn (%s: %s)", type(err).__name__, err)
        return
    writer.add_image("precision/map", image, result.steps, dataformats="HWC")


def _time_step_us(time_s: float) -> int:
    """A time as TensorBoard's integer step, in microseconds.

    Whole milliseconds (the tag ``test/metric_vs_time_ms`` before) put several evaluations of a modelled run, whose
    steps cost fractions of a millisecond, on one step: the curve's time axis collapsed.
    """
    return round(time_s * 1e6)


def _writer(log_dir: str | os.PathLike[str] | None) -> Any:
    if log_dir is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(log_dir))


def _std(values: list[float]) -> float | None:
    """The sample standard deviation (``ddof=1``); None for one value, which has no spread to measure.

    NaN where a value is not finite (``statistics.stdev`` raised an ``AttributeError`` on a NaN).
    """
    if len(values) < 2:
        return None
    return statistics.stdev(values) if all(math.isfinite(v) for v in values) else math.nan


def _ci95(values: list[float]) -> tuple[float, float] | None:
    """:func:`bootstrap_ci` at 95%; None for fewer than two values or a non-finite one (no interval to give)."""
    if len(values) < 2 or not all(math.isfinite(v) for v in values):
        return None
    return bootstrap_ci(values)


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _ratio(value: float | None, reference: float | None) -> float | None:
    """``value / reference``; None where either is missing or not finite, or the reference is not positive."""
    if value is None or reference is None or not (math.isfinite(value) and math.isfinite(reference) and reference > 0):
        return None  # a row's NaN or inf time printed "nan / 1.00": a missing number reads "—" everywhere else
    return value / reference


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(name).name)


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"

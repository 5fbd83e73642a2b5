"""``TrainingRun``: a task's model, optimizer and data with settable knobs; ``step()`` returns ``StepStats``."""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from triaccel_rl.config import CostMode, ElasticConfig, HardwareProfile, LRRule, MemoryBudget
from triaccel_rl.costs import CostModel, optimizer_state_tensors
from triaccel_rl.elastic import (
    BatchLRCoupler,
    Fault,
    FaultPoint,
    OOMEvent,
    UnrecoverableOOMError,
    is_out_of_memory,
    plan_micro_batches,
    release_memory,
    resolve_lr_rule,
)
from triaccel_rl.engine import GradStats, StepEngine
from triaccel_rl.errors import is_real, is_whole
from triaccel_rl.graphs import StepGraphs, graph_unsupported
from triaccel_rl.loader import Batch, ElasticLoader
from triaccel_rl.memory import (
    MemoryModel,
    allocated_bytes,
    check_budget,
    device_capacity_bytes,
    peak_allocated_bytes,
    read_device_memory,
)
from triaccel_rl.signals.config import SignalConfig
from triaccel_rl.signals.device import DeviceMoments, IntervalMoments
from triaccel_rl.signals.estimators import frozen_batch_stats
from triaccel_rl.tasks import Task, check_seed, get_task
from triaccel_rl.types import LayerInfo, Precision, StepStats

__all__ = [
    "IntervalStats",
    "IntervalTimer",
    "TrainingRun",
    "check_time_cap",
    "evaluate_accuracy",
    "probe_count",
    "resolve_device",
    "schedule_gain",
    "seed_run_generators",
]

_log = logging.getLogger("triaccel_rl")
_NOISE_EMA_DECAY = 0.9  # smoothing of the run's own gradient-noise estimate (for the AdaScale rule)
# The least micro-batch an out-of-memory retry splits into: a batch norm in training mode needs two samples a channel.
_LEAST_MICRO_BATCH = 2


def probe_count(n_train: int, n_probe: int = 512) -> int:
    """The samples a run holds out from the end of ``n_train`` training samples for its probe loss.

    ``n_probe``, but at most an eighth of the data and at least two samples (a batch norm's probe in training mode
    needs two), one where the data has only 2; the run trains on the rest, at least one sample (so ``n_train`` is at
    least 2).

    Example:
        >>> probe_count(60_000), probe_count(4096), probe_count(1024), probe_count(12), probe_count(2)
        (512, 512, 128, 2, 1)

    Raises:
        ValueError: ``n_train`` is not a whole number >= 2, or ``n_probe`` not one >= 2 (the probe runs the model in
            training mode, where a batch norm needs two samples; ``n_probe=1`` was taken and the probe then raised).
    """
    # n_train=1 held out its only sample (and 0 one it did not have), n_probe=-5 was taken as 1 and 2.5 returned.
    if not is_whole(n_train) or n_train < 2:
        raise ValueError(
            f"n_train={n_train!r} must be a whole number >= 2: the probe holds out at least one sample and the run "
            "trains on the rest"
        )
    if not is_whole(n_probe) or n_probe < 2:  # 1 was taken, and a batch norm's probe then refused its one sample
        raise ValueError(
            f"n_probe={n_probe!r} must be a whole number >= 2 (held-out samples for the probe loss; a batch norm in "
            "training mode needs two)"
        )
    # Two where the data allows (an eighth of under 16 samples is one, which a batch norm's probe refused), one at 2
    return max(min(2, int(n_train) - 1), min(int(n_probe), int(n_train) // 8))


def check_time_cap(max_time_s: float | None) -> None:
    """Refuses a run's ``max_time_s`` unless None (no cap) or a number > 0 (``"5"`` raised a bare TypeError)."""
    if max_time_s is not None and not (is_real(max_time_s) and max_time_s > 0):  # NaN fails the comparison too
        raise ValueError(f"max_time_s={max_time_s!r} must be a positive number of seconds (or None for no cap)")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Returns ``device``, or CUDA when available and CPU otherwise.

    Raises:
        TypeError: ``device`` is neither a string, a ``torch.device`` nor None (a ``Path("cpu")`` raised torch's
            "invalid combination of arguments").
        ValueError: a device string torch does not know, a device type other than CPU and CUDA (the controller
            supports those), or a CUDA device asked for on a machine without one, or an index it does not have.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, str | torch.device):
        kind = type(device).__name__
        raise TypeError(
            f"device={device!r} ({kind}) is not a device: use a string (cpu, cuda or cuda:N), a torch.device or None"
        )
    try:
        resolved = torch.device(device)
    except RuntimeError:  # torch's message lists its internal device types (ipu, privateuseone, ...): noise here
        raise ValueError(f"device={str(device)!r} is not a device: use cpu, cuda or cuda:N") from None
    if resolved.type not in ("cpu", "cuda"):  # meta, mps, xpu: failed deep in a run, after its folders were made
        raise ValueError(f"device={str(device)!r} is not supported: use cpu, cuda or cuda:N")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} asked for, but this machine has no CUDA GPU; use 'cpu'")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        # cuda:3 on a one-GPU machine passed here and failed at the run's first .to(device), with torch's "invalid
        # device ordinal", after compare had started its rows.
        count = torch.cuda.device_count()
        there = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
        raise ValueError(f"device={str(device)!r} asked for, but this machine's CUDA GPUs are {there}")
    return resolved


@dataclass(frozen=True)
class IntervalStats:
    """What ``TrainingRun.train_interval`` reports for its steps.

    Attributes:
        steps: optimizer steps taken.
        samples: training samples consumed.
        train_ms: time of the steps, measured over the whole interval (CUDA events on a GPU).
        charged_ms: the time charged for them: ``train_ms``, or the modelled time in ``profile`` cost mode.
        peak_bytes: the largest per-step peak memory (as ``StepStats.memory_bytes``), from the interval's last step
            that recovered from an out-of-memory error on (the steps before it ran under the budget it lowered).
        skipped: steps whose loss or gradient was non-finite (their updates were skipped).
        oom_events: out-of-memory errors recovered from.
        moments: the steps' mean loss and per-layer squared gradient norms.
    """

    steps: int
    samples: int
    train_ms: float
    charged_ms: float
    peak_bytes: int
    skipped: int
    oom_events: int
    moments: IntervalMoments


class IntervalTimer:
    """Times a span of GPU or CPU work: CUDA events on a GPU, ``perf_counter`` on a CPU.

    ``stop()`` synchronises with the GPU (one host-device sync per span, not per step).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._start_event: torch.cuda.Event | None = None
        self._start_time: float | None = None

    def start(self) -> None:
        """Marks the start of the span."""
        if self.device.type == "cuda":
            self._start_event = torch.cuda.Event(enable_timing=True)
            self._start_event.record(torch.cuda.current_stream(self.device))  # not the current device's
        else:
            self._start_time = time.perf_counter()

    def stop(self) -> float:
        """Returns the milliseconds since ``start()``."""
        if self.device.type == "cuda":
            assert self._start_event is not None, "IntervalTimer.stop() before start()"
            end = torch.cuda.Event(enable_timing=True)
            end.record(torch.cuda.current_stream(self.device))
            end.synchronize()  # host-device sync: once per interval
            return float(self._start_event.elapsed_time(end))
        assert self._start_time is not None, "IntervalTimer.stop() before start()"  # it read the time since boot
        return (time.perf_counter() - self._start_time) * 1e3


class TrainingRun:
    """A task's model, optimizer and data, stepped one optimizer step at a time with settable knobs.

    Knobs: per-layer precision (``set_precisions``), a global LR multiplier (``lr_scale``), per-layer LR
    factors (``lr_factors``) and the effective batch size (``batch_size``). The LR of layer ``l`` at a step
    is ``base_lr * lr_scale * lr_factors[l] * batch_lr_gain``, where ``batch_lr_gain`` follows the effective
    batch by ``elastic.lr_rule`` (relative to the task's base batch; linear for SGD and square root for
    AdamW by default), warmed up after large rises (``ElasticConfig``).

    **Memory elasticity.** Each step runs its effective batch as micro-batches whose gradients accumulate
    before one update, each as large as the memory model predicts to fit ``elastic.fill_frac`` of the
    budget (one micro-batch when the batch fits). The loss of micro-batch ``i`` is weighted by ``n_i / N``,
    so the accumulated gradient is the full batch's mean-loss gradient: equal to the unsplit step up to
    floating-point rounding, except with batch norm, whose statistics are per micro-batch. The task's
    augmentation is drawn once a step, for the whole batch, so however the batch is split, and however often it is
    retried after running out of memory, it trains on the same augmented samples.

    An out-of-memory error in a forward or backward pass is caught: gradients are zeroed, the buffers the failed
    attempt's forward passes updated (batch-norm statistics) and the run's generators (dropout's masks) put back,
    memory released, the budget lowered as ``ElasticConfig.oom_budget_factor`` describes (that factor × the predicted
    memory of the failed attempt's micro-batch size ``m``, but keeping room in ``fill_frac`` of it for ``m // 2`` and
    below the least budget that plans ``m`` again; on a GPU at most what this process holds plus what is free; never
    below the least budget that plans two samples, nor raised), and the same samples are retried with the micro-batch
    halved, but not below two samples (a batch norm in training mode needs two a channel: a micro-batch of two, or of
    one where the batch or ``micro_batch_cap`` is one, is retried as it is). At the error after
    ``elastic.max_oom_retries`` retries (the step's ``max_oom_retries + 1``-th) it raises ``UnrecoverableOOMError``
    and hands its batch back, as a step interrupted during the recovery does. The loader is not touched, so no sample
    is lost or served twice, and the one update comes after the last micro-batch. Events are counted in
    ``StepStats.oom_events``, kept in ``oom_log`` and logged. An error in the update itself is not retried (a partial
    update cannot be undone): one raised before the optimizer's own step begins hands the batch back; one raised
    part-way through it (out of memory where AdamW allocates its denominators) may leave the parameters and optimizer
    state partly updated, so the step counts and its batch is spent (served again, it would go into them twice), and
    the error (``UnrecoverableOOMError`` for an OOM) says to resume from the last checkpoint.

    **Memory model.** ``memory_model`` predicts a step's peak from the micro-batch size and the precision
    map. On a GPU in ``measured`` cost mode it is fitted to the allocator's peaks: two forward/backward
    trials at construction (no update, no sample consumed), then every step's peak. Elsewhere it is the
    cost model's accounting. The executor refuses batch growth it predicts over budget.

    Args:
        task: a ``Task`` or its registered name.
        seed: seeds the model's initialisation and the data order, a whole number in [0, 2**63 - 20001]. The
            process's torch RNGs the run draws from are seeded with it: the CPU's default generator and, on a GPU,
            the run's own device's (no other device's), and the run's later draws (augmentation, dropout) come from
            them: build runs one after another, or give each its process. A constructor that raises after the
            seeding (a ``batch_size`` above the training set) puts the caller's states of those generators back.
        device: ``"cpu"``, ``"cuda"``, or ``None`` for CUDA when available.
        batch_size: starting effective batch size; the task's ``base_batch_size`` by default.
        memory: the memory budget (accounting on CPU, the allocator on GPU).
        cost_mode: ``measured`` time and memory, or ``profile`` (charged from ``profile``).
        profile: the hardware profile for ``cost_mode="profile"``; the shipped one by default.
        n_probe: held-out training samples for the fixed probe loss, at least 2 (``probe_count``).
        include_fixed_cost: add the profile's fixed per-step time to the modelled step time.
        elastic: LR coupling, micro-batch planning and OOM recovery settings.
        fault: a hook called before each micro-batch's forward and backward pass (tests inject errors here).
        channels_last: keep the model and 4-D inputs in channels-last memory format (faster convolutions
            in 16 bits on NVIDIA GPUs).
        schedule_epochs: with a value, the LR follows a schedule over that many epochs: a linear warm-up
            over the first ``warmup_frac`` of them, then a linear decay to zero. ``None``: constant.
        warmup_frac: share of ``schedule_epochs`` spent warming up, in [0, 1).
        cuda_graphs: replay each step's forward, loss and backward from a captured CUDA graph
            (``StepGraphs``) when the step is one micro-batch: one launch instead of hundreds, for
            host-bound models. ``None``: on a CUDA device whenever the model allows it and no ``fault``
            hook is set. Steps split into micro-batches run eagerly, and so does every step while a ``fault``
            hook is set on the run later. A step whose update fails after its graph replayed (a step pre-hook
            raising, an out-of-memory error in the update) returns its batch with the batch-norm statistics the
            replay updated: a replay saves no copy of them, which would cost a copy a step.

    Raises:
        ConfigError: the budget cannot hold one sample (the message says how much one sample needs).
        ValueError: ``cuda_graphs=True`` where graphs cannot run (not CUDA, a ``fault`` hook, or a model
            ``graph_unsupported`` names).

    Example:
        >>> run = TrainingRun("synthetic", seed=0, device="cpu")
        >>> stats = run.step()
        >>> stats.batch_size
        64
    """

    def __init__(
        self,
        task: Task | str,
        *,
        seed: int = 0,
        device: str | torch.device | None = None,
        batch_size: int | None = None,
        memory: MemoryBudget | None = None,
        cost_mode: CostMode | str = CostMode.MEASURED,
        profile: HardwareProfile | str | os.PathLike[str] | None = None,
        n_probe: int = 512,
        include_fixed_cost: bool = True,
        elastic: ElasticConfig | None = None,
        fault: Fault | None = None,
        channels_last: bool = False,
        schedule_epochs: float | None = None,
        warmup_frac: float = 0.15,
        cuda_graphs: bool | None = None,
    ) -> None:
        if not isinstance(task, (Task, str)):  # 5 failed at build_model, after the process's RNG had been seeded
            raise TypeError(f"task={task!r} must be a Task or a registered task name, e.g. 'synthetic'")
        self.task = get_task(task) if isinstance(task, str) else task
        self.seed = check_seed("TrainingRun", seed)  # before the seeding, whose overflow named no argument
        self.device = resolve_device(device)
        self.cost_mode = CostMode.parse(cost_mode)
        self.profile = HardwareProfile.resolve(profile)
        self.include_fixed_cost = bool(include_fixed_cost)
        # Checked before the model is built, as the Controller checks them: an int budget or a dict of settings failed
        # later with an AttributeError, n_probe=2.5 as a slice's TypeError, and n_probe=-5 was taken as 1.
        if memory is not None and not isinstance(memory, MemoryBudget):
            raise TypeError(f"memory={memory!r} must be a MemoryBudget, e.g. MemoryBudget(fraction=0.9)")
        if elastic is not None and not isinstance(elastic, ElasticConfig):
            raise TypeError(f"elastic={elastic!r} must be an ElasticConfig, e.g. ElasticConfig(fill_frac=0.9)")
        if cuda_graphs is not None and not isinstance(cuda_graphs, (bool, np.bool_)):  # "no" turned graphs on
            raise TypeError(f"cuda_graphs={cuda_graphs!r} must be True, False or None (where the model allows)")
        for name, flag in (("channels_last", channels_last), ("include_fixed_cost", include_fixed_cost)):
            if not isinstance(flag, (bool, np.bool_)):  # "no" was taken as True
                raise TypeError(f"{name}={flag!r} must be True or False")
        if fault is not None and not callable(fault):  # 3 failed at the first step: "'int' object is not callable"
            raise TypeError(f"fault={fault!r} must be a callable taking a FaultPoint (or None)")
        if schedule_epochs is not None and not is_real(schedule_epochs):  # True was a 1-epoch schedule
            raise ValueError(f"schedule_epochs={schedule_epochs!r} must be a positive finite number (or None)")
        if not is_real(warmup_frac):
            raise ValueError(f"warmup_frac={warmup_frac!r} must be a number in [0, 1)")
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1
        ):  # as the setter refuses it, but before the RNGs are seeded and the model built
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
        probe_count(2, n_probe)  # n_probe checked alone here (a whole number >= 2), the data's size once it is loaded
        self.elastic = elastic or ElasticConfig()
        self.fault = fault
        if schedule_epochs is not None and not (math.isfinite(schedule_epochs) and schedule_epochs > 0):
            # inf passed "> 0" and held the LR at the warm-up's 2% for good
            raise ValueError(
                f"schedule_epochs={schedule_epochs} must be a positive finite number (or None for a constant LR)"
            )
        if not 0.0 <= warmup_frac < 1.0:
            raise ValueError(f"warmup_frac={warmup_frac} must be in [0, 1)")
        self.schedule_epochs = schedule_epochs
        self.warmup_frac = warmup_frac
        self.channels_last = bool(channels_last)
        # The process's torch RNGs are seeded here (the model's initial weights) and the run's draws (augmentation,
        # dropout) come from them after: a second run built between two steps of this one changes its draws. Only the
        # generators the run draws from: torch.manual_seed also seeded every CUDA device's (queued for CUDA's start
        # where it had not started), which a CPU run, or the environment's reset that forks only the run's device,
        # left seeded behind its caller. The CPU's is seeded as torch.manual_seed seeded it: the same runs.
        # The caller's states, put back if the construction raises: a batch_size above the training set (known only
        # once the data is loaded) was refused after the seeding, and left the caller's generators seeded.
        caller_states = _run_generator_states(self.device)
        seed_run_generators(self.seed, self.device)
        try:
            self.model: nn.Module = self.task.build_model().to(self.device)
            if channels_last:
                self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
            layers = StepEngine.discover(self.model)
            optimizer = self.task.make_optimizer([{"params": params, "layer": i} for i, params in enumerate(layers)])
            self.engine = StepEngine(self.model, optimizer, self.device)
            self.optimizer = self.engine.optimizer
            self.precision = self.engine.precision
            self.layers: list[LayerInfo] = self.engine.layers

            data = self.task.data(seed)
            if len(data.train_x) < 2:  # the loader's "empty dataset" error named neither the task nor the size
                raise ValueError(
                    f"task {self.task.name!r} has {len(data.train_x)} training sample(s): a run holds one out for its "
                    "probe loss and trains on the rest, so it needs n_train >= 2"
                )
            n_probe = probe_count(len(data.train_x), n_probe)
            self._probe_x = data.train_x[-n_probe:].to(self.device)
            self._uncapturable_probes: set[tuple[object, ...]] = set()  # precision configurations whose capture failed
            if channels_last and self._probe_x.dim() == 4:
                self._probe_x = self._probe_x.contiguous(memory_format=torch.channels_last)
            self._probe_y = data.train_y[-n_probe:].to(self.device)
            self.loader = ElasticLoader(
                data.train_x[:-n_probe].to(self.device), data.train_y[:-n_probe].to(self.device), seed=seed
            )
            self._test_x = data.test_x.to(self.device)
            self._test_y = data.test_y.to(self.device)

            reason = graph_unsupported(self.model, self.device) or ("a fault hook is set" if fault is not None else "")
            if cuda_graphs and reason:
                raise ValueError(f"cuda_graphs=True, but this run cannot capture its steps: {reason}")
            use_graphs = cuda_graphs if cuda_graphs is not None else not reason
            self.graphs: StepGraphs | None = StepGraphs(self.model, self.device) if use_graphs else None
            """Captured training steps, or ``None`` when every step runs eagerly."""
            self._graphed = False  # whether the last step replayed a graph
            self._closed = False

            self.n_layers = len(self.layers)
            self.steps = 0
            self.skipped_steps = 0
            self._observe_budget_frac = SignalConfig().observe_budget_frac if self.measures_memory else None
            self.oom_events = 0
            self.oom_log: list[OOMEvent] = []
            self.train_time_ms = 0.0
            self.modelled_time_ms = 0.0
            self.memory_elastic = True
            """Plan micro-batches against the budget and recover from OOM (a fixed-batch baseline turns it off)."""
            self._micro_batch_cap: int | None = None
            self.last_batch: Batch | None = None
            self.last_micro_batches: list[int] = []
            self._moments: DeviceMoments | None = None  # train_interval's device-side accumulator
            self._noise = np.zeros(3)  # EMA weight, EMA of B * |g_B|^2, EMA of B (for noise_scale)
            self._samples_started = 0  # samples whose forward pass began in the current attempt
            self._saved_buffers: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # the step's buffers before it
            self._buffer_copies: list[tuple[torch.Tensor, torch.Tensor]] = []  # (buffer, its copy), reused step to step
            self._buffer_slots: list[tuple[nn.Module, str]] = []  # (module, name) of each saved buffer, in order
            self._saved_generators: list[torch.Tensor] = []  # the run's generators' states, saved with the buffers
            self._step_generators: list[torch.Tensor] | None = None  # and before the step's augmentation, if any
            self._batch_size = self.task.base_batch_size
            self.lr_coupler = self._coupler(self.elastic.lr_rule, self._batch_size)
            self.batch_size = batch_size if batch_size is not None else self.task.base_batch_size

            self.costs = CostModel.measure(
                self.model, self.layers, self._probe_x[:1], optimizer_states=optimizer_state_tensors(self.optimizer)
            )
            self.memory_model = MemoryModel(self.costs, self.profile)
            self._accounted_state_bytes = self.costs.static_bytes - 2 * 4 * sum(self.costs.owned_params)
            budget = memory or MemoryBudget()
            capacity = device_capacity_bytes(self.device, budget.cpu_capacity_bytes)
            self.memory_budget_bytes = budget.resolve(capacity, self.device.type)
            if self.measures_memory:
                self.calibrate_memory()
            check_budget(
                self.memory_budget_bytes,
                fixed_bytes=self.predicted_memory_bytes(0),
                one_sample_bytes=self.predicted_memory_bytes(1),
            )
        except BaseException:
            _restore_run_generators(self.device, caller_states)
            raise

    # ---------------------------------------------------------------------------------------- knobs

    @property
    def micro_batch_cap(self) -> int | None:
        """An upper bound on the micro-batch size set by hand (``None``: only the memory budget bounds it).

        Raises:
            ValueError: set to anything but ``None`` or a whole number >= 1 (2.5 made the planner bisect for ever,
                and 0 or less split the batch into one-sample micro-batches, silently).
        """
        return self._micro_batch_cap

    @micro_batch_cap.setter
    def micro_batch_cap(self, value: int | None) -> None:
        if value is not None and not (is_whole(value) and value >= 1):
            raise ValueError(f"micro_batch_cap={value!r} must be None or a whole number of samples >= 1")
        self._micro_batch_cap = None if value is None else int(value)

    @property
    def batch_size(self) -> int:
        """Samples per optimizer step (the effective batch, all micro-batches together)."""
        return self._batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"batch_size={value!r} must be a positive integer")
        if value > len(self.loader):  # never served: the LR followed it, the steps a whole epoch (10**6 diverged)
            raise ValueError(
                f"batch_size={value} is more than the {len(self.loader)} training samples: a step serves at most an "
                "epoch"
            )
        self._batch_size = int(value)
        noise = self.noise_scale if self.lr_coupler.rule is LRRule.ADASCALE else None
        # The engine's gain carries the schedule's factor too (as each step sets it): `lr` is right at once.
        self.engine.batch_lr_gain = self.lr_coupler.change(self._batch_size, noise) * self.schedule_gain

    @property
    def lr_rule(self) -> LRRule:
        """How the LR follows the effective batch (resolved: never ``AUTO``); setting it applies at once."""
        return self.lr_coupler.rule

    @lr_rule.setter
    def lr_rule(self, value: LRRule | str) -> None:
        rule = resolve_lr_rule(LRRule.parse(value), self.optimizer)
        noise = self.noise_scale if rule is LRRule.ADASCALE else None
        # Carried on from the gain in force and the steps taken: a fresh coupler restarted the warm-up's count.
        self.lr_coupler = self.lr_coupler.with_rule(rule, noise)
        self.engine.batch_lr_gain = self.lr_coupler.gain * self.schedule_gain

    @property
    def lr_scale(self) -> float:
        """Global LR multiplier set by the controller."""
        return self.engine.lr_scale

    @lr_scale.setter
    def lr_scale(self, value: float) -> None:
        if not (is_real(value) and math.isfinite(value) and value > 0):  # a bool was taken as 1.0; text a TypeError
            raise ValueError(f"lr_scale={value!r} must be a positive finite number")
        self.engine.lr_scale = float(value)

    @property
    def lr_factors(self) -> np.ndarray:
        """Per-layer LR factors, shape ``[n_layers]`` (1 = the layer's scheduled LR); a read-only view.

        Set them through this property (``run.lr_factors = run.lr_factors * 2``), which checks them: writing into the
        view (``run.lr_factors[0] = -3``) raises NumPy's "assignment destination is read-only".
        """
        view = np.asarray(self.engine.lr_factors, dtype=np.float64).view()  # the engine's own may be a list
        view.flags.writeable = False
        return view

    @lr_factors.setter
    def lr_factors(self, value: np.ndarray) -> None:
        entries = list(value) if isinstance(value, (list, tuple, np.ndarray)) else None
        if entries is None or not all(is_real(entry) for entry in entries):  # bools were taken; text a bare error
            raise ValueError(f"lr_factors must be {self.n_layers} positive finite numbers; got {value!r}")
        factors = np.asarray(entries, dtype=float)
        if factors.shape != (self.n_layers,) or not np.all(np.isfinite(factors)) or np.any(factors <= 0):
            raise ValueError(f"lr_factors must be {self.n_layers} positive finite numbers; got {value!r}")
        self.engine.lr_factors = factors

    @property
    def precisions(self) -> list[Precision]:
        """Current precision of every layer (non-controllable layers are always fp32)."""
        return list(self.precision.precisions)

    def set_precisions(self, precisions: Sequence[Precision | str | int]) -> None:
        """Sets per-layer precisions (all layers, or controllable layers only).

        Raises:
            ValueError: wrong count, unknown precision, or one this device cannot run.
        """
        self.engine.set_precisions(precisions)

    @property
    def lr(self) -> float:
        """The global learning rate of the next step (before per-layer factors).

        Its batch-size gain is the one the next step advances to (a warm-up ramp moves on a step), and its schedule
        factor the one at the end of the next batch (``schedule_gain``: the batch a step trains on counts).
        """
        gain = self.lr_coupler.next_gain() * self._schedule_gain_after(self.batch_size)
        return self.task.base_lr * self.lr_scale * gain

    @property
    def schedule_gain(self) -> float:
        """The LR schedule's multiplier now: warm-up from ~0 to 1, then linear decay to 0 (1 without one).

        A step's update takes it after its batch has left the loader, so the batch it trains on counts: the first
        step of a 10-epoch run of 100 batches an epoch takes ``schedule_gain(0.01, 10, warmup_frac)``, not the gain at
        epoch 0.
        """
        if self.schedule_epochs is None:
            return 1.0
        return schedule_gain(self.epoch, self.schedule_epochs, self.warmup_frac)

    def _schedule_gain_after(self, n: int) -> float:
        """``schedule_gain`` once the loader has served a batch of ``n`` (as many as it serves: ``next_size``)."""
        if self.schedule_epochs is None:
            return 1.0
        size, epoch, cursor = len(self.loader), self.loader.epoch, self.loader.cursor
        served = self.loader.next_size(n)  # (before the move below: it sees the epoch's end as next() does)
        if cursor >= size:  # the loader starts the next epoch before serving
            epoch, cursor = epoch + 1, 0
        return schedule_gain(epoch + (cursor + served) / size, self.schedule_epochs, self.warmup_frac)

    # ----------------------------------------------------------------------------------------- step

    def step(self) -> StepStats:
        """Runs one optimizer step on the next effective batch and returns its statistics.

        A non-finite loss or gradient skips the update (parameters and optimizer state unchanged) and
        is reported as ``skipped``; with an fp16 layer a GradScaler scales the loss. Reading the statistics
        costs a host-device sync; :meth:`train_interval` runs steps without one on the fused path. A step that raises
        still charges its time to the run's totals, as a given-up interval does; one whose update went in before a
        user's step post-hook raised is counted (its skip too) before the error is re-raised.

        Raises:
            UnrecoverableOOMError: out of memory more than ``elastic.max_oom_retries`` times in the step
                (a micro-batch of two, or of one where the batch or the cap is one, is retried as it is); the batch is
                returned to the loader first. Or out of memory in the optimizer step: before its update the batch goes
                back too; part-way through the update the step counts, its batch spent (resume from a checkpoint).
        """
        self._check_open()
        start = time.perf_counter()
        self.engine.sync_weight_copies()  # weights written since the last call (a user, a restore)
        # A host count on the reference path; on the fused one a device copy of the counter, read (a sync) only where a
        # post-hook raises: no sync before the step is queued.
        engine, steps = self.engine, self.steps
        applied = engine.fused_optimizer.step_count.clone() if engine.fused else engine.applied_steps()
        try:
            outcome = self._step(deferred=False)
        except BaseException:
            # The time was spent whether or not the step finished (a step given up after out-of-memory retries
            # too), as train_interval charges its given-up interval's; a step that raised before its work costs
            # microseconds. Only a finished one counts its skip: its update went in, then a post-hook raised (the
            # fused path runs post-hooks after a step the device skipped too). Read as train_interval reads.
            with contextlib.suppress(Exception):
                if self.steps > steps:
                    self.skipped_steps += 1 - (engine.applied_steps() - int(applied))
                self.train_time_ms += (time.perf_counter() - start) * 1e3
            raise
        elapsed_ms = (time.perf_counter() - start) * 1e3  # the step's syncs make this the device's time too
        skipped = bool(outcome.skipped)
        self.skipped_steps += int(skipped)
        self.train_time_ms += elapsed_ms
        abs_max = outcome.grads.abs_max
        assert abs_max is not None  # _step(deferred=False) has the engine take it
        stats = StepStats(
            loss=float(outcome.loss),  # host-device sync, free: the engine already waited on it for its skip
            batch_size=outcome.batch_size,
            step_time_ms=elapsed_ms,
            modelled_time_ms=outcome.modelled_ms if self.cost_mode is CostMode.PROFILE else elapsed_ms,
            memory_bytes=outcome.memory_bytes,
            skipped=skipped,
            grad_sq_sum=outcome.grads.sq_sum.cpu().numpy(),
            grad_abs_max=abs_max.cpu().numpy(),
            grad_nonfinite=outcome.grads.nonfinite.cpu().numpy(),
            lr=outcome.lr,
            oom_events=outcome.oom_events,
        )
        if not skipped and np.all(np.isfinite(stats.grad_sq_sum)):
            self._observe_noise(stats.batch_size, float(stats.grad_sq_sum.sum()))
        return stats

    def train_interval(self, n_steps: int) -> IntervalStats:
        """Runs ``n_steps`` optimizer steps and returns their summary.

        The same steps as :meth:`step` (micro-batches, OOM recovery, skips), but each step's loss and
        per-layer squared gradient norms stay on the device (``DeviceMoments``) until the interval ends.
        On the fused path the skip is decided on the device too, so the host reads the device only at the
        interval's edges (the applied-update counter, ``applied_steps()``, before and after; the timer and the
        moments at the end); the reference path decides each step's skip on the host, a host-device sync a
        step. The time is measured over the whole interval (CUDA events on a GPU), so it is the device's time, not
        the host's enqueue time. An interval that raises still counts its finished steps' skips and its time in the
        run's totals.

        Raises:
            ValueError: ``n_steps`` is negative.
            UnrecoverableOOMError: as :meth:`step`.
        """
        self._check_open()
        if isinstance(n_steps, bool) or not isinstance(n_steps, (int, np.integer)) or n_steps < 0:
            raise ValueError(f"n_steps={n_steps!r} must be a whole number >= 0")
        if self._moments is None:
            self._moments = DeviceMoments(self.engine.layer_params, budget_frac=self.observe_budget_frac)
        self.engine.sync_weight_copies()  # weights written since the last call; none can be inside the interval
        applied = self.engine.applied_steps()  # read at the interval's edge, not between its steps
        steps = self.steps
        timer = IntervalTimer(self.device)
        timer.start()
        samples = oom_events = peak = 0
        modelled_ms = 0.0
        try:
            for _ in range(n_steps):
                outcome = self._step(deferred=True)
                self._moments.observe_layers(outcome.loss, outcome.grads.sq_sum)
                samples += outcome.batch_size
                oom_events += outcome.oom_events
                modelled_ms += outcome.modelled_ms
                # From the last out-of-memory recovery on: it lowered the budget, and the steps before it, planned
                # under the old one, read as the lowered budget full (the heuristic halved the batch at the decision
                # after an error mid-interval, where one at an interval's start kept it, micro-batched).
                peak = outcome.memory_bytes if outcome.oom_events else max(peak, outcome.memory_bytes)
        except BaseException:
            self._moments.flush()  # the interval is given up: its steps' statistics must not count in the next one
            # Its finished steps still count in the run's totals (their updates went in); read on the way out, where
            # a failed device would raise again, so a reading that fails leaves the totals as they were. A step whose
            # update went in before a post-hook raised is finished though it returned no outcome: ``self.steps``
            # counts it, as it counts every other.
            with contextlib.suppress(Exception):
                train_ms = timer.stop()
                finished_skips = max(self.steps - steps - (self.engine.applied_steps() - applied), 0)
                self.train_time_ms += train_ms
                self.skipped_steps += finished_skips
            raise
        train_ms = timer.stop() if n_steps else 0.0  # host-device sync: waits out the interval (the reads below don't)
        moments = self._moments.flush()
        skipped = n_steps - (self.engine.applied_steps() - applied)  # recorded or not
        self.skipped_steps += skipped
        self.train_time_ms += train_ms
        if moments.n_finite and np.all(np.isfinite(moments.sq_norm)):  # at the batch served (an epoch's short last)
            # As that many steps of its mean, as SignalCollector.observe_interval folds its EMAs: the interval's finite
            # steps (step() folds no skipped or non-finite one), estimated from the recorded share where DeviceMoments
            # samples. One fold a call whatever its length made the EMAs depend on where compare cut intervals.
            finite_steps = n_steps * moments.n_finite / moments.n_observed
            self._observe_noise(samples / n_steps, float(moments.sq_norm.sum()), finite_steps)
        return IntervalStats(
            steps=n_steps,
            samples=samples,
            train_ms=train_ms,
            charged_ms=modelled_ms if self.cost_mode is CostMode.PROFILE else train_ms,
            peak_bytes=peak,
            skipped=skipped,
            oom_events=oom_events,
            moments=moments,
        )

    def _step(self, deferred: bool) -> _StepOutcome:
        """One optimizer step; with ``deferred`` nothing is read back from the device."""
        batch = self.loader.next(self.batch_size)
        n = len(batch.y)
        self.last_batch = batch
        self._step_generators = None
        if self.task.augment is not None:  # once a step: every micro-batch plan and OOM retry trains the same draw
            # The generators before the draw, for a step that is given up to put back: its batch, served again, is
            # augmented as it was (_save_buffers saves them after the draw, for the retries, which reuse it). Host
            # copies (a few KB for the CPU's, a seed and offset for CUDA's): no sync.
            self._step_generators = _run_generator_states(self.device)
            try:
                batch = replace(batch, x=self.task.augment(batch.x))
            except BaseException:  # (a Ctrl-C too) the step never began: its samples and its draws go back
                _restore_run_generators(self.device, self._step_generators)
                self.loader.take_back(n)
                raise
        if not self.model.training:  # train() walks every module: ~0.5 ms of host time a step on a small CNN
            self.model.train()
        oom_events = 0
        wasted_samples = 0  # samples whose forward pass ran in an attempt that failed (charged, not applied)
        micro = self.micro_batch_size(n)
        self._saved_buffers = None
        while True:
            sizes = plan_micro_batches(n, micro)
            self._reset_peak_memory()
            self._samples_started = 0
            failure = ""
            try:
                loss = self._accumulate(batch, sizes, attempt=oom_events)
            except BaseException as err:  # anything but an OOM (a Ctrl-C too) is re-raised at once, the step undone
                if not (self.memory_elastic and isinstance(err, Exception) and is_out_of_memory(err)):
                    self._abandon_step(n)
                    raise
                failure = _first_line(err)
            if not failure:
                break
            # Out of the except block: the traceback, and the activations its frames held, are gone.
            oom_events += 1
            wasted_samples += self._samples_started
            try:
                micro = self._recover_from_oom(micro, failure, oom_events, n)
            except BaseException:  # its giving up, or a Ctrl-C in its collection or logging: the step is undone
                self._abandon_step(n)  # the one place the batch goes back (the recovery itself never hands it back)
                raise
        # The engine's batch gain also carries the LR schedule: both multiply every layer's LR alike. The coupler
        # advances once the update went in: a step given up (its batch returned) is no step of the warm-up.
        self.engine.batch_lr_gain = self.lr_coupler.next_gain() * self.schedule_gain
        lr = self.task.base_lr * self.lr_scale * self.engine.batch_lr_gain
        try:
            # The micro-batches' backward passes have run; the engine unscales, takes statistics and updates. Only
            # step()'s StepStats reads the maxima: an interval's steps save their pass over the gradients.
            self.engine.track_abs_max = not deferred
            grads, skipped = (
                self.engine.step_after_backward_deferred(loss) if deferred else self.engine.step_after_backward(loss)
            )
        except BaseException as err:
            step, engine = self.steps, self.engine
            partial = engine.update_started and not engine.update_reached
            if engine.update_reached or partial:
                # A step post-hook raised after the update, or the update raised part-way (some parameters and their
                # optimizer state moved): the batch was trained on. Served again, it would go into them twice.
                self.lr_coupler.advance()
                self.steps += 1
            else:  # no update went in (a pre-hook, the gradients' unscaling): the step never was, its samples go back
                self._abandon_step(n)
            out_of_memory = isinstance(err, Exception) and is_out_of_memory(err)
            if partial:
                what = (
                    f"the optimizer update of step {step} raised part-way: the parameters and optimizer state may be "
                    "partly updated, so the step is not retried (its batch counts as trained on); resume from the "
                    "last checkpoint"
                )
                if out_of_memory:
                    raise UnrecoverableOOMError(f"out of memory: {what}: {err}") from err
                _log.error("%s: %s", what, _first_line(err))  # the error goes on as it is: a caller may catch its type
            elif out_of_memory:
                where = "in a step post-hook, after" if engine.update_reached else "before (its batch goes back), in"
                raise UnrecoverableOOMError(
                    f"out of memory in the optimizer step of step {step}, {where} the update; lower the memory "
                    f"budget: {err}"
                ) from err
            raise
        self.lr_coupler.advance()  # counted once the update went in: a step given up is no step of the warm-up
        self.steps += 1
        self.last_micro_batches = sizes
        modelled_ms = self._charged_step_ms(n, len(sizes))
        if wasted_samples:
            modelled_ms += self.costs.step_ms(wasted_samples, self.precision.precisions, self.profile, False)
        self.modelled_time_ms += modelled_ms
        if self.measures_memory:
            now, memory = allocated_bytes(self.device)  # the allocator's host-side counters: no sync
            if self._graphed and self.graphs is not None:  # a replay allocates nothing: its eager pass's peak counts
                memory = max(memory, self.graphs.last_peak_bytes)
                self.memory_model.rebase(now)  # the graph's memory stays allocated: the baseline, not the batch's
            else:
                # The largest micro-batch sets the peak: plan_micro_batches puts it first (33 at 16: 16, 15, 2).
                self.memory_model.observe(max(sizes), self.precisions, memory, allocated_bytes=now)
        else:
            memory = self.memory_bytes(max(sizes))
        return _StepOutcome(loss, n, grads, skipped, lr, oom_events, modelled_ms, memory)

    def micro_batch_size(self, batch_size: int | None = None) -> int:
        """The micro-batch a step of ``batch_size`` samples (default: the current batch) would be split into.

        The largest size predicted to fit ``elastic.fill_frac`` of the budget at the current precisions,
        at most the batch and ``micro_batch_cap``; at least 1.

        Raises:
            ValueError: ``batch_size`` is not a whole number >= 1, or more than the training samples (as the
                :attr:`batch_size` setter's: a step serves at most an epoch).
        """
        n = self._step_batch(batch_size)
        cap = n if self.micro_batch_cap is None else max(1, min(n, self.micro_batch_cap))
        if not self.memory_elastic:
            return cap
        usable = self.usable_memory_bytes - self._unallocated_state_bytes()
        fit = self.memory_model.max_batch_size(usable, self.precisions, limit=cap)
        return max(fit, 1)

    # ------------------------------------------------------------------------------------- measures

    def evaluate(self, max_samples: int | None = None) -> float:
        """Test accuracy in [0, 1], computed in fp32 with the model in eval mode.

        Each module's mode is put back afterwards: the next step's ``model.train()`` put every module in training mode,
        so a module the model keeps in eval mode (a batch norm frozen for fine-tuning) was unfrozen for good by an
        evaluation, and the run trained another function from then on.
        """
        modes = [(module, module.training) for module in self.model.modules()]
        try:
            return evaluate_accuracy(self.model, self._test_x, self._test_y, max_samples)
        finally:
            for module, training in modes:
                module.training = training

    @property
    def probe_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The fixed held-out probe batch ``(inputs, targets)``, on the run's device; never trained on.

        The tensors are the run's own, not copies: read them, do not modify them.
        """
        return self._probe_x, self._probe_y

    @torch.no_grad()
    def probe_loss(self) -> float:
        """Loss on the fixed held-out probe batch: a low-noise measure of training progress.

        Batch norm uses the probe batch's own statistics (as in training) without updating its running
        statistics, which lag early in training and would make an eval-mode loss spike. On a GPU the
        forward runs in the layers' current precisions, replayed from a captured graph when the run uses
        graphs (the probe is part of the controller's overhead, taken at every decision); on a CPU, where
        16-bit autocast is slow, in fp32.
        """
        self.engine.sync_weight_copies()
        # On a fork of the RNGs, as the collector's rounds: a model's own randomness in its forward (stochastic depth,
        # F.dropout) drew from the run's stream, so later masks hung on the decisions taken. A graph's replay (and its
        # capture's warm-up passes) advance the generator's offset too.
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type):
            key = ("probe", tuple(self.precision.precisions), self.precision.needs_grad_scaler)
            if self.graphs is not None and key not in self._uncapturable_probes:
                try:
                    return float(self.graphs.run(key, self._probe_x, self._probe_y, self._probe_body, lambda: None))
                except Exception as err:
                    if is_out_of_memory(err):
                        raise
                    # Not retried: a failed capture costs its warm-up passes, at every decision otherwise.
                    self._uncapturable_probes.add(key)
                    _log.warning(
                        "CUDA graph capture of the probe failed (%s); it runs eagerly in this configuration",
                        _first_line(err),
                    )
            return float(self._probe_body(self._probe_x, self._probe_y))

    def _probe_body(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        low_precision = self.device.type == "cuda"
        with (
            frozen_batch_stats(self.model),
            self.precision.context(cache_enabled=False) if low_precision else contextlib.nullcontext(),
        ):
            return self.task.loss_fn(self.model(x).float(), y)

    def modelled_step_ms(self, batch_size: int | None = None, precision: Precision | None = None) -> float:
        """Step time on the profiled GPU for ``batch_size`` samples, in ms.

        At the current precisions, or with every controllable layer in ``precision``.
        """
        batch = self.batch_size if batch_size is None else _samples("batch_size", batch_size, least=0)
        precisions = list(self.precision.precisions)
        if precision is not None:
            uniform = Precision.parse(precision)  # "bf16" raised an AttributeError
            for index in self.precision.controllable_indices:
                precisions[index] = uniform
        return self.costs.step_ms(batch, precisions, self.profile, self.include_fixed_cost)

    def planned_step_ms(self, batch_size: int | None = None) -> float:
        """The charged time of a step of ``batch_size`` samples (default: the current batch) as it would run now.

        :meth:`modelled_step_ms`, plus the per-step fixed cost again for each micro-batch past the first that the
        memory budget would split it into (:meth:`micro_batch_size`), as ``step`` charges it.

        Raises:
            ValueError: ``batch_size`` is not a whole number >= 1, or more than the training samples (as the
                :attr:`batch_size` setter's: a step serves at most an epoch).
        """
        n = self._step_batch(batch_size)
        return self._charged_step_ms(n, len(plan_micro_batches(n, self.micro_batch_size(n))))

    def _step_batch(self, batch_size: int | None) -> int:
        """``batch_size`` (None: the current batch) as a step could serve it: a whole number from 1 to the dataset.

        The :attr:`batch_size` setter's bound: a batch above the data is never served, and it was planned, 10**9
        samples as a billion micro-batches of one (10**30 raised an OverflowError that named nothing).
        """
        if batch_size is None:
            return self.batch_size
        n = _samples("batch_size", batch_size, least=1)
        if n > len(self.loader):
            raise ValueError(
                f"batch_size={n} is more than the {len(self.loader)} training samples: a step serves at most an epoch"
            )
        return n

    def _charged_step_ms(self, n: int, n_micro: int) -> float:
        modelled_ms = self.modelled_step_ms(n)
        if self.include_fixed_cost:  # each extra micro-batch pays the per-step launch overhead again
            modelled_ms += (n_micro - 1) * self.profile.fixed_ms
        return modelled_ms

    @property
    def observe_budget_frac(self) -> float | None:
        """Share of step time :meth:`train_interval`'s per-step statistics may take, in (0, 1), or None.

        When recording them costs more, one step in several is recorded (``DeviceMoments(budget_frac=...)``).
        The default ``SignalConfig.observe_budget_frac`` on a GPU in measured mode; None (every step recorded, so
        that observations repeat for a seed) otherwise. A ``DecisionLoop`` sets it from its
        ``config.signals.observe_budget_frac`` where the run measures memory (a GPU in measured mode), None
        elsewhere. Set mid-run, it applies from the next recorded step. Skipped steps are counted from the
        applied updates either way.

        Raises:
            ValueError: (on setting) a value that is not None nor a number in (0, 1).
        """
        return self._observe_budget_frac

    @observe_budget_frac.setter
    def observe_budget_frac(self, value: float | None) -> None:
        if value is not None and not (is_real(value) and 0.0 < value < 1.0):
            raise ValueError(f"observe_budget_frac={value!r} must be a number in (0, 1), or None to record every step")
        self._observe_budget_frac = value
        if self._moments is not None:  # the interval's recorder, made at the first train_interval
            self._moments.budget_frac = value
            if value is None:
                self._moments.every_steps = 1  # as a recorder made without a budget: every step

    @property
    def measures_memory(self) -> bool:
        """True when memory comes from the CUDA allocator (a GPU in ``measured`` mode), not the accounting."""
        return self.device.type == "cuda" and self.cost_mode is CostMode.MEASURED

    def memory_bytes(self, batch_size: int | None = None) -> int:
        """Peak memory of the last step: the allocator's peak on a GPU, the run's accounting otherwise.

        Args:
            batch_size: for the accounting, the micro-batch size (default: the current batch).

        The accounting is parameters + gradients + optimizer state + activations (the tensors autograd holds for
        the backward, and the logits: ``costs.activation_bytes_per_sample``, for the batch, at each layer's
        precision's memory factor) + the low-precision weight copies.
        """
        if self.measures_memory:
            return peak_allocated_bytes(self.device)
        return self.costs.memory_bytes(
            self.batch_size if batch_size is None else _samples("batch_size", batch_size, least=0),
            self.precision.precisions,
            self.profile,
        )

    @property
    def splits_batches(self) -> bool:
        """Whether a step too large for the budget is split into micro-batches (``memory_elastic``)."""
        return self.memory_elastic

    def predicted_memory_bytes(self, batch_size: int, precisions: Sequence[Precision] | None = None) -> int:
        """The memory model's peak for a micro-batch of ``batch_size`` at ``precisions`` (None: the current ones).

        Fitted to the allocator's peaks on a GPU in ``measured`` mode (what a pass adds to the allocated bytes,
        on top of those allocated now); without measurements (CPU, or profile mode from the start) it is the cost
        model's accounting, the same source ``memory_bytes`` reports.
        """
        chosen = self.precisions if precisions is None else precisions
        return self.memory_model.predict(batch_size, chosen) + self._unallocated_state_bytes()

    @property
    def usable_memory_bytes(self) -> int:
        """The share of the budget micro-batches are planned to fill: ``elastic.fill_frac`` × budget."""
        return int(self.elastic.fill_frac * self.memory_budget_bytes)

    def fits_in_budget(self, batch_size: int) -> bool:
        """Whether one unsplit step of ``batch_size`` samples fits the whole budget.

        On a GPU in ``measured`` mode this is a trial: a forward and backward pass (no update, no sample
        consumed, batch-norm statistics untouched) whose allocator peak is compared with the budget (an
        out-of-memory error counts as not fitting); the peak also feeds the memory model. Elsewhere it is the
        memory model's prediction.

        Raises:
            ValueError: ``batch_size`` is not a whole number >= 1 (checked before any trial pass).
        """
        batch_size = _samples("batch_size", batch_size, least=1)
        if not self.measures_memory:
            return self.predicted_memory_bytes(batch_size) <= self.memory_budget_bytes
        peak = self.trial_peak_bytes(batch_size)
        return peak is not None and peak <= self.memory_budget_bytes

    def calibrate_memory(self, sizes: Sequence[int] | None = None) -> None:
        """Fits the memory model to allocator peaks of trial steps at a few micro-batch sizes (GPU only).

        Args:
            sizes: the micro-batch sizes to try, whole numbers >= 1 (at least one); by default ``s // 4`` and ``s``,
                where ``s`` is the current batch, at most what the accounting predicts to fill half the budget; none
                below 2 where ``s`` is 2 or more (a batch norm in training mode needs two samples a channel). A size
                that runs out of memory is halved, down to 2 (1 where it was 1).

        Raises:
            ValueError: ``sizes`` is empty or holds a size that is not a whole number >= 1 (checked on every
                device, before any pass).
        """
        if sizes is not None:
            # -3 ran passes over all but 3 samples before the memory model refused it; [] failed in min(), 2.5 in a
            # slice: each named no argument.
            if isinstance(sizes, (str, bytes)) or not (
                isinstance(sizes, Sequence) or (isinstance(sizes, np.ndarray) and sizes.ndim == 1)
            ):
                raise TypeError(f"sizes={sizes!r} must be a sequence of whole numbers >= 1, or None")
            if len(sizes) == 0:  # (not `not sizes`: a NumPy array's truth value is ambiguous)
                raise ValueError(f"sizes={sizes!r} must hold at least one micro-batch size (or be None: the defaults)")
            sizes = [_samples(f"sizes[{index}]", size, least=1) for index, size in enumerate(sizes)]
        if not self.measures_memory:
            return
        if sizes is None:
            # The accounting (nothing is fitted yet) picks sizes that should fit comfortably.
            s = max(1, min(self.batch_size, len(self.loader)))
            # Not below the least micro-batch the steps use: a batch of 1 raised in a batch norm where s was 4..7, and
            # where the weights took half the budget, so that the halving went down to 1
            least = min(_LEAST_MICRO_BATCH, s)
            while (
                s > least and self.costs.memory_bytes(s, self.precisions, self.profile) > self.memory_budget_bytes // 2
            ):
                s = max(least, s // 2)
            sizes = sorted({max(least, s // 4), s})
        # One unmeasured pass first: the first forward and backward of a process's model can allocate one-time
        # buffers for the length of the pass (on a fresh H200, 60 MB more than the batch's own at 64 samples, twice
        # the need at 256), which would flatten the fitted line and make large batches look cheap.
        self._unmeasured_pass(min(sizes))
        for size in sizes:
            least = min(_LEAST_MICRO_BATCH, size)
            while self.trial_peak_bytes(size) is None and size > least:  # out of memory: try half, not below least
                size = max(least, size // 2)

    @property
    def noise_scale(self) -> float | None:
        """The run's own gradient-noise scale ``B_noise = tr(Sigma) / |G|^2`` in samples (``None``: unknown).

        From EMAs over steps of ``B * |g_B|^2`` and ``B`` (whose difference estimates ``tr(Sigma)``, since
        ``E|g_B|^2 = |G|^2 + tr(Sigma) / B``) and ``|G|^2`` from the optimizer's running mean gradient. Each finite
        step decays the EMAs by 0.9; a :meth:`train_interval` call of ``k`` such steps folds their mean in as ``k``
        steps of that mean (weight ``1 - 0.9 ** k``): the same steps weigh the same in all however they are cut into
        calls, though within a call they weigh alike where one at a time the later weigh more. Used by
        the ``adascale`` LR rule at each batch change; reading it costs one host-device sync.
        """
        weight, b_sq, b = self._noise
        if weight <= 0:
            return None
        mean_sq = float(np.nansum(self.engine.grad_mean_sq_norm()))
        if not (math.isfinite(mean_sq) and mean_sq > 0):
            return None
        trace = max(b_sq / weight - (b / weight) * mean_sq, 0.0)
        return trace / mean_sq

    @property
    def max_batch_size(self) -> int:
        """Largest batch the data allows: an eighth of the training set, so an epoch has 8+ steps."""
        return max(1, len(self.loader) // 8)

    @property
    def samples_seen(self) -> int:
        """Training samples served so far (all epochs)."""
        return self.loader.samples_served

    @property
    def epoch(self) -> float:
        """Epochs done, fractional."""
        return self.loader.epoch + self.loader.epoch_progress

    # ------------------------------------------------------------------------------------- lifetime

    def close(self) -> None:
        """Removes the engine's hooks from the model and the optimizer: the run is done, freed by its last reference.

        The precision hooks close reference cycles through the model, which reference counting cannot free: without
        this, a dropped run (its model, optimizer state and data) lived until a full garbage collection, which costs
        0.1 to 1 s in a process with torch, Triton and SB3 loaded. Closing twice is harmless; a closed run is not to
        be stepped again (:meth:`step` and :meth:`train_interval` raise): the hooks that apply its per-layer precisions
        and LR multipliers are gone. Its captured CUDA graphs go too: they read the parameters where the fused step's
        flat buffer held them, which closing frees; :meth:`probe_loss` and :meth:`evaluate` run eagerly after it.
        """
        self.engine.remove()
        self.graphs = None
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(
                "this TrainingRun is closed: its precision hooks and LR multipliers are gone, and on the fused step "
                "its parameters left the flat buffer. Build a new run to train on"
            )

    # ------------------------------------------------------------------------------------- private

    def _coupler(self, rule: LRRule, batch_size: int) -> BatchLRCoupler:
        return BatchLRCoupler(
            resolve_lr_rule(rule, self.optimizer),
            base_batch_size=self.task.base_batch_size,
            batch_size=batch_size,
            warmup_above=self.elastic.warmup_above,
            warmup_steps=self.elastic.warmup_steps,
        )

    def _accumulate(self, batch: Batch, sizes: list[int], attempt: int) -> torch.Tensor:
        """Forward and backward of each micro-batch, gradients accumulating; returns the batch's mean loss.

        Locals (activations, logits) die with this frame, so an error raised here leaves nothing behind
        once its traceback is dropped.
        """
        n = len(batch.y)
        self._graphed = False
        if self.graphs is not None and len(sizes) == 1 and self.fault is None:  # (a fault hook set after building)
            loss = self._replay(batch)
            if loss is not None:
                return loss
        if self._saved_buffers is None:
            self._save_buffers()
        total = torch.zeros((), device=self.device)
        offset = 0
        for index, size in enumerate(sizes):
            x, y = batch.x[offset : offset + size], batch.y[offset : offset + size]  # (augmented by _step)
            offset += size
            if self.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            self._samples_started += size
            if self.fault is not None:
                self.fault(FaultPoint(self.steps, attempt, index, size, "forward"))
            with self.precision.context():
                logits = self.model(x)
                loss = self.task.loss_fn(logits.float(), y) * (size / n)  # weight of the micro-batch
            if self.fault is not None:
                self.fault(FaultPoint(self.steps, attempt, index, size, "backward"))
            self.engine.scale_loss(loss).backward()
            total += loss.detach()
        return total

    def _save_buffers(self) -> None:
        """Copies the model's buffers, for :meth:`_recover_from_oom` to put back.

        An attempt that fails (out of memory, or any error) has already run some forward passes, and each updated the
        batch-norm running statistics (and counts) that a retry, or the caller's next step, updates again. Only eager
        steps copy (a graph's replay
        allocates nothing, so it cannot run out): into copies kept from the last step when the buffers are the
        same tensors, one multi-tensor copy, no allocation.
        """
        found = [
            (module, name, buffer)
            for module in self.model.modules()
            for name, buffer in module._buffers.items()
            if buffer is not None and buffer.numel()
        ]
        slots = [(module, name) for module, name, _ in found]
        buffers = [buffer for _, _, buffer in found]
        kept = self._buffer_copies
        if len(kept) != len(buffers) or any(
            live is not old or saved.shape != live.shape for (old, saved), live in zip(kept, buffers, strict=True)
        ):
            kept = [(live, torch.empty_like(live)) for live in buffers]
            self._buffer_copies = kept
        if kept:
            torch._foreach_copy_([saved for _, saved in kept], [live.detach() for live, _ in kept])
        self._saved_buffers = kept
        # Where each buffer lives: a forward that rebinds one (``self.seen = self.seen + n``) leaves the module holding
        # a new tensor, which _undo_attempt binds back before copying the values in (copied into the old tensor, no
        # longer the module's, a retried or abandoned step's count would stay advanced).
        self._buffer_slots = slots
        # And the generators the forward passes draw from (dropout): a retry draws the masks the failed attempt drew,
        # as a run without the error would. Host copies (a few KB for the CPU's, a seed and offset for CUDA's): no sync.
        self._saved_generators = _run_generator_states(self.device)

    def _replay(self, batch: Batch) -> torch.Tensor | None:
        """The step's forward, loss and backward from its captured graph; ``None`` if graphs are off now."""
        assert self.graphs is not None
        x = batch.x  # (augmented by _step)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        self._samples_started += len(batch.y)
        key = (
            tuple(x.shape),
            x.stride(),
            x.dtype,
            tuple(batch.y.shape),
            tuple(self.precision.precisions),
            self.precision.needs_grad_scaler,
        )
        try:
            loss = self.graphs.run(key, x, batch.y, self._captured_body, self.engine.zero_grad)
        except Exception as err:  # an OOM goes to the step's recovery; anything else turns graphs off
            if is_out_of_memory(err):
                raise
            _log.warning("CUDA graph capture failed (%s); the run continues without graphs", _first_line(err))
            self.graphs = None
            self.engine.zero_grad()
            self._samples_started -= len(batch.y)
            return None
        self._graphed = True
        return loss

    def _captured_body(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One unsplit micro-batch's forward, loss and backward, as a graph captures it (no autocast cache)."""
        with self.precision.context(cache_enabled=False):
            loss = self.task.loss_fn(self.model(x).float(), y)
        self.engine.scale_loss(loss).backward()
        return loss.detach()

    def _undo_attempt(self) -> None:
        """Drops a failed attempt's gradients; puts back the buffers its forward passes updated and the generators."""
        self.engine.zero_grad()  # the aborted attempt's partial sums must not count
        if self._saved_buffers is not None:  # saved with them, by this step's first eager attempt
            _restore_run_generators(self.device, self._saved_generators)
        if self._saved_buffers:  # nor its forward passes' updates of batch-norm running statistics
            for (module, name), (tensor, _) in zip(self._buffer_slots, self._saved_buffers, strict=True):
                if module._buffers.get(name) is not tensor:  # rebound by the forward: the run's own tensor back
                    module._buffers[name] = tensor
            torch._foreach_copy_([live for live, _ in self._saved_buffers], [kept for _, kept in self._saved_buffers])

    def _abandon_step(self, n: int) -> None:
        """A step that raises leaves the run as before it: no gradients, buffers and generators back, samples returned.

        The generators as they were before the step's augmentation drew, where the task augments: its batch, served
        again, is augmented as it was.
        """
        self._undo_attempt()
        if self._step_generators is not None:  # _undo_attempt put back those after the draw
            _restore_run_generators(self.device, self._step_generators)
        self.loader.take_back(n)

    def _budget_holding(self, needed_bytes: int) -> int:
        """The least budget whose usable share (``usable_memory_bytes``, ``int(fill_frac × budget)``) holds a need.

        ``ceil(needed_bytes / fill_frac)``, and up by a byte where float rounding left the share one short.
        """
        budget = math.ceil(needed_bytes / self.elastic.fill_frac)
        while int(self.elastic.fill_frac * budget) < needed_bytes:
            budget += 1
        return budget

    def _recover_from_oom(self, micro: int, failure: str, oom_events: int, n: int) -> int:
        """Zeroes gradients, frees memory, lowers the budget; returns the micro-batch to retry with.

        ``micro`` is the failed attempt's micro-batch size: the budget and the retry derive from it, the event logs the
        micro-batch that failed (the last one started: a split's shorter last one, or the one before it, where it
        failed).

        Raises:
            UnrecoverableOOMError: the step ran out of memory more than ``elastic.max_oom_retries`` times. It never
                hands the batch back itself: ``_step`` does, for this and for any other exception (a Ctrl-C) here.
        """
        self._undo_attempt()
        release_memory(self.device)
        failed = _last_started(plan_micro_batches(n, micro), self._samples_started)
        if oom_events > self.elastic.max_oom_retries:  # the step is abandoned: ``_step`` hands its samples back
            raise UnrecoverableOOMError(
                f"out of memory {oom_events} times in one step (step {self.steps}), the last in a micro-batch "
                f"of {failed} samples ({failure}); one sample is predicted to need {self.predicted_memory_bytes(1)} "
                f"bytes and the budget is now {self.memory_budget_bytes} bytes"
            )
        before = self.memory_budget_bytes
        # Halved, but not below two samples (a batch norm in training mode needs two a channel: halving down to one
        # raised its ValueError, and the budget left every later step at one sample). A micro-batch at that floor is
        # retried as it is, as is one of one sample (a batch of one, or a micro_batch_cap of 1).
        least = min(_LEAST_MICRO_BATCH, micro)
        retry = max(least, micro // 2)
        # factor x what failed, but not so low that planning (on fill_frac of the budget) has no room for half of it:
        # where the weights and optimizer state outweigh a micro-batch's activations, fill_frac of the lowered budget
        # held less than they do, and every later step ran micro-batches of one sample.
        # And below the least budget that still plans the size that failed: with fill_frac × factor = 1 (fill_frac=1,
        # the default factor) the lowered budget would plan it again, and every later step fail at it.
        failed_need = self.predicted_memory_bytes(micro)
        lowered = max(
            min(int(self.elastic.oom_budget_factor * failed_need), self._budget_holding(failed_need) - 1),
            self._budget_holding(self.predicted_memory_bytes(retry)),
        )
        if self.device.type == "cuda":  # the device is shared: we can hold at most ours + what is free
            lowered = min(lowered, read_device_memory(self.device).available_bytes)
        # Not below the least budget that plans two samples (the halving's floor), never up.
        least_budget = self._budget_holding(self.predicted_memory_bytes(_LEAST_MICRO_BATCH))
        self.memory_budget_bytes = min(before, max(lowered, least_budget))
        retry = max(least, min(retry, self.micro_batch_size(n)))
        event = OOMEvent(self.steps, failed, retry, before, self.memory_budget_bytes, failure, micro)
        self.oom_log.append(event)
        self.oom_events += 1  # with the log, also for a step that gives up later
        _log.warning(
            "step %d: %s in a micro-batch of %d samples; retrying with micro-batch %d (was %d), memory budget %d -> "
            "%d bytes",
            event.step,
            failure,
            failed,
            retry,
            micro,
            before,
            self.memory_budget_bytes,
        )
        return retry

    def trial_peak_bytes(self, batch_size: int) -> int | None:
        """Allocator peak of a forward and backward pass on ``batch_size`` training samples; ``None`` on OOM.

        GPU only (``measures_memory``). No update, no sample consumed, norm statistics untouched; the peak
        is fed to the memory model. Before the first update the optimizer holds no state yet, so its
        accounted size is added.

        Raises:
            ValueError: ``batch_size`` is not a whole number >= 1, or memory is not measured here (a CPU, or profile
                cost mode).
        """
        # Checked before any pass: -5 ran one over all but 5 training samples (x[:-5]) before the memory model
        # refused the size, and where that pass ran out of memory fits_in_budget(-5) answered False.
        batch_size = _samples("batch_size", batch_size, least=1)
        if not self.measures_memory:
            raise ValueError(
                f"trial_peak_bytes needs a CUDA device in measured cost mode; this run is on {self.device}"
            )
        n = min(batch_size, len(self.loader))
        self.engine.zero_grad()
        # Garbage holding device memory (reference cycles of the process's earlier objects) that the collector
        # frees in the middle of a pass counts in the pass's peak but not in the bytes allocated after it. On an H200
        # 84 MB of it made a run's first calibration point 84 MB high, and the fitted line then predicted 0.59x the
        # real peak at 16x the size (BENCHMARKS.md). Collected here, before the allocator's readings.
        gc.collect()
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        failed = False
        try:
            self._trial_pass(n)
        except Exception as err:  # anything but an OOM is re-raised at once
            if not is_out_of_memory(err):
                raise
            failed = True
        self.engine.zero_grad()
        if failed:
            release_memory(self.device)
            return None
        now, peak = allocated_bytes(self.device)
        self.memory_model.observe(n, self.precisions, peak, allocated_bytes=now)
        return peak + self._unallocated_state_bytes()

    def _unallocated_state_bytes(self) -> int:
        """The optimizer state's accounted bytes while a measured run has none yet (a real step will hold it).

        The fused step's state is allocated with its optimizer, so every allocator reading holds it already: none is
        unallocated there (``optimizer.state``, the ``torch.optim`` object's, holds views of the fused buffers, which
        cost nothing more).
        """
        if (
            not self.measures_memory
            or self.engine.fused
            or self.optimizer.state
            or self.memory_model.n_measurements == 0
        ):
            return 0
        return self._accounted_state_bytes

    def _unmeasured_pass(self, batch_size: int) -> None:
        """A trial pass whose peak is not recorded (an out-of-memory error is released and ignored).

        Released after the ``except`` block, as ``trial_peak_bytes`` does: inside it the traceback's frames still held
        the failed pass's activations, which the release could not hand back.
        """
        self.engine.zero_grad()
        failed = False
        try:
            self._trial_pass(min(batch_size, len(self.loader)))
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            failed = True
        self.engine.zero_grad()
        if failed:
            release_memory(self.device)

    def _trial_pass(self, n: int) -> None:
        with frozen_batch_stats(self.model), self.precision.context():
            loss = self.task.loss_fn(self.model(self.loader.x[:n]).float(), self.loader.y[:n])
        loss.backward()

    @property
    def noise_estimates(self) -> np.ndarray:
        """The EMAs behind :attr:`noise_scale` (a copy; set it back after a rollback: ``DecisionLoop`` does)."""
        return self._noise.copy()

    @noise_estimates.setter
    def noise_estimates(self, value: np.ndarray) -> None:
        self._noise = np.array(value, dtype=np.float64).reshape(3)

    def _observe_noise(self, batch_size: float, grad_sq_norm: float, n_steps: float = 1.0) -> None:
        """Folds the squared gradient norm of ``n_steps`` steps at ``batch_size`` into the EMAs.

        One step's norm with ``n_steps=1``; an interval's mean norm with the steps it stands for, as that many steps
        of the mean: the old EMAs decay by ``d ** n_steps`` and the sample takes the rest, ``1 - d ** n_steps``. So
        the old estimate fades as fast however ``train_interval``'s calls cut the same steps (``compare`` cuts them
        at its evaluations), and steps of equal norms give the same EMAs as ``step`` one at a time; where the norms
        vary, a call weighs its steps alike, one at a time the later weigh more. The first entry, the EMA of 1,
        carries the bias correction: ``1 - d ** steps`` either way.
        """
        decay = _NOISE_EMA_DECAY**n_steps
        sample = np.array([1.0, batch_size * grad_sq_norm, float(batch_size)])
        self._noise = decay * self._noise + (1 - decay) * sample

    def _reset_peak_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)


def schedule_gain(epoch: float, schedule_epochs: float, warmup_frac: float) -> float:
    """The LR schedule's multiplier at ``epoch`` of ``schedule_epochs``: linear warm-up, then linear decay to 0.

    The warm-up covers the first ``warmup_frac`` of the budget and starts at 2% of the LR, not zero; past the budget
    the gain stays 0.

    Args:
        epoch: epochs trained, a finite number >= 0.
        schedule_epochs: the schedule's length in epochs, a finite number > 0.
        warmup_frac: share of ``schedule_epochs`` spent warming up, in [0, 1).

    Example:
        >>> [round(schedule_gain(e, 10.0, 0.2), 3) for e in (0.0, 1.0, 2.0, 6.0, 10.0)]
        [0.02, 0.5, 1.0, 0.5, 0.0]

    Raises:
        ValueError: an argument out of its range, or not a number.
    """
    # Each failed bare or went through: warmup_frac=1 and schedule_epochs=0 divided by zero, a negative schedule gave
    # 0.02, warmup_frac=1.5 a gain from the warm-up past its end, and a NaN epoch a NaN LR.
    if not (is_real(epoch) and math.isfinite(epoch) and epoch >= 0):
        raise ValueError(f"epoch={epoch!r} must be a finite number >= 0")
    if not (is_real(schedule_epochs) and math.isfinite(schedule_epochs) and schedule_epochs > 0):
        raise ValueError(f"schedule_epochs={schedule_epochs!r} must be a finite number > 0")
    if not (is_real(warmup_frac) and 0.0 <= warmup_frac < 1.0):
        raise ValueError(f"warmup_frac={warmup_frac!r} must be a number in [0, 1)")
    progress = min(epoch / schedule_epochs, 1.0)
    if progress < warmup_frac:
        return max(progress / warmup_frac, 0.02)
    return max((1.0 - progress) / (1.0 - warmup_frac), 0.0)


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, max_samples: int | None = None) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)`` in [0, 1]: fp32, eval mode, batches of 1024.

    Leaves the model in eval mode (training steps put it back in train mode).

    Raises:
        ValueError: ``x`` and ``y`` differ in length or hold no sample, or ``max_samples`` is not a whole number >= 1.
    """
    whole = isinstance(max_samples, (int, np.integer)) and not isinstance(max_samples, bool)
    if max_samples is not None and not (whole and max_samples >= 1):  # 0 divided by zero, -5 gave -0.0
        raise ValueError(f"max_samples={max_samples!r} must be a whole number >= 1 (or None: all)")
    # No sample divided by zero; 4 inputs against 8 labels were scored on the first 4 labels, 8 against 4 failed in
    # the comparison with a shape error naming neither.
    if len(x) != len(y) or len(x) < 1:
        raise ValueError(f"len(x)={len(x)} and len(y)={len(y)} must be equal and at least 1 (the samples scored)")
    model.eval()
    n = len(x) if max_samples is None else min(max_samples, len(x))
    correct = 0
    for start in range(0, n, 1024):
        logits = model(x[start : min(n, start + 1024)])
        correct += int((logits.argmax(1) == y[start : min(n, start + 1024)]).sum())
    return correct / n


@dataclass(frozen=True)
class _StepOutcome:
    """What ``TrainingRun._step`` leaves for ``step`` or ``train_interval`` (device values unread)."""

    loss: torch.Tensor
    batch_size: int
    grads: GradStats
    skipped: bool | torch.Tensor
    lr: float
    oom_events: int
    modelled_ms: float
    memory_bytes: int


def _last_started(sizes: list[int], started: int) -> int:
    """The size of the last micro-batch of ``sizes`` begun once ``started`` samples had (the first where none had)."""
    for size in sizes:
        started -= size
        if started <= 0:
            return size
    return sizes[-1]


def _samples(name: str, value: object, least: int) -> int:
    """``value`` as a whole number of samples >= ``least``, else a ValueError naming it (-5 priced below 0 samples)."""
    if not is_whole(value) or int(value) < least:  # type: ignore[call-overload]
        raise ValueError(f"{name}={value!r} must be a whole number >= {least}")
    return int(value)  # type: ignore[call-overload]


def seed_run_generators(seed: int, device: torch.device) -> None:
    """Seeds the CPU's default generator and, for a CUDA ``device``, that device's (``torch.manual_seed`` did all)."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        # Started now: torch.cuda.manual_seed before CUDA's start is queued, and then seeds whichever device is
        # current when CUDA starts, not necessarily the run's.
        torch.cuda.init()
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.default_generators[index].manual_seed(seed)


def _run_generator_states(device: torch.device) -> list[torch.Tensor]:
    """The states of the generators ``seed_run_generators`` seeds: the CPU's and, for a CUDA ``device``, that one's."""
    states = [torch.default_generator.get_state()]
    if device.type == "cuda":
        torch.cuda.init()
        index = device.index if device.index is not None else torch.cuda.current_device()
        states.append(torch.cuda.default_generators[index].get_state())
    return states


def _restore_run_generators(device: torch.device, states: list[torch.Tensor]) -> None:
    """Puts back the states ``_run_generator_states`` read."""
    torch.default_generator.set_state(states[0])
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.default_generators[index].set_state(states[1])


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"

"""``TrainingRun``: a task's model, optimizer and data with settable knobs; ``step()`` returns ``StepStats``."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from triaccel_rl.config import ConfigError, CostMode, HardwareProfile, MemoryBudget
from triaccel_rl.costs import CostModel
from triaccel_rl.engine import StepEngine
from triaccel_rl.loader import ElasticLoader
from triaccel_rl.tasks import Task, get_task
from triaccel_rl.types import LayerInfo, Precision, StepStats

__all__ = ["IntervalTimer", "TrainingRun", "resolve_device"]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Returns ``device``, or CUDA when available and CPU otherwise.

    Raises:
        ValueError: a CUDA device was asked for on a machine without one.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but this machine has no CUDA GPU; use 'cpu'")
    return resolved


class IntervalTimer:
    """Times a span of GPU or CPU work: CUDA events on a GPU, ``perf_counter`` on a CPU.

    ``stop()`` synchronises with the GPU (one host-device sync per span, not per step).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._start_event: torch.cuda.Event | None = None
        self._start_time = 0.0

    def start(self) -> None:
        """Marks the start of the span."""
        if self.device.type == "cuda":
            self._start_event = torch.cuda.Event(enable_timing=True)
            self._start_event.record()
        else:
            self._start_time = time.perf_counter()

    def stop(self) -> float:
        """Returns the milliseconds since ``start()``."""
        if self.device.type == "cuda":
            assert self._start_event is not None, "IntervalTimer.stop() before start()"
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()  # host-device sync: once per interval
            return float(self._start_event.elapsed_time(end))
        return (time.perf_counter() - self._start_time) * 1e3


class TrainingRun:
    """A task's model, optimizer and data, stepped one optimizer step at a time with settable knobs.

    Knobs: per-layer precision (``set_precisions``), a global LR multiplier (``lr_scale``), per-layer LR
    factors (``lr_factors``) and the batch size (``batch_size``). The LR of layer ``l`` at a step is
    ``base_lr * lr_scale * lr_factors[l] * batch_lr_gain``, where ``batch_lr_gain`` follows the batch size
    (linear for SGD, square root for AdamW, relative to the task's base batch).

    Args:
        task: a ``Task`` or its registered name.
        seed: seeds the model's initialisation and the data order.
        device: ``"cpu"``, ``"cuda"``, or ``None`` for CUDA when available.
        batch_size: starting batch size; the task's ``base_batch_size`` by default.
        memory: the memory budget (accounting on CPU, the allocator on GPU).
        cost_mode: ``measured`` time and memory, or ``profile`` (charged from ``profile``).
        profile: the hardware profile for ``cost_mode="profile"``; the shipped one by default.
        n_probe: held-out training samples for the fixed probe loss.
        include_fixed_cost: add the profile's fixed per-step time to the modelled step time.

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
        profile: HardwareProfile | None = None,
        n_probe: int = 512,
        include_fixed_cost: bool = True,
    ) -> None:
        self.task = get_task(task) if isinstance(task, str) else task
        self.seed = seed
        self.device = resolve_device(device)
        self.cost_mode = CostMode.parse(cost_mode)
        self.profile = profile if profile is not None else HardwareProfile.load()
        self.include_fixed_cost = include_fixed_cost
        torch.manual_seed(seed)
        self.model: nn.Module = self.task.build_model().to(self.device)
        layers = StepEngine.discover(self.model)
        optimizer = self.task.make_optimizer([{"params": params, "layer": i} for i, params in enumerate(layers)])
        self.engine = StepEngine(self.model, optimizer, self.device)
        self.optimizer = self.engine.optimizer
        self.precision = self.engine.precision
        self.layers: list[LayerInfo] = self.engine.layers

        data = self.task.data(seed)
        n_probe = max(1, min(n_probe, len(data.train_x) // 8))
        self._probe_x = data.train_x[-n_probe:].to(self.device)
        self._probe_y = data.train_y[-n_probe:].to(self.device)
        self.loader = ElasticLoader(
            data.train_x[:-n_probe].to(self.device), data.train_y[:-n_probe].to(self.device), seed=seed
        )
        self._test_x = data.test_x.to(self.device)
        self._test_y = data.test_y.to(self.device)

        self.n_layers = len(self.layers)
        self._batch_size = 0
        self.batch_size = batch_size if batch_size is not None else self.task.base_batch_size
        self.steps = 0
        self.skipped_steps = 0
        self.train_time_ms = 0.0
        self.modelled_time_ms = 0.0

        self.costs = CostModel.measure(
            self.model, self.layers, self._probe_x[:1], optimizer_states=1 if self.task.optimizer == "sgd" else 2
        )
        capacity = (
            torch.cuda.get_device_properties(self.device).total_memory
            if self.device.type == "cuda"
            else (memory or MemoryBudget()).cpu_capacity_bytes
        )
        self.memory_budget_bytes = (memory or MemoryBudget()).resolve(capacity)
        if self.memory_budget_bytes <= self.costs.static_bytes:
            raise ConfigError(
                f"memory budget {self.memory_budget_bytes} bytes is below the model's fixed "
                f"{self.costs.static_bytes} bytes (weights, gradients, optimizer state)"
            )

    # ---------------------------------------------------------------------------------------- knobs

    @property
    def batch_size(self) -> int:
        """Samples per optimizer step."""
        return self._batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"batch_size={value!r} must be a positive integer")
        self._batch_size = int(value)
        ratio = self._batch_size / self.task.base_batch_size
        self.engine.batch_lr_gain = ratio if self.task.optimizer == "sgd" else math.sqrt(ratio)

    @property
    def lr_scale(self) -> float:
        """Global LR multiplier set by the controller."""
        return self.engine.lr_scale

    @lr_scale.setter
    def lr_scale(self, value: float) -> None:
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"lr_scale={value!r} must be a positive number")
        self.engine.lr_scale = float(value)

    @property
    def lr_factors(self) -> np.ndarray:
        """Per-layer LR factors, shape ``[n_layers]`` (1 = the layer's scheduled LR)."""
        return self.engine.lr_factors

    @lr_factors.setter
    def lr_factors(self, value: np.ndarray) -> None:
        factors = np.asarray(value, dtype=float)
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
        """The global learning rate of the next step (before per-layer factors)."""
        return self.task.base_lr * self.lr_scale * self.engine.batch_lr_gain

    # ----------------------------------------------------------------------------------------- step

    def step(self) -> StepStats:
        """Runs one optimizer step on the next batch and returns its statistics.

        A non-finite loss or gradient skips the update (parameters and optimizer state unchanged) and
        is reported as ``skipped``; with an fp16 layer a GradScaler scales the loss.
        """
        batch = self.loader.next(self.batch_size)
        self.model.train()
        start = time.perf_counter()
        self._reset_peak_memory()
        lr = self.lr
        with self.precision.context():
            logits = self.model(batch.x)
            loss = self.task.loss_fn(logits.float(), batch.y)
        grads, skipped = self.engine.backward_and_step(loss)
        self.steps += 1
        self.skipped_steps += int(skipped)
        elapsed_ms = (time.perf_counter() - start) * 1e3
        modelled_ms = self.modelled_step_ms(len(batch.y))
        self.train_time_ms += elapsed_ms
        self.modelled_time_ms += modelled_ms
        return StepStats(
            loss=float(loss.detach()),
            batch_size=len(batch.y),
            step_time_ms=elapsed_ms,
            modelled_time_ms=modelled_ms if self.cost_mode is CostMode.PROFILE else elapsed_ms,
            memory_bytes=self.memory_bytes(len(batch.y)),
            skipped=skipped,
            grad_sq_sum=grads.sq_sum.cpu().numpy(),
            grad_abs_max=grads.abs_max.cpu().numpy(),
            grad_nonfinite=grads.nonfinite.cpu().numpy(),
            lr=lr,
        )

    # ------------------------------------------------------------------------------------- measures

    @torch.no_grad()
    def evaluate(self, max_samples: int | None = None) -> float:
        """Test accuracy in [0, 1], computed in fp32 with the model in eval mode."""
        self.model.eval()
        n = len(self._test_x) if max_samples is None else min(max_samples, len(self._test_x))
        correct = 0
        for start in range(0, n, 1024):
            logits = self.model(self._test_x[start : min(n, start + 1024)])
            correct += int((logits.argmax(1) == self._test_y[start : min(n, start + 1024)]).sum())
        return correct / n

    @torch.no_grad()
    def probe_loss(self) -> float:
        """Loss on the fixed held-out probe batch in fp32: a low-noise measure of training progress.

        Batch norm uses the probe batch's own statistics (as in training) without updating its running
        statistics, which lag early in training and would make an eval-mode loss spike.
        """
        with _probe_mode(self.model):
            loss = self.task.loss_fn(self.model(self._probe_x).float(), self._probe_y)
        return float(loss)

    def modelled_step_ms(self, batch_size: int | None = None) -> float:
        """Step time on the profiled GPU for ``batch_size`` samples at the current precisions, in ms."""
        batch = self.batch_size if batch_size is None else batch_size
        return self.costs.step_ms(batch, self.precision.precisions, self.profile, self.include_fixed_cost)

    def memory_bytes(self, batch_size: int | None = None) -> int:
        """Peak memory of the last step: the allocator's peak on a GPU, the run's accounting otherwise.

        The accounting is parameters + gradients + optimizer state + activations (each layer's output
        for the batch at its precision's memory factor) + the low-precision weight copies.
        """
        if self.device.type == "cuda" and self.cost_mode is CostMode.MEASURED:
            return int(torch.cuda.max_memory_allocated(self.device))
        return self.predicted_memory_bytes(self.batch_size if batch_size is None else batch_size)

    def predicted_memory_bytes(self, batch_size: int) -> int:
        """The accounting model's memory for ``batch_size`` at the current precisions, in bytes."""
        return self.costs.memory_bytes(batch_size, self.precision.precisions, self.profile)

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

    # ------------------------------------------------------------------------------------- private

    def _reset_peak_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)


@contextlib.contextmanager
def _probe_mode(model: nn.Module) -> Iterator[None]:
    """Train-mode normalisation that leaves running statistics untouched; dropout off."""
    saved = []
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            saved.append((module, module.momentum))
            module.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
        elif isinstance(module, nn.modules.dropout._DropoutNd):
            module.eval()
    try:
        yield
    finally:
        for module, momentum in saved:
            module.momentum = momentum
        model.train()

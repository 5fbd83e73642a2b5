"""Memory: reading the device, the fitted peak-memory model, budget checks, and CPU tensor-byte measurement.

The model predicts a training step's peak memory as a line in the micro-batch size ``b`` for a given
precision map ``P``::

    peak(b, P) = intercept(P) + bytes_per_sample(P) * b + margin(P)

fitted by least squares to measured peaks (the CUDA allocator's ``max_memory_allocated``) at a few batch
sizes; ``margin`` is the largest amount a measured peak lay above the line, so the prediction bounds
every measurement it was fitted to. A fitted slope that is not positive (peaks that fall or stay flat as the
batch grows: noise, or a pass whose peak counted memory it freed) would let every batch fit; the accounting's
bytes per sample (``CostModel``) stand in for it, and where those are not positive either (``CostModel.
parameters_only``, whose forward could not be measured), the most a measured pass added per sample (above the bytes
allocated before it, or the accounted fixed bytes without that reading), at least a byte. A precision map with no
measurement of its own borrows the line of the best-measured map, shifted by the difference of the accounted 16-bit
weight copies and with its slope scaled by the ratio of accounted activation bytes (``CostModel``). With no
measurement at all (CPU runs, profile cost mode) the prediction is the ``CostModel`` accounting itself.
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from triaccel_rl.config import ConfigError, HardwareProfile
from triaccel_rl.costs import CostModel
from triaccel_rl.errors import is_whole
from triaccel_rl.types import Precision

_log = logging.getLogger(__name__)

__all__ = [
    "FREED_TOLERANCE_BYTES",
    "DeviceMemory",
    "MemoryFit",
    "MemoryModel",
    "allocated_bytes",
    "check_budget",
    "device_capacity_bytes",
    "measure_tensor_bytes",
    "nvml_used_bytes",
    "peak_allocated_bytes",
    "read_device_memory",
]

FREED_TOLERANCE_BYTES = 1 << 20
"""How far the bytes allocated after a measured pass may fall below the previous reading before ``MemoryModel``
takes the pass to have freed memory allocated before it (and leaves its peak out): 1 MiB, well above the few bytes
a training loop's scalars move between steps."""
ALLOCATOR_ROUNDING_BYTES = 512
"""The CUDA caching allocator's block size: peaks that differ by no more were not told apart by a measurement."""


@dataclass(frozen=True)
class DeviceMemory:
    """A reading of a CUDA device's memory, in bytes.

    Attributes:
        total_bytes: the device's capacity.
        free_bytes: free on the device now (every process counted, as the driver and NVML report it).
        allocated_bytes: held by this process's live tensors (the caching allocator's count).
        reserved_bytes: held by this process's caching allocator, allocated or cached.
    """

    total_bytes: int
    free_bytes: int
    allocated_bytes: int
    reserved_bytes: int

    @property
    def available_bytes(self) -> int:
        """Its live tensors plus the device's free memory: what this process could hold right now.

        But for the blocks its allocator caches and cannot hand back (``reserved_bytes - allocated_bytes``, after
        ``empty_cache()`` the fragmented ones), which it may or may not fit in.
        """
        return self.allocated_bytes + self.free_bytes


def read_device_memory(device: torch.device) -> DeviceMemory:
    """Reads a CUDA device's memory (``cudaMemGetInfo``, the figure NVML reports, and the allocator's counts).

    Raises:
        ValueError: ``device`` is not a CUDA device (a CPU run uses its own accounting instead).
    """
    if device.type != "cuda":
        raise ValueError(f"device {device} has no memory to read; CPU runs use the cost model's accounting")
    free, total = torch.cuda.mem_get_info(device)
    return DeviceMemory(
        total_bytes=int(total),
        free_bytes=int(free),
        allocated_bytes=int(torch.cuda.memory_allocated(device)),
        reserved_bytes=int(torch.cuda.memory_reserved(device)),
    )


def peak_allocated_bytes(device: torch.device) -> int:
    """The CUDA allocator's peak of allocated bytes since its last reset: ``torch.cuda.max_memory_allocated``.

    Read from the allocator's nested statistics, skipping ``max_memory_allocated``'s flattening of about 150
    of them into a sorted dict: 66-90 µs of host time that every training step paid (measured on the CPU of
    the CI machine kind; comparable on the H200's host), against a step of 3.6 ms on the H200.
    """
    return allocated_bytes(device)[1]


def allocated_bytes(device: torch.device) -> tuple[int, int]:
    """The CUDA allocator's allocated bytes ``(now, peak since its last reset)``.

    One read of its nested statistics: ``torch.cuda.memory_allocated`` and ``max_memory_allocated`` without their
    flattening.
    """
    allocated = torch.cuda.memory_stats_as_nested_dict(device).get("allocated_bytes", {}).get("all", {})
    return int(allocated.get("current", 0)), int(allocated.get("peak", 0))


def nvml_used_bytes(device: torch.device) -> tuple[int, str] | None:
    """GPU memory as NVML (``pynvml``) reports it: ``(bytes, scope)``, or None where NVML cannot say.

    The allocator's peak counts live tensors only; NVML counts what the process holds on the device: the CUDA
    context, the caching allocator's whole reserve (cached blocks and captured graphs' pools included) and the
    libraries' own allocations. ``scope`` is ``"process"`` (this process's entry in the device's compute
    processes) or, where that entry is not visible (a container's PID namespace), ``"device"`` (everything used
    on the device, other processes included). The reserve only grows until it is emptied, so a reading after a
    run's steps bounds the run's footprint so far.

    None: not a CUDA device, ``pynvml`` missing, or NVML unavailable (no driver); logged once.
    """
    if device.type != "cuda":
        return None
    nvml = _nvml()
    if nvml is None:
        return None
    try:
        handle = _nvml_handle(torch.cuda.current_device() if device.index is None else device.index)
        if handle is None:
            return None
        pid = os.getpid()
        for process in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if process.pid == pid and process.usedGpuMemory is not None:
                return int(process.usedGpuMemory), "process"
        return int(nvml.nvmlDeviceGetMemoryInfo(handle).used), "device"
    except Exception as err:  # pynvml raises NVMLError subclasses, one per NVML return code
        _log.warning("NVML could not read device %s: %s", device, err)
        return None


@functools.cache
def _nvml() -> Any:
    """The initialised ``pynvml`` module, or None (missing, or no NVML library: a machine without a driver)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as err:  # ImportError, or pynvml.NVMLError_LibraryNotFound and kin
        _log.info("NVML unavailable (%s): GPU memory is read from the allocator only", err)
        return None
    return pynvml


@functools.cache
def _nvml_handle(index: int) -> Any:
    """The NVML handle of torch's CUDA device ``index``, matched by UUID (``CUDA_VISIBLE_DEVICES`` renumbers).

    A GPU's UUID is ``GPU-...`` to NVML, a MIG slice's ``MIG-...``. Where neither matches, torch's index is NVML's
    only without ``CUDA_VISIBLE_DEVICES``; with it, None and a warning once (no reading): taking the index anyway
    would read another GPU's memory and cache it as this one's.
    """
    nvml = _nvml()
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if uuid is not None:
        for prefix in ("GPU-", "MIG-"):
            try:
                return nvml.nvmlDeviceGetHandleByUUID(f"{prefix}{uuid}")
            except Exception:  # not this kind of device, or an older driver's UUID format
                pass
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:  # cached: said once, not at every reading
        _log.warning(
            "NVML: no device has CUDA device %s's UUID %s, and CUDA_VISIBLE_DEVICES renumbers the devices: no NVML "
            "reading for it",
            index,
            uuid,
        )
        return None
    return nvml.nvmlDeviceGetHandleByIndex(index)


def device_capacity_bytes(device: torch.device, cpu_capacity_bytes: int) -> int:
    """Memory a budget fraction is taken of: the GPU's capacity, or ``cpu_capacity_bytes`` on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return int(cpu_capacity_bytes)


def check_budget(budget_bytes: int, fixed_bytes: int, one_sample_bytes: int) -> None:
    """Raises a ``ConfigError`` saying how much one sample needs when ``budget_bytes`` cannot hold one.

    Args:
        budget_bytes: the resolved budget.
        fixed_bytes: predicted memory independent of the batch (weights, gradients, optimizer state, buffers).
        one_sample_bytes: predicted peak of a step on a single sample.
    """
    if not _count(budget_bytes, 0):  # NaN would pass both comparisons below
        raise ConfigError(f"memory budget {budget_bytes!r} must be a whole number of bytes >= 0")
    if budget_bytes < fixed_bytes:
        raise ConfigError(
            f"memory budget {budget_bytes} bytes is below the model's fixed {fixed_bytes} bytes (weights, "
            f"gradients, optimizer state, buffers); one sample needs {one_sample_bytes} bytes in all"
        )
    if budget_bytes < one_sample_bytes:
        raise ConfigError(
            f"memory budget {budget_bytes} bytes is smaller than one sample needs: {one_sample_bytes} bytes "
            f"({fixed_bytes} fixed + {one_sample_bytes - fixed_bytes} for the sample's activations)"
        )


@dataclass(frozen=True)
class MemoryFit:
    """A fitted line: ``peak(b) <= intercept_bytes + bytes_per_sample * b + margin_bytes``.

    Attributes:
        intercept_bytes: memory independent of the batch.
        bytes_per_sample: memory each sample of the micro-batch adds.
        margin_bytes: largest excess of a measured peak over the line (>= 0).
        n_sizes: distinct batch sizes of this precision map the line was fitted to (1: through one point with
            a borrowed slope; 0: transferred from another map, see ``MemoryModel.fit``).
    """

    intercept_bytes: float
    bytes_per_sample: float
    margin_bytes: float
    n_sizes: int

    def predict(self, batch_size: int) -> int:
        """Predicted peak at ``batch_size``, in bytes (rounded up)."""
        return math.ceil(self.intercept_bytes + self.bytes_per_sample * batch_size + self.margin_bytes)


class MemoryModel:
    """Peak memory of a step as a function of micro-batch size and precision map, fitted to measurements.

    Measurements given with the bytes allocated once the pass was over (``observe(..., allocated_bytes=...)``)
    are fitted as what the pass added above them, and predictions sit on the bytes allocated at the latest
    reading (``observe`` or ``rebase``): memory that stays allocated between steps (a captured CUDA graph's pool,
    the optimizer's state, a stream's cuBLAS workspace) moves the baseline instead of steepening the line. On an
    H200 a captured graph's memory had made an activation-heavy MLP's line 3.5x too steep (BENCHMARKS.md).

    Args:
        costs: the model's cost model (the accounting used before any measurement, and to transfer a fit
            from one precision map to another).
        profile: hardware profile whose memory factors weight the accounting.

    Example:
        >>> from triaccel_rl.precision import find_layers
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> costs = CostModel.measure(net, [i for _, _, i in find_layers(net)], torch.zeros(1, 4), 1)
        >>> model = MemoryModel(costs, HardwareProfile.load())
        >>> fp32 = [Precision.FP32, Precision.FP32]
        >>> model.observe(8, fp32, 10_000)
        >>> model.observe(16, fp32, 14_000)
        >>> model.predict(32, fp32)
        22000
        >>> rebased = MemoryModel(costs, HardwareProfile.load())
        >>> rebased.observe(8, fp32, 10_000, allocated_bytes=6_000)  # the pass added 4,000 above 6,000
        >>> rebased.observe(16, fp32, 15_000, allocated_bytes=7_000)  # 8,000 above 7,000
        >>> rebased.predict(32, fp32)  # 16,000 above the 7,000 allocated now
        23000
        >>> rebased.rebase(9_000)  # a captured graph's pool stays allocated
        >>> rebased.predict(32, fp32)
        25000
        >>> rebased  # points as what each pass added, on the first reading's baseline
        MemoryModel(points={'00': {8: 10000, 16: 14000}}, base_bytes=6000, now_bytes=9000, skipped_points=0)
    """

    def __init__(self, costs: CostModel, profile: HardwareProfile) -> None:
        self.costs = costs
        self._last_checked_key: tuple[int, ...] = ()  # the last map observe() checked
        self._last_checked: list[Any] = []  # its entries, as given
        self._revision = 0  # see revision
        self.profile = profile
        # Per precision map, the highest peak measured at each batch size (the max: conservative when the
        # allocator's fragmentation drifts), in insertion order so the latest map can be told.
        self._peaks: dict[tuple[int, ...], dict[int, int]] = {}
        self._base_bytes: int | None = None  # allocated bytes at the first reading: the points' common baseline
        self._now_bytes = 0  # allocated bytes at the latest reading
        self.skipped_points = 0  # passes not recorded because they freed memory allocated before them
        self._with_allocation: bool | None = None  # whether observe() was given allocated_bytes (always or never)

    @property
    def revision(self) -> int:
        """Counts the calls that may have changed what predictions read (``observe``, ``rebase``).

        A prediction taken at one revision holds until the next, for the same batch size and map: the Controller reads
        its CPU prediction at every step from a cache on them.
        """
        return self._revision

    @property
    def n_measurements(self) -> int:
        """Distinct (precision map, batch size) points measured so far."""
        return sum(len(points) for points in self._peaks.values())

    @property
    def baseline_shift_bytes(self) -> int:
        """What predictions add to the fitted lines: the bytes allocated since the first reading."""
        return 0 if self._base_bytes is None else self._now_bytes - self._base_bytes

    def __repr__(self) -> str:
        """The measured points per precision map (codes, 0 fp32), the first and latest readings, in bytes."""
        points = {"".join(map(str, key)): dict(sorted(sizes.items())) for key, sizes in self._peaks.items()}
        return (
            f"MemoryModel(points={points}, base_bytes={self._base_bytes}, now_bytes={self._now_bytes}, "
            f"skipped_points={self.skipped_points})"
        )

    def observe(
        self, batch_size: int, precisions: Sequence[Precision], peak_bytes: int, allocated_bytes: int | None = None
    ) -> None:
        """Records the measured peak of a step (or a trial) at micro-batch ``batch_size``.

        Args:
            batch_size: the micro-batch size of the pass.
            precisions: the precision map it ran with.
            peak_bytes: the allocator's peak during the pass.
            allocated_bytes: the bytes allocated once the pass was over; the point is then what the pass added
                above them, and they are the latest reading (see the class). Give it always or never. When they are
                more than ``FREED_TOLERANCE_BYTES`` below the previous reading, the pass freed memory allocated
                before it (garbage the collector took mid-pass, say), which its peak may count: the reading is
                taken, the point is not (``skipped_points`` counts them).

        Raises:
            ValueError: a non-positive batch size, a negative peak or allocation, or ``allocated_bytes`` given now and
                not before, or the other way round.
        """
        counts_ok = _count(batch_size, 1) and _count(peak_bytes, 0)
        if not counts_ok or (allocated_bytes is not None and not _count(allocated_bytes, 0)):  # NaN: set, then failed
            raise ValueError(
                f"need whole numbers batch_size >= 1, peak_bytes >= 0 and allocated_bytes >= 0; got {batch_size!r}, "
                f"{peak_bytes!r} and {allocated_bytes!r}"
            )
        key = self._checked_key(precisions)
        self._revision += 1  # the readings and points may change below
        # Mixed, the points would mean two things: whole peaks, and what a pass added on the first reading's baseline
        # (a whole peak taken after a rebase would count the baseline's shift twice).
        with_allocation = allocated_bytes is not None
        if self._with_allocation is not None and with_allocation != self._with_allocation:
            given = "with" if self._with_allocation else "without"
            raise ValueError(
                f"observe(allocated_bytes={allocated_bytes}) after points {given} allocated_bytes: give it always or "
                "never"
            )
        self._with_allocation = with_allocation
        if allocated_bytes is not None:
            freed_during = self._base_bytes is not None and allocated_bytes < self._now_bytes - FREED_TOLERANCE_BYTES
            allocated_bytes = int(allocated_bytes)  # 6000.0 is taken: stored as a float, predictions came out floats
            if self._base_bytes is None:
                self._base_bytes = allocated_bytes
            self._now_bytes = allocated_bytes
            if freed_during:
                self.skipped_points += 1
                return
            peak_bytes = max(peak_bytes - allocated_bytes, 0) + self._base_bytes
        points = self._peaks.setdefault(key, {})
        points[int(batch_size)] = max(points.get(int(batch_size), 0), int(peak_bytes))

    def rebase(self, allocated_bytes: int) -> None:
        """Records the bytes allocated now (after a step that is not a measurement, such as a graph replay).

        Predictions move with them once a measurement gave ``allocated_bytes``; before that it is a no-op.

        Raises:
            ValueError: a reading that is not a whole number >= 0 (2.5 was cut to 2, True read as 1, NaN failed in
                int()).
        """
        if not _count(allocated_bytes, 0):
            raise ValueError(f"allocated_bytes={allocated_bytes!r} must be a whole number >= 0")
        if self._base_bytes is not None:
            self._now_bytes = int(allocated_bytes)
            self._revision += 1

    def _checked_key(self, precisions: Sequence[Precision]) -> tuple[int, ...]:
        """``precisions``' key; a ValueError for a map of another length than the layers or holding no precision code.

        A point stored under such a map could become the reference map, after which every prediction raised. A map
        of :class:`Precision` members equal to the last one checked is not checked again (the Controller observes every
        step, mostly under one map); any other entry is, every time (``False`` or ``0.4`` made the key of fp32's map).
        Told without a loop in Python (which took 10 to 40 us a step): the entries' types, then the entries compared
        with the last map's, in C; equal values alone would not do (``False == Precision.FP32``).
        """
        precisions = list(precisions)  # read twice below: a generator was used up by the key, and checked empty
        if precisions and set(map(type, precisions)) == {Precision} and precisions == self._last_checked:
            return self._last_checked_key
        try:
            key = _key(precisions)
        except (TypeError, ValueError):
            key = ()
        n_layers = len(self.costs.layers)
        if len(key) != n_layers or not all(_valid_code(p) for p in precisions):
            shown = [p.name.lower() if isinstance(p, Precision) else p for p in precisions]
            codes = ", ".join(f"{int(p)} ({p.name.lower()})" for p in Precision)
            raise ValueError(
                f"precisions {shown} must be one precision code, {codes}, for each of the {n_layers} layers"
            )
        self._last_checked_key, self._last_checked = key, precisions
        return key

    def fit(self, precisions: Sequence[Precision]) -> MemoryFit | None:
        """The line for ``precisions``, or ``None`` when nothing was measured (predictions use the accounting).

        Fitted by least squares when this map was measured at two or more sizes (a slope that comes out zero or
        negative is replaced by the accounting's, see the module); through its one measured point with a borrowed
        slope when at one; otherwise the best-measured map's line, shifted by the difference in accounted weight
        copies, with the borrowed slope.
        """
        key = self._checked_key(precisions)
        own = self._peaks.get(key, {})
        if len(own) >= 2:
            return self._own_line(key)
        reference = self._reference_key()
        if reference is None:
            return None
        ref_points = self._peaks[reference]
        ref_fit = self._own_line(reference) if len(ref_points) >= 2 else None
        slope = self._transfer_slope(reference, key, ref_fit)
        if own:
            return _through_point(own, slope, n_sizes=1)
        ref_line = ref_fit or _through_point(ref_points, self._transfer_slope(reference, reference, None), n_sizes=1)
        shift = self.costs.fixed_bytes(_precisions(key)) - self.costs.fixed_bytes(_precisions(reference))
        return MemoryFit(ref_line.intercept_bytes + shift, slope, ref_line.margin_bytes, 0)

    def predict(self, batch_size: int, precisions: Sequence[Precision]) -> int:
        """Predicted peak memory of a step at micro-batch ``batch_size`` and ``precisions``, in bytes.

        ``batch_size`` 0 gives the memory independent of the batch.

        Raises:
            ValueError: a batch size that is not a whole number >= 0 (2.5 was predicted, NaN raised in int()).
        """
        if not _count(batch_size, 0):
            raise ValueError(
                f"batch_size={batch_size!r} must be a whole number >= 0 (0: the memory independent of the batch)"
            )
        return self._predictor(precisions)(batch_size)

    def max_batch_size(self, budget_bytes: int, precisions: Sequence[Precision], limit: int) -> int:
        """Largest micro-batch in ``[0, limit]`` predicted to fit ``budget_bytes`` (0: not even one sample).

        Raises:
            ValueError: ``limit`` is not a whole number (a bisection on 2.5 never ended), or ``budget_bytes`` is not a
                number (NaN fitted one sample: every comparison with it is false).
        """
        if not is_whole(limit):
            raise ValueError(f"limit={limit!r} must be a whole number of samples")
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, numbers.Real) or math.isnan(budget_bytes):
            raise ValueError(f"budget_bytes={budget_bytes!r} must be a number of bytes")
        limit = int(limit)
        predict = self._predictor(precisions)  # fitted once, then evaluated ~log2(limit) times
        if limit < 1 or predict(1) > budget_bytes:
            return 0
        low, high = 1, limit  # the prediction is non-decreasing in the batch: bisect on it (exact, any model)
        while low < high:
            middle = (low + high + 1) // 2
            if predict(middle) <= budget_bytes:
                low = middle
            else:
                high = middle - 1
        return low

    def _predictor(self, precisions: Sequence[Precision]) -> Callable[[int], int]:
        precisions = list(precisions)  # read by fit() and again below: a generator was used up by the first
        fitted = self.fit(precisions)
        if fitted is not None:
            shift = self.baseline_shift_bytes
            return lambda batch_size: fitted.predict(batch_size) + shift
        key = self._checked_key(precisions)  # integer codes work here too, as observe() takes them
        fixed = self.costs.fixed_bytes(_precisions(key))
        per_sample = self.costs.per_sample_bytes(_precisions(key), self.profile)
        return lambda batch_size: int(fixed + batch_size * per_sample)  # == CostModel.memory_bytes

    def _own_line(self, key: tuple[int, ...]) -> MemoryFit:
        """The least-squares line through ``key``'s points (two sizes or more).

        Where its slope is not positive, or rises by no more than the allocator's rounding
        (``ALLOCATOR_ROUNDING_BYTES``) across the measured sizes, the least-squares line of the accounting's slope.
        """
        points = self._peaks[key]
        fitted = _fit_line(points, slope=None)
        # Flat within the allocator's rounding: a slope of a byte a sample (peaks one byte apart) would predict batch
        # 100000 at 10 MB where the accounting says 244 MB, and every batch would fit
        if fitted.bytes_per_sample * (max(points) - min(points)) > ALLOCATOR_ROUNDING_BYTES:
            return fitted
        accounted = self.costs.per_sample_bytes(_precisions(key), self.profile)
        return _fit_line(self._peaks[key], slope=self._positive(accounted, key))

    def _positive(self, slope: float, key: tuple[int, ...]) -> float:
        """``slope`` where positive; else what ``key``'s points measure a sample to add (at least a byte).

        A slope of 0 (the accounting of a model whose forward could not be measured, ``CostModel.parameters_only``)
        made every batch fit: a 3 GB peak at batch 64 predicted 3 GB at batch 4096.
        """
        if slope > 0:
            return slope
        # What a pass added above the bytes allocated before it, where the readings say; else above the fixed bytes.
        below = self._base_bytes if self._base_bytes is not None else self.costs.fixed_bytes(_precisions(key))
        per_sample = max(((peak - below) / size for size, peak in self._peaks.get(key, {}).items()), default=0.0)
        return max(per_sample, 1.0)

    def _reference_key(self) -> tuple[int, ...] | None:
        """The best-measured map: most distinct sizes, the latest among equals."""
        best: tuple[int, ...] | None = None
        for key, points in self._peaks.items():
            if best is None or len(points) >= len(self._peaks[best]):
                best = key
        return best

    def _transfer_slope(self, reference: tuple[int, ...], key: tuple[int, ...], ref_fit: MemoryFit | None) -> float:
        """Bytes per sample at ``key``.

        The reference's fitted slope × the ratio of accounted activation bytes, or the accounting's own slope
        when the reference has no fitted slope.
        """
        accounted = self.costs.per_sample_bytes(_precisions(key), self.profile)
        if ref_fit is None:
            return self._positive(accounted, key if key in self._peaks else reference)
        ref_accounted = self.costs.per_sample_bytes(_precisions(reference), self.profile)
        if ref_accounted <= 0 or accounted <= 0:
            return ref_fit.bytes_per_sample
        return ref_fit.bytes_per_sample * accounted / ref_accounted


def measure_tensor_bytes(
    model: nn.Module, optimizer: torch.optim.Optimizer, forward_loss: Callable[[], torch.Tensor]
) -> int:
    """Peak bytes of a training step's tensors, measured from the tensors themselves (for CPU runs).

    Counts the parameters, their gradients and the optimizer's state tensors, plus every tensor autograd
    saves for the backward pass during ``forward_loss()`` (through ``saved_tensors_hooks``; the bytes of a
    storage that saved tensors span are counted once however many of them overlap, and parameters saved by
    reference are not counted again). A saved view counts the bytes it spans, not its whole storage: a batch
    sliced from a dataset tensor counts the batch, not the dataset (a narrow view of an activation counts its
    span too, though autograd keeps the whole activation alive). The backward pass frees the saved tensors,
    so their total at the end of the forward pass is the activation peak. Runs the backward pass, leaving
    gradients accumulated (zero them as a step would).

    Args:
        model: the model.
        optimizer: its optimizer (state tensors counted as they are now).
        forward_loss: runs the forward pass and returns the scalar loss.
    """
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    spans: dict[int, list[tuple[int, int]]] = {}  # by storage: the byte ranges saved tensors span in it

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        pointer = tensor.untyped_storage().data_ptr()
        if pointer not in parameter_storages and tensor.numel():
            # From the first element to the last, strides included: an expanded tensor (stride 0) spans its one
            # copy, a column slice the rows it crosses. The storage's own size counted a batch sliced from the
            # dataset as the whole dataset.
            last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True))
            start = int(tensor.storage_offset()) * tensor.element_size()
            spans.setdefault(pointer, []).append((start, start + int(last + 1) * tensor.element_size()))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = forward_loss()
    activations = sum(_covered_bytes(ranges) for ranges in spans.values())
    loss.backward()
    static = 0
    for p in model.parameters():
        static += p.numel() * p.element_size()
        if p.requires_grad:
            static += p.numel() * p.element_size()  # the gradient, allocated whether or not it exists yet
    for state in optimizer.state.values():
        static += sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
    return int(static + activations)


def _covered_bytes(ranges: list[tuple[int, int]]) -> int:
    """Bytes in the union of half-open ``[start, end)`` ranges: overlapping views of one storage count once."""
    covered = reach = 0
    for start, end in sorted(ranges):
        if end > reach:
            covered += end - max(start, reach)
            reach = end
    return covered


def _valid_code(value: object) -> bool:
    """A precision (or its code as a whole number: 1.7 was read as 1)."""
    if isinstance(value, Precision):
        return True
    return is_whole(value) and int(value) in _PRECISION_CODES  # type: ignore[call-overload]


_PRECISION_CODES = frozenset(int(p) for p in Precision)


def _key(precisions: Sequence[Precision]) -> tuple[int, ...]:
    return tuple(int(p) for p in precisions)


def _precisions(key: tuple[int, ...]) -> list[Precision]:
    return [Precision(v) for v in key]


def _fit_line(points: dict[int, int], slope: float | None) -> MemoryFit:
    """The least-squares line through ``points`` (two sizes or more), or the least-squares line of ``slope``.

    Either way the margin lifts it over every point.
    """
    sizes = np.array(list(points), dtype=np.float64)
    peaks = np.array(list(points.values()), dtype=np.float64)
    if slope is None:
        centred = sizes - sizes.mean()
        slope = float(np.dot(centred, peaks - peaks.mean()) / np.dot(centred, centred))
    intercept = float(peaks.mean() - slope * sizes.mean())
    margin = max(float(np.max(peaks - (intercept + slope * sizes))), 0.0)
    return MemoryFit(intercept, slope, margin, len(points))


def _through_point(points: dict[int, int], slope: float, n_sizes: int) -> MemoryFit:
    size, peak = next(iter(points.items()))
    return MemoryFit(peak - slope * size, slope, 0.0, n_sizes)


def _count(value: object, least: int) -> bool:
    """A whole number (Python's or NumPy's, or a float holding one, as byte counts may come) >= ``least``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    number = float(value)
    return math.isfinite(number) and number.is_integer() and number >= least

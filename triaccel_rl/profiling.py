"""Measures a ``HardwareProfile``: per-precision step-time and memory factors of this machine's device.

The reference workload is a CIFAR-shaped ResNet-18 training step (SGD, channels_last on a GPU), timed
in fp32, bf16 autocast and fp16 autocast with a GradScaler; the fixed per-step cost comes from a tiny MLP
step. ``triaccel-rl profile`` writes the result as JSON for the environment's ``profile`` cost mode.
"""

from __future__ import annotations

import numbers
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from triaccel_rl.config import HardwareProfile
from triaccel_rl.costs import CostModel
from triaccel_rl.elastic import is_out_of_memory
from triaccel_rl.engine import native_bf16
from triaccel_rl.experiment import tqdm_disable
from triaccel_rl.models import MLP, SmallResNet, resnet18
from triaccel_rl.precision import find_layers
from triaccel_rl.training import seed_run_generators
from triaccel_rl.types import Precision

__all__ = ["cuda_chunk_ms", "cuda_kernel_counts", "measure_profile"]


def measure_profile(
    device: str | torch.device = "cuda",
    batch_size: int = 256,
    steps: int = 20,
    small: bool = False,
    progress: bool | None = False,
) -> HardwareProfile:
    """Times training steps per precision on ``device`` and returns the profile (medians of ``steps``).

    The time factors are each precision's median step time above the fixed per-step time over fp32's (the fixed
    time is the tiny MLP's step): ``CostModel.step_ms`` scales the batch's part of a step by them and adds the fixed
    time once, so the profile models each measured step as measured (whole-step ratios, fixed time included, modelled
    a 4.0 ms bf16 step of a 10 ms fp32 one with 2 ms fixed as 5.2 ms). The memory factors are each precision's peak
    allocation above the steady state over fp32's, on a GPU (on the CPU there is no allocator to read: all 1.0);
    a precision the device cannot run (bf16 on an older GPU) gets factors of 1.0. The profile's ``device`` names
    the factors of 1.0 that were not measured.

    Leaves the caller's random number generators as they were (torch's on the CPU and on ``device``): the
    measurement seeds and draws in a fork of them.

    Args:
        device: where to measure: a CUDA device or the CPU.
        batch_size: batch of the reference workload, a positive integer.
        steps: timed steps per precision (after 3 warm-up steps, excluded), a positive integer.
        small: use a small ResNet instead of ResNet-18 (for quick checks on a CPU).
        progress: a tqdm bar on stderr over the precisions and the fixed-cost timing (minutes on a CPU): True always,
            False never, None only where stderr is a terminal (``triaccel-rl profile``'s; ``experiment.tqdm_disable``).

    Raises:
        ValueError: ``steps`` or ``batch_size`` is not a positive integer, ``device`` is not a CUDA device or the
            CPU (others, such as ``mps``, have no timer here), the CUDA device asked for is not there, or the batch
            does not fit in its memory.
    """
    device = profile_device(device, batch_size, steps)
    try:
        # Forked: the measurement's seeding and draws re-seeded the caller's generators.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            return _measure(device, batch_size, steps, small, progress)
    except RuntimeError as err:  # torch.OutOfMemoryError is one
        # A batch the device cannot hold ended in a traceback (exit 1) where bad input is one line naming the flag;
        # one whose byte count overflows int64 is refused by the allocator's size check as well.
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if not (is_out_of_memory(err) or "storage size calculation overflowed" in first.lower()):
            raise
        raise ValueError(
            f"measure_profile: batch_size={batch_size} does not fit in {device}'s memory ({first}); give a smaller one"
        ) from None


def _measure(device: torch.device, batch_size: int, steps: int, small: bool, progress: bool | None) -> HardwareProfile:
    """:func:`measure_profile` once its arguments are checked."""
    build: Callable[[], nn.Module] = (lambda: SmallResNet(3, (8, 16), 10)) if small else (lambda: resnet18(3, 10))
    channels_last = device.type == "cuda"
    seed_run_generators(0, device)  # the batch too: drawn from the caller's state, a profile's inputs varied with it
    x = torch.randn(batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    times: dict[str, float] = {}
    memory: dict[str, float] = {}
    precisions = [precision for precision in Precision if _runs(precision, device)]
    # Closed on the way out: a Ctrl-C's message was printed on the bar's line, and the bar drawn again after it.
    disable = tqdm_disable(progress)
    with tqdm(total=len(precisions) + 1, desc="profile", unit="part", disable=disable, dynamic_ncols=True) as bar:
        for precision in precisions:
            bar.set_postfix_str(precision.name.lower())
            # The CPU's and the device's generators, those the fork restores: torch.manual_seed also seeded every
            # CUDA device's (queued for CUDA's start on a CPU), behind the caller.
            seed_run_generators(0, device)
            model = build().to(device)
            if channels_last:
                model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
            times[precision.name.lower()], memory[precision.name.lower()] = _time_steps(model, x, y, precision, steps)
            bar.update()
        bar.set_postfix_str("fixed per-step cost")
        fixed_ms = _time_steps(MLP(32, (32,), 10).to(device), torch.randn(8, 32, device=device),
                               torch.randint(0, 10, (8,), device=device), Precision.FP32, steps)[0]  # fmt: skip
        bar.update()
    fp32_ms = times["fp32"]
    model = build()
    costs = CostModel.measure(model, [info for _, _, info in find_layers(model)], torch.zeros(1, 3, 32, 32), 1)
    mflops = 3.0 * float(costs.flops_per_sample.sum()) / 1e6
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    # Factors of 1.0 that were never measured say so in the name (they read as measured before).
    unmeasured = "; memory factors not measured on a CPU" if device.type == "cpu" else ""
    unmeasured += "; bf16 not native here: its factors are fp32's" if "bf16" not in times else ""
    return HardwareProfile(
        device=f"{name} (measured by triaccel-rl profile: {'small ResNet' if small else 'ResNet-18'}, "
        f"batch {batch_size}, {time.strftime('%Y-%m-%d')}{unmeasured})",
        # Above the fixed time, as step_ms applies them: whole-step ratios did not give back the steps they came from.
        time_factor={k: max(v - fixed_ms, 1e-6) / max(fp32_ms - fixed_ms, 1e-6) for k, v in times.items()}
        | {k: 1.0 for k in ("bf16", "fp16") if k not in times},
        memory_factor={k: v / memory["fp32"] for k, v in memory.items()}
        | {k: 1.0 for k in ("bf16", "fp16") if k not in memory},
        fixed_ms=fixed_ms,
        throughput_scale=max(fp32_ms - fixed_ms, 1e-6) / (batch_size * mflops),
    )


def profile_device(device: str | torch.device, batch_size: int = 256, steps: int = 20) -> torch.device:
    """``measure_profile``'s argument checks alone: the device it would profile, or the ``ValueError`` it would raise.

    For a caller that says something about the device before the minutes of measuring (the CLI's note that a CPU
    profile's memory factors are not measured), so that nothing is said about a device that is then refused.
    """
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"measure_profile: {name}={value!r} must be a positive integer")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"measure_profile: device={device!r} is not a device ({exc}); use 'cuda' or 'cpu'") from None
    if device.type not in ("cuda", "cpu"):
        raise ValueError(
            f"measure_profile: device={str(device)!r} cannot be profiled; use a CUDA device or 'cpu' (the step "
            "timer uses CUDA events on a GPU and the host clock on the CPU only)"
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"measure_profile: device={str(device)!r}, but CUDA is not available here; use 'cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(
            f"measure_profile: device={str(device)!r}, but this machine has {torch.cuda.device_count()} CUDA "
            f"device(s): cuda:0..cuda:{torch.cuda.device_count() - 1}"
        )
    return device


def _runs(precision: Precision, device: torch.device) -> bool:
    """Whether ``device`` computes in ``precision``: all but bf16 on a GPU without it (a V100 or T4)."""
    return not (device.type == "cuda" and precision is Precision.BF16 and not native_bf16(device))


def _time_steps(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, precision: Precision, steps: int
) -> tuple[float, float]:
    """Median step time in ms and the step's peak activation bytes (allocator on GPU, else 1.0)."""
    device = x.device
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=precision is Precision.FP16)
    low = precision is not Precision.FP32

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=precision.dtype, enabled=low):
            loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    for _ in range(3):  # warm-up: cuDNN autotuning and allocator growth, excluded from timing
        step()
    samples = []
    baseline = 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(torch.cuda.current_stream(device))  # the run's device, not the current one
            step()
            end.record(torch.cuda.current_stream(device))
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            step()
            samples.append((time.perf_counter() - begin) * 1e3)
    peak = float(torch.cuda.max_memory_allocated(device) - baseline) if device.type == "cuda" else 1.0
    return statistics.median(samples), max(peak, 1.0)


def cuda_chunk_ms(step: Callable[[], object], steps: int = 10) -> float:
    """Milliseconds a step over ``steps`` consecutive calls of ``step``, by CUDA events on the current stream.

    One chunk: its events bracket the steps, so a host-bound step is timed by its host's pace and a GPU-bound one by its
    kernels', as a training loop runs them (no sync between the steps). Benchmarks take the median over chunks
    (``scripts/check_grad_binding_cost.py``, ``scripts/profile_user_loop.py``).
    """
    if steps < 1:
        raise ValueError(f"steps={steps!r} must be at least 1")
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(steps):
        step()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / steps


def cuda_kernel_counts(step: Callable[[], object], steps: int = 10) -> dict[str, float]:
    """GPU activities a step launches (kernels, memcpys, memsets) by name, a mean over ``steps`` calls (torch.profiler).

    Their sum is the step's launch count, the measure of a host-bound step's launch overhead.
    """
    if steps < 1:
        raise ValueError(f"steps={steps!r} must be at least 1")
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    return {
        event.key: event.count / steps
        for event in prof.key_averages()
        if event.device_type == torch.autograd.DeviceType.CUDA
    }

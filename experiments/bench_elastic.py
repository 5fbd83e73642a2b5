"""Memory-elastic batching on a GPU: a CIFAR-shaped ResNet-18 (bf16) under half the memory its batch needs.

Three parts, each a ``TrainingRun`` on seeded synthetic CIFAR-shaped data held on the GPU:

1. **Batch finder.** The largest power-of-two batch ``B*`` whose unsplit training step fits the device
   (a ``MemoryBudget`` of 90% of it), found as Lightning's ``BatchSizeFinder`` does: doubling from 1 with
   real forward/backward trials measured by the CUDA allocator. ``P*`` is the trial's peak at ``B*``.
2. **Budgeted run.** Effective batch ``B*``, memory budget ``P* / 2``: every step is split into the
   micro-batches the fitted memory model predicts to fit (90% of the budget), gradients accumulate, one
   update per step. Checks: no crash, every sample exactly once per epoch (``samples_seen ==
   samples_expected``), peak within the budget and using at least 85% of it.
3. **OOM recovery.** Effective batch ``4 B*`` and a deliberately wrong budget of twice the device's
   memory (set on the run directly: ``MemoryBudget`` itself refuses a budget above the device), so the
   first step runs out of memory for real; the run must recover (``oom_events >= 1``) and finish with no
   sample lost.

Also recorded: the memory model's prediction error on the budgeted run's first step (predicted from the
two calibration trials only, before any step). Writes ``experiments/results/elastic_batch.json``
(``device``, ``budget_bytes``, ``peak_bytes``, ``budget_use_frac``, ``oom_events``, ``samples_seen``,
``samples_expected``, date, commit, command, and the same for the OOM run) and prints a table last.
Exits 1 when a check fails.

Usage (GPU, about a minute on an H100): ``python experiments/bench_elastic.py``.
Smoke test (CPU, tiny widths, memory from the accounting, the OOM injected):
``python experiments/bench_elastic.py --smoke --output /tmp/elastic_batch.json``.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import math
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from triaccel_rl.compare import json_safe
from triaccel_rl.config import ElasticConfig, MemoryBudget
from triaccel_rl.elastic import find_batch_size, inject_oom
from triaccel_rl.experiment import away_from_results, command_line, cpu_machine, file_to_write, git_commit, parse_args
from triaccel_rl.models import SmallResNet
from triaccel_rl.tasks import Task, TaskData
from triaccel_rl.training import TrainingRun


@dataclass
class Args:
    """Command-line arguments; each field is a ``--flag`` (underscores become dashes)."""

    smoke: bool = False
    """Run on the CPU with tiny widths and batches (memory from the accounting; the OOM is injected)."""
    width: int = 64
    """Channels of the first ResNet-18 stage (64 is the standard model; later stages double it)."""
    max_batch: int = 65536
    """Largest batch the finder tries (a power of two; the finder's dataset holds this many samples)."""
    epochs: int = 2
    """Epochs of the budgeted run."""
    steps_per_epoch: float = 6.3
    """Dataset size of the budgeted run in effective batches (a fraction leaves a short last batch)."""
    fill_frac: float = 0.9
    """Share of the budget micro-batches are planned to fill (``ElasticConfig.fill_frac``)."""
    min_use_frac: float = 0.85
    """The budgeted run's peak must use at least this share of the budget."""
    max_run_s: float = 60.0
    """Wall-clock limit of each training run, in seconds (a run cut short is reported as truncated)."""
    seed: int = 0
    """Seeds the models, the data and its order."""
    output: str = "experiments/results/elastic_batch.json"
    """Where to write the JSON results."""


# ------------------------------------------------------------------------------------------------ model


def resnet18_of_width(width: int = 64, n_classes: int = 10) -> nn.Module:
    """The CIFAR-style ResNet-18 of ``triaccel_rl.models`` (3×3 stem, no max-pool, 4 stages of 2 blocks), any width."""
    return SmallResNet(3, tuple(width * 2**stage for stage in range(4)), n_classes, blocks_per_stage=2)


def cifar_task(n_train: int, width: int, base_batch_size: int, device: torch.device) -> Task:
    """A CIFAR-shaped task: 10 Gaussian class clusters in 3×32×32 image space, generated on ``device``."""

    def load(n: int | None, n_test: int | None, seed: int) -> TaskData:
        generator = torch.Generator(device=device).manual_seed(seed)
        means = torch.randn(10, 3, 32, 32, generator=generator, device=device) * 0.5
        labels = torch.randint(0, 10, (n_train + 512,), generator=generator, device=device)
        images = means[labels] + torch.randn(n_train + 512, 3, 32, 32, generator=generator, device=device)
        return TaskData(images[:n_train], labels[:n_train], images[n_train:], labels[n_train:])

    return Task(
        name="resnet18-cifar-synthetic",
        description="ResNet-18 on synthetic CIFAR-shaped data",
        build_model=lambda: resnet18_of_width(width),
        load_data=load,
        optimizer="sgd",
        base_lr=0.05,
        base_batch_size=base_batch_size,
    )


# ------------------------------------------------------------------------------------------------ logic


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    command = command_line("experiments/bench_elastic.py", args)  # as given (--smoke narrows the settings below)
    if args.smoke:
        device = torch.device("cpu")
        torch.set_num_threads(1)
        args = dataclasses.replace(
            args,
            width=min(args.width, 8),
            max_batch=min(args.max_batch, 64),
            output=away_from_results("--output", args.output, Args.output),  # the recorded GPU results stay
        )
    elif not torch.cuda.is_available():
        print("no CUDA device; run with --smoke for a CPU smoke test", file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda")
        torch.backends.cudnn.benchmark = False  # micro-batch sizes vary: no autotuning per shape
    try:  # checked now: a folder was found only when the results were written, after every run
        output = file_to_write("--output", args.output, example="elastic_batch.json")
    except ValueError as err:
        raise SystemExit(str(err)) from None
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_machine()
    print(f"device {device_name}, torch {torch.__version__}, ResNet-18 width {args.width}, bf16")

    finder = find_largest_batch(args, device)
    _release_memory()  # each part's run (model, data on the GPU) is unreachable once the part returns
    print(f"batch finder: B* = {finder['batch_size']}, peak {_gib(finder['peak_bytes'])} (tried {finder['tried']})")
    budget = finder["peak_bytes"] // 2
    budgeted = run_budgeted(args, device, finder["batch_size"], budget)
    _release_memory()
    print(f"budgeted run: peak {_gib(budgeted['peak_bytes'])} of {_gib(budget)}, {budgeted['wall_s']:.1f} s")
    oom = run_oom_recovery(args, device, finder["batch_size"])
    _release_memory()

    checks = {
        "samples_exact": budgeted["samples_exact"] and not budgeted["truncated"],
        "within_budget": budgeted["peak_bytes"] <= budget,
        "uses_budget": budgeted["budget_use_frac"] >= args.min_use_frac,
        "oom_recovered": oom["oom_events"] >= 1 and oom["samples_exact"],
    }
    result = {
        "device": device_name,
        "budget_bytes": budget,
        "peak_bytes": budgeted["peak_bytes"],
        "budget_use_frac": budgeted["budget_use_frac"],
        "oom_events": budgeted["oom_events"],
        "samples_seen": budgeted["samples_seen"],
        "samples_expected": budgeted["samples_expected"],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "command": command,
        "torch": torch.__version__,
        "checks": {name: "PASS" if ok else "FAIL" for name, ok in checks.items()},
        "batch_finder": finder,
        "budgeted_run": budgeted,
        "oom_run": oom,
    }
    output.write_text(json.dumps(json_safe(result), indent=2, allow_nan=False) + "\n")  # a NaN loss: null
    print(f"results: {output}")
    for name, ok in checks.items():
        print(f"check {name}: {'PASS' if ok else 'FAIL'}")
    _print_table(result)
    return 0 if all(checks.values()) else 1


def find_largest_batch(args: Args, device: torch.device) -> dict[str, Any]:
    """Largest power of two whose unsplit bf16 step fits 90% of the device; its peak; the sizes tried."""
    # The trials draw from the run's data: hold the largest trial's samples (plus the 16 of the probe batch).
    run = _make_run(args, device, n_train=args.max_batch + 16, batch_size=args.max_batch, memory=MemoryBudget())
    peaks: dict[int, int | None] = {}

    def fits(size: int) -> bool:
        if run.measures_memory:
            peaks[size] = run.trial_peak_bytes(size)  # a real forward/backward pass; None on out of memory
        else:
            peaks[size] = run.predicted_memory_bytes(size)
        peak = peaks[size]
        return peak is not None and peak <= run.memory_budget_bytes

    batch = find_batch_size(fits, limit=args.max_batch)
    if batch == 0:
        raise RuntimeError("not even one sample fits the device")
    peak = peaks[batch]
    assert peak is not None
    result = {
        "batch_size": batch,
        "peak_bytes": int(peak),
        "device_budget_bytes": run.memory_budget_bytes,
        "tried": {str(size): value for size, value in peaks.items()},
    }
    return result


def run_budgeted(args: Args, device: torch.device, batch: int, budget: int) -> dict[str, Any]:
    """Effective batch ``batch`` under ``budget`` bytes: micro-batches, accumulation, exact sample accounting."""
    n_train = int(args.steps_per_epoch * batch)
    run = _make_run(args, device, n_train=n_train, batch_size=batch, memory=MemoryBudget(bytes=budget))
    micro = run.micro_batch_size()
    predicted = run.predicted_memory_bytes(micro)  # from the two calibration trials only
    stats = train(run, args.epochs, args.max_run_s)
    first_peak = stats["first_step_peak_bytes"]
    stats.update(
        budget_bytes=budget,
        budget_use_frac=stats["peak_bytes"] / budget,
        first_step_micro_batch=micro,
        first_step_predicted_bytes=predicted,
        prediction_error_frac=(predicted - first_peak) / first_peak if first_peak else None,
    )
    return stats


def run_oom_recovery(args: Args, device: torch.device, batch: int) -> dict[str, Any]:
    """Effective batch ``4 * batch`` under a budget of twice the device: a real OOM, then recovery."""
    big = 4 * batch
    run = _make_run(args, device, n_train=2 * big, batch_size=big, memory=MemoryBudget())
    capacity = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    if capacity is not None:
        told = 2 * capacity
    else:  # CPU smoke: the "device" holds what the accounting gives a batch of ``batch``; the OOM is injected
        told = 2 * run.predicted_memory_bytes(big)
        holds = run.predicted_memory_bytes(batch)
        run.fault = inject_oom(lambda point: run.predicted_memory_bytes(point.micro_batch_size) > holds)
    run.memory_budget_bytes = told  # deliberately wrong (MemoryBudget would refuse it): the plan will not fit
    stats = train(run, epochs=1, max_run_s=args.max_run_s)
    stats.update(
        told_budget_bytes=told,
        final_budget_bytes=run.memory_budget_bytes,
        oom_log=[dataclasses.asdict(event) for event in run.oom_log],
    )
    return stats


def train(run: TrainingRun, epochs: int, max_run_s: float) -> dict[str, Any]:
    """Trains ``epochs`` epochs (or until ``max_run_s``); checks every sample was applied once per epoch."""
    applied: dict[int, list[int]] = defaultdict(list)
    expected = epochs * len(run.loader)
    peak = 0
    first_peak = 0
    micro_batches: list[list[int]] = []
    losses: list[float] = []
    oom_events = 0
    start = time.perf_counter()
    truncated = False
    while run.samples_seen < expected:
        if time.perf_counter() - start > max_run_s:
            truncated = True
            break
        stats = run.step()
        assert run.last_batch is not None
        applied[run.last_batch.epoch].extend(run.last_batch.indices.tolist())
        peak = max(peak, stats.memory_bytes)
        first_peak = first_peak or stats.memory_bytes
        oom_events += stats.oom_events
        micro_batches.append(run.last_micro_batches)
        losses.append(stats.loss)
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    wall_s = time.perf_counter() - start
    n = len(run.loader)
    epochs_done = [indices for epoch, indices in sorted(applied.items()) if len(indices) == n]
    exact = (
        all(sorted(indices) == list(range(n)) for indices in epochs_done)
        and all(len(set(indices)) == len(indices) for indices in applied.values())
        and run.samples_seen == sum(len(indices) for indices in applied.values())
    )
    return {
        "effective_batch": run.batch_size,
        "micro_batches_first_step": micro_batches[0] if micro_batches else [],
        "micro_batches_last_step": micro_batches[-1] if micro_batches else [],
        "steps": run.steps,
        "peak_bytes": int(peak),
        "first_step_peak_bytes": int(first_peak),
        "oom_events": oom_events,
        "samples_seen": run.samples_seen,
        "samples_expected": expected,
        "samples_exact": exact,
        "truncated": truncated,
        "wall_s": wall_s,
        "samples_per_s": run.samples_seen / wall_s if wall_s > 0 else None,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
    }


# --------------------------------------------------------------------------------------------- plumbing


def _make_run(args: Args, device: torch.device, n_train: int, batch_size: int, memory: MemoryBudget) -> TrainingRun:
    task = cifar_task(n_train, args.width, base_batch_size=batch_size, device=device)
    run = TrainingRun(
        task,
        seed=args.seed,
        device=device,
        batch_size=batch_size,
        memory=memory,
        n_probe=16,
        elastic=ElasticConfig(fill_frac=args.fill_frac),
    )
    controllable = sum(info.controllable for info in run.layers)
    run.set_precisions(["bf16"] * controllable)
    run.calibrate_memory()  # again, in bf16 (construction calibrated the fp32 model)
    return run


def _release_memory() -> None:
    gc.collect()  # the run's model and data: hooks make reference cycles
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _parse_args(argv: list[str] | None) -> Args:
    """``Args`` from ``argv`` (each field a ``--flag`` whose help is its docstring), checked by :func:`_check_args`."""
    args = parse_args(Args, argv, __doc__)
    _check_args(args)
    return args


def _check_args(args: Args) -> None:
    """``SystemExit`` naming the first setting that cannot run, before any run.

    Before, nothing was checked: ``--epochs 0`` trained nothing and was reported as the memory model failing its
    checks (``samples_exact`` FAIL), after the batch finder's minutes.
    """
    for flag, value in (("--epochs", args.epochs), ("--width", args.width), ("--max-batch", args.max_batch)):
        if value < 1:
            raise SystemExit(f"{flag} {value} must be >= 1")
    if not (math.isfinite(args.steps_per_epoch) and args.steps_per_epoch > 0):
        raise SystemExit(f"--steps-per-epoch {args.steps_per_epoch} must be a positive number")
    for flag, share in (("--fill-frac", args.fill_frac), ("--min-use-frac", args.min_use_frac)):
        if not 0 < share <= 1:
            raise SystemExit(f"{flag} {share} must be in (0, 1]")
    if not args.max_run_s > 0:
        raise SystemExit(f"--max-run-s {args.max_run_s} must be a positive number of seconds")


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**26 else f"{n / 2**20:.2f} MiB"


def _print_table(result: dict[str, Any]) -> None:
    rows = [("budget P*/2", result["budgeted_run"]), ("OOM recovery", result["oom_run"])]
    print(f"\nResNet-18 (CIFAR-shaped, bf16) on {result['device']}; B* = {result['batch_finder']['batch_size']}")
    print("| run | batch | micro-batches (last step) | budget | peak | use | OOMs | samples seen / expected | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, run in rows:
        budget = run.get("budget_bytes", run.get("final_budget_bytes", 0))
        use = f"{100 * run['peak_bytes'] / budget:.1f}%" if budget else "—"
        print(
            f"| {name} | {run['effective_batch']} | {run['micro_batches_last_step']} | {_gib(budget)} | "
            f"{_gib(run['peak_bytes'])} | {use} | {run['oom_events']} | {run['samples_seen']} / "
            f"{run['samples_expected']} | {run['wall_s']:.1f} |"
        )


if __name__ == "__main__":
    raise SystemExit(main())

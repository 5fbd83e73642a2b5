"""Where the extra peak memory of static fp16 and the heuristic over static bf16 comes from (ResNet-18, batch 512).

Usage (on a CUDA GPU): ``python scripts/check_memory_formats.py [--out FILE]``. On the H200 (2026-12-02, ``aa9cf21``)
static fp16 peaked 4 MiB and the heuristic 6 MiB above static bf16 at the same batch (1487 and 1489 against 1483
MiB), against issue 7's "no higher than static bf16". Two parts, printed as tables and written to ``--out``:

1. ``TrainingRun`` steps alone, bf16 against fp16, with captured CUDA graphs on and off and with cuDNN's
   autotuning on and off: the allocator's peak over the steps (after one warm-up step, whose captures are
   included) and over the steady steps only. A difference that goes with autotuning is cuDNN's workspace (its
   choice of algorithm per dtype); one that goes with graphs is the capture pool; one that stays is ours.
2. The live allocations at the peak of one eager step (no graphs, no autotuning) in each format, from the
   allocator's recorded history, summed by the Python line that made them: what fp16 holds that bf16 does not.
3. ``run_controller`` rows for one epoch (after an untimed warm-up each): static bf16, static fp16, the heuristic
   (speed trial), and the heuristic started in fp16 with no trial, with the per-decision memory trace: whether the
   heuristic's extra is the trial (both formats' graphs) or its fp16.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
from triaccel_rl.policies import HeuristicPolicy

from triaccel_rl.compare import json_safe, run_controller
from triaccel_rl.config import ControllerConfig, HeuristicConfig
from triaccel_rl.elastic import release_memory
from triaccel_rl.memory import peak_allocated_bytes
from triaccel_rl.training import TrainingRun
from triaccel_rl.types import Precision

TASK, BATCH, LR_SCALE = "resnet18-fmnist", 512, 0.5
MIB = 2**20


def steps_peak(precision: Precision, graphs: bool, benchmark: bool, steps: int) -> dict[str, Any]:
    """Peak allocated bytes of ``steps`` training steps in ``precision`` (one warm-up step first)."""
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = benchmark
    release_memory(device)
    run = TrainingRun(TASK, seed=0, device=device, batch_size=BATCH, channels_last=True, cuda_graphs=graphs)
    run.set_precisions([precision] * len(run.precision.controllable_indices))
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run.step()
    torch.cuda.synchronize()
    first = peak_allocated_bytes(device)
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        run.step()
    torch.cuda.synchronize()
    steady = peak_allocated_bytes(device)
    row = {
        "precision": precision.name.lower(),
        "graphs": graphs,
        "cudnn_benchmark": benchmark,
        "resident_mib": base / MIB,
        "first_step_peak_mib": first / MIB,
        "steady_peak_mib": steady / MIB,
    }
    del run
    release_memory(device)
    return row


def live_at_peak(precision: Precision) -> dict[str, int]:
    """Bytes live at the peak of one eager training step, by the innermost Python frame that allocated them."""
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = False
    release_memory(device)
    run = TrainingRun(TASK, seed=0, device=device, batch_size=BATCH, channels_last=True, cuda_graphs=False)
    run.set_precisions([precision] * len(run.precision.controllable_indices))
    for _ in range(3):
        run.step()
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=200_000, stacks="python")
    run.step()
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    live: dict[int, tuple[int, str]] = {}
    total = best = 0
    at_peak: dict[int, tuple[int, str]] = {}
    for event in snapshot["device_traces"][device.index or 0]:
        if event["action"] == "alloc":
            frames = event.get("frames") or []
            site = next(
                (f"{f['filename'].split('site-packages/')[-1]}:{f['line']} {f['name']}" for f in frames),
                "(no python frame)",
            )
            live[event["addr"]] = (event["size"], site)
            total += event["size"]
            if total > best:
                best, at_peak = total, dict(live)
        elif event["action"] == "free_completed" and event["addr"] in live:
            total -= live.pop(event["addr"])[0]
    by_site: dict[str, int] = {}
    for size, site in at_peak.values():
        by_site[site] = by_site.get(site, 0) + size
    del run
    release_memory(device)
    return by_site


def controller_rows() -> list[dict[str, Any]]:
    """One epoch of each row (after an untimed warm-up run of it): peak and the per-decision memory trace."""
    torch.backends.cudnn.benchmark = True
    no_trial_fp16 = ControllerConfig(
        interval_steps=100, heuristic=HeuristicConfig(start_precision="fp16", speed_trial=False, use_fp16=True)
    )
    rows: list[tuple[str, Any, ControllerConfig]] = [
        ("static-bf16", "bf16", ControllerConfig(interval_steps=100)),
        ("static-fp16", "fp16", ControllerConfig(interval_steps=100)),
        ("heuristic", "heuristic", ControllerConfig(interval_steps=100)),
        ("heuristic-fp16-no-trial", HeuristicPolicy(no_trial_fp16), no_trial_fp16),
    ]
    out = []
    for name, controller, config in rows:
        common: dict[str, Any] = {
            "batch_size": BATCH,
            "lr_scale": LR_SCALE,
            "channels_last": True,
            "schedule": True,
            "config": config,
            "device": "cuda",
        }
        run_controller(TASK, controller, 1000, epochs=0.3, **common)  # warm-up: this row's kernels and captures
        result = run_controller(TASK, controller, 0, epochs=1.0, **common)
        out.append(
            {
                "row": name,
                "peak_mib": result.peak_bytes / MIB,
                "trace_mib": [round(point["memory_bytes"] / MIB, 2) for point in result.trace],
                "precisions": sorted({p for point in result.trace for p in point["precisions"]}),
                "speed_trial": result.speed_trial,
            }
        )
        print(out[-1], flush=True)
    return out


def main() -> None:
    """Runs the three parts, writes ``--out`` and prints their tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default="memory_formats.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this check needs a CUDA GPU")
    parts = []
    for graphs in (True, False):
        for benchmark in (True, False):
            for precision in (Precision.BF16, Precision.FP16):
                parts.append(steps_peak(precision, graphs, benchmark, args.steps))
                print(parts[-1], flush=True)
    sites = {precision.name.lower(): live_at_peak(precision) for precision in (Precision.BF16, Precision.FP16)}
    rows = controller_rows()
    with open(args.out, "w") as f:
        document = {"device": torch.cuda.get_device_name(), "steps": parts, "sites": sites, "rows": rows}
        json.dump(json_safe(document), f, indent=1, allow_nan=False)
    print("\n| graphs | cudnn autotune | precision | resident MiB | first-step peak MiB | steady peak MiB |")
    print("|---|---|---|---|---|---|")
    for p in parts:
        print(
            f"| {p['graphs']} | {p['cudnn_benchmark']} | {p['precision']} | {p['resident_mib']:.1f} | "
            f"{p['first_step_peak_mib']:.1f} | {p['steady_peak_mib']:.1f} |"
        )
    print("\n| allocated at (innermost Python frame) | bf16 MiB at its peak | fp16 MiB at its peak |")
    print("|---|---|---|")
    bf16, fp16 = sites["bf16"], sites["fp16"]
    for site in sorted(set(bf16) | set(fp16), key=lambda k: -abs(fp16.get(k, 0) - bf16.get(k, 0)))[:12]:
        print(f"| {site} | {bf16.get(site, 0) / MIB:.2f} | {fp16.get(site, 0) / MIB:.2f} |")
    print(f"| total | {sum(bf16.values()) / MIB:.2f} | {sum(fp16.values()) / MIB:.2f} |")
    print("\n| row | peak MiB | formats | per-decision peaks (MiB) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | {r['peak_mib']:.1f} | {r['precisions']} | {r['trace_mib']} |")


if __name__ == "__main__":
    main()

"""Is any mixed per-layer precision map faster than uniform fp16 on the GPU benchmark's models? Step times by map.

Usage (a CUDA GPU): ``python scripts/check_mixed_precision_speed.py [--out FILE]``.

The speed trial compares uniform maps only (bf16 against fp16). On EfficientNet-B0 a 16-bit step is only 1.9x an fp32
one through the executor (BENCHMARKS.md, issue 7): its depthwise convolutions and small layers gain little from
tensor cores, and each fp32/16-bit boundary costs a cast. If keeping some layers in fp32 made the step faster than
uniform fp16, a per-group speed trial would be worth building; if not, the precision side has no speed left to give
on these models. For each model (batch 512, channels_last, captured CUDA graphs, as the benchmark's rows), each map
runs 10 warm-up steps (its graph's capture) and then 5 intervals of 40 steps, timed with CUDA events; the table gives
the median ms a step. As in ``experiments/gpu_benchmark.py``: cuDNN's autotuning on, and TF32 off (an fp32 layer
is fp32, as the benchmark's fp32 row).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from triaccel_rl.compare import json_safe
from triaccel_rl.elastic import release_memory
from triaccel_rl.experiment import git_commit
from triaccel_rl.training import TrainingRun
from triaccel_rl.types import Precision

BATCH = 512
FP32, BF16, FP16 = Precision.FP32, Precision.BF16, Precision.FP16


def _depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels


MAPS: dict[str, Callable[[list[nn.Module], int], list[Precision]]] = {
    "fp32": lambda mods, n: [FP32] * n,
    "bf16": lambda mods, n: [BF16] * n,
    "fp16": lambda mods, n: [FP16] * n,
    "fp16, depthwise convs fp32": lambda mods, n: [FP32 if _depthwise(m) else FP16 for m in mods],
    "fp16, layers under 10k params fp32": lambda mods, n: [
        FP32 if sum(p.numel() for p in m.parameters(recurse=False)) < 10_000 else FP16 for m in mods
    ],
    "fp16, first and last layer fp32": lambda mods, n: [FP32 if i in (0, n - 1) else FP16 for i in range(n)],
    "fp16, 1x1 convs and linear only": lambda mods, n: [
        FP16 if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)) else FP32
        for m in mods
    ],
}


def time_maps(task: str, intervals: int = 5, steps: int = 40) -> list[dict[str, Any]]:
    """Median ms a step of each map in ``MAPS`` on ``task``."""
    device = torch.device("cuda")
    release_memory(device)
    run = TrainingRun(task, seed=0, device=device, batch_size=BATCH, channels_last=True)
    modules = dict(run.model.named_modules())
    controllable = [modules[run.layers[i].name] for i in run.precision.controllable_indices]
    rows = []
    for name, make in MAPS.items():
        precisions = make(controllable, len(controllable))
        run.set_precisions(precisions)
        run.train_interval(10)  # the map's graph capture and cuDNN's autotuning
        times = [run.train_interval(steps).train_ms / steps for _ in range(intervals)]
        rows.append(
            {
                "task": task,
                "map": name,
                "fp32_layers": sum(p is FP32 for p in precisions),
                "layers": len(precisions),
                "ms_per_step": times,
                "median_ms": statistics.median(times),
            }
        )
        print(f"{task:18s} {name:36s} {rows[-1]['fp32_layers']:3d}/{len(precisions)} fp32  "
              f"{rows[-1]['median_ms']:6.2f} ms", flush=True)  # fmt: skip
    return rows


def main() -> None:
    """Times every map on both GPU benchmark models; prints a table and writes ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="mixed_precision_speed.json")
    args = parser.parse_args()
    start = time.perf_counter()
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    rows = [row for task in ("effnet-b0-fmnist", "resnet18-fmnist") for row in time_maps(task)]
    print("\n| model | map | fp32 layers | median ms/step | vs uniform fp16 |\n|---|---|---|---|---|")
    for row in rows:
        fp16 = next(r["median_ms"] for r in rows if r["task"] == row["task"] and r["map"] == "fp16")
        print(f"| {row['task']} | {row['map']} | {row['fp32_layers']}/{row['layers']} | {row['median_ms']:.2f} | "
              f"{row['median_ms'] / fp16:.3f} |")  # fmt: skip
    document = {
        "command": "python scripts/check_mixed_precision_speed.py",
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "batch": BATCH,
        "cudnn_benchmark": True,
        "tf32": False,
        "wall_s": time.perf_counter() - start,
        "rows": rows,
    }
    with open(args.out, "w") as f:
        json.dump(json_safe(document), f, indent=1, allow_nan=False)


if __name__ == "__main__":
    main()

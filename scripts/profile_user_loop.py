"""Where a user's loop under the Controller spends its time, against the same plain loop (GPU).

    python scripts/profile_user_loop.py [--model resnet18-fmnist] [--precision fp16] [--out results.json]

For a plain loop and the Controller's variants (static ``--precision``, bf16 by default: fused step; reference path;
fused without the 16-bit weight copies; under fp16 the plain loop scales its loss with a ``GradScaler``), two
numbers per variant: the step time at ``--batch`` (CUDA events, median of chunks) and at batch 8, where the GPU's
work is small and the step time is the host's (Python, hooks, launches). Then cProfile of the controlled loop at
batch 8 (the host's functions, cumulative and own time, the plain loop's beside) and torch.profiler's kernel
count per step.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from triaccel_rl.compare import json_safe
from triaccel_rl.controller import Controller
from triaccel_rl.profiling import cuda_chunk_ms, cuda_kernel_counts
from triaccel_rl.tasks import get_task

VARIANTS = ("plain", "controller", "controller-reference", "controller-no-copies")


def make(
    variant: str, task_name: str, batch: int, n_steps: int, precision: str = "bf16"
) -> tuple[Callable[[], None], Controller | None]:
    """One variant's ``step()`` over ``n_steps`` random batches, and its Controller (None for the plain loop).

    ``precision``: bf16 or fp16, the plain loop's autocast type (fp16 with a ``GradScaler``, as torch.amp shows it) and
    the static policy's.
    """
    task = get_task(task_name)
    torch.manual_seed(0)
    model = task.build_model().cuda().to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    optimizer = task.make_optimizer(model.parameters())
    x = torch.randn(n_steps * batch, 1, 28, 28, device="cuda")
    y = torch.randint(0, 10, (n_steps * batch,), device="cuda")
    if variant == "plain":
        plain = iter([(x[i * batch : (i + 1) * batch], y[i * batch : (i + 1) * batch]) for i in range(n_steps)])

        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)

        def plain_step() -> None:
            xb, yb = next(plain)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=dtype):
                loss = nn.functional.cross_entropy(model(xb.contiguous(memory_format=torch.channels_last)).float(), yb)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

        return plain_step, None
    ctl = Controller(model, optimizer, policy=f"static-{precision}", fused=variant != "controller-reference")
    if variant == "controller-no-copies":
        ctl.engine.precision.use_weight_copies(None)
    batches = iter(ctl.loader((x, y), batch_size=batch, epochs=1))

    def step() -> None:
        xb, yb = next(batches)
        optimizer.zero_grad()
        with ctl.autocast():
            loss = nn.functional.cross_entropy(model(xb.contiguous(memory_format=torch.channels_last)).float(), yb)
        ctl.step(loss)

    return step, ctl


def time_steps(step: Callable[[], None], chunks: int = 8, per_chunk: int = 10) -> float:
    """Median milliseconds a step over ``chunks`` chunks of ``per_chunk`` steps (CUDA events)."""
    return statistics.median([cuda_chunk_ms(step, per_chunk) for _ in range(chunks)])


def main() -> None:
    """Times every variant at both batches, counts kernels, profiles the controlled loop's host side."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="resnet18-fmnist")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp16"))
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    device = torch.cuda.get_device_name()
    result: dict[str, Any] = {
        "model": args.model,
        "batch": args.batch,
        "precision": args.precision,
        "device": device,
        "rows": {},
    }
    for variant in VARIANTS:
        row: dict[str, Any] = {}
        for batch in (args.batch, 8):
            step, ctl = make(variant, args.model, batch, 120, args.precision)
            for _ in range(30):
                step()
            row[f"step_ms_b{batch}"] = time_steps(step)
            if ctl is not None:
                row["fused"] = ctl.engine.fused
                ctl.close()
        result["rows"][variant] = row
        print(variant, {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)

    # Kernels a step launches, plain against controlled (batch 8: the count does not depend on the batch).
    for variant in ("plain", "controller"):
        step, ctl = make(variant, args.model, 8, 80, args.precision)
        for _ in range(30):
            step()
        counts = cuda_kernel_counts(step, 20)
        kernels = sum(counts.values())
        result["rows"][variant]["kernels_per_step"] = kernels
        top = sorted(counts.items(), key=lambda item: -item[1])[:12]
        result["rows"][variant]["top_kernels_by_count"] = [(name[:80], count) for name, count in top]
        print(variant, "kernels/step", kernels, flush=True)
        if ctl is not None:
            ctl.close()

    # cProfile at batch 8, the controlled loop and the plain one: each function's cumulative and own time
    for variant in ("controller", "plain"):
        step, ctl = make(variant, args.model, 8, 260, args.precision)
        for _ in range(30):
            step()
        torch.cuda.synchronize()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(200):
            step()
        torch.cuda.synchronize()
        profiler.disable()
        for order, lines in (("cumulative", 45), ("tottime", 40)):
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(lines)
            result[f"cprofile_{variant}_b8_200_steps_{order}"] = text.getvalue()
            print(f"== {variant}, {order}")
            print(text.getvalue()[-6000:])
        if ctl is not None:
            ctl.close()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(json_safe(result), f, indent=1, allow_nan=False)
    print(json.dumps({k: v for k, v in result["rows"].items()}, indent=0)[:3000])


if __name__ == "__main__":
    main()

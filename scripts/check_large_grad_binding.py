"""What binding the large parameters' gradients before the backward saves in memory and costs in time (GPU).

Usage (a CUDA GPU): ``python scripts/check_large_grad_binding.py [--rounds 10] [--out FILE]``.

A user's eager loop under ``Controller(policy="static-fp16")`` (the fused step), with ``optimizer.zero_grad()`` (the
gradients set to ``None``) before each forward. Two ways, built side by side and timed in turns:

- ``own``: every gradient autograd's own through the backward, copied into the flat buffer after it (the forty-fourth
  session's binding: ``BIND_BEFORE_BACKWARD_ELEMENTS`` set past every parameter);
- ``large-bound``: the default: parameters of ``BIND_BEFORE_BACKWARD_ELEMENTS`` (2**20) elements or more bound to their
  zeroed views before the backward (``FlatParameterStore.bind_large_grads``), autograd adding into them, where they
  hold ``BIND_BEFORE_BACKWARD_TOTAL`` (2**26) elements together (ResNet-18's three such weights do not: it runs as
  ``own``);

and the plain loop (``GradScaler``, no Controller) for reference. Models: ResNet-18 of ``resnet18-fmnist`` at batch 256
(few large parameters, a short step: the host's time shows) and a stack of eight 4096x4096 linear layers at batch 16
(134M parameters, 537 MB of fp32 gradient: a model whose step-time memory is its peak, as an LLM fine-tune at a small
batch). For each: the step's time (CUDA events, median of chunks of ten steps, the ways in turns) and its peak
memory above what was allocated before it (``torch.cuda.max_memory_allocated``). Prints a table last.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from typing import Any

import torch
import triaccel_rl.kernels.flat_store as flat_store
from torch import nn

from triaccel_rl.compare import json_safe
from triaccel_rl.controller import Controller
from triaccel_rl.experiment import git_commit
from triaccel_rl.profiling import cuda_chunk_ms
from triaccel_rl.tasks import get_task

WAYS = ("plain", "own", "large-bound")


def _resnet() -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    task = get_task("resnet18-fmnist")
    torch.manual_seed(0)
    model = task.build_model().cuda().to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    x = torch.randn(256, 1, 28, 28, device="cuda").contiguous(memory_format=torch.channels_last)
    return model, task.make_optimizer(model.parameters()), x, torch.randint(0, 10, (256,), device="cuda")


def _wide_mlp() -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(8):
        layers += [nn.Linear(4096, 4096), nn.GELU()]
    model = nn.Sequential(*layers, nn.Linear(4096, 10)).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    return model, optimizer, torch.randn(16, 4096, device="cuda"), torch.randint(0, 10, (16,), device="cuda")


MODELS: dict[str, Callable[[], tuple[nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]]] = {
    "resnet18-b256": _resnet,
    "wide-mlp-134M-b16": _wide_mlp,
}


def make(way: str, build: Callable[..., Any]) -> tuple[Callable[[], None], Controller | None]:
    """One way's step on a fixed batch, and its Controller (None for the plain loop)."""
    model, optimizer, x, y = build()
    if way == "plain":
        scaler = torch.amp.GradScaler("cuda")

        def plain_step() -> None:
            optimizer.zero_grad()
            with torch.autocast("cuda", dtype=torch.float16):
                loss = nn.functional.cross_entropy(model(x).float(), y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

        return plain_step, None
    saved = flat_store.BIND_BEFORE_BACKWARD_ELEMENTS
    flat_store.BIND_BEFORE_BACKWARD_ELEMENTS = (
        saved if way == "large-bound" else 1 << 62
    )  # read when the store is built
    try:
        ctl = Controller(model, optimizer, policy="static-fp16")
    finally:
        flat_store.BIND_BEFORE_BACKWARD_ELEMENTS = saved
    assert ctl.engine.fused, "the fused step did not engage"

    def step() -> None:
        optimizer.zero_grad()
        with ctl.autocast():
            loss = nn.functional.cross_entropy(model(x).float(), y)
        ctl.step(loss)

    return step, ctl


def step_peak_bytes(step: Callable[[], None], steps: int = 5) -> int:
    """The most a step allocated above what was allocated before it, over ``steps`` steps."""
    peak = 0
    for _ in range(steps):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = max(peak, torch.cuda.max_memory_allocated() - before)
    return peak


def main() -> None:
    """Times and measures each way on each model; prints the table last and writes every chunk to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", default="large_grad_binding.json")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "commit": git_commit(),
        "torch": torch.__version__,
        "threshold_elements": flat_store.BIND_BEFORE_BACKWARD_ELEMENTS,
        "threshold_total_elements": flat_store.BIND_BEFORE_BACKWARD_TOTAL,
        "rows": [],
    }
    for model_name, build in MODELS.items():
        steps, controllers = {}, []
        for way in WAYS:
            steps[way], ctl = make(way, build)
            if ctl is not None:
                controllers.append(ctl)
            for _ in range(15):
                steps[way]()
        chunks: dict[str, list[float]] = {way: [] for way in WAYS}
        for r in range(args.rounds):
            for way in WAYS[r % 3 :] + WAYS[: r % 3]:
                chunks[way].append(cuda_chunk_ms(steps[way]))
        for way in WAYS:
            result["rows"].append(
                {
                    "model": model_name,
                    "way": way,
                    "median_ms": statistics.median(chunks[way]),
                    "chunks_ms": chunks[way],
                    "step_peak_bytes": step_peak_bytes(steps[way]),
                }
            )
        for ctl in controllers:
            ctl.close()
        del steps, controllers
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(json_safe(result), f, indent=1, allow_nan=False)
    print(f"{result['device']}, commit {result['commit']}")
    print("| model | way | median ms a step | step peak (MiB) |\n|---|---|---|---|")
    for row in result["rows"]:
        print(f"| {row['model']} | {row['way']} | {row['median_ms']:.2f} | {row['step_peak_bytes'] / 2**20:.1f} |")


if __name__ == "__main__":
    main()

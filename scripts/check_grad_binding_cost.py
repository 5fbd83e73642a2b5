"""What binding gradients to a flat buffer costs an eager step on a GPU, apart from everything else the Controller does.

Usage (a CUDA GPU): ``python scripts/check_grad_binding_cost.py [--batch 256] [--out FILE]``.

The fused step reads one flat gradient buffer. Today each ``param.grad`` is a view of it before the backward, so
autograd accumulates into the views in place (an add kernel a parameter); a plain loop's autograd hands over fresh
tensors (no kernel). This times a plain fp16 loop (ResNet-18 of the ``resnet18-fmnist`` task, GradScaler, the task's
SGD, channels_last) three ways, in turns (chunks of ten steps, the order rotated each round; medians):

- ``fresh``: ``zero_grad(set_to_none=True)``, autograd's own gradients (the plain loop);
- ``views``: every gradient a view of one flat buffer, zeroed by one kernel a step, autograd adding into the views;
- ``fresh+copy``: autograd's own gradients, then one ``torch._foreach_copy_`` into the flat buffer's views and the
  views bound as ``.grad`` before the optimizer's step (what binding after the backward would cost).

At ``--batch`` and at batch 8 (where the step is the host's time), with torch.profiler's kernel count a step.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable

import torch
from torch import nn

from triaccel_rl.compare import json_safe
from triaccel_rl.experiment import git_commit
from triaccel_rl.profiling import cuda_chunk_ms, cuda_kernel_counts
from triaccel_rl.tasks import get_task

VARIANTS = ("fresh", "views", "fresh+copy")


def make(variant: str, batch: int, task_name: str = "resnet18-fmnist") -> Callable[[], None]:
    """One variant's step on a fixed random batch."""
    task = get_task(task_name)
    torch.manual_seed(0)
    model = task.build_model().cuda().to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = task.make_optimizer(params)
    scaler = torch.amp.GradScaler("cuda")
    x = torch.randn(batch, 1, 28, 28, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device="cuda")
    flat = torch.zeros(sum(p.numel() for p in params), device="cuda")
    views, start = [], 0
    for p in params:
        views.append(flat[start : start + p.numel()].view_as(p) if p.is_contiguous() else _strided(flat, p, start))
        start += p.numel()

    def forward_backward() -> None:
        with torch.autocast("cuda", dtype=torch.float16):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        scaler.scale(loss).backward()

    def finish() -> None:
        scaler.step(optimizer)
        scaler.update()

    if variant == "fresh":

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            forward_backward()
            finish()

    elif variant == "views":
        for p, view in zip(params, views, strict=True):
            p.grad = view

        def step() -> None:
            flat.zero_()
            forward_backward()
            finish()

    elif variant == "fresh+copy":

        def step() -> None:
            for p in params:
                p.grad = None
            forward_backward()
            torch._foreach_copy_(views, [p.grad for p in params])
            for p, view in zip(params, views, strict=True):
                p.grad = view
            finish()

    else:
        raise ValueError(f"variant={variant!r}; expected one of {VARIANTS}")
    return step


def _strided(flat: torch.Tensor, p: torch.Tensor, start: int) -> torch.Tensor:
    """A view of ``flat`` from ``start`` with ``p``'s shape and strides (dense, channels_last say)."""
    return flat.as_strided(p.shape, p.stride(), start)


def main() -> None:
    """Prints the table last; writes every chunk's time to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--out", default="grad_binding_cost.json")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    result: dict = {"device": torch.cuda.get_device_name(), "commit": git_commit(), "torch": torch.__version__}
    table = []
    for batch in (args.batch, 8):
        steps = {v: make(v, batch) for v in VARIANTS}
        for step in steps.values():
            for _ in range(20):
                step()
        chunks: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for r in range(args.rounds):
            order = VARIANTS[r % 3 :] + VARIANTS[: r % 3]
            for v in order:
                chunks[v].append(cuda_chunk_ms(steps[v]))
        for v in VARIANTS:
            row = {
                "batch": batch,
                "variant": v,
                "median_ms": statistics.median(chunks[v]),
                "chunks_ms": chunks[v],
                "kernels_per_step": sum(cuda_kernel_counts(steps[v]).values()),
            }
            table.append(row)
    result["rows"] = table
    with open(args.out, "w") as f:
        json.dump(json_safe(result), f, indent=1, allow_nan=False)
    print(f"{result['device']}, commit {result['commit']}")
    print("| batch | variant | median ms a step | kernels a step |\n|---|---|---|---|")
    for row in table:
        print(f"| {row['batch']} | {row['variant']} | {row['median_ms']:.2f} | {row['kernels_per_step']:.0f} |")


if __name__ == "__main__":
    main()

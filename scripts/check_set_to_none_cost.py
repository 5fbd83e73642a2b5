"""What leaving a branch alone costs a user's loop under a Controller: ``zero_grad(set_to_none=True)`` or ``False``.

Usage (a CUDA GPU): ``python scripts/check_set_to_none_cost.py [--out FILE]``. A gradient a user sets to None stays
None through the backward (autograd's own tensor, copied into the flat buffer at the step, one launch for all; until
``683c089`` it was pointed back at the buffer before the backward, with a hook a parameter to note whether the backward
reached it); one still None after the backward is left alone, as ``torch.optim`` leaves it. This times a plain eager
loop (ResNet-18 on 3x32x32 inputs, batch 128, bf16, channels_last; EfficientNet-B0, more parameters and smaller
kernels) under a static Controller both ways, interleaved: the median ms a step over 2 x 5 windows of 30 steps, each
after 20 warm-up steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

import triaccel_rl as ta
from triaccel_rl.compare import json_safe
from triaccel_rl.experiment import git_commit
from triaccel_rl.models import efficientnet_b0, resnet18


def time_loop(model_fn, set_to_none: bool, windows: int = 5, steps: int = 30) -> list[float]:
    """Median-ready ms a step of ``windows`` windows of ``steps`` steps."""
    torch.manual_seed(0)
    model = model_fn().cuda().to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(128, 3, 32, 32, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (128,), device="cuda")
    times = []
    with ta.Controller(model, optimizer, policy="bf16") as ctl:
        for window in range(windows + 1):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps if window else 20):
                optimizer.zero_grad(set_to_none=set_to_none)
                with ctl.autocast():
                    loss = nn.functional.cross_entropy(model(x), y)
                ctl.step(loss)
            end.record()
            torch.cuda.synchronize()
            if window:
                times.append(start.elapsed_time(end) / steps)
    return times


def main() -> None:
    """Prints the table and writes every window's time to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="set_to_none_cost.json")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    models = {"resnet18": lambda: resnet18(in_channels=3, n_classes=10), "effnet-b0": lambda: efficientnet_b0(3, 10)}
    rows = []
    print(
        "| model | parameters | zero_grad(set_to_none=False) ms | set_to_none=True ms | ratio |\n|---|---|---|---|---|"
    )
    for name, fn in models.items():
        n_params = len(list(fn().parameters()))
        a, b = [], []
        for _ in range(2):  # interleaved
            a += time_loop(fn, False)
            b += time_loop(fn, True)
        ma, mb = statistics.median(a), statistics.median(b)
        rows.append({"model": name, "parameters": n_params, "zeroed_ms": a, "set_to_none_ms": b, "ratio": mb / ma})
        print(f"| {name} | {n_params} | {ma:.2f} | {mb:.2f} | {mb / ma:.3f} |", flush=True)
    document = {
        "command": "python scripts/check_set_to_none_cost.py",
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "rows": rows,
    }
    with open(args.out, "w") as f:
        json.dump(json_safe(document), f, indent=1, allow_nan=False)


if __name__ == "__main__":
    main()

"""What an estimator round costs on a GPU: the first (warm-up) round against the same round repeated.

    bash scripts/device-visit.sh <commit> py=scripts/round_cost_gpu.py

For ResNet-18 and EfficientNet-B0 (the GPU tasks, their batch and optimizer, channels_last), a Controller with a probe
batch of 512 trains 30 steps in the heuristic's map; then the same round plan runs 4 times in a row, timed as the
collector times its rounds, with the charged cost by part. A training step's median time stands beside them. It tells
one-time costs (the first round) from a round's steady cost, which the scheduler's budget check reads.
Writes ``$OUT/round_cost.json`` when ``OUT`` is set.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any

import torch

from triaccel_rl.controller import Controller
from triaccel_rl.tasks import get_task


def measure(name: str, probe_n: int = 512, steps: int = 30, repeats: int = 4) -> dict[str, Any]:
    """Trains ``steps`` steps of task ``name`` under a Controller with a probe, then times ``repeats`` rounds."""
    task = get_task(name)
    data = task.data(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x, y = data.train_x[:-probe_n].to(device), data.train_y[:-probe_n].to(device)
    probe = (_layout(data.train_x[-probe_n:].to(device)), data.train_y[-probe_n:].to(device))
    torch.manual_seed(0)
    model = task.build_model().to(device)
    if x.dim() == 4:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    optimizer = task.make_optimizer(model.parameters())
    ctl = Controller(model, optimizer, policy="heuristic", probe=probe, loss_fn=task.loss_fn)
    step_ms = []
    for i, (xb, yb) in enumerate(ctl.loader((x, y), batch_size=task.base_batch_size, epochs=1)):
        if i >= steps:
            break
        _sync(device)
        start = time.perf_counter()
        if task.augment is not None:
            xb = task.augment(xb)
        xb = _layout(xb)
        with ctl.autocast():
            loss = task.loss_fn(model(xb), yb)
        ctl.step(loss)
        _sync(device)
        step_ms.append(1e3 * (time.perf_counter() - start))
    collector = ctl.collector
    plan = collector.scheduler.plan(None)
    assert plan is not None and collector.source is not None
    rounds = []
    with ctl.engine.precision.suspended():
        for _ in range(repeats):
            report = collector._timed_round(plan, collector.source)
            rounds.append(
                {
                    "measured_ms": report.measured_ms,
                    "noise_ms": report.cost.noise_ms,
                    "hutchinson_ms": report.cost.hutchinson_ms,
                    "other_ms": report.cost.other_ms,
                }
            )
    ctl.close()
    return {
        "model": name,
        "plan": {"n_microbatches": plan.n_microbatches, "n_probes": plan.n_probes},
        "rounds_before": collector.scheduler.rounds,
        "warmup_ms_in_run": collector.warmup_ms,
        "step_ms_median": statistics.median(step_ms[5:]),
        "rounds": rounds,
    }


def _layout(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    """Measures the tasks named on the command line (default: the two GPU tasks) and prints the table."""
    names = sys.argv[1:] or ["resnet18-fmnist", "effnet-b0-fmnist"]  # a CPU check: cnn-fmnist
    results = [measure(name) for name in names]
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "round_cost.json"), "w") as f:
            device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
            json.dump({"device": device, "torch": torch.__version__, "results": results}, f)
    print(f"{'model':18} {'step ms':>8} {'plan':>8}  rounds: measured ms (noise / hutchinson / other)")
    for r in results:
        plan = f"{r['plan']['n_microbatches']}m{r['plan']['n_probes']}p"
        parts = "  ".join(
            f"{x['measured_ms']:.0f} ({x['noise_ms']:.0f}/{x['hutchinson_ms']:.0f}/{x['other_ms']:.0f})"
            for x in r["rounds"]
        )
        print(f"{r['model']:18} {r['step_ms_median']:8.1f} {plan:>8}  {parts}")


if __name__ == "__main__":
    main()

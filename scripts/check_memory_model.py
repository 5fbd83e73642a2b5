"""Prints the memory model's measured points and predictions against trial peaks, with and without CUDA graphs.

Usage: ``python scripts/check_memory_model.py`` (a CUDA GPU). On 2026-12-04 the out-of-memory-during-capture test
saw the model predict 2.49 GB above its intercept for a batch of 4096 of a wide MLP whose step peaked at 0.76 GB
(graphs on); this shows where each point of the fit comes from.
"""

import sys
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "elastic"))
from test_gpu_elastic import _wide_task  # the test's own task

from triaccel_rl.config import ControllerConfig, MemoryBudget
from triaccel_rl.controller import Controller
from triaccel_rl.training import TrainingRun

MB = 1e6


def report(run: TrainingRun, label: str) -> None:
    """The model's points for the current map and its predictions at a few sizes."""
    points = run.memory_model._peaks.get(tuple(int(p) for p in run.precisions), {})
    shown = ", ".join(f"{b}: {v / MB:.0f}" for b, v in sorted(points.items()))
    predicted = ", ".join(f"{b}: {run.predicted_memory_bytes(b) / MB:.0f}" for b in (0, 256, 1024, 4096))
    print(f"  {label}: points (MB) {{{shown}}}; predicted {{{predicted}}}")


def main() -> None:
    """Each task with graphs on and off: the points after construction, after steps, and trials."""
    for name, task in (("wide-mlp", _wide_task()), ("resnet18-fmnist", "resnet18-fmnist")):
        for graphs in (True, False):
            torch.cuda.empty_cache()
            run = TrainingRun(
                task, seed=0, device="cuda", n_probe=64, memory=MemoryBudget(fraction=1.0), batch_size=256,
                cuda_graphs=graphs,
            )  # fmt: skip
            print(f"{name}, graphs {graphs}, allocated at start {torch.cuda.memory_allocated() / MB:.0f} MB")
            report(run, "after construction")
            before = torch.cuda.memory_allocated()
            stats = run.step()
            warm_up = run.graphs.last_peak_bytes / MB if run.graphs is not None else None
            print(f"  step 1: allocated {before / MB:.0f} -> {torch.cuda.memory_allocated() / MB:.0f} MB, step peak "
                  f"{stats.memory_bytes / MB:.0f} MB, capture warm-up peak {warm_up} MB")  # fmt: skip
            report(run, "after step 1")
            run.step()
            report(run, "after step 2")
            peaks = {b: run.trial_peak_bytes(b) for b in (1024, 4096)}
            print(f"  trial peaks (MB): { {b: round(p / MB) for b, p in peaks.items() if p} }")
            report(run, "after the trials")
            del run
    controller_check()


Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


def train(ctl: Controller, model: torch.nn.Module, batches: Batches, steps: int) -> None:
    """``steps`` steps of a user's loop under ``ctl``."""
    for _ in range(steps):
        xb, yb = next(batches)
        with ctl.autocast():
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
        ctl.step(loss)


def controller_check() -> None:
    """A user's loop under the Controller: its prediction at 4096 against a real step's peak there.

    The Controller measures the allocator's peak of every step of the user's own loop (no graphs), above the
    bytes allocated after it. Steps at 256, then 1024 give it two points; its prediction at 4096 is then set
    against the peak of a step at 4096 read from ``torch.cuda.max_memory_allocated``.
    """
    task = _wide_task()
    for policy in ("fp32", "bf16"):
        torch.cuda.empty_cache()
        torch.manual_seed(0)
        model = task.build_model().cuda()
        data = task.load_data(None, None, 0)
        ctl = Controller(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), policy=policy,
                         config=ControllerConfig(interval_steps=1000))  # fmt: skip
        batches = ctl.loader((data.train_x, data.train_y), batch_size=256, epochs=50)
        train(ctl, model, batches, 3)
        ctl.batch_size = 1024
        train(ctl, model, batches, 3)
        predicted = {b: ctl.predicted_memory_bytes(b) / MB for b in (256, 1024, 4096)}
        ctl.batch_size = 4096
        train(ctl, model, batches, 1)
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated() / MB  # reset at this step's forward
        after = ctl.predicted_memory_bytes(4096) / MB
        shown = ", ".join(f"{b}: {v:.0f}" for b, v in predicted.items())
        print(f"controller {policy}: predicted (MB) {{{shown}}}; step at 4096 peaked {measured:.0f} MB "
              f"(ratio {predicted[4096] / measured:.2f}); predicted at 4096 after it {after:.0f} MB")  # fmt: skip
        ctl.close()


if __name__ == "__main__":
    main()

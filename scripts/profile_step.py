"""Where a TrainingRun step's time goes on a GPU, against a plain training loop (a dev tool, not a benchmark).

Usage: ``python scripts/profile_step.py [--task resnet18-fmnist] [--batch 256]``.
"""

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from triaccel_rl.tasks import get_task
from triaccel_rl.training import TrainingRun


def plain_ms(task, batch: int, steps: int) -> float:
    """Milliseconds per step of a plain bf16 + channels_last loop on one resident batch."""
    torch.manual_seed(0)
    model = task.build_model().cuda().to(memory_format=torch.channels_last)
    opt = task.make_optimizer([{"params": list(model.parameters())}])
    data = task.data(0)
    x = data.train_x[:batch].cuda().contiguous(memory_format=torch.channels_last)
    y = data.train_y[:batch].cuda()

    def step() -> None:
        xa = task.augment(x) if task.augment is not None else x
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = task.loss_fn(model(xa).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(10):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e3


def run_ms(task, batch: int, steps: int, fused: bool | None, graphs: bool | None = None) -> tuple[float, TrainingRun]:
    """Milliseconds per step of ``TrainingRun.train_interval`` in bf16 + channels_last, and the run."""
    run = TrainingRun(task, device="cuda", batch_size=batch, channels_last=True, schedule_epochs=12, cuda_graphs=graphs)
    if fused is False and run.engine.fused:
        raise SystemExit("cannot turn the fused path off after construction here")
    run.set_precisions(["bf16"] * len(run.precision.controllable_indices))
    run.train_interval(10)
    start = time.perf_counter()
    stats = run.train_interval(steps)
    host = (time.perf_counter() - start) / steps * 1e3
    print(f"  train_interval: events {stats.train_ms / steps:.2f} ms/step, host {host:.2f} ms/step")
    return stats.train_ms / steps, run


def decision_costs(run: TrainingRun, repeats: int = 10) -> None:
    """Milliseconds (host, synchronised) of each part of a decision point's overhead."""
    from triaccel_rl.config import ControllerConfig
    from triaccel_rl.loop import DecisionLoop
    from triaccel_rl.shield import RollbackGuard

    loop = DecisionLoop(run, ControllerConfig())
    loop.train_interval()
    on_device = RollbackGuard(run.model, run.engine.state_holder, offload=False)
    parts = {
        "probe_loss": run.probe_loss,
        "rollback save (pinned host copy, the default)": loop.guard.save if loop.guard is not None else (lambda: None),
        "rollback save (device copy)": on_device.save,
        "grad_mean_sq_norm": run.engine.grad_mean_sq_norm,
        "snapshot (all of it)": lambda: loop.snapshot(progress=0.5),
    }
    for name, part in parts.items():
        part()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            part()
        torch.cuda.synchronize()
        print(f"  decision overhead: {name}: {(time.perf_counter() - start) / repeats * 1e3:.2f} ms")
    collector = loop.collector
    last = collector.last_round
    if last is not None:
        print(
            f"  estimator rounds: {collector.scheduler.rounds} run, warm-up round {collector.warmup_ms:.1f} ms, last "
            f"round {last.measured_ms:.1f} ms ({last.plan.n_microbatches} micro-batches, {last.plan.n_probes} probes:"
            f" noise {last.cost.noise_ms:.1f}, Hutchinson {last.cost.hutchinson_ms:.1f},"
            f" other {last.cost.other_ms:.1f})"
        )


def main() -> None:
    """Prints the two step times and the profiler's tables."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="resnet18-fmnist")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    task = get_task(args.task)
    print(f"plain loop (torch SGD, autocast bf16, channels_last): {plain_ms(task, args.batch, args.steps):.2f} ms/step")
    eager_ms, _ = run_ms(task, args.batch, args.steps, None, graphs=False)
    print(f"TrainingRun.train_interval, eager (fused step): {eager_ms:.2f} ms/step")
    ms, run = run_ms(task, args.batch, args.steps, None)
    print(f"TrainingRun.train_interval (fused={run.engine.fused}, graphs={run.graphs is not None}): {ms:.2f} ms/step")
    decision_costs(run)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run.train_interval(10)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()

"""The estimator rounds in a user's own loop: what they cost and what they change, with and without a probe batch.

    python experiments/bench_user_rounds.py                                  # GPU: ResNet-18 and EfficientNet-B0
    python experiments/bench_user_rounds.py --models resnet18-fmnist --seeds 2
    python experiments/bench_user_rounds.py --smoke --out /tmp/rounds.json   # CPU plumbing check, tiny

Rows, each a fresh model from the seed, trained on the same batches of the task's data, one after the other:

- ``heuristic``: ``Controller(model, optimizer, "heuristic")`` in a plain loop (the task's optimizer, its augmentation
  applied to each batch, channels_last for images): the cheap signals only;
- ``heuristic-probe``: the same with ``probe=`` the last ``--probe`` training samples and ``loss_fn=`` the task's loss,
  so the collector runs its estimator rounds (Hutchinson curvature, micro-batch gradient noise) within the overhead
  budget. Those samples are held out of both rows' training.

Per row: the run's wall time (synchronised at its start and end; the speed trial and decisions included), the steps,
the collector's accounts (training ms, overhead ms, the rounds' ms, the uncharged warm-up round's ms, rounds run and
refused for the budget), where the curvature came from at the end, the share of layers in fp32 at each decision and
the final map, and the test accuracy (evaluated in the last decision's precision map).
"""

from __future__ import annotations

import datetime
import json
import statistics
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from triaccel_rl.compare import json_safe
from triaccel_rl.controller import Controller
from triaccel_rl.experiment import away_from_results, command_line, cpu_machine, file_to_write, git_commit, parse_args
from triaccel_rl.tasks import Task, get_task, task_names
from triaccel_rl.types import Precision

ROWS = ("heuristic", "heuristic-probe")


@dataclass
class Args:
    """Command-line arguments (each field is a ``--flag``)."""

    models: str = "resnet18-fmnist,effnet-b0-fmnist"
    """Comma-separated registered tasks whose models train."""
    epochs: int = 4
    """Passes over the training data a row."""
    seeds: int = 1
    """Seeds (0, 1, ...) a row; the rows of a seed train one after the other."""
    probe: int = 512
    """Training samples held out as the probe batch (the last ones), >= 4."""
    out: str = "experiments/results/bench_user_rounds.json"
    """Results JSON (written after every model)."""
    smoke: bool = False
    """CPU, the ``synthetic`` task, 2 epochs: checks the plumbing; timings meaningless."""


def main(args: Args) -> dict[str, Any]:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models:
        raise ValueError(f"--models {args.models!r} is empty; give comma-separated tasks, e.g. resnet18-fmnist")
    unknown = [model for model in models if model not in task_names()]
    if unknown:
        raise ValueError(f"--models: unknown task {unknown[0]!r}; allowed: {', '.join(task_names())}")
    for flag, value, least in (("--epochs", args.epochs, 1), ("--seeds", args.seeds, 1), ("--probe", args.probe, 4)):
        if value < least:
            raise ValueError(f"{flag} {value} must be >= {least}")
    out = file_to_write(
        "--out", away_from_results("--out", args.out, Args.out) if args.smoke else args.out, example="rounds.json"
    )
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.smoke:
        raise SystemExit("needs a CUDA GPU (or --smoke for the CPU plumbing check)")
    if args.smoke:
        models, args = ["synthetic"], replace(args, epochs=min(args.epochs, 2), probe=min(args.probe, 64))
    result: dict[str, Any] = {
        "command": command_line("experiments/bench_user_rounds.py", args),
        "args": asdict(args),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_machine(),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "rows": [],
    }
    for model_name in models:
        task = get_task(model_name)
        for seed in range(args.seeds):
            data = task.data(seed)
            for row in ROWS:
                print(f"{model_name} seed {seed} {row} ...", flush=True)
                measured = run_row(task, data, row, seed, args, device)
                result["rows"].append({"model": model_name, "row": row, "seed": seed, **measured})
        out.write_text(json.dumps(json_safe(result), indent=1, allow_nan=False) + "\n")
    print_table(result["rows"])
    print(f"wrote {out}")
    return result


def run_row(task: Task, data: Any, row: str, seed: int, args: Args, device: torch.device) -> dict[str, Any]:
    """Trains one row from ``seed`` in a user's loop under a Controller; returns what it measured."""
    x, y = data.train_x[: -args.probe].to(device), data.train_y[: -args.probe].to(device)
    probe = (data.train_x[-args.probe :].to(device), data.train_y[-args.probe :].to(device))
    image = x.dim() == 4
    torch.manual_seed(seed)
    model = task.build_model().to(device)
    if image:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    optimizer = task.make_optimizer(model.parameters())
    with_probe = row == "heuristic-probe"
    ctl = Controller(
        model,
        optimizer,
        policy="heuristic",
        probe=probe if with_probe else None,
        loss_fn=task.loss_fn if with_probe else None,
    )
    fp32_share: list[float] = []  # read as each decision comes: ctl.decisions keeps the latest DECISIONS_KEPT only
    _synchronize(device)
    start = time.perf_counter()
    for xb, yb in ctl.loader((x, y), batch_size=task.base_batch_size, epochs=args.epochs, seed=seed):
        if task.augment is not None:
            xb = task.augment(xb)
        if image:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with ctl.autocast():
            loss = task.loss_fn(model(xb), yb)
        ctl.step(loss)
        if ctl.decision_count > len(fp32_share):  # a step makes one decision at most; a host-side count, no sync
            precisions = ctl.decisions[-1].precisions
            fp32_share.append(sum(p is Precision.FP32 for p in precisions) / len(precisions))
    _synchronize(device)
    wall_s = time.perf_counter() - start
    accuracy = _test_accuracy(model, ctl, data, device)
    collector, signals = ctl.collector, ctl.signals
    ctl.close()
    return {
        "wall_s": wall_s,
        "steps": ctl.steps,
        "decisions": ctl.decision_count,
        "train_ms": collector.train_ms,
        "overhead_ms": collector.overhead_ms,
        "rounds_ms": collector.estimator_ms - collector.warmup_ms,
        "warmup_round_ms": collector.warmup_ms,
        "overhead_frac": collector.overhead_ms / max(collector.train_ms, 1e-9),
        "rounds_frac": (collector.estimator_ms - collector.warmup_ms) / max(collector.train_ms, 1e-9),
        "rounds": collector.scheduler.rounds,
        "rounds_refused_for_budget": collector.rounds_refused_for_budget,
        "curvature_source": None if signals is None else signals.extra["curvature_source"],
        "noise_scale": None if signals is None else signals.noise_scale,
        "fp32_share_per_decision": fp32_share,
        "final_precisions": [p.name.lower() for p in ctl.precisions],
        "speed_trial": ctl.speed_trial,
        "test_accuracy": accuracy,
    }


def _test_accuracy(model: torch.nn.Module, ctl: Controller, data: Any, device: torch.device) -> float:
    model.eval()
    correct = 0
    with torch.no_grad(), ctl.autocast():
        for start in range(0, len(data.test_x), 1024):
            xb = data.test_x[start : start + 1024].to(device)
            if xb.dim() == 4:
                xb = xb.contiguous(memory_format=torch.channels_last)
            correct += int((model(xb).argmax(1) == data.test_y[start : start + 1024].to(device)).sum())
    model.train()
    return correct / len(data.test_x)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def print_table(rows: list[dict[str, Any]]) -> None:
    """Per model and row, the medians over seeds: wall time, the rounds' share of training time, rounds, accuracy."""
    print(f"{'model':18} {'row':16} {'wall s':>7} {'overhead':>9} {'rounds':>7} {'n':>4} {'fp32 end':>8} {'acc %':>6}")
    keys = dict.fromkeys((r["model"], r["row"]) for r in rows)
    for model, row in keys:
        mine = [r for r in rows if (r["model"], r["row"]) == (model, row)]
        end_fp32 = statistics.median(
            sum(p == "fp32" for p in r["final_precisions"]) / len(r["final_precisions"]) for r in mine
        )
        print(
            f"{model:18} {row:16} {statistics.median(r['wall_s'] for r in mine):7.2f} "
            f"{100 * statistics.median(r['overhead_frac'] for r in mine):8.2f}% "
            f"{100 * statistics.median(r['rounds_frac'] for r in mine):6.2f}% "
            f"{statistics.median(r['rounds'] for r in mine):4.0f} {end_fp32:8.2f} "
            f"{100 * statistics.median(r['test_accuracy'] for r in mine):6.2f}"
        )


if __name__ == "__main__":
    try:
        main(parse_args(Args, description=__doc__))
    except ValueError as error:  # a bad flag: one line
        raise SystemExit(str(error)) from None

"""Is there headroom in batch moves on the held-out tasks? heuristic vs static bf16 vs static bf16 at 2x/4x batch.

    python experiments/batch_headroom.py                      # issue-6 settings: 2 epochs, interval 10, eval every 2
    python experiments/batch_headroom.py --same-steps         # k x batch rows get k x epochs (same step count)
    python experiments/batch_headroom.py --epochs 5 --tasks dwcnn-fmnist
    python experiments/batch_headroom.py --same-steps --eval-every-steps 1   # time to target at one-step resolution
    python experiments/batch_headroom.py --rows heuristic,heuristic-anneal --epochs 5   # the LR-annealing variant

Every run goes through ``triaccel_rl.compare.run_controller`` in ``profile`` cost mode on the CPU, as
``experiments/transfer.py`` does. A larger-batch row is the ``bf16`` static preset started at
``batch_size = k * task.base_batch_size``; the LR follows through the run's own coupling
(``ElasticConfig.lr_rule``: ``linear`` gives ``k x base_lr``, ``sqrt`` gives ``sqrt(k) x base_lr``), with
``lr_scale`` left at 1. Writes a JSON with every run (curve included) and prints per-task tables.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from triaccel_rl.experiment import command_line, cpu_machine, file_to_write, git_commit, parse_args


@dataclass
class Args:
    """Command-line arguments (each field is a ``--flag``)."""

    tasks: str = "dwcnn-fmnist,transformer-seq,deep-mlp-synthetic"
    """Comma-separated tasks (default: ``triaccel_rl.tasks.HELD_OUT_TASKS``)."""
    rows: str = "heuristic,bf16,bf16-x2-linear,bf16-x2-sqrt,bf16-x4-linear,bf16-x4-sqrt"
    """``heuristic``, ``heuristic-anneal`` (``HeuristicConfig(anneal_plateau=0.02)``), ``bf16``,
    ``bf16-x<k>-<linear|sqrt>`` or ``bf16-lr<m>`` (base batch, LR x m: a control)."""
    seeds: int = 3
    """Seeds 0..N-1 per task and row."""
    epochs: float = 2.0
    """Training budget of a base-batch run, in epochs (issue 6's transfer evaluation uses 2)."""
    interval_steps: int = 10
    """Optimizer steps between decisions (as ``experiments/transfer.py``)."""
    eval_every: int = 2
    """Evaluate the test metric every this many decisions (as ``experiments/transfer.py``)."""
    eval_every_steps: int = 0
    """Evaluate every N optimizer steps instead (0: every ``eval_every`` decisions, as transfer.py)."""
    same_steps: bool = False
    """Give a k x batch row k x the epochs (the same number of optimizer steps as the base row)."""
    out: str = "experiments/results/batch_headroom.json"
    """Results JSON."""


ROW_PATTERN = re.compile(
    r"^(?P<name>heuristic|heuristic-anneal|bf16)$|^bf16-x(?P<k>[1-9][0-9]*)-(?P<rule>linear|sqrt)$|^bf16-lr(?P<lr>[0-9]+(\.[0-9]+)?)$"
)


def parse_row(row: str) -> tuple[str, int, str | None, float]:
    """``bf16-x2-linear`` -> (``bf16``, 2, ``linear``, 1.0); ``bf16-lr2`` -> (``bf16``, 1, None, 2.0).

    Raises:
        ValueError: ``row`` is none of ``heuristic``, ``heuristic-anneal``, ``bf16``, ``bf16-x<k>-<linear|sqrt>``,
            ``bf16-lr<scale>`` (a scale above 0).
    """
    match = ROW_PATTERN.match(row)
    if match is None or (match["lr"] and not float(match["lr"]) > 0):
        raise ValueError(
            f"row {row!r}; allowed: heuristic, heuristic-anneal, bf16, bf16-x<k>-<linear|sqrt>, bf16-lr<scale> "
            "(k >= 1, scale > 0)"
        )
    if match["name"]:
        return match["name"], 1, None, 1.0
    if match["lr"]:
        return "bf16", 1, None, float(match["lr"])
    return "bf16", int(match["k"]), match["rule"], 1.0


def main(args: Args) -> dict[str, Any]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from triaccel_rl.compare import json_safe, run_controller
    from triaccel_rl.config import ControllerConfig, HeuristicConfig, LRRule
    from triaccel_rl.tasks import get_task

    tasks, rows = check_args(args)
    base_config = ControllerConfig(interval_steps=args.interval_steps)
    runs: list[dict[str, Any]] = []
    costs: dict[str, dict[str, float]] = {}
    start = time.perf_counter()
    for task_name in tasks:
        task = get_task(task_name)
        for row in rows:
            controller, k, rule, lr_scale = parse_row(row)
            config = base_config
            if rule is not None:
                config = replace(base_config, elastic=replace(base_config.elastic, lr_rule=LRRule.parse(rule)))
            if controller == "heuristic-anneal":
                controller, config = "heuristic", replace(base_config, heuristic=HeuristicConfig(anneal_plateau=0.02))
            epochs = args.epochs * (k if args.same_steps else 1)
            for seed in range(args.seeds):
                # As transfer.py: PyTorch's CPU flash attention has no double backward (the heuristic's
                # Hutchinson round); the math kernel has one.
                with sdpa_kernel(SDPBackend.MATH):
                    result = run_controller(task, controller, seed, epochs=epochs, config=config,
                                            cost_mode="profile", device="cpu", eval_every=args.eval_every,
                                            eval_every_steps=args.eval_every_steps or None,
                                            batch_size=k * task.base_batch_size, lr_scale=lr_scale)  # fmt: skip
                record = {key: value for key, value in asdict(result).items() if key not in ("trace", "layer_names")}
                record.update(task=task_name, row=row, k=k, lr_rule=rule, epochs=epochs,
                              lr_first=result.trace[0]["lr"], lr_last=result.trace[-1]["lr"],
                              batch_first=result.trace[0]["batch_size"])  # fmt: skip
                runs.append(record)
                ttt = "-" if result.time_to_target_s is None else f"{1e3 * result.time_to_target_s:.2f}"
                print(f"{task_name:19s} {row:15s} seed {seed}: final {100 * result.final_metric:.1f}%  to target "
                      f"{ttt} ms  run {1e3 * result.time_s:.2f} ms  steps {result.steps}  lr {record['lr_first']:.3g}"
                      f"  step {result.mean_step_ms:.4f} ms  wall {result.wall_s:.1f} s", flush=True)  # fmt: skip
        costs[task_name] = step_costs(task_name)
    summary = summarize(runs, tasks, rows)
    document = {
        "command": command_line("experiments/batch_headroom.py", args),
        "args": asdict(args),
        "device": cpu_machine(),  # every run; the times are modelled (time_mode), the final metrics are this CPU's
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d"),
        "time_mode": "modelled H200 time from triaccel_rl/profiles/h200.json (cost mode profile), seconds",
        "wall_s": time.perf_counter() - start,
        "step_costs_ms": costs,
        "summary": summary,
        "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(json_safe(document), indent=1, allow_nan=False) + "\n")
    print(format_tables(summary, costs))
    print(f"\nresults: {out}  ({document['wall_s']:.0f} s)")
    return document


def check_args(args: Args) -> tuple[list[str], list[str]]:
    """The tasks and rows to run; raises ``ValueError`` naming the first setting that cannot run, before any run.

    Before, an unknown task stopped the job when its turn came (after the earlier tasks' runs, which were not
    written), ``--seeds 0`` or an empty ``--tasks``/``--rows`` wrote a results file of nothing, and ``--epochs 0``
    was refused only from the command line.
    """
    from triaccel_rl.tasks import task_names

    # Each once: a repeated name ran its seeds again and counted them twice in the row's means and "per seed" lists.
    tasks = list(dict.fromkeys(t.strip() for t in args.tasks.split(",") if t.strip()))
    rows = list(dict.fromkeys(r.strip() for r in args.rows.split(",") if r.strip()))
    if not tasks:
        raise ValueError(f"--tasks {args.tasks!r} is empty: give comma-separated tasks, e.g. dwcnn-fmnist")
    unknown = [task for task in tasks if task not in task_names()]
    if unknown:
        raise ValueError(f"--tasks: unknown task {unknown[0]!r}; allowed: {', '.join(task_names())}")
    if not rows:
        raise ValueError(f"--rows {args.rows!r} is empty: give comma-separated rows, e.g. heuristic,bf16")
    for row in rows:
        parse_row(row)
    for flag, value in (("--seeds", args.seeds), ("--interval-steps", args.interval_steps),
                        ("--eval-every", args.eval_every)):  # fmt: skip
        if value < 1:
            raise ValueError(f"{flag} {value} must be >= 1")
    if args.eval_every_steps < 0:
        raise ValueError(f"--eval-every-steps {args.eval_every_steps} must be >= 0 (0: every --eval-every decisions)")
    if not (math.isfinite(args.epochs) and args.epochs > 0):
        raise ValueError(f"--epochs {args.epochs} must be a positive finite number")
    file_to_write("--out", args.out)  # a folder was found only when the results were written, after every run
    return tasks, rows


def step_costs(task_name: str) -> dict[str, float]:
    """Modelled ms of one all-bf16 step at 1x, 2x, 4x the base batch (the same formula the runs are charged)."""
    from triaccel_rl.training import TrainingRun
    from triaccel_rl.types import Precision

    run = TrainingRun(task_name, seed=0, device="cpu", cost_mode="profile")
    run.set_precisions([Precision.BF16] * len(run.precision.controllable_indices))
    base = run.task.base_batch_size
    return {f"x{k}": run.modelled_step_ms(k * base) for k in (1, 2, 4)} | {"fixed": run.profile.fixed_ms}


def summarize(runs: list[dict[str, Any]], tasks: list[str], rows: list[str]) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for task in tasks:
        summary[task] = {}
        for row in rows:
            mine = sorted((r for r in runs if r["task"] == task and r["row"] == row), key=lambda r: r["seed"])
            if not mine:
                continue
            reached = [r["time_to_target_s"] for r in mine if r["time_to_target_s"] is not None]
            charged = [r["time_to_target_s"] if r["time_to_target_s"] is not None else r["time_s"] for r in mine]
            summary[task][row] = {
                "time_to_target_s": [r["time_to_target_s"] for r in mine],
                "time_to_target_s_mean": sum(reached) / len(reached) if reached else None,
                "time_to_target_charged_s_mean": sum(charged) / len(charged),
                "reach_rate": len(reached) / len(mine),
                "final_metric": [r["final_metric"] for r in mine],
                "final_metric_mean": sum(r["final_metric"] for r in mine) / len(mine),
                "time_s_mean": sum(r["time_s"] for r in mine) / len(mine),
                "steps_mean": sum(r["steps"] for r in mine) / len(mine),
                "lr_first": mine[0]["lr_first"],
                "batch_first": mine[0]["batch_first"],
                "batch_changes_mean": sum(r["batch_changes"] for r in mine) / len(mine),
            }
    return summary


def format_tables(summary: dict[str, dict[str, Any]], costs: dict[str, dict[str, float]]) -> str:
    lines = []
    for task, rows in summary.items():
        c = costs[task]
        per = ", ".join(f"{k} {v:.4f} ms/step" for k, v in c.items() if k != "fixed")
        lines += ["", f"### {task}  (modelled bf16 step: {per}; fixed {c['fixed']} ms)", "",
                  "| row | batch | LR | to target ms: mean reached (charged) | per seed | reached | final acc % "
                  "(per seed) | run ms | steps |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for row, s in rows.items():
            mean = "-" if s["time_to_target_s_mean"] is None else f"{1e3 * s['time_to_target_s_mean']:.2f}"
            per_seed = " / ".join("-" if t is None else f"{1e3 * t:.2f}" for t in s["time_to_target_s"])
            finals = " / ".join(f"{100 * m:.1f}" for m in s["final_metric"])
            charged = 1e3 * s["time_to_target_charged_s_mean"]
            lines.append(
                f"| {row} | {s['batch_first']} | {s['lr_first']:.3g} | {mean} ({charged:.2f}) "
                f"| {per_seed} | {s['reach_rate']:.0%} | {100 * s['final_metric_mean']:.1f} ({finals}) "
                f"| {1e3 * s['time_s_mean']:.2f} | {s['steps_mean']:.0f} |"
            )
        if "heuristic" in rows:
            ref = rows["heuristic"]["time_to_target_charged_s_mean"]
            big = {r: s for r, s in rows.items() if "-x" in r and s["reach_rate"] == 1.0}
            if big:
                best = min(big, key=lambda r: big[r]["time_to_target_charged_s_mean"])
                ratio = big[best]["time_to_target_charged_s_mean"] / ref
                lines.append(f"\nbest larger-batch row reaching on every seed: {best}, {ratio:.3f}x the heuristic")
            else:
                lines.append("\nno larger-batch row reaches the target on every seed")
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        main(parse_args(Args, None, __doc__))
    except ValueError as err:  # a bad flag value (ConfigError too): one line, no traceback
        raise SystemExit(str(err)) from None

"""Which LR multiplier (and batch growth) does the training environment's own reward favour, task by task?

    python experiments/lr_budget_probe.py                                   # the training tasks
    python experiments/lr_budget_probe.py --tasks dwcnn-fmnist,transformer-seq,deep-mlp-synthetic
    python experiments/lr_budget_probe.py --multipliers 1 --batch-caps 1,2,4,8   # batch growth instead

Each episode is ``TriAccel-v0`` as ``experiments/train_pretrained.py`` trains on it (10 optimizer steps a
decision, a budget of 16 reference intervals, cost mode ``profile``: modelled H200 time) with every group in bf16,
the batch kept and the task's LR multiplied by ``m`` from the first step (the environment's ``lr_range=(m, m)``,
so the shield's per-decision LR clamp does not apply). The return is the progress made within the budget, the
quantity PPO maximises. A teacher that picks the LR by this return teaches what these numbers show.
With ``--batch-caps`` the policy also grows the batch (one doubling a decision, from the first decision on) until it
reaches ``cap`` × the task's batch; the LR follows the batch by the environment's rule (linear for SGD, √ for AdamW),
as a learned policy's batch move would. Cap 1 keeps the batch.
Writes a JSON with the mean and standard deviation of the return per task and multiplier (keys ``"m"``, or
``"m/bCAP"`` for a cap above 1).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast

import numpy as np

from triaccel_rl.experiment import command_line, cpu_machine, file_to_write, git_commit, parse_args, parse_floats


@dataclass
class Args:
    """Command-line arguments (each field is a ``--flag``)."""

    tasks: str = "synthetic,mlp-fmnist,cnn-fmnist"
    """Comma-separated tasks (default: the shipped policy's training tasks)."""
    multipliers: str = "0.75,1,1.5,2,3"
    """LR multipliers of the task's own LR."""
    batch_caps: str = "1"
    """Grow the batch one doubling a decision up to this multiple of the task's batch (1: keep it)."""
    seeds: int = 3
    """Episodes (seeds 0..N-1) per task and multiplier."""
    budget_intervals: float = 16.0
    """The episode's time budget (``RewardConfig.budget_intervals``), as the shipped policy's training."""
    interval_steps: int = 10
    """Optimizer steps between decisions (the shipped policy was trained with 10)."""
    out: str = "experiments/results/lr_budget_probe.json"
    """Results JSON."""


def episode_return(task: str, multiplier: float, seed: int, args: Args, batch_cap: float = 1.0) -> float:
    """The return of one episode in bf16 with the LR held at ``multiplier`` × the task's.

    With ``batch_cap`` above 1 the batch grows one doubling a decision up to ``batch_cap`` × the task's batch.
    """
    import gymnasium as gym
    from triaccel_rl.envs import TriAccelEnv  # importing it registers TriAccel-v0

    from triaccel_rl.actions import encode
    from triaccel_rl.config import ControllerConfig, RewardConfig
    from triaccel_rl.types import Action, BatchMove, Precision

    config = ControllerConfig(interval_steps=args.interval_steps)
    keep = encode(Action((Precision.BF16,) * config.n_groups, 1.0, BatchMove.KEEP), config)
    grow = encode(Action((Precision.BF16,) * config.n_groups, 1.0, BatchMove.GROW), config)
    env = gym.make(
        "TriAccel-v0",
        task=task,
        config=config,
        reward_config=RewardConfig(budget_intervals=args.budget_intervals),
        lr_range=(multiplier, multiplier),
        compute_bound=False,
        max_decisions=64,
    )
    try:
        env.reset(seed=seed)
        run = cast(TriAccelEnv, env.unwrapped).loop.run
        total, done = 0.0, False
        while not done:
            action = grow if run.batch_size * 2 <= batch_cap * run.task.base_batch_size else keep
            _, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            done = terminated or truncated
    finally:
        env.close()
    return total


def _key(multiplier: float, batch_cap: float) -> str:
    """``"m"``, or ``"m/bCAP"`` where the batch grows."""
    return f"{multiplier:g}" if batch_cap == 1 else f"{multiplier:g}/b{batch_cap:g}"


def main(args: Args) -> dict[str, object]:
    """Runs every task × multiplier × seed; prints a table and writes ``args.out``."""
    from triaccel_rl.compare import json_safe

    tasks, multipliers, caps = check_args(args)
    out = _out_path(args)
    start = time.perf_counter()
    results: dict[str, dict[str, dict[str, float]]] = {}
    for task in tasks:
        returns = {
            _key(m, c): [episode_return(task, m, seed, args, c) for seed in range(args.seeds)]
            for m in multipliers
            for c in caps
        }
        results[task] = {key: {"mean": float(np.mean(r)), "std": float(np.std(r))} for key, r in returns.items()}
        best = max(returns, key=lambda key: float(np.mean(returns[key])))
        cells = "  ".join(f"x{key} {np.mean(r):.2f}±{np.std(r):.2f}" for key, r in returns.items())
        print(f"{task:20s} {cells}   best x{best}", flush=True)
    record = {
        "command": command_line("experiments/lr_budget_probe.py", args),
        "args": asdict(args),
        "device": cpu_machine(),  # every episode runs on the CPU (the environment's default device)
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d"),
        "wall_s": time.perf_counter() - start,
        "returns": results,
    }
    out.write_text(json.dumps(json_safe(record), indent=1, allow_nan=False) + "\n")
    print(f"results: {args.out}")
    return record


def check_args(args: Args) -> tuple[list[str], list[float], list[float]]:
    """The tasks, multipliers and batch caps; ``SystemExit`` naming the first setting that cannot run, before any run.

    Before, an unknown task stopped the job when its turn came (the earlier tasks' episodes, not yet written, lost),
    ``--seeds 0`` or ``-1`` wrote means of no episode (NaN), and ``--multipliers 1,x`` raised float()'s bare error.
    """
    from triaccel_rl.tasks import task_names

    def numbers(text: str, flag: str, least: float) -> list[float]:
        kind = "positive numbers" if least == 0 else f"numbers >= {least:g}"
        usage = f"{flag}={text!r} must be {kind}, comma-separated"
        try:
            values = list(parse_floats(text, flag))
        except ValueError:
            raise SystemExit(usage) from None
        if any(not (v > least if least == 0 else v >= least) or not math.isfinite(v) for v in values):
            raise SystemExit(usage)
        return values

    multipliers = numbers(args.multipliers, "--multipliers", 0)
    caps = numbers(args.batch_caps, "--batch-caps", 1)
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    if not tasks:
        raise SystemExit(f"--tasks={args.tasks!r} is empty: give comma-separated tasks, e.g. synthetic")
    unknown = [task for task in tasks if task not in task_names()]
    if unknown:
        raise SystemExit(f"--tasks: unknown task {unknown[0]!r}; allowed: {', '.join(task_names())}")
    for flag, value in (("--seeds", args.seeds), ("--interval-steps", args.interval_steps)):
        if value < 1:
            raise SystemExit(f"{flag}={value} must be >= 1")
    if not (math.isfinite(args.budget_intervals) and args.budget_intervals > 0):
        raise SystemExit(f"--budget-intervals={args.budget_intervals} must be a positive finite number")
    return tasks, multipliers, caps


def _out_path(args: Args) -> Path:
    """``args.out``, checked writable before any run (a folder was found only after every episode, none written).

    Raises:
        SystemExit: the path is '' or a folder, or its folder cannot be made or written in (``file_to_write``).
    """
    try:
        return file_to_write("--out", args.out, example="lr_budget_probe.json")
    except ValueError as err:
        raise SystemExit(str(err)) from None


if __name__ == "__main__":
    main(parse_args(Args, None, __doc__))

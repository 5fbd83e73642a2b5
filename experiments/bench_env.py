"""Environment throughput: TriAccel-v0 decisions (env steps) per second, vectorised as PPO trains.

python experiments/bench_env.py --tasks synthetic,mlp-fmnist --n-envs 2 --steps 64
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from triaccel_rl.compare import json_safe
from triaccel_rl.experiment import command_line, cpu_machine, file_to_write, git_commit, parse_args


@dataclass
class Args:
    """Command-line arguments (each field is a ``--flag``)."""

    tasks: str = "synthetic,mlp-fmnist,cnn-fmnist"
    """Comma-separated tasks; each is measured on its own."""
    n_envs: int = 2
    """Parallel environments (SubprocVecEnv when > 1)."""
    steps: int = 32
    """Environment steps per environment to time (after one reset, excluded)."""
    interval_steps: int = 20
    """Optimizer steps per decision."""
    device: str = "cpu"
    """Device the training runs on inside each environment."""
    out: str = "experiments/results/env_throughput.json"
    """Results JSON ('' for none)."""


def main(args: Args) -> list[dict[str, object]]:
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    from triaccel_rl.rl import make_env_fns
    from triaccel_rl.tasks import task_names
    from triaccel_rl.training import resolve_device

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in task_names()]
    if not tasks or unknown:  # an unknown or blank name failed after the earlier tasks' measurements, lost
        raise SystemExit(f"--tasks {args.tasks!r}: {'unknown ' + repr(unknown[0]) if unknown else 'empty'}")
    for flag, value in (("--n-envs", args.n_envs), ("--steps", args.steps), ("--interval-steps", args.interval_steps)):
        if value < 1:  # --steps 0 wrote 0.0 env steps/s; --n-envs 0 an IndexError
            raise SystemExit(f"{flag} {value} must be >= 1")
    try:  # --device cuda on a machine without one failed in the first environment, after the tasks' imports
        resolve_device(args.device)
    except ValueError as err:
        raise SystemExit(f"--{err}") from None
    if args.out:
        file_to_write("--out", args.out)
    rows = []
    for task in tasks:
        fns = make_env_fns([task], args.n_envs, max_decisions=10**6, interval_steps=args.interval_steps,
                           device=args.device)  # fmt: skip
        venv = SubprocVecEnv(fns) if args.n_envs > 1 else DummyVecEnv(fns)
        try:
            venv.seed(0)
            venv.reset()
            start = time.perf_counter()
            for _ in range(args.steps):
                venv.step(np.stack([venv.action_space.sample() for _ in range(args.n_envs)]))
            elapsed = time.perf_counter() - start
        finally:
            venv.close()
        row = {
            "task": task,
            "n_envs": args.n_envs,
            "env_steps_per_s": args.steps * args.n_envs / elapsed,
            "optimizer_steps_per_s": args.steps * args.n_envs * args.interval_steps / elapsed,
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_machine(),
            "date": time.strftime("%Y-%m-%d"),
            "commit": git_commit(),
            "command": command_line("experiments/bench_env.py", args),
        }
        rows.append(row)
        print(
            f"{task:16s} {row['env_steps_per_s']:7.2f} env steps/s "
            f"({row['optimizer_steps_per_s']:.0f} optimizer steps/s)"
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(json_safe(rows), indent=1, allow_nan=False) + "\n")
    return rows


def parse(argv: list[str] | None = None) -> Args:
    """Parses ``--flag`` arguments into ``Args``."""
    return parse_args(Args, argv, __doc__)


if __name__ == "__main__":
    try:
        main(parse())
    except ValueError as err:  # a bad flag value (ConfigError too): one line, no traceback
        raise SystemExit(str(err)) from None

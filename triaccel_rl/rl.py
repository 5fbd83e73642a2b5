"""Offline policy training: SB3 PPO on vectorised ``TriAccel-v0`` environments over proxy tasks."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from triaccel_rl.config import ControllerConfig
from triaccel_rl.tasks import get_task

__all__ = ["make_env_fns", "train_policy"]


def make_env_fns(
    tasks: Sequence[str], n_envs: int, max_decisions: int, interval_steps: int, **env_kwargs: Any
) -> list[Any]:
    """One environment factory per worker; worker ``i`` trains on ``tasks[i % len(tasks)]``."""
    for task in tasks:
        get_task(task)  # fail fast on an unknown name, in the parent process

    def factory(task: str) -> Any:
        def make() -> Any:
            import gymnasium as gym
            from stable_baselines3.common.monitor import Monitor

            import triaccel_rl.envs  # noqa: F401  (registers TriAccel-v0 in the worker)

            config = ControllerConfig(interval_steps=interval_steps)
            env = gym.make("TriAccel-v0", task=task, config=config, max_decisions=max_decisions, **env_kwargs)
            return Monitor(env)

        return make

    return [factory(tasks[i % len(tasks)]) for i in range(n_envs)]


def train_policy(
    tasks: Sequence[str],
    *,
    total_timesteps: int,
    n_envs: int = 2,
    vec: str = "subproc",
    max_decisions: int = 20,
    interval_steps: int = 20,
    n_steps: int = 128,
    batch_size: int = 64,
    seed: int = 0,
    out: str | os.PathLike[str] = "runs/policy.zip",
    log_dir: str | os.PathLike[str] | None = None,
    progress_bar: bool = False,
    **env_kwargs: Any,
) -> Path:
    """Trains PPO on ``tasks`` and saves the policy zip; returns its path.

    Raises:
        ValueError: an unknown task, or sizes that PPO cannot use (named).
    """
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    if not tasks:
        raise ValueError("need at least one task")
    if n_envs < 1 or total_timesteps < 1 or n_steps < 1:
        raise ValueError(f"n_envs={n_envs}, total_timesteps={total_timesteps}, n_steps={n_steps} must be >= 1")
    if batch_size > n_steps * n_envs:
        raise ValueError(f"batch_size={batch_size} exceeds the rollout size n_steps*n_envs={n_steps * n_envs}")
    if vec not in ("dummy", "subproc"):
        raise ValueError(f"vec={vec!r}; allowed: dummy, subproc")
    fns = make_env_fns(tasks, n_envs, max_decisions, interval_steps, **env_kwargs)
    venv = SubprocVecEnv(fns) if vec == "subproc" and n_envs > 1 else DummyVecEnv(fns)
    venv.seed(seed)
    try:
        model = PPO(
            "MlpPolicy",
            venv,
            n_steps=n_steps,
            batch_size=batch_size,
            seed=seed,
            device="cpu",  # the policy is a small MLP: the CPU is faster than a GPU round trip
            tensorboard_log=str(log_dir) if log_dir else None,
            verbose=0,
        )
        model.learn(total_timesteps=total_timesteps, progress_bar=progress_bar)
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        model.save(path)
    finally:
        venv.close()
    return path if path.suffix == ".zip" else path.with_suffix(".zip")

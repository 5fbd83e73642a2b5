"""Offline policy training: SB3 PPO on vectorised ``TriAccel-v0`` environments over proxy tasks.

Writes ``<out>.zip`` (the SB3 policy), ``<out>.obs.json`` (the range of observations seen in training,
which the deployed policy uses to detect out-of-distribution inputs and fall back to the heuristic),
checkpoints, TensorBoard curves and, with held-out tasks, periodic evaluations on them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from triaccel_rl.config import ControllerConfig
from triaccel_rl.shield import ObservationStats
from triaccel_rl.tasks import get_task

__all__ = ["make_env_fns", "obs_stats_path", "train_policy"]


def obs_stats_path(policy_zip: str | os.PathLike[str]) -> Path:
    """Where the observation stats of ``policy_zip`` live (beside it, ``.obs.json``)."""
    return Path(policy_zip).with_suffix(".obs.json")


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
    eval_tasks: Sequence[str] = (),
    eval_every: int = 0,
    checkpoint_every: int = 0,
    resume: str | os.PathLike[str] | None = None,
    progress_bar: bool = False,
    **env_kwargs: Any,
) -> Path:
    """Trains PPO on ``tasks`` and saves the policy zip and its observation stats; returns the zip's path.

    Args:
        tasks: training tasks; environment ``i`` runs ``tasks[i % len(tasks)]``.
        total_timesteps: environment steps (decisions) to train for, summed over environments.
        n_envs: parallel environments.
        vec: ``"subproc"`` (one process each) or ``"dummy"`` (in this process).
        max_decisions: decisions per episode.
        interval_steps: optimizer steps per decision.
        n_steps: PPO rollout length per environment.
        batch_size: PPO minibatch size.
        seed: seeds PPO and the environments.
        out: the policy zip to write.
        log_dir: TensorBoard folder (None: none).
        eval_tasks: held-out tasks evaluated every ``eval_every`` steps (mean episode reward logged).
        eval_every: environment steps between evaluations (0: none).
        checkpoint_every: environment steps between checkpoints written beside ``out`` (0: none).
        resume: a policy zip to continue training from (its step count continues).
        progress_bar: show SB3's progress bar.
        env_kwargs: passed to every ``TriAccel-v0``.

    Raises:
        ValueError: an unknown task, or sizes that PPO cannot use (named).
    """
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback, CallbackList, CheckpointCallback, EvalCallback
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    if not tasks:
        raise ValueError("need at least one task")
    if n_envs < 1 or total_timesteps < 1 or n_steps < 1:
        raise ValueError(f"n_envs={n_envs}, total_timesteps={total_timesteps}, n_steps={n_steps} must be >= 1")
    if batch_size > n_steps * n_envs:
        raise ValueError(f"batch_size={batch_size} exceeds the rollout size n_steps*n_envs={n_steps * n_envs}")
    if vec not in ("dummy", "subproc"):
        raise ValueError(f"vec={vec!r}; allowed: dummy, subproc")
    for task in eval_tasks:
        get_task(task)

    class RecordObservations(BaseCallback):
        """Keeps the running range of every observation PPO trained on."""

        def __init__(self) -> None:
            super().__init__()
            self.low: np.ndarray | None = None
            self.high: np.ndarray | None = None
            self.count = 0

        def _on_step(self) -> bool:
            return True

        def _on_rollout_end(self) -> None:
            buffer: Any = self.model.rollout_buffer  # type: ignore[attr-defined]  # PPO and A2C have one
            observations = np.asarray(buffer.observations).reshape(len(buffer.observations) * buffer.n_envs, -1)
            low, high = observations.min(0), observations.max(0)
            self.low = low if self.low is None else np.minimum(self.low, low)
            self.high = high if self.high is None else np.maximum(self.high, high)
            self.count += len(observations)

    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fns = make_env_fns(tasks, n_envs, max_decisions, interval_steps, **env_kwargs)
    venv = SubprocVecEnv(fns) if vec == "subproc" and n_envs > 1 else DummyVecEnv(fns)
    venv.seed(seed)
    eval_env = None
    try:
        if resume is not None:
            model = PPO.load(Path(resume), env=venv, device="cpu", tensorboard_log=str(log_dir) if log_dir else None)
        else:
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
        recorder = RecordObservations()
        callbacks: list[BaseCallback] = [recorder]
        if checkpoint_every > 0:
            callbacks.append(
                CheckpointCallback(max(1, checkpoint_every // n_envs), str(path.parent / "checkpoints"), path.stem)
            )
        if eval_tasks and eval_every > 0:
            eval_env = DummyVecEnv(
                make_env_fns(list(eval_tasks), len(eval_tasks), max_decisions, interval_steps, **env_kwargs)
            )
            callbacks.append(
                EvalCallback(
                    eval_env,
                    n_eval_episodes=len(eval_tasks),
                    eval_freq=max(1, eval_every // n_envs),
                    log_path=str(path.parent / "eval"),
                    deterministic=True,
                    verbose=0,
                )
            )
        model.learn(
            total_timesteps=total_timesteps,
            callback=CallbackList(callbacks),
            progress_bar=progress_bar,
            reset_num_timesteps=resume is None,
        )
        model.save(path)
        if recorder.low is not None and recorder.high is not None:
            ObservationStats(tuple(recorder.low.tolist()), tuple(recorder.high.tolist()), recorder.count).save(
                obs_stats_path(path)
            )
    finally:
        venv.close()
        if eval_env is not None:
            eval_env.close()
    return path if path.suffix == ".zip" else path.with_suffix(".zip")

"""Offline policy training: SB3 PPO on vectorised ``TriAccel-v0`` environments over proxy tasks.

Writes ``<out>.zip`` (the SB3 policy), ``<out>.obs.json`` (the range of observations seen in training,
which the deployed policy uses to detect out-of-distribution inputs and fall back to the heuristic),
checkpoints (each with its ``.obs.json``; one more when interrupted), TensorBoard curves and, with held-out tasks,
periodic evaluations on them. No zip or ``.obs.json`` is written in place: each goes to a temporary file beside its
target and is moved over it, so an interrupted save leaves the previous policy whole.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import json
import logging
import os
import shutil
import time
import warnings
import zipfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from triaccel_rl.config import ControllerConfig, RewardConfig
from triaccel_rl.errors import is_finite_real, is_whole
from triaccel_rl.experiment import purge_tensorboard_after, tqdm_disable, write_text_atomic
from triaccel_rl.observation import OBS_HIGH, ObservationLayout
from triaccel_rl.shield import ObservationStats, obs_stats_path
from triaccel_rl.tasks import get_task

__all__ = [
    "ActionSpread",
    "LrOracleTeacher",
    "TaskCycleEnv",
    "action_spread",
    "env_config",
    "imitate",
    "make_env_fns",
    "obs_stats_path",
    "save_policy",
    "train_policy",
]

_log = logging.getLogger("triaccel_rl")

_SEED_RANGE = 2**32  # PPO's seed goes to np.random.seed, which takes [0, 2**32 - 1]
_RUN_ATTRIBUTE = "tensorboard_run"
"""The PPO model's attribute, saved in its zip, naming the TensorBoard run folder (absolute) its curve is in."""


def env_config(interval_steps: int) -> ControllerConfig:
    """The configuration every training environment runs (``make_env_fns``): the defaults at this interval.

    A policy's actions index this configuration's ``lr_scales``; the policy's ``.obs.json`` records them.
    """
    return ControllerConfig(interval_steps=interval_steps)


def make_env_fns(
    tasks: Sequence[str],
    n_envs: int,
    max_decisions: int | None,
    interval_steps: int,
    torch_threads: int | None = None,
    **env_kwargs: Any,
) -> list[Any]:
    """One environment factory per worker; with several tasks, every worker cycles through all of them.

    Worker ``i`` cycles through ``tasks`` rotated by ``i`` (``tasks[(i + k) % len(tasks)]`` for ``k`` in
    ``range(len(tasks))``), moving on to the next task at every reset (``TaskCycleEnv``): each task gets the same
    share of every worker's episodes, whatever the numbers of tasks and workers (cycling through
    ``tasks[(i + k * n_envs) % len(tasks)]`` only, 3 tasks on 2 workers would give the first half the episodes and the
    others a quarter each), and the workers start on different tasks. Seeded as SB3 seeds worker ``i``
    (``venv.seed(seed)``: ``seed + i``), worker ``i``'s ``k``-th task draws from ``seed + k * n_envs + i``: each
    (worker, task) pair its own episodes.

    Args:
        tasks: registered task names (a list: a str is refused).
        n_envs: number of factories (workers), a whole number >= 1.
        max_decisions: safety cap on decisions per episode (None: the environment's default); episodes
            end when their time budget (``reward_config`` in ``env_kwargs``) is spent.
        interval_steps: optimizer steps per decision.
        torch_threads: ``torch.set_num_threads`` in the worker, a whole number >= 1 (None: leave PyTorch's default). One
            thread per worker avoids oversubscribing the cores when there is one worker per core. A factory sets it
            in the process it runs in: a ``DummyVecEnv``'s run in the caller's (``train_policy`` puts the caller's
            count back when it ends).
        env_kwargs: passed to every ``TriAccel-v0``.

    Raises:
        ValueError: ``tasks`` a str or naming an unknown task, ``n_envs`` or ``torch_threads`` not a whole number
            >= 1, or environment arguments ``TriAccel-v0`` refuses.
    """
    _refuse_str("tasks", tasks)
    # Checked here, in the parent: n_envs=0 gave no factory (a VecEnv of none failed later, naming nothing), and
    # torch_threads=0 failed in every worker.
    if not (is_whole(n_envs) and n_envs >= 1):
        raise ValueError(f"n_envs={n_envs!r} must be a whole number >= 1")
    if torch_threads is not None and not (is_whole(torch_threads) and torch_threads >= 1):
        raise ValueError(f"torch_threads={torch_threads!r} must be a whole number >= 1 (or None: PyTorch's default)")
    for task in tasks:
        get_task(task)  # fail fast on an unknown name, in the parent process
    if "config" in env_kwargs:  # gym.make would get it twice, inside a worker
        raise ValueError(
            "config: the training environments run env_config(interval_steps), the defaults at that interval, whose "
            "LR ladder and groups the policy's actions index; set interval_steps (a config of your own is not taken)"
        )

    def factory(worker_tasks: list[str]) -> Any:
        def make() -> Any:
            import gymnasium as gym
            from stable_baselines3.common.monitor import Monitor

            import triaccel_rl.envs  # noqa: F401, F811  (registers TriAccel-v0 in the worker)

            if torch_threads is not None:
                import torch

                torch.set_num_threads(torch_threads)
            config = env_config(interval_steps)
            envs = [
                gym.make("TriAccel-v0", task=task, config=config, max_decisions=max_decisions, **env_kwargs)
                for task in worker_tasks
            ]
            return Monitor(envs[0] if len(envs) == 1 else TaskCycleEnv(envs, seed_stride=n_envs))

        return make

    # Every argument checked here, in the parent: refused in a worker, it surfaced as a worker's traceback and
    # "Connection reset by peer" (max_decisions=0, say).
    import triaccel_rl.envs  # noqa: F401  (registers TriAccel-v0)

    gym.make("TriAccel-v0", task=tasks[0], config=env_config(interval_steps), max_decisions=max_decisions,
             **env_kwargs).close()  # fmt: skip
    # Every worker cycles through every task, rotated so that the workers start on different ones: equal shares. (A
    # worker given only the tasks i, i + n_envs, ... skewed them where n_envs did not divide their number.)
    return [factory([tasks[(i + k) % len(tasks)] for k in range(len(tasks))]) for i in range(n_envs)]


def _refuse_str(name: str, tasks: Sequence[str]) -> None:
    """Raises a ValueError where ``tasks`` is a str: iterated, ``"synthetic"`` named the tasks ``'s'``, ``'y'``, ..."""
    if isinstance(tasks, str):
        raise ValueError(f"{name}={tasks!r} is a str: give a list of task names, e.g. [{tasks!r}]")


class TaskCycleEnv(gym.Env[np.ndarray, np.ndarray]):
    """Several ``TriAccel-v0`` environments (same spaces, different tasks) behind one: each reset moves to the next.

    The observation and action do not depend on the model, so one policy sees all of them. Every
    inner environment builds its training run at its own reset, and the one left behind at a reset is closed
    (its run's model, optimizer and data freed): holding several costs only their task data, and one run lives at
    a time.

    Args:
        envs: environments with identical observation and action spaces.
        seed_stride: a seeded reset seeds inner environment ``k`` with ``seed + k * seed_stride``. Workers of a
            vectorised environment are seeded ``seed + i``: with a stride of at least their number, no two (worker,
            task) pairs share a seed (with 1, worker 0's second task and worker 1's first drew the same episodes).

    Example:
        >>> import gymnasium as gym
        >>> import triaccel_rl.envs
        >>> env = TaskCycleEnv([gym.make("TriAccel-v0", task=t, max_decisions=1) for t in ("synthetic", "synthetic")])
        >>> _ = env.reset(seed=0); _ = env.reset(); env.current
        1
    """

    def __init__(self, envs: Sequence[gym.Env[np.ndarray, np.ndarray]], seed_stride: int = 1) -> None:
        if not envs:
            raise ValueError("TaskCycleEnv needs at least one environment")
        if not is_whole(seed_stride) or seed_stride < 1:
            raise ValueError(f"seed_stride={seed_stride!r} must be a whole number >= 1")
        for env in envs[1:]:
            if env.observation_space != envs[0].observation_space or env.action_space != envs[0].action_space:
                raise ValueError("TaskCycleEnv: every environment must have the same observation and action spaces")
        self.envs = list(envs)
        self.seed_stride = int(seed_stride)
        self.observation_space = envs[0].observation_space
        self.action_space = envs[0].action_space
        self.current = -1
        self.episode_summary: dict[str, float] | None = None
        """The last ended episode's ``episode_summary`` (``TriAccel-v0``'s; None before one ends): kept until the next
        ends, so a vector env's auto-reset keeps it (``venv.get_attr("episode_summary")``)."""

    @property
    def base_lr_factor(self) -> float:
        """The current episode's LR factor (``TriAccel-v0``'s ``lr_range`` draw; 1.0 before any reset)."""
        return float(getattr(self.envs[self.current].unwrapped, "base_lr_factor", 1.0)) if self.current >= 0 else 1.0

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Moves to the next task and resets it; ``seed`` seeds every inner environment and restarts at the first.

        Inner environment ``k`` is seeded ``seed + k * seed_stride``.
        """
        super().reset(seed=seed)
        if self.current >= 0 and len(self.envs) > 1:
            self.envs[self.current].close()  # its next reset builds a fresh run anyway: free this one's memory now
        if seed is not None:
            # Seed each inner generator without resetting it: a reset builds a training run and trains an
            # interval, which is too costly to do for tasks not used yet.
            for k, env in enumerate(self.envs):
                env.unwrapped.np_random = gym.utils.seeding.np_random(seed + k * self.seed_stride)[0]
            self.current = -1  # a seeded reset restarts the cycle, so the same seed gives the same episodes
        self.current = (self.current + 1) % len(self.envs)
        obs, info = self.envs[self.current].reset(options=options)
        task: Any = getattr(self.envs[self.current].unwrapped, "task", None)
        return obs, {**info, "task": getattr(task, "name", str(task))}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Steps the current task's environment; at an episode's end keeps its ``episode_summary``."""
        obs, reward, terminated, truncated, info = self.envs[self.current].step(action)
        if terminated or truncated:
            self.episode_summary = getattr(self.envs[self.current].unwrapped, "episode_summary", None)
        return obs, float(reward), terminated, truncated, info

    def close(self) -> None:
        """Closes every inner environment."""
        for env in self.envs:
            env.close()


class LrOracleTeacher:
    """A teacher with privileged knowledge of each episode's LR mistuning, for :func:`imitate`.

    It takes ``base``'s actions and replaces the LR-scale index with the rung of ``lr_scales`` nearest (in log)
    to ``1 / base_lr_factor``, the factor by which ``TriAccel-v0(lr_range=...)`` mistuned the episode's LR
    (read from every environment of ``venv`` with ``get_attr``). The student sees only the observation, so it
    learns what in the observation tells a mistuned LR from a tuned one, or failing that, the average move
    over the training distribution ("learning by cheating": a privileged teacher distilled into a student).

    Args:
        base: the policy whose other action components are kept (e.g. the heuristic).
        venv: the vectorised environments the teacher acts in.
        lr_scales: ``ControllerConfig.lr_scales``.
        lr_index: position of the LR-scale index in the action vector (``ControllerConfig.n_groups``).
    """

    def __init__(self, base: Any, venv: Any, lr_scales: Sequence[float], lr_index: int) -> None:
        self.base, self.venv, self.lr_index = base, venv, lr_index
        self._log_scales = np.log(np.asarray(lr_scales, dtype=np.float64))

    def rung_for(self, factor: float) -> int:
        """Index of the LR scale nearest (in log) to ``1 / factor``."""
        return int(np.argmin(np.abs(self._log_scales + np.log(factor))))

    def predict(
        self, observation: np.ndarray, state: Any = None, episode_start: Any = None, deterministic: bool = False
    ) -> Any:
        """``base``'s actions for ``observation``, with the LR index set by the oracle.

        The teacher is deterministic whatever it is given: ``base`` is always asked for its deterministic action,
        and the oracle's rung depends on the episode only.

        Args:
            observation: one row per environment of ``venv``.
            state: ignored: the state returned is ``base``'s.
            episode_start: ignored (it is in every policy's ``predict`` signature).
            deterministic: ignored, as above.

        Returns:
            The actions, one row per environment, and ``base``'s state.
        """
        action, state = self.base.predict(observation, deterministic=True)
        action = np.array(action).reshape(self.venv.num_envs, -1)
        for row, factor in enumerate(self.venv.get_attr("base_lr_factor")):
            action[row, self.lr_index] = self.rung_for(float(factor))
        return action, state


@dataclass(frozen=True)
class ActionSpread:
    """How much a policy's deterministic action depends on its observation (see :func:`action_spread`)."""

    samples: int
    """Observations drawn."""
    distinct: int
    """Distinct actions among them (1: the policy ignores its input)."""
    mode: tuple[int, ...]
    """The most frequent action."""
    mode_share: float
    """Its share of the samples."""
    entry_mode_share: tuple[float, ...]
    """Per action entry, the share of samples whose entry equals the mode's."""


def action_spread(policy: Any, stats: ObservationStats, samples: int = 2048, seed: int = 0) -> ActionSpread:
    """The deterministic actions of ``policy`` on observations drawn uniformly in its training range.

    Each feature is drawn in ``[stats.low, stats.high]``; each group's precision one-hot is a valid one-hot,
    drawn uniformly. A policy whose action never changes (``distinct == 1``) has learned a constant, whatever
    its training curves say.

    Raises:
        ValueError: ``samples`` not a whole number >= 1 (``10.0`` and ``True`` included: NumPy's TypeError named
            no argument), or stats whose size is not an observation's.
    """
    if not (is_whole(samples) and samples >= 1):
        raise ValueError(f"samples={samples!r} must be a whole number >= 1")
    low, high = np.asarray(stats.low, dtype=np.float64), np.asarray(stats.high, dtype=np.float64)
    layout = ObservationLayout.for_size(low.size)
    if layout is None:
        raise ValueError(f"observation stats have {low.size} features: no observation layout has that many")
    rng = np.random.default_rng(seed)
    obs = rng.uniform(low, np.maximum(high, low), size=(samples, low.size))
    names = ("is_fp32", "is_bf16", "is_fp16")
    for group in range(layout.n_groups):
        chosen = rng.integers(len(names), size=samples)
        for k, name in enumerate(names):
            obs[:, layout.group(group, name)] = chosen == k
    actions, _ = policy.predict(obs.astype(np.float32), deterministic=True)
    actions = np.asarray(actions).reshape(samples, -1)
    counts = Counter(map(tuple, actions.tolist()))
    mode, n = counts.most_common(1)[0]
    return ActionSpread(
        samples=samples,
        distinct=len(counts),
        mode=tuple(int(v) for v in mode),
        mode_share=n / samples,
        entry_mode_share=tuple(float(v) for v in (actions == np.asarray(mode)).mean(axis=0)),
    )


def imitate(
    model: Any,
    venv: Any,
    teacher: Any,
    n_steps: int,
    epochs: int = 200,
    batch_size: int = 64,
    gamma: float = 0.99,
    learning_rate: float | None = None,
    progress_bar: bool | None = False,
) -> dict[str, float]:
    """Warm start: fits ``model``'s policy to ``teacher``'s actions (and its value net to their returns).

    Runs ``teacher`` (any policy with ``predict``, e.g. the heuristic) for ``n_steps`` decisions summed over
    ``venv``'s environments, then minimises the negative log-likelihood of the teacher's actions and the
    squared error of the value net against the discounted returns (episodes cut by the rollout end are
    bootstrapped from zero) for ``epochs`` passes. Fitting is cheap beside collecting (1024 decisions: about 6 s
    for 200 passes against minutes in the environments); 20 passes fit only the teacher's most frequent action, and
    the policy is then a constant.

    Args:
        model: the SB3 PPO model whose ``policy`` is fitted, in place.
        venv: the vectorised environments the teacher decides in (``reset``, ``step``, ``num_envs``).
        teacher: the policy imitated (``predict``).
        n_steps: teacher decisions to imitate, summed over the environments.
        epochs: passes over those decisions.
        batch_size: decisions per gradient step.
        gamma: the discount of the returns the value net is fitted to.
        learning_rate: the fit's step size, a finite number > 0: a fresh optimizer of the model's kind and settings
            (SB3's Adam, ``eps=1e-5``) at this rate, so the model's own optimizer (PPO's: its rate and moments) is
            left as it was. None: the fit steps the model's own optimizer at its rate, and PPO's updates then start
            from the fit's Adam moments (20 passes at SB3's 3e-4 fit 55% of the shipped recipe's teacher decisions,
            at 3e-3 98.5%).
        progress_bar: show tqdm bars on stderr, one over the teacher's decisions as they are collected (the slow part,
            minutes in the environments), then one over the fit's passes: True always, False never, None only where
            stderr is a terminal (:func:`~triaccel_rl.experiment.tqdm_disable`). The bars only count: the decisions,
            the fit and its random draws are the same either way.

    Returns:
        ``{"decisions": ..., "nll": ..., "value_mse": ..., "agreement": ...}`` after the last pass: ``decisions``
        imitated (``n_steps`` rounded down to whole rounds of the environments, at least one round); ``agreement``
        the share of decisions whose deterministic action equals the teacher's in every component.
    """
    import torch
    from tqdm.auto import tqdm

    if learning_rate is not None and not (is_finite_real(learning_rate) and learning_rate > 0):
        raise ValueError(
            f"learning_rate={learning_rate!r} must be a finite number > 0, the imitation's own Adam step size (or "
            "None: the model's optimizer, at its rate)"
        )
    observations, actions, rewards, dones = [], [], [], []
    rounds = max(1, n_steps // venv.num_envs)
    disable = tqdm_disable(progress_bar)
    # Shown before the reset, which trains an interval in every environment: else the warm start runs for minutes
    # with no output before PPO's bar appears. Each bar is closed as an exception (a Ctrl-C) leaves it, before
    # train_policy's warning, which would otherwise land inside the bar's line.
    with tqdm(
        total=rounds * venv.num_envs,
        desc="warm start: teacher's decisions",
        unit="decision",
        disable=disable,
        dynamic_ncols=True,
    ) as collecting:
        obs = venv.reset()
        for _ in range(rounds):
            action, _ = teacher.predict(obs, deterministic=True)
            action = np.asarray(action).reshape(venv.num_envs, -1)
            observations.append(obs)
            actions.append(action)
            obs, reward, done, _ = venv.step(action)
            rewards.append(reward)
            dones.append(done)
            collecting.update(venv.num_envs)
    returns = np.zeros((len(rewards), venv.num_envs), dtype=np.float32)
    running = np.zeros(venv.num_envs, dtype=np.float32)
    for t in reversed(range(len(rewards))):
        running = rewards[t] + gamma * running * (1.0 - dones[t])
        returns[t] = running
    policy = model.policy
    obs_t = torch.as_tensor(np.concatenate(observations), dtype=torch.float32)
    act_t = torch.as_tensor(np.concatenate(actions), dtype=torch.long)
    ret_t = torch.as_tensor(returns.reshape(-1), dtype=torch.float32)
    # At a rate of its own, PPO's optimizer is not stepped: PPO starts at its own rate with no moments, as without a
    # warm start. The same kind and settings as PPO's, so the fit at PPO's rate steps as the model's optimizer would.
    optimizer = (
        policy.optimizer
        if learning_rate is None
        else policy.optimizer_class(policy.parameters(), lr=float(learning_rate), **policy.optimizer_kwargs)
    )
    generator = torch.Generator().manual_seed(0)
    policy.set_training_mode(True)
    with tqdm(total=epochs, desc="warm start: fit", unit="pass", disable=disable, dynamic_ncols=True) as fitting:
        for _ in range(epochs):
            for index in torch.randperm(len(obs_t), generator=generator).split(batch_size):
                values, log_prob, _ = policy.evaluate_actions(obs_t[index], act_t[index])
                loss = -log_prob.mean() + 0.5 * torch.nn.functional.mse_loss(values.flatten(), ret_t[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            fitting.update()
    policy.set_training_mode(False)
    with torch.no_grad():
        values, log_prob, _ = policy.evaluate_actions(obs_t, act_t)
        predicted = policy.get_distribution(obs_t).mode()
    return {
        "decisions": len(act_t),  # whole rounds of the environments: n_steps rounded down, at least one round
        "nll": float(-log_prob.mean()),
        "value_mse": float(torch.nn.functional.mse_loss(values.flatten(), ret_t)),
        "agreement": float((predicted == act_t).all(dim=1).float().mean()),
    }


def train_policy(
    tasks: Sequence[str],
    *,
    total_timesteps: int,
    n_envs: int = 2,
    vec: str = "subproc",
    budget_intervals: float = 16.0,
    max_decisions: int | None = None,
    interval_steps: int = 20,
    n_steps: int | None = None,
    batch_size: int | None = None,
    ent_coef: float | None = None,
    learning_rate: float | None = None,
    seed: int = 0,
    out: str | os.PathLike[str] = "runs/policy.zip",
    log_dir: str | os.PathLike[str] | None = None,
    eval_tasks: Sequence[str] = (),
    eval_every: int = 0,
    checkpoint_every: int = 0,
    resume: str | os.PathLike[str] | None = None,
    progress_bar: bool | None = False,
    torch_threads: int | None = None,
    warm_start: str | None = None,
    warm_start_steps: int = 512,
    warm_start_epochs: int = 200,
    warm_start_learning_rate: float | None = None,
    **env_kwargs: Any,
) -> Path:
    """Trains PPO on ``tasks`` and saves the policy zip and its observation stats; returns the zip's path.

    Args:
        tasks: training tasks; every environment cycles through all of them, one per episode, environment ``i``
            starting on ``tasks[i % len(tasks)]`` (:func:`make_env_fns`).
        total_timesteps: environment steps (decisions) to train for, summed over environments; with ``resume``, steps
            more than the resumed policy's.
        n_envs: parallel environments.
        vec: ``"subproc"`` (one process each) or ``"dummy"`` (in this process).
        budget_intervals: each episode's time budget, in intervals of fp32 at the task's base batch
            (``RewardConfig.budget_intervals``; ignored when ``env_kwargs`` holds a ``reward_config``).
        max_decisions: safety cap on decisions per episode (None: the environment's, 8 × the budget).
        interval_steps: optimizer steps per decision.
        n_steps: PPO rollout length per environment (None: 128, or with ``resume`` the resumed policy's).
        batch_size: PPO minibatch size (None: 64, or with ``resume`` the resumed policy's).
        ent_coef: PPO's entropy bonus, a finite number >= 0 (None: SB3's 0.0, or with ``resume`` the resumed
            policy's): it holds the action probabilities away from one action.
        learning_rate: the Adam step size of PPO's updates, a finite number > 0 (None: SB3's 3e-4, or with
            ``resume`` the resumed policy's). A warm start's imitation runs at it too unless
            ``warm_start_learning_rate`` is given.
        seed: seeds PPO and the environments, in ``[0, 2**32 - 1]`` (a resumed run: ``seed`` plus the steps it has
            trained, modulo ``2**32``, so that it draws episodes the first run did not); worker ``i``'s ``k``-th task
            draws from ``seed + k * n_envs + i`` (:func:`make_env_fns`); every held-out evaluation runs the episodes of
            this seed.
        out: the policy zip to write (``.zip``); its observation stats go beside it (``.obs.json``, with ``resume``
            the resumed policy's range widened by this run's).
        log_dir: TensorBoard folder (None: none). Each PPO update's ``train/*`` values are written once, right after
            it, at the steps it trained on. A new run writes a new run folder in it (``PPO_<n>``, one past the highest
            there), which every zip it saves (``out`` and each checkpoint) records (``tensorboard_run`` in the zip's
            ``data``). A resume of ``out`` or one of its checkpoints goes on writing the run its zip records, first
            marking it to drop the points past the resumed step (a purge mark, as ``SummaryWriter(purge_step=...)``
            writes: TensorBoard hides them, nothing is deleted), which resumed from an earlier checkpoint belong to the
            run this one replaces. Any other resume (a zip recording no run, saved before runs were recorded or
            trained without ``log_dir``; a run gone, or outside ``log_dir``; another policy than ``out`` and its
            checkpoints, whose run stays its own) writes a new run folder and marks none, with a warning saying why:
            the runs of other policies sharing ``log_dir`` are never written into or marked.
        eval_tasks: held-out tasks, evaluated as checkpoints are taken: after the first update past every multiple of
            ``eval_every`` steps, each evaluation stamped with the steps its weights trained on, so the evaluation at
            ``N`` scores the weights of ``<out's stem>_N_steps.zip`` (mean episode reward logged to TensorBoard as
            ``eval/mean_reward``; every evaluation kept in ``eval/evaluations.npz`` beside ``out``, with ``resume``
            after the resumed run's evaluations up to its step where they ran the same episodes:
            ``eval/evaluations.json`` records the tasks, seed, ``interval_steps``, ``max_decisions`` and environment
            arguments, and a curve of other ones, or of a record without them, is moved aside with a warning).
        eval_every: environment steps between evaluations (0: none).
        checkpoint_every: environment steps between checkpoints, ``checkpoints/<out's stem>_<steps>_steps.zip`` beside
            ``out``, each with its observation stats (``.obs.json``) so that it loads with the fallback and resumes
            with its range (0: none). Each is taken after the first update past a multiple of ``checkpoint_every``
            (``steps``: the steps its weights were trained on, a multiple of the rollout size); one due when training
            ends is taken then (a run ending between multiples takes none for its last steps: ``out`` holds them).
            Resumed from an earlier checkpoint into the same folder, the checkpoints past it are moved to
            ``checkpoints/replaced_after_<steps>_steps/`` (``_2``, ``_3``, ... where that name is taken; with a
            warning), not overwritten or left among the new; so they are without ``checkpoint_every``, before any
            checkpoint (Ctrl-C's, or that of a failed final save) is written. A run resumed from a policy of another
            folder (neither ``out`` nor one of its checkpoints) moves all the checkpoints there to
            ``checkpoints/replaced_after_0_steps/``, with a warning. A new run (no ``resume``) into the folder
            of an earlier one moves all of that run's checkpoints to ``checkpoints/replaced_after_0_steps/``, and its
            ``eval/evaluations.npz`` and ``.json`` to ``eval/evaluations_replaced_after_0_steps.npz`` and ``.json``
            (``_2``, ... likewise), whatever ``eval_tasks``, with warnings: nothing is deleted.
        resume: a policy zip to continue training from (its step count, TensorBoard run (see ``log_dir``) and
            observation range continue; a warning where its observation stats record another ``interval_steps`` than
            this run's). A checkpoint set aside in ``checkpoints/replaced_after_<steps>_steps[_<n>]/`` beside
            ``out`` is refused: continued there, the replacing run's checkpoints past ``<steps>`` would sit among its
            run's; resume it into another folder, where its run's evaluations are not continued (a warning; the copy
            ``eval/evaluations_replaced_after_<steps>_steps[_<n>].npz`` keeps them, its ``_<n>`` not always the
            folder's).
        progress_bar: show a progress bar (tqdm, on stderr) over the environment steps; with ``warm_start``, the
            imitation's bars first (:func:`imitate`: its teacher's decisions, then its passes). True always, False
            never, None only where stderr is a terminal (``triaccel-rl train-policy``'s; ``experiment.tqdm_disable``).
            Log records reach your handlers as they are: one writing to the same terminal prints into a bar's line
            unless it writes through ``tqdm.write`` (``tqdm.contrib.logging.logging_redirect_tqdm`` makes it; the
            CLI's does).
        torch_threads: PyTorch threads in each environment (None: PyTorch's default); 1 when there is
            one environment per core. Environments in this process (``n_envs=1`` or ``vec="dummy"``) share its
            count: it is set for the duration of the call (PPO's updates run with it too), and the caller's count is
            put back when the call returns or raises.
        warm_start: a policy spec (``make_policy``, e.g. ``"heuristic"``) whose actions the new policy first
            imitates (:func:`imitate`) before PPO starts; with the suffix ``+lr-oracle`` (``"heuristic+lr-oracle"``)
            its LR choice is replaced by :class:`LrOracleTeacher`'s (useful with ``lr_range``); None: PPO from
            scratch. Ignored with ``resume``.
        warm_start_steps: decisions of the teacher to imitate (summed over the environments); they are
            not counted in ``total_timesteps``. The imitation's fit is written to ``warm_start.json``
            beside ``out``; a new run (no ``resume``) moves an earlier run's ``warm_start.json`` there to
            ``warm_start_replaced_after_0_steps.json`` (``_2``, ... likewise), with a warning; a resumed run keeps it.
        warm_start_epochs: passes of :func:`imitate` over the teacher's decisions.
        warm_start_learning_rate: the imitation's own Adam step size, a finite number > 0 (recorded in
            ``warm_start.json``): PPO's optimizer is left untouched, so PPO starts at ``learning_rate`` with no
            moments. None: the imitation steps PPO's optimizer at ``learning_rate`` (20 passes at 3e-4 fit 55% of the
            shipped recipe's teacher decisions, at 3e-3 98.5%), and PPO starts from the fit's moments.
        env_kwargs: passed to every ``TriAccel-v0``.

    Interrupted (``KeyboardInterrupt``, Ctrl-C), it saves a checkpoint as above of the last update's weights (the
    steps collected since are left out, for the resumed run to collect again), logs its path and its stats' (or that
    it has none: a new policy before its first update) and re-raises;
    ``resume`` continues from it. Interrupted in the warm start's imitation, it saves nothing (the fit is not kept
    half done, nor ``warm_start.json`` written), logs so and re-raises. Interrupted while saving (``out`` or a
    checkpoint), the files already at that name are left whole: each zip and its stats are written beside their names
    and moved over them (stats first, then the zip), and an interrupted final save keeps the trained weights as a
    checkpoint.

    Raises:
        ValueError: an unknown task, ``tasks`` or ``eval_tasks`` a str (not a list), sizes that PPO cannot use
            (named), a ``resume`` whose observation stats cannot be read, record another LR ladder or hold another
            number of features than an observation's, or one set aside in ``out``'s ``checkpoints/`` (above).
    """
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback, CallbackList, EvalCallback
    from stable_baselines3.common.logger import Logger, configure
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    # Before any other use: "synthetic" was read as the tasks 's', 'y', ... ("unknown task 's'")
    _refuse_str("tasks", tasks)
    _refuse_str("eval_tasks", eval_tasks)
    if not tasks:
        raise ValueError(f"tasks={list(tasks)!r} names no task: give one or more (see `triaccel-rl tasks`)")
    if Path(out).suffix != ".zip":  # SB3 would append .zip to any other name, and the stats would miss it
        raise ValueError(f"out={str(out)!r} must name a .zip file")
    # Whole numbers, checked before the first rollout: batch_size=4.5 failed in SB3 after a whole rollout, n_envs=1.5
    # named no argument, checkpoint_every=2.5 was taken.
    for name, value in (("n_envs", n_envs), ("total_timesteps", total_timesteps), ("n_steps", n_steps)):
        if value is not None and not (is_whole(value) and value >= 1):
            raise ValueError(f"{name}={value!r} must be a whole number >= 1")
    if batch_size is not None and not (is_whole(batch_size) and batch_size >= 2):
        raise ValueError(
            f"batch_size={batch_size!r} must be a whole number >= 2 (PPO normalises advantages over each minibatch)"
        )
    if ent_coef is not None and not (is_finite_real(ent_coef) and ent_coef >= 0):
        raise ValueError(f"ent_coef={ent_coef!r} must be a finite number >= 0 (PPO's entropy bonus; 0: none)")
    if learning_rate is not None and not (is_finite_real(learning_rate) and learning_rate > 0):
        raise ValueError(f"learning_rate={learning_rate!r} must be a finite number > 0 (PPO's Adam step size)")
    if warm_start_learning_rate is not None and not (
        is_finite_real(warm_start_learning_rate) and warm_start_learning_rate > 0
    ):
        raise ValueError(
            f"warm_start_learning_rate={warm_start_learning_rate!r} must be a finite number > 0, the warm start's own "
            "Adam step size (or None: PPO's optimizer, at learning_rate)"
        )
    # Given anew for a resumed policy, they replace its own; otherwise it keeps them.
    hyper: dict[str, Any] = {k: v for k, v in (("n_steps", n_steps), ("batch_size", batch_size)) if v is not None}
    # Floats, as a new policy's: a Fraction failed in PPO's loss, a NumPy float was saved as one.
    if ent_coef is not None:
        hyper["ent_coef"] = float(ent_coef)
    if learning_rate is not None:  # PPO.load builds its schedule from this value
        hyper["learning_rate"] = float(learning_rate)
    fresh_n_steps, fresh_batch = n_steps or 128, batch_size or 64  # a new policy's
    if resume is None and fresh_batch > fresh_n_steps * n_envs:
        raise ValueError(f"batch_size={fresh_batch} exceeds the rollout size n_steps*n_envs={fresh_n_steps * n_envs}")
    for name, value in (("eval_every", eval_every), ("checkpoint_every", checkpoint_every)):
        if not (is_whole(value) and value >= 0):
            raise ValueError(f"{name}={value!r} must be a whole number >= 0 (0: none)")
    if bool(eval_tasks) != (eval_every > 0):  # one without the other evaluated nothing, silently
        given = (
            f"eval_tasks={','.join(eval_tasks)} and eval_every=0"
            if eval_tasks
            else f"eval_every={eval_every} and eval_tasks=(none)"
        )
        raise ValueError(f"{given}: give both (tasks, and the steps between evaluations) or neither")
    if torch_threads is not None and not (is_whole(torch_threads) and torch_threads >= 1):
        raise ValueError(f"torch_threads={torch_threads!r} must be a whole number >= 1 (or None: PyTorch's default)")
    if not is_whole(seed) or not 0 <= seed < _SEED_RANGE:  # PPO seeds NumPy's global generator with it
        raise ValueError(f"seed={seed!r} must be a whole number in [0, {_SEED_RANGE - 1}]")
    if resume is not None and not (Path(resume).is_file() or Path(f"{resume}.zip").is_file()):
        raise ValueError(f"resume={str(resume)!r}: no such policy zip")
    if resume is not None and not Path(resume).is_file():
        # The zip SB3 opens: "runs/policy_lr0.5" once looked for its stats at runs/policy_lr0.obs.json (with_suffix)
        resume = Path(f"{resume}.zip")
    if resume is not None and not zipfile.is_zipfile(resume):  # SB3 said "Error: the file ... wasn't a zip-file"
        raise ValueError(f"resume={str(resume)!r} is not a zip file: give the policy .zip train_policy saved")
    if resume is not None and _set_aside_in(Path(resume), Path(out).parent / "checkpoints"):
        # Its run's later checkpoints are set aside beside it, the replacing run's sit in checkpoints/ past the step
        # it was replaced after, and its evaluations are in a copy: continued here, two runs' checkpoints were mixed
        # in checkpoints/ and its evaluation curve was lost.
        raise ValueError(
            f"resume={str(resume)!r} is a checkpoint a later run set aside in "
            f"{str(Path(out).parent / 'checkpoints')!r}, of a run another replaced there: resume it into another out "
            f"folder (a new one) than {str(out)!r}"
        )
    if vec not in ("dummy", "subproc"):
        raise ValueError(f"vec={vec!r}; allowed: dummy, subproc")
    if not all(is_whole(n) and n >= 1 for n in (warm_start_steps, warm_start_epochs)):  # -100 imitated one decision
        raise ValueError(
            f"warm_start_steps={warm_start_steps!r} and warm_start_epochs={warm_start_epochs!r} must be whole numbers "
            ">= 1"
        )
    for task in eval_tasks:
        get_task(task)
    env_kwargs.setdefault("reward_config", RewardConfig(budget_intervals=budget_intervals))

    ladder = env_config(interval_steps).lr_scales
    n_features = ObservationLayout(env_config(interval_steps).n_groups).size
    if resume is not None:
        # Read as a PPO policy for these spaces first, refused by name: a truncated zip passes is_zipfile (an SB3 zip
        # holds zips) and raised a bare AssertionError in SB3, a zip for other spaces SB3's mismatch naming no file,
        # and an A2C zip resumed silently as PPO with A2C's optimizer (and --batch-size dropped).
        from triaccel_rl.actions import action_space
        from triaccel_rl.policies.learned import LearnedPolicy

        observations = gym.spaces.Box(-OBS_HIGH, OBS_HIGH, (n_features,), np.float32)
        LearnedPolicy(resume, observations, action_space(env_config(interval_steps)), algorithm="ppo")
    resumed_stats = _resumed_stats(resume, ladder, n_features, interval_steps) if resume is not None else None

    class RecordObservations(BaseCallback):
        """Keeps the running range of every observation PPO trained on, and the steps its weights have trained on.

        A rollout's range is taken when it ends and counted once the update on it has run (when the next rollout
        starts, or training ends): until then the weights have seen nothing of it.
        """

        def __init__(self) -> None:
            super().__init__()
            self.low: np.ndarray | None = None
            self.high: np.ndarray | None = None
            self.count = 0
            self.trained_timesteps = 0
            """Environment steps whose rollouts the weights have been updated on (a resumed run's included)."""
            self._pending: tuple[np.ndarray, np.ndarray, int] | None = None
            self._before_update: tuple[dict[str, Any], dict[str, Any]] | None = None

        def _on_training_start(self) -> None:
            self.trained_timesteps = self.model.num_timesteps

        def _on_step(self) -> bool:
            return True

        def _on_rollout_end(self) -> None:
            buffer: Any = self.model.rollout_buffer  # type: ignore[attr-defined]  # PPO and A2C have one
            observations = np.asarray(buffer.observations).reshape(len(buffer.observations) * buffer.n_envs, -1)
            self._pending = (observations.min(0), observations.max(0), len(observations))
            # The update on this rollout runs next, a gradient step at a time: what the policy was before it, for an
            # interruption half-way through (the saved weights must be an update's, whole).
            policy: Any = self.model.policy
            self._before_update = (copy.deepcopy(policy.state_dict()), copy.deepcopy(policy.optimizer.state_dict()))

        def discard_unfinished_update(self) -> bool:
            """Puts back the policy's weights and optimizer from before an update that did not finish; True if one."""
            if self._before_update is None:
                return False
            weights, optimizer = self._before_update
            policy: Any = self.model.policy
            policy.load_state_dict(weights)
            policy.optimizer.load_state_dict(optimizer)
            self._before_update = None
            return True

        def _on_rollout_start(self) -> None:
            self._commit()

        def _on_training_end(self) -> None:
            self._commit()

        def _commit(self) -> None:
            """The update on the last rollout has run: its range counts."""
            if self._pending is not None:
                low, high, count = self._pending
                self.low = low if self.low is None else np.minimum(self.low, low)
                self.high = high if self.high is None else np.maximum(self.high, high)
                self.count += count
                self._pending = None
            self._before_update = None  # the update ran to its end
            self.trained_timesteps = self.model.num_timesteps

        def stats(self) -> ObservationStats | None:
            """The range of every observation the policy has trained on so far, the resumed run's included.

            Only rollouts the weights were updated on count: not the rollout in progress, nor one whose update has
            not run.
            """
            stats = None
            if self.low is not None and self.high is not None:
                low, high = tuple(self.low.tolist()), tuple(self.high.tolist())
                stats = ObservationStats(low, high, self.count, ladder, interval_steps)
            if resumed_stats is None:
                return stats
            return resumed_stats if stats is None else resumed_stats.merged(stats)

    def save_checkpoint(model: Any) -> tuple[Path, Path | None]:
        """Writes ``checkpoints/<out stem>_<steps>_steps.zip`` and its observation stats beside it; returns both paths.

        The stats' path is None where there are none to write: a new policy before its first update (nor a resumed
        one whose zip had none) has recorded no range.

        ``steps`` (and the step count saved in the zip, from which a resumed run counts on) are the steps the
        weights were trained on: between updates (Ctrl-C in a rollout, or in the update on it) the steps collected
        since the last update are left out, and a resumed run collects them again.
        """
        collected = model.num_timesteps
        model.num_timesteps = recorder.trained_timesteps
        checkpoint = path.parent / "checkpoints" / f"{path.stem}_{model.num_timesteps}_steps.zip"
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        try:
            # No stats before the first rollout of a new policy: it has trained on nothing yet.
            stats_file = save_policy(model, checkpoint, recorder.stats())
        finally:
            model.num_timesteps = collected
        return checkpoint, stats_file

    class Checkpoint(BaseCallback):
        """:func:`save_checkpoint` after the first update past every multiple of ``every`` environment steps.

        The run's steps, a resumed run's counted on from its checkpoint (counted from the resume, the multiples fell
        elsewhere). Saved when the next rollout starts (or training ends), so that a checkpoint holds whole updates:
        one saved in the middle of a rollout would record steps its weights never trained on, and a resumed run skip
        them.
        """

        def __init__(self, every: int) -> None:
            super().__init__()
            self.every = every
            self._due = False
            self._multiples = 0

        def _on_training_start(self) -> None:
            self._multiples = self.model.num_timesteps // self.every

        def _on_step(self) -> bool:
            multiples = self.model.num_timesteps // self.every
            if multiples > self._multiples:
                self._multiples, self._due = multiples, True
            return True

        def _on_rollout_start(self) -> None:
            if self._due:
                save_checkpoint(self.model)
                self._due = False

        def _on_training_end(self) -> None:
            self._on_rollout_start()

    class Progress(BaseCallback):
        """A tqdm bar over this call's environment steps (SB3's own bar needs ``rich``, which is not installed)."""

        def __init__(self, total: int, disable: bool | None) -> None:
            super().__init__()
            self.total = total
            self.disable = disable
            self.bar: Any = None

        def _on_training_start(self) -> None:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=self.total, desc="train-policy", unit="step", disable=self.disable, dynamic_ncols=True
            )

        def _on_step(self) -> bool:
            self.bar.update(self.training_env.num_envs)
            return True

        def close(self) -> None:
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    class UpdateCurves(BaseCallback):
        """Writes each PPO update's ``train/*`` values (TensorBoard) as soon as it has run, at the steps it trained on.

        SB3 records them in the update and writes them with the next rollout's curves, at that rollout's end: update
        ``k`` landed at the step count of rollout ``k + 1``, and the last update, written by a final dump at the run's
        last step, shared that step with the one before (the updates on 8 and on 16 steps both at 16).
        """

        def __init__(self) -> None:
            super().__init__()
            self._updating = False

        def _on_step(self) -> bool:
            return True

        def _on_rollout_end(self) -> None:
            self._updating = True  # the update on this rollout runs next

        def _on_rollout_start(self) -> None:
            if self._updating:  # the update has run, and no step since: num_timesteps is the steps it trained on
                self.logger.dump(step=self.model.num_timesteps)
                self._updating = False

        def _on_training_end(self) -> None:
            self._on_rollout_start()

        def _on_training_start(self) -> None:
            if continued:  # the resumed policy's own run: drop its points past the resume
                _purge_curves_after(self.logger, self.model.num_timesteps)

    class HeldOutEvaluation(EvalCallback):
        """SB3's evaluation, each time on the same episodes, of the weights a checkpoint of that step count holds.

        The held-out environments are seeded before each evaluation: unseeded, every evaluation drew new runs (data
        subset, initial weights) from fresh OS entropy, so the curve mixed the policy's progress with the draw and two
        runs of one ``seed`` evaluated differently. Evaluations fall as :class:`Checkpoint` saves: due at the first step
        past a multiple of ``eval_every``, run after the update on that rollout (when the next rollout starts, or
        training ends), stamped with the steps the weights trained on. SB3 evaluates from ``_on_step``, in the middle of
        a rollout and before its update: its evaluation stamped ``N`` scores the weights trained on
        ``N - n_steps * n_envs`` (the checkpoint of ``N`` holds those trained on ``N``), and the final weights are
        never evaluated.
        """

        def _init_callback(self) -> None:
            # The held-out environments run in one process (a DummyVecEnv) whatever the training ones run in: SB3
            # warns of the mismatch, which only matters for wrappers that normalise (we have none).
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Training and eval env are not of the same type")
                super()._init_callback()
            self._multiples = self.model.num_timesteps // eval_every
            self._due = False

        def _on_step(self) -> bool:
            # At the run's multiples of eval_every, a resumed run's counted on from its checkpoint (SB3 counts its
            # calls from the resume: evaluations fell at 16 and 40 where checkpoints fell at 16, 32 and 48).
            multiples = self.model.num_timesteps // eval_every
            if multiples > self._multiples:
                self._multiples, self._due = multiples, True
            return True

        def _on_rollout_start(self) -> None:
            if self._due:
                self._due = False
                self.eval_env.seed(seed)
                self.num_timesteps = self.model.num_timesteps  # the steps the weights trained on: stamps the result
                # SB3 rewrites evaluations.npz in place: a Ctrl-C or a full disk mid-write left it cut short (a resume
                # then could not continue it). Written beside it and moved over it, the previous file stays whole.
                final, partial = self.log_path, f"{self.log_path}.partial"
                self.log_path = partial
                try:
                    super()._on_step()  # SB3's evaluation (eval_freq=1: it evaluates at every call)
                    os.replace(f"{partial}.npz", f"{final}.npz")
                finally:
                    self.log_path = final
                    Path(f"{partial}.npz").unlink(missing_ok=True)

        def _on_training_end(self) -> None:
            self._on_rollout_start()

    recorder = RecordObservations()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fns = make_env_fns(tasks, n_envs, max_decisions, interval_steps, torch_threads, **env_kwargs)
    # In-process environments' factories set torch_threads in this process: put the caller's count back at the end.
    caller_threads = torch.get_num_threads()
    venv: Any = None
    eval_env = None
    warm_record: dict[str, Any] | None = None  # the warm start's fit, for warm_start.json
    try:
        venv = SubprocVecEnv(fns) if vec == "subproc" and n_envs > 1 else DummyVecEnv(fns)
        venv.seed(seed)
        if resume is not None:
            model = PPO.load(
                Path(resume),
                env=venv,
                device="cpu",
                custom_objects=hyper,  # replaces the saved values before the rollout buffer is built
                tensorboard_log=str(log_dir) if log_dir else None,
            )
            if model.batch_size > model.n_steps * n_envs:
                raise ValueError(
                    f"batch_size={model.batch_size} exceeds the rollout size n_steps*n_envs={model.n_steps * n_envs}"
                )
            # PPO.load seeded PPO and the environments with the seed saved in the zip, which replayed the first run's
            # episodes from its start and ignored `seed`: this run draws from `seed` and the steps already trained,
            # wrapped into NumPy's seed range (a seed near its top went out of it).
            model.seed = (seed + model.num_timesteps) % _SEED_RANGE
            model.set_random_seed(model.seed)
        else:
            model = PPO(
                "MlpPolicy",
                venv,
                n_steps=fresh_n_steps,
                batch_size=fresh_batch,
                ent_coef=0.0 if ent_coef is None else float(ent_coef),
                learning_rate=3e-4 if learning_rate is None else float(learning_rate),
                seed=seed,
                device="cpu",  # the policy is a small MLP: the CPU is faster than a GPU round trip
                tensorboard_log=str(log_dir) if log_dir else None,
                verbose=0,
            )
            if warm_start is not None:
                from triaccel_rl.policies import make_policy

                teacher_config = env_config(interval_steps)
                base_name, oracle = warm_start.removesuffix("+lr-oracle"), warm_start.endswith("+lr-oracle")
                teacher: Any = make_policy(base_name, teacher_config)
                if oracle:  # the heuristic's moves, the LR from the episode's known mistuning
                    teacher = LrOracleTeacher(teacher, venv, teacher_config.lr_scales, teacher_config.n_groups)
                try:
                    fit = imitate(
                        model,
                        venv,
                        teacher,
                        warm_start_steps,
                        epochs=warm_start_epochs,
                        learning_rate=warm_start_learning_rate,
                        progress_bar=progress_bar,
                    )
                except KeyboardInterrupt:
                    # Nothing is kept: the weights are PPO's initial ones (while the teacher's decisions are collected,
                    # the slow part) or a fit cut short, and a run resumed from them would skip the warm start. Said
                    # as the handler below says what it kept.
                    _log.warning(
                        "training interrupted in the warm start, while imitating %s (before PPO's first step): nothing "
                        "saved (no checkpoint, no %s; the imitation is not kept half done): run again to start over",
                        warm_start,
                        path.parent / "warm_start.json",
                    )
                    raise
                # "decisions" from the fit: those imitated (3 asked of 2 environments imitated 2, and 3 was recorded)
                warm_record = {"teacher": warm_start, "epochs": warm_start_epochs, **fit}
                if warm_start_learning_rate is not None:  # absent: PPO's optimizer, at PPO's learning rate
                    warm_record["learning_rate"] = float(warm_start_learning_rate)
        # The TensorBoard run is chosen here, not by SB3: a resumed SB3 model goes on writing the newest run in
        # log_dir, which may be another policy's (its points past the resumed step were then hidden by the purge mark).
        run: Path | None = None
        continued = False  # whether the run is the resumed policy's own, which the purge mark may then trim
        if log_dir:
            own = resume is not None and _resumes_its_own_run(Path(resume), path.parent / "checkpoints", path.stem)
            recorded = getattr(model, _RUN_ATTRIBUTE, None)
            run, continued = _tensorboard_run(Path(log_dir), resume, recorded, own=own, out=path)
            model.set_logger(configure(str(run), ["tensorboard"]))
        else:  # without a folder, SB3's default logger made an empty /tmp/SB3-<time> folder at each call
            model.set_logger(Logger(folder=None, output_formats=[]))
        # Saved in every zip of this run (SB3 saves the model's attributes): a resume of any of them finds its run. None
        # without log_dir: the curve of the steps from here on is in no run, and a resume continuing one would mix
        # these weights' later points with a replaced run's.
        setattr(model, _RUN_ATTRIBUTE, None if run is None else str(run.resolve()))
        # A Ctrl-C before training starts (the first reset trains an interval an environment: slow) saves these weights
        # with this count: read only at the training's start, it was 0, and the checkpoint's step count was erased.
        recorder.trained_timesteps = model.num_timesteps
        # Whatever checkpoint_every: a Ctrl-C, or a final save that fails, writes a checkpoint too (without
        # checkpoint_every, one overwrote the replaced run's of that step count).
        _move_replaced_checkpoints(
            path.parent / "checkpoints",
            path.stem,
            model.num_timesteps,
            resumed_from=None if resume is None else Path(resume),
        )
        if resume is None:
            # Whatever eval_tasks: the run's evaluations.json was written over the earlier run's, which then labelled
            # that run's evaluations as this run's, and a resume of this run continued them as its own.
            _move_replaced_evaluations(path.parent / "eval" / "evaluations.npz")
            # With or without a warm start of its own: the earlier run's record sat beside this run's policy
            _move_replaced_warm_start(path.parent / "warm_start.json")
        if warm_record is not None:  # written after the earlier run's is moved aside
            from triaccel_rl.compare import json_safe

            # Strict JSON: a fit that diverged (NaN or infinite loss) is written as null.
            (path.parent / "warm_start.json").write_text(
                json.dumps(json_safe(warm_record), indent=1, allow_nan=False) + "\n"
            )
        callbacks: list[BaseCallback] = [recorder, UpdateCurves()]
        # PPO collects whole rollouts: it trains on until its count reaches the steps asked, so the last rollout
        # overshoots (64 asked at 128 a rollout trained 128, and the bar ran past its total, unsaid).
        rollout = model.n_steps * venv.num_envs
        planned = -(-total_timesteps // rollout) * rollout
        if planned != total_timesteps:
            _log.info(
                "total_timesteps=%d rounds up to %d: PPO trains whole rollouts of n_steps x n_envs = %d steps",
                total_timesteps,
                planned,
                rollout,
            )
        disable = tqdm_disable(progress_bar)
        progress = Progress(planned, disable)
        if disable is not True:
            callbacks.append(progress)
        if checkpoint_every > 0:
            callbacks.append(Checkpoint(checkpoint_every))
        if resume is not None:
            # Whatever eval_tasks: resumed without evaluating, the replaced run's evaluations past the resumed step,
            # or another run's, would stay in this run's evaluations.npz, and a later evaluated resume of this run
            # continue them as its own.
            own_evaluations = path.parent / "eval" / "evaluations.npz"
            if own_evaluations.is_file() and own_evaluations.resolve() != _evaluations_of(Path(resume)).resolve():
                aside = _unused_name(own_evaluations.with_name(f"evaluations.before_{path.stem}.npz"), ".json")
                own_evaluations.replace(aside)
                # Its record of tasks and seed too: left behind, it was overwritten by this run's
                if own_evaluations.with_suffix(".json").is_file():
                    own_evaluations.with_suffix(".json").replace(aside.with_suffix(".json"))
                _log.warning("%s held another run's evaluations: moved to %s", own_evaluations, aside)
            elif not (eval_tasks and eval_every > 0):  # an evaluated resume does it as it continues them
                _set_aside_evaluations_after(own_evaluations, model.num_timesteps)
        if eval_tasks and eval_every > 0:
            # Held-out tasks are evaluated as they are: no domain randomisation of their LR.
            eval_kwargs = {key: value for key, value in env_kwargs.items() if key != "lr_range"}
            eval_env = DummyVecEnv(
                make_env_fns(list(eval_tasks), len(eval_tasks), max_decisions, interval_steps, None, **eval_kwargs)
            )
            evaluations = HeldOutEvaluation(
                eval_env,
                n_eval_episodes=len(eval_tasks),
                eval_freq=1,  # SB3's test of when to evaluate always passes: HeldOutEvaluation calls it when due
                log_path=str(path.parent / "eval"),
                deterministic=True,
                verbose=0,
            )
            identity = _evaluation_identity(eval_tasks, seed, interval_steps, max_decisions, eval_kwargs)
            if resume is not None:
                # Resumed into another folder (see above); through a symlink, of the file it links to
                if Path(resume).resolve().parent.name.startswith("replaced_after_"):
                    _log.warning(
                        "resume=%s is a checkpoint a later run set aside: its run's evaluations are not continued "
                        "(they are kept in eval/evaluations_replaced_after_*.npz of its run's folder, not beside it)",
                        resume,
                    )
                _continue_evaluations(evaluations, _evaluations_of(Path(resume)), model.num_timesteps, identity)
            write_text_atomic(_mkdir_for(Path(f"{evaluations.log_path}.json")), json.dumps(identity, indent=2) + "\n")
            callbacks.append(evaluations)
        try:
            model.learn(
                total_timesteps=total_timesteps,
                callback=CallbackList(callbacks),
                reset_num_timesteps=resume is None,
            )
            stats = recorder.stats()
            # Inside the try: a save interrupted here keeps the run's weights as a checkpoint, and `out` as it was.
            try:
                save_policy(model, path, stats)
            except Exception:  # (a full disk, a folder where the zip goes) the trained weights are kept all the same
                checkpoint, _ = save_checkpoint(model)
                _log.error("saving the policy to %s failed: the trained weights are in %s (resume=)", path, checkpoint)
                raise
        except KeyboardInterrupt:
            progress.close()  # before the warning, which would land inside the bar's line
            recorder.discard_unfinished_update()  # interrupted between two gradient steps of an update: the last whole
            checkpoint, stats_file = save_checkpoint(model)
            _log.warning(
                "training interrupted at step %d: saved %s, the weights of the last update (%d steps), %s; continue "
                "with resume=%s (--resume on the command line)",
                model.num_timesteps,
                checkpoint,
                recorder.trained_timesteps,
                f"and its observation stats {stats_file}"
                if stats_file is not None
                else "without observation stats (no update has recorded a range: it loads without the fallback)",
                checkpoint,
            )
            raise
        finally:
            progress.close()
        if stats is not None:
            spread = action_spread(model, stats)
            if spread.distinct == 1:
                _log.warning(
                    "the trained policy takes the same action %s on all %d observations drawn in its training range: "
                    "it has learned a constant (train longer, or check the warm start)",
                    list(spread.mode),
                    spread.samples,
                )
    except BaseException:
        # After Ctrl-C the subprocess workers may have quit too (the signal reaches the whole process group), or
        # one died mid-step: closing them must neither hide the failure nor wait for a reply that never comes.
        for env in (venv, eval_env):
            _close_after_failure(env)
        raise
    finally:
        torch.set_num_threads(caller_threads)
    venv.close()
    if eval_env is not None:
        eval_env.close()
    return path


def _resumed_stats(
    resume: str | os.PathLike[str], ladder: tuple[float, ...], n_features: int, interval_steps: int
) -> ObservationStats | None:
    """The observation stats beside the policy zip ``resume`` (None, with a warning, where it has none).

    A warning too where they record another interval than ``interval_steps`` (this run's): the policy goes on training
    at another interval than it was trained at, and the merged stats record none (``ObservationStats.merged``).
    Stats that record none (older files) are taken as they are.

    Raises:
        ValueError: stats that cannot be read, of another LR ladder than ``ladder`` or of another number of features
            than ``n_features`` (the training environments' observation size): the merge would fail after the whole
            run.
    """
    file = obs_stats_path(resume)
    if not file.is_file():
        _log.warning(
            "resume=%r has no observation stats beside it (%s): the saved range covers this run's observations only",
            str(resume),
            str(file),
        )
        return None
    stats = ObservationStats.load(file)
    if stats.lr_scales is None or tuple(stats.lr_scales) != tuple(ladder):
        raise ValueError(
            f"resume={str(resume)!r}: its observation stats {str(file)!r} record the LR ladder "
            f"{None if stats.lr_scales is None else list(stats.lr_scales)}, and "
            f"the training environments run {list(ladder)}; where the policy was trained with these, write "
            f'"lr_scales": {list(ladder)} into the file'
        )
    if len(stats.low) != n_features:
        raise ValueError(
            f"resume={str(resume)!r}: its observation stats {str(file)!r} hold {len(stats.low)} features, and the "
            f"training environments' observations have {n_features}: they are another policy's stats (put the "
            "policy's own beside it, or remove the file to record its range anew)"
        )
    if stats.interval_steps is not None and stats.interval_steps != interval_steps:
        # Easy to miss: the shipped policy decides every 10 steps, the command line's default is 20.
        _log.warning(
            "resume=%r was trained deciding every %d optimizer steps (its observation stats %s say so), and this run "
            "decides every %d: it goes on at another interval, and the observation stats it saves record none; to go "
            "on at the policy's own, pass interval_steps=%d (--interval-steps %d on the command line)",
            str(resume),
            stats.interval_steps,
            str(file),
            interval_steps,
            stats.interval_steps,
            stats.interval_steps,
        )
    return stats


def save_policy(model: Any, target: Path, stats: ObservationStats | None) -> Path | None:
    """Writes the policy zip ``target`` and its observation stats beside it; returns the stats' path (None: none).

    Neither file is written in place, so an interrupted save (Ctrl-C, a full disk) leaves the previous zip and stats
    whole: a run resumed from its own ``out`` keeps the policy it resumed from. The order pairs them: the zip goes to
    a temporary file beside ``target`` (the slow part), then the stats are moved over theirs, then the zip over
    ``target``. Interrupted between the two moves, the old weights sit beside the new range (which, resumed, holds
    the old one); new weights never sit beside another policy's range. Without ``stats``, a stats file beside
    ``target`` belongs to the weights being replaced, and is removed before they are.
    """
    zip_file = Path(os.path.realpath(target))  # through a symlink to its file, as a plain write goes
    temporary = zip_file.with_name(f".{zip_file.name}.tmp")
    try:
        with open(temporary, "wb") as file:  # a file object: SB3 appends ".zip" to a path without a suffix
            model.save(file)
            file.flush()
            os.fsync(file.fileno())  # the bytes on disk before the rename makes them the policy
        stats_file = obs_stats_path(target)
        if stats is not None:
            stats.save(stats_file)  # itself written beside the file and moved over it
        else:
            stats_file.unlink(missing_ok=True)
        os.replace(temporary, zip_file)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return stats_file if stats is not None else None


def _purge_curves_after(logger: Any, step: int) -> None:
    """Marks ``logger``'s TensorBoard run so that TensorBoard drops the points written before the mark past ``step``.

    A resume of a policy's own run goes on writing the TensorBoard run its zip records (:func:`_tensorboard_run`).
    Resumed from an earlier checkpoint, that run's points past the checkpoint belong to the run this one replaces:
    left, they would stand among the new ones (``eval/mean_reward`` at 8, 16, and 16 again). The mark is the
    one ``SummaryWriter(purge_step=step + 1)`` writes, a ``SessionLog.START`` event at ``step + 1``, in the new run's
    event file before its first point: TensorBoard (its ``EventAccumulator``) then drops every point read before it
    at ``step + 1`` or later, and keeps those up to ``step``, the resumed weights' own. Nothing is deleted from the
    event files. A run resumed from its end has no point past it: the mark drops nothing.
    """
    from stable_baselines3.common.logger import TensorBoardOutputFormat

    for output in logger.output_formats:
        if isinstance(output, TensorBoardOutputFormat):
            purge_tensorboard_after(output.writer.file_writer, step)


def _tensorboard_run(
    log_dir: Path, resume: str | os.PathLike[str] | None, recorded: Any, *, own: bool, out: Path
) -> tuple[Path, bool]:
    """The TensorBoard run folder a training writes in ``log_dir``, and whether it continues the resumed policy's.

    A resume of this ``out``'s own run (``own``: its policy or one of its checkpoints) continues the run its zip records
    (``recorded``, the ``tensorboard_run`` it saved) where that run is in ``log_dir`` and still there. Otherwise (a
    new policy; a resume whose zip records no run, being saved before runs were recorded or trained without a
    ``log_dir``; whose run is gone or in another folder; or another policy than ``out`` and its checkpoints, in the
    same folder or not, whose run goes on being that policy's) a new run, ``PPO_<n>`` one past the highest there: no
    run but the resumed policy's own is ever written into or marked. A resume that does not continue its run says why.
    ``out`` is the policy's path, named in that message.
    """
    if resume is None:
        return _new_tensorboard_run(log_dir), False
    if not isinstance(recorded, str):
        why = "records no TensorBoard run (saved before runs were recorded, or trained without a log_dir)"
    elif not own:
        # A policy beside out (policy.zip resumed into policy_v2.zip) is not out's either: named by out's own files
        checkpoints = out.parent / "checkpoints" / f"{out.stem}_<N>_steps.zip"
        why = f"is neither out={out} nor one of its checkpoints ({checkpoints}): its run {recorded} is left to it"
    elif not Path(recorded).is_dir():
        why = f"recorded the TensorBoard run {recorded}, which is gone"
    elif Path(recorded).parent != log_dir.resolve():
        why = f"recorded the TensorBoard run {recorded}, which is not in log_dir {log_dir}"
    else:
        _log.info("resume=%s: its curve goes on in its TensorBoard run %s", resume, recorded)
        return Path(recorded), True
    run = _new_tensorboard_run(log_dir)
    _log.warning("resume=%s %s: its curve goes on in a new TensorBoard run, %s (no run is marked)", resume, why, run)
    return run, False


def _new_tensorboard_run(log_dir: Path) -> Path:
    """Makes and returns ``log_dir/PPO_<n>``, ``n`` one past the highest there (as SB3 numbers its runs).

    Made here, not by the writer: a run another training made meanwhile (both counted the same highest) is skipped,
    not shared.
    """
    from stable_baselines3.common.utils import get_latest_run_id

    n = get_latest_run_id(str(log_dir), "PPO")
    while True:
        n += 1
        try:
            (log_dir / f"PPO_{n}").mkdir(parents=True)
        except FileExistsError:
            continue
        return log_dir / f"PPO_{n}"


def _close_after_failure(venv: Any, grace: float = 5.0) -> None:
    """Closes ``venv`` while another exception propagates: its workers may be gone, so errors are only logged.

    A :class:`SubprocVecEnv` is not closed with its ``close()``: failed inside a step (a worker killed by the OOM
    killer, a Ctrl-C reaching this process only), that waits for every worker's reply to the step, and a reply
    ``step_wait`` already read, or one a dead worker never sends, never comes: the run would hang there after saving
    its checkpoint. Each worker still running is asked to close instead (it reads the request after any
    step it is in), is given ``grace`` seconds, then is terminated (killed if that fails too); the pipes are closed.
    """
    from stable_baselines3.common.vec_env import SubprocVecEnv

    if venv is None or getattr(venv, "closed", False):
        return
    if not isinstance(venv, SubprocVecEnv):
        try:
            venv.close()
        except (EOFError, OSError) as error:
            _log.debug("closing the environments after a failure: %s: %s", type(error).__name__, error)
        return
    for remote in venv.remotes:
        try:
            remote.send(("close", None))
        except OSError as error:  # BrokenPipeError: the worker is gone
            _log.debug("closing the environments after a failure: %s: %s", type(error).__name__, error)
    deadline = time.monotonic() + grace
    for process in venv.processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
    for process in venv.processes:
        if process.is_alive():  # busy in a step past the grace, or stuck
            process.terminate()
            process.join(timeout=grace)
        if process.is_alive():
            process.kill()
            process.join()
    for remote in venv.remotes:
        remote.close()
    venv.closed = True


def _read_json_or_none(file: Path) -> Any:
    """The JSON in ``file``; None where there is none or it cannot be read (a run saved before it was written)."""
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError):
        return None


def _mkdir_for(file: Path) -> Path:
    file.parent.mkdir(parents=True, exist_ok=True)
    return file


def _unused_name(path: Path, *companions: str) -> Path:
    """``path``, or where it is taken, the first of ``<stem>_2<suffix>``, ``<stem>_3<suffix>``, ... that is not.

    For what is set aside: it is never written over (a second run resumed from one checkpoint overwrote what the first
    had set aside). ``companions``: suffixes of files that go beside it (``".json"``), whose names must be free too.
    """
    candidate, n = path, 1
    while candidate.exists() or any(candidate.with_suffix(suffix).exists() for suffix in companions):
        n += 1
        candidate = path.with_name(f"{path.stem}_{n}{path.suffix}")
    return candidate


def _move_replaced_checkpoints(folder: Path, stem: str, start: int, *, resumed_from: Path | None) -> None:
    """Moves the replaced run's ``<stem>_<N>_steps.zip`` (and their stats) into ``replaced_after_<start>_steps/``.

    Those with ``N > start`` for a run resumed from step ``start`` from its own folder (``resumed_from`` being the
    policy ``<folder>/../<stem>.zip`` or one of the checkpoints here); every one, into ``replaced_after_0_steps/``, for
    a new run (``resumed_from`` None; its ``_0_steps`` too, the earlier run's initial weights) and for a run resumed
    from another folder's zip, of which none here is a checkpoint (not even those at or below its step). Left, a run
    resumed from an earlier checkpoint into its own folder would overwrite the same-named ones it reached again and
    leave the later ones among its own: two runs' weights in one folder, unsaid; a new run into the folder of an
    earlier one would do so with all of them. Where that folder exists (an earlier run set checkpoints
    aside there), a new one is made, ``replaced_after_<start>_steps_2/`` (``_3``, ...); the warning names it.
    """
    own = resumed_from is not None and _resumes_its_own_run(resumed_from, folder, stem)
    kept_until = start if own else 0
    later = []
    for file in sorted(folder.glob(f"{stem}_*_steps.zip")):
        steps = file.name[len(stem) + 1 : -len("_steps.zip")]
        if steps.isdigit() and (int(steps) > start or not own):
            later.append(file)
    if not later:
        return
    # A folder of its own: a second run resumed from the same checkpoint put the first's checkpoints over those
    # the first had set aside (the original run's).
    aside = _unused_name(folder / f"replaced_after_{kept_until}_steps")
    aside.mkdir()
    for file in later:
        for part in (file, file.with_suffix(".obs.json")):
            if part.is_file():
                part.replace(aside / part.name)
    if own:
        _log.warning(
            "%s held %d checkpoints past step %d, of the run this one replaces (resumed from an earlier checkpoint): "
            "moved to %s",
            folder,
            len(later),
            start,
            aside,
        )
    elif resumed_from is not None:
        _log.warning(
            "%s held %d checkpoints of another run, which this run (resumed from %s, not this folder's) replaces: "
            "moved to %s",
            folder,
            len(later),
            resumed_from,
            aside,
        )
    else:
        _log.warning(
            "%s held %d checkpoints of an earlier run, which this new run (not resumed) replaces: moved to %s",
            folder,
            len(later),
            aside,
        )


def _resumes_its_own_run(resume: Path, checkpoints: Path, stem: str) -> bool:
    """Whether ``resume`` is the policy ``<stem>.zip`` beside ``checkpoints`` or one of its ``<stem>_<N>_steps.zip``.

    However either path is spelled (resolved: relative, absolute, through a symlink: read as a link's own name and
    folder, a link to one of the run's checkpoints would count as another folder's policy).
    """
    resume = resume.resolve()
    if resume == (checkpoints.parent / f"{stem}.zip").resolve():
        return True
    steps = resume.name[len(stem) + 1 : -len("_steps.zip")]
    return (
        resume.parent == checkpoints.resolve()
        and resume.name.startswith(f"{stem}_")
        and resume.name.endswith("_steps.zip")
        and steps.isdigit()
    )


def _move_replaced_evaluations(file: Path) -> None:
    """Moves ``file`` (an ``evaluations.npz``) and its ``.json``, an earlier run's, aside for a new run into its folder.

    To ``evaluations_replaced_after_0_steps.npz`` (``_2``, ``_3``, ... where that name is taken), as its checkpoints go
    to ``checkpoints/replaced_after_0_steps/``, with a warning naming it. Left in place, they were labelled as the new
    run's (its ``evaluations.json`` written over theirs) and continued as its own by a resume of it.
    """
    record = file.with_suffix(".json")
    if not (file.is_file() or record.is_file()):
        return
    aside = _unused_name(file.with_name("evaluations_replaced_after_0_steps.npz"), ".json")
    for part, target in ((file, aside), (record, aside.with_suffix(".json"))):
        if part.is_file():
            part.replace(target)
    _log.warning(
        "%s held an earlier run's evaluations, which this new run (not resumed) replaces: moved to %s", file, aside
    )


def _move_replaced_warm_start(file: Path) -> None:
    """Moves ``file`` (a ``warm_start.json``), an earlier run's, aside for a new run into its folder.

    To ``warm_start_replaced_after_0_steps.json`` (``_2``, ``_3``, ... where that name is taken), as its checkpoints
    go to ``checkpoints/replaced_after_0_steps/``, with a warning naming it. Left in place, it would describe a warm
    start the new policy beside it never had.
    """
    if not file.is_file():
        return
    aside = _unused_name(file.with_name("warm_start_replaced_after_0_steps.json"))
    file.replace(aside)
    _log.warning(
        "%s held an earlier run's warm start, which this new run (not resumed) replaces: moved to %s", file, aside
    )


def _set_aside_in(resume: Path, checkpoints: Path) -> bool:
    """Whether ``resume`` is a checkpoint :func:`_move_replaced_checkpoints` set aside in ``checkpoints``.

    That is, in a ``replaced_after_<steps>_steps[_<n>]/`` folder of it, however either path is spelled (through a
    symlink: the folder of the file it links to, not the link's own).
    """
    folder = resume.resolve().parent
    return folder.name.startswith("replaced_after_") and folder.parent == checkpoints.resolve()


def _evaluations_of(resume: Path) -> Path:
    """The ``evaluations.npz`` of the run that wrote the zip ``resume`` (it may not exist).

    That run's ``eval`` folder is beside its policy, or beside the ``checkpoints`` folder a checkpoint is in. A run
    resumed into another folder reads it there (that folder's own file, another run's, was once taken instead). Through
    a symlink, the run of the file it links to.
    """
    resume = resume.resolve()
    folder = resume.parent.parent if resume.parent.name == "checkpoints" else resume.parent
    return folder / "eval" / "evaluations.npz"


def _evaluation_identity(
    tasks: Sequence[str], seed: int, interval_steps: int, max_decisions: int | None, env_kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    """What one evaluation curve's evaluations share, as JSON reads it back (``eval/evaluations.json``).

    The held-out tasks and seed, and what else defines their episodes: ``interval_steps``, ``max_decisions`` and the
    held-out environments' arguments (``env``: ``reward_config``, whose ``budget_intervals`` sets an episode's length,
    ``profile``, ``cost_mode``, ``compute_bound``, ``task_overrides``, ...; a dataclass as its fields, anything JSON has
    no form for as its ``repr``). With the tasks and seed only, a resume evaluating episodes of another budget would
    carry the old curve on.
    """

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return dataclasses.asdict(value)
        if isinstance(value, enum.Enum):
            return value.value
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if isinstance(value, np.generic):
            return value.item()
        return repr(value)

    identity = {
        "tasks": list(tasks),
        "seed": int(seed),
        "interval_steps": interval_steps,
        "max_decisions": max_decisions,
        "env": dict(sorted(env_kwargs.items())),
    }
    # Through JSON and back: compared with the file's, tuples must be lists and dataclasses dicts alike
    return dict(json.loads(json.dumps(identity, default=plain)))


def _continue_evaluations(callback: Any, file: Path, start: int, identity: Mapping[str, Any]) -> None:
    """Puts the evaluations of the run being resumed (up to step ``start``) into ``callback``'s history.

    SB3's ``EvalCallback`` rewrites its ``evaluations.npz`` from its own history at every evaluation, so a resumed
    run would otherwise replace the first run's evaluations with its own. Evaluations of other held-out tasks or
    episodes (``identity``: :func:`_evaluation_identity`, recorded beside the file as ``evaluations.json``; another
    number of episodes for a file saved without it) cannot share one curve: that file is moved aside, not overwritten
    (before, another task set of the same size was appended to the old curve). A record of the older form (the tasks
    and seed only) does not say what its episodes were: it counts as another's, and is moved aside
    too (the file is kept, and a curve of unknown episodes is never carried on). Resumed from an earlier checkpoint, the
    evaluations past it belong to the run this one replaces: a copy of the file keeps them
    (``evaluations_replaced_after_<start>_steps.npz``), with a warning. A file set aside (moved or copied) is never
    written over: where its name is taken, it gets ``_2``, ``_3``, ... before its suffix, as the warning says. The file
    is this run's own (continued, moved or copied) where it resolves to ``callback``'s, however either is spelled. A
    file that cannot be read (SB3 rewrites it in place at each evaluation: a Ctrl-C or a full disk mid-write cuts it
    short; or an array missing) is not continued either: it is set aside, or left where it is, as a mismatch is, with
    the warning saying why.
    """
    if not file.is_file():
        return
    try:
        with np.load(file) as saved:
            timesteps, results, lengths = saved["timesteps"], saved["results"], saved["ep_lengths"]
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError) as error:
        unreadable: str | None = f"evaluations that cannot be read ({type(error).__name__}: {error})"
    else:
        unreadable = None
    recorded = _read_json_or_none(file.with_suffix(".json"))
    if unreadable is not None:
        mismatch = unreadable
    elif recorded is not None and recorded != dict(identity):
        mismatch = f"evaluations of {recorded}, this run evaluates {dict(identity)}"
    elif results.ndim != 2 or results.shape[1] != callback.n_eval_episodes:
        mismatch = (
            f"evaluations of {results.shape[1:] or '?'} episodes each, this run evaluates {callback.n_eval_episodes}"
        )
    else:
        mismatch = None
    # Resolved: resume and out spelled differently (relative, absolute) name the same file
    own = file.resolve() == Path(f"{callback.log_path}.npz").resolve()
    if mismatch is not None:
        if not own:  # another run's folder: its file is left where it is
            _log.warning("%s holds %s: not continued", file, mismatch)
            return
        aside = _unused_name(file.with_name(f"evaluations_until_{start}_steps.npz"), ".json")
        file.replace(aside)
        if file.with_suffix(".json").is_file():
            file.with_suffix(".json").replace(aside.with_suffix(".json"))
        _log.warning("%s holds %s: moved it to %s", file, mismatch, aside)
        return
    earlier = timesteps <= start  # later ones belong to a run this one replaces (resumed from an earlier checkpoint)
    if own:
        _set_aside_evaluations_after(file, start)
    callback.evaluations_timesteps = [int(t) for t in timesteps[earlier]]
    callback.evaluations_results = [list(row) for row in results[earlier]]
    callback.evaluations_length = [list(row) for row in lengths[earlier]]


def _set_aside_evaluations_after(file: Path, start: int) -> None:
    """Keeps in ``file`` (a run's own ``evaluations.npz``) only the evaluations up to step ``start``, the resumed one.

    Resumed from an earlier checkpoint, the evaluations past it belong to the run this one replaces: the file as it
    was is copied to ``evaluations_replaced_after_<start>_steps.npz`` (``_2``, ``_3``, ... where that name is taken),
    with a warning, and the file is rewritten without them (beside it, then moved over it: never cut short). A missing
    file, or one that cannot be read, is left as it is (an evaluated resume sets an unreadable one aside).
    """
    try:
        with np.load(file) as saved:
            arrays = {key: saved[key] for key in saved.files}
        timesteps = arrays["timesteps"]
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError):
        return
    earlier = timesteps <= start
    if earlier.all():
        return
    kept = _unused_name(file.with_name(f"evaluations_replaced_after_{start}_steps.npz"))
    shutil.copy2(file, kept)
    partial = file.with_name(f"{file.stem}.partial.npz")
    try:  # every array of one row an evaluation (SB3's timesteps, results, ep_lengths and successes)
        np.savez(
            partial,
            **{
                key: value[earlier] if value.ndim and len(value) == len(timesteps) else value
                for key, value in arrays.items()
            },
        )
        os.replace(partial, file)
    finally:
        partial.unlink(missing_ok=True)
    _log.warning(
        "%s holds evaluations past step %d, of the run this one replaces (resumed from an earlier checkpoint): "
        "this run's evaluations go on from %d; the file as it was is kept as %s",
        file,
        start,
        start,
        kept,
    )

"""``TriAccelEnv``: a Gymnasium environment over a live training run; one step = one decision interval."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from triaccel_rl.actions import action_space
from triaccel_rl.config import ControllerConfig, CostMode, HardwareProfile, RewardConfig
from triaccel_rl.elastic import release_memory
from triaccel_rl.errors import is_finite_real, is_real, is_whole
from triaccel_rl.loop import DecisionLoop
from triaccel_rl.observation import OBS_HIGH, ObservationLayout
from triaccel_rl.reward import reward
from triaccel_rl.tasks import get_task, task_names
from triaccel_rl.training import TrainingRun, probe_count, resolve_device
from triaccel_rl.types import Signals

__all__ = ["TriAccelEnv"]

_NEGLIGIBLE_STEP_SHARE = 0.01
"""A budget left under this share of a step is spent: the cut takes no step of which less fits, and the episode ends."""


class TriAccelEnv(gym.Env[np.ndarray, np.ndarray]):
    """Chooses a training configuration every ``interval_steps`` optimizer steps of a proxy task.

    **Observation** (``Box(-10, 10, (11 + 8 * n_groups,), float32)``): 11 global features (loss, loss trend,
    noise scale over batch, memory headroom and use, batch, LR scale, overflow rate, step-time trend, progress,
    curvature) and, for each of ``n_groups`` layer groups ranked by sensitivity, 8: its relative sensitivity,
    curvature, variance, signal-to-noise, parameter share and current precision (one-hot of 3); see
    ``triaccel_rl.observation`` for every index.

    **Action** (``MultiDiscrete([3] * n_groups + [len(lr_scales), 3])``): precision per group
    (0 fp32, 1 bf16, 2 fp16), an LR multiplier from ``config.lr_scales``, a batch move (0 halve, 1 keep,
    2 double, bounded by the memory budget).

    **Reward**: progress within a time budget. Each interval earns ``progress_scale * (log L_prev - log
    L_now)``, where ``L`` is the loss on a fixed probe batch; minus ``nonfinite_penalty`` × skipped-step
    rate and ``over_budget_penalty`` when memory exceeded the memory budget; clipped to ``[-clip, clip]``
    (``RewardConfig``, ``triaccel_rl.reward``). A diverged interval is charged as if its probe loss had ended
    at the divergence threshold (``divergence_factor`` × the probe loss before ``reset``'s interval), minus
    ``divergence_penalty`` too, so it never earns more than an interval whose loss stayed under the threshold.
    Every term can be recomputed from the step's ``info`` (``probe_loss``, ``cost_ms``, ``spent_ms``,
    ``overflow_rate``, ``over_budget``, ``diverged``, ``divergence_loss``; ``L_prev`` is the previous step's
    ``probe_loss``, or ``reset``'s). The episode has a fixed *cost*
    budget, ``reward_config.budget_intervals`` × the charged time of one interval of fp32 at the task's
    base batch (the interval ``reset`` trains), so the return is the log-loss drop reached within a fixed
    time: a configuration that takes more steps, or dearer ones, gets fewer intervals, and nothing pays
    for an interval being cheap. The interval that would overrun the budget is cut to the steps the
    budget has left (estimated from the modelled step time as a step is charged, a micro-batch's fixed cost each
    included: ``TrainingRun.planned_step_ms``; in ``measured`` mode scaled by the last interval's clock time over its
    modelled time) and counts only the share of its progress that fitted, ``min(1, budget_left / cost)``. A remainder
    under 1% of a step is not spent: the cut takes no step of which less than that fits, and the episode ends once
    what is left would pay for less than 1% of the next step (at the settings of the last one). The return is then
    the log-loss drop reached in the budget less at most that remainder, with every reward exactly as above; without
    the rule, an interval a hair cheaper than the reference left a sliver of the budget, and one more decision
    trained a whole step for a reward of ~1e-4: a near-zero transition in almost every episode, and a final model
    with a step the budget had barely paid for.

    **Episode end**: ``terminated`` when the run diverges (non-finite probe loss, every step of an
    interval skipped while no fp16 loss scale is still backing off from its start, or the probe loss above
    ``divergence_factor`` × its starting value) or when the time budget
    is spent: the budget is part of the task (the return is the progress made within it, and the observation's
    ``progress`` says how much of it is gone), so nothing comes after it. (As ``truncated``, SB3's PPO would add
    ``gamma × V(last observation)`` to the last reward of every episode: a value beyond the budget that no run
    earns.) ``truncated`` only after ``max_decisions`` decisions, a safety net for near-free
    steps that is not part of the task.

    **Seeding**: in ``profile`` cost mode an episode is a function of ``reset(seed=...)`` and the actions, at a fixed
    torch thread count (``torch.get_num_threads()``: the CPU's reductions split by thread, and their rounding with
    them, so the same seed at 1 and at 2 threads gives probe losses a few ulps apart): the observations, rewards and
    per-step ``info`` repeat bit for bit (the episode's last ``info`` adds its final
    ``test_accuracy``; its wall-clock figures, the controller's overhead share and the training time, are in
    ``episode_summary`` once it ends, until the next episode ends: ``env.unwrapped.episode_summary`` through
    ``gym.make``'s wrappers, ``venv.get_attr("episode_summary")`` in a vector env). The run draws from its own torch
    RNG streams (the CPU's, and on a GPU its device's: the GPU tasks' crop-and-flip augmentation draws there), so
    the caller's global NumPy and torch RNGs neither change an episode nor are changed by it. In ``measured`` mode
    the charged time is the clock's, so the budget, the step-time feature, the rewards and the episode's length vary
    from run to run (Gymnasium's ``check_env`` fails its determinism check there).

    **Lifetime**: ``close()`` drops the run and frees its memory (harmless twice; ``reset`` starts anew). A live
    environment (between ``reset`` and ``close``) refuses to be copied or pickled; one before its first reset
    pickles, and ``SubprocVecEnv`` sends factories, which is what it needs.

    Args:
        task: registered task name (``triaccel_rl.tasks.task_names()``).
        config: decision interval, groups, LR scales, batch bounds, memory budget.
        reward_config: reward weights and the episode's time budget (``budget_intervals``).
        max_decisions: at most this many decisions per episode (None: ``8 * budget_intervals``, rounded
            up); the time budget normally ends an episode first.
        cost_mode: ``"profile"`` (charge time from ``profile``; the default, since CPU time says nothing
            about a GPU) or ``"measured"``. This argument sets the episode's cost mode; ``config.cost_mode`` is not
            read here (a ``ControllerConfig`` defaults to measured, for the ``Controller``).
        profile: a ``HardwareProfile``, or the path of its JSON; the shipped H200 profile by default.
        device: ``"cpu"``, ``"cuda"`` or ``None`` (CUDA when available).
        task_overrides: fields to override on the task (``{"n_train": 2048}``). The base batch must fit the training
            split: ``n_train`` less the samples held out for the probe loss (``training.probe_count``).
        divergence_factor: probe loss above this multiple of its starting value ends the episode.
        compute_bound: in profile mode, charge only the compute part of a step (no fixed per-step
            overhead), as if proxy tasks stood in for models large enough to keep a GPU busy. Off by
            default: ``compare`` and ``experiments/transfer.py`` charge the profile's fixed per-step time,
            and a policy must learn the costs it is judged by (with it on, a step of a proxy model is
            nearly free, so halving the batch costs nothing per sample and wins the budget).
        lr_range: ``(low, high)``, with ``0 < low <= high``: each episode's task trains at its ``base_lr`` times
            a factor drawn log-uniformly from this range (seeded by ``reset``; ``info["base_lr_factor"]``).
            Domain randomisation of the one setting a user most often gets wrong, so that a policy meets runs
            whose LR is mistuned and can learn to correct it from the signals. None (the default): the task's
            own LR. On the default training tasks the return hardly depends on the LR multiplier, so a policy
            trained on them has nothing to learn about the LR, while two of the held-out tasks gain from a higher
            one (numbers: BENCHMARKS.md, "A 5-epoch protocol, and why PPO on the training tasks learns no LR move").
        render_mode: None only: the environment renders nothing (``metadata["render_modes"]`` is empty);
            ``gym.make`` passes it whenever it is given.

    Example:
        >>> import gymnasium as gym
        >>> import triaccel_rl.envs
        >>> from triaccel_rl.config import RewardConfig
        >>> env = gym.make("TriAccel-v0", task="synthetic", reward_config=RewardConfig(budget_intervals=2))
        >>> obs, info = env.reset(seed=0)
        >>> obs.shape, info["budget_ms"] == 2 * info["reference_interval_ms"]
        ((43,), True)
    """

    metadata = {"render_modes": []}  # noqa: RUF012 (Gymnasium's convention)

    def __init__(
        self,
        task: str = "synthetic",
        config: ControllerConfig | None = None,
        reward_config: RewardConfig | None = None,
        max_decisions: int | None = None,
        cost_mode: CostMode | str = CostMode.PROFILE,
        profile: HardwareProfile | str | os.PathLike[str] | None = None,
        device: str | None = "cpu",
        task_overrides: dict[str, Any] | None = None,
        divergence_factor: float = 3.0,
        compute_bound: bool = False,
        lr_range: tuple[float, float] | None = None,
        render_mode: str | None = None,
    ) -> None:
        super().__init__()
        if render_mode is not None:  # gym.make passes it whenever it is given
            raise ValueError(f"render_mode={render_mode!r}: TriAccel-v0 renders nothing (its render_modes are [])")
        self.render_mode = None
        # Every argument is checked here, by name: a wrong type once surfaced as a bare AttributeError or TypeError
        # (or, for max_decisions=2.5 and compute_bound="no", was taken).
        if not isinstance(task, str):
            raise ValueError(f"task={task!r} must be a task name (a str); known tasks: {', '.join(task_names())}")
        if config is not None and not isinstance(config, ControllerConfig):
            raise ValueError(f"config={config!r} must be a ControllerConfig (or None for the defaults)")
        if reward_config is not None and not isinstance(reward_config, RewardConfig):
            raise ValueError(
                f"reward_config={reward_config!r} must be a RewardConfig (RewardConfig(budget_intervals=8)), "
                "or None for the defaults"
            )
        if max_decisions is not None and (not is_whole(max_decisions) or max_decisions < 1):
            raise ValueError(
                f"max_decisions={max_decisions!r} must be a whole number >= 1 (or None: 8 × the budget in intervals)"
            )
        if profile is not None and not isinstance(profile, str | os.PathLike | HardwareProfile):
            raise ValueError(
                f"profile={profile!r} must be a HardwareProfile, the path of a hardware-profile JSON (str or "
                "os.PathLike), or None (the shipped H200 profile)"
            )
        if task_overrides is not None and not isinstance(task_overrides, Mapping):
            raise ValueError(f"task_overrides={task_overrides!r} must be a dict of task fields ({{'n_train': 2048}}) "
                             "or None")  # fmt: skip
        if not is_real(divergence_factor):
            raise ValueError(
                f"divergence_factor={divergence_factor!r} must be a number > 1 (a multiple of the first probe loss); "
                f"got {type(divergence_factor).__name__}"
            )
        # NaN included: it would turn the divergence rule off; an integer too large for a float (10 ** 400) raised a
        # bare OverflowError at the first step.
        if not (is_finite_real(divergence_factor) and divergence_factor > 1.0):
            raise ValueError(
                f"divergence_factor={divergence_factor} must be a finite number > 1 "
                "(a multiple of the first probe loss)"
            )
        if not isinstance(compute_bound, bool | np.bool_):
            raise ValueError(f"compute_bound={compute_bound!r} must be True or False")
        if lr_range is not None:
            values = () if isinstance(lr_range, str | bytes) or not isinstance(lr_range, Iterable) else tuple(lr_range)
            # Finite ones: float(10 ** 400) raised a bare OverflowError.
            if len(values) != 2 or not all(is_finite_real(v) for v in values):
                raise ValueError(f"lr_range={lr_range!r} must be (low, high) with 0 < low <= high < inf")
            low, high = (float(v) for v in values)
            if not (0 < low <= high < math.inf):
                raise ValueError(f"lr_range={tuple(lr_range)} must be (low, high) with 0 < low <= high < inf")
            lr_range = (low, high)
        self.lr_range = lr_range
        self.base_lr_factor = 1.0  # this episode's draw from lr_range (a privileged teacher may read it)
        # The last finished episode's wall-clock figures (None before one ends): the controller's overhead share and
        # the training time. Not in ``info``, which repeats bit for bit for a seed in profile mode; kept through the
        # next reset, which a vector env makes as soon as an episode ends.
        self.episode_summary: dict[str, float] | None = None
        resolve_device(device)  # a device torch does not know, or CUDA where there is none: refused now, not at reset
        self.task = get_task(task, **(task_overrides or {}))
        _check_base_batch_fits(self.task.name, self.task.n_train, self.task.base_batch_size)
        self.config = config or ControllerConfig(cost_mode=CostMode.parse(cost_mode))
        self.reward_config = reward_config or RewardConfig()
        if max_decisions is None:
            if not math.isfinite(8 * self.reward_config.budget_intervals):  # math.ceil raised a bare OverflowError
                raise ValueError(
                    f"reward_config.budget_intervals={self.reward_config.budget_intervals} is too large for the "
                    "default max_decisions (8 × the budget in intervals, rounded up): give max_decisions, or a "
                    f"budget of at most {sys.float_info.max / 8:.3g} intervals"
                )
            max_decisions = math.ceil(8 * self.reward_config.budget_intervals)
        self.max_decisions = max_decisions
        self.cost_mode = CostMode.parse(cost_mode)
        self.profile = HardwareProfile.resolve(profile)
        self.device = device
        self.divergence_factor = float(divergence_factor)  # a NumPy float32 overflowed, and rounded, the threshold
        self.compute_bound = bool(compute_bound)
        self.layout = ObservationLayout(self.config.n_groups)
        self.observation_space = gym.spaces.Box(-OBS_HIGH, OBS_HIGH, (self.layout.size,), np.float32)
        self.action_space = action_space(self.config)
        self.loop: DecisionLoop | None = None
        self._ended = False
        self._torch_rng: torch.Tensor | None = None  # the run's own CPU torch RNG state, between calls
        self._cuda_rng: torch.Tensor | None = None  # and its CUDA one, on a GPU
        self._cuda_devices: list[int] = []
        self.reference_interval_ms = self.budget_ms = self.spent_ms = 0.0
        self._clock_per_model = 1.0  # measured mode: the last interval's charged time over its modelled time

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Starts a fresh run of the task and returns the observation after one fp32 interval.

        The last episode's run is freed first, as :meth:`close` frees it, or the models of earlier episodes would pile
        up (on a GPU in the allocator's counts too): its hooks, which put its model in reference cycles, are removed
        (``TrainingRun.close``), so reference counting frees it without a full garbage collection (which costs 0.1 to
        1 s a reset with torch, Triton and SB3 loaded). ``options`` is refused unless None or an empty mapping: the
        env takes none (a task or LR range given there was silently ignored).
        """
        # Not ``if options:``, which let any falsy value through (0, [], "", False).
        if options is not None and not (isinstance(options, Mapping) and len(options) == 0):
            raise ValueError(f"options={options!r}: TriAccel-v0 takes no reset options (None or {{}})")
        super().reset(seed=seed)
        self._drop_run()
        run_seed = int(self.np_random.integers(0, 2**31 - 1))
        task, factor = self.task, 1.0
        if self.lr_range is not None:
            low, high = self.lr_range
            factor = float(math.exp(self.np_random.uniform(math.log(low), math.log(high))))
            task = replace(task, base_lr=task.base_lr * factor)
        self.base_lr_factor = factor
        device = resolve_device(self.device)
        cuda = (
            [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
        )
        self._cuda_devices = cuda
        # TrainingRun seeds the torch RNGs it draws from (the CPU's, and on a GPU its device's) for the model's initial
        # weights: put the caller's back, so that a reset does not choose what the user's (or SB3's) next draws are.
        with torch.random.fork_rng(devices=cuda):
            run = TrainingRun(
                task,
                seed=run_seed,
                device=device,
                memory=self.config.memory,
                cost_mode=self.cost_mode,
                profile=self.profile,
                include_fixed_cost=not self.compute_bound,
                elastic=self.config.elastic,
            )
            self._torch_rng = torch.get_rng_state()  # the run's own streams go on from its seed
            self._cuda_rng = torch.cuda.get_rng_state(cuda[0]) if cuda else None
        # Learning must see divergence (no rollback) and intervals of a fixed length (no adaptive cadence).
        self.loop = DecisionLoop(run, self.config, rollback=False, adaptive_interval=False)
        self._ended = False
        with self._own_rng():
            return self._start(run, factor)

    def _start(self, run: TrainingRun, factor: float) -> tuple[np.ndarray, dict[str, Any]]:
        """``reset``'s first interval, on the run's own RNG stream."""
        assert self.loop is not None
        self._initial_probe = run.probe_loss()
        # The probe loss above which the run has diverged (the largest float for a product that overflows: nothing
        # finite is above it either), and at which a diverged interval's reward is charged.
        self._divergence_loss = min(self.divergence_factor * self._initial_probe, sys.float_info.max)
        # The reference interval (fp32, base batch) sets the budget; it is not charged against it.
        planned_ms = run.planned_step_ms(run.batch_size)
        interval = self.loop.train_interval()
        self._clock_per_model = self._measured_over_planned(interval.charged_ms, interval.steps, planned_ms)
        self.reference_interval_ms = interval.charged_ms
        self.budget_ms = self.reward_config.budget_intervals * interval.charged_ms
        self.spent_ms = 0.0
        signals = self.loop.snapshot(progress=self._progress())
        self._previous_probe = signals.probe_loss
        info = {
            "probe_loss": signals.probe_loss,
            "probe_loss_finite": bool(signals.extra.get("probe_loss_finite", True)),  # else probe_loss is a stand-in
            "n_layers": run.n_layers,
            "reference_interval_ms": self.reference_interval_ms,
            "budget_ms": self.budget_ms,
            "base_lr_factor": factor,
            "initial_probe_loss": self._initial_probe,
            "divergence_loss": self._divergence_loss,
        }
        return self.loop.observation(), info

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Applies ``action``, trains one interval, and returns the Gymnasium 5-tuple."""
        if self.loop is None:
            raise RuntimeError("call reset() before step()")
        if self._ended:  # its budget is spent (a step would divide by what is left) or its run diverged
            raise RuntimeError("this episode has ended (terminated or truncated): call reset() before step()")
        with self._own_rng():
            return self._step(action)

    def _step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """``step`` on the run's own RNG stream."""
        assert self.loop is not None
        report = self.loop.apply(action)
        run = self.loop.run
        budget_left_ms = self.budget_ms - self.spent_ms
        # Cut the interval to the steps the budget has left, from the modelled step time as a step is charged, its
        # micro-batches included; in measured mode scaled by the last interval's clock time over its modelled time
        # (an estimate: the reward's pro-rating makes the charged share exact either way; the modelled time alone is
        # the profiled GPU's, and on the CPU never cut an interval: the last one ran 59% past the budget). A budget
        # that runs out mid-step takes that step and counts the part of its progress that fitted, unless under
        # _NEGLIGIBLE_STEP_SHARE of it fits: a whole step trained for a sliver of its reward (the budget then ends).
        planned_ms = run.planned_step_ms(run.batch_size)
        step_ms = max(planned_ms * self._clock_per_model, 1e-12)
        steps = max(1, min(self.config.interval_steps, math.ceil(budget_left_ms / step_ms - _NEGLIGIBLE_STEP_SHARE)))
        interval = self.loop.train_interval(max_steps=steps)
        self._clock_per_model = self._measured_over_planned(interval.charged_ms, interval.steps, planned_ms)
        cost_ms = max(interval.charged_ms, 1e-9)
        self.spent_ms += cost_ms
        signals = self.loop.snapshot(progress=self._progress())
        over_budget = signals.memory_bytes > signals.memory_budget_bytes
        # Every step skipped is divergence, unless fp16's loss scale is still backing off: it halves from 65536 on each
        # overflowing step, so a short first fp16 interval can be all skips of a run that trains on (it ended the
        # episode at -5). The overflow penalty still charges them; a scale down to 1 is no back-off any more.
        backing_off = run.engine.precision.needs_grad_scaler and run.engine.loss_scale > 1.0
        diverged = (
            not signals.extra["probe_loss_finite"]
            or (signals.overflow_rate >= 1.0 and not backing_off)
            or signals.probe_loss > self._divergence_loss
        )
        value = reward(
            previous_probe_loss=self._previous_probe,
            probe_loss=signals.probe_loss if not diverged else math.nan,
            cost_ms=cost_ms,
            budget_left_ms=budget_left_ms,
            overflow_rate=signals.overflow_rate,
            over_budget=over_budget,
            diverged=diverged,
            divergence_loss=self._divergence_loss,
            config=self.reward_config,
        )
        self._previous_probe = signals.probe_loss
        # Spent once what is left would pay for under _NEGLIGIBLE_STEP_SHARE of the next step (priced at the settings
        # just trained): an interval a hair cheaper than the reference (0.001%-0.2% of a step) left a sliver, and the
        # decision after it trained a whole step for a reward of ~1e-4. Ending here forfeits the sliver rather than
        # folding it into this interval's reward, which stays the exact share of its progress that fitted.
        next_step_ms = max(run.planned_step_ms(run.batch_size) * self._clock_per_model, 1e-12)
        spent = self.budget_ms - self.spent_ms < _NEGLIGIBLE_STEP_SHARE * next_step_ms
        terminated = diverged or spent
        truncated = self.loop.decisions >= self.max_decisions and not terminated
        info: dict[str, Any] = {
            "probe_loss": signals.probe_loss,
            "probe_loss_finite": bool(signals.extra.get("probe_loss_finite", True)),  # else probe_loss is a stand-in
            "cost_ms": interval.charged_ms,
            "steps": interval.steps,
            "spent_ms": self.spent_ms,
            "budget_ms": self.budget_ms,
            "batch_size": report.batch_size,
            "lr_scale": report.lr_scale,
            "precisions": [p.name.lower() for p in report.precisions],
            "changed_precision": report.changed_precision,
            "refused": report.refused,
            "memory_bytes": signals.memory_bytes,
            "memory_budget_bytes": signals.memory_budget_bytes,
            "over_budget": over_budget,
            "overflow_rate": signals.overflow_rate,
            "diverged": bool(diverged),
            "divergence_loss": self._divergence_loss,
            "samples_seen": run.samples_seen,
        }
        self._ended = terminated or truncated
        if terminated or truncated:
            # The final accuracy in info; the wall-clock figures apart (episode_summary), so that every step's info,
            # the last one's too, repeats for a seed (Gymnasium's checker compares it: a budget spent at the first
            # step made the checker fail on the last step's wall time).
            info["test_accuracy"] = run.evaluate()
            self.episode_summary = {"overhead_frac": signals.overhead_frac, "wall_time_ms": run.train_time_ms}
        return self.loop.observation(), value, terminated, truncated, info

    def render(self) -> None:
        """Renders nothing (``render_mode`` is None, as Gymnasium's convention has it: no render is computed)."""
        return None

    def close(self) -> None:
        """Drops the run (its model, optimizer and data; on CUDA the allocator's cached blocks too), freeing its memory.

        Closing twice, or before any ``reset``, is harmless; ``reset`` starts a fresh run afterwards.
        """
        self._drop_run()
        super().close()

    def _drop_run(self) -> None:
        if self.loop is None:
            return
        run = self.loop.run
        self.loop, self._torch_rng, self._cuda_rng, self._ended = None, None, None, False
        # Without its hooks, which close cycles through the model, the run's last reference frees it. A full garbage
        # collection at every reset cost 0.1 to 1 s in a process with torch, Triton and SB3 loaded (14 s of a 22-s
        # train_policy): it runs only where a cycle of the model's own (a user's task) keeps it alive.
        run.close()
        device, model = run.device, weakref.ref(run.model)
        del run
        if model() is not None:
            release_memory(device)
        elif device.type == "cuda":
            torch.cuda.empty_cache()  # the run's blocks, cached by the allocator, handed back to other processes

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles (``SubprocVecEnv`` sends factories, not environments) only without a live run.

        Raises:
            TypeError: between ``reset`` and ``close``: a copy of the run would not work (its engine keys the
                layers by parameter id; its precision hooks are local functions).
        """
        if self.loop is not None:
            raise TypeError(
                "a TriAccelEnv copies and pickles only before reset() or after close(): its live run (engine state "
                "keyed by parameter, precision hooks) does not copy; to replay an episode, make another with the "
                "same arguments and reset(seed=...) it"
            )
        return self.__dict__.copy()

    @contextlib.contextmanager
    def _own_rng(self) -> Iterator[None]:
        """Runs the block on the run's own torch RNG streams (seeded at ``reset``), the caller's left as they were.

        A policy drawing from the global RNGs between steps (as SB3's does, on the CPU or a GPU) then changes nothing
        in the episode, and the episode's random ops (dropout; on a GPU the crop-and-flip augmentation) take nothing
        from the caller's streams: the CPU generator's, and on a GPU the run's device's.
        """
        with torch.random.fork_rng(devices=self._cuda_devices if self._cuda_rng is not None else []):
            if self._torch_rng is not None:
                torch.set_rng_state(self._torch_rng)
            if self._cuda_rng is not None:
                torch.cuda.set_rng_state(self._cuda_rng, self._cuda_devices[0])
            yield
            self._torch_rng = torch.get_rng_state()
            if self._cuda_rng is not None:
                self._cuda_rng = torch.cuda.get_rng_state(self._cuda_devices[0])

    def _measured_over_planned(self, charged_ms: float, steps: int, planned_ms: float) -> float:
        """An interval's charged time over its modelled time: what the cut scales a step's modelled time by.

        1 in profile mode (the charge is the model's), and in measured mode for an interval without steps.
        """
        if self.cost_mode is CostMode.PROFILE or steps == 0 or not planned_ms > 0:
            return 1.0
        return charged_ms / (steps * planned_ms)

    @property
    def signals(self) -> Signals | None:
        """The latest signals snapshot (for heuristics and logging)."""
        return self.loop.signals if self.loop is not None else None

    def _progress(self) -> float:
        """Share of the episode's time budget spent, in [0, 1] (``compare`` feeds the share of its epochs)."""
        return min(1.0, self.spent_ms / self.budget_ms) if self.budget_ms > 0 else 0.0


def _check_base_batch_fits(task: str, n_train: int | None, base_batch_size: int) -> None:
    """Refuses a base batch larger than the training split (``n_train`` less the probe's samples) when it is built.

    ``reset`` refused it otherwise, naming a batch and a sample count but not ``n_train``. A task whose ``n_train``
    is None (the loader's default: 4096 generated samples, or a whole data file) is checked when its data is loaded.
    """
    if n_train is None:
        return
    n_trained = n_train - probe_count(n_train)  # n_train=1 is refused here, by name: the probe needs a sample
    if base_batch_size > n_trained:
        needed = base_batch_size + 1
        while needed - probe_count(needed) < base_batch_size:
            needed += 1
        raise ValueError(
            f"n_train={n_train} leaves task {task!r} {n_trained} training samples ({n_train - n_trained} held out for "
            f"the probe loss), fewer than its base_batch_size={base_batch_size}: give n_train >= {needed} "
            "(task_overrides={'n_train': ...}) or a smaller base_batch_size"
        )

"""``Controller``: the deployment loop — a policy steering precision, LR scale and batch size in a user's loop.

A user's loop under it:

    ctl = Controller(model, optimizer, policy="heuristic")
    for x, y in ctl.loader((train_x, train_y), batch_size=256, epochs=3):
        with ctl.autocast():
            loss = loss_fn(model(x), y)
        ctl.step(loss)
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import numbers
import os
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from triaccel_rl.actions import action_space, decode
from triaccel_rl.cadence import Cadence
from triaccel_rl.config import ControllerConfig, CostMode, HardwareProfile, LRRule, MemoryBudget
from triaccel_rl.costs import CostModel, buffer_bytes, frozen_parameter_bytes, optimizer_state_tensors
from triaccel_rl.distributed import any_ranks, world_size
from triaccel_rl.elastic import (
    BatchLRCoupler,
    UnrecoverableOOMError,
    is_out_of_memory,
    release_memory,
    resolve_lr_rule,
)
from triaccel_rl.engine import SCALE_INITIAL, GradStats, StepEngine, check_max_grad_norm, refuse_driven_modules
from triaccel_rl.errors import ConfigError, NoGoodStateError, is_whole, require_bool
from triaccel_rl.executor import ApplyReport, Executor, sixteen_bit_formats
from triaccel_rl.experiment import PrecisionMapScalars, check_log_dir, purge_tensorboard_after
from triaccel_rl.loader import ElasticLoader
from triaccel_rl.memory import (
    MemoryModel,
    allocated_bytes,
    check_budget,
    device_capacity_bytes,
)
from triaccel_rl.observation import OBS_HIGH, LayerGrouper, ObservationLayout, build_observation
from triaccel_rl.policies import (
    HEURISTIC_NAMES,
    STATIC_PRESETS,
    LearnedPolicy,
    StaticPolicy,
    make_policy,
    run_without_bf16,
    static_preset_name,
)
from triaccel_rl.shield import BufferCheck, FallbackPolicy, RollbackGuard, nonfinite_parameters
from triaccel_rl.signals import DeviceMoments, EstimatorSource, IntervalMoments, SignalCollector
from triaccel_rl.signals.estimators import float_outputs, forked_rngs, frozen_batch_stats
from triaccel_rl.state import SavedState
from triaccel_rl.training import IntervalTimer, resolve_device
from triaccel_rl.types import Policy, Precision, Signals

__all__ = ["DECISIONS_KEPT", "Controller", "driving"]

DECISIONS_KEPT = 1000
"""How many of the latest decisions' reports ``Controller.decisions`` keeps. Each holds a precision per layer and the
reasons for its refusals, about 1.5 KB at 151 layers: all of a 50,000-decision run's would be some 76 MB."""

_log = logging.getLogger("triaccel_rl")
_StateMark = tuple[tuple[int, tuple[str, ...]], object, int]
"""``Controller._state_mark``: the model state's version sum and entry names, the optimizer's state object, and the
parameters' version sum (what a forward leaves alone)."""
_open_controllers: weakref.WeakSet[Controller] = weakref.WeakSet()
"""The controllers of this process built and not closed (dropped ones leave it with their garbage collection)."""
_grad_scaler_outputs: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
"""``GradScaler.scale``'s outputs while a controller is open, by id, held weakly (``_note_grad_scaler_outputs``)."""


class Controller:
    """Steers a user's own PyTorch training loop with a policy, one decision every interval.

    ``step(loss)`` does the backward pass, loss scaling (when a layer is fp16), the update (skipped on
    a non-finite gradient), the signals, and — every ``config.interval_steps`` steps, or more on a GPU
    when decisions would otherwise exceed their share of the overhead budget (``cadence``,
    ``ControllerConfig.max_interval_factor``) — a decision.
    Batches from ``loader()`` follow the decided batch size; ``autocast()`` runs each layer in its
    decided precision. With the heuristic on a GPU, the first steps are a speed trial (bf16, then fp16,
    ``HeuristicConfig.speed_trial``): the policy lowers to the faster format, and ``speed_trial`` holds
    the timings; the first decision comes an interval after the trial and reads none of its steps. On a GPU
    without native bf16 (a V100 or T4) there is no trial: an adaptive policy starts and lowers in fp16 where it
    would in bf16 (its tensor cores' format, as AMP runs there; a layer that overflows moves to fp32),
    and a bf16 a policy asks for anyway runs in fp32 (``Executor``).

    The scheduled estimator rounds (Hutchinson curvature, micro-batch gradient noise, curvature sparsity; ``compare``
    runs them in its adaptive rows under ``signals.mode`` ``"all"``, on the task's probe batch) need a held-out probe
    batch: pass one as ``probe=(inputs, targets)`` with its ``loss_fn``, and with ``config.signals.mode`` ``"all"``
    (the default) a round runs at a decision whenever the overhead budget has room (``SignalConfig``). Without one only
    the cheap signals run, and the heuristic's rules that wait for a measured value stay still: no group is raised to
    fp32 on squared gradients alone, and the noise scale reads as the batch (its bound), so the batch is not grown for
    it.

    Args:
        model: the model (on its device already).
        optimizer: its optimizer. The controller scales whatever LR its param groups hold at each step (an LR
            scheduler on it keeps working).
        policy: ``"heuristic"`` or one of its ablations (``"heuristic-precision"``, ...; see
            ``make_policy``), ``"pretrained"`` (the policy shipped with the package), a static preset
            (``"fp32"``, ``"bf16"``, ``"fp16"``), a path to an SB3 ``.zip``, or any object with the ``predict``
            signature. The batch finders are ``compare`` baselines, refused here with the reason. Under
            ``torch.distributed`` (DDP, more than one process) only a static preset is taken: an adaptive policy would
            decide in each process from its own shard's signals, and is refused (``ConfigError``).
        config: decision interval, groups, LR scales, batch bounds, memory budget, signals
            (``config.signals``; with ``lr_factors`` on, or a policy with ``needs_lr_factors`` such as
            ``"heuristic-second-order"``, each decision sets curvature-scaled per-layer LR factors, which
            apply to param groups carrying a ``"layer"`` key: the layer's index in ``engine.layers``).
        memory: overrides ``config.memory``.
        lr_rule: how the LR follows the batch size: ``"linear"``, ``"sqrt"``, ``"adascale"`` (from the
            gradient-noise signal), ``"none"`` or ``"auto"`` (linear for SGD, sqrt for Adam); default
            ``config.elastic.lr_rule``. See ``triaccel_rl.config.LRRule``; large rises are warmed up.
        log_dir: write TensorBoard scalars here (``None``: no logging).
        device: the model's device; inferred from its parameters by default.
        profile: the hardware profile whose memory factors the memory model starts from (a ``HardwareProfile``
            or the path of its JSON; default: the shipped one). A user's loop is timed by the clock, never priced.
        max_grad_norm: clip the gradient's total norm to this before each update, as
            ``torch.nn.utils.clip_grad_norm_`` between your ``backward()`` and ``step()`` would (there is no such
            place in a controlled loop: ``step(loss)`` does both). On a GPU the fused step clips on the device,
            without a sync. ``None``: no clipping.
        grad_transform: called with no arguments once a step, where a plain loop edits gradients between
            ``scaler.unscale_(optimizer)`` and ``optimizer.step()``: ``clip_grad_value_``, adaptive clipping, noise.
            It sees each parameter's ``.grad`` unscaled (under fp16 too, on both update paths), before
            ``max_grad_norm``'s clip, the statistics the signals read and the skip; it may edit them in place or
            assign new tensors of the same shape. A step whose gradients are non-finite before it (as ``unscale_``
            records an overflow) or after it is skipped. Its return value is ignored.
        probe: ``(inputs, targets)``, a held-out batch the estimator rounds draw their sub-batches from (a few hundred
            samples, not trained on; copied to the model's device and kept there). The rounds run the model on it in
            fp32 (the precision map's hooks idle, inside ``autocast()`` too), in the modes its modules train in,
            leaving batch-norm statistics and the random streams (torch's, Python's, NumPy's) as they were. At each
            decision the loss on it (no gradients, in the layers' precisions on a GPU) is the observation's probe loss,
            as in ``compare``. ``None``: no rounds, and the smoothed training loss stands in for the probe loss.
        loss_fn: ``loss_fn(model(inputs), targets)``, the mean loss over the samples (a 0-dim tensor with a graph to
            the parameters), for the rounds; required with ``probe`` (and only with it). It is given what the model
            returns, floating-point tensors in float32 (inside tuples, lists and dicts too). It is tried once at
            construction on two probe samples.
        fused: the update path. ``None``: the fused Triton step on a GPU where the optimizer allows it (``StepEngine``
            says which it takes), else ``optimizer.step()``, torch.optim's own (the reference path). ``False``: the
            reference path on every device, to compare the two or to keep an optimizer feature the fused step does
            not mirror. ``True``: the fused step on every device (on a CPU under Triton's interpreter with
            ``TRITON_INTERPRET=1``, else through its kernels' PyTorch references), refused (``ConfigError``, with the
            reason) where it cannot run this optimizer or Triton is not installed. A checkpoint resumes on either
            path: the fused step saves its moments in torch.optim's layout too.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> ctl = Controller(model, opt, policy="bf16", config=ControllerConfig(interval_steps=2))
        >>> for x, y in ctl.loader((torch.randn(64, 8), torch.randint(0, 2, (64,))), batch_size=16):
        ...     with ctl.autocast():
        ...         loss = nn.functional.cross_entropy(model(x), y)
        ...     ctl.step(loss)
        >>> ctl.steps
        4
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        policy: str | Policy = "heuristic",
        config: ControllerConfig | None = None,
        memory: MemoryBudget | None = None,
        lr_rule: str | LRRule | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        device: str | torch.device | None = None,
        profile: HardwareProfile | str | os.PathLike[str] | None = None,
        max_grad_norm: float | None = None,
        grad_transform: Callable[[], object] | None = None,
        probe: tuple[torch.Tensor, torch.Tensor] | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        *,
        fused: bool | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):  # its repr: every tensor of a list of parameters
            example = "e.g. torch.optim.SGD(model.parameters(), lr=0.1), and pass that"
            if isinstance(optimizer, type):
                got = f"the class {optimizer.__name__} (build one, {example})"
            elif isinstance(optimizer, Iterable) and not isinstance(optimizer, (torch.Tensor, str)):
                got = f"{type(optimizer).__name__} (the parameters themselves? build an optimizer on them, {example})"
            else:
                got = type(optimizer).__name__
            raise TypeError(f"optimizer must be a torch.optim.Optimizer over the model's parameters; got {got}")
        if config is not None and not isinstance(config, ControllerConfig):  # a dict failed on .elastic, unnamed
            raise TypeError(f"config={config!r} must be a ControllerConfig, e.g. ControllerConfig(interval_steps=5)")
        if memory is not None and not isinstance(memory, MemoryBudget):
            raise TypeError(f"memory={memory!r} must be a MemoryBudget, e.g. MemoryBudget(fraction=0.9)")
        max_grad_norm = check_max_grad_norm(max_grad_norm)
        if grad_transform is not None and not callable(grad_transform):
            raise TypeError(
                f"grad_transform={grad_transform!r} must be a callable taking no arguments, e.g. "
                "lambda: torch.nn.utils.clip_grad_value_(model.parameters(), 1.0), or None"
            )
        check_log_dir(log_dir)
        require_bool("fused", fused, optional=True)
        self.config = config or ControllerConfig()
        rule = LRRule.parse(lr_rule if lr_rule is not None else self.config.elastic.lr_rule)
        if self.config.heuristic.anneal_by == "batch" and rule is not LRRule.NONE:  # ControllerConfig checks its own
            raise ConfigError(
                f"lr_rule={rule.value!r} with heuristic.anneal_by='batch': a doubled batch lowers the gradient noise "
                "only at the LR held; pass lr_rule='none' (or leave it to the config's)"
            )
        self.memory = memory or self.config.memory
        first = next(iter(model.parameters()), None)
        self.device = resolve_device(device if device is not None else (first.device if first is not None else None))
        self.model = model
        # Everything a caller can get wrong is checked before the engine hooks into the model and the optimizer.
        refuse_driven_modules(model, optimizer)
        self.layout = ObservationLayout(self.config.n_groups)
        observation_space = gym.spaces.Box(-OBS_HIGH, OBS_HIGH, (self.layout.size,), np.float32)
        _refuse_in_ddp(policy, probe)
        self.policy = make_policy(policy, self.config, observation_space, action_space(self.config))
        if hasattr(self.policy, "prepare"):  # the batch finder searches its batch on a TrainingRun first
            raise ValueError(
                f"policy {policy!r} is a compare baseline that searches its batch on a TrainingRun; in your own "
                "loop, pass the batch to loader() and use a static policy ('fp32', 'bf16', 'fp16')"
            )
        self._policy_identity = _policy_identity(policy, self.policy, self.config)  # a checkpoint's, to compare
        if getattr(self.policy, "needs_lr_factors", False) and not self.config.signals.lr_factors:
            self.config = replace(self.config, signals=replace(self.config.signals, lr_factors=True))
        if self.config.signals.lr_factors and not any("layer" in group for group in optimizer.param_groups):
            _log.warning(
                "per-layer LR factors are on, but they apply to param groups carrying a 'layer' key and this "
                "optimizer's have none: they will change nothing. Build one group a layer, e.g. "
                "[{'params': p, 'layer': i} for i, p in enumerate(StepEngine.discover(model))]"
            )
        self.lr_rule = resolve_lr_rule(rule, optimizer)
        self.profile = HardwareProfile.resolve(profile)
        probe_batch = _checked_probe(model, probe, loss_fn, self.device)
        self.engine = StepEngine(model, optimizer, self.device, fused=fused)
        # fp16's loss scale starts at 2**16, as GradScaler's, and its first steps overflow until it has backed off to
        # the run's level: those skips are no overflow of the run's (a static fp16 run moved to bf16 for an interval at
        # every start, read as one). Until an fp16 update goes in, up to _SCALE_SEARCH_SKIPS of them are left out of
        # the signals' overflow rate (_scale_searching); ctl.skipped_steps counts them all.
        self._scale_search_left: int | None = _SCALE_SEARCH_SKIPS
        _CountedZeroGrad.drop_unused(optimizer)  # dropped Controllers' wrappers, as the engine drops their hooks
        self._zero_grads = _CountedZeroGrad(optimizer, self)  # tells a reset from other writes to the gradients
        try:
            self.engine.max_grad_norm = max_grad_norm
            self.engine.grad_transform = grad_transform
            self.engine.track_abs_max = False  # the Controller reads sq_sum and nonfinite only: one norm pass a step
            # The user's eager forward casts under autocast; a compiled one reads the fused step's 16-bit copies.
            self.engine.precision.copies_in_eager = False
            capacity = device_capacity_bytes(self.device, self.memory.cpu_capacity_bytes)
            self.memory_budget_bytes = self.memory.resolve(capacity, self.device.type)
            self._estimator_source: EstimatorSource | None = None
            # The probe batch and its loss, whose value at each decision is the observation's probe loss (None: the
            # smoothed training loss stands in), kept apart from the rounds', which an out-of-memory round stops.
            self._probe: tuple[torch.Tensor, torch.Tensor, Callable[..., torch.Tensor]] | None = None
            if probe_batch is not None and loss_fn is not None:
                self._probe = (*probe_batch, loss_fn)
            if probe_batch is not None:
                assert loss_fn is not None
                self._estimator_source = EstimatorSource(
                    model,
                    self.engine.layer_params,
                    loss_fn,
                    *probe_batch,
                    second_moment=self.engine.second_moment_diagonal,
                    keep_modes=True,  # the modes the user's model trains in (eval mode on purpose too)
                )
            self._copied_at_close = False  # whether the shield took its copy at the interval that just closed
            self.collector = self._new_collector()
            self.grouper = LayerGrouper(
                self.collector.controllable, self.config.n_groups, param_counts=self.engine.layer_param_counts
            )
            self.executor = Executor(self.config, self.grouper)
            self.cadence = self._new_cadence()
            self.steps = 0
            self.decisions: deque[ApplyReport] = deque(maxlen=DECISIONS_KEPT)
            """The latest decisions' reports, oldest first (the last :data:`DECISIONS_KEPT`; ``decisions[-1]`` is the
            latest): the settings each applied and the moves it refused. Not in a checkpoint: after a resume it holds
            the decisions made since. :attr:`decision_count` counts them all."""
            self._decision_count = 0
            # The shield's rollback: a copy of the last healthy state, restored when a whole interval's steps were
            # non-finite (each such step is skipped, but a model that only produces non-finite losses is lost).
            # Its callbacks reach this controller through a weak reference: the guard is the controller's own, and a
            # strong one would close a reference cycle, so that a closed, dropped controller kept its rollback copies,
            # the loader's data and the engine until a full garbage collection (one set a stage of gradual unfreezing).
            owner = weakref.proxy(self)
            guard = RollbackGuard(
                model,
                self.engine.state_holder,
                self.config.rollback_offload,
                self.config.snapshot_every,
                after_restore=self.engine.after_restore,  # weights and optimizer state changed outside the fused step
                # A copy at an interval's end is of a state no loss has been computed on yet: the next interval's
                # first step computes one. Until then the copy before it is kept (a second copy's memory).
                confirm=True,
                # The signals' running estimates go with each copy: the interval that broke the model folded its huge
                # losses and gradients in before its loss turned non-finite.
                # So does the loss scale, which the interval's skipped steps cut for a cause the copy's state lacks.
                # And with it what is left of the scale's first back-off (a copy from before it brings back 2**16).
                save_extra=lambda: (
                    owner.collector.estimates(),
                    owner.engine.scaler_state(),
                    owner._scale_search_left,
                ),
                load_extra=lambda saved: owner._restore_extra(saved),
            )
            self.guard = guard if self.config.rollback else None
            # Buffers holding infinities by design (an additive mask), excused from the shield's buffer check
            self._broken_buffers = BufferCheck(model)
            self._copy_taken: tuple[str, _StateMark] | None = None
            if self.guard is not None:
                # The copy of the starting state is taken as confirmed: a broken one would be "rolled back" to at every
                # interval, the run non-finite to its end. Refused, as a load after the build is.
                self._refuse_broken_model(
                    "when the Controller was built: the rollback copy would be of that state, which no rollback can "
                    "repair; build it on a finite model (load an earlier checkpoint first)"
                )
                self.guard.reserve()  # allocates the copy (pinned host memory on a GPU) before training
                self._copy_taken = ("reserve", self._state_mark())
            self.rollbacks = 0
            """Times the last healthy state was restored (``config.rollback``)."""
            self._rollbacks_in_a_row = 0  # since the last healthy interval (config.max_rollbacks_in_a_row)
            self.signals: Signals | None = None
            self.costs: CostModel | None = None
            self.memory_model: MemoryModel | None = None
            # The last predicted_memory_bytes() of the current map: ((memory model, its revision, batch, its type, map),
            # bytes). The CPU reads it at every step, the same until one of those changes (a new memory model, one
            # observed or rebased, another batch or map); each is in the key, so no assignment needs to clear it.
            self._predicted: tuple[tuple[Any, ...], int] | None = None
            self._costs_input: tuple[Any, ...] | None = None  # a sample's shape and dtype the costs were measured on
            self.lr_coupler: BatchLRCoupler | None = None
            self._noise_scale: float | None = None
            self._loader: ElasticLoader | None = None
            self._loader_key: tuple[Any, ...] | None = None  # the dataset and seed it serves: a later call carries on
            self._loader_source = (0, 0)  # where the caller's tensors were (no reference kept)
            # (steps, the loader's samples_served) as the last batch was taken: what it served since is unstepped
            self._unstepped: tuple[int, int] | None = None
            self._micro_loss: torch.Tensor | None = None  # the sum of backward()'s micro-batch losses, for step()
            self._micro_mark: tuple[int, int, int] | None = None  # the gradients' state after that backward
            self._micro_zero_grads = 0  # optimizer.zero_grad() calls by then
            self._warned_grads_written = False
            self._planned_epochs = 0  # the epochs the last loader() call trains to
            self._resume: dict[str, Any] | None = None  # a checkpoint's loader state, for the next loader() call
            self._state_loads = 0  # load_state_dict() calls: an iterator open across one stops
            self._base_batch_size = 0
            self._batch_size = 0
            self._last_batch = 0
            self._writer: Any = None  # opened last, below
            self._precision_map = PrecisionMapScalars(self.engine.layers)  # its per-layer scalars
            self._skipped_counted = 0  # skipped updates of the intervals closed (a checkpoint's count)
            self._skipped_at_close = 0  # the open interval's, read at close()
            self.observe_budget_frac = self.config.signals.observe_budget_frac if self.device.type == "cuda" else None
            """Share of step time the per-step statistics may take (``SignalConfig.observe_budget_frac`` on a GPU):
            when recording them costs more, one step in several is recorded. None (a CPU) records every step.
            Skipped steps are counted from the optimizer's applied updates, recorded or not."""
            self._moments: DeviceMoments | None = None
            self._applied_at_start = 0  # the engine's applied updates when the interval began
            self._interval_steps = 0
            self._interval_peak = 0
            self._decision_due = False  # the last interval closed and its decision is not made yet (_decide_if_due)
            self._observed: tuple[Signals, np.ndarray] | None = None  # that decision's observation, once taken
            self._applied: ApplyReport | None = None  # that decision's action, once the executor applied it
            self._copy_due: bool | None = None  # its change's rollback copy is still to take (None: not read yet)
            self._step_left: _StepLeft | None = None  # the rest of a step whose update went in (_finish_step)
            self._counted = False  # the current step is counted (_count_step): its update went in
            self._coupler_steps = 0  # the LR coupler's steps when the current step began (_count_step)
            self._peak_from_forward = False  # autocast() reset the allocator's peak before this step's forward
            self._autocast_since_step = False  # autocast() was called since the last step (a forward in the map)
            self._warned_outside_autocast = False
            self._recorded_ms = 0.0  # what recording the last closed interval's statistics took
            self._carried_ms = 0.0  # the open interval's training ms before a resume (a checkpoint's)
            self._decision_start = 0.0  # perf_counter() at the last interval's end (_close_interval)
            self._timer = IntervalTimer(self.device)
            self._timer.start()
            self._closed = False
            self._interval_healthy = False  # the last closed interval's updates were all applied, its buffers finite
            self._interval_mixed = False  # the last closed interval skipped some steps, applied others, buffers finite
            self._copy_opens_interval = False  # the guard's unconfirmed copy is the state the open interval began from
            self._change_copy = False  # that copy was taken at a configuration change: a rollback tries it first
            self._reopened_copy = False  # that copy is one a rollback restored (no newer state than the last failure)
            self._applied_before_copy = 0  # the open interval's updates applied before that copy (a resume's, mid-way)
            formats = sixteen_bit_formats(self.device)
            if Precision.BF16 not in formats and run_without_bf16(self.policy):
                _log.info("bf16 does not run on %s: the policy starts and lowers to fp16 instead", self.device)
            initial = getattr(self.policy, "initial_action", None)
            if initial is not None:  # a static configuration holds from the first step
                self.executor.start(decode(initial, self.config), self)
            start = getattr(self.policy, "initial_precision", None)
            if start is not None:  # an adaptive policy's starting precision (the heuristic starts from bf16)
                self.engine.set_precisions([start] * len(self.engine.precision.controllable_indices))
            self.speed_trial: dict[str, float] = {}
            """After a speed trial: ms a step in bf16 and fp16, and ``chosen`` (the precision's int value)."""
            self._trial: _SpeedTrial | None = None
            self._trial_plan: tuple[tuple[Precision, ...], int] | None = None  # (formats, steps), to start one over
            wants_trial = getattr(self.policy, "wants_speed_trial", None)
            # The user's loop is timed by the clock, never charged from the profile (which here sizes memory only),
            # so step time tells the 16-bit formats apart on a GPU alone (compare's CPU protocol reads the profile
            # instead).
            step_time_known = self.device.type == "cuda" and self.config.cost_mode is CostMode.MEASURED
            # A GPU without bf16 has one 16-bit format: nothing to choose between, and no trial.
            if len(formats) > 1 and wants_trial is not None and wants_trial(step_time_known):
                # As in compare: time real steps of the user's loop in each 16-bit format, every layer alike,
                # before the first decision; the policy lowers to the faster from then on.
                steps = getattr(self.policy, "config", self.config).heuristic.speed_trial_steps
                self._trial_plan = (tuple(formats), steps)
                self._start_trial()
            if log_dir is not None:  # after every check: a refused build left an events file and an open writer
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(log_dir))
        except BaseException:
            self.engine.remove()  # a refused controller leaves the model and the optimizer as they were given
            self._zero_grads.remove()
            raise
        _note_grad_scaler_outputs()
        _open_controllers.add(self)

    # ----------------------------------------------------------------------------------- user API

    def loader(
        self,
        dataset: tuple[torch.Tensor, torch.Tensor],
        batch_size: int,
        epochs: int = 1,
        seed: int = 0,
        total_epochs: int | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yields ``(x, y)`` batches until ``epochs`` epochs of the run, at the controller's current batch size.

        It serves one run's training data (a call on a dataset of other shapes or dtypes starts the data over, with a
        warning, measures its memory again and ends an iterator still open on the old one; data of the same shapes
        and dtypes is taken for the run's own, moved or copied, and carries the run on). Every sample is seen exactly
        once per epoch whatever batch sizes the policy picks, each epoch in its own order.
        A batch served but never stepped on (the loop raised, caught outside it, or broke out before ``step()``) is
        served again by the next call that carries the run on; one skipped inside the loop (``continue``) is yours.
        The tensors are moved to the model's device once, up front. Called again with a dataset of the same shapes
        (the same tensors, or new ones: moved again, say), batch size and seed, it carries on where the last call
        stopped, on the tensors given (the next epoch's order, the batch size the policy chose):
        ``epochs`` counts from the run's start, so a loop over epochs passes ``epochs=epoch + 1``. After
        ``load_state_dict``, the same: it carries on from the checkpoint's place. Such a loop passes the run's length
        as ``total_epochs`` (default: ``epochs``), which :attr:`progress` is a share of: without it every epoch read
        as the run's end, and the late-run rules (annealing, the batch ramp) fired in the first.

        Raises:
            ValueError: a dataset that is not two tensors of one length, a non-positive batch size or epoch count, a
                batch size above the dataset's length,
                another base batch size or seed than the run's on data of its shapes and dtypes, or ``epochs`` the run
                has already trained.
            ConfigError: the memory budget cannot hold the model and one sample of the dataset, checked at the first
                batch of a call whose samples differ in shape or dtype from the run's (the first call's too). The
                run, a pending resume included, is left as it was before the call.
        """
        self._check_open()
        if (
            not isinstance(dataset, (tuple, list))
            or len(dataset) != 2
            or not all(isinstance(t, torch.Tensor) for t in dataset)
        ):
            got = type(dataset).__name__
            if isinstance(dataset, (tuple, list)):  # its element types, a few: a list of 60000 samples named each
                kinds = list(dict.fromkeys(type(t).__name__ for t in dataset))  # (a 540 KB message)
                got += f" of {len(dataset)} items ({', '.join(kinds[:3])}{', ...' if len(kinds) > 3 else ''})"
            hint = "For a list of (x, y) samples, pass the tensors (torch.stack(xs), torch.stack(ys))"
            if isinstance(dataset, torch.utils.data.TensorDataset) and len(dataset.tensors) == 2:
                hint = "Pass its tensors: ctl.loader(dataset.tensors, ...)"
            raise ValueError(f"dataset must be a pair (inputs, labels) of tensors; got a {got}. {hint}")
        for name, tensor in zip(("inputs", "labels"), dataset, strict=True):
            if tensor.dim() == 0:  # len() below raised a bare TypeError
                raise ValueError(f"dataset's {name} must have a sample dimension first; got a 0-d tensor")
        if len(dataset[0]) != len(dataset[1]):
            raise ValueError(f"dataset has {len(dataset[0])} inputs and {len(dataset[1])} labels: they must pair up")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
        if batch_size > len(dataset[0]):
            raise ValueError(
                f"batch_size={batch_size} is more than the {len(dataset[0])} training samples: a step serves at most "
                "an epoch"
            )
        batch_size = int(batch_size)
        whole = isinstance(epochs, (int, np.integer)) or (isinstance(epochs, float) and epochs.is_integer())
        if isinstance(epochs, bool) or not whole or epochs < 1:
            raise ValueError(f"epochs={epochs!r} must be a whole number >= 1")
        whole_total = is_whole(total_epochs) or (isinstance(total_epochs, float) and total_epochs.is_integer())
        if total_epochs is not None and not (whole_total and total_epochs >= epochs):  # 10.0 too, as epochs
            raise ValueError(f"total_epochs={total_epochs!r} must be a whole number >= epochs={epochs}")
        x, y = dataset
        self._attach_loader(x, y, batch_size, int(epochs), seed)
        self._planned_epochs = int(total_epochs if total_epochs is not None else epochs)
        loader = self._loader
        assert loader is not None
        loads = self._state_loads
        while loader.epoch < epochs:
            if self._state_loads != loads:  # it would go on from its own place, the checkpoint's left pending
                raise RuntimeError(
                    "load_state_dict() was called while this loader() iterator was open: leave the loop and call "
                    "loader() again, which carries on from the checkpoint's place in the data"
                )
            if self._loader is not loader:  # another dataset's loader() call (an evaluation set, say) replaced it
                raise RuntimeError(
                    "this loader() iterator's run was replaced by a loader() call on another dataset: loader() serves "
                    "the training data of one run (iterate evaluation data yourself, under torch.no_grad())"
                )
            # Recorded before the batch is taken, not after: a Ctrl-C between the loader's move and the record
            # skipped the batch. What the loader served since this place is given back by the next call (none, or
            # the batch), however far a Ctrl-C let this go.
            self._unstepped = (self.steps, loader.samples_served)
            batch = loader.next(self.batch_size)
            if batch.epoch >= epochs:
                loader.take_back(len(batch.y))  # not trained on: a resumed run with more epochs starts here
                self._unstepped = None  # the loop ran to its end: the batches it took were the loop's to train
                break
            self._last_batch = len(batch.y)
            yield batch.x, batch.y

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """Context for the forward pass and the loss: each layer runs in its decided precision.

        On a GPU it also starts the step's memory measurement (at a batch's first micro-batch, with gradient
        accumulation), so the peak ``step`` reads covers the forwards too. The
        model's mode is yours: call ``model.train()`` after an evaluation, as in any loop (a model trained in eval mode
        on purpose, with frozen batch-norm statistics, stays in it).
        """
        self._check_open()
        # A step a Ctrl-C cut short after its update: its decision comes before this forward, as it did uninterrupted
        # (made at the next step, it came after a forward run in the precisions before it)
        self._finish_step()
        # A batch's first micro-batch (no ctl.backward() since the last step) starts the measurement; the later ones
        # are measured on with it, so the step's peak is the batch's, not its last micro-batch's.
        if self.device.type == "cuda" and self._micro_loss is None:
            torch.cuda.reset_peak_memory_stats(self.device)  # host-side counters: no sync
            self._peak_from_forward = True
        self.engine.sync_weight_copies()  # the user's loop may have written weights (a checkpoint, say)
        self._retake_copy_if_written(training_starts=False)  # an evaluation's forward may come before a load
        self._autocast_since_step = True
        return self.engine.precision.context()

    def _warn_outside_autocast(self) -> None:
        """Once a run: a step whose forward ran outside :meth:`autocast`, where it computes otherwise than the map says.

        Such a forward computes in fp32 where a layer is 16-bit, and in the loop's own ``torch.autocast``'s type under
        any map, while ``precisions``, the decisions and the logs say otherwise.
        """
        own = self.engine.precision.own_autocast_precision
        if self._warned_outside_autocast or (own is None and self.engine.precision.all_fp32):
            return
        self._warned_outside_autocast = True
        precisions = ", ".join(sorted({p.name.lower() for p in self.engine.precision.precisions}))
        if own is None:
            _log.warning(
                "ctl.step() after a forward outside ctl.autocast(): that forward ran in fp32, not in the layers' "
                "precisions (%s). Run the forward and the loss under `with ctl.autocast():`",
                precisions,
            )
            return
        _log.warning(
            "ctl.step() after a forward under your own torch.autocast(dtype=%s), outside ctl.autocast(): its "
            "matmuls and convolutions ran in %s whatever the layers' precisions (%s now), so the controller's "
            "decisions do not act on it while its costs and observation count those precisions. Remove that "
            "torch.autocast from the loop and run the forward and the loss under `with ctl.autocast():`",
            own.dtype,
            own.name.lower(),
            precisions,
        )

    def _refuse_broken_model(self, why: str) -> None:
        """A ``NoGoodStateError`` where trained parameters or buffers hold NaN or inf (``why`` follows "values")."""
        broken = nonfinite_parameters(self.model) + self._broken_buffers()
        if broken:
            raise NoGoodStateError(
                f"the model's {', '.join(broken[:3])}{' ...' if len(broken) > 3 else ''} hold NaN or infinite values"
                f"{'' if why.startswith(':') else ' '}{why}"
            )

    def _restore_extra(self, saved: tuple[dict[str, Any], Any, int | None]) -> None:
        """Puts back what the rollback copy took beside the weights: the signals' estimates, the loss scale, its search.

        What was left of the scale's first back-off goes with the scale: a copy from before it brings back 2**16.
        """
        estimates, scaler, self._scale_search_left = saved
        self.collector.restore_estimates(estimates)
        self.engine.load_scaler_state(scaler)

    def _state_mark(self) -> _StateMark:
        """What tells that the weights or the optimizer's state were written from outside.

        The version counters of everything the model's state dict holds (``model.load_state_dict`` bumps them), frozen
        parameters and buffers too, and the optimizer's state object (``load_state_dict`` makes a new one): a frozen
        backbone loaded after the build must be in the copy, or a rollback would put the random one back. The
        parameters' versions apart tell a load from a forward in train
        mode, which bumps a batch norm's buffers alone (``_retake_copy_if_written``).
        """
        state = self.model.state_dict(keep_vars=True)
        buffers = dict(self.model.named_buffers())  # the non-persistent ones too, which the copy holds as well
        # The entries' names too: a buffer made at the first forward (version 0) is not in the copy taken before it.
        # Tensors only: a module's extra state need not be one.
        versions = sum(t._version for t in [*state.values(), *buffers.values()] if isinstance(t, torch.Tensor))
        params = sum(p._version for p in self.model.parameters())
        return (versions, (*state, *buffers)), getattr(self.engine.optimizer, "state", None), params

    def _retake_copy_if_written(self, training_starts: bool) -> None:
        """Takes the rollback copy again, before the first step after it, if the weights or optimizer were loaded since.

        The copy is taken at build (``reserve``) and at ``load_state_dict`` (``resume``).
        Otherwise a model or optimizer loaded after the Controller was built (a fine-tune from pretrained weights, a
        checkpoint of the user's own loop, the model loaded after the Controller's state) would not be in the copy,
        and a first interval of skipped steps would restore the random start in its place.
        """
        if self._copy_taken is None or self.guard is None:
            return
        how, mark = self._copy_taken
        now = self._state_mark()
        # At a step, buffers written with the parameters and the optimizer untouched are the step's own forward's (a
        # batch norm's running statistics; a load writes the parameters too): the copy before that forward is kept,
        # and the shield restores it should the forward have broken them. Read as a load, a first batch holding an inf
        # would end the run with "after they were loaded", where a later one is rolled back.
        forwards_own = training_starts and now[1] is mark[1] and now[2] == mark[2] and now[0][1] == mark[0][1]
        if (now[0] != mark[0] or now[1] is not mark[1]) and not forwards_own:
            # As load_state_dict refuses it: taken as the good copy, it would be restored at every interval. Nothing
            # changes here: refused again until a good state is loaded, which is then copied.
            self._refuse_broken_model("after they were loaded: no rollback can repair them; load an earlier checkpoint")
            if how == "reserve":
                self.guard.reserve()  # the loaded state is the run's start (confirmed); the copies' memory is reused
            else:
                self.guard.resume()  # unconfirmed, as the checkpoint's own copy
        # Until the first backward or step: autocast() also opens an evaluation's forward, which may come before the
        # load (otherwise any autocast() call would use the retake up).
        self._copy_taken = None if training_starts else (how, now)

    def backward(self, loss: torch.Tensor, retain_graph: bool = False) -> None:
        """The backward pass of one micro-batch's loss, for gradient accumulation: ``step`` takes the last one's.

        ``loss.backward()`` would do for an fp32 or bf16 map, but while a layer is fp16 ``step`` unscales every
        gradient by the loss scale, so a micro-batch backward must be scaled as this one is. Scale each loss as the
        plain loop would (a mean over ``k`` micro-batches: ``loss / k``).

        Two losses of one graph (two heads on a shared body): ``ctl.backward(loss1, retain_graph=True)``, then
        ``ctl.step(loss2)``, as the plain loop's ``loss1.backward(retain_graph=True); loss2.backward()`` (or
        ``ctl.step(loss1 + loss2)``, one backward).

        Args:
            loss: the micro-batch's scalar loss.
            retain_graph: keep the graph for a later backward through it, as ``Tensor.backward`` does.

        Example:
            >>> model = nn.Linear(4, 2)
            >>> ctl = Controller(model, torch.optim.SGD(model.parameters(), lr=0.1), policy="fp16")
            >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
            >>> for part in (slice(0, 4), slice(4, 8)):
            ...     with ctl.autocast():
            ...         loss = nn.functional.cross_entropy(model(x[part]), y[part]) / 2
            ...     ctl.backward(loss) if part.start == 0 else ctl.step(loss)
            >>> ctl.steps
            1

        Raises:
            ValueError: ``loss`` is not a scalar tensor or is a ``GradScaler``'s ``scale(loss)`` (the controller
                scales the loss itself), or ``retain_graph`` is not a bool.
        """
        self._check_open()
        _check_loss(loss)
        if not isinstance(retain_graph, bool):  # a graph freed or kept by a truthy value's accident
            raise ValueError(f"retain_graph={retain_graph!r} must be True or False")
        self._finish_step()
        self._decide_if_due()
        self._zero_grad_if_pending()
        earlier = self._earlier_micro_loss()
        self._retake_copy_if_written(training_starts=True)
        self.engine.bind_grads()  # a user's optimizer.zero_grad() may have set the gradients to None
        # Until the micro-batch is recorded below: cut short there (a Ctrl-C), its batch is served again whole
        self.engine.zero_pending = True
        self._backward(loss, retain_graph)  # one that raises drops the batch's gradients (_backward)
        # The step decides on the batch's loss, the micro-batches' sum: an earlier one's non-finite loss (a term with
        # no gradient) was never seen, and the signals read the last micro-batch's share of the loss as the loss.
        detached = loss.detach()
        self._micro_loss = detached if earlier is None else earlier + detached
        self._micro_mark = self._grad_mark()
        self._micro_zero_grads = self._zero_grads.calls
        self.engine.zero_pending = False

    def _backward(self, loss: torch.Tensor, retain_graph: bool = False) -> None:
        """The (scaled) backward of ``loss``; a loop that kept its own ``loss.backward()`` is told so.

        PyTorch's "backward through the graph a second time ... Specify retain_graph=True" pointed the wrong way: the
        most likely slip moving a loop over is leaving the old backward in. Losses sharing a graph are the third
        case, named with the controller's ways to step them.

        A backward that raises (out of memory part-way) leaves no gradient behind: what it had accumulated, and the
        batch's earlier micro-batches', would have gone into the update of the batch served again in its place.
        """
        try:
            # Outside autocast, as after a `with ctl.autocast():` a step: inside one around the whole loop the backward
            # would run under it, and an fp32 layer's gradients would be computed with bf16 matmuls
            with torch.autocast(self.device.type, enabled=False):
                self.engine.scale_loss(loss).backward(retain_graph=retain_graph)
        except BaseException as error:
            self.engine.zero_grad()
            self._micro_loss = None
            if not isinstance(error, RuntimeError) or "backward through the graph a second time" not in str(error):
                raise
            raise RuntimeError(
                "part of this loss's graph was already backpropagated: either a loss.backward() left in the loop "
                "(ctl.step(loss) runs the backward itself: remove it; for gradient accumulation, ctl.backward(loss) "
                "on the micro-batches before the last), a tensor kept from an earlier step, such as an RNN's "
                "hidden state (.detach() it), or losses sharing a graph: ctl.step(loss1 + loss2), or "
                "ctl.backward(loss1, retain_graph=True) then ctl.step(loss2)"
            ) from error

    def _zero_grad_if_pending(self) -> None:
        """Zeros the gradients a step or micro-batch cut short left behind (``StepEngine.zero_pending``).

        A Ctrl-C after a backward and before the step's zeroing (its update applied or not) left them in ``.grad``,
        and the next backward added to them: the next update took two batches' gradients. A flag check at every step.
        """
        if self.engine.zero_pending:
            self.engine.zero_grad()
            self._micro_loss = None

    def _earlier_micro_loss(self) -> torch.Tensor | None:
        """The losses :meth:`backward` summed for this batch; None if the gradients were reset since (spent either way).

        A loop that drops a batch part-way (a non-finite loss, an out-of-memory error) resets the gradients with its
        ``zero_grad()``: that batch's losses went into the next batch's step and skipped its healthy update. A reset
        is a call of ``optimizer.zero_grad()`` (counted), any ``zero_grad()`` setting the gradients to ``None`` (the
        default), which the mark taken after the backward tells, or one zeroing them in place by another way
        (``model.zero_grad(set_to_none=False)``, ``p.grad.zero_()``), which their values tell. Any other write in
        place (a ``clip_grad_norm_`` ported from a plain loop) keeps the batch's losses, and is logged once.
        """
        earlier, self._micro_loss = self._micro_loss, None
        if earlier is None or self._zero_grads.calls != self._micro_zero_grads:
            return None
        now, then = self._grad_mark(), self._micro_mark
        if now == then:
            return earlier
        if now is None or then is None or now[:2] != then[:2]:  # set to None since (or made anew by a backward)
            return None
        if self._grads_all_zero():  # one sync, on this rare path only
            return None
        self._warn_grads_written()
        return earlier

    def _grads_all_zero(self) -> bool:
        """Whether every gradient of the held parameters is zero (or None)."""
        grads = [p.grad for params in self.engine.layer_params for p in params if p.grad is not None]
        return not grads or not bool(torch.stack([grad.ne(0).any() for grad in grads]).any())

    def _warn_grads_written(self) -> None:
        """Logs once (warning) that the gradients were written in place after :meth:`backward`, not reset."""
        if self._warned_grads_written:
            return
        self._warned_grads_written = True
        _log.warning(
            "the gradients were written in place between ctl.backward() and ctl.step() (a clip_grad_norm_, "
            "nan_to_num_ or clamp_ from a plain loop?): that ran before the last micro-batch's backward, which "
            "step() runs, so it acted on the earlier micro-batches' gradients only, not on the whole batch's as in a "
            "plain loop. Clip with Controller(..., max_grad_norm=...) and pass other edits as "
            "Controller(..., grad_transform=...): step() runs both on the whole batch's gradients. The batch's "
            "loss still counts every micro-batch; to drop them, optimizer.zero_grad()"
        )

    def _grad_mark(self) -> tuple[int, int, int] | None:
        """The first held parameter with a gradient: its index, its gradient tensor's identity and version."""
        for index, param in enumerate(p for params in self.engine.layer_params for p in params):
            if param.grad is not None:
                return index, id(param.grad), param.grad._version
        return None

    def step(self, loss: torch.Tensor) -> None:
        """Backward, update (skipped on non-finite gradients), signals, and a decision every interval.

        With gradient accumulation, the micro-batches before the last go through :meth:`backward`, the last here.

        The loss and the per-layer gradient norms accumulate on the device (``DeviceMoments``), read back when the
        interval ends. On the fused path (on a GPU) the step also skips a non-finite update on the device: one
        host-device sync per interval. The reference path (a CPU, or an optimizer the fused step refuses) decides
        each step's skip on the host: a few host-device syncs every step (the gradients' and the loss's finiteness,
        another optimizer's overflow).

        Raises:
            ValueError: ``loss`` is not a scalar tensor, or is a ``GradScaler``'s ``scale(loss)`` (the controller
                scales the loss itself: remove the loop's GradScaler).
            UnrecoverableOOMError: out of memory part-way through the optimizer update, which may have left the
                parameters and optimizer state partly updated: the step counts and its batch is spent (an error
                before the update leaves none, and ``loader()`` serves its batch again).
            NoGoodStateError: with the shield on, at an interval's end where no state is left to roll back to: a
                resumed run's starting state failed twice, or a failure came after ``max_rollbacks_in_a_row``
                rollbacks in a row (the last confirmed state is restored first); or the weights or buffers were
                written from outside with NaN or inf since the last step.
        """
        self._check_open()
        _check_loss(loss)
        self._finish_step()
        self._decide_if_due()
        if self.device.type == "cuda" and not self._peak_from_forward:  # a forward outside autocast(): from here
            torch.cuda.reset_peak_memory_stats(self.device)
        self._peak_from_forward = False
        self._retake_copy_if_written(training_starts=True)  # a forward outside autocast(): its batch-norm statistics
        if not self._autocast_since_step and not self.engine.precision.active:  # one context around the loop is fine
            self._warn_outside_autocast()
        self._autocast_since_step = False
        self.engine.precision.own_autocast_precision = None
        if self._moments is None:  # the first step
            self._moments = DeviceMoments(self.engine.layer_params, budget_frac=self.observe_budget_frac)
            self._applied_at_start = self.engine.applied_steps()
            if self._loader is None and self._resume is None:
                self._say_own_batches()
        self._zero_grad_if_pending()
        earlier = self._earlier_micro_loss()  # the batch's earlier micro-batches (backward())
        self.engine.bind_grads()  # a user's optimizer.zero_grad() may have set the gradients to None
        # From here the batch's gradients are the step's: zeroed by it, or by the next step where it is cut short
        self.engine.zero_pending = True
        self._backward(loss)
        if earlier is not None:
            loss = earlier + loss.detach()
        if self.lr_coupler is not None:  # after the backward: one that raises is no step of the warm-up
            self.engine.batch_lr_gain = self.lr_coupler.next_gain()
        self._counted = False
        self._coupler_steps = self.lr_coupler.steps if self.lr_coupler is not None else 0
        # The last step's flags, read below should this one be cut short before the engine resets them: its update was
        # taken for this one's, the batch counted as trained on, and its gradients went into the next update
        self.engine.update_reached = self.engine.update_started = False
        try:
            self.engine.step_after_backward_deferred(loss.detach())
            self._count_step(loss)  # in here: a Ctrl-C right after the update is counted below
        except BaseException as error:
            if self.engine.update_reached:  # a step post-hook raised after the update: the batch was trained on
                self._count_step(loss)
                # And the rest of the step: its statistics, and the decision when due (otherwise both are lost, and
                # every later decision comes a step late). Then the hook's error. On a Ctrl-C the next
                # backward() or step() does it (_finish_step).
                if isinstance(error, Exception):
                    self._finish_step()
            elif self.engine.update_started:
                # The update raised part-way (out of memory where AdamW allocates its denominators): some parameters
                # and their optimizer state moved. The batch is spent: served again, it would go into them twice.
                self._count_step(loss)
                what = (
                    f"the optimizer update of step {self.steps - 1} raised part-way: the parameters and optimizer "
                    "state may be partly updated, so the step is not retried (its batch counts as trained on: "
                    "loader() serves the next one); resume from the last checkpoint"
                )
                if isinstance(error, Exception) and is_out_of_memory(error):
                    raise UnrecoverableOOMError(f"out of memory: {what}: {error}") from error
                _log.error("%s: %s: %s", what, type(error).__name__, error)  # the error goes on as it is
                # The gradients' statistics were taken before the update began (on the reference path; the fused step
                # keeps none of one that raised): a loop that catches the error and goes on gets the step's statistics
                # and its decision when due, as after a post-hook's error (otherwise every later decision comes a step
                # late). Not after an OOM: a decision's work would allocate on a device that just
                # ran out, and its own OOM would hide the UnrecoverableOOMError; the next step does it. Nor on a
                # Ctrl-C: it stops the loop, and the next backward() or step() does it.
                if isinstance(error, Exception):
                    self._finish_step()
            raise
        self._finish_step()

    def _count_step(self, loss: torch.Tensor) -> None:
        """Counts an update that went in: the warm-up's rung, the run's and the interval's steps; the batch is spent.

        Before the statistics are recorded, so a step whose update went in and whose post-hook raised is counted
        too (an update that raises before it is no step: the warm-up holds, and the batch is served again). Once a
        step: called again where a Ctrl-C cut the first call short. The counts, the batch spent and the rest of the
        step (``_finish_step``) go in one assignment, which nothing interrupts part-way: the interval one step short
        of the updates applied read a skipped count of -1, refused at every later interval's end.
        """
        if self._counted:
            return
        coupler = self.lr_coupler
        if coupler is not None and coupler.steps == self._coupler_steps:  # not advanced by a call cut short
            coupler.advance()
        self.steps, self._interval_steps, self._unstepped, self._step_left, self._counted = (
            self.steps + 1,
            self._interval_steps + 1,
            None,
            _StepLeft(loss, self.engine.last_grad_stats),
            True,
        )

    def _finish_step(self) -> None:
        """The rest of a counted step (``_step_left``): statistics, memory, the trial or interval end and decision.

        Run right after the update, and where a Ctrl-C (or an out-of-memory error) cut it short, by the next
        ``backward()`` or ``step()``, before its own update, as the uninterrupted run did it: each part once, the
        interval closed once (``_close_interval`` goes on where it stopped). A decision that raises stays due
        (``_decide_if_due``). An error other than an interruption drops what is left: done again, it would raise at
        every step.
        """
        left = self._step_left
        if left is None:
            return
        # autocast caches each weight's 16-bit cast until its outermost region closes: inside one around the whole
        # loop (ctl's or the user's own torch.autocast), the next forward computed with the weights before this update
        # (and a rollback), every step of the run. Cleared, it casts them again, as a region a
        # step would.
        torch.clear_autocast_cache()
        try:
            if not left.recorded:
                left.recorded = self._record_step(left.loss, left.grads)
            if self._trial is not None:
                self._step_left = None
                self._advance_trial(self._trial, left.loss)
                return
            if left.closing is None and self._interval_steps < self.cadence.steps:
                self._step_left = None
                return
            if left.closing is None:
                left.closing = self._new_closing()
            else:  # going on after a Ctrl-C: the pause before is no part of the decision's time
                self._decision_start = time.perf_counter()
                collector = self.collector
                left.closing.overhead_ms, left.closing.cheap_ms = collector.overhead_ms, collector.cheap_ms
                left.closing.rounds_ms = collector.estimator_ms
            closing = left.closing
            train_ms = self._close_interval(left.loss, closing)
        except Exception:
            self._step_left = None
            raise
        self._step_left, self._decision_due = None, True
        try:
            self._decide()
        except BaseException:
            # It stays due (a Ctrl-C in the policy, an error in the snapshot): the next backward() or step() makes
            # it, before its update (otherwise it is lost, and the next comes an interval late). The
            # interval's training counts now, as time no decision followed, and the cadence records the decision
            # once, when it is made. The clock restarts here (a checkpoint's interval time holds the pause only,
            # which the retry drops) and again after the retry.
            self._charge_decision(closing.overhead_ms)
            self.cadence.add_training(train_ms)
            self._timer.start()
            raise
        self._charge_decision(closing.overhead_ms)
        # The estimator rounds have a budget of their own (the scheduler's): the cadence weighs the rest, as in
        # DecisionLoop.
        self.cadence.record(
            (self.collector.overhead_ms - closing.overhead_ms) - (self.collector.estimator_ms - closing.rounds_ms),
            train_ms,
            closing.steps,
            cheap_ms=self.collector.cheap_ms - closing.cheap_ms,
            recording_ms=self._recorded_ms,
        )
        self._timer.start()

    def _record_step(self, loss: torch.Tensor, grads: GradStats | None) -> bool:
        """Records a counted step's statistics (none where its update raised before taking them) and memory; True."""
        assert self._moments is not None
        if grads is not None:
            self._moments.observe_layers(loss, grads.sq_sum)  # detached only when sampled
        batch = self._last_batch or 1
        if self.device.type == "cuda":
            now, memory = allocated_bytes(self.device)  # the allocator's host-side counters: no sync
            if self.memory_model is not None:
                self.memory_model.observe(batch, self.precisions, memory, allocated_bytes=now)
        else:
            memory = self.predicted_memory_bytes(batch)
        self._interval_peak = max(self._interval_peak, memory)
        return True

    def _scale_searching(self, skipped: int) -> int:
        """How many of an fp16 interval's ``skipped`` steps were the loss scale's first back-off from 2**16.

        Until an fp16 update has gone in, each skip is the scale searching down for the run's level (at most
        ``_SCALE_SEARCH_SKIPS`` of them: from 2**16 to 1), as ``GradScaler``'s first steps are, and the interval of
        the first update ends the search (``_scale_search_after``). All of that interval's skips count as the
        search's, within what is left of it: the order of its steps is not kept, and a scale that has let one update
        through may still be above the run's level (skip, skip, five updates, skip is a usual start). 0 outside fp16
        and once the search is over.
        """
        left = self._scale_search_left
        if not left or not skipped or not self.engine.precision.needs_grad_scaler:
            return 0
        return min(skipped, left)

    def _scale_search_after(self, applied: int, searching: int) -> int | None:
        """What is left of the loss scale's search after an interval (None: over, at the first fp16 update)."""
        if self._scale_search_left is None or (applied and self.engine.precision.needs_grad_scaler):
            return None
        return self._scale_search_left - searching

    def _new_closing(self) -> _Closing:
        """An interval's end about to begin: the collector's charges so far, and the shield's flags as it finds them."""
        collector = self.collector
        flags = (self._copy_opens_interval, self._change_copy, self._reopened_copy, self._applied_before_copy)
        return _Closing(collector.overhead_ms, collector.cheap_ms, collector.estimator_ms, flags)

    def _charge_decision(self, overhead_ms: float) -> None:
        """Charges the decision's wall time since ``_decision_start`` that its parts did not charge themselves.

        ``overhead_ms`` is the collector's overhead when it began. The whole wall time from the interval's end counts:
        the moments read, the shield (its buffer check, a rollback copy) and the running-mean read are the collector's
        to charge too. Only its own parts were (the cadence stretched too little, and the overhead reported on a GPU
        read low).
        """
        uncharged = (time.perf_counter() - self._decision_start) * 1e3 - (self.collector.overhead_ms - overhead_ms)
        self.collector.add_overhead(max(uncharged, 0.0))

    def _decide_if_due(self) -> None:
        """Makes the decision that raised at the last interval's end (still due), before this batch's update.

        As the uninterrupted run: its settings apply from the update after the interval (the LR multiplier, the
        precisions of the backward's loss scale, a batch size's LR gain), and the next interval is timed after it. The
        batch was already served and its forward run, under the settings before the decision: a batch size it changes
        takes effect from the next batch. Called before the batch's first backward, so that its micro-batches share
        one loss scale. A flag check at every step.
        """
        if not self._decision_due:
            return
        self._decision_start = time.perf_counter()
        overhead, cheap, rounds = self.collector.overhead_ms, self.collector.cheap_ms, self.collector.estimator_ms
        try:
            self._decide()
        finally:
            self._charge_decision(overhead)
            # The open interval has no step yet: its time so far (a checkpoint's too) is the pause after the exception
            self._carried_ms = 0.0
            self._timer.start()
        # The interval's training was counted when its decision raised (_after_update)
        self.cadence.record(
            (self.collector.overhead_ms - overhead) - (self.collector.estimator_ms - rounds),
            0.0,
            0,
            cheap_ms=self.collector.cheap_ms - cheap,
        )

    @property
    def skipped_steps(self) -> int:
        """Updates skipped for a non-finite loss or gradient, counted at each decision and at ``close()``.

        Between decisions the open interval's are not counted yet (reading them would sync with the device);
        ``close()`` reads them, so after it the count is the run's. A checkpoint holds the decisions' count and the
        open interval, whose skips a resumed run counts at its next decision.
        """
        return self._skipped_counted + self._skipped_at_close

    @property
    def decision_count(self) -> int:
        """Decisions this controller has made since it was built, all of them (``decisions`` keeps the latest only).

        Not in a checkpoint, as the reports are not: after ``load_state_dict()`` it counts the decisions made since the
        controller was built, not the saved run's.
        """
        return self._decision_count

    # ------------------------------------------------------------------------- executor's Target

    @property
    def batch_size(self) -> int:
        """The batch size the next batch from ``loader()`` will have (a loaded checkpoint's before that call).

        Set between ``load_state_dict()`` and the next ``loader()`` call, it is the resumed run's: its first batch has
        this size and the LR gain moves as a change right after the resume moves it (a warm-up ramp included).
        """
        return self._resume["batch_size"] if self._resume is not None else self._batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"batch_size={value!r} must be a positive integer")
        resume = self._resume
        n = resume["loader"]["n"] if resume is not None else len(self._loader) if self._loader is not None else None
        if n is not None and value > n:  # as TrainingRun: never served, the LR followed
            raise ValueError(
                f"batch_size={value} is more than the {n} training samples: a step serves at most an epoch"
            )
        if resume is None and self._loader is None:  # the loader() call that starts the run sets its own batch
            raise ValueError(
                f"batch_size={value}: no run yet; pass batch_size to loader(), which starts the run at it (set here, "
                "it was overwritten there)"
            )
        if resume is not None:  # loaded, not yet carried on: the next loader() call restores the batch and the coupler
            # Both go into the pending resume (set here, the batch would be overwritten by it); the coupler moves from
            # the checkpoint's state, as the one that loader() call restores would move right after it.
            coupler = self._coupler_for(resume["base_batch_size"], resume["lr_coupler"])
            self.engine.batch_lr_gain = coupler.change(int(value), self._noise_scale)
            self._resume = {**resume, "batch_size": int(value), "lr_coupler": coupler.state_dict()}
            return
        self._batch_size = int(value)
        if self.lr_coupler is not None:
            self.engine.batch_lr_gain = self.lr_coupler.change(self._batch_size, self._noise_scale)

    @property
    def max_batch_size(self) -> int:
        """An eighth of the dataset (so an epoch has at least 8 steps), within the config's bound."""
        n = len(self._loader) if self._loader is not None else self.config.max_batch_size
        return max(1, min(self.config.max_batch_size, n // 8))

    @property
    def splits_batches(self) -> bool:
        """False: your loop's step is yours, so the executor keeps a precision change within the memory budget."""
        return False

    def predicted_memory_bytes(self, batch_size: int, precisions: Sequence[Precision] | None = None) -> int:
        """The memory model's peak at ``batch_size`` and ``precisions`` (None: the current ones), in bytes.

        0 before the first batch (nothing is known yet). On a GPU the model is fitted to what every step added
        above the bytes allocated after it, on top of those allocated at the last step; on a CPU it is the
        accounting.
        """
        if self.memory_model is None:
            return 0
        if precisions is not None:
            return self.memory_model.predict(batch_size, precisions)
        model = self.memory_model
        key = (model, model.revision, batch_size, type(batch_size), tuple(self.engine.precision.precisions))
        if self._predicted is None or self._predicted[0] != key:  # (the models compare by identity)
            self._predicted = (key, model.predict(batch_size, list(key[-1])))
        return self._predicted[1]

    @property
    def usable_memory_bytes(self) -> int:
        """The share of the budget a batch may be planned to fill: ``config.elastic.fill_frac`` × budget."""
        return int(self.config.elastic.fill_frac * self.memory_budget_bytes)

    @property
    def lr(self) -> float:
        """The LR the next update applies to the first param group.

        That group's own ``lr`` (yours, or your LR scheduler's, which keeps working) times the controller's
        multiplier (LR scale, batch gain: during a warm-up after a batch rise, the gain the next step moves to).
        After :meth:`close`, the group's own ``lr``: the optimizer is yours again, and applies no multiplier.
        """
        if self._closed:  # the multiplier's hooks are gone (otherwise this would still read x1.5 after a raise)
            return float(self.engine.optimizer.param_groups[0]["lr"])
        if self._resume is not None:  # loaded, not yet carried on: the coupler the next loader() call restores
            resume = self._resume
            gain: float | None = self._coupler_for(resume["base_batch_size"], resume["lr_coupler"]).next_gain()
        else:  # advanced at the step, before it
            gain = self.lr_coupler.next_gain() if self.lr_coupler is not None else None
        return self.engine.group_lrs(gain)[0]

    @property
    def progress(self) -> float:
        """The share of the run's training done, in [0, 1].

        Epochs served over the last ``loader()`` call's ``total_epochs`` (its ``epochs`` by default; they count from
        the run's start); 0 without a ``loader()``, whose budget is unknown. The observation's ``progress`` (the
        heuristic's late-run rules read it).
        """
        if self._loader is None or self._planned_epochs < 1:
            return 0.0
        return min(1.0, (self._loader.epoch + self._loader.epoch_progress) / self._planned_epochs)

    @property
    def precisions(self) -> list[Precision]:
        """Current per-layer precisions."""
        return list(self.engine.precision.precisions)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs beside the model's ``state_dict()`` to resume this run where it stopped.

        On a GPU the fused step keeps the optimizer's moments in its own buffers (``optimizer.state_dict()`` shows
        them too, in ``torch.optim``'s layout). The state holds the optimizer's and the loss scaler's state, each
        layer's precision, the LR multiplier, the batch size and its LR gain (warm-up included), where the loader
        stands in its epoch, the steps taken, the speed trial's outcome and which policy saved it (its name and the
        ``HeuristicConfig`` settings its 16-bit formats come from). Tensors are returned by reference, as
        ``torch.optim`` does: ``torch.save`` it, or copy it before training on. It also holds what the decisions
        depend on: the signals' running estimates, the layer groups, the decision cadence and the interval recorded
        so far (its statistics are copied from the device: one sync), so a resumed adaptive run decides as the
        uninterrupted one would have, at the same steps. (The clock is not saved: step times are measured afresh.)

        Example:
            >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
            >>> ctl = Controller(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), policy="bf16")
            >>> sorted(ctl.state_dict())[:4]
            ['base_batch_size', 'batch_size', 'engine', 'format']
        """
        # A step a Ctrl-C cut short after its update: what the next step would do first, its decision included, is
        # done now, so the checkpoint holds the uninterrupted run's state
        self._finish_step()
        if self._applied is not None:  # a decision cut short after its action went in: a resume would decide afresh
            self._decide_if_due()
        return {
            "format": _CHECKPOINT_FORMAT,
            "engine": self.engine.state_dict(),
            "steps": self.steps,
            "skipped_steps": self._skipped_counted,  # the open interval's are counted again at its decision
            "rollbacks": self.rollbacks,
            "rollbacks_in_a_row": self._rollbacks_in_a_row,
            **self._data_state(),
            "speed_trial": dict(self.speed_trial),
            "trial_running": self._trial is not None,
            "low_precision": _precision_code(getattr(self.policy, "low_precision", None)),
            "initial_precision": _precision_code(getattr(self.policy, "initial_precision", None)),
            "policy": dict(self._policy_identity),
            # What the policy carries between decisions (the heuristic's annealing by batch); None for a stateless one
            "policy_run_state": self.policy.run_state() if hasattr(self.policy, "run_state") else None,
            "signals": self._signals_state(),
        }

    def _check_ladder_holds(self, lr_scale: float) -> None:
        """Refuses a checkpoint's LR multiplier outside this controller's ladder (``config.lr_scales``).

        Every decision keeps the multiplier within the ladder it was saved under; one outside this one's (a run saved
        under ``preset("aggressive")``'s x2.0, loaded under the default's 0.5-1.5) would train above the top rung
        until decisions walk it back, one ``max_lr_change`` at a time.
        """
        low, high = min(self.config.lr_scales), max(self.config.lr_scales)
        if not low * (1 - 1e-6) <= lr_scale <= high * (1 + 1e-6):
            raise ValueError(
                f"the checkpoint's LR multiplier {lr_scale:.4g} is outside this controller's LR ladder "
                f"{list(self.config.lr_scales)}: resume with the config the run was saved with (its preset or "
                "lr_scales)"
            )

    def _data_state(self) -> dict[str, Any]:
        """The checkpoint's place in the data: batch sizes, the loader's state and the LR coupler's.

        A batch served and not yet stepped on (a checkpoint at the top of the loop body, or on a Ctrl-C in the
        forward) is saved as not served: the resumed run trains it, as this process's next loader() call would. A
        checkpoint loaded and not yet carried on by a loader() call is saved as it was loaded (saved again then, it
        lost the data's place and the batch size).
        """
        if self._resume is not None:
            resume = self._resume
            return {"batch_size": resume["batch_size"], "base_batch_size": resume["base_batch_size"],
                    "loader": dict(resume["loader"]), "lr_coupler": resume["lr_coupler"]}  # fmt: skip
        loader = self._loader.state_dict() if self._loader is not None else None
        taken = self._unstepped_samples()
        if loader is not None and taken:
            loader = {**loader, "cursor": loader["cursor"] - taken, "samples_served": loader["samples_served"] - taken}
        return {
            "batch_size": self._batch_size,
            "base_batch_size": self._base_batch_size,
            "loader": loader,
            "lr_coupler": self.lr_coupler.state_dict() if self.lr_coupler is not None else None,
        }

    def _signals_state(self) -> dict[str, Any]:
        """The decisions' inputs for a checkpoint: signal estimates, groups, cadence and the open interval."""
        moments = self._moments
        return {
            "collector": self.collector.state_dict(),
            "grouper": self.grouper.state_dict(),
            "cadence": self.cadence.state_dict(),
            "moments": None if moments is None else moments.state_dict(),
            "interval_steps": self._interval_steps,
            "interval_peak": self._interval_peak,
            "interval_applied": 0 if moments is None else self.engine.applied_steps() - self._applied_at_start,
            "interval_ms": self._carried_ms + self._timer.stop(),
            "noise_scale": self._noise_scale,
            "decision_due": self._decision_due,  # the closed interval's decision raised: the next step makes it
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resumes from ``state_dict()``'s output, into a controller built like the one that saved it.

        Load the model's weights first (``model.load_state_dict``), then this; the next ``loader()`` call, with the
        same dataset, ``batch_size`` and ``seed`` as before, carries on from the saved place in the saved epoch at
        the saved batch size, or one set between the two (its ``epochs`` counts from the run's start, the saved epochs
        included). A speed trial
        that had finished is not run again; one that was running starts over, or, where this controller runs none,
        ends: the layers start where its end puts them. On a GPU without bf16 (a V100 or T4) the checkpoint's bf16
        layers load in fp16, as the policy's bf16 moves there.

        Everything is checked before anything is loaded (the policy that saved it, the engine's state, each count, the
        loader's place, the LR coupler's state against this controller's LR rule, the LR multiplier against its LR
        ladder): a refused checkpoint leaves the controller, its engine, the optimizer and the loss scaler as they
        were. A checkpoint saved by another policy is refused: the precisions, LR multiplier and 16-bit formats it
        restores are that policy's (one saved before the policy was recorded loads unchecked). The dataset is
        checked at the next ``loader()`` call, the first to see it. A checkpoint of format 1 (an older one) holds no
        signals: they start afresh, as in the first interval of a run. With ``log_dir``, the points past the
        checkpoint's step that the run it replaces wrote there are dropped from TensorBoard's view (a purge mark, as
        ``SummaryWriter(purge_step=...)`` writes).

        Raises:
            ValueError: a state of another format, saved by another policy (or one built with another
                ``start_precision`` or ``use_fp16``), from another update path, optimizer or model (the engine's
                checks) or LR rule, or with a field of the wrong type or range (named); later, ``loader()`` with
                another dataset size, seed or ``batch_size`` than the saved run's.
            NoGoodStateError: with the shield on, the model (loaded first) holds NaN or infinite trained weights or
                buffers, which no rollback can repair.
        """
        self._check_open()  # closed, the optimizer is the user's again: a late load would rewind its state
        if not isinstance(state, Mapping):
            raise ValueError(f"a controller checkpoint is the dict Controller.state_dict() returned; got {type(state)}")
        version = state.get("format")
        if isinstance(version, bool) or version not in (1, _CHECKPOINT_FORMAT):
            raise ValueError(
                f"checkpoint format {version!r} is not this version's ({_CHECKPOINT_FORMAT}) or 1: "
                "pass the dict Controller.state_dict() returned"
            )
        keys = _CHECKPOINT_KEYS if version == _CHECKPOINT_FORMAT else _CHECKPOINT_KEYS[:-1]  # 1: no signals
        missing = [key for key in keys if key not in state]
        if missing:  # checked before anything is loaded: a refused checkpoint leaves the controller as it was
            raise ValueError(
                f"the checkpoint lacks {', '.join(missing)}: pass the dict Controller.state_dict() returned"
            )
        if "policy" in state:  # absent from a checkpoint saved before it was recorded: loaded as before
            self._check_same_policy(state["policy"])
        run_state = state.get("policy_run_state")  # absent from an older checkpoint: the policy's run starts afresh
        if hasattr(self.policy, "load_run_state"):
            self.policy.check_run_state(run_state)
        # Checked before anything is loaded: the engine's state first (another model or optimizer), then the rest.
        # On a GPU without bf16 (a V100 or T4) the layers a checkpoint holds in bf16 load in fp16, as construction
        # moves the policy's bf16 (run_without_bf16): otherwise the engine would refuse such a checkpoint.
        engine_state, bf16_moved = state["engine"], False
        if Precision.BF16 not in sixteen_bit_formats(self.device):
            engine_state, bf16_moved = _bf16_layers_in_fp16(engine_state)
        self.engine.check_state_dict(engine_state)
        self._check_ladder_holds(float(engine_state["lr_scale"]))
        if self.guard is not None:  # no rollback can repair a model loaded broken (it restored it at every interval)
            self._refuse_broken_model(
                ": its checkpoint was saved after a step broke them, before the rollback it would have brought; resume "
                "from an earlier checkpoint (load the model's weights before the controller's)"
            )
        steps, skipped, rollbacks = (_checked_count(state, key, 0) for key in ("steps", "skipped_steps", "rollbacks"))
        # A checkpoint saved before the bound on rollbacks in a row holds no count: none in a row
        in_a_row = _checked_count(state, "rollbacks_in_a_row", 0) if "rollbacks_in_a_row" in state else 0
        if skipped > steps:
            raise ValueError(f"the checkpoint's skipped_steps {skipped} is more than its steps {steps}")
        if in_a_row > rollbacks:
            raise ValueError(f"the checkpoint's rollbacks_in_a_row {in_a_row} is more than its rollbacks {rollbacks}")
        trial_running = state["trial_running"]
        if not isinstance(trial_running, bool):
            raise ValueError(f"the checkpoint's trial_running {trial_running!r} is not a bool")
        speed_trial = state["speed_trial"]
        if not isinstance(speed_trial, Mapping) or not all(
            isinstance(k, str) and isinstance(v, numbers.Real) and not isinstance(v, bool)
            for k, v in speed_trial.items()
        ):
            raise ValueError(f"the checkpoint's speed_trial {speed_trial!r} is not a dict of timings (name: number)")
        codes = {
            "low_precision": _checked_precision_code(state, "low_precision", low=True),
            "initial_precision": _checked_precision_code(state, "initial_precision"),
        }
        resume = self._checked_resume(state)
        signals = self._loaded_signals(state["signals"]) if version == _CHECKPOINT_FORMAT else None
        self.engine.load_state_dict(engine_state)
        if bf16_moved:
            _log.info("bf16 does not run on %s: the checkpoint's layers in bf16 run in fp16 instead", self.device)
        self.steps, self._skipped_counted, self.rollbacks = steps, skipped, rollbacks
        # Not in the checkpoint: a loaded scale still at 2**16 with no clean step has not begun its back-off; any
        # other is taken as at the saved run's level (one saved part-way through the back-off counts its rest).
        self._scale_search_left = _SCALE_SEARCH_SKIPS if self.engine.scale_untouched() else None
        self._rollbacks_in_a_row = in_a_row
        # A decision due is taken afresh, observation and all (_decide); format 1 holds none
        self._decision_due, self._observed, self._applied = signals is not None and signals.decision_due, None, None
        self._step_left = None  # a step cut short before the load is not the resumed run's
        self._micro_loss = None  # a batch begun before the load is not the resumed run's: nor are its gradients
        self.engine.zero_grad()
        if signals is None:  # format 1: the first step after the resume starts a new interval, with fresh signals
            self._moments, self._interval_steps, self._interval_peak, self._carried_ms = None, 0, 0, 0.0
            self._applied_before_copy = 0
            # Fresh as a new controller's: loaded into one that had trained, its estimates, groups and cadence would
            # stay otherwise
            self.collector = self._new_collector()
            self.grouper = self.executor.grouper = LayerGrouper(
                self.collector.controllable, self.config.n_groups, param_counts=self.engine.layer_param_counts
            )
            self.cadence, self._noise_scale = self._new_cadence(), None
        else:
            self.collector, self.grouper, self.cadence, self._moments = signals.objects
            self.executor.grouper = self.grouper
            self._interval_steps, self._interval_peak = signals.interval_steps, signals.interval_peak
            self._applied_at_start = self.engine.applied_steps() - signals.interval_applied
            self._applied_before_copy = signals.interval_applied  # the resume's copy is confirmed by a later update
            self._carried_ms, self._noise_scale = signals.interval_ms, signals.noise_scale
        self._timer.start()
        if hasattr(self.policy, "load_run_state"):
            self.policy.load_run_state(run_state)
        # The checkpoint's policy formats: after its trial, the one chosen; during it, those the trial started from.
        for name, code in codes.items():
            if code is not None and hasattr(self.policy, name):
                setattr(self.policy, name, code)
        # As at construction: a checkpoint saved where bf16 runs would bring bf16 back into the policy on a GPU without
        # it, and every lowering after the resume would run in fp32.
        if Precision.BF16 not in sixteen_bit_formats(self.device) and run_without_bf16(self.policy):
            _log.info("bf16 does not run on %s: the checkpoint's policy starts and lowers to fp16 instead", self.device)
        self.speed_trial = {name: float(ms) for name, ms in speed_trial.items()}
        if not trial_running:
            self._trial = None  # done before the checkpoint (or never wanted): not run again
        elif self._trial_plan is not None:
            # The trial starts over from its first format, with no timings: otherwise the controller that saved the
            # state would carry its own trial on (its format and the timings taken after the checkpoint), or, its
            # trial ended since, never run one again and keep the format chosen after the checkpoint.
            self._start_trial()
        else:
            # No trial here (a GPU checkpoint resumed on the CPU, say): the layers go where the trial's end puts them.
            # Left in the trial's candidate format, they would stay there the whole run.
            start = getattr(self.policy, "initial_precision", None)
            self._set_uniform(Precision.FP32 if start is None else start)
            if self._interval_steps:  # the trial's steps so far: no decision reads them, as at a trial's end
                self._skipped_counted += self._interval_steps - (self.engine.applied_steps() - self._applied_at_start)
                self.cadence.add_training(self._carried_ms)
                self._moments, self._interval_steps, self._interval_peak, self._carried_ms = None, 0, 0, 0.0
                self._applied_before_copy = 0
        self._resume = resume
        self._unstepped = None  # the checkpoint's loader state is where the run goes on from
        if resume is None:  # saved before any loader() call: the next one starts the data afresh, as the run did
            self._loader, self._loader_key, self.lr_coupler = None, None, None
            self._base_batch_size = self._batch_size = self._last_batch = self._planned_epochs = 0
        if self.guard is not None:  # a rollback must not go back past the resume (the model is loaded by now)
            # Unconfirmed, as a copy taken at a change: the first interval that applies an update confirms it, the
            # first failure restores it once, and a second one raises (NoGoodStateError): the checkpoint may be of a
            # state an update broke before the rollback it would have brought (taken as good, it was restored at
            # every rollback, the resumed run non-finite to its end).
            self.guard.resume()
            self.guard.rollbacks = rollbacks  # its warning numbers them on from the checkpoint's (from 1 again before)
            self._copy_taken = ("resume", self._state_mark())
            self._copy_opens_interval = self._change_copy = True
            self._reopened_copy = False
        self._state_loads += 1  # an open loader() iterator stops: its place in the data is not the checkpoint's
        if self._writer is not None:
            self._purge_curves_after(self.steps)

    def _check_same_policy(self, saved: object) -> None:
        """Refuses a checkpoint saved by another policy than this controller's, or by one built with other formats.

        The load restores the checkpoint's precisions and LR multiplier and writes its 16-bit formats into this
        policy: unchecked, a heuristic run's checkpoint loaded into a static fp32 controller would train in bf16 until
        its first decision, and one saved under ``use_fp16=False`` would lower to bf16 in a controller built with
        ``use_fp16=True``, both silently. Learned policies are one kind, ``learned`` (see :func:`_policy_identity`).
        """
        if not isinstance(saved, Mapping) or not isinstance(saved.get("name"), str):
            raise ValueError(
                f"the checkpoint's policy {saved!r} is not a dict naming the policy that saved it: pass the dict "
                "Controller.state_dict() returned"
            )
        own = self._policy_identity
        saved_name, own_name = saved["name"], own["name"]
        if saved_name == "pretrained" or saved_name.startswith("learned:"):  # recorded so for a few commits: one kind
            saved_name = _LEARNED
        if saved_name != own_name:
            raise ValueError(
                f"the checkpoint's policy is {saved_name!r}; this controller's is {own_name!r}: the layers' "
                "precisions, LR multiplier and 16-bit formats it restores are the other policy's. Build the "
                f"Controller with {_policy_argument(saved_name)} to resume this checkpoint"
            )
        # Compared where both sides know them: a policy object with no config of its own records none.
        differing = [key for key in _POLICY_SETTINGS if key in saved and key in own and saved[key] != own[key]]
        if differing:
            saved_settings = ", ".join(f"{key}={saved.get(key)!r}" for key in _POLICY_SETTINGS)
            own_settings = ", ".join(f"{key}={own[key]!r}" for key in _POLICY_SETTINGS)
            wanted = ", ".join(f"{key}={saved[key]!r}" for key in differing)
            raise ValueError(
                f"the checkpoint's policy {saved_name!r} was built with {saved_settings}; this controller's with "
                f"{own_settings}: the load would give it the checkpoint's 16-bit formats, not its config's. Build the "
                f"Controller with {_policy_argument(saved_name)} and "
                f"config=ControllerConfig(heuristic=HeuristicConfig({wanted})) to resume this checkpoint"
            )

    def _purge_curves_after(self, step: int) -> None:
        """Marks the TensorBoard run so that TensorBoard drops the points written before the mark past ``step``.

        Resumed into the ``log_dir`` of the run that saved the checkpoint, that run's points past the checkpoint belong
        to the run this one replaces: left, they would stand among the new ones (``train/loss`` at 6, 8, then 6 and 8
        again). The mark is the one ``SummaryWriter(purge_step=step + 1)`` writes (as ``rl``'s resume does), a
        ``SessionLog.START`` event at ``step + 1``: TensorBoard's ``EventAccumulator`` drops every point read before it
        at ``step + 1`` or later. Nothing is deleted from the event files.
        """
        purge_tensorboard_after(self._writer._get_file_writer(), step)
        self._precision_map.forget()  # its last map written may be among the points dropped: written again

    def _loaded_signals(self, state: object) -> _LoadedSignals:
        """New signal objects loaded from a checkpoint's ``signals`` entry, checked whole (ours are not touched)."""
        saved = SavedState(state, "the checkpoint's signals", _SIGNALS_KEYS)
        collector = self._new_collector()
        collector.load_state_dict(saved["collector"])
        if collector.source is None and collector.has_round_estimates:
            # Kept, the last round's estimates would pose as current for the rest of the run, which runs no round.
            collector.forget_rounds()
            _log.info(
                "the checkpoint's estimator-round signals are dropped: this controller has no probe batch to go on "
                "measuring them (pass probe= and loss_fn= as the run that saved it did)"
            )
        grouper = LayerGrouper(
            self.collector.controllable, self.config.n_groups, param_counts=self.engine.layer_param_counts
        )
        grouper.load_state_dict(saved["grouper"])
        cadence = self._new_cadence()
        cadence.load_state_dict(saved["cadence"])
        moments = None
        if saved.optional("moments"):
            moments = DeviceMoments(self.engine.layer_params, budget_frac=self.observe_budget_frac)
            moments.load_state_dict(saved["moments"])
        interval_steps = saved.count("interval_steps")
        interval_applied = saved.count("interval_applied")
        if interval_applied > interval_steps:
            raise ValueError(
                f"the checkpoint's signals have interval_applied {interval_applied} > interval_steps {interval_steps}"
            )
        noise_scale = saved.real("noise_scale", least=0.0) if saved.optional("noise_scale") else None
        decision_due = saved["decision_due"] if "decision_due" in saved.state else False  # absent: saved before it
        if not isinstance(decision_due, bool):
            raise ValueError(f"the checkpoint's signals have decision_due {decision_due!r}, not a bool")
        if decision_due and interval_steps:  # made before the next step counts
            raise ValueError(
                f"the checkpoint's signals have a decision due and interval_steps {interval_steps}: none is due once "
                "the next interval has steps"
            )
        return _LoadedSignals(
            (collector, grouper, cadence, moments),
            interval_steps,
            saved.count("interval_peak"),
            interval_applied,
            saved.real("interval_ms", least=0.0),
            noise_scale,
            decision_due,
        )

    def _new_collector(self) -> SignalCollector:
        """A collector over the engine's layers, running its rounds on the probe batch (``probe=``) if any."""
        config, engine = self.config, self.engine
        collector = SignalCollector(
            engine.layers, config.ema_decay, self.memory_budget_bytes, config.signals, engine.layer_param_counts
        )
        if self._estimator_source is not None:
            collector.attach(self._estimator_source)
        return collector

    def _stop_rounds(self, reason: str) -> None:
        """No more rounds in this run, their estimates dropped (kept, they would pose as current); logged (warning)."""
        _log.warning("%s; the curvature and gradient-noise signals are the cheap estimates from now on", reason)
        self._estimator_source = self.collector.source = None
        self.collector.forget_rounds()

    def _run_round(self) -> None:
        """An estimator round on the probe batch, when one is due, before the snapshot reads the rounds.

        None without a probe batch or with ``config.signals.mode`` other than ``"all"``. The progress is the loader's
        (unknown without one: the first round then runs whatever it costs, and later ones fit the overhead budget).
        """
        if self.collector.source is None:
            return
        out_of_memory = False
        try:
            # In fp32, the hooks idle: a ctl.step(loss) inside `with ctl.autocast():` has the context open here
            with self.engine.precision.suspended():
                ran = self.collector.maybe_estimate(progress=self.progress or None)
        except RuntimeError as error:
            if not is_out_of_memory(error):
                raise
            out_of_memory = True  # handled below, once the traceback's frames (the round's tensors) are released
        if out_of_memory:
            # Raised out of step() after its update, it lost that decision, and every later one lost its own again.
            release_memory(self.device)
            self._stop_rounds(
                "an estimator round ran out of memory on the probe batch: the rounds stop for this run (pass a "
                "smaller probe batch, or a smaller SignalConfig.micro_batch_size and hutchinson_batch_size)"
            )
            return
        if ran is not None and self._copied_at_close and self.guard is not None:
            # The copy the shield took at this interval's end is of the weights the round measured: a rollback to it
            # brings this round's estimates back, not the ones before it (as DecisionLoop does).
            self.guard.refresh_extra()

    def _probe_loss(self) -> float:
        """The loss on the probe batch now, as ``TrainingRun.probe_loss`` reads it (without one: the smoothed loss).

        Run as the run's probe is in ``compare`` and ``TriAccel-v0``, whose observations the learned policy was trained
        on: no gradients, in the layers' precisions on a GPU (fp32 on a CPU, where 16-bit autocast is slow), the
        modules' own modes with batch-norm statistics frozen and dropout held (``frozen_batch_stats``), on a fork of
        the random streams. The smoothed training loss, read without a probe batch, has a noisier trend (augmented
        batches, a moving model).
        """
        if self._probe is None:
            return self.collector.loss_ema
        inputs, targets, loss_fn = self._probe
        precision = self.engine.precision
        # Inside ``with ctl.autocast():`` too (a ctl.step there): a nested context gives the outer one back its state
        region = precision.context() if self.device.type == "cuda" else precision.suspended()
        out_of_memory = False
        try:
            with (
                torch.no_grad(),
                forked_rngs(self.device),
                frozen_batch_stats(self.model, keep_modes=True),
                region,
            ):
                return float(loss_fn(float_outputs(self.model(inputs)), targets))
        except RuntimeError as error:
            if not is_out_of_memory(error):
                raise
            out_of_memory = True  # handled below, once the traceback's frames (the forward's tensors) are released
        assert out_of_memory
        release_memory(self.device)
        self._probe = None
        _log.warning(
            "the probe batch's loss ran out of memory: the decisions read the smoothed training loss for it from now "
            "on (pass a smaller probe batch)"
        )
        return self.collector.loss_ema

    def _new_cadence(self) -> Cadence:
        signals = self.config.signals
        return Cadence(
            self.config.interval_steps,
            self.config.max_interval_factor,
            (1.0 - signals.expensive_share) * signals.budget_frac,
            # Under DDP, not stretched: each process times its own decisions, and intervals of other lengths would
            # put the shield's collective (any_ranks) at other steps in each, beside DDP's own.
            adaptive=self.device.type == "cuda" and self.config.cost_mode is CostMode.MEASURED and world_size() == 1,
            cheap_share=signals.cheap_budget_frac,
        )

    def close(self) -> None:
        """Flushes the TensorBoard writer and removes the precision hooks (leaving a ``with`` block calls it).

        The optimizer is yours again, holding the final state; the controller refuses further steps. Closing twice
        is harmless.

        A batch left part-way (:meth:`backward` on its first micro-batches, no :meth:`step`: a ``break``, an
        exception, the end of the data) keeps its gradients in ``.grad`` for a loop that goes on, in the loss's own
        units: under fp16 they are divided by the loss scale they were computed with, as ``GradScaler.unscale_``
        divides them. Ones that overflowed stay inf or NaN, for that loop to see (a ``GradScaler``'s step would skip
        them). ``optimizer.zero_grad()`` drops the batch.
        """
        if self._closed:
            return
        if self._earlier_micro_loss() is not None:  # else none pending, or the loop reset them (zero_grad) since
            self.engine.unscale_pending_grads()
        if self._interval_steps:  # the open interval's skipped updates, which no decision will count now
            self._skipped_at_close = self._interval_steps - (self.engine.applied_steps() - self._applied_at_start)
        if self._writer is not None:
            self._writer.close()
        self.engine.remove()
        self._zero_grads.remove()
        self._closed = True
        _open_controllers.discard(self)

    def __enter__(self) -> Controller:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        """One line without tensors: the policy, the steps and decisions made, open or closed, the device.

        Read from ``__dict__``: a Controller whose construction raised part-way (one a traceback shows) lacks some
        attributes, and a repr that raised would hide the error being shown.
        """
        attributes = self.__dict__
        policy = attributes.get("_policy_identity", {}).get("name", "?")
        if attributes.get("_closed"):
            status = "closed"
        elif self in _open_controllers:
            status = "open"
        else:
            status = "not built"  # its construction raised (or is running)
        return (
            f"<{type(self).__name__} policy={policy!r} steps={attributes.get('steps', 0)} "
            f"decisions={attributes.get('_decision_count', 0)} {status} device={attributes.get('device', '?')}>"
        )

    # ------------------------------------------------------------------------------------ private

    def _attach_loader(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, epochs: int, seed: int) -> None:
        """Carries the run's loader on (the same data's shapes and seed) or starts one, for ``loader()``."""
        # The run's data by shape and seed, not by address: a loop that moves its data each epoch (x.to("cuda")) makes
        # new tensors of the same data, and must carry on, not train again from epoch 0.
        key = (tuple(x.shape), tuple(y.shape), x.dtype, y.dtype, seed)
        if self._resume is not None:  # refused before the checkpoint's place is consumed
            place = self._resume["loader"]
            done = _epochs_done(place["epoch"], place["cursor"], place["n"])
            if done >= epochs:
                raise ValueError(
                    f"loader(epochs={epochs}): the checkpoint's run has trained {done} epochs of its dataset already; "
                    f"epochs counts from the run's start, so pass epochs={done + 1} for one more"
                )
        if (
            self._loader is not None
            and self._resume is None
            and self._loader_key is not None
            and key[:-1] == self._loader_key[:-1]
            and seed != self._loader_key[-1]
        ):  # the same data with another seed (a seed an epoch) started the run over, silently: 6 epochs for 3
            raise ValueError(
                f"loader(seed={seed!r}) carries on a run that started with seed={self._loader_key[-1]!r}: pass that "
                "(each epoch's order comes from it and the epoch); for a new run on this data, build a new Controller"
            )
        # Everything that can refuse the call (a bad argument, data that cannot be moved to the device) runs on
        # locals first: a refused call leaves the run as it was. Otherwise one on another dataset (a bad seed) would
        # forget the batch the loop broke out on, never trained then.
        if self._loader is not None and self._resume is None and key == self._loader_key:  # the same run, on
            taken = self._unstepped_samples()
            if batch_size != self._base_batch_size:
                raise ValueError(
                    f"loader(batch_size={batch_size}) carries on a run that started at batch_size="
                    f"{self._base_batch_size}: pass that (the batch size the policy chose since is kept by itself)"
                )
            done = _epochs_done(self._loader.epoch, self._loader.cursor - taken, len(self._loader.x))
            if done >= epochs:  # a loop left after an epoch's last step sits at its end, not at the next epoch's start
                raise ValueError(
                    f"loader(epochs={epochs}): the run has trained {done} epochs of this dataset "
                    f"already; epochs counts from the run's start, so pass epochs={done + 1} for one more"
                )
            moved = None
            if (x.data_ptr(), y.data_ptr()) != self._loader_source:  # the same shapes, other tensors
                moved = x.to(self.device), y.to(self.device)
            if taken:
                # The last batch served was never stepped on (the loop raised or broke out before step()): it is
                # served again, as the first of this call, so no sample of the epoch goes untrained.
                _log.info("the last batch served (%d samples) was not trained on: served again", taken)
                self._loader.take_back(taken)
                # Served again whole: gradients its first micro-batches left (ctl.backward(), then an error in the
                # next one's forward) would go into its update twice.
                self.engine.zero_grad()
                self._micro_loss = None
            self._unstepped = None
            if moved is not None:
                self._loader.x, self._loader.y = moved
        else:
            loader = ElasticLoader(x.to(self.device), y.to(self.device), seed=seed)
            coupler = self._coupler_for(batch_size, None)
            grown = batch_size  # the batch size the run goes on at: the checkpoint's, after a resume
            if self._resume is not None:  # load_state_dict() came first: carry on where the checkpoint was taken
                grown = self._resume_loader(self._resume, batch_size, loader, coupler)
            sample = (tuple(x.shape[1:]), x.dtype)
            measured = None
            if sample != self._costs_input:
                # Samples of another shape or dtype (a new run, or a resume onto other data than this controller
                # measured) are measured again, and the budget checked against them, before the run is theirs: a
                # refusal leaves the run on its data. Otherwise the old data's activations would stay, unchecked, and
                # the budget, checked at the first batch, would leave a refused call's data in the run's place.
                measured = self._measured_memory(loader.x)
            if self._loader is not None and self._loader.samples_served and self._resume is None:
                _log.warning(
                    "loader() on another dataset (%s) starts a new run of the data from epoch 0; the run's data was "
                    "at epoch %d, sample %d. loader() serves the training data: iterate evaluation data yourself",
                    f"{tuple(x.shape)} inputs",
                    self._loader.epoch,
                    self._loader.cursor,
                )
            if measured is not None:
                (self.costs, self.memory_model), self._costs_input = measured, sample
            self._unstepped = None
            self._loader, self._loader_key, self._base_batch_size, self.lr_coupler = loader, key, batch_size, coupler
            # Not through the setter, which would write the base batch into a pending resume: the coupler's gain.
            self._batch_size, self.engine.batch_lr_gain = grown, coupler.gain
            self._resume = None
        self._loader_source = (x.data_ptr(), y.data_ptr())

    def _unstepped_samples(self) -> int:
        """Samples of the last batch served that no step has trained on yet: 0, or the batch's size."""
        if self._loader is None or self._unstepped is None or self._unstepped[0] != self.steps:
            return 0
        return self._loader.samples_served - self._unstepped[1]

    def _checked_resume(self, state: Mapping[str, Any]) -> dict[str, Any] | None:
        """The checkpoint's place in the data for the next ``loader()`` call, each part checked.

        None: saved before any ``loader()`` call, no place to carry on from.
        """
        if state["loader"] is None:
            for key in ("batch_size", "base_batch_size"):  # 0 until a loader() call sets them
                _checked_count(state, key, 0)
            return None
        base, batch = _checked_count(state, "base_batch_size", 1), _checked_count(state, "batch_size", 1)
        loader = ElasticLoader.check_state(state["loader"])
        for key, value in (("base_batch_size", base), ("batch_size", batch)):
            if value > loader["n"]:  # the batch_size setter's rule
                raise ValueError(f"the checkpoint's {key} {value} is more than its dataset's {loader['n']} samples")
        coupler = state["lr_coupler"]
        self._coupler_for(base, coupler)  # loaded into a coupler like the one loader() will build, to check it
        return {"loader": loader, "lr_coupler": coupler, "batch_size": batch, "base_batch_size": base}

    def _coupler_for(self, base_batch_size: int, state: Mapping[str, Any] | None) -> BatchLRCoupler:
        """A coupler as ``loader()`` builds it for a run of ``base_batch_size``, with a checkpoint's ``state`` in it."""
        elastic = self.config.elastic
        coupler = BatchLRCoupler(
            self.lr_rule, base_batch_size, base_batch_size, elastic.warmup_above, elastic.warmup_steps
        )
        if state is not None:
            coupler.load_state_dict(state)
        return coupler

    def _resume_loader(
        self, saved: Mapping[str, Any], batch_size: int, loader: ElasticLoader, coupler: BatchLRCoupler
    ) -> int:
        """Puts a new ``loader`` and its LR ``coupler`` where the checkpoint had them; returns its batch size.

        Both are ``loader()``'s locals, not yet the run's: a refused resume (another base batch size, or a dataset of
        another size or seed) changes nothing of the run.
        """
        if batch_size != int(saved["base_batch_size"]):
            raise ValueError(
                f"loader(batch_size={batch_size}) after a resume; the checkpoint's run started at batch_size="
                f"{saved['base_batch_size']}: pass that, the batch size it grew or shrank to is restored by itself"
            )
        loader.load_state_dict(saved["loader"])
        if saved["lr_coupler"] is not None:
            coupler.load_state_dict(saved["lr_coupler"])
        return int(saved["batch_size"])  # the coupler already holds its gain at this batch

    def _say_own_batches(self) -> None:
        """Says, once, what a loop serving its own batches (no ``loader()``) turns off, where the policy could use it.

        Without the loader the controller knows neither the batch nor the run's length: batch moves, the memory
        model (so the budget's checks: a precision change is never refused for memory) and the rules that read
        ``progress`` (annealing, the batch ramp) are off.
        """
        static = getattr(self.policy, "initial_action", None) is not None
        (_log.info if static else _log.warning)(
            "this loop serves its own batches (no ctl.loader()): batch moves and the memory budget's checks are off, "
            "and progress reads 0, so the rules that wait for a share of the run (annealing after anneal_after, the "
            "batch ramp) never start; serve the batches through ctl.loader() to have them"
        )

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(
                "this controller is closed: its precision hooks are gone and the optimizer is yours again. Train on "
                "with your own loop, or build a new Controller"
            )

    def _measured_memory(self, x: torch.Tensor) -> tuple[CostModel, MemoryModel]:
        """The costs and memory model of a run on samples like ``x``'s, for ``loader()`` to adopt.

        Raises:
            ConfigError: the memory budget cannot hold the model and one such sample.
        """
        costs = self._measure_costs(x)
        memory_model = MemoryModel(costs, self.profile)
        precisions = self.precisions
        check_budget(self.memory_budget_bytes, memory_model.predict(0, precisions), memory_model.predict(1, precisions))
        return costs, memory_model

    def _measure_costs(self, x: torch.Tensor) -> CostModel:
        """The per-layer costs from one forward of ``x[:1]``, or, where the model cannot run that, parameters only."""
        try:
            return CostModel.measure(self.model, self.engine.layers, x[:1], _optimizer_states(self))
        except Exception as error:  # the user's own forward, on one sample alone: whatever it raises, training goes on
            _log.warning(
                "the controller measures each layer's costs with one forward of one sample, model(x[:1]), which "
                "raised %s: %s. Memory is predicted from the parameters and optimizer state alone%s",
                type(error).__name__,
                error,
                ", until the steps' measured peaks replace it" if self.device.type == "cuda" else "",
            )
            owned = [sum(p.numel() for p in params) for params in self.engine.layer_params]
            costs = CostModel.parameters_only(self.engine.layers, _optimizer_states(self), owned)
            model = self.model
            return replace(costs, frozen_bytes=frozen_parameter_bytes(model), buffer_bytes=buffer_bytes(model))

    def _start_trial(self) -> None:
        """Starts the speed trial this controller plans (from its first format, with no timings)."""
        assert self._trial_plan is not None
        formats, steps = self._trial_plan
        self._trial = _SpeedTrial(formats, steps, IntervalTimer(self.device))
        self._set_uniform(self._trial.candidate)

    def _set_uniform(self, precision: Precision) -> None:
        self.engine.set_precisions([precision] * len(self.engine.precision.controllable_indices))

    def _advance_trial(self, trial: _SpeedTrial, loss: torch.Tensor) -> None:
        """Counts a step of the speed trial (its ``loss``); switches candidate, or ends the trial with the choice."""
        trial.steps_done += 1
        if trial.steps_done == trial.warmup_steps:  # a new format's first steps pay its one-time costs
            trial.timer.start()
        if trial.steps_done < trial.warmup_steps + trial.steps:
            return
        trial.step_ms[trial.candidate] = trial.timer.stop() / trial.steps  # one sync per candidate
        trial.index += 1
        trial.steps_done = 0
        if trial.index < len(trial.candidates):
            self._set_uniform(trial.candidate)
            return
        # Before the chosen format is set: the shield reads fp16's skips at finite losses as its loss scale backing off
        self._close_trial_interval(loss)
        chosen = self.policy.choose_low_precision(trial.step_ms)
        start = self.policy.initial_precision  # None: the model's own, fp32 (a LearnedPolicy not made by make_policy)
        self._set_uniform(Precision.FP32 if start is None else start)
        self.speed_trial = {precision.name.lower(): ms for precision, ms in trial.step_ms.items()}
        self.speed_trial["chosen"] = float(chosen)
        self._trial = None
        _log.info(
            "speed trial: %s; lowering to %s from now on",
            ", ".join(f"{p.name.lower()} {ms:.2f} ms a step" for p, ms in trial.step_ms.items()),
            chosen.name.lower(),
        )

    def _close_trial_interval(self, last_loss: torch.Tensor) -> None:
        """Closes the speed trial's interval with no decision: the first decision comes a whole interval after it.

        No decision reads the trial's steps: its fp16 candidate's, skipped while the loss scale backs off from 2**16,
        read as overflows of the format chosen, and cut the LR of a run that kept bf16 (or moved a run that chose
        fp16 back to bf16). The shield judges them as any interval's and ``skipped_steps`` counts their skips; the
        signals' running estimates keep them (real training), and the cadence their time, as
        ``DecisionLoop.discard_interval`` does in ``compare``.
        """
        overhead = self.collector.overhead_ms
        train_ms = self._close_interval(last_loss, self._new_closing())  # one sync, as the trial's timer's at its end
        self.collector.discard_interval()
        # Its wall time from the interval's end (the moments read, the shield) is the controller's, as a decision's.
        uncharged = (time.perf_counter() - self._decision_start) * 1e3 - (self.collector.overhead_ms - overhead)
        self.collector.add_overhead(max(uncharged, 0.0))
        self.cadence.add_training(train_ms)
        self._timer.start()

    def _close_interval(self, last_loss: torch.Tensor, closing: _Closing) -> float:
        """Reads the interval's device sums (the one sync), feeds them to the collector; returns its train ms.

        ``last_loss`` is the interval's last step's: read beside the sums, it says whether the losses were finite where
        the sampled rows say nothing (on a GPU a fast model may record no row in an interval).

        ``closing`` keeps how far it got: called again with it after a Ctrl-C, it goes on from there, each part once.
        The interval ends with its fold into the signals, its steps counted as applied or skipped there; the shield
        runs after, from the flags it found at the first try. An error (not an interruption) before the fold ends the
        interval unfolded: kept, its steps would be one more than the updates counted at every later end, refused
        there for good.
        """
        assert self._moments is not None
        if closing.train_ms is None:
            closing.train_ms, self._carried_ms = self._timer.stop() + self._carried_ms, 0.0
            self._decision_start = time.perf_counter()  # the device is idle: what follows is the decision's
        try:
            if closing.moments is None:
                closing.moments = self._moments.flush()
            moments = closing.moments
            self._recorded_ms = moments.recorded_ms
            if closing.applied is None:
                applied_now = self.engine.applied_steps()  # a sync like the flush's, now free: the device is idle
                applied = applied_now - self._applied_at_start
                skipped = self._interval_steps - applied
                searching = self._scale_searching(skipped)
                # Folded in before the shield: a copy it takes carries the estimates of its own state, and a restore
                # drops this interval's (the counts and times stay: the overflow rate is the interval's).
                self.collector.observe_interval(
                    moments,
                    n_steps=self._interval_steps,
                    train_ms=closing.train_ms,
                    peak_bytes=self._interval_peak,
                    skipped=skipped - searching,
                )
                # One assignment: the interval ends with the fold, never part of it
                closing.applied, closing.applied_now, closing.steps, self._skipped_counted, self._scale_search_left = (
                    applied,
                    applied_now,
                    self._interval_steps,
                    self._skipped_counted + skipped,
                    self._scale_search_after(applied, searching),
                )
                self._interval_steps = self._interval_peak = 0
        except Exception:
            self._interval_steps = self._interval_peak = 0
            self._applied_at_start = self.engine.applied_steps()
            raise
        self._interval_steps = self._interval_peak = 0  # (ended at the fold: again, where a Ctrl-C came between)
        if closing.restored is None:
            # As the first try found them: one cut short may have taken them
            self._copy_opens_interval, self._change_copy, self._reopened_copy, self._applied_before_copy = (
                closing.shield_flags
            )
            try:
                # Every recorded loss finite, the last step's too: steps skipped for their gradients alone (fp16's loss
                # scale overflowing). With no update the weights were the same at every step, so where no row was
                # recorded (on a GPU a sampled row may come less than once an interval) the last loss speaks for them
                # all.
                losses_finite = moments.n_finite_loss == moments.n_recorded and bool(
                    torch.isfinite(last_loss.detach()).all()
                )
                closing.restored = self._shield(closing.applied, closing.steps, losses_finite)
            except Exception:  # a NoGoodStateError may follow a restore: the count read again, as after one
                self._applied_at_start = self.engine.applied_steps()
                raise
        # A restore resets the count
        self._applied_at_start = self.engine.applied_steps() if closing.restored else closing.applied_now
        return closing.train_ms

    def _shield(self, applied: int, steps: int, losses_finite: bool = False) -> bool:
        """The rollback shield at an interval's end, from the updates ``applied`` of its ``steps``; True if restored.

        An interval whose every update was applied (every step finite) is healthy: the copy is refreshed (every
        ``config.snapshot_every`` healthy intervals). One with no update at all restores the copy, and so does one
        that left a buffer non-finite (a skipped step's forward wrote a batch-norm's running statistics: the model
        would evaluate to NaN from then on). Otherwise a mixed one does neither: its non-finite steps were skipped,
        and the model may be turning, so it is not copied (but for a change decided at its end: ``_decide`` copies
        it, unconfirmed, where its weights are finite).

        Under fp16, an interval with no update whose losses were all finite (``losses_finite``) is the loss scale
        backing off from too high, as ``GradScaler``'s first steps do, not a divergence: nothing is restored, and the
        scale stays where it fell. A rollback there would put the copy's scale back: where the scale needed more
        halvings than an interval has steps, every fp16 interval would be skipped whole, to the end of the run.

        A copy is of the state after the interval's last update, whose loss no step has computed yet: it becomes the
        one restored once the next interval proves it, by applying an update (skipped steps leave the weights as they
        were, so the first update that went in had a finite loss on the copy's). A copy taken after an update that
        blew the model up was otherwise restored at every rollback, each interval after it non-finite again. An
        interval that broke a buffer but applied updates confirms its copy too (the copy's weights gave finite losses;
        its buffers are from before the break), so that copy, the change's included, is what it restores. A resume's
        copy is treated as a change's, counting only the updates after it (a checkpoint may be saved mid-interval);
        failing again from it with no confirmed copy left raises ``NoGoodStateError``.

        A run of rollbacks ends at a healthy interval, or where a copy newer than the last one restored is confirmed
        (the run moved on between its failures). A failure after ``config.max_rollbacks_in_a_row`` of them raises
        ``NoGoodStateError`` instead of another rollback: the restored state itself keeps failing (an update from it
        that overflows, huge optimizer moments), and each rollback brought it back, the run neither training nor
        stopping. The last confirmed state is restored before the error (not counted in ``rollbacks``; a change's copy,
        which may never have trained, is not), so a caller who catches it holds a state that gave finite losses.
        """
        self._interval_healthy = self._interval_mixed = self._copied_at_close = False
        began_from_copy, self._copy_opens_interval = self._copy_opens_interval, False
        change_copy, self._change_copy = self._change_copy and began_from_copy, False
        reopened, self._reopened_copy = self._reopened_copy and began_from_copy, False
        before_copy, self._applied_before_copy = self._applied_before_copy, 0
        if self.guard is None or steps == 0:
            return False
        broken = self._broken_buffers()  # a sync like the interval's flush, with the device idle
        # Under DDP the processes judge together (the updates applied are the same in each: the skips are agreed at
        # every step), so that all restore where one must and the replicas stay equal: one collective for both flags.
        any_broken, any_loss_nonfinite = any_ranks([bool(broken), not losses_finite], self.device)
        self._interval_healthy = applied == steps and not any_broken
        if self._interval_healthy:
            self._rollbacks_in_a_row = 0
        # The first update after the copy had a finite loss on the copy's weights.
        if began_from_copy and applied > before_copy:
            self.guard.confirm()
            if not reopened:  # a state newer than the one restored has trained: the run is moving, not stuck
                self._rollbacks_in_a_row = 0
        overflowed = not any_broken and self.engine.precision.needs_grad_scaler and not any_loss_nonfinite
        if applied == before_copy and overflowed:  # the weights are the copy's: they overflowed at this scale
            _log.info(
                "no update in the interval: fp16 gradients overflowed at finite losses; the loss scale backs off to %g "
                "(no rollback)",
                self.engine.loss_scale,
            )
            # As if the interval had not been: the next begins from the same copy, which no update has confirmed
            self._copy_opens_interval, self._change_copy = began_from_copy, change_copy
            self._reopened_copy = reopened
            return False
        if any_broken or applied == before_copy:  # no update since the copy the interval began from (0 unless resumed)
            # The first failure after a change goes back to the change (the change, not the state, may be what failed:
            # a decision follows, which may take it back), once: failing again from it, to the last confirmed state.
            reason = (
                f"non-finite values in buffers {broken[:3]}"
                if broken
                else "non-finite values in another process's buffers"
                if any_broken
                else "non-finite gradients at finite losses"
                if losses_finite
                else "non-finite loss"
            )
            if not change_copy and not self.guard.has_confirmed:  # only a resume's copy, which failed again from itself
                raise NoGoodStateError(
                    f"{reason} in two intervals after the resume, and no earlier healthy state to roll back to: the "
                    "checkpoint was likely saved after an update that broke the model, before the rollback it would "
                    "have brought; resume from an earlier checkpoint"
                )
            bound = self.config.max_rollbacks_in_a_row
            stop = self._rollbacks_in_a_row >= bound
            # Stopping, the last confirmed state is left, not a change's copy (which may never have trained)
            restored = self.guard.restore(reason, unconfirmed=change_copy and not stop, stopping=stop)
            self._copy_opens_interval = self._reopened_copy = restored and change_copy and not stop
            if restored and stop:
                raise NoGoodStateError(
                    f"{reason} again after {self._rollbacks_in_a_row} rollbacks in a row with no healthy interval "
                    "between: the state they restore keeps failing (its optimizer moments may be too large, or the "
                    "learning rate too high for it); the model is left at the last state that gave finite losses. "
                    "Resume from an earlier checkpoint or lower the learning rate "
                    f"(ControllerConfig.max_rollbacks_in_a_row={bound} sets this bound)"
                )
            self._rollbacks_in_a_row += restored
        elif applied == steps:
            self._copied_at_close = self.guard.healthy()
            self._copy_opens_interval = self.guard.has_unconfirmed and self.guard.copy_is_current
            return False
        else:
            self._interval_mixed = True
            restored = False
        self.rollbacks += restored
        return restored

    def _decide(self) -> None:
        """The decision due at the interval just closed: its observation taken, the policy's action applied.

        One that raises stays due (``_decide_if_due`` makes it). Its observation is taken once: the snapshot closes the
        collector's interval (its overflow rate, step time and loss trends) and the grouper smooths the scores in:
        taken again, it would read an empty interval. A retry uses the one the failed attempt took, if it got that
        far; a run resumed with a decision due takes it afresh (it is not in a checkpoint), from the signals as saved.
        So is its action, once applied: a retry finishes that one (its rollback copy and report) without asking the
        policy again, whose second action would be applied on top of the first (the batch grown twice).
        """
        if self._observed is None:
            self._observed = self._observe()
        signals, observation = self._observed
        start = time.perf_counter()
        if self._applied is None:
            result = self.policy.predict(observation, deterministic=True)
            if not isinstance(result, tuple) or len(result) != 2:  # a bare action: "too many values to unpack"
                raise ValueError(
                    f"policy {type(self.policy).__name__}.predict() returned {_briefly(result)}: it must return the "
                    "pair (action, state), as Stable-Baselines3's predict does; a policy with no recurrent state "
                    "returns (action, None)"
                )
            # Unconverted: decode refuses True and False among the entries, which an array would have made 1 and 0.
            # Kept as apply returns (no call between): from here a Ctrl-C leaves this action to finish, not another
            self._applied, self._copy_due = (
                self.executor.apply(decode(result[0], self.config), self, overflow_rate=signals.overflow_rate),
                None,
            )
        report = self._applied
        if report.changed:
            self.cadence.expedite()  # judge the change at the next decision, soon (set again by a retry: the same)
        # After a mixed interval too: its skipped steps left the weights as they were, its buffers were checked finite
        # (_shield), and the parameters are checked here (a sync, at a change only). Like every copy, it is confirmed
        # only by an update applied on it, so a broken one is restored at most once. If only a healthy interval took
        # it, a failure after a change that followed one skipped step would cross the change.
        settled = self._interval_healthy or (self._interval_mixed and not nonfinite_parameters(self.model))
        if report.changed and self.guard is not None and settled:
            # As DecisionLoop: a change is what most often precedes a divergence, so a rollback restarts from it
            # (ControllerConfig.snapshot_every's promise), not from an older copy: the first failure after it goes
            # back to this copy, confirmed or not (_shield).
            # (The guard counts healthy intervals only: a mixed one's updates came after its latest copy.)
            if self._copy_due is None:  # read once: the copy makes the guard's latest copy current
                self._copy_due = self._interval_mixed or not self.guard.copy_is_current
            if self._copy_due:
                self.guard.save()
                self._copy_opens_interval, self._copy_due = True, False
            self._change_copy = self._copy_opens_interval
        # This attempt's time: one cut short had its own charged (_finish_step, _decide_if_due)
        self.collector.add_overhead((time.perf_counter() - start) * 1e3)
        # Reported before it is made, once: a Ctrl-C in the reporting leaves it to a retry, which logs it again
        if not self.decisions or self.decisions[-1] is not report:
            self.decisions.append(report)
        for reason in report.refused:
            _log.info("decision at step %d: %s", self.steps, reason)
        if self._writer is not None:
            step = self.steps
            self._writer.add_scalar("train/loss", signals.loss, step)
            self._writer.add_scalar("controller/batch_size", report.batch_size, step)
            self._writer.add_scalar("controller/lr_scale", report.lr_scale, step)
            self._writer.add_scalar("controller/lr", self.lr, step)  # the schedule's LR times the multiplier
            low = sum(p is not Precision.FP32 for p in report.precisions) / max(len(report.precisions), 1)
            self._writer.add_scalar("controller/low_precision_share", low, step)
            # The map's own series, as compare's precision map plots it: written where it changed (a step function)
            self._precision_map.write(self._writer, report.precisions, step)
            self._writer.add_scalar("controller/overhead_frac", signals.overhead_frac, step)
            self._writer.add_scalar("signals/noise_scale", signals.noise_scale, step)
            self._writer.add_scalar("signals/memory_bytes", signals.memory_bytes, step)
        # Made: one assignment, so that a Ctrl-C here neither leaves it due (made twice) nor uncounted
        self._decision_count, self._decision_due, self._observed, self._applied = (
            self._decision_count + 1,
            False,
            None,
            None,
        )

    def _observe(self) -> tuple[Signals, np.ndarray]:
        """The closed interval's signals (an estimator round first, when due) and the policy's observation of them."""
        self._run_round()
        signals = self.collector.snapshot(
            grad_mean_sq_norm=self.engine.grad_mean_sq_norm(),
            probe_loss=self._probe_loss(),
            batch_size=self.batch_size,
            lr_scale=self.engine.lr_scale,
            precisions=self.precisions,
            progress=self.progress,
        )
        self.signals = signals
        if self.config.signals.lr_factors and signals.lr_factors is not None:
            self.engine.lr_factors = signals.lr_factors  # the engine writes them into the LRs at its next step
        self.grouper.update(signals)
        observation = build_observation(signals, self.grouper, max(self._base_batch_size, 1), self.layout)
        # For the adascale LR rule, should the batch change now; unknown (None, a gain of 1) where the optimizer keeps
        # no running mean, whose snapshot reports the neutral guess of the batch size.
        unknown = signals.extra.get("grad_mean_unknown_layers")
        self._noise_scale = None if unknown else signals.noise_scale
        return signals, observation


def driving(optimizer: torch.optim.Optimizer) -> Controller | None:
    """The open Controller that drives ``optimizer``, or None: to close one that no name of yours holds any more.

    In a notebook, ``del ctl`` frees no Controller that something else still holds: the traceback of the last cell that
    raised or was interrupted (``sys.last_traceback``), or an ``Out[...]`` entry that displayed it. Its optimizer stays
    driven, and a new Controller on it is refused until ``driving(optimizer).close()``. None also where a
    ``StepEngine`` built directly drives it (its ``remove()`` frees the optimizer).

    Example:
        >>> model = nn.Linear(4, 2)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> ctl = Controller(model, opt, policy="fp32")
        >>> driving(opt) is ctl
        True
        >>> driving(opt).close()
        >>> driving(opt) is None
        True
    """
    return next((ctl for ctl in list(_open_controllers) if ctl.engine.optimizer is optimizer), None)


@dataclass
class _Closing:
    """How far an interval's end got (``Controller._close_interval``): a Ctrl-C part-way leaves the rest to do."""

    overhead_ms: float  # the collector's charges when it began (the decision's are the difference)
    cheap_ms: float
    rounds_ms: float
    shield_flags: tuple[bool, bool, bool, int]  # the copy the interval began from, as the shield reads them
    train_ms: float | None = None  # the interval's training time, once read
    moments: IntervalMoments | None = None  # its device sums, once read
    applied: int | None = None  # its updates applied, once folded into the signals
    applied_now: int = 0  # the engine's applied updates then
    steps: int = 0  # its steps
    restored: bool | None = None  # whether the shield restored a copy, once it ran


@dataclass
class _StepLeft:
    """What is left of a step whose update went in (``Controller._finish_step``)."""

    loss: torch.Tensor
    grads: GradStats | None  # its statistics (None: its update raised before taking them)
    recorded: bool = False  # its statistics and memory recorded
    closing: _Closing | None = None  # the interval's end it began, if any


class _CountedZeroGrad:
    """Stands in for ``optimizer.zero_grad`` (an attribute of the instance), counting its calls.

    Torch has no hook for it, and its ``set_to_none=False`` reset writes the gradients in place as a
    ``clip_grad_norm_`` does: both bump their versions, and only their values (a host-device sync) would tell the
    two apart. ``torch.optim``'s LR schedulers wrap ``optimizer.step`` the same way; the optimizer's pickled state
    and deep copies leave the attribute out (``Optimizer.__getstate__``). The model's ``zero_grad`` is left as it is:
    a model's copies and pickles would keep a wrapper.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, owner: object) -> None:
        self.calls = 0
        self._optimizer = optimizer
        self._owner = weakref.ref(owner)  # weakly: the owner holds this, and a dropped one leaves it unused
        self._removed = False
        self._own = optimizer.__dict__.get("zero_grad")  # the caller's own wrapper, if any: put back by remove()
        self._zero_grad = optimizer.zero_grad
        setattr(optimizer, "zero_grad", self)  # noqa: B010  (mypy refuses an assignment to a method)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self._zero_grad(*args, **kwargs)

    @staticmethod
    def drop_unused(optimizer: torch.optim.Optimizer) -> None:
        """Takes out of ``optimizer.zero_grad``'s chain the wrappers that count for no open Controller.

        Those of Controllers garbage-collected unclosed (a notebook's cell run again after ``del ctl``), or closed
        while wrapped again: each was called at every ``zero_grad()``, 20 deep after 20 such. A wrapper that is not
        ours ends the walk, holding those below it.
        """
        above: _CountedZeroGrad | None = None  # the nearest wrapper kept, which calls the next one down
        current = optimizer.__dict__.get("zero_grad")
        while isinstance(current, _CountedZeroGrad):
            if not current._removed and current._owner() is not None:
                above = current
            elif above is None:
                current.remove()  # the outermost: the optimizer's zero_grad is the next one down again
            else:
                above._zero_grad, above._own = current._zero_grad, current._own
            current = current._own

    def remove(self) -> None:
        """Puts the optimizer's ``zero_grad`` back (wrapped again since, this stays in the chain: ``drop_unused``)."""
        self._removed = True
        if self._optimizer.__dict__.get("zero_grad") is not self:
            return
        if self._own is None:
            del self._optimizer.__dict__["zero_grad"]
        else:
            self._optimizer.__dict__["zero_grad"] = self._own


@dataclass
class _SpeedTrial:
    """Progress of a speed trial in a user's loop: ``warmup_steps`` then ``steps`` timed steps per candidate."""

    candidates: tuple[Precision, ...]
    steps: int
    timer: IntervalTimer
    warmup_steps: int = 2
    index: int = 0
    steps_done: int = 0
    step_ms: dict[Precision, float] = field(default_factory=dict)

    @property
    def candidate(self) -> Precision:
        """The precision being timed now."""
        return self.candidates[self.index]


@dataclass(frozen=True)
class _LoadedSignals:
    """A checkpoint's signals, loaded into new objects: (collector, grouper, cadence, moments) and the open interval."""

    objects: tuple[SignalCollector, LayerGrouper, Cadence, DeviceMoments | None]
    interval_steps: int
    interval_peak: int
    interval_applied: int
    interval_ms: float
    noise_scale: float | None
    decision_due: bool


_SCALE_SEARCH_SKIPS = int(math.log2(SCALE_INITIAL))
"""Skipped steps the fp16 loss scale may take to back off from its first 2**16 to 1, halving at each: past them, the
run's skips are overflows again, whatever the scale (a model whose fp16 gradients overflow at any scale)."""

_CHECKPOINT_FORMAT = 2
"""The layout of ``Controller.state_dict()``; a change that old checkpoints cannot load bumps it (2: signals)."""
_SIGNALS_KEYS = (
    "collector",
    "grouper",
    "cadence",
    "moments",
    "interval_steps",
    "interval_peak",
    "interval_applied",
    "interval_ms",
    "noise_scale",
)
"""What the checkpoint's ``signals`` entry must hold (``decision_due`` too; absent, in an older one: none due)."""
_CHECKPOINT_KEYS = (
    "engine",
    "steps",
    "skipped_steps",
    "rollbacks",
    "batch_size",
    "base_batch_size",
    "loader",
    "lr_coupler",
    "speed_trial",
    "trial_running",
    "low_precision",
    "initial_precision",
    "signals",
)
"""What ``Controller.state_dict()`` holds beside its format (format 1 had all but the last)."""


_POLICY_SETTINGS = ("start_precision", "use_fp16")
"""The ``HeuristicConfig`` fields a policy's 16-bit formats are built from, which a checkpoint's load overwrites."""

_LEARNED = "learned"
"""The policy name a checkpoint records for every learned policy, shipped or trained (``_policy_identity``)."""


def _policy_identity(spec: object, policy: Policy, config: ControllerConfig) -> dict[str, Any]:
    """Which policy a checkpoint was saved by, in strings and bools: its kind and the settings its formats come from.

    The kind is the policy's own name (``static-fp32``, ``heuristic-precision``), or ``learned`` for every learned
    policy: the shipped ``pretrained``, a zip by any path and file name, a ``LearnedPolicy`` object and a
    ``FallbackPolicy`` around one resume into each other. Nothing the load restores into one is the zip's own (the
    layers' precisions, the LR multiplier, the 16-bit formats, which come from the settings recorded beside it), and a
    file name tells no weights apart.
    A policy object without a name (a user's own) has no stable identity across processes that the controller can
    read: its class name only is recorded. Where the load overwrites the policy's formats (``low_precision``,
    ``initial_precision``), the ``HeuristicConfig`` fields they were built from are recorded too: this controller's
    config for a policy it made from a name or path, a policy object's own ``config``, and none for an object without
    one (a ``LearnedPolicy`` built by hand).
    """
    inner = policy.policy if isinstance(policy, FallbackPolicy) else policy
    name = _LEARNED if isinstance(inner, LearnedPolicy) else getattr(policy, "name", None)
    identity: dict[str, Any] = {"name": name if isinstance(name, str) else type(policy).__name__}
    own = getattr(policy, "config", None)
    source = own if isinstance(own, ControllerConfig) else config if isinstance(spec, (str, os.PathLike)) else None
    if source is not None and any(hasattr(policy, key) for key in ("low_precision", "initial_precision")):
        identity.update({key: getattr(source.heuristic, key) for key in _POLICY_SETTINGS})
    return identity


def _policy_argument(name: str) -> str:
    """The ``Controller`` argument that builds the policy a checkpoint names, for a message."""
    if name in HEURISTIC_NAMES or static_preset_name(name) is not None:
        return f"policy={name!r}"
    if name == _LEARNED:
        return "policy='pretrained' or the path of a learned policy's zip"
    return f"policy=the {name} object the run was saved with"


def _refuse_in_ddp(spec: object, probe: object) -> None:
    """A ``ConfigError`` for a probe batch, or any policy but a static one, under DDP (more than one process)."""
    processes = world_size()
    if processes == 1:
        return
    if probe is not None:
        raise ConfigError(
            f"probe= is given, and this torch.distributed run has {processes} processes: the estimator rounds run the "
            "model's forward and backward on the probe batch when each process's own step times allow, so the "
            "processes would run them at different steps, out of step with DDP's collectives (a hang). Leave probe "
            "out under torch.distributed"
        )
    if isinstance(spec, StaticPolicy) or static_preset_name(spec) is not None:
        return
    named = repr(os.fspath(spec)) if isinstance(spec, (str, os.PathLike)) else f"a {type(spec).__name__} object"
    raise ConfigError(
        f"policy={named} decides from this process's own signals, and this torch.distributed run has {processes} "
        "processes: each would decide from its shard's losses and gradients, take its own LR multiplier, precisions "
        "and batch size, and the DDP replicas would drift apart (a batch size of its own hangs an all-reduce). Under "
        f"torch.distributed use a static policy: {', '.join(repr(name) for name in STATIC_PRESETS)}"
    )


def _check_loss(loss: object) -> None:
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        hint = ""
        if isinstance(loss, torch.Tensor):  # a reduction="none" loss, or a one-element one from a reshape
            hint = ": reduce it first (loss.mean(), loss.sum()), or loss.squeeze() a one-element loss"
        raise ValueError(f"loss must be a scalar tensor; got {type(loss).__name__} {getattr(loss, 'shape', '')}{hint}")
    if _grad_scaler_outputs.get(id(loss)) is loss:
        raise ValueError(
            "this loss is a GradScaler's scale(loss), the loss times the scaler's loss scale (65536 at first): "
            "ctl.step(loss) does the loss scaling and the update: remove the GradScaler (scale/step/update) and "
            "torch.autocast from the loop, and pass the loss itself, computed under `with ctl.autocast():`"
        )


def _note_grad_scaler_outputs() -> None:
    """Wraps ``torch.amp.GradScaler.scale``, once a process, to note its outputs while a controller is open.

    A loop ported from torch.amp that kept ``ctl.step(scaler.scale(loss))`` trained on gradients 65536 times too large
    (under fp16 the controller's own loss scale on top): the weights blew up to NaN, and the shield's rollbacks and
    loss scale hid the cause. ``_check_loss`` refuses a loss so noted: exactly that tensor, so a GradScaler of the
    loop's own elsewhere (a GAN's other network, trained outside the controller) is left alone, and a disabled one
    (``enabled=False`` returns the loss itself) passes. On the class, which ``torch.cuda.amp.GradScaler`` inherits it
    from; with no controller open a pass-through. It returns what ``scale`` returns, and a GradScaler pickles as
    before (its state is the instance's; the wrapper keeps the method's name). A subclass that overrides ``scale``
    without calling it (FSDP's ``ShardedGradScaler``) is not seen.
    """
    original = torch.amp.GradScaler.scale
    if getattr(original, "_notes_outputs", False):
        return

    @functools.wraps(original)
    def scale(self: torch.amp.GradScaler, outputs: Any) -> Any:
        scaled = original(self, outputs)
        # Not while traced (torch.compile): a traced tensor is no loss a step takes, and a WeakSet breaks the graph
        if not torch.compiler.is_compiling() and _open_controllers and scaled is not outputs:
            if isinstance(scaled, torch.Tensor):
                _grad_scaler_outputs[id(scaled)] = scaled
        return scaled

    scale._notes_outputs = True  # type: ignore[attr-defined]
    torch.amp.GradScaler.scale = scale  # type: ignore[method-assign]


def _epochs_done(epoch: int, cursor: int, n: int) -> int:
    """Whole epochs a loader at ``(epoch, cursor)`` of ``n`` samples has served (its cursor at the end: one more)."""
    return int(epoch) + (int(cursor) >= int(n))


def _checked_count(state: Mapping[str, Any], key: str, least: int) -> int:
    """``state[key]`` if it is a whole number >= ``least`` (an int, not a bool or float), else a ValueError."""
    value = state[key]
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise ValueError(f"the checkpoint's {key} {value!r} is not a whole number >= {least}")
    return int(value)


def _checked_precision_code(state: Mapping[str, Any], key: str, low: bool = False) -> Precision | None:
    """``state[key]`` as a ``Precision`` (None stays None), else a ValueError naming it; ``low``: a 16-bit one."""
    value = state[key]
    if value is None:
        return None
    codes = tuple(int(p) for p in Precision if not (low and p is Precision.FP32))
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) not in codes:
        raise ValueError(
            f"the checkpoint's {key} {value!r} is not a precision code ({', '.join(map(str, codes))}) or None"
        )
    return Precision(int(value))


def _bf16_layers_in_fp16(engine_state: Any) -> tuple[Any, bool]:
    """A copy of a checkpoint's engine state with its layers' bf16 codes as fp16's, and whether any was bf16.

    For a device without bf16 (a V100 or T4). A state the engine's checks refuse (no list of precisions, an unknown
    code) is returned as given, for those checks to name.
    """
    if not isinstance(engine_state, Mapping) or not isinstance(engine_state.get("precisions"), (list, tuple)):
        return engine_state, False

    def is_bf16(code: Any) -> bool:
        try:
            return Precision.parse(code) is Precision.BF16
        except ValueError:
            return False

    saved = engine_state["precisions"]
    if not any(is_bf16(code) for code in saved):
        return engine_state, False
    precisions = [int(Precision.FP16) if is_bf16(code) else code for code in saved]
    return {**engine_state, "precisions": precisions}, True


def _precision_code(precision: Precision | None) -> int | None:
    return None if precision is None else int(precision)


def _optimizer_states(controller: Controller) -> int:
    return optimizer_state_tensors(controller.engine.optimizer)


def _briefly(value: object) -> str:
    """``value`` for a message: its repr and type, or the type alone where the repr runs long (a large array)."""
    text = repr(value)
    return f"{text} (a {type(value).__name__})" if len(text) <= 80 else f"a {type(value).__name__}"


def _checked_probe(
    model: nn.Module,
    probe: object,
    loss_fn: object,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The probe batch copied to ``device``, with ``loss_fn`` tried on two of its samples; None without one.

    Tried on the model as the rounds run it (fp32, the modules' own modes, batch-norm statistics and the random streams
    left as they were, with gradients), so that a loss function of the wrong signature or shape, or one that does not
    depend on the parameters, fails here, not at the first decision, after an update.
    """
    if probe is None and loss_fn is None:
        return None
    if probe is None or loss_fn is None:
        given, missing = ("probe", "loss_fn") if loss_fn is None else ("loss_fn", "probe")
        raise ValueError(
            f"{given} was given without {missing}: the estimator rounds need both, probe=(inputs, targets) and "
            "loss_fn(outputs, targets) -> mean loss (or neither, for the cheap signals alone)"
        )
    if not callable(loss_fn):
        raise TypeError(f"loss_fn={loss_fn!r} must be a callable (outputs, targets) -> mean loss")
    if not (isinstance(probe, (tuple, list)) and len(probe) == 2 and all(isinstance(t, torch.Tensor) for t in probe)):
        raise TypeError(f"probe must be a pair of tensors (inputs, targets); got {_briefly(probe)}")
    # A copy: the caller's tensors written afterwards (a buffer reused for the next batch) changed the probe
    inputs, targets = (t.detach().to(device, copy=True) for t in probe)
    if inputs.dim() == 0 or targets.dim() == 0 or len(inputs) != len(targets) or len(inputs) < 2:
        raise ValueError(
            f"probe's inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} must hold the same number of "
            "samples along the first dimension, at least 2"
        )
    # As the rounds run it: fp32, the modules' own modes, attention in the math path (the fused kernels have no
    # double backward), then torch.autograd.grad with a graph and a Hessian-vector product.
    with (
        forked_rngs(device),
        torch.enable_grad(),
        frozen_batch_stats(model, keep_modes=True),
        sdpa_kernel(SDPBackend.MATH),
    ):
        try:
            loss = loss_fn(float_outputs(model(inputs[:2])), targets[:2])
        except Exception as err:
            raise ValueError(
                f"loss_fn(model(probe inputs), probe targets) failed on two probe samples: {err!r}"
            ) from err
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ValueError(f"loss_fn must return the mean loss, a 0-dim tensor; it returned {_briefly(loss)}")
        if not loss.requires_grad:
            raise ValueError(
                "loss_fn's loss on two probe samples has no graph to the model's parameters (computed under "
                "no_grad, detached, or from the targets alone): the rounds differentiate it"
            )
        try:
            params = [p for p in model.parameters() if p.requires_grad]
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            dot = sum((g.sum() for g in grads if g is not None and g.requires_grad), loss.new_zeros(()))
            if dot.requires_grad:
                torch.autograd.grad(dot, params, allow_unused=True)
        except RuntimeError as err:
            raise ValueError(
                "the estimator rounds differentiate loss_fn's loss twice (torch.autograd.grad, then a Hessian-vector "
                "product), and this model refuses it on two probe samples; activation checkpointing with "
                f"use_reentrant=True is the usual cause (use use_reentrant=False, or pass no probe): {err}"
            ) from err
    return inputs, targets

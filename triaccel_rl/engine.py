"""``StepEngine``: backward, loss scaling, gradient statistics, non-finite skip and the optimizer update.

The one place where a configuration (per-layer precision, LR scale, per-layer LR factors) meets the
optimizer. ``TrainingRun`` (offline tasks) and ``Controller`` (a user's own loop) both step through it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import logging
import math
import numbers
import operator
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.optim import optimizer as _torch_optimizer  # its global step-hook registries
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype  # clip_grad_norm_'s grouping

from triaccel_rl.distributed import any_rank, any_rank_on_device, world_size
from triaccel_rl.errors import ConfigError, DetachedParametersError, is_finite_real, is_real
from triaccel_rl.precision import LayerPrecision, WeightCopies, driven_modules, find_layers, layer_parameters
from triaccel_rl.types import LayerInfo, Precision

if TYPE_CHECKING:  # the kernels package loads Triton: imported where the fused step is built
    from triaccel_rl.kernels.optim import AdamWOptions, SGDOptions

__all__ = [
    "GradStats",
    "StepEngine",
    "check_max_grad_norm",
    "check_precision_supported",
    "layer_parameters",
    "native_bf16",
    "refuse_driven_modules",
]

_log = logging.getLogger("triaccel_rl")


def check_max_grad_norm(max_grad_norm: float | None) -> float | None:
    """Returns ``max_grad_norm`` if it is a clipping threshold the engine takes: a positive finite number, or None.

    One rule for every place that takes one (``Controller``, ``compare``, ``run_plain``): infinity would clip
    nothing, and is said as None.

    Raises:
        ValueError: anything else, named.
    """
    if max_grad_norm is None:
        return None
    if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float, np.integer, np.floating)):
        raise ValueError(f"max_grad_norm={max_grad_norm!r} must be a number (or None for no clipping)")
    if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise ValueError(f"max_grad_norm={max_grad_norm} must be a positive finite number (or None for no clipping)")
    return float(max_grad_norm)


def check_precision_supported(precision: Precision, device: torch.device) -> None:
    """Raises ValueError when ``device`` cannot compute in ``precision``: bf16 where it is not native (a V100 or T4)."""
    if device.type == "cuda" and precision is Precision.BF16 and not native_bf16(device):
        raise ValueError(
            f"precision bf16 is not supported on {torch.cuda.get_device_name(device)}; allowed: fp32, fp16"
        )


def native_bf16(device: torch.device | None = None) -> bool:
    """Whether the CUDA ``device`` computes in bf16 natively (compute capability 8.0 on).

    ``torch.cuda.is_bf16_supported()`` by default also says yes where bf16 is only emulated (sm70 and sm75): the
    executor's way out of an overflowing fp16 (to bf16, else fp32) never took fp32 there. Torch asks the current
    device; a device with an index is asked itself (on a machine of mixed GPUs the run's device may not be the
    current one). None, or ``cuda`` without an index, is the current device.
    """
    if device is not None and device.index is not None:
        with torch.cuda.device(device):
            return native_bf16()
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # a torch without the argument
        return bool(torch.cuda.is_bf16_supported())


@dataclass(frozen=True)
class GradStats:
    """Per-layer statistics of the unscaled gradient of one step (device tensors, ``[n_layers]``).

    Attributes:
        sq_sum: sum of squared elements.
        abs_max: largest absolute element; None from a step of an engine whose ``track_abs_max`` is off.
        nonfinite: count of non-finite elements.
    """

    sq_sum: torch.Tensor
    abs_max: torch.Tensor | None
    nonfinite: torch.Tensor


class StepEngine:
    """Runs the backward pass and the update of ``optimizer`` under the current configuration.

    Knobs: ``precision`` (a :class:`LayerPrecision`), ``lr_scale`` (global multiplier on every param
    group's LR), ``lr_factors`` (per layer; applied to param groups that carry a ``"layer"`` key, on both paths)
    and ``batch_lr_gain`` (set by whoever changes the batch size). The multipliers apply to whatever LR the
    param groups hold at each step, so an LR scheduler on the optimizer keeps working: the groups' ``lr``
    stays the scheduler's (the reference path sets the scaled LRs for its ``optimizer.step()`` only, then puts
    them back), and :meth:`group_lrs` gives the LRs the next update applies.

    A GradScaler scales the loss whenever a layer runs in fp16. A step whose loss or gradient is
    non-finite is skipped: parameters and optimizer state stay as they were. Trainable parameters outside the
    optimizer (a second optimizer's) count in that check, and a skipped step sets their gradients to ``None``, so
    the second optimizer's ``step()`` skips the batch too (in every precision).

    **Fused path** (``fused=True``; the default on CUDA when the optimizer allows it): the parameters move
    into a ``FlatParameterStore`` and the Triton ``FusedSGD``/``FusedAdamW`` replace ``optimizer.step()``:
    one pass unscales, checks for non-finite values, takes the per-layer statistics, applies the per-layer
    LR and writes the 16-bit weight copies of low-precision layers, which those layers' forward then reads
    in place of casting the fp32 weights (``LayerPrecision.use_weight_copies``); a non-finite gradient
    skips the whole update on the device. Loss scaling for fp16 layers is then done on the device too (same rule as
    ``GradScaler``: halve on overflow, double after 2000 clean steps unless the double is not finite). It needs SGD
    (any momentum, dampening, Nesterov, weight decay) or AdamW (or Adam without weight decay) with the same
    hyper-parameters in every param group except the LR and the weight decay (a layer's parameters may be in
    several groups of one LR, e.g. no decay on biases and norms: the fused step then decays each group's
    parameters by the group's weight decay), no ``amsgrad``, ``maximize`` or ``differentiable``, and every trainable
    parameter in a group; else the reference path runs. A group that turns one of them on later (a loaded state's, or
    set by hand) is refused at the load or the next step, naming the group. The trainable parameters are fixed when
    the engine is built: a param group added or removed later, a parameter added to a group or taken out of the
    groups, a parameter moved to another group or a group's parameters reordered, a parameter unfrozen later, or a
    model moved or cast later is refused at the next step with the parameters named (on this path a moved parameter
    would keep its old group's LR and decay; on both, the rollback copy loads the optimizer state by position).
    ``optimizer.step()`` is then never called, and the optimizer state lives in ``fused_optimizer``; step hooks
    registered on the optimizer run around each fused step, as ``optimizer.step()`` runs them (post-hooks also after
    a step the device skipped). The ``torch.optim`` object stays the user's view of the state: state it already
    holds is taken over, ``optimizer.state_dict()`` returns the fused state in ``torch.optim``'s layout,
    ``optimizer.load_state_dict()`` loads into the fused buffers, and :meth:`remove` leaves the final state in the
    optimizer, so checkpoints written or read the usual way keep the moments. Between steps ``optimizer.state`` holds
    views of the fused moments (an edit in place acts), and a state cleared, replaced or with entries deleted is
    adopted at the next step as a load is (:meth:`_take_state_edits`).

    On both paths a held parameter frozen later (``requires_grad_(False)``) sits the steps out, its weights and
    optimizer state kept, as ``torch.optim`` leaves a parameter whose gradient ``zero_grad()`` set to ``None``;
    unfrozen again, it trains on.

    Args:
        model: the model being trained.
        optimizer: its optimizer; each param group's ``lr`` at each step is the base the LR knobs multiply.
        device: the device the model lives on.
        fused: use the fused Triton step (``None``: on CUDA when supported; ``True`` where it cannot run this
            optimizer raises a ``ConfigError`` naming the reason).
    """

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, fused: bool | None = None
    ) -> None:
        # The hooks of engines garbage-collected without remove() (Controllers dropped unclosed, a notebook's build cell
        # run again) act no more, but each step still called them, a set for each: taken off here, and not by a
        # finalizer, which may run inside a step while torch iterates the hook dicts.
        _drop_dead_engine_hooks(optimizer)
        if any(_open_engine(hook) for hook in optimizer._optimizer_step_pre_hooks.values()):
            # A second one (a notebook cell run again) was taken, and the first's guard then refused the second's
            # updates with advice about an optimizer.step() the loop did not have.
            raise ValueError(
                "this optimizer is driven by another open controller (or StepEngine): close() it first, then build "
                "the new one. triaccel_rl.controller.driving(optimizer).close() reaches a Controller whose name is "
                "gone: in a notebook, sys.last_traceback or an Out[...] entry may still hold it after `del ctl`"
            )
        self.model = model
        self.optimizer = optimizer
        self.device = device
        self.precision = LayerPrecision(model, device.type)
        try:
            self.layers: list[LayerInfo] = self.precision.layers
            self.n_layers = len(self.layers)
            trainable = layer_parameters(model, self.layers)
            owned = {id(p) for params in trainable for p in params}
            strays = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in owned]
            if strays:  # cannot happen for modules found by find_layers; guards odd parametrisations
                raise ValueError(f"parameters {strays[:3]} belong to no layer the controller can see")
            # Each parameter's param group by position: optimizer.load_state_dict() puts new group dicts in the same
            # places (a dict kept from before would hold the LR and hyperparameters of before the load).
            self._group_index = {id(p): i for i, group in enumerate(optimizer.param_groups) for p in group["params"]}
            # Only those the optimizer holds: another optimizer of the user's (SparseAdam) steps the others, and the
            # engine only reads their gradients' values. A frozen one makes no gradient at all (a pretrained lookup
            # table): taken. Unfrozen later, its parameter is one the engine does not hold: refused at the next step if
            # the optimizer holds it (_check_optimizer_params), else left to whoever steps it.
            sparse = [
                name
                for name, m in model.named_modules()
                if isinstance(m, _SPARSE_TYPES)
                and m.sparse
                and any(p.requires_grad and id(p) in self._group_index for p in m.parameters())
            ]
            if sparse:
                raise ValueError(
                    f"modules {sparse[:3]} make sparse gradients (sparse=True), which the controller's gradient "
                    "statistics and updates do not take: build them with sparse=False (or freeze them: "
                    "requires_grad=False), or step them with an optimizer of their own (torch.optim.SparseAdam) "
                    "and leave them out of this one"
                )
            # The parameters the engine updates: the trainable ones the optimizer holds. Trainable parameters outside it
            # (fine-tuning a head with an optimizer over the head alone) are left as optimizer.step() leaves them.
            self.layer_params = [[p for p in params if id(p) in self._group_index] for params in trainable]
            self._params = [p for params in self.layer_params for p in params]
            # An empty tensor has no infinity norm (torch raises): a parameter of no elements (nn.Linear(0, 3)) takes
            # a zero in the maxima instead.
            self._has_empty_params = any(p.numel() == 0 for p in self._params)
            self._watch_unheld_gradients(trainable)
            if not self._params:
                raise ValueError(
                    f"the optimizer holds none of the {len(owned)} trainable parameters of "
                    f"{type(model).__name__}; build it from this model's parameters (model.parameters())"
                )
            self._layer_index = torch.cat(
                [torch.full((len(params),), i, dtype=torch.long) for i, params in enumerate(self.layer_params)]
            ).to(device)
            # Checked at each step (_check_optimizer_params): a param group added later, or a parameter of the
            # optimizer's that was frozen now and gets a gradient later, would be trained outside the engine.
            held = {id(p) for p in self._params}
            model_params = {id(p) for p in model.parameters()}
            foreign = [
                tuple(p.shape)
                for g in optimizer.param_groups
                for p in g["params"]
                if p.requires_grad and id(p) not in model_params
            ]
            if foreign:  # the first step named them "frozen when the controller was built", which they never were
                raise ValueError(
                    f"the optimizer holds {len(foreign)} trainable parameters that are not {type(model).__name__}'s "
                    f"(shapes {foreign[:5]}): the controller updates the model's parameters only. Make their module "
                    "part of the model given to the controller, or give them an optimizer of their own"
                )
            if _needs_closure(optimizer):
                raise ValueError(
                    f"{type(optimizer).__name__}.step() needs a closure (it re-evaluates the loss), which the "
                    "controller's step(loss) cannot give it: use an optimizer whose step() takes none (SGD, AdamW, ...)"
                )
            self._n_param_groups = len(optimizer.param_groups)
            # Each group's parameters, as ids in order: compared whole at each step (_check_optimizer_params)
            self._group_params = tuple(tuple(map(id, group["params"])) for group in optimizer.param_groups)
            self._outside_params = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in held]
            _check_layer_keys(optimizer.param_groups, self.n_layers)
            self.lr_scale = 1.0
            self.batch_lr_gain = 1.0
            self.lr_factors = np.ones(self.n_layers)
            self.max_grad_norm: float | None = None
            """Clips the gradient's total norm to this before each update, as ``clip_grad_norm_`` (None: off)."""
            self.grad_transform: Callable[[], object] | None = None
            """Called each step on the unscaled gradients, before clipping, statistics and the skip (None: none)."""
            self.track_abs_max = True
            """Whether each step's statistics hold ``abs_max`` (else None). On the reference path it is a second pass
            over every gradient, as costly as the norms (1.1 ms a step at 600 parameters on a CPU): off for a caller
            that never reads it. The fused path takes it in its one pass, free."""
            self._grad_scaler: torch.amp.GradScaler | None = None
            self.fused_optimizer: Any = None
            self._optimizer_hooks: list[
                Any
            ] = []  # the fused path's state_dict / load_state_dict hooks on the optimizer
            self._stepping = False  # inside the engine's own optimizer.step() (the reference path)
            this = weakref.ref(self)

            def guard(_optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
                engine = this()
                if engine is not None and not engine._stepping:
                    raise RuntimeError(
                        "optimizer.step() was called while the controller drives this optimizer: ctl.step(loss) "
                        "already runs the backward and the update, so this would be a second update. Remove "
                        "loss.backward() and optimizer.step() from the loop (or close the controller first)"
                    )

            _mark_engine_hook(guard, this)
            self._step_guard = guard
            self._step_guard_handle = optimizer.register_step_pre_hook(guard)

            def scale_lrs(_optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
                engine = this()
                if engine is not None and engine._stepping:  # after every other pre-hook: see _scaled_lrs
                    engine._apply_scaled_lrs()
                    # The optimizer's own step begins: from here an error can leave some parameters updated. Last: an
                    # error (a Ctrl-C) before it has moved nothing, and the batch is served again
                    engine.update_started = True

            def count_update(_optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
                engine = this()
                # The engine's own optimizer.step(): the update went in. Once a step: a subclass whose step() calls
                # super().step() runs the hooks twice (torch wraps both classes' step), and counted two updates.
                if engine is not None and engine._stepping and engine._own_lrs is not None:
                    # One assignment: an update counted without being marked reached was counted again (_reference_step)
                    engine._reference_applied, engine.update_reached = engine._reference_applied + 1, True
                    engine._restore_own_lrs()  # before the user's post-hooks: what they write stays

            # First of the post-hooks, so a user's post-hook that raises after the update cannot hide it from the count
            self._count_handle = optimizer.register_step_post_hook(_mark_engine_hook(count_update, this))
            post_hooks: Any = optimizer._optimizer_step_post_hooks  # an OrderedDict (typed a dict)
            post_hooks.move_to_end(self._count_handle.id, last=False)
            self._scale_lrs_hook = scale_lrs
            self._scale_handle = optimizer.register_step_pre_hook(_mark_engine_hook(scale_lrs, this))
            self._own_lrs: list[Any] | None = None  # the groups' own LRs while the scaled ones are in (_scaled_lrs)
            self.last_grad_stats: GradStats | None = None
            """The last step's gradient statistics, kept for a caller whose step raised after the update (a step
            post-hook): None until a step has computed them."""
            self.update_reached = False
            """Whether the last step's update was applied (or, on the fused path, launched), set even when the step
            raised after it (a step post-hook): a caller knows its batch was trained on."""
            self.update_started = False
            """Whether the last step's update began: the optimizer's own ``step()`` was entered (after every pre-hook)
            or the fused step's update kernel launched. Set while ``update_reached`` is not, the step raised part-way
            through the update (out of memory in ``AdamW``'s ``sqrt``): some parameters and optimizer state may have
            moved, so the batch is spent and the step cannot be retried."""
            self.zero_pending = False
            """Whether the gradients in ``.grad`` are a step's whose own zeroing has not run: set as the step begins
            (a ``Controller`` sets it before the backward), cleared by :meth:`zero_grad`. Still set at the next step,
            the step was cut short (a Ctrl-C in its last lines): its gradients must be zeroed before the next backward
            adds to them."""
            # Updates applied on the reference path, one raised part-way included (the fused one counts on the device)
            self._reference_applied = 0
            wanted = fused if fused is not None else device.type == "cuda"
            # Checked only where wanted: the checks load Triton, which is not installed everywhere (macOS, Windows)
            reason = _fused_unsupported(optimizer, self.layer_params) if wanted else ""
            if fused and reason:
                raise ConfigError(f"fused=True, but the fused step cannot run this optimizer: {reason}")
            if wanted and not reason:
                self._init_fused()
            elif reason:  # the default would have been the fused step: say why not
                _log.warning("the fused optimizer step cannot run this optimizer (%s): the reference path runs", reason)
            if isinstance(optimizer, _INITIAL_STEP_LRS):
                _log.warning(
                    "%s reads its param groups' lr only to set each parameter's first step size, at its first step: "
                    "the LR multipliers (lr_scale, lr_factors) and the batch-LR gain cannot act on it, so decisions "
                    "that move the LR do not change its updates",
                    type(optimizer).__name__,
                )

        except BaseException:
            self._undo_init()  # a refused model or optimizer is left as it was given: no hooks stay behind
            raise
        # Dropped without remove() (its Controller garbage-collected unclosed), it leaves the model free for another:
        # its hooks act no more. The optimizer's hooks hold it weakly, and go inert with it (_open_engine). The fused
        # step hands its state back then, as remove() does (_hand_back): its moments, and parameters of their own.
        self.precision.release_when_collected(self)
        self._hand_back_when_collected: weakref.finalize[Any, Any] | None = None
        if self.fused:
            self._hand_back_when_collected = weakref.finalize(
                self, _hand_back, weakref.ref(optimizer), self.fused_optimizer, self.store, self._group_index
            )
            self._hand_back_when_collected.atexit = False

    def _watch_unheld_gradients(self, trainable: list[list[nn.Parameter]]) -> None:
        """Hooks the gradients of the model's trainable parameters the optimizer does not hold, to unscale them.

        While a layer is fp16 the backward runs on the scaled loss. The engine unscales the gradients it updates;
        these (a second optimizer's, or read by the user) are divided by the same scale as autograd computes them,
        before they are added to ``.grad``, so a second optimizer steps on the loss's own gradient, as after
        ``GradScaler.unscale_`` on it, and gradients accumulated over several steps stay unscaled.

        In every precision, a non-finite one counts as a non-finite held gradient (:meth:`_unheld_overflow`), before
        the ``grad_transform`` and after it (one it gives a parameter the backward did not reach too): the step
        is skipped (under fp16 the scale backs off). A skipped step, for a non-finite loss or any non-finite gradient,
        sets their gradients to ``None``, so the second optimizer's ``step()`` skips the bad batch too, as
        ``GradScaler.step`` would: else a NaN batch's gradients would reach the second optimizer, whose weights and
        momentum would go NaN for good (a rollback restores the weights, not another optimizer's state). Skipping the
        held update too is stricter than ``GradScaler``, which skips each optimizer on its own overflow.

        Those trainable at the build are hooked here; one unfrozen or added to the model later, before its first scaled
        backward (:meth:`_watch_unheld_since_built`), so in fp32 and bf16 it is not checked for non-finite gradients.
        """
        self._unheld_params: list[nn.Parameter] = []
        self._unheld_ids: set[int] = set()
        self._unheld_hooks: dict[int, Any] = {}  # by id(param): a parameter gone from the model is unhooked
        self._backward_scale: torch.Tensor | None = None  # the scale of a scaled backward not yet stepped
        # What _watch_unheld_since_built checks at each scaled backward, from a walk of the model redone only when its
        # structure changed: the parameters neither held nor watched (None: walk again), the modules walked, their
        # own parameter and child dicts, and those dicts' total size at the walk.
        self._unwatched: list[nn.Parameter] | None = None
        self._tree_module_ids: set[int] = set()
        self._tree_dicts: list[dict[str, Any]] = []
        self._tree_size = 0
        self._tree_hooks: list[Any] = []  # torch's global registration hooks, marking the walk stale
        this = weakref.ref(self)

        def unscale(grad: torch.Tensor) -> torch.Tensor:
            engine = this()
            scale = None if engine is None else engine._backward_scale
            return grad if scale is None else grad / scale

        self._unscale_hook = unscale
        for params in trainable:
            for p in params:
                if id(p) not in self._group_index and id(p) not in self._unheld_ids:
                    self._watch_unheld(p)

    def _watch_unheld(self, param: nn.Parameter) -> None:
        self._unheld_params.append(param)
        self._unheld_ids.add(id(param))
        self._unheld_hooks[id(param)] = param.register_hook(self._unscale_hook)

    def _watch_unheld_since_built(self) -> None:
        """Watches, as :meth:`_watch_unheld_gradients` does, the trainable parameters unheld and not watched yet.

        A parameter frozen when the engine was built and unfrozen since (a body trained by a second optimizer at a
        later stage), or new to the model (a head replaced, ``model[4] = nn.Linear(...)``), would otherwise take the
        scaled loss's gradient into its optimizer's step (times the loss scale, 65536 at first), and miss the
        non-finite check and the drop on a skipped step. Run before each scaled backward (a hook registered after the
        forward still acts in the backward).

        A walk of the modules' own parameter dicts took 150-290 us a scaled backward at 600 parameters on a CPU, so
        the model is walked again only when its structure changed since the last walk: torch's global registration
        hooks tell of a module or parameter set on a walked module (``setattr``, ``add_module``,
        ``register_parameter``), and a change in the walked dicts' total size of one written directly
        (``Sequential.insert``, ``del model[i]``).
        Between walks it reads ``requires_grad`` of the parameters neither held nor watched (the frozen ones, often
        none): about 10 us at 600 parameters in 450 modules. Hazard: an entry replaced by writing a module's
        ``_modules`` or ``_parameters`` dict directly, which leaves the size as it was, is not seen.

        A walk also stops watching the parameters no longer in the model (:meth:`_walk_model`), so a head replaced
        at every step is freed as in a plain loop.
        """
        unwatched = self._unwatched
        if unwatched is None or sum(map(len, self._tree_dicts)) != self._tree_size:
            unwatched = self._walk_model()
        if any(p.requires_grad for p in unwatched):
            for p in unwatched:
                if p.requires_grad:
                    self._watch_unheld(p)
            unwatched = [p for p in unwatched if not p.requires_grad]
        self._unwatched = unwatched

    def _walk_model(self) -> list[nn.Parameter]:
        """The model's parameters neither held nor watched, once each; records the walk (see ``_unwatched``).

        Stops watching the parameters no longer in the model (a replaced head, or one trainable at the build and
        removed since): their hooks go, and the engine holds them no more. Else a head replaced at every step and
        trained by an optimizer of its own would keep each old head and its gradient alive until ``remove()`` (296 MiB
        after 19 heads of 256 x 8192), and :meth:`_unheld_overflow` would norm all their stale gradients at each step
        (58 ms at 42 parameters on a CPU). Not while a scaled backward is pending (gradient accumulation, the model
        changed between its backward passes): the step checks those gradients for non-finite values and drops them on
        a skip, as for the others; the next check walks again.
        """
        held = self._group_index
        modules, seen = [self.model], {id(self.model)}
        unheld: dict[int, nn.Parameter] = {}
        for module in modules:  # (grows while walked; seen: a module shared, or its own child, is walked once)
            for p in module._parameters.values():
                if p is not None and id(p) not in held:
                    unheld[id(p)] = p
            for child in module._modules.values():
                if child is not None and id(child) not in seen:
                    seen.add(id(child))
                    modules.append(child)
        self._tree_module_ids = seen
        self._tree_dicts = [d for module in modules for d in (module._parameters, module._modules)]
        self._tree_size = sum(map(len, self._tree_dicts))
        gone = self._unheld_ids - unheld.keys()
        if gone and self._backward_scale is not None:
            self._tree_size = -1  # (no total of sizes: the check after the step walks again, and unwatches them)
        elif gone:
            for key in gone:
                self._unheld_hooks.pop(key).remove()
            self._unheld_ids -= gone
            self._unheld_params = [p for p in self._unheld_params if id(p) not in gone]
        if not self._tree_hooks:
            this = weakref.ref(self)

            def mark_stale(module: nn.Module, _name: str, _value: object) -> None:
                engine = this()
                if engine is not None and id(module) in engine._tree_module_ids:  # (an id reused: a walk too many)
                    engine._unwatched = None

            self._tree_hooks = [
                nn.modules.module.register_module_module_registration_hook(mark_stale),
                nn.modules.module.register_module_parameter_registration_hook(mark_stale),
            ]
            for handle in self._tree_hooks:  # global: an engine collected without remove() takes its hooks along
                weakref.finalize(self, handle.remove)
        return [p for key, p in unheld.items() if key not in self._unheld_ids]

    def _remove_unheld_hooks(self) -> None:
        for handle in [*self.__dict__.get("_unheld_hooks", {}).values(), *self.__dict__.get("_tree_hooks", [])]:
            handle.remove()
        self._unheld_hooks = {}
        self._tree_hooks = []
        self._unwatched = None
        self._unheld_params = []
        self._unheld_ids = set()

    def _unheld_overflow(self) -> torch.Tensor | None:
        """Whether a gradient the optimizer does not hold is non-finite (a 0-dim bool on the device), or None.

        None where there is none to check: no such parameter has a gradient.
        """
        # A sparse gradient (a SparseAdam's embedding) by its values: _foreach_norm has no sparse kernel. Coalesced,
        # as SparseAdam reads it: rows looked up twice are summed first. (inf norm: no empty tensor)
        grads = [_values(p.grad) for p in self._unheld_params if p.grad is not None]
        grads = [g for g in grads if g.numel()]
        if not grads:
            return None
        largest = torch.stack([norm.to(self.device) for norm in torch._foreach_norm(grads, math.inf)])
        return ~torch.isfinite(largest).all()

    def _drop_unheld_gradients(self) -> None:
        """Sets the unheld parameters' gradients to ``None`` after an overflow: their optimizer's step skips them."""
        for p in self._unheld_params:
            p.grad = None

    def _refuse_sparse_gradients(self, params: Sequence[nn.Parameter]) -> None:
        """Raises a ValueError naming those of ``params`` (the held ones) whose gradient is sparse.

        The build refuses the held modules that make one (``_SPARSE_TYPES`` with ``sparse=True``), but only the
        backward shows one switched to sparse since (``model.emb.sparse = True``) or a hand-written one
        (``F.embedding(..., sparse=True)``), and ``_foreach_norm`` has no sparse kernel: torch's NotImplementedError
        named no parameter. Called where the statistics' gradient list is built (:meth:`_grad_stats`), whose layout
        check costs about 25 us a step at 200 parameters on a CPU (the statistics' two ``_foreach_norm`` about 1.4 ms).
        On the reference path it comes before the update: nothing is updated, and an fp16 scale is put back as after
        any step that raised before its update. The fused path adds a held parameter's sparse gradient into its dense
        view of the flat buffer and trains as a plain loop would. An unheld parameter's sparse gradient (a second
        optimizer's embedding) is checked by its values (:meth:`_unheld_overflow`), on both paths.
        """
        names = self._names_by_id()
        sparse = [
            names.get(id(p), tuple(p.shape))
            for p in params
            if p.grad is not None and p.grad.layout is not torch.strided
        ]
        raise ValueError(
            f"parameters {sparse[:5]} have sparse gradients (an embedding's sparse=True set after the controller was "
            "built, or F.embedding(..., sparse=True)), which the controller's gradient statistics and non-finite "
            "checks do not take: make them with sparse=False (or freeze them: requires_grad=False)"
        )

    def _undo_init(self) -> None:
        """Removes whatever hooks a constructor that raised had registered already."""
        self._remove_unheld_hooks()
        self.precision.remove()
        if "_step_guard_handle" in self.__dict__:
            self._step_guard_handle.remove()
        if "_count_handle" in self.__dict__:
            self._count_handle.remove()
        if "_scale_handle" in self.__dict__:
            self._scale_handle.remove()
        for handle in self.__dict__.get("_optimizer_hooks", []):
            handle.remove()
        store = self.__dict__.get("store")
        if store is not None:
            store.release()  # the parameters left as views of a store no step will update

    @staticmethod
    def discover(model: nn.Module) -> list[list[nn.Parameter]]:
        """The parameters of each layer of ``model``, for building per-layer optimizer param groups."""
        return layer_parameters(model, [info for _, _, info in find_layers(model)])

    @property
    def fused(self) -> bool:
        """True when the fused Triton step runs the updates."""
        return self.fused_optimizer is not None

    @property
    def layer_param_counts(self) -> list[int]:
        """The parameter elements each layer's updates and gradient statistics cover (``layer_params``).

        A weight tied between layers counts in its first only, a trainable parameter outside the optimizer in none.
        """
        return [sum(p.numel() for p in params) for params in self.layer_params]

    @property
    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """The loss scaler while a layer runs in fp16, else ``None`` (always ``None`` on the fused path)."""
        if not self.precision.needs_grad_scaler or self.fused:
            return None
        if self._grad_scaler is None:
            self._grad_scaler = torch.amp.GradScaler(self.device.type)
        return self._grad_scaler

    # The LR knobs are checked when set, never at a step: a NaN went into the param groups' LRs and the weights on the
    # reference path, and a negative value ran as a negative LR (the fused step's kernel does not check them on a GPU).

    @property
    def lr_scale(self) -> float:
        """The global multiplier on every param group's LR, a finite number > 0."""
        return self._lr_scale

    @lr_scale.setter
    def lr_scale(self, value: float) -> None:
        if not (is_finite_real(value) and value > 0):  # (a bool is no number: True ran as 1.0)
            raise ValueError(f"lr_scale={value!r} must be a finite number > 0")
        self._lr_scale = float(value)

    @property
    def batch_lr_gain(self) -> float:
        """The LR multiplier of the batch size, a finite number >= 0 (0: a schedule's end, ``schedule_gain``)."""
        return self._batch_lr_gain

    @batch_lr_gain.setter
    def batch_lr_gain(self, value: float) -> None:
        if not (is_finite_real(value) and value >= 0):
            raise ValueError(f"batch_lr_gain={value!r} must be a finite number >= 0")
        self._batch_lr_gain = float(value)

    @property
    def lr_factors(self) -> np.ndarray:
        """Per-layer LR factors, float64 ``[n_layers]``, each a finite number >= 0 (1: the group's own LR).

        A read-only view: set them whole (``engine.lr_factors = factors``), which checks them and keeps a copy (an
        entry written in place, ``engine.lr_factors[1] = -3``, would have gone into the LRs unchecked).
        """
        view = self._lr_factors.view()
        view.flags.writeable = False
        return view

    @lr_factors.setter
    def lr_factors(self, value: Sequence[float] | np.ndarray) -> None:
        one_dim = isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim == 1)
        entries = list(value) if one_dim else []
        factors = np.asarray(entries, dtype=np.float64) if all(is_real(entry) for entry in entries) else None
        if factors is None or factors.shape != (self.n_layers,) or not np.all(np.isfinite(factors) & (factors >= 0)):
            raise ValueError(f"lr_factors must be {self.n_layers} finite numbers >= 0, one a layer; got {value!r}")
        self._lr_factors = factors

    def set_precisions(self, precisions: Sequence[Precision | str | int]) -> None:
        """Sets per-layer precisions (all layers, or controllable layers only).

        Raises:
            ValueError: wrong count, unknown precision, one this device cannot run, or not an ordered sequence
                (a dict, a set: ``LayerPrecision.check_ordered``).
        """
        self.precision.check_ordered(precisions)  # before the parse below, which would take a dict's keys
        parsed = [Precision.parse(p) for p in precisions]
        for precision in set(parsed):
            check_precision_supported(precision, self.device)
        self.precision.set(parsed)  # on the fused path the copies follow the map (_copies_follow_map)

    def after_restore(self) -> None:
        """What a rollback (``RollbackGuard``'s ``after_restore``) leaves to redo once the state is back.

        The weight copies (:meth:`refresh_weight_copies`), and on the fused path the param groups' hyperparameters:
        the restored state brought back the copy's momentum, betas and weight decay (``torch.optim`` keeps them in
        its state dict too), and the groups, which the restore leaves alone (an LR or momentum scheduler's, or the
        user's), may have moved since. Read again now, they hold from the next step on, as the groups say.
        """
        self.refresh_weight_copies()
        if self.fused:
            self._reread_group_settings()
            self._refresh_shown_steps()  # the counts came back with the copy

    def scaler_state(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The loss scale and its clean-step count, copied on the device (no sync): what a rollback brings back.

        The skipped steps of the interval that broke the model halved the scale for a cause the copy's state did not
        have (from 65536 to 0.0625 in one 20-step interval): kept after the rollback, small gradients of a layer back
        in fp16 underflowed, and the scale took 2000 clean steps a doubling to grow back. ``None`` on the reference
        path while its ``GradScaler`` has no scale yet: it has scaled no step, and none was loaded (a resumed scale
        is one from the load on).
        """
        if self.fused:
            return self._scale.clone(), self._clean_steps.clone()
        scaler = self._grad_scaler
        if scaler is None or scaler._scale is None or scaler._growth_tracker is None:
            return None
        return scaler._scale.clone(), scaler._growth_tracker.clone()

    def scale_untouched(self) -> bool:
        """Whether the fp16 loss scale is as first made: 2**16, no clean step (no fp16 step has moved it). Syncs."""
        state = self.scaler_state()
        return state is None or (float(state[0]) == SCALE_INITIAL and int(state[1]) == 0)

    def load_scaler_state(self, saved: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Puts back what :meth:`scaler_state` returned, copying it (the same may be put back again)."""
        with torch.no_grad():
            if self.fused:
                assert saved is not None
                self._scale.copy_(saved[0])  # in place: captured graphs read them through their addresses
                self._clean_steps.copy_(saved[1])
            elif saved is None:  # no scale yet at the copy: a fresh scaler's, as the next fp16 step would have made
                self._load_grad_scaler(None)
            elif self._grad_scaler is not None and self._grad_scaler._scale is not None:
                # In place, as on the fused path: a captured graph reads the scale through its address
                self._grad_scaler._scale.copy_(saved[0])
                assert self._grad_scaler._growth_tracker is not None
                self._grad_scaler._growth_tracker.copy_(saved[1])
            else:  # no scale tensor yet: no graph can hold one's address (scale() makes it), so new ones are safe
                scaler = self._grad_scaler or torch.amp.GradScaler(self.device.type)
                scaler._scale, scaler._growth_tracker = saved[0].clone(), saved[1].clone()
                self._grad_scaler = scaler

    def _load_grad_scaler(self, state: Mapping[str, Any] | None) -> None:
        """Loads ``state`` (``GradScaler.state_dict()``'s; None: a fresh scaler's) into the reference path's scaler.

        In place: the scaler and its scale tensor stay the ones a CUDA graph captured at an fp16 step reads through
        their addresses (``StepGraphs`` keys its graphs on the precisions alone). A new scaler made a new scale tensor
        at its next ``scale()``, and the graph replayed the loss times the old, freed one. A scaler that has not made
        its tensors yet (before its first ``scale()``) makes them from the loaded values; with no scaler yet, None
        leaves none (a later fp16 layer makes a fresh one).
        """
        scaler = self._grad_scaler
        if state is None:
            if scaler is None:
                return
            state = torch.amp.GradScaler(self.device.type).state_dict()  # scale 2**16, no clean step
        elif scaler is None:
            scaler = self._grad_scaler = torch.amp.GradScaler(self.device.type)
        scaler.load_state_dict(dict(state))  # GradScaler's load fills the tensors it has in place

    def refresh_weight_copies(self) -> None:
        """Re-derives the 16-bit weight copies from the fp32 weights, each layer's in its type (fused path).

        The fused step keeps the copies of bf16 and fp16 layers current; after the weights change any other
        way (a rollback, loading a checkpoint) this must run before the next forward, which
        :meth:`sync_weight_copies` does by itself. A no-op on the reference path.
        """
        if self.fused:
            self._copy_codes = list(self.precision.precisions)
            self.store.refresh_low_precision([int(p) for p in self._copy_codes])
            self._copies_version = self._weights_version()

    def sync_weight_copies(self) -> bool:
        """Refreshes the 16-bit copies if a weight or the precision map changed since they were last derived.

        A map set on ``engine.precision`` itself, past :meth:`set_precisions`, counts as a change.

        The fused step writes weights through raw pointers and bumps the counters itself, counting its copies as
        current (:meth:`_mark_weights_written`); any other in-place write (``load_state_dict``, ``fill_``, a restore)
        bumps its parameter's counter, but one through ``.data`` (``p.data.clamp_()``) does not: call
        :meth:`refresh_weight_copies` after one. So a sum of the counters the copies have not seen means they are
        stale. Costs one attribute read a parameter; ``TrainingRun`` calls it at each ``step``, ``train_interval``
        and probe (nothing outside can write the weights inside an interval), ``Controller`` before every forward
        of the user's loop.

        Returns:
            Whether the copies were refreshed (always False on the reference path).
        """
        if not self.fused or (
            self._weights_version() == self._copies_version and self.precision.precisions == self._copy_codes
        ):  # a map set on ``precision`` itself, past set_precisions, leaves segments holding other types' bits
            return False
        self.refresh_weight_copies()
        return True

    def _copies_follow_map(self) -> None:
        """Re-derives the 16-bit copies for a map set since they were (``LayerPrecision.set`` calls it, fused path).

        A layer lowered now has a stale copy (the step writes only low layers'), and one switched between bf16 and
        fp16 holds the other type's bits in the shared 16-bit buffer: the next forward would compute on them.
        """
        if self.precision.precisions != self._copy_codes:
            self.refresh_weight_copies()

    def _weights_version(self) -> int:
        # No cheaper signal: each parameter has a version counter of its own (not the flat buffer's), and a user may
        # write one before any forward. A C-level map: 35 us at 598 parameters on a CPU (a generator took 52 us).
        return sum(map(operator.attrgetter("_version"), self._params))

    def _mark_weights_written(self) -> None:
        """Bumps the parameters' version counters after the fused step wrote them through raw pointers.

        Autograd tells a graph saved before an update by those counters: without the bump, a loss built before the
        last step (a GAN's discriminator loss kept across the generator's step) was stepped with gradients of new
        weights through old activations, where the plain loop and the reference path raise "modified by an inplace
        operation". Bumped on a step the device skipped too (telling the two apart would sync), so such a loss is
        refused after any step. The copies, which the step derived from the new weights, stay current: their
        version moves with the bump (one each, parameters keep counters of their own), and
        :meth:`sync_weight_copies` still sees an outside write. One host call a step, outside any captured graph
        (``StepGraphs`` captures the forward and backward; the update runs eagerly).
        """
        torch.autograd.graph.increment_version(self._params)
        self._copies_version += len(self._params)

    def group_lrs(self, batch_lr_gain: float | None = None) -> list[float]:
        """The LR the next update applies to each param group.

        The group's own ``lr`` (as its owner or an LR scheduler left it) times ``lr_scale``, ``batch_lr_gain`` (or the
        gain given: the one the next step will set, during a warm-up) and, for a group with a ``"layer"`` key, that
        layer's factor in ``lr_factors``.
        """
        multiplier = self._lr_scale * (self._batch_lr_gain if batch_lr_gain is None else batch_lr_gain)
        factors = self._lr_factors  # once a call: the property makes a read-only view each time (a step, every group)
        return [
            float(group["lr"]) * multiplier * (float(factors[group["layer"]]) if "layer" in group else 1.0)
            for group in self.optimizer.param_groups
        ]

    @contextlib.contextmanager
    def _scaled_lrs(self) -> Iterator[None]:
        """Has the ``optimizer.step()`` inside apply :meth:`group_lrs`, with the groups holding their own LRs around it.

        A scheduler reads and writes the groups' ``lr``: it must find its own values there. The scaled values go in from
        a step pre-hook run after every other one, and the own values come back in the first post-hook, as on the fused
        path: a user's pre-hook that sets the LR (a warm-up) sets the base the multipliers ride on, and a post-hook's
        write (a decay a step) stays. Set here before ``step()``, a pre-hook's LR was applied without the multipliers
        and a post-hook's was undone. A step that raised or never ran (GradScaler skipped it) gets them back here.
        """
        pre_hooks: Any = self.optimizer._optimizer_step_pre_hooks  # an OrderedDict (typed a dict)
        pre_hooks.move_to_end(self._scale_handle.id)  # last: after pre-hooks registered since
        try:
            yield
        finally:
            self._restore_own_lrs()

    def _apply_scaled_lrs(self) -> None:
        if self._own_lrs is not None:  # the hooks again, inside a subclass's super().step(): scaled once already
            return
        groups = self.optimizer.param_groups
        self._own_lrs = [group["lr"] for group in groups]
        multiplier = self._lr_scale * self._batch_lr_gain
        for group, lr in zip(groups, self.group_lrs(), strict=True):
            own = group["lr"]
            if not isinstance(own, torch.Tensor):
                group["lr"] = lr
                continue
            # A tensor LR stays a tensor of its dtype and device: torch.optim computes with it as a tensor (Adam's step
            # size in float32), and a Python float in its place changed the update by an ulp a step. At a multiplier
            # of 1 it is the group's own object, so the step is the plain loop's (and refuses what it refuses).
            whole = multiplier * (float(self._lr_factors[group["layer"]]) if "layer" in group else 1.0)
            if whole != 1.0:
                group["lr"] = own * whole

    def _restore_own_lrs(self) -> None:
        if self._own_lrs is not None:
            for group, lr in zip(self.optimizer.param_groups, self._own_lrs, strict=True):
                group["lr"] = lr
            self._own_lrs = None

    def backward_and_step(self, loss: torch.Tensor) -> tuple[GradStats, bool]:
        """Backward through ``loss`` (scaled when a layer is fp16), then ``step_after_backward``.

        Returns:
            The gradient statistics and whether the update was skipped.

        Raises:
            ValueError: ``loss`` is not a scalar tensor.
        """
        if loss.dim() != 0:
            raise ValueError(f"loss must be a scalar tensor; got shape {tuple(loss.shape)}")
        self.bind_grads()
        self.scale_loss(loss).backward()
        return self.step_after_backward(loss.detach())

    def bind_grads(self, after_backward: bool = False) -> None:
        """On the fused path: before a backward, checks the parameters still view the flat buffer; after it, binds.

        A user's ``optimizer.zero_grad()`` or ``model.zero_grad()`` sets the gradients to ``None`` by default. They stay
        ``None`` through the backward, which hands over autograd's own tensors, as in a plain loop, with no add
        kernel a parameter into the buffer's views and no hook; the fused step's own call (``after_backward``, before
        the update) copies them into the flat buffer it reads, in one launch, and rebinds the views; a gradient still
        ``None`` then is one this step's backward did not give (``FlatParameterStore.rebind_grads``). In a model of
        large gradients (parameters of 4 MiB or more, 256 MiB together) those parameters' views are bound before the
        backward instead, so that autograd adds into the buffer and they are not held twice at the backward's end
        (``FlatParameterStore.bind_large_grads``; not under ``torch.distributed``, where DDP may write a gradient
        without the hook that tells).
        Nothing to do on the reference path.

        Raises:
            DetachedParametersError: a parameter's ``.data`` was replaced since the engine was built (the model
                moved or cast), naming the parameters; nothing was changed.
        """
        if self.fused:
            try:
                if after_backward:
                    self.store.rebind_grads(after_backward)
                elif world_size() > 1:
                    # DDP's reducer writes the averaged gradient of a parameter this process's backward did not reach
                    # (find_unused_parameters) into its .grad without the hook that would tell: bound, it read as not
                    # given here and given elsewhere, and the replicas parted. None, it is copied in after.
                    self.store.check_attached()
                else:
                    self.store.bind_large_grads()
            except DetachedParametersError as error:
                names = self._names_by_id()
                raise DetachedParametersError(error.params, [names.get(id(p), "?") for p in error.params]) from None

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` times the current loss scale while a layer is fp16 (else ``loss``): backward this.

        For callers that run their own backward passes (gradient accumulation), then ``step_after_backward``, or
        :meth:`unscale_pending_grads` where no step will come.
        """
        if not self.precision.needs_grad_scaler:
            return loss
        self._watch_unheld_since_built()
        if self.fused:
            self._backward_scale = self._scale
            return loss * self._scale
        scaler = self.grad_scaler
        assert scaler is not None
        scaled = scaler.scale(loss)
        self._backward_scale = scaler._scale  # GradScaler's tensor, made by scale()
        return scaled

    def unscale_pending_grads(self) -> None:
        """Divides the gradients of :meth:`scale_loss` backwards that no step took by their loss scale.

        For a caller that stops between those backward passes and the step (gradient accumulation left part-way):
        the optimizer's ``.grad`` are then in the loss's own units, as after ``GradScaler.unscale_``, and a plain
        ``optimizer.step()`` takes them as a plain loop's. On both paths they are the fp32 parameters' gradients (on
        the fused one autograd's own tensors where a ``zero_grad()`` set them to ``None``, else views of the flat
        buffer; a 16-bit weight copy's gradient is cast to fp32 on its way there).
        Trainable parameters outside the optimizer had theirs unscaled as autograd made them. Gradients that
        overflowed stay inf or NaN. A no-op where no scaled backward is pending (no layer in fp16, or a step since).
        """
        scale, self._backward_scale = self._backward_scale, None
        if scale is None:
            return
        unscaled_already = {id(p) for p in self._unheld_params}  # (a param group added since may hold them)
        grads = [
            p.grad
            for group in self.optimizer.param_groups
            for p in group["params"]
            if p.grad is not None and id(p) not in unscaled_already
        ]
        if grads:
            torch._foreach_mul_(grads, scale.reciprocal())  # as unscale_ and the fused step: times the reciprocal

    def step_after_backward(self, loss: torch.Tensor | float) -> tuple[GradStats, bool]:
        """Unscale, statistics and update for gradients already accumulated from ``scale_loss`` backwards.

        Args:
            loss: the step's loss value (only checked for being finite).

        Returns:
            The gradient statistics and whether the update was skipped (a non-finite loss or gradient).
        """
        if self.fused:
            stats, skipped = self._fused_step(torch.as_tensor(loss, device=self.device))
            # Host-device sync: callers want a bool. The update itself was already skipped on the device.
            return stats, bool(skipped)
        return self._reference_step(loss)

    def step_after_backward_deferred(self, loss: torch.Tensor) -> tuple[GradStats, torch.Tensor]:
        """``step_after_backward`` without a host-device sync on the fused path.

        Returns:
            The gradient statistics and a 0-dim bool device tensor, True when the update was skipped. On
            the fused path the skip is decided on the device from the gradients and the loss; the reference
            path decides on the host as ``step_after_backward`` does (a sync, free on a CPU) and returns its
            answer as a tensor.
        """
        if self.fused:
            return self._fused_step(loss)
        stats, skipped = self._reference_step(loss)
        return stats, torch.tensor(skipped)

    def _reference_step(self, loss: torch.Tensor | float) -> tuple[GradStats, bool]:
        self.zero_pending = True  # until the zeroing below has run
        self._backward_scale = None  # the step's backward passes are done: a later backward is not scaled
        self.update_reached = self.update_started = False
        self.last_grad_stats = None
        scaler = self.grad_scaler
        unscaled = finished = False
        try:  # (the check inside: a refused step's gradients are zeroed below, not added to the next step's)
            self._check_optimizer_params()
            self._drop_frozen_gradients()
            # Another optimizer's gradients (already unscaled as autograd made them), in every precision. Host-device
            # sync: the reference path decides its skip on the host.
            overflow = self._unheld_overflow()
            unheld_overflow = overflow is not None and bool(overflow)
            if scaler is not None:
                scaler.unscale_(self.optimizer)
                unscaled = True
                if unheld_overflow:  # another optimizer's gradients overflowed: the scale backs off for them too
                    self._record_overflow(scaler)
            overflow_before = False
            if self.grad_transform is not None:
                # The overflow before the transform, as unscale_ records it: a clamp turns an infinite gradient finite
                # (host-device sync: the reference path decides its skip on the host)
                overflow_before = bool(self._grad_stats(abs_max=False)[0].nonfinite.sum().item() > 0)
                self.grad_transform()
                # And after it: another optimizer's gradient it made non-finite, or made (a parameter whose .grad was
                # None), counts as theirs did
                overflow = self._unheld_overflow()
                if not unheld_overflow and overflow is not None and bool(overflow):  # host-device sync, as above
                    unheld_overflow = True
                    if scaler is not None:
                        self._record_overflow(scaler)
            stats, norms, groups = self._grad_stats(grouped=self.max_grad_norm is not None, abs_max=self.track_abs_max)
            self.last_grad_stats = stats  # for a caller whose step() raised in a post-hook, after the update
            # Host-device sync (reference path): the skip is decided on the host.
            skipped = bool(stats.nonfinite.sum().item() > 0) or not math.isfinite(float(loss)) or unheld_overflow
            skipped = skipped or overflow_before
            # Under DDP every process skips where one must: its loss is its own (a NaN term without a gradient leaves
            # the all-reduced gradients finite), and an update taken by some replicas only would part them for good.
            skipped = any_rank(skipped, self.device)
            if skipped:  # the batch is bad for the second optimizer too: its step() skips what it would have NaN'd
                self._drop_unheld_gradients()
            else:
                if self.max_grad_norm is not None:
                    self._clip_gradients(norms, groups)
                # With a scaler, step() would skip a non-finite gradient by itself, but not a non-finite
                # loss with finite gradients: decide here for both.
                with self._scaled_lrs():
                    self._stepping = True
                    try:
                        if scaler is not None:
                            scaler.step(self.optimizer)
                        else:
                            self.optimizer.step()
                    finally:
                        self._stepping = False
                        if self.update_started and not self.update_reached:
                            # The update raised part-way (AdamW's step counts and some parameters moved): it counts as
                            # applied, as its batch counts as trained on. Left out, the interval read it as a skipped
                            # step, an overflow: an LR cut, and no fresh rollback copy. (The fused path's device
                            # counter already has an update whose kernel ran.)
                            self._reference_applied += 1
            finished = True
        finally:  # also after a step that raised (a user's step hook): the next step starts clean
            if unscaled:
                assert scaler is not None
                scale, tracker = scaler._scale, scaler._growth_tracker
                held = None
                if not (finished or self.update_reached) and scale is not None and tracker is not None:
                    held = scale.clone(), tracker.clone()
                scaler.update()  # unscale_() recorded the overflow check: the scale backs off on overflow
                # An update that did not go in (a step pre-hook raised) is no clean step: GradScaler counted it, and
                # the scale would grow a step early. A back-off stays. (In place: update() keeps both.) Host-device
                # sync on this error path only.
                if held is not None and scale is not None and tracker is not None and bool(scale >= held[0]):
                    scale.copy_(held[0])
                    tracker.copy_(held[1])
            self.zero_grad()
        return stats, skipped

    def _drop_frozen_gradients(self) -> None:
        """Sets to ``None`` the gradients of the held parameters frozen now (``requires_grad_(False)``; reference path).

        The engine zeroes gradients in place, so a parameter frozen between steps still holds a zero gradient, which
        ``optimizer.step()`` took for one: weight decay and momentum (Adam's moments, its step count) moved it on. A
        plain loop's ``zero_grad()`` sets it to ``None``, and the step leaves the parameter and its state alone.
        Unfrozen, it gets a gradient again at its next backward. (One attribute read a parameter: about 12 us a step at
        200 parameters on a CPU.) The fused path tells them apart in ``FlatParameterStore.params_without_grad``.
        """
        for p in self._params:
            if not p.requires_grad and p.grad is not None:
                p.grad = None

    def _record_overflow(self, scaler: torch.amp.GradScaler) -> None:
        """Marks the unscaled step as overflowed, as ``unscale_`` marks it: ``update()`` backs the scale off."""
        for found in scaler._per_optimizer_states[id(self.optimizer)]["found_inf_per_device"].values():
            found.fill_(1.0)

    def applied_steps(self) -> int:
        """Optimizer updates applied so far: steps skipped for a non-finite gradient or loss do not count.

        On the fused path this reads the optimizer's device counter (a host-device sync; a rollback, which
        restores the optimizer's state, restores it too); on the reference path it is a host count, which
        a rollback leaves alone. Differences over an interval give its skipped steps without recording each. An update
        that raised part-way (``update_started`` without ``update_reached``) counts: it is no skip (on the fused path
        the counter has it once the update kernel ran).
        """
        if self.fused:
            return int(self.fused_optimizer.step_count.item())  # host-device sync
        return self._reference_applied

    def zero_grad(self, views_bound: bool = False) -> None:
        """Zeros every gradient in place (the fused path's ``.grad`` tensors are views that must stay; other ones go).

        ``views_bound``: the fused step's own zeroing after its update, whose gradients it rebound
        (``FlatParameterStore.zero_grad``).
        """
        if self.fused:
            self.store.zero_grad(views_bound)
        else:
            self.optimizer.zero_grad(set_to_none=False)
        self.zero_pending = False

    def grad_stats(self) -> GradStats:
        """Per-layer statistics of the current (unscaled) gradients, ``abs_max`` included whatever ``track_abs_max``.

        Norms and maxima come from two multi-tensor kernels (``torch._foreach_norm``), whatever the number
        of parameters. Non-finite elements are counted exactly, but only in the parameters whose norm is non-finite;
        finding those takes one host-device sync, which ``backward_and_step`` needs anyway to decide the skip.
        """
        return self._grad_stats()[0]

    def _grad_stats(
        self, grouped: bool = False, abs_max: bool = True
    ) -> tuple[GradStats, list[torch.Tensor], list[list[int]] | None]:
        """``grad_stats()``, the per-parameter gradient norms it is taken from, and the gradients' grouping, or None.

        The norms are each in its gradient's dtype (``_foreach_norm`` gives each in its tensor's), so that
        ``_clip_gradients`` reuses them: a float64 model is clipped from float64 norms, as torch clips it (float32 ones
        give a coefficient ~1e-9 off). ``grouped`` (a step that clips) takes them as
        ``clip_grad_norm_`` does, one ``_foreach_norm`` per device and dtype, and returns the grouping, the parameters'
        positions by their gradients' device and dtype, for the clip's order. Else the grouping, a Python pass over
        the parameters (``_device_dtype_groups``), is not taken: one ``_foreach_norm`` over all. ``abs_max=False``
        leaves out the maxima (None) and their pass over every gradient, as costly as the norms' on a CPU. The
        statistics are float32.
        """
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params]
        if any(g.layout is not torch.strided for g in grads):  # _foreach_norm has no sparse kernel
            self._refuse_sparse_gradients(self._params)
        groups = _device_dtype_groups(grads) if grouped else None
        own_norms = list(torch._foreach_norm(grads)) if groups is None else _norms_by_device_and_dtype(grads, groups)
        # One cast after the stack (it promotes mixed dtypes exactly), not one a norm: 0.3 us each on a CPU
        norms = torch.stack(own_norms).float()
        # A non-finite element makes its gradient's 2-norm non-finite (squares are not negative: nothing cancels an
        # infinity, and a NaN stays one), so the norms find every gradient to count. A norm that overflows from finite
        # elements (1e20s in float32) is found too, and counts none.
        suspect = ~torch.isfinite(norms)
        bad = torch.zeros_like(norms)
        if bool(suspect.any()):  # host-device sync: once per step (see above); rare slow path below
            for i in suspect.nonzero().flatten().tolist():
                bad[i] = (~torch.isfinite(grads[i])).sum()
        # float32 as the norms, whatever the default dtype (a float64 default raises in index_add)
        zeros = torch.zeros(self.n_layers, device=self.device, dtype=torch.float32)
        sq_sum = zeros.index_add(0, self._layer_index, norms.square())
        nonfinite = zeros.index_add(0, self._layer_index, bad)
        largest = None
        if abs_max:
            finite_max = [g if g.numel() else g.new_zeros(1) for g in grads] if self._has_empty_params else grads
            maxes = torch.stack(torch._foreach_norm(finite_max, math.inf)).float()
            largest = zeros.scatter_reduce(0, self._layer_index, maxes, "amax", include_self=True)
        return GradStats(sq_sum, largest, nonfinite), own_norms, groups

    def _clip_gradients(self, norms: list[torch.Tensor], groups: list[list[int]] | None) -> None:
        """``torch.nn.utils.clip_grad_norm_(params, max_grad_norm)`` from the per-parameter norms already taken.

        ``params`` are the optimizer's parameters, of which those with a gradient: a parameter the backward did not
        reach after a user's ``zero_grad()`` (``None``) is left out of the total, as torch leaves it out (its norm of
        0 in the vector changed the total's rounding once there were enough parameters: not torch's bits). The norms
        are in their gradients' dtypes and stacked in torch's order (grouped by device and dtype, as torch groups
        them), so the total and the coefficient are torch's, in its dtype (float64 where a gradient is). ``groups`` is
        ``_grad_stats(grouped=True)``'s grouping of every parameter's gradient: torch's own where every one has a
        gradient (the usual step), else taken again for those present (torch orders the groups of the tensors it is
        given).
        """
        assert self.max_grad_norm is not None and groups is not None
        present = [i for i, p in enumerate(self._params) if p.grad is not None]
        grads = [p.grad for p in self._params if p.grad is not None]
        if not grads:
            return
        if len(grads) != len(self._params):
            groups = _device_dtype_groups(grads)
        order = [present[j] for group in groups for j in group]
        total = torch.linalg.vector_norm(torch.stack([norms[i].to(grads[0].device) for i in order]))
        coef = torch.clamp(self.max_grad_norm / (total + 1e-6), max=1.0)  # as torch's: no sync, no branch
        torch._foreach_mul_(grads, coef)

    def second_moment_diagonal(self) -> list[torch.Tensor | None]:
        """Per layer, the optimizer's flat bias-corrected second moment of the gradient, or None.

        Adam's ``exp_avg_sq / (1 - beta2**step)`` is the EMA of the squared mini-batch gradient: the
        diagonal of the mini-batch empirical Fisher, smoothed over about ``1 / (1 - beta2)`` steps, which
        the signals reuse instead of computing it again. None for a layer where the optimizer keeps no
        such state (SGD, or before the layer's first update), on both update paths. Allocates one flat copy per
        layer; no host-device sync on the reference path (Adam keeps ``step`` on the host unless ``capturable``),
        one on the fused path (its per-layer step counts).
        """
        if self.fused:
            optimizer = self.fused_optimizer
            if getattr(optimizer, "exp_avg_sq", None) is None:
                return [None] * self.n_layers
            steps = optimizer.layer_step_counts.tolist()  # host-device sync: once per round
            return [  # the parameters' own elements, in their order (a layer's segment holds padding too)
                torch.cat([view.reshape(-1) for view in views]) / max(1.0 - optimizer.options.beta2**n, 1e-12)
                # None, as on the reference path, for a layer the optimizer holds nothing of (a head fine-tuned alone)
                # and one yet to take a step (the zeros its moment starts from are no measurement).
                if n > 0 and (views := self.store.param_views(optimizer.exp_avg_sq, i))
                else None
                for i, n in enumerate(steps)
            ]
        diagonals: list[torch.Tensor | None] = []
        for params in self.layer_params:
            parts: list[torch.Tensor] | None = []
            for p in params:
                state = self.optimizer.state.get(p, {})
                if "exp_avg_sq" not in state or parts is None:
                    parts = None
                    continue
                beta2 = self._group(p)["betas"][1]
                bias = 1.0 - beta2 ** float(state.get("step", 1))
                parts.append(state["exp_avg_sq"].detach().reshape(-1).float() / max(bias, 1e-12))
            diagonals.append(torch.cat(parts) if parts else None)
        return diagonals

    def grad_mean_sq_norm(self) -> np.ndarray:
        """Per layer, ``|E[g]|^2``: the squared norm of the optimizer's running mean of the gradient.

        Reuses the optimizer's state, so it costs no extra pass over the gradients: Adam's ``exp_avg``
        is the EMA of ``g`` itself (bias-corrected); SGD's momentum buffer ``buf = mu * buf + (1 - d) * g`` settles at
        ``E[g] (1 - d) / (1 - mu)`` (``d`` the dampening; the steady state: its first ``~1 / (1 - mu)`` steps, from
        ``buf = g``, read low, on both paths alike). Layers with no state yet (before the first update), and SGD with
        ``dampening=1`` (the buffer keeps only the first gradient), report NaN.
        """
        if self.fused:
            return self._fused_mean_sq_norm()
        per_param: list[torch.Tensor] = []
        for p in self._params:
            state = self.optimizer.state.get(p, {})
            group = self._group(p)
            if "exp_avg" in state:
                bias = 1.0 - group["betas"][0] ** float(state.get("step", 1))
                per_param.append(state["exp_avg"].float().square().sum() / max(bias, 1e-12) ** 2)
            elif state.get("momentum_buffer") is not None and "dampening" in group:  # SGD's (RMSprop's is not)
                factor = _sgd_mean_factor(group["momentum"], group["dampening"])
                per_param.append(state["momentum_buffer"].float().square().sum() * factor**2)
            else:
                per_param.append(torch.tensor(math.nan, device=self.device))
        sums = torch.zeros(self.n_layers, device=self.device, dtype=torch.float64)
        sums.index_add_(0, self._layer_index, torch.stack(per_param).double())
        return sums.cpu().numpy()  # host-device sync: once per decision

    def remove(self) -> None:
        """Removes the engine's hooks from the model and the optimizer; on the fused path, hands the state back.

        The ``torch.optim`` object is left holding the fused step's moments and step count, so training can go on
        with ``optimizer.step()``. On the fused path the parameters (the same objects), their gradients and those
        moments get storage of their own, equal bit for bit: as views of the flat buffers, ``torch.save`` of one layer
        would write every layer, and any one of them kept would keep the buffers alive. The store's flat buffers
        (parameters, gradients, 16-bit copies) are freed as they are copied out; the fused optimizer's moments stay
        with the engine, whose :meth:`state_dict` still reads them, as they were at this call (their copies in the
        optimizer cost their size again until the engine is freed). Removing twice is harmless.
        """
        self.precision.remove()
        self._remove_unheld_hooks()
        self._step_guard_handle.remove()
        self._count_handle.remove()
        self._scale_handle.remove()
        if self.fused and self._optimizer_hooks:
            self._take_state_edits()  # a state cleared since the last step is what the optimizer is left with
            # No view to keep from here: an export that raised is made again from the state as it stood
            self._live_state: dict[Any, Any] | None = None
        if self.fused:
            # The store's flat buffers go before the moments are copied out: a lower peak than copying all at once
            self.precision.use_weight_copies(None)  # views of the flat 16-bit buffer, which no forward reads now
            _release_store(self.fused_optimizer, self.store)
        if self.fused and self._optimizer_hooks:
            # Exported before the hooks go: an export that raised part-way (out of memory in a copy) is made again by
            # the next remove(), not left with part of the state in the optimizer
            self._export_optimizer_state(copies=True)
            for handle in self._optimizer_hooks:
                handle.remove()
            self._optimizer_hooks = []
        if self._hand_back_when_collected is not None:
            self._hand_back_when_collected.detach()  # handed back here
            self._hand_back_when_collected = None

    @property
    def state_holder(self) -> Any:
        """The object holding the optimizer state: the fused optimizer, or the torch one."""
        return self.fused_optimizer if self.fused else self.optimizer

    def state_dict(self) -> dict[str, Any]:
        """The training state the engine holds, for a checkpoint (the model's weights are the model's own).

        The optimizer's state is taken from where the updates keep it (``state_holder``): on the fused path that
        is the fused optimizer (the ``torch.optim`` object never steps; its ``state_dict()`` shows views of the same).
        Like ``torch.optim``, its tensors are returned by reference. With it: the loss scaler's state, the
        layers' precisions, the LR multiplier, the batch's LR gain and the per-layer LR factors. On the fused path
        also ``torch_optimizer``, the ``torch.optim`` object's ``state_dict()`` (views of the same buffers, which
        ``torch.save`` writes once), from which the reference path resumes.
        """
        if self.fused:
            self._take_state_edits()  # a state the user cleared since the last step is the one to save
        state: dict[str, Any] = {
            "fused": self.fused,
            "optimizer_type": type(self.optimizer).__name__,
            "optimizer": self.state_holder.state_dict(),
            "precisions": [int(p) for p in self.precision.precisions],
            "lr_scale": self.lr_scale,
            "batch_lr_gain": self.batch_lr_gain,
            "lr_factors": [float(f) for f in self.lr_factors],
            "scaler": None,
        }
        if self.fused:
            state["scaler"] = {"scale": self._scale.clone(), "clean_steps": self._clean_steps.clone()}
            state["torch_optimizer"] = self.optimizer.state_dict()
        elif self._grad_scaler is not None:
            state["scaler"] = self._grad_scaler.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores ``state_dict()``'s output into an engine built for the same model and optimizer.

        A state taken on the other path loads too: a reference-path state (a CPU run's) into the fused step, which
        adopts its ``torch.optim`` state and takes its ``GradScaler``'s scale and growth count; a fused-path state
        into the reference path from its ``torch_optimizer`` entry, the scale going to a ``GradScaler``. Everything
        is checked before anything is loaded: a refused state leaves the engine, its optimizer and its loss scaler
        as they were.

        Raises:
            ValueError: a state that is not ``state_dict()``'s (a missing key, named), a fused-path state without
                ``torch_optimizer`` (an older file's) into the reference path, a state for another optimizer
                type, number of layers or other parameter shapes, or holding values the engine does not take (a
                precision this device cannot run, a non-finite or negative LR multiplier, another number of LR
                factors, a loss scale that is not a finite number > 0, optimizer state that is not tensors, numbers
                or None or that holds NaN or inf (a moment: the parameter and field named), a param group without one
                of the optimizer's hyper-parameters or with one of another kind or range (``lr`` NaN, ``betas`` of one
                number: the group, field and value named); the message says which).
        """
        plan = self._checked_state(state)
        if plan.across or not self.fused:
            self.optimizer.load_state_dict(plan.optimizer_state)
        else:
            self.state_holder.load_state_dict(plan.optimizer_state)
            self._refresh_shown_steps()
            if plan.groups is not None:  # the saved LRs and hyperparameters (a scheduler's), as the reference path's
                for group, saved in zip(self.optimizer.param_groups, plan.groups, strict=True):
                    group.update({key: value for key, value in saved.items() if key != "params"})
                self._read_factor_index()
                self._reread_group_settings()  # the fused step's settings follow the groups, as at a step
        self.set_precisions(plan.precisions)
        self.lr_scale, self.batch_lr_gain, self.lr_factors = plan.lr_scale, plan.batch_lr_gain, plan.lr_factors
        if self.fused:
            assert plan.scaler is not None
            with torch.no_grad():  # in place: captured graphs read them through their addresses
                self._scale.copy_(torch.as_tensor(plan.scaler["scale"], dtype=torch.float32))
                # A count at or past the interval (a hand-made checkpoint's: the rule resets it there) grows the scale
                # at the next clean step; GradScaler's kernel, which grows on reaching it exactly, would never.
                clean_steps = min(int(plan.scaler["clean_steps"]), _SCALE_INTERVAL - 1)
                self._clean_steps.copy_(torch.as_tensor(clean_steps, dtype=torch.int32))
            self.refresh_weight_copies()  # the weights were loaded outside the fused step
        else:
            self._load_grad_scaler(None if plan.grad_scaler is None else plan.grad_scaler.state_dict())
            scaler = self._grad_scaler
            if plan.grad_scaler is not None and scaler is not None and scaler.is_enabled() and scaler._scale is None:
                # GradScaler makes its scale tensor at its first scale(): until then scaler_state() finds none, and a
                # rollback to the copy taken at the resume would drop the loaded scale (back to 65536).
                scaler._lazy_init_scale_growth_tracker(self.device)

    def check_state_dict(self, state: Mapping[str, Any]) -> None:
        """Runs ``load_state_dict``'s checks on ``state`` and loads nothing: for a caller that loads more beside it.

        Raises:
            ValueError: as ``load_state_dict`` would.
        """
        self._checked_state(state)

    def _checked_state(self, state: Mapping[str, Any]) -> _LoadPlan:
        """``load_state_dict``'s checks; returns what it loads."""
        if not isinstance(state, Mapping):
            raise ValueError(
                f"an engine state is the dict StepEngine.state_dict() returned; got {type(state).__name__}"
            )
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise ValueError(
                f"the engine state lacks {', '.join(map(repr, missing))}: it is not (all of) the dict "
                "StepEngine.state_dict() returned"
            )
        across = bool(state["fused"]) != self.fused
        saved_type, this_type = state.get("optimizer_type"), type(self.optimizer).__name__  # (None: saved before it)
        if saved_type is not None and saved_type != this_type:
            raise ValueError(
                f"the checkpoint's optimizer is {saved_type}; this controller's is {this_type}: its state (momentum "
                "buffers, moments) would not fit. Build the controller with the optimizer the run was saved with"
            )
        if not isinstance(state["precisions"], (list, tuple)):
            raise ValueError(
                f"the checkpoint's precisions {state['precisions']!r} are not a list of {self.n_layers} precision codes"
            )
        if len(state["precisions"]) != self.n_layers:
            # The checkpoint names no layers: its count, and this model's modules with parameters but no layer here
            not_held = _modules_not_held(self.model, self.layers)
            this = (
                f"this controller has {self.n_layers}, the model's layers that were trainable when it was built "
                f"(not {not_held[:5]}{' ...' if len(not_held) > 5 else ''}, frozen then)"
                if not_held
                else f"this model has {self.n_layers}"
            )
            raise ValueError(
                f"the checkpoint has {len(state['precisions'])} layers; {this}. A layer frozen when the controller is "
                "built is not one of its layers: build it with the same model and parameters trainable as the run "
                "that saved the checkpoint, load the checkpoint, then freeze"
            )
        precisions = [Precision.parse(p) for p in state["precisions"]]
        for precision in set(precisions):
            check_precision_supported(precision, self.device)
        lr_scale = _checked_multiplier("lr_scale", state["lr_scale"])
        # 0 at a schedule's end (training.schedule_gain), where a run's last checkpoint is saved
        batch_lr_gain = _checked_multiplier("batch_lr_gain", state["batch_lr_gain"], zero_allowed=True)
        try:
            lr_factors = np.asarray(state["lr_factors"], dtype=np.float64)
        except (TypeError, ValueError):  # text, or entries that are not numbers
            lr_factors = np.full(0, np.nan)
        if lr_factors.shape != (self.n_layers,) or not (np.isfinite(lr_factors).all() and (lr_factors >= 0).all()):
            raise ValueError(
                f"the checkpoint's lr_factors {state['lr_factors']!r} are not {self.n_layers} finite numbers >= 0, "
                "one a layer"
            )
        scaler = state["scaler"]
        if scaler is not None and not isinstance(scaler, Mapping):
            raise ValueError(f"the checkpoint's scaler is {type(scaler).__name__}, not a dict (or None)")
        if across:  # in torch.optim's layout; on the fused path the optimizer's load hook copies it into the buffers
            optimizer_state = state.get("torch_optimizer") if state["fused"] else state["optimizer"]
            if optimizer_state is None:
                raise ValueError(
                    "the checkpoint was made with the fused step, before its state was also saved in torch.optim's "
                    "layout, and this engine runs the reference path: resume it on a GPU with a fused step"
                )
        else:
            optimizer_state = state["optimizer"]
        if across or not self.fused:  # torch.optim checks the groups' sizes, not shapes (the fused step its own)
            _check_state_shapes(self.optimizer, optimizer_state)
            _check_layer_keys(optimizer_state["param_groups"], self.n_layers, "the checkpoint's ")
            self._check_finite_optimizer_state(optimizer_state)
        if self.fused and not across:  # the fused optimizer's own state: read by key in its load (an AttributeError)
            _require_keys("optimizer state", optimizer_state, ("kind", "options", "layer_numels", "steps"))
            # Its types, shapes and counts, before anything loads: a NaN or negative count, a damaged layout, a list
            # for a buffer were refused (or not) by its load, after the controller's own state had loaded.
            self.fused_optimizer.check_state_dict(optimizer_state, param_names=self._store_param_names())
        if self.fused and across:  # a reference run's groups the fused step cannot run: refused before the load,
            # which replaced the groups and moments before its post-hook refused them (every later step raised)
            try:
                self._check_group_settings(optimizer_state["param_groups"])
            except KeyError as error:
                raise ValueError(f"the checkpoint's param groups lack {error}: they are not torch.optim's") from None
        groups = None
        if self.fused and not across and state.get("torch_optimizer") is not None:
            # The fused optimizer's own state holds no param group: a fused resume kept the new run's LRs (a
            # scheduler's moves lost) while its kernel took the saved momentum and decay.
            _check_state_shapes(self.optimizer, state["torch_optimizer"])
            groups = state["torch_optimizer"]["param_groups"]
            _check_layer_keys(groups, self.n_layers, "the checkpoint's ")
            try:  # what the fused step would refuse at the next step is refused before anything loads
                self._check_group_settings(groups)
            except KeyError as error:
                raise ValueError(f"the checkpoint's param groups lack {error}: they are not torch.optim's") from None
        if self.fused:
            if across:  # GradScaler's state (empty when it never scaled a step): the same rule's scale and count
                scaler = {
                    "scale": (scaler or {}).get("scale", SCALE_INITIAL),
                    "clean_steps": (scaler or {}).get("_growth_tracker", 0),
                }
            scaler = _check_scaler(scaler, _FUSED_SCALER_KEYS)
            grad_scaler = None
        elif scaler and across:  # the fused step's scale and clean-step count, as GradScaler keeps them
            fused_scaler = _check_scaler(scaler, _FUSED_SCALER_KEYS)
            grad_scaler = torch.amp.GradScaler(self.device.type)
            grad_scaler.load_state_dict(
                {"scale": fused_scaler["scale"], "growth_factor": _SCALE_GROWTH, "backoff_factor": _SCALE_BACKOFF,
                 "growth_interval": _SCALE_INTERVAL, "_growth_tracker": fused_scaler["clean_steps"]}
            )  # fmt: skip
        elif scaler:
            grad_scaler = torch.amp.GradScaler(self.device.type)
            grad_scaler.load_state_dict(_check_scaler(scaler, _GRAD_SCALER_KEYS))
        else:  # saved with no loss scaler: a later fp16 layer starts a fresh one, as in the saved run
            grad_scaler = None
        return _LoadPlan(
            across, optimizer_state, groups, precisions, lr_scale, batch_lr_gain, lr_factors, scaler, grad_scaler
        )

    def _check_finite_optimizer_state(self, saved: Mapping[str, Any]) -> None:
        """Raises a ValueError naming the values of ``saved`` (``torch.optim``'s layout, shapes checked) not finite.

        Moments holding NaN or inf: the first update after a resume, its loss finite on the loaded weights, writes them
        into the weights, and it confirms the resume's rollback copy as good, to which every later failure then rolls
        back. One sync a device.
        """
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        position = _saved_positions(saved["param_groups"], "the checkpoint's ")  # checked: state keys are listed
        names = self._names_by_id()
        entries = [
            (int(index), field, value)
            for index, entry in saved["state"].items()
            for field, value in entry.items()
            if isinstance(value, torch.Tensor) or is_real(value)
        ]
        tensors = [value for _, _, value in entries if isinstance(value, torch.Tensor)]
        finite = iter(_finite_flags(tensors))
        broken = [
            f"{field!r} of parameter {index} ({names.get(id(params[position[index]]), '?')})"
            for index, field, value in entries
            if not (next(finite) if isinstance(value, torch.Tensor) else is_finite_real(value))
        ]
        if broken:
            raise ValueError(
                f"the checkpoint's optimizer state holds NaN or infinite values: {', '.join(broken[:3])}"
                f"{' ...' if len(broken) > 3 else ''}. The first update after the resume would write them into the "
                "weights; resume from an earlier checkpoint"
            )

    def _names_by_id(self) -> dict[int, str]:
        """Each parameter's name in ``model.named_parameters()``, by the parameter's ``id``."""
        return {id(p): name for name, p in self.model.named_parameters()}

    def _store_param_names(self) -> list[str]:
        """The names of the fused store's parameters (``model.named_parameters()``'s), in the store's order."""
        names = self._names_by_id()
        return [names.get(id(p), "?") for layer in self.store.layers for p in layer]

    @property
    def loss_scale(self) -> float:
        """The current loss scale (1.0 while no layer is fp16). Reading it syncs with the device."""
        if self.fused:
            return float(self._scale) if self.precision.needs_grad_scaler else 1.0
        scaler = self.grad_scaler
        return float(scaler.get_scale()) if scaler is not None else 1.0

    # --------------------------------------------------------------------------------- fused path

    def _init_fused(self) -> None:
        from triaccel_rl.kernels import FlatParameterStore, FusedAdamW, FusedSGD, SGDOptions

        # Param groups of one weight decay share a class; a layer whose parameters are in groups of different
        # decays (none on biases and norms, the usual AdamW recipe) has each class's parameters in its own segments.
        self._decay_classes = _decay_classes(self.optimizer)
        self._built_decays = tuple(float(group["weight_decay"]) for group in self.optimizer.param_groups)
        classes = [[self._decay_classes[self._group_index[id(p)]] for p in params] for params in self.layer_params]
        # One 16-bit buffer: each layer's segment holds the bits of the type it computes in.
        self.store = FlatParameterStore(self.layer_params, shared_copy=True, groups=classes)
        this = weakref.ref(self)  # the model's hooks hold the precision: a dropped engine must not live on through it

        def copies_follow_map() -> None:
            engine = this()
            if engine is not None:
                engine._copies_follow_map()

        self.precision.use_weight_copies(self._weight_copies(), copies_follow_map)
        self._group_decays: tuple[float, ...] | None = None  # the param groups' decays the fused step applies
        options = _fused_options(self.optimizer, self._class_decays())  # each a Python float (torch takes tensors)
        if isinstance(options, SGDOptions):
            self.fused_optimizer = FusedSGD(
                self.store,
                momentum=options.momentum,
                dampening=options.dampening,
                weight_decay=options.weight_decay,
                nesterov=options.nesterov,
            )
        else:
            self.fused_optimizer = FusedAdamW(
                self.store,
                beta1=options.beta1,
                beta2=options.beta2,
                eps=options.eps,
                weight_decay=options.weight_decay,
            )
        self._track_param_groups()
        self._group_lrs: tuple[float, ...] | None = None  # the param groups' LRs _layer_base was taken from
        self._read_group_lrs()
        self._factors = torch.ones(self.n_layers, dtype=torch.float32, device=self.device)
        self._codes = torch.zeros(self.n_layers, dtype=torch.int32, device=self.device)
        self._scale = torch.full((), SCALE_INITIAL, dtype=torch.float32, device=self.device)
        self._clean_steps = torch.zeros((), dtype=torch.int32, device=self.device)
        self._last_factors: np.ndarray | None = None
        self._last_codes: list[Precision] | None = None
        # bf16/fp16 layers read the 16-bit copies the fused step writes: no cast kernel in their forward.
        self.refresh_weight_copies()
        # AdamW's ``step`` a parameter in optimizer.state, and its layer's count each is copied from (_show_state)
        self._live_steps: list[torch.Tensor] = []
        self._step_sources: list[torch.Tensor] = []
        self._stored_ids = frozenset(id(param) for params in self.store.layers for param in params)
        self._adopt_optimizer_state()
        # The user's optimizer never steps on this path, but it stays their checkpoint's source and target.
        this = weakref.ref(self)

        def export(_: torch.optim.Optimizer) -> None:
            engine = this()
            if engine is not None:
                engine._take_state_edits()
                engine._export_optimizer_state()

        def show(_: torch.optim.Optimizer, _state_dict: dict[str, Any]) -> None:
            engine = this()
            if engine is not None and engine._live_state is not None:  # (not once remove() has begun)
                engine._show_state(engine._live_full)  # new entries: the dict returned keeps torch.optim's layout

        def check(_: torch.optim.Optimizer, state: dict[str, Any]) -> None:
            engine = this()
            if engine is not None:
                engine._check_loaded_optimizer_state(state)

        def adopt(_: torch.optim.Optimizer) -> None:
            engine = this()
            if engine is not None:
                engine._adopt_optimizer_state(loaded=True)
                engine._read_factor_index()  # the loaded groups are new dicts, with the saved settings
                engine._reread_group_settings()

        self._optimizer_hooks = [
            self.optimizer.register_state_dict_pre_hook(_mark_engine_hook(export, this)),
            self.optimizer.register_state_dict_post_hook(_mark_engine_hook(show, this)),
            self.optimizer.register_load_state_dict_pre_hook(_mark_engine_hook(check, this)),
            self.optimizer.register_load_state_dict_post_hook(_mark_engine_hook(adopt, this)),
        ]

    def _check_loaded_optimizer_state(self, state: Mapping[str, Any]) -> None:
        """Raises a ValueError for a state ``optimizer.load_state_dict`` is given that the fused step cannot adopt.

        Runs before torch.optim's load changes anything: it replaces the param groups and the state before its
        post-hook copies the state into the fused buffers, and a state of another model raised there (a bare
        RuntimeError, a size mismatch) with the refused state's groups in place: the run trained on at its LR.
        The checks are the engine's on a reference-path checkpoint: the state's groups and tensors fit this
        optimizer's parameters, its ``"layer"`` keys are layer indices, and its groups' settings are ones the fused
        step runs.
        """
        _check_state_shapes(self.optimizer, state, "the loaded ")  # no checkpoint need be involved: a user's own load
        _check_layer_keys(state["param_groups"], self.n_layers, "the loaded state's ")
        try:
            self._check_group_settings(state["param_groups"])
        except KeyError as error:
            raise ValueError(f"the loaded state's param groups lack {error}: they are not torch.optim's") from None

    def _weight_copies(self) -> WeightCopies:
        """The ``LayerPrecision.use_weight_copies`` callable: each layer's 16-bit copies in the store, by attribute."""
        modules = dict(self.model.named_modules())
        views: dict[tuple[int, torch.dtype], list[tuple[nn.Module, str, torch.Tensor]]] = {}
        # Every view made here, once (the store's buffers live as long as it does): a forward only looks them up,
        # which torch.compile traces into its graph (making a view there would break the graph at every layer).
        for layer in range(self.n_layers):
            # The attribute each parameter is read through inside this layer's module (a tied weight is the
            # first owner's: the other layers sharing it cast it under autocast, in their own precision).
            root = modules.get(self.layers[layer].name, self.model)
            inside = root.modules() if isinstance(root, nn.MultiheadAttention) else [root]  # as layer_parameters
            owners = {id(p): (m, name) for m in inside for name, p in m._parameters.items() if p is not None}
            for dtype in (torch.bfloat16, torch.float16):
                low = self.store.low_precision_params(layer, dtype)
                views[layer, dtype] = [
                    (*owners[id(p)], copy) for p, copy in zip(self.store.layers[layer], low, strict=True)
                ]

        def copies(layer: int, dtype: torch.dtype) -> list[tuple[nn.Module, str, torch.Tensor]]:
            return views[layer, dtype]

        return copies

    def _track_param_groups(self) -> None:
        """Records what the fused step reads from the param groups at each step, and what it must refuse.

        The momentum (SGD) or betas and eps (Adam) as built; the layers split across several groups (one LR each);
        and which ``lr_factors`` entry each layer takes (its group's ``"layer"`` key, as on the reference path).
        """
        self._hyper_keys = ("betas", "eps") if self.fused_optimizer._kind == "adamw" else _SGD_KEYS
        self._hypers_of = operator.itemgetter(*self._hyper_keys)
        # As built; read from the groups at each step.
        self._group_hypers: tuple[tuple[Any, ...], ...] = tuple(map(self._hypers_of, self.optimizer.param_groups))
        # Layers whose parameters are in several param groups (of one LR, unlike their decays): checked each step.
        self._split_layers = [
            (layer, indices)
            for layer, params in enumerate(self.layer_params)
            if len(indices := sorted({self._group_index[id(p)] for p in params})) > 1
        ]
        # Each layer's param group, by position (-1: a layer without parameters, whose LR share is 1): _read_group_lrs
        # takes the layers' shares by indexing at each LR change (a per-step scheduler's), not in a loop over them.
        # Positions stay those of _group_index, which a loaded state dict keeps.
        self._layer_group = np.array(
            [self._group_index[id(params[0])] if params else -1 for params in self.layer_params], dtype=np.intp
        )
        self._read_factor_index()

    def _read_factor_index(self) -> None:
        """Reads which entry of ``lr_factors`` each layer's update takes: its group's ``"layer"`` key.

        As on the reference path (-1: a group without one, factor 1). Read when built and after
        ``optimizer.load_state_dict()``.
        """
        self._factor_index = np.array(
            [int(self._group(params[0]).get("layer", -1)) if params else -1 for params in self.layer_params]
        )
        self._factor_keyed = self._factor_index >= 0
        self._factor_take = np.maximum(self._factor_index, 0)  # (-1 read as 0, then masked out)

    def _group(self, param: torch.Tensor) -> dict[str, Any]:
        """The param group ``param`` is in now (by position: see ``_group_index``)."""
        return self.optimizer.param_groups[self._group_index[id(param)]]

    def _export_optimizer_state(self, *, copies: bool = False) -> None:
        """Puts the fused step's state into the ``torch.optim`` object, in its layout, as views (no copies).

        What ``optimizer.state_dict()`` returns (between steps the state is :meth:`_show_state`'s live view). Per
        parameter, as ``torch.optim`` would hold it after the same steps: SGD's ``momentum_buffer``; AdamW's
        ``exp_avg``, ``exp_avg_sq`` and ``step`` (a float32 scalar, on the CPU unless the group is ``capturable`` or
        ``fused``; a copy of the count, the only part that is not live). The moments are views of the fused
        buffers, so the optimizer costs no memory and ``torch.save`` writes each buffer once. Before the first
        applied step there is no state, as in ``torch.optim``. Reads the step count (one host-device sync).

        ``copies``: each moment a tensor of its own (one at a time), for :meth:`remove`, after which the optimizer
        is the user's alone.
        """
        _export_fused_state(self.optimizer, self.fused_optimizer, self.store, self._group_index, copies=copies)

    def _adopt_optimizer_state(self, *, loaded: bool = False) -> None:
        """Copies the state the ``torch.optim`` object holds into the fused buffers (zero where it holds none).

        Runs when the engine is built, after each ``optimizer.load_state_dict`` (``loaded``), and at a step that
        finds the state cleared or replaced (:meth:`_take_state_edits`, also ``loaded``). A run resumed the
        usual way (``optimizer.load_state_dict`` before or after the engine is built), or an optimizer that stepped
        before, keeps its moments, and each layer's step count carries on from its parameters' in the optimizer:
        AdamW's ``step`` (the largest of the layer's, with a warning if they differ), or for SGD, which keeps no
        count, the layer's own count once a momentum buffer exists, at least one (the fused SGD, like
        ``torch.optim.SGD``, overwrites a layer's buffer at its step 0). The model's count (``applied_steps``) is the
        largest layer's when the engine is built; a load leaves it alone, as the reference path's count: it counts
        this engine's updates, and a caller taking differences of it (the Controller, over an interval) must not see
        it jump with a checkpoint. Reads the counts (a host-device sync) after a load.
        """
        from triaccel_rl.kernels import FusedAdamW, FusedSGD  # (loaded already: this engine runs the fused step)

        state = self.optimizer.state
        fused = self.fused_optimizer
        current = fused._step_state[0].tolist() if loaded else [0.0] * (1 + len(self.store.layers))
        layer_steps: list[float] = []
        restarted: list[int] = []  # layers whose count comes from the state, not carried on
        with torch.no_grad():
            for layer, params in enumerate(self.store.layers):
                taken = shown = False  # a moment adopted from the state; one that is still the fused state's view
                for name in fused._buffer_names:  # momentum_buffer; or exp_avg and exp_avg_sq
                    for param, view in zip(params, self.store.param_views(getattr(fused, name), layer), strict=True):
                        saved = state.get(param, {}).get(name)
                        if saved is None:  # a state loaded mid-run replaces the run's, as in torch.optim
                            view.zero_()
                        elif _same_elements(saved, view):  # the live view (or a state_dict loaded back unsaved)
                            shown = True
                        else:
                            view.copy_(saved)
                            taken = True
                # (A step shown is a tensor on the device: reading it syncs, once a parameter.)
                steps = {float(state[p]["step"]) for p in params if "step" in state.get(p, {})}
                if len(steps) > 1:
                    _log.warning(
                        "the parameters of layer %d took %s steps: the fused step counts %d for them all",
                        layer, sorted(steps), max(steps),
                    )  # fmt: skip
                # A layer nothing was adopted for carries on as it was (another layer's entries were deleted, or a
                # state_dict loaded back): a layer that has not stepped yet shows zeros where torch.optim holds no
                # entry, and taken as a state, those started its SGD momentum dampened at a count of 1.
                carried_on = not taken and (shown or not fused._buffer_names)
                if not carried_on:
                    restarted.append(layer)
                if steps:
                    count = max(steps)
                elif carried_on:
                    count = current[1 + layer]
                else:
                    count = max(current[1 + layer], 1.0) if taken else 0.0
                layer_steps.append(count)
                if (taken or shown) and count > 0 and (isinstance(fused, FusedAdamW) or fused.options.dampening):
                    self._warn_partly_fresh(layer, count, state)
            model = current[0] if loaded else max(layer_steps, default=0.0)
            counts = torch.tensor([model, *layer_steps], dtype=torch.float64)
            fused._step_state[0].copy_(counts)
            if isinstance(fused, FusedSGD):  # torch.optim's state counts no steps at momentum 0: a restarted layer
                # without a buffer (count 0) starts one at its next step with momentum; one with a buffer has count >= 1
                fused.steps_before_momentum[restarted] = 0.0
        self._show_state(full=bool(state))  # a state adopted shows as views; none, as torch.optim's before a step

    def _warn_partly_fresh(self, layer: int, count: float, state: Mapping[torch.Tensor, Any]) -> None:
        """Warns when some of ``layer``'s parameters hold no state and the rest do (``del optimizer.state[p]``).

        ``torch.optim`` restarts such a parameter at step 1; the fused step keeps one count a layer, so it carries
        on at the layer's ``count`` from zero moments: AdamW's bias correction, and SGD's first dampened update,
        differ from ``torch.optim``'s (SGD without dampening is exact: from a zero buffer it takes the gradient).
        """
        names = self._names_by_id()
        fresh = [
            names.get(id(p), "?")
            for p in self.store.layers[layer]
            if not any(state.get(p, {}).get(name) is not None for name in self.fused_optimizer._buffer_names)
        ]
        if fresh:
            _log.warning(
                "parameters %s of layer %d hold no optimizer state while the rest of their layer does: the fused step "
                "keeps one step count a layer, so they start from zero moments at the layer's step %d, not at step 1 "
                "as in torch.optim; clear the state of the whole layer (or all of it) to restart them exactly",
                ", ".join(fresh), layer, count,
            )  # fmt: skip

    def _show_state(self, full: bool) -> None:
        """Makes ``optimizer.state`` the live view of the fused step's state, and records what the view rests on.

        ``full``: every parameter the fused step holds gets an entry of views: its moments in the fused buffers
        (``exp_avg`` and ``exp_avg_sq``, or ``momentum_buffer``), which an edit in place (``zero_()``) changes for
        the next step, and AdamW's ``step``, a copy of its layer's count made after each step
        (:meth:`_refresh_shown_steps`; an edit of it acts only through an adoption). A parameter that has sat every
        step out, or whose SGD momentum has not started, shows zeros where ``torch.optim`` would hold no entry. Not
        ``full`` (nothing adopted, a state cleared): the state is left empty, as ``torch.optim``'s before its first
        step, and the next step fills it. SGD without momentum keeps no state, as ``torch.optim.SGD``. Reads nothing
        on the host.
        """
        fused, state = self.fused_optimizer, self.optimizer.state
        names = fused._buffer_names
        if full:
            if "exp_avg" in names and not self._live_steps:  # made once: AdamW's state keeps its buffers
                counts = fused.layer_step_counts
                self._step_sources = [counts[layer] for layer, params in enumerate(self.store.layers) for _ in params]
                # Each its own tensor, float32 as torch.optim's: a copy of an optimizer pickled mid-run, loaded into a
                # plain AdamW, advances each once a step (a view of the count, shared by a layer's parameters, advanced
                # there once a parameter). On the device, as a capturable AdamW's, so that the copy made after each
                # step does not wait for it; state_dict() gives torch.optim's CPU ones (_export_fused_state).
                self._live_steps = [
                    torch.zeros((), dtype=torch.float32, device=counts.device) for _ in self._step_sources
                ]
            steps = iter(self._live_steps)
            for layer, params in enumerate(self.store.layers):
                views = [self.store.param_views(getattr(fused, name), layer) for name in names]
                for i, param in enumerate(params):
                    entry = {name: buffer[i] for name, buffer in zip(names, views, strict=True)}
                    if "exp_avg" in entry:
                        entry["step"] = next(steps)
                    if entry:
                        state[param] = entry
                    else:
                        state.pop(param, None)
            self._refresh_shown_steps()
        self._live_state = state
        self._live_len = len(state)
        self._live_stored = self._stored_entries(state)
        self._live_full = full
        self._live_buffers = [getattr(fused, name) for name in names]  # (held: their ids stay theirs)
        self._live_buffer_ids = [id(buffer) for buffer in self._live_buffers]

    def _take_state_edits(self) -> None:
        """Adopts a state the user cleared or replaced since the last step, as ``optimizer.load_state_dict`` does.

        Seen: ``optimizer.state`` replaced (``optimizer.state = defaultdict(dict)``) or its entries of the store's
        parameters changed in number (``clear()``, ``del optimizer.state[p]``); a parameter without an entry then
        starts from zero moments, as ``torch.optim`` starts a fresh state (a layer's count restarts where all its
        parameters lost theirs: see :meth:`_warn_partly_fresh`; a layer whose entries all stay carries on). An edit in
        place (``state[p]["exp_avg"].zero_()``) needs nothing: the entries are views. Not seen: an entry or a tensor
        replaced by another of the same parameter (``state[p] = {}``, ``state[p]["momentum_buffer"] = None``):
        checking each would cost every step a pass over the parameters on the host (0.1 to 0.4 ms at 1000
        parameters). Per step, about 2 us whatever the model: an identity and a length check (a pass over the entries
        when the length changed), and the fused buffers' identities (a rollback or a checkpoint loaded may give SGD a
        new momentum buffer: the view is then made again from the fused state, which is the one to keep). A state
        adopted reads the counts (a host-device sync).
        """
        state, fused = self.optimizer.state, self.fused_optimizer
        if self._live_state is None:  # handed back by remove()
            return
        if [id(getattr(fused, name)) for name in fused._buffer_names] != self._live_buffer_ids:
            self._show_state(self._live_full)
        elif state is not self._live_state:
            self._adopt_optimizer_state(loaded=True)
        elif len(state) != self._live_len:
            # A parameter not in the store (frozen at the build) read through the defaultdict (a logging loop's
            # optimizer.state[p]) gets an empty entry: nothing to adopt, and no host-device sync for it
            if self._stored_entries(state) != self._live_stored:
                self._adopt_optimizer_state(loaded=True)
            else:
                self._live_len = len(state)

    def _stored_entries(self, state: Mapping[Any, Any]) -> int:
        """How many entries of ``state`` are of parameters in the store (a pass over the entries)."""
        return sum(id(param) in self._stored_ids for param in state)

    def _refresh_shown_steps(self) -> None:
        """Copies each layer's count into AdamW's ``step`` of its parameters in ``optimizer.state`` (no sync).

        After each fused step, and wherever the counts were set outside it (a load, a rollback). One foreach copy,
        no loop in Python: on a GPU one multi-tensor launch; on a CPU a copy a tensor (about 70 us at 200 parameters).
        """
        if self._live_steps:
            torch._foreach_copy_(self._live_steps, self._step_sources)

    def _class_decays(self, groups: Sequence[Mapping[str, Any]] | None = None) -> float | tuple[float, ...]:
        """The fused step's weight decay for ``groups`` (the param groups' now): one a decay class (a float for one).

        Reads and changes nothing else: ``load_state_dict`` checks a checkpoint's groups with it before loading.

        Raises:
            ValueError: groups of one class (one segment layout) no longer agree, or an Adam group decays.
        """
        groups = self.optimizer.param_groups if groups is None else groups
        decays = tuple(float(group["weight_decay"]) for group in groups)
        n_classes = max(self._decay_classes) + 1
        per_class: list[set[float]] = [set() for _ in range(n_classes)]
        for index, decay in enumerate(decays):
            per_class[self._decay_classes[index]].add(decay)
        if type(self.optimizer) is torch.optim.Adam and any(decays):
            raise ValueError(
                f"an Adam param group's weight_decay became {max(decays)}: the fused step runs Adam without weight "
                "decay only (AdamW's decoupled decay is not Adam's L2 penalty); keep it at 0, or use AdamW, or "
                f"{_reference_advice('from an Adam with this weight decay')}"
            )
        if any(len(values) > 1 for values in per_class):
            raise ValueError(
                f"the param groups' weight decays changed to {list(decays)}, splitting groups the fused step laid out "
                f"as one (it was built for {list(self._built_decays)}); groups that shared a weight decay "
                "when the engine was built must keep sharing one"
            )
        values = tuple(values.pop() for values in per_class)
        return values[0] if n_classes == 1 else values

    def _check_group_settings(self, groups: Sequence[Mapping[str, Any]]) -> None:
        """Raises the ``ValueError`` a fused step would raise on param groups of these settings; changes nothing.

        No group may turn on an option the fused step does not run (``_UNSUPPORTED_OPTIONS``), the decays must keep
        the layout's classes, a split layer's groups one LR, and the momentum or betas and eps one value for all groups
        (see ``_read_group_lrs``).
        """
        _check_supported_options(groups)
        self._class_decays(groups)
        self._check_split_lrs(tuple(float(group["lr"]) for group in groups))
        self._check_group_hypers(tuple(map(self._hypers_of, groups)))

    def _check_split_lrs(self, lrs: tuple[float, ...]) -> None:
        """Raises a ``ValueError`` when the groups of a layer split across several hold different LRs."""
        for layer, indices in self._split_layers:
            if len({lrs[i] for i in indices}) > 1:
                raise ValueError(
                    f"layer {self.layers[layer].name!r} has parameters in param groups whose LRs now differ "
                    f"({sorted(lrs[i] for i in indices)}): the fused step applies one LR a layer; keep "
                    f"a layer's groups at one LR, or {_reference_advice('from groups whose LRs differ already')}"
                )

    def _check_group_hypers(self, hypers: tuple[tuple[Any, ...], ...]) -> None:
        """Raises a ``ValueError`` when the groups' momentum (SGD) or betas and eps (Adam) differ.

        Also when SGD's momentum leaves 0 on a fused SGD built without a momentum buffer.
        """
        # Compared as tuples of numbers: betas set to a list (``group["betas"] = [0.85, 0.999]``) is unhashable, and
        # equal; tensors (``betas=(torch.tensor(0.9), ...)``) hash by identity, equal ones in two groups too.
        comparable = [tuple(_comparable(v) for v in group) for group in hypers]
        if len(set(comparable)) > 1:
            for i, key in enumerate(self._hyper_keys):
                values = [group[i] for group in comparable]
                if len(set(values)) > 1:
                    raise ValueError(
                        f"the param groups' {key!r} now differ ({values}): the fused step applies one to all groups; "
                        f"keep them equal, or {_reference_advice(f'from groups whose {key!r} differ already')}"
                    )
        current = dict(zip(self._hyper_keys, hypers[0], strict=True))
        if "momentum" in current and float(current["momentum"]) != 0.0 and not self.fused_optimizer._buffer_names:
            raise ValueError(
                f"SGD's momentum went from 0 to {float(current['momentum'])}: the fused step was built without a "
                "momentum buffer (momentum 0 at the build); start with momentum > 0 (an open "
                "Controller: close() it and build a new one from an optimizer whose momentum is > 0), or "
                f"{_reference_advice()}"
            )

    def _apply_group_hypers(self, hypers: tuple[tuple[Any, ...], ...]) -> None:
        """Takes the param groups' momentum (SGD) or betas and eps (Adam) into the fused step, as torch.optim would.

        A momentum scheduler changes them between steps (``OneCycleLR`` and ``CyclicLR`` cycle SGD's momentum
        or Adam's beta1 by default). For AdamW the bias corrections then use the current betas, as
        ``torch.optim.AdamW`` computes ``1 - beta ** step`` at each step (the kernels compute the powers from the
        step counts; the new betas are one small copy, no sync).

        Raises:
            ValueError: the groups now differ in one of them, or SGD's momentum leaves 0 (the fused SGD built
                without momentum has no buffer); nothing is changed.
        """
        self._check_group_hypers(hypers)
        fused = self.fused_optimizer
        current = dict(zip(self._hyper_keys, hypers[0], strict=True))
        if "betas" in current:
            beta1, beta2 = (float(beta) for beta in current["betas"])
            fused.options = replace(fused.options, beta1=beta1, beta2=beta2, eps=float(current["eps"]))
            with torch.no_grad():  # the bias corrections of the next steps use the new betas
                fused.set_log_betas(beta1, beta2)
        else:
            momentum = float(current["momentum"])
            fused.options = replace(
                fused.options,
                momentum=momentum,
                dampening=float(current["dampening"]),
                nesterov=bool(current["nesterov"]),
            )
        self._group_hypers = hypers

    def _read_group_lrs(self) -> None:
        """Takes the param groups' LRs and decays (a scheduler may have moved them) into the fused step.

        The reference LR is the first group's LR (1 while it is 0: then the shares are the groups' LRs
        themselves); each layer's share is its group's LR over it. The groups of a layer split across several
        must keep one LR. Param groups may differ in LR and weight decay only.

        Raises:
            ValueError: the groups of a split layer now differ in LR, their decays no longer fit the layout, or a
                group turned on an option the fused step does not run (``_UNSUPPORTED_OPTIONS``); nothing is changed.
        """
        groups = self.optimizer.param_groups  # read at every step: itemgetter keeps it to a few microseconds
        _check_supported_options(groups)  # set on a group since the build (``group["maximize"] = True``)
        decays = tuple(map(_DECAY, groups))
        if decays != self._group_decays:
            options = self.fused_optimizer.options
            self.fused_optimizer.options = replace(options, weight_decay=self._class_decays())
            self._group_decays = decays
        hypers = tuple(map(self._hypers_of, groups))
        if hypers != self._group_hypers:
            self._apply_group_hypers(hypers)
        if tuple(map(_LR, groups)) == self._group_lrs:
            return
        lrs = tuple(float(group["lr"]) for group in groups)
        self._check_split_lrs(lrs)
        reference = lrs[0] if lrs[0] > 0 else 1.0
        shares = np.array(lrs, dtype=np.float64) / reference  # as Python's float division, bit for bit
        self._layer_base = np.where(self._layer_group >= 0, shares[self._layer_group], 1.0)
        self._reference_lr = reference
        self._group_lrs = lrs

    def _reread_group_settings(self) -> None:
        """Takes every param group setting into the fused step again, changed since the last step or not."""
        self._group_hypers = ()
        self._group_decays = None
        self._group_lrs = None
        self._read_group_lrs()

    def _step_hooks(self, kind: str) -> list[Any]:
        """The step hooks registered on the user's optimizer and globally, in the order ``optimizer.step()`` runs them.

        ``kind`` is ``"pre"`` or ``"post"``. Torch keeps them in private dicts (``register_step_pre_hook`` and
        kin fill them); the fused path, which never calls ``optimizer.step()``, runs them itself.
        """
        registry = _torch_optimizer
        if kind == "pre":  # (less the engine's own guard against a second update)
            ours = (self._step_guard, self._scale_lrs_hook)
            own = [hook for hook in self.optimizer._optimizer_step_pre_hooks.values() if hook not in ours]
            return [*registry._global_optimizer_pre_hooks.values(), *own]
        return [*self.optimizer._optimizer_step_post_hooks.values(), *registry._global_optimizer_post_hooks.values()]

    def _check_optimizer_params(self) -> None:
        """Raises a ValueError when the optimizer's param groups no longer hold what the engine was built from.

        The engine was built from the trainable parameters of the optimizer's groups. A group added since
        (``optimizer.add_param_group``), a parameter added to a group, or a parameter frozen then and unfrozen since
        (it has a gradient now), would be trained by the fused step never (silently frozen), and on the reference path
        by ``optimizer.step()`` outside the controller: unclipped, unchecked for non-finite gradients (a NaN would
        reach the weights) and at no chosen precision. A group removed, or a parameter taken out of the groups, would be
        trained on by the fused step, and on the reference path still be counted in the statistics and the clip. Both
        paths refuse these alike, before anything is updated, and a parameter moved to another group or a group
        reordered too (:meth:`_check_group_params`).
        """
        # One tuple of ids a group, compared whole: 5 us a step at 100 parameters in one group, 14 us in 50 groups, on a
        # CPU (the groups' lengths alone would miss two parameters swapped between groups)
        if tuple(tuple(map(id, group["params"])) for group in self.optimizer.param_groups) != self._group_params:
            self._check_group_params()
        unfrozen = [p for p in self._outside_params if p.requires_grad and p.grad is not None]
        if unfrozen:
            names = self._names_by_id()
            raise ValueError(
                f"parameters {[names.get(id(p), tuple(p.shape)) for p in unfrozen][:5]} have gradients, but they were "
                "frozen (requires_grad=False) when the controller was built from the optimizer's parameters, so it "
                "does not hold them: unfreeze before building the controller (for gradual unfreezing, build a new "
                "controller at each stage, after close() on the last; its loader() counts epochs from its own start)"
            )

    def _check_group_params(self) -> None:
        """Raises a ValueError for a change to the param groups' parameters that the engine cannot follow.

        Refused on both paths: a group added or removed, a parameter added to a group or taken out of all of them, and
        one listed twice (``torch.optim`` would update it twice; its ``add_param_group`` refuses that), a parameter
        moved to another group or a group's parameters reordered: the fused step laid out each layer's LR share and
        weight-decay segment by the groups it was built with, the statistics read each parameter's betas by its group
        as built, and the shield's rollback copy is the optimizer's ``state_dict``, which torch loads by position.
        """
        groups = self.optimizer.param_groups
        names = self._names_by_id()

        def named(params: Sequence[torch.Tensor]) -> str:
            listed = [names.get(id(p), tuple(p.shape)) for p in params]
            return f"{listed[:5]}{' ...' if len(listed) > 5 else ''}"

        later_stage = "close() this controller and build a new one, whose loader() counts epochs from its own start"
        if len(groups) > self._n_param_groups:
            added = [p for group in groups[self._n_param_groups :] for p in group["params"]]
            raise ValueError(
                f"the optimizer has {len(groups)} param groups; it had {self._n_param_groups} when the controller was "
                f"built from its parameters, and it cannot take new ones (parameters {named(added)}): add param groups "
                f"before building the controller (for a later stage, gradual unfreezing say, {later_stage})"
            )
        found: dict[int, tuple[torch.Tensor, list[int]]] = {}  # each parameter in the groups now, and its groups
        for index, group in enumerate(groups):
            for p in group["params"]:
                found.setdefault(id(p), (p, []))[1].append(index)
        built = {id(p): p for p in (*self._params, *self._outside_params)}
        removed = [built[i] for i in self._group_index if i not in found]  # (in the order of the groups as built)
        if len(groups) < self._n_param_groups:
            gone = f"parameters in no group now: {named(removed)}" if removed else "its parameters moved to others"
            raise ValueError(
                f"the optimizer has {len(groups)} param groups; it had {self._n_param_groups} when the controller was "
                f"built from its parameters, and it cannot follow one removed ({gone}): to stop training parameters, "
                f"freeze them (requires_grad_(False)) and leave the groups as they were; for new groups, {later_stage}"
            )
        added = [p for i, (p, _) in found.items() if i not in self._group_index]
        if added:
            into = sorted({index for p in added for index in found[id(p)][1]})
            raise ValueError(
                f"parameters {named(added)} were added to param groups {into} after the controller was built from the "
                "optimizer's parameters, and it cannot take new ones: put them in the optimizer before building the "
                f"controller (for a later stage, gradual unfreezing say, {later_stage})"
            )
        if removed:
            raise ValueError(
                f"parameters {named(removed)} were taken out of the optimizer's param groups after the controller was "
                "built from them, and it still holds them (the fused step would train them on): to stop training them, "
                f"freeze them (requires_grad_(False)) and leave them in their groups; for new groups, {later_stage}"
            )
        twice = [p for p, indices in found.values() if len(indices) > 1]
        if twice:
            raise ValueError(
                f"parameters {named(twice)} are listed more than once in the param groups (groups "
                f"{[found[id(p)][1] for p in twice[:5]]}): torch.optim would update one once per listing; list each "
                "once"
            )
        # What is left is a move or a reorder. Both paths hold each parameter by the group and place it was built with:
        # the fused step's LR shares and decay segments, the statistics' betas (_group), and the shield's rollback
        # copy, the optimizer's state_dict, which torch loads by position (after a move the load raised; after a
        # reorder the moments went to other parameters of the same shape, silently).
        why = (
            "the controller holds each parameter by the param group and place it was built with (the fused step's LR "
            "and weight decay, the statistics, and the shield's rollback copy of the optimizer state, which torch "
            f"loads by position): arrange the param groups before building the controller, or {later_stage}"
        )
        moved = [p for p in built.values() if found[id(p)][1][0] != self._group_index[id(p)]]
        if moved:
            moves = [
                f"{names.get(id(p), tuple(p.shape))} from group {self._group_index[id(p)]} to {found[id(p)][1][0]}"
                for p in moved
            ]
            raise ValueError(
                f"parameters moved to other param groups after the controller was built: {', '.join(moves[:5])}"
                f"{' ...' if len(moves) > 5 else ''}; {why}"
            )
        reordered = [
            index for index, group in enumerate(groups) if tuple(map(id, group["params"])) != self._group_params[index]
        ]
        raise ValueError(
            f"the parameters of param groups {reordered} were reordered after the controller was built; {why}"
        )

    def _zero_unstored_gradients(self) -> None:
        """Zeros, in place, the gradients of the optimizer's parameters outside the fused store (a step that raised).

        A param group added since the engine was built, or a parameter frozen then and unfrozen since: the step
        refuses them (:meth:`_check_optimizer_params`), and the store's ``zero_grad`` reaches the store's gradients
        only. Left, the refused batch's gradients went into the first update of the controller built next. The
        reference path's ``optimizer.zero_grad()`` reaches them all.
        """
        held = {id(p) for p in self._params}
        with torch.no_grad():
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    if id(p) not in held and p.grad is not None:
                        p.grad.zero_()

    def _fused_step(self, loss: torch.Tensor) -> tuple[GradStats, torch.Tensor]:
        self.zero_pending = True  # until the zeroing below has run
        self._backward_scale = None  # the step's backward passes are done: a later backward is not scaled
        self.update_reached = self.update_started = False
        # Cleared before anything here can raise: the except below reads it, and the last step's True made a step
        # refused before its own launch (a mid-run change, a Ctrl-C in a transform) look part-way, its batch lost
        self.fused_optimizer.update_launched = False
        self.last_grad_stats = None
        scaling = self.precision.needs_grad_scaler
        # Everything up to and including the launch in one guard: a refused step (the check inside), or a hook or
        # transform that raises, leaves no update; the launch itself (it allocates, and its first call compiles the
        # kernels: an out-of-memory error, a Ctrl-C) may leave part of one (``update_started``). Either way the
        # gradients are zeroed below, not added to the next step's, as the reference path's ``finally`` zeroes them.
        try:
            self._check_optimizer_params()
            hooks = self._step_hooks("pre")
            for hook in hooks:  # as optimizer.step() would (an EMA, a gradient transform)
                if hook(self.optimizer, (), {}) is not None:
                    raise RuntimeError("a step pre-hook returned new step() arguments: the fused step takes none")
            # A gradient put in place of its view goes into the flat buffer the step reads: a pre-hook's (a clamp), or
            # autograd's own after backward(create_graph=True), which accumulates out of place (a new .grad tensor).
            # One identity and address check a parameter when nothing changed.
            self.bind_grads(after_backward=True)
            self._read_group_lrs()  # after the hooks: an LR or momentum a hook sets applies to this step
            self._take_state_edits()  # a state the user (or a pre-hook) cleared or replaced: adopted, as a load's
            # A second optimizer's gradients, in every precision: taken before the transform, which may clamp them
            unheld_overflow = self._unheld_overflow()
            transformed_overflow = None
            if self.grad_transform is not None:
                transformed_overflow = self._transform_fused_grads(scaling)
                # And after it: a gradient it made non-finite, or made (a parameter whose .grad was None), is checked,
                # and dropped on a skipped step, as the reference path drops it
                after = self._unheld_overflow()
                if after is not None:
                    unheld_overflow = after if unheld_overflow is None else unheld_overflow | after
            factors = self._layer_base * np.where(self._factor_keyed, self._lr_factors[self._factor_take], 1.0)
            # Compared as the kernel reads them: under a scheduler, groups of different LRs keep their float32
            # ratio while the float64 one wobbles in its last bits (a copy on half the steps). The copy, when due,
            # goes through pinned memory, as set_log_betas does: from pageable memory it waited for the GPU.
            factors = factors.astype(np.float32)
            if self._last_factors is None or not np.array_equal(factors, self._last_factors):
                host = torch.from_numpy(factors)
                self._factors.copy_(host.pin_memory() if self._factors.is_cuda else host, non_blocking=True)
                self._last_factors = factors
            precisions = self.precision.precisions
            if self._last_codes != precisions:
                if precisions != self._copy_codes:  # a map the copies missed (edited in place): other types' bits
                    self.refresh_weight_copies()
                self._codes.copy_(torch.as_tensor([int(p) for p in precisions], dtype=torch.int32))
                self._last_codes = list(precisions)
            lr = self._reference_lr * self.lr_scale * self.batch_lr_gain
            # An infinite loss can have finite gradients (a term without one); a loss computed elsewhere (from .cpu()
            # outputs) is moved, as float(loss) once read it from anywhere.
            skip = ~torch.isfinite(loss.detach().to(self.device, non_blocking=True).reshape(()))
            # What the kernel cannot see: either skips the step and backs the scale off
            flagged = [flag for flag in (unheld_overflow, transformed_overflow) if flag is not None]
            overflow_elsewhere = functools.reduce(operator.or_, flagged) if flagged else None
            if overflow_elsewhere is not None:
                skip = skip | overflow_elsewhere
            if world_size() > 1:
                # Under DDP every process skips where one must, as on the reference path: the loss and a second
                # optimizer's gradients are this process's own (the kernel's check reads all-reduced gradients), and an
                # update taken by some replicas only would part them for good. The overflow is agreed with it, for the
                # fp16 scale's back-off below: the scale stays equal in every process. One collective, on the device.
                elsewhere = overflow_elsewhere if overflow_elsewhere is not None else torch.zeros_like(skip)
                skip, overflow_elsewhere = any_rank_on_device(torch.stack([skip, elsewhere])).unbind()
            try:
                result = self.fused_optimizer.step(
                    lr,
                    self._factors,
                    self._codes,
                    inv_scale=self._scale.reciprocal() if scaling and transformed_overflow is None else 1.0,
                    max_grad_norm=self.max_grad_norm,
                    skip=skip,
                )
            finally:
                # The update began where its kernel was launched: an error after it (rewriting the 16-bit copies
                # allocates) leaves it in, one before it (allocating the statistics) moved nothing, and the step's
                # batch goes back (not taken as spent, with no update)
                self.update_started = self.fused_optimizer.update_launched
        except BaseException:
            # Again: a Ctrl-C may have come before the finally's (the update in, the batch taken as never trained on)
            self.update_started = self.fused_optimizer.update_launched
            self._zero_unstored_gradients()  # a param group added (or a parameter unfrozen) since: the store's below
            self.zero_grad()  # no update: the next step's gradients must not add to these
            raise
        self._mark_weights_written()
        self.update_reached = True
        if not self._live_full:  # the first step after none had state: torch.optim's state fills now too
            self._show_state(full=True)
        else:
            self._refresh_shown_steps()
        abs_max = result.grad_abs_max if self.track_abs_max else None  # as the reference path's
        self.last_grad_stats = GradStats(result.grad_sq_sum, abs_max, result.grad_nonfinite)
        try:
            # The flag an LR scheduler's wrapper of optimizer.step() sets: without it, a scheduler on the user's
            # optimizer (which never steps here) warns at each step that it was stepped before the optimizer.
            setattr(self.optimizer, "_opt_called", True)  # noqa: B010  (torch's private name, set as torch sets it)
            for hook in self._step_hooks("post"):  # also after a step the device skipped (deciding it would sync)
                hook(self.optimizer, (), {})
        finally:  # a post-hook that raises: the update went in, so the scale moves and the gradients go, as always
            if scaling:  # GradScaler's rule, with its own kernel, on the device: no host round trip
                # In place: a captured training step (``StepGraphs``) reads the scale through its address. GradScaler
                # backs off on non-finite gradients only: a non-finite loss over finite ones skips without it. Where
                # doubling the scale would overflow (from 2**127 it would reach inf, and every later step would be
                # skipped) the kernel keeps it, and still restarts the count.
                overflow = result.grad_nonfinite.any()
                if overflow_elsewhere is not None:
                    overflow = overflow | overflow_elsewhere
                torch._amp_update_scale_(
                    self._scale, self._clean_steps, overflow.float(), _SCALE_GROWTH, _SCALE_BACKOFF, _SCALE_INTERVAL
                )
            self.zero_grad(views_bound=True)
            # Only where a second optimizer's parameters got gradients: one sync, for its step to skip a skipped
            # step's (a NaN batch's gradients would have made its weights and momentum NaN for good)
            if unheld_overflow is not None and bool(result.skipped):
                self._drop_unheld_gradients()
        return self.last_grad_stats, result.skipped

    def _transform_fused_grads(self, scaling: bool) -> torch.Tensor:
        """Unscales the flat gradients in place and runs ``grad_transform`` on them; returns the overflow before it.

        The transform sees what ``GradScaler.unscale_`` gives a plain loop, and the kernel then reads unscaled
        gradients (its ``inv_scale`` 1). The overflow is taken first, as ``unscale_`` records it: a transform that
        clamps (``clip_grad_value_``) turns an infinite gradient finite, and the step must still be skipped, and the
        scale back off. A device tensor: no sync.

        A parameter the backward gave no gradient holds its zeroed view in the buffer by now: the transform sees its
        ``.grad`` as ``None``, as in a plain loop (noise added to every gradient there was would otherwise reach it,
        and through the clip's total every other parameter's step).
        """
        assert self.grad_transform is not None
        grads = self.store.grads
        if scaling:
            grads.mul_(self._scale.reciprocal())
        overflow = ~torch.isfinite(grads).all()
        self.store.unbind_params_without_grad()
        self.grad_transform()
        self.bind_grads(after_backward=True)  # a gradient the transform put in place of its view goes in the buffer
        return overflow

    def _fused_mean_sq_norm(self) -> np.ndarray:
        optimizer = self.fused_optimizer
        if getattr(optimizer, "exp_avg", None) is not None:
            steps = optimizer.layer_step_counts.cpu().numpy()  # host-device sync: once per decision
            bias = 1.0 - optimizer.options.beta1 ** np.maximum(steps, 1.0)
            scale = np.where(steps > 0, 1.0 / bias**2, np.nan)  # a layer yet to take a step: nan
            buffer = optimizer.exp_avg
        elif optimizer.momentum_buffer is not optimizer.store.params:
            steps = optimizer.layer_step_counts.cpu().numpy()  # host-device sync: once per decision
            # A layer yet to take a step has no buffer on the reference path: nan, not the zeros it starts from.
            factor = _sgd_mean_factor(optimizer.options.momentum, optimizer.options.dampening)
            scale = np.where(steps > 0, factor**2, np.nan)
            buffer = optimizer.momentum_buffer
        else:
            return np.full(self.n_layers, np.nan)
        return self.store.layer_sq_sums(buffer).cpu().numpy() * scale  # host-device sync: once per decision


def _sgd_mean_factor(momentum: float, dampening: float) -> float:
    """``E[g] / E[buf]`` for SGD's settled momentum buffer, ``(1 - mu) / (1 - d)``; NaN where it keeps no mean.

    Without the dampening, a buffer that adds ``(1 - d) g`` a step read ``1 / (1 - d)`` times too small (100x at
    ``d = mu = 0.9``), and the cheap tier took a noise-free gradient for noise.
    """
    return (1.0 - momentum) / (1.0 - dampening) if dampening < 1.0 else math.nan


def _check_layer_keys(groups: Sequence[Mapping[str, Any]], n_layers: int, whose: str = "") -> None:
    """Raises a ValueError naming a param group whose ``"layer"`` key is not a layer index in ``[0, n_layers)``.

    The key picks the group's entry of ``lr_factors``: before this check, -1 took the last layer's factor on the
    reference path and none on the fused path, and an index past the end raised an IndexError at the first step.
    ``whose`` prefixes the message (``"the checkpoint's "``: torch.optim's ``load_state_dict`` copies the saved key).
    """
    for number, group in enumerate(groups):
        if "layer" not in group:
            continue
        layer = group["layer"]
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < n_layers:
            raise ValueError(
                f"{whose}param group {number} has 'layer': {layer!r}; a 'layer' key is the index of the layer whose LR "
                f"factor the group takes, an integer in [0, {n_layers}) for this model's {n_layers} layers "
                "(StepEngine.discover lists them in that order); leave the key out for a factor of 1"
            )


def _check_state_shapes(
    optimizer: torch.optim.Optimizer, saved: Mapping[str, Any], whose: str = "the checkpoint's "
) -> None:
    """Raises a ValueError when a saved optimizer state tensor does not fit its parameter (another model).

    ``whose`` prefixes the messages: ``"the loaded "`` for a state given to ``optimizer.load_state_dict`` directly,
    where no checkpoint is involved.
    """
    _require_keys("optimizer state", saved, ("state", "param_groups"), whose)
    if not isinstance(saved["state"], Mapping) or not (
        isinstance(saved["param_groups"], (list, tuple)) and all(isinstance(g, Mapping) for g in saved["param_groups"])
    ):
        raise ValueError(
            f"{whose}optimizer state is not torch.optim's: 'state' must be a dict and 'param_groups' a list "
            f"of dicts; got {type(saved['state']).__name__} and {type(saved['param_groups']).__name__}"
        )
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for number, group in enumerate(saved["param_groups"]):
        if not isinstance(group.get("params"), (list, tuple)):
            raise ValueError(
                f"{whose}param group {number} has 'params': {group.get('params')!r}; torch.optim's state_dict() lists "
                "the group's parameters there, as numbers"
            )
    saved_sizes = [len(group["params"]) for group in saved["param_groups"]]
    sizes = [len(group["params"]) for group in optimizer.param_groups]
    if saved_sizes != sizes:
        raise ValueError(
            f"{whose}optimizer state has param groups of {saved_sizes} parameters; this optimizer's has {sizes}: it "
            "was saved for another model or optimizer"
        )
    # The optimizer's hyper-parameters (its defaults other than flags): torch.optim's load puts the saved groups in
    # place as they are, and fills in only flags an older torch did not save (nesterov, foreach, ...: a bool or
    # None). A group without 'lr' loaded, and the next step raised a bare KeyError.
    hypers = [key for key, value in optimizer.defaults.items() if not (value is None or isinstance(value, bool))]
    for number, group in enumerate(saved["param_groups"]):
        missing = [key for key in hypers if key not in group]
        if missing:
            raise ValueError(
                f"{whose}param group {number} lacks {', '.join(map(repr, missing))}, which "
                f"{type(optimizer).__name__}'s update reads: it is not torch.optim's state_dict() of this optimizer"
            )
    _check_group_values(optimizer, saved["param_groups"], whose)
    position = _saved_positions(saved["param_groups"], whose)
    for index, entry in saved["state"].items():
        if isinstance(index, bool) or not isinstance(index, numbers.Integral) or int(index) not in position:
            raise ValueError(
                f"{whose}optimizer state has an entry for parameter {index!r}, which its param groups do not list "
                f"(they list {_id_range(position)}): torch.optim's load would leave that state with no parameter"
            )
        param = params[position[int(index)]]
        if not isinstance(entry, Mapping):
            raise ValueError(f"{whose}optimizer state of parameter {index} is {type(entry).__name__}, not a dict")
        for name, value in entry.items():
            if not _state_value(value):  # torch.optim would take it and the next step would fail on it
                raise ValueError(
                    f"{whose}optimizer state {name!r} of parameter {index} is {type(value).__name__}, not a "
                    "tensor, number or None"
                )
            if isinstance(value, torch.Tensor) and value.dim() > 0 and not _fits(value, param):
                raise ValueError(
                    f"{whose}optimizer state {name!r} of parameter {index} has shape {tuple(value.shape)}; "
                    f"this model's parameter has {tuple(param.shape)}: it was saved for another model"
                )
            if name == "step" and not _whole_count(value):  # Adam's bias corrections divide by 1 - beta**step
                raise ValueError(
                    f"{whose}optimizer state 'step' of parameter {index} is {value!r}: a step count is a "
                    "finite whole number >= 0"
                )


def _saved_positions(groups: Sequence[Mapping[str, Any]], whose: str) -> dict[int, int]:
    """Each parameter number the saved ``groups`` list, mapped to its position among this optimizer's parameters.

    torch.optim's load pairs the numbers with this optimizer's parameters in order and files each state entry under
    its number: a number listed twice, or one that is not a whole number (a NaN, a float from a JSON round trip),
    paired no state with its parameter, silently (its moments started from zero) and kept the entry under a key no
    parameter has. ``state_dict()`` numbers them 0, 1, 2, ... in order; any distinct whole numbers are taken.
    """
    position: dict[int, int] = {}
    for number, group in enumerate(groups):
        for index in group["params"]:
            if isinstance(index, bool) or not isinstance(index, numbers.Integral):
                raise ValueError(
                    f"{whose}param group {number} lists parameter {index!r}; torch.optim's state_dict() numbers "
                    "parameters with whole numbers (0, 1, 2, ... in order)"
                )
            if int(index) in position:
                raise ValueError(
                    f"{whose}param groups list parameter {index!r} twice; torch.optim's state_dict() numbers each "
                    "parameter once (0, 1, 2, ... in order)"
                )
            position[int(index)] = len(position)
    return position


def _id_range(position: Mapping[int, int]) -> str:
    """The saved parameter numbers, as a message names them: ``0 to 9`` where they are the usual run, else a list."""
    ids = list(position)
    if ids == list(range(len(ids))):
        return f"0 to {len(ids) - 1}" if ids else "none"
    return str(ids[:8])[:-1] + (", ...]" if len(ids) > 8 else "]")


def _check_group_values(
    optimizer: torch.optim.Optimizer, groups: Sequence[Mapping[str, Any]], whose: str = "the checkpoint's "
) -> None:
    """Raises a ValueError naming a saved param group's hyper-parameter that this optimizer's update cannot take.

    torch.optim's load puts the saved groups in place unchecked: an ``lr`` of NaN trained the weights to NaN, an
    ``eps`` of ``'1e-8'`` raised a TypeError in the update after part of it had run (the weights half-changed), and
    ``betas`` of one number a ValueError. Each saved value is compared with the live group's (``groups`` are as many):
    a number must be a finite real in the range torch.optim's constructors allow (``_HYPER_RANGES``), a tensor only
    where the live value is one (a tensor LR), a tuple (``betas``) as long and of such numbers, and a flag a bool (or
    None for ``foreach`` and ``fused``). A key the live group lacks is checked where ``_HYPER_RANGES`` names it (a
    scheduler's ``initial_lr``); others, ``"layer"`` (``_check_layer_keys``) and values of other kinds (L-BFGS's
    ``line_search_fn``, names) are not checked here.
    """
    for number, (group, live_group) in enumerate(zip(groups, optimizer.param_groups, strict=True)):
        for key, value in group.items():
            if key in ("params", "layer") or (key not in live_group and key not in _HYPER_RANGES):
                continue
            # A number only the saved group holds is taken as it is: a scheduler built after the load starts from the
            # saved initial_lr (a NaN there made every later LR NaN)
            live = live_group[key] if key in live_group else value if isinstance(value, torch.Tensor) else 0.0
            expected = _hyper_expected(key, value, live)
            if expected is None:
                continue
            if key not in live_group:
                raise ValueError(
                    f"{whose}param group {number} has {key!r}: {value!r}; an LR scheduler built after the load starts "
                    f"from it, and takes {expected} there"
                )
            raise ValueError(
                f"{whose}param group {number} has {key!r}: {value!r}; {type(optimizer).__name__}'s update takes "
                f"{expected} there (this optimizer's group holds {live!r})"
            )


def _hyper_expected(key: str, value: Any, live: Any) -> str | None:
    """What a saved param group's ``value`` of ``key`` must be, where the live group holds ``live``; None if it is."""
    if isinstance(live, bool) or (live is None and key in _OPTIONAL_FLAGS):
        if isinstance(value, bool) or (value is None and key in _OPTIONAL_FLAGS):
            return None
        return "a bool or None" if key in _OPTIONAL_FLAGS else "a bool"
    low, high = _HYPER_RANGES.get(key, (-math.inf, math.inf))
    bound = f" in [{low}, {high})" if high < math.inf else f" >= {low}" if low > -math.inf else ""
    if isinstance(live, (list, tuple)) and live and all(item is None or _hyper_number(item) for item in live):
        if isinstance(value, (list, tuple)) and len(value) == len(live):
            if all(_hyper_fits(key, v, item) for v, item in zip(value, live, strict=True)):
                return None
        return f"a tuple of {len(live)} finite numbers{bound}"
    if not _hyper_number(live) or _hyper_fits(key, value, live):
        return None  # a value of another kind (L-BFGS's line_search_fn, a name) is the optimizer's own to read
    tensor = " (or a one-element tensor of one)" if isinstance(live, torch.Tensor) else ""
    return f"a finite number{bound}{tensor}"


def _hyper_number(value: Any) -> bool:
    """Whether ``value`` is a real number (not a bool) or a real tensor of one element, as torch.optim takes."""
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool
    return is_real(value)


def _hyper_fits(key: str, value: Any, live: Any) -> bool:
    """Whether ``value`` may stand for ``key`` where the live group holds ``live``, a number or None.

    A finite number in ``key``'s range; a tensor only where ``live`` is one; None only where ``live`` is (an item of
    Adafactor's ``eps``, which takes a number there too).
    """
    if value is None or live is None:
        return value is None or _hyper_fits(key, value, 0.0)
    if not _hyper_number(value) or (isinstance(value, torch.Tensor) and not isinstance(live, torch.Tensor)):
        return False
    if isinstance(value, torch.Tensor):
        value = value.item()  # host-device sync for a tensor on a GPU: once a load
    # An int past int64 is no torch Scalar: the update raised an OverflowError part-way through
    if isinstance(value, numbers.Integral) and not -(2**63) <= int(value) < 2**63:
        return False
    low, high = _HYPER_RANGES.get(key, (-math.inf, math.inf))
    return is_finite_real(value) and low <= value < high


def _whole_count(value: Any) -> bool:
    """Whether ``value`` (a number, or a one-element tensor as torch.optim keeps ``step``) is a whole number >= 0.

    An integer above 2**53 is none: the update reads the count as a float (10**400 raised an OverflowError).
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            return False
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    if isinstance(value, numbers.Integral):  # 10**400 has no float (and the update reads the count as one)
        return 0 <= int(value) <= 2**53
    number = float(value)
    return math.isfinite(number) and number >= 0 and number.is_integer()


def _finite_flags(tensors: Sequence[torch.Tensor]) -> list[bool]:
    """Whether each of ``tensors`` holds finite values only (an empty one does). One sync a device."""
    finite = [True] * len(tensors)
    by_device: dict[torch.device, list[int]] = {}
    for position, tensor in enumerate(tensors):
        by_device.setdefault(tensor.device, []).append(position)
    for positions in by_device.values():
        flags = torch.stack([torch.isfinite(_values(tensors[i])).all() for i in positions]).tolist()
        for position, flag in zip(positions, flags, strict=True):
            finite[position] = flag
    return finite


def _values(tensor: torch.Tensor) -> torch.Tensor:
    """A sparse tensor's stored values (``isfinite`` has no sparse kernel: a sparse embedding's SGD momentum), or it."""
    return tensor.coalesce().values() if tensor.is_sparse else tensor


def _fits(state: torch.Tensor, param: torch.Tensor) -> bool:
    """Whether an optimizer state tensor is shaped for ``param``: its shape, or one broadcasting to it.

    In as many dimensions: Adafactor's factored ``row_var`` and ``col_var``.
    """
    return state.dim() == param.dim() and all(s in (1, p) for s, p in zip(state.shape, param.shape, strict=True))


def _fused_unsupported(optimizer: torch.optim.Optimizer, layer_params: list[list[nn.Parameter]]) -> str:
    """Why the fused step cannot stand in for ``optimizer`` ('' when it can)."""
    if importlib.util.find_spec("triton") is None:  # checked first: the kernels package below loads it
        return "Triton is not installed (triaccel-rl depends on it on Linux only)"
    groups = optimizer.param_groups
    keys: tuple[str, ...]
    if type(optimizer) is torch.optim.SGD:
        keys = _SGD_KEYS
    elif type(optimizer) is torch.optim.AdamW or (
        type(optimizer) is torch.optim.Adam and not any(g["weight_decay"] for g in groups)
    ):
        keys = ("betas", "eps")
    else:
        return f"{type(optimizer).__name__} (supported: SGD, AdamW, Adam without weight decay)"
    unsupported = _unsupported_option(groups)
    if unsupported:
        return unsupported
    for key in keys:
        if len({repr(g[key]) for g in groups}) > 1:
            return f"param groups differ in {key!r}"
    group_of = {id(p): g for g in groups for p in g["params"]}
    if any(id(p) not in group_of for params in layer_params for p in params):  # the fused step updates them all
        return "a trainable parameter is in no param group"
    for params in layer_params:
        if len({(float(group_of[id(p)]["lr"]), group_of[id(p)].get("layer")) for p in params}) > 1:
            return "a layer's parameters are in param groups of different LRs or 'layer' keys"
    devices = {p.device for params in layer_params for p in params}
    if len(devices) > 1:  # a model split across GPUs: the flat store holds one device's parameters
        return f"parameters are on several devices: {sorted(map(str, devices))}"
    from triaccel_rl.kernels.flat_store import check_apart, is_dense  # the kernels package loads Triton: import late

    if any(p.dtype != torch.float32 or not is_dense(p) for params in layer_params for p in params):
        return "parameters must be dense (contiguous or channels-last) float32"
    try:  # two parameters over one memory (not one tied parameter): the flat store, which the reference path does
        check_apart([p for params in layer_params for p in params])  # not need, would give each its own
    except ValueError as error:
        return str(error)
    try:  # values torch.optim takes and the fused step refuses (AdamW's eps=0, SGD's dampening > 1)
        _fused_options(optimizer, tuple(group["weight_decay"] for group in groups))
    except ValueError as error:
        return str(error)
    return ""


def _unsupported_option(groups: Sequence[Mapping[str, Any]]) -> str:
    """The first param group's option the fused step does not run (``_UNSUPPORTED_OPTIONS``) as a reason, else ''."""
    for index, group in enumerate(groups):
        for option in _UNSUPPORTED_OPTIONS:
            if group.get(option):  # (a group saved before torch had the option lacks it: off)
                return f"param group {index} has {option}={group[option]!r}, which the fused step does not support"
    return ""


def _check_supported_options(groups: Sequence[Mapping[str, Any]]) -> None:
    """Raises a ValueError naming the param group and its option the fused step does not run (``_unsupported_option``).

    For a group that turns one on after the build (a loaded state's, ``group["maximize"] = True``): the fused step
    would run plain AdamW for AMSGrad, its ``max_exp_avg_sq`` dropped from the exported state, descend for
    ``maximize``, and update in place outside autograd for ``differentiable``.
    """
    unsupported = _unsupported_option(groups)
    if unsupported:
        raise ValueError(f"{unsupported}: turn it off, or {_reference_advice('from groups with it on already')}")


def _reference_advice(built: str = "") -> str:
    """The way around a change the fused step cannot follow: torch.optim's own step (the reference path).

    ``built`` names the optimizer a new engine would be built from. Such an engine takes the reference path by itself
    only with ``fused=None``: with ``fused=True`` it is refused (a ``ConfigError``), so the advice names the argument.
    """
    already = f"; one built with fused=None {built} takes the reference path by itself" if built else ""
    return (
        "build the StepEngine or Controller with fused=False, which runs torch.optim's own step (an open Controller: "
        f"close() it and build a new one{already})"
    )


def _device_dtype_groups(tensors: Sequence[torch.Tensor]) -> list[list[int]]:
    """The positions of ``tensors`` grouped by device and dtype, as ``torch.nn.utils.clip_grad_norm_`` groups them.

    Its grouping, and so the order it stacks the per-tensor norms in: not the order of first appearance (float64
    norms came before float32 ones); torch's own helper gives it.
    """
    if not tensors:
        return []
    dtype, device = tensors[0].dtype, tensors[0].device  # (a dtype is one object: ``is`` tells it, at half the cost)
    if all(tensor.dtype is dtype and tensor.device == device for tensor in tensors):
        return [list(range(len(tensors)))]  # the usual model: one device, one dtype
    grouped = _group_tensors_by_device_and_dtype([list(tensors)], with_indices=True)
    return [list(indices) for _, indices in grouped.values()]


def _norms_by_device_and_dtype(
    tensors: Sequence[torch.Tensor], groups: list[list[int]] | None = None
) -> list[torch.Tensor]:
    """Each tensor's 2-norm in its own dtype: one ``_foreach_norm`` per device and dtype, as torch's clip takes them.

    ``groups``: ``_device_dtype_groups(tensors)`` where the caller has it already.
    """
    if groups is None:
        groups = _device_dtype_groups(tensors)
    if len(groups) == 1:  # the usual model: one device, one dtype
        return list(torch._foreach_norm(list(tensors)))
    norms: list[torch.Tensor] = [torch.empty(0)] * len(tensors)
    for group in groups:
        for index, norm in zip(group, torch._foreach_norm([tensors[i] for i in group]), strict=True):
            norms[index] = norm
    return norms


def _comparable(value: Any) -> Any:
    """A param group's hyper-parameter as a hashable value equal to an equal one's: tensors and lists as numbers."""
    if isinstance(value, (list, tuple)):
        return tuple(map(_comparable, value))
    return value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value


def _fused_options(optimizer: torch.optim.Optimizer, weight_decay: Any) -> SGDOptions | AdamWOptions:
    """The fused step's options for ``optimizer`` (SGD, or AdamW or Adam), from its first param group.

    Each hyper-parameter is read as a Python float, as the kernels take them: ``torch.optim`` takes one-element
    tensors (betas, momentum), which fail in the Triton kernels with a type error.

    Raises:
        ValueError: naming a value the fused step refuses (``_fused_unsupported`` gives it as its reason).
    """
    from triaccel_rl.kernels.optim import AdamWOptions, SGDOptions  # the kernels package loads Triton: import late

    group = optimizer.param_groups[0]
    if isinstance(optimizer, torch.optim.SGD):
        return SGDOptions(group["momentum"], group["dampening"], weight_decay, group["nesterov"])
    beta1, beta2 = group["betas"]
    return AdamWOptions(beta1, beta2, group["eps"], weight_decay)


def _modules_not_held(model: nn.Module, layers: Sequence[LayerInfo]) -> list[str]:
    """The names of ``model``'s modules that own parameters directly and are none of ``layers`` (frozen at the build).

    A ``MultiheadAttention``'s inner modules are part of it, as ``find_layers`` counts them.
    """
    held = {layer.name for layer in layers}
    inside_attention = {
        id(inner)
        for module in model.modules()
        if isinstance(module, nn.MultiheadAttention)
        for inner in module.modules()
        if inner is not module
    }
    return [
        name or "<root>"
        for name, module in model.named_modules()
        if (name or "<root>") not in held
        and id(module) not in inside_attention
        and next(module.parameters(recurse=False), None) is not None
    ]


def _checked_multiplier(name: str, value: Any, zero_allowed: bool = False) -> float:
    """A checkpoint's LR multiplier as a float: a finite number > 0 (>= 0 with ``zero_allowed``), else a ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"the checkpoint's {name} {value!r} is not a number")
    if not (math.isfinite(value) and (value >= 0 if zero_allowed else value > 0)):
        raise ValueError(f"the checkpoint's {name} {value} must be a finite number {'>=' if zero_allowed else '>'} 0")
    return float(value)


def refuse_driven_modules(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Raises a ValueError naming the modules of ``model`` that another open ``LayerPrecision`` (a Controller) drives.

    Their live hooks: a module shared with a model that has a Controller, the same model under a second Controller (a
    second optimizer's), or a deep copy made while a Controller was open (the copy carries its hooks, which act for
    it). Two Controllers over one module each set its precision and step it: the first's hooks read the second's
    autocast region as the model's own block (a bf16 run took a loss scaler), the second's step found the graph
    backpropagated, and the first's rollback undid the second's updates. Checked before anything is hooked, as the
    other refusals.

    Left to the ``StepEngine``'s refusals, which say more, where ``optimizer`` is driven itself (a notebook cell that
    builds the Controller run again) or holds none of the model's trainable parameters.
    """
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not any(id(p) in held for p in model.parameters() if p.requires_grad):
        return
    if any(_open_engine(hook) for hook in optimizer._optimizer_step_pre_hooks.values()):
        return
    driven = driven_modules(model)
    if driven:
        raise ValueError(
            f"modules {driven[:3]} (of {len(driven)}) of {type(model).__name__} are driven by another open Controller "
            "(its precision hooks are on them): two Controllers cannot share modules. Drive them with one Controller "
            "and step a second optimizer yourself (README, 'Use it in your own training loop'), close() the other "
            "Controller first, or deep-copy the model before building the first Controller (a copy made while one is "
            "open carries its hooks)"
        )


def _export_fused_state(
    optimizer: torch.optim.Optimizer, fused: Any, store: Any, group_index: Mapping[int, int], *, copies: bool
) -> None:
    """``StepEngine._export_optimizer_state``: the fused step's state into ``optimizer.state``, in its layout.

    A function of what it reads (the fused optimizer, the store, each parameter's group by position), not of the
    engine: an engine garbage-collected without ``remove()`` hands its state back through it (:func:`_hand_back`).
    """
    from triaccel_rl.kernels import FusedSGD  # (loaded already: the engine ran the fused step)

    counts = fused.layer_step_counts
    layer_steps = counts.tolist()
    # SGD: a layer whose steps were all at momentum 0 (a schedule from 0) has no momentum buffer yet, as torch.optim's
    # parameters have none: exported, its zeros loaded as a started buffer, and the first step with momentum after a
    # resume took the dampened branch
    started = (counts > fused.steps_before_momentum).tolist() if isinstance(fused, FusedSGD) else None
    state = optimizer.state
    for layer, params in enumerate(store.layers):
        n = layer_steps[layer]  # a layer that never took part has no state, as torch.optim's parameters
        buffers = {name: store.param_views(getattr(fused, name), layer) for name in fused._buffer_names}
        for i, param in enumerate(params):
            if n == 0 or not buffers or (started is not None and not started[layer]):
                state.pop(param, None)
                continue
            entry = {
                name: views[i].clone(memory_format=torch.preserve_format) if copies else views[i]
                for name, views in buffers.items()
            }
            if "exp_avg" in buffers:
                group = optimizer.param_groups[group_index[id(param)]]
                on_device = group.get("capturable") or group.get("fused")
                entry["step"] = torch.tensor(n, dtype=torch.float32, device=param.device if on_device else None)
            state[param] = entry


def _release_store(fused: Any, store: Any) -> None:
    """The store's ``release()``; SGD without momentum keeps the parameters' buffer as its stand-in: it goes too."""
    stand_in = getattr(fused, "momentum_buffer", None) is store.params
    store.release()
    if stand_in:
        fused.momentum_buffer = store.params


def _hand_back(
    optimizer: weakref.ref[torch.optim.Optimizer], fused: Any, store: Any, group_index: Mapping[int, int]
) -> None:
    """What ``StepEngine.remove()`` hands back, for a fused engine garbage-collected without it (a finalizer).

    The moments go into the optimizer as copies and the parameters get storage of their own: a Controller dropped
    unclosed (a sweep's trial that raised) lost the moments with its engine, and a new one on the optimizer started
    them from zero, silently (a mid-run ``optimizer.state_dict()`` left views there with a stale step count).
    """
    _release_store(fused, store)  # first, as in remove()
    held = optimizer()
    if held is not None:
        _export_fused_state(held, fused, store, group_index, copies=True)


def _open_engine(hook: Any) -> bool:
    """Whether ``hook`` is an optimizer hook of a StepEngine that is alive (a removed one's hooks are off)."""
    ref = getattr(hook, "_triaccel_engine", None)
    return ref is not None and ref() is not None


def _mark_engine_hook(hook: Callable[..., Any], engine: weakref.ref[StepEngine]) -> Callable[..., Any]:
    """``hook`` marked as ``engine``'s optimizer hook, for :func:`_open_engine` and :func:`_drop_dead_engine_hooks`."""
    hook._triaccel_engine = engine  # type: ignore[attr-defined]
    return hook


def _drop_dead_engine_hooks(optimizer: torch.optim.Optimizer) -> None:
    """Takes off ``optimizer`` the hooks of StepEngines garbage-collected without ``remove()``; a live one's stay."""
    events = ("step", "state_dict", "load_state_dict")
    for name in (f"_optimizer_{event}_{when}_hooks" for event in events for when in ("pre", "post")):
        hooks = optimizer.__dict__.get(name, {})  # torch's private dicts, as _step_hooks reads them
        dead = [key for key, hook in hooks.items() if hasattr(hook, "_triaccel_engine") and not _open_engine(hook)]
        for key in dead:
            del hooks[key]


def _same_elements(value: Any, view: torch.Tensor) -> bool:
    """Whether ``value`` is a tensor over exactly ``view``'s elements (the view itself, or another view of them)."""
    return (
        isinstance(value, torch.Tensor)
        and value.device == view.device
        and value.dtype == view.dtype
        and value.data_ptr() == view.data_ptr()
        and value.shape == view.shape
        and value.stride() == view.stride()
    )


def _state_value(value: Any) -> bool:
    """Whether ``value`` is what ``torch.optim`` keeps for a parameter: a tensor, number or None, or a list of them."""
    if isinstance(value, (list, tuple)):  # (L-BFGS keeps its history in lists)
        return all(_state_value(item) for item in value)
    return value is None or isinstance(value, (torch.Tensor, numbers.Number))


def _check_scaler(scaler: Any, keys: Mapping[str, int | None]) -> dict[str, float | int]:
    """``scaler``'s ``keys`` as Python numbers; raises a ValueError unless each holds a value the scaler can take.

    Each a whole number >= the key's value and < 2**31 (an int32 count), or where that is None a number in its range
    (``_SCALER_RANGES``; the scale's: a normal float32 > 0, as a larger scale became inf and a smaller one 0, every
    step skipped for good); as a number or a tensor of one element.
    """
    _require_keys("scaler", scaler, tuple(keys))
    checked: dict[str, float | int] = {}
    for key, least in keys.items():
        value = scaler[key]
        number = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
        if least is None:
            real = not isinstance(number, bool) and isinstance(number, numbers.Real)
            low, high, allowed = _SCALER_RANGES.get(key, _SCALE_RANGE)
            if not (real and math.isfinite(number) and low <= number <= high):
                raise ValueError(f"the checkpoint's scaler has {key} {value!r}, not {allowed}")
            checked[key] = float(number)
        else:
            if isinstance(number, bool) or not isinstance(number, numbers.Integral) or not least <= int(number) < 2**31:
                raise ValueError(f"the checkpoint's scaler has {key} {value!r}, not a whole number in [{least}, 2**31)")
            checked[key] = int(number)
    return checked


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)
_FLOAT32_TINY = float(torch.finfo(torch.float32).tiny)
SCALE_INITIAL, _SCALE_GROWTH, _SCALE_BACKOFF, _SCALE_INTERVAL = 2.0**16, 2.0, 0.5, 2000
"""GradScaler's defaults, which the fused loss scale follows: 2**16 at first, doubled after 2000 clean steps, halved on
overflow."""
_SCALE_RANGE = (_FLOAT32_TINY, _FLOAT32_MAX, f"a normal float32 > 0 (from {_FLOAT32_TINY:.4g} to {_FLOAT32_MAX:.4g})")
_SCALER_RANGES = {
    "growth_factor": (math.nextafter(1.0, 2.0), _FLOAT32_MAX, "a number > 1"),
    "backoff_factor": (_FLOAT32_TINY, math.nextafter(1.0, 0.0), "a number in (0, 1)"),
}
"""The real-valued scaler entries' ranges other than the scale's (a normal float32 > 0: 1e-50 loaded as 0, every step
skipped for good): ``GradScaler`` refuses a growth factor <= 1 and a backoff factor >= 1."""


def _require_keys(what: str, entry: Any, keys: Sequence[str], whose: str = "the checkpoint's ") -> None:
    """Raises a ValueError naming the ``keys`` that ``whose`` ``what`` (a dict: the checkpoint's, by default) lacks."""
    if not isinstance(entry, Mapping):
        raise ValueError(f"{whose}{what} is {type(entry).__name__}, not a dict of {', '.join(keys)}")
    missing = [key for key in keys if key not in entry]
    if missing:
        raise ValueError(f"{whose}{what} lacks {', '.join(map(repr, missing))}")


@dataclass(frozen=True)
class _LoadPlan:
    """What ``StepEngine.load_state_dict`` loads, once checked."""

    across: bool
    optimizer_state: Any  # torch.optim's state_dict(), or the fused optimizer's
    groups: list[dict[str, Any]] | None  # on the fused path, the saved torch.optim param groups (None: none saved)
    precisions: list[Precision]
    lr_scale: float
    batch_lr_gain: float
    lr_factors: np.ndarray
    scaler: Mapping[str, Any] | None
    grad_scaler: torch.amp.GradScaler | None


_FUSED_SCALER_KEYS: dict[str, int | None] = {"scale": None, "clean_steps": 0}
"""The fused step's loss-scaler state: each key, with the least whole number it may hold (None: a number > 0)."""
_GRAD_SCALER_KEYS: dict[str, int | None] = {
    "scale": None, "growth_factor": None, "backoff_factor": None, "growth_interval": 1, "_growth_tracker": 0
}  # fmt: skip
"""``torch.amp.GradScaler``'s state, as ``_FUSED_SCALER_KEYS``."""
_STATE_KEYS = ("fused", "optimizer", "precisions", "lr_scale", "batch_lr_gain", "lr_factors", "scaler")
"""The keys every ``StepEngine.state_dict()`` holds (``optimizer_type`` and ``torch_optimizer`` came later)."""
_DECAY, _LR = operator.itemgetter("weight_decay"), operator.itemgetter("lr")
_SPARSE_TYPES = (nn.Embedding, nn.EmbeddingBag)
"""Modules whose ``sparse=True`` makes sparse gradients."""
_SGD_KEYS = ("momentum", "dampening", "nesterov")
"""The SGD hyper-parameters the fused step takes from the param groups (besides the LR and weight decay)."""
_UNSUPPORTED_OPTIONS = ("amsgrad", "maximize", "differentiable")
"""``torch.optim`` options that change the update, or (``differentiable``) how autograd sees it, that no fused kernel
runs. (``capturable`` keeps AdamW's step count on the device, for CUDA graphs: the fused step keeps its own count there
anyway, and exports it there for a capturable group.)"""
_INITIAL_STEP_LRS = (torch.optim.Rprop,)
"""``torch.optim`` optimizers whose ``lr`` only sets each parameter's first step size (Rprop's ``step_size`` state,
made at its first step; after that the step sizes adapt by sign alone). Every other one reads ``lr`` at each step;
L-BFGS, which needs a closure, is refused (``_needs_closure``)."""
_OPTIONAL_FLAGS = ("foreach", "fused")
"""``torch.optim`` flags that may be None (the optimizer picks its implementation) as well as a bool."""
_HYPER_RANGES: dict[str, tuple[float, float]] = {
    "lr": (0.0, math.inf),
    "initial_lr": (0.0, math.inf),
    "eps": (0.0, math.inf),
    "weight_decay": (0.0, math.inf),
    "momentum": (0.0, math.inf),
    "dampening": (0.0, math.inf),
    "betas": (0.0, 1.0),
}
"""Param group hyper-parameters' ranges ``[low, high)``, as torch.optim's constructors check them (others: any finite
number), and dampening >= 0. A beta of 1 divides Adam's bias correction ``1 - beta**step`` by zero; eps 0 torch
allows."""


def _needs_closure(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` has a required ``closure`` argument (L-BFGS's), which ``step(loss)`` cannot pass."""
    try:
        parameter = inspect.signature(optimizer.step).parameters.get("closure")
    except (TypeError, ValueError):  # a step without a signature to read: let its first call say
        return False
    return parameter is not None and parameter.default is inspect.Parameter.empty


def _decay_classes(optimizer: torch.optim.Optimizer) -> list[int]:
    """Each param group's (by position) weight-decay class: groups of one decay share one, numbered in order."""
    classes: dict[float, int] = {}
    return [classes.setdefault(float(group["weight_decay"]), len(classes)) for group in optimizer.param_groups]

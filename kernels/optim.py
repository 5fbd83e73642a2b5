"""Fused SGD and AdamW optimizers over a ``FlatParameterStore``: a step is two Triton passes and no host sync.

A step runs ``layer_grad_stats`` (pass 1: reads the grads, writes per-layer statistics and the global
non-finite count) and then the optimizer's update kernel (pass 2: reads the count on the device and either
updates every layer, writing the low-precision copies, or leaves every byte unchanged). Five launches in
all, two of them Triton kernels over the flat buffers; the other three touch a few bytes: the memset of
the statistics buffer, the snapshot of the step counts, and the comparison producing
``StepResult.skipped``; a ``skip`` flag adds one more (its add into the count; the engine's flag, a non-finite
loss, costs two more to make). Nothing in ``step`` reads a device value on the host, so a training loop can run
ahead of the GPU; read ``StepResult`` fields when the host needs them (that read is the sync).
"""

from __future__ import annotations

import ast
import math
import numbers
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from triaccel_rl.kernels._common import StatRow, check_block_size, log_betas, new_step_state
from triaccel_rl.kernels.adamw_step import fused_adamw_step
from triaccel_rl.kernels.cast import cast_to_low_precision
from triaccel_rl.kernels.flat_store import FlatParameterStore
from triaccel_rl.kernels.grad_stats import layer_grad_stats
from triaccel_rl.kernels.sgd_step import fused_sgd_step

__all__ = ["AdamWOptions", "FusedAdamW", "FusedSGD", "SGDOptions", "StepResult"]


@dataclass(frozen=True)
class StepResult:
    """What one fused step reports. Every tensor is on the store's device; none was read by the host.

    Attributes:
        skipped: 0-dim bool tensor, True when a non-finite gradient (or the caller's ``skip``) made the step
            leave parameters, optimizer state, low-precision copies and the step counts bit-for-bit unchanged.
        stats: float32 ``[N_STAT_ROWS, n_layers]`` statistics buffer, laid out as ``StatRow`` says; the
            properties below are per-layer views of it.
    """

    skipped: torch.Tensor
    stats: torch.Tensor

    @property
    def grad_sq_sum(self) -> torch.Tensor:
        """float32 ``[n_layers]``: sum of squares of the unscaled gradient's finite elements."""
        return self.stats[StatRow.GRAD_SQ_SUM]

    @property
    def grad_abs_max(self) -> torch.Tensor:
        """float32 ``[n_layers]``: largest absolute value of the unscaled gradient's finite elements."""
        return self.stats[StatRow.GRAD_ABS_MAX]

    @property
    def grad_nonfinite(self) -> torch.Tensor:
        """int32 ``[n_layers]``: count of inf and NaN elements of the unscaled gradient."""
        return self.stats.view(torch.int32)[StatRow.GRAD_NONFINITE]

    @property
    def grad_sum(self) -> torch.Tensor:
        """float32 ``[n_layers]``: sum of the unscaled gradient's finite elements."""
        return self.stats[StatRow.GRAD_SUM]

    @property
    def grad_dot_momentum(self) -> torch.Tensor:
        """float32 ``[n_layers]``: sum of gradient times the momentum (first moment) before the step."""
        return self.stats[StatRow.GRAD_DOT_MOMENTUM]

    @property
    def momentum_sq_sum(self) -> torch.Tensor:
        """float32 ``[n_layers]``: sum of squares of the momentum (first moment) after the step."""
        return self.stats[StatRow.MOMENTUM_SQ_SUM]

    @property
    def second_moment_sum(self) -> torch.Tensor:
        """float32 ``[n_layers]``: AdamW's sum of the second moment after the step (0 for SGD)."""
        return self.stats[StatRow.SECOND_MOMENT_SUM]

    @property
    def nonfinite_total(self) -> torch.Tensor:
        """0-dim int32: non-finite gradient elements over all layers, plus one for a ``skip`` given to ``step``."""
        return self.stats.view(torch.int32)[StatRow.NONFINITE_TOTAL, 0]


@dataclass(frozen=True)
class SGDOptions:
    """Hyper-parameters of ``FusedSGD``, with ``torch.optim.SGD``'s meaning (the LR is given per step).

    Attributes:
        momentum: momentum factor, a finite number >= 0 (0 disables the momentum buffer).
        dampening: dampening of the gradient's contribution to the momentum buffer, in [0, 1].
        weight_decay: L2 penalty added to the gradient, a finite number >= 0; or one per group of the store's parameters
            (``FlatParameterStore``'s ``groups``), a tuple indexed by group.
        nesterov: use Nesterov momentum. ``FusedSGD`` needs ``momentum > 0`` and ``dampening == 0`` with it when
            built, as ``torch.optim.SGD``'s constructor does; options changed later (a schedule taking the momentum
            to 0, as ``OneCycleLR(base_momentum=0)`` does) are not refused: at momentum 0 the step is plain SGD.
    """

    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float | tuple[float, ...] = 0.0
    nesterov: bool = False

    def __post_init__(self) -> None:
        _store_floats(self, "momentum", "dampening")
        object.__setattr__(self, "nesterov", bool(self.nesterov))
        if not (math.isfinite(self.momentum) and self.momentum >= 0.0):
            raise ValueError(f"momentum must be a finite number >= 0, got {self.momentum}")
        if not 0.0 <= self.dampening <= 1.0:
            raise ValueError(f"dampening must be in [0, 1], got {self.dampening}")
        object.__setattr__(self, "weight_decay", _checked_decay(self.weight_decay))


@dataclass(frozen=True)
class AdamWOptions:
    """Hyper-parameters of ``FusedAdamW``, with ``torch.optim.AdamW``'s meaning (the LR is given per step).

    Attributes:
        beta1: decay of the first-moment average, in [0, 1).
        beta2: decay of the second-moment average, in [0, 1).
        eps: term added to the denominator, a finite number > 0.
        weight_decay: decoupled weight decay, a finite number >= 0; or one per group of the store's parameters
            (``FlatParameterStore``'s ``groups``), a tuple indexed by group.
    """

    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float | tuple[float, ...] = 1e-2

    def __post_init__(self) -> None:
        _store_floats(self, "beta1", "beta2", "eps")
        for name, beta in (("beta1", self.beta1), ("beta2", self.beta2)):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {beta}")
        if not (math.isfinite(self.eps) and self.eps > 0.0):
            raise ValueError(f"eps must be a finite number > 0, got {self.eps}")
        object.__setattr__(self, "weight_decay", _checked_decay(self.weight_decay))


def _store_floats(options: SGDOptions | AdamWOptions, *names: str) -> None:
    """Stores the fields ``names`` of ``options`` as Python floats, which the kernels take as scalars.

    ``torch.optim`` takes one-element tensors (``AdamW(betas=(torch.tensor(0.9), ...))``): passed on as they were,
    the first step would fail in a kernel with a Triton type error. A value that is no number is
    stored as NaN, which the range checks that follow refuse, naming the field.

    Raises:
        ValueError: a field is a tensor of several elements.
    """
    for name in names:
        value = getattr(options, name)
        if isinstance(value, torch.Tensor) and value.numel() != 1:
            raise ValueError(
                f"{name} must be a number or a one-element tensor, got a tensor of shape {tuple(value.shape)}"
            )
        object.__setattr__(options, name, _as_float(value))


def _checked_decay(weight_decay: float | Sequence[float]) -> float | tuple[float, ...]:
    """A weight decay as the options hold it (a float, or a tuple a group), or a ValueError naming it."""
    values = (
        weight_decay if isinstance(weight_decay, Sequence) and not isinstance(weight_decay, str) else (weight_decay,)
    )
    if not values or any(not 0.0 <= _as_float(value) < math.inf for value in values):
        raise ValueError(
            f"weight_decay must be a finite number >= 0, or a non-empty sequence of such (one a group); "
            f"got {weight_decay!r}"
        )
    if isinstance(weight_decay, Sequence):
        return tuple(float(value) for value in weight_decay)
    return float(weight_decay)


class _FusedOptimizer:
    """The plumbing ``FusedSGD`` and ``FusedAdamW`` share: defaults, the step counter, checkpoints."""

    _kind = ""
    _buffer_names: tuple[str, ...] = ()
    options: SGDOptions | AdamWOptions

    def __init__(
        self, store: FlatParameterStore, block_size: int | None, num_warps: int | None, beta1: float, beta2: float
    ):
        if block_size is not None:
            check_block_size(block_size, store.segment_align)
        self.store = store
        self.block_size = block_size
        self.num_warps = num_warps
        self._step_state = new_step_state(store.device, beta1, beta2, n_layers=store.n_layers)
        # Which layer each parameter (in the store's order) is in; and per set of layers that sat a step out, the
        # device row of participation flags (row 2 of the step state) that says so, built once per set.
        self._param_layer = [layer for layer, params in enumerate(store.layers) for _ in params]
        self._sitting_out_flags: dict[frozenset[int], torch.Tensor] = {}
        self._all_take_part = True
        self._default_lr_factors = torch.ones(store.n_layers, dtype=torch.float32, device=store.device)
        self._default_codes = torch.zeros(store.n_layers, dtype=torch.int32, device=store.device)
        self._decay_cache: tuple[tuple[float, ...], float | torch.Tensor] | None = None
        self._layout_text = repr(store.param_layout)  # what checkpoints hold (state_dict)
        self.update_launched = False
        """Whether the last :meth:`step` launched its update, set by the launcher once its checks passed, right before
        its first write: an error after it (rewriting the 16-bit copies allocates) leaves the update in; one before it
        (allocating the statistics, a launcher's check) moved nothing, and a retry finds the record of the parameters
        without a gradient as it was."""

    def _check_decay(self, options: SGDOptions | AdamWOptions | None = None) -> None:
        """Raises a ValueError when a per-group weight decay does not cover the store's groups.

        ``options``'s decay (a checkpoint's, before it loads), else this optimizer's.
        """
        decay = (options or self.options).weight_decay
        if isinstance(decay, tuple) and len(decay) < self.store.n_groups:
            raise ValueError(
                f"weight_decay gives {len(decay)} values (one a group), but the store's parameters are in groups "
                f"0..{self.store.n_groups - 1}"
            )

    def kernel_weight_decay(self) -> float | torch.Tensor:
        """The update kernel's weight decay: a float when every group's is the same, else one a segment."""
        decay = self.options.weight_decay
        if not isinstance(decay, tuple):
            return decay
        if self._decay_cache is None or self._decay_cache[0] != decay:  # worked out once for these decays
            used = {decay[group] for group in range(self.store.n_groups)}
            if len(used) == 1:
                self._decay_cache = (decay, used.pop())
            else:  # one a segment, on the device
                per_group = torch.tensor(decay, dtype=torch.float32, device=self.store.device)
                self._decay_cache = (decay, per_group[self.store.chunk_group.long()].contiguous())
        return self._decay_cache[1]

    @property
    def step_count(self) -> torch.Tensor:
        """0-dim float64 device tensor: steps applied so far (skipped steps do not count)."""
        return self._step_state[0, 0]

    @property
    def layer_step_counts(self) -> torch.Tensor:
        """float64 ``[n_layers]`` device tensor: the applied steps each layer took part in.

        ``torch.optim``'s ``step`` of its parameters. Below ``step_count`` for a layer that sat steps out (none of
        its parameters got a gradient, after a ``zero_grad(set_to_none=True)``).
        """
        return self._step_state[0, 1:]

    def set_log_betas(self, beta1: float, beta2: float) -> None:
        """Makes the bias corrections of the next steps use these betas (``torch.optim`` reads the current ones).

        No sync on a GPU (a momentum schedule calls it every step): the values go through pinned memory, which the
        host allocator does not reuse before the copy is done.
        """
        values = torch.tensor(log_betas(beta1, beta2), dtype=torch.float64)
        self._step_state[3, :2].copy_(_staged_for(values, self.store.device), non_blocking=True)

    def zero_grad(self) -> None:
        """Zeros the store's flat gradient buffer (the ``param.grad`` views stay)."""
        self.store.zero_grad()

    def step(
        self,
        lr: float,
        lr_factors: torch.Tensor | None = None,
        precision_codes: torch.Tensor | None = None,
        inv_scale: float | torch.Tensor = 1.0,
        max_grad_norm: float | None = None,
        skip: torch.Tensor | None = None,
    ) -> StepResult:
        """Applies one step to every parameter of the store, unless a gradient is non-finite (or ``skip``).

        It reads the gradients from the store's flat buffer, which ``param.grad`` views. After anything that sets
        ``param.grad`` to ``None`` (``optimizer.zero_grad()``, ``model.zero_grad()``), call
        ``store.rebind_grads()`` before the next backward or ``store.rebind_grads(after_backward=True)`` after it,
        or the step reads zeros (``StepEngine`` does the latter before every step); checking here would cost every
        step a pass over the parameters on the host. So too after ``backward(create_graph=True)`` and before the
        step: autograd then accumulates out of place, into a new ``param.grad``, and ``rebind_grads()`` copies it
        into the buffer.

        Args:
            lr: global learning rate, a finite number >= 0.
            lr_factors: float32 ``[n_layers]`` on the store's device; layer ``i`` uses
                ``lr * lr_factors[i]`` (default: all 1).
            precision_codes: integer ``[n_layers]`` on the store's device: 0 fp32 (no copy), 1 bf16,
                2 fp16 (``PrecisionCode``, same values as ``types.Precision``); bf16 and fp16 layers get
                their low-precision copy rewritten (default: all fp32). The values of these two are checked on
                CPU tensors (finite factors >= 0; codes 0, 1 or 2); on a GPU they are not, which would cost a sync a
                step: ``StepEngine`` checks them on the host when they are set.
            inv_scale: multiplier unscaling the gradients (``1 / loss_scale``), a float or a one-element
                float32 tensor on the device (e.g. ``scaler.get_scale()`` kept on the GPU, reciprocated).
            max_grad_norm: clip the unscaled gradient's total norm to this, as ``torch.nn.utils.clip_grad_norm_``
                does (``g * min(1, max_grad_norm / (norm + 1e-6))``), on the device from the statistics pass: no
                extra pass over the gradients, no sync. None (or ``math.inf``): no clipping.
            skip: a one-element bool tensor on the store's device; True skips the step as a non-finite gradient
                does (a non-finite loss, whose gradients can be finite: an infinite term without a gradient). It
                adds one to ``StatRow.NONFINITE_TOTAL``, which ``skipped`` and the update read; the per-layer rows
                stay the gradient's. No sync.

        Returns:
            The skip flag and the per-layer statistics, all on the device: the gradient's rows of the gradient
            before clipping, ``GRAD_DOT_MOMENTUM`` of the clipped one the update used.

        Raises:
            ValueError: naming an argument out of range or of the wrong type (a list or a NumPy array where a tensor
                is due: with the type received), before anything changes.
        """
        self.update_launched = False
        if not _is_number(lr) or not 0.0 <= lr < math.inf:  # None raised a TypeError from the comparison
            raise ValueError(f"lr must be a finite number >= 0, got {_type_name(lr)} {lr!r}")
        if not isinstance(inv_scale, torch.Tensor) and (not _is_number(inv_scale) or not 0.0 < inv_scale < math.inf):
            raise ValueError(
                f"inv_scale must be a finite number > 0 (1 / the loss scale), got {_type_name(inv_scale)} {inv_scale!r}"
            )
        if max_grad_norm is not None and (
            isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, numbers.Real) or not max_grad_norm > 0
        ):  # a tensor's comparison would cost a sync, or fail as ambiguous on several elements
            raise ValueError(
                f"max_grad_norm must be a number > 0 (or None for no clipping), got {_type_name(max_grad_norm)} "
                f"{max_grad_norm!r}"
            )
        store = self.store
        for name, value in (("lr_factors", lr_factors), ("precision_codes", precision_codes), ("skip", skip)):
            # Before any tensor attribute is read (a list or a bool failed with an AttributeError, and a NumPy
            # float32 array was told it must be float32): the type received, named.
            if value is not None and not isinstance(value, torch.Tensor):
                raise ValueError(f"{name} must be {_STEP_TENSORS[name]} on {store.device}; got {_type_name(value)}")
        for name, tensor in (("lr_factors", lr_factors), ("precision_codes", precision_codes)):
            if tensor is not None and tuple(tensor.shape) != (store.n_layers,):
                raise ValueError(
                    f"{name} must have one entry a layer, shape ({store.n_layers},); got {tuple(tensor.shape)}"
                )
        factors = self._default_lr_factors if lr_factors is None else lr_factors
        codes = self._default_codes if precision_codes is None else precision_codes
        # Everything the update checks, checked before anything moves: a step refused in the update had already
        # taken the record of the parameters without a gradient, and the retry decayed them.
        self._check_step_arguments(factors, codes, inv_scale, skip)
        if isinstance(inv_scale, torch.Tensor):  # (1, 1, 1) would broadcast the CPU path's gradients to 3-D and
            inv_scale = inv_scale.reshape(())  # raise there, after the step counts had moved
        if store.device.type == "cpu":  # values read without a sync: a NaN factor gave NaN weights, code 7 stale copies
            _check_step_values(factors, codes, inv_scale)
        stats = layer_grad_stats(
            store.grads, store.chunk_layer, store.n_layers, inv_scale, segment_align=store.segment_align
        )
        if skip is not None:  # the update kernels skip on a non-zero total of non-finite elements
            stats.view(torch.int32)[StatRow.NONFINITE_TOTAL, :1].add_(skip.reshape(1))
        if max_grad_norm is not None and max_grad_norm != math.inf:  # the update unscales by inv_scale: the clip
            # coefficient rides on it. (An infinite bound clips nothing; computed, it would turn an overflowed norm's
            # inf / inf into a NaN update.)
            total = stats[StatRow.GRAD_SQ_SUM].sum().sqrt()
            inv_scale = torch.clamp(max_grad_norm / (total + 1e-6), max=1.0) * inv_scale
        without_grad = store.params_without_grad()  # the record is cleared as the update launches (_launching)
        self._mark_sitting_out(without_grad)
        untouched = self._saved_slices(without_grad)
        self._update(float(lr), factors, codes, stats, inv_scale)
        for slice_, saved in untouched:  # as torch.optim, which skips a parameter whose gradient is None
            slice_.copy_(saved)
        skipped = stats.view(torch.int32)[StatRow.NONFINITE_TOTAL, 0] != 0
        self._recast_copies(without_grad, codes, skipped)
        return StepResult(skipped=skipped, stats=stats)

    def _check_step_arguments(
        self,
        factors: torch.Tensor,
        codes: torch.Tensor,
        inv_scale: float | torch.Tensor,
        skip: torch.Tensor | None,
    ) -> None:
        """Raises a ValueError naming an argument of :meth:`step` the kernels would refuse."""
        device = self.store.device
        if factors.dtype != torch.float32 or factors.device != device or not factors.is_contiguous():
            raise ValueError(
                f"lr_factors must be {_STEP_TENSORS['lr_factors']} on {device}; got {factors.dtype} on {factors.device}"
            )
        # Not uint16/32/64: torch computes no comparison on them (a NotImplementedError)
        if codes.dtype not in _CODE_DTYPES or codes.device != device or not codes.is_contiguous():
            raise ValueError(
                f"precision_codes must be {_STEP_TENSORS['precision_codes']} on {device}; got {codes.dtype} on "
                f"{codes.device}"
            )
        if isinstance(inv_scale, torch.Tensor) and (
            inv_scale.numel() != 1 or inv_scale.dtype != torch.float32 or inv_scale.device != device
        ):
            raise ValueError(
                f"inv_scale must be a float or a one-element float32 tensor on {device}; got {inv_scale.dtype} "
                f"{tuple(inv_scale.shape)} on {inv_scale.device}"
            )
        if skip is not None and (skip.numel() != 1 or skip.dtype != torch.bool or skip.device != device):
            raise ValueError(
                f"skip must be {_STEP_TENSORS['skip']} on {device}; got {skip.dtype} {tuple(skip.shape)} on "
                f"{skip.device}"
            )
        # Options set after construction (a schedule's): a decay tuple short of the groups raised an IndexError in the
        # update, after the record of the parameters without a gradient was taken (a retry then decayed them)
        self._check_decay()
        self._check_options()

    def _check_options(self) -> None:
        """Raises a ValueError when the options cannot run on the buffers kept (none by default)."""

    def _launching(self) -> None:
        """The launcher's call once its checks passed, right before its first write: from here the update is in.

        Only then is the record of the parameters without a gradient cleared: a step stopped before (a Ctrl-C in a
        check) leaves it for the batch's retry, which would otherwise decay the parameters the batch gave no gradient.
        """
        self.update_launched = True
        self.store.take_params_without_grad()

    def _mark_sitting_out(self, indices: Sequence[int]) -> None:
        """Sets the step state's participation row: a layer none of whose parameters got a gradient sits out.

        Its step count then stays, as ``torch.optim``'s ``step`` of a parameter it skips. Exact when a layer's
        parameters get gradients together (a module's weight and bias); a layer that got some counts the step for
        all. A device copy from a row kept per set of layers (built through pinned memory), no sync; nothing while
        every layer takes part.
        """
        missing = Counter(self._param_layer[index] for index in indices)
        sitting_out = frozenset(layer for layer, n in missing.items() if n == len(self.store.layers[layer]))
        if not sitting_out:
            if not self._all_take_part:
                self._step_state[2, 1:].fill_(1.0)
                self._all_take_part = True
            return
        flags = self._sitting_out_flags.get(sitting_out)
        if flags is None:
            row = torch.ones(self.store.n_layers, dtype=torch.float64)
            row[sorted(sitting_out)] = 0.0
            flags = _staged_for(row, self.store.device).to(self.store.device, non_blocking=True)
            if len(self._sitting_out_flags) < _MAX_CACHED_FLAG_ROWS:
                self._sitting_out_flags[sitting_out] = flags
        self._step_state[2, 1:].copy_(flags)
        self._all_take_part = False

    def _saved_slices(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copies of parameters ``indices``' weights and optimizer state, to put back after the update.

        The kernels update every element; a parameter that got no gradient this step (a branch not taken, after a
        ``zero_grad(set_to_none=True)``) is restored instead, so it takes no weight decay and no momentum, as in
        ``torch.optim``. Device copies in stream order, no sync; nothing when no parameter is left out. Its 16-bit
        copies are not restored but rewritten from the restored weights (``_recast_copies``).
        """
        if not indices:  # every step but those after a branch not taken
            return []
        store = self.store
        buffers = [store.params, *(getattr(self, name) for name in self._buffer_names)]
        slices = [store.param_slice(buffer, index) for index in indices for buffer in buffers]
        return [(slice_, slice_.clone()) for slice_ in slices]

    def _recast_copies(self, indices: Sequence[int], codes: torch.Tensor, skipped: torch.Tensor) -> None:
        """Rewrites the 16-bit copies of the restored parameters ``indices`` from their restored fp32 weights.

        In their layer's code of this step, as the update writes every bf16 and fp16 layer's copy (rounded to nearest
        even, ``cast_to_low_precision``); a fp32 layer's copy, and every copy on a skipped step, stays as it was.
        Restoring the copies instead would leave the one from before a change of the layer's code this step (zeros,
        for a layer new to bf16). Device operations on these parameters only, no sync.
        """
        store = self.store
        applied = ~skipped
        for index in indices:
            weights = store.param_slice(store.params, index)
            code = codes[self._param_layer[index]]
            # With a shared copy both buffers are one storage: the layer's code picks the type its segment holds.
            for wanted, dtype, buffer in ((1, torch.bfloat16, store.bf16_copy), (2, torch.float16, store.fp16_copy)):
                copy = store.param_slice(buffer, index)
                copy.copy_(torch.where(applied & (code == wanted), cast_to_low_precision(weights, dtype), copy))

    def state_dict(self) -> dict[str, Any]:
        """Checkpointable state. Like ``torch.optim``, the flat state buffers are returned by reference.

        Returns:
            ``{"kind", "options", "layer_numels", "param_layout", "steps", <state buffers>}``; ``steps`` is a
            float64 ``[1 + n_layers]`` copy (made on the device) of the applied steps: the model's, then each
            layer's; ``param_layout`` the store's (each parameter's shape, strides and place in the buffers) as
            the text of its tuple: one leaf, which a rollback snapshot copies as one string, not a thousand ints.
        """
        state: dict[str, Any] = {
            "kind": self._kind,
            "options": asdict(self.options),
            "layer_numels": list(self.store.layer_numels),
            "steps": self._step_state[0].clone(),
            "param_layout": self._layout_text,
        }
        for name in self._buffer_names:
            state[name] = getattr(self, name)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores ``state_dict()``'s output, hyper-parameters included (as ``torch.optim`` does).

        A checkpoint from before the per-layer counts (``step_state``: the model's count and its beta powers)
        gives every layer the model's count. SGD's momentum buffer comes and goes with the checkpoint's, as in
        ``torch.optim.SGD``: allocated when a checkpoint with one loads into an optimizer built without, kept from a
        checkpoint taken while a schedule held the momentum at 0 (a later momentum carries on from it).
        A parameter kept in another memory order there (channels-last against contiguous) has its state reordered.

        Raises:
            ValueError: the checkpoint is of another optimizer or another parameter layout (layer sizes, or a
                parameter's shape or place), or lacks its counts or a state buffer its options need, or holds a field
                of another type (options that are not this optimizer's, a buffer that is not a flat floating-point
                tensor, a layout that does not parse; the message names the field); nothing was changed. The counts'
                values are not read here (a copy to the host, and a rollback restores from a state this optimizer
                made): ``check_state_dict`` checks them, as ``StepEngine`` does before it loads a checkpoint.
        """
        loaded_options, names, counts, reordered = self._checked_state(state)
        self.options = loaded_options
        self._keep_buffers(names)
        with torch.no_grad():
            for name in self._buffer_names:
                getattr(self, name).copy_(state[name])
                for index, saved_strides in reordered:  # another memory order (channels-last or not): by element
                    shape, _, start = self.store.param_layout[index]
                    saved = state[name].as_strided(shape, saved_strides, state[name].storage_offset() + start)
                    self.store.param_view(getattr(self, name), index).copy_(saved)
            self._step_state[0].copy_(counts)
            self._step_state[2].fill_(1.0)
            self._all_take_part = True
            betas = (self.options.beta1, self.options.beta2) if isinstance(self.options, AdamWOptions) else (0.0, 0.0)
            self.set_log_betas(*betas)

    def check_state_dict(self, state: Mapping[str, Any], param_names: Sequence[str] | None = None) -> None:
        """Runs ``load_state_dict``'s checks on ``state``, and those of its values; changes nothing.

        For a checkpoint from outside, before anything of a run loads (``StepEngine``'s load runs it): a NaN count
        loaded, then broke the run after the controller's own state had loaded; a negative one made AdamW's bias
        correction, and so its weights, non-finite; a moment holding NaN or inf went into the weights at the first
        update. The values cost a copy to the host (a sync a state buffer), which ``load_state_dict`` skips.

        A layer's count may be above the model's: a state adopted through the optimizer's load (or from a reference
        run) brings its layers' counts and leaves the model's, this run's applied updates, as it was.

        Args:
            state: ``state_dict()``'s output.
            param_names: each parameter's name in the store's order, for the messages (default: its index there).

        Raises:
            ValueError: as ``load_state_dict``; or a step count is not a finite whole number >= 0, or a state buffer
                holds NaN or inf (the parameters whose elements do are named).
        """
        _, names, counts, _ = self._checked_state(state)
        counts = counts.detach().cpu()
        field = "steps" if "steps" in state else "step_state"
        if not _whole_counts(counts):
            raise ValueError(f"checkpoint's {field} holds {counts.tolist()}: step counts are finite whole numbers >= 0")
        for name in names:
            buffer = state[name]
            if bool(torch.isfinite(buffer).all()):
                continue
            broken = [
                param_names[index] if param_names is not None else f"parameter {index} (in the store's order)"
                for index in range(len(self.store.param_layout))
                if not bool(torch.isfinite(self.store.param_slice(buffer, index)).all())
            ]
            where = ", ".join(broken[:3]) + (" ..." if len(broken) > 3 else "") or "the padding (no parameter's)"
            raise ValueError(
                f"checkpoint's {name} holds NaN or infinite values, in {where}: the first update would write them into "
                "the weights"
            )

    def _checked_state(
        self, state: Mapping[str, Any]
    ) -> tuple[SGDOptions | AdamWOptions, tuple[str, ...], torch.Tensor, list[tuple[int, tuple[int, ...]]]]:
        """``load_state_dict``'s checks, changing nothing.

        Returns:
            The options, state buffer names, step counts and reordered parameters (``_reordered_params``) it loads.
        """
        if not isinstance(state, Mapping):
            raise ValueError(f"checkpoint is a {_type_name(state)}, not the dict state_dict() returned")
        if state.get("kind") != self._kind:
            raise ValueError(f"checkpoint is of a {state.get('kind')!r} optimizer, this is {self._kind!r}")
        numels = state.get("layer_numels")
        if not isinstance(numels, Sequence) or isinstance(numels, str) or list(numels) != list(self.store.layer_numels):
            raise ValueError(
                f"checkpoint's layer_numels {numels!r} are not this store's {list(self.store.layer_numels)}: it was "
                "made for another parameter layout (layer sizes differ)"
            )
        saved_options = state.get("options")
        options_type = type(self.options)
        try:
            if not isinstance(saved_options, Mapping):
                raise TypeError(f"a {_type_name(saved_options)}, not a dict")
            wanted = [field.name for field in fields(options_type)]
            if sorted(saved_options) != sorted(wanted):  # a missing one would take its default, silently
                raise TypeError(f"it needs exactly {', '.join(wanted)}")
            loaded_options = options_type(**saved_options)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"checkpoint's options {saved_options!r} are not {options_type.__name__}'s: {error}"
            ) from None
        self._check_decay(loaded_options)
        names = self._buffers_loaded(loaded_options, state)
        for name in names:
            if name not in state:
                raise ValueError(f"checkpoint lacks its {name!r}, which its options {state['options']} need")
            buffer = state[name]
            if not isinstance(buffer, torch.Tensor) or not buffer.is_floating_point():
                of = f" of {buffer.dtype}" if isinstance(buffer, torch.Tensor) else ""
                raise ValueError(
                    f"checkpoint's {name} is a {_type_name(buffer)}{of}, not a floating-point tensor (a flat buffer "
                    f"of the store's {self.store.n_elements} elements)"
                )
            if buffer.shape != (self.store.n_elements,):
                raise ValueError(
                    f"checkpoint's {name} has {buffer.numel()} elements, this store's {self.store.n_elements}: "
                    "it was made for another parameter layout (groups differ)"
                )
        counts = _saved_counts(state, self.store.n_layers)
        reordered = self._reordered_params(state.get("param_layout"))
        return loaded_options, names, counts, reordered

    def _reordered_params(self, saved_layout: str | Sequence[Any] | None) -> list[tuple[int, tuple[int, ...]]]:
        """The parameters a checkpoint of ``saved_layout`` keeps in another memory order, with its strides.

        Raises:
            ValueError: the layouts differ in a parameter's shape or place (a checkpoint from before the layout was
                saved, None, is taken as it is: its layer sizes matched).
        """
        if saved_layout is None or saved_layout == self._layout_text:  # an older checkpoint; or this store's
            return []
        layout = self.store.param_layout
        try:  # the text of a tuple of (shape, strides, start), one a parameter
            entries: Sequence[Any] = ast.literal_eval(saved_layout) if isinstance(saved_layout, str) else saved_layout
            saved = [(tuple(shape), tuple(strides), int(start)) for shape, strides, start in entries]
        except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError) as error:
            raise ValueError(
                f"checkpoint's param_layout {str(saved_layout)[:80]!r} is not the text of a parameter layout (a "
                f"(shape, strides, start) a parameter): {type(error).__name__}: {error}"
            ) from None
        if len(saved) != len(layout):
            raise ValueError(
                f"checkpoint was made for another parameter layout: {len(saved)} parameters, this store has "
                f"{len(layout)}"
            )
        for index, ((shape, _, start), (saved_shape, _, saved_start)) in enumerate(zip(layout, saved, strict=True)):
            if (shape, start) != (saved_shape, saved_start):
                raise ValueError(
                    f"checkpoint was made for another parameter layout: parameter {index} (in the store's order) has "
                    f"shape {saved_shape} at element {saved_start} there, {shape} at element {start} here"
                )
        return [(index, s[1]) for index, (p, s) in enumerate(zip(layout, saved, strict=True)) if p[1] != s[1]]

    def _buffers_for(self, options: SGDOptions | AdamWOptions) -> tuple[str, ...]:
        """The state buffers an optimizer of ``options`` keeps (and its checkpoints hold)."""
        return self._buffer_names

    def _buffers_loaded(self, options: SGDOptions | AdamWOptions, state: Mapping[str, Any]) -> tuple[str, ...]:
        """The state buffers a checkpoint with ``options`` brings: those its options need."""
        return self._buffers_for(options)

    def _keep_buffers(self, names: tuple[str, ...]) -> None:
        """Makes the optimizer keep the state buffers ``names`` (those of its options), allocating or dropping them."""

    def _update(
        self,
        lr: float,
        lr_factors: torch.Tensor,
        precision_codes: torch.Tensor,
        stats: torch.Tensor,
        inv_scale: float | torch.Tensor,
    ) -> None:
        raise NotImplementedError


class FusedSGD(_FusedOptimizer):
    """SGD with momentum, Nesterov and weight decay over a ``FlatParameterStore``, fused with unscale and copies.

    Matches ``torch.optim.SGD`` (with per-layer learning rates ``lr * lr_factors``) to float32 rounding.

    Example:
        >>> layer = [torch.nn.Parameter(torch.ones(4))]
        >>> store = FlatParameterStore([layer])
        >>> optimizer = FusedSGD(store, momentum=0.9)
        >>> _ = layer[0].grad.fill_(1.0)  # param.grad is a view of store.grads
        >>> result = optimizer.step(lr=0.1)
        >>> bool(result.skipped), layer[0].detach().tolist()
        (False, [0.8999999761581421, 0.8999999761581421, 0.8999999761581421, 0.8999999761581421])
    """

    _kind = "sgd"

    def __init__(
        self,
        store: FlatParameterStore,
        *,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float | Sequence[float] = 0.0,
        nesterov: bool = False,
        block_size: int | None = None,
        num_warps: int | None = None,
    ) -> None:
        """Makes the optimizer; with ``momentum > 0`` the momentum buffer is a flat zero buffer like the store's.

        Args:
            store: the flat parameters to optimise.
            momentum: see ``SGDOptions``.
            dampening: see ``SGDOptions``.
            weight_decay: see ``SGDOptions``.
            nesterov: see ``SGDOptions``.
            block_size: elements per program of the update kernel, a power of two dividing
                ``store.segment_align`` (None: the tuned default, see ``GPU_LAUNCH_CONFIGS``).
            num_warps: warps per program of the update kernel on the GPU (None: the tuned default).
        """
        super().__init__(store, block_size, num_warps, 0.0, 0.0)
        self.options: SGDOptions = SGDOptions(momentum, dampening, _as_decay(weight_decay), nesterov)
        options = self.options
        if options.nesterov and (options.momentum <= 0.0 or options.dampening != 0.0):  # here only, as torch.optim.SGD
            raise ValueError(
                f"nesterov needs momentum > 0 and dampening == 0 (as in torch.optim.SGD), got momentum "
                f"{options.momentum} and dampening {options.dampening}"
            )
        self._check_decay()
        # Without momentum the kernel never touches the buffer: the params stand in, saving a flat buffer.
        self.momentum_buffer = store.params
        self._keep_buffers(self._buffers_for(self.options))
        # Each layer's applied steps at momentum 0 before its momentum buffer started (a momentum schedule from 0):
        # its buffer starts, undampened, at its first step with momentum, as torch.optim.SGD makes a parameter's.
        self._steps_before_momentum = torch.zeros(store.n_layers, dtype=torch.float64, device=store.device)

    @property
    def steps_before_momentum(self) -> torch.Tensor:
        """float64 ``[n_layers]`` device tensor: each layer's applied steps at momentum 0 before its buffer started.

        A layer's momentum buffer has started once its count (``layer_step_counts``) is past it.
        """
        return self._steps_before_momentum

    def state_dict(self) -> dict[str, Any]:
        """``_FusedOptimizer.state_dict``'s, plus the steps each layer took before its momentum buffer started.

        ``steps_before_momentum`` is a float64 ``[n_layers]`` copy (made on the device) of the applied steps each layer
        took at momentum 0 before its momentum buffer started.
        """
        state = super().state_dict()
        state["steps_before_momentum"] = self._steps_before_momentum.clone()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """``_FusedOptimizer.load_state_dict``'s, plus the steps before each layer's momentum buffer started.

        A checkpoint from before they were kept gives 0 a layer: its buffers started at the layers' first steps.

        Raises:
            ValueError: as ``_FusedOptimizer.load_state_dict``; or ``steps_before_momentum`` is not one a layer.
        """
        steps_before_momentum = self._saved_steps_before_momentum(state)
        super().load_state_dict(state)
        with torch.no_grad():
            self._steps_before_momentum.copy_(steps_before_momentum)

    def check_state_dict(self, state: Mapping[str, Any], param_names: Sequence[str] | None = None) -> None:
        """``_FusedOptimizer.check_state_dict``'s, plus the values of the steps before each layer's momentum started.

        Raises:
            ValueError: as ``_FusedOptimizer.check_state_dict``; or ``steps_before_momentum`` is not one a layer,
                or not finite whole numbers >= 0.
        """
        super().check_state_dict(state, param_names)
        counts = self._saved_steps_before_momentum(state).detach().cpu()
        if not _whole_counts(counts):
            raise ValueError(
                f"checkpoint's steps_before_momentum holds {counts.tolist()}: step counts are finite whole numbers >= 0"
            )

    def _saved_steps_before_momentum(self, state: Mapping[str, Any]) -> torch.Tensor:
        """A checkpoint's ``steps_before_momentum`` as float64 (0 from a checkpoint before them); no copy to the host.

        Raises:
            ValueError: it is not numbers, or not one a layer.
        """
        saved = state.get("steps_before_momentum", 0.0)
        try:
            steps_before_momentum = torch.as_tensor(saved, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(
                f"checkpoint's steps_before_momentum {saved!r} is not numbers (a float64 tensor, one a layer)"
            ) from None
        if steps_before_momentum.dim() != 0 and steps_before_momentum.shape != (self.store.n_layers,):
            raise ValueError(
                f"checkpoint's steps_before_momentum has shape {tuple(steps_before_momentum.shape)}; this store has "
                f"{self.store.n_layers} layers, so [{self.store.n_layers}] (one a layer)"
            )
        return steps_before_momentum

    def _buffers_for(self, options: SGDOptions | AdamWOptions) -> tuple[str, ...]:
        assert isinstance(options, SGDOptions)
        return ("momentum_buffer",) if options.momentum != 0.0 else ()

    def _buffers_loaded(self, options: SGDOptions | AdamWOptions, state: Mapping[str, Any]) -> tuple[str, ...]:
        """The momentum buffer where the checkpoint's momentum needs one or the checkpoint holds one.

        A schedule that holds the momentum at 0 for a while (``OneCycleLR``'s ``base_momentum=0``) leaves the buffer
        in place, unread, as ``torch.optim.SGD`` does: a checkpoint (or a rollback's copy) taken then kept it, but its
        load dropped it, and every step after the momentum came back raised.
        """
        return self._buffers_for(options) or (("momentum_buffer",) if "momentum_buffer" in state else ())

    def _keep_buffers(self, names: tuple[str, ...]) -> None:
        """Allocates a zero momentum buffer when ``names`` holds it and there is none; drops it when not.

        A checkpoint without one (momentum 0 all along) loaded into an optimizer with a buffer leaves none, as
        ``torch.optim.SGD`` keeps none: a later momentum then finds no stale one to carry on from (``_update``
        refuses).
        """
        if names and self.momentum_buffer is self.store.params:
            self.momentum_buffer = torch.zeros_like(self.store.params)
        elif not names:
            self.momentum_buffer = self.store.params
        self._buffer_names = names

    def _check_options(self) -> None:
        if self.options.momentum != 0.0 and not self._buffer_names:  # the params stand in for the buffer
            raise ValueError(
                f"momentum is {self.options.momentum}, but this FusedSGD keeps no momentum buffer (it was built, or "
                "loaded a checkpoint, without momentum): build it with momentum > 0"
            )

    def _update(
        self,
        lr: float,
        lr_factors: torch.Tensor,
        precision_codes: torch.Tensor,
        stats: torch.Tensor,
        inv_scale: float | torch.Tensor,
    ) -> None:
        store, options = self.store, self.options
        self._check_options()
        fused_sgd_step(
            store.params, store.grads, self.momentum_buffer, store.bf16_copy, store.fp16_copy,
            store.chunk_layer, lr_factors, precision_codes, stats, self._step_state,
            lr=lr, momentum=options.momentum, dampening=options.dampening,
            weight_decay=self.kernel_weight_decay(), nesterov=options.nesterov, inv_scale=inv_scale,
            steps_before_momentum=self._steps_before_momentum, segment_align=store.segment_align,
            block_size=self.block_size, num_warps=self.num_warps, on_launch=self._launching,
        )  # fmt: skip


class FusedAdamW(_FusedOptimizer):
    """AdamW over a ``FlatParameterStore``, fused with unscale, overflow skip, copies and statistics.

    Matches ``torch.optim.AdamW`` (with per-layer learning rates ``lr * lr_factors``) to float32 rounding.

    Example:
        >>> layer = [torch.nn.Parameter(torch.ones(4))]
        >>> store = FlatParameterStore([layer])
        >>> optimizer = FusedAdamW(store, weight_decay=0.0)
        >>> _ = layer[0].grad.fill_(float("inf"))
        >>> result = optimizer.step(lr=0.1, inv_scale=1 / 1024)
        >>> bool(result.skipped), int(result.grad_nonfinite[0]), layer[0].detach().tolist()
        (True, 4, [1.0, 1.0, 1.0, 1.0])
    """

    _kind = "adamw"

    def __init__(
        self,
        store: FlatParameterStore,
        *,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        weight_decay: float | Sequence[float] = 1e-2,
        block_size: int | None = None,
        num_warps: int | None = None,
    ) -> None:
        """Makes the optimizer with flat zero moments like the store's buffers.

        Args:
            store: the flat parameters to optimise.
            beta1: see ``AdamWOptions``.
            beta2: see ``AdamWOptions``.
            eps: see ``AdamWOptions``.
            weight_decay: see ``AdamWOptions``.
            block_size: elements per program of the update kernel, a power of two dividing
                ``store.segment_align`` (None: the tuned default, see ``GPU_LAUNCH_CONFIGS``).
            num_warps: warps per program of the update kernel on the GPU (None: the tuned default).
        """
        options = AdamWOptions(beta1, beta2, eps, _as_decay(weight_decay))
        super().__init__(store, block_size, num_warps, options.beta1, options.beta2)
        self.options: AdamWOptions = options
        self._check_decay()
        self.exp_avg = torch.zeros_like(store.params)
        self.exp_avg_sq = torch.zeros_like(store.params)
        self._buffer_names = ("exp_avg", "exp_avg_sq")

    def _update(
        self,
        lr: float,
        lr_factors: torch.Tensor,
        precision_codes: torch.Tensor,
        stats: torch.Tensor,
        inv_scale: float | torch.Tensor,
    ) -> None:
        store, options = self.store, self.options
        fused_adamw_step(
            store.params, store.grads, self.exp_avg, self.exp_avg_sq, store.bf16_copy, store.fp16_copy,
            store.chunk_layer, lr_factors, precision_codes, stats, self._step_state,
            lr=lr, beta1=options.beta1, beta2=options.beta2, eps=options.eps,
            weight_decay=self.kernel_weight_decay(), inv_scale=inv_scale, segment_align=store.segment_align,
            block_size=self.block_size, num_warps=self.num_warps, on_launch=self._launching,
        )  # fmt: skip


def _staged_for(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` ready for a ``non_blocking`` copy to ``device`` without a sync: pinned for a GPU, as is otherwise.

    The host allocator does not reuse pinned memory before the copy from it is done.
    """
    return host.pin_memory() if device.type == "cuda" else host


def _saved_counts(state: Mapping[str, Any], n_layers: int) -> torch.Tensor:
    """A checkpoint's step counts as ``[1 + n_layers]`` float64 (the model's, then each layer's), where it keeps them.

    No copy to the host: a rollback restores from such a state.

    Raises:
        ValueError: neither ``steps`` nor the older ``step_state`` is there, or ``steps`` is for other layers.
    """
    if "steps" in state:
        try:
            counts = torch.as_tensor(state["steps"], dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(
                f"checkpoint's steps {state['steps']!r} is not numbers (a float64 tensor: the model's count, then each "
                "layer's)"
            ) from None
        if counts.shape != (1 + n_layers,):
            raise ValueError(
                f"checkpoint's steps has shape {tuple(counts.shape)}; this store has {n_layers} layers, so "
                f"[{1 + n_layers}] (the model's count, then each layer's)"
            )
        return counts
    if "step_state" in state:  # (steps, beta1**steps, beta2**steps): one count for all
        try:
            step_state = torch.as_tensor(state["step_state"], dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            step_state = torch.zeros(0)
        if step_state.dim() != 1 or len(step_state) == 0:
            raise ValueError(
                f"checkpoint's step_state {state['step_state']!r} is not (steps, beta1**steps, beta2**steps)"
            )
        return step_state[:1].expand(1 + n_layers)
    raise ValueError("checkpoint lacks the step counts ('steps'): pass the dict state_dict() returned")


def _whole_counts(counts: torch.Tensor) -> bool:
    """Whether the host tensor ``counts`` holds finite whole numbers >= 0 only (step counts)."""
    return bool((torch.isfinite(counts) & (counts >= 0) & (counts == counts.round())).all())


# What :meth:`_FusedOptimizer.step` takes for its tensor arguments, as its errors say it.
_CODE_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)
_STEP_TENSORS = {
    "lr_factors": "a contiguous float32 tensor",
    "precision_codes": "a contiguous int8, uint8, int16, int32 or int64 tensor",
    "skip": "a one-element bool tensor",
}


def _type_name(value: Any) -> str:
    """``value``'s type as an error names it: ``list``, ``numpy.ndarray``."""
    kind = type(value)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


_MAX_CACHED_FLAG_ROWS = 64
"""Sets of layers sitting a step out whose participation row a fused optimizer keeps on the device (two for a model
trained one head at a time); past that (experts routed anew each step), a row is built for the step and dropped (one
small asynchronous host-to-device copy)."""


def _as_float(value: Any) -> float:
    """``float(value)`` for a number, NaN (which every range check refuses) for a string or anything else."""
    if isinstance(value, str):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _as_decay(weight_decay: float | Sequence[float]) -> float | tuple[float, ...]:
    """A constructor's weight decay as the options' field takes it (validated there)."""
    return (
        tuple(weight_decay)
        if isinstance(weight_decay, Sequence) and not isinstance(weight_decay, str)
        else weight_decay
    )


def _is_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real)


def _check_step_values(factors: torch.Tensor, codes: torch.Tensor, inv_scale: float | torch.Tensor) -> None:
    """Raises a ValueError for an LR factor, a precision code or an ``inv_scale`` tensor out of its range.

    LR factors finite and >= 0, codes 0, 1 or 2, ``inv_scale`` finite and > 0 (a float's is checked on every device).
    Checked on CPU tensors only: on a GPU the values would cost a sync a step, and ``StepEngine`` checks them on the
    host when they are set (an ``inv_scale`` of -1 would step up the gradient here).
    """
    if not bool(torch.isfinite(factors).all()) or bool((factors < 0).any()):
        raise ValueError(f"lr_factors must be finite numbers >= 0; got {factors.tolist()}")
    if isinstance(inv_scale, torch.Tensor) and not 0.0 < float(inv_scale) < math.inf:
        raise ValueError(f"inv_scale must be a finite number > 0 (1 / the loss scale); got tensor {float(inv_scale)}")
    if not bool(((codes >= 0) & (codes <= 2)).all()):
        raise ValueError(f"precision_codes must be 0 (fp32), 1 (bf16) or 2 (fp16) a layer; got {codes.tolist()}")

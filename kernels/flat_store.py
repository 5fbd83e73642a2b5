"""Flat fp32 storage for a model's parameters, grads and low-precision copies, laid out for the fused kernels.

Layout: layer ``i`` owns the element range ``[layer_offsets[i], layer_offsets[i] + layer_lengths[i])`` of
every flat buffer. Each layer starts at a multiple of ``segment_align`` elements and is padded to a whole
number of segments; inside a layer each parameter starts at a multiple of ``PARAM_ALIGN_ELEMENTS``. Padding
elements are zero in every buffer and stay zero under SGD and AdamW (zero gradient, zero weight), so the
kernels process them blindly and the per-layer statistics are unaffected. ``chunk_layer[c]`` is the
layer of segment ``c``: a kernel block of at most ``segment_align`` elements finds its layer with one load.
Parameters may also carry a group (``groups``, e.g. their ``torch.optim`` param group): inside a layer each
group's parameters then start a new segment, ``chunk_group[c]`` is segment ``c``'s group, and a per-group
hyper-parameter (weight decay) becomes a per-segment one the kernels read with one load too.
"""

from __future__ import annotations

import itertools
import numbers
import operator
from collections.abc import Callable, Sequence

import torch
from torch.utils.hooks import RemovableHandle
from triaccel_rl.kernels._common import PARAM_ALIGN_ELEMENTS, SEGMENT_ALIGN_ELEMENTS, require
from triaccel_rl.kernels.cast import cast_to_low_precision

from triaccel_rl.errors import DetachedParametersError

__all__ = [
    "BIND_BEFORE_BACKWARD_ELEMENTS",
    "BIND_BEFORE_BACKWARD_TOTAL",
    "DetachedParametersError",
    "FlatParameterStore",
    "check_apart",
    "is_dense",
]

BIND_BEFORE_BACKWARD_ELEMENTS = 1 << 20
"""A parameter of at least this many elements (a 4 MiB fp32 gradient) found without a gradient before a backward gets
its zeroed view bound, and a hook, by :meth:`FlatParameterStore.bind_large_grads`: autograd adds into the buffer, and
no gradient of its own lives beside it until the step copies the others in. Smaller ones keep autograd's own tensors,
which cost no add kernel and no Python hook call (the host's time in a host-bound loop). Read when a store is built."""

BIND_BEFORE_BACKWARD_TOTAL = 1 << 26
"""...and only where those parameters hold this many elements together (256 MiB of fp32 gradient): a smaller total held
twice costs little memory, and the model keeps the measured path of autograd's own gradients, with no add kernel or
hook a parameter. (ResNet-18's three 4 MiB weights bound made no change to its eager fp16 step's peak on an H100,
488.2 MiB either way; a 134M-parameter stack of linear layers at batch 16 went from 544-1537 MiB to 290 MiB:
BENCHMARKS.md.) Read when a store is built."""


class FlatParameterStore:
    """Moves the parameters of a model into flat buffers: each ``param.data`` and ``param.grad`` becomes a view.

    After construction the parameters keep working in the model (same objects, same values) but their
    storage is the flat ``params`` buffer, and ``param.grad`` is a view of the flat ``grads`` buffer, which
    autograd accumulates into in place. Two flat 16-bit buffers, ``bf16_copy`` and ``fp16_copy``, hold the
    low-precision weights the fused optimizers write for layers computing in bf16 or fp16. With
    ``shared_copy`` they are one buffer seen as either type: each layer's segment holds the bits of the type
    that layer computes in (a layer is never both), so the copies cost 2 bytes a parameter whatever the map.

    Hazards: do not move or cast the model (``.to()``, ``.half()``) afterwards, which detaches the parameters from
    the flat buffers (:meth:`rebind_grads` then raises ``DetachedParametersError``).
    Setting ``param.grad = None`` (``optimizer.zero_grad(set_to_none=True)`` does) detaches the gradients until
    :meth:`rebind_grads`: called before the backward, it binds zeroed views that autograd adds into (a kernel a
    parameter) and hooks to tell which parameters the backward reached; called after it (``after_backward=True``,
    ``StepEngine``'s way), it copies autograd's own gradients into the buffer in one launch, and a gradient still
    ``None`` is one the backward did not give. ``StepEngine`` binds the large parameters' views before the backward
    (:meth:`bind_large_grads`), so that their gradients are never held twice. ``store.zero_grad()`` zeroes the views
    in place and drops (sets to ``None``) a gradient that is not one.
    A parameter whose gradient is None when the store is built is bound to zeros, not watched: where ``torch.optim``
    skips it until its first gradient, the fused step applies weight decay to it (watching every parameter from the
    start would cost a Python hook call per parameter per backward for every run).
    Code writing the flat ``grads`` directly must leave the padding at zero, or the padding weights start moving
    and enter the per-layer statistics.

    Attributes:
        params: flat float32 master weights, length ``n_elements``; each ``param.data`` is a view of it.
        grads: flat float32 gradients; each ``param.grad`` is a view of it.
        bf16_copy: flat bfloat16 copy of the weights, current for layers the optimizer keeps in bf16.
        fp16_copy: flat float16 copy of the weights, current for layers the optimizer keeps in fp16 (with
            ``shared_copy``, ``bf16_copy``'s storage seen as float16).
        chunk_layer: int32 ``[n_elements // segment_align]``, the layer owning each segment.
        chunk_group: int32 ``[n_elements // segment_align]``, the group of each segment's parameters (all 0
            without ``groups``).
        n_groups: one more than the largest group (1 without ``groups``).
        n_elements: length of every flat buffer, padding included (a multiple of ``segment_align``).
        n_layers: number of layers.
        layer_offsets: first element of each layer's segment in the flat buffers.
        layer_lengths: elements of each layer's segment, padding included.
        layer_numels: parameter elements of each layer, padding excluded.
        param_layout: ``(shape, strides, first element)`` of each parameter in the flat buffers, in the store's order
            (its layers' parameters, layer by layer); a checkpoint of flat state fits another store only where
            these agree (strides may differ: the elements are then in another order).
        segment_align: segment size in elements.
        device: the device of the parameters and buffers.

    Example:
        >>> layers = [[torch.nn.Parameter(torch.ones(3, 4))], [torch.nn.Parameter(torch.zeros(5))]]
        >>> store = FlatParameterStore(layers)
        >>> store.n_layers, store.layer_numels
        (2, (12, 5))
        >>> store.params.numel() == 2 * store.segment_align
        True
        >>> layers[0][0].data_ptr() == store.params.data_ptr()
        True
    """

    def __init__(
        self,
        layers: Sequence[Sequence[torch.nn.Parameter]],
        *,
        segment_align: int = SEGMENT_ALIGN_ELEMENTS,
        shared_copy: bool = False,
        groups: Sequence[Sequence[int]] | None = None,
    ) -> None:
        """Copies ``layers`` into new flat buffers and re-points every parameter and grad at a view.

        Args:
            layers: one list of parameters per layer (e.g. per module), in the order the per-layer tensors
                (``lr_factors``, ``precision_codes``, statistics) use. Every parameter must be float32,
                dense (contiguous or channels-last), on one device, and appear once; a layer may be empty.
            segment_align: segment size in elements; must be a multiple of ``PARAM_ALIGN_ELEMENTS``.
            shared_copy: ``fp16_copy`` is ``bf16_copy``'s storage (2 bytes an element saved). A segment then
                holds one type's bits: :meth:`refresh_low_precision` must be told each layer's precision
                code, and a layer's copy may be read only in the type of its code at the last refresh (the
                fused steps keep each segment in its layer's type).
            groups: each parameter's group, a non-negative int, shaped like ``layers`` (None: all in group 0).
                Inside a layer, the parameters of each group (in increasing group order) start a new segment,
                so the segments of ``chunk_group`` hold one group each; a layer of several groups costs up to
                ``segment_align`` elements of padding more per extra group. ``param_views`` and every other
                per-parameter view keep the order of ``layers``.

        Raises:
            ValueError: on an empty ``layers``, a tensor in place of a layer's list (a flat list of parameters), a
                non-leaf tensor, a non-float32 or duplicated parameter, parameters sharing memory, mixed devices, or
                ``groups`` not shaped like ``layers`` or holding a negative group.
        """
        layers = list(layers)  # a generator of layers was used up by the first check ("layers hold no parameters")
        if not layers:
            raise ValueError("layers is empty: give one list of parameters per layer")
        if segment_align <= 0 or segment_align % PARAM_ALIGN_ELEMENTS:
            raise ValueError(
                f"segment_align must be a positive multiple of {PARAM_ALIGN_ELEMENTS}, got {segment_align}"
            )
        if any(isinstance(layer, torch.Tensor) for layer in layers):
            raise ValueError(
                "layers holds a tensor where a list of parameters belongs: give one list of parameters per layer "
                "(e.g. [list(m.parameters()) for m in model.children()]), not one flat list of parameters"
            )
        layers = [list(layer) for layer in layers]  # a generator a layer (m.parameters()) was used up by the checks
        all_params = [p for layer in layers for p in layer]
        not_tensors = sorted({type(p).__name__ for p in all_params if not isinstance(p, torch.Tensor)})
        if not_tensors:  # a module in place of its parameters raised "'Linear' object has no attribute 'shape'"
            raise ValueError(
                f"layers must hold parameters (tensors), got {', '.join(not_tensors)}: give each layer's parameters, "
                "e.g. list(module.parameters())"
            )
        not_leaves = [tuple(p.shape) for p in all_params if not p.is_leaf]
        if not_leaves:
            raise ValueError(
                f"layers must hold leaf tensors (parameters), got non-leaf ones of shapes {not_leaves[:5]}"
            )
        if not all_params:
            raise ValueError("layers hold no parameters")
        if len({id(p) for p in all_params}) != len(all_params):
            raise ValueError("a parameter appears twice (tied weights must be listed once)")
        if groups is None:
            groups = [[0] * len(layer) for layer in layers]
        if len(groups) != len(layers) or any(len(g) != len(layer) for g, layer in zip(groups, layers, strict=False)):
            raise ValueError(
                f"groups must give each parameter of each layer a group (layers of {[len(layer) for layer in layers]} "
                f"parameters), got {[len(g) for g in groups]}"
            )
        if any(
            isinstance(g, bool) or not isinstance(g, numbers.Integral) or int(g) < 0
            for layer_groups in groups
            for g in layer_groups
        ):  # 0.5 and 1.9 were cut to groups 0 and 1
            raise ValueError(f"groups must be non-negative ints, got {[list(g) for g in groups]}")
        devices = {p.device for p in all_params}
        if len(devices) != 1:
            raise ValueError(f"parameters are on several devices: {sorted(map(str, devices))}")
        for p in all_params:
            if p.dtype != torch.float32:
                raise ValueError(f"parameters must be float32 master weights, got {p.dtype} of shape {tuple(p.shape)}")
            if not is_dense(p):
                raise ValueError(
                    f"parameters must be dense (contiguous or channels-last), got strides {p.stride()} "
                    f"for shape {tuple(p.shape)}"
                )
        check_apart(all_params)

        self.segment_align = segment_align
        self.device: torch.device = devices.pop()
        self.n_layers = len(layers)
        self.layers: tuple[tuple[torch.nn.Parameter, ...], ...] = tuple(tuple(layer) for layer in layers)

        param_offsets: list[list[int]] = []
        layer_offsets: list[int] = []
        layer_lengths: list[int] = []
        layer_numels: list[int] = []
        chunk_group: list[int] = []
        offset = 0
        for layer, layer_groups in zip(self.layers, groups, strict=True):
            layer_offsets.append(offset)
            offsets_of_layer = [0] * len(layer)
            inner = 0
            for group in sorted({int(g) for g in layer_groups}) or [0]:  # each group's run: whole segments
                start = inner
                for i, (p, g) in enumerate(zip(layer, layer_groups, strict=True)):
                    if int(g) == group:
                        offsets_of_layer[i] = offset + inner
                        inner += _round_up(p.numel(), PARAM_ALIGN_ELEMENTS)
                inner = max(_round_up(inner, segment_align), start + segment_align)
                chunk_group += [group] * ((inner - start) // segment_align)
            param_offsets.append(offsets_of_layer)
            layer_lengths.append(inner)
            layer_numels.append(sum(p.numel() for p in layer))
            offset += inner
        self.n_elements = offset
        self.layer_offsets: tuple[int, ...] = tuple(layer_offsets)
        self.layer_lengths: tuple[int, ...] = tuple(layer_lengths)
        self.layer_numels: tuple[int, ...] = tuple(layer_numels)
        self._param_offsets = param_offsets

        self.params = torch.zeros(self.n_elements, dtype=torch.float32, device=self.device)
        self.grads = torch.zeros(self.n_elements, dtype=torch.float32, device=self.device)
        self.bf16_copy = torch.zeros(self.n_elements, dtype=torch.bfloat16, device=self.device)
        self.shared_copy = shared_copy
        self.fp16_copy = (
            self.bf16_copy.view(torch.float16)
            if shared_copy
            else torch.zeros(self.n_elements, dtype=torch.float16, device=self.device)
        )
        chunk_layer = torch.repeat_interleave(
            torch.arange(self.n_layers, dtype=torch.int32),
            torch.tensor([length // segment_align for length in layer_lengths]),
        )
        self.chunk_layer = chunk_layer.to(self.device)
        self.chunk_group = torch.tensor(chunk_group, dtype=torch.int32, device=self.device)
        self.n_groups = max(chunk_group) + 1

        self._grad_views: list[tuple[torch.nn.Parameter, torch.Tensor, int]] = []  # (param, grad view, data address)
        self._flat_offsets: list[int] = []  # each of those parameters' first element in the flat buffers
        had_grads = False
        with torch.no_grad():
            for layer, offsets in zip(self.layers, param_offsets, strict=True):
                for p, start in zip(layer, offsets, strict=True):
                    view = _strided_like(self.params, p, start)
                    view.copy_(p)
                    grad_view = _strided_like(self.grads, p, start)
                    if p.grad is not None:
                        grad_view.copy_(p.grad)
                        had_grads = True
                    p.data = view
                    p.grad = grad_view
                    self._grad_views.append((p, grad_view, view.data_ptr()))
                    self._flat_offsets.append(start)
        # Their columns, for rebind_grads's checks at every step: C-level maps over lists, not a Python pass
        self._params_in_order = [p for p, _, _ in self._grad_views]
        self._grad_views_in_order = [view for _, view, _ in self._grad_views]
        self._addresses = [address for _, _, address in self._grad_views]
        self.param_layout: tuple[tuple[tuple[int, ...], tuple[int, ...], int], ...] = tuple(
            (tuple(view.shape), tuple(view.stride()), start)
            for (_, view, _), start in zip(self._grad_views, self._flat_offsets, strict=True)
        )
        # The grads buffer's version counter (its views share it) when it last held only zeros; an in-place write since
        # (autograd accumulating into a view, a copy) moves the counter on. The fused kernels, which write through raw
        # pointers without moving it, never write gradients. -1: not known to be zeros.
        self._zeroed_version = -1 if had_grads else self.grads._version
        # Parameters whose gradient a user set to None (``zero_grad(set_to_none=True)``) and rebind_grads gave a zeroed
        # view, and of those the ones autograd has accumulated into since (a hook each, installed at the first such
        # rebind): the others got no gradient, and torch.optim would leave them and their state alone.
        self._rebound_from_none: set[int] = set()
        self._accumulated: set[int] = set()
        self._none_after_backward: set[int] = set()  # None between a backward and the step: certainly no gradient
        self._grad_hooks: dict[int, RemovableHandle] = {}
        # The parameters bind_large_grads watches (BIND_BEFORE_BACKWARD_ELEMENTS and _TOTAL), and those it bound since
        # the record was last taken: a hook each, which an eager backward always calls, so no call means no gradient.
        large = [i for i, p in enumerate(self._params_in_order) if p.numel() >= BIND_BEFORE_BACKWARD_ELEMENTS]
        total = sum(self._params_in_order[i].numel() for i in large)
        self._large = large if large and total >= BIND_BEFORE_BACKWARD_TOTAL else []
        self._bound_large: set[int] = set()

    def rebind_grads(self, after_backward: bool = False) -> int:
        """Points every ``param.grad`` back at its view of the flat ``grads`` buffer; returns how many were not.

        ``optimizer.zero_grad()`` and ``model.zero_grad()`` set ``param.grad = None`` by default, after which
        autograd would accumulate into new tensors the fused step never reads. A ``None`` gradient comes back as
        its zeroed view (zeroed already, with no kernel, when nothing was written into the buffer since the last
        :meth:`zero_grad`: the fused step's, before a user's ``zero_grad()``; "written" as the buffer's version
        counter tells, which a write through ``.data`` does not move: after ``p.grad.data.fill_(...)`` call
        :meth:`zero_grad` rather than setting the gradient to ``None``), and a hook notes whether autograd
        accumulates into it before the next step (:meth:`take_params_without_grad`); a gradient tensor put in its
        place is copied into the view. An identity check and an address check a parameter when nothing changed.

        ``after_backward``: called between the backward and the step (the fused step's own call), where a ``None``
        gradient is one the step's backward did not give: :meth:`take_params_without_grad` reports it, and no hook
        goes in (autograd's own gradients, made where they were ``None``, are copied in here, one launch for all).

        Raises:
            DetachedParametersError: a parameter's ``.data`` is no longer its view of the flat ``params`` (the
                module was moved or cast after the store was built: ``model.to(...)``, ``.half()``); the
                optimizer would update the flat buffer and the model would never see it. Nothing was changed.
        """
        # After a user's zero_grad(set_to_none=True) every parameter is rebound at every step: each one's gradient is
        # read once, and the bookkeeping is a set operation a call, not a Python call a parameter (0.7 ms a step at
        # 598 parameters on a CPU, now about 0.35 ms, 0.15 ms of it the ``p.grad = view`` assignments).
        self.check_attached()
        grads = list(map(_GRAD, self._params_in_order))
        if all(map(operator.is_, grads, self._grad_views_in_order)):  # the common case
            return 0
        changed = [
            i for i, (grad, view) in enumerate(zip(grads, self._grad_views_in_order, strict=True)) if grad is not view
        ]
        zeros = self.grads._version == self._zeroed_version  # nothing written since the last zero_grad: no kernel
        views = self._grad_views
        # A gradient given in place of the view: its parameter has one this step (even where found None after the
        # backward before).
        found_none = [i for i in changed if grads[i] is None]
        given = [i for i in changed if grads[i] is not None] if len(found_none) < len(changed) else []
        sparse = [i for i in given if grads[i].is_sparse]  # an embedding's (sparse=True): no foreach copy takes it
        dense = [i for i in given if not grads[i].is_sparse] if sparse else given
        with torch.no_grad():
            if dense:  # one launch for them all: after a backward into None gradients, every parameter is one
                torch._foreach_copy_([views[i][1] for i in dense], [grads[i] for i in dense])
            for i in sparse:
                views[i][1].copy_(grads[i].to_dense())
            if found_none and not zeros:
                torch._foreach_zero_([views[i][1] for i in found_none])
        for i in changed:
            p, view, _ = views[i]
            p.grad = view
        self._rebound_from_none.difference_update(given)
        self._none_after_backward.difference_update(given)
        self._bound_large.difference_update(given)
        if after_backward:  # None after the backward: certainly no gradient, no hook needed to tell
            self._none_after_backward.update(found_none)
            # A large gradient bound before the backward that no hook saw is as one found None here; one reached is
            # now as any gradient copied in (a step cut short from here treats the two sizes alike: zero_grad)
            self._none_after_backward |= self._bound_large - self._accumulated
            self._bound_large.clear()
        elif found_none:  # before it: the hooks tell which of them the backward reaches
            self._rebound_from_none.update(found_none)
            self._accumulated.difference_update(found_none)
            self._hook_trainable(found_none)
        return len(changed)

    def check_attached(self) -> None:
        """Raises ``DetachedParametersError`` if a parameter's ``.data`` is no longer its view of the flat ``params``.

        The check :meth:`rebind_grads` starts with, alone: for an owner that lets autograd make its own gradients
        where they are ``None`` and copies them in after the backward (``StepEngine``), one address a parameter.
        """
        if list(map(torch.Tensor.data_ptr, self._params_in_order)) != self._addresses:
            raise DetachedParametersError([p for p, _, address in self._grad_views if p.data_ptr() != address])

    def bind_large_grads(self) -> int:
        """Before a backward: binds each large parameter's zeroed view where its gradient is ``None``, with a hook.

        ``StepEngine``'s call before each backward, after a user's ``zero_grad()`` set the gradients to ``None``.
        A parameter of at least ``BIND_BEFORE_BACKWARD_ELEMENTS`` elements (where such parameters hold
        ``BIND_BEFORE_BACKWARD_TOTAL`` elements together: a model whose gradients are large) then has autograd add
        into its view of the flat buffer (an add kernel), as before a step of ``torch.optim``'s, rather than hand over
        a gradient of its own that would live beside the buffer until the step's copy (:meth:`rebind_grads` with
        ``after_backward``): a model's largest gradients are not held twice at the backward's end. The hook tells
        whether the backward reached the parameter; a backward that did not leaves it out of the update, as
        ``torch.optim`` skips a ``None`` gradient (:meth:`take_params_without_grad`). The smaller parameters keep
        autograd's own gradients (no kernel and no hook a parameter: the host's time). Frozen parameters are left
        alone. Starts with :meth:`check_attached`'s check.

        Returns:
            How many gradients were bound.

        Raises:
            DetachedParametersError: as :meth:`check_attached`; nothing was changed.
        """
        self.check_attached()
        params = self._params_in_order
        found_none = [i for i in self._large if params[i].grad is None and params[i].requires_grad]
        if not found_none:
            return 0
        views = self._grad_views_in_order
        if self.grads._version != self._zeroed_version:  # written since the last zero_grad
            with torch.no_grad():
                torch._foreach_zero_([views[i] for i in found_none])
        hooks = self._grad_hooks
        for i in found_none:  # hooked and recorded before bound: a view bound is one the record knows of
            if i not in hooks:
                hooks[i] = params[i].register_post_accumulate_grad_hook(self._recorder(i))
        self._accumulated.difference_update(found_none)
        self._bound_large.update(found_none)
        for i in found_none:
            params[i].grad = views[i]
        return len(found_none)

    def take_params_without_grad(self) -> list[int]:
        """The parameters that got no gradient since :meth:`rebind_grads` found theirs ``None``; clears the record.

        Indices in the store's order (its layers' parameters, layer by layer), for :meth:`param_slice`. The fused
        step calls it once a step.

        Such a parameter takes no update from ``torch.optim`` (it skips ``grad is None``): no weight decay, no
        momentum. Empty unless a user's ``zero_grad(set_to_none=True)`` came before the backward, a gradient was
        set to ``None`` between the backward and the step (``rebind_grads(after_backward=True)``), or a parameter is
        frozen (``requires_grad=False``) now.

        Limitation: a parameter whose gradient was never ``None`` since the store was built (it holds its zeroed view
        from the start) and that no backward reaches (held by the optimizer, never used in the forward) reads as a
        zero gradient and takes weight decay and momentum, where ``torch.optim`` skips its ``None``; once a
        ``zero_grad(set_to_none=True)`` has run, the hooks tell, and it is left alone.
        """
        without = self.params_without_grad()
        self._none_after_backward = set()
        self._bound_large.clear()
        self._rebound_from_none.clear()
        self._accumulated.clear()  # the next step's record starts empty
        return without

    def unbind_params_without_grad(self) -> None:
        """Sets ``.grad`` back to ``None`` where :meth:`params_without_grad` says the backward gave none.

        Between the backward and the step their zeroed views are bound (``rebind_grads(after_backward=True)``); code
        run there that reads the gradients (a ``grad_transform``) sees them as a plain loop does. The next
        :meth:`rebind_grads` binds them again, still recorded as without a gradient unless one was given.
        """
        for index in self.params_without_grad():
            self._grad_views[index][0].grad = None

    def params_without_grad(self) -> list[int]:
        """What :meth:`take_params_without_grad` would return now, leaving the record as it is."""
        # A parameter frozen since the store was built keeps its zeroed view, which read as a gradient gave it weight
        # decay and momentum; a plain loop's zero_grad() sets its gradient to None, and torch.optim leaves it alone.
        # (One attribute read a parameter: about 12 us a step at 200 parameters on a CPU.)
        without = {i for i, (p, _, _) in enumerate(self._grad_views) if not p.requires_grad}
        without |= self._none_after_backward
        without |= self._bound_large - self._accumulated  # an eager backward calls every hook: none, no gradient
        # With no hook call at all since a rebind (the backward ran where Python hooks do not, a replayed CUDA graph,
        # or reached no parameter), leaving the rebound ones alone would stop training silently in the first case:
        # all but the frozen are taken to have one.
        if self._accumulated:  # (every trainable parameter has a hook once one was rebound: see _hook_trainable)
            without |= self._rebound_from_none - self._accumulated
        return sorted(without)

    def param_view(self, buffer: torch.Tensor, index: int) -> torch.Tensor:
        """Parameter ``index``'s elements in ``buffer`` (a flat buffer of this store), with its shape and strides."""
        require(buffer.shape == (self.n_elements,), f"not a flat buffer of this store: {tuple(buffer.shape)}")
        shape, strides, start = self.param_layout[index]
        return buffer.as_strided(shape, strides, buffer.storage_offset() + start)

    def param_slice(self, buffer: torch.Tensor, index: int) -> torch.Tensor:
        """The flat slice of ``buffer`` (a flat buffer of this store) holding parameter ``index``'s elements."""
        p, _, _ = self._grad_views[index]
        start = self._flat_offsets[index]
        return buffer[start : start + p.numel()]

    def release(self) -> None:
        """Gives each parameter and gradient still viewing the flat buffers storage of its own; removes the hooks.

        For an owner done with the store: the parameters stay the same objects (identity, ``requires_grad``, dtype,
        device and strides kept), with the same values bit for bit, and no longer share the flat buffers' storage, so
        ``torch.save`` of one layer writes that layer alone, and a tensor a user keeps does not keep every buffer
        alive. The flat buffers are freed here, so the copies take their place. A gradient recorded as not given by the
        backward since the last step (a batch left part-way) is set to ``None``. A parameter or gradient that no longer
        views them (a model moved after the store was built, a gradient set to
        ``None`` or replaced) is left as it is. The store's steps no longer reach the parameters
        (:meth:`rebind_grads` raises ``DetachedParametersError``).
        """
        # A gradient the step's backward did not give, bound to its zeroed view (a batch left part-way): None, as the
        # plain loop's, not a zero tensor that a torch.optim step going on would read as one (momentum, decay)
        for i in self._none_after_backward | (self._bound_large - self._accumulated):
            self._grad_views[i][0].grad = None
        with torch.no_grad():
            for p, _, _ in self._grad_views:
                if _shares_storage(p, self.params):
                    p.data = p.data.clone(memory_format=torch.preserve_format)
                if p.grad is not None and _shares_storage(p.grad, self.grads):
                    p.grad = p.grad.clone(memory_format=torch.preserve_format)
        self.remove_grad_hooks()
        # The flat buffers go now, not when the store does: an owner kept after its close() (a Controller after its
        # `with` block) held the parameters, gradients and 16-bit copies twice. Nothing reads them after this.
        self._grad_views.clear()
        self._params_in_order.clear()
        self._grad_views_in_order.clear()
        self._addresses.clear()
        self.params = self.params.new_empty(0)
        self.grads = self.grads.new_empty(0)
        self.bf16_copy = self.bf16_copy.new_empty(0)
        self.fp16_copy = self.fp16_copy.new_empty(0)

    def remove_grad_hooks(self) -> None:
        """Removes the hooks :meth:`rebind_grads` installed (the owner of the store is done with it)."""
        for handle in self._grad_hooks.values():
            handle.remove()
        self._grad_hooks.clear()
        self._rebound_from_none.clear()
        self._none_after_backward.clear()
        self._bound_large.clear()
        self._accumulated.clear()

    def _hook_trainable(self, rebound: list[int]) -> None:
        """Gives the hook noting when autograd accumulates a gradient to each trainable parameter that has none.

        Called with the parameters ``rebound`` from ``None``. Every trainable parameter gets the hook, not only the
        rebound ones: then a step whose rebound parameters all got no gradient (a head left out of the loss and zeroed
        alone) is told from one where no hook could run (a replayed graph), and the head is left alone, not decayed.
        A frozen parameter takes no hook (torch refuses one) and gets no gradient. Hooks stay installed: every
        parameter's at the first call (a walk per rebound parameter was quadratic: 37 ms a step at 1000 parameters),
        later only those of ``rebound`` unhooked still (unfrozen since, say).
        """
        hooks = self._grad_hooks
        unhooked = range(len(self._grad_views)) if not hooks else sorted(set(rebound).difference(hooks))
        for i in unhooked:
            param = self._grad_views[i][0]
            if param.requires_grad:
                hooks[i] = param.register_post_accumulate_grad_hook(self._recorder(i))

    def _recorder(self, index: int) -> Callable[[torch.Tensor], None]:
        """The hook noting that autograd accumulated into parameter ``index``'s gradient."""
        accumulated = self._accumulated
        return lambda _param: accumulated.add(index)

    def zero_grad(self, views_bound: bool = False) -> None:
        """Zeros the flat gradient buffer (one kernel); the ``param.grad`` views stay in place, other gradients go.

        A gradient that is not its view (autograd's own, made where a user's ``zero_grad()`` had set it to ``None``,
        not yet copied in by ``rebind_grads(after_backward=True)``; a tensor given in its place) holds values outside
        the buffer: it is set to ``None``, not left for the next backward to add to. So is the gradient of a
        parameter recorded as without one after a backward (:meth:`rebind_grads`), whose zeroed view was bound since,
        or bound before one (:meth:`bind_large_grads`), and the record goes: a step refused or interrupted after it
        was taken would otherwise leave those parameters out of a later step that reaches them, or, bound to zeros,
        decay them in one that does not. The next step's backward tells again.

        ``views_bound``: the caller rebound every gradient since the record was last cleared (the fused step's zeroing
        after its update), so the check of each one, an attribute read a parameter, is skipped.
        """
        self.grads.zero_()
        self._zeroed_version = self.grads._version
        params = self._params_in_order
        if views_bound and not self._none_after_backward and not self._bound_large:
            return
        unknown = self._none_after_backward | self._bound_large  # whether the next backward reaches these: it tells
        if unknown or not all(map(operator.is_, map(_GRAD, params), self._grad_views_in_order)):
            views = self._grad_views_in_order
            for i, p in enumerate(params):
                if i in unknown or p.grad is not views[i]:
                    p.grad = None
            self._none_after_backward.clear()
            self._bound_large.clear()

    def layer_sq_sums(self, buffer: torch.Tensor) -> torch.Tensor:
        """Per-layer sums of squares of ``buffer`` (a flat buffer of this store), float64 ``[n_layers]``.

        Three kernels whatever the number of layers: squares summed per segment (padding holds zeros),
        then added into each segment's layer.
        """
        require(buffer.shape == (self.n_elements,), f"not a flat buffer of this store: {tuple(buffer.shape)}")
        per_segment = buffer.view(-1, self.segment_align).float().square().sum(1, dtype=torch.float64)
        sums = torch.zeros(self.n_layers, dtype=torch.float64, device=buffer.device)
        return sums.index_add_(0, self.chunk_layer, per_segment)

    def layer_segment(self, buffer: torch.Tensor, layer: int) -> torch.Tensor:
        """The flat view of ``layer``'s segment (padding included) in ``buffer``, a flat buffer of this store."""
        require(buffer.shape == (self.n_elements,), f"not a flat buffer of this store: {tuple(buffer.shape)}")
        start = self.layer_offsets[layer]
        return buffer[start : start + self.layer_lengths[layer]]

    def param_views(self, buffer: torch.Tensor, layer: int) -> list[torch.Tensor]:
        """Views of ``buffer`` shaped like each parameter of ``layer``.

        With ``bf16_copy`` or ``fp16_copy`` these are the low-precision weights a forward pass uses; with
        an optimizer state buffer (``FusedAdamW.exp_avg``) the per-parameter state.
        """
        require(buffer.shape == (self.n_elements,), f"not a flat buffer of this store: {tuple(buffer.shape)}")
        return [
            _strided_like(buffer, p, start)
            for p, start in zip(self.layers[layer], self._param_offsets[layer], strict=True)
        ]

    def low_precision_params(self, layer: int, dtype: torch.dtype) -> list[torch.Tensor]:
        """The bf16 or fp16 copies of ``layer``'s parameters, shaped like them (views, no copy)."""
        if dtype == torch.bfloat16:
            return self.param_views(self.bf16_copy, layer)
        if dtype == torch.float16:
            return self.param_views(self.fp16_copy, layer)
        raise ValueError(f"dtype must be bfloat16 or float16, got {dtype}")

    def refresh_low_precision(self, codes: Sequence[int] | None = None) -> None:
        """Rounds the fp32 weights into the 16-bit copies, e.g. before the first forward.

        The fused optimizers keep the copies of bf16 and fp16 layers current after each applied step; call
        this after changing weights any other way (loading a checkpoint, say) or a layer's precision.

        Args:
            codes: each layer's precision code (0 fp32, 1 bf16, 2 fp16), as the fused steps take them. Separate
                copies ignore it (both are written whole, a launch each). A ``shared_copy`` needs it (None:
                all bf16): one launch writes the whole buffer in the type more layers want, then each layer
                of the other type has its segment rewritten (a launch each). fp32 layers' bits are not read.

        Raises:
            ValueError: ``codes`` (given) has not one entry per layer, or an entry that is not the whole number 0, 1 or
                2 (checked for separate copies too).
        """
        if codes is not None:
            given = list(codes)
            if len(given) != self.n_layers or not all(
                isinstance(code, numbers.Integral) and not isinstance(code, bool) and code in (0, 1, 2)
                for code in given
            ):
                raise ValueError(f"codes must give each of the {self.n_layers} layers 0, 1 or 2; got {given}")
        if not self.shared_copy:
            cast_to_low_precision(self.params, torch.bfloat16, out=self.bf16_copy)
            cast_to_low_precision(self.params, torch.float16, out=self.fp16_copy)
            return
        codes = [1] * self.n_layers if codes is None else [int(code) for code in codes]
        bf16_layers = [layer for layer, code in enumerate(codes) if code == 1]
        fp16_layers = [layer for layer, code in enumerate(codes) if code == 2]
        if len(fp16_layers) > len(bf16_layers):
            cast_to_low_precision(self.params, torch.float16, out=self.fp16_copy)
            rewrite, dtype, out = bf16_layers, torch.bfloat16, self.bf16_copy
        else:
            cast_to_low_precision(self.params, torch.bfloat16, out=self.bf16_copy)
            rewrite, dtype, out = fp16_layers, torch.float16, self.fp16_copy
        for layer in rewrite:
            cast_to_low_precision(self.layer_segment(self.params, layer), dtype, out=self.layer_segment(out, layer))


def is_dense(tensor: torch.Tensor) -> bool:
    """True when ``tensor`` covers exactly ``numel`` consecutive elements in some dimension order.

    Contiguous and channels-last tensors are dense, and so is every empty tensor (no element, no gap, whatever
    its strides); slices with gaps and broadcast (zero-stride) views are not.
    """
    if tensor.numel() == 0:
        return True
    expected = 1
    for size, stride in sorted(zip(tensor.shape, tensor.stride(), strict=True), key=lambda item: item[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def check_apart(params: Sequence[torch.Tensor]) -> None:
    """Raises a ValueError when two parameters share memory (views of one tensor that overlap).

    Each gets its own place in the flat buffers, so such parameters would stop sharing their elements: an update of
    one would no longer show in the other, as it does under ``torch.optim``. Dense parameters cover one range each.
    """
    ranges = sorted(
        (p.untyped_storage().data_ptr(), p.storage_offset(), p.storage_offset() + p.numel(), i)
        for i, p in enumerate(params)
        if p.numel()
    )
    for (storage, _, end, i), (next_storage, next_start, _, j) in itertools.pairwise(ranges):
        if storage == next_storage and next_start < end:
            first, second = sorted((i, j))
            raise ValueError(
                f"parameters {first} and {second} (in the order of layers) share memory, shapes "
                f"{tuple(params[first].shape)} and {tuple(params[second].shape)}: each needs its own (a weight tied "
                "between modules is one parameter, listed once)"
            )


_GRAD = operator.attrgetter("grad")


def _strided_like(buffer: torch.Tensor, p: torch.Tensor, start: int) -> torch.Tensor:
    """The ``p.numel()`` elements of flat ``buffer`` from ``start``, viewed with ``p``'s shape and strides.

    A channels-last weight keeps its memory format, so its gradient and 16-bit copies have it too.
    """
    return buffer.as_strided(p.shape, p.stride(), buffer.storage_offset() + start)


def _shares_storage(tensor: torch.Tensor, buffer: torch.Tensor) -> bool:
    """True when ``tensor`` is a view of ``buffer``'s storage (a sparse tensor never is)."""
    if tensor.layout is not torch.strided:
        return False
    return tensor.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()


def _round_up(value: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``value``."""
    return -(-value // multiple) * multiple

"""Per-layer compute precision: finds a model's layers and runs each one in its chosen precision.

Each controllable layer (Linear, Conv, MultiheadAttention) runs under its own ``torch.autocast`` region,
entered by a forward pre-hook and left by a forward hook: a bf16 layer computes its matmul/conv on bf16
weights and inputs, an fp32 layer disables autocast and gets its 16-bit inputs (positional and keyword) cast
to fp32. Functional ops between layers follow an outer autocast region of the dominant low precision (so a
loss computed inside ``context()`` runs in fp32, as autocast promises for ``cross_entropy``).

The other layers that own parameters report fp32 and compute in it: norms and embedding bags get their 16-bit
inputs cast up (autocast runs their ops in fp32); RNNs and any other module without children (``nn.PReLU``, a
user's module applying ``F.linear`` to its own parameter) run in an fp32 region of their own. Two exceptions: batch
norm takes 16-bit inputs as they come, as under ``torch.autocast`` (it computes in fp32 and returns the input's type),
and a module with children computes its own functional ops in the outer region (a region of its own would hold its
children in fp32 too, a LoRA adapter's frozen base among them): it still reports fp32, and a warning names those
holding a weight matrix of their own (a hand-written LoRA adapter's ``x @ A.T`` runs in the context's 16-bit type).

A controllable layer called inside the model's own ``torch.autocast(..., enabled=False)`` block computes in fp32, as its
author asked, whatever its precision (which the controller's costs still count).

Limitation: a parametrized module (``torch.nn.utils.parametrizations.weight_norm``, ``orthogonal``) keeps its
trainable tensors under ``<module>.parametrizations``: those are listed as a layer of their own that reports fp32. A
module left with no parameter of its own (``weight_norm`` of a Linear without bias) is then no layer and computes in the
region around it; one that keeps one (its bias) is still a layer and computes in its set precision. A warning names
such modules, saying which case each is.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.nn.utils import parametrize

from triaccel_rl import _pickled_hooks
from triaccel_rl.types import LayerInfo, Precision

_log = logging.getLogger(__name__)

__all__ = [
    "CONTROLLABLE_TYPES",
    "LayerPrecision",
    "WeightCopies",
    "driven_modules",
    "find_layers",
    "layer_parameters",
    "read_copy",
]

CONTROLLABLE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.MultiheadAttention,
)
# Non-controllable modules whose whole computation autocast would lower to 16 bits (its lists hold the RNN kernels):
# they run in an fp32 region of their own, as the fp32 their precision reports.
_AUTOCAST_LOWERED_TYPES: tuple[type[nn.Module], ...] = (nn.RNNBase,)
# Non-controllable modules whose ops autocast runs in fp32 given fp32 inputs (norms, bags of embeddings): casting their
# 16-bit inputs up is enough, no region of their own (a region costs a graph break under torch.compile). Any other
# non-controllable module without children (nn.PReLU, nn.ConvTranspose3d, a user's module applying F.linear to its
# own parameter) runs in an fp32 region, as RNNs do: under the outer region it would compute in 16 bits.
_FP32_UNDER_AUTOCAST_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.EmbeddingBag,
)
# Modules that accept low-precision inputs with fp32 parameters natively (no cast kernel needed).
_NATIVE_MIXED_TYPES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.Embedding,
)
# Non-controllable types that compute as the fp32 they report, children or not (see _install_hooks), and a
# parametrized tensor's originals (the parametrized-module warning names their module): other non-controllable modules
# with children are named in a warning (_warn_own_operations_in_region_around).
_REPORTED_AS_COMPUTED_TYPES: tuple[type[nn.Module], ...] = (
    *_AUTOCAST_LOWERED_TYPES,
    *_FP32_UNDER_AUTOCAST_TYPES,
    *_NATIVE_MIXED_TYPES,
    parametrize.ParametrizationList,
)


def find_layers(model: nn.Module) -> list[tuple[str, nn.Module, LayerInfo]]:
    """Lists the modules that own trainable parameters directly, in registration order.

    ``MultiheadAttention`` counts as one layer with all its parameters (its inner ``out_proj`` is not
    listed separately).

    Raises:
        ValueError: the model has no trainable parameters.
    """
    found: list[tuple[str, nn.Module, LayerInfo]] = []
    inside_attention: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in inside_attention:
            continue
        if isinstance(module, nn.MultiheadAttention):
            params = [p for p in module.parameters() if p.requires_grad]
            inside_attention.update(id(m) for m in module.modules() if m is not module)
        else:
            params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not params:
            continue
        n_params = sum(p.numel() for p in params)
        controllable = isinstance(module, CONTROLLABLE_TYPES)
        found.append((name or type(module).__name__, module, LayerInfo(name or "<root>", n_params, controllable)))
    if not found:
        raise ValueError(
            f"model {type(model).__name__} has no trainable parameters; nothing for the controller to train"
        )
    return found


def layer_parameters(model: nn.Module, layers: Sequence[LayerInfo]) -> list[list[nn.Parameter]]:
    """The trainable parameters each layer owns directly, in the order of ``layers``.

    A parameter shared by several layers (tied weights: an embedding and the output projection of a language
    model) belongs to the first of them, so each parameter is updated and counted once; the others still compute
    with it, in their own precision.
    """
    modules = dict(model.named_modules())
    owned: list[list[nn.Parameter]] = []
    seen: set[int] = set()
    for info in layers:
        module = modules.get(info.name, model)
        params = module.parameters() if isinstance(module, nn.MultiheadAttention) else module.parameters(recurse=False)
        mine = [p for p in params if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in mine)
        owned.append(mine)
    return owned


def driven_modules(model: nn.Module) -> list[str]:
    """The names of ``model``'s modules carrying live hooks of a ``LayerPrecision`` not removed (an open Controller's).

    Hooks of a closed one are inert and not counted (a copy sheds them when hooks go in).
    """
    return [
        name or "<root>"
        for name, module in model.named_modules()
        if any(
            _acts_for_open_one(hook) for hook in (*module._forward_pre_hooks.values(), *module._forward_hooks.values())
        )
    ]


class LayerPrecision:
    """Installs hooks that run each controllable layer of ``model`` in its own precision.

    Precisions apply only inside :meth:`context`; outside it the model runs as if unhooked.

    A layer called inside the model's own ``torch.autocast(..., enabled=False)`` block computes in fp32 there whatever
    its precision (its 16-bit inputs cast up), under a uniform map and a mixed one alike: its author asked for fp32.
    Inside the model's own ``torch.autocast(dtype=...)`` region it computes in that region's type the same way (a
    region of the type :meth:`context`'s own region has cannot be told from it: there the layer keeps its precision).
    Limitation: the precision set for it is what the controller's cost model and observation count; such layers are
    listed in :attr:`layers_in_model_blocks` (:attr:`layers_in_model_fp32_blocks`) and named once in a warning.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> lp = LayerPrecision(model, device_type="cpu")
        >>> lp.set([Precision.BF16, Precision.FP32])
        >>> with lp.context():
        ...     out = model(torch.randn(3, 4))
        >>> out.dtype
        torch.float32
    """

    def __init__(self, model: nn.Module, device_type: str) -> None:
        self.model = model
        self.device_type = device_type
        entries = find_layers(model)
        _refuse_16_bit_parameters(model)
        _refuse_script_modules(model)
        _refuse_frozen_controllable_types(model, [info for _, _, info in entries])
        # One parameter read at each context(): a model cast to 16 bits after the hooks went in (model.bfloat16()
        # casts every parameter) is refused there, by name, not deep in its forward.
        self._sentinel = next(p for _, module, _ in entries for p in module.parameters() if p.requires_grad)
        self.layers: list[LayerInfo] = [info for _, _, info in entries]
        self._modules = [module for _, module, _ in entries]
        # Each layer's parameters as registered now, by owner and name (the attention's submodules' too, as the
        # engine's copies are): a copy is swapped in only over the parameter it was made from (see _swap_in).
        self._registered = [
            [(owner, name, param) for owner in module.modules() for name, param in owner._parameters.items()]
            for module in self._modules
        ]
        # Controllable layers of float64 parameters: autocast leaves float64 ops alone (see set())
        self._float64_layers = {
            index
            for index, module in enumerate(self._modules)
            if self.layers[index].controllable
            and any(p.dtype == torch.float64 for p in module.parameters(recurse=False))
        }
        self._float64_warned: set[int] = set()
        self._controllable_index = [i for i, info in enumerate(self.layers) if info.controllable]
        self.precisions: list[Precision] = [Precision.FP32] * len(self.layers)
        # What the map implies (_MapFacts), derived once per map: context() and the hooks read it several times a
        # step, and deriving it is a loop over the layers. Keyed on the map's values and the device type, all it
        # reads beside what is fixed here, so a map set through set() or written in place (precisions[i] = ...) is
        # derived afresh at its next read (see _facts).
        self._facts_key: tuple[tuple[Precision, ...], str] | None = None
        self._facts_value = _MapFacts(None, Precision.FP32, False)
        self._active = False
        # Each module's last forward in an autocast state (which a recompute restores): how its hooks acted, None where
        # they were idle (see _forward_state)
        self._forward_on: dict[tuple[int, bool, torch.dtype], _Forward | None] = {}
        self.own_autocast_precision: Precision | None = None
        """The 16-bit type of a ``torch.autocast`` of the user's that a training forward outside :meth:`context` ran
        in (gradients on), since this was last set to None; None: no such forward. Read and reset by ``Controller.step``
        (its layers computed in that type, not in their precisions). Recorded by the layers' pre-hooks, which read the
        autocast state at each call already, and only outside the context: nothing is added to a forward inside it."""
        self._mixed = False
        self._cache_enabled = True
        self._outer_region_dtype: torch.dtype | None = None  # the dtype of context()'s own region (None: fp32)
        self._handles: list[Any] = []
        self._hooks: list[Callable[..., Any]] = []  # the functions behind _handles
        # What the hooks act on: this LayerPrecision until remove() empties it. A deep copy of the model keeps the hooks
        # (see _as_closure), which then hold nothing of it and drop out of the copy (_drop_released_hooks).
        self._hooks_act_on: list[LayerPrecision] = [self]
        self._stack: list[_Region] = []  # open autocast regions of the modules being run, innermost last
        self._in_model_blocks: dict[int, list[torch.dtype]] = {}  # see layers_in_model_blocks
        # Each layer's ``_ours`` at its forward, by the autocast state of the call (which a recompute restores): a layer
        # called at the top and inside another layer's region has one for each.
        # (the context() it was recorded in, the type; _AMBIGUOUS where that context's calls disagreed)
        self._forward_ours: dict[tuple[int, bool, torch.dtype], tuple[int, Any]] = {}
        self._forwards = 0  # context() entries so far
        self._is_conv = [isinstance(m, nn.modules.conv._ConvNd) for m in self._modules]
        self.weight_copies: WeightCopies | None = None
        """Set by the engine's fused path: a bf16/fp16 layer's forward then reads the 16-bit weight copies the
        fused optimizer step keeps current (:meth:`use_weight_copies`) instead of casting its fp32 weights."""
        self._on_map_change: Callable[[], None] | None = None  # the copies' owner re-derives them (use_weight_copies)
        self.copies_in_eager = True
        """Whether an eager forward reads the copies too (a forward ``torch.compile`` traces always does). Reading
        a copy saves the cast kernel but costs host time a parameter (the swap and an autograd function): free
        where the step is replayed from a captured CUDA graph (``TrainingRun``), a loss in a user's eager loop on a
        launch-bound model (``Controller`` turns it off: ResNet-18 on the H200, 2.1 ms of an 11.5-ms step)."""
        self._swapped: list[tuple[nn.Module, list[tuple[nn.Module, str, nn.Parameter]]]] = []
        # _enter_region, _exit_region, _open_fp32_region and _close_fp32_region wrapped in torch.compiler.disable, made
        # once Dynamo is loaded (importing it here would add 1.6 s to every import of the package; a traced forward
        # means it was loaded before).
        self._eager_regions: tuple[Callable[..., Any], ...] | None = None
        self._release_when_collected: weakref.finalize[Any, Any] | None = None  # see release_when_collected

        try:
            self._install_hooks(model)
        except BaseException:  # a module that refused a hook: none of ours stay behind on the others
            self.remove()
            raise
        parametrized = [(name, module) for name, module in model.named_modules() if parametrize.is_parametrized(module)]
        controlled = {id(m) for m, info in zip(self._modules, self.layers, strict=True) if info.controllable}
        free = [name for name, module in parametrized if id(module) not in controlled]
        if free:
            _log.warning(
                "modules %s are parametrized (torch.nn.utils.parametrize: weight_norm, orthogonal, ...): their "
                "parameters are listed as '<module>.parametrizations.<name>' layers that report fp32, but the module "
                "itself computes in the region around it (the context's type); its precision is not controlled",
                free,
            )
        kept = [name for name, module in parametrized if id(module) in controlled]
        if kept:  # a layer that keeps a parameter of its own (weight_norm's Linear its bias) is still a layer
            _log.warning(
                "modules %s are parametrized (torch.nn.utils.parametrize): each computes in its set precision, but its "
                "parametrized tensors are listed as '<module>.parametrizations.<name>' layers that report fp32",
                kept,
            )
        # A weight matrix of its own is what a matmul in 16 bits would take; a position embedding or class token (3-D),
        # a layer scale (1-D) are added or multiplied elementwise, in fp32 under autocast: not named (a review found
        # the warning on the package's own transformer task and on ViT- and ConvNeXt-like models, about nothing)
        own_operations = [
            info.name
            for module, info in zip(self._modules, self.layers, strict=True)
            if not info.controllable
            and next(module.children(), None) is not None
            and not isinstance(module, _REPORTED_AS_COMPUTED_TYPES)
            and any(p is not None and p.requires_grad and p.dim() == 2 for p in module._parameters.values())
        ]
        if own_operations:
            model_type = f"{type(model).__module__}.{type(model).__qualname__}"
            _warn_own_operations_in_region_around(model_type, tuple(own_operations))
        _guard_compiled_graphs_on_hooks()

    @property
    def active(self) -> bool:
        """Whether a :meth:`context` is open (the layers' forwards run in their precisions)."""
        return self._active

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """The model's forwards as without the hooks, in fp32: the hooks idle and autocast off, inside a context too.

        For the ``Controller``'s estimator rounds, which a decision runs inside ``step()``; a loop that calls
        ``ctl.step(loss)`` inside ``with ctl.autocast():`` has the context open there, and the rounds ran in its 16-bit
        map. The context has its state back on leaving.
        """
        active = self._active
        self._active = False
        try:
            with torch.autocast(self.device_type, enabled=False):
                yield
        finally:
            self._active = active

    @property
    def controllable_indices(self) -> list[int]:
        """Indices (into ``layers``) of the layers whose precision can be set."""
        return list(self._controllable_index)

    def check_ordered(self, precisions: Any) -> None:
        """Raises a ValueError unless ``precisions`` is an ordered sequence (a list, tuple or array) of precisions.

        The check of ``set``'s argument, for a caller that parses it first (``StepEngine.set_precisions``): a dict
        (``{0: "bf16", 2: "fp16"}``) was iterated by its keys, read as the precisions 0 and 2, and a set in an order
        of the strings' hashes (another map each run); one string was read as one precision a character. A NumPy
        array must hold whole numbers or names. A tensor is refused as a container: iterated, it gives 0-d tensors,
        which ``Precision.parse`` does not take (``tensor.tolist()`` gives numbers it does).
        """
        if isinstance(precisions, str):  # "bf16" read as the three precisions 'b', 'f', '1'
            raise ValueError(
                f"precisions={precisions!r} is one string: give a sequence, one precision a layer "
                f"(e.g. [{precisions!r}] * n), each one of fp32, bf16, fp16"
            )
        if isinstance(precisions, np.ndarray) and precisions.ndim != 1:  # a 0-d one raised a bare TypeError
            raise ValueError(
                f"precisions={precisions!r} has {precisions.ndim} dimensions: give one, a precision a layer"
            )
        if isinstance(precisions, np.ndarray) and precisions.dtype.kind not in "iuUO":
            # Refused element by element otherwise, as "unknown precision np.float64(1.0)", without the array's type.
            raise ValueError(
                f"precisions={precisions!r} holds {precisions.dtype}: give whole numbers (0 fp32, 1 bf16, 2 fp16) or "
                "the names fp32, bf16, fp16, one a layer"
            )
        if isinstance(precisions, (Mapping, AbstractSet)) or not isinstance(precisions, (Sequence, np.ndarray)):
            names = [layer.name for layer in self.layers]
            controllable = [names[i] for i in self._controllable_index]
            raise ValueError(
                f"precisions={precisions!r} is a {type(precisions).__name__}: give an ordered sequence (a list, tuple "
                f"or array) with one precision per layer ({len(names)}: {names}) or per controllable layer "
                f"({len(controllable)}: {controllable}), in that order"
            )

    def set(self, precisions: Sequence[Precision | str | int]) -> None:
        """Sets the precision of every layer (``len(layers)`` values) or of every controllable one.

        Non-controllable layers stay fp32 whatever is asked. Set inside an open :meth:`context` (one wrapped around
        several steps), the new map applies to the layers from their next call, and the context's region follows it as
        though the context had been entered on it (its type, and a uniform map's idle hooks; autocast's cache of cast
        weights is cleared when the type changes): the functional ops between the layers run in the new map's type.

        Raises:
            ValueError: wrong count, an unknown precision, one string for the whole map, or a map that is not an
                ordered sequence (a dict, a set: see :meth:`check_ordered`).
        """
        self.check_ordered(precisions)
        parsed = [Precision.parse(p) for p in precisions]
        if len(parsed) == len(self.layers):
            chosen = parsed
        elif len(parsed) == len(self._controllable_index):
            chosen = [Precision.FP32] * len(self.layers)
            for index, precision in zip(self._controllable_index, parsed, strict=True):
                chosen[index] = precision
        else:
            raise ValueError(
                f"got {len(parsed)} precisions; expected {len(self.layers)} (all layers) or "
                f"{len(self._controllable_index)} (controllable layers)"
            )
        before = self.precisions
        self.precisions = [p if self.layers[i].controllable else Precision.FP32 for i, p in enumerate(chosen)]
        # A float64 layer set to 16 bits computes in float64 all the same, while the map, the policies and the cost
        # model count the 16 bits: said once a layer, as nothing else would say it.
        lowered = [i for i in self._float64_layers - self._float64_warned if self.precisions[i] is not Precision.FP32]
        for index in lowered:
            _log.warning(
                "layer %s has float64 parameters: autocast leaves float64 alone, so it computes in float64 whatever "
                "its precision says (%s); the cost model counts the precision. Cast it to float32 for the controller "
                "to set it",
                self.layers[index].name,
                self.precisions[index].name.lower(),
            )
        self._float64_warned.update(lowered)
        if self._active:
            self._follow_map()
        if self._on_map_change is not None and self.precisions != before:
            self._on_map_change()

    def _follow_map(self) -> None:
        """Makes the open context's region and path those of the map set inside it, as if entered on that map.

        Kept as entered, a uniform map's fast path ran a layer set apart in the entry's type while ``precisions`` named
        another; and on the layers' own regions the entry's outer type stayed: an fp16 map set in a context entered on
        bf16 handed every layer's result on in fp32 (1.75x the saved activations). Inside a layer's forward (its region
        innermost) only the path changes: to each layer's own region.
        """
        if self._stack:
            self._mixed = True
            return
        outer = self._facts().outer
        if outer != self._outer_region_dtype:
            torch.clear_autocast_cache()  # it holds weights cast to the old type, keyed by the weight alone
            torch.set_autocast_enabled(self.device_type, outer is not None)  # the region's __exit__ restores both
            if outer is not None:
                torch.set_autocast_dtype(self.device_type, outer)
            self._outer_region_dtype = outer
        self._mixed = not self._uniform_fast_path_holds()

    def use_weight_copies(self, copies: WeightCopies | None, on_map_change: Callable[[], None] | None = None) -> None:
        """Makes bf16 and fp16 layers read their weights from ``copies`` (``None``: cast the fp32 weights).

        ``copies(layer, dtype)`` returns, for each parameter of the layer, ``(owner module, attribute name,
        16-bit tensor)``. While such a layer runs inside :meth:`context`, each of its parameters is replaced
        by :func:`read_copy` of its copy: the forward computes on the copy with no cast kernel, and the
        gradient flows back to the fp32 parameter as it would through autocast's cast (the same values
        when the copy equals ``param.to(dtype)``, which the caller keeps true). Emulated fp16 layers (CPU
        convolutions) read their fp32 weights rounded through fp16 instead (see ``_emulate``).

        ``on_map_change`` is called when :meth:`set` changes the map, before any layer reads a copy under it: the
        caller re-derives the copies there (a layer newly lowered holds a stale copy, one switched between bf16 and
        fp16 the other type's bits), however the map was set: ``StepEngine.set_precisions`` or this object's own.
        """
        self.weight_copies = copies
        self._on_map_change = on_map_change

    @property
    def needs_grad_scaler(self) -> bool:
        """True when any layer computes in fp16, whose narrow range needs loss scaling.

        Set to fp16, or seen computing in fp16 inside the model's own ``torch.autocast(dtype=torch.float16)`` region
        whatever its precision (:attr:`layers_in_model_blocks`: known from the first eager forward on, so a step's loss,
        scaled after its forward, is scaled from the first step).
        """
        in_model_fp16 = any(torch.float16 in dtypes for dtypes in self._in_model_blocks.values())
        return Precision.FP16 in self.precisions or in_model_fp16

    @property
    def uniform(self) -> Precision | None:
        """The precision shared by every controllable layer, or None when they differ."""
        return self._facts().uniform

    @property
    def all_fp32(self) -> bool:
        """Whether every layer is set to fp32 (no autocast region of ours: :meth:`context` opens none)."""
        return self._facts().outer is None

    @property
    def layers_in_model_fp32_blocks(self) -> list[int]:
        """Indices (into ``layers``) of bf16/fp16 layers that computed in fp32 inside the model's own fp32 block.

        Layers called inside a ``torch.autocast(..., enabled=False)`` block of the model's forward, seen in eager
        forwards since the hooks were installed (each is logged once as a warning). Nothing else reads it: the
        controller's cost model and observation count the precision set, not the fp32 such a layer computes in.
        """
        return sorted(i for i, dtypes in self._in_model_blocks.items() if torch.float32 in dtypes)

    @property
    def layers_in_model_blocks(self) -> dict[int, tuple[torch.dtype, ...]]:
        """Each layer (index into ``layers``) seen computing in regions of the model's own code, with their types.

        The types in the order first seen; a type is fp32 for ``torch.autocast(..., enabled=False)``, else the model's
        ``torch.autocast``'s ``dtype``. As :attr:`layers_in_model_fp32_blocks`, 16-bit regions included: a layer whose
        set precision differs from the region's type, seen in an eager forward, logged once for each type as a warning.
        """
        return {index: tuple(dtypes) for index, dtypes in sorted(self._in_model_blocks.items())}

    @contextlib.contextmanager
    def context(self, cache_enabled: bool = True) -> Iterator[None]:
        """Runs the model's forward (and the loss) with the per-layer precisions.

        When every controllable layer has the same precision this is one plain ``torch.autocast``
        region (or none for fp32) and the per-layer hooks open no regions of their own: each layer's hooks
        still run at each call, on the host only (a Linear's pair about 2 us on a CPU core, beside torch's own 3 to 4 us
        for calling a module's hooks at all), and launch nothing.
        Norm layers still get fp32 inputs (CPU autocast would run them in 16 bits), and under an all-fp32 map a
        controllable layer's 16-bit inputs (a bf16 generator's output fed to the model) are cast up, as a mixed map's
        fp32 layer gets them.

        Args:
            cache_enabled: autocast's cache of cast weights (off while a CUDA graph is captured). Under a map that
                mixes bf16 and fp16, the layers of the type other than the outer region's run without it (a weight
                shared by a bf16 and an fp16 layer must be cast to each type).
        """
        if self._eager_regions is None and "torch._dynamo" in sys.modules:  # here, outside any traced forward
            _guard_compiled_graphs_on_hooks()  # Dynamo loaded since the hooks were installed
            self._eager_regions = (
                torch.compiler.disable(self._enter_region),
                torch.compiler.disable(self._exit_region),
                torch.compiler.disable(self._open_fp32_region),
                torch.compiler.disable(self._close_fp32_region),
            )
        if self._sentinel.dtype in _16_BIT:
            _refuse_16_bit_parameters(self.model)
        facts = self._facts()
        outer_dtype = facts.outer
        # A context entered inside another (a helper of the user's loop that opens its own) gives the outer one back
        # its state on leaving: before, the outer context's remaining forward ran with the hooks idle.
        outer = (
            self._active,
            self._mixed,
            self._cache_enabled,
            self._outer_region_dtype,
            len(self._stack),
            len(self._swapped),
        )
        self._mixed = facts.uniform is None or facts.emulates_fp16
        self._forwards += 1
        self._active = True
        self._cache_enabled = cache_enabled
        self._outer_region_dtype = outer_dtype
        _open.contexts.append(self)
        try:
            with torch.autocast(
                self.device_type,
                dtype=outer_dtype or torch.float16,
                enabled=outer_dtype is not None,
                cache_enabled=cache_enabled,
            ):
                try:
                    yield
                finally:
                    # Inside the outer region: each layer region gives back the state it found, and closed after the
                    # outer one, they would turn autocast on for the rest of the process (after a Ctrl-C in a layer's
                    # forward, which skips torch's always_call post-hooks).
                    while len(self._stack) > outer[4]:
                        self._stack.pop().region.__exit__(None, None, None)
        finally:
            contexts = _open.contexts
            del contexts[max(i for i, lp in enumerate(contexts) if lp is self)]  # closed out of order too
            self._active, self._mixed, self._cache_enabled, self._outer_region_dtype, depth, swapped = outer
            # A forward that raised between a pre-hook and its post-hook leaves regions open and weights swapped.
            while len(self._stack) > depth:
                self._stack.pop().region.__exit__(None, None, None)
            while len(self._swapped) > swapped:
                _restore(self._swapped.pop()[1])
            stale = self._facts().outer != self._outer_region_dtype or not (
                self._mixed or self._uniform_fast_path_holds()
            )
            if self._active and stale:  # a map set inside the inner context: the outer one (as entered) follows it
                self._follow_map()

    def _install_hooks(self, model: nn.Module) -> None:
        """Puts the hooks on the layers, on modules whose ops autocast would lower or does not know, and on norms."""

        # The pre-hooks take keyword arguments too: a layer called as ``attn(query=h, key=h, value=h)`` or
        # ``rnn(x, hx=h)`` gets those inputs cast as its positional ones.
        def add(register: Callable[..., Any], hook: Callable[..., Any], **options: Any) -> None:
            # Every hook a closure (_as_closure, _make_pre_hook: see there), named for pickle (see _pickled_hooks)
            self._hooks.append(_pickled_hooks.named(hook))
            self._handles.append(register(hook, **options))

        # A model copied while an earlier LayerPrecision was in (and since removed) sheds its hooks now: its first
        # forward may be a cost measurement's, which sets the forward hooks aside, so a released pre-hook shed its
        # post-hook from the set-aside dict only, and the one put back was called, idle, at every forward for good.
        for module in model.modules():
            _drop_released_hooks(module)
        for index, module in enumerate(self._modules):
            if self.layers[index].controllable:
                add(module.register_forward_pre_hook, self._make_pre_hook(index), with_kwargs=True)
                add(module.register_forward_hook, self._as_closure(LayerPrecision._post_hook), always_call=True)
            elif isinstance(module, _NATIVE_MIXED_TYPES):
                continue
            elif isinstance(module, _AUTOCAST_LOWERED_TYPES) or (
                not isinstance(module, _FP32_UNDER_AUTOCAST_TYPES) and next(module.children(), None) is None
            ):
                enter, exit_ = LayerPrecision._enter_fp32_module, LayerPrecision._exit_fp32_module
                add(module.register_forward_pre_hook, self._as_closure(enter, pre=True), with_kwargs=True)
                add(module.register_forward_hook, self._as_closure(exit_), always_call=True)
            else:
                add(
                    module.register_forward_pre_hook,
                    self._as_closure(LayerPrecision._fp32_inputs_hook, pre=True),
                    with_kwargs=True,
                )
        # Norms that own no trainable parameter (LayerNorm(elementwise_affine=False), InstanceNorm2d's default) are no
        # layers, but on the CPU autocast would run them in 16 bits too: their inputs are cast up as the others'.
        layer_modules = {id(module) for module in self._modules}
        # A frozen 16-bit norm (a bf16 backbone, fine-tuned beside) computes in its own type: left alone.
        for module in model.modules():
            if (
                id(module) not in layer_modules
                and isinstance(module, _FP32_UNDER_AUTOCAST_TYPES)
                and not any(p.dtype in _16_BIT for p in module.parameters(recurse=False))
            ):
                add(
                    module.register_forward_pre_hook,
                    self._as_closure(LayerPrecision._fp32_inputs_hook, pre=True),
                    with_kwargs=True,
                )

    def remove(self) -> None:
        """Removes the hooks; the model runs as before, and so do a deep copy and a model saved with them in.

        Those keep the hooks, which act no more and drop out of the model at its next forward (``_as_closure``).
        """
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._release()
        if self._release_when_collected is not None:
            self._release_when_collected.detach()
            self._release_when_collected = None

    def release_when_collected(self, owner: object) -> None:
        """Releases the hooks once ``owner`` (the ``StepEngine`` driving them) is garbage-collected unremoved.

        Else a Controller dropped without ``close()`` (a sweep's trial that raised part-way) would leave them acting for
        good: the model's hooks keep this object alive, and every later Controller on the model would be refused as
        sharing it with an open one. Released, they act no more and drop out of the model as a deep copy's do
        (``_as_closure``): at each module's next forward, or when another ``LayerPrecision`` goes in. :meth:`remove`
        cancels this.
        """
        if self._release_when_collected is not None:
            self._release_when_collected.detach()
        # Holds this object weakly: the finalizer is a root, and through the model this object may reach the owner
        # (a user's attribute on the model), which then could never be collected.
        finalizer = weakref.finalize(owner, _release_if_alive, weakref.ref(self))
        finalizer.atexit = False  # at interpreter exit no later Controller is built: nothing to release for
        self._release_when_collected = finalizer

    def _release(self) -> None:
        """Makes the hooks act no more, leaving them on the model (:meth:`remove` takes them off first).

        All a finalizer may do: it can run inside the garbage collector, during a forward of the model, where taking
        a hook off would change a hook dict torch iterates (``_drop_released_hooks`` says when).
        """
        _pickled_hooks.release(self._hooks)
        self._hooks.clear()
        self._hooks_act_on.clear()
        # Bound methods of this object (context() makes them again if it is entered after): held here they close a
        # cycle through the model, which then outlived its last reference until a full garbage collection.
        self._eager_regions = None

    def _as_closure(self, method: Callable[..., Any], *, pre: bool = False) -> Callable[..., Any]:
        """``method`` (a function of this class) as a hook acting on this ``LayerPrecision``: a closure.

        ``copy.deepcopy`` of the model (an EMA copy made after the hooks) copies a bound method's hook with a copy of
        its ``LayerPrecision``, never active and with a stack of its own: the copy's RNNs, norms and leaf modules
        computed in the outer 16-bit region, and its layers closed their regions on another stack than they opened them
        on. A function is copied as itself, so the copy's hooks act on the one ``LayerPrecision``. It reaches it
        through ``_hooks_act_on``, which :meth:`remove` empties: the copy's hooks then hold nothing of it (they kept the
        model and the closed Controller alive) and a pre-hook (``pre``) drops its module's released hooks at its next
        call (they were called, idle, at every forward of the copy for good).
        """
        acts_on = self._hooks_act_on

        def hook(*args: Any, **kwargs: Any) -> Any:
            if acts_on:
                return method(acts_on[0], *args, **kwargs)
            if pre:
                _drop_released_hooks(args[0])
            return None

        return hook

    def _make_pre_hook(self, index: int) -> Any:
        acts_on = self._hooks_act_on  # (see _as_closure)

        def pre_hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
            if not acts_on:
                _drop_released_hooks(module)
                return None
            lp = acts_on[0]
            # Called inside a region of the model's own code, ``autocast(enabled=False)`` or ``autocast(dtype=...)``,
            # the layer computes in that region's type whatever the map: a uniform map (the hooks idle) always let it,
            # but a mixed map's region replaced the model's, so its type hung on other layers' precisions. (Under
            # torch.compile the autocast state read here is the traced frame's, which Dynamo keeps as it traces.)
            # Read once a call, for the record and the block alike: each read is a call into torch (0.2 us).
            autocast = torch.is_autocast_enabled(lp.device_type), torch.get_autocast_dtype(lp.device_type)
            forward = lp._forward_state(module, autocast)
            if forward is None:
                return None
            precision = lp.precisions[index]
            ours = lp._ours(module, autocast)
            block = lp._model_block_dtype(ours, autocast)
            overridden = block is not None and block != precision.dtype
            if block is not None and overridden:
                if not torch.compiler.is_compiling() and not lp._in_other_context(autocast):
                    lp._note_model_block(index, block)
                precision = _PRECISION_OF[block]
            if (
                lp.weight_copies is not None
                and not overridden  # its weights are cast by the model's region: the copy holds the map's type
                and precision is not Precision.FP32
                and (lp.copies_in_eager or torch.compiler.is_compiling())
                and not lp._emulate(index)
            ):
                copies = lp.weight_copies(index, precision.dtype)
                lp._swapped.append((module, _swap_in(copies, lp._registered[index])))
            if not forward.mixed:
                # Autocast is the model's already. An fp32 layer (an all-fp32 map's, or one in the model's fp32 block)
                # gets its 16-bit inputs cast up as a mixed map's does: a bf16 input (a GAN's fakes from a bf16
                # generator) raised "mat1 and mat2 must have the same dtype" under the all-fp32 map alone. The usual
                # call (one tensor input) is tested inline before the general walk: the all-fp32 map is the benchmarks'
                # baseline, and the walk cost it 1.7 us a layer call (16% of a small Linear's eager call, hooks in).
                if precision is not _FP32:
                    return None
                if not kwargs and len(args) == 1 and type(args[0]) is torch.Tensor and args[0].dtype not in _16_BIT:
                    return None
                return _map_tensors((args, kwargs), _up_from_16_bit)
            enter = lp._eager_regions[0] if lp._eager_regions else lp._enter_region  # (see _enter_fp32_module)
            # Inside the model's block (its type the layer's own or not) the region records ``ours``, not its type
            return enter(module, index, args, kwargs, forward.outer, precision if block is not None else None, ours)

        return pre_hook

    def _enter_region(
        self,
        module: nn.Module,
        index: int,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        outer_dtype: torch.dtype | None,
        model_block: Precision | None = None,
        ours: torch.dtype | None = None,
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """Opens layer ``index``'s own autocast region (a mixed map); returns the inputs cast for it, if any.

        An fp32 layer's 16-bit inputs are cast up (float64 ones stay, as autocast leaves them); an emulated fp16
        layer's fp32 and 16-bit inputs, weight and bias are rounded to fp16 and computed on in fp32. A layer called
        inside a region of the model's own code computes in that region's type (``model_block``), whatever its
        precision: in a region of our own of that type, so that autocast's cache, which holds the outer region's type,
        is not read for another (a layer called outside it in fp16, then inside the model's bf16 region, got its fp16
        weight from the cache).

        Run eagerly under ``torch.compile`` (``_eager_regions``; a graph break at each layer of a mixed map): it changes
        the autocast state between two layers, which the compiled segments then guard on. A uniform map never calls it.
        """
        precision = self.precisions[index] if model_block is None else model_block
        # A region re-opened for the model's own block records the type ours was before it (``ours``, :meth:`_ours`),
        # so that a layer called inside this one still tells the model's block from ours (``_model_block_dtype``).
        # A CPU convolution computing in fp16 is emulated, whichever region asks for fp16 (the model's too).
        emulated = self._emulate(index, precision)
        # A 16-bit layer hands its result up in fp32 (exact; the next layer casts to its own) where the region it
        # returns into is of another type: ``ours``, the innermost region of ours (a parent layer's whose forward calls
        # this one) else the context's, in a recompute as at the forward; an emulated convolution's region computes in
        # fp32 (autocast off). That region's promote ops (cat, stack, index_put, ...) take only fp32 and its own type
        # ("Unexpected floating ScalarType in at::autocast::prioritize": fp16 under a map with bf16 layers), an fp32
        # parent's matmul or conv only fp32 ("mat1 and mat2 must have the same dtype" where only the context's region
        # is compared).
        returns_into = None if self._stack and self._stack[-1].emulated else ours
        hand_up = model_block is None and precision.dtype in _16_BIT and returns_into != precision.dtype
        if precision is Precision.FP32 or emulated:
            region = torch.autocast(self.device_type, enabled=False, cache_enabled=self._cache_enabled)
            region.__enter__()
            # An emulated region is fp16 to ours though autocast is off in it (a layer it calls is in no model block)
            mine = (torch.float16 if emulated else None) if model_block is None else ours
            self._stack.append(_Region(module, region, emulated, mine, hand_up))
            if emulated:  # fp16-rounded inputs and parameters, fp32 arithmetic
                self._swapped.append((module, _swap_in_rounded(module)))
                return _map_tensors((args, kwargs), _round_through_fp16)
            return _map_tensors((args, kwargs), _up_from_16_bit)
        # Autocast's cache of cast weights is keyed by the weight alone, not by the type it was cast to, and lives until
        # the outermost region closes: a weight shared by a bf16 and an fp16 layer (tied weights) was cast for the first
        # and handed, in that type, to the second ("expected m1 and m2 to have the same dtype"). Only regions of the
        # outer region's type fill and read it, so it holds one type; a layer of the other 16-bit type casts its weights
        # at each call. That costs a cast kernel only under a map mixing bf16 and fp16, and only for a layer called
        # more than once a forward (the cache saves nothing on the first call); other maps keep the cache as they were.
        cache_enabled = self._cache_enabled and precision.dtype == outer_dtype
        region = torch.autocast(self.device_type, dtype=precision.dtype, cache_enabled=cache_enabled)
        region.__enter__()
        self._stack.append(_Region(module, region, False, precision.dtype if model_block is None else ours, hand_up))
        return None

    def _post_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if self._swapped and self._swapped[-1][0] is module:
            _restore(self._swapped.pop()[1])
        # Whether this module's pre-hook opened the innermost region, not _hooks_on: called inside that region, it read
        # the region's autocast state, which a forward outside the context records too, and a recompute's region was
        # left open (every later layer ran in it, and the autocast state leaked past the backward).
        if self._stack and self._stack[-1].module is module:
            return (self._eager_regions[1] if self._eager_regions else self._exit_region)(module, output)
        return None

    def _exit_region(self, module: nn.Module, output: Any) -> Any:
        """Closes ``module``'s region, eagerly as ``_enter_region``; rounds an emulated fp16 layer's result.

        Nothing when the innermost region is not ``module``'s: its pre-hook opened none (a hook before it raised,
        and this one runs because it is always called), and another module's region must stay open.
        """
        if self._stack[-1].module is not module:
            return None
        _, region, emulated, _, hand_up = self._stack.pop()
        region.__exit__(None, None, None)
        # The layer's result, rounded as fp16 hardware would; a float64 one (which autocast leaves alone) stays
        if emulated and isinstance(output, torch.Tensor) and (output.dtype == torch.float32 or output.dtype in _16_BIT):
            output = output.to(torch.float16)
            return output.float() if hand_up else output
        if hand_up:
            if type(output) is torch.Tensor:  # the usual result: cast without the pytree walk
                return _up_from_16_bit(output)
            return pytree.tree_map_only(torch.Tensor, _up_from_16_bit, output)
        return None

    def _hooks_on(self, module: nn.Module) -> bool:
        """Whether ``module``'s hooks act now (:meth:`_forward_state` is not None)."""
        return self._forward_state(module) is not None

    def _forward_state(self, module: nn.Module, autocast: tuple[bool, torch.dtype] | None = None) -> _Forward | None:
        """How ``module``'s hooks act: inside :meth:`context`, or recomputing a forward that ran inside it; None: idle.

        ``autocast`` is the state at the call, ``(enabled, dtype)``, where the caller has read it already (else read).

        ``torch.utils.checkpoint`` runs a segment's forward again during the backward, after ``context()`` has
        exited, under the autocast state it saved: with the hooks idle, an fp32 layer of a mixed map recomputed in
        the outer 16-bit region (a "recomputed values have different metadata" error, or with ``use_reentrant=True``
        silently other gradients). So each module's forward records whether its hooks acted, and a forward run by the
        backward (a recompute) does as it did: a forward outside the context, in plain fp32, is recomputed so, and one
        inside it under the user's own ``autocast(enabled=False)`` with the hooks on (deciding from the autocast state
        of the recompute got both wrong once). The map cannot have changed since the forward (decisions come after the
        update), but the context's path can have: a map set inside an open context turns it from a uniform map's idle
        hooks to the layers' own regions, and the recompute takes the path and outer type the forward took, which
        the record holds (taken from the map, a layer set to fp32 recomputed in the checkpoint's 16-bit region). The
        record is kept by the autocast state at the call, which a recompute restores: a forward of the
        same module run between the checkpointed one and its backward (an evaluation outside the context, under
        ``no_grad``) overwrote a record kept by module alone, and the recompute did as that one. Two forwards in one
        autocast state before the backward still share a record (the later one's).
        """
        now = _FORWARD_OF[self._mixed, self._outer_region_dtype] if self._active else None
        if torch.compiler.is_compiling():
            return now
        if autocast is None:
            autocast = torch.is_autocast_enabled(self.device_type), torch.get_autocast_dtype(self.device_type)
        key = (id(module), *autocast)
        if self._active or torch._C._current_graph_task_id() == -1:  # in the context, or a forward outside it
            self._forward_on[key] = now
            if now is None and key[1] and key[2] in _16_BIT and torch.is_grad_enabled():
                self.own_autocast_precision = _PRECISION_OF[key[2]]
            return now
        return self._forward_on.get(key)  # a recompute: as the forward ran in this autocast state

    def _ours(self, module: nn.Module, autocast: tuple[bool, torch.dtype]) -> torch.dtype | None:
        """The autocast type our code means at ``module``'s call (None: autocast off), as ``_model_block_dtype`` reads.

        ``autocast`` is the state at the call, ``(enabled, dtype)``: with the module, which of its calls a recompute is.

        The innermost region a layer of ours opened (a layer calling this one in its forward), else :meth:`context`'s.
        In a recompute (checkpointing runs a segment's forward again in the backward, after the context has exited)
        with no region of ours open, what it was at the forward: a layer checkpointed inside its parent layer's forward
        ran in the parent's region then, and taking the context's type instead read the parent's region as the
        model's block (the recompute's type differed from the forward's: a CheckpointError, or other gradients).
        """
        compiling = torch.compiler.is_compiling()
        if self._stack:
            ours = self._stack[-1].ours
        elif self._active or compiling:
            ours = self._outer_region_dtype
        else:
            recorded = self._forward_ours.get((id(module), *autocast))
            # Not recorded, or two calls of the forward in one autocast state meant different types (a layer shared
            # between the model's own block at the top and a parent layer's region): the context's type, as before.
            return self._outer_dtype() if recorded is None or recorded[1] is _AMBIGUOUS else recorded[1]
        if self._active and not compiling:
            key = (id(module), *autocast)
            earlier = self._forward_ours.get(key)
            clash = earlier is not None and earlier[0] == self._forwards and earlier[1] != ours
            self._forward_ours[key] = (self._forwards, _AMBIGUOUS if clash else ours)
        return ours

    def _model_block_dtype(self, ours: torch.dtype | None, autocast: tuple[bool, torch.dtype]) -> torch.dtype | None:
        """The type of a region the model's own code opened around this call; None where the autocast state is ours.

        ``ours`` is :meth:`_ours`, ``autocast`` the state at the call. Autocast off where ours is on is the model's
        ``torch.autocast(..., enabled=False)``: fp32. On with another type than ours, or where ours is off, is the
        model's ``torch.autocast(dtype=...)``: that type. A region of the model's of our own type cannot be told from
        ours: there the layer keeps its precision.
        """
        if self._stack and self._stack[-1].emulated:  # an emulated fp16 region of ours: autocast is off, fp16 is meant
            state: torch.dtype | None = torch.float16
        elif autocast[0]:
            state = autocast[1]
        else:
            state = None
        if state == ours:
            return None
        return torch.float32 if state is None else state

    def _in_other_context(self, autocast: tuple[bool, torch.dtype]) -> bool:
        """Whether the autocast state at a layer's call, ``(enabled, dtype)``, is another ``LayerPrecision``'s context.

        One opened inside ours and still open (a GAN's generator run under the discriminator's ``autocast()`` nested in
        its own): its region is no block of the model's code, and the layer computes in its type as in one, but is not
        recorded as such (recorded fp16, it gave a bf16 run a loss scaler for good, and a warning naming the layer). A
        block of the model's own code inside that context still is (the other one reads it as a block too).
        """
        contexts = _open.contexts
        inner = contexts[-1] if contexts else self
        if inner is self:
            return False
        return (
            inner._model_block_dtype(inner._stack[-1].ours if inner._stack else inner._outer_region_dtype, autocast)
            is None
        )

    def _note_model_block(self, index: int, dtype: torch.dtype) -> None:
        """Records that layer ``index`` computed in ``dtype`` in the model's own region; warns the first time."""
        seen = self._in_model_blocks.setdefault(index, [])
        if dtype in seen:
            return
        seen.append(dtype)
        _log.warning(
            "layer %r is called inside the model's own torch.autocast(%s) block: it computes in %s there, whatever "
            "precision is set for it (%s now); the controller's costs and observation still count that precision",
            self.layers[index].name,
            "enabled=False" if dtype == torch.float32 else f"dtype={dtype}",
            _PRECISION_OF[dtype].name,
            self.precisions[index].name,
        )

    def _facts(self) -> _MapFacts:
        """What the map implies (:class:`_MapFacts`), derived again only when the map or the device type changed.

        Compared by value (one tuple comparison, in C), so a map written in place is seen too. The rest of what the
        facts read (which layers are controllable, convolutions, of float64 parameters) is fixed at construction.
        """
        key = (tuple(self.precisions), self.device_type)
        if key != self._facts_key:
            precisions = key[0]
            low = {p for p in precisions if p is not _FP32}
            outer = (torch.bfloat16 if _BF16 in low else torch.float16) if low else None
            chosen = {precisions[i] for i in self._controllable_index}
            uniform = chosen.pop() if len(chosen) == 1 else None
            emulates = any(self._emulate(i) for i in self._controllable_index)
            self._facts_value = _MapFacts(outer, uniform, emulates)
            self._facts_key = key
        return self._facts_value

    def _outer_dtype(self) -> torch.dtype | None:
        """The dtype of :meth:`context`'s autocast region: bf16 if a layer is bf16, else fp16; None: all fp32."""
        return self._facts().outer

    def _uniform_fast_path_holds(self) -> bool:
        """Whether the open context's one region, with the layers' hooks idle, runs every layer as the map says."""
        facts = self._facts()
        return facts.uniform is not None and not facts.emulates_fp16 and facts.outer == self._outer_region_dtype

    @property
    def _emulates_fp16(self) -> bool:
        return self._facts().emulates_fp16

    def _emulate(self, index: int, precision: Precision | None = None) -> bool:
        """True when layer ``index`` computing in ``precision`` (its set one if None) is an fp16 CPU convolution.

        Such a layer is emulated: PyTorch's CPU fp16 convolution is a slow reference kernel (measured here: 8.4 s
        against 0.14 s a step in fp32 for cnn-fmnist). Inputs, weight, bias and outputs are rounded to fp16, and so are
        the gradients flowing back through each (so range overflow and rounding behave as on a GPU, whose tensor cores
        also accumulate in fp32). A convolution of float64 parameters is not: autocast leaves float64 alone, so it
        computes in float64 whatever its precision (emulated, its output was cast to fp16 and met the next float64
        layer: "Input type (float) and bias type (double) should be the same").
        """
        precision = self.precisions[index] if precision is None else precision
        return (
            self.device_type == "cpu"
            and precision is _FP16
            and self._is_conv[index]
            and index not in self._float64_layers
        )

    def _enter_fp32_module(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """Opens an fp32 region for a non-controllable module autocast would lower, casting its 16-bit inputs up.

        An RNN (hidden states too), or a module without children whose ops are unknown. Eager under
        ``torch.compile`` (a graph break), as a mixed map's layer regions are.
        """
        # On wherever the map holds a 16-bit layer (whose outputs it may get, in the model's autocast(enabled=False)
        # block too: cast up), and wherever autocast is on under an all-fp32 map (a region the model's own code opened:
        # the module computed in its 16 bits there, and in fp32 under any other map).
        if not self._hooks_on(module):
            return None
        # The autocast state first: all_fp32 compares the whole map (a loop over the layers, at each module's call)
        if not torch.is_autocast_enabled(self.device_type) and self.all_fp32:
            return None
        # Whenever Dynamo is loaded, not only while this frame is traced: after a graph break (an RNN's call, which
        # Dynamo runs eagerly, or another region) Dynamo may compile a hook's frames on their own, as new frames; a
        # region entered in such a frame was traced, and its __exit__ found no state ("'autocast' object has no
        # attribute 'prev'": a compiled model with an RNN failed under any 16-bit map).
        enter = self._eager_regions[2] if self._eager_regions else self._open_fp32_region
        return enter(module, args, kwargs)

    def _open_fp32_region(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """``_enter_fp32_module``'s region and casts, run eagerly under ``torch.compile`` (as ``_enter_region``)."""
        region = torch.autocast(self.device_type, enabled=False, cache_enabled=self._cache_enabled)
        region.__enter__()
        self._stack.append(_Region(module, region, False, None, False))
        return _map_tensors((args, kwargs), _up_from_16_bit)

    def _exit_fp32_module(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self._stack and self._stack[-1].module is module:  # its own region (as _post_hook decides)
            (self._eager_regions[3] if self._eager_regions else self._close_fp32_region)(module)

    def _close_fp32_region(self, module: nn.Module) -> None:
        """Closes ``module``'s fp32 region if it is the innermost (its pre-hook may have opened none)."""
        if self._stack[-1].module is module:
            self._stack.pop().region.__exit__(None, None, None)

    def _fp32_inputs_hook(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """A non-controllable layer's 16-bit inputs, cast up to fp32 (its parameters' type); float64 ones stay.

        Through ``_map_tensors``, as the layers' own hooks: nested inputs too, and a tensor passed several times
        (``block(h, h, h)``) cast once (cast once an argument, ``q is k`` no longer held inside).

        Under an all-fp32 map with autocast off, a 16-bit input is the model's own (a frozen bf16 backbone's): cast up,
        it met the backbone's next bf16 layer in fp32 and raised (a trainable norm's, or a module with children's
        around the backbone: a prompt or layer scale of its own).

        The usual call inside the context, one fp32 tensor (every norm's under an fp32 or a mixed map), returns at once
        (the bookkeeping cost 3 us a norm's call): whatever the hooks' state, such an input is given back as it is, so
        there is nothing to decide, nor to record for a recompute, whose input is the forward's again.
        """
        if (
            self._active
            and not kwargs
            and len(args) == 1
            and type(args[0]) is torch.Tensor
            and args[0].dtype not in _16_BIT
        ):
            return None
        if not self._hooks_on(module):
            return None
        # The autocast state first: all_fp32 compares the whole map (a loop over the layers, at each module's call)
        if not torch.is_autocast_enabled(self.device_type) and self.all_fp32:
            return None
        return _map_tensors((args, kwargs), _up_from_16_bit)  # a tensor passed several times cast once


class _MapFacts(NamedTuple):
    """What a precision map implies for :meth:`LayerPrecision.context` and the hooks (``LayerPrecision._facts``)."""

    outer: torch.dtype | None  # the context's region: bf16 if a layer is bf16, else fp16; None: every layer fp32
    uniform: Precision | None  # the precision shared by every controllable layer; None when they differ
    emulates_fp16: bool  # a controllable layer is an emulated fp16 CPU convolution (see LayerPrecision._emulate)


class _Forward(NamedTuple):
    """How the hooks acted at a layer's forward in :meth:`LayerPrecision.context` (a recompute acts the same)."""

    mixed: bool  # each layer in a region of its own (else the context's one region, the layers' hooks idle)
    outer: torch.dtype | None  # the type of the context's region (None: fp32)


class _Region(NamedTuple):
    """An autocast region a module's pre-hook opened, closed by its post-hook."""

    module: nn.Module
    region: contextlib.AbstractContextManager[Any]
    emulated: bool  # an emulated fp16 CPU convolution (autocast off, inputs and parameters rounded through fp16)
    ours: torch.dtype | None  # the autocast type our code means inside it (None: off); see _ours
    hand_up: bool  # the module's 16-bit outputs are cast to fp32 on leaving (see _enter_region)


WeightCopies = Callable[[int, torch.dtype], Sequence[tuple[nn.Module, str, torch.Tensor]]]
"""``(layer, dtype) -> [(owner module, parameter name, 16-bit copy)]`` (see ``LayerPrecision.use_weight_copies``)."""


class _ReadCopy(torch.autograd.Function):
    """Forward: the precomputed 16-bit copy of a parameter. Backward: the gradient cast to the parameter's dtype."""

    @staticmethod
    def forward(ctx: Any, param: torch.Tensor, copy: torch.Tensor) -> torch.Tensor:
        ctx.param_dtype = param.dtype
        return copy.view_as(copy)  # a view: autograd must not treat the copy buffer itself as the output

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.to(ctx.param_dtype), None  # what autocast's cast gives its fp32 weight


def read_copy(param: torch.Tensor, copy: torch.Tensor) -> torch.Tensor:
    """``copy`` in the forward, with gradients flowing to ``param`` as through ``param.to(copy.dtype)``.

    Example:
        >>> w = nn.Parameter(torch.tensor([1.0, 2.0]))
        >>> out = read_copy(w, w.detach().to(torch.bfloat16))
        >>> out.dtype
        torch.bfloat16
        >>> out.float().sum().backward()
        >>> w.grad.tolist(), w.grad.dtype
        ([1.0, 1.0], torch.float32)
    """
    return _ReadCopy.apply(param, copy)


def _swap_in(
    copies: Sequence[tuple[nn.Module, str, torch.Tensor]],
    registered: Sequence[tuple[nn.Module, str, nn.Parameter | None]],
) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """Replaces each parameter by ``read_copy`` of its copy for one forward; returns what to restore.

    Only where the owner holds the parameter ``registered`` there (the one the copy was made from): under
    ``torch.func.functional_call`` it holds the caller's tensor, which autocast casts (the copy gave the model's own
    weights' output for any weights given).
    """
    saved = []
    for owner, name, copy in copies:
        param = owner._parameters[name]
        assert param is not None
        if param is not _registered_at(owner, name, registered):
            continue
        saved.append((owner, name, param))
        # Direct dict assignment (as torch.nn.utils.stateless does): register_parameter would refuse a
        # non-leaf tensor, and the module's own code reads ``self.<name>`` through ``_parameters``.
        owner._parameters[name] = read_copy(param, copy)  # type: ignore[assignment]
    return saved


def _swap_in_rounded(module: nn.Module) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """Replaces ``module``'s own parameters by ``_round_through_fp16`` of them for one forward, as ``_swap_in`` does.

    An emulated fp16 convolution's weight and bias as autocast's cast gives them: rounded to fp16, and their gradients,
    computed in fp32, rounded to fp16 on the way back (overflowing to inf, underflowing to zero), which the loss
    scaler then sees. Whatever tensor the module holds (a caller's under ``torch.func.functional_call`` too): autocast
    casts that one.
    """
    saved = []
    for name, param in module._parameters.items():
        if param is not None:
            saved.append((module, name, param))
            module._parameters[name] = _round_through_fp16(param)  # type: ignore[assignment]
    return saved


def _registered_at(
    owner: nn.Module, name: str, registered: Sequence[tuple[nn.Module, str, nn.Parameter | None]]
) -> nn.Parameter | None:
    """The parameter ``registered`` lists at ``owner``'s ``name`` (a plain loop: ``torch.compile`` traces it)."""
    for where, named, param in registered:
        if where is owner and named == name:
            return param
    return None


def _restore(saved: list[tuple[nn.Module, str, nn.Parameter]]) -> None:
    for owner, name, param in saved:
        owner._parameters[name] = param


_16_BIT = (torch.float16, torch.bfloat16)
_FP32, _BF16, _FP16 = Precision.FP32, Precision.BF16, Precision.FP16  # read in loops: a global, not a class attribute
_AMBIGUOUS = object()  # a call key whose forward calls meant different types (``LayerPrecision._ours``)
_PRECISION_OF = {precision.dtype: precision for precision in Precision}  # the precision a torch dtype computes in
# Every _Forward a context can be in, built once: a NamedTuple built at each layer call cost 0.3 us of the hooks' time
_FORWARD_OF = {(mixed, outer): _Forward(mixed, outer) for mixed in (False, True) for outer in (None, *_16_BIT)}


class _OpenContexts(threading.local):
    """The LayerPrecisions whose context() this thread has open, innermost last (``LayerPrecision._in_other_context``).

    Per thread as autocast's state is: a context another thread opened is no region around this thread's layers (one
    list for the process read it as one, and a layer in the model's own block went unrecorded).
    """

    def __init__(self) -> None:
        self.contexts: list[LayerPrecision] = []  # run in each thread at its first read of ``_open``


_open = _OpenContexts()


@functools.cache
def _warn_own_operations_in_region_around(model_type: str, names: tuple[str, ...]) -> None:
    """Says that the modules ``names`` report fp32 while their own operations run in the region around them.

    Each is a module with children and a trainable weight matrix (2-D) of its own, no layer type the controller sets
    (a hand-written LoRA adapter around a frozen nn.Linear, a root multiplying by a matrix of its own). A region of its
    own would hold its children in fp32 too, so it has none; the map keeps fp32 for it, as for every non-controllable
    layer: what its operations run in differs by operation and by call, which no one precision says. Cached: said once
    a process for a model type, not at every run built on it (each episode's, training a policy on a transformer task).
    """
    _log.warning(
        "modules %s of %s hold trainable weight matrices of their own beside child modules and are no layer type "
        "the controller sets: they are listed as fp32, but their own operations run in the region around them, so "
        "under a 16-bit map inside ctl.autocast() a matmul on those matrices (a hand-written LoRA adapter's x @ A.T) "
        "computes in 16 bits. For fp32 there, wrap those operations in torch.autocast(device_type, enabled=False) in "
        "the forward, or hold the weights in nn.Linear layers, whose precision the controller sets",
        list(names),
        model_type,
    )


def _refuse_16_bit_parameters(model: nn.Module) -> None:
    """Raises a ValueError naming the trainable parameters held in bf16 or fp16 (``model.bfloat16()``, ``.half()``).

    The layers' fp32 regions cast their inputs to fp32, which such a weight does not meet: every forward failed deep
    in a norm or a matmul ("mat1 and mat2 must have the same dtype"), under an all-fp32 map too.
    """
    low = [(name, p.dtype) for name, p in model.named_parameters() if p.requires_grad and p.dtype in _16_BIT]
    if low:
        raise ValueError(
            f"parameters {[name for name, _ in low][:3]} are {low[0][1]} (of {len(low)} in 16 bits): the controller "
            "trains weights kept in fp32 (or float64) and sets the precision each layer computes in itself; build the "
            "model in fp32 (leave out model.bfloat16() / model.half()) and let the policy choose bf16 or fp16"
        )


def _refuse_script_modules(model: nn.Module) -> None:
    """Raises a ValueError naming the TorchScript submodules (``torch.jit.script(...)``), which take no Python hooks.

    Their ``register_forward_pre_hook`` raised ("not supported on ScriptModules") naming none of them, after the hooks
    of the layers before had gone in: a refused Controller left those on the model.
    """
    scripted = [
        name or "the model" for name, module in model.named_modules() if isinstance(module, torch.jit.ScriptModule)
    ]
    if scripted:
        raise ValueError(
            f"modules {scripted[:3]} (of {len(scripted)}) are TorchScript (torch.jit.script or trace), which takes no "
            "forward hooks, and the controller sets each layer's precision through its hooks: give the Python modules"
        )


def _refuse_frozen_controllable_types(model: nn.Module, layers: Sequence[LayerInfo]) -> None:
    """Raises a ValueError naming the frozen Linear, Conv and attention modules when no trainable one is left.

    Such a model (a norm-only fine-tune) has no layer whose precision the controller sets; refused later for having no
    controllable layer, it was told its matmuls ran outside nn.Linear, to be moved into one: they were in nn.Linear.
    Where trainable parameters other than a norm's or an embedding's are left (a LoRA adapter written as ``x @ A @ B``
    beside frozen nn.Linear layers), the message names a few and says to compute their matmuls through nn.Linear.
    """
    if any(info.controllable for info in layers):
        return
    frozen: list[tuple[str, str]] = []  # (name, controllable type) of each module whose parameters are all frozen
    inside_attention: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in inside_attention or not isinstance(module, CONTROLLABLE_TYPES):
            continue
        if isinstance(module, nn.MultiheadAttention):  # one layer with its out_proj, as in find_layers
            inside_attention.update(id(m) for m in module.modules() if m is not module)
            params = list(module.parameters())
        else:
            params = list(module.parameters(recurse=False))
        if params and not any(p.requires_grad for p in params):
            base = next(base for base in CONTROLLABLE_TYPES if isinstance(module, base))  # a subclass: its nn type
            frozen.append((name or "<root>", f"nn.{base.__name__}"))
    if not frozen:  # none of these types at all: the grouper's refusal says where the matmuls must go
        return
    shown = ", ".join(repr(name) for name, _ in frozen[:3]) + (", ..." if len(frozen) > 3 else "")
    kinds = ", ".join(dict.fromkeys(kind for _, kind in frozen))
    subject = f"the layer [{shown}] ({kinds}) is" if len(frozen) == 1 else f"the layers [{shown}] ({kinds}) are"
    message = (
        f"{subject} frozen: the controller sets the precision of trainable nn.Linear, Conv and MultiheadAttention "
        "layers only; leave one trainable or train without the controller"
    )
    # Trainable parameters outside such layers may be matmul weights of the model's own, which only an nn.Linear
    # holding them makes a layer the controller sets. A norm's scale and shift and an embedding's table are not.
    no_matmul = _FP32_UNDER_AUTOCAST_TYPES + _NATIVE_MIXED_TYPES
    loose: list[str] = []
    seen: set[int] = set()  # a parameter tied into several modules is named once
    for prefix, module in model.named_modules():
        if isinstance(module, no_matmul):
            continue
        for name, param in module.named_parameters(recurse=False):
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                loose.append(f"{prefix}.{name}" if prefix else name)
    if loose:
        named = ", ".join(repr(name) for name in loose[:3]) + (", ..." if len(loose) > 3 else "")
        message += (
            f". The trainable parameters [{named}] are outside such layers: if your forward multiplies by them "
            "(x @ A, a LoRA adapter written by hand), compute those matmuls through nn.Linear layers holding them, "
            "whose precision the controller sets"
        )
    raise ValueError(message)


def _up_from_16_bit(tensor: torch.Tensor) -> torch.Tensor:
    """A 16-bit tensor cast up to fp32; any other (fp32, float64, integer) as it is."""
    return tensor.float() if tensor.dtype in _16_BIT else tensor


def _round_through_fp16(tensor: torch.Tensor) -> torch.Tensor:
    """What an emulated fp16 layer computes on: fp32 and 16-bit values rounded to fp16, in fp32; others as they are.

    As autocast, which casts fp32 and bf16 inputs of an fp16 op and leaves float64 alone.
    """
    if tensor.dtype in _16_BIT or tensor.dtype == torch.float32:
        return tensor.to(torch.float16).float()
    return tensor


def _release_if_alive(precision: weakref.ref[LayerPrecision]) -> None:
    """Releases the hooks of ``precision`` where it still lives (``LayerPrecision.release_when_collected``)."""
    alive = precision()
    if alive is not None:
        alive._release()


def _acts_for_open_one(hook: Callable[..., Any]) -> bool:
    """Whether ``hook`` is a ``LayerPrecision``'s that is not released (:func:`_pickled_hooks.named` names them all).

    Released: removed, or its engine garbage-collected without removing it (``LayerPrecision.release_when_collected``).
    """
    return getattr(hook, "__module__", None) == _pickled_hooks.__name__ and not _pickled_hooks.released(hook)


def _drop_released_hooks(module: nn.Module) -> None:
    """Takes ``module``'s released hooks (``_pickled_hooks.released``: their ``LayerPrecision`` removed) off it.

    Called by a released pre-hook, before torch runs the forward hooks: torch calls the pre-hooks from a snapshot of
    their dict, but, when the forward raised, iterates the forward hooks' own dict, which a forward hook must not change
    ("mutated during iteration"). Left in a graph ``torch.compile`` traces (its guards read the hooks): dropped at the
    next eager call. And on every module of a model a ``LayerPrecision`` is installed on, before its own hooks.
    """
    if torch.compiler.is_compiling():
        return
    for hooks, flags in (
        (module._forward_pre_hooks, (module._forward_pre_hooks_with_kwargs,)),
        (module._forward_hooks, (module._forward_hooks_with_kwargs, module._forward_hooks_always_called)),
    ):
        for key in [key for key, hook in hooks.items() if _pickled_hooks.released(hook)]:
            del hooks[key]
            for flag in flags:
                flag.pop(key, None)


def _map_tensors(
    inputs: tuple[tuple[Any, ...], dict[str, Any]], fn: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """``fn`` applied to every tensor in a forward's ``(args, kwargs)``, nested ones (an LSTM's ``(h, c)``) too.

    A tensor passed more than once (self-attention's ``attn(h, h, h)``, an LSTM's ``(h, h)``) is mapped once: three
    casts sent three 16-bit gradients back, summed in 16 bits (24% more gradient error against float64 in review), and
    ``query is key`` no longer held, which attention's packed projection and fast path test for.

    Inputs that are plain tensors only, passed by position (a norm's ``(x,)``: every norm's call under a 16-bit map),
    are mapped directly, without the pytree walk (about 20 us a call); None, which a forward pre-hook reads as the
    inputs unchanged, where ``fn`` returned each of them as it is.
    """
    args, kwargs = inputs
    if not kwargs and len(args) == 1 and type(args[0]) is torch.Tensor:  # one tensor: the walk below cost 2 us
        result = fn(args[0])
        return None if result is args[0] else ((result,), kwargs)
    if not kwargs and all(type(arg) is torch.Tensor for arg in args):
        mapped: list[torch.Tensor] = []
        for arg in args:
            earlier = [done for seen, done in zip(args, mapped, strict=False) if seen is arg]  # passed before: as then
            mapped.append(earlier[0] if earlier else fn(arg))
        if all(result is arg for result, arg in zip(mapped, args, strict=True)):
            return None
        return tuple(mapped), kwargs
    done: list[tuple[torch.Tensor, torch.Tensor]] = []

    def once(tensor: torch.Tensor) -> torch.Tensor:
        for seen, mapped in done:
            if seen is tensor:
                return mapped
        mapped = fn(tensor)
        done.append((tensor, mapped))
        return mapped

    return pytree.tree_map_only(torch.Tensor, once, inputs)


def _guard_compiled_graphs_on_hooks() -> None:
    """Makes ``torch.compile``'s graphs guard on module hooks, and drops those traced without such guards.

    By default Dynamo does not guard on a module's hooks (``torch._dynamo.config.skip_nnmodule_hook_guards``): a graph
    traced on a module without the per-layer hooks (the model compiled and run once before the controller was built,
    or another instance of its class, such as an EMA copy compiled beside it) passes its guards on the hooked model and
    ignores the per-layer precisions (a mixed map runs every layer in the outer 16-bit type), and a graph
    traced with the hooks would run them on the other instance. With the guards on, each traces its own graph. The
    switch is process-wide and stays on (stricter guards, a few checks a call); graphs traced before it are dropped
    once (retraced at their next call). Idempotent; called where hooks are installed and, should Dynamo be loaded
    only later, at the first ``context()`` after that.
    """
    if "torch._dynamo" not in sys.modules:  # nothing compiled in this process yet: the first context() comes back
        return
    config = torch._dynamo.config
    if not config.skip_nnmodule_hook_guards:
        return
    config.skip_nnmodule_hook_guards = False
    _log.info("per-layer precision hooks: torch.compile now guards on module hooks; earlier graphs will be retraced")
    torch._dynamo.reset()

"""The cost model: per-layer FLOPs and activation bytes, modelled step time, and memory accounting.

Used wherever the machine's own clock or allocator cannot say what a step costs on the target GPU: on
CPUs (development, CI, offline policy training) and for predicting memory before a batch is tried.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import math
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields, is_dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch import nn

from triaccel_rl.config import HardwareProfile
from triaccel_rl.precision import layer_parameters
from triaccel_rl.signals.estimators import forked_rngs
from triaccel_rl.types import LayerInfo, Precision

__all__ = [
    "CostModel",
    "buffer_bytes",
    "frozen_parameter_bytes",
    "optimizer_state_tensors",
    "owned_param_counts",
    "saved_bytes_per_sample",
]

log = logging.getLogger(__name__)
_T = TypeVar("_T")
# torch's hook dicts in every module: set aside and bound again by _untouched, their contents left as they are
_HOOK_DICTS = frozenset(name for name in vars(nn.Module()) if "hook" in name)


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> int:
    """The parameter-sized state tensors ``optimizer`` keeps per parameter, read from its settings.

    SGD: 1 with momentum, else 0; Adam and AdamW: 2, 3 with ``amsgrad``; RMSprop: 1, plus 1 with momentum and 1 when
    ``centered``; Adadelta, Adamax, NAdam, RAdam, Rprop: 2; Adagrad, ASGD: 1. The most of any parameter group.
    Another class: 2 if its name holds "adam", else 1 (the guess this replaced, which counted 1 for plain SGD and
    for RMSprop with momentum, and 2 for AMSGrad). Scalar state (a step count) is not counted.

    Example:
        >>> w = [nn.Parameter(torch.zeros(2))]
        >>> optimizer_state_tensors(torch.optim.SGD(w, lr=0.1)), optimizer_state_tensors(torch.optim.AdamW(w))
        (0, 2)
    """
    optim = torch.optim

    def per_group(group: dict) -> int:
        if isinstance(optimizer, optim.SGD):
            return int(group.get("momentum", 0) != 0)
        if isinstance(optimizer, (optim.Adam, optim.AdamW)):
            return 3 if group.get("amsgrad", False) else 2
        if isinstance(optimizer, optim.RMSprop):
            return 1 + int(group.get("momentum", 0) != 0) + int(bool(group.get("centered", False)))
        if isinstance(optimizer, (optim.Adadelta, optim.Adamax, optim.NAdam, optim.RAdam, optim.Rprop)):
            return 2
        if isinstance(optimizer, (optim.Adagrad, optim.ASGD)):
            return 1
        return 2 if "adam" in type(optimizer).__name__.lower() else 1

    return max((per_group(group) for group in optimizer.param_groups), default=0)


@dataclass(frozen=True)
class CostModel:
    """What a model's step costs, per sample and per layer.

    Attributes:
        layers: the model's layers.
        flops_per_sample: forward FLOPs of each layer for one sample, ``[n_layers]``.
        activation_bytes_per_sample: fp32 bytes autograd keeps for the backward pass, per sample, ``[n_layers]``
            (:func:`saved_bytes_per_sample`): what each layer's forward saves, and what the operations without
            parameters after it save (an activation, a squeeze-excitation product, attention probabilities). Each
            layer's output bytes where that forward could not run.
        static_bytes: weights + gradients + optimizer state, all fp32, in bytes.
        param_counts: the parameters each layer owns (``layer_parameters``: a weight tied between layers counted once,
            in the first), ``[n_layers]``; ``static_bytes`` and the 16-bit copies count these. Each layer's
            ``n_params`` where not given.
        frozen_bytes: the bytes of the parameters no layer trains (``requires_grad=False``: a frozen backbone), as
            stored; they have no gradient or optimizer state. Counted in :meth:`fixed_bytes`. Their layers' FLOPs and
            activations are not modelled.
        buffer_bytes: the bytes of the model's buffers (:func:`buffer_bytes`: running statistics, a causal mask, a
            positional table), each storage once, as stored. Counted in :meth:`fixed_bytes`.

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> from triaccel_rl.precision import find_layers
        >>> layers = [info for _, _, info in find_layers(model)]
        >>> costs = CostModel.measure(model, layers, torch.zeros(1, 4), optimizer_states=1)
        >>> costs.flops_per_sample.tolist()
        [24.0]
    """

    layers: tuple[LayerInfo, ...]
    flops_per_sample: np.ndarray
    activation_bytes_per_sample: np.ndarray
    static_bytes: int
    param_counts: tuple[int, ...] | None = None
    frozen_bytes: int = 0
    buffer_bytes: int = 0

    @property
    def owned_params(self) -> tuple[int, ...]:
        """``param_counts``, or each layer's ``n_params`` where they were not given."""
        return self.param_counts if self.param_counts is not None else tuple(info.n_params for info in self.layers)

    @classmethod
    @torch.no_grad()
    def measure(
        cls, model: nn.Module, layers: list[LayerInfo], sample: torch.Tensor, optimizer_states: int
    ) -> CostModel:
        """Counts FLOPs with one fp32 forward of ``sample`` (one sample), and the bytes saved for the backward pass.

        Activation bytes are :func:`saved_bytes_per_sample`'s (each layer's output bytes where a batch cannot run).

        The forwards leave no trace (:func:`_untouched`): the random number generators (torch's, Python's and NumPy's
        global one), every module's mode, buffers and plain attributes (the contents of its lists and dicts, and what it
        registers, among them) are as they were, and the user's forward hooks do not run in them (pre-hooks do), so a
        training run that measures its costs first draws and computes exactly as one that does not.

        A compiled model (``torch.compile``) runs its original module, whose layers' hooks fire: a compiled graph it
        had already run on one sample in eval mode ran none, and every layer counted 0 FLOPs.

        Args:
            model: the model.
            layers: its layers (``find_layers``).
            sample: one input sample with its batch dimension (``[1, ...]``).
            optimizer_states: fp32 state tensors per parameter (:func:`optimizer_state_tensors`: SGD with momentum 1,
                Adam 2).
        """
        flops = np.zeros(len(layers))
        out_bytes = np.zeros(len(layers))
        modules = dict(model.named_modules())
        handles = []
        for index, info in enumerate(layers):
            module = modules.get(info.name, model)

            def hook(module: nn.Module, args: tuple, kwargs: dict, output: object, index: int = index) -> None:
                # The forward is of one sample: the whole output is its. (Slicing out[:1] took one position of a
                # sequence-first output, [length, 1, ...], and undercounted it by the sequence's length.)
                out = output[0] if isinstance(output, tuple) else output
                if isinstance(out, torch.Tensor):
                    out_bytes[index] += out.numel() * 4
                    flops[index] += _forward_flops(module, args, kwargs, out)

            handles.append(module.register_forward_hook(hook, with_kwargs=True))

        runner = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: its graph runs no module's hooks

        def count(user_hooks: bool) -> None:
            flops[:], out_bytes[:] = 0.0, 0.0  # a first try that raised half way counted some layers
            with _untouched(model, sample.device, user_hooks=user_hooks), warnings.catch_warnings():
                # Under no_grad a reentrant torch.utils.checkpoint says its gradients will be None: true of this
                # measuring forward only, and read as a fault in the user's training (it is not).
                warnings.filterwarnings("ignore", "None of the inputs have requires_grad=True", UserWarning)
                model.eval()
                runner(sample[:1])

        try:
            _user_hooks_if_needed(model, count)
        finally:
            for handle in handles:
                handle.remove()
        kept = saved_bytes_per_sample(model, layers, sample)
        owned = owned_param_counts(model, layers)
        static = cls.parameters_only(layers, optimizer_states, owned).static_bytes
        activations = kept if kept is not None else out_bytes
        return cls(tuple(layers), flops, activations, static, owned, frozen_parameter_bytes(model), buffer_bytes(model))

    @classmethod
    def parameters_only(
        cls, layers: list[LayerInfo], optimizer_states: int, param_counts: Sequence[int] | None = None
    ) -> CostModel:
        """A cost model that knows the parameters and optimizer state alone: no FLOPs, no activations.

        For a model whose forward cannot run on one sample by itself (``measure``); memory predictions then leave
        out the activations until measured peaks replace them (on a GPU). ``param_counts``: as the attribute.
        """
        counts = tuple(int(n) for n in param_counts) if param_counts is not None else None
        model = cls(tuple(layers), np.zeros(len(layers)), np.zeros(len(layers)), 0, counts)
        static = sum(model.owned_params) * 4 * (2 + optimizer_states)
        return cls(tuple(layers), np.zeros(len(layers)), np.zeros(len(layers)), static, counts)

    def step_ms(
        self, batch_size: int, precisions: list[Precision], profile: HardwareProfile, include_fixed: bool = True
    ) -> float:
        """Modelled time of one training step on the profiled GPU, in ms.

        A step costs about three forward passes (the forward, and two matmuls per layer backward), each
        layer at its precision's time factor, plus the profile's fixed per-step time when asked.
        """
        factors = np.array([profile.time(p) for p in self._check_precisions(precisions)])
        mflops = 3.0 * float(np.dot(self.flops_per_sample, factors)) / 1e6
        ms = batch_size * mflops * profile.throughput_scale
        return ms + profile.fixed_ms if include_fixed else ms

    def memory_bytes(self, batch_size: int, precisions: list[Precision], profile: HardwareProfile) -> int:
        """Accounted peak memory, in bytes: the batch-independent bytes and the batch's activations.

        Static + frozen weights + buffers + 16-bit weight copies + activations (at precision factors). Equals
        ``fixed_bytes(precisions) + batch_size * per_sample_bytes(precisions, profile)``.
        """
        return int(self.fixed_bytes(precisions) + batch_size * self.per_sample_bytes(precisions, profile))

    def fixed_bytes(self, precisions: list[Precision]) -> int:
        """Accounted memory independent of the batch, in bytes: static + frozen weights + buffers + 16-bit copies."""
        copies = sum(
            n * 2 for n, p in zip(self.owned_params, self._check_precisions(precisions), strict=True) if p.bits == 16
        )
        return int(self.static_bytes + self.frozen_bytes + self.buffer_bytes + copies)

    def per_sample_bytes(self, precisions: list[Precision], profile: HardwareProfile) -> float:
        """Accounted activation memory of one sample at ``precisions``, in bytes (the profile's factors)."""
        factors = np.array([profile.memory(p) for p in self._check_precisions(precisions)])
        return float(np.dot(self.activation_bytes_per_sample, factors))

    def _check_precisions(self, precisions: list[Precision]) -> list[Precision]:
        """Refuse a precision list of another length than the layers (numpy's error named neither)."""
        if len(precisions) != len(self.layers):
            raise ValueError(f"got {len(precisions)} precisions for a cost model of {len(self.layers)} layers")
        return precisions


def _forward_flops(module: nn.Module, args: tuple, kwargs: dict, out: torch.Tensor) -> float:
    """Multiply-add FLOPs (×2) of one sample through ``module``, from its inputs and output; other layers count outputs.

    Biases, normalisation and softmax are not counted. A convolution's output element takes ``prod(kernel) *
    in_channels / groups`` multiply-adds; a transposed convolution's *input* element scatters into ``prod(kernel)
    * out_channels / groups`` (its output elements take a stride-dependent share of that, so the output alone
    cannot count it). Attention: the four projections (query and output on the ``L`` query tokens, key and value
    on the ``S`` key tokens, from ``kdim`` and ``vdim``) and the two ``L x S`` products, scores and weighted sum.
    Recurrent layers (RNN, LSTM, GRU): each gate's input and hidden matmuls at every time step, layer and direction,
    plus an LSTM's projection (``proj_size``); a packed sequence's output is not a tensor and is not counted.
    """
    if isinstance(module, nn.Linear):
        return 2.0 * module.in_features * out.numel()
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        scatter = math.prod(module.kernel_size) * module.out_channels // module.groups
        return 2.0 * scatter * _input(args, kwargs, 0, "input").numel()
    if isinstance(module, nn.modules.conv._ConvNd):
        kernel = math.prod(module.kernel_size) * module.in_channels // module.groups
        return 2.0 * kernel * out.numel()
    if isinstance(module, nn.RNNBase):
        return _recurrent_flops(module, out)
    if isinstance(module, nn.MultiheadAttention):
        embed = module.embed_dim
        queries = out.numel() // embed  # one sample's tokens, whichever dimension holds them
        keys = _input(args, kwargs, 1, "key").numel() // module.kdim
        projections = 2.0 * embed * (2 * queries * embed + keys * module.kdim + keys * module.vdim)
        return projections + 2.0 * 2 * queries * keys * embed
    return float(out.numel())


def saved_bytes_per_sample(model: nn.Module, layers: Sequence[LayerInfo], sample: torch.Tensor) -> np.ndarray | None:
    """The bytes a training step holds for its backward pass, per sample, attributed to layers; None if none ran.

    Runs forwards with gradients of 2 and 4 copies of ``sample[:1]`` under ``saved_tensors_hooks``, and takes half the
    difference, so what does not grow with the batch (a fixed mask, attention dropout's random seed) drops out. The
    forwards run in eval mode but for dropout modules and attention, in training mode as in a training step
    (:func:`_measuring_modes`): a training-mode dropout returns a new tensor, which the layer after it saves, and keeps
    its mask (a float32 one on the CPU, a 1-byte one from the CUDA kernel); an eval-mode one returns its input, counted
    already (an MLP with ``Dropout(0.5)`` and a ``TransformerEncoderLayer`` at its default dropout 0.1 were counted
    at 0.35x and 0.40x of what their training steps hold). The draws change no byte count, and the generators are
    forked (:func:`_untouched`). Stochastic depth and dropout called as a function in a module's own forward follow
    that module's mode, eval, and are not counted.

    Counted: the storages of the tensors saved for the backward pass that are still held when the forward returns (a
    branch computed and dropped inside the forward is not), each once and at its own dtype (the run is fp32; int64
    pooling indices count 8 bytes an element), and the output's (the logits, which the loss then needs). Parameters
    and buffers are batch-independent bytes (:meth:`CostModel.fixed_bytes`), not counted.

    A saved tensor counts in the layer whose forward was entered last when it was saved: operations without parameters
    between layers (a ``SiLU``, a squeeze-excitation product, ``softmax`` in attention) go to the layer before them,
    whose precision their input has; the output goes to the last layer entered. A batch norm that runs after another
    layer is passed over (it computes on its input's 16 bits and returns them, though it reports fp32:
    ``triaccel_rl.precision``), so what it and the operations after it save counts in the layer that ran before it
    too, in the order the layers run, whatever order they were registered in; one that runs first (on the model's own
    fp32 input) counts its own. A ``torch.compile``d model runs its original module, whose layers' hooks fire.
    Counting each layer's output instead came to 0.53-0.68x of this on EfficientNet-B0, the depthwise CNNs and the
    Transformers.

    Leaves no trace (:func:`_untouched`); runs outside inference mode, as a training step does.

    Example:
        >>> from triaccel_rl.precision import find_layers
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> layers = [info for _, _, info in find_layers(net)]
        >>> saved_bytes_per_sample(net, layers, torch.zeros(1, 4)).tolist()  # input (4), ReLU's output (8); logits (2)
        [48.0, 8.0]
    """
    totals = []
    for copies in (2, 4):
        try:
            measured = functools.partial(_saved_bytes, model, layers, sample[:1], copies)
            totals.append(_user_hooks_if_needed(model, measured))
        except Exception as error:  # any model's own failure: fall back to output bytes
            log.warning(
                "the cost model counts each layer's output as its activation memory (an undercount where operations "
                "without parameters save tensors): a forward of %d samples raised %r",
                copies,
                error,
            )
            return None
    return (totals[1] - totals[0]) / 2.0


def _saved_bytes(
    model: nn.Module, layers: Sequence[LayerInfo], sample: torch.Tensor, copies: int, user_hooks: bool = False
) -> np.ndarray:
    """Bytes saved for the backward pass and held at the end of one forward of ``copies`` samples, by layer.

    ``user_hooks``: whether the user's forward hooks run (:func:`_untouched`).
    """
    static = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    modules = dict(model.named_modules())
    saved: list[tuple[weakref.ref[torch.Tensor], int]] = []
    current = [0]
    other_than_batch_norm_ran = [False]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        # The graph holds this alias only (no backward runs): it dies with its node. Holding the tensor itself, a
        # node that saves its own output (sigmoid, ReLU) formed a cycle, which kept a dropped branch alive.
        alias = tensor.detach()
        saved.append((weakref.ref(alias), current[0]))
        return alias

    def entering(index: int, batch_norm: bool) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple) -> None:
            # Batch norm takes 16-bit inputs as they come and returns their type (precision.py): once another layer has
            # run, what it and the operations after it save has the precision of the layer before it, not the fp32 it
            # reports. Decided in the order the layers run: by registration order (a batch norm registered before the
            # conv that feeds it), the same computation was counted in the norm or in the conv.
            if batch_norm and other_than_batch_norm_ran[0]:
                return
            current[0] = index
            other_than_batch_norm_ran[0] |= not batch_norm

        return hook

    handles = []
    for i, info in enumerate(layers):
        module = modules.get(info.name, model)
        handles.append(
            module.register_forward_pre_hook(entering(i, isinstance(module, nn.modules.batchnorm._BatchNorm)))
        )
    runner = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: its graph runs no module's hooks
    per_layer = np.zeros(len(layers))
    try:
        with torch.inference_mode(False), _untouched(model, sample.device, user_hooks), torch.enable_grad():
            _measuring_modes(model)
            batch = torch.cat([sample] * copies)  # a normal tensor even where the sample is an inference one
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                output = runner(batch)
            # Everything counted is alive now, so no two storages share an address.
            seen: set[int] = set()
            held = [(tensor, index) for ref, index in saved if (tensor := ref()) is not None]
            held += [(tensor, current[0]) for tensor in _tensors_in(output)]
            for tensor, index in held:
                storage = tensor.untyped_storage()
                pointer = storage.data_ptr()
                if pointer and pointer not in static and pointer not in seen:
                    seen.add(pointer)
                    per_layer[index] += storage.nbytes()
            del output, held
    finally:
        for handle in handles:
            handle.remove()
    return per_layer


def _tensors_in(output: object) -> list[torch.Tensor]:
    """The tensors in a forward's output, through tuples, lists, dicts and the like (pytree's) and dataclasses' fields.

    A dataclass that pytree does not know is one leaf to it: a language model returning its logits in one was counted
    without them (4.6x under the same model returning a tensor).
    """
    tensors = []
    for leaf in pytree.tree_leaves(output):
        if isinstance(leaf, torch.Tensor):
            tensors.append(leaf)
        elif is_dataclass(leaf) and not isinstance(leaf, type):
            for field in fields(leaf):
                tensors += _tensors_in(getattr(leaf, field.name, None))
    return tensors


def _measuring_modes(model: nn.Module) -> None:
    """Puts ``model`` in eval mode but for its dropout, in training mode: what :func:`saved_bytes_per_sample` runs in.

    Training mode for every dropout module (``nn.Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout``, ...) and every
    ``nn.MultiheadAttention`` (whose attention dropout follows its own mode), whose saved bytes do not depend on what
    they draw; for nothing else, as before: a model's own training-mode branches may (stochastic depth that skips a
    whole branch on one draw would make the 2- and 4-sample forwards differ by more than their samples). Each
    module's own flag is set, not its children's (``train()`` would recurse). :func:`_untouched` puts every mode back.
    """
    model.eval()
    for module in model.modules():
        if isinstance(module, (nn.modules.dropout._DropoutNd, nn.MultiheadAttention)):
            module.training = True


@contextlib.contextmanager
def _untouched(model: nn.Module, device: torch.device, user_hooks: bool = False) -> Iterator[None]:
    """Puts back what a forward may change.

    Every module's train/eval mode (a frozen batch norm stays in eval), every buffer (a value updated in place or a new
    tensor bound to its name), every module's plain attributes (bound again, and ones the forward added dropped: a
    recurrent model's carried hidden state kept the measurement's batch of one, and the user's first step raised; a
    layer that initialises itself from its first batch, Glow's ActNorm, took the one-sample measurement's statistics,
    a division by a zero deviation), the contents of its list, dict, set and deque attributes, in the same objects (a
    penalty the forward appended to a list kept the measurement's graphs for the user's first step to backpropagate
    through), its registered parameters, buffers and submodules among them (one registered in the forward dropped: a
    buffer initialised from the first batch took the measurement's sample), every tensor attribute's value (a count
    kept in a tensor and added to in place), and the random number generators (:func:`forked_rngs`: torch's on the CPU
    and ``device``, Python's and NumPy's global one, which a model's stochastic depth may draw from). Parameters
    written in place are not put back.

    The user's forward hooks, the module's own and the global ones (``register_module_forward_hook``), are set aside
    meanwhile (:func:`_set_aside`): one that collected an activation penalty in a list saw the measurement's outputs
    of 1, 2 and 4 samples as well, and the first step backpropagated through the last two. Forward pre-hooks stay
    (weight and spectral norm, pruning and lazy modules compute the forward's weights or shapes in theirs, and a
    user's may prepare the inputs), as do torch's own forward hooks and this package's (precision, measurement); one of
    those a forward took off (a released precision hook shedding itself) stays off. With ``user_hooks`` they run too
    (:func:`_user_hooks_if_needed`: a forward that needs one).
    """
    attributes = [(module, dict(module.__dict__)) for module in model.modules()]  # shallow: the objects themselves
    containers = [  # and the contents of those changed in place, the parameter, buffer and submodule dicts among them
        (value, list(value.items()) if isinstance(value, dict) else list(value))
        for _, saved in attributes
        for name, value in saved.items()
        if isinstance(value, (list, dict, set, collections.deque)) and name not in _HOOK_DICTS
    ]
    tensors = [  # with its version, which a write in place moves on (an inference tensor has none, and stays)
        (value, value._version, value.clone())
        for _, saved in attributes
        for value in saved.values()
        if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and not value.is_inference()
    ]
    modes = [(module, module.training) for module in model.modules()]
    buffers = [
        (module, name, buffer, buffer.clone())
        for module in model.modules()
        for name, buffer in module._buffers.items()
        if buffer is not None
    ]
    global_hooks = nn.modules.module._global_forward_hooks
    global_saved = dict(global_hooks)
    set_aside: list[tuple[nn.Module, collections.OrderedDict[int, Callable[..., object]]]] = []
    if not user_hooks:
        for key, hook in global_saved.items():
            if not _kept(hook):
                del global_hooks[key]
        for module, _ in attributes:  # a new dict: the attributes put back below restore the module's own
            module._forward_hooks = _set_aside(module._forward_hooks)
            set_aside.append((module, module._forward_hooks))
    try:
        with forked_rngs(device):
            yield
    finally:
        global_hooks.clear()
        global_hooks.update(global_saved)
        for module, saved in attributes:  # the parameter, buffer, module and hook dicts: the same objects
            for name in module.__dict__.keys() - saved.keys():
                del module.__dict__[name]
            module.__dict__.update(saved)
        # A hook the forwards took off the set-aside dict stays off: a released precision hook of a model copied while
        # a Controller was open sheds itself at a forward (``precision._drop_released_hooks``), and, put back, it was
        # called, idle, at every forward for good. (A handle's remove() reaches the module's own dict already.)
        for module, aside in set_aside:
            hooks = module._forward_hooks
            for key in [key for key, hook in hooks.items() if _kept(hook) and key not in aside]:
                del hooks[key]
                module._forward_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_always_called.pop(key, None)
        for container, contents in containers:
            _put_back(container, contents)
        for module, training in modes:
            module.training = training
        with torch.no_grad():
            for module, name, buffer, value in buffers:
                module._buffers[name] = buffer
                buffer.copy_(value)
            for tensor, version, value in tensors:  # only those written: a copy would move a graph's tensor on
                if tensor._version != version and tensor.shape == value.shape:
                    tensor.copy_(value)


def _put_back(container: list | dict | set | collections.deque, contents: list) -> None:
    """Puts ``contents`` (a dict's items) back into ``container`` in place, so references the user holds see them.

    A dict's items are assigned one by one: a ``Counter``'s ``update`` adds (its ``(key, count)`` pairs became keys).
    """
    container.clear()
    if isinstance(container, dict):
        for key, value in contents:
            container[key] = value
    elif isinstance(container, set):
        container.update(contents)
    else:
        container.extend(contents)


def _user_hooks_if_needed(model: nn.Module, run: Callable[[bool], _T]) -> _T:
    """``run(False)``: the measuring forwards without the user's forward hooks; ``run(True)`` where that raises.

    Only where the user has forward hooks: a forward that needs one (a hook returning its module's output reshaped)
    raises without them, which would leave the model measured as parameters only.
    """
    try:
        return run(False)
    except Exception:
        hooks = [*nn.modules.module._global_forward_hooks.values()]
        hooks += [hook for module in model.modules() for hook in module._forward_hooks.values()]
        if all(_kept(hook) for hook in hooks):
            raise
        return run(True)


def _kept(hook: Callable[..., object]) -> bool:
    """Whether a forward hook runs in the cost measurement's forwards: torch's own and this package's (by module)."""
    return str(getattr(hook, "__module__", None)).split(".")[0] in ("torch", "triaccel_rl")


def _set_aside(hooks: dict[int, Callable[..., object]]) -> collections.OrderedDict[int, Callable[..., object]]:
    """``hooks`` (a module's forward hooks) without the user's (:func:`_kept`), in their order: a new dict."""
    return collections.OrderedDict((key, hook) for key, hook in hooks.items() if _kept(hook))


def _recurrent_flops(module: nn.RNNBase, out: torch.Tensor) -> float:
    """FLOPs of one sample through an RNN, LSTM or GRU, from its output ``[T, ..., directions * hidden_out]``."""
    gates = {"LSTM": 4, "GRU": 3}.get(module.mode, 1)  # mode: "LSTM", "GRU", "RNN_TANH" or "RNN_RELU"
    directions = 2 if module.bidirectional else 1
    hidden, projected = module.hidden_size, module.proj_size
    hidden_out = projected or hidden
    steps = out.numel() // (directions * hidden_out)
    total = 0.0
    for layer in range(module.num_layers):
        inputs = module.input_size if layer == 0 else directions * hidden_out
        per_step = 2 * gates * hidden * (inputs + hidden_out) + (2 * hidden * projected if projected else 0)
        total += directions * steps * per_step
    return total


def _input(args: tuple, kwargs: dict, position: int, name: str) -> torch.Tensor:
    """The forward's argument ``name``, passed at ``position`` or by keyword."""
    return args[position] if len(args) > position else kwargs[name]


def frozen_parameter_bytes(model: nn.Module) -> int:
    """The bytes of ``model``'s parameters that no optimizer trains (``requires_grad=False``), each counted once.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        >>> _ = model[0].requires_grad_(False)
        >>> frozen_parameter_bytes(model)  # 4 x 4 weights and 4 biases, fp32
        80
    """
    return sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)


def buffer_bytes(model: nn.Module) -> int:
    """The bytes of ``model``'s buffers, as stored: each storage once, whole.

    A storage that several buffers share (one mask registered in two modules, or views of it) counts once; one a
    parameter shares counts with the parameters (``static_bytes``, ``frozen_bytes``), not here. A sparse buffer, which
    has no storage to read, is not counted.

    Example:
        >>> buffer_bytes(nn.BatchNorm1d(4))  # running mean and variance, 4 fp32 each, and the int64 batch count
        40
    """
    counted = {p.untyped_storage().data_ptr() for p in model.parameters()}
    total = 0
    for buffer in model.buffers():
        if buffer.layout != torch.strided:  # untyped_storage() raises on it, and the measurement with it
            continue
        storage = buffer.untyped_storage()
        if storage.data_ptr() not in counted:
            counted.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def owned_param_counts(model: nn.Module, layers: Sequence[LayerInfo]) -> tuple[int, ...]:
    """The parameters each layer of ``model`` owns (``layer_parameters``: a tied weight counted once, in its first)."""
    return tuple(sum(p.numel() for p in params) for params in layer_parameters(model, layers))

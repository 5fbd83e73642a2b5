"""Per-layer estimators of curvature, gradient noise and curvature sparsity, each exact or unbiased.

Conventions: a *layer* is a list of parameters (``StepEngine.layer_params``); every per-layer result has
shape ``[n_layers]`` in that order. A *loss closure* maps ``(inputs, targets)`` to the **mean** loss over
those samples (a scalar tensor); the noise estimators rely on it being a mean, not a sum.

- :func:`hutchinson`: ``tr(H_l) ~ E_v[v_l . (H v)_l]`` with Rademacher ``v`` (Hutchinson 1989), and the
  diagonal ``diag(H) ~ E_v[v * H v]`` (Bekas et al. 2007), through Hessian-vector products by double
  backward. Unbiased for any number of probes.
- :func:`gradient_moments`: ``m`` micro-batch gradients of ``b`` samples each give, per layer, unbiased
  estimates of ``|G_l|^2`` (the squared norm of the true gradient), ``tr(Sigma_l)`` (the per-sample
  gradient covariance) and, per element, the per-sample empirical Fisher diagonal ``E[g_i^2]``.
- :func:`curvature_sparsity`: how concentrated a curvature diagonal is.
- :func:`curvature_lr_factors`: a bounded per-layer LR factor from curvature relative to the median.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from triaccel_rl.errors import is_whole
from triaccel_rl.types import CurvatureSparsity

__all__ = [
    "GradientMoments",
    "HutchinsonEstimate",
    "LossClosure",
    "curvature_lr_factors",
    "curvature_sparsity",
    "float_outputs",
    "forked_rngs",
    "frozen_batch_stats",
    "gradient_moments",
    "hutchinson",
]

LossClosure = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(inputs, targets) -> mean loss`` over those samples, a scalar tensor with a graph to the parameters."""

TOP_FRACTIONS = (0.01, 0.1)
"""The top fractions of coordinates whose share of the curvature mass :func:`curvature_sparsity` reports."""


@dataclass(frozen=True)
class HutchinsonEstimate:
    """Hutchinson estimates of one sub-batch's Hessian, per layer.

    Attributes:
        trace: per layer, the estimate of ``tr(H_l)`` (float64, on the parameters' device).
        diagonal: per layer, the flat estimate of ``diag(H_l)`` (float32), or ``None`` when not asked for.
        used: per layer, True when the loss depends on the layer (some parameter got a gradient);
            an unused layer's Hessian block is exactly zero and so is its estimate.
        n_probes: Rademacher probes averaged.
        loss: the sub-batch loss (detached).
    """

    trace: torch.Tensor
    diagonal: list[torch.Tensor] | None
    used: np.ndarray
    n_probes: int
    loss: torch.Tensor


@dataclass(frozen=True)
class GradientMoments:
    """Per-layer gradient moments from ``n_micro`` micro-batch gradients of ``micro_batch_size`` samples each.

    With ``g_k`` the gradient of micro-batch ``k``, ``mean`` their average and ``s2`` their unbiased
    per-element variance (``sum_k (g_k - mean)^2 / (m - 1)``, accumulated with Welford's update):

    Attributes:
        grad_sq_norm: per layer, ``|mean_l|^2 - sum(s2_l) / m``: unbiased for ``|G_l|^2``, the squared norm
            of the expected gradient (may be negative when noise dominates).
        trace_cov: per layer, ``b * sum(s2_l)``: unbiased for ``tr(Sigma_l)``, the trace of the per-sample
            gradient covariance.
        fisher_diagonal: per layer, the flat per-element ``mean^2 + (b - 1/m) * s2``: unbiased for the
            per-sample empirical Fisher diagonal ``E[g_i^2]``; for ``b == 1`` it equals exactly
            ``mean_k(g_k^2)``. ``None`` when not asked for.
        used: per layer, True when the loss depends on the layer.
        micro_batch_size: ``b``, samples per micro-batch.
        n_micro: ``m``, micro-batches (>= 2).
        loss: mean loss over the micro-batches (detached).
    """

    grad_sq_norm: torch.Tensor
    trace_cov: torch.Tensor
    fisher_diagonal: list[torch.Tensor] | None
    used: np.ndarray
    micro_batch_size: int
    n_micro: int
    loss: torch.Tensor


def hutchinson(
    loss: torch.Tensor,
    layer_params: Sequence[Sequence[nn.Parameter]],
    n_probes: int,
    *,
    generator: torch.Generator | None = None,
    diagonal: bool = False,
) -> HutchinsonEstimate:
    """Hutchinson estimates of the per-layer Hessian trace (and diagonal) of ``loss``.

    For each Rademacher probe ``v`` (entries +-1), one Hessian-vector product ``H v`` by double backward
    gives ``v_l . (H v)_l`` for every layer ``l``, whose expectation is ``tr(H_l)`` (the cross-layer terms
    vanish in expectation), with variance ``2 * sum_{i, j in l, j != i} H_ij^2 + sum_{i in l, j not in l} H_ij^2``
    (a pair inside the layer enters twice, ``H_ij v_i v_j + H_ji v_j v_i``; a pair across layers once). The
    estimate is the mean over ``n_probes`` probes, of that variance over ``n_probes``. Cost: one gradient with a
    graph, then ``n_probes`` double backwards.

    Parameters that do not require a gradient (frozen) or that the loss does not depend on (unused)
    contribute an exact zero.

    Args:
        loss: a scalar loss with its graph (e.g. a sub-batch's mean loss).
        layer_params: the parameters of each layer.
        n_probes: Rademacher probes, >= 1.
        generator: random source of the probes (on the parameters' device); the global one if None.
        diagonal: also return the per-element estimate ``mean_v(v * H v)`` of ``diag(H)``.

    Raises:
        ValueError: ``loss`` is not a scalar, ``n_probes < 1``, or there is no trainable parameter.
    """
    _check_scalar_loss(loss)
    if not is_whole(n_probes) or n_probes < 1:
        raise ValueError(f"n_probes={n_probes!r} must be a whole number >= 1")
    params, owner = _trainable(layer_params)
    n_layers = len(layer_params)
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    used = _used_layers(grads, owner, n_layers)
    # Only gradients that depend on the parameters have a second derivative; the others contribute zero.
    differentiable = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    device = params[0].device
    per_param = torch.zeros(len(params), dtype=torch.float64, device=device)
    diag = [torch.zeros_like(p, dtype=torch.float32) for p in params] if diagonal else None
    for probe in range(n_probes):
        if not differentiable:
            break
        v = [_rademacher(p, generator) for p in params]
        hv = torch.autograd.grad(
            [grads[i] for i in differentiable],
            params,
            grad_outputs=[v[i] for i in differentiable],
            retain_graph=probe < n_probes - 1,
            allow_unused=True,
        )
        products = [vi * hvi.detach() if hvi is not None else None for vi, hvi in zip(v, hv, strict=True)]
        per_param += torch.stack(
            [prod.sum(dtype=torch.float64) if prod is not None else per_param.new_zeros(()) for prod in products]
        )
        if diag is not None:
            for d, prod in zip(diag, products, strict=True):
                if prod is not None:
                    d += prod.float()
    per_param /= n_probes
    trace = torch.zeros(n_layers, dtype=torch.float64, device=device).index_add_(0, owner.to(device), per_param)
    flat_diag = None
    if diag is not None:
        flat_diag = _per_layer_flat([d / n_probes for d in diag], owner, n_layers, device)
    return HutchinsonEstimate(trace, flat_diag, used, n_probes, loss.detach())


def gradient_moments(
    closure: LossClosure,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    layer_params: Sequence[Sequence[nn.Parameter]],
    n_micro: int,
    *,
    fisher_diagonal: bool = False,
) -> GradientMoments:
    """Gradient moments from ``n_micro`` micro-batches of ``len(inputs) // n_micro`` samples each.

    The micro-batch gradients are i.i.d. draws (given i.i.d. samples) with mean ``G`` and per-element
    variance ``diag(Sigma) / b``, so (see :class:`GradientMoments`) ``|mean|^2 - sum(s2) / m`` is unbiased
    for ``|G|^2`` and ``b * sum(s2)`` for ``tr(Sigma)``: the two-batch-size estimator of McCandlish et al.
    (2018, App. A.1) with ``B_small = b`` and ``B_big = m * b``, in its lowest-variance form. Samples
    beyond ``m * b`` are not used. Batch normalisation couples the samples of a micro-batch, so there the
    "per-sample" quantities are those of the BN-normalised model at micro-batch size ``b``.

    Args:
        closure: ``(inputs, targets) -> mean loss`` over those samples.
        inputs: at least ``n_micro`` samples.
        targets: their targets.
        layer_params: the parameters of each layer.
        n_micro: micro-batches, >= 2.
        fisher_diagonal: also return the per-element per-sample Fisher diagonal estimate.

    Raises:
        ValueError: ``n_micro < 2``, fewer samples than micro-batches, a non-scalar loss, or no trainable
            parameter.
    """
    if not is_whole(n_micro) or n_micro < 2:
        raise ValueError(f"n_micro={n_micro!r} must be a whole number >= 2 (a variance needs two micro-batches)")
    micro = len(inputs) // n_micro
    if micro < 1:
        raise ValueError(f"{len(inputs)} samples cannot make {n_micro} micro-batches")
    if len(targets) != len(inputs):
        raise ValueError(f"inputs ({len(inputs)}) and targets ({len(targets)}) differ in length")
    params, owner = _trainable(layer_params)
    n_layers = len(layer_params)
    device = params[0].device
    mean = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    m2 = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    seen: list[bool] = [False] * len(params)
    losses = []
    for k in range(n_micro):
        loss = closure(inputs[k * micro : (k + 1) * micro], targets[k * micro : (k + 1) * micro])
        _check_scalar_loss(loss)
        losses.append(loss.detach().float())
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        materialised = []
        for i, g in enumerate(grads):
            seen[i] = seen[i] or g is not None
            materialised.append(g.detach().float() if g is not None else torch.zeros_like(mean[i]))
        # Welford: numerically stable mean and sum of squared deviations, two buffers per parameter.
        delta = torch._foreach_sub(materialised, mean)
        torch._foreach_add_(mean, delta, alpha=1.0 / (k + 1))
        torch._foreach_addcmul_(m2, delta, torch._foreach_sub(materialised, mean))
    s2 = torch._foreach_div(m2, n_micro - 1)
    mean_sq = torch.stack([t.square().sum(dtype=torch.float64) for t in mean])
    var_sum = torch.stack([t.sum(dtype=torch.float64) for t in s2])
    index = owner.to(device)
    zeros = torch.zeros(n_layers, dtype=torch.float64, device=device)
    layer_mean_sq = zeros.index_add(0, index, mean_sq)
    layer_var = zeros.index_add(0, index, var_sum)
    fisher = None
    if fisher_diagonal:
        per_element = [mu.square().add_(s, alpha=micro - 1.0 / n_micro) for mu, s in zip(mean, s2, strict=True)]
        fisher = _per_layer_flat(per_element, owner, n_layers, device)
    used = np.zeros(n_layers, dtype=bool)
    for i, was_seen in enumerate(seen):
        used[int(owner[i])] |= was_seen
    return GradientMoments(
        grad_sq_norm=layer_mean_sq - layer_var / n_micro,
        trace_cov=layer_var * micro,
        fisher_diagonal=fisher,
        used=used,
        micro_batch_size=micro,
        n_micro=n_micro,
        loss=torch.stack(losses).mean(),
    )


def curvature_sparsity(
    diagonals: Sequence[torch.Tensor], small_threshold: float = 0.01, layer_ids: Sequence[int] | None = None
) -> CurvatureSparsity:
    """How concentrated each layer's curvature diagonal is.

    Definitions, per layer with diagonal ``d`` of ``n`` elements, mass ``m_i = |d_i|`` (so a signed
    Hutchinson diagonal works too), total ``M = sum(m)`` and ``k(p) = max(1, ceil(p * n))``:

    - ``top1_share`` = (sum of the ``k(0.01)`` largest ``m_i``) / ``M``; ``top10_share`` likewise with
      ``k(0.1)``. A flat diagonal gives ``k(p) / n`` (about ``p``); all mass in ``k`` coordinates gives 1.
    - ``small_frac`` = ``#{i : m_i <= small_threshold * M / n} / n``, the fraction of coordinates whose
      curvature is negligible next to the layer's mean.
    - ``top10_ratio`` = ``top10_share * n / k(0.1)``: the mean of the top decile over the overall mean.

    An all-zero layer (``M == 0``, e.g. an unused one) is flat by convention: ``top_share = k(p) / n``,
    ``top10_ratio = 1``, and ``small_frac = 1`` (every coordinate is zero).

    Args:
        diagonals: per layer, the (flattenable) curvature diagonal; one host-device sync for all layers.
        small_threshold: relative threshold of ``small_frac``, in [0, 1].
        layer_ids: the model's layer index of each diagonal, for the errors (their positions by default).

    Raises:
        ValueError: an empty layer, a non-finite entry, or a threshold outside [0, 1].
    """
    if not (0.0 <= small_threshold <= 1.0):
        raise ValueError(f"small_threshold={small_threshold} must be in [0, 1]")
    ids = list(range(len(diagonals))) if layer_ids is None else list(layer_ids)
    rows = []
    sizes = []
    for index, diagonal in zip(ids, diagonals, strict=True):
        mass = diagonal.detach().reshape(-1).abs().to(torch.float64)
        n = mass.numel()
        if n == 0:
            raise ValueError(f"layer {index} has an empty curvature diagonal")
        k1, k10 = (_top_count(p, n) for p in TOP_FRACTIONS)
        top = torch.topk(mass, k10, sorted=True).values
        total = mass.sum()
        small_count = (mass <= small_threshold * total / n).sum().to(torch.float64)
        finite = torch.isfinite(total).to(torch.float64)
        rows.append(torch.stack([top[:k1].sum(), top.sum(), total, small_count, finite]))
        sizes.append((n, k1, k10))
    if not rows:
        empty = np.zeros(0)
        return CurvatureSparsity(empty, empty.copy(), empty.copy(), empty.copy())
    table = torch.stack(rows).cpu().numpy()  # host-device sync: once for all layers
    if not np.all(table[:, 4] == 1.0):
        bad = [ids[row] for row in np.flatnonzero(table[:, 4] != 1.0)]
        raise ValueError(f"curvature diagonal of layers {bad} has non-finite entries")
    top1, top10, small = np.empty(len(rows)), np.empty(len(rows)), np.empty(len(rows))
    ratio = np.empty(len(rows))
    for row, (n, k1, k10) in enumerate(sizes):
        s1, s10, total, n_small, _ = table[row]
        if total > 0:
            top1[row], top10[row] = s1 / total, s10 / total
        else:
            top1[row], top10[row] = k1 / n, k10 / n
        small[row] = n_small / n
        ratio[row] = top10[row] * n / k10
    return CurvatureSparsity(top1, top10, small, ratio)


def curvature_lr_factors(
    curvature: np.ndarray,
    *,
    exponent: float = 0.5,
    min_factor: float = 0.5,
    max_factor: float = 2.0,
) -> np.ndarray:
    """Per-layer LR factors that shrink the step of sharp layers and grow that of flat ones, within bounds.

    ``factor_l = clip((median / c_l) ** exponent, min_factor, max_factor)``, where ``median`` is the median
    of the valid (finite, positive) curvatures. With ``exponent`` = 1 a layer's step would be Newton-like,
    ``∝ 1 / c_l``; the default 0.5 is the square root (as Adam's ``1 / sqrt(v)``), which trusts a noisy
    curvature estimate less. The factors are invariant to scaling all curvatures by a constant; a layer
    at the median gets 1. Invalid layers (zero, negative or non-finite curvature, e.g. unused layers)
    get 1, as do all layers when none is valid.

    Args:
        curvature: per-layer curvature, e.g. ``Signals.curvature`` (mean diagonal) or a peak measure.
        exponent: power of the ratio, > 0.
        min_factor: lower clip, in (0, 1].
        max_factor: upper clip, >= 1.

    Raises:
        ValueError: an exponent or clip outside its range.

    Example:
        >>> curvature_lr_factors(np.array([1.0, 4.0, 16.0])).tolist()
        [2.0, 1.0, 0.5]
    """
    if not (math.isfinite(exponent) and exponent > 0):
        raise ValueError(f"exponent={exponent} must be a positive number")
    if not (0.0 < min_factor <= 1.0 <= max_factor < math.inf):
        raise ValueError(f"need 0 < min_factor={min_factor} <= 1 <= max_factor={max_factor} < inf")
    values = np.asarray(curvature, dtype=np.float64)
    factors = np.ones_like(values)
    valid = np.isfinite(values) & (values > 0)
    if not valid.any():
        return factors
    chosen = values[valid]
    low, high = (chosen.size - 1) // 2, chosen.size // 2
    ordered = np.partition(chosen, [low, high])
    median = (float(ordered[low]) + float(ordered[high])) / 2  # np.median's value, without its overhead
    factors[valid] = np.minimum(np.maximum((median / chosen) ** exponent, min_factor), max_factor)
    return factors


@contextlib.contextmanager
def forked_rngs(device: torch.device) -> Iterator[None]:
    """Randomness drawn inside the block leaves every random stream the caller draws from as it was.

    Torch's (the CPU's, and the device's on a GPU: ``torch.random.fork_rng``), Python's ``random`` and NumPy's global
    one: a model's own randomness in a forward (stochastic depth, layer drop with ``random.random()``) drew from them.
    """
    # The legacy global generator is the stream such a model draws from: its state is what must come back.
    python_state, numpy_state = random.getstate(), np.random.get_state()  # noqa: NPY002
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)  # noqa: NPY002


def float_outputs(outputs: object) -> object:
    """A model's outputs with each floating-point tensor in float32, through tuples, lists and dicts.

    For a loss function given what the model returns, ``(logits, aux)`` or a dict too; anything else as it is.
    """
    if isinstance(outputs, torch.Tensor):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, (tuple, list)):
        items = [float_outputs(item) for item in outputs]
        kind: Any = type(outputs)
        return kind(*items) if hasattr(outputs, "_fields") else kind(items)  # a named tuple too
    if isinstance(outputs, dict):
        return type(outputs)({key: float_outputs(value) for key, value in outputs.items()})
    return outputs


@contextlib.contextmanager
def frozen_batch_stats(model: nn.Module, keep_modes: bool = False) -> Iterator[None]:
    """Forward passes of the function being trained that leave batch-norm running statistics and counters untouched.

    In a model in training mode every module keeps its own mode, so the estimators see the function being trained:
    a batch norm in training mode normalises with the batch's own statistics, one its user froze in eval mode (as
    in fine-tuning) with its running statistics, as in the training steps (``model.train()`` for the block measured
    the frozen one in training mode: another function, whose Hessian trace had the other sign). A model in eval mode
    (left so by an evaluation) is put in training mode for the block, every module, as ``TrainingRun``'s steps put
    it back. Dropout is switched off so that the loss is a deterministic function of
    the parameters (a Hessian needs one): dropout modules, and the dropout built into ``nn.MultiheadAttention``
    (so ``nn.TransformerEncoderLayer``'s attention too) and between the layers of ``nn.LSTM``/``nn.GRU``/``nn.RNN``
    (their ``dropout`` set to 0 for the block; an RNN cannot go to eval mode, cuDNN's backward needs training
    mode). Dropout a module's own ``forward`` applies (``F.dropout(x, p, self.training)``) stays on. The running
    statistics are put back afterwards, not only left alone by a momentum of 0: ``(1 - 0) * running + 0 * batch``
    is NaN where a batch statistic overflowed (``0 * inf``); so are those of instance norms that track them, and
    every other buffer a training-mode forward may write (any module's): they were changed by each round. A
    spectral norm's power iteration runs in training mode only: it is held (eval mode) for the block, so every
    pass sees one function, and its vectors are put back with the other buffers (the hook-based
    ``nn.utils.spectral_norm`` too). ``nn.RReLU`` draws its slopes in training mode: held in eval mode as dropout is.
    A buffer the forward rebinds (an out-of-place update) is bound back to its tensor, and that holds its value again.
    The weight of an ``nn.Embedding`` or ``nn.EmbeddingBag`` with ``max_norm`` is put back too: its forward
    renormalises the rows it looks up in place, so a round over the probe batch changed trained parameters (rows the
    training batches had not looked up among them). The model's own randomness in a ``forward`` (stochastic depth,
    ``F.dropout``) stays on; the collector's rounds run on a fork of the RNGs, so it does not move the training run's
    stream.

    With ``keep_modes`` every module keeps its own mode, a model in eval mode included: in a user's loop (the
    ``Controller``'s rounds) the modes at a decision are those the model trains in, which may be eval mode on purpose
    (batch norm frozen for fine-tuning). Dropout and the others above are still held.
    """
    saved: list[tuple[nn.modules.batchnorm._NormBase, float | None, list[tuple[torch.Tensor, torch.Tensor]]]] = []
    dropout_rates: list[tuple[nn.Module, float]] = []
    was_training = {module: module.training for module in model.modules()}
    if not model.training and not keep_modes:
        model.train()
    normed = {id(b) for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase) for b in m.buffers()}
    # Each buffer with its owner and name: a forward that rebinds one (``self.seen = self.seen + n``, an out-of-place
    # counter or average) left the copy back in the old tensor, which the module no longer held.
    others = [
        (module, name, buffer, buffer.clone())
        for module in model.modules()
        for name, buffer in module._buffers.items()
        if buffer is not None and id(buffer) not in normed
    ]
    # F.embedding(max_norm=...) rescales the looked-up rows of the weight in place (torch.embedding_renorm_), a
    # parameter no buffer copy covers: a copy of each such weight (a table's size, only for these modules).
    renormed = [
        (module.weight, module.weight.detach().clone())
        for module in model.modules()
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.max_norm is not None
    ]
    for module in model.modules():
        if isinstance(module, _SPECTRAL_NORM) or any(
            isinstance(hook, _HOOKED_SPECTRAL_NORM) for hook in module._forward_pre_hooks.values()
        ):
            module.training = False  # (this module alone: the hook-based one's owner may have children)
        if isinstance(module, nn.modules.batchnorm._NormBase):
            stats = (module.running_mean, module.running_var, module.num_batches_tracked)
            saved.append((module, module.momentum, [(b, b.clone()) for b in stats if b is not None]))
            module.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged where finite
        elif isinstance(module, (nn.modules.dropout._DropoutNd, nn.RReLU)):  # RReLU draws its slopes in training
            module.eval()
        elif isinstance(module, (nn.MultiheadAttention, nn.RNNBase)) and module.dropout:
            # Their forward reads the rate at each call; eval mode would also do, but not for an RNN (above).
            dropout_rates.append((module, float(module.dropout)))
            setattr(module, "dropout", 0.0)  # noqa: B010 (nn.Module's typing reads the attribute as a Tensor)
    try:
        yield
    finally:
        for module, rate in dropout_rates:
            setattr(module, "dropout", rate)  # noqa: B010
        for module, momentum, kept in saved:
            module.momentum = momentum
            for buffer, copy in kept:
                # Through .data: the forward's graph holds these buffers (cuDNN's batch-norm backward takes the
                # running statistics, unused in training mode), and an in-place write that bumped their version
                # would fail a backward run after the block (H200, 2026-12-04).
                buffer.data.copy_(copy)
        for module, name, buffer, copy in others:
            module._buffers[name] = buffer
            buffer.data.copy_(copy)
        for weight, copy in renormed:
            weight.data.copy_(copy)  # through .data, as the buffers: a graph of the block may still hold the weight
        for module, training in was_training.items():
            module.training = training


# --------------------------------------------------------------------------------------------------


_SPECTRAL_NORM: tuple[type, ...] = tuple(
    kind for kind in (getattr(nn.utils.parametrizations, "_SpectralNorm", None),) if kind is not None
)
"""``torch.nn.utils.parametrizations.spectral_norm``'s parametrization (private to torch: none if it moves)."""

_HOOKED_SPECTRAL_NORM: tuple[type, ...] = tuple(
    kind
    for kind in (getattr(importlib.import_module("torch.nn.utils.spectral_norm"), "SpectralNorm", None),)
    if isinstance(kind, type)
)
"""The older ``torch.nn.utils.spectral_norm``'s forward pre-hook: its power iteration runs while its owner trains."""


def _check_scalar_loss(loss: object) -> None:
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"loss must be a scalar tensor (the mean over the samples); got {shape}")
    if not loss.requires_grad:
        raise ValueError("loss does not depend on any trainable parameter (it has no gradient graph)")


def _trainable(layer_params: Sequence[Sequence[nn.Parameter]]) -> tuple[list[nn.Parameter], torch.Tensor]:
    """The parameters that require a gradient, flattened, and the layer index of each."""
    params: list[nn.Parameter] = []
    owner: list[int] = []
    for layer, group in enumerate(layer_params):
        for p in group:
            if p.requires_grad:
                params.append(p)
                owner.append(layer)
    if not params:
        raise ValueError("no trainable parameters (every parameter is frozen or the model has none)")
    return params, torch.tensor(owner, dtype=torch.long)


def _used_layers(grads: Sequence[torch.Tensor | None], owner: torch.Tensor, n_layers: int) -> np.ndarray:
    used = np.zeros(n_layers, dtype=bool)
    for g, layer in zip(grads, owner.tolist(), strict=True):
        used[layer] |= g is not None
    return used


def _rademacher(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.empty_like(like).bernoulli_(0.5, generator=generator).mul_(2).sub_(1)


def _per_layer_flat(
    tensors: Sequence[torch.Tensor], owner: torch.Tensor, n_layers: int, device: torch.device
) -> list[torch.Tensor]:
    """Concatenates per-parameter tensors into one flat tensor per layer (empty for a layer with none)."""
    parts: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    for tensor, layer in zip(tensors, owner.tolist(), strict=True):
        parts[layer].append(tensor.reshape(-1))
    return [torch.cat(p) if p else torch.zeros(0, device=device) for p in parts]


def _top_count(fraction: float, n: int) -> int:
    # round() first: 0.1 * 30 is 3.0000000000000004 in floating point, whose ceil would be 4.
    return max(1, math.ceil(round(fraction * n, 9)))

"""``StepEngine``: backward, loss scaling, gradient statistics, non-finite skip and the optimizer update.

The one place where a configuration (per-layer precision, LR scale, per-layer LR factors) meets the
optimizer. ``TrainingRun`` (offline tasks) and ``Controller`` (a user's own loop) both step through it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from triaccel_rl.precision import LayerPrecision, find_layers
from triaccel_rl.types import LayerInfo, Precision

__all__ = ["GradStats", "StepEngine", "check_precision_supported", "layer_parameters"]


def check_precision_supported(precision: Precision, device: torch.device) -> None:
    """Raises ValueError when ``device`` cannot compute in ``precision``."""
    if device.type == "cuda" and precision is Precision.BF16 and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"precision bf16 is not supported on {torch.cuda.get_device_name(device)}; allowed: fp32, fp16"
        )


def layer_parameters(model: nn.Module, layers: Sequence[LayerInfo]) -> list[list[nn.Parameter]]:
    """The trainable parameters each layer owns directly, in the order of ``layers``."""
    modules = dict(model.named_modules())
    owned: list[list[nn.Parameter]] = []
    for info in layers:
        module = modules.get(info.name, model)
        params = module.parameters() if isinstance(module, nn.MultiheadAttention) else module.parameters(recurse=False)
        owned.append([p for p in params if p.requires_grad])
    return owned


@dataclass(frozen=True)
class GradStats:
    """Per-layer statistics of the unscaled gradient of one step (device tensors, ``[n_layers]``).

    Attributes:
        sq_sum: sum of squared elements.
        abs_max: largest absolute element.
        nonfinite: count of non-finite elements.
    """

    sq_sum: torch.Tensor
    abs_max: torch.Tensor
    nonfinite: torch.Tensor


class StepEngine:
    """Runs the backward pass and the update of ``optimizer`` under the current configuration.

    Knobs: ``precision`` (a :class:`LayerPrecision`), ``lr_scale`` (global multiplier on every param
    group's base LR), ``lr_factors`` (per layer; applied to param groups that carry a ``"layer"`` key)
    and ``batch_lr_gain`` (set by whoever changes the batch size).

    A GradScaler scales the loss whenever a layer runs in fp16. A step whose loss or gradient is
    non-finite is skipped: parameters and optimizer state stay as they were.

    Args:
        model: the model being trained.
        optimizer: its optimizer; each param group's ``lr`` at construction is taken as its base LR.
        device: the device the model lives on.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        self.model = model
        self.optimizer = optimizer
        self.device = device
        self.precision = LayerPrecision(model, device.type)
        self.layers: list[LayerInfo] = self.precision.layers
        self.n_layers = len(self.layers)
        self.layer_params = layer_parameters(model, self.layers)
        self._params = [p for params in self.layer_params for p in params]
        owned = {id(p) for p in self._params}
        strays = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in owned]
        if strays:  # cannot happen for modules found by find_layers; guards odd parametrisations
            raise ValueError(f"parameters {strays[:3]} belong to no layer the controller can see")
        self._layer_index = torch.cat(
            [torch.full((len(params),), i, dtype=torch.long) for i, params in enumerate(self.layer_params)]
        ).to(device)
        self._groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        self.base_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        self.lr_scale = 1.0
        self.batch_lr_gain = 1.0
        self.lr_factors = np.ones(self.n_layers)
        self._grad_scaler: torch.amp.GradScaler | None = None

    @staticmethod
    def discover(model: nn.Module) -> list[list[nn.Parameter]]:
        """The parameters of each layer of ``model``, for building per-layer optimizer param groups."""
        return layer_parameters(model, [info for _, _, info in find_layers(model)])

    @property
    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """The loss scaler while a layer runs in fp16, else ``None``."""
        if not self.precision.needs_grad_scaler:
            return None
        if self._grad_scaler is None:
            self._grad_scaler = torch.amp.GradScaler(self.device.type)
        return self._grad_scaler

    def set_precisions(self, precisions: Sequence[Precision | str | int]) -> None:
        """Sets per-layer precisions (all layers, or controllable layers only).

        Raises:
            ValueError: wrong count, unknown precision, or one this device cannot run.
        """
        parsed = [Precision.parse(p) for p in precisions]
        for precision in set(parsed):
            check_precision_supported(precision, self.device)
        self.precision.set(parsed)

    def apply_lr(self) -> float:
        """Writes the configured LRs into the optimizer's param groups; returns the global multiplier."""
        multiplier = self.lr_scale * self.batch_lr_gain
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            factor = float(self.lr_factors[group["layer"]]) if "layer" in group else 1.0
            group["lr"] = base * multiplier * factor
        return multiplier

    def backward_and_step(self, loss: torch.Tensor) -> tuple[GradStats, bool]:
        """Backward through ``loss``, gradient statistics, then the update unless non-finite.

        Returns:
            The gradient statistics and whether the update was skipped.
        """
        if loss.dim() != 0:
            raise ValueError(f"loss must be a scalar tensor; got shape {tuple(loss.shape)}")
        self.apply_lr()
        scaler = self.grad_scaler
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        stats = self.grad_stats()
        # Host-device sync (reference path): the skip is decided on the host.
        skipped = bool(stats.nonfinite.sum().item() > 0) or not math.isfinite(float(loss.detach()))
        if not skipped:
            # With a scaler, step() would skip a non-finite gradient by itself, but not a non-finite
            # loss with finite gradients: decide here for both.
            if scaler is not None:
                scaler.step(self.optimizer)
            else:
                self.optimizer.step()
        if scaler is not None:
            scaler.update()  # unscale_() recorded the overflow check: the scale backs off on overflow
        self.optimizer.zero_grad(set_to_none=False)
        return stats, skipped

    def grad_stats(self) -> GradStats:
        """Per-layer statistics of the current (unscaled) gradients.

        Norms and maxima come from two multi-tensor kernels (``torch._foreach_norm``), whatever the number
        of parameters. Non-finite elements are counted exactly, but only in the parameters whose norm or
        maximum is non-finite; finding those takes one host-device sync, which ``backward_and_step``
        needs anyway to decide the skip.
        """
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params]
        norms = torch.stack(torch._foreach_norm(grads)).float()
        maxes = torch.stack(torch._foreach_norm(grads, math.inf)).float()
        suspect = ~(torch.isfinite(norms) & torch.isfinite(maxes))
        bad = torch.zeros_like(norms)
        if bool(suspect.any()):  # host-device sync: once per step (see above); rare slow path below
            for i in suspect.nonzero().flatten().tolist():
                bad[i] = (~torch.isfinite(grads[i])).sum()
        zeros = torch.zeros(self.n_layers, device=self.device)
        sq_sum = zeros.index_add(0, self._layer_index, norms.square())
        nonfinite = zeros.index_add(0, self._layer_index, bad)
        abs_max = zeros.scatter_reduce(0, self._layer_index, maxes, "amax", include_self=True)
        return GradStats(sq_sum, abs_max, nonfinite)

    def second_moment_diagonal(self) -> list[torch.Tensor | None]:
        """Per layer, the optimizer's flat bias-corrected second moment of the gradient, or None.

        Adam's ``exp_avg_sq / (1 - beta2**step)`` is the EMA of the squared mini-batch gradient: the
        diagonal of the mini-batch empirical Fisher, smoothed over about ``1 / (1 - beta2)`` steps, which
        the signals reuse instead of computing it again. None for a layer where the optimizer keeps no
        such state (SGD, or before the first update). Allocates one flat copy per layer; no host-device
        sync (Adam keeps ``step`` on the host unless ``capturable``).
        """
        diagonals: list[torch.Tensor | None] = []
        for params in self.layer_params:
            parts: list[torch.Tensor] | None = []
            for p in params:
                state = self.optimizer.state.get(p, {})
                if "exp_avg_sq" not in state or parts is None:
                    parts = None
                    continue
                beta2 = self._groups[id(p)]["betas"][1]
                bias = 1.0 - beta2 ** float(state.get("step", 1))
                parts.append(state["exp_avg_sq"].detach().reshape(-1).float() / max(bias, 1e-12))
            diagonals.append(torch.cat(parts) if parts else None)
        return diagonals

    def grad_mean_sq_norm(self) -> np.ndarray:
        """Per layer, ``|E[g]|^2``: the squared norm of the optimizer's running mean of the gradient.

        Reuses the optimizer's state, so it costs no extra pass over the gradients: Adam's ``exp_avg``
        is the EMA of ``g`` itself; SGD's momentum buffer ``buf = mu * buf + g`` is ``E[g] / (1 - mu)``.
        Layers with no state yet (before the first update) report NaN.
        """
        per_param: list[torch.Tensor] = []
        for p in self._params:
            state = self.optimizer.state.get(p, {})
            group = self._groups[id(p)]
            if "exp_avg" in state:
                bias = 1.0 - group["betas"][0] ** float(state.get("step", 1))
                per_param.append(state["exp_avg"].float().square().sum() / max(bias, 1e-12) ** 2)
            elif state.get("momentum_buffer") is not None:
                per_param.append(state["momentum_buffer"].float().square().sum() * (1 - group["momentum"]) ** 2)
            else:
                per_param.append(torch.tensor(math.nan, device=self.device))
        sums = torch.zeros(self.n_layers, device=self.device, dtype=torch.float64)
        sums.index_add_(0, self._layer_index, torch.stack(per_param).double())
        return sums.cpu().numpy()  # host-device sync: once per decision

    def remove(self) -> None:
        """Removes the precision hooks from the model."""
        self.precision.remove()

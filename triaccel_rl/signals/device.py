"""``DeviceMoments``: the cheap per-step signals accumulated on the GPU, read once per interval.

``StepEngine.backward_and_step`` and ``TrainingRun.step`` turn every step's statistics into host numbers
(a host-device sync per step). A loop that wants no per-step sync calls :meth:`DeviceMoments.observe`
after its backward pass instead: it only queues device kernels, and :meth:`DeviceMoments.flush` reads the
interval's sums with one sync, or :meth:`DeviceMoments.flush_lagged` reads the previous interval's with
none. :meth:`SignalCollector.observe_interval` folds the result in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = ["DeviceMoments", "IntervalMoments"]


@dataclass(frozen=True)
class IntervalMoments:
    """Means over the finite observed steps of an interval (host numbers).

    Attributes:
        sq_norm: per layer, mean of the squared gradient norm ``|g_l|^2``.
        norm: per layer, mean of the gradient norm ``|g_l|``.
        loss: mean loss (NaN when no step was finite).
        n_finite: observed steps whose loss and gradients were all finite.
        n_observed: observed steps (finite or not).
    """

    sq_norm: np.ndarray
    norm: np.ndarray
    loss: float
    n_finite: int
    n_observed: int


class DeviceMoments:
    """Records per-layer gradient norms and the loss on the device, with no host-device sync per step.

    Per observed step, three dispatches: one multi-tensor norm over all gradients
    (``torch._foreach_norm``), its copy into a row of a device buffer, and a copy of the loss. Everything
    else (squares, per-layer sums, the finite test) runs on the whole buffer once per interval, or when
    the buffer is full. A step with a non-finite loss or gradient is counted but not added (decided on the
    device with ``torch.where``, so no sync). On a host-bound loop every dispatch costs wall time, so
    ``every_steps > 1`` samples one step in ``every_steps`` (the others cost nothing).

    Args:
        layer_params: the parameters of each layer (``StepEngine.layer_params``).
        every_steps: observe one step in this many, >= 1.
        capacity: steps buffered on the device before they are folded into the sums, >= 1.

    Example:
        >>> model = nn.Linear(3, 2)
        >>> moments = DeviceMoments([[model.weight, model.bias]])
        >>> model(torch.ones(4, 3)).sum().backward()
        >>> moments.observe(torch.tensor(1.0))
        >>> moments.flush().n_finite
        1
    """

    def __init__(
        self, layer_params: Sequence[Sequence[nn.Parameter]], every_steps: int = 1, capacity: int = 64
    ) -> None:
        if every_steps < 1:
            raise ValueError(f"every_steps={every_steps} must be >= 1")
        if capacity < 1:
            raise ValueError(f"capacity={capacity} must be >= 1")
        self._params = [p for params in layer_params for p in params]
        if not self._params:
            raise ValueError("no parameters: nothing to observe")
        self.n_layers = len(layer_params)
        self.every_steps = every_steps
        device = self._params[0].device
        owner = [layer for layer, params in enumerate(layer_params) for _ in params]
        # One host-to-device copy here; per step nothing crosses (a pageable copy would synchronise).
        self._owner = torch.tensor(owner, dtype=torch.long, device=device)
        self._zero = torch.zeros((), device=device)
        self._fast = all(p.dtype == torch.float32 for p in self._params)  # norms land in the buffer directly
        self._norms = torch.zeros(capacity, len(self._params), device=device)
        self._losses = torch.zeros(capacity, device=device)
        self._row = 0
        # observe_layers() rows: per-layer squared norms computed by the caller (e.g. the fused step).
        self._layer_sq = torch.zeros(capacity, self.n_layers, device=device)
        self._layer_losses = torch.zeros(capacity, device=device)
        self._layer_row = 0
        self._sums = torch.zeros(2 * self.n_layers + 1, dtype=torch.float64, device=device)
        self._finite = torch.zeros((), dtype=torch.float64, device=device)
        self._calls = 0
        self._observed = 0
        self._pending: tuple[torch.Tensor, int, torch.cuda.Event | None] | None = None
        self._staging: list[torch.Tensor] | None = None  # two pinned host buffers for flush_lagged
        self._spare: tuple[torch.Tensor, torch.Tensor] | None = None
        self._flushes = 0

    @property
    def samples_next(self) -> bool:
        """Whether the next ``observe`` or ``observe_layers`` call is sampled (``every_steps``)."""
        return self._calls % self.every_steps == 0

    def observe(self, loss: torch.Tensor) -> None:
        """Records the current ``.grad`` norms and ``loss`` (call after backward, before zero_grad)."""
        if not self._take(self._row == len(self._norms)):
            return
        grads = [p.grad if p.grad is not None else self._zero for p in self._params]
        norms = torch._foreach_norm(grads)
        if self._fast:
            torch.stack(norms, out=self._norms[self._row])
        else:
            self._norms[self._row].copy_(torch.stack([n.float() for n in norms]))
        self._losses[self._row].copy_(loss.detach())
        self._row += 1

    def observe_layers(self, loss: torch.Tensor, layer_sq: torch.Tensor) -> None:
        """Records a step whose per-layer squared gradient norms ``layer_sq`` (``[n_layers]``) are known.

        For a step that computed them already (the fused optimizer step does): two copies, no norm
        kernels, no sync. ``every_steps`` applies as in :meth:`observe`.

        Raises:
            ValueError: ``layer_sq`` does not have one entry per layer.
        """
        if layer_sq.shape != (self.n_layers,):
            raise ValueError(f"layer_sq has shape {tuple(layer_sq.shape)}; expected ({self.n_layers},)")
        if not self._take(self._layer_row == len(self._layer_sq)):
            return
        self._layer_sq[self._layer_row].copy_(layer_sq.detach())
        self._layer_losses[self._layer_row].copy_(loss.detach())
        self._layer_row += 1

    def _take(self, buffer_full: bool) -> bool:
        """Counts a call; True when this step is sampled (``every_steps``), after folding a full buffer."""
        self._calls += 1
        if (self._calls - 1) % self.every_steps:
            return False
        if buffer_full:
            self._fold()
        self._observed += 1
        return True

    def flush(self) -> IntervalMoments:
        """The interval's means; resets the sums. One host-device sync."""
        self._fold()
        sums = self._sums.cpu().numpy()  # host-device sync: once per interval
        result = self._moments(sums, int(self._finite.item()), self._observed)
        self._sums.zero_()
        self._finite.zero_()
        self._observed = 0
        return result

    def flush_lagged(self) -> IntervalMoments | None:
        """The *previous* interval's means, without waiting for the device; None at the first call.

        Queues this interval's sums for an asynchronous copy to pinned host memory and returns the sums
        queued at the previous call, which the device finished long ago: no host-device sync at all, at
        the price of signals one interval old.
        """
        self._fold()
        previous = self._pending
        if self._staging is None:  # allocated once: pinned allocations are slow and may synchronise
            pinned = self._sums.is_cuda
            self._staging = [torch.empty(len(self._sums) + 1, dtype=torch.float64, pin_memory=pinned) for _ in "ab"]
            self._spare = (torch.zeros_like(self._sums), torch.zeros_like(self._finite))
        host = self._staging[self._flushes % 2]  # the other slot holds the previous interval, read below
        self._flushes += 1
        host[:-1].copy_(self._sums, non_blocking=True)
        host[-1].copy_(self._finite, non_blocking=True)
        done = torch.cuda.Event() if self._sums.is_cuda else None
        if done is not None:
            done.record()
        self._pending = (host, self._observed, done)
        # Swap in the spare sums; zeroing them is ordered on the stream after their own copy last interval.
        assert self._spare is not None
        (self._sums, self._finite), self._spare = self._spare, (self._sums, self._finite)
        self._sums.zero_()
        self._finite.zero_()
        self._observed = 0
        if previous is None:
            return None
        staged, observed, event = previous
        if event is not None:
            event.synchronize()  # recorded an interval ago: already complete, so this does not stall
        values = staged.numpy()
        return self._moments(values[:-1], int(values[-1]), observed)

    def _moments(self, sums: np.ndarray, n_finite: int, n_observed: int) -> IntervalMoments:
        n = self.n_layers
        scale = 1.0 / n_finite if n_finite else 0.0
        return IntervalMoments(
            sq_norm=sums[:n] * scale,
            norm=sums[n : 2 * n] * scale,
            loss=float(sums[2 * n] * scale) if n_finite else float("nan"),
            n_finite=n_finite,
            n_observed=n_observed,
        )

    def _fold(self) -> None:
        """Adds the buffered steps to the sums (device kernels only)."""
        if self._row:
            rows = self._row
            sq_param = self._norms[:rows].double().square()
            sq_layer = torch.zeros(rows, self.n_layers, dtype=torch.float64, device=sq_param.device)
            sq_layer.index_add_(1, self._owner, sq_param)
            self._add(sq_layer, self._losses[:rows])
            self._row = 0
        if self._layer_row:
            rows = self._layer_row
            self._add(self._layer_sq[:rows].double(), self._layer_losses[:rows])
            self._layer_row = 0

    def _add(self, sq_layer: torch.Tensor, losses: torch.Tensor) -> None:
        table = torch.cat([sq_layer, sq_layer.sqrt(), losses[:, None].double()], dim=1)
        finite = torch.isfinite(table).all(dim=1, keepdim=True)
        self._sums += torch.where(finite, table, 0.0).sum(0)
        self._finite += finite.sum()

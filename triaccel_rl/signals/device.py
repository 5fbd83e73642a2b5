"""``DeviceMoments``: the cheap per-step signals recorded on the GPU, read once per interval.

``StepEngine.backward_and_step`` and ``TrainingRun.step`` turn every step's statistics into host numbers
(a host-device sync per step). A loop that wants no per-step sync calls :meth:`DeviceMoments.observe`
after its backward pass instead (or :meth:`DeviceMoments.observe_layers` when its step computed the
per-layer statistics already): each sampled step writes one row of a device buffer, and nothing else
runs on the device. :meth:`DeviceMoments.flush` copies the interval's rows to the host with one sync and
reduces them there; :meth:`DeviceMoments.flush_lagged` queues the copy and reduces the *previous*
interval's rows, with no sync at all. :meth:`SignalCollector.observe_interval` folds the result in.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from triaccel_rl.errors import is_whole
from triaccel_rl.state import SavedState

__all__ = ["DeviceMoments", "IntervalMoments"]

_STATE_KEYS = ("every_steps", "calls", "observed", "recorded_ms", "tensor_rows", "layer_rows")
"""What ``DeviceMoments.state_dict()`` holds."""
_RECENT_CALLS = 16
"""Sampled calls whose mean host time sets ``DeviceMoments.every_steps`` under a budget."""


@dataclass(frozen=True)
class IntervalMoments:
    """Means over the finite observed steps of an interval (host numbers).

    Attributes:
        sq_norm: per layer, mean of the squared gradient norm ``|g_l|^2``.
        norm: per layer, mean of the gradient norm ``|g_l|``.
        loss: mean loss (NaN when no step was finite).
        n_finite: observed steps whose loss and gradients were all finite.
        n_observed: observed steps (finite or not): sampled steps that got a row; those past ``max_rows`` in the
            interval are not recorded and not counted here either.
        recorded_ms: host time the interval's sampled recording calls took (what ``budget_frac`` limits).
        n_recorded: rows the interval's means were taken from, finite or not: the same count as ``n_observed``.
        n_finite_loss: recorded steps whose loss was finite, whatever their gradients: where it is
            ``n_recorded``, non-finite steps overflowed in their gradients only (fp16's loss scale, not a divergence).
    """

    sq_norm: np.ndarray
    norm: np.ndarray
    loss: float
    n_finite: int
    n_observed: int
    recorded_ms: float = 0.0
    n_recorded: int = 0
    n_finite_loss: int = 0


class _Rows:
    """A device buffer of per-step rows (statistics, then the loss), grown by doubling when full."""

    def __init__(self, width: int, capacity: int, device: torch.device, per_tensor: bool, dtype: torch.dtype) -> None:
        self.per_tensor = per_tensor  # rows of per-tensor norms (observe) or per-layer squared norms
        self.used = 0
        self._allocate(torch.zeros(capacity, width + 1, device=device, dtype=dtype))

    def _allocate(self, data: torch.Tensor) -> None:
        # Views made once per buffer: indexing a row per step costs host time.
        self.data = data
        self.views = list(data.unbind())
        self.stats = [row[:-1] for row in self.views]
        self.losses = [row[-1] for row in self.views]

    def next_row(self, max_rows: int) -> int | None:
        """The index of the row to write next (the buffer doubles when full); None at ``max_rows`` rows."""
        if self.used == len(self.views):
            if self.used >= max_rows:
                return None
            grown = torch.zeros(
                min(2 * self.used, max_rows), self.data.shape[1], device=self.data.device, dtype=self.data.dtype
            )
            grown[: self.used].copy_(self.data)  # ordered on the stream after the rows' writes
            self._allocate(grown)
        self.used += 1
        return self.used - 1


class DeviceMoments:
    """Records per-layer gradient norms and the loss on the device, with no host-device sync per step.

    A sampled step costs two dispatches with :meth:`observe` (one multi-tensor norm over all gradients,
    ``torch._foreach_norm``, stacked with the loss into a row of a device buffer) and two with
    :meth:`observe_layers` (copies of the given statistics and the loss into a row). Squares, per-layer
    sums and the finite test run on the host, over the interval's rows, once per flush. A step with a
    non-finite loss or gradient is counted but not added. The buffer doubles when an interval outgrows it,
    up to ``max_rows`` sampled steps; sampled steps past that in the same interval are not recorded. Its rows are
    float32, or float64 where a parameter is float64 when the first row is written (the norms are taken in the
    rows' dtype). A call that raises counts nothing.

    On a host-bound loop every dispatch costs wall time, so ``every_steps > 1`` samples one step in
    ``every_steps``; the others only count the call (pass the loss undetached: a sampled call detaches it).
    With ``budget_frac`` the sampling follows a budget instead: at each flush ``every_steps`` becomes the least
    that keeps the sampled calls' measured host time within ``budget_frac`` of a step's wall time,
    ``ceil(call_ms / (budget_frac * step_ms))``, at most ``max_every_steps``: ``call_ms`` is the mean host time
    of the last 16 sampled calls, across intervals (an interval's own one sampled call, or none, would make
    ``every_steps`` swing, and sampling at a swinging rate takes more than the budget: the mean of
    ``1 / every_steps`` exceeds ``1 / mean(every_steps)``); ``step_ms`` is the median, over the same calls, of
    the wall time since the previous sampled call per step between them (a median: a pause in the loop, such
    as an evaluation, is not taken for slow steps). Steps that are not sampled are not checked for
    non-finite values either: callers that must count skipped steps count the optimizer's applied updates
    (``StepEngine.applied_steps``).

    Args:
        layer_params: the parameters of each layer (``StepEngine.layer_params``).
        every_steps: observe one step in this many, >= 1 (the start value when ``budget_frac`` is set).
        capacity: rows allocated at first (the buffer grows), >= 1.
        budget_frac: share of wall time the sampled calls may take, in (0, 1); None keeps ``every_steps``.
        max_every_steps: the most ``budget_frac`` may raise ``every_steps`` to, >= 1.
        max_rows: the most sampled steps one interval records, >= ``capacity``.

    Example:
        >>> model = nn.Linear(3, 2)
        >>> moments = DeviceMoments([[model.weight, model.bias]])
        >>> model(torch.ones(4, 3)).sum().backward()
        >>> moments.observe(torch.tensor(1.0))
        >>> moments.flush().n_finite
        1
    """

    def __init__(
        self,
        layer_params: Sequence[Sequence[nn.Parameter]],
        every_steps: int = 1,
        capacity: int = 64,
        budget_frac: float | None = None,
        max_every_steps: int = 64,
        max_rows: int = 1 << 16,
    ) -> None:
        # Whole numbers: every_steps=2.5 sampled 1 call in 5 and made a state load_state_dict refused; capacity=1.5
        # failed at the first observe().
        if not is_whole(every_steps) or every_steps < 1:
            raise ValueError(f"every_steps={every_steps!r} must be a whole number >= 1")
        if not is_whole(capacity) or capacity < 1:
            raise ValueError(f"capacity={capacity!r} must be a whole number >= 1")
        if budget_frac is not None and not 0.0 < budget_frac < 1.0:
            raise ValueError(f"budget_frac={budget_frac} must be in (0, 1), or None for a fixed every_steps")
        if not is_whole(max_every_steps) or max_every_steps < 1:
            raise ValueError(f"max_every_steps={max_every_steps!r} must be a whole number >= 1")
        if not is_whole(max_rows) or max_rows < capacity:
            raise ValueError(f"max_rows={max_rows} must be >= capacity={capacity}")
        self._params = [p for params in layer_params for p in params]
        if not self._params:
            raise ValueError("no parameters: nothing to observe")
        self.n_layers = len(layer_params)
        self.every_steps = every_steps
        self.budget_frac = budget_frac
        self.max_every_steps = max_every_steps
        self._capacity, self._max_rows = capacity, max_rows
        self._device = self._params[0].device
        # Per-tensor squared norms to per-layer sums, on the host: one matrix product per flush.
        owner = [layer for layer, params in enumerate(layer_params) for _ in params]
        self._to_layers = np.zeros((len(owner), self.n_layers))
        self._to_layers[np.arange(len(owner)), owner] = 1.0
        self._zero = torch.zeros((), device=self._device)
        self._tensor_rows: _Rows | None = None  # observe(): per-tensor norms and the loss
        self._layer_rows: _Rows | None = None  # observe_layers(): per-layer squared norms and the loss
        self._calls = 0
        self._observed = 0
        self._call_s = 0.0  # host time in the sampled calls this interval
        self._recent_calls: deque[float] = deque(maxlen=_RECENT_CALLS)  # seconds of the latest sampled calls
        self.recorded_ms_total = 0.0  # host ms of every sampled call so far (what the budget is charged)
        # With a budget: a step's wall time, measured between sampled calls, for the latest sampled calls.
        self._recent_steps: deque[float] = deque(maxlen=_RECENT_CALLS)
        self._last_sampled_at, self._last_sampled_call = 0.0, 0  # call 0: none yet
        # What the latest sampled call changed in the clock, for _untake: (at, call, appended, pushed-out step).
        self._undo: tuple[float, int, bool, float | None] = (0.0, 0, False, None)
        self._pending: tuple[list[tuple[bool, np.ndarray]], int, float, torch.cuda.Event | None] | None = None
        self._staging: list[dict[str, torch.Tensor]] = [{}, {}]  # pinned host rows for flush_lagged, per slot
        self._flushes = 0

    @property
    def samples_next(self) -> bool:
        """Whether the next ``observe`` or ``observe_layers`` call is sampled (``every_steps``)."""
        return self._calls % self.every_steps == 0

    def observe(self, loss: torch.Tensor) -> None:
        """Records the current ``.grad`` norms and ``loss`` (call after backward, before zero_grad).

        Raises:
            ValueError: ``loss`` is not a one-element tensor (checked on sampled calls, so at the first call; the
                call is then not counted, as in :meth:`observe_layers`).
        """
        if not self._take():
            return
        self._check_loss(loss)
        start = time.perf_counter()
        if self._tensor_rows is None:
            self._tensor_rows = _Rows(len(self._params), self._capacity, self._device, True, self._row_dtype())
        rows = self._tensor_rows
        row = rows.next_row(self._max_rows)
        if row is None:
            self._observed -= 1  # max_rows reached: this step is not recorded
        else:
            try:
                grads = [p.grad if p.grad is not None else self._zero for p in self._params]
                # In the rows' dtype, float32 at least: an fp16 gradient's norm over 65504 was inf in its own dtype,
                # and the step counted as skipped; float32 refused a float64 gradient.
                norms = torch._foreach_norm(grads, 2, dtype=rows.data.dtype)
                torch.stack([*norms, loss.detach().reshape(())], out=rows.views[row])
            except BaseException:  # the row given back: a raise in the norms left a zero row, read as a finite step
                rows.used -= 1
                self._untake()
                raise
        self._charge(time.perf_counter() - start)

    def observe_layers(self, loss: torch.Tensor, layer_sq: torch.Tensor) -> None:
        """Records a step whose per-layer squared gradient norms ``layer_sq`` (``[n_layers]``) are known.

        For a step that computed them already (the fused optimizer step does): two copies, no norm kernels,
        no sync. ``every_steps`` applies as in :meth:`observe`.

        Raises:
            ValueError: ``layer_sq`` does not have one entry per layer, or ``loss`` is not a one-element tensor
                (checked on sampled calls, so at the first call; the call is then not counted, its clock reading
                included: once kept, the next sampled call divided by zero).
        """
        if not self._take():
            return
        if not isinstance(layer_sq, torch.Tensor) or layer_sq.shape != (self.n_layers,):  # checked on sampled calls
            self._untake()  # (the first call is always one); a NumPy array passed, then left a zero row counted
            shown = tuple(layer_sq.shape) if isinstance(layer_sq, torch.Tensor) else type(layer_sq).__name__
            raise ValueError(f"layer_sq must be a tensor of shape ({self.n_layers},); got {shown}")
        self._check_loss(loss)
        start = time.perf_counter()
        if self._layer_rows is None:
            self._layer_rows = _Rows(self.n_layers, self._capacity, self._device, False, self._row_dtype())
        row = self._layer_rows.next_row(self._max_rows)
        if row is None:
            self._observed -= 1  # max_rows reached: this step is not recorded
        else:
            rows = self._layer_rows  # two copies into views made once: cheaper on the host than one cat(out=)
            try:
                rows.stats[row].copy_(layer_sq.detach())
                rows.losses[row].copy_(loss.detach().reshape(()))
            except BaseException:  # the row given back, as observe() does: a zero row read as a finite step
                rows.used -= 1
                self._untake()
                raise
        self._charge(time.perf_counter() - start)

    def _charge(self, elapsed: float) -> None:
        """Books a sampled call's host seconds."""
        self._call_s += elapsed
        self._recent_calls.append(elapsed)
        self.recorded_ms_total += elapsed * 1e3

    def _take(self) -> bool:
        """Counts a call; True when this step is sampled (``every_steps``).

        An unsampled call does nothing else (no clock, no tensor op): on a GPU every step makes one, and in a
        training loop even a few host operations cost microseconds each (2026-12-02, H200: about 10 µs a call
        when it detached the loss and read the clock). Only sampled calls read the clock: the wall time since
        the previous sampled call over the calls between them is a step's wall time.
        """
        self._calls += 1
        if (self._calls - 1) % self.every_steps:
            return False
        self._observed += 1
        if self.budget_frac is not None:
            now = time.perf_counter()
            appended, dropped = False, None
            if self._last_sampled_call:
                steps = self._recent_steps
                dropped = steps[0] if len(steps) == steps.maxlen else None  # append() pushes it out
                steps.append((now - self._last_sampled_at) / (self._calls - self._last_sampled_call))
                appended = True
            self._undo = (self._last_sampled_at, self._last_sampled_call, appended, dropped)
            self._last_sampled_at, self._last_sampled_call = now, self._calls
        return True

    def _untake(self) -> None:
        """Undoes the latest sampled :meth:`_take` (a refused call): its count, clock reading and step time."""
        self._calls, self._observed = self._calls - 1, self._observed - 1
        if self.budget_frac is not None:
            at, call, appended, dropped = self._undo
            self._last_sampled_at, self._last_sampled_call = at, call
            if appended:
                self._recent_steps.pop()
                if dropped is not None:
                    self._recent_steps.appendleft(dropped)

    def _check_loss(self, loss: torch.Tensor) -> None:
        """Refuses (and un-counts) a sampled call whose loss is not one number: it would be counted with no row."""
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            self._untake()
            got = f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"loss must be a one-element tensor (the step's mean loss); got {got}")

    def flush(self) -> IntervalMoments:
        """The interval's means; starts the next interval. One host-device sync."""
        blocks = [(rows.per_tensor, rows.data[: rows.used].cpu().numpy()) for rows in self._used_rows()]  # sync
        result = self._moments(blocks, self._observed, self._call_s * 1e3)
        self._next_interval()
        return result

    def flush_lagged(self) -> IntervalMoments | None:
        """The *previous* interval's means, without waiting for the device; None at the first call.

        Queues this interval's rows for an asynchronous copy to pinned host memory and reduces the rows
        queued at the previous call, which the device finished long ago: no host-device sync at all, at
        the price of signals one interval old.
        """
        previous = self._pending
        slot = self._staging[self._flushes % 2]  # the other slot holds the previous interval, read below
        self._flushes += 1
        blocks = []
        for rows in self._used_rows():
            key = "tensor" if rows.per_tensor else "layer"
            host = slot.get(key)
            if host is None or host.shape != rows.data.shape or host.dtype != rows.data.dtype:  # once per size: slow
                # In the rows' dtype: float64 rows went through float32 (a norm of 1e39 became inf, its step dropped)
                host = slot[key] = torch.empty(rows.data.shape, dtype=rows.data.dtype, pin_memory=rows.data.is_cuda)
            host[: rows.used].copy_(rows.data[: rows.used], non_blocking=True)
            blocks.append((rows.per_tensor, host[: rows.used].numpy()))  # read once the event below completed
        done = torch.cuda.Event() if self._device.type == "cuda" else None
        if done is not None:
            done.record(torch.cuda.current_stream(self._device))  # where the copies were queued
        self._pending = (blocks, self._observed, self._call_s * 1e3, done)
        self._next_interval()
        if previous is None:
            return None
        staged, observed, recorded_ms, event = previous
        if event is not None:
            event.synchronize()  # recorded an interval ago: already complete, so this does not stall
        return self._moments(staged, observed, recorded_ms)

    def state_dict(self) -> dict[str, Any]:
        """The interval recorded so far (its rows, copied to the host: one sync) and the sampling, for a checkpoint.

        Raises:
            ValueError: these moments are read with :meth:`flush_lagged`, which always holds the last interval's rows
                for its next call: they are not part of the state (a ``Controller``'s are read with :meth:`flush`).
        """
        if self._pending is not None:
            raise ValueError(
                "these moments are read with flush_lagged(), which holds the last interval's rows for its next call: "
                "a checkpoint does not keep them; checkpoint moments read with flush()"
            )

        def rows_of(rows: _Rows | None) -> torch.Tensor | None:
            return None if rows is None or not rows.used else rows.data[: rows.used].detach().cpu().clone()

        return {
            "every_steps": self.every_steps,
            "calls": self._calls,
            "observed": self._observed,
            "recorded_ms": self._call_s * 1e3,
            "tensor_rows": rows_of(self._tensor_rows),
            "layer_rows": rows_of(self._layer_rows),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resumes the interval from ``state_dict()``'s output, for moments over parameters of the same shapes.

        Raises:
            ValueError: a missing field, counts that do not fit together, or rows of another width (named).
        """
        saved = SavedState(state, "the device moments' state", _STATE_KEYS)
        every_steps = saved.count("every_steps", 1)
        calls, observed = saved.count("calls"), saved.count("observed")
        recorded_ms = saved.real("recorded_ms", least=0.0)
        blocks = {}
        for key, width in (("tensor_rows", len(self._params)), ("layer_rows", self.n_layers)):
            rows = saved[key]
            if rows is not None and not (
                isinstance(rows, torch.Tensor) and rows.is_floating_point() and rows.shape[1:] == (width + 1,)
            ):
                shown = tuple(rows.shape) if isinstance(rows, torch.Tensor) else type(rows).__name__
                raise ValueError(
                    f"the device moments' state has {key} {shown}, "
                    f"not None or a float tensor of shape (rows, {width + 1})"
                )
            blocks[key] = rows
        recorded = sum(len(rows) for rows in blocks.values() if rows is not None)
        if not recorded <= observed <= calls:
            raise ValueError(
                f"the device moments' state has {recorded} rows, observed {observed} and calls {calls}: "
                "expected rows <= observed <= calls"
            )
        self.every_steps, self._calls, self._observed, self._call_s = every_steps, calls, observed, recorded_ms / 1e3
        # The sampling clock and a lagged flush belong to the calls before the load: kept, a used instance's next
        # sampled call divided by zero (calls rewound to the last sampled one) or timed a negative step.
        self._last_sampled_at, self._last_sampled_call = 0.0, 0
        self._undo = (0.0, 0, False, None)
        self._recent_steps.clear()
        self._pending = None
        self._tensor_rows = self._rows_from(blocks["tensor_rows"], len(self._params), per_tensor=True)
        self._layer_rows = self._rows_from(blocks["layer_rows"], self.n_layers, per_tensor=False)

    def _row_dtype(self) -> torch.dtype:
        """float64 where a parameter is float64 (its gradient's norm is, and float32 would round it), else float32."""
        return torch.float64 if any(p.dtype == torch.float64 for p in self._params) else torch.float32

    def _rows_from(self, saved: torch.Tensor | None, width: int, per_tensor: bool) -> _Rows | None:
        if saved is None:
            return None
        rows = _Rows(width, max(self._capacity, len(saved)), self._device, per_tensor, self._row_dtype())
        rows.data[: len(saved)].copy_(saved)
        rows.used = len(saved)
        return rows

    def _used_rows(self) -> list[_Rows]:
        return [rows for rows in (self._tensor_rows, self._layer_rows) if rows is not None and rows.used]

    def _next_interval(self) -> None:
        """Adapts ``every_steps`` to the budget from the recent calls' costs, then starts the next interval."""
        if self.budget_frac is not None and self._recent_calls and self._recent_steps:
            call_ms = statistics.fmean(self._recent_calls) * 1e3
            wall_ms = statistics.median(self._recent_steps) * 1e3  # a pause in the loop (evaluation) is not a step
            needed = math.ceil(call_ms / max(self.budget_frac * wall_ms, 1e-9) - 1e-9)
            self.every_steps = max(1, min(self.max_every_steps, needed))
        for rows in self._used_rows():
            rows.used = 0
        self._observed = 0
        self._call_s = 0.0

    def _moments(self, blocks: list[tuple[bool, np.ndarray]], n_observed: int, recorded_ms: float) -> IntervalMoments:
        """Reduces rows on the host: per-layer squared norms, their square roots and the loss, finite rows only."""
        n = self.n_layers
        sums = np.zeros(2 * n + 1)
        n_finite = n_recorded = n_finite_loss = 0
        for per_tensor, block in blocks:
            values = block.astype(np.float64)
            stats, losses = values[:, :-1], values[:, -1]
            n_recorded += len(losses)
            n_finite_loss += int(np.isfinite(losses).sum())
            with np.errstate(invalid="ignore", over="ignore"):  # a non-finite row (inf × 0 too) is dropped below
                sq = np.square(stats) @ self._to_layers if per_tensor else stats
                table = np.concatenate([sq, np.sqrt(sq), losses[:, None]], axis=1)
            finite = np.isfinite(table).all(axis=1)
            sums += table[finite].sum(axis=0)
            n_finite += int(finite.sum())
        scale = 1.0 / n_finite if n_finite else 0.0
        return IntervalMoments(
            sq_norm=sums[:n] * scale,
            norm=sums[n : 2 * n] * scale,
            loss=float(sums[2 * n] * scale) if n_finite else float("nan"),
            n_finite=n_finite,
            n_observed=n_observed,
            recorded_ms=recorded_ms,
            n_recorded=n_recorded,
            n_finite_loss=n_finite_loss,
        )

"""CUDA graphs of a training step's forward, loss and backward: one launch instead of hundreds.

A small model's training step on a fast GPU is bound by the host, not the GPU: on an H100, CIFAR-shaped
ResNet-18 at batch 256 in bf16 does 4.4 ms of GPU work in a 10-14 ms step; the rest is Python, autograd
and about a thousand kernel launches. ``StepGraphs`` captures the forward, the loss and the backward of
one micro-batch shape once (``torch.cuda.CUDAGraph``) and replays the graph at every later step: the
inputs are copied into the graph's static tensors, one replay runs every kernel, and the gradients
accumulate into the parameters' ``.grad`` tensors in place, where the optimizer step (outside the graph)
reads them.

A graph is specific to what shaped its kernels: the input shape, strides and dtype, the per-layer
precisions and whether the loss is scaled. The caller's ``key`` carries what the inputs cannot tell (the
precisions, the loss scaling); ``StepGraphs`` adds the inputs' layout itself, so that no key can replay a
graph on inputs of another shape or dtype. A new key is captured on first use
(a few eager warm-up passes, then the capture) and the least recently used graph is dropped beyond
``max_graphs``. All graphs share one memory pool, so holding several costs about as much as the largest, and
graphs of one input shape share their static input tensors: a second precision map of the same batch (the speed
trial's fp16 after its bf16) adds no input copy (one was 1.5 MiB of peak memory for ResNet-18 at batch 512 on the
H200, 2026-12-02).

Rules a captured step must follow (``TrainingRun`` keeps them): no host-device sync inside (the fused
optimizer step and the loss accumulation stay outside the graph); tensors the graph reads but does not
own (the loss scale, batch-norm buffers, parameters and their ``.grad``) are updated in place, never
re-bound; and a capture starts with the gradients at zero (one micro-batch per step), because the warm-up
passes write into them. The warm-up passes leave batch-norm statistics untouched (``frozen_batch_stats``).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from triaccel_rl.errors import is_whole
from triaccel_rl.signals.estimators import frozen_batch_stats

__all__ = ["StepGraphs", "graph_unsupported", "recover_from_failed_capture"]

_log = logging.getLogger(__name__)

Body = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""Forward, loss and backward on ``(x, y)``; returns the detached loss (a 0-dim device tensor)."""


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    x: torch.Tensor
    y: torch.Tensor
    loss: torch.Tensor
    peak_bytes: int


_CAPTURE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _capture_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for every warm-up and capture in the process.

    cuBLAS and cuDNN keep a workspace per stream they have run on, allocated through PyTorch's allocator and
    never freed: a new stream per capture left about 163 MiB allocated after each finished ResNet-18 run on
    an H100 (measured with ``scripts/check_run_freed.py``), which grew every later run's peak.
    """
    if device.index is None:  # keyed by index: "cuda" named device 0's stream after set_device(1) moved on
        device = torch.device("cuda", torch.cuda.current_device())
    stream = _CAPTURE_STREAMS.get(device)
    if stream is None:
        stream = _CAPTURE_STREAMS[device] = torch.cuda.Stream(device)
    return stream


def recover_from_failed_capture(device: torch.device, pool: Any) -> bool:
    """Undoes what a failed capture into ``pool`` leaves behind; True if the allocator was still routing to it.

    On torch 2.11 a capture that fails (a host sync inside it, an error in the captured code) ends the stream
    capture but raises before the rest of ``capture_end`` (pytorch/pytorch#180395 changed that upstream), leaving:

    - the caching allocator routing to the pool: while it believes a capture is underway, ``empty_cache()`` frees
      no cached block, nor does an allocation that fails before it raises out-of-memory. Measured on an H200
      (2026-12-04): a freed 1 GiB block stayed reserved (``scripts/check_failed_capture.py``), and after the
      GPU tests' one failed capture a later out-of-memory test's 137 GiB stayed reserved, all of it free.
      Ending the routing here is refused (and ignored) where torch already ended it.
    - the device's default CUDA generator in capture mode: every later random op on the device (dropout, a
      GPU-side augmentation, ``torch.randn``) raises "Offset increment outside graph capture encountered
      unexpectedly". A successful capture of one trivial op ends that mode, as a capture's end does.
    - the pinned-host allocator routing to the pool too, which no Python call ends: a later capture into the
      same pool fails ("beginAllocateToPool: already recording to mempool_id"). Give it a new pool.

    ``pool`` is the handle the capture was given (``torch.cuda.graph_pool_handle()``).
    """
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        torch._C._cuda_endAllocateToPool(index, pool)
        routed = True
    except RuntimeError:  # not recording to that pool: torch ended the routing itself
        routed = False
    device = torch.device("cuda", index)
    with torch.cuda.device(index):
        scratch = torch.zeros(1, device=device)
        torch.cuda.synchronize(index)
        # On the device's own stream: torch's default capture stream is one for the process, made on whichever device
        # was current at its first use, and a capture there would leave this device's generator in capture mode.
        with torch.cuda.graph(
            torch.cuda.CUDAGraph(), pool=torch.cuda.graph_pool_handle(), stream=_capture_stream(device)
        ):
            scratch.add_(1)
    if routed:
        _log.debug("ended the allocator's routing to the pool %s of a failed CUDA graph capture", pool)
    return routed


def graph_unsupported(model: nn.Module, device: torch.device | str) -> str:
    """Why ``model``'s training step cannot be captured on ``device`` ('' when it can)."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device; this run is on {device}"
    for name, module in model.named_modules():
        # momentum=None makes batch norm compute its factor from num_batches_tracked on the host (a sync), where it
        # keeps running statistics: without them it reads neither.
        if (
            isinstance(module, nn.modules.batchnorm._BatchNorm)
            and module.training
            and module.momentum is None
            and module.track_running_stats
        ):
            return f"batch norm {name!r} has momentum=None (a cumulative average is computed on the host)"
    return ""


class StepGraphs:
    """Captured forward/loss/backward passes of one model, one graph per ``key``.

    Args:
        model: the model the bodies run (its batch-norm statistics are frozen during warm-up).
        device: the CUDA device.
        max_graphs: graphs kept at once (least recently used dropped first).
        warmup_passes: eager passes before a capture (cuDNN and cuBLAS pick and allocate their workspaces).

    Raises:
        ValueError: ``device`` is not CUDA, the model cannot be captured (``graph_unsupported``), or
            ``max_graphs``/``warmup_passes`` is not a whole number >= 1.
    """

    def __init__(
        self, model: nn.Module, device: torch.device | str, max_graphs: int = 6, warmup_passes: int = 2
    ) -> None:
        device = torch.device(device)  # "cuda" as graph_unsupported takes it
        reason = graph_unsupported(model, device)
        if reason:
            raise ValueError(reason)
        for name, value in (("max_graphs", max_graphs), ("warmup_passes", warmup_passes)):
            if not is_whole(value) or value < 1:  # nan passed "< 1" and held graphs without limit
                raise ValueError(f"{name}={value!r} must be a whole number >= 1")
        self.model = model
        # The device the model is on now, by index: a later set_device() must not move the captures' stream.
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.max_graphs = max_graphs
        self.warmup_passes = warmup_passes
        self.captures = 0
        self.replays = 0
        self.last_peak_bytes = 0
        """The allocator peak of an eager pass of the last replayed graph's shape (a replay allocates nothing)."""
        self._graphs: OrderedDict[Hashable, _Graph] = OrderedDict()
        self._inputs: dict[Hashable, tuple[torch.Tensor, torch.Tensor]] = {}
        """Static ``(x, y)`` by input layout, shared by every graph of that layout."""
        self._pool: Any = None

    def __len__(self) -> int:
        return len(self._graphs)

    def run(
        self, key: Hashable, x: torch.Tensor, y: torch.Tensor, body: Body, zero_grad: Callable[[], None]
    ) -> torch.Tensor:
        """Runs ``body(x, y)`` by replaying the graph of ``key`` and ``x``'s and ``y``'s layout (capturing it if new).

        ``key`` holds what else shapes the captured computation (the precisions, the loss scaling); the layout
        (shapes, strides, dtypes) is added here: before, a key without it replayed the graph of another batch size
        on a copy of ``x`` broadcast (or cast) into the graph's inputs, silently. ``zero_grad`` must zero the
        gradients in place; it is called after the warm-up passes of a capture, which must start with zero
        gradients. Returns a copy of the loss (the graph's own is overwritten at the next replay).
        """
        key = (key, _layout(x, y))
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(key, x, y, body, zero_grad)
        else:
            self._graphs.move_to_end(key)
        entry.x.copy_(x)
        entry.y.copy_(y)
        entry.graph.replay()
        self.replays += 1
        self.last_peak_bytes = entry.peak_bytes
        return entry.loss.clone()

    def clear(self) -> None:
        """Drops every graph (their memory returns to the allocator once none is left)."""
        self._graphs.clear()
        self._inputs.clear()
        self._pool = None

    def _static_inputs(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The static input tensors for ``x``'s and ``y``'s layout (new ones, holding copies, on first use)."""
        layout = _layout(x, y)
        if layout not in self._inputs:
            # clone keeps a dense layout (channels_last) and makes an overlapping one (a broadcast batch) dense: a
            # buffer with x's stride 0 could not be copied into
            static_x = x.clone()
            self._inputs[layout] = (static_x, y.clone())
        static_x, static_y = self._inputs[layout]
        static_x.copy_(x)
        static_y.copy_(y)
        return static_x, static_y

    def _capture(
        self, key: Hashable, x: torch.Tensor, y: torch.Tensor, body: Body, zero_grad: Callable[[], None]
    ) -> _Graph:
        static_x, static_y = self._static_inputs(x, y)
        try:
            graph, loss, peak = self._record(static_x, static_y, body, zero_grad)
        except BaseException:
            if all(kept.x is not static_x for kept in self._graphs.values()):  # made for this capture alone
                del self._inputs[_layout(x, y)]
            raise
        entry = _Graph(graph, static_x, static_y, loss, peak)
        self._graphs[key] = entry
        if len(self._graphs) > self.max_graphs:
            _, dropped = self._graphs.popitem(last=False)
            if all(kept.x is not dropped.x for kept in self._graphs.values()):  # no graph left reads its inputs
                self._inputs = {k: v for k, v in self._inputs.items() if v[0] is not dropped.x}
        self.captures += 1
        _log.debug("captured a training-step graph for %s (%d held)", key, len(self._graphs))
        return entry

    def _record(
        self, static_x: torch.Tensor, static_y: torch.Tensor, body: Body, zero_grad: Callable[[], None]
    ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, int]:
        """Warm-up passes, then the capture of ``body`` on the static inputs: the graph, its loss and the peak bytes.

        Both on the device's side stream, with the run's device current: unless given a stream, ``torch.cuda.graph``
        captures on its default capture stream, one for the process, made on whichever device was current at its first
        use, so a run on ``cuda:1`` could capture on ``cuda:0``.
        """
        with torch.cuda.device(self.device):
            return self._record_on_device(static_x, static_y, body, zero_grad)

    def _record_on_device(
        self, static_x: torch.Tensor, static_y: torch.Tensor, body: Body, zero_grad: Callable[[], None]
    ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, int]:
        torch.cuda.reset_peak_memory_stats(self.device)
        side = _capture_stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), frozen_batch_stats(self.model):
            for _ in range(self.warmup_passes):
                body(static_x, static_y)
        torch.cuda.current_stream(self.device).wait_stream(side)
        peak = int(torch.cuda.max_memory_allocated(self.device))
        zero_grad()
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:  # a handle of our own: a failed capture's graph does not tell its pool
            self._pool = torch.cuda.graph_pool_handle()
        try:
            with torch.cuda.graph(graph, pool=self._pool, stream=side):
                loss = body(static_x, static_y)
        except BaseException:
            failed_pool, self._pool = self._pool, None  # later captures share a new pool
            try:
                recover_from_failed_capture(self.device, failed_pool)
            except Exception as err:  # the capture's own error is the one to raise
                _log.warning("could not undo what a failed CUDA graph capture left (%s: %s)", type(err).__name__, err)
            raise
        return graph, loss, peak


def _layout(x: torch.Tensor, y: torch.Tensor) -> tuple[Hashable, ...]:
    """What a captured graph's static inputs fix: the shapes, strides and dtypes of ``x`` and ``y``."""
    return (tuple(x.shape), x.stride(), x.dtype, tuple(y.shape), y.stride(), y.dtype)

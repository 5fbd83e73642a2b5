"""The safety shield's stateful parts: roll back to the last good state, and distrust out-of-distribution inputs.

The stateless bounds (LR change per decision, no lowering while overflowing, memory refusals) live in
``triaccel_rl.executor``. Here:

- ``RollbackGuard`` keeps a copy of the model's parameters and buffers and the optimizer's state from
  the last healthy decision, and restores it when an interval ends with a non-finite loss, or with a
  non-finite buffer (``nonfinite_buffers``: a batch-norm's running statistics after an ``inf`` input, whose
  update was skipped but whose forward had already written them).
- ``ObservationStats`` records the range of observations a learned policy was trained on, and
  ``FallbackPolicy`` hands decisions to the heuristic when an observation lies far outside it.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch import nn

from triaccel_rl.observation import ObservationLayout
from triaccel_rl.types import Policy, Precision

__all__ = [
    "CONSTANT_FEATURE_WIDTH",
    "BufferCheck",
    "FallbackPolicy",
    "ObservationStats",
    "RollbackGuard",
    "check_observation",
    "infinite_buffers",
    "nonfinite_buffers",
    "nonfinite_parameters",
    "obs_stats_path",
]

_log = logging.getLogger("triaccel_rl")


def check_observation(observation: Any, size: int) -> np.ndarray:
    """``observation`` as an array, checked: one observation of ``size`` features, or a batch ``(n, size)``, of numbers.

    Every policy's ``predict`` takes its observation through here, so a wrong one is refused by name, alike. A torch
    tensor (on any device) is read to the host.

    Raises:
        ValueError: another shape, an empty batch, or values that are not numbers (strings, objects); the message
            names which.

    Example:
        >>> check_observation(np.zeros((2, 3), dtype=np.float32), 3).shape
        (2, 3)
        >>> check_observation(np.zeros(5), 3)
        Traceback (most recent call last):
        ...
        ValueError: observation has shape (5,); expected (3,) or a batch (n, 3)
    """
    if isinstance(observation, torch.Tensor):  # numpy cannot read a CUDA tensor (nor one that requires grad)
        observation = observation.detach().cpu()
        if observation.dtype is torch.bfloat16:  # nor bf16 (a TypeError): exact in float32
            observation = observation.float()
        observation = observation.numpy()
    obs = np.asarray(observation)
    if obs.dtype.kind not in "biuf":
        raise ValueError(f"observation has dtype {obs.dtype}; expected numbers (float32, as the environment gives)")
    if obs.shape != (size,) and not (obs.ndim == 2 and obs.shape[1] == size):
        raise ValueError(f"observation has shape {obs.shape}; expected ({size},) or a batch (n, {size})")
    if obs.ndim == 2 and not len(obs):
        raise ValueError(f"observation is an empty batch {obs.shape}: give at least one row of {size} features")
    return obs


def nonfinite_buffers(model: nn.Module, expected: Mapping[str, torch.Tensor] | None = None) -> list[str]:
    """The names of ``model``'s floating-point buffers that hold a NaN or an infinity.

    A skipped update leaves the parameters alone, but the forward that produced the non-finite loss has already
    written the buffers it updates (a batch-norm's running mean and variance), and nothing else would repair them:
    the model would evaluate to NaN from then on. One multi-tensor max-norm decides (a host-device sync); names
    are looked up only when it fails.

    ``expected`` (:func:`infinite_buffers` of the model at the start) names buffers that held infinities by design,
    each with where it was finite: such a buffer counts only where it holds a NaN, or an infinity where it was
    finite: a model keeping an additive causal mask as a buffer (``-inf`` above the diagonal) would otherwise be
    rolled back at every interval and never train.

    Example:
        >>> model = nn.BatchNorm1d(2)
        >>> nonfinite_buffers(model)
        []
        >>> _ = model.running_mean.fill_(float("nan"))
        >>> nonfinite_buffers(model)
        ['running_mean']
    """
    expected = expected or {}
    named = [(name, b) for name, b in model.named_buffers() if b.is_floating_point() and b.numel()]
    broken = _nonfinite([(name, b) for name, b in named if name not in expected])
    for name, b in named:
        if name in expected:
            finite = expected[name].to(b.device)
            # A new infinity where it was finite, or a NaN anywhere; an infinity turned finite is not a break (an
            # observer's min/max starts at +-inf and is filled by the first batch).
            if finite.shape != b.shape or bool((torch.isnan(b) | (finite & ~torch.isfinite(b))).any()):
                broken.append(name)
    return broken


def infinite_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s floating-point buffers that hold infinities and no NaN, each with its ``isfinite`` mask.

    An additive attention mask (``-inf`` above the diagonal, as Whisper's decoder and llama2.c keep one): taken when
    training starts, what :func:`nonfinite_buffers` excuses. One sync; a sync a buffer only where one holds any.

    Example:
        >>> model = nn.Module()
        >>> model.register_buffer("mask", torch.full((2, 2), float("-inf")).triu(1))
        >>> infinite_buffers(model)
        {'mask': tensor([[ True, False],
                [ True,  True]])}
    """
    buffers = dict(model.named_buffers())
    masks = {name: _by_design(buffers[name]) for name in nonfinite_buffers(model)}
    return {name: mask for name, mask in masks.items() if mask is not None}


def _by_design(buffer: torch.Tensor) -> torch.Tensor | None:
    """``buffer``'s ``isfinite`` mask where it is a floating-point buffer holding infinities and no NaN, else None."""
    if not buffer.is_floating_point() or not buffer.numel() or bool(torch.isfinite(buffer).all()):
        return None
    return None if bool(torch.isnan(buffer).any()) else torch.isfinite(buffer)


class BufferCheck:
    """:func:`nonfinite_buffers` of one model, excusing the buffers that held infinities when first seen.

    Those present at construction are read then (:func:`infinite_buffers`); a buffer that appears later (a mask made
    at the first forward, ``register_buffer("mask", None)`` filled in) is read the first time a check sees it, and
    excused likewise where it holds infinities and no NaN.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.expected = infinite_buffers(model)
        self._seen = {name: b.shape for name, b in model.named_buffers()}

    def __call__(self) -> list[str]:
        """The names of the model's broken buffers (a sync; one more for each buffer seen for the first time)."""
        buffers = dict(self.model.named_buffers())
        # New, or rebuilt in another shape (a rotary cache or a mask grown for longer sequences): read afresh.
        # Otherwise a mask rebuilt for a shorter batch reads as broken and starts a rollback, which then fails.
        new = [name for name, b in buffers.items() if self._seen.get(name) != b.shape]
        for name in new:
            self._seen[name] = buffers[name].shape
            self.expected.pop(name, None)
            mask = _by_design(buffers[name])
            if mask is not None:
                self.expected[name] = mask
        return nonfinite_buffers(self.model, self.expected)


def nonfinite_parameters(model: nn.Module) -> list[str]:
    """The names of ``model``'s trained parameters (those that require a gradient) that hold a NaN or an infinity.

    One multi-tensor max-norm, a sync. A frozen parameter may hold -inf by design (an additive mask): left out.
    """
    return _nonfinite([(name, p.detach()) for name, p in model.named_parameters() if p.numel() and p.requires_grad])


def _nonfinite(named: list[tuple[str, torch.Tensor]]) -> list[str]:
    if not named:
        return []
    maxima = torch._foreach_norm([t for _, t in named], float("inf"))  # NaN stays NaN, an infinity stays one
    if bool(torch.isfinite(torch.stack(maxima)).all()):
        return []
    return [name for name, t in named if not bool(torch.isfinite(t).all())]


class RollbackGuard:
    """Snapshots of model and optimizer state, restored on demand.

    A snapshot costs one copy of the parameters, buffers and optimizer state (for SGD with momentum about
    2× the parameter bytes; for Adam 3×; with ``confirm``, two such copies), taken at most once per decision
    (``ControllerConfig.snapshot_every``), never per step. It is kept on the model's device, or with
    ``offload`` (for CUDA tensors) in pinned host memory: no GPU memory, at the price of a device-to-host
    copy queued on the current stream (a few milliseconds of PCIe per 100 MB, not a host-device sync).

    Example:
        >>> model = nn.Linear(2, 1)
        >>> guard = RollbackGuard(model, torch.optim.SGD(model.parameters(), lr=0.1))
        >>> guard.save()
        >>> with torch.no_grad():
        ...     _ = model.weight.fill_(float("nan"))
        >>> guard.restore()
        True
        >>> bool(torch.isfinite(model.weight).all())
        True
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        offload: bool = False,
        every: int = 1,
        after_restore: Callable[[], None] | None = None,
        confirm: bool = False,
        save_extra: Callable[[], Any] | None = None,
        load_extra: Callable[[Any], None] | None = None,
    ) -> None:
        # A float or NaN passed the old `every < 1` check, and `since + 1 >= nan` then never refreshed the copy.
        if isinstance(every, bool) or not isinstance(every, int | np.integer) or every < 1:
            raise ValueError(f"every={every!r} must be a whole number >= 1")
        # Each of these failed only later: at the first copy (an AttributeError, or the swapped pair's "unexpected
        # keyword argument 'keep_vars'"), or at the first restore, after the state was loaded (after_restore).
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        if isinstance(optimizer, nn.Module) or not all(
            callable(getattr(optimizer, name, None)) for name in ("state_dict", "load_state_dict")
        ):
            raise TypeError(
                "optimizer must be an optimizer (an object with state_dict() and load_state_dict(), e.g. a "
                f"torch.optim.Optimizer); got {type(optimizer).__name__}"
            )
        if not isinstance(offload, bool | np.bool_):
            raise TypeError(f"offload={offload!r} must be True or False")
        for name, hook in (("after_restore", after_restore), ("save_extra", save_extra), ("load_extra", load_extra)):
            if hook is not None and not callable(hook):
                raise TypeError(f"{name}={hook!r} must be callable (or None)")
        if (save_extra is None) != (load_extra is None):
            raise TypeError("save_extra and load_extra go together: one takes the owner's state, the other loads it")
        self.save_extra = save_extra
        """Called at each copy: the owner's state that goes with it (running signal estimates), kept as returned."""
        self.load_extra = load_extra
        """Called with what ``save_extra`` returned for the copy a restore brings back."""
        self.model = model
        self.optimizer = optimizer
        self.offload = bool(offload)
        self.every = every
        self.after_restore = after_restore
        """Called after each restore: e.g. ``StepEngine.refresh_weight_copies``, whose copies the restore made stale."""
        if not isinstance(confirm, bool | np.bool_):
            raise TypeError(f"confirm={confirm!r} must be True or False")
        self.confirm_copies = bool(confirm)
        """A copy is restored only once :meth:`confirm` says its state gave a finite loss; until then the copy confirmed
        before it is kept too (twice the memory). For an owner that cannot evaluate the state it copies (the
        Controller sees a state's loss only at the next step): a copy taken after an update that blew the model up
        was otherwise the "last good state", restored at every rollback."""
        self._since_copy = 0  # healthy() calls since the copy was taken
        self._good: _Copy | None = None  # what restore() brings back
        self._unconfirmed: _Copy | None = None  # with confirm: the latest copy, not yet confirmed
        self._spare: _Copy | None = None  # a copy's tensors, reused by the next one
        self.rollbacks = 0

    def healthy(self) -> bool:
        """Records that the current state is healthy: the copy is refreshed every ``every`` calls (the first always).

        Returns:
            Whether a copy was taken now.
        """
        if not self.has_snapshot or self._since_copy + 1 >= self.every:
            self.save()
            return True
        self._since_copy += 1
        return False

    def refresh_extra(self) -> None:
        """Takes the owner's state (``save_extra``) for the latest copy again, leaving its tensors alone.

        For state the owner measured on the copy's weights after the copy was taken: ``DecisionLoop``'s estimator
        round runs after the decision's copy, and a rollback to it would otherwise bring back the estimates from before
        that round.
        """
        latest = self._unconfirmed if self._unconfirmed is not None else self._good
        if latest is not None and self.save_extra is not None:
            latest.extra = self.save_extra()

    def reserve(self) -> None:
        """Copies the starting state now, so that the copy's memory is allocated before training starts.

        Pinned host memory is slow to allocate (about 50 ms for ResNet-18's 90 MB on an H200), and the first copy
        otherwise allocates it at the first decision, inside the training time. The next :meth:`healthy` call
        still refreshes the copy, as the first one always does, and reuses this memory. The starting state counts as
        confirmed (it is the owner's).
        """
        self.save()
        self.confirm()
        if self.confirm_copies and self._spare is None:  # the second copy's memory too (once: a resume reuses it)
            self._spare = self._take(None)
        self._since_copy = self.every - 1  # the next healthy() copies

    def resume(self) -> None:
        """Takes the current state, a checkpoint's just loaded, as the only copy, unconfirmed (with ``confirm``).

        The checkpoint may have been saved after an update that broke the model and before the rollback it would
        have brought: taken as confirmed (as :meth:`reserve` takes a run's start), it was restored at every rollback.
        Unconfirmed, the owner sees it fail where no confirmed copy is left (:attr:`has_confirmed`). Without
        ``confirm``: :meth:`reserve`. The copies' memory is reused.
        """
        if not self.confirm_copies:
            self.reserve()
            return
        held = [copy for copy in (self._unconfirmed, self._good, self._spare) if copy is not None]
        self._good = self._spare = None
        self._unconfirmed = self._take(held[0] if held else None)
        self._spare = held[1] if len(held) > 1 else None
        self._since_copy = self.every - 1  # the next healthy() copies, as after reserve()

    @property
    def has_confirmed(self) -> bool:
        """Whether a copy is confirmed (always, once one is taken, without ``confirm``)."""
        return self._good is not None

    def confirm(self) -> None:
        """With ``confirm``: the latest copy's state gave a finite loss, so it becomes the one restored."""
        if self._unconfirmed is not None:  # the confirmed copy before it becomes the spare (none after a resume: kept)
            spare = self._good if self._good is not None else self._spare
            self._spare, self._good, self._unconfirmed = spare, self._unconfirmed, None

    @property
    def copy_is_current(self) -> bool:
        """Whether the latest copy was taken at the last healthy state (no healthy() call has skipped it since)."""
        return self.has_snapshot and self._since_copy == 0

    @property
    def has_unconfirmed(self) -> bool:
        """Whether the latest copy waits for :meth:`confirm` (``confirm`` only)."""
        return self._unconfirmed is not None

    def save(self) -> None:
        """Takes a snapshot of the current (healthy) state: the one restored, or with ``confirm`` the one to confirm.

        Each snapshot after the first copies into an earlier one's tensors with one multi-tensor copy,
        as long as the state's structure and shapes are unchanged (a few launches instead of an allocation
        and a copy per tensor).
        """
        if self.confirm_copies:
            # Never into the confirmed copy: it is what a rollback restores. The one of the two not reused stays the
            # spare (after a resume both are held: dropping one allocated a whole copy again, pinned on a GPU).
            reuse, keep = (self._unconfirmed, self._spare) if self._unconfirmed is not None else (self._spare, None)
            self._unconfirmed, self._spare = None, keep
            self._unconfirmed = self._take(reuse)
        else:
            self._good = self._take(self._good)
        self._since_copy = 0

    def _take(self, reuse: _Copy | None) -> _Copy:
        """A copy of the model's and the optimizer's state, into ``reuse``'s tensors where they fit."""
        offload = self.offload
        try:
            state = self.model.state_dict(keep_vars=True)
            model_state = _Snapshot.take(state, reuse.model if reuse else None, offload)
            transient = _Snapshot.take(
                _transient_buffers(self.model, state), reuse.transient if reuse else None, offload
            )
            optimizer = _Snapshot.take(self.optimizer.state_dict(), reuse.optimizer if reuse else None, offload)
        except RuntimeError as err:  # e.g. pinned (page-locked) host memory refused
            if not offload:
                raise
            _log.warning("rollback copy kept on the GPU: pinned host memory failed (%s)", err)
            self.offload = False
            self._spare = None  # pinned tensors: the next copies are made on the GPU
            return self._take(None)
        copied = None
        if offload and torch.cuda.is_available() and model_state.on_host_from_cuda:
            copied = torch.cuda.Event()
            # On the stream the copies were queued on, the model's device's (the current device may be another)
            device = next((p.device for p in self.model.parameters() if p.is_cuda), None)
            copied.record(torch.cuda.current_stream(device))
        extra = self.save_extra() if self.save_extra is not None else None
        return _Copy(model_state, transient, optimizer, copied, extra)

    @property
    def has_snapshot(self) -> bool:
        """Whether a snapshot has been taken."""
        return self._good is not None or self._unconfirmed is not None

    def restore(self, reason: str = "non-finite loss", unconfirmed: bool = False, stopping: bool = False) -> bool:
        """Restores the last snapshot (logging ``reason``); returns False when there is none yet.

        With ``confirm`` it is the last confirmed one (an unconfirmed copy is dropped: its state may be the one that
        failed), or the unconfirmed one where none was ever confirmed. ``unconfirmed=True`` restores the unconfirmed
        copy where there is one and keeps it unconfirmed (a copy taken at a configuration change, which may be what
        failed rather than the state: tried once). ``stopping``: the owner stops after it (no rollback the run goes on
        from): not counted in :attr:`rollbacks`, and logged so.
        """
        target: _Copy | None
        if unconfirmed and self._unconfirmed is not None:
            target = self._unconfirmed
        else:
            target = self._good or self._unconfirmed
            if self._good is not None and self._unconfirmed is not None:
                self._spare, self._unconfirmed = self._unconfirmed, None
        if target is None:
            return False
        if target.copied is not None:  # the host reads the offloaded tensors below (the deep copy)
            target.copied.synchronize()
        saved, transient = _as_buffers_are_now(self.model, target.model.tree(), target.transient.tree())
        self.model.load_state_dict(saved)
        with torch.no_grad():
            for name, value in transient.items():
                self.model.get_buffer(name).copy_(value)
        # The hyperparameters are the owner's or a scheduler's, which has moved on since the copy (OneCycleLR cycles the
        # momentum or Adam's beta1 with the LR): they stay as they are; the copy brings back the state (the moments).
        groups = getattr(self.optimizer, "param_groups", None)
        settings = [{k: v for k, v in group.items() if k != "params"} for group in groups] if groups is not None else []
        # A copy: an optimizer may adopt the tensors it is given, and the snapshot must stay as it was.
        self.optimizer.load_state_dict(copy.deepcopy(target.optimizer.tree()))
        for group, kept in zip(getattr(self.optimizer, "param_groups", []), settings, strict=False):
            group.update(kept)
        if self.after_restore is not None:
            self.after_restore()
        if self.load_extra is not None:
            self.load_extra(target.extra)
        if stopping:
            _log.warning("%s: the last good state restored, and the run stops", reason)
            return True
        self.rollbacks += 1
        _log.warning("%s: rolled back to the last good state (rollback %d)", reason, self.rollbacks)
        return True


def _as_buffers_are_now(
    model: nn.Module, saved: dict[str, Any], transient: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The copy's model state and non-persistent buffers, but for buffers made, dropped or rebuilt since the copy.

    Those are kept as they are now: a rotary cache or a mask grown for longer sequences (its module's own attributes,
    ``max_seq_len_cached``, describe the new shape), a mask made at the first batch that needs it
    (``register_buffer("mask", None)`` filled in), one set back to ``None``. Loaded from the copy, a rebuilt buffer
    would raise "size mismatch" and one made or dropped since "Missing key(s)" or "Unexpected key(s)"; given the
    copy's shape, the module's attributes would no longer match it, and its next forward would fail.
    """
    now = {name: b for name, b in model.named_buffers(remove_duplicate=False)}
    persistent_now = model.state_dict(keep_vars=True)

    def changed(name: str, value: Any) -> bool:
        current = now.get(name)
        return current is not None and isinstance(value, torch.Tensor) and current.shape != value.shape

    loadable = {name: value for name, value in saved.items() if name in persistent_now}  # dropped since: left out
    for name, current in persistent_now.items():
        if name not in loadable or changed(name, loadable[name]):  # made or rebuilt since: as it is
            loadable[name] = current
    kept = {name: value for name, value in transient.items() if name in now and not changed(name, value)}
    return loadable, kept


def _transient_buffers(model: nn.Module, state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The model's buffers that its state dict (``state``, taken with ``keep_vars``) leaves out, by name.

    A non-persistent buffer (``register_buffer(..., persistent=False)``: a running statistic a module keeps out of its
    checkpoints) is state a forward writes, as a batch norm's running statistics are: one gone non-finite made
    ``nonfinite_buffers`` ask for a rollback at every decision, and the restore never repaired it.
    """
    persistent = {id(value) for value in state.values()}
    return {name: b for name, b in model.named_buffers() if id(b) not in persistent}


@dataclass
class _Copy:
    """One copy of the state: the model's state dict, its non-persistent buffers, the optimizer's state dict."""

    model: _Snapshot
    transient: _Snapshot
    optimizer: _Snapshot
    copied: torch.cuda.Event | None = None  # when an offloaded copy's transfers are done
    extra: Any = None  # the owner's state taken with it (save_extra)


@dataclass
class _Snapshot:
    """A state tree's leaves (tensors copied) and its structure."""

    leaves: list[Any]
    spec: pytree.TreeSpec
    on_host_from_cuda: bool = False

    @classmethod
    def take(cls, state: Any, previous: _Snapshot | None, offload: bool = False) -> _Snapshot:
        """A snapshot of ``state``, reusing ``previous``'s tensors when the structure and shapes match.

        With ``offload``, CUDA tensors are copied into pinned host tensors, asynchronously on the current
        stream (read them on the host only after the stream has passed the copies).
        """
        leaves, spec = pytree.tree_flatten(state)
        cuda = [isinstance(leaf, torch.Tensor) and leaf.is_cuda for leaf in leaves]
        offloaded = offload and any(cuda)

        def home(leaf: torch.Tensor) -> torch.device:
            return torch.device("cpu") if offload and leaf.is_cuda else leaf.device

        if (
            previous is not None
            and previous.spec == spec
            and all(
                not isinstance(new, torch.Tensor)
                or (
                    isinstance(old, torch.Tensor)
                    and old.shape == new.shape
                    and old.dtype == new.dtype
                    and old.device == home(new)
                )
                for old, new in zip(previous.leaves, leaves, strict=True)
            )
        ):
            pairs = [
                (old, new) for old, new in zip(previous.leaves, leaves, strict=True) if isinstance(new, torch.Tensor)
            ]
            if offloaded:  # device to pinned host memory: one asynchronous copy per tensor
                for old, new in pairs:
                    old.copy_(new.detach(), non_blocking=True)
            elif pairs:
                torch._foreach_copy_([old for old, _ in pairs], [new.detach() for _, new in pairs])
            kept = [
                old if isinstance(new, torch.Tensor) else copy.deepcopy(new)
                for old, new in zip(previous.leaves, leaves, strict=True)
            ]
            return cls(kept, spec, offloaded)
        return cls([_copy_leaf(leaf, offload) for leaf in leaves], spec, offloaded)

    def tree(self) -> Any:
        """The snapshot as a state tree (its own tensors: copy them before handing them to an adopter)."""
        return pytree.tree_unflatten(self.leaves, self.spec)


def _copy_leaf(leaf: Any, offload: bool) -> Any:
    if not isinstance(leaf, torch.Tensor):
        return copy.deepcopy(leaf)
    if offload and leaf.is_cuda:
        host = torch.empty_strided(leaf.size(), leaf.stride(), dtype=leaf.dtype, device="cpu", pin_memory=True)
        return host.copy_(leaf.detach(), non_blocking=True)
    return leaf.detach().clone()


CONSTANT_FEATURE_WIDTH = 0.1
"""The range width counted for a feature that never varied in training. A width of 1 could never be passed by a rate in
[0, 1]: the shipped policy, which never saw an overflow (``overflow_rate`` 0 throughout), decided on intervals whose
every step overflowed. At 0.1 a rate over 0.1 (3 of 20 steps) goes to the heuristic, one or two in 20 do not."""


@dataclass(frozen=True)
class ObservationStats:
    """Per-feature range of the observations a policy was trained on.

    Attributes:
        low: per-feature minimum seen in training.
        high: per-feature maximum seen in training.
        n_observations: how many observations the range was taken from.
        lr_scales: the LR multipliers the policy's LR action indexes (``ControllerConfig.lr_scales`` in training);
            None where the file predates it. A ladder of the same length but other values passes the spaces'
            check, so ``make_policy`` checks this against the caller's.
        interval_steps: the optimizer steps between two decisions in training (``ControllerConfig.interval_steps``);
            None where the file predates it, or stats of runs at different intervals were merged. A run may decide at
            another interval (its observations are per-interval rates and trends); ``make_policy`` says so at INFO.
    """

    low: tuple[float, ...]
    high: tuple[float, ...]
    n_observations: int
    lr_scales: tuple[float, ...] | None = None
    interval_steps: int | None = None

    @classmethod
    def from_observations(cls, observations: np.ndarray) -> ObservationStats:
        """The range of a ``[n, features]`` array of observations."""
        data = np.asarray(observations, dtype=np.float64)
        if data.ndim != 2 or len(data) == 0:
            raise ValueError(f"need a non-empty [n, features] array; got shape {data.shape}")
        unfinite = np.flatnonzero(~np.isfinite(data).all(axis=0))
        if unfinite.size:  # a NaN bound switched the fallback off for the feature, and load() refused the saved file
            raise ValueError(
                f"observations hold NaN or infinite values in feature {int(unfinite[0])} (of {len(unfinite)} such "
                "features): every bound of a training range must be a finite number"
            )
        return cls(tuple(data.min(0).tolist()), tuple(data.max(0).tolist()), len(data))

    def distance(self, observation: np.ndarray) -> float:
        """How far outside the training range ``observation`` lies, in units of each feature's range.

        0 inside the range; 1 means one full range width beyond its edge (on the worst feature). Features
        that never varied in training get a width of ``CONSTANT_FEATURE_WIDTH`` (0.1).
        """
        return self.worst_feature(observation)[1]

    def worst_feature(self, observation: np.ndarray) -> tuple[int, float]:
        """The index of the feature furthest outside its training range, and its :meth:`distance`."""
        obs, low, high, width = self._ranges(observation)
        outside = (np.maximum(low - obs, 0.0) + np.maximum(obs - high, 0.0)) / width
        # A NaN lies in no range: infinitely far (its NaN distance compared as in range, so the policy got it).
        outside = np.where(np.isnan(outside), np.inf, outside)
        worst = int(np.argmax(outside))
        return worst, float(outside[worst])

    def beyond(self, observation: np.ndarray, max_distance: float) -> bool:
        """Whether ``observation`` lies more than ``max_distance`` range widths outside the range on some feature.

        A feature exactly ``max_distance`` widths out is not beyond, whether it holds the edge itself or the float32
        nearest to it: an observation is float32, and 2 overflowing steps in 20 (0.1, one width of 0.1 past a rate
        that never varied) read 0.1000000015, a :meth:`distance` of 1.0000000149, and went to the fallback though
        only a rate over 0.1 should. A NaN is beyond.

        Example:
            >>> stats = ObservationStats((0.0,), (0.0,), 1)  # never varied: a width of 0.1
            >>> stats.beyond(np.float32([0.1]), 1.0), stats.beyond(np.float32([0.15]), 1.0)
            (False, True)
        """
        obs, low, high, width = self._ranges(observation)
        lower, upper = low - max_distance * width, high + max_distance * width
        lower = np.minimum(lower, lower.astype(np.float32))
        upper = np.maximum(upper, upper.astype(np.float32))
        return bool(np.any((obs < lower) | (obs > upper) | np.isnan(obs)))

    def _ranges(self, observation: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``observation`` as float64, the ranges' low and high ends, and each feature's width."""
        obs = np.asarray(observation, dtype=np.float64).reshape(-1)
        low, high = np.asarray(self.low, dtype=np.float64), np.asarray(self.high, dtype=np.float64)
        if obs.shape != low.shape:
            raise ValueError(f"observation has {obs.size} features; the stats have {low.size}")
        return obs, low, high, np.where(high - low > 1e-9, high - low, CONSTANT_FEATURE_WIDTH)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the stats as JSON.

        The file is written beside ``path`` and moved over it: an interrupted save leaves the previous file whole (a
        policy whose stats were cut short did not load), and removes the temporary file.
        """
        target = Path(os.path.realpath(path))  # through a symlink to its file, as a plain write goes
        temporary = target.with_name(f".{target.name}.tmp")
        try:
            temporary.write_text(json.dumps(asdict(self)) + "\n")
            os.replace(temporary, target)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise

    def merged(self, other: ObservationStats) -> ObservationStats:
        """The range of both stats' observations (a resumed training run's, with the run it resumed).

        Raises:
            ValueError: stats of another number of features or another LR ladder.
        """
        if len(other.low) != len(self.low) or other.lr_scales != self.lr_scales:
            raise ValueError(
                f"cannot merge observation stats of {len(self.low)} features (LR ladder {self.lr_scales}) with stats "
                f"of {len(other.low)} (LR ladder {other.lr_scales})"
            )
        return ObservationStats(
            tuple(np.minimum(self.low, other.low).tolist()),
            tuple(np.maximum(self.high, other.high).tolist()),
            self.n_observations + other.n_observations,
            self.lr_scales,
            self.interval_steps if self.interval_steps == other.interval_steps else None,  # mixed: unknown
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ObservationStats:
        """Reads stats written by ``save``.

        Raises:
            ValueError: missing or unreadable file, not UTF-8 JSON (a binary file too), missing fields or values of
                the wrong kind (named); the message names the file.
        """
        file = Path(path)
        if not file.is_file():
            raise ValueError(f"observation stats {str(file)!r} do not exist")
        try:
            text = file.read_text(encoding="utf-8")  # as save writes it (ASCII), whatever the locale's encoding
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"observation stats {str(file)!r} cannot be read: {error}") from None
        try:
            raw = json.loads(text)
        except (ValueError, RecursionError) as error:  # also an integer of over 4300 digits, or arrays nested too deep
            raise ValueError(f"observation stats {str(file)!r} are not valid JSON: {error}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"observation stats {str(file)!r} must be a JSON object; got {type(raw).__name__}")
        missing = {"low", "high", "n_observations"} - set(raw)
        if missing:
            raise ValueError(f"observation stats {str(file)!r} lack {sorted(missing)}")

        # JSON lists of numbers: float() would take a string's characters ("00" as two features) and a bool as 1,
        # int() truncate a fractional count and take a negative one.
        def numbers(key: str) -> tuple[float, ...]:
            values = raw[key]
            if not isinstance(values, list) or not all(_is_number(v) for v in values):
                raise ValueError(f"observation stats {str(file)!r}: {key} {values!r} must be a list of numbers")
            return tuple(float(v) for v in values)

        low, high = numbers("low"), numbers("high")
        count = raw["n_observations"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"observation stats {str(file)!r}: n_observations {count!r} must be a whole number >= 1")
        ladder = None if raw.get("lr_scales") is None else numbers("lr_scales")
        interval = raw.get("interval_steps")
        if interval is not None and (isinstance(interval, bool) or not isinstance(interval, int) or interval < 1):
            raise ValueError(
                f"observation stats {str(file)!r}: interval_steps {interval!r} must be a whole number of steps >= 1"
            )
        unfinite = [
            i for i, (a, b) in enumerate(zip(low, high, strict=False)) if not (math.isfinite(a) and math.isfinite(b))
        ]
        if unfinite:  # a NaN bound passed "low <= high" and sent every observation to the fallback
            raise ValueError(
                f"observation stats {str(file)!r}: feature {unfinite[0]} has the range [{low[unfinite[0]]}, "
                f"{high[unfinite[0]]}]; every bound must be a finite number"
            )
        if ladder is not None and not all(math.isfinite(x) and x > 0 for x in ladder):
            raise ValueError(f"observation stats {str(file)!r}: lr_scales {list(ladder)} must be positive numbers")
        if len(low) != len(high) or not low or any(a > b for a, b in zip(low, high, strict=True)):
            raise ValueError(
                f"observation stats {str(file)!r}: low and high must be ranges of one non-empty length with low <= "
                f"high; got {len(low)} and {len(high)} values"
            )
        return cls(low, high, count, ladder, interval)


class FallbackPolicy:
    """A learned policy that defers to a fallback (the heuristic) on out-of-distribution observations.

    Args:
        policy: the learned policy.
        fallback: the policy used when an observation is out of distribution.
        stats: the training range of observations.
        max_distance: an observation further than this from the training range (see
            ``ObservationStats.distance``) goes to the fallback. The default, 1.0, means one full
            range width beyond the edge on some feature. A feature exactly this far out, or at the float32 nearest
            to that edge, stays with the learned policy (``ObservationStats.beyond``).

    The log says so once a spell: a warning at the first decision out of distribution (the feature, its value
    and its training range), an info line when observations come back and the learned policy decides again;
    the decisions in between are logged at debug level. Each row of a batch (a vectorised env's environments) has
    spells of its own, and its lines name the row. ``fallbacks`` and ``fallback_features`` count them all.
    """

    def __init__(self, policy: Policy, fallback: Policy, stats: ObservationStats, max_distance: float = 1.0) -> None:
        if not max_distance > 0:  # NaN too: `distance > nan` never holds, so nothing would ever fall back
            raise ValueError(f"max_distance={max_distance} must be positive")
        self.policy = policy
        self.fallback = fallback
        self.stats = stats
        self.max_distance = max_distance
        self.fallbacks = 0
        self.fallback_features: dict[str, int] = {}
        """Fallbacks by the feature furthest outside its training range (names as ``ObservationLayout.name``)."""
        # Decisions in the current spell out of distribution, by stream (a batch's row: one vectorised env each; a
        # single observation is stream 0); absent: the learned policy decides for that stream.
        self._spells: dict[int, int] = {}
        self.name = getattr(policy, "name", "learned")

    def new_run(self) -> None:
        """Ends every spell out of distribution, so that the next one's first decision is warned of.

        ``run_controller`` calls it before each run: a policy object reused for another run warns there too.
        """
        self._spells.clear()

    @property
    def initial_precision(self) -> Precision | None:
        """Where the run starts: the learned policy's start precision (see ``make_policy``).

        Set (a checkpoint's, by ``Controller.load_state_dict``), it goes to the learned policy and the fallback alike,
        as the speed trial's answer does; without a setter a resumed ``policy="pretrained"`` run raised half-loaded.
        """
        return getattr(self.policy, "initial_precision", None)

    @initial_precision.setter
    def initial_precision(self, precision: Precision | None) -> None:
        self._set_on_both("initial_precision", precision)

    @property
    def low_precision(self) -> Precision | None:
        """The 16-bit format the speed trial chose (the learned policy's; None before a trial). Set, as above."""
        return getattr(self.policy, "low_precision", None)

    @low_precision.setter
    def low_precision(self, precision: Precision | None) -> None:
        self._set_on_both("low_precision", precision)

    def _set_on_both(self, name: str, precision: Precision | None) -> None:
        for policy in (self.policy, self.fallback):
            if hasattr(policy, name):
                setattr(policy, name, precision)

    def wants_speed_trial(self, step_time_known: bool) -> bool:
        """The learned policy's answer (False where it has none)."""
        wants = getattr(self.policy, "wants_speed_trial", None)
        return bool(wants(step_time_known)) if wants is not None else False

    def choose_low_precision(self, step_ms: Mapping[Precision, float]) -> Precision:
        """Gives the speed trial's times to the learned policy and to the fallback, so both lower to one format."""
        chosen: Precision = self.policy.choose_low_precision(step_ms)  # type: ignore[attr-defined]
        choose = getattr(self.fallback, "choose_low_precision", None)
        if choose is not None:
            choose(step_ms)
        return chosen

    def predict(
        self,
        observation: np.ndarray,
        state: tuple[np.ndarray, ...] | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...] | None]:
        """The learned policy's action, or the fallback's when ``observation`` is out of distribution.

        A batch's rows are separate streams (a vectorised env's environments): each has its own spells, logged once
        a spell each, naming its row.

        Raises:
            ValueError: an observation of another shape than the stats' or not of numbers (``check_observation``).
        """
        obs = check_observation(observation, len(self.stats.low))
        if obs.ndim == 2:
            actions = [
                self._predict_one(row, index, f" (batch row {index})", state, episode_start, deterministic)[0]
                for index, row in enumerate(obs)
            ]
            return np.stack(actions), state
        return self._predict_one(obs, 0, "", state, episode_start, deterministic)

    def _predict_one(
        self,
        obs: np.ndarray,
        stream: int,
        where: str,
        state: tuple[np.ndarray, ...] | None,
        episode_start: np.ndarray | None,
        deterministic: bool,
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...] | None]:
        spell = self._spells.get(stream, 0)
        if self.stats.beyond(obs, self.max_distance):  # the edge as float32 holds it is in (``beyond``)
            others_decided = getattr(self.fallback, "others_decided", None)
            # A spell's first: what it recorded last is stale. One stream's alone: the rows of a batch share the
            # fallback, and one row's spell starting would wipe another's record mid-spell.
            if spell == 0 and others_decided is not None and not where:
                others_decided()
            feature, distance = self.stats.worst_feature(obs)
            self.fallbacks += 1
            self._spells[stream] = spell = spell + 1
            name = _feature_name(feature, obs.size)
            self.fallback_features[name] = self.fallback_features.get(name, 0) + 1
            _log.log(
                logging.WARNING if spell == 1 else logging.DEBUG,
                # Four decimals: a distance just past the limit printed as 1.00 beside a limit of 1.00
                "observation%s %.4f range widths outside the policy's training data (limit %g; feature %s = %.3g, "
                "trained on [%.3g, %.3g]): the heuristic decides until observations return (fallback %d)",
                where,
                distance,
                self.max_distance,
                name,
                float(obs[feature]),
                self.stats.low[feature],
                self.stats.high[feature],
                self.fallbacks,
            )
            return self.fallback.predict(obs, state, episode_start, deterministic)
        if spell:
            _log.info(
                "observations%s back within the policy's training data after %d decision(s) by the heuristic: the "
                "learned policy decides again",
                where,
                spell,
            )
            del self._spells[stream]
        return self.policy.predict(obs, state, episode_start, deterministic)


def _feature_name(index: int, size: int) -> str:
    """``ObservationLayout.name`` for an observation of ``size`` features (``feature <i>`` if no layout has it)."""
    layout = ObservationLayout.for_size(size)
    return layout.name(index) if layout is not None else f"feature {index}"


def obs_stats_path(policy_zip: str | os.PathLike[str]) -> Path:
    """Where the observation stats of ``policy_zip`` live (beside it, ``.obs.json``; beside its file, for a symlink).

    A symlink's zip is written and read through the link: its stats beside the link went with another file than the
    weights (``latest.zip -> v1.zip``: new weights in ``v1.zip``, their range in ``latest.obs.json``).
    """
    path = Path(policy_zip)
    return (Path(os.path.realpath(path)) if path.is_symlink() else path).with_suffix(".obs.json")


def _is_number(value: Any) -> bool:
    """Whether ``value`` (read from JSON) is a number: an int or a float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)

"""Memory-elastic batching: LR gain rules with warm-up, micro-batch plans, OOM detection and recovery helpers.

Used by ``TrainingRun`` and ``Controller``; pure functions where possible so each rule is tested by value.
"""

from __future__ import annotations

import gc
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from triaccel_rl.config import LRRule
from triaccel_rl.errors import is_whole

__all__ = [
    "BatchLRCoupler",
    "Fault",
    "FaultPoint",
    "OOMEvent",
    "UnrecoverableOOMError",
    "find_batch_size",
    "inject_oom",
    "is_out_of_memory",
    "lr_gain",
    "plan_micro_batches",
    "release_memory",
    "resolve_lr_rule",
]

# Messages of out-of-memory errors that do not come as torch.OutOfMemoryError (cuBLAS/cuDNN workspaces,
# the CPU allocator), as matched by Lightning's and accelerate's batch-size finders.
_OOM_MESSAGES = (
    "out of memory",
    "cublas_status_alloc_failed",
    "cudnn_status_not_supported",
    "defaultcpuallocator: can't allocate memory",
)

# The most micro-batches ``plan_micro_batches`` plans for one step: a step of more than a million forward passes is
# no plan (and its list took gigabytes; 10**30 samples raised a bare OverflowError). A run's batch is at most its
# dataset, so a dataset of up to this many samples never meets it, even at micro-batches of one.
MAX_MICRO_BATCHES = 2**20


def lr_gain(rule: LRRule, batch_size: int, base_batch_size: int, noise_scale: float | None = None) -> float:
    """The LR multiplier for effective batch ``batch_size`` relative to ``base_batch_size`` under ``rule``.

    ``LINEAR``: ``B / B0``. ``SQRT``: ``sqrt(B / B0)``. ``NONE``: 1. ``ADASCALE``:
    ``(1 + B_noise / B0) / (1 + B_noise / B)`` with ``B_noise = noise_scale`` (samples). This is AdaScale's
    gain ratio ``(sigma^2 + mu^2) / (sigma^2 / S + mu^2)`` at scale ``S = B / B0`` once the variance of a
    ``B0``-sample gradient, ``sigma^2 = tr(Sigma) / B0``, and ``mu^2 = |G|^2`` are written with the noise scale
    ``B_noise = tr(Sigma) / |G|^2``. It tends to ``B / B0`` when the gradient is noise-dominated
    (``B_noise >> B``) and to 1 when it is noise-free; an unknown noise scale (``None`` or NaN) counts as 0, an
    infinite one gives the linear gain, its limit.

    Example:
        >>> lr_gain(LRRule.ADASCALE, 256, 64, noise_scale=64.0)
        1.6

    Raises:
        ValueError: batch sizes that are not whole numbers >= 1 (NaN passed ``< 1`` and gave a NaN gain), a
            negative noise scale, or the unresolved ``AUTO`` rule.
    """
    rule = LRRule.parse(rule)  # a name ("linear") was told to be resolved first
    if not (is_whole(batch_size) and is_whole(base_batch_size) and batch_size >= 1 and base_batch_size >= 1):
        raise ValueError(
            f"batch sizes must be whole numbers of samples >= 1; got {batch_size!r} and base {base_batch_size!r}"
        )
    # As Python numbers: a NumPy size gave a NumPy gain, which a coupler's state (a checkpoint) then carried.
    batch_size, base_batch_size = int(batch_size), int(base_batch_size)
    ratio = batch_size / base_batch_size
    if rule is LRRule.LINEAR:
        return ratio
    if rule is LRRule.SQRT:
        return math.sqrt(ratio)
    if rule is LRRule.NONE:
        return 1.0
    if rule is LRRule.ADASCALE:
        if noise_scale is not None and (isinstance(noise_scale, bool) or not isinstance(noise_scale, numbers.Real)):
            raise ValueError(f"noise_scale={noise_scale!r} must be a number of samples >= 0, or None (not measured)")
        noise = 0.0 if noise_scale is None or math.isnan(noise_scale) else float(noise_scale)
        if noise < 0:
            raise ValueError(f"noise_scale={noise_scale} must be >= 0 (samples)")
        if math.isinf(noise):  # the limit of a noise-dominated gradient; the formula would give inf / inf
            return ratio
        return (1.0 + noise / base_batch_size) / (1.0 + noise / batch_size)
    raise ValueError(f"lr rule {rule} must be resolved first (resolve_lr_rule)")


def resolve_lr_rule(rule: LRRule, optimizer: torch.optim.Optimizer | str) -> LRRule:
    """``AUTO`` → ``SQRT`` for Adam-family optimizers (Adam, AdamW, Adamax, NAdam, RAdam...), else ``LINEAR``.

    ``optimizer`` is the optimizer or its name (a task's ``"sgd"`` / ``"adamw"``).
    """
    rule = LRRule.parse(rule)  # "auto" came back unresolved
    if rule is not LRRule.AUTO:
        return rule
    name = optimizer if isinstance(optimizer, str) else type(optimizer).__name__
    return LRRule.SQRT if "adam" in name.lower() else LRRule.LINEAR


_COUPLER_KEYS = frozenset(
    {"rule", "base_batch_size", "batch_size", "target", "gain", "steps", "ramp_start", "ramp_step"}
)


class BatchLRCoupler:
    """Keeps the LR gain in step with the effective batch: a rule, plus warm-up after large rises.

    ``change(batch)`` is called when the effective batch changes; ``advance()`` once before each optimizer
    step, returning the gain that step uses. A change that raises the gain by ``warmup_above`` or more,
    after the first step, ramps it linearly over ``warmup_steps`` steps (step ``k`` after the change uses
    ``g_old + (g_new - g_old) * k / warmup_steps``, where ``g_old`` is the gain in force at the change, so an
    interrupted ramp restarts from where it was). Lower gains, and changes before the first step, apply at once.

    Args:
        rule: a resolved rule (not ``AUTO``).
        base_batch_size: the batch at which the gain is 1.
        batch_size: the starting effective batch.
        warmup_above: gain ratio at or above which a rise is warmed up (> 1).
        warmup_steps: steps of the ramp (0: none).

    Example:
        >>> coupler = BatchLRCoupler(LRRule.LINEAR, base_batch_size=64, batch_size=64, warmup_steps=4)
        >>> _ = coupler.advance()  # one step at batch 64
        >>> coupler.change(256)  # ×4: warmed up from 1.0
        1.0
        >>> [coupler.advance() for _ in range(5)]
        [1.75, 2.5, 3.25, 4.0, 4.0]
    """

    def __init__(
        self,
        rule: LRRule,
        base_batch_size: int,
        batch_size: int,
        warmup_above: float = 1.5,
        warmup_steps: int = 10,
    ) -> None:
        rule = LRRule.parse(rule)
        if rule is LRRule.AUTO:
            raise ValueError("resolve LRRule.AUTO for the optimizer first (resolve_lr_rule)")
        whole = isinstance(warmup_steps, numbers.Integral) and not isinstance(warmup_steps, bool)
        real = isinstance(warmup_above, numbers.Real) and not isinstance(warmup_above, bool)
        if not real or not (warmup_above > 1.0) or not whole or warmup_steps < 0:  # NaN included
            # A fractional ramp never met its end (step == warmup_steps) and left the gain past its target for good.
            raise ValueError(
                f"need warmup_above a number > 1 and warmup_steps a whole number >= 0; got {warmup_above!r}, "
                f"{warmup_steps!r}"
            )
        lr_gain(rule, batch_size, base_batch_size)  # checks the sizes before int() could cut 64.9 to 64
        self.rule = rule
        self.base_batch_size = int(base_batch_size)
        # As Python numbers: NumPy ones were kept, copied into the state (ramp_step too), and a Controller checkpoint
        # holding them failed torch.load(weights_only=True), the default since torch 2.6.
        self.warmup_above = float(warmup_above)
        self.warmup_steps = int(warmup_steps)
        self.batch_size = int(batch_size)
        self.target = lr_gain(rule, self.batch_size, self.base_batch_size)
        self.gain = self.target
        self.steps = 0
        self._ramp_start = self.gain
        self._ramp_step = self.warmup_steps  # steps taken on the current ramp; == warmup_steps when none runs

    @property
    def warming_up(self) -> bool:
        """True while a warm-up ramp is running."""
        return self._ramp_step < self.warmup_steps

    def change(self, batch_size: int, noise_scale: float | None = None) -> float:
        """Moves to effective batch ``batch_size``; returns the gain in force until the next ``advance()``.

        Args:
            batch_size: the new effective batch.
            noise_scale: the gradient-noise scale in samples (``ADASCALE`` only; ``None``: unknown).
        """
        target = lr_gain(self.rule, batch_size, self.base_batch_size, noise_scale)
        if batch_size == self.batch_size and target == self.target:
            return self.gain  # nothing changed: an ongoing ramp carries on
        self.batch_size = int(batch_size)
        self.target = target
        if self.steps > 0 and self.warmup_steps > 0 and target >= self.warmup_above * self.gain:
            self._ramp_start = self.gain
            self._ramp_step = 0
        else:
            self.gain = target
            self._ramp_step = self.warmup_steps
        return self.gain

    def with_rule(self, rule: LRRule, noise_scale: float | None = None) -> BatchLRCoupler:
        """A coupler of ``rule`` that carries on from this one (the same rule: this one, a ramp carrying on).

        It keeps this one's step count and starts from the gain in force, and moves to the new rule's gain at the
        current batch as :meth:`change` does: a rise of ``warmup_above`` or more after the first step is warmed up
        from the gain in force, anything else applies at once. (A fresh coupler counted no steps, so a switch of rule
        mid-run jumped to its gain, and a ramp in progress jumped to its end.)

        Args:
            rule: a resolved rule (not ``AUTO``).
            noise_scale: the gradient-noise scale in samples (``ADASCALE`` only; ``None``: unknown).
        """
        rule = LRRule.parse(rule)
        if rule is self.rule:
            return self
        new = BatchLRCoupler(rule, self.base_batch_size, self.batch_size, self.warmup_above, self.warmup_steps)
        new.steps = self.steps
        new.gain = new.target = new._ramp_start = self.gain  # in force, no ramp running: change() moves from it
        new.change(self.batch_size, noise_scale)
        return new

    def state_dict(self) -> dict[str, Any]:
        """The coupler's state: the batch, the gain and any warm-up ramp in progress."""
        return {"rule": self.rule.value, "base_batch_size": self.base_batch_size, "batch_size": self.batch_size,
                "target": self.target, "gain": self.gain, "steps": self.steps, "ramp_start": self._ramp_start,
                "ramp_step": self._ramp_step, "warmup_steps": self.warmup_steps}  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resumes from ``state_dict()``'s output.

        A ramp in progress carries on where it was when this coupler has the state's ``warmup_steps``; with
        other ``warmup_steps`` it restarts from the gain in force, over this coupler's steps (as an interrupted
        ramp does in ``change``). A finished ramp stays finished.

        Raises:
            ValueError: the state lacks a key, holds a value of the wrong type or range (named), or is of another
                rule or another base batch.
        """
        if not isinstance(state, Mapping):
            raise ValueError(f"the LR coupler's state is the dict BatchLRCoupler.state_dict() returned; got {state!r}")
        missing = sorted(_COUPLER_KEYS - state.keys())
        if missing:
            raise ValueError(f"the LR coupler's state lacks {', '.join(missing)}; expected BatchLRCoupler.state_dict()")
        # Every value checked before any is set: a refused state leaves the coupler as it was.
        base = _state_count(state, "base_batch_size", 1)
        try:  # "linear" as state_dict() writes it, or LRRule.LINEAR in a state made by hand
            rule = LRRule.parse(state["rule"])
        except ValueError:
            rule = None
        if rule is not self.rule or base != self.base_batch_size:
            raise ValueError(
                f"the LR coupler's state is for rule {state['rule']!r} at base batch {state['base_batch_size']}; "
                f"this one is {self.rule.value!r} at base batch {self.base_batch_size}"
            )
        batch_size, steps = _state_count(state, "batch_size", 1), _state_count(state, "steps", 0)
        ramp_step = _state_count(state, "ramp_step", 0)
        target, gain, ramp_start = (_state_gain(state, key) for key in ("target", "gain", "ramp_start"))
        # (a state saved before warmup_steps was in it is taken to have this coupler's)
        saved_steps = _state_count(state, "warmup_steps", 0) if "warmup_steps" in state else self.warmup_steps
        self.batch_size, self.steps, self.target, self.gain = batch_size, steps, target, gain
        self._ramp_start, self._ramp_step = ramp_start, ramp_step
        # A ramp's progress counts against the warm-up it was saved with, and a ramp whose gain reached its target is
        # over. Read against other warmup_steps, a finished ramp could restart below its target (the LR fell), or one
        # in progress outrun them and stop short of its target for good.
        running = self._ramp_step < saved_steps and not math.isclose(self.gain, self.target, rel_tol=1e-12)
        if not running or self.warmup_steps == 0:
            self.gain, self._ramp_step = self.target, self.warmup_steps
        elif saved_steps != self.warmup_steps:
            self._ramp_start, self._ramp_step = self.gain, 0

    def advance(self) -> float:
        """Counts one optimizer step and returns the gain that step uses."""
        self.steps += 1
        if self.warming_up:
            self.gain = self.next_gain()
            self._ramp_step += 1
        return self.gain

    def next_gain(self) -> float:
        """The gain the next step will use (what :meth:`advance` returns next), counting nothing."""
        if not self.warming_up:
            return self.gain
        step = self._ramp_step + 1
        # The last step lands on the target itself: ``start + (target - start) * 1.0`` can miss it by an ulp.
        ramped = self._ramp_start + (self.target - self._ramp_start) * (step / self.warmup_steps)
        return self.target if step == self.warmup_steps else ramped


def _state_count(state: Mapping[str, Any], key: str, least: int) -> int:
    """``state[key]`` if it is a whole number >= ``least`` (an int, not a bool or float), else a ValueError."""
    value = state[key]
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise ValueError(f"the LR coupler's state has {key} {value!r}, not a whole number >= {least}")
    return int(value)


def _state_gain(state: Mapping[str, Any], key: str) -> float:
    """``state[key]`` if it is a finite number > 0 (an LR gain), else a ValueError naming it."""
    value = state[key]
    number = not isinstance(value, bool) and isinstance(value, numbers.Real)
    if not (number and math.isfinite(value) and value > 0):
        raise ValueError(f"the LR coupler's state has {key} {value!r}, not a finite number > 0")
    return float(value)


def plan_micro_batches(batch_size: int, max_micro_batch: int) -> list[int]:
    """Splits ``batch_size`` samples into micro-batches of at most ``max_micro_batch``, largest first.

    Greedy: full micro-batches then the remainder, so the peak memory (set by the largest) fills the plan. A
    remainder of one sample takes one more from the micro-batch before it (33 at 16: 16, 15, 2): a one-sample
    micro-batch cannot train a model with batch norm, which needs two samples a channel. At a ``max_micro_batch`` of
    2 there is none to take (7 at 2: 2, 2, 2, 1): the cap is what memory holds, and a model without batch norm
    trains on the plan.

    Example:
        >>> plan_micro_batches(10, 4)
        [4, 4, 2]
        >>> plan_micro_batches(9, 4)
        [4, 3, 2]

    Raises:
        ValueError: a non-positive size, or a plan of more than ``MAX_MICRO_BATCHES`` (2**20) micro-batches.
    """
    whole = all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in (batch_size, max_micro_batch))
    if not whole or batch_size < 1 or max_micro_batch < 1:  # 10.0 raised a TypeError from the list's length
        raise ValueError(
            f"need whole numbers batch_size >= 1 and max_micro_batch >= 1; got {batch_size!r}, {max_micro_batch!r}"
        )
    count = -(-batch_size // max_micro_batch)
    if count > MAX_MICRO_BATCHES:
        raise ValueError(
            f"batch_size={batch_size} at max_micro_batch={max_micro_batch} is {count} micro-batches; at most "
            f"{MAX_MICRO_BATCHES} (2**20) are planned for one step: pass a smaller batch or a larger micro-batch"
        )
    full, rest = divmod(batch_size, max_micro_batch)
    sizes = [max_micro_batch] * full + ([rest] if rest else [])
    if rest == 1 and full and max_micro_batch >= 3:
        sizes[-2:] = [max_micro_batch - 1, 2]
    return sizes


def is_out_of_memory(error: BaseException) -> bool:
    """True for an out-of-memory error: ``torch.OutOfMemoryError`` or a ``RuntimeError`` saying so."""
    if isinstance(error, torch.cuda.OutOfMemoryError):  # torch.OutOfMemoryError is the same class
        return True
    return isinstance(error, RuntimeError) and any(m in str(error).lower() for m in _OOM_MESSAGES)


def release_memory(device: torch.device) -> None:
    """Frees what an aborted step left: unreachable tensors, and on CUDA the allocator's cached blocks.

    Call it after the ``except`` block that caught the error has ended: until then the traceback's frames
    hold the failed forward pass's activations. Its full garbage collection takes 0.1 to 1 s in a process with torch,
    Triton and SB3 loaded (~200k objects): a recovery's cost, not a way to free a finished run (``TrainingRun.close``
    breaks its cycles, and reference counting frees it).
    """
    gc.collect()  # reference cycles through autograd graphs
    if device.type == "cuda":
        torch.cuda.empty_cache()


class UnrecoverableOOMError(RuntimeError):
    """Out of memory more than ``max_oom_retries`` times in a step, split as far as allowed.

    A micro-batch of two (or of one, where the batch or the cap is one) is retried as it is.
    """


@dataclass(frozen=True)
class OOMEvent:
    """One recovered out-of-memory error.

    Attributes:
        step: index of the optimizer step it happened in (0-based).
        micro_batch_size: samples in the micro-batch that failed (the shorter last one of a split has fewer than
            ``split_micro_batch_size``).
        retry_micro_batch_size: the micro-batch size the step was retried with.
        budget_before_bytes: the memory budget before the event.
        budget_after_bytes: the lowered budget (``ElasticConfig.oom_budget_factor``).
        message: first line of the error.
        split_micro_batch_size: the micro-batch size the failed attempt split the batch into, from which the budget
            and the retry were derived.
    """

    step: int
    micro_batch_size: int
    retry_micro_batch_size: int
    budget_before_bytes: int
    budget_after_bytes: int
    message: str
    split_micro_batch_size: int


@dataclass(frozen=True)
class FaultPoint:
    """Where a step is when a fault hook is called (for injecting errors in tests).

    Attributes:
        step: index of the optimizer step (0-based).
        attempt: retry of that step (0 = first try).
        micro_index: index of the micro-batch within the attempt.
        micro_batch_size: samples in that micro-batch.
        phase: ``"forward"`` (before the forward pass) or ``"backward"`` (before the backward pass).
    """

    step: int
    attempt: int
    micro_index: int
    micro_batch_size: int
    phase: str


Fault = Callable[[FaultPoint], None]
"""A hook called at each ``FaultPoint``; raising from it simulates an error at that point."""


def inject_oom(when: Callable[[FaultPoint], bool]) -> Fault:
    """A fault hook raising ``torch.OutOfMemoryError`` at every point where ``when(point)`` is true.

    Example:
        >>> fault = inject_oom(lambda point: point.micro_batch_size > 32)  # a device that holds 32 samples
    """

    def fault(point: FaultPoint) -> None:
        if when(point):
            raise torch.cuda.OutOfMemoryError(
                f"out of memory (injected) at step {point.step}, attempt {point.attempt}, micro-batch "
                f"{point.micro_index} of {point.micro_batch_size} samples, {point.phase}"
            )

    return fault


def find_batch_size(fits: Callable[[int], bool], limit: int, start: int = 1) -> int:
    """Largest power of two in ``[start, limit]`` for which ``fits`` holds, doubling from ``start``.

    The search of Lightning's ``BatchSizeFinder`` in ``power`` mode: double until a size fails (or would
    pass ``limit``) and keep the last that fitted. Returns 0 when ``start`` itself does not fit.

    Example:
        >>> find_batch_size(lambda b: b * 100 <= 5000, limit=4096)
        32

    Raises:
        ValueError: ``limit`` is below 1, or ``start`` is not a power of two or is above ``limit``.
    """
    if isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit < 1:
        raise ValueError(f"limit={limit!r} must be a whole number >= 1 (the largest batch to try)")
    if (
        isinstance(start, bool)
        or not isinstance(start, numbers.Integral)
        or start < 1
        or start & (start - 1)
        or start > limit
    ):
        raise ValueError(f"start={start!r} must be a power of two in [1, limit={limit}]")
    found = 0
    size = start
    while size <= limit and fits(size):
        found = size
        size *= 2
    return found

"""``Executor``: applies a decoded ``Action`` to a run — precision per layer, LR scale, batch size — within bounds.

It is also the safety shield: whatever a policy asks, the LR multiplier moves by at most
``max_lr_change`` per decision, no layer is lowered in precision while the overflow rate is above
``heuristic.max_overflow_rate`` (every fp16 layer moves to bf16 then, to fp32 on a GPU without bf16), a layer asked for
a format the device cannot compute in (bf16 on a V100 or T4) runs in fp32, and a batch growth that the memory model
predicts over the usable budget (``usable_memory_bytes``: ``elastic.fill_frac`` of it) is refused. Where the target
cannot split a step (``splits_batches`` False: a user's loop through the ``Controller``), a precision change that the
memory model predicts over the usable budget at the current batch is refused too: more bits per activation (a raise),
or a 16-bit weight copy outweighing the activations it saves (a lowering on a weight-heavy model), would make a step
that fitted run out of memory. Where it can split a step, a change that puts one sample over it is refused. A change
that lowers a prediction already over the budget is taken. Under overflow an fp16 layer leaves fp16 even where the
way out (fp32 on a GPU without bf16) breaks the memory check, which the report says. Every refusal is reported
with its reason.

Batch moves change the *effective* batch (samples per update); how it is split into micro-batches to fit
memory is the target's business (``TrainingRun.micro_batch_size``). So the executor never shrinks a batch
by itself: a budget lowered after an out-of-memory error is met by accumulation, not by a smaller batch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from triaccel_rl.config import ControllerConfig
from triaccel_rl.engine import StepEngine, check_precision_supported
from triaccel_rl.observation import LayerGrouper
from triaccel_rl.types import Action, BatchMove, Precision

__all__ = ["ApplyReport", "Executor", "Target", "sixteen_bit_formats", "unsupported_precisions"]

_log = logging.getLogger("triaccel_rl")

_LR_BOUND_SLACK = 1e-12
"""Relative amount by which an asked LR scale may pass the ``max_lr_change`` bound before it is clamped, and a clamped
one may miss a rung of ``lr_scales`` and be put on it (rounding)."""


class Target(Protocol):
    """What the executor drives: a ``TrainingRun``, or the Controller's view of a user's loop."""

    engine: StepEngine
    memory_budget_bytes: int

    @property
    def usable_memory_bytes(self) -> int:
        """The share of the budget a step may be planned to fill."""
        ...

    @property
    def max_batch_size(self) -> int:
        """Largest batch the data allows."""
        ...

    @property
    def batch_size(self) -> int:
        """Samples per optimizer step."""
        ...

    @batch_size.setter
    def batch_size(self, value: int) -> None: ...

    @property
    def splits_batches(self) -> bool:
        """Whether a step too large for memory is split into micro-batches (and an out-of-memory step retried)."""
        ...

    def predicted_memory_bytes(self, batch_size: int, precisions: Sequence[Precision] | None = None) -> int:
        """Predicted peak memory of an unsplit step of ``batch_size`` at ``precisions`` (None: the current ones)."""
        ...


@dataclass
class ApplyReport:
    """What an ``apply`` did.

    Attributes:
        precisions: per-layer precisions now in force.
        lr_scale: the LR multiplier now in force.
        batch_size: the batch size now in force.
        changed_precision: layers whose precision changed.
        changed: whether anything changed: a layer's precision, the LR multiplier or the batch size.
        refused: one human-readable reason per part of the action that was not applied as asked.
    """

    precisions: list[Precision]
    lr_scale: float
    batch_size: int
    changed_precision: int = 0
    changed: bool = False
    refused: list[str] = field(default_factory=list)


class Executor:
    """Applies actions to a target, enforcing the configured bounds.

    Args:
        config: bounds (batch range, LR change per decision, overflow threshold).
        grouper: maps the action's groups to layers.
    """

    def __init__(self, config: ControllerConfig, grouper: LayerGrouper) -> None:
        self.config = config
        self.grouper = grouper

    def start(self, action: Action, target: Target) -> ApplyReport:
        """Applies a static policy's configuration before the first step, warning of each part not applied as asked.

        A decision's refusals are logged at INFO: the next decision may ask again. A static configuration holds for the
        whole run, so a part of it not applied (bf16 on a V100 or T4 runs in fp32) makes a run other than the one asked
        for, which the user is told of rather than left to find in a slow, fp32-sized row labelled bf16.
        """
        report = self.apply(action, target)
        for reason in report.refused:
            _log.warning("the static configuration does not run as asked: %s", reason)
        return report

    def apply(self, action: Action, target: Target, overflow_rate: float = 0.0) -> ApplyReport:
        """Applies ``action`` to ``target``; parts that break a bound are clamped or refused.

        Args:
            action: the decoded decision.
            target: the run or loop it applies to.
            overflow_rate: share of the interval's steps skipped for non-finite gradients, in [0, 1].

        Raises:
            ValueError: an action of another number of groups, an LR scale that is not a positive number, or an
                overflow rate outside [0, 1] (NaN included: either would turn a bound of the shield off).
        """
        if len(action.group_precisions) != self.grouper.n_groups:
            raise ValueError(
                f"action has {len(action.group_precisions)} group precisions; expected {self.grouper.n_groups}"
            )
        # NaN passes every clamp (each comparison with it is false): it reached the engine as the LR multiplier.
        if not (math.isfinite(action.lr_scale) and action.lr_scale > 0):
            raise ValueError(f"action lr_scale={action.lr_scale!r} must be a positive finite multiplier")
        if not (0.0 <= overflow_rate <= 1.0):  # NaN would never exceed max_overflow_rate: the shield off
            raise ValueError(f"overflow_rate={overflow_rate!r} must be a share of steps in [0, 1]")
        engine = target.engine
        refused: list[str] = []
        current = list(engine.precision.precisions)
        wanted = list(current)
        for group, precision in enumerate(action.group_precisions):
            for layer in self.grouper.layers_of(group):
                wanted[layer] = precision
        unsupported = unsupported_precisions(engine.device)
        out_of_fp16 = _way_out_of_fp16(unsupported)
        # A format the device cannot compute in (bf16 on a V100 or T4) is run as the shield runs an overflowing fp16
        # layer: in fp32, never in fp16, whose narrower range a policy asking bf16 did not choose. Before, the engine
        # refused the whole precision map, a raise to fp32 with it.
        for precision, reason in unsupported.items():
            asked = [i for i in range(len(wanted)) if wanted[i] is precision]
            if asked:
                for i in asked:
                    wanted[i] = Precision.FP32
                refused.append(f"ran {len(asked)} layers asked for {precision.name.lower()} in fp32: {reason}")
        unstable = overflow_rate > self.config.heuristic.max_overflow_rate
        in_fp16: set[int] = set()  # layers the overflow rule moves out of fp16 (asked for it, or kept there)
        if unstable:
            max_rate = self.config.heuristic.max_overflow_rate
            lowered = [i for i in range(len(current)) if wanted[i].bits < current[i].bits]
            for i in lowered:
                wanted[i] = current[i]
            if lowered:
                refused.append(
                    f"kept {len(lowered)} layers at their precision: overflow rate {overflow_rate:.3g} > {max_rate:g}"
                )
            # fp16's narrow range is the usual cause of overflow: move fp16 layers to bf16 (fp32 without bf16). A layer
            # asked for fp16, or kept there, is one the policy did not get as asked: said (below, with the layers the
            # memory check puts back there), as every refusal is.
            in_fp16 = {i for i in range(len(wanted)) if wanted[i] is Precision.FP16}
            wanted = [out_of_fp16(p) for p in wanted]
        # Any change, not only a raise: a lowered layer's 16-bit weight copy (2 bytes a parameter) can outweigh the
        # activations it saves on a weight-heavy model. A step that cannot be split must fit whole; one that can, one
        # sample at a time. A change that moves a prediction already over the budget down is taken.
        moved = [i for i in range(len(current)) if wanted[i] != current[i]]
        over_budget = ""  # why the layers the overflow rule moves out of fp16 pass the memory check, if they do
        if moved:
            batch = 1 if target.splits_batches else target.batch_size
            predicted = target.predicted_memory_bytes(batch, wanted)
            usable = target.usable_memory_bytes
            predicted_now = target.predicted_memory_bytes(batch, current)
            if predicted > usable and predicted > predicted_now:
                # Kept where they were, but out of fp16 while it overflows, as every layer is: what the overflow rule
                # alone would make of them.
                kept_at = [out_of_fp16(p) if unstable else p for p in current]
                held = [i for i in moved if wanted[i] != kept_at[i]]
                for i in moved:
                    wanted[i] = kept_at[i]
                if held:
                    from_fp16 = [i for i in held if current[i] is Precision.FP16 and unstable]
                    in_fp16.update(from_fp16)
                    out = f", the {len(from_fp16)} in fp16 moved out of it as it overflows" if from_fp16 else ""
                    refused.append(
                        f"kept {len(held)} layers at their precision{out}: {_over_budget(target, predicted)}"
                    )
                # Out of fp16 as asked, but over the budget: to fp32 on a GPU without bf16, a raise the memory check
                # would refuse. The overflow rule wins (fp16 would go on skipping steps), and the report says so.
                forced = [i for i in moved if i not in held and kept_at[i] != current[i]]
                if forced:
                    still = target.predicted_memory_bytes(batch, wanted)
                    if still > usable and still > predicted_now:
                        in_fp16.update(forced)
                        over_budget = f"; the overflow rule overrides the memory check: {_over_budget(target, still)}"
        if unstable and in_fp16:
            refused.append(
                f"moved {len(in_fp16)} layers out of fp16 (to {out_of_fp16(Precision.FP16).name.lower()}): "
                f"overflow rate {overflow_rate:.3g} > {self.config.heuristic.max_overflow_rate:g}{over_budget}"
            )
        try:
            engine.set_precisions(wanted)
        except ValueError as err:
            refused.append(f"precision not applied: {err}")
        changed = sum(a != b for a, b in zip(current, engine.precision.precisions, strict=True))

        before = (engine.lr_scale, target.batch_size)
        limit = self.config.max_lr_change
        low, high = engine.lr_scale / limit, engine.lr_scale * limit
        # A relative slack for rounding: with rungs exactly max_lr_change apart, 0.3 * 1.5 is one ulp below 0.45, and a
        # one-rung move read as clamped ("0.45 clamped to 0.45") and left the multiplier off the ladder. A clamp to a
        # bound that is a rung but for rounding lands on that rung: 0.675 asked from 0.3 stopped at 0.44999999999999996,
        # and equality checks against the ladder (encode, the heuristic's rungs) missed it from then on.
        lr_scale = action.lr_scale
        if lr_scale > high * (1 + _LR_BOUND_SLACK):
            lr_scale = _on_ladder(high, self.config.lr_scales)
        elif lr_scale < low * (1 - _LR_BOUND_SLACK):
            lr_scale = _on_ladder(low, self.config.lr_scales)
        if lr_scale != action.lr_scale:
            refused.append(f"LR scale {action.lr_scale} clamped to {lr_scale:.4g} (at most ×{limit} per decision)")
        engine.lr_scale = lr_scale

        batch = target.batch_size
        if batch < 1 and action.batch_move is not BatchMove.KEEP:  # a Controller's loop serving its own batches
            refused.append(
                f"batch {action.batch_move.name.lower()}: batch moves apply to ctl.loader()'s batches; this "
                "loop serves its own"
            )
        elif action.batch_move is BatchMove.GROW:
            limit = min(self.config.max_batch_size, target.max_batch_size)
            grown = min(batch * 2, limit)
            predicted = target.predicted_memory_bytes(grown)
            usable = target.usable_memory_bytes
            if batch > limit:  # set above it (by hand, or a base batch above an eighth of the data): kept, not cut
                bound = (
                    f"max_batch_size={limit}"
                    if limit == self.config.max_batch_size
                    else f"the data's largest batch {limit} (an eighth of the training samples)"
                )
                refused.append(f"batch {batch} is above {bound}")
            elif grown <= batch:
                refused.append(f"batch {batch} already at its largest allowed size {limit}")
            elif predicted > usable:
                refused.append(
                    f"batch {grown} refused: predicted {predicted} bytes > {usable} usable "
                    f"of the {target.memory_budget_bytes}-byte budget"
                )
            else:
                target.batch_size = grown
        elif action.batch_move is BatchMove.SHRINK:
            # Never above the batch now: one that started below min_batch_size (a user's small batch) stays there.
            shrunk = min(batch, max(batch // 2, self.config.min_batch_size))
            if shrunk == batch:  # not written: the setter re-targets the LR gain (to a new noise scale, say)
                refused.append(f"batch {batch} already at or below min_batch_size={self.config.min_batch_size}")
            else:
                target.batch_size = shrunk
        return ApplyReport(
            precisions=list(engine.precision.precisions),
            lr_scale=engine.lr_scale,
            batch_size=target.batch_size,
            changed_precision=changed,
            changed=changed > 0 or (engine.lr_scale, target.batch_size) != before,
            refused=refused,
        )


def unsupported_precisions(device: torch.device) -> dict[Precision, str]:
    """The precisions ``device`` cannot compute in, each with the engine's reason: bf16 on a V100 or T4, else none.

    Example:
        >>> unsupported_precisions(torch.device("cpu"))
        {}
    """
    reasons: dict[Precision, str] = {}
    for precision in Precision:
        try:
            check_precision_supported(precision, device)
        except ValueError as err:
            reasons[precision] = str(err)
    return reasons


def sixteen_bit_formats(device: torch.device) -> tuple[Precision, ...]:
    """The 16-bit formats ``device`` computes in, bf16 first: both, or fp16 alone on a V100 or T4.

    Example:
        >>> sixteen_bit_formats(torch.device("cpu"))
        (<Precision.BF16: 1>, <Precision.FP16: 2>)
    """
    unsupported = unsupported_precisions(device)
    return tuple(p for p in (Precision.BF16, Precision.FP16) if p not in unsupported)


def _on_ladder(lr_scale: float, ladder: Sequence[float]) -> float:
    """The rung of ``ladder`` that ``lr_scale`` is but for rounding (within ``_LR_BOUND_SLACK``), else ``lr_scale``."""
    return next((rung for rung in ladder if math.isclose(lr_scale, rung, rel_tol=_LR_BOUND_SLACK)), lr_scale)


def _over_budget(target: Target, predicted_bytes: int) -> str:
    """Why a step at the new precisions does not fit: ``predicted_bytes`` of an unsplit step, or of one sample."""
    if target.splits_batches:
        return (
            f"one sample at the new precisions is predicted {predicted_bytes} bytes > {target.usable_memory_bytes} "
            f"usable of the {target.memory_budget_bytes}-byte budget"
        )
    return (
        f"batch {target.batch_size} at the new precisions is predicted {predicted_bytes} bytes > "
        f"{target.usable_memory_bytes} usable of the {target.memory_budget_bytes}-byte budget, and this loop cannot "
        "split a step"
    )


def _way_out_of_fp16(unsupported: Mapping[Precision, str]) -> Callable[[Precision], Precision]:
    """What an overflowing fp16 layer moves to: bf16 (the same bytes, a wider range), or fp32 on a GPU without bf16.

    Before, a V100's or T4's fp16 layers were moved to bf16, which the engine refused: the whole precision action
    was dropped, a raise to fp32 with it, and the layers stayed in fp16 while it overflowed.
    """
    way_out = Precision.FP32 if Precision.BF16 in unsupported else Precision.BF16

    def out_of_fp16(precision: Precision) -> Precision:
        return way_out if precision is Precision.FP16 else precision

    return out_of_fp16

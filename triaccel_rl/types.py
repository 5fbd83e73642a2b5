"""Plain data types shared by every stage: precisions, step statistics, signals, actions, the policy protocol.

This module imports only `triaccel_rl.errors` (which imports nothing of ours), so any stage can depend on it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from triaccel_rl.errors import is_finite_real

__all__ = [
    "Action",
    "BatchMove",
    "CurvatureSparsity",
    "LayerInfo",
    "Policy",
    "Precision",
    "Signals",
    "StepStats",
]


class Precision(enum.IntEnum):
    """Compute precision of a layer's matmul or convolution.

    The integer value is the index used in the environment's action space.
    """

    FP32 = 0
    BF16 = 1
    FP16 = 2

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype the layer computes in."""
        return _PRECISION_DTYPES[self]

    @property
    def bits(self) -> int:
        """Bits per element of this precision."""
        return 32 if self is Precision.FP32 else 16

    @classmethod
    def parse(cls, value: Precision | str | int) -> Precision:
        """Turns 'bf16', 1 or Precision.BF16 into Precision.BF16, with a clear error otherwise."""
        if isinstance(value, Precision):
            return value
        if isinstance(value, str):
            try:
                return cls[value.strip().upper()]
            except KeyError:
                pass
        elif (
            isinstance(value, (int, np.integer))
            and not isinstance(value, bool)  # True is 1 to Python, not a precision
            and int(value) in {p.value for p in cls}
        ):
            return cls(int(value))
        allowed = ", ".join(p.name.lower() for p in cls)
        raise ValueError(f"unknown precision {value!r}; allowed: {allowed}")


_PRECISION_DTYPES = {
    Precision.FP32: torch.float32,
    Precision.BF16: torch.bfloat16,
    Precision.FP16: torch.float16,
}


class BatchMove(enum.IntEnum):
    """Relative batch-size move chosen by a policy at a decision."""

    SHRINK = 0
    KEEP = 1
    GROW = 2


@dataclass(frozen=True)
class LayerInfo:
    """A parameter-owning module of the model, as the controller sees it.

    Attributes:
        name: qualified module name in the model (``"layer1.0.conv1"``).
        n_params: number of trainable parameter elements the module owns directly.
        controllable: True for matmul/conv modules whose compute precision the controller sets;
            norms and embeddings stay in fp32 but still get gradient statistics.
    """

    name: str
    n_params: int
    controllable: bool


@dataclass
class StepStats:
    """What one optimizer step reports.

    Attributes:
        loss: mean training loss of the step's batch (NaN or inf when the step diverged).
        batch_size: samples in the step (all micro-batches together).
        step_time_ms: wall time of the step, measured with CUDA events on a GPU, ``perf_counter`` on CPU.
        modelled_time_ms: time the step would take on the profiled GPU (equals ``step_time_ms``
            when the cost mode is ``measured``).
        memory_bytes: peak memory of the step (device allocator on GPU, the run's own accounting on CPU).
        skipped: True when the update was skipped because a gradient was non-finite.
        grad_sq_sum: per layer, the sum of squared gradient elements (unscaled), shape ``[n_layers]``.
        grad_abs_max: per layer, the largest absolute gradient element, shape ``[n_layers]``.
        grad_nonfinite: per layer, the count of non-finite gradient elements, shape ``[n_layers]``.
        lr: the global learning rate applied at this step (after the controller's scale).
        oom_events: out-of-memory errors recovered during this step.
    """

    loss: float
    batch_size: int
    step_time_ms: float
    modelled_time_ms: float
    memory_bytes: int
    skipped: bool
    grad_sq_sum: np.ndarray
    grad_abs_max: np.ndarray
    grad_nonfinite: np.ndarray
    lr: float
    oom_events: int = 0


@dataclass(frozen=True)
class CurvatureSparsity:
    """How concentrated each layer's curvature diagonal is (``triaccel_rl.signals.curvature_sparsity``).

    For a layer with diagonal ``d`` of ``n`` elements, mass ``m_i = |d_i|`` and ``k(p) = max(1, ceil(p * n))``:

    Attributes:
        top1_share: per layer, the share of ``sum(m)`` held by the ``k(0.01)`` largest ``m_i``, in (0, 1].
        top10_share: per layer, the share of ``sum(m)`` held by the ``k(0.1)`` largest ``m_i``, in (0, 1].
        small_frac: per layer, the fraction of coordinates with ``m_i <= threshold * mean(m)``, in [0, 1].
        top10_ratio: per layer, the mean of the top-decile ``m_i`` over the mean of all ``m_i``
            (``top10_share * n / k(0.1)``), in [1, n / k(0.1)]; 1 for a flat diagonal.
    """

    top1_share: np.ndarray
    top10_share: np.ndarray
    small_frac: np.ndarray
    top10_ratio: np.ndarray


@dataclass
class Signals:
    """The live-run summary a policy decides from, one snapshot per decision interval.

    All per-layer arrays have shape ``[n_layers]`` in the order of ``TrainingRun.layers``.

    Attributes:
        loss: smoothed training loss (EMA).
        loss_trend: change of ``probe_loss`` over the last interval relative to its previous size (divided by
            ``|previous|``: negative = improving, for a negative loss too; 0 while unknown).
        probe_loss: loss on a fixed held-out probe batch at the end of the interval, without gradients, in the layers'
            precisions on a GPU and fp32 on a CPU (``TrainingRun.probe_loss``); in a user's loop without a probe batch
            (``Controller(probe=None)``) the smoothed training loss stands in for it.
        curvature: per-layer mean curvature per parameter, non-negative: ``|tr(H_l)| / n_l`` from the
            Hutchinson estimator once a scheduled round has run, else the mean diagonal of the
            mini-batch empirical Fisher (``extra["curvature_source"]`` says which).
        grad_variance: per-layer mean per-element variance of the mini-batch gradient at the current batch
            size, ``tr(Sigma_l) / (B * n_l)``, non-negative.
        grad_norm: per-layer gradient L2 norm (EMA of the per-step norm).
        snr: per-layer signal-to-noise ratio of the mini-batch gradient ``|G_l|^2 / (tr(Sigma_l) / B)``,
            non-negative; 1 (neutral) where both are 0 (a layer whose gradient is exactly zero, or unused).
        noise_scale: simple gradient-noise scale ``B_simple = tr(Sigma) / |G|^2`` in samples. These three
            come from unbiased micro-batch estimates once a round has run; before that (or with
            ``SignalMode.CHEAP``) from the biased optimizer-moment proxy (``triaccel_rl.signals.collector``),
            a neutral even split (SNR 1, noise scale = the batch) for layers whose optimizer keeps no running mean
            (``extra["grad_mean_unknown_layers"]``).
        memory_bytes: peak memory used in the interval.
        memory_budget_bytes: the budget the controller must respect.
        step_time_ms: mean step time (measured or modelled, per the cost mode) in the interval.
        step_time_trend: relative change of the step time against the previous interval.
        overflow_rate: fraction of steps in the interval whose update was skipped (non-finite grads).
        batch_size: current batch size in samples.
        lr_scale: current global LR multiplier chosen by the controller.
        precisions: per-layer current precision (``Precision`` values), shape ``[n_layers]``.
        n_params: per-layer parameter counts, shape ``[n_layers]``.
        controllable: per-layer mask of layers whose precision the controller sets.
        progress: fraction of the training budget used so far, in [0, 1].
        overhead_frac: share of training time the signal collection itself cost so far.
        hessian_trace: per-layer Hutchinson estimate of ``tr(H_l)`` (signed, smoothed over rounds);
            ``None`` until a scheduled round has run.
        sparsity: concentration of each layer's curvature diagonal; ``None`` until measured.
        lr_factors: per-layer curvature-scaled LR factors suggested by the collector
            (``triaccel_rl.signals.curvature_lr_factors``); applied only where the caller opts in.
        extra: anything else worth logging (not observed by policies).
    """

    loss: float
    loss_trend: float
    probe_loss: float
    curvature: np.ndarray
    grad_variance: np.ndarray
    grad_norm: np.ndarray
    snr: np.ndarray
    noise_scale: float
    memory_bytes: int
    memory_budget_bytes: int
    step_time_ms: float
    step_time_trend: float
    overflow_rate: float
    batch_size: int
    lr_scale: float
    precisions: np.ndarray
    n_params: np.ndarray
    controllable: np.ndarray
    progress: float = 0.0
    overhead_frac: float = 0.0
    hessian_trace: np.ndarray | None = None
    sparsity: CurvatureSparsity | None = None
    lr_factors: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def headroom_frac(self) -> float:
        """Unused share of the memory budget, in [0, 1] (0 when at or over budget)."""
        if self.memory_budget_bytes <= 0:
            return 0.0
        return float(np.clip(1.0 - self.memory_bytes / self.memory_budget_bytes, 0.0, 1.0))


@dataclass(frozen=True)
class Action:
    """A decoded decision: precision per layer group, global LR multiplier, batch move.

    Attributes:
        group_precisions: one precision per layer group, most sensitive group first.
        lr_scale: multiplier on the task's scheduled learning rate (absolute, not relative).
        batch_move: shrink (halve), keep or grow (double) the batch size.
    """

    group_precisions: tuple[Precision, ...]
    lr_scale: float
    batch_move: BatchMove

    def __post_init__(self) -> None:
        """Precisions by name or code (``'bf16'``, 1) and moves by code (2) become the enums; others are refused.

        Before, ``batch_move=2`` was compared with ``BatchMove.GROW`` by identity and read as "keep", silently, and an
        integer precision failed deep in the executor on a missing attribute.

        Raises:
            ValueError: a precision or batch move that is none, or an LR scale that is not a positive finite number,
                naming it and what is allowed.
        """
        if isinstance(self.group_precisions, (str, bytes)) or not hasattr(self.group_precisions, "__iter__"):
            raise ValueError(f"group_precisions={self.group_precisions!r} must be a sequence of precisions")
        object.__setattr__(self, "group_precisions", tuple(Precision.parse(p) for p in self.group_precisions))
        move = self.batch_move
        if isinstance(move, bool) or not isinstance(move, (int, np.integer)) or int(move) not in (0, 1, 2):
            raise ValueError(f"batch_move={move!r} must be a BatchMove: shrink (0), keep (1) or grow (2)")
        object.__setattr__(self, "batch_move", BatchMove(int(move)))
        scale = self.lr_scale  # True passed as 1.0 before, into encode() and the logs
        if not (is_finite_real(scale) and scale > 0):  # (10 ** 400 raised an OverflowError in math.isfinite)
            raise ValueError(f"lr_scale={scale!r} must be a positive finite number (a multiplier on the scheduled LR)")
        object.__setattr__(self, "lr_scale", float(scale))


@runtime_checkable
class Policy(Protocol):
    """Anything that maps an observation to a raw action, with SB3's ``predict`` signature.

    Static, heuristic and learned (SB3) policies all satisfy it, so ``evaluate_policy`` and
    ``compare`` treat them alike.
    """

    def predict(
        self,
        observation: np.ndarray,
        state: tuple[np.ndarray, ...] | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...] | None]:
        """Returns the raw (MultiDiscrete) action for ``observation`` and the recurrent state."""
        ...

"""``BatchFinderPolicy``: the batch-size-finder baseline — the largest power of two that fits, fixed for the run.

What users run today: Lightning's ``BatchSizeFinder`` (``mode="power"``) doubles the batch until a trial
runs out of memory and keeps the last size that fitted; accelerate's ``find_executable_batch_size``
halves from a start until it runs. Here, before the first step, ``prepare(run)`` doubles from 1 while a
trial of the whole step fits the memory budget (``TrainingRun.fits_in_budget``: on a GPU a real forward
and backward pass measured by the allocator, elsewhere the memory model), up to the run's largest allowed
batch. The batch then stays fixed, the LR is scaled linearly from the task's base batch (Goyal et al.
2017), every layer runs in one precision, and nothing is split into micro-batches or recovered after an
out-of-memory error: this is the baseline a memory-elastic controller must beat.
"""

from __future__ import annotations

from typing import Protocol

from triaccel_rl.policies.static import StaticPolicy

from triaccel_rl.config import ControllerConfig, LRRule
from triaccel_rl.elastic import find_batch_size

__all__ = ["BATCH_FINDER_NAMES", "BatchFinderPolicy", "BatchFinderTarget"]

BATCH_FINDER_NAMES = ("batch-finder", "batch-finder-bf16", "batch-finder-fp16")
"""``batch-finder`` runs in fp32; the suffixed names in one 16-bit precision throughout."""


class BatchFinderTarget(Protocol):
    """What ``prepare`` needs of a run (``TrainingRun`` has it)."""

    memory_elastic: bool
    lr_rule: LRRule
    batch_size: int
    memory_budget_bytes: int

    @property
    def max_batch_size(self) -> int:
        """Largest batch the data allows."""
        ...

    def fits_in_budget(self, batch_size: int) -> bool:
        """Whether an unsplit step of ``batch_size`` samples fits the memory budget."""
        ...


class BatchFinderPolicy(StaticPolicy):
    """The batch-finder baseline: one precision, the largest power-of-two batch that fits, kept fixed.

    Args:
        name: one of ``BATCH_FINDER_NAMES``.
        config: bounds (``max_batch_size``) and the action layout.

    Example:
        >>> policy = BatchFinderPolicy("batch-finder-bf16")
        >>> import numpy as np
        >>> policy.predict(np.zeros(43, dtype=np.float32))[0].tolist()
        [1, 1, 1, 1, 2, 1]
    """

    def __init__(self, name: str = "batch-finder", config: ControllerConfig | None = None) -> None:
        if name not in BATCH_FINDER_NAMES:
            raise ValueError(f"unknown batch finder {name!r}; allowed: {', '.join(BATCH_FINDER_NAMES)}")
        # A static configuration (precision, LR scale 1, batch kept) whose batch ``prepare`` fixes first.
        super().__init__(name.removeprefix("batch-finder").removeprefix("-") or "fp32", config)
        self.name = name
        self.batch_size: int | None = None  # what prepare() found

    def prepare(self, run: BatchFinderTarget) -> int:
        """Finds the batch, fixes it on ``run`` with the linear LR rule; returns it.

        The largest power of two up to the run's and the config's largest batch, doubling from 2 (1 only where 2
        does not fit, or the limit is 1).

        Raises:
            ValueError: not even one sample fits the budget.
        """
        limit = min(self.config.max_batch_size, run.max_batch_size)
        # From two samples where the limit allows, as Lightning's finder: a batch norm in training mode refuses one
        # value a channel (BatchNorm1d after a Linear), and the trial at one sample raised torch's error, naming neither
        # the finder nor the batch. One sample is tried only where two do not fit.
        found = find_batch_size(run.fits_in_budget, limit=limit, start=2) if limit >= 2 else 0
        if found == 0:
            found = find_batch_size(run.fits_in_budget, limit=1)
        if found == 0:
            raise ValueError(
                f"batch finder: a batch of one sample does not fit the memory budget of {run.memory_budget_bytes} "
                "bytes; raise the budget (MemoryBudget) or run a smaller model"
            )
        run.memory_elastic = False  # the baseline neither accumulates nor recovers from OOM
        run.lr_rule = LRRule.LINEAR
        run.batch_size = found
        self.batch_size = found
        return found

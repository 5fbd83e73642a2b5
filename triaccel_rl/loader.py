"""Elastic batching over in-memory tensors: any batch size at any step, every sample once per epoch."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from triaccel_rl.errors import is_whole

__all__ = ["Batch", "ElasticLoader"]


@dataclass(frozen=True)
class Batch:
    """One batch: inputs, labels, and where it lies in the epoch.

    Attributes:
        x: inputs ``[batch, ...]`` on the loader's device.
        y: labels ``[batch]``.
        epoch: epoch index the samples belong to (0-based).
        indices: dataset indices of the samples (on the loader's device).
    """

    x: torch.Tensor
    y: torch.Tensor
    epoch: int
    indices: torch.Tensor


class ElasticLoader:
    """Serves batches of whatever size is asked at each step from tensors held on one device.

    Each epoch is a permutation fixed by ``(seed, epoch)``; batches are consecutive slices of it, and a
    batch never crosses an epoch boundary (the last batch of an epoch may be smaller; or one larger, where a batch
    would leave a single sample: see :meth:`next`). So every sample is seen exactly once per epoch, in the same order,
    whatever sequence of batch sizes occurred. The data
    lives on its device; each epoch's permutation is drawn on the CPU (the same order on every device) and copied
    over once an epoch, so a GPU run's batches are sliced on the device without a wait on the host.

    Example:
        >>> loader = ElasticLoader(torch.arange(10.0), torch.arange(10), seed=0)
        >>> [len(loader.next(4).y) for _ in range(3)]
        [4, 4, 2]
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> None:
        if not is_whole(seed) or seed < 0:  # np.int64(1) failed in the shuffle; True and 1.5 passed or failed late
            raise ValueError(f"seed={seed!r} must be a whole number >= 0")
        for name, value in (("x", x), ("y", y)):  # a list of labels failed at the first batch, as an index error
            if not isinstance(value, torch.Tensor):
                raise ValueError(
                    f"{name} must be a tensor (torch.as_tensor converts a list); got {type(value).__name__}"
                )
            if value.dim() == 0:  # len() of a 0-d tensor raised a bare TypeError
                raise ValueError(f"{name} must have a sample dimension first; got a 0-d tensor ({value.item()!r})")
        if len(x) != len(y):
            raise ValueError(f"inputs ({len(x)}) and labels ({len(y)}) must have the same length")
        if len(x) == 0:
            raise ValueError("cannot load batches from an empty dataset")
        self.x, self.y, self.seed = x, y, int(seed)
        self.epoch = 0
        self.cursor = 0
        self.samples_served = 0
        self._order = self._permutation(0)

    def __len__(self) -> int:
        return len(self.x)

    def next(self, batch_size: int) -> Batch:
        """Returns the next ``batch_size`` samples (fewer at the end of an epoch).

        One more where the epoch has ``batch_size + 1`` left (for a ``batch_size`` of 2 or more): the one sample left
        over joins this batch, as ``plan_micro_batches`` folds a one-sample remainder, because a batch norm in training
        mode cannot take a batch of one (it raised, the batch went back, and the same one came again at every retry).
        So an epoch of ``k * batch_size + 1`` samples has ``k`` batches, the last ``batch_size + 1``.

        Raises:
            ValueError: ``batch_size`` is not a positive integer.
        """
        batch_size = _batch_size(batch_size)
        epoch, cursor, order = self.epoch, self.cursor, self._order
        if cursor >= len(self.x):
            epoch, cursor = epoch + 1, 0
            order = self._permutation(epoch)
        indices = order[cursor : cursor + self.next_size(batch_size)]
        batch = Batch(self.x[indices], self.y[indices], epoch, indices)
        # The place moves once the batch is made, in one assignment: a Ctrl-C (or an error) before it serves nothing.
        # Moved a field at a time, one cut short part-way skipped an epoch, served an epoch in the last one's order,
        # or saved a state that check_state refuses.
        self.epoch, self.cursor, self.samples_served, self._order = (
            epoch,
            cursor + len(indices),
            self.samples_served + len(indices),
            order,
        )
        return batch

    def next_size(self, batch_size: int) -> int:
        """How many samples :meth:`next` serves for ``batch_size`` (a whole number >= 1) now.

        ``batch_size``; fewer at the end of an epoch; one more where it would leave a single sample. What reads the
        next step ahead of it (``TrainingRun.lr``: the schedule at the end of the next batch) counts with it: it read a
        folded batch as ``batch_size`` samples, one short.

        Raises:
            ValueError: ``batch_size`` is not a positive integer, as :meth:`next`'s.
        """
        batch_size = _batch_size(batch_size)
        left = len(self.x) - self.cursor
        if left <= 0:  # next() starts the next epoch first
            left = len(self.x)
        if batch_size >= 2 and left == batch_size + 1:
            return batch_size + 1
        return min(batch_size, left)

    def take_back(self, n_samples: int) -> None:
        """Returns the last ``n_samples`` served to the front of the queue (a step that was not applied).

        Raises:
            ValueError: not a whole number, or more samples than the current epoch has served.
        """
        if not is_whole(n_samples):  # 2.0 was taken, and the cursor a float from then on
            raise ValueError(f"n_samples={n_samples!r} must be a whole number of samples")
        n_samples = int(n_samples)
        if not (0 <= n_samples <= self.cursor):
            raise ValueError(f"cannot take back {n_samples} samples; {self.cursor} served this epoch")
        self.cursor, self.samples_served = self.cursor - n_samples, self.samples_served - n_samples  # together

    def epoch_batches(self, batch_size: int) -> Iterator[Batch]:
        """Yields the rest of the current epoch in batches of ``batch_size``; at an epoch's end, the whole next epoch.

        A batch never crosses the epoch's end (the last may be smaller). Once the current epoch is all served (the
        cursor at its end, as after ``next(len(loader))``), it yields the whole next epoch, not nothing.
        """
        epoch = self.epoch if self.cursor < len(self.x) else self.epoch + 1  # at an epoch's end: the next one
        while not (self.cursor >= len(self.x) and self.epoch == epoch):  # a batch never crosses the epoch's end
            yield self.next(batch_size)

    def state_dict(self) -> dict[str, int]:
        """Where the loader stands: enough, with the same data and seed, to serve the same next batches."""
        return {"n": len(self.x), "seed": self.seed, "epoch": self.epoch, "cursor": self.cursor,
                "samples_served": self.samples_served}  # fmt: skip

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Resumes from ``state_dict()``'s output: the epoch's order is redrawn from ``(seed, epoch)``.

        Everything is checked before anything is set: a refused state leaves the loader as it was.

        Raises:
            ValueError: a state that is not ``state_dict()``'s (:meth:`check_state`), or one taken over a dataset of
                another size, or with another seed.
        """
        checked = self.check_state(state)
        if checked["n"] != len(self.x) or checked["seed"] != self.seed:
            raise ValueError(
                f"the loader state is of {checked['n']} samples with seed {checked['seed']}; this loader has "
                f"{len(self.x)} samples and seed {self.seed}: resume with the same dataset and seed"
            )
        order = self._permutation(checked["epoch"])
        self.epoch, self.cursor, self.samples_served, self._order = (
            checked["epoch"],
            checked["cursor"],
            checked["samples_served"],
            order,
        )

    @staticmethod
    def check_state(state: Mapping[str, int]) -> dict[str, int]:
        """``state`` as ``state_dict()`` returns it, if it is one that a loader could have returned (the dataset aside).

        Each key present and a whole number (an ``int``, not a bool or float), the epoch >= 0, the cursor within the
        state's dataset and the samples served ``epoch * n + cursor`` (as every loader keeps them).

        Raises:
            ValueError: naming the key or the values that are wrong.
        """
        if not isinstance(state, Mapping):
            raise ValueError(
                f"a loader state is the dict ElasticLoader.state_dict() returned; got {type(state).__name__}"
            )
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise ValueError(
                f"the loader state lacks {', '.join(map(repr, missing))}: pass the dict ElasticLoader.state_dict() "
                "returned"
            )
        for key in _STATE_KEYS:
            value = state[key]
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"the loader state's {key!r} is {value!r}, not a whole number")
        checked = {key: int(state[key]) for key in _STATE_KEYS}
        n, epoch, cursor = checked["n"], checked["epoch"], checked["cursor"]
        if n < 1:
            raise ValueError(f"the loader state's dataset size n={n} must be >= 1")
        if epoch < 0:
            raise ValueError(f"the loader state's epoch {epoch} is negative")
        if not 0 <= cursor <= n:
            raise ValueError(f"the loader state's cursor {cursor} is outside the dataset (0..{n})")
        if checked["samples_served"] != epoch * n + cursor:
            raise ValueError(
                f"the loader state's samples_served {checked['samples_served']} is not epoch {epoch} x {n} samples + "
                f"cursor {cursor} = {epoch * n + cursor}: it was not saved by ElasticLoader.state_dict()"
            )
        return checked

    @property
    def epoch_progress(self) -> float:
        """Fraction of the current epoch served, in [0, 1]."""
        return self.cursor / len(self.x)

    def _permutation(self, epoch: int) -> torch.Tensor:
        # Modulo 2**63: the same seed below that (every seed under 9e12), and none that overflows manual_seed.
        generator = torch.Generator(device="cpu").manual_seed((self.seed * 1_000_003 + epoch) % 2**63)
        # The permutation is drawn on the CPU (a seeded generator gives the same order on every device)
        # and moved once per epoch: one small host-to-device copy, not one per batch.
        return torch.randperm(len(self.x), generator=generator).to(self.x.device)


_STATE_KEYS = ("n", "seed", "epoch", "cursor", "samples_served")
"""The keys of ``ElasticLoader.state_dict()``."""


def _batch_size(batch_size: int) -> int:
    """``batch_size`` as an int; a ValueError where it is not a whole number >= 1 (a bool, 2.5, 0)."""
    if not is_whole(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    return int(batch_size)

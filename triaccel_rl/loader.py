"""Elastic batching over in-memory tensors: any batch size at any step, every sample once per epoch."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

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
    batch never crosses an epoch boundary (the last batch of an epoch may be smaller). So every sample is
    seen exactly once per epoch, in the same order, whatever sequence of batch sizes occurred. The data
    and the shuffling live on the data's device, so a GPU run never waits on the host.

    Example:
        >>> loader = ElasticLoader(torch.arange(10.0), torch.arange(10), seed=0)
        >>> [len(loader.next(4).y) for _ in range(3)]
        [4, 4, 2]
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> None:
        if len(x) != len(y):
            raise ValueError(f"inputs ({len(x)}) and labels ({len(y)}) must have the same length")
        if len(x) == 0:
            raise ValueError("cannot load batches from an empty dataset")
        self.x, self.y, self.seed = x, y, seed
        self.epoch = 0
        self.cursor = 0
        self.samples_served = 0
        self._order = self._permutation(0)

    def __len__(self) -> int:
        return len(self.x)

    def next(self, batch_size: int) -> Batch:
        """Returns the next ``batch_size`` samples (fewer at the end of an epoch).

        Raises:
            ValueError: ``batch_size`` is not a positive integer.
        """
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
        if self.cursor >= len(self.x):
            self.epoch += 1
            self.cursor = 0
            self._order = self._permutation(self.epoch)
        indices = self._order[self.cursor : self.cursor + batch_size]
        self.cursor += len(indices)
        self.samples_served += len(indices)
        return Batch(self.x[indices], self.y[indices], self.epoch, indices)

    def take_back(self, n_samples: int) -> None:
        """Returns the last ``n_samples`` served to the front of the queue (a step that was not applied).

        Raises:
            ValueError: more samples than the current epoch has served.
        """
        if not (0 <= n_samples <= self.cursor):
            raise ValueError(f"cannot take back {n_samples} samples; {self.cursor} served this epoch")
        self.cursor -= n_samples
        self.samples_served -= n_samples

    def epoch_batches(self, batch_size: int) -> Iterator[Batch]:
        """Yields the rest of the current epoch in batches of ``batch_size``."""
        epoch = self.epoch if self.cursor < len(self.x) else self.epoch + 1  # at an epoch's end: the next one
        while not (self.cursor >= len(self.x) and self.epoch == epoch):  # a batch never crosses the epoch's end
            yield self.next(batch_size)

    def state_dict(self) -> dict[str, int]:
        """Where the loader stands: enough, with the same data and seed, to serve the same next batches."""
        return {"n": len(self.x), "seed": self.seed, "epoch": self.epoch, "cursor": self.cursor,
                "samples_served": self.samples_served}  # fmt: skip

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Resumes from ``state_dict()``'s output: the epoch's order is redrawn from ``(seed, epoch)``.

        Raises:
            ValueError: the state was taken over a dataset of another size, or with another seed.
        """
        if int(state["n"]) != len(self.x) or int(state["seed"]) != self.seed:
            raise ValueError(
                f"the loader state is of {state['n']} samples with seed {state['seed']}; this loader has "
                f"{len(self.x)} samples and seed {self.seed}: resume with the same dataset and seed"
            )
        if not 0 <= int(state["cursor"]) <= len(self.x):
            raise ValueError(f"the loader state's cursor {state['cursor']} is outside the dataset (0..{len(self.x)})")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self.samples_served = int(state["samples_served"])
        self._order = self._permutation(self.epoch)

    @property
    def epoch_progress(self) -> float:
        """Fraction of the current epoch served, in [0, 1]."""
        return self.cursor / len(self.x)

    def _permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + epoch)
        # The permutation is drawn on the CPU (a seeded generator gives the same order on every device)
        # and moved once per epoch: one small host-to-device copy, not one per batch.
        return torch.randperm(len(self.x), generator=generator).to(self.x.device)

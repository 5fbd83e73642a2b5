"""An embedding lookup with a linear head, and its seeded batches: the sparse-gradient tests' model."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class Lookup(nn.Module):
    """``head(mean(emb(x)))``: an ``nn.Embedding`` of ``vocab`` rows of 8 (``sparse`` as given), or the embedding
    ``make_embedding()`` returns, and a head to 4 classes, seeded the same way every time."""

    def __init__(
        self, vocab: int = 30, sparse: bool = False, make_embedding: Callable[[], nn.Module] | None = None
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = make_embedding() if make_embedding is not None else nn.Embedding(vocab, 8, sparse=sparse)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(x).mean(1))


def lookup_batches(n: int, vocab: int = 30, batch: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` seeded batches of ``batch`` rows of 5 token ids below ``vocab``, with labels of 4 classes."""
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randint(0, vocab, (batch, 5), generator=generator), torch.randint(0, 4, (batch,), generator=generator))
        for _ in range(n)
    ]

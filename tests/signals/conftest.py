"""Signal tests run many tiny autograd passes: one intra-op thread keeps them fast on a shared CPU."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny ops on several threads oversubscribe a busy machine (10x slower here); restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

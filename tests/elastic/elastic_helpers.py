"""Shared helpers for the memory-elastic batching tests: small seeded runs on the CPU."""

from __future__ import annotations

import torch

from triaccel_rl.tasks import Task, get_task

# 180 samples: 22 go to the probe batch, 158 to the loader (an odd size, so epochs end in partial batches).
SMALL_SYNTHETIC = {"n_train": 180, "n_test": 64}


def small_task(name: str = "synthetic", **overrides: object) -> Task:
    """A registered task cut down to a few hundred samples."""
    return get_task(name, **{**SMALL_SYNTHETIC, **overrides})


def parameters_of(run: object) -> list[torch.Tensor]:
    return [p.detach().clone() for p in run.model.parameters()]  # type: ignore[attr-defined]


def max_abs_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))

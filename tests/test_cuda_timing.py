"""The CUDA timing helpers the GPU scripts share (``triaccel_rl.profiling.cuda_chunk_ms``, ``cuda_kernel_counts``)."""

from __future__ import annotations

import pytest
import torch

from triaccel_rl.profiling import cuda_chunk_ms, cuda_kernel_counts


@pytest.mark.parametrize("helper", [cuda_chunk_ms, cuda_kernel_counts])
@pytest.mark.parametrize("steps", [0, -3])
def test_a_chunk_of_no_steps_is_refused_with_the_value(helper, steps):
    with pytest.raises(ValueError, match=rf"steps={steps} must be at least 1"):
        helper(lambda: None, steps)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
def test_kernel_counts_are_per_step_and_by_name():
    """A fill and an add a step: two launches a step, whatever the number of steps."""
    x = torch.zeros(1024, device="cuda")

    def step() -> None:
        x.fill_(1.0)
        x.add_(2.0)

    step()  # first-call set-up outside the count
    for steps in (1, 7):
        counts = cuda_kernel_counts(step, steps)
        assert sum(counts.values()) == 2.0
        assert all(count == 1.0 for count in counts.values())
    assert x[0].item() == 3.0

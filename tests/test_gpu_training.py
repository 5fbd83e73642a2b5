"""GPU-only: the deferred training path queues work without ever waiting for the device."""

import pytest
import torch

from triaccel_rl.training import TrainingRun

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_deferred_steps_do_not_synchronise(precision):
    run = TrainingRun("synthetic", seed=0, device="cuda", batch_size=32)
    assert run.engine.fused
    run.set_precisions([precision] * run.n_layers)
    run.train_interval(2)  # compiles the kernels and fits the memory model first
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            run._step(deferred=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    interval = run.train_interval(3)
    assert interval.moments.n_observed == 3 and interval.train_ms > 0


def test_channels_last_run_uses_the_fused_step_and_its_grads_stay_in_the_flat_buffer():
    run = TrainingRun("cnn-fmnist", seed=0, device="cuda", channels_last=True)
    assert run.engine.fused
    before = [p.detach().clone() for p in run.model.parameters()]
    run.train_interval(3)
    store = run.engine.store
    low, high = store.grads.data_ptr(), store.grads.data_ptr() + 4 * store.n_elements
    for p, old in zip(run.model.parameters(), before, strict=True):
        assert p.grad is not None and low <= p.grad.data_ptr() < high  # autograd accumulated in place
        assert not torch.equal(p.detach(), old)  # and the fused step applied it


def test_controller_steps_do_not_synchronise_between_decisions():
    from torch import nn

    from triaccel_rl.config import ControllerConfig
    from triaccel_rl.controller import Controller

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2)).cuda()
    ctl = Controller(model, torch.optim.SGD(model.parameters(), lr=0.1), policy="bf16",
                     config=ControllerConfig(interval_steps=100))  # fmt: skip
    assert ctl.engine.fused
    x, y = torch.randn(512, 8), torch.randint(0, 2, (512,))
    batches = ctl.loader((x, y), batch_size=16)
    for step in range(6):
        xb, yb = next(batches)
        # After the first two steps, which compile the kernels and build the cost model: no sync at all.
        torch.cuda.set_sync_debug_mode("error" if step >= 2 else "default")
        try:
            with ctl.autocast():
                loss = nn.functional.cross_entropy(model(xb), yb)
            ctl.step(loss)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert ctl.steps == 6

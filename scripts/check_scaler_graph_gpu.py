"""On CUDA: does a captured graph scale by the live scale after the reference path's loss scaler is loaded?

A rollback or a checkpoint loads the scaler. A graph captured at an fp16 step reads the loss scale through its
tensor's address. Until 2026-12-07 the reference path's ``load_scaler_state(None)`` and ``load_state_dict`` put in a
new ``GradScaler``, whose next ``scale()`` made a new tensor: the graph replayed ``loss * <the old, freed tensor>``.
Now the scaler is loaded in place. Each line prints the gradient of an eager backward and of a replayed one; they must
agree.

Usage (a device visit): bash scripts/device-visit.sh <commit> py=scripts/check_scaler_graph_gpu.py
"""

import torch
from torch import nn

from triaccel_rl.engine import StepEngine
from triaccel_rl.graphs import StepGraphs

device = torch.device("cuda")
print(torch.__version__, torch.cuda.get_device_name())
torch.manual_seed(0)
head = nn.Linear(8, 1)
model = nn.Sequential(nn.Linear(8, 8), head).to(device)
engine = StepEngine(model, torch.optim.SGD(model.parameters(), lr=0.0), device, fused=False)
engine.set_precisions(["fp16", "fp16"])
graphs = StepGraphs(model, device)
x, y = torch.randn(4, 8, device=device), torch.zeros(4, 1, device=device)


def body(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The step's forward and scaled backward, as a graph captures it."""
    with engine.precision.context():
        loss = (model(x).float() - y).pow(2).mean()
    engine.scale_loss(loss).backward()
    return loss.detach()


def scaled_grad(replay: bool) -> float:
    """The last bias's scaled gradient from an eager backward or a replayed one."""
    engine.zero_grad()
    if replay:
        graphs.run(("fp16",), x, y, body, engine.zero_grad)
    else:
        body(x, y)
    grad = head.bias.grad
    assert grad is not None
    return grad.item()


failures = 0


def check(label: str) -> None:
    """Prints the eager and replayed gradients, counting a disagreement."""
    global failures
    eager, replayed = scaled_grad(False), scaled_grad(True)
    agree = abs(eager - replayed) <= 1e-3 * abs(eager)
    failures += not agree
    print(f"{label:<34} scale {engine.loss_scale:>8.0f}  eager {eager:>12.4f}  replay {replayed:>12.4f}  {agree=}")


check("captured")
saved = engine.state_dict()
engine.load_scaler_state(None)  # a rollback to a copy from before any fp16 step
junk = torch.full((1000,), 3.0, device=device)  # takes freed memory, as the run's next tensors would
check("after load_scaler_state(None)")
state = dict(saved, scaler=dict(saved["scaler"], scale=2.0**10))
engine.load_state_dict(state)
junk2 = torch.full((1000,), 5.0, device=device)
check("after load_state_dict (scale 2**10)")
print("FAILED" if failures else "OK: every replay scaled by the live scale")

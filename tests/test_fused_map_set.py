"""A precision map set on a fused ``StepEngine``'s ``precision`` directly re-derives its 16-bit weight copies.

A bf16 or fp16 layer's forward reads the copies the fused step keeps (``LayerPrecision.use_weight_copies``).
``StepEngine.set_precisions``, the path the Controller's executor takes, re-derived them for the new map; a map set on
``engine.precision`` itself did not, and the next forward computed on stale copies: a layer newly lowered on its
build-time weights (0.117 off at the output), one switched from bf16 to fp16 on bf16 bits read as fp16 (3.37 off), and
the weights drifted from there. Both ways of setting the map now give the same forwards and weights, bit for bit.
"""

import gc
import os
import weakref

import pytest
import torch
from torch import nn

from triaccel_rl.engine import StepEngine
from triaccel_rl.types import Precision

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs a GPU or Triton's interpreter (TRITON_INTERPRET=1 before triton is imported)",
)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Step index -> the map set before that step's forward (the two Linear layers)
_SCHEDULES = {
    "lowered": {2: ["bf16", "bf16"]},
    "bf16 to fp16": {2: ["bf16", "bf16"], 4: ["fp16", "bf16"]},
    "up and down again": {0: ["bf16", "fp32"], 3: ["fp32", "fp32"], 4: ["bf16", "fp32"]},
}


def _run(kind, schedule, direct):
    """Six fused steps, the map set as ``schedule`` says; returns each step's output and the final weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(DEVICE)
    if kind == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine = StepEngine(model, optimizer, DEVICE, fused=True)
    assert engine.fused
    generator = torch.Generator().manual_seed(1)
    outputs = []
    for step in range(6):
        x, y = torch.randn(16, 6, generator=generator).to(DEVICE), torch.randint(0, 3, (16,), generator=generator)
        if step in schedule:
            (engine.precision.set if direct else engine.set_precisions)(schedule[step])
            if direct:
                _assert_copies_are_the_weights(engine)
        with engine.precision.context():
            out = model(x)
            loss = nn.functional.cross_entropy(out, y.to(DEVICE))
        outputs.append(out.detach().float().cpu())
        engine.backward_and_step(loss)
    weights = torch.cat([p.detach().flatten().cpu() for p in model.parameters()])
    engine.remove()
    return outputs, weights


def _assert_copies_are_the_weights(engine):
    """Each bf16 or fp16 layer's copies hold its fp32 weights rounded to its type, as the forward will read them."""
    for layer, precision in enumerate(engine.precision.precisions):
        if precision is Precision.FP32:
            continue
        copies = engine.store.low_precision_params(layer, precision.dtype)
        for param, copy in zip(engine.store.layers[layer], copies, strict=True):
            difference = (copy.float() - param.detach().to(precision.dtype).float()).abs().max().item()
            assert torch.equal(copy, param.detach().to(precision.dtype)), (
                f"layer {layer} ({precision.name.lower()}): its copy is {difference:.3g} off its weights"
            )


@pytest.mark.parametrize(
    ("kind", "schedule"),
    [("sgd", name) for name in _SCHEDULES] + [("adamw", "bf16 to fp16")],
)
def test_a_map_set_on_the_precision_directly_steps_as_set_precisions_does(kind, schedule):
    direct_outputs, direct_weights = _run(kind, _SCHEDULES[schedule], direct=True)
    outputs, weights = _run(kind, _SCHEDULES[schedule], direct=False)
    for step, (got, want) in enumerate(zip(direct_outputs, outputs, strict=True)):
        difference = (got - want).abs().max().item()
        assert torch.equal(got, want), f"step {step}: the forward is {difference:.3g} off"
    difference = (direct_weights - weights).abs().max().item()
    assert torch.equal(direct_weights, weights), f"weights {difference:.3g} off"


def test_the_map_listener_keeps_no_dropped_engine_alive():
    """The model's hooks hold the precision, and it the copies' listener: a weak reference to the engine."""
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(DEVICE)
    engine = StepEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), DEVICE, fused=True)
    precision, dropped = engine.precision, weakref.ref(engine)
    del engine
    gc.collect()
    assert dropped() is None
    precision.set(["bf16", "bf16"])  # with the engine gone: nothing to re-derive, no error

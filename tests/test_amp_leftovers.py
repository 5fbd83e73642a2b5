"""A loop ported from torch.amp that kept its GradScaler or its torch.autocast is told so, by name."""

import pickle
import re

import pytest
import torch
from torch import nn

from triaccel_rl.controller import Controller, _grad_scaler_outputs

SCALED_LOSS_REFUSAL = (
    "this loss is a GradScaler's scale(loss), the loss times the scaler's loss scale (65536 at first): ctl.step(loss) "
    "does the loss scaling and the update: remove the GradScaler (scale/step/update) and torch.autocast from the loop, "
    "and pass the loss itself, computed under `with ctl.autocast():`"
)


def _model_and_optimizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def _batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(16, 8, generator=generator), torch.randint(0, 3, (16,), generator=generator)


def _weights(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("policy", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("method", ["step", "backward"])
def test_a_grad_scalers_scaled_loss_is_refused_before_anything_moves(policy, method):
    """Taken, it trained on gradients 65536 times too large: max |w| 8e17 after 6 steps under fp32 and bf16, NaN by
    step 10, and under fp16 the controller's own scale backed off to 0.125 and the shield switched to bf16, no word
    said."""
    model, optimizer = _model_and_optimizer()
    x, y = _batch()
    scaler = torch.amp.GradScaler("cpu")
    with Controller(model, optimizer, policy=policy, device="cpu") as ctl:
        before = _weights(model)
        with ctl.autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        with pytest.raises(ValueError, match=f"^{re.escape(SCALED_LOSS_REFUSAL)}$"):
            getattr(ctl, method)(scaler.scale(loss))
        assert all(p.grad is None or not p.grad.any() for p in model.parameters())
        assert all(torch.equal(a, b) for a, b in zip(before, _weights(model), strict=True))
        assert ctl.steps == 0
        ctl.step(loss)  # the loss itself: the loop goes on
        assert ctl.steps == 1
    assert torch.cuda.amp.GradScaler.scale is torch.amp.GradScaler.scale  # the CUDA one inherits the wrapped method


def test_a_disabled_grad_scaler_passes_the_loss_itself():
    """``GradScaler(enabled=False)`` (an ``--amp`` flag left off) returns the loss itself: the step trains on it."""
    runs = []
    for wrap in (False, True):
        model, optimizer = _model_and_optimizer()
        x, y = _batch()
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        with Controller(model, optimizer, policy="fp32", device="cpu") as ctl:
            with ctl.autocast():
                loss = nn.functional.cross_entropy(model(x), y)
            ctl.step(scaler.scale(loss) if wrap else loss)
        runs.append(_weights(model))
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_grad_scaler_is_untouched_with_no_controller_open_and_pickles():
    model, optimizer = _model_and_optimizer()
    loss = torch.tensor(0.5, requires_grad=True) * 2
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    with Controller(model, optimizer, policy="fp32", device="cpu"):
        scaled = scaler.scale(loss)
        assert _grad_scaler_outputs.get(id(scaled)) is scaled
        copied = pickle.loads(pickle.dumps(scaler))
        assert copied.get_scale() == 1024.0 and copied.state_dict() == scaler.state_dict()
        assert pickle.loads(pickle.dumps(torch.amp.GradScaler.scale)) is torch.amp.GradScaler.scale
    after = scaler.scale(loss)  # closed: the wrapper passes straight through
    assert id(after) not in _grad_scaler_outputs
    assert after.item() == 1024.0 and after.grad_fn.name() == "MulBackward0"


@pytest.mark.parametrize("policy", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_forward_under_the_loops_own_autocast_names_its_type(caplog, policy, dtype):
    """Before, the warning said "that forward ran in fp32" under a 16-bit map, and an fp32 map's said nothing, while
    the matmuls ran in the loop's own autocast type."""
    model, optimizer = _model_and_optimizer()
    x, y = _batch()
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    expected = (
        f"ctl.step() after a forward under your own torch.autocast(dtype={dtype}), outside ctl.autocast(): its matmuls "
        f"and convolutions ran in {name} whatever the layers' precisions ({policy} now), so the controller's decisions "
        "do not act on it while its costs and observation count those precisions. Remove that torch.autocast from the "
        "loop and run the forward and the loss under `with ctl.autocast():`"
    )
    with Controller(model, optimizer, policy=policy, device="cpu") as ctl, caplog.at_level("WARNING", "triaccel_rl"):
        caplog.clear()
        for _ in range(2):  # once a run
            with torch.autocast("cpu", dtype=dtype):
                assert model[0](x).dtype is dtype  # the loop's type, whatever the map
                loss = nn.functional.cross_entropy(model(x), y)
            ctl.step(loss)
    warnings = [r.getMessage() for r in caplog.records if "ctl.step() after a forward" in r.getMessage()]
    assert warnings == [expected]


def test_an_evaluation_under_the_loops_own_autocast_is_no_training_forward(caplog):
    """A ``no_grad`` forward under the loop's autocast before a step whose forward ran plainly in fp32, under an fp32
    map: that forward computed as the map says, and nothing is said."""
    model, optimizer = _model_and_optimizer()
    x, y = _batch()
    with Controller(model, optimizer, policy="fp32", device="cpu") as ctl, caplog.at_level("WARNING", "triaccel_rl"):
        caplog.clear()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)
        ctl.step(nn.functional.cross_entropy(model(x), y))
        with torch.autocast("cpu", dtype=torch.bfloat16):  # an earlier step's forward is not this one's
            model(x)
        with ctl.autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        ctl.step(loss)
        ctl.step(nn.functional.cross_entropy(model(x), y))
    assert "ctl.step() after a forward" not in caplog.text

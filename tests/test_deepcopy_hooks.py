"""A deep copy of a model taken while its precision hooks are in (an EMA copy), after the hooks are removed."""

import copy
import gc
import io
import weakref

import torch
from torch import nn

from triaccel_rl import Controller
from triaccel_rl.precision import LayerPrecision


class _Net(nn.Module):
    """Each kind of hook: a layer's pair, a norm's pre-hook, a leaf module's fp32 region (PReLU)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.prelu = nn.PReLU()
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.prelu(self.norm(self.inp(x))))


def _hooks(model: nn.Module) -> list[object]:
    return [h for m in model.modules() for h in (*m._forward_pre_hooks.values(), *m._forward_hooks.values())]


def _hook_flags(model: nn.Module) -> int:
    return sum(
        len(m._forward_pre_hooks_with_kwargs) + len(m._forward_hooks_with_kwargs) + len(m._forward_hooks_always_called)
        for m in model.modules()
    )


def test_a_copy_made_while_a_controller_is_open_sheds_the_hooks_at_its_first_forward_after_close() -> None:
    """The copy kept the controller's hooks for good: each of its forwards called them all, idle, after ``close()``."""
    torch.manual_seed(0)
    model = _Net()
    ctl = Controller(model, torch.optim.SGD(model.parameters(), lr=0.1), policy="bf16")
    ema = copy.deepcopy(model)
    assert len(_hooks(ema)) == 7  # shared while the controller is open (an EMA forward in the context runs its map)
    x = torch.randn(4, 8)
    ema(x)
    assert len(_hooks(ema)) == 7
    ctl.close()
    assert not _hooks(model)
    expected = ema(x)  # the released pre-hooks take every hook of theirs off the copy
    assert not _hooks(ema) and _hook_flags(ema) == 0
    assert torch.equal(ema(x), expected)


def test_a_copy_made_while_the_hooks_are_in_keeps_neither_the_model_nor_the_controller_alive_after_close() -> None:
    """The copy's hooks held the ``LayerPrecision``, and through it the model, for as long as the copy lived."""
    model = _Net()
    lp = LayerPrecision(model, device_type="cpu")
    lp.set(["bf16", "bf16"])
    ema = copy.deepcopy(model)
    lp.remove()
    gone_model, gone_lp = weakref.ref(model), weakref.ref(lp)
    del model, lp
    gc.collect()
    assert gone_model() is None and gone_lp() is None
    assert len(_hooks(ema)) == 7  # not called yet: still there, holding nothing


def test_a_copy_made_while_the_hooks_are_in_saves_after_close_and_loads_as_a_plain_model() -> None:
    """``torch.save`` of the copy after ``close()`` raised "Can't pickle <function hook_...>: it's not the same object
    as triaccel_rl._pickled_hooks.hook_...": the name was forgotten at the close while the copy still held the hook."""
    torch.manual_seed(0)
    model = _Net()
    ctl = Controller(model, torch.optim.SGD(model.parameters(), lr=0.1), policy="bf16")
    ema = copy.deepcopy(model)
    ctl.close()
    buffer = io.BytesIO()
    torch.save(ema, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the user's own autocast: no fp32 region of ours is left
        out = loaded(x)
    assert not _hooks(loaded)
    assert out.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(out, ema(x))
    assert not _hooks(ema)


def test_a_copy_whose_first_forward_after_close_raises_sheds_the_hooks_and_raises_the_forwards_error() -> None:
    """The forward hooks are always called, from torch's own loop over their dict when the forward raised: the pre-hook
    drops them before it, so the forward's error is what comes out, not a "mutated during iteration"."""

    class Failing(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise ValueError("the forward's own error")

    model = nn.Sequential(nn.Linear(4, 4), Failing(4, 4))
    lp = LayerPrecision(model, device_type="cpu")
    lp.set(["bf16", "fp32"])
    ema = copy.deepcopy(model)
    lp.remove()
    try:
        ema(torch.randn(2, 4))
    except ValueError as error:
        assert str(error) == "the forward's own error"
    else:
        raise AssertionError("the forward did not raise")
    assert not _hooks(ema) and _hook_flags(ema) == 0


def test_a_copy_in_the_open_context_still_computes_as_the_model_and_leaves_the_original_hooked() -> None:
    """Shedding reads only released hooks: while the controller is open the copy's hooks act as the model's, and the
    model keeps every hook after the copy's forwards."""
    torch.manual_seed(0)
    model = _Net()
    lp = LayerPrecision(model, device_type="cpu")
    lp.set(["bf16", "fp32"])
    ema = copy.deepcopy(model)
    x = torch.randn(4, 8)
    with lp.context():
        expected, out = model(x), ema(x)
        assert not lp._stack
    assert out.dtype == torch.float32 and torch.equal(out, expected)
    assert _hooks(ema) == _hooks(model) and len(_hooks(model)) == 7
    lp.remove()

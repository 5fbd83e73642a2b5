"""The precision hooks' cheap path for the usual call (one tensor, by position) computes as their general path does."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from triaccel_rl.precision import LayerPrecision

# Three Linear layers (controllable) around a checkpointed block holding a trainable norm and a norm with no parameters
MAPS = {
    "fp32": ["fp32"] * 3,
    "bf16": ["bf16"] * 3,
    "fp16": ["fp16"] * 3,
    "mixed": ["bf16", "fp32", "fp16"],
}


class _Net(nn.Module):
    """Calls its modules with the input by position (the hooks' cheap path) or by keyword (their general path)."""

    def __init__(self, by_keyword: bool, use_reentrant: bool | None) -> None:
        super().__init__()
        self.by_keyword = by_keyword
        self.use_reentrant = use_reentrant  # None: the block is not checkpointed
        self.a = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.b = nn.Linear(8, 8)
        self.free_norm = nn.LayerNorm(8, elementwise_affine=False)  # no layer: hooked as a norm all the same
        self.c = nn.Linear(8, 4)

    def _call(self, module: nn.Module, x: torch.Tensor) -> Any:
        return module(input=x) if self.by_keyword else module(x)

    def _block(self, h: torch.Tensor) -> torch.Tensor:
        return self._call(self.free_norm, torch.relu(self._call(self.b, self._call(self.norm, h))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._call(self.a, x)
        if self.use_reentrant is not None:
            h = checkpoint(self._block, h, use_reentrant=self.use_reentrant)
        else:
            h = self._block(h)
        return self._call(self.c, h)


def _run(map_name: str, by_keyword: bool, use_reentrant: bool | None, input_dtype: torch.dtype) -> dict[str, Any]:
    torch.manual_seed(0)
    model = _Net(by_keyword, use_reentrant)
    precision = LayerPrecision(model, device_type="cpu")
    precision.set(MAPS[map_name])
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1)).to(input_dtype).requires_grad_()
    with precision.context():
        out = model(x)
        loss = out.float().square().sum()
    loss.backward()  # the checkpointed block recomputes here, after the context has closed
    precision.remove()
    assert x.grad is not None
    grads = {name: p.grad for name, p in model.named_parameters()}
    return {"out": out.detach(), "x.grad": x.grad, **grads}


@pytest.mark.parametrize("map_name", list(MAPS))
@pytest.mark.parametrize("use_reentrant", [None, False, True])
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_inputs_by_position_give_the_outputs_and_gradients_of_inputs_by_keyword(
    map_name: str, use_reentrant: bool | None, input_dtype: torch.dtype
) -> None:
    fast = _run(map_name, by_keyword=False, use_reentrant=use_reentrant, input_dtype=input_dtype)
    full = _run(map_name, by_keyword=True, use_reentrant=use_reentrant, input_dtype=input_dtype)
    for name, value in fast.items():
        assert value.dtype == full[name].dtype, f"{name}: {value.dtype} by position, {full[name].dtype} by keyword"
        assert torch.equal(value, full[name]), (
            f"{name} under the {map_name} map differs by {(value.float() - full[name].float()).abs().max().item()}"
        )


@pytest.mark.parametrize("map_name", list(MAPS))
def test_a_checkpointed_block_recomputes_to_the_gradients_of_an_uncheckpointed_one(map_name: str) -> None:
    plain = _run(map_name, by_keyword=False, use_reentrant=None, input_dtype=torch.float32)
    for use_reentrant in (False, True):
        recomputed = _run(map_name, by_keyword=False, use_reentrant=use_reentrant, input_dtype=torch.float32)
        for name, value in plain.items():
            assert torch.equal(value, recomputed[name]), f"{name} (use_reentrant={use_reentrant}, {map_name} map)"


@pytest.mark.parametrize("map_name", list(MAPS))
def test_the_hooks_do_not_compare_the_whole_map_at_each_call(map_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading the map's facts compares every layer's precision: at each norm's call that made the hooks' cost grow
    with the model's size (about 1.5 us a call at 300 layers). Inside the context's forward they are not read."""
    torch.manual_seed(0)
    model = _Net(by_keyword=False, use_reentrant=None)
    precision = LayerPrecision(model, device_type="cpu")
    precision.set(MAPS[map_name])
    reads = 0
    facts = LayerPrecision._facts

    def counted(self: LayerPrecision) -> Any:
        nonlocal reads
        reads += 1
        return facts(self)

    x = torch.randn(5, 8)
    with precision.context():
        monkeypatch.setattr(LayerPrecision, "_facts", counted)
        model(x)
        monkeypatch.setattr(LayerPrecision, "_facts", facts)
    precision.remove()
    assert reads == 0, f"the map's facts were read {reads} times in one forward under the {map_name} map"

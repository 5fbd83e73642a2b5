"""Maps mixing bf16 and fp16 on a GPU (review, 2026-12-06), against references cast by hand.

Autocast's promote ops (cat, stack) in the bf16 outer region raised on an fp16 layer's output; fp16 layers now hand
their results on in fp32. Also a checkpointed forward after a map set inside the context (recomputed as it ran).
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from triaccel_rl.precision import LayerPrecision
from triaccel_rl.types import Precision


class TwoBranches(nn.Module):
    """Two Linears joined by ``torch.stack``, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The head of the stacked branches."""
        return self.head(torch.stack([self.a(x), self.b(x)], 1).flatten(1))


def linear(layer: nn.Linear, h: torch.Tensor, dtype: torch.dtype, mixed: bool) -> torch.Tensor:
    """``layer`` computed in ``dtype`` by hand; an fp16 result handed on in fp32 under a map mixing 16-bit types."""
    out = F.linear(h.to(dtype), layer.weight.to(dtype), layer.bias.to(dtype))
    return out.float() if mixed and dtype == torch.float16 else out


def checkpointed_grad(set_inside: bool) -> torch.Tensor:
    """The first layer's gradient of a checkpointed forward run in fp32 (its map set inside the context or before)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)).cuda()
    p = LayerPrecision(m, "cuda")
    p.set(["bf16", "bf16"] if set_inside else ["fp32", "fp32"])
    with p.context():
        p.set(["fp32", "fp32"])
        o = checkpoint(m, torch.randn(8, 64, device="cuda"), use_reentrant=False)
    o.sum().backward()
    grad = m[0].weight.grad
    assert isinstance(grad, torch.Tensor)
    return grad


torch.manual_seed(0)
model = TwoBranches().cuda()
lp = LayerPrecision(model, "cuda")
x = torch.randn(32, 64, device="cuda")
print("| map | output dtype | equals reference | every gradient fp32 |")
print("|---|---|---|---|")
for precisions in (["fp16", "bf16", "bf16"], ["bf16", "fp16", "fp16"], ["fp16", "fp16", "bf16"], ["bf16"] * 3):
    lp.set(precisions)
    with lp.context():
        out = model(x)
    dtypes = [Precision.parse(p).dtype for p in precisions]
    mixed = torch.bfloat16 in dtypes and torch.float16 in dtypes
    a, b = linear(model.a, x, dtypes[0], mixed), linear(model.b, x, dtypes[1], mixed)
    with torch.autocast("cuda", dtype=torch.bfloat16 if torch.bfloat16 in dtypes else torch.float16):
        joined = torch.stack([a, b], 1).flatten(1)  # as the context's outer region runs it
    expected = linear(model.head, joined, dtypes[2], mixed)
    out.float().sum().backward()
    grads = all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    print(f"| {precisions} | {out.dtype} | {torch.equal(out, expected)} | {grads} |")
    model.zero_grad()
print("checkpoint after a map set inside the context equals the fp32 run:",
      torch.equal(checkpointed_grad(True), checkpointed_grad(False)))  # fmt: skip

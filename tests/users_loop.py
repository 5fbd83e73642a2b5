"""A user's training setup with everything the README says a controlled loop keeps, shared by two tests."""

import torch
from torch import nn

from triaccel_rl.engine import StepEngine
from triaccel_rl.types import Precision


class TiedLM(nn.Module):
    """An embedding tied to the output projection (which has a bias of its own)."""

    def __init__(self):
        super().__init__()
        self.emb, self.mid, self.out = nn.Embedding(30, 16), nn.Linear(16, 16), nn.Linear(16, 30)
        self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(torch.relu(self.mid(self.emb(x))))


class TwoHeads(nn.Module):
    """A shared body and two heads, one used a step (a branch not taken leaves the other without a gradient)."""

    def __init__(self, width=8, hidden=16, classes=3):
        super().__init__()
        self.body, self.a, self.b = nn.Linear(width, hidden), nn.Linear(hidden, classes), nn.Linear(hidden, classes)

    def forward(self, x, head):
        return (self.a if head == "a" else self.b)(torch.relu(self.body(x)))


def train_heads_plainly(model, optimizer, data, heads):
    """``torch.optim``'s own loop over ``data``, one head a step (``zero_grad`` sets the gradients to None)."""
    for (x, y), head in zip(data, heads, strict=True):
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x, head), y).backward()
        optimizer.step()


def train_heads_controlled(ctl, model, optimizer, data, heads):
    """The same loop under ``ctl``; asserts at each step that the idle head's weight did not move."""
    for (x, y), head in zip(data, heads, strict=True):
        optimizer.zero_grad(set_to_none=True)
        idle = (model.b if head == "a" else model.a).weight
        before = idle.detach().clone()
        with ctl.autocast():
            loss = nn.functional.cross_entropy(model(x, head), y)
        ctl.step(loss)
        assert torch.equal(idle.detach(), before), f"the idle head moved at a step of head {head}"


def users_setup(device="cpu"):
    """The model, optimizer, scheduler and EMA list: no decay on biases, OneCycleLR (which cycles AdamW's beta1),
    an EMA of the weights in a step post-hook, tied weights."""
    torch.manual_seed(0)
    model = TiedLM().to(device)
    groups = [
        {"params": [p for p in model.parameters() if p.dim() > 1], "weight_decay": 0.1},
        {"params": [p for p in model.parameters() if p.dim() <= 1], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-2, total_steps=20)
    ema = [p.detach().clone() for p in model.parameters()]

    def ema_hook(*_):
        with torch.no_grad():
            for average, p in zip(ema, model.parameters(), strict=True):
                average.mul_(0.9).add_(p, alpha=0.1)

    optimizer.register_step_post_hook(ema_hook)
    return model, optimizer, scheduler, ema


def users_data(device="cpu", steps=20):
    """``steps`` batches of 32 token pairs for ``TiedLM``."""
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randint(0, 30, (32,), generator=g).to(device), torch.randint(0, 30, (32,), generator=g).to(device))
        for _ in range(steps)
    ]


def plain_loop(data, device="cpu"):
    """The user's own loop over ``data`` (clipping at 0.5); returns the final weights and the EMA."""
    model, optimizer, scheduler, ema = users_setup(device)
    for x, y in data:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()
        scheduler.step()
    return [p.detach().clone() for p in model.parameters()], ema


def controlled_loop(data, controller_cls, config, device="cpu"):
    """The same loop under a static fp32 ``Controller`` (clipping at 0.5); returns the model, its controller and EMA."""
    model, optimizer, scheduler, ema = users_setup(device)
    with controller_cls(model, optimizer, policy="fp32", max_grad_norm=0.5, config=config) as ctl:
        for x, y in data:
            optimizer.zero_grad()
            with ctl.autocast():
                loss = nn.functional.cross_entropy(model(x), y)
            ctl.step(loss)
            scheduler.step()
    return model, ctl, ema


def plain_step(model, optimizer, x, y, clip_params=None, max_norm=None):
    """One step of the user's own loop: cross-entropy, backward, optional ``clip_grad_norm_``, ``optimizer.step()``."""
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    if clip_params is not None:
        torch.nn.utils.clip_grad_norm_(clip_params, max_norm)
    optimizer.step()


def controlled_step(ctl, model, x, y, micro_batches=1):
    """The same step under a controller, as ``micro_batches`` accumulated parts (``ctl.backward`` for all but the
    last, each loss divided by their number)."""
    parts = torch.arange(len(y), device=y.device).chunk(micro_batches)
    for i, part in enumerate(parts):
        with ctl.autocast():
            loss = nn.functional.cross_entropy(model(x[part]), y[part]) / len(parts)
        (ctl.step if i == len(parts) - 1 else ctl.backward)(loss)


def either_step(ctl, model, optimizer, x, y, clip_params=None, max_norm=None):
    """``controlled_step`` under ``ctl``, or, with ``ctl`` None, the user's ``plain_step``."""
    if ctl is None:
        plain_step(model, optimizer, x, y, clip_params, max_norm)
    else:
        controlled_step(ctl, model, x, y)


def unheld_gradients_under_fp16(fused: bool, device: torch.device) -> None:
    """Checks a second optimizer's gradients against a plain GradScaler loop's over 2 steps (bit for bit unfused).

    The engine drives the head's optimizer with layer 0 in fp16; the body is trainable and outside it (its own
    optimizer, stepped by the user every other step, so its gradients accumulate over two backward passes).
    Before, they stayed multiplied by the loss scale (65536 times the gradient).
    """
    results = []
    for through_engine in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).to(device)
        head = torch.optim.SGD(model[2].parameters(), lr=0.1)
        scaler = torch.amp.GradScaler(device.type)
        engine = StepEngine(model, head, device, fused=fused) if through_engine else None
        if engine is not None:
            engine.set_precisions([Precision.FP16, Precision.FP16])
        for seed in (0, 1):
            generator = torch.Generator().manual_seed(seed)
            x, y = torch.randn(6, 3, generator=generator).to(device), torch.randn(6, 2, generator=generator).to(device)
            with torch.autocast(device.type, dtype=torch.float16):
                loss = (model(x).float() - y).pow(2).mean() * 1e-3  # no fp16 overflow at the scale 65536
            if engine is not None:
                engine.bind_grads()
                engine.scale_loss(loss).backward()
                engine.step_after_backward(loss.detach())
            else:  # the head's update, as the engine's (the body's second gradient depends on it)
                scaler.scale(loss).backward()
                scaler.unscale_(head)
                scaler.step(head)
                scaler.update()
                head.zero_grad()
        if engine is None:  # a plain loop unscales what the body accumulated with the scale its backwards used
            body_grads = [p.grad * scaler.get_scale() ** -1 for p in model[0].parameters()]
        else:
            assert engine.loss_scale == 2.0**16
            body_grads = [p.grad for p in model[0].parameters()]
        results.append(body_grads)
    for engined, plain in zip(*results, strict=True):
        if fused:  # the fused SGD's head update rounds apart from torch's (within 1e-7)
            torch.testing.assert_close(engined, plain, rtol=1e-5, atol=1e-8)
        else:
            assert torch.equal(engined, plain)
        assert engined.abs().max() < 0.1  # a loss-sized gradient, not 65536 times one

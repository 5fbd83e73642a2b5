"""A user's training setup with everything the README says a controlled loop keeps, shared by two tests."""

import torch
from torch import nn


class TiedLM(nn.Module):
    """An embedding tied to the output projection (which has a bias of its own)."""

    def __init__(self):
        super().__init__()
        self.emb, self.mid, self.out = nn.Embedding(30, 16), nn.Linear(16, 16), nn.Linear(16, 30)
        self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(torch.relu(self.mid(self.emb(x))))


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

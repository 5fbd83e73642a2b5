"""On a GPU: what ``Controller.close()`` leaves on the fused step, and a Controller dropped without it.

The CPU tests (``tests/test_engine_standalone_after_close.py``, ``tests/test_controller_dropped.py``) run the fused step
under Triton's interpreter; this runs it as users do, on CUDA. A ResNet-18 (1-channel stem) trains 5 bf16 steps under
``Controller(policy="bf16")`` with AdamW, then:

- ``close``: every parameter, gradient and AdamW moment owns its storage; their values equal those just before
  ``close()``; ``torch.save`` of the head's ``state_dict`` is the size of a fresh model's head; the memory allocated
  after ``close()`` against before (the flat buffers freed, the copies made);
- ``dropped``: the same run, the Controller dropped without ``close()``: its engine hands the state back when it is
  collected, as ``close()`` does (the moments with the run's step count, parameters of their own), and a new
  Controller on the model and optimizer is accepted.

Usage (a device visit): python scripts/check_close_gpu.py
"""

from __future__ import annotations

import gc
import io

import torch
from torch import nn

import triaccel_rl as ta
from triaccel_rl.models import resnet18

STEPS = 5


def _trained(device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer, ta.Controller]:
    torch.manual_seed(0)
    model = resnet18(in_channels=1, n_classes=10).to(device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    ctl = ta.Controller(model, optimizer, policy="bf16")
    generator = torch.Generator(device=device).manual_seed(1)
    for _ in range(STEPS):
        x = torch.randn(64, 1, 28, 28, device=device, generator=generator)
        y = torch.randint(0, 10, (64,), device=device, generator=generator)
        with ctl.autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        ctl.step(loss)
    torch.cuda.synchronize(device)
    return model, optimizer, ctl


def _held(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        tensors[name] = p.data
        if p.grad is not None:
            tensors[f"{name}.grad"] = p.grad
    for index, (param, entry) in enumerate(optimizer.state.items()):
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                tensors[f"state {index} {key} {tuple(param.shape)}"] = value
    return tensors


def _saved_bytes(state: dict[str, torch.Tensor]) -> int:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getbuffer().nbytes


def _close(device: torch.device) -> dict[str, object]:
    model, optimizer, ctl = _trained(device)
    assert ctl.engine.fused, "the fused step did not run"
    optimizer.state_dict()  # exports the moments into optimizer.state (views), to compare with after close()
    before = {name: t.clone() for name, t in _held(model, optimizer).items()}
    allocated_open = torch.cuda.memory_allocated(device)
    ctl.close()
    gc.collect()
    allocated_closed = torch.cuda.memory_allocated(device)
    after = _held(model, optimizer)
    shared = [name for name, t in after.items() if t.untyped_storage().nbytes() != t.numel() * t.element_size()]
    changed = [name for name, t in after.items() if name in before and not torch.equal(t, before[name])]
    fresh = resnet18(in_channels=1, n_classes=10).to(device)
    head = model.get_submodule("head")
    head_closed, head_fresh = _saved_bytes(head.state_dict()), _saved_bytes(fresh.head.state_dict())
    return {
        "tensors": len(after),
        "sharing_storage": shared[:5],
        "changed_by_close": changed[:5],
        "moments_exported": sum(1 for name in after if name.startswith("state ")),
        "head_save_bytes_closed": head_closed,
        "head_save_bytes_fresh": head_fresh,
        "allocated_open_mib": round(allocated_open / 2**20, 1),
        "allocated_closed_mib": round(allocated_closed / 2**20, 1),
    }


def _dropped(device: torch.device) -> dict[str, object]:
    model, optimizer, ctl = _trained(device)
    optimizer.state_dict()  # views exported mid-run, with the step count of then: the hand-back must refresh it
    del ctl
    gc.collect()
    steps = sorted({float(entry["step"]) for entry in optimizer.state.values()})
    shared = [
        name
        for name, t in _held(model, optimizer).items()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size()
    ]
    ta.Controller(model, optimizer, policy="bf16").close()
    return {"moments_handed_back": len(optimizer.state), "step_counts": steps, "sharing_storage": shared[:5]}


def main() -> None:
    """Runs both checks on the first GPU and prints them."""
    device = torch.device("cuda")
    results = {"close": _close(device), "dropped": _dropped(device)}
    print(torch.cuda.get_device_name(device))
    for name, values in results.items():
        for key, value in values.items():
            print(f"{name:8} {key:24} {value}")


if __name__ == "__main__":
    main()

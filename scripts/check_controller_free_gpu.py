"""On CUDA: is a closed, dropped Controller freed by reference counting? What GPU and pinned memory is left?

A user's loop on ResNet-18 (fused step, rollback copies in pinned host memory, the loader's data on the GPU), three
stages of gradual unfreezing as the README describes (a new Controller after ``close()`` on the last), with the
garbage collector off: the memory allocated after each stage should come back to where it was before it.

``torch._dynamo`` is imported first: imported by the first optimizer with the collector off, it would keep that
optimizer and its state (one momentum buffer per parameter) in a cycle until a collection (torch.fx.wrap's frame
refers to itself, and holds the import's frames, ``Optimizer.__init__``'s among them).

Usage (a device visit): bash scripts/device-visit.sh <commit> py=scripts/check_controller_free_gpu.py
"""

import gc
import weakref

import torch
import torch._dynamo  # before the collector is off: see the docstring
from torch import nn

import triaccel_rl as ta
from triaccel_rl.models import resnet18

print(torch.__version__, torch.cuda.get_device_name())
device = torch.device("cuda")
generator = torch.Generator().manual_seed(0)
data = (torch.randn(4096, 1, 28, 28, generator=generator), torch.randint(0, 10, (4096,), generator=generator))
model = resnet18(in_channels=1, n_classes=10).to(device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
gc.collect()
torch.cuda.synchronize()
base = torch.cuda.memory_allocated()
print(f"model alone: {base / 2**20:.1f} MiB allocated")
gc.disable()
try:
    for stage in range(3):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
        ctl = ta.Controller(model, optimizer, policy="heuristic")
        for x, y in ctl.loader(data, batch_size=256, epochs=1):
            with ctl.autocast():
                loss = nn.functional.cross_entropy(model(x), y)
            ctl.step(loss)
        torch.cuda.synchronize()
        held, fused = torch.cuda.memory_allocated() - base, ctl.engine.fused
        ctl.close()
        guard, controller = weakref.ref(ctl.guard), weakref.ref(ctl)
        del ctl, optimizer, x, y, loss
        torch.cuda.synchronize()
        left = torch.cuda.memory_allocated() - base
        print(
            f"stage {stage}: fused={fused} held {held / 2**20:.1f} MiB;"
            f" after close+del: controller alive={controller() is not None}, guard alive={guard() is not None},"
            f" left {left / 2**20:.2f} MiB"
        )
finally:
    gc.enable()
gc.collect()
print(f"after a full collection: left {(torch.cuda.memory_allocated() - base) / 2**20:.2f} MiB")

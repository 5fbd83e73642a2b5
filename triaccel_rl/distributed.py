"""What the controller agrees on across the processes of a ``torch.distributed`` run (DDP, one process a device).

Each process holds a replica that DDP keeps equal by all-reducing the gradients; a choice made from one process's own
values (its loss, its buffers) must be taken by every process, or the replicas drift apart. In a single process, or
without ``torch.distributed``, nothing here communicates.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["any_rank", "world_size"]


def world_size() -> int:
    """The processes of the default group; 1 without ``torch.distributed`` or before ``init_process_group``."""
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size()


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is true in any process of the default group; ``flag`` itself in a single process.

    Every process of the group must call it at the same point, as any collective. Host-device sync under NCCL.

    Args:
        flag: this process's answer.
        device: the model's device: NCCL reduces a tensor on it (a CUDA device); other backends (gloo) a CPU tensor.
    """
    if world_size() == 1:
        return flag
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    value = torch.tensor([int(flag)], dtype=torch.int32, device=on)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())

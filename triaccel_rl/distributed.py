"""What the controller agrees on across the processes of a ``torch.distributed`` run (DDP, one process a device).

Each process holds a replica that DDP keeps equal by all-reducing the gradients; a choice made from one process's own
values (its loss, its buffers) must be taken by every process, or the replicas drift apart. In a single process, or
without ``torch.distributed``, nothing here communicates.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

__all__ = ["any_rank", "any_rank_on_device", "any_ranks", "world_size"]


def world_size() -> int:
    """The processes of the default group; 1 without ``torch.distributed`` or before ``init_process_group``."""
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size()


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is true in any process of the default group; ``flag`` itself in a single process.

    :func:`any_ranks` for one flag: every process of the group must call it at the same point, as any collective.
    """
    return any_ranks([flag], device)[0]


def any_ranks(flags: Sequence[bool], device: torch.device) -> list[bool]:
    """For each of ``flags``, whether it is true in any process of the default group; ``flags`` in a single process.

    One collective for them all (a MAX over one small tensor): every process of the group must call it at the same
    point with as many flags, as any collective. Host-device sync under NCCL.

    Args:
        flags: this process's answers.
        device: the model's device: NCCL reduces a tensor on it (a CUDA device); other backends (gloo) a CPU tensor.
    """
    if world_size() == 1:
        return [bool(flag) for flag in flags]
    on = torch.device("cpu") if "cpu" in _backends() else device  # NCCL alone reduces CUDA tensors only
    values = torch.tensor([int(flag) for flag in flags], dtype=torch.int32, device=on)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(value) for value in values.tolist()]


def any_rank_on_device(flags: torch.Tensor) -> torch.Tensor:
    """Each of ``flags`` (a bool tensor) or-ed over the processes of the default group; ``flags`` in a single process.

    For a choice made on the device (the fused step's skip): the answer stays on ``flags``' device, with no host-device
    sync under NCCL (gloo copies a CUDA tensor through the host). In a single process: no collective, no kernel. Every
    process of the group must call it at the same point with as many flags, as any collective.
    """
    if world_size() == 1:
        return flags
    values = flags.to(torch.uint8)  # a copy, reduced in place (a MAX over bool is not in every backend)
    if flags.device.type not in _backends():  # no backend for this device's tensors in the group: through the host
        values = values.cpu()
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values.to(flags.device).bool()


def _backends() -> dict[str, str]:
    """The default group's backend for each device type: ``{"cpu": "gloo", "cuda": "nccl"}``.

    From the group's configuration: ``init_process_group()`` with no backend named (torchrun's usual call) sets one a
    device type, and ``dist.get_backend()`` then says only ``"undefined"`` (it sent the fused step's flag through the
    host at every step).
    """
    config = str(dist.get_backend_config())  # "cpu:gloo,cuda:nccl"; an older torch may give one name for all
    if ":" not in config:
        return {"cpu": config, "cuda": config} if config != "nccl" else {"cuda": config}
    return dict(item.split(":", 1) for item in config.split(","))

"""On two GPUs with NCCL: the Controller under DistributedDataParallel, checked and timed against a plain DDP loop.

The CPU tests (``tests/test_distributed.py``, gloo) cover the reference update path; on CUDA the fused step makes the
parameters views of one flat buffer and decides its skip on the device, which only a GPU run shows working beside
DDP's gradient buckets. Each process trains a ResNet-18 (1-channel stem) replica on its own shard of random 28×28
images, and the script checks:

- ``fp32-vs-plain``: ``policy="fp32"`` against a plain DDP loop over the same batches (cuDNN deterministic), built
  after DDP wraps the model and before: the largest parameter difference, and whether the two processes' replicas are
  equal bit for bit;
- ``bf16``/``fp16``: the static 16-bit policies keep the replicas equal;
- ``nan-rollback``: a NaN image in process 1's batch at an interval's last step (batch norm's statistics go NaN
  there): both processes roll back, to equal replicas;
- ``loss-nan``: a NaN term without a gradient in process 1's loss under fp16 (its all-reduced gradients stay
  finite): the fused step is skipped in both processes, whose replicas and loss scales stay equal;
- ``refused``: the heuristic is refused;
- timing: a plain DDP loop (bf16 autocast, channels_last) against ``Controller(policy="bf16")``, rows in turns, medians
  of chunks of 20 steps, batch 256 per GPU.

On a machine of one GPU both processes share it, through gloo (NCCL takes one process a GPU): the fused step beside
DDP is exercised as on two, the collectives go through the host, and the timing says little.

Usage (a device visit): torchrun --nproc_per_node 2 scripts/check_ddp_gpu.py --out $OUT/ddp.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.functional import cross_entropy
from torch.nn.parallel import DistributedDataParallel

import triaccel_rl as ta
from triaccel_rl.errors import ConfigError
from triaccel_rl.experiment import git_commit
from triaccel_rl.models import resnet18

Batches = list[tuple[torch.Tensor, torch.Tensor]]


def _batches(rank: int, n: int, size: int, device: torch.device) -> Batches:
    generator = torch.Generator(device="cpu").manual_seed(1000 + rank)
    x = torch.randn(n, size, 1, 28, 28, generator=generator)
    y = torch.randint(0, 10, (n, size), generator=generator)
    return [(x[i].to(device), y[i].to(device)) for i in range(n)]


def _fresh_model(device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return resnet18(in_channels=1, n_classes=10).to(device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])


def _replicas_equal(model: nn.Module) -> bool:
    mine = _flat(model)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    return all(torch.equal(gathered[0], other) for other in gathered[1:])


def _controlled(
    rank: int,
    device: torch.device,
    data: Batches,
    policy: str,
    wrap_first: bool = True,
    nan_at: int | None = None,
    nan_loss_at: int | None = None,
) -> tuple[nn.Module, ta.Controller]:
    model = _fresh_model(device)
    if wrap_first:
        ddp = DistributedDataParallel(model, device_ids=[device.index])
        ctl = ta.Controller(ddp, _sgd(ddp), policy=policy, config=ta.ControllerConfig(interval_steps=5))
    else:  # the Controller over the bare model, DDP wrapped around it after
        ctl = ta.Controller(model, _sgd(model), policy=policy, config=ta.ControllerConfig(interval_steps=5))
        ddp = DistributedDataParallel(model, device_ids=[device.index])
    for step, (x, y) in enumerate(data):
        if nan_at is not None and rank == 1 and step == nan_at:
            x = x.clone()
            x[0] = float("nan")
        with ctl.autocast():
            loss = cross_entropy(ddp(x), y)
        if nan_loss_at is not None and rank == 1 and step == nan_loss_at:
            loss = loss + torch.tensor(float("nan"), device=device)  # no gradient: DDP's all-reduce stays finite
        ctl.step(loss)
    torch.cuda.synchronize()
    ctl.close()
    return model, ctl


def _plain(device: torch.device, data: Batches) -> nn.Module:
    model = _fresh_model(device)
    ddp = DistributedDataParallel(model, device_ids=[device.index])
    optimizer = _sgd(ddp)
    for x, y in data:
        loss = cross_entropy(ddp(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    torch.cuda.synchronize()
    return model


def _checks(rank: int, device: torch.device) -> dict[str, Any]:
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    data = _batches(rank, 12, 64, device)
    out: dict[str, Any] = {}
    reference = _flat(_plain(device, data))
    for wrap_first in (True, False):
        model, ctl = _controlled(rank, device, data, "fp32", wrap_first)
        difference = float((_flat(model) - reference).abs().max())
        scale = float(reference.abs().max())
        out[f"fp32-vs-plain ({'ddp first' if wrap_first else 'controller first'})"] = {
            "fused": ctl.engine.fused,
            "max_abs_diff": difference,
            "max_abs_param": scale,
            "replicas_equal": _replicas_equal(model),
        }
    for policy in ("bf16", "fp16"):
        model, ctl = _controlled(rank, device, data, policy)
        out[policy] = {
            "fused": ctl.engine.fused,
            "replicas_equal": _replicas_equal(model),
            "skipped": ctl.skipped_steps,
        }
    model, ctl = _controlled(rank, device, data, "fp32", nan_at=9)
    out["nan-rollback"] = {
        "rollbacks": ctl.rollbacks,
        "finite": bool(torch.isfinite(_flat(model)).all()),
        "replicas_equal": _replicas_equal(model),
    }
    model, ctl = _controlled(rank, device, data, "fp16", nan_loss_at=7)
    scales = [torch.zeros(1, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(scales, torch.tensor([ctl.engine.loss_scale], device=device))
    out["loss-nan"] = {
        "fused": ctl.engine.fused,
        "skipped": ctl.skipped_steps,
        "replicas_equal": _replicas_equal(model),
        "scales_equal": all(torch.equal(scales[0], other) for other in scales),
    }
    refused = DistributedDataParallel(_fresh_model(device), device_ids=[device.index])
    try:
        ta.Controller(refused, _sgd(refused), "heuristic")
        out["refused"] = "accepted"
    except ConfigError as error:
        out["refused"] = str(error)[:80]
    return out


def _timing(rank: int, device: torch.device, chunks: int = 7, steps: int = 20) -> dict[str, float]:
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True
    data = _batches(rank, 8, 256, device)
    plain_model = _fresh_model(device)
    plain_ddp = DistributedDataParallel(plain_model, device_ids=[device.index])
    plain_optimizer = _sgd(plain_ddp)
    ctl_model = _fresh_model(device)
    ctl_ddp = DistributedDataParallel(ctl_model, device_ids=[device.index])
    ctl = ta.Controller(ctl_ddp, _sgd(ctl_ddp), policy="bf16")

    def plain_step(i: int) -> None:
        x, y = data[i % len(data)]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = cross_entropy(plain_ddp(x), y)
        plain_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        plain_optimizer.step()

    def controlled_step(i: int) -> None:
        x, y = data[i % len(data)]
        with ctl.autocast():
            loss = cross_entropy(ctl_ddp(x), y)
        ctl.step(loss)

    rows: dict[str, Callable[[int], None]] = {"plain-ddp-bf16": plain_step, "controller-bf16": controlled_step}
    for step in rows.values():  # warm-up: cuDNN's autotuning, the fused step's first launches
        for i in range(10):
            step(i)
    times: dict[str, list[float]] = {name: [] for name in rows}
    for chunk in range(chunks):
        order = list(rows) if chunk % 2 == 0 else list(reversed(rows))
        for name in order:
            dist.barrier()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for i in range(steps):
                rows[name](i)
            torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) / steps * 1e3)
    ctl.close()
    return {f"{name} ms/step": statistics.median(values) for name, values in times.items()}


def main() -> None:
    """Runs the checks and the timing in each process; process 0 prints them and writes ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="write the results of process 0 here (JSON)")
    parser.add_argument(
        "--backend", choices=("nccl", "gloo"), default=None, help="default: nccl with a GPU a process, else gloo"
    )
    args = parser.parse_args()
    gpus = torch.cuda.device_count()
    backend = args.backend or ("nccl" if gpus >= int(os.environ.get("WORLD_SIZE", "1")) else "gloo")
    dist.init_process_group(backend)
    rank = dist.get_rank()
    device = torch.device("cuda", rank % gpus)
    torch.cuda.set_device(device)
    try:
        results = {"checks": _checks(rank, device), "timing": _timing(rank, device)}
        every: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(every, results)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        record = {
            "device": torch.cuda.get_device_name(device),
            "torch": torch.__version__,
            "commit": git_commit(),
            "date": time.strftime("%Y-%m-%d"),
            "command": "torchrun --nproc_per_node 2 scripts/check_ddp_gpu.py",
            "backend": backend,
            "gpus": gpus,
            "processes": every,
        }
        if args.out:
            with open(args.out, "w") as file:
                json.dump(record, file, indent=1)
        print(json.dumps(every[0]["checks"], indent=1))
        for name in every[0]["timing"]:
            print(f"{name}: " + " / ".join(f"{p['timing'][name]:.2f}" for p in every))


if __name__ == "__main__":
    main()

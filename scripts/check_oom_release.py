"""Checks whether the allocator gives memory back after a recovered out-of-memory error.

The allocator xfail it was written for came from a failed CUDA graph capture earlier in the process (BENCHMARKS.md,
"A failed CUDA graph capture"; ``scripts/check_failed_capture.py``).

Usage: ``python scripts/check_oom_release.py``; replays ``test_real_out_of_memory_is_recovered`` (fillers take the
device's memory, a real CUDA OOM, recovered by splitting the batch), drops everything, then prints what the allocator
still reserves and why: its segments with their live bytes, and the live CUDA tensors with what refers to them.
"""

import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "elastic"))
from test_gpu_elastic import _occupy_all_but, _wide_task  # the test's own helpers

from triaccel_rl.config import MemoryBudget
from triaccel_rl.training import TrainingRun

GIB = 2**30


def state(label: str) -> None:
    """Prints the allocator's and the device's counts."""
    free, total = torch.cuda.mem_get_info()
    print(
        f"{label}: allocated {torch.cuda.memory_allocated() / GIB:.2f} GiB, reserved "
        f"{torch.cuda.memory_reserved() / GIB:.2f} GiB, device free {free / GIB:.2f} of {total / GIB:.2f} GiB"
    )


def segments() -> None:
    """Prints the allocator's large segments with their bytes by block state."""
    big = [s for s in torch.cuda.memory_snapshot() if s["total_size"] >= 1 << 30]
    print(f"  {len(big)} segments of 1 GiB or more:")
    for s in big:
        states: dict[str, int] = {}
        for block in s["blocks"]:
            states[block["state"]] = states.get(block["state"], 0) + block["size"]
        print(f"    {s['total_size'] / GIB:.2f} GiB, stream {s['stream']}, pool {s.get('segment_pool_id')}, "
              f"blocks by state (GiB): { {k: round(v / GIB, 3) for k, v in states.items()} }")  # fmt: skip


def live_tensors() -> None:
    """Prints the live CUDA tensors of 256 MiB or more and what refers to them."""
    found = 0
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.is_cuda and obj.untyped_storage().nbytes() >= 1 << 28:
                found += 1
                print(f"  live tensor {tuple(obj.shape)} {obj.dtype}, storage "
                      f"{obj.untyped_storage().nbytes() / GIB:.2f} GiB")  # fmt: skip
                for referrer in gc.get_referrers(obj)[:5]:
                    print(f"    referred to by {type(referrer).__name__}: {str(referrer)[:120]}")
        except Exception:  # objects that fail isinstance or is_cuda
            continue
    print(f"  {found} live CUDA tensors of 256 MiB or more")


def scenario() -> None:
    """The recovered out-of-memory run of the test, dropped on return."""
    run = TrainingRun(
        _wide_task(), seed=0, device="cuda", n_probe=64, memory=MemoryBudget(fraction=1.0), cuda_graphs=False
    )
    run.step()
    torch.cuda.empty_cache()
    room = run.predicted_memory_bytes(4096) - run.predicted_memory_bytes(0)
    filler = _occupy_all_but(room // 3)
    state("fillers in place")
    try:
        stats = run.step()
        print(f"OOM events in the step: {stats.oom_events}; micro-batches {run.last_micro_batches}")
        print(f"later steps' OOMs: {[run.step().oom_events for _ in range(6)]}")
    finally:
        filler.clear()
        del filler
    state("fillers dropped, run alive")


if __name__ == "__main__":
    state("start")
    scenario()
    gc.collect()
    torch.cuda.empty_cache()
    state("after gc.collect() and empty_cache()")
    segments()
    live_tensors()
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    state("once more, after a synchronize")

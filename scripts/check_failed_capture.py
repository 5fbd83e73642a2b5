"""Checks whether a failed CUDA graph capture stops ``empty_cache()`` from freeing memory, and the repair.

Usage: ``python scripts/check_failed_capture.py`` (a CUDA GPU). A capture fails on a host sync inside it; then a
1 GiB block is freed and ``empty_cache()`` called (on torch 2.11 the block stays reserved while the allocator
still routes to the failed capture's pool), and a random op is tried (on torch 2.11 it raises while the default
generator stays in capture mode). ``triaccel_rl.graphs.recover_from_failed_capture`` ends the routing and the
same check is made again.
"""

import torch

from triaccel_rl.graphs import recover_from_failed_capture

GIB = 1 << 30


def kept_after_empty_cache() -> int:
    """Bytes a freed 1 GiB block leaves reserved after ``empty_cache()``."""
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved()
    block = torch.empty(GIB, dtype=torch.uint8, device="cuda")
    del block
    torch.cuda.empty_cache()
    return torch.cuda.memory_reserved() - before


def random_op_error() -> str:
    """'' if a random op runs on the device, else the first line of its error."""
    try:
        torch.randn(4, device="cuda")
    except RuntimeError as err:
        return str(err).splitlines()[0][:90]
    return ""


def main() -> None:
    """Fails a capture, then measures what empty_cache() keeps before and after the repair."""
    device = torch.device("cuda", torch.cuda.current_device())
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(device)}")
    print(f"before any capture: {kept_after_empty_cache() / GIB:.2f} GiB kept")
    pool = torch.cuda.graph_pool_handle()
    x = torch.ones(4, device=device)
    torch.cuda.synchronize()
    try:
        with torch.cuda.graph(torch.cuda.CUDAGraph(), pool=pool):
            float((x * 2).sum())  # a host sync: not allowed while capturing
    except RuntimeError as err:
        print(f"capture failed: {str(err).splitlines()[0][:100]}")
    kept, error = kept_after_empty_cache(), random_op_error()
    print(f"after the failed capture: {kept / GIB:.2f} GiB kept; random op: {error or 'runs'}")
    print(f"recover_from_failed_capture ended a routing torch had left: {recover_from_failed_capture(device, pool)}")
    kept, error = kept_after_empty_cache(), random_op_error()
    print(f"after the repair: {kept / GIB:.2f} GiB kept; random op: {error or 'runs'}")


if __name__ == "__main__":
    main()

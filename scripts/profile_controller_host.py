"""Where a user's eager step under a Controller spends host time on a GPU, beside the plain loop (a dev tool).

For each row of ``experiments/bench_compile.py`` (``plain-eager``, ``controller-eager``): the host time a step takes
to issue (no sync inside the timed steps), the wall time a step (a sync at the end), the CUDA kernel launches a step
(``torch.profiler``), and the functions with the most host time under ``cProfile`` (their own time, top ``--top``).

Usage: ``python scripts/profile_controller_host.py [--model resnet18-fmnist] [--batch 256] [--precision fp16]``.
Writes ``--out`` (JSON) and prints a short table last.
"""

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
from bench_compile import Args, build_row


def main() -> None:
    """Profiles both rows and writes ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18-fmnist")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--precision", default="fp16")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", default=str(Path(os.environ.get("OUT", ".")) / "profile_controller_host.json"))
    opts = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this profile needs a CUDA GPU")
    torch.backends.cudnn.benchmark = True
    device = torch.device("cuda")
    n = opts.steps
    # Enough batches for the warm-up, the timed steps, the launch count and the cProfile pass
    args = Args(batch_size=opts.batch, precision=opts.precision, warmup=30, steps=3 * n + 10)
    results = {}
    for name in ("plain-eager", "controller-eager"):
        row = build_row(opts.model, name, args, device, "inductor")
        for _ in range(30):
            row.step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            row.step()
        issued = time.perf_counter() - start
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                row.step()
            torch.cuda.synchronize()
        launches = sum(
            e.count
            for e in prof.key_averages()
            if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")
        )
        copies = sum(e.count for e in prof.key_averages() if e.key.startswith("cudaMemcpy"))
        syncs = sum(e.count for e in prof.key_averages() if "Synchronize" in e.key)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(n):
            row.step()
        torch.cuda.synchronize()
        profiler.disable()
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text).sort_stats("tottime")
        stats.print_stats(opts.top)
        results[name] = {
            "host_ms": issued / n * 1e3,
            "wall_ms": wall / n * 1e3,
            "launches_per_step": launches / 10,
            "memcpy_per_step": copies / 10,
            "syncs_per_step": syncs / 10,
            "cprofile_top": text.getvalue(),
        }
        print(f"=== {name}: top {opts.top} functions by own host time over {n} steps (cProfile)")
        print("\n".join(line for line in text.getvalue().splitlines() if line.strip()))
        if row.controller is not None:
            row.controller.close()
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "model": opts.model,
        "batch": opts.batch,
        "precision": opts.precision,
        "steps": n,
    }
    Path(opts.out).write_text(json.dumps({"meta": meta, "rows": results}, indent=1))
    print("| row | host ms/step (issue) | wall ms/step | kernel launches/step | memcpy/step | syncs/step |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['host_ms']:.2f} | {r['wall_ms']:.2f} | {r['launches_per_step']:.0f} | "
            f"{r['memcpy_per_step']:.0f} | {r['syncs_per_step']:.0f} |"
        )


if __name__ == "__main__":
    main()

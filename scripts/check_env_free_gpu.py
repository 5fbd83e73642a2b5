"""On CUDA: does a closed TrainingRun die by reference counting (fused path, CUDA graphs)? What memory is left?

Usage (a device visit): bash scripts/device-visit.sh <commit> py=scripts/check_env_free_gpu.py [task ...]
"""

import collections
import gc
import sys
import time
import weakref

import torch
import torch._dynamo

from triaccel_rl.training import TrainingRun

print(torch.__version__, torch.cuda.get_device_name())
for name in sys.argv[1:] or ["cnn-fmnist", "resnet18-fmnist"]:
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    gc.disable()
    t = time.perf_counter()
    try:
        run = TrainingRun(name, seed=0, device="cuda")
    except Exception as e:
        print(name, "build failed:", repr(e)[:200])
        gc.enable()
        continue
    cycle = ["bf16", "fp16", "fp32"]
    run.set_precisions([cycle[i % 3] for i in range(run.n_layers)])
    run.train_interval(3)
    run.set_precisions(["bf16"] * run.n_layers)
    run.train_interval(3)
    built = time.perf_counter() - t
    fused, graphs = run.engine.fused, run.graphs is not None
    held = torch.cuda.memory_allocated() - base
    t = time.perf_counter()
    run.close()
    model = weakref.ref(run.model)
    del run
    close_ms = 1e3 * (time.perf_counter() - t)
    alive = model() is not None
    left = torch.cuda.memory_allocated() - base
    print(
        f"{name}: fused={fused} graphs={graphs} built {built:.1f}s held {held / 2**20:.1f} MiB;"
        f" close+del {close_ms:.1f} ms;"
        f" model alive={alive}; left {left / 2**20:.2f} MiB"
    )
    gc.set_debug(gc.DEBUG_SAVEALL)
    gc.collect()
    kinds = collections.Counter(type(o).__module__ + "." + type(o).__qualname__ for o in gc.garbage)
    interesting = {k: v for k, v in kinds.items() if not k.startswith("builtins.") and not k.startswith("types.")}
    print("   garbage:", sum(kinds.values()), "objects; non-builtin:", dict(list(interesting.items())[:15]))
    gc.set_debug(0)
    gc.garbage.clear()
    gc.collect()
    print(f"   left after a full collection {(torch.cuda.memory_allocated() - base) / 2**20:.2f} MiB")
    gc.enable()

# The environment on CUDA: full collections run by reset/close, the first episode's model, and the allocator's counts.
import numpy as np  # noqa: E402
from triaccel_rl.envs import TriAccelEnv  # noqa: E402

from triaccel_rl.config import RewardConfig  # noqa: E402

seen: list[int] = []
gc.callbacks.append(lambda phase, info: seen.append(info["generation"]) if phase == "start" else None)
for name in sys.argv[1:] or ["cnn-fmnist", "resnet18-fmnist"]:
    gc.collect()
    seen.clear()
    gc.disable()
    env = TriAccelEnv(task=name, device="cuda", reward_config=RewardConfig(budget_intervals=2), max_decisions=3)
    env.reset(seed=0)
    first = weakref.ref(env.loop.run.model)
    env.step(np.array([1, 2, 0, 1, 2, 1]))
    mem_first = torch.cuda.memory_allocated()
    times = []
    for seed in range(1, 4):
        t = time.perf_counter()
        env.reset(seed=seed)
        times.append(time.perf_counter() - t)
        env.step(np.array([1, 2, 0, 1, 2, 1]))
    t = time.perf_counter()
    env.close()
    close_ms = 1e3 * (time.perf_counter() - t)
    print(
        f"env {name}: first model alive={first() is not None}; collections {seen};"
        f" resets {[round(1e3 * x) for x in times]} ms;"
        f" close {close_ms:.1f} ms; allocated after the first episode {mem_first / 2**20:.1f} MiB, after close "
        f"{torch.cuda.memory_allocated() / 2**20:.2f} MiB, reserved {torch.cuda.memory_reserved() / 2**20:.1f} MiB"
    )
    gc.enable()

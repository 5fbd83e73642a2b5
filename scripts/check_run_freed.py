"""Checks whether a finished TrainingRun frees its GPU memory (a leak grows with every compare run and RL episode).

Usage: ``python scripts/check_run_freed.py``; prints, for graphs on and off, the memory left allocated after
the run is dropped and collected, and what still refers to the run if it is alive.
"""

import gc
import weakref

import torch

from triaccel_rl.training import TrainingRun


def check(graphs: bool) -> None:
    """Trains a few steps, drops the run, and reports what is left and who holds it."""
    gc.collect()
    before = torch.cuda.memory_allocated()
    run = TrainingRun("resnet18-fmnist", seed=0, device="cuda", channels_last=True, cuda_graphs=graphs)
    run.set_precisions(["bf16"] * run.n_layers)
    run.train_interval(3)
    run.probe_loss()
    ref = weakref.ref(run)
    engine_ref, store_ref = weakref.ref(run.engine), weakref.ref(run.engine.store)
    del run
    gc.collect()
    torch.cuda.synchronize()
    left = torch.cuda.memory_allocated() - before
    print(
        f"graphs={graphs}: run alive {ref() is not None}, engine alive {engine_ref() is not None}, "
        f"store alive {store_ref() is not None}, {left / 2**20:.1f} MiB left allocated"
    )
    for name, target in (("run", ref()), ("store", store_ref())):
        if target is None:
            continue
        for referrer in gc.get_referrers(target):
            if referrer is globals() or isinstance(referrer, type(check.__code__)):
                continue
            print(f"  {name} referred to by {type(referrer).__name__}: {str(referrer)[:160]}")


if __name__ == "__main__":
    check(False)
    check(True)
    check(True)  # a second run: one-time costs (a stream's workspaces, caches) are not left again

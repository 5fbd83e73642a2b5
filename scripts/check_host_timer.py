"""Host-side costs on this machine that the signals benchmark's per-call timing depends on.

Prints the clock source, the cost of an empty ``perf_counter`` region, of ``loss.detach()``, and of an
unsampled ``DeviceMoments.observe`` / ``observe_layers`` call (the per-step calls the budget does not see).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn

from triaccel_rl.signals.device import DeviceMoments


def per_call_us(fn: Callable[[], object], n: int = 20000, repeats: int = 7) -> float:
    """Median over ``repeats`` runs of the mean microseconds of one ``fn()`` call in a loop of ``n``."""
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - start) / n * 1e6)
    return statistics.median(runs)


def main() -> None:
    """Prints the measurements."""
    source = Path("/sys/devices/system/clocksource/clocksource0/current_clocksource")
    print("clocksource:", source.read_text().strip() if source.exists() else "unknown")
    print(f"time.get_clock_info: {time.get_clock_info('perf_counter')}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pairs = []
    for _ in range(100000):
        a = time.perf_counter()
        b = time.perf_counter()
        pairs.append(b - a)
    median_us, mean_us = statistics.median(pairs) * 1e6, statistics.fmean(pairs) * 1e6
    print(f"empty perf_counter region: median {median_us:.3f} us, mean {mean_us:.3f} us")
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(10)]).to(device)
    model(torch.ones(4, 16, device=device)).sum().backward()
    layers = [list(layer.parameters()) for layer in model]
    loss = model(torch.ones(4, 16, device=device)).sum()
    sq = torch.zeros(10, device=device)
    detached = loss.detach()
    print(f"loss.detach(): {per_call_us(lambda: loss.detach()):.3f} us")
    for budget in (None, 0.001):
        moments = DeviceMoments(layers, budget_frac=budget)
        moments.observe_layers(detached, sq)
        moments.every_steps = 1 << 40
        layers_us = per_call_us(partial(moments.observe_layers, detached, sq))
        norms_us = per_call_us(partial(moments.observe, detached))
        print(f"unsampled observe_layers (budget {budget}): {layers_us:.3f} us; observe: {norms_us:.3f} us")
    moments = DeviceMoments(layers)
    print(f"sampled observe_layers: {per_call_us(lambda: moments.observe_layers(detached, sq), n=2000):.3f} us")
    moments.flush()


if __name__ == "__main__":
    main()

"""Can a run tell, from its own first intervals, that its LR is below or above the task's own? A lookahead signal.

    python experiments/lr_lookahead_probe.py --workers 2           # every task of the suite, 5 LR factors, 2 seeds
    python experiments/lr_lookahead_probe.py --tasks synthetic --factors 0.5,2 --seeds 1 --share 0.1   # a smoke run

Issue 6's learned policies could not learn an LR move as a response to the run: a privileged teacher that knows
each episode's LR mistuning could be imitated on 29% of decisions when the mistuning went both ways, because the
observation does not tell an LR that is too low from one that is too high (BENCHMARKS.md, issue 6). This measures one
candidate signal for it, outside the product (nothing here changes the observation):

**lookahead ratio** at a decision: with ``Delta`` the parameters' displacement over the last interval, the probe loss
at ``theta + Delta`` against at ``theta``, over the last interval's own drop:
``(L(theta) - L(theta + Delta)) / (L(theta - Delta) - L(theta))``, where ``L(theta - Delta)`` is the probe loss the
interval started from. About 1: the loss is still falling along a straight line, so a longer step (a higher LR) would
have gone further; at or below 0: another such step climbs, the curvature or the gradient noise along ``Delta`` has
caught up. It costs one probe forward and a copy of the weights per decision.

Beside it, for comparison, the signal the observation has now: the **loss trend** (the interval's relative drop of
the probe loss, ``observation.GLOBAL_FEATURES``' ``loss_trend`` with its sign flipped).

And a third candidate, a reference that should not depend on the task: the **stability ratio**, the LR times the
largest eigenvalue of the probe loss's Hessian as the optimizer sees it, over the largest such product at which the
optimizer's update is still stable on a quadratic: ``lr * lambda / threshold``. The eigenvalue is preconditioned by
AdamW's ``1 / (sqrt(v_hat) + eps)`` (symmetrically, ``P^-1/2 H P^-1/2``) and found by ``--sharpness-iters`` steps of
power iteration with Hessian-vector products (run again, shifted, when the dominant eigenvalue is negative; fp32, the
probe batch, batch norm on the batch's statistics, attention by the math kernel, which has a double backward). The
thresholds: ``2 (1 + b1) / (1 - b1)`` for AdamW (38 at b1 = 0.9; Cohen et al. 2022, "Adaptive gradient methods at
the edge of stability"), ``(2 + 2 mu) / (1 + 2 mu)`` for torch's Nesterov SGD (1.36 at mu = 0.9). Well below 1: the
LR is far from where the curvature would stop it, whatever the task; training at a large LR tends to sit near 1 (the
edge of stability). Reported as ``log10`` of the ratio. It costs ``--sharpness-iters`` Hessian-vector products a
decision, far more than a policy's observation may; this asks only whether it would carry the information.

Each run is the transfer protocol's (``experiments/transfer.py``: cost mode ``profile``, every layer in bf16, a
decision every 10 steps, constant LR) with the task's LR × ``f`` from the first step, for the first ``share`` of its
2-epoch budget; a feature's value for the run is its median over those decisions. Reported: per task and factor the
mean over seeds, and, pooled over every task, the AUC with which each feature ranks a run whose LR is below the
task's (``f < 1``) above one whose LR is above it (``f > 1``): 0.5 is chance, 1 a perfect split, below 0.5 the
opposite order. A teacher's notion of "too low" here is the task's registered LR, as ``LrOracleTeacher`` has it.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from triaccel_rl.experiment import command_line, cpu_machine, file_to_write, git_commit, parse_args, parse_floats


@dataclass
class Args:
    """Command-line arguments (each field is a ``--flag``)."""

    tasks: str = "all"
    """Comma-separated tasks; ``all``: the training, held-out and fresh held-out tasks (``triaccel_rl.tasks``)."""
    factors: str = "0.5,0.71,1,1.41,2"
    """LR factors of the task's registered LR."""
    seeds: int = 2
    """Runs (seeds 0..N-1) per task and factor."""
    share: float = 0.25
    """Share of the 2-epoch budget to run (the decisions a policy would make its LR move in)."""
    epochs: float = 2.0
    """The budget ``share`` is taken of, in epochs (the transfer protocol's 2)."""
    interval_steps: int = 10
    """Optimizer steps between decisions (the transfer protocol's 10)."""
    sharpness_iters: int = 20
    """Power-iteration steps for the stability ratio at each decision (0: not measured)."""
    workers: int = 1
    """Processes running the runs side by side (one CPU thread each; the results do not depend on it)."""
    device: str = "cpu"
    """``cpu`` (the transfer protocol, modelled time) or ``cuda`` (the GPU benchmark's tasks: measured time)."""
    batch_size: int = 0
    """Batch size (0: the task's own)."""
    out: str = "experiments/results/issue6_2026-12-04/lr_lookahead_probe.json"
    """Results JSON."""


def stability_ratio(run: Any, iters: int, seed: int) -> float:
    """``lr * lambda_max / threshold`` for ``run`` now (see the module docstring); ``run`` on the reference path.

    Example:
        >>> from triaccel_rl.tasks import get_task
        >>> from triaccel_rl.training import TrainingRun
        >>> run = TrainingRun(get_task("synthetic"), seed=0, device="cpu", cost_mode="profile")
        >>> 0 < stability_ratio(run, iters=5, seed=0) < 1  # before any step: SGD, far from the edge
        True
    """
    import torch

    if run.engine.fused:
        raise ValueError("stability_ratio reads torch.optim's state: run the reference path (device='cpu')")
    optimizer = run.optimizer
    group = optimizer.param_groups[0]
    params = [p for p in run.model.parameters() if p.requires_grad]
    if isinstance(optimizer, torch.optim.AdamW):
        beta1, beta2 = group["betas"]
        threshold = 2 * (1 + beta1) / (1 - beta1)
        scales = []
        for p in params:  # P^-1/2, with P = sqrt(v_hat) + eps (the identity before the first step)
            state = optimizer.state.get(p, {})
            if "exp_avg_sq" not in state:
                scales.append(torch.ones_like(p))
                continue
            v_hat = state["exp_avg_sq"] / (1 - beta2 ** float(state["step"]))
            scales.append((v_hat.sqrt() + group["eps"]).rsqrt())
    else:
        mu = group["momentum"]
        threshold = (2 + 2 * mu) / (1 + 2 * mu) if group["nesterov"] else 2 * (1 + mu)
        scales = [torch.ones_like(p) for p in params]
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no double backward
        loss = run._probe_body(run._probe_x, run._probe_y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    generator = torch.Generator().manual_seed(seed)

    def top_eigenvalue(shift: float) -> float:
        """Power iteration on ``P^-1/2 H P^-1/2 - shift I``: its eigenvalue of largest magnitude, plus ``shift``."""
        vector = [torch.randn(p.shape, generator=generator) for p in params]
        eigenvalue = 0.0
        for _ in range(iters):
            norm = math.sqrt(sum(float((v * v).sum()) for v in vector))
            vector = [v / norm for v in vector]
            products = torch.autograd.grad(
                grads, params, grad_outputs=[s * v for s, v in zip(scales, vector, strict=True)], retain_graph=True
            )
            image = [s * h - shift * v for s, h, v in zip(scales, products, vector, strict=True)]
            eigenvalue = float(sum((w * v).sum() for w, v in zip(image, vector, strict=True)))  # Rayleigh quotient
            vector = [w.detach() for w in image]
        return eigenvalue + shift

    eigenvalue = top_eigenvalue(0.0)
    if eigenvalue < 0:  # the dominant eigenvalue was negative: shifted by it, the largest one dominates
        eigenvalue = top_eigenvalue(eigenvalue)
    return group["lr"] * eigenvalue / threshold


def probe_run(task_name: str, factor: float, seed: int, args: Args) -> dict[str, Any]:
    """One run's per-decision lookahead ratios, loss trends and (with ``sharpness_iters``) stability ratios."""
    import torch

    from triaccel_rl.tasks import get_task
    from triaccel_rl.training import TrainingRun
    from triaccel_rl.types import Precision

    task = get_task(task_name)
    run = TrainingRun(
        replace(task, base_lr=task.base_lr * factor),
        seed=seed,
        device=args.device,
        cost_mode="profile" if args.device == "cpu" else "measured",
        batch_size=args.batch_size or None,
    )
    run.set_precisions([Precision.BF16] * len(run.layers))
    params = [p for p in run.model.parameters() if p.requires_grad]
    steps = int(args.share * args.epochs * len(task.data(seed).train_x) // run.batch_size)
    before = [p.detach().clone() for p in params]
    loss_before = run.probe_loss()
    ratios, trends, stability = [], [], []
    for _ in range(max(steps // args.interval_steps, 1)):
        run.train_interval(args.interval_steps)
        if args.sharpness_iters:
            stability.append(math.log10(max(stability_ratio(run, args.sharpness_iters, seed), 1e-12)))
        loss_now = run.probe_loss()
        with torch.no_grad():
            now = [p.detach().clone() for p in params]
            for p, current, start in zip(params, now, before, strict=True):
                p.add_(current - start)  # theta + Delta
            loss_ahead = run.probe_loss()
            for p, current in zip(params, now, strict=True):
                p.copy_(current)
        drop = loss_before - loss_now
        ratios.append((loss_now - loss_ahead) / drop if abs(drop) > 1e-12 else float("nan"))
        trends.append(drop / loss_before if loss_before > 0 else float("nan"))
        before, loss_before = now, loss_now
    return {
        "task": task_name,
        "factor": factor,
        "seed": seed,
        "lookahead": float(np.nanmedian(ratios)),
        "loss_drop": float(np.nanmedian(trends)),
        "log_stability": float(np.nanmedian(stability)) if stability else float("nan"),
        "ratios": ratios,
        "trends": trends,
        "log_stability_per_decision": stability,
    }


FEATURES = ("lookahead", "loss_drop", "log_stability")
"""Each run's features: its median over the run's decisions."""


def auc(low: list[float], high: list[float]) -> float:
    """Probability that a value from ``low`` ranks above one from ``high`` (ties count half): the Mann-Whitney AUC.

    Example:
        >>> auc([3.0, 2.0], [1.0, 2.0])
        0.875
    """
    if not low or not high:
        raise ValueError("both groups need at least one value")
    wins = sum((a > b) + 0.5 * (a == b) for a in low for b in high)
    return float(wins / (len(low) * len(high)))


def summarize(runs: list[dict[str, Any]], factors: list[float]) -> dict[str, Any]:
    """Per task and factor the mean feature values; pooled AUCs of ``f < 1`` against ``f > 1``."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for run in runs:
        cell = table.setdefault(run["task"], {}).setdefault(f"{run['factor']:g}", dict.fromkeys(FEATURES, 0.0))
        n = sum(1 for r in runs if r["task"] == run["task"] and r["factor"] == run["factor"])
        for feature in FEATURES:
            cell[feature] += run[feature] / n
    measured = [f for f in FEATURES if not any(math.isnan(r[f]) for r in runs)]  # (not the stability, when off)
    aucs = {}
    for feature in measured:
        low = [r[feature] for r in runs if r["factor"] < 1]
        high = [r[feature] for r in runs if r["factor"] > 1]
        aucs[feature] = auc(low, high) if low and high else None
    within = {}  # the same AUC within each task: how well the feature orders one task's factors
    for task in table:
        within[task] = {
            feature: auc(
                [r[feature] for r in runs if r["task"] == task and r["factor"] < 1],
                [r[feature] for r in runs if r["task"] == task and r["factor"] > 1],
            )
            for feature in measured
            if any(f < 1 for f in factors) and any(f > 1 for f in factors)
        }
    return {"per_task": table, "auc_pooled": aucs, "auc_within_task": within}


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def main(args: Args) -> dict[str, Any]:
    """Runs every (task, factor, seed), writes the JSON, prints the table and the AUCs."""
    import torch
    from tqdm import tqdm

    from triaccel_rl.compare import json_safe
    from triaccel_rl.tasks import FRESH_HELD_OUT_TASKS, HELD_OUT_TASKS, TRAINING_TASKS, get_task
    from triaccel_rl.training import resolve_device

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if tasks == ["all"]:
        tasks = [*TRAINING_TASKS, *HELD_OUT_TASKS, *FRESH_HELD_OUT_TASKS]
    if not tasks:  # before, no run and an AUC of no values: the error came after the output folder was made
        raise ValueError(f"--tasks {args.tasks!r} is empty: give comma-separated tasks, or 'all'")
    for task in tasks:
        get_task(task)  # fail fast on a bad name
    factors = list(parse_floats(args.factors, "--factors", positive=True))
    if args.seeds < 1:
        raise ValueError(f"--seeds {args.seeds} must be >= 1")
    if args.batch_size < 0:
        raise ValueError(f"--batch-size {args.batch_size} must be >= 1 (or 0 for the task's own)")
    if not 0 < args.share <= 1:
        raise ValueError(f"--share {args.share} must be in (0, 1]")
    # Before, --interval-steps 0 divided by zero in the first run and --epochs 0 still ran one interval a run.
    if not (math.isfinite(args.epochs) and args.epochs > 0):
        raise ValueError(f"--epochs {args.epochs} must be a positive finite number")
    if args.interval_steps < 1:
        raise ValueError(f"--interval-steps {args.interval_steps} must be >= 1")
    if args.sharpness_iters < 0:
        raise ValueError(f"--sharpness-iters {args.sharpness_iters} must be >= 0 (0: not measured)")
    if args.device not in ("cpu", "cuda"):
        raise ValueError(f"--device {args.device!r}; allowed: cpu, cuda")
    try:  # --device cuda on a machine without one failed in the first run, after the output folder was made
        resolve_device(args.device)
    except ValueError as err:
        raise ValueError(f"--{err}") from None
    if args.workers < 1 or (args.workers > 1 and args.device != "cpu"):
        raise ValueError(f"--workers {args.workers} must be >= 1, and 1 on a GPU (--device {args.device})")
    out = file_to_write("--out", args.out, example="lr_lookahead_probe.json")  # a folder: found after every run
    torch.set_num_threads(1)
    start = time.perf_counter()
    jobs = [(t, f, s) for t in tasks for f in factors for s in range(args.seeds)]
    if args.workers == 1:
        runs = [probe_run(t, f, s, args) for t, f, s in tqdm(jobs, desc="runs", unit="run")]
    else:
        context = multiprocessing.get_context("spawn")  # no fork after torch's thread pools started
        with ProcessPoolExecutor(args.workers, mp_context=context, initializer=_one_thread) as pool:
            pending = [pool.submit(probe_run, t, f, s, args) for t, f, s in jobs]
            for _ in tqdm(as_completed(pending), total=len(pending), desc="runs", unit="run"):
                pass
            runs = [future.result() for future in pending]  # in the jobs' order
    summary = summarize(runs, factors)
    document = {
        "command": command_line("experiments/lr_lookahead_probe.py", args),
        "args": asdict(args),
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d"),
        "device": cpu_machine() if args.device == "cpu" else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "wall_s": time.perf_counter() - start,
        **summary,
        "runs": runs,
    }
    # Strict JSON: a feature not measured (log_stability with --sharpness-iters 0) or a ratio of no drop is NaN: null.
    out.write_text(json.dumps(json_safe(document), indent=1, allow_nan=False) + "\n")
    header = " ".join(f"{'x' + format(f, 'g'):>19s}" for f in factors)
    print(f"{'task':22s} {header}   (lookahead / loss drop / log10 stability ratio)")
    for task, cells in summary["per_task"].items():
        shown = " ".join(
            "{lookahead:+6.2f}/{loss_drop:.3f}/{log_stability:+5.2f}".format(**cells[format(f, "g")]) for f in factors
        )
        print(f"{task:22s} {shown}")
    print(f"pooled AUC, LR below the task's vs above it: {summary['auc_pooled']}")
    print(f"results: {out}")
    return document


if __name__ == "__main__":
    try:
        main(parse_args(Args, description=__doc__))
    except ValueError as err:  # a bad flag value (ConfigError too): one line, no traceback
        raise SystemExit(str(err)) from None

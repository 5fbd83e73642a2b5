"""Time to accuracy on a GPU: Tri-Accel controllers against fp32, tuned static bf16/fp16 and a batch finder.

One process runs every row, so all rows share the machine state. For each model:

1. **Grid** (1 seed each): static bf16 + channels_last over ``batch × lr_scale``; the configuration with
   the shortest time to target (among those that reach it) becomes the static rows' setting, as a
   careful user would tune it. Each batch size gets an untimed warm-up before its first point, as every row
   does (``warmup_epochs``). The grid costs one full run per point plus one warm-up per batch size, on top of
   the rows: its runs are not reused as a row's seed (``static-bf16`` runs its seed 0 again, after its own
   warm-up, as its other seeds; until 2026-12-05 it took the grid's cold run).
2. **Rows** (``seeds`` seeds each): what users run today, their own PyTorch loop (``plain-bf16``: torch.optim
   + bf16 autocast + channels_last; ``plain-fp16``: fp16 autocast + GradScaler + channels_last; ``plain-fp32``:
   true fp32, TF32 off), then the same static settings
   through Tri-Accel's executor (fused Triton step, captured CUDA graphs: ``static-bf16``, ``static-fp16``,
   ``fp32``), a batch finder + bf16, the heuristic (with its bf16/fp16 speed trial; ``heuristic-no-trial``:
   bf16 without one; ``heuristic-cheap``: on the cheap signals only; ``heuristic-anneal``: also annealing the LR on
   a late plateau of the probe loss; ``heuristic-anneal5*``: the same with a decision every one or two intervals),
   the learned (pretrained) policy, and
   ablations. The ``static-*`` rows isolate what the controller adds; the ``plain-*`` rows what the whole tool
   adds.

Writes ``experiments/results/gpu_benchmark.json`` (one object per row: model, controller, seeds,
time_to_target_s mean and per seed, final_acc, peak_bytes, overhead_frac, ...), PNG plots under
``experiments/results/plots/``, and prints a Markdown table last.

    python experiments/gpu_benchmark.py --models resnet18-fmnist --seeds 3
    python experiments/gpu_benchmark.py --smoke --models synthetic --epochs 1   # CPU, tiny: the plumbing
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from triaccel_rl.compare import RunResult, format_table, json_safe, run_controller, summarize
from triaccel_rl.config import ControllerConfig, ElasticConfig, HeuristicConfig, LRRule
from triaccel_rl.elastic import lr_gain, resolve_lr_rule
from triaccel_rl.experiment import (
    away_from_results,
    command_line,
    cpu_machine,
    file_to_write,
    git_commit,
    parse_args,
    partial_path,
)
from triaccel_rl.plain import run_plain
from triaccel_rl.signals import SignalConfig, SignalMode
from triaccel_rl.tasks import get_task, task_names


@dataclass
class Args:
    """Command-line arguments (each field is a ``--flag``)."""

    models: str = "resnet18-fmnist,effnet-b0-fmnist"
    """Comma-separated benchmark tasks."""
    seeds: int = 3
    """Seeds per row."""
    epochs: float = 12.0
    """Training budget per run, in epochs."""
    rows: str = (
        "plain-fp32,plain-bf16,static-bf16,static-fp16,batch-finder,heuristic,learned,ablation-precision,"
        "ablation-elastic,ablation-second-order"
    )
    """Rows to run, comma-separated: any of the names ``rows_for()`` defines."""
    grid_batches: str = "256,512"
    """Batch sizes of the static grid."""
    grid_lr_scales: str = "0.5,1.0,2.0"
    """LR multipliers of the static grid, on the LR the batch sets linearly (batch 512 at 0.5 holds the LR of batch
    256 at 1.0: half the gradient noise). 0.5 joined the grid on 2026-12-02: batch 512 at 0.5 reached ResNet-18's
    93% in 5.09-5.53 s on the H200, against 7.24 s for the old grid's best (batch 256, 1.0)."""
    grid: str = ""
    """Explicit grid points ``BATCHxLR_SCALE,...`` (e.g. ``256x1.0,512x2.0``), instead of the product above."""
    fp32_seeds: int = 1
    """Seeds for the (slow) fp32 row."""
    fp32_cap: float = 6.0
    """Stop an fp32 run once its time passes this many times the tuned static row's time to target (it
    has then missed the >= 5x comparison by construction; 0: no cap)."""
    static: str = ""
    """``BATCH,LR_SCALE[,TARGET_S]`` for the static rows, skipping the grid (e.g. from an earlier run's
    JSON); ``TARGET_S``, the tuned row's time to target, sets the fp32 cap."""
    merge: str = ""
    """Comma-separated result JSONs to merge into ``--out`` (nothing is run). With ``--plots``, each job's plots are
    drawn from its job file; a job taken from a merged file (no traces) keeps the plots it has."""
    interval_steps: int = 100
    """Least optimizer steps between decisions (with captured steps a decision's fixed cost, ~7 ms for
    ResNet-18 on an H100, is 6% of a 25-step interval and 1.5% of a 100-step one); on a GPU the controller
    stretches it until decisions fit their overhead budget (``ControllerConfig.max_interval_factor``)."""
    eval_every: int = 1
    """Evaluate the test accuracy every ``eval_every * interval_steps`` optimizer steps, in every row."""
    eval_steps: int = 0
    """Evaluate every this many optimizer steps instead (0: ``eval_every * interval_steps``). Time to target is
    read at evaluations, so their spacing quantises it: 100 steps are 0.57 s of ResNet-18 at batch 512 on the
    H200, a tenth of its time to 93%."""
    out: str = "experiments/results/gpu_benchmark.json"
    """Results JSON."""
    plots: str = "experiments/results/plots"
    """Folder for PNG plots ('' for none)."""
    warmup_epochs: float = 1.05
    """Untimed, discarded run before each row and before the grid's first point at each batch size (a bit over an
    epoch, so the short last batch's shapes are met too): cuDNN autotuning and Triton compilation are process-wide
    one-time costs per shape and dtype, which would otherwise land on the row's first seed (or on the grid's first
    point at a batch, skewing its choice). (With a tenth of this for rows after the first, static
    fp16's first seed on the H200, 2026-12-01, took 10.3 s against 7.3 and 6.6 on ResNet-18, and 27.6 s
    against 9.3 on EfficientNet-B0: the fp16 kernels for the epoch's short last batch were tuned in it.)
    0: none."""
    smoke: bool = False
    """Run tiny on the CPU to check the plumbing."""


def rows_for(args: Args) -> dict[str, dict[str, Any]]:
    """Each row's controller spec and overrides; ``None`` batch/lr means the tuned static setting."""
    precision_only = ControllerConfig(interval_steps=args.interval_steps, heuristic=HeuristicConfig())
    cheap_only = ControllerConfig(interval_steps=args.interval_steps, signals=SignalConfig(mode=SignalMode.CHEAP))
    no_trial = ControllerConfig(interval_steps=args.interval_steps, heuristic=HeuristicConfig(speed_trial=False))
    anneal = ControllerConfig(interval_steps=args.interval_steps, heuristic=HeuristicConfig(anneal_plateau=0.02))
    # Annealing with decisions close enough to act before the target (the interval held to at most 2x or 1x, cheap
    # signals): on a plateau of under 5% (``heuristic-anneal5``), or at every decision past 35% of the run whatever the
    # loss does (``heuristic-anneal-timed``: a diagnostic of what an early LR cut is worth, not a rule to ship).
    default_ladder = ControllerConfig().lr_scales
    deep_ladder = (0.25, *default_ladder)  # annealing may go on past x0.5, to x0.25 (x0.33 first: the LR clamp)
    anneal_pinned = {
        row: ControllerConfig(
            interval_steps=args.interval_steps,
            max_interval_factor=factor,
            heuristic=HeuristicConfig(anneal_plateau=plateau, anneal_after=after, anneal_rungs=rungs),
            signals=SignalConfig(mode=SignalMode.CHEAP),
            lr_scales=ladder,
        )
        for row, plateau, after, factor, rungs, ladder in (
            ("heuristic-anneal5", 0.05, 0.3, 2, 1, default_ladder),
            ("heuristic-anneal-timed", 0.99, 0.35, 2, 1, default_ladder),
            # Every decision interval at its least (``interval_steps``): a plateau is seen one interval sooner.
            ("heuristic-anneal5-i1", 0.05, 0.3, 1, 1, default_ladder),
            ("heuristic-anneal5-i1-a25", 0.05, 0.25, 1, 1, default_ladder),
            # Two rungs at once (x1 -> x0.5): the cut lands one decision sooner.
            ("heuristic-anneal5-i1-r2", 0.05, 0.3, 1, 2, default_ladder),
            # A looser plateau from 25% of the run: the first cut one decision sooner.
            ("heuristic-anneal8-i1-a25", 0.08, 0.25, 1, 1, default_ladder),
            # Annealing deeper: the static schedule passes the target as its own decay brings the LR down, and the
            # default ladder stops the cuts at x0.5.
            ("heuristic-anneal5-i1-deep", 0.05, 0.3, 1, 1, deep_ladder),
            ("heuristic-anneal8-i1-a25-deep", 0.08, 0.25, 1, 1, deep_ladder),
        )
    }
    # The deep row with the speed trial's answer pinned (fp16 from the first step, no trial): what the trial's own
    # cost (its bf16 steps and the second format's graph capture) is in time to target.
    pinned = HeuristicConfig(anneal_plateau=0.05, speed_trial=False, use_fp16=True, start_precision="fp16")
    anneal_pinned["heuristic-anneal5-i1-deep-fp16"] = replace(
        anneal_pinned["heuristic-anneal5-i1-deep"], heuristic=pinned
    )
    ramp = HeuristicConfig(ramp_batch_after=0.3, max_batch_growth=4.0)
    held, linear = ElasticConfig(lr_rule=LRRule.NONE), ElasticConfig(lr_rule=LRRule.LINEAR)
    ramp_held = ControllerConfig(interval_steps=args.interval_steps, heuristic=ramp, elastic=held)
    ramp_linear = ControllerConfig(interval_steps=args.interval_steps, heuristic=ramp, elastic=linear)
    # An early ramp, timed: one doubling (max_batch_growth 4 of the base batch: 512 -> 1024 from the 512 setting)
    # at the first decision in [after, until), on the cheap signals, with the interval held to at most twice
    # ``interval_steps`` (the cadence stretched it to its limit, 8x, from 18% to 72% of the run even on the cheap
    # signals, H200 2026-12-02 ``4617a63``: the decisions' rollback copies and probes cost 1.5% of the run).
    early_ramps = {
        f"heuristic-ramp{int(100 * after)}": ControllerConfig(
            interval_steps=args.interval_steps,
            max_interval_factor=2,
            heuristic=HeuristicConfig(ramp_batch_after=after, ramp_batch_until=after + 0.15, max_batch_growth=4.0),
            elastic=held,
            signals=SignalConfig(mode=SignalMode.CHEAP),
        )
        for after in (0.25, 0.35)
    }
    return {
        "fp32": {"controller": "fp32", "channels_last": False},
        # What users run today: their own PyTorch loop (torch.optim, autocast), nothing of ours on the path.
        "plain-bf16": {"plain": "bf16", "channels_last": True},
        "plain-fp32": {"plain": "fp32", "channels_last": False},
        "plain-fp16": {"plain": "fp16", "channels_last": True},  # torch.amp.GradScaler, as its documentation shows
        "static-bf16": {"controller": "bf16", "channels_last": True},
        "static-fp16": {"controller": "fp16", "channels_last": True},
        "batch-finder": {"controller": "batch-finder", "channels_last": True},
        "heuristic": {"controller": "heuristic", "channels_last": True},
        "learned": {"controller": "pretrained", "channels_last": True},
        "ablation-precision": {"controller": "heuristic-precision", "channels_last": True, "config": precision_only},
        "ablation-elastic": {"controller": "heuristic-elastic", "channels_last": True},
        # The heuristic on the cheap signals only: no estimator rounds, whose one-time cost (a 0.4 s warm-up
        # round and 0.12 s rounds for ResNet-18 on an H100) a short run cannot amortise under 2%.
        "heuristic-cheap": {"controller": "heuristic", "channels_last": True, "config": cheap_only},
        "ablation-second-order": {"controller": "heuristic-second-order", "channels_last": True},
        # The heuristic without its speed trial (lowering to bf16): what the trial adds.
        "heuristic-no-trial": {"controller": "heuristic", "channels_last": True, "config": no_trial},
        # The heuristic that also anneals the LR on a late plateau of the probe loss (HeuristicConfig.anneal_plateau).
        "heuristic-anneal": {"controller": "heuristic", "channels_last": True, "config": anneal},
        **{row: {"controller": "heuristic", "channels_last": True, "config": c} for row, c in anneal_pinned.items()},
        # The late batch ramp (HeuristicConfig.ramp_batch_after): past 30% of the budget the batch doubles at each
        # decision, up to 4x; the LR held (the noise halves with each doubling, as halving the LR would do) ...
        "heuristic-ramp": {"controller": "heuristic", "channels_last": True, "config": ramp_held},
        # ... or following the batch linearly (the same noise, only throughput).
        "heuristic-ramp-linear": {"controller": "heuristic", "channels_last": True, "config": ramp_linear},
        # The early ramps (above). Their warm-up also runs the doubled batch (``warmup_batch_factors``), so cuDNN's
        # tuning for its shapes lands outside the timed run, as every row's own shapes do.
        **{
            row: {"controller": "heuristic", "channels_last": True, "config": ramp_config, "warmup_batch_factors": (2,)}
            for row, ramp_config in early_ramps.items()
        },
        # Deep annealing from a higher LR than the static grid's best (x1.5 and x2 of it): the cuts take the noise
        # down later, so the run may afford a faster start than a static schedule can. The static control at x1.5.
        **{
            f"heuristic-anneal5-i1-deep-lr{factor:g}": {
                "controller": "heuristic",
                "channels_last": True,
                "config": anneal_pinned["heuristic-anneal5-i1-deep"],
                "lr_factor": factor,
            }
            for factor in (1.5, 2.0)
        },
        "static-fp16-lr1.5": {"controller": "fp16", "channels_last": True, "lr_factor": 1.5},
        # The pinned deep row with the gradient norm clipped (``max_grad_norm``), against the collapses near the
        # warm-up's peak LR that 6 of 15 annealed runs at x1.5 or x2 suffered (their survivors reached 93% in about
        # 0.81x static fp16's time). The norm is about 3.8 at initialisation (CPU, batch 512); 1 and 3 bracket it.
        # At x1.5, clipped at 3, 5 of 5 reached 93% in 4.52 s against 5.19 s for static fp16 clipped at 3 (H200,
        # 2026-12-02, 4400f70), which clipping made steadier too (5 of 5, against 4 of 5 unclipped).
        **{
            f"heuristic-anneal5-i1-deep-fp16{'' if factor == 1 else f'-lr{factor:g}'}-clip{clip:g}": {
                "controller": "heuristic",
                "channels_last": True,
                "config": anneal_pinned["heuristic-anneal5-i1-deep-fp16"],
                "lr_factor": factor,
                "max_grad_norm": clip,
            }
            for factor, clip in ((1.5, 1.0), (1.5, 3.0), (1.0, 3.0), (2.0, 3.0))
        },
        # The clipped deep row with its cuts released late (``HeuristicConfig.anneal_release_after``): it reached 93%
        # in 0.86x static fp16's time and ended 0.26 points lower (H200, 2026-12-02, 973fd89, 5 seeds); the run's
        # end on the schedule's own LR is meant to win the accuracy back, the target being passed before the release.
        **{
            f"heuristic-anneal5-i1-deep-fp16-clip3-rel{round(100 * release)}": {
                "controller": "heuristic",
                "channels_last": True,
                "config": replace(
                    anneal_pinned["heuristic-anneal5-i1-deep-fp16"],
                    heuristic=replace(pinned, anneal_release_after=release),
                ),
                "max_grad_norm": 3.0,
            }
            for release in (0.6, 0.75)
        },
        # The clipped deep row with its first cut taken as a doubled batch, the LR held (``anneal_by="batch"``): the
        # same fall in gradient noise as halving the LR, over half the steps, at batch 1024's better use of the GPU.
        # Its warm-up runs the doubled batch too, so cuDNN's tuning for its shapes lands outside the timed run.
        # max_batch_growth is of the task's base batch (256 for ResNet-18): 4 lets the tuned 512 double once (at 2 it
        # never grew, H200 2026-12-07, 40bdcd0).
        "heuristic-anneal5-i1-deepbatch-fp16-clip3": {
            "controller": "heuristic",
            "channels_last": True,
            "config": replace(
                anneal_pinned["heuristic-anneal5-i1-deep-fp16"],
                heuristic=replace(pinned, anneal_by="batch", max_batch_growth=4.0),
                elastic=held,
            ),
            "max_grad_norm": 3.0,
            "warmup_batch_factors": (2,),
        },
        "static-fp16-clip3": {"controller": "fp16", "channels_last": True, "max_grad_norm": 3.0},
        # The static control for the clipped x1.5 rows: is what they gain the higher LR that clipping makes safe?
        "static-fp16-lr1.5-clip3": {
            "controller": "fp16",
            "channels_last": True,
            "lr_factor": 1.5,
            "max_grad_norm": 3.0,
        },
        # The x1.5 row with the speed trial's answer pinned (fp16 from the first step): 5 of its 10 runs at x1.5 and
        # x2 collapsed near the warm-up's peak LR where static fp16 at x1.5 did not (H200, 2026-12-02, 0e57c16).
        "heuristic-anneal5-i1-deep-fp16-lr1.5": {
            "controller": "heuristic",
            "channels_last": True,
            "config": anneal_pinned["heuristic-anneal5-i1-deep-fp16"],
            "lr_factor": 1.5,
        },
        # Controls for the ramp, from the start: the best static row at half its LR, and at twice its batch with the
        # LR held (``lr_scale`` is on the LR the batch sets linearly, hence the factor 0.5).
        "static-fp16-lr0.5": {"controller": "fp16", "channels_last": True, "lr_factor": 0.5},
        "static-fp16-b2x": {"controller": "fp16", "channels_last": True, "batch_factor": 2, "lr_factor": 0.5},
        # The best static row on a schedule two thirds as long (the LR decays sooner): what tuning the epoch budget,
        # which the grid does not, would give a user.
        "static-fp16-8of12": {"controller": "fp16", "channels_last": True, "epochs_factor": 2 / 3},
        "static-fp16-10of12": {"controller": "fp16", "channels_last": True, "epochs_factor": 10 / 12},
        # The same, clipped at 3 (clipping made every clipped row reach on every seed, H200 2026-12-02), and on a
        # schedule five sixths as long: a careful user's shorter schedule, against the annealing controller's.
        **{
            f"static-fp16-{epochs}of12-clip3": {
                "controller": "fp16",
                "channels_last": True,
                "epochs_factor": epochs / 12,
                "max_grad_norm": 3.0,
            }
            for epochs in (8, 10)
        },
    }


def main(args: Args) -> list[dict[str, Any]]:
    command = command_line("experiments/gpu_benchmark.py", args)  # as given (a --smoke run's paths change below)
    if args.smoke:  # a plumbing check leaves the recorded GPU table and its plots alone
        args = replace(
            args,
            out=away_from_results("--out", args.out, Args.out),
            plots=away_from_results("--plots", args.plots, Args.plots),
        )
    check_args(args)
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (use --smoke for a CPU check)")
    torch.backends.cudnn.benchmark = True
    meta = {
        "device": torch.cuda.get_device_name() if device == "cuda" else cpu_machine(),
        "date": time.strftime("%Y-%m-%d"),
        "commit": git_commit(),
        "command": command,
        "torch": torch.__version__,
    }
    partial = partial_path(_out_path(args))  # the finished runs while the job runs (as compare's)
    partial.unlink(missing_ok=True)  # an earlier job's: read beside this job's results, it would pass for this one's
    table_rows: list[dict[str, Any]] = []
    all_runs: list[dict[str, Any]] = []  # every model's runs, each naming its model
    grid_rows: list[dict[str, Any]] = []
    config = ControllerConfig(interval_steps=args.interval_steps)
    for model in _names(args.models):
        overrides = {"n_train": 2048, "n_test": 512} if args.smoke else {}
        task = get_task(model, **overrides)
        # The LR warms up then decays linearly to zero over the budget, as in the reference recipe; a
        # constant LR left the 2026-11-22 pilot oscillating around 90-91% (see BENCHMARKS.md).
        # Every row evaluates at the same optimizer steps (the decision interval may stretch on a GPU).
        common: dict[str, Any] = {
            "epochs": args.epochs,
            "device": device,
            "eval_every_steps": _eval_steps(args),
            "config": config,
            "schedule": True,
            # One time base for every row: the plain-* rows measure real time, so on the CPU smoke run the
            # controller rows do too (modelled H200 time beside CPU time once shared one column and its ratios).
            **({"cost_mode": "measured"} if args.smoke else {}),
        }

        def run_row(
            task: Any,
            row: str,
            spec: dict[str, Any],
            seed: int,
            epochs: float,
            setting: tuple[int, float],
            cap: float | None = None,
            common: dict[str, Any] = common,
        ) -> RunResult:
            """One run of ``row`` from the static setting ``(batch, lr_scale)`` (the default binds this model's)."""
            batch, lr_scale = _row_setting(spec, *setting)
            lr_scale *= _start_lr_match(task, spec, batch)
            if "plain" in spec:
                return run_plain(
                    task,
                    seed,
                    precision=spec["plain"],
                    epochs=epochs,
                    batch_size=batch,
                    lr_scale=lr_scale,
                    channels_last=spec["channels_last"],
                    eval_every_steps=_eval_steps(args),
                    device=device,
                    max_time_s=cap,
                    max_grad_norm=spec.get("max_grad_norm"),
                )
            return run_controller(
                task,
                spec["controller"],
                seed,
                batch_size=batch,
                lr_scale=lr_scale,
                channels_last=spec["channels_last"],
                max_time_s=cap,
                max_grad_norm=spec.get("max_grad_norm"),
                **{**common, "epochs": epochs, "config": spec.get("config", config)},
            )

        def warm_up(task: Any, row: str, spec: dict[str, Any], setting: tuple[int, float]) -> None:
            """Untimed, discarded runs of ``row`` from ``setting`` before its timed ones (``Args.warmup_epochs``)."""
            if args.warmup_epochs <= 0:
                return
            with _true_fp32(row in ("fp32", "plain-fp32") and device == "cuda"):
                run_row(task, row, spec, seed=1000, epochs=args.warmup_epochs, setting=setting)
            for factor in spec.get("warmup_batch_factors", ()):  # shapes the row's batch rule moves to
                grown = {"controller": "fp16", "channels_last": spec["channels_last"], "batch_factor": factor}
                run_row(task, row, grown, seed=1000, epochs=args.warmup_epochs, setting=setting)

        grid: list[tuple[int, float, RunResult]] = []
        grid_spec = rows_for(args)["static-bf16"]  # the row the grid tunes
        for batch, lr_scale in [] if args.static else grid_points(args):
            if batch not in {point[0] for point in grid}:
                # Warmed up as every row is, once a batch (the one-time costs are per shape, not per LR): cold, the
                # first point at each batch paid them in its time to target, which skewed the grid's choice.
                warm_up(task, "static-bf16", grid_spec, (batch, lr_scale))
            result = run_row(task, "static-bf16", grid_spec, seed=0, epochs=args.epochs, setting=(batch, lr_scale))
            grid.append((batch, lr_scale, result))
            grid_rows.append(
                {"model": model, "batch": batch, "lr_scale": lr_scale, "seed": 0,
                 "time_to_target_s": result.time_to_target_s, "final_acc": result.final_metric}
            )  # fmt: skip
            print(
                f"grid {model} bf16 batch {batch} lr x{lr_scale}: to target {result.time_to_target_s}, "
                f"final {100 * result.final_metric:.2f}%",
                flush=True,
            )
        static_target: float | None = None
        if args.static:
            best_batch, best_lr, static_target = static_setting(args)
        else:
            reached = [g for g in grid if g[2].time_to_target_s is not None]
            best_batch, best_lr, best_result = (
                min(reached, key=lambda g: g[2].time_to_target_s or 0.0)  # every one reached: never None
                if reached
                else max(grid, key=lambda g: g[2].final_metric)
            )
            static_target = best_result.time_to_target_s
        print(f"tuned static setting for {model}: batch {best_batch}, lr x{best_lr}", flush=True)

        results: list[RunResult] = []
        for row, spec in rows_for(args).items():
            if row not in _names(args.rows):
                continue
            n_seeds = args.fp32_seeds if row in ("fp32", "plain-fp32") else args.seeds
            setting = (best_batch, best_lr)
            warm_up(task, row, spec, setting)
            # Every seed runs here, 0 too: static-bf16's seed 0 was the grid's run at this setting until 2026-12-05,
            # which had not run after this row's warm-up as the other seeds do.
            for seed in range(n_seeds):
                fp32 = row in ("fp32", "plain-fp32")
                cap = args.fp32_cap * static_target if fp32 and args.fp32_cap and static_target else None
                epochs = args.epochs * spec.get("epochs_factor", 1.0)
                with _true_fp32(fp32 and device == "cuda"):
                    result = run_row(task, row, spec, seed=seed, epochs=epochs, setting=setting, cap=cap)
                result.controller = row
                results.append(result)
                # Every finished run is kept at once: a job stopped by a time limit loses only the run in flight.
                so_far = all_runs + [{"model": model, **asdict(r)} for r in results]
                kept = {"rows": [], "grid": grid_rows, "runs": so_far}
                partial.write_text(json.dumps(json_safe(kept), allow_nan=False) + "\n")
                print(
                    f"{model} {row} seed {seed}: to target {result.time_to_target_s}, final "
                    f"{100 * result.final_metric:.2f}%, peak {result.peak_bytes / 2**20:.0f} MiB, "
                    + ("" if result.nvml_bytes is None else f"NVML {result.nvml_bytes / 2**20:.0f} MiB, ")
                    + f"overhead {100 * result.overhead_frac:.2f}%"
                    + "".join(f", {part} {100 * frac:.2f}%" for part, frac in result.overhead_parts.items())
                    + "".join(f", trial {name} {ms:.2f}" for name, ms in result.speed_trial.items())
                    + "".join(f", fallbacks on {name}: {n}" for name, n in result.fallback_features.items()),
                    flush=True,
                )
        rows_run = _names(args.rows)
        reference = next((row for row in ("plain-bf16", "static-bf16") if row in rows_run), None)
        specs = rows_for(args)
        for summary in summarize(results, reference=reference):
            runs = [r for r in results if r.controller == summary["controller"]]
            spec = specs[summary["controller"]]
            table_rows.append(
                {
                    "model": model,
                    "controller": summary["controller"],
                    "seeds": summary["seeds"],
                    "time_to_target_s": {
                        "mean": summary["time_to_target_s_mean"],
                        "per_seed": summary["time_to_target_s"],
                    },
                    "reach_rate": summary["reach_rate"],
                    "rank": summary["rank"],  # by time to target among this job's rows that reached on every seed
                    "final_acc": {
                        "mean": summary["final_metric_mean"],
                        "std": summary["final_metric_std"],
                        "per_seed": [r.final_metric for r in runs],
                    },
                    "peak_bytes": summary["peak_bytes_mean"],
                    # NVML, at the same evaluation points in every row: context, the allocator's reserve, libraries.
                    "peak_nvml_bytes": summary["nvml_bytes_mean"],
                    "nvml_scope": sorted({r.nvml_scope for r in runs if r.nvml_scope}),
                    "overhead_frac": summary["overhead_frac_mean"],
                    "overhead_parts_frac": summary["overhead_parts_mean"],
                    "mean_step_ms": summary["mean_step_ms"],
                    "skipped_steps": summary["skipped_steps_mean"],
                    "oom_events": summary["oom_events_total"],
                    "static_setting": {"batch": best_batch, "lr_scale": best_lr},
                    # The row's own starting setting, in the static rows' terms (the controls scale the tuned one).
                    "setting": dict(zip(("batch", "lr_scale"), _row_setting(spec, best_batch, best_lr), strict=True)),
                    "epochs": args.epochs * spec.get("epochs_factor", 1.0),  # the row's training budget
                    "target": task.target_metric,
                    **meta,
                }
            )
        print(f"\n{model} (target {100 * task.target_metric:.0f}%, static setting batch {best_batch}, lr x{best_lr})")
        print(format_table(summarize(results, reference=reference), reference=reference))
        all_runs += [{"model": model, **asdict(r)} for r in results]
        if args.plots:
            from triaccel_rl.plots import plot_comparison

            plot_comparison(results, Path(args.plots) / model, target=task.target_metric)

    out = _out_path(args)
    payload = {"rows": table_rows, "grid": grid_rows, "runs": all_runs}
    # Strict JSON: a diverged run's probe losses (NaN) and a std of non-finite values are written as null.
    out.write_text(json.dumps(json_safe(payload), indent=1, allow_nan=False) + "\n")
    partial.unlink(missing_ok=True)  # the results hold every run now
    print(f"\nwrote {out}")
    return table_rows


def check_args(args: Args) -> None:
    """Raises ``SystemExit`` naming the first setting the benchmark cannot run and what is allowed, before any work.

    Before these checks an unknown row was skipped without a word (``--rows heuristc`` ran nothing of it and wrote
    the other rows), ``--seeds 0`` or a negative one ran every row on no seed, and an unknown model or a malformed
    ``--grid`` or ``--static`` stopped the job only when its turn came, after the earlier models had run.
    """
    models = _names(args.models)
    if not models:
        raise SystemExit(f"--models {args.models!r} is empty; give comma-separated tasks, e.g. resnet18-fmnist")
    unknown = [model for model in models if model not in task_names()]
    if unknown:
        raise SystemExit(f"--models: unknown task {unknown[0]!r}; allowed: {', '.join(task_names())}")
    twice = sorted({model for model in models if models.count(model) > 1})
    if twice:  # its rows ran again, written as a second row of each name for that model (seeds 0.. twice)
        raise SystemExit(f"--models lists {', '.join(twice)} more than once; give each task once")
    for flag, value in (("--seeds", args.seeds), ("--fp32-seeds", args.fp32_seeds),
                        ("--interval-steps", args.interval_steps), ("--eval-every", args.eval_every)):  # fmt: skip
        if value < 1:
            raise SystemExit(f"{flag} {value} must be >= 1")
    if not (args.epochs > 0 and math.isfinite(args.epochs)):
        raise SystemExit(f"--epochs {args.epochs} must be a positive finite number")
    for flag, number in (("--warmup-epochs", args.warmup_epochs), ("--fp32-cap", args.fp32_cap)):
        if not (number >= 0 and math.isfinite(number)):
            raise SystemExit(f"{flag} {number} must be a finite number >= 0 (0: none)")
    rows = _names(args.rows)
    known = rows_for(args)  # needs a valid --interval-steps
    if not rows:
        raise SystemExit(f"--rows {args.rows!r} is empty; allowed rows: {', '.join(known)}")
    unknown = [row for row in rows if row not in known]
    if unknown:
        raise SystemExit(f"--rows: unknown row {unknown[0]!r}; allowed: {', '.join(known)}")
    _eval_steps(args)
    if args.static:
        static_setting(args)
    else:
        grid_points(args)
    _out_path(args)  # last, as it makes the folder: a folder as --out raised IsADirectoryError after every row


def static_setting(args: Args) -> tuple[int, float, float | None]:
    """``--static`` as ``(batch, lr_scale, target_s or None)``; ``SystemExit`` naming what is wrong with it."""
    words = [word.strip() for word in args.static.split(",")]
    usage = f"--static {args.static!r}: expected BATCH,LR_SCALE[,TARGET_S], e.g. 512,0.5,5.4"
    if len(words) not in (2, 3):
        raise SystemExit(usage)
    try:
        batch, lr_scale = int(words[0]), float(words[1])
        target = float(words[2]) if len(words) == 3 else None
    except ValueError:
        raise SystemExit(usage) from None
    if batch < 1 or not (lr_scale > 0 and math.isfinite(lr_scale)):
        raise SystemExit(f"{usage} (a batch >= 1 and a positive LR scale)")
    if target is not None and not (target > 0 and math.isfinite(target)):
        raise SystemExit(f"{usage} (TARGET_S a positive number of seconds)")
    return batch, lr_scale, target


def grid_points(args: Args) -> list[tuple[int, float]]:
    """The static grid's ``(batch, lr_scale)`` points: ``--grid``, else ``--grid-batches`` x ``--grid-lr-scales``.

    Raises:
        SystemExit: no point, or a point that is not a batch >= 1 and a positive LR scale; the message names it.
    """
    if args.grid:
        pairs = [point.split("x") for point in _names(args.grid)]
        flag, text = "--grid", args.grid
    else:
        pairs = [[b, lr] for b in _names(args.grid_batches) for lr in _names(args.grid_lr_scales)]
        flag, text = "--grid-batches/--grid-lr-scales", f"{args.grid_batches} x {args.grid_lr_scales}"
    if not pairs:
        raise SystemExit(f"{flag} {text!r}: no grid point; give BATCHxLR_SCALE points, e.g. 256x1.0,512x0.5")
    points = []
    for pair in pairs:
        try:
            batch, lr_scale = int(pair[0]), float(pair[1])
            if len(pair) != 2 or batch < 1 or not (lr_scale > 0 and math.isfinite(lr_scale)):
                raise ValueError
        except (ValueError, IndexError):
            raise SystemExit(
                f"{flag} {text!r}: point {'x'.join(pair)!r} is not a batch >= 1 and a positive LR scale "
                "(BATCHxLR_SCALE, e.g. 512x0.5)"
            ) from None
        points.append((batch, lr_scale))
    return points


def _names(text: str) -> list[str]:
    """Comma-separated items, blanks dropped."""
    return [item.strip() for item in text.split(",") if item.strip()]


def _eval_steps(args: Args) -> int:
    """Optimizer steps between evaluations, the same in every row."""
    if args.eval_steps < 0:
        raise SystemExit(f"--eval-steps {args.eval_steps} must be >= 0 (0: eval_every x interval_steps)")
    return args.eval_steps or args.interval_steps * args.eval_every


def _row_setting(spec: dict[str, Any], batch_size: int, lr_scale: float) -> tuple[int, float]:
    """A row's starting ``(batch, lr_scale)``: the tuned static setting scaled by its factors (the controls')."""
    return batch_size * spec.get("batch_factor", 1), lr_scale * spec.get("lr_factor", 1.0)


def _start_lr_match(task: Any, spec: dict[str, Any], batch_size: int) -> float:
    """The factor on a row's ``lr_scale`` that starts it at the static rows' LR at ``batch_size``.

    ``lr_scale`` is on the LR the batch sets by the LR rule, and the static rows use the optimizer's default
    rule (linear for SGD). A row with another rule (the batch ramp holds the LR: ``LRRule.NONE``) would
    otherwise start at another LR wherever the tuned batch is not the task's base batch: at batch 512 on
    ResNet-18 (base 256) the ramp started at half the static row's LR (H200, 2026-12-02, ``5120f1b``).
    """
    config = spec.get("config")
    rule = config.elastic.lr_rule if config is not None else LRRule.AUTO
    if rule is LRRule.AUTO:
        return 1.0
    default = resolve_lr_rule(LRRule.AUTO, task.optimizer)
    return lr_gain(default, batch_size, task.base_batch_size) / lr_gain(rule, batch_size, task.base_batch_size)


def _out_path(args: Args) -> Path:
    """``--out``, or its file name under ``$OUT`` when set (the GPU machine's output folder); its folder made.

    Raises:
        SystemExit: the path is '' or a folder, or its folder cannot be made or written in (``file_to_write``).
    """
    out = Path(os.environ["OUT"]) / Path(args.out).name if os.environ.get("OUT") and args.out.strip() else args.out
    try:
        return file_to_write("--out", str(out), example="gpu_benchmark.json")
    except ValueError as err:
        raise SystemExit(str(err)) from None


@contextlib.contextmanager
def _true_fp32(active: bool) -> Iterator[None]:
    """TF32 off for matmuls and convolutions (cuDNN allows TF32 convolutions by default): fp32 is fp32."""
    if not active:
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


_RUN_DETAIL = ("trace", "layer_names")
"""What a run of a job file holds that the merged file leaves out (``merge``)."""


def merge(paths: list[str], out: Path, plots: str = "") -> None:
    """Concatenates the rows, grid points and runs of several result JSONs (e.g. one per job).

    Each entry gets ``job``, the stem of the file it came from (an entry of a merged file keeps its own): rows of one
    job ran side by side on one machine, rows of different jobs did not. A job met again (a job file given twice, or
    beside a merged file that holds it) is taken once; two different files of one job name are refused, since their
    rows would be plotted and read as one job's. Each row gets ``epochs``, its training budget, where it lacks one.
    The runs' per-step traces and layer names (``_RUN_DETAIL``, 95% of the bytes) stay in the job files: the
    plots are drawn from those before the merged file is written without them, and a job read from a merged file is
    not redrawn (``plot_jobs``).

    Raises:
        SystemExit: no file given, a file that cannot be read as JSON or holds no ``runs``, a job or model name that is
            not one folder's name (``_check_folder_name``), or two files of one job with different contents; the message
            names them.
    """
    if not [path for path in paths if path.strip()]:
        raise SystemExit("--merge: no file given; give comma-separated result JSONs")
    merged: dict[str, list[Any]] = {"rows": [], "grid": [], "runs": []}
    sources: dict[str, tuple[str, dict[str, list[Any]]]] = {}  # job -> (first file, its entries)
    for path in (path.strip() for path in paths if path.strip()):
        data = _read_results(path)
        by_job: dict[str, dict[str, list[Any]]] = {}
        for key in merged:
            for entry in data.get(key, []):
                tagged = {"job": Path(path).stem, **entry}
                for field in ("job", "model"):
                    if field in tagged:
                        _check_folder_name(tagged[field], field, path)
                by_job.setdefault(tagged["job"], {name: [] for name in merged})[key].append(tagged)
        for job, entries in by_job.items():
            if job in sources:
                first, seen = sources[job]
                if _without_detail(seen) != _without_detail(entries):
                    raise SystemExit(
                        f"--merge: job {job!r} in {path} differs from job {job!r} in {first}: rename one of the files "
                        "(a job is named by its file's stem, and rows of one job are compared as side by side)"
                    )
                print(f"job {job!r} of {path} is already merged (from {first}); taken once")
                continue
            sources[job] = (path, entries)
            for key, values in entries.items():
                merged[key] += values
    for row in merged["rows"]:
        if "epochs" not in row:  # a row that records its budget needs no command to read it from
            row["epochs"] = _row_epochs(row)
    if plots:
        plot_jobs(merged["runs"], merged["rows"], Path(plots))
    merged["runs"] = [{key: value for key, value in run.items() if key not in _RUN_DETAIL} for run in merged["runs"]]
    out.write_text(json.dumps(json_safe(merged), indent=1, allow_nan=False) + "\n")
    print(f"merged {len(merged['rows'])} rows of {len(sources)} jobs from {len(paths)} files into {out}")


def _read_results(path: str) -> dict[str, Any]:
    """A result JSON's contents, NaN read as null.

    A job file written before the results were strict JSON holds NaN (a diverged run's probe losses): read as null, as
    a job file written now holds it, so the two compare alike and the merged file is strict JSON.

    Raises:
        SystemExit: the file cannot be read, is not JSON (or holds an integer past Python's 4300 digits), or is not
            an object with ``runs``; the message names it.
    """
    try:
        data = json_safe(json.loads(Path(path).read_text()))
    except (OSError, ValueError, RecursionError) as error:  # not UTF-8 or JSON, 4300+ digits, nested too deep
        raise SystemExit(f"--merge: {path} cannot be read as JSON: {error}") from None
    if not isinstance(data, dict) or "runs" not in data:
        raise SystemExit(f'--merge: {path} holds no "runs"; give result JSONs this script wrote (rows, grid, runs)')
    return data


def _check_folder_name(name: Any, field: str, path: str) -> None:
    """Checks a job's or model's name is one folder's name: plots are written to ``--plots/<model>/jobs/<job>``.

    Raises:
        SystemExit: ``name`` is not a string, is empty, ``.`` or ``..``, or holds a path separator (as an absolute path
            does), so its plots would land outside ``--plots`` or in another folder's; the message names the file.
    """
    # Path(name).name drops everything up to the last separator, and is "" for ".": it differs from such a name.
    if not isinstance(name, str) or name in ("", "..") or Path(name).name != name:
        raise SystemExit(
            f"--merge: {path} names a {field} {name!r}; a {field} must be one folder's name (no path separator, not "
            f"'..'), as plots are written to --plots/<model>/jobs/<job>"
        )


def _without_detail(entries: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """A job's entries as a merged file holds them (runs without ``_RUN_DETAIL``, rows with ``epochs``), to compare."""
    runs = [{key: value for key, value in run.items() if key not in _RUN_DETAIL} for run in entries["runs"]]
    rows = [row if "epochs" in row else {**row, "epochs": _row_epochs(row)} for row in entries["rows"]]
    return {**entries, "rows": rows, "runs": runs}


def _row_epochs(row: dict[str, Any]) -> float:
    """A row's training budget in epochs, for rows written before rows recorded it.

    From its job's command (``--epochs``, else the default) and the row's ``epochs_factor``; a row this script no
    longer defines ran before ``epochs_factor`` existed (2026-12-02), on the whole budget.

    Raises:
        SystemExit: the command's ``--epochs`` is not followed by a number; the message names the row's job.
    """
    command = str(row.get("command", ""))
    epochs = Args().epochs
    for word, after in itertools.pairwise([*command.split(), ""]):  # --epochs 8, or --epochs=8 (read as 12 once)
        if word == "--epochs" or word.startswith("--epochs="):
            value = after if word == "--epochs" else word.removeprefix("--epochs=")
            try:
                epochs = float(value)
            except ValueError:
                raise SystemExit(
                    f"--merge: row {row.get('controller')!r} of job {row.get('job')!r} has no number after --epochs "
                    f"in its command {command!r}"
                ) from None
    spec = rows_for(Args()).get(str(row.get("controller")), {})
    return epochs * spec.get("epochs_factor", 1.0)


def plot_jobs(runs: list[dict[str, Any]], rows: list[dict[str, Any]], folder: Path) -> None:
    """Plots each job's runs alone, per model: ``folder/<model>/jobs/<job>``.

    Only rows of one job ran side by side on one machine, so rows are compared within a job; a plot of every job's
    rows together (77 rows on 2026-12-02) compared runs that did not share the machine and could not be read. A run
    names its model (since 2026-12-04); an older job file's runs are its one model's. Before, runs were picked by
    job and controller alone, so a job of two models drew each model's runs into the other's plots.

    A job whose runs have no traces (read from a merged file) is not drawn: its plots are left as they are, and a
    line printed names them.

    Raises:
        SystemExit: a job of several models whose runs do not name theirs (which plot they belong to is unknown).
    """
    from triaccel_rl.plots import plot_comparison

    field_names = {f.name for f in fields(RunResult)}
    left: list[str] = []
    job_models: dict[str, set[str]] = {}
    for row in rows:
        job_models.setdefault(row["job"], set()).add(row["model"])

    def model_of(run: dict[str, Any]) -> str | None:
        if "model" in run:
            return str(run["model"])
        models = job_models.get(run["job"], set())
        if len(models) > 1:
            raise SystemExit(
                f"job {run['job']!r} ran {', '.join(sorted(models))}, but its runs do not name their model: "
                "plot it from its own job file with --plots '' and merge without plots"
            )
        return next(iter(models), None)

    for model in dict.fromkeys(row["model"] for row in rows):
        target = next(row["target"] for row in rows if row["model"] == model)
        for job in sorted({row["job"] for row in rows if row["model"] == model}):
            controllers = {row["controller"] for row in rows if row["model"] == model and row["job"] == job}
            mine = [
                run for run in runs if run["job"] == job and run["controller"] in controllers and model_of(run) == model
            ]
            if any("trace" not in run for run in mine):
                # A merged file's runs have no traces (_RUN_DETAIL): redrawn, the job's plots came out empty.
                left.append(f"{model}/jobs/{job}")
                continue
            results = [RunResult(**{k: v for k, v in run.items() if k in field_names}) for run in mine]
            if results:
                plot_comparison(results, folder / model / "jobs" / job, target=target)
    if left:
        print(f"plots left as they are (runs without traces, from a merged file) under {folder}: {', '.join(left)}")


def parse(argv: list[str] | None = None) -> Args:
    """Parses ``--flag`` arguments into ``Args``."""
    return parse_args(Args, argv, __doc__)


if __name__ == "__main__":
    arguments = parse()
    if arguments.merge:
        merge(arguments.merge.split(","), _out_path(arguments), arguments.plots)
    else:
        main(arguments)

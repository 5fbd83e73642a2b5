"""Does the Controller keep what ``torch.compile`` gives a user's own loop? Step time with and without, side by side.

    python experiments/bench_compile.py                                    # GPU: ResNet-18 and EfficientNet-B0
    python experiments/bench_compile.py --models resnet18-fmnist --rows plain-eager,controller-compiled
    python experiments/bench_compile.py --smoke --out /tmp/bench_compile.json   # CPU plumbing check, tiny

Rows, each a fresh model from the same seed, in one process:

- ``plain-eager``: a user's loop, ``torch.autocast`` in ``--precision`` (fp16 adds a ``GradScaler``), channels_last,
  the task's ``torch.optim`` optimizer (SGD Nesterov), ``zero_grad(set_to_none=True)``;
- ``plain-compiled``: the same with ``torch.compile(model)``;
- ``controller-eager``: the same loop under ``Controller(model, optimizer, policy="static-<precision>")`` (on a GPU
  the fused Triton step, the 16-bit weight copies, device-side statistics and the decision intervals);
- ``controller-compiled``: that with ``torch.compile(model)``;
- ``heuristic-compiled``: ``policy="heuristic"`` with the compiled model (its speed trial runs bf16 and fp16, so the
  model compiles for both);
- ``plain-compiled-ro``, ``controller-compiled-ro``, ``heuristic-compiled-ro``: ``torch.compile(model,
  mode="reduce-overhead")``, which replays the forward and backward as CUDA graphs (Inductor's cudagraph trees): the
  compile mode meant for host-bound steps. With ``--smoke`` (CPU, no CUDA graphs) they run as the other compiled rows.

Every row of a model is built and trains ``--warmup`` steps (compilation included: ``warmup_s`` is their wall time);
then the rows take turns, a chunk of 10 steps each per round (the order rotated every round), timed with CUDA events,
until each has run ``--steps``: every row meets the same drift of the machine (a host-bound loop's step time moved by
15-40% between two runs minutes apart, 2026-12-03). ``step_ms`` is the median over a row's chunks. ``graphs`` counts
the graphs Dynamo compiled in the row's warm-up (none where an earlier row's graph passes its guards;
``recompiled_while_timed``: any during its chunks), ``graph_breaks`` the breaks, ``cudagraph_skips`` the graphs a
``-ro`` row ran without CUDA graphs, ``step_peak_bytes`` the allocator's peak during a chunk above what was allocated
before it (the step's own memory; the other rows' models and data stay allocated). The batches are random tensors of
the task's input shape, on the device: the step's time does not depend on the values, and the loss is only checked to
stay finite.
"""

from __future__ import annotations

import datetime
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn
from torch._dynamo.utils import counters

from triaccel_rl.compare import json_safe
from triaccel_rl.controller import Controller
from triaccel_rl.experiment import away_from_results, command_line, cpu_machine, file_to_write, git_commit, parse_args
from triaccel_rl.tasks import get_task, task_names

ROWS = (
    "plain-eager",
    "plain-compiled",
    "controller-eager",
    "controller-compiled",
    "heuristic-compiled",
    "plain-compiled-ro",
    "controller-compiled-ro",
    "heuristic-compiled-ro",
)
DEFAULT_ROWS = ROWS[:5]
CHUNK = 10


@dataclass
class Args:
    """Command-line arguments (each field is a ``--flag``)."""

    models: str = "resnet18-fmnist,effnet-b0-fmnist"
    """Comma-separated registered tasks whose models are timed."""
    rows: str = ",".join(DEFAULT_ROWS)
    """Comma-separated rows (see the module docstring)."""
    batch_size: int = 512
    """Samples per step."""
    precision: str = "bf16"
    """bf16 or fp16: the autocast type of the plain rows and the static Controller's precision."""
    warmup: int = 30
    """Untimed steps first (compilation, the speed trial, cuDNN's autotuning); 3 with ``--smoke`` unless given."""
    steps: int = 100
    """Timed steps after the warm-up (a multiple of 10); 10 with ``--smoke`` unless given."""
    out: str = "experiments/results/bench_compile.json"
    """Results JSON (written after every model's rows)."""
    smoke: bool = False
    """CPU, a tiny MLP task, a few steps (``--warmup`` 3, ``--steps`` 10 where left at their defaults), the
    ``aot_eager`` backend: checks the plumbing; timings meaningless."""


SMOKE_WARMUP, SMOKE_STEPS = 3, CHUNK
"""``--smoke``'s warm-up and timed steps where ``--warmup`` and ``--steps`` are left at their defaults."""


def main(args: Args) -> dict[str, Any]:
    if args.smoke:  # the defaults' 30 + 100 steps a row took 41 s on a 2-core CPU: a plumbing check needs a few
        args = replace(
            args,
            warmup=SMOKE_WARMUP if args.warmup == Args.warmup else args.warmup,
            steps=SMOKE_STEPS if args.steps == Args.steps else args.steps,
        )
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if not rows:  # before, an empty list wrote a results file of no rows
        raise ValueError(f"--rows {args.rows!r} is empty; allowed: {', '.join(ROWS)}")
    for row in rows:
        if row not in ROWS:
            raise ValueError(f"--rows: unknown row {row!r}; allowed: {', '.join(ROWS)}")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models:
        raise ValueError(f"--models {args.models!r} is empty; give comma-separated tasks, e.g. resnet18-fmnist")
    unknown = [model for model in models if model not in task_names()]
    if unknown:  # before, found when the model's turn came, after the earlier models' rows
        raise ValueError(f"--models: unknown task {unknown[0]!r}; allowed: {', '.join(task_names())}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size} must be >= 1")
    if args.precision not in ("bf16", "fp16"):
        raise ValueError(f"--precision {args.precision!r}; allowed: bf16, fp16")
    if args.steps < CHUNK or args.steps % CHUNK:
        raise ValueError(f"--steps {args.steps} must be a positive multiple of {CHUNK}")
    if args.warmup < 1:
        raise ValueError(f"--warmup {args.warmup} must be >= 1")
    # Checked now: a folder was found only when the first model's rows were written, after their measurements.
    out = file_to_write(
        "--out",
        away_from_results("--out", args.out, Args.out) if args.smoke else args.out,
        example="bench_compile.json",
    )
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.smoke:
        raise SystemExit("needs a CUDA GPU (or --smoke for the CPU plumbing check)")
    models = ["synthetic"] if args.smoke else models
    backend = "aot_eager" if args.smoke else "inductor"
    result: dict[str, Any] = {
        "command": command_line("experiments/bench_compile.py", args),
        "args": asdict(args),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_machine(),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "backend": backend,
        "rows": [],
    }
    for model_name in models:
        torch._dynamo.reset()
        counters.clear()
        # Every row built before any warms up: a Controller's hooks make Dynamo drop the graphs traced so far.
        built = [build_row(model_name, row, args, device, backend) for row in rows]
        for b in built:
            print(f"{model_name} {b.name}: warm-up ...", flush=True)
            warm_up(b, args, device)
        print(f"{model_name}: timing {len(built)} rows in turns ...", flush=True)
        for row, measured in zip(rows, time_rows(built, args, device), strict=True):
            result["rows"].append({"model": model_name, "row": row, **measured})
        for b in built:
            if b.controller is not None:
                b.controller.close()
        out.write_text(json.dumps(json_safe(result), indent=1, allow_nan=False) + "\n")  # a diverged loss: null
    print_table(result["rows"])
    print(f"wrote {out}")
    return result


@dataclass
class _Row:
    """One row, built and warmed up: its step, its controller (if any) and what the warm-up measured."""

    name: str
    step: Callable[[], torch.Tensor]
    controller: Controller | None
    warmup_s: float = 0.0
    graphs: int = 0
    graph_breaks: int = 0
    cudagraph_skips: int = 0


def build_row(task_name: str, row: str, args: Args, device: torch.device, backend: str) -> _Row:
    """Builds one row's model, optimizer and loop from seed 0 (a Controller drops Dynamo's earlier graphs)."""
    task = get_task(task_name)
    torch.manual_seed(0)
    model = task.build_model().to(device)
    data = task.data(0)
    shape = tuple(data.train_x.shape[1:])
    n_classes = int(data.train_y.max()) + 1
    channels_last = len(shape) == 3
    if channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    optimizer = task.make_optimizer(model.parameters())
    n_steps = args.warmup + args.steps
    batch = 8 if args.smoke else args.batch_size
    x = torch.randn(n_steps * batch, *shape, device=device)
    y = torch.randint(0, n_classes, (n_steps * batch,), device=device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float16
    forward: Callable[[torch.Tensor], torch.Tensor]
    if "compiled" not in row:
        forward = model
    elif row.endswith("-ro") and backend == "inductor":
        forward = torch.compile(model, mode="reduce-overhead")
    else:
        forward = torch.compile(model, backend=backend)

    controller = None
    if row.startswith(("controller", "heuristic")):
        policy = "heuristic" if row.startswith("heuristic") else f"static-{args.precision}"
        controller = Controller(model, optimizer, policy=policy)
        batches = iter(controller.loader((x, y), batch_size=batch, epochs=1))
    else:
        batches = iter((x[i * batch : (i + 1) * batch], y[i * batch : (i + 1) * batch]) for i in range(n_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=controller is None and dtype == torch.float16)

    def step() -> torch.Tensor:
        xb, yb = next(batches)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        if controller is not None:
            optimizer.zero_grad()
            with controller.autocast():
                loss = nn.functional.cross_entropy(forward(xb).float(), yb)
            controller.step(loss)
            return loss.detach()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype):
            loss = nn.functional.cross_entropy(forward(xb).float(), yb)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.detach()

    return _Row(row, step, controller)


def warm_up(row: _Row, args: Args, device: torch.device) -> None:
    """Runs the row's untimed steps (compilation included) and records their time, graphs and breaks."""
    graphs, breaks, skips = _graphs(), _breaks(), _cudagraph_skips()
    start = time.perf_counter()
    for _ in range(args.warmup):
        row.step()
    _sync(device)
    row.warmup_s, row.graphs, row.graph_breaks = time.perf_counter() - start, _graphs() - graphs, _breaks() - breaks
    row.cudagraph_skips = _cudagraph_skips() - skips


def time_rows(rows: list[_Row], args: Args, device: torch.device) -> list[dict[str, Any]]:
    """Times the rows in turns, a chunk of ten steps each per round; returns each row's measurements.

    Each round takes the rows in a rotated order, so that every row meets the same drift of the machine.
    """
    chunk_ms: list[list[float]] = [[] for _ in rows]
    step_peak = [0] * len(rows)
    losses: list[list[torch.Tensor]] = [[] for _ in rows]
    recompiled = [False] * len(rows)
    for round_ in range(args.steps // CHUNK):
        for k in range(len(rows)):
            i = (round_ + k) % len(rows)
            _sync(device)
            base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            graphs = _graphs()
            begin = _event(device)
            t0 = time.perf_counter()
            for _ in range(CHUNK):
                loss = rows[i].step()
            chunk_ms[i].append(_elapsed_ms(begin, device, t0) / CHUNK)
            losses[i].append(loss)
            recompiled[i] |= _graphs() != graphs
            if device.type == "cuda":
                step_peak[i] = max(step_peak[i], torch.cuda.max_memory_allocated(device) - base)
    measured = []
    for i, row in enumerate(rows):
        final = [float(v) for v in losses[i]]
        ctl = row.controller
        measured.append(
            {
                "step_ms": statistics.median(chunk_ms[i]),
                "chunk_ms": chunk_ms[i],
                "warmup_s": row.warmup_s,
                "graphs": row.graphs,
                "recompiled_while_timed": recompiled[i],
                "graph_breaks": row.graph_breaks,
                "cudagraph_skips": row.cudagraph_skips,
                "step_peak_bytes": step_peak[i],
                "loss_first_last": [final[0], final[-1]],
                "finite": all(map(_finite, final)),
                "precisions": [p.name.lower() for p in ctl.precisions] if ctl is not None else args.precision,
                "fused": bool(ctl.engine.fused) if ctl is not None else None,
            }
        )
    return measured


def _graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


def _cudagraph_skips() -> int:
    """Graphs that ``mode="reduce-overhead"`` ran without CUDA graphs (Inductor's count; its log says why)."""
    return int(counters["inductor"]["cudagraph_skips"])


def _breaks() -> int:
    return sum(counters["graph_break"].values())


def _finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _event(device: torch.device) -> Any:
    if device.type != "cuda":
        return None
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _elapsed_ms(begin: Any, device: torch.device, t0: float) -> float:
    if device.type != "cuda":
        return (time.perf_counter() - t0) * 1e3
    end = torch.cuda.Event(enable_timing=True)
    end.record()
    end.synchronize()
    return float(begin.elapsed_time(end))


def print_table(rows: list[dict[str, Any]]) -> None:
    print("| model | row | step (ms), median | vs plain-eager | warm-up (s) | graphs | step peak | finite |")
    print("|---|---|---|---|---|---|---|---|")
    base = {r["model"]: r["step_ms"] for r in rows if r["row"] == "plain-eager"}
    for r in rows:
        ratio = f"{r['step_ms'] / base[r['model']]:.2f}" if r["model"] in base else "—"
        graphs = f"{r['graphs']}{' (recompiled while timed)' if r['recompiled_while_timed'] else ''}"
        print(
            f"| {r['model']} | {r['row']} | {r['step_ms']:.2f} | {ratio} | {r['warmup_s']:.1f} | {graphs} | "
            f"{r['step_peak_bytes'] / 2**20:.0f} MiB | {r['finite']} |"
        )


if __name__ == "__main__":
    try:
        main(parse_args(Args, description=__doc__))
    except ValueError as err:  # a bad flag value (ConfigError too): one line, no traceback
        raise SystemExit(str(err)) from None

"""PNG plots of a comparison: metric and memory against time, batch and LR scale, the precision map.

Needs matplotlib (the ``plots`` extra: ``pip install triaccel-rl[plots]``).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from triaccel_rl.compare import RunResult
from triaccel_rl.experiment import write_bytes_atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from PIL.Image import Image as PILImage

__all__ = ["plot_comparison", "precision_map_image", "save_png"]


def plot_comparison(
    results: Sequence[RunResult], out_dir: str | os.PathLike[str], target: float | None = None, time_label: str = "s"
) -> list[Path]:
    """Writes the comparison's plots as PNG files into ``out_dir``; returns their paths.

    - ``metric_vs_time.png``: test metric against (charged) time, one line per run, colour per controller; with a
      ``target``, a second panel zoomed on it marks each run's time to target;
    - ``memory_vs_time.png``: peak memory per interval against time;
    - ``batch_lr_vs_time.png``: batch size and LR scale against time (the multiplier on the task's base LR, so an
      adaptive row started at x0.5 and a static x0.5 row draw one line at one LR; ``RunResult.trace``);
    - ``precision_map_<controller>.png``: per-layer precision over decisions (the controller's lowest seed), a heat
      map; ``<controller>`` with characters other than letters, digits, ``-``, ``_`` and ``.`` as ``_``, and ``_2``,
      ``_3``, ... appended to a name an earlier row's map already has, in any case (``Heuristic`` after
      ``heuristic`` gets ``_2``: one file on a case-insensitive file system, macOS's or Windows').

    The last three read each run's ``trace``: one row per decision point, or for a plain loop's row (``plain-*``) one
    per evaluation, with its one precision throughout, its fixed batch and LR scale, and each evaluation interval's
    own peak memory (0 on a CPU, where nothing is measured).

    The figures are drawn without ``pyplot``, on an Agg canvas of their own: the process's backend (a notebook's
    inline one, a desktop's window) and the figures open in it stay as they were.

    Raises:
        ImportError: matplotlib is not installed (the message says how to get it).
    """
    try:
        from matplotlib import colormaps
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: pip install 'triaccel-rl[plots]'") from err

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    controllers = list(dict.fromkeys(r.controller for r in results))
    palette = colormaps["tab10" if len(controllers) <= 10 else "tab20"]
    colours = {name: palette(i % palette.N) for i, name in enumerate(controllers)}
    paths = []

    # With a target, a second panel zooms in on it and marks where each run first reached it (its time to target):
    # the whole curve hides differences of a few tenths of a point near the target, which decide the ranking.
    fig = _figure(figsize=(7 if target is None else 13, 4.5))
    axes = fig.subplots(1, 1 if target is None else 2, squeeze=False)
    for ax in axes[0]:
        for run in results:
            times = [point[0] for point in run.curve]
            metrics = [100 * point[1] for point in run.curve]
            ax.plot(times, metrics, marker="o", markersize=3, color=colours[run.controller],
                    label=_first_seed_label(run, results), alpha=0.85)  # fmt: skip
        if target is not None:
            ax.axhline(100 * target, color="grey", linestyle="--", linewidth=1, label=f"target {100 * target:.1f}%")
        ax.set_xlabel(f"training time ({time_label})")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][0].set_title("Test accuracy against training time")
    _legend(axes[0][0])
    if target is not None:
        zoom = axes[0][1]
        reached = [run for run in results if run.time_to_target_s is not None]
        for run in reached:  # where each run first reached the target
            zoom.plot(run.time_to_target_s, 100 * target, marker="v", markersize=8, color=colours[run.controller])
        # Finite points only: max() keeps a NaN met first (every comparison with it is False), and NaN limits raise.
        finite = [100 * point[1] for run in results for point in run.curve if np.isfinite(point[1])]
        top = max(finite, default=100 * target)
        # Down to the best run's best too: with every run more than 3 points short, the panel showed the target alone.
        zoom.set_ylim(min(100 * target - 3.0, top - 1.0), max(top, 100 * target) + 0.5)
        zoom.set_title("Near the target (triangles: time to target)")
    paths.append(_save(fig, out / "metric_vs_time.png"))

    fig = _figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for run in results:
        times = [row["time_s"] for row in run.trace]
        memory = [row["memory_bytes"] / 2**20 for row in run.trace]
        ax.plot(times, memory, color=colours[run.controller], alpha=0.85, label=_first_seed_label(run, results))
    ax.set_xlabel(f"training time ({time_label})")
    ax.set_ylabel("peak memory per interval (MiB)")
    ax.set_title("Memory against training time")
    ax.grid(alpha=0.3)
    _legend(ax)
    paths.append(_save(fig, out / "memory_vs_time.png"))

    fig = _figure(figsize=(7, 6))
    top, bottom = fig.subplots(2, 1, sharex=True)
    for run in results:
        # A trace row is written at an interval's end and holds that interval's setting: it is in force from the row
        # before (from 0 for the first) up to the row's time. ("post" drew each a decision late.)
        times = [0.0] + [row["time_s"] for row in run.trace] if run.trace else []
        batch = [row["batch_size"] for row in run.trace]
        lr_scale = [row["lr_scale"] for row in run.trace]  # on the task's base LR in every row (RunResult.trace)
        label = _first_seed_label(run, results)
        top.step(times, batch[:1] + batch, where="pre", color=colours[run.controller], label=label)
        bottom.step(times, lr_scale[:1] + lr_scale, where="pre", color=colours[run.controller])
    top.set_ylabel("batch size")
    top.set_yscale("log", base=2)
    bottom.set_ylabel("LR scale (× task's base LR)")
    bottom.set_xlabel(f"training time ({time_label})")
    top.set_title("Batch size and LR scale against training time")
    _legend(top)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    paths.append(_save(fig, out / "batch_lr_vs_time.png"))

    map_names: set[str] = set()
    for controller in controllers:
        run = min((r for r in results if r.controller == controller), key=lambda r: r.seed)
        if not run.trace:
            continue
        # Rows "learned:my policy.zip" and "learned:my_policy.zip" clean to one name: the second map overwrote the first
        map_name = _unique(_safe(controller), map_names)
        paths.append(_save(_precision_map_figure(run), out / f"precision_map_{map_name}.png"))
    return paths


def precision_map_image(run: RunResult) -> np.ndarray:
    """``run``'s precision map heat map, as ``plot_comparison`` draws it, as RGB pixels: uint8 ``[height, width, 3]``.

    For TensorBoard's images (``SummaryWriter.add_image(tag, image, dataformats="HWC")``). Needs matplotlib.

    Raises:
        ImportError: matplotlib is not installed.
        ValueError: ``run.trace`` is empty (no decision: no map to draw).
    """
    if not run.trace:
        raise ValueError(f"run {run.controller!r} (seed {run.seed}) has no trace rows: no precision map to draw")
    fig = _precision_map_figure(run)
    fig.tight_layout()
    canvas = fig.canvas
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()  # type: ignore[attr-defined]


def _precision_map_figure(run: RunResult) -> Figure:
    """Per-layer precision (rows) over ``run``'s decisions (columns), a heat map in three colours."""
    from matplotlib.colors import ListedColormap

    cmap = ListedColormap(["#3b6fb6", "#f2a541", "#d1495b"])  # fp32, bf16, fp16
    grid = np.array([row["precisions"] for row in run.trace]).T  # layers × decisions
    fig = _figure(figsize=(8, max(2.5, 0.18 * grid.shape[0] + 1.2)))
    ax = fig.subplots()
    image = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=-0.5, vmax=2.5, interpolation="nearest")
    ax.set_xlabel("decision")
    ax.set_ylabel("layer")
    if len(run.layer_names) <= 40:
        ax.set_yticks(range(len(run.layer_names)), run.layer_names, fontsize=6)
    ax.set_title(f"Per-layer precision over time: {run.controller} (seed {run.seed})")
    bar = fig.colorbar(image, ax=ax, ticks=[0, 1, 2])
    bar.ax.set_yticklabels(["fp32", "bf16", "fp16"])
    return fig


def _legend(ax: object) -> None:
    """A legend inside the axes for a few entries; beside them, to the right, for more (it would hide the lines)."""
    n_entries = len(ax.get_legend_handles_labels()[0])  # type: ignore[attr-defined]
    if n_entries > 8:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)  # type: ignore[attr-defined]
    else:
        ax.legend(fontsize=8)  # type: ignore[attr-defined]


def _first_seed_label(run: RunResult, results: Sequence[RunResult]) -> str | None:
    first = min(r.seed for r in results if r.controller == run.controller)
    return run.controller if run.seed == first else None


def _figure(**kwargs: Any) -> Figure:
    """A figure on an Agg canvas of its own, outside ``pyplot``.

    ``matplotlib.use("Agg")`` and ``pyplot`` switched the whole process's backend for good (a notebook's plots no
    longer showed) and closed the figures open in it; a figure of its own leaves both alone and needs no closing.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)  # attaches itself to the figure
    return fig


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    return save_png(fig, path)


def save_png(fig: Figure, path: str | os.PathLike[str], dpi: int = 110) -> Path:
    """Writes ``fig`` to ``path`` as a PNG, cropped to what is drawn; returns the path.

    A palette image of at most 256 colours where one holds the figure within ``_PALETTE_TOLERANCE`` levels on every
    pixel (the package's own plots: about a third of the bytes of matplotlib's RGBA file, which matters as the plots are
    kept in git); matplotlib's own image where it does not (many colours, a smooth colour map, transparency from
    ``savefig.transparent``), so no line changes colour and no transparency is lost. Pillow is matplotlib's dependency.
    """
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")  # a legend beside the axes
    buffer.seek(0)
    with Image.open(buffer) as image:
        palette = _palette(image.convert("RGBA"))
    png = buffer.getvalue()
    if palette is not None:
        smaller = io.BytesIO()
        palette.save(smaller, format="PNG", optimize=True)
        png = smaller.getvalue()
    write_bytes_atomic(path, png)  # a write cut short (a full disk) leaves the plot kept there whole
    return Path(path)


_PALETTE_TOLERANCE = 16
"""The most a palette PNG's pixel may differ from matplotlib's, in levels of 255 on any channel."""


def _palette(rgba: PILImage) -> PILImage | None:
    """``rgba`` (an RGBA image) in palette mode, at most 256 colours; None where no palette holds it.

    None where a pixel is not opaque (a palette of RGB colours drops the alpha) or where the palette is more than
    ``_PALETTE_TOLERANCE`` levels off on some pixel's channel (many colours, a smooth colour map).
    ``scripts/shrink_plots.py`` uses it too, so a rewritten plot meets the rule a saved one does.
    """
    from PIL import Image

    pixels = np.asarray(rgba)
    if pixels[..., 3].min() < 255:
        return None
    palette = rgba.convert("RGB").quantize(colors=256, method=Image.Quantize.MAXCOVERAGE, dither=Image.Dither.NONE)
    error = np.abs(np.asarray(palette.convert("RGB"), dtype=np.int16) - pixels[..., :3].astype(np.int16)).max()
    return palette if error <= _PALETTE_TOLERANCE else None


def _safe(name: str) -> str:
    """``name`` for a file name: every character but letters, digits, ``-``, ``_`` and ``.`` as ``_``.

    A ``/`` too: two rows named after files in two folders kept only their last parts, and one plot overwrote the other.
    """
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _unique(name: str, taken: set[str]) -> str:
    """``name``, or it with the first suffix ``_2``, ``_3``, ... not in ``taken`` in any case; added to it case-folded.

    Compared case-folded: macOS and Windows file systems ignore case by default, and rows "Heuristic" and "heuristic"
    wrote one file there, the second map overwriting the first.
    """
    unique, count = name, 1
    while unique.casefold() in taken:
        count += 1
        unique = f"{name}_{count}"
    taken.add(unique.casefold())
    return unique

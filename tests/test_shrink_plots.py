"""scripts/shrink_plots.py rewrites a PNG as a palette image only where ``save_png`` would have written one."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "shrink_plots.py"


def load_script():
    spec = importlib.util.spec_from_file_location("shrink_plots", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_figure(path: Path, case: str) -> None:
    """Writes matplotlib's own RGBA PNG of :func:`figure`."""
    figure(case).savefig(path, format="png", dpi=110)


def figure(case: str) -> Figure:
    """A line plot, a many-colour image (``"many colours"``) or a transparent line plot (``"transparent"``)."""
    fig = Figure(figsize=(4, 3))
    FigureCanvasAgg(fig)
    axes = fig.add_subplot()
    if case == "many colours":
        axes.imshow(np.random.default_rng(0).random((60, 80, 3)))
    else:
        axes.plot(np.arange(40), np.sin(np.arange(40) / 5), label="sin")
        axes.plot(np.arange(40), np.cos(np.arange(40) / 5), label="cos")
        axes.legend()
    if case == "transparent":
        fig.patch.set_alpha(0.0)
        axes.patch.set_alpha(0.0)
    return fig


@pytest.mark.parametrize("case", ["many colours", "transparent"])
def test_a_png_no_palette_holds_is_left_byte_for_byte(tmp_path, case):
    """A transparent plot lost its alpha (every background pixel came out opaque), and a many-colour image would come
    more than 16 levels off: both are left as they are, as ``save_png`` writes them."""
    path = tmp_path / "plot.png"
    write_figure(path, case)
    original = path.read_bytes()
    assert load_script().shrink(path) == (len(original), len(original))
    assert path.read_bytes() == original


def test_an_opaque_line_plot_is_rewritten_smaller_within_16_levels(tmp_path):
    path = tmp_path / "plot.png"
    write_figure(path, "opaque")
    with Image.open(path) as rendered:
        expected = np.asarray(rendered.convert("RGBA"), dtype=np.int16)
    before = path.stat().st_size

    assert load_script().shrink(path) == (before, path.stat().st_size)
    assert path.stat().st_size < before
    with Image.open(path) as written:
        assert written.mode == "P"
        drawn = np.asarray(written.convert("RGBA"), dtype=np.int16)
    assert drawn.shape == expected.shape
    assert np.abs(drawn - expected).max() <= 16
    assert not (tmp_path / "plot.png.tmp").exists()

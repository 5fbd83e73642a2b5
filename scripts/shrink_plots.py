"""Rewrites the PNG plots under a folder as palette images of at most 256 colours, as ``triaccel_rl.plots`` now saves.

The plots are kept in git beside the results, and the tracked tree travels with every device call (64 MiB with
``.carry``): matplotlib's RGBA files took 18 MB. An image already in palette mode is left alone, so a second run
changes nothing, and so is one no palette holds (a transparent pixel, or more than
``triaccel_rl.plots._PALETTE_TOLERANCE`` levels off: the rule ``save_png`` keeps).

    python scripts/shrink_plots.py [folder ...]     # default: experiments/results/plots
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from PIL import Image

from triaccel_rl.plots import _palette


def shrink(path: Path) -> tuple[int, int]:
    """Rewrites ``path`` in palette mode (written whole, then renamed over it); returns its bytes before and after.

    A file already in palette mode, one no palette holds (see ``triaccel_rl.plots._palette``) or one a palette would
    not make smaller is left as it is.
    """
    before = path.stat().st_size
    with Image.open(path) as image:
        if image.mode == "P":
            return before, before
        palette = _palette(image.convert("RGBA"))
    if palette is None:
        return before, before
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG", optimize=True)
    if len(buffer.getvalue()) >= before:
        return before, before
    partial = path.with_name(path.name + ".tmp")
    partial.write_bytes(buffer.getvalue())
    partial.replace(path)
    return before, path.stat().st_size


def main() -> None:
    """Shrinks every PNG under the folders given (default: experiments/results/plots) and prints the bytes saved."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="*", type=Path, default=[Path("experiments/results/plots")])
    args = parser.parse_args()
    total_before = total_after = count = 0
    for folder in args.folders:
        if not folder.is_dir():
            parser.error(f"{folder} is not a folder")
        for path in sorted(folder.rglob("*.png")):
            before, after = shrink(path)
            total_before, total_after, count = total_before + before, total_after + after, count + (after < before)
    print(f"{count} files rewritten: {total_before / 2**20:.1f} MiB -> {total_after / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()

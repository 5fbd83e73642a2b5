"""Precision-map file names distinct in any case; the executor's LR clamp lands on the ladder's rungs."""

from __future__ import annotations

import numpy as np
import pytest
from test_executor_observation_decode import _lr_target  # an executor's target with only an LR to set

from triaccel_rl.actions import encode
from triaccel_rl.compare import RunResult
from triaccel_rl.config import ControllerConfig
from triaccel_rl.executor import Executor
from triaccel_rl.observation import LayerGrouper
from triaccel_rl.types import Action, BatchMove, Precision

# ---------------------------------------------------------------- precision-map file names


def _run(controller: str, precisions: list[int]) -> RunResult:
    trace = [{"time_s": 1.0, "batch_size": 32, "lr_scale": 1.0, "memory_bytes": 0, "precisions": precisions}]
    run = RunResult(controller, 0, 0.5, 1.0, 1.0, None, 0, 0, 0, 0, 0, 0.0, 10)
    run.curve, run.trace, run.layer_names = [(1.0, 0.5, 32, 1.0, 0.5)], trace, ["first", "second"]
    return run


@pytest.mark.parametrize(
    ("controllers", "maps"),
    [
        (["heuristic", "Heuristic"], ["precision_map_heuristic.png", "precision_map_Heuristic_2.png"]),
        (
            ["learned:My policy.zip", "learned:my_policy.zip"],
            ["precision_map_learned_My_policy.zip.png", "precision_map_learned_my_policy.zip_2.png"],
        ),
        (["Heuristic", "static-fp32"], ["precision_map_Heuristic.png", "precision_map_static-fp32.png"]),
    ],
    ids=["heuristic-Heuristic", "clean-alike-but-case", "no-collision-kept"],
)
def test_rows_whose_names_differ_only_in_case_get_a_precision_map_each(
    tmp_path, saved_figures, controllers: list[str], maps: list[str]
) -> None:
    """The second row's map was written to a name the first one's has on macOS and Windows, and overwrote it there."""
    pytest.importorskip("matplotlib")
    import triaccel_rl.plots as plots

    figures = saved_figures
    paths = plots.plot_comparison([_run(controllers[0], [0, 1]), _run(controllers[1], [2, 2])], tmp_path)
    assert [p.name for p in paths][3:] == maps
    assert len({p.name.casefold() for p in paths}) == len(paths)  # one file each on a case-insensitive file system
    images = [figures[name].axes[0].get_images()[0].get_array().tolist() for name in maps]
    assert images == [[[0], [1]], [[2], [2]]]  # each row's own map, in the order of the rows


def test_a_name_taken_in_another_case_gets_the_next_free_suffix() -> None:
    from triaccel_rl.plots import _unique

    taken: set[str] = set()
    names = [_unique(name, taken) for name in ("Heuristic", "heuristic", "HEURISTIC_2", "heuristic_2", "x", "X_2")]
    assert names == ["Heuristic", "heuristic_2", "HEURISTIC_2_2", "heuristic_2_3", "x", "X_2"]


# ---------------------------------------------------------------- the LR clamp on the ladder


def _apply(config: ControllerConfig, current: float, asked: float) -> tuple[float, list[str]]:
    executor = Executor(config, LayerGrouper(np.array([True]), 1))
    report = executor.apply(Action((Precision.FP32,), asked, BatchMove.KEEP), _lr_target(current))  # type: ignore[arg-type]
    return report.lr_scale, report.refused


_THIRDS = ((0.2, 0.3, 0.45, 0.675, 1.0), 1.5)  # 0.2 * 1.5 = 0.30000000000000004, 0.3 * 1.5 = 0.44999999999999996
_TENTHS = ((0.7, 0.77, 0.847, 1.0, 1.1, 1.21), 1.1)  # 0.77 * 1.1 = 0.8470000000000001, 1.21 / 1.1 = 1.0999999999999999
_TRIPLES = ((0.1, 0.3, 0.9, 1.0, 2.7), 3.0)  # 0.1 * 3 = 0.30000000000000004, 0.3 * 3 = 0.8999999999999999


@pytest.mark.parametrize(
    ("ladder", "current", "asked", "expected"),
    [
        (_THIRDS, 0.3, 0.675, 0.45),
        (_THIRDS, 0.3, 1.0, 0.45),
        (_THIRDS, 0.2, 1.0, 0.3),
        (_TENTHS, 0.77, 1.21, 0.847),
        (_TENTHS, 1.21, 0.7, 1.1),
        (_TRIPLES, 0.1, 2.7, 0.3),
        (_TRIPLES, 0.3, 2.7, 0.9),
    ],
    ids=[
        "0.3-up-two",
        "0.3-up-three",
        "0.2-up-four",
        "0.77-up-three",
        "1.21-down-five",
        "0.1-up-four",
        "0.3-up-three-x3",
    ],
)
def test_an_lr_move_clamped_to_a_rung_lands_on_it_exactly(
    ladder: tuple[tuple[float, ...], float], current: float, asked: float, expected: float
) -> None:
    """The clamp stopped one ulp off the rung: equality with the ladder (``encode``, the heuristic) missed it."""
    config = ControllerConfig(n_groups=1, lr_scales=ladder[0], max_lr_change=ladder[1])
    lr_scale, refused = _apply(config, current, asked)
    assert lr_scale == expected, f"clamped to {lr_scale!r}, not the rung {expected!r}"
    assert refused == [f"LR scale {asked} clamped to {expected:.4g} (at most ×{ladder[1]} per decision)"]
    encode(Action((Precision.FP32,), lr_scale, BatchMove.KEEP), config)  # raised: not one of the lr_scales


@pytest.mark.parametrize(("current", "asked", "expected"), [(1.0, 0.45, 1.0 / 1.5), (0.675, 0.2, 0.45)])
def test_an_lr_move_clamped_between_rungs_stops_at_the_bound(current: float, asked: float, expected: float) -> None:
    lr_scale, _ = _apply(ControllerConfig(n_groups=1, lr_scales=_THIRDS[0], max_lr_change=_THIRDS[1]), current, asked)
    assert lr_scale == expected


@pytest.mark.parametrize(
    ("ladder", "path"),
    [
        (_THIRDS, [0.2, 0.3, 0.45, 0.675]),
        (_THIRDS, [0.675, 0.45, 0.3, 0.2]),
        (_TENTHS, [0.7, 0.77, 0.847]),
        (_TENTHS, [0.847, 0.77, 0.7]),
        (_TENTHS, [1.21, 1.1, 1.0]),
        (_TRIPLES, [0.1, 0.3, 0.9, 2.7]),
        (_TRIPLES, [2.7, 0.9, 0.3, 0.1]),
    ],
    ids=["x1.5-up", "x1.5-down", "x1.1-up", "x1.1-down", "x1.1-down-to-1", "x3-up", "x3-down"],
)
def test_a_clamped_walk_to_a_far_rung_takes_the_rungs_between_exactly(
    ladder: tuple[tuple[float, ...], float], path: list[float]
) -> None:
    """Each decision asks for the far end; the clamp stops on each rung between (they are ``max_lr_change`` apart).

    Off by an ulp, the next bound was off by it too, and the walk drifted from the ladder it was meant to follow.
    """
    config = ControllerConfig(n_groups=1, lr_scales=ladder[0], max_lr_change=ladder[1])
    walked = [path[0]]
    for _ in path[1:]:
        walked.append(_apply(config, walked[-1], path[-1])[0])
    assert walked == path

"""Tests for the hardware profile's bound on its factors and the precision maps' distinct file names."""

from __future__ import annotations

import json
import math
import re
from importlib import resources

import pytest
import torch
from torch import nn

from triaccel_rl.cli import main
from triaccel_rl.compare import RunResult
from triaccel_rl.config import ConfigError, HardwareProfile
from triaccel_rl.costs import CostModel
from triaccel_rl.memory import MemoryModel
from triaccel_rl.precision import find_layers
from triaccel_rl.types import Precision

_PROFILE = {
    "device": "Test GPU",
    "time_factor": {"fp32": 1.0, "bf16": 0.5, "fp16": 0.25},
    "memory_factor": {"fp32": 1.0, "bf16": 0.5, "fp16": 0.5},
    "fixed_ms": 0.75,
    "throughput_scale": 3.0e-4,
}


@pytest.mark.parametrize("bad", [1e308, math.nextafter(1e3, math.inf)])
@pytest.mark.parametrize("table", ["time_factor", "memory_factor"])
def test_a_factor_above_the_bound_is_refused_by_name(table, bad):
    """A factor of 1e308 was taken: a step cost inf ms and the memory accounting raised OverflowError."""
    raw = {**_PROFILE, table: {**_PROFILE[table], "bf16": bad}}
    message = f"hardware profile {table}['bf16']={bad!r} must be a finite number > 0 and <= 1000"
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        HardwareProfile(**raw)


def test_a_profile_at_the_bounds_prices_finite_steps_and_memory():
    """The bound is low enough: every factor, the scale and the fixed time at their largest still give numbers."""
    top = {"fp32": 1.0, "bf16": 1e3, "fp16": 1e3}
    profile = HardwareProfile("Test GPU", top, top, fixed_ms=1e7, throughput_scale=1e3)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    costs = CostModel.measure(net, [layer for _, _, layer in find_layers(net)], torch.zeros(1, 4), 1)
    precisions = [Precision.BF16, Precision.FP16]
    assert math.isfinite(costs.step_ms(8, precisions, profile))
    memory = MemoryModel(costs, profile)
    assert memory.predict(8, precisions) == costs.memory_bytes(8, precisions, profile) > 0
    assert memory.max_batch_size(1 << 30, precisions, 4096) >= 1


def test_every_shipped_profile_loads():
    shipped = [p for p in resources.files("triaccel_rl").joinpath("profiles").iterdir() if p.name.endswith(".json")]
    assert shipped
    for path in shipped:
        profile = HardwareProfile.load(str(path))
        assert max(*profile.time_factor.values(), *profile.memory_factor.values()) <= 1e3


def test_compare_with_a_huge_factor_in_its_profile_is_one_line(tmp_path, capsys):
    """It was taken: the runs cost inf ms, and with a --log-dir failed with a traceback writing that to TensorBoard."""
    file = tmp_path / "huge.json"
    file.write_text(json.dumps({**_PROFILE, "time_factor": {"fp32": 1.0, "bf16": 1e308, "fp16": 0.25}}))
    argv = ["compare", "--task", "synthetic", "--controllers", "bf16", "--profile", str(file), "--cost-mode", "profile"]
    assert main([*argv, "--no-progress", "--out", "", "--log-dir", ""]) == 2
    err = capsys.readouterr().err
    message = f"time_factor['bf16']=1e+308 must be a finite number > 0 and <= 1000 (in {file})"
    assert err.strip().splitlines() == [f"triaccel-rl compare: error: hardware profile {message}"]


def _run(controller: str, precisions: list[int]) -> RunResult:
    trace = [{"time_s": 1.0, "batch_size": 32, "lr_scale": 1.0, "memory_bytes": 0, "precisions": precisions}]
    run = RunResult(controller, 0, 0.5, 1.0, 1.0, None, 0, 0, 0, 0, 0, 0.0, 10)
    run.curve, run.trace, run.layer_names = [(1.0, 0.5, 32, 1.0, 0.5)], trace, ["first", "second"]
    return run


def test_rows_whose_names_clean_alike_get_a_precision_map_each(tmp_path, saved_figures):
    """Both rows were written to one file name: the second map overwrote the first, its path returned twice."""
    pytest.importorskip("matplotlib")
    import triaccel_rl.plots as plots

    figures = saved_figures
    results = [_run("learned:my policy.zip", [0, 1]), _run("learned:my_policy.zip", [2, 2])]
    paths = plots.plot_comparison(results, tmp_path)
    maps = ["precision_map_learned_my_policy.zip.png", "precision_map_learned_my_policy.zip_2.png"]
    assert [p.name for p in paths][3:] == maps
    assert sorted(p.name for p in tmp_path.glob("precision_map_*")) == maps
    images = [figures[name].axes[0].get_images()[0].get_array().tolist() for name in maps]
    assert images == [[[0], [1]], [[2], [2]]]  # each row's own map, in the order of the rows


def test_a_suffixed_name_taken_by_another_row_gets_the_next_free_suffix():
    from triaccel_rl.plots import _unique

    taken: set[str] = set()
    names = [_unique(name, taken) for name in ("a_b", "a_b", "a_b_2", "a_b", "c")]
    assert names == ["a_b", "a_b_2", "a_b_2_2", "a_b_3", "c"]
    assert taken == set(names)

import dataclasses
import io
import json
import math
import re
import statistics

import numpy as np
import pytest

from triaccel_rl.compare import (
    RunResult,
    bootstrap_ci,
    check_comparison,
    check_epoch_budget,
    compare,
    format_table,
    row_names,
    run_controller,
    summarize,
    write_json,
)
from triaccel_rl.config import ControllerConfig, HeuristicConfig
from triaccel_rl.training import TrainingRun


@pytest.fixture(scope="module")
def results():
    config = ControllerConfig(interval_steps=5)
    return compare(
        "synthetic", ["fp32", "heuristic"], [0, 1], epochs=1, config=config, show_progress=False, eval_every=2
    )


def fake(controller, seed, final, time_s, to_target):
    return RunResult(controller, seed, final, time_s, time_s, to_target, 100, 0, 0, 0, 0, 0.01, 10)


def strict_json(text):
    """``json.loads`` that refuses ``NaN``, ``Infinity`` and ``-Infinity``, as strict parsers do."""

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def table_cells(table):
    """The cells of a Markdown table's lines, stripped; every line must have as many as the header."""
    lines = table.splitlines()
    cells = [[cell.strip() for cell in line.split(" | ")] for line in lines]
    for line in lines:
        assert line.startswith("| ") or line.startswith("|-"), line
        assert line.replace("\\|", "").count("|") == 12, f"not eleven cells: {line}"
    return cells


SUMMARY_KEYS = {
    "controller", "seeds", "final_metric_mean", "final_metric_std", "final_metric_ci95", "time_s_mean",
    "time_s_std", "time_s_ci95", "time_to_target_s_mean", "time_to_target_s_ci95", "time_to_target_s",
    "reach_rate", "rank", "time_ratio", "time_to_target_ratio", "peak_bytes_mean", "nvml_bytes_mean",
    "precision_changes_mean", "batch_changes_mean", "lr_changes_mean", "overhead_frac_mean", "overhead_parts_mean",
    "wall_s_mean", "mean_step_ms", "skipped_steps_mean", "oom_events_total", "fallbacks_total",
}  # fmt: skip


def test_bootstrap_ci_is_the_documented_percentile_bootstrap():
    """Exact intervals, derived from the bootstrap distribution rather than from the implementation.

    One value: the interval is that value. Two or three values: the resample of n copies of the smallest value has
    chance n**-n (1/4, 1/27), above the 2.5% tail, so with 2000 resamples both quantiles fall on resamples of one
    value repeated: the interval is (min, max). Four values 0, 0, 0, 3: a resample's mean is 0.75 k, k ~ Bin(4, 1/4)
    threes; P(k = 0) = 0.316 > 0.025, so the low end is 0; P(k <= 2) = 0.949 < 0.975 < P(k <= 3) = 0.996, so the
    high end is 0.75 * 3 = 2.25 (the seeded draw's counts lie well inside those margins: any seed gives it).
    """
    assert bootstrap_ci([5.0]) == (5.0, 5.0)
    assert bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)
    assert bootstrap_ci([4.0, 2.0]) == (2.0, 4.0)
    assert bootstrap_ci([0.5, 0.875, 0.75]) == (0.5, 0.875)
    for seed in (0, 1, 2):
        assert bootstrap_ci([0.0, 3.0, 0.0, 0.0], seed=seed) == (0.0, 2.25)
    # The recipe the docstring gives, done by hand: seeded resamples, their means, numpy's linear percentiles.
    values = np.array([0.25, 1.5, 0.5, 4.0, 2.0])
    resamples = values[np.random.default_rng(7).integers(0, 5, (300, 5))]
    means = [statistics.fmean(resample) for resample in resamples.tolist()]  # as summarize() takes a row's mean
    expected = (float(np.percentile(means, 5.0)), float(np.percentile(means, 95.0)))
    assert bootstrap_ci(values.tolist(), confidence=0.9, n_resamples=300, seed=7) == expected
    assert bootstrap_ci(values.tolist()) == (0.6, 2.85)  # seeded (the default seed): the same table every run
    with pytest.raises(ValueError, match="at least one value"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match=r"finite values; got \[1.0, nan\]"):
        bootstrap_ci([1.0, float("nan")])
    with pytest.raises(ValueError, match=r"confidence=1.0 must be in \(0, 1\)"):
        bootstrap_ci([1.0, 2.0], confidence=1.0)
    with pytest.raises(ValueError, match="n_resamples=0 must be a positive integer"):
        bootstrap_ci([1.0, 2.0], n_resamples=0)


def test_the_bootstrap_interval_holds_the_rows_mean_when_every_seed_agrees():
    """Six seeds at 0.5988: numpy's mean of each resample was 0.5987999999999999, the row's mean (``fmean``) 0.5988,
    so the interval lay one ulp below the mean it was for. The resamples' means are now taken as the row's is."""
    values = [0.5988] * 6
    assert bootstrap_ci(values) == (0.5988, 0.5988)
    (row,) = summarize([fake("static-bf16", seed, value, 1.0, None) for seed, value in enumerate(values)])
    assert row["final_metric_mean"] == 0.5988 and row["final_metric_ci95"] == (0.5988, 0.5988)
    assert bootstrap_ci([0.1] * 3) == (statistics.fmean([0.1] * 3),) * 2  # fmean's own rounding: 0.10000000000000002


def test_summary_of_one_seed_measures_no_spread():
    """Before, one seed reported a standard deviation of 0 and a confidence interval of zero width ("± 0.00"):
    a certainty it had not measured. Now they are None, and the table shows a dash."""
    (row,) = summarize([fake("a", 3, 0.75, 10.0, 4.0)])
    assert set(row) == SUMMARY_KEYS
    assert (row["final_metric_mean"], row["time_s_mean"], row["time_to_target_s_mean"]) == (0.75, 10.0, 4.0)
    assert row["final_metric_std"] is row["time_s_std"] is None
    assert row["final_metric_ci95"] is row["time_s_ci95"] is row["time_to_target_s_ci95"] is None
    assert (row["seeds"], row["reach_rate"], row["rank"], row["time_to_target_s"]) == ([3], 1.0, 1, [4.0])
    assert row["time_ratio"] is row["time_to_target_ratio"] is None  # no reference
    cells = table_cells(format_table([row]))[2]
    assert cells[1:6] == ["75.00 ± —", "10 ± —", "—", "4", "100%"]
    assert cells[-1] == "— / — |"  # no reference: no ratios


def test_summary_of_two_and_three_seeds_is_exact():
    """Sample standard deviation (ddof=1), by hand: sqrt(sum((x - mean)^2) / (n - 1)).

    Two seeds, 0.5 and 1.0: mean 0.75, sd sqrt(2 * 0.25**2 / 1) = 0.25 * sqrt(2). Three seeds, 1, 2, 6 s: mean 3,
    sd sqrt((4 + 1 + 9) / 2) = sqrt(7). The intervals of two or three values are (min, max) (see above).
    """
    two, three = summarize(
        [
            fake("two", 0, 0.5, 2.0, 1.0),
            fake("two", 1, 1.0, 4.0, 3.0),
            fake("three", 0, 0.25, 1.0, 0.5),
            fake("three", 1, 0.5, 2.0, 1.0),
            fake("three", 2, 0.75, 6.0, 1.5),
        ]
    )
    assert two["final_metric_mean"] == 0.75 and two["final_metric_std"] == pytest.approx(0.25 * 2**0.5, rel=1e-15)
    assert two["time_s_mean"] == 3.0 and two["time_s_std"] == pytest.approx(2**0.5, rel=1e-15)
    assert (two["final_metric_ci95"], two["time_s_ci95"], two["time_to_target_s_ci95"]) == (
        (0.5, 1.0), (2.0, 4.0), (1.0, 3.0)
    )  # fmt: skip
    assert two["time_to_target_s_mean"] == 2.0 and two["reach_rate"] == 1.0
    assert three["time_s_mean"] == 3.0 and three["time_s_std"] == pytest.approx(7**0.5, rel=1e-15)
    assert three["final_metric_std"] == pytest.approx(0.25, rel=1e-15)  # 0.25, 0.5, 0.75: sqrt(2 * 0.0625 / 2)
    assert three["final_metric_ci95"] == (0.25, 0.75) and three["time_to_target_s_ci95"] == (0.5, 1.5)
    assert (two["rank"], three["rank"]) == (2, 1)  # mean times to target 2.0 and 1.0
    cells = table_cells(format_table([two, three]))
    assert cells[2][1:5] == ["75.00 ± 35.36", "3 ± 1.4", "2–4", "2"]


def test_overhead_parts_average_every_runs_parts():
    """Runs of a row that timed different parts: each part's mean is over all runs (0 where a run lacked it), and
    a part only a later run timed is not dropped, as it was when the first run's parts named them all."""
    first, second = fake("a", 0, 0.5, 8.0, 2.0), fake("a", 1, 0.5, 8.0, 2.0)
    first.overhead_parts, second.overhead_parts = {"probe": 0.02}, {"probe": 0.01, "rounds": 0.04}
    (row,) = summarize([first, second])
    assert row["overhead_parts_mean"] == {"probe": 0.015, "rounds": 0.02}


def test_a_time_to_target_that_is_no_finite_number_is_a_miss_and_leaves_the_ranks_in_order():
    """A NaN counted as reached (reach rate 1), and sorting means with a NaN among them ranked 5 s before 2 s."""
    rows = summarize([fake("slow", 0, 0.5, 8.0, 5.0), fake("nan", 0, 0.5, 8.0, float("nan")),
                      fake("fast", 0, 0.5, 8.0, 2.0)])  # fmt: skip
    ranks = {row["controller"]: (row["rank"], row["reach_rate"], row["time_to_target_s"]) for row in rows}
    assert ranks == {"slow": (2, 1.0, [5.0]), "nan": (None, 0.0, [None]), "fast": (1, 1.0, [2.0])}
    assert bootstrap_ci([1.0, 3.0], n_resamples=np.int64(10)) == bootstrap_ci([1.0, 3.0], n_resamples=10)


def test_misses_count_in_the_reach_rate_not_in_the_mean_time_to_target():
    """Three seeds, one missed: the time to target is the mean of the two that reached (2 and 4 s: 3), its interval
    over those two, the reach rate 2/3, no rank; the final metric and time still average all three."""
    (row,) = summarize([fake("a", 0, 0.5, 8.0, 2.0), fake("a", 1, 0.25, 8.0, None), fake("a", 2, 0.75, 8.0, 4.0)])
    assert row["time_to_target_s"] == [2.0, None, 4.0]
    assert row["time_to_target_s_mean"] == 3.0 and row["time_to_target_s_ci95"] == (2.0, 4.0)
    assert row["reach_rate"] == pytest.approx(2 / 3, rel=1e-15) and row["rank"] is None
    assert row["final_metric_mean"] == 0.5 and row["time_s_std"] == 0.0
    (one,) = summarize([fake("b", 0, 0.5, 8.0, None), fake("b", 1, 0.5, 8.0, 5.0)])
    assert one["time_to_target_s_mean"] == 5.0 and one["time_to_target_s_ci95"] is None  # one seed reached
    (none,) = summarize([fake("c", 0, 0.5, 8.0, None), fake("c", 1, 0.5, 8.0, None)])
    assert none["time_to_target_s_mean"] is none["time_to_target_s_ci95"] is None and none["reach_rate"] == 0.0
    assert table_cells(format_table([row, one, none]))[4][4:7] == ["—", "0%", "—"]


def test_summary_statistics_and_ratios_are_exact():
    rows = summarize(
        [
            fake("a", 0, 0.9, 10.0, 5.0),
            fake("a", 1, 0.8, 14.0, 6.0),
            fake("b", 0, 0.85, 5.0, 2.0),
            fake("b", 1, 0.85, 5.0, 3.0),
            fake("c", 0, 0.85, 6.0, 1.0),  # faster to target, but on one seed only
            fake("c", 1, 0.85, 6.0, None),
        ],
        reference="a",
    )
    a, b, c = rows
    assert a["final_metric_mean"] == pytest.approx(0.85)
    assert a["final_metric_std"] == pytest.approx(np.std([0.9, 0.8], ddof=1))
    assert a["reach_rate"] == 1.0 and a["time_to_target_s_mean"] == 5.5
    assert b["reach_rate"] == 1.0 and b["time_to_target_s_mean"] == 2.5
    assert (a["time_ratio"], b["time_ratio"], c["time_ratio"]) == (1.0, 5.0 / 12.0, 6.0 / 12.0)
    assert (a["time_to_target_ratio"], b["time_to_target_ratio"]) == (1.0, 2.5 / 5.5)
    # c's mean over the one seed it reached (1 s) against a's over both: it would have read 0.18, "5x faster".
    assert c["time_to_target_ratio"] is None
    for row in rows:
        assert set(row) == SUMMARY_KEYS
    with pytest.raises(ValueError, match="reference 'c' is not among"):
        summarize([fake("a", 0, 0.9, 1.0, None)], reference="c")


@pytest.mark.parametrize(
    ("reference_runs", "time_ratio", "to_target_ratio"),
    [
        ([fake("ref", 0, 0.5, 4.0, None), fake("ref", 1, 0.5, 4.0, None)], 0.5, None),  # never reaches the target
        ([fake("ref", 0, 0.5, 4.0, 1.0), fake("ref", 1, 0.5, 4.0, None)], 0.5, None),  # reaches on one seed of two
        ([fake("ref", 0, 0.5, float("nan"), 2.0)], None, 0.5),  # a NaN time: no ratio (NaN before)
        ([fake("ref", 0, 0.5, 0.0, 2.0)], None, 0.5),  # a zero time: no ratio (a ZeroDivisionError before)
        ([fake("ref", 0, 0.5, 4.0, float("nan"))], 0.5, None),  # a NaN time to target
    ],
)
def test_ratios_against_a_reference_that_cannot_give_one_are_none(reference_runs, time_ratio, to_target_ratio):
    rows = summarize([*reference_runs, fake("row", 0, 0.5, 2.0, 1.0)], reference="ref")
    assert rows[1]["time_ratio"] == time_ratio
    assert rows[1]["time_to_target_ratio"] == to_target_ratio


@pytest.mark.parametrize("time_s", [float("nan"), float("inf")])
def test_a_rows_own_time_that_is_not_finite_has_no_ratio(time_s):
    """The table printed "nan / 1.00" and "inf / 1.00" where every other missing number reads "—"."""
    rows = summarize([fake("ref", 0, 0.5, 4.0, 1.0), fake("row", 0, 0.5, time_s, 1.0)], reference="ref")
    assert rows[1]["time_ratio"] is None


def test_no_controller_and_a_bad_lr_scale_are_refused_by_name():
    """No controller ran nothing and returned []; an adaptive row's lr_scale was folded first and named base_lr."""
    with pytest.raises(ValueError, match="need at least one controller"):
        compare("synthetic", [], [0], show_progress=False)
    for controller in ("fp32", "heuristic"):
        with pytest.raises(ValueError, match=r"lr_scale=-1\.0 must be a positive finite number"):
            run_controller("synthetic", controller, 0, epochs=0.1, device="cpu", lr_scale=-1.0)


def test_a_seed_reported_twice_is_refused():
    """A result kept twice (two merged partial files) was averaged in as another seed."""
    with pytest.raises(ValueError, match="controller 'a' has two results for seed 1"):
        summarize([fake("a", 1, 0.9, 1.0, None), fake("a", 0, 0.9, 1.0, None), fake("a", 1, 0.9, 1.0, None)])


def test_repeated_seeds_are_refused_before_any_run(monkeypatch):
    """``compare`` trained every run of a repeated seed, then ``summarize`` refused the two results for it."""
    import triaccel_rl.compare as compare_module

    monkeypatch.setattr(compare_module, "run_controller", lambda *a, **k: pytest.fail("a run started"))
    with pytest.raises(ValueError, match=r"seeds \[0, 1, 0\] repeat \[0\]: give each seed once"):
        compare("synthetic", ["fp32"], [0, 1, 0], show_progress=False)
    for bad in (-1, 1.5, True):  # refused after the runs of the seeds before them had trained
        with pytest.raises(ValueError, match=rf"seeds \[0, {bad!r}\]: seed={bad!r} must be a whole number in \[0, "):
            compare("synthetic", ["fp32", "bf16"], [0, bad], show_progress=False)


def test_json_is_strict_and_non_finite_numbers_are_null(tmp_path):
    """Before, a NaN or inf was written as ``NaN`` / ``Infinity``, which strict JSON parsers refuse."""
    runs = [fake("a", 0, float("nan"), 2.0, None), fake("a", 1, 0.5, float("inf"), None)]
    runs[0].curve = [(1.0, float("nan"), 64, 1.0, 0.0)]
    runs[1].speed_trial = {"bf16": np.float64(1.5), "chosen": np.float32(1.0)}
    runs[1].trace = [{"precisions": np.array([0, 1]), "probe_loss": float("-inf"), "memory_bytes": np.int64(7)}]
    rows = summarize(runs)
    assert math.isnan(rows[0]["final_metric_mean"]) and rows[0]["final_metric_ci95"] is None
    path = tmp_path / "r.json"
    write_json(runs, rows, path, task="synthetic", ratio=float("nan"))
    payload = strict_json(path.read_text())
    row = payload["rows"][0]
    assert set(row) == SUMMARY_KEYS
    assert row["final_metric_mean"] is None and row["final_metric_std"] is None and row["time_s_mean"] is None
    assert payload["meta"]["ratio"] is None and payload["meta"]["task"] == "synthetic"
    first, second = payload["runs"]
    assert first["final_metric"] is None and first["curve"] == [[1.0, None, 64, 1.0, 0.0]]
    assert second["time_s"] is None and second["speed_trial"] == {"bf16": 1.5, "chosen": 1.0}
    assert second["trace"] == [{"precisions": [0, 1], "probe_loss": None, "memory_bytes": 7}]
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left beside it


def test_the_json_schema_is_documented():
    """Every key a row holds is named in ``summarize``'s docstring; a run holds ``RunResult``'s fields."""
    doc = " ".join(summarize.__doc__.split())
    for key in SUMMARY_KEYS:
        assert f"``{key}``" in doc, key
    assert "null" in write_json.__doc__ and "allow_nan" not in write_json.__doc__


def test_rows_are_ranked_by_time_to_target_only_among_those_that_reach_it_on_every_seed():
    rows = summarize(
        [
            fake("fast-but-fragile", 0, 0.9, 9.0, 1.0),  # the shortest mean time, but a miss on seed 1
            fake("fast-but-fragile", 1, 0.7, 9.0, None),
            fake("slow", 0, 0.9, 9.0, 6.0),
            fake("slow", 1, 0.9, 9.0, 6.0),
            fake("steady", 0, 0.9, 9.0, 3.0),
            fake("steady", 1, 0.9, 9.0, 5.0),
            fake("tied", 0, 0.9, 9.0, 4.0),
            fake("tied", 1, 0.9, 9.0, 4.0),
        ]
    )
    ranks = {row["controller"]: row["rank"] for row in rows}
    assert ranks == {"fast-but-fragile": None, "steady": 1, "tied": 1, "slow": 3}
    cells = table_cells(format_table(rows))
    assert cells[0][6] == "rank"
    assert [line[6] for line in cells[2:]] == ["—", "3", "1", "1"]


def test_times_the_table_prints_alike_share_a_rank():
    """One seed's 0.020010 s and 0.020003 s were ranked 4 and 2 in a column that printed 0.02 for every row."""
    rows = summarize(
        [fake("a", 0, 0.9, 9.0, 0.020010), fake("b", 0, 0.9, 9.0, 0.020003), fake("c", 0, 0.9, 9.0, 0.0206)]
    )
    assert {row["controller"]: row["rank"] for row in rows} == {"a": 1, "b": 1, "c": 3}
    assert [line[4] for line in table_cells(format_table(rows))[2:]] == ["0.02", "0.02", "0.0206"]


def test_a_peak_that_was_not_measured_reads_as_a_dash():
    """A plain row on a CPU measures no peak (no allocator to read): it showed 0.0 B beside the others' figures."""
    unmeasured = dataclasses.replace(fake("plain-fp32", 0, 0.9, 9.0, 1.0), peak_bytes=0)
    rows = summarize([fake("static-fp32", 0, 0.9, 9.0, 1.0), unmeasured])
    cells = [line[7] for line in table_cells(format_table(rows))[2:]]
    assert cells == ["100.0 B", "—"]


def test_a_bar_in_a_controller_name_cannot_add_a_cell():
    rows = summarize([fake("learned:a|b.zip", 0, 0.5, 1.0, None)])
    line = format_table(rows).splitlines()[2]
    assert line.startswith("| learned:a\\|b.zip | 50.00 ± — |")
    table_cells(format_table(rows))  # eleven cells


def test_runs_record_curves_and_traces(results):
    """56 steps, a decision every 5 and at the end (12), an evaluation every second decision (6), the last at the
    end of training: its time is the run's, its metric the final one."""
    assert len(results) == 4
    for run in results:
        assert (run.steps, len(run.trace), len(run.curve)) == (56, 12, 6)
        assert len(run.trace[0]["precisions"]) == len(run.layer_names) == 3
        times = [row["time_s"] for row in run.trace]
        assert times == sorted(times) and times[-1] == run.time_s
        assert [point[0] for point in run.curve] == times[1::2]  # evaluated at every second decision's time
        assert run.final_metric == run.curve[-1][1] and all(0.0 <= point[1] <= 1.0 for point in run.curve)


def test_row_names_are_the_names_the_runs_report(results):
    assert row_names(["fp32", "heuristic"]) == list(dict.fromkeys(r.controller for r in results))
    assert row_names(["bf16", "plain-fp16", "pretrained"]) == ["static-bf16", "plain-fp16", "pretrained"]
    with pytest.raises(ValueError, match="unknown policy 'fp8'"):
        row_names(["fp8"])
    for bad in ("plain-int8", "plain-", "plain-FP32"):  # named as compare refuses them (were returned as rows)
        with pytest.raises(ValueError, match=rf"^unknown plain-loop row '{bad}'; allowed: plain-fp32, plain-bf16"):
            row_names([bad])


def test_json_schema_and_table(results, tmp_path):
    rows = summarize(results, reference="static-fp32")
    path = tmp_path / "out" / "results.json"
    write_json(results, rows, path, task="synthetic", command="test")
    payload = strict_json(path.read_text())
    assert set(payload) == {"meta", "rows", "runs"}
    assert payload["meta"]["task"] == "synthetic" and payload["meta"]["command"] == "test"
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", payload["meta"]["date"])
    assert all(set(row) == SUMMARY_KEYS for row in payload["rows"])
    fields = {field.name for field in dataclasses.fields(RunResult)}
    assert all(set(run) == fields for run in payload["runs"])
    # The values survive the round trip, not only the keys (tuples come back as lists).
    assert payload["rows"] == json.loads(json.dumps(rows))
    assert payload["runs"] == json.loads(json.dumps([dataclasses.asdict(r) for r in results]))
    assert (
        [(run["controller"], run["seed"]) for run in payload["runs"]]
        == [(r.controller, r.seed) for r in results]
        == [("static-fp32", 0), ("static-fp32", 1), ("heuristic", 0), ("heuristic", 1)]
    )
    cells = table_cells(format_table(rows))
    assert [line[0].lstrip("| ") for line in cells[2:]] == ["static-fp32", "heuristic"]
    for line, row in zip(cells[2:], rows, strict=True):
        assert line[1] == f"{100 * row['final_metric_mean']:.2f} ± {100 * row['final_metric_std']:.2f}"
        assert line[5] == f"{100 * row['reach_rate']:.0f}%"


def test_plots_are_written_and_not_empty(results, tmp_path):
    pytest.importorskip("matplotlib")
    from triaccel_rl.plots import plot_comparison

    paths = plot_comparison(results, tmp_path, target=0.8)
    names = {p.name for p in paths}
    assert {"metric_vs_time.png", "memory_vs_time.png", "batch_lr_vs_time.png"} <= names
    assert {"precision_map_static-fp32.png", "precision_map_heuristic.png"} <= names
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    width = {target: _png_size(plot_comparison(results, tmp_path / str(target), target=target)[0])[0]
             for target in (None, 0.8)}  # fmt: skip
    assert width[0.8] > 1.6 * width[None]  # with a target, a second panel zooms in on it


def _png_size(path):
    """(width, height) of a PNG, from its header."""
    header = path.read_bytes()[16:24]
    return int.from_bytes(header[:4], "big"), int.from_bytes(header[4:], "big")


def test_fallbacks_of_a_learned_policy_are_counted():
    from triaccel_rl.policies import HeuristicPolicy, StaticPolicy

    from triaccel_rl.compare import run_controller
    from triaccel_rl.shield import FallbackPolicy, ObservationStats

    # A "learned" policy whose training range is a single point: every real observation is outside it.
    stats = ObservationStats((0.0,) * 43, (0.0,) * 43, 1)
    policy = FallbackPolicy(StaticPolicy("fp32"), HeuristicPolicy(), stats, max_distance=1e-6)
    result = run_controller("synthetic", policy, 0, epochs=1, config=ControllerConfig(interval_steps=5), eval_every=2)
    decisions = len(result.trace) - 1  # the first interval runs before any decision
    assert decisions > 0 and result.fallbacks == decisions
    assert summarize([result])[0]["fallbacks_total"] == decisions
    assert sum(result.fallback_features.values()) == decisions  # each fallback names the feature that caused it
    assert result.fallback_features == policy.fallback_features


def test_observation_stats_name_the_feature_furthest_out():
    from triaccel_rl.shield import ObservationStats

    stats = ObservationStats((0.0, 0.0, 1.0), (1.0, 2.0, 1.0), 10)
    assert stats.worst_feature(np.array([0.5, 1.0, 1.0])) == (0, 0.0)  # inside: distance 0
    assert stats.worst_feature(np.array([1.5, -3.0, 1.0])) == (1, 1.5)  # 3 below a range of width 2
    assert stats.worst_feature(np.array([0.5, 1.0, 1.25])) == (2, 2.5)  # a constant feature counts width 0.1
    assert stats.distance(np.array([1.5, -3.0, 1.0])) == 1.5
    # A NaN lies in no range. Its distance was NaN, and `nan > max_distance` sent it to the learned policy.
    assert stats.worst_feature(np.array([0.5, float("nan"), 1.0])) == (1, float("inf"))


def test_a_nan_observation_or_limit_falls_back_or_is_refused():
    from triaccel_rl.policies import StaticPolicy

    from triaccel_rl.shield import FallbackPolicy, ObservationStats

    stats = ObservationStats((0.0,) * 43, (1.0,) * 43, 10)
    policy = FallbackPolicy(StaticPolicy("fp32"), StaticPolicy("bf16"), stats)
    observation = np.full(43, 0.5)
    inside, _ = policy.predict(observation)
    observation[3] = np.nan
    outside, _ = policy.predict(observation)
    assert policy.fallbacks == 1 and not np.array_equal(inside, outside)
    assert np.array_equal(outside, StaticPolicy("bf16").predict(observation)[0])
    with pytest.raises(ValueError, match="max_distance=nan must be positive"):  # nothing would ever fall back
        FallbackPolicy(StaticPolicy("fp32"), StaticPolicy("bf16"), stats, max_distance=float("nan"))


def test_time_cap_stops_a_run_early():
    from triaccel_rl.compare import run_controller

    config = ControllerConfig(interval_steps=2)
    full = run_controller("synthetic", "fp32", 0, epochs=1, config=config, device="cpu")
    capped = run_controller("synthetic", "fp32", 0, epochs=1, config=config, device="cpu", max_time_s=full.time_s / 4)
    assert capped.time_s >= full.time_s / 4  # stops at the first decision past the cap
    assert capped.steps < full.steps
    assert capped.final_metric == capped.curve[-1][1]  # the stopped run is still evaluated
    with pytest.raises(ValueError, match="max_time_s=0"):
        run_controller("synthetic", "fp32", 0, config=config, device="cpu", max_time_s=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"max_time_s": "5"}, ValueError, r"^max_time_s='5' must be a positive number of seconds \(or None"),
        ({"epochs": "1"}, ValueError, r"^epochs='1' must be a positive finite number"),
        ({"epochs": True}, ValueError, r"^epochs=True must be a positive finite number"),
        ({"schedule": "no"}, TypeError, r"^schedule='no' must be True or False"),
    ],
)
def test_a_rows_settings_of_the_wrong_type_are_refused_by_name(kwargs, error, message):
    """A string cap or epoch count raised a bare TypeError from a comparison, True trained one epoch, and
    ``schedule="no"`` was taken as True."""
    with pytest.raises(error, match=message):
        run_controller("synthetic", "fp32", 0, device="cpu", **kwargs)


def test_a_rows_gradient_clipping_reaches_its_updates():
    config = ControllerConfig(interval_steps=2)
    common = {"epochs": 0.5, "config": config, "device": "cpu", "eval_every": 1}
    free = run_controller("synthetic", "fp32", 0, **common)
    loose = run_controller("synthetic", "fp32", 0, max_grad_norm=1e6, **common)  # never binds: the same run
    tight = run_controller("synthetic", "fp32", 0, max_grad_norm=1e-3, **common)  # binds at every step
    assert loose.curve == free.curve
    assert tight.curve != free.curve
    for bad in (0, float("inf")):  # one rule with Controller's and run_plain's (check_max_grad_norm)
        with pytest.raises(ValueError, match=f"max_grad_norm={bad} must be a positive finite number"):
            run_controller("synthetic", "fp32", 0, max_grad_norm=bad, **common)


def test_static_rows_keep_their_batch_and_lr_scale():
    """A static row takes no decisions: the LR multiplier and batch it starts with hold to the end."""
    from triaccel_rl.compare import run_controller

    config = ControllerConfig(interval_steps=2)
    result = run_controller(
        "synthetic", "bf16", 0, epochs=0.5, config=config, device="cpu", batch_size=32, lr_scale=2.0
    )
    assert {row["lr_scale"] for row in result.trace} == {2.0}
    assert {row["batch_size"] for row in result.trace} == {32}
    assert (result.lr_changes, result.batch_changes, result.precision_changes) == (0, 0, 0)


def test_an_adaptive_rows_starting_lr_scale_is_its_neutral_rung_and_reported_as_given(tmp_path):
    """lr_scale=0.5 goes into the heuristic's base LR: the same LR as a static x0.5 row, its ladder at its x1 rung.

    Given x0.5 as its multiplier, the heuristic took it for a rung it had lowered and climbed back to x1 while the
    loss fell (H200, 2026-12-02). The multiplier reported (trace, curve, TensorBoard, so the plots' LR panel) is on
    the task's base LR in both rows: before, the heuristic reported its rung (1.0) beside the static row's 0.5, a
    2x difference at one LR.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = ControllerConfig(interval_steps=2)
    static = run_controller("synthetic", "bf16", 0, epochs=0.5, config=config, device="cpu", lr_scale=0.5)
    adaptive = run_controller("synthetic", "heuristic", 0, epochs=0.5, config=config, device="cpu", lr_scale=0.5,
                              log_dir=tmp_path)  # fmt: skip
    first_static, first_adaptive = static.trace[0], adaptive.trace[0]
    assert (first_static["lr_scale"], first_adaptive["lr_scale"]) == (0.5, 0.5)
    assert first_adaptive["lr"] == pytest.approx(first_static["lr"], rel=1e-6)
    assert (static.curve[0][3], adaptive.curve[0][3]) == (0.5, 0.5)
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [e.value for e in events.Scalars("controller/lr_scale")] == [p[3] for p in adaptive.curve]  # 0.5 exact
    assert max(row["lr_scale"] for row in adaptive.trace) <= 0.5  # never above the LR it was given


def test_compare_takes_a_task_with_its_base_lr_overridden():
    """``experiments/transfer.py --lr-factor``: every row of the comparison trains at the overridden base LR."""
    from dataclasses import replace

    from triaccel_rl.tasks import get_task

    task = get_task("synthetic")
    slower = replace(task, base_lr=task.base_lr / 4)
    config = ControllerConfig(interval_steps=4)
    runs = compare(slower, ["bf16", "heuristic"], [0], epochs=0.2, config=config, device="cpu", show_progress=False)
    assert [run.trace[0]["lr"] for run in runs] == pytest.approx([task.base_lr / 4] * 2)


def test_annealing_on_the_deep_ladder_steps_down_through_the_shields_clamp():
    """A cut at every decision (a plateau of 99%, from the start) on a ladder down to x0.25, in a real run.

    The executor clamps each decision's LR change to x1.5, so x0.5 -> x0.25 arrives as x1/3 and then x0.25: the rule
    reads the clamped LR as its nearest rung (the GPU rows ``heuristic-anneal5-i1-deep``: x0.75, x0.5, x0.33, x0.25).
    """
    rules = HeuristicConfig(anneal_plateau=0.99, anneal_after=0.0)
    ladder = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
    config = ControllerConfig(interval_steps=2, max_interval_factor=1, lr_scales=ladder, heuristic=rules)
    result = run_controller("synthetic", "heuristic-second-order", 0, epochs=0.25, config=config, device="cpu")
    scales = [row["lr_scale"] for row in result.trace]
    assert len(scales) >= 6
    assert scales[:6] == pytest.approx([1.0, 0.75, 0.5, 1 / 3, 0.25, 0.25])
    assert set(scales[4:]) == {0.25}  # the foot holds to the end
    assert result.lr_changes == 4


@pytest.mark.parametrize("controller", ["fp32", "heuristic"])
def test_evaluation_at_fixed_steps_is_independent_of_the_decision_interval(controller):
    """eval_every_steps=3 with decisions every 5 steps: evaluations at steps 3, 6, 9, ... and at the end."""
    from triaccel_rl.compare import run_controller

    config = ControllerConfig(interval_steps=5)
    result = run_controller("synthetic", controller, 0, epochs=1, config=config, device="cpu", eval_every_steps=3)
    by_decisions = run_controller("synthetic", controller, 0, epochs=1, config=config, device="cpu", eval_every=1)
    steps = result.steps
    assert steps == by_decisions.steps and steps % 3 and steps % 5  # both remainders exercise the final interval
    assert len(result.curve) == steps // 3 + 1  # every third step, then the end
    assert len(result.trace) == len(by_decisions.trace) == -(-steps // 5)  # decisions as without eval points
    # The same training: evaluating between decision points changes nothing it learns (profile cost mode).
    assert result.final_metric == by_decisions.final_metric and result.time_s == pytest.approx(by_decisions.time_s)
    with pytest.raises(ValueError, match="eval_every_steps=0 must be >= 1"):
        run_controller("synthetic", controller, 0, config=config, device="cpu", eval_every_steps=0)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"eval_every_steps": 2.5}, r"eval_every_steps=2.5 must be >= 1, a whole number of steps"),
        ({"eval_every_steps": True}, r"eval_every_steps=True must be >= 1, a whole number of steps"),
        ({"eval_every": 1.5}, r"eval_every=1.5 must be >= 1, a whole number of decisions"),
        ({"eval_every": 0}, r"eval_every=0 must be >= 1, a whole number of decisions"),
    ],
)
def test_an_evaluation_spacing_that_is_no_whole_number_is_refused_before_the_run(setting, message, monkeypatch):
    """Before, eval_every_steps=2.5 failed inside the first interval (``range(2.5)``), after the run was built, and
    eval_every=1.5 evaluated at every third decision (the ones ``decision % 1.5 == 0`` happened to pick)."""
    monkeypatch.setattr(TrainingRun, "__init__", lambda *args, **kwargs: pytest.fail("a run was built"))
    with pytest.raises(ValueError, match=message):
        run_controller("synthetic", "fp32", 0, config=ControllerConfig(interval_steps=4), device="cpu", **setting)
    with pytest.raises(ValueError, match=message):
        compare("synthetic", ["fp32"], [0], device="cpu", show_progress=False, **setting)
    from triaccel_rl.compare import _check_run_settings

    assert _check_run_settings(1.0, np.int64(2), np.int64(3), None) is None  # NumPy integers are whole numbers


def test_the_overhead_is_broken_down_by_part():
    config = ControllerConfig(interval_steps=5)
    result = run_controller("synthetic", "heuristic", 0, epochs=1, config=config, device="cpu")
    parts = result.overhead_parts
    assert list(parts) == ["probe", "rollback", "moments", "rounds", "signals", "decision", "other"]
    assert all(value >= 0.0 for value in parts.values())
    assert parts["probe"] > 0 and parts["moments"] > 0 and parts["rounds"] > 0 and parts["decision"] > 0  # all ran
    assert sum(parts.values()) == pytest.approx(result.overhead_frac, rel=1e-9)  # "other" closes the sum
    static = run_controller("synthetic", "bf16", 0, epochs=1, config=config, device="cpu")
    assert static.overhead_parts["rounds"] == 0.0 and static.overhead_parts["decision"] == 0.0  # no rounds, no policy


def test_a_users_plain_loop_is_a_row_of_the_comparison(tmp_path):
    # In measured time (CPU wall time here) a plain fp32 loop trains the same model as the static fp32 row, evaluated
    # at the same steps; its time is its own loop's, and its curve goes to TensorBoard like every row's.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    results = compare(
        "synthetic", ["plain-fp32", "fp32"], [0], epochs=1.0, cost_mode="measured", device="cpu",
        config=ControllerConfig(interval_steps=10), eval_every=2, show_progress=False, log_dir=tmp_path,
    )  # fmt: skip
    plain, static = results
    assert (plain.controller, static.controller) == ("plain-fp32", "static-fp32")
    assert plain.steps == static.steps
    assert [c[1] for c in plain.curve] == [c[1] for c in static.curve] and len(plain.curve) >= 2
    assert plain.time_s > 0 and plain.overhead_frac == 0.0
    for row, result in (("plain-fp32", plain), ("fp32", static)):
        events = EventAccumulator(str(tmp_path / f"{row}-seed0"))
        events.Reload()
        logged = events.Scalars("test/metric_vs_time_us")  # TensorBoard keeps float32 values
        assert [(e.step, e.value) for e in logged] == [(round(1e6 * t), np.float32(m)) for t, m, *_ in result.curve]


@pytest.mark.parametrize(
    "controllers, kwargs, message",
    [
        (
            ["plain-int8"],
            {"cost_mode": "measured"},
            r"unknown plain-loop row 'plain-int8'; allowed: plain-fp32, plain-bf16",
        ),
        (
            ["fp32", "plain-bf16"],
            {},
            r"plain-bf16 measure a plain loop's real time, but this comparison charges modelled",
        ),
    ],
)
def test_plain_rows_are_refused_before_any_run_when_they_cannot_compare(controllers, kwargs, message):
    with pytest.raises(ValueError, match=message):
        compare("synthetic", controllers, [0], device="cpu", show_progress=False, **kwargs)


@pytest.mark.parametrize(("bf16_factor", "faster"), [(0.302, "fp16"), (0.2, "bf16")])
def test_with_profile_cost_the_speed_trial_picks_the_format_the_profile_charges_less(bf16_factor, faster):
    """The CPU protocol's trial reads charged (modelled) time, as the trial on the profile's GPU reads its clock."""
    from triaccel_rl.config import HardwareProfile
    from triaccel_rl.types import Precision

    shipped = HardwareProfile.load()
    profile = HardwareProfile(
        device="test", time_factor={**shipped.time_factor, "bf16": bf16_factor}, memory_factor=shipped.memory_factor
    )  # the shipped H200 profile charges fp16 0.253 and bf16 0.302 of fp32
    config = ControllerConfig(interval_steps=4, heuristic=HeuristicConfig(speed_trial_steps=3))
    result = run_controller("synthetic", "heuristic", 0, epochs=1, config=config, device="cpu", profile=profile)
    assert Precision(int(result.speed_trial["chosen"])).name.lower() == faster
    charged = TrainingRun("synthetic", seed=0, device="cpu", profile=profile)  # the lookup, at the starting batch
    assert result.speed_trial["bf16"] == charged.modelled_step_ms(precision=Precision.BF16)
    assert result.speed_trial["fp16"] == charged.modelled_step_ms(precision=Precision.FP16)
    lowered = {Precision(code).name.lower() for row in result.trace for code in row["precisions"]} - {"fp32"}
    assert lowered == {faster}  # from the first step: the profile is read, no step is spent on a trial
    # The lookup trains nothing: the run is the one that starts in the cheaper format without any trial.
    low = {"start_precision": faster, "use_fp16": faster == "fp16", "speed_trial": False}
    untried = ControllerConfig(interval_steps=4, heuristic=HeuristicConfig(**low))
    plain = run_controller("synthetic", "heuristic", 0, epochs=1, config=untried, device="cpu", profile=profile)
    assert (plain.steps, plain.final_metric, plain.time_s) == (result.steps, result.final_metric, result.time_s)
    measured = run_controller(
        "synthetic", "heuristic", 0, epochs=0.5, config=config, device="cpu", cost_mode="measured"
    )
    assert measured.speed_trial == {}  # a CPU's clock says nothing about a GPU's formats


@pytest.mark.usefixtures("gpu_without_bf16")
def test_on_a_gpu_without_bf16_a_compared_run_starts_and_lowers_in_fp16_without_a_trial():
    """On a V100 or T4 the heuristic's row raised "precision bf16 is not supported" before its first step: it starts in
    bf16 and its speed trial times bf16 first. Simulated: bf16 refused, as ``check_precision_supported`` does there."""
    from triaccel_rl.types import Precision

    config = ControllerConfig(interval_steps=4, heuristic=HeuristicConfig(speed_trial=True, speed_trial_steps=3))
    result = run_controller("synthetic", "heuristic", 0, epochs=0.5, config=config, device="cpu")
    assert result.speed_trial == {}  # one 16-bit format runs: nothing to choose between
    ran = {Precision(code).name.lower() for row in result.trace for code in row["precisions"]}
    assert ran == {"fp16"}  # from the first step, and at every decision


@pytest.mark.usefixtures("gpu_without_bf16")
def test_on_a_gpu_without_bf16_a_static_bf16_row_runs_fp32_and_says_so(caplog):
    from triaccel_rl.types import Precision

    with caplog.at_level("WARNING", logger="triaccel_rl"):
        result = run_controller("synthetic", "static-bf16", 0, epochs=0.25, device="cpu")
    ran = {Precision(code).name.lower() for row in result.trace for code in row["precisions"]}
    assert ran == {"fp32"}
    assert "the static configuration does not run as asked: ran " in caplog.text
    assert "asked for bf16 in fp32: precision bf16 is not supported on Tesla T4" in caplog.text


def test_a_speed_trial_longer_than_the_whole_run_ends_it_cleanly():
    from triaccel_rl.config import HeuristicConfig

    config = ControllerConfig(interval_steps=4, heuristic=HeuristicConfig(speed_trial=True, speed_trial_steps=50))
    result = run_controller("synthetic", "heuristic", 0, epochs=0.2, config=config, device="cpu", cost_mode="measured")
    assert result.steps == 2 * (2 + 50)  # the trial's real steps, and nothing after them
    assert len(result.curve) == 1 and result.curve[0][0] == pytest.approx(result.time_s)  # evaluated at its end


def test_a_diverged_runs_trace_records_no_probe_loss():
    """The signals cap a non-finite probe loss at 1e6 for the observation, and the trace recorded that cap: below a
    diverging run's real finite losses (2e17 seen), so the JSON could not tell divergence from a high loss."""
    from triaccel_rl.tasks import get_task

    task = get_task("synthetic", base_lr=1e8)
    config = ControllerConfig(interval_steps=4, rollback=False)
    result = run_controller(task, "fp32", 0, epochs=0.3, config=config, device="cpu")
    assert result.trace and all(row["probe_loss"] is None for row in result.trace)
    sane = run_controller("synthetic", "fp32", 0, epochs=0.3, config=config, device="cpu")
    assert all(0 < row["probe_loss"] < 10 for row in sane.trace)


def test_tensorboard_holds_the_series_the_json_holds(tmp_path):
    """Every evaluation's point and every decision's trace row, read back from the event file, value for value.

    Before, an evaluation before the first decision (step 3 here, decisions every 5) was missing from TensorBoard,
    the probe loss and memory were logged at evaluations from a stale snapshot, and the time axis was whole
    milliseconds: modelled steps cost a fraction of one, so several evaluations shared a time.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = ControllerConfig(interval_steps=5)
    result = run_controller("synthetic", "heuristic", 0, epochs=0.5, config=config, device="cpu",
                            eval_every_steps=3, log_dir=tmp_path)  # fmt: skip
    events = EventAccumulator(str(tmp_path))
    events.Reload()

    def logged(tag):
        return [(e.step, e.value) for e in events.Scalars(tag)]

    steps = [*range(3, result.steps + 1, 3), *([result.steps] if result.steps % 3 else [])]
    assert len(result.curve) == len(steps) >= 3
    f32 = np.float32  # TensorBoard keeps float32 values
    assert logged("test/metric") == [(s, f32(p[1])) for s, p in zip(steps, result.curve, strict=True)]
    assert logged("test/metric_vs_time_us") == [(round(1e6 * p[0]), f32(p[1])) for p in result.curve]
    for index, tag in enumerate(("controller/batch_size", "controller/lr_scale", "controller/low_precision_share"), 2):
        assert logged(tag) == [(s, f32(p[index])) for s, p in zip(steps, result.curve, strict=True)], tag
    times_us = [step for step, _ in logged("test/metric_vs_time_us")]
    assert times_us == sorted(set(times_us))  # one time per evaluation
    probe = logged("train/probe_loss")
    assert [value for _, value in probe] == [f32(row["probe_loss"]) for row in result.trace]
    assert [value for _, value in logged("memory/peak_bytes")] == [f32(row["memory_bytes"]) for row in result.trace]
    decision_steps = [step for step, _ in probe]
    assert decision_steps == sorted(decision_steps) and decision_steps[-1] == result.steps
    assert len(logged("controller/overhead_frac")) == len(result.trace)


def test_time_to_target_is_the_first_evaluation_at_or_above_it_and_is_kept(monkeypatch):
    """Scripted test metrics 0.5, 0.8 (exactly the target), 0.7, 0.9: reached at the second evaluation, read at its
    time (not interpolated), and kept when the third falls below."""
    from dataclasses import replace

    from triaccel_rl.tasks import get_task

    metrics = iter([0.5, 0.8, 0.7, 0.9, 0.95, 0.95, 0.95])
    monkeypatch.setattr(TrainingRun, "evaluate", lambda self, max_samples=None: next(metrics))
    task = replace(get_task("synthetic"), target_metric=0.8)
    config = ControllerConfig(interval_steps=4)
    result = run_controller(task, "fp32", 0, epochs=0.25, config=config, device="cpu", eval_every_steps=4)
    assert [point[1] for point in result.curve] == [0.5, 0.8, 0.7, 0.9]  # 14 steps: at 4, 8, 12 and the end
    assert result.steps == 14
    assert result.time_to_target_s == result.curve[1][0]
    missed = replace(task, target_metric=0.96)
    metrics = iter([0.5, 0.8, 0.7, 0.9])
    assert run_controller(missed, "fp32", 0, epochs=0.25, config=config, device="cpu",
                          eval_every_steps=4).time_to_target_s is None  # fmt: skip


@pytest.mark.parametrize(("every", "n_points"), [(7, 8), (8, 7), (56, 1)])
def test_evaluations_every_n_steps_that_land_on_the_last_step_evaluate_it_once(every, n_points):
    """56 steps (synthetic, one epoch, batch 64). A static fp32 row's steps all cost the same in profile mode, so
    the k-th evaluation is read at k * every steps' time, and the last step is evaluated once, not twice."""
    config = ControllerConfig(interval_steps=7)
    result = run_controller("synthetic", "fp32", 0, epochs=1, config=config, device="cpu", eval_every_steps=every)
    assert result.steps == 56 and len(result.curve) == n_points == 56 // every
    step_ms = result.mean_step_ms
    times = [point[0] for point in result.curve]
    assert times == pytest.approx([k * every * step_ms / 1e3 for k in range(1, n_points + 1)], rel=1e-12)
    assert times[-1] == result.time_s


def test_the_zoom_panel_leaves_out_a_nan_metric_met_first(tmp_path):
    """A run whose first point's metric is NaN (a result built by hand, or from another source): max() kept the NaN
    met first and the zoom panel's limits raised "Axis limits cannot be NaN or Inf"."""
    pytest.importorskip("matplotlib")
    from triaccel_rl.plots import plot_comparison

    result = fake("static-fp32", 0, 0.7, 1.0, None)
    result.curve = [(0.5, math.nan, 64, 1.0, 0.0), (1.0, 0.7, 64, 1.0, 0.0)]
    result.trace = [{"time_s": 0.5, "batch_size": 64, "lr_scale": 1.0, "memory_bytes": 1 << 20, "precisions": [0]}]
    result.layer_names = ["only"]
    paths = plot_comparison([result], tmp_path, target=0.8)
    assert paths[0].name == "metric_vs_time.png" and paths[0].stat().st_size > 5000


def test_plots_are_written_as_palette_images_close_to_matplotlibs_own(tmp_path, saved_figures):
    """Each PNG holds at most 256 colours (about a third of the bytes: plots are kept in git), and every pixel is within
    16 levels of the RGBA image matplotlib renders, so no line changes colour."""
    pytest.importorskip("matplotlib")
    from PIL import Image

    from triaccel_rl.plots import plot_comparison

    results = [
        fake(name, seed, 0.7 + 0.05 * seed, 1.0 + seed, None)
        for name in ("static-fp32", "heuristic")
        for seed in (0, 1)
    ]
    for result in results:
        result.curve = [(0.5 * k, 0.5 + 0.04 * k, 64, 1.0, 0.0) for k in range(1, 8)]
        result.trace = [
            {"time_s": 0.5, "batch_size": 64, "lr_scale": 1.0, "memory_bytes": 1 << 20, "precisions": [0, 1]}
        ]
        result.layer_names = ["a", "b"]
    for path in plot_comparison(results, tmp_path, target=0.8):
        reference = tmp_path / f"rgba_{path.name}"
        saved_figures[path.name].savefig(reference, format="png", dpi=110, bbox_inches="tight")
        with Image.open(path) as written, Image.open(reference) as rendered:
            assert written.mode == "P", path.name
            drawn = np.asarray(written.convert("RGB"), dtype=np.int16)
            expected = np.asarray(rendered.convert("RGB"), dtype=np.int16)
        assert drawn.shape == expected.shape
        assert np.abs(drawn - expected).max() <= 16, path.name
        assert path.stat().st_size < reference.stat().st_size, path.name


@pytest.mark.parametrize("case", ["many colours", "transparent"])
def test_a_figure_no_palette_holds_is_written_as_matplotlib_renders_it(tmp_path, case):
    """An image of many colours (a review's heat map and 30 lines came 33 levels off in 256) or a transparent background
    (``savefig.transparent``: it was made opaque) is written as matplotlib's own RGBA image, byte for byte."""
    pytest.importorskip("matplotlib")
    from test_shrink_plots import figure

    from triaccel_rl.plots import save_png

    fig = figure(case)
    reference = tmp_path / "reference.png"
    fig.savefig(reference, format="png", dpi=110, bbox_inches="tight")
    written = save_png(fig, tmp_path / "written.png")
    assert written.read_bytes() == reference.read_bytes()


def test_a_plot_write_cut_short_leaves_the_plot_kept_there_whole(monkeypatch, tmp_path):
    """A full disk part-way through the write (plots are kept in git): the old PNG was left empty, unreadable."""
    pytest.importorskip("matplotlib")
    import errno
    import pathlib

    from test_shrink_plots import figure

    from triaccel_rl.plots import save_png

    fig = figure("lines")
    kept = save_png(fig, tmp_path / "metric_vs_time.png")
    before = kept.read_bytes()
    write_bytes = pathlib.Path.write_bytes

    def disk_full(path, data):
        write_bytes(path, data[:200])
        raise OSError(errno.ENOSPC, "No space left on device")

    fig.axes[0].plot([0, 1], [1, 0])
    monkeypatch.setattr(pathlib.Path, "write_bytes", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_png(fig, kept)
    monkeypatch.undo()
    assert kept.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["metric_vs_time.png"]


def test_each_plot_draws_each_runs_own_series(tmp_path, saved_figures):
    """The lines' data, read from the figures before they are saved: each run's curve and trace, in its colour."""
    pytest.importorskip("matplotlib")
    import triaccel_rl.plots as plots

    def run(controller, seed, to_target, shift):
        result = fake(controller, seed, 0.5, 3.0, to_target)
        result.curve = [(1.0 + shift, 0.25, 64, 1.0, 0.0), (2.0 + shift, 0.5, 128, 0.5, 1.0)]
        result.trace = [
            {"time_s": 0.5 + shift, "batch_size": 64, "lr_scale": 1.0, "memory_bytes": 1 << 20, "precisions": [0, 1]},
            {"time_s": 1.5 + shift, "batch_size": 128, "lr_scale": 0.5, "memory_bytes": 3 << 20, "precisions": [2, 0]},
        ]
        result.layer_names = ["first", "second"]
        return result

    results = [run("static-fp32", 1, 2.0, 0.0), run("static-fp32", 0, None, 0.125), run("heuristic", 0, 1.0, 0.25)]
    for row in results[0].trace:  # seed 1's map differs: the heat map is seed 0's
        row["precisions"] = [1, 1]
    plain = run("plain-fp32", 0, None, 0.5)
    plain.trace = []  # a plain loop takes no decisions: no trace, no precision map
    results.append(plain)
    figures = saved_figures
    paths = plots.plot_comparison(results, tmp_path, target=0.4)
    names = ["metric_vs_time.png", "memory_vs_time.png", "batch_lr_vs_time.png"]
    names += ["precision_map_static-fp32.png", "precision_map_heuristic.png"]
    assert [p.name for p in paths] == names == list(figures)
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000

    def series(ax):
        return [(list(line.get_xdata()), list(line.get_ydata()), line.get_color()) for line in ax.get_lines()]

    fp32_colour, heuristic_colour = (figures["metric_vs_time.png"].axes[0].get_lines()[i].get_color() for i in (0, 2))
    assert fp32_colour != heuristic_colour
    plain_colour = figures["metric_vs_time.png"].axes[0].get_lines()[3].get_color()
    colours = [fp32_colour, fp32_colour, heuristic_colour, plain_colour]
    curves = [
        ([p[0] for p in r.curve], [100 * p[1] for p in r.curve], c) for r, c in zip(results, colours, strict=True)
    ]
    whole, zoom = figures["metric_vs_time.png"].axes[:2]
    target_line = ([0, 1], [40.0, 40.0])
    assert series(whole)[:4] == curves and series(whole)[4][:2] == target_line
    markers = [([2.0], [40.0], fp32_colour), ([1.0], [40.0], heuristic_colour)]  # seed 0 of fp32 missed
    assert series(zoom)[:4] == curves and series(zoom)[4][:2] == target_line and series(zoom)[5:] == markers
    (memory,) = figures["memory_vs_time.png"].axes
    memories = [[row["memory_bytes"] / 2**20 for row in r.trace] for r in results]
    times = [[row["time_s"] for row in r.trace] for r in results]
    assert memories[:3] == [[1.0, 3.0]] * 3 and times[3] == memories[3] == []
    assert series(memory) == list(zip(times, memories, colours, strict=True))
    top, bottom = figures["batch_lr_vs_time.png"].axes
    batches = [[row["batch_size"] for row in r.trace] for r in results]
    scales = [[row["lr_scale"] for row in r.trace] for r in results]
    # Each row's setting holds up to its time, the first from 0 (drawn from its time on, it read a decision late).
    starts = [[0.0, *t] if t else [] for t in times]
    batches, scales = ([v[:1] + v for v in values] for values in (batches, scales))
    assert series(top) == list(zip(starts, batches, colours, strict=True))
    assert series(bottom) == list(zip(starts, scales, colours, strict=True))
    assert [line.get_drawstyle() for line in top.get_lines()] == ["steps-pre"] * 4
    for name, first_seed in (("static-fp32", results[1]), ("heuristic", results[2])):
        image = figures[f"precision_map_{name}.png"].axes[0].get_images()[0]
        assert image.get_array().tolist() == [[0, 2], [1, 0]]  # layers x decisions, of the first seed's run
        assert first_seed.seed == 0
    legend = [t.get_text() for t in whole.get_legend().get_texts()]
    assert legend == ["static-fp32", "heuristic", "plain-fp32", "target 40.0%"]  # a controller once, at its first seed


def test_results_written_through_a_symlink_go_to_its_file(tmp_path):
    """The write-beside-and-move replaced the link with a file; the results it pointed to stayed as they were."""
    runs = [fake("a", 0, 0.9, 1.0, 0.5)]
    real = tmp_path / "results" / "r.json"
    real.parent.mkdir()
    real.write_text("{}")
    link = tmp_path / "latest.json"
    link.symlink_to(real)
    write_json(runs, summarize(runs), link, task="synthetic")
    assert link.is_symlink() and strict_json(real.read_text())["meta"]["task"] == "synthetic"


def test_the_zoom_panel_shows_the_runs_when_all_are_far_short_of_the_target(tmp_path, monkeypatch):
    """Its range was fixed at the target less 3 points: runs at 55% for a target of 80% left it empty."""
    pytest.importorskip("matplotlib")
    import triaccel_rl.plots as plots

    result = fake("static-fp32", 0, 0.55, 3.0, None)
    result.curve = [(1.0, 0.50, 64, 1.0, 0.0), (2.0, 0.55, 64, 0.5, 1.0)]
    figures = {}
    real_save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.setdefault(path.name, fig) and real_save(fig, path))
    plots.plot_comparison([result], tmp_path, target=0.8)
    zoom = figures["metric_vs_time.png"].axes[1]
    assert zoom.get_ylim() == pytest.approx((54.0, 80.5))


def test_the_table_shows_the_time_interval_and_the_ratios_to_the_reference_it_names():
    """The bootstrap interval and the ratios were in the JSON only: the printed table was the same whatever
    ``--reference`` was."""
    runs = [fake("ref", seed, 0.9, t, t / 2) for seed, t in enumerate((10.0, 12.0))]
    runs += [fake("fast", seed, 0.9, t, t / 2) for seed, t in enumerate((5.0, 7.0))]
    rows = summarize(runs, reference="ref")
    cells = table_cells(format_table(rows, reference="ref"))
    assert cells[0][3] == "time 95% CI" and cells[0][-1] == "vs ref (time / to target) |"
    low, high = rows[1]["time_s_ci95"]
    assert (low, high) == (5.0, 7.0)  # two seeds: the bootstrap means lie between them
    assert cells[3][3] == "5–7" and cells[3][-1] == "0.55 / 0.55 |"  # 6 / 11 and 3 / 5.5
    assert cells[2][-1] == "1.00 / 1.00 |"


def test_a_decision_is_charged_before_the_steps_it_precedes(monkeypatch):
    """In measured mode a decision's cost was charged at the next snapshot: the evaluations between the two read times
    without it (with a 0.5 s decision: +0.003 s at the evaluation after it, +0.5 s three evaluations later)."""
    import time as time_module

    import triaccel_rl.policies.heuristic as heuristic_module

    from triaccel_rl.compare import run_controller
    from triaccel_rl.tasks import get_task

    predict = heuristic_module.HeuristicPolicy.predict

    def slow(self, *args, **kwargs):
        time_module.sleep(0.25)  # a dear decision: the accounting, not the speed, is under test
        return predict(self, *args, **kwargs)

    monkeypatch.setattr(heuristic_module.HeuristicPolicy, "predict", slow)
    task = get_task("synthetic", n_train=2048, n_test=512)
    result = run_controller(task, "heuristic", 0, epochs=0.5, config=ControllerConfig(interval_steps=8),
                            device="cpu", cost_mode="measured", eval_every_steps=2, batch_size=64)  # fmt: skip
    decided = result.trace[0]["time_s"]
    after = next(point[0] for point in result.curve if point[0] > decided)
    assert after - decided >= 0.25


def test_a_runs_final_evaluation_shows_on_the_bar_and_leaves_its_postfix_as_it_was():
    """A disabled bar (no ``postfix``) crashed the final evaluation after the whole run; an enabled one gained a
    ", final evaluation" a run, piling up across runs sharing it. The count read 0.0/0.0 epochs for 0.002."""
    from tqdm import tqdm

    from triaccel_rl.compare import run_controller

    with tqdm(total=0.2, disable=True) as off:
        result = run_controller("synthetic", "fp32", seed=0, epochs=0.1, progress=off)
    assert 0.0 <= result.final_metric <= 1.0
    shown = []
    with tqdm(total=0.2, file=io.StringIO()) as bar:
        bar.set_postfix_str("fp32 seed 0")
        real = bar.set_postfix_str
        bar.set_postfix_str = lambda text, refresh=True: (shown.append(text), real(text, refresh))[1]
        for _ in range(2):
            run_controller("synthetic", "fp32", seed=0, epochs=0.1, progress=bar)
        assert bar.postfix == "fp32 seed 0"
    assert shown == ["fp32 seed 0, final evaluation", "fp32 seed 0"] * 2


def test_a_policy_object_run_twice_reports_each_runs_fallbacks_and_starts_as_given():
    """One policy object passed to two runs: its fallback counters are cumulative (the second run reported both runs'),
    and a speed trial's choice (fp16 here) changed the start precision of the next run."""
    from triaccel_rl.policies import HeuristicPolicy, StaticPolicy

    from triaccel_rl.compare import run_controller
    from triaccel_rl.shield import FallbackPolicy, ObservationStats
    from triaccel_rl.types import Precision

    config = ControllerConfig(interval_steps=5)
    stats = ObservationStats((0.0,) * 43, (0.0,) * 43, 1)  # every observation falls back

    def learned():
        return FallbackPolicy(StaticPolicy("fp32"), HeuristicPolicy(), stats, max_distance=1e-6)

    shared = learned()
    reused = [run_controller("synthetic", shared, seed, epochs=0.5, config=config, eval_every=2) for seed in (0, 1)]
    fresh = [run_controller("synthetic", learned(), seed, epochs=0.5, config=config, eval_every=2) for seed in (0, 1)]
    assert [r.fallbacks for r in reused] == [r.fallbacks for r in fresh] and fresh[1].fallbacks > 0
    assert [r.fallback_features for r in reused] == [r.fallback_features for r in fresh]
    assert shared.fallbacks == fresh[0].fallbacks + fresh[1].fallbacks  # the object's own count is cumulative

    heuristic = HeuristicPolicy(config=config)
    assert (heuristic.initial_precision, heuristic.low_precision) == (Precision.BF16, Precision.BF16)
    trial = run_controller("synthetic", heuristic, 0, epochs=0.2, config=config, cost_mode="profile")
    assert trial.speed_trial["chosen"] == float(Precision.FP16)  # the profile prices fp16 cheaper
    assert (heuristic.initial_precision, heuristic.low_precision) == (Precision.BF16, Precision.BF16)  # as given
    after = run_controller("synthetic", heuristic, 0, epochs=0.2, config=config, cost_mode="measured")
    assert after.trace[0]["precisions"] == [int(Precision.BF16)] * len(after.trace[0]["precisions"])

    class Wrapped:  # a user's wrapper delegating through properties (their values were not read back, in review)
        def __init__(self, inner):
            self.inner, self.name = inner, "wrapped"

        def predict(self, *args, **kwargs):
            return self.inner.predict(*args, **kwargs)

        def wants_speed_trial(self, known):
            return self.inner.wants_speed_trial(known)

        def choose_low_precision(self, step_ms):
            return self.inner.choose_low_precision(step_ms)

        initial_precision = property(lambda self: self.inner.initial_precision)
        low_precision = property(lambda self: self.inner.low_precision)

        @initial_precision.setter
        def initial_precision(self, precision):
            self.inner.initial_precision = precision

        @low_precision.setter
        def low_precision(self, precision):
            self.inner.low_precision = precision

    wrapped = Wrapped(HeuristicPolicy(config=config))
    run_controller("synthetic", wrapped, 0, epochs=0.2, config=config, cost_mode="profile")
    assert (wrapped.initial_precision, wrapped.low_precision) == (Precision.BF16, Precision.BF16)


def test_a_policy_object_run_again_warns_of_its_first_fallback_again(caplog):
    """The spell out of distribution carried over: the second run's fallbacks were logged at debug level only."""
    from triaccel_rl.policies import HeuristicPolicy, StaticPolicy

    from triaccel_rl.compare import run_controller
    from triaccel_rl.shield import FallbackPolicy, ObservationStats

    config = ControllerConfig(interval_steps=5)
    stats = ObservationStats((0.0,) * 43, (0.0,) * 43, 1)
    policy = FallbackPolicy(StaticPolicy("fp32"), HeuristicPolicy(), stats, max_distance=1e-6)
    warned = []
    for seed in (0, 1):
        caplog.clear()
        with caplog.at_level("WARNING", logger="triaccel_rl"):
            run_controller("synthetic", policy, seed, epochs=0.5, config=config, eval_every=2)
        warned.append(sum("outside the policy's training data" in r.getMessage() for r in caplog.records))
    assert warned == [1, 1]


@pytest.mark.parametrize("total", [None, 6 * 0.013])
def test_the_progress_bar_gives_each_run_its_share_and_takes_a_bar_without_total(monkeypatch, total):
    """Whole steps train past a fractional budget: each run's overshoot took later runs' share (the sixth run started
    at 100%); and a bar without a total (a counter) raised TypeError at the first interval."""
    from tqdm import tqdm

    import triaccel_rl.compare as compare_module

    starts = []
    real = compare_module.run_controller

    def recorded(task, controller, seed, *, progress=None, **kwargs):
        starts.append(progress.n)
        return real(task, controller, seed, progress=progress, **kwargs)

    monkeypatch.setattr(compare_module, "run_controller", recorded)
    config = ControllerConfig(interval_steps=5)
    compare("synthetic", ["fp32"], list(range(6)), epochs=0.013, config=config, show_progress=True, eval_every=2)
    assert starts == pytest.approx([seed * 0.013 for seed in range(6)], abs=1e-12)
    with tqdm(total=total) as bar:
        real("synthetic", "fp32", 0, epochs=0.013, config=config, eval_every=2, progress=bar)
        assert bar.n == pytest.approx(0.013, abs=1e-12)


def test_an_epoch_budget_over_no_training_samples_is_refused_by_name():
    """A task whose probe batch holds every sample: ``check_epoch_budget`` raised a ZeroDivisionError in its message."""
    with pytest.raises(ValueError, match=r"the task has 0 training samples \(those the probe batch leaves\)"):
        check_epoch_budget(0.5, 0)
    check_epoch_budget(0.5, 2)  # one sample: enough


def test_results_are_not_moved_over_a_file_that_is_not_a_regular_one(tmp_path, capsys):
    """``compare --out /dev/null`` was accepted and the results moved over the device (as root, the system's
    /dev/null), a ``/dev/null.partial.json`` beside it; and ``--out slash/results/`` written as a file named results.
    A FIFO stands in for the device."""
    import os
    import stat

    from triaccel_rl.cli import main

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    runs = [fake("a", 0, 0.9, 1.0, 0.5)]
    with pytest.raises(ValueError, match=rf"^{fifo}: is not a regular file \(a device, a FIFO or a socket\)"):
        write_json(runs, summarize(runs), fifo, task="synthetic")
    # A reader held open, so that the old writability probe (an open for writing) returned instead of waiting for one.
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        for out in (str(fifo), f"{tmp_path}/slash/results/"):
            argv = ["compare", "--task", "synthetic", "--controllers", "fp32", "--seeds", "1", "--epochs", "0.25"]
            assert main([*argv, "--out", out, "--log-dir", "", "--no-progress"]) == 2
            refusal = "is not a regular file" if out == str(fifo) else "is a folder; give a file path such as"
            assert f"--out {out}: {refusal}" in capsys.readouterr().err
    finally:
        os.close(reader)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]  # no results, partial file or folder made


def test_plots_leave_the_process_backend_and_its_open_figures_alone(tmp_path):
    """``plot_comparison`` switched the process to Agg for good (``matplotlib.use("Agg")``), closing the figures
    open in pyplot: a notebook's inline backend, or a desktop's windows, were gone after it. "svg" stands in for the
    user's backend."""
    matplotlib = pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from triaccel_rl.plots import plot_comparison

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        mine = plt.figure()
        run = dataclasses.replace(
            fake("static-fp32", 0, 0.9, 1.0, 0.5),
            curve=[(0.5, 0.85, 64, 1.0, 0.0), (1.0, 0.9, 64, 1.0, 0.0)],
            trace=[{"time_s": 1.0, "batch_size": 64, "lr_scale": 1.0, "memory_bytes": 1 << 20, "precisions": [0]}],
            layer_names=["fc"],
        )
        paths = plot_comparison([run], tmp_path, target=0.8)
        assert matplotlib.get_backend() == "svg" and plt.get_fignums() == [mine.number]
        assert [p.read_bytes()[:8] for p in paths] == [b"\x89PNG\r\n\x1a\n"] * 4  # PNGs still, whatever the backend
        plt.close(mine)
    finally:
        matplotlib.use(before)


def test_with_a_speed_trial_every_row_is_evaluated_at_the_same_steps(monkeypatch):
    """``eval_every_steps`` evaluated an adaptive row with a measured speed trial (the default on a GPU) at other
    steps: its trial's chunks ran uncut past the evaluation steps, then one more step was trained (fp32 at 5, 10, 15,
    20, ..., the heuristic at 21, 25, ...), so the rows read time to target at different steps."""
    seen = []
    evaluate = TrainingRun.evaluate
    monkeypatch.setattr(
        TrainingRun, "evaluate", lambda self, *a, **k: seen.append(self.steps) or evaluate(self, *a, **k)
    )
    # The trial forced on (a CPU's clock is not asked): 2 formats x (2 warm-up + 3 timed) steps, evaluations every 3.
    config = ControllerConfig(interval_steps=4, heuristic=HeuristicConfig(speed_trial=True, speed_trial_steps=3))
    steps, curves = {}, {}
    for controller in ("fp32", "heuristic"):
        seen.clear()
        result = run_controller(
            "synthetic",
            controller,
            0,
            epochs=0.25,
            config=config,
            device="cpu",
            cost_mode="measured",
            eval_every_steps=3,
        )
        steps[controller], curves[controller] = list(seen), result.curve
    assert set(result.speed_trial) == {"bf16", "fp16", "chosen"}  # the heuristic's trial ran
    assert result.steps == 14 and steps["heuristic"] == steps["fp32"] == [3, 6, 9, 12, 14]
    times = [point[0] for point in curves["heuristic"]]  # each at its own charged time, the trial's steps in it
    assert len(times) == 5 and times == sorted(times) and times[-1] == pytest.approx(result.time_s)


def test_a_policy_zip_named_plain_is_a_policy_not_a_plain_loop(tmp_path, monkeypatch):
    """``plain-policy.zip`` was taken for a plain-loop row (a ``plain-`` prefix) and refused as an unknown one."""
    import shutil

    from triaccel_rl.policies import pretrained_policy_path

    from triaccel_rl.shield import obs_stats_path

    shipped = pretrained_policy_path()
    monkeypatch.chdir(tmp_path)
    policy = "plain-policy.zip"  # given as a name in this folder, as on the command line
    shutil.copy(shipped, policy)
    shutil.copy(obs_stats_path(shipped), obs_stats_path(policy))
    assert row_names([policy, "plain-fp32"]) == ["learned:plain-policy.zip", "plain-fp32"]
    (result,) = compare("synthetic", [policy], [0], epochs=0.1, show_progress=False)
    assert result.controller == "learned:plain-policy.zip"


def test_one_controller_or_a_seed_count_not_in_a_list_is_refused_by_name():
    """``compare("synthetic", "fp32", [0])`` read the str as its letters ("unknown policy 'f'"); ``seeds=2`` (the
    CLI's --seeds is a count) failed in a TypeError, 'int' object is not iterable."""
    for call in (lambda: compare("synthetic", "fp32", [0], show_progress=False), lambda: row_names("fp32")):
        with pytest.raises(ValueError, match=r"^controllers='fp32': give a list, e.g. \['fp32'\]$"):
            call()
    with pytest.raises(ValueError, match=r"^seeds=2: give a list such as \[0, 1\]$"):
        compare("synthetic", ["fp32"], 2, show_progress=False)
    with pytest.raises(ValueError, match=r"^seeds=<generator object .*>: give a list such as \[0, 1\]$"):
        compare("synthetic", ["fp32"], (seed for seed in (0, 1)), epochs=1, show_progress=False)  # read up by checks


def test_controllers_given_as_a_generator_are_refused_by_name_before_any_check_reads_them():
    """A generator passed ``check_comparison`` (its first read used it up, so an unknown name went unseen) and
    ``compare`` then failed in a bare TypeError, "object of type 'generator' has no len()"."""
    for call in (
        lambda controllers: check_comparison("synthetic", controllers, [0]),
        lambda controllers: compare("synthetic", controllers, [0], epochs=0.1, show_progress=False),
    ):
        with pytest.raises(ValueError, match=r"^controllers=<generator object .*>: give a list such as \['fp32'"):
            call(name for name in ("fp32", "fp8-bogus"))


@pytest.mark.parametrize("samples", [11488, 3584, 7, 3, 99999])
def test_the_least_epochs_an_error_suggests_are_taken(samples):
    """The hint rounded ``1 / samples`` to the nearest two figures: on mlp-fmnist's 11488 samples it said 8.7e-05,
    which comes to 0.9995 of a sample, and that was refused with the same advice."""
    with pytest.raises(ValueError, match="give at least") as refused:
        check_epoch_budget(0.5 / samples, samples)
    hint = float(str(refused.value).rsplit(" ", 1)[1])
    check_epoch_budget(hint, samples)
    assert hint <= 1.1 / samples


def test_a_bare_learned_policy_runs_its_speed_trial_and_starts_in_fp32():
    """A ``LearnedPolicy`` built directly (not by ``make_policy``) keeps ``initial_precision`` None, the model's own
    fp32: the run's speed trial then set every layer to None, refused ("unknown precision None")."""
    from triaccel_rl.policies import LearnedPolicy, pretrained_policy_path

    policy = LearnedPolicy(pretrained_policy_path())
    result = run_controller("synthetic", policy, 0, epochs=0.2)  # profile cost on a CPU: the trial is a lookup
    assert set(result.speed_trial) == {"bf16", "fp16", "chosen"}
    assert result.trace[0]["precisions"] == [0] * len(result.layer_names)  # fp32 until its first decision
    assert policy.initial_precision is None  # as it was given


def test_a_policys_action_mixing_in_bools_is_refused():
    """``run_controller`` made the policy's list an int64 array before ``decode``: True read as index 1 (LR x0.75 of
    the default ladder), silently, and decode's "True and False are no action indices" never ran."""

    class MixesBools:
        def predict(self, observation, state=None, episode_start=None, deterministic=False):
            return [0, 0, 0, 0, True, 1], None

    with pytest.raises(ValueError, match=r"action \[0, 0, 0, 0, True, 1\] must hold integers; True and False are no"):
        run_controller("synthetic", MixesBools(), 0, epochs=0.2, config=ControllerConfig(interval_steps=5))

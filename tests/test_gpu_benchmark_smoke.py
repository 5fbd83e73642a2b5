"""The GPU benchmark's plumbing on the CPU: grid, rows x 2 seeds, the fp32 cap, JSON schema, plots, merge."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from experiment_scripts import import_experiment, strict_json

from triaccel_rl.experiment import cpu_machine, parse_args

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "gpu_benchmark.py"
ROW_FIELDS = {"model", "controller", "seeds", "time_to_target_s", "final_acc", "peak_bytes", "overhead_frac"}


def run(*args: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _any_threads(device: str) -> str:
    return re.sub(r"\d+ torch threads?", "N torch threads", device)


def test_benchmark_smoke_writes_rows_plots_and_merges(tmp_path):
    out, plots = tmp_path / "bench.json", tmp_path / "the plots"  # a space: the recorded command must quote it
    rows_flag = "fp32,plain-fp32,static-bf16,heuristic"
    common = ["--smoke", "--models", "synthetic", "--epochs", "1", "--seeds", "2", "--interval-steps", "4",
              "--warmup-epochs", "0.2"]  # fmt: skip
    stdout = run(
        *common,
        "--rows", rows_flag,
        "--grid-batches", "32,64", "--grid-lr-scales", "1.0",
        "--out", str(out), "--plots", str(plots),
        cwd=tmp_path,
    )  # fmt: skip
    assert "tuned static setting for synthetic" in stdout and "| heuristic" in stdout
    data = json.loads(out.read_text())
    rows = {row["controller"]: row for row in data["rows"]}
    assert set(rows) == {"fp32", "plain-fp32", "static-bf16", "heuristic"}
    for row in rows.values():
        assert ROW_FIELDS <= set(row)
        assert set(row["time_to_target_s"]) == {"mean", "per_seed"}
        assert (row["peak_bytes"] > 0 or row["controller"].startswith("plain")) and 0 <= row["overhead_frac"] < 1
        # The machine as cpu_machine() names it; its torch threads are the subprocess's, which may differ from this
        # process's (a test before may have set them)
        assert _any_threads(row["device"]) == _any_threads(cpu_machine())
        assert row["command"].startswith("python experiments/gpu_benchmark.py")
        # Runs again as recorded: the flags quoted (a joined argv wrote "--plots  --out" for an empty path) and the
        # paths as given, not a --smoke run's temporary ones
        words = shlex.split(row["command"])
        again = parse_args(gpu_benchmark_module().Args, words[2:])
        assert (again.out, again.plots, again.rows, again.smoke) == (str(out), str(plots), rows_flag, True)
        assert row["commit"] and row["commit"] != "unknown" and len(row["date"]) == len("2026-12-04")
        assert row["peak_nvml_bytes"] is None and row["nvml_scope"] == []  # no NVML reading on a CPU
        assert row["rank"] is None if row["reach_rate"] < 1 else row["rank"] >= 1
    assert rows["heuristic"]["seeds"] == [0, 1] and rows["fp32"]["seeds"] == rows["plain-fp32"]["seeds"] == [0]
    assert [(g["batch"], g["lr_scale"]) for g in data["grid"]] == [(32, 1.0), (64, 1.0)]
    # fp32 x 1 + plain-fp32 x 1 + static-bf16 x 2 + heuristic x 2; neither warm-ups nor grid runs kept as runs
    assert len(data["runs"]) == 6 and all(run["seed"] != 1000 for run in data["runs"])
    assert all(run["model"] == "synthetic" for run in data["runs"])  # merge plots a job's runs per model
    pngs = list((plots / "synthetic").glob("*.png"))
    assert pngs and all(p.stat().st_size > 1000 for p in pngs)

    second = tmp_path / "second.json"
    second_rows = ["plain-fp16", "static-fp16", "heuristic-ramp25"]  # in the order of the ROWS table
    run(*common, "--rows", ",".join(second_rows), "--static", "64,1.0", "--out", str(second), "--plots", "",
        cwd=tmp_path)  # fmt: skip
    second_data = json.loads(second.read_text())
    assert second_data["grid"] == []  # --static skips the grid
    assert [row["controller"] for row in second_data["rows"]] == second_rows
    for result in second_data["runs"]:
        batches = [point["batch_size"] for point in result["trace"]]
        if result["controller"] == "heuristic-ramp25":  # one doubling, at the first decision past 25% of the run
            assert result["batch_changes"] == 1 and batches[0] == 64 and batches[-1] == 128
        else:
            assert result["batch_changes"] == 0 and set(batches) == {64}
    merged = tmp_path / "merged.json"
    merged_plots = tmp_path / "merged_plots"
    run("--merge", f"{out},{second}", "--out", str(merged), "--plots", str(merged_plots), cwd=tmp_path)
    merged_data = json.loads(merged.read_text())
    merged_rows = merged_data["rows"]
    # The runs' traces stay in the job files (the plots below are drawn from them); the rest is merged.
    assert len(merged_data["runs"]) == len(data["runs"]) + len(second_data["runs"])
    assert not any({"trace", "layer_names"} & run.keys() for run in merged_data["runs"])
    assert [run["final_metric"] for run in merged_data["runs"][: len(data["runs"])]] == [
        run["final_metric"] for run in data["runs"]
    ]
    assert [row["controller"] for row in merged_rows] == [*[row["controller"] for row in data["rows"]], *second_rows]
    assert [row["job"] for row in merged_rows] == ["bench"] * len(data["rows"]) + ["second"] * len(second_rows)
    assert {row["epochs"] for row in merged_rows} == {1.0}  # the budget each row ran, recorded by the run itself
    old_row = {k: v for k, v in second_data["rows"][0].items() if k != "epochs"}  # as rows before 2026-12-02 were
    assert gpu_benchmark_module()._row_epochs(old_row) == 1.0  # from the job's command
    assert gpu_benchmark_module()._row_epochs({"controller": "static-fp16-8of12", "command": "x --epochs 12"}) == 8.0
    assert gpu_benchmark_module()._row_epochs({"controller": "static-fp16", "command": "x"}) == 12.0  # the default
    assert gpu_benchmark_module()._row_epochs({"controller": "static-fp16", "command": "x --epochs=8"}) == 8.0
    assert gpu_benchmark_module()._row_epochs({"controller": "heuristic-speed", "command": "x --epochs 10"}) == 10.0
    # One folder of plots per job (only a job's rows shared the machine); none mixing jobs.
    assert sorted(p.name for p in (merged_plots / "synthetic").iterdir()) == ["jobs"]
    for job, controllers in (("bench", set(rows)), ("second", set(second_rows))):
        folder = merged_plots / "synthetic" / "jobs" / job
        assert (folder / "metric_vs_time.png").stat().st_size > 1000
        assert {p.stem.removeprefix("precision_map_") for p in folder.glob("precision_map_*.png")} == controllers


def test_fp32_row_turns_tf32_off_and_restores_it():
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("gpu_benchmark", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_benchmark"] = module  # its dataclasses look their module up while being defined
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules["gpu_benchmark"]
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        with module._true_fp32(True):
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        with module._true_fp32(False):  # other rows keep whatever the user set
            assert torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def gpu_benchmark_module():
    return import_experiment("gpu_benchmark")


def test_every_row_of_the_benchmark_runs(tmp_path):
    """Each row the GPU visits run (scripts/device-visit.sh) goes through once on the CPU: no GPU time lost."""
    gpu_benchmark = gpu_benchmark_module()
    every_row = sorted(gpu_benchmark.rows_for(gpu_benchmark.Args()))
    out = tmp_path / "all_rows.json"
    run("--smoke", "--models", "synthetic", "--epochs", "0.5", "--seeds", "1", "--interval-steps", "4",
        "--warmup-epochs", "0.1", "--static", "64,1.0,0.05", "--rows", ",".join(every_row),
        "--out", str(out), "--plots", "", cwd=tmp_path)  # fmt: skip
    rows = {row["controller"]: row for row in json.loads(out.read_text())["rows"]}
    assert sorted(rows) == every_row
    assert all(0.0 < row["final_acc"]["mean"] <= 1.0 for row in rows.values())
    assert rows["static-fp16-b2x"]["setting"] == {"batch": 128, "lr_scale": 0.5}  # twice the batch, the LR held
    assert rows["static-fp16-lr0.5"]["setting"] == {"batch": 64, "lr_scale": 0.5}
    for row in ("static-fp16-lr1.5", "heuristic-anneal5-i1-deep-lr1.5", "heuristic-anneal5-i1-deep-fp16-lr1.5"):
        assert rows[row]["setting"] == {"batch": 64, "lr_scale": 1.5}, row
    assert (
        rows["heuristic-ramp"]["setting"] == rows["heuristic-ramp"]["static_setting"] == {"batch": 64, "lr_scale": 1.0}
    )
    steps = {run["controller"]: run["steps"] for run in json.loads(out.read_text())["runs"]}
    assert abs(steps["static-fp16-8of12"] - 2 / 3 * steps["static-fp16"]) <= 1  # the two-thirds schedule


def test_the_device_visit_stages_name_only_rows_that_exist():
    """Each ``--rows`` list in device-visit.sh names rows of the script it goes to (the last one named before it)."""
    import re

    gpu_benchmark = gpu_benchmark_module()
    known = {
        "gpu_benchmark": set(gpu_benchmark.rows_for(gpu_benchmark.Args())),
        "bench_compile": set(import_experiment("bench_compile").ROWS),
    }
    script = (SCRIPT.parents[1] / "scripts" / "device-visit.sh").read_text()
    calls = [(m.start(), m.group(1)) for m in re.finditer(r"experiments/(\w+)\.py", script)]
    checked = {name: 0 for name in known}
    for match in re.finditer(r"--rows ([\w.,-]+)", script):
        name = [name for start, name in calls if start < match.start()][-1]
        rows = set(match.group(1).split(","))
        assert name in known, f"device-visit.sh passes --rows to experiments/{name}.py, which this test does not know"
        assert rows <= known[name], f"unknown rows for {name} in device-visit.sh: {rows - known[name]}"
        checked[name] += 1
    assert checked["gpu_benchmark"] >= 4 and checked["bench_compile"] >= 2  # the issue-7 and reduce-overhead stages


def test_rows_with_another_lr_rule_start_at_the_static_rows_lr():
    """``lr_scale`` is on the LR the batch sets by the rule: a ramp row (LR held) must not start lower."""
    gpu_benchmark = gpu_benchmark_module()
    from triaccel_rl.tasks import get_task

    rows = gpu_benchmark.rows_for(gpu_benchmark.Args())
    sgd, adamw = get_task("synthetic"), get_task("transformer-seq")
    assert (sgd.optimizer, adamw.optimizer) == ("sgd", "adamw")
    base = sgd.base_batch_size
    match = gpu_benchmark._start_lr_match
    assert match(sgd, rows["heuristic-ramp"], base) == 1.0  # at the base batch every rule gives the same LR
    assert match(sgd, rows["heuristic-ramp"], 2 * base) == 2.0  # static rows: linear in the batch; ramp: held
    assert match(sgd, rows["heuristic-ramp-linear"], 2 * base) == 1.0
    assert match(sgd, rows["static-fp16"], 4 * base) == 1.0  # the default rule: nothing to match
    assert match(adamw, rows["heuristic-ramp"], 4 * adamw.base_batch_size) == 2.0  # AdamW's default: square root


def test_adaptive_rows_start_at_the_tuned_lr_and_report_it_as_the_static_rows_do(tmp_path):
    """An adaptive row's tuned multiplier goes into the base LR (its ladder moves around it, not up to x1), and its
    reported multiplier is on the task's base LR as the static row's is (before, 1.0 beside 0.5 at one LR)."""
    out = tmp_path / "tuned.json"
    run("--smoke", "--models", "synthetic", "--epochs", "0.5", "--seeds", "1", "--interval-steps", "4",
        "--warmup-epochs", "0", "--static", "128,0.5", "--rows", "static-bf16,heuristic",
        "--out", str(out), "--plots", "", cwd=tmp_path)  # fmt: skip
    runs = {r["controller"]: r for r in json.loads(out.read_text())["runs"]}
    static, heuristic = runs["static-bf16"]["trace"][0], runs["heuristic"]["trace"][0]
    assert (static["lr_scale"], heuristic["lr_scale"]) == (0.5, 0.5)  # the heuristic's x0.5 in its base LR, reported
    assert heuristic["lr"] == pytest.approx(static["lr"], rel=1e-6)  # the same step of the same schedule


def test_the_evaluation_spacing_can_be_set_in_steps(tmp_path):
    out = tmp_path / "eval.json"
    run("--smoke", "--models", "synthetic", "--epochs", "0.5", "--seeds", "1", "--interval-steps", "4",
        "--warmup-epochs", "0", "--static", "64,1.0", "--rows", "static-fp16", "--eval-steps", "3",
        "--out", str(out), "--plots", "", cwd=tmp_path)  # fmt: skip
    (result,) = json.loads(out.read_text())["runs"]
    assert result["steps"] % 3  # the run ends between evaluations: one more at its end
    assert len(result["curve"]) == result["steps"] // 3 + 1  # every third step, not every interval (4)
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--eval-steps", "-1", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, check=False)  # fmt: skip
    assert done.returncode != 0 and "--eval-steps -1 must be >= 0" in done.stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rows", "static-fp16,heuristc"], "--rows: unknown row 'heuristc'; allowed: fp32, plain-bf16"),
        (["--rows", ","], "--rows ',' is empty"),
        (["--models", "resnet18-fmnst"], "--models: unknown task 'resnet18-fmnst'; allowed: "),
        (["--models", ""], "--models '' is empty"),
        (["--models", "synthetic,mlp-fmnist,synthetic"], "--models lists synthetic more than once"),
        (["--seeds", "0"], "--seeds 0 must be >= 1"),
        (["--seeds", "-2"], "--seeds -2 must be >= 1"),
        (["--fp32-seeds", "0"], "--fp32-seeds 0 must be >= 1"),
        (["--interval-steps", "0"], "--interval-steps 0 must be >= 1"),
        (["--epochs", "0"], "--epochs 0.0 must be a positive finite number"),
        (["--epochs", "nan"], "--epochs nan must be a positive finite number"),
        (["--warmup-epochs", "-1"], "--warmup-epochs -1.0 must be a finite number >= 0"),
        (["--static", "512"], "--static '512': expected BATCH,LR_SCALE[,TARGET_S]"),
        (["--static", "512,x"], "--static '512,x': expected BATCH,LR_SCALE[,TARGET_S]"),
        (["--static", "0,0.5"], "--static '0,0.5': expected BATCH,LR_SCALE[,TARGET_S], e.g. 512,0.5,5.4 (a batch"),
        (["--static", "512,0.5,-1"], "(TARGET_S a positive number of seconds)"),
        (["--grid", "256x1.0,512"], "--grid '256x1.0,512': point '512' is not a batch >= 1 and a positive LR scale"),
        (["--grid", "256x-1"], "point '256x-1' is not a batch >= 1"),
        (["--grid-batches", "256,abc"], "point 'abcx0.5' is not a batch >= 1"),
        (["--grid-lr-scales", ""], "no grid point"),
    ],
)
def test_bad_arguments_are_refused_by_name_before_any_run(monkeypatch, argv, message):
    """Before the fix an unknown row was skipped silently, ``--seeds 0`` ran nothing, and a bad model, grid point or
    ``--static`` raised a bare ``ValueError`` (or ``KeyError``) only when its model's turn came."""
    gpu_benchmark = gpu_benchmark_module()

    def no_run(*args, **kwargs):
        raise AssertionError("a run started before the arguments were checked")

    monkeypatch.setattr(gpu_benchmark, "run_controller", no_run)
    monkeypatch.setattr(gpu_benchmark, "run_plain", no_run)
    with pytest.raises(SystemExit) as raised:
        gpu_benchmark.main(gpu_benchmark.parse(["--smoke", "--models", "synthetic", *argv]))
    assert message in str(raised.value)


def test_the_command_line_names_a_bad_row(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--rows", "heuristic,static-bf17"], cwd=tmp_path,
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert done.returncode == 1 and "--rows: unknown row 'static-bf17'" in done.stderr
    assert not (tmp_path / "experiments").exists()  # nothing written


def _job_file(path: Path, models: list[str], name_runs: bool = True) -> Path:
    """A job's results file, as ``main`` writes it: one row per model and controller, one run per row."""
    rows, runs = [], []
    for i, model in enumerate(models):
        for controller in ("static-fp16", "heuristic"):
            rows.append({"model": model, "controller": controller, "target": 0.9, "epochs": 1.0, "command": "x"})
            run = {"controller": controller, "seed": 0, "final_metric": 0.5 + i / 10, "time_s": 1.0, "wall_s": 1.0,
                   "time_to_target_s": None, "peak_bytes": 1, "precision_changes": 0, "batch_changes": 0,
                   "lr_changes": 0, "skipped_steps": 0, "overhead_frac": 0.0, "steps": 10 + i,
                   "trace": [{"batch_size": 64}], "layer_names": ["fc"]}  # fmt: skip
            runs.append({"model": model, **run} if name_runs else run)
    path.write_text(json.dumps({"rows": rows, "grid": [{"model": models[0], "batch": 64}], "runs": runs}))
    return path


def test_merge_takes_a_job_once_and_refuses_two_jobs_of_one_name(tmp_path):
    """Before the fix a job given twice (or beside a merged file that held it) was merged twice: its rows doubled, and
    two different files of one stem were merged as one job, their rows then plotted and read as side by side."""
    gpu_benchmark = gpu_benchmark_module()
    first = _job_file(tmp_path / "job_a.json", ["synthetic"])
    second = _job_file(tmp_path / "job_b.json", ["mlp-fmnist"])
    once = tmp_path / "once.json"
    gpu_benchmark.merge([str(first), str(second)], once)
    expected = json.loads(once.read_text())
    assert [row["job"] for row in expected["rows"]] == ["job_a"] * 2 + ["job_b"] * 2
    assert len(expected["runs"]) == 4 and len(expected["grid"]) == 2
    again = tmp_path / "again.json"
    gpu_benchmark.merge([str(first), str(second), str(first), str(once)], again)  # each job met twice or more
    assert json.loads(again.read_text()) == expected
    other = tmp_path / "other"
    other.mkdir()
    clash = _job_file(other / "job_a.json", ["cnn-fmnist"])  # another job, the same file name
    with pytest.raises(SystemExit, match=r"job 'job_a' in .*other/job_a.json differs from job 'job_a' in"):
        gpu_benchmark.merge([str(first), str(clash)], tmp_path / "clash.json")
    with pytest.raises(SystemExit, match="--merge: no file given"):
        gpu_benchmark.merge([""], tmp_path / "none.json")


def test_merged_plots_draw_each_model_of_a_job_from_its_own_runs(monkeypatch, tmp_path):
    """Before the fix the runs of a job were picked by controller alone: a job of two models (the script's default
    ``--models``) drew both models' runs into each model's plots."""
    import triaccel_rl.plots

    gpu_benchmark = gpu_benchmark_module()
    drawn = {}
    monkeypatch.setattr(
        triaccel_rl.plots,
        "plot_comparison",
        lambda results, folder, target: drawn.setdefault(Path(folder).relative_to(tmp_path / "p").as_posix(), results),
    )
    both = _job_file(tmp_path / "both.json", ["synthetic", "mlp-fmnist"])
    gpu_benchmark.merge([str(both)], tmp_path / "merged.json", plots=str(tmp_path / "p"))
    assert sorted(drawn) == ["mlp-fmnist/jobs/both", "synthetic/jobs/both"]
    assert [r.steps for r in drawn["synthetic/jobs/both"]] == [10, 10]  # that model's two runs, no others
    assert [r.steps for r in drawn["mlp-fmnist/jobs/both"]] == [11, 11]
    # A job file of one model from before runs named theirs: its runs are that model's.
    drawn.clear()
    _job_file(tmp_path / "old.json", ["synthetic"], name_runs=False)
    gpu_benchmark.merge([str(tmp_path / "old.json")], tmp_path / "merged_old.json", plots=str(tmp_path / "p"))
    assert [r.steps for r in drawn["synthetic/jobs/old"]] == [10, 10]
    _job_file(tmp_path / "old2.json", ["synthetic", "mlp-fmnist"], name_runs=False)
    with pytest.raises(SystemExit, match="job 'old2' ran mlp-fmnist, synthetic, but its runs do not name their model"):
        gpu_benchmark.merge([str(tmp_path / "old2.json")], tmp_path / "merged_old2.json", plots=str(tmp_path / "p"))


def test_merging_a_merged_file_again_leaves_its_jobs_plots_as_they_are(monkeypatch, capsys, tmp_path):
    """A merged file's runs have no traces: before the fix, merged again with ``--plots``, its jobs were redrawn from
    them, and the good plots drawn from the job files were overwritten with empty ones."""
    import triaccel_rl.plots

    gpu_benchmark = gpu_benchmark_module()
    drawn = []
    monkeypatch.setattr(
        triaccel_rl.plots, "plot_comparison", lambda results, folder, target: drawn.append(Path(folder).name)
    )
    first = _job_file(tmp_path / "job_a.json", ["synthetic"])
    gpu_benchmark.merge([str(first)], tmp_path / "merged.json", plots=str(tmp_path / "p"))
    assert drawn == ["job_a"]
    drawn.clear()
    second = _job_file(tmp_path / "job_b.json", ["synthetic"])
    capsys.readouterr()
    gpu_benchmark.merge(
        [str(tmp_path / "merged.json"), str(second)], tmp_path / "again.json", plots=str(tmp_path / "p")
    )
    assert drawn == ["job_b"]  # job_a's runs came from the merged file: not redrawn
    assert capsys.readouterr().out.splitlines()[0] == (
        f"plots left as they are (runs without traces, from a merged file) under {tmp_path / 'p'}: synthetic/jobs/job_a"
    )
    merged_rows = json.loads((tmp_path / "again.json").read_text())["rows"]
    assert [row["job"] for row in merged_rows] == ["job_a", "job_a", "job_b", "job_b"]


def test_merge_makes_the_folder_of_out_and_refuses_a_folder_as_out(monkeypatch, capsys, tmp_path):
    """``--merge ... --out sub/merged.json`` raised FileNotFoundError where sub/ did not exist."""
    import runpy

    job = _job_file(tmp_path / "job_a.json", ["synthetic"])
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OUT", raising=False)
    for out in ("sub/deeper/merged.json", "sub"):
        monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--merge", str(job), "--out", out, "--plots", ""])
        if out == "sub":  # now a folder: refused before the merge
            with pytest.raises(SystemExit, match=r"^--out sub: is a folder; give a file path such as sub/gpu_bench"):
                runpy.run_path(str(SCRIPT), run_name="__main__")
        else:
            runpy.run_path(str(SCRIPT), run_name="__main__")
            assert [row["job"] for row in json.loads(Path(out).read_text())["rows"]] == ["job_a"] * 2
    assert capsys.readouterr().out == "merged 2 rows of 1 jobs from 1 files into sub/deeper/merged.json\n"


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("{tmp}/outdir", "--out {tmp}/outdir: is a folder; give a file path such as {tmp}/outdir/gpu_benchmark.json"),
        ("", "--out '': is empty; give a file path such as gpu_benchmark.json"),
        ("$OUT:outdir", "--out {tmp}/device_out/outdir: is a folder; give a file path such as "),
    ],
)
def test_an_unusable_out_is_refused_before_any_run(monkeypatch, tmp_path, out, message):
    """Before the fix a folder as ``--out`` raised IsADirectoryError after every row had run."""
    gpu_benchmark = gpu_benchmark_module()
    (tmp_path / "outdir").mkdir()
    (tmp_path / "device_out" / "outdir").mkdir(parents=True)
    monkeypatch.delenv("OUT", raising=False)
    if out.startswith("$OUT:"):  # on the GPU machine the file goes under $OUT, by its name
        monkeypatch.setenv("OUT", str(tmp_path / "device_out"))
        out = out.removeprefix("$OUT:")

    def no_run(*args, **kwargs):
        raise AssertionError("a run started before the arguments were checked")

    monkeypatch.setattr(gpu_benchmark, "run_controller", no_run)
    monkeypatch.setattr(gpu_benchmark, "run_plain", no_run)
    args = ["--smoke", "--models", "synthetic", "--rows", "static-bf16", "--out", out.format(tmp=tmp_path)]
    with pytest.raises(SystemExit) as raised:
        gpu_benchmark.main(gpu_benchmark.parse(args))
    assert str(raised.value).startswith(message.format(tmp=tmp_path))


def test_a_diverged_runs_probe_losses_are_written_as_null(monkeypatch, tmp_path):
    """A run whose probe loss went NaN (a diverged fp16 row; the job files under experiments/results hold 665) is
    written as strict JSON, the partial file too, the loss as null. Before, ``json.dumps`` wrote ``NaN``."""
    import math

    from triaccel_rl.compare import RunResult

    gpu_benchmark = gpu_benchmark_module()
    out = tmp_path / "diverged.json"
    partial = out.with_suffix(".partial.json")
    kept = []  # the partial file as the second run starts (removed once the results are written)

    def diverged(task, controller, seed, **kwargs):
        if partial.exists():
            kept.append(partial.read_text())
        trace = [{"time_s": 0.5, "batch_size": 64, "lr_scale": 1.0, "memory_bytes": 1, "probe_loss": math.nan,
                  "precisions": [2]}]  # fmt: skip
        return RunResult(controller=controller, seed=seed, final_metric=0.1, time_s=1.0, wall_s=1.0,
                         time_to_target_s=None, peak_bytes=1, precision_changes=0, batch_changes=0, lr_changes=0,
                         skipped_steps=3, overhead_frac=0.0, steps=8, trace=trace, layer_names=["fc"])  # fmt: skip

    monkeypatch.setattr(gpu_benchmark, "run_controller", diverged)
    monkeypatch.delenv("OUT", raising=False)
    gpu_benchmark.main(gpu_benchmark.parse(["--smoke", "--models", "synthetic", "--seeds", "2", "--warmup-epochs", "0",
                                            "--static", "64,1.0", "--rows", "static-fp16", "--out", str(out),
                                            "--plots", ""]))  # fmt: skip
    for text, runs in ((out.read_text(), 2), *((text, 1) for text in kept)):
        assert [run["trace"][0]["probe_loss"] for run in strict_json(text)["runs"]] == [None] * runs
    assert len(kept) == 1


def test_the_partial_file_is_cleared_at_the_start_and_removed_after_the_results(monkeypatch, tmp_path):
    """``<out>.partial.json`` keeps the finished runs while a job runs. Before the fix it stayed beside the results
    after a job that finished, and an earlier job's was left in place until the new job's first run replaced it."""
    gpu_benchmark = gpu_benchmark_module()
    out = tmp_path / "out.json"
    partial = out.with_suffix(".partial.json")
    partial.write_text('{"rows": [], "grid": [], "runs": [{"model": "an earlier job", "seed": 7}]}\n')
    real = gpu_benchmark.run_controller
    seen = []  # the partial file's runs as each run starts (None: no file)

    def spy(*args, **kwargs):
        seen.append([run["seed"] for run in json.loads(partial.read_text())["runs"]] if partial.exists() else None)
        return real(*args, **kwargs)

    monkeypatch.setattr(gpu_benchmark, "run_controller", spy)
    monkeypatch.delenv("OUT", raising=False)
    gpu_benchmark.main(gpu_benchmark.parse(["--smoke", "--models", "synthetic", "--epochs", "0.2", "--seeds", "2",
                                            "--interval-steps", "5", "--warmup-epochs", "0", "--static", "64,1.0",
                                            "--rows", "static-fp16", "--out", str(out), "--plots", ""]))  # fmt: skip
    assert seen == [None, [0]]  # the earlier job's file gone before the first run; the first run kept during the next
    assert [run["seed"] for run in json.loads(out.read_text())["runs"]] == [0, 1] and not partial.exists()


def test_the_grid_warms_up_each_batch_and_the_static_row_reruns_its_first_seed(monkeypatch, tmp_path):
    """Before the fix the grid's points ran cold: the first point at each batch paid the one-time costs (cuDNN's
    tuning, Triton's compilation) in its time to target, which skewed the grid's choice, and the best point's run was
    copied in as ``static-bf16``'s seed 0, the one seed of a row that carried them (``Args.warmup_epochs``)."""
    gpu_benchmark = gpu_benchmark_module()
    real = gpu_benchmark.run_controller
    calls = []  # (seed, batch, lr_scale, epochs) of each run, in order

    def spy(task, controller, seed, **kwargs):
        calls.append((seed, kwargs["batch_size"], kwargs["lr_scale"], kwargs["epochs"]))
        return real(task, controller, seed, **kwargs)

    monkeypatch.setattr(gpu_benchmark, "run_controller", spy)
    monkeypatch.delenv("OUT", raising=False)
    out = tmp_path / "grid.json"
    (row,) = gpu_benchmark.main(gpu_benchmark.parse([
        "--smoke", "--models", "synthetic", "--epochs", "0.2", "--seeds", "2", "--interval-steps", "5",
        "--warmup-epochs", "0.1", "--grid", "32x1.0,32x2.0,64x1.0", "--rows", "static-bf16",
        "--out", str(out), "--plots", "",
    ]))  # fmt: skip
    best = row["static_setting"]["batch"], row["static_setting"]["lr_scale"]
    assert calls == [
        (1000, 32, 1.0, 0.1), (0, 32, 1.0, 0.2), (0, 32, 2.0, 0.2),  # one warm-up per batch, before its first point
        (1000, 64, 1.0, 0.1), (0, 64, 1.0, 0.2),
        (1000, *best, 0.1), (0, *best, 0.2), (1, *best, 0.2),  # the row: its warm-up, then every seed, 0 included
    ]  # fmt: skip
    assert [run["seed"] for run in json.loads(out.read_text())["runs"]] == [0, 1]


def test_merge_reads_a_job_file_that_holds_nan(tmp_path):
    """A job file written before the results were strict JSON holds ``NaN``: merged, it is null (before, the merged
    file held ``NaN`` too), and the job file beside a merged file that holds it (null there) is one job, taken once."""
    gpu_benchmark = gpu_benchmark_module()
    job = _job_file(tmp_path / "job_nan.json", ["synthetic"])
    data = json.loads(job.read_text())
    data["runs"][0]["overhead_frac"] = float("nan")
    data["runs"][1]["trace"][0]["probe_loss"] = float("nan")
    job.write_text(json.dumps(data))  # as the script wrote it then: NaN, not JSON
    merged = tmp_path / "merged.json"
    gpu_benchmark.merge([str(job), str(job)], merged)
    runs = strict_json(merged.read_text())["runs"]
    assert len(runs) == 2 and runs[0]["overhead_frac"] is None
    again = tmp_path / "again.json"
    gpu_benchmark.merge([str(job), str(merged)], again)  # NaN in one, null in the other: the same job
    assert strict_json(again.read_text()) == strict_json(merged.read_text())


DOCS = ("BENCHMARKS.md", "README.md", "triaccel_rl/pretrained/MODEL_CARD.md")


def _quoted_commands() -> list[tuple[str, str]]:
    """``(where, command)`` for each ``python experiments/...`` or ``triaccel-rl ...`` command the docs quote.

    From code blocks (a trailing backslash joins lines) and inline code (which may wrap); a command ends at a shell
    separator, a redirection or a comment. Commands with a placeholder (``<zip>``, ``F``) are left out.
    """
    import re

    repo = SCRIPT.parents[1]
    commands = []
    for doc in DOCS:
        text = (repo / doc).read_text()
        spans = [block.replace("\\\n", " ") for block in re.findall(r"```[^\n]*\n(.*?)```", text, re.S)]
        spans = [line for block in spans for line in block.splitlines()]
        spans += [
            span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
        ]
        for span in spans:
            for match in re.finditer(r"python3? experiments/\w+\.py|triaccel-rl ", span):
                command = re.split(r"\s(?:;|&&|\||2>&1|#|>)\s?", span[match.start() :])[0].strip()
                if not re.search(r"<|\s(?:F|\S*lrF\S*)(?:\s|$)", command):
                    commands.append((doc, command))
    return commands


class _Parsed(Exception):
    """Raised in place of running a script once its arguments have parsed."""


@pytest.mark.parametrize(("doc", "command"), _quoted_commands(), ids=lambda value: str(value)[:80])
def test_each_command_the_docs_quote_parses_with_todays_scripts(monkeypatch, capsys, doc, command):
    """A reader reproducing a recorded number runs the command as quoted: its flags must still exist (parsing only)."""
    import argparse
    import runpy
    import shlex

    original = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    words = shlex.split(command)
    try:
        if words[0] == "triaccel-rl":
            from triaccel_rl.cli import main

            main(words[1:])
        else:
            monkeypatch.setattr(sys, "argv", words[1:])
            runpy.run_path(str(SCRIPT.parents[1] / words[1]), run_name="__main__")
    except _Parsed:
        return
    except SystemExit:
        pytest.fail(f"{doc}: `{command}` does not parse: {capsys.readouterr().err.strip().splitlines()[-1:]}")
    pytest.fail(f"{doc}: `{command}` ran without parsing any arguments")


def test_the_docs_quote_commands_of_each_kind():
    """The extraction above finds the commands (a regex that matched nothing would pass every parse test)."""
    commands = [command for _, command in _quoted_commands()]
    assert len(commands) >= 40
    for script in ("gpu_benchmark", "transfer", "train_pretrained", "batch_headroom", "controller_loop", "bench_env"):
        assert any(command.startswith(f"python experiments/{script}.py") for command in commands), script
    assert sum(command.startswith("triaccel-rl compare") for command in commands) >= 5


def test_each_device_visit_stage_the_docs_quote_exists():
    """``bash scripts/device-visit.sh COMMIT STAGE...``: an unknown stage would be passed to gpu_benchmark.py."""
    import re

    repo = SCRIPT.parents[1]
    stages = set(re.findall(r"^\s*([\w-]+)\)", (repo / "scripts" / "device-visit.sh").read_text(), re.M))
    quoted = []
    for doc in DOCS:
        text = (repo / doc).read_text().replace("\n", " ")
        for match in re.finditer(r"`(?:bash )?scripts/device-visit\.sh \w+((?: [\w-]+)*)`", text):
            quoted += [word for word in match.group(1).split() if not word.isupper()]  # STAGE: a placeholder
    assert len(quoted) >= 20
    assert set(quoted) <= stages, sorted(set(quoted) - stages)

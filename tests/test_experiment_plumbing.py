"""``triaccel_rl.experiment``: dataclass ``Args`` to flags and back, with each field's docstring as its help."""

import os
import runpy
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from triaccel_rl.experiment import command_line, field_docstrings, parse_args


@dataclass
class Args:
    steps: int = 3
    """Optimiser steps
    per run."""
    tasks: str = "a,b"
    """Comma-separated task names."""
    smoke: bool = False
    """Tiny run."""
    check: bool = True
    """Verify first."""
    lr: float = 0.1


def test_field_docstrings_reads_the_literal_under_each_field_whitespace_collapsed():
    assert field_docstrings(Args) == {
        "steps": "Optimiser steps per run.",
        "tasks": "Comma-separated task names.",
        "smoke": "Tiny run.",
        "check": "Verify first.",
    }


def test_parse_args_defaults_and_every_kind_of_flag():
    assert parse_args(Args, []) == Args()
    got = parse_args(Args, ["--steps", "5", "--tasks", "x y", "--smoke", "--no-check", "--lr", "0.5"])
    assert got == Args(steps=5, tasks="x y", smoke=True, check=False, lr=0.5)


def test_help_shows_each_fields_docstring_and_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(Args, ["--help"], "Runs things.")
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "Runs things." in text
    assert "--steps STEPS Optimiser steps per run. (default: 3)" in text
    assert "--tasks TASKS Comma-separated task names. (default: 'a,b')" in text
    assert "--smoke Tiny run." in text
    assert "--check, --no-check Verify first." in text
    assert "--lr LR (default: 0.1)" in text


def test_help_shows_a_percent_sign_in_a_docstring_or_default(capsys):
    """argparse %-formats each help string: "93% in" raised ``TypeError: %i format: ... not dict`` on ``--help``."""

    @dataclass
    class Percent:
        share: float = 0.5
        """Reached 93% in 5 s; 100%% stays two signs."""
        pattern: str = "50%"
        """A default with a sign."""

    with pytest.raises(SystemExit) as exit_info:
        parse_args(Percent, ["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--share SHARE Reached 93% in 5 s; 100%% stays two signs. (default: 0.5)" in text
    assert "--pattern PATTERN A default with a sign. (default: '50%')" in text


SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.stem)
def test_each_experiment_scripts_help_prints(monkeypatch, capsys, script):
    """``gpu_benchmark.py --help`` raised a TypeError at a field docstring's "93% in"; every script's help works."""
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert text.startswith(f"usage: {script.name} ")
    if script.stem == "gpu_benchmark":  # its docstrings, read from the source, are there: the sign included
        assert "reached ResNet-18's 93% in 5.09-5.53 s on the H200" in text


def test_the_help_test_covers_the_scripts_that_take_dataclass_flags():
    assert len(SCRIPTS) >= 12
    users = [path.stem for path in SCRIPTS if "triaccel_rl.experiment import" in path.read_text()]
    assert {"gpu_benchmark", "transfer", "train_pretrained", "bench_compile"} <= set(users)


def test_a_misspelt_or_abbreviated_flag_is_refused(capsys):
    for argv in (["--step", "5"], ["--stepz", "5"]):
        with pytest.raises(SystemExit) as exit_info:
            parse_args(Args, argv)
        assert exit_info.value.code == 2
        assert "unrecognized arguments" in capsys.readouterr().err


def test_parse_args_refuses_a_field_type_it_cannot_parse():
    @dataclass
    class Bad:
        sizes: list = None  # type: ignore[assignment]

    with pytest.raises(TypeError, match="field 'sizes' has type list; allowed: bool, int, float, str"):
        parse_args(Bad, [])


@pytest.mark.parametrize(
    "args",
    [
        Args(),
        Args(steps=7),
        Args(smoke=True),
        Args(check=False),
        Args(tasks="x y,'z'", lr=0.25, smoke=True),
        Args(tasks="-x", steps=-2, lr=-0.5),  # written "--tasks -x", which argparse read as an option
    ],
)
def test_command_line_round_trips_through_parse_args(args):
    command = command_line("experiments/x.py", args)
    words = shlex.split(command)
    assert words[:2] == ["python", "experiments/x.py"]
    assert parse_args(Args, words[2:]) == args


def test_command_line_names_only_the_flags_that_differ():
    assert command_line("x.py", Args()) == "python x.py"
    assert command_line("x.py", Args(smoke=True, check=False)) == "python x.py --smoke --no-check"


def test_a_field_without_a_default_is_a_required_flag(capsys):
    """Left out, the object held dataclasses.MISSING."""

    @dataclass
    class Run:
        steps: int

    assert parse_args(Run, ["--steps", "3"]) == Run(steps=3)
    with pytest.raises(SystemExit):
        parse_args(Run, [])
    assert "the following arguments are required: --steps" in capsys.readouterr().err
    assert command_line("x.py", Run(steps=3)) == "python x.py --steps 3"  # type(args)() raised for a required field


def test_a_factory_default_and_a_bool_without_a_default_round_trip():
    """parse_args required a field with a default_factory (command_line left it out as a default: the recorded command
    could not run), and command_line wrote --no-smoke for a bool without a default, which parse_args refused."""
    from dataclasses import field

    @dataclass
    class Factory:
        tasks: str = field(default_factory=lambda: "a,b")

    @dataclass
    class Flag:
        smoke: bool

    @dataclass
    class OnByFactory:
        plots: bool = field(default_factory=lambda: True)  # parse_args read it as a store_true flag: False

    assert parse_args(Factory, []) == Factory()
    assert command_line("x.py", Factory()) == "python x.py"
    for value in (False, True):
        command = command_line("x.py", Flag(smoke=value))
        assert parse_args(Flag, shlex.split(command)[2:]) == Flag(smoke=value)
        command = command_line("x.py", OnByFactory(plots=value))
        assert parse_args(OnByFactory, shlex.split(command)[2:]) == OnByFactory(plots=value)


def test_a_results_file_behind_a_dangling_symlink_is_written_through_it(tmp_path):
    """The writability probe created the link's target through it, then unlinked the link: the results went into a
    plain file in the link's place and the target stayed empty."""
    from triaccel_rl.experiment import file_to_write, write_text_atomic

    target = tmp_path / "archive" / "run1.json"
    target.parent.mkdir()
    link = tmp_path / "latest.json"
    link.symlink_to(target)
    assert file_to_write("--out", str(link)) == link
    assert link.is_symlink() and not target.exists()  # the probe left nothing behind
    write_text_atomic(link, "results")
    assert link.is_symlink() and target.read_text() == "results"


def test_git_commit_marks_a_tree_with_edits(monkeypatch):
    """A run from edited tracked files was credited to the commit it started from, as if it were that code."""
    from triaccel_rl import experiment

    for name in ("COMMIT", "TRIACCEL_COMMIT"):
        monkeypatch.delenv(name, raising=False)
    status = {"text": " M triaccel_rl/plain.py"}
    monkeypatch.setattr(experiment, "_git", lambda root, *a: "abc1234" if a[0] == "rev-parse" else status["text"])
    assert experiment.git_commit() == "abc1234+dirty"
    status["text"] = ""
    assert experiment.git_commit() == "abc1234"
    monkeypatch.setenv("COMMIT", "0c67b2b")
    assert experiment.git_commit() == "abc1234"  # a checkout's own commit beats the variable

    def no_git(root, *a):
        raise subprocess.CalledProcessError(128, ["git", *a])

    monkeypatch.setattr(experiment, "_git", no_git)
    assert experiment.git_commit() == "0c67b2b"  # a device copy without git: the hash the visit was told


@pytest.mark.parametrize("text", ["nan", "1,inf", "-inf"])
def test_parse_floats_refuses_a_number_that_is_not_finite(text):
    from triaccel_rl.experiment import parse_floats

    with pytest.raises(ValueError, match=r"is not a finite number"):
        parse_floats(text, "--lr-scales")


def test_every_committed_result_file_is_strict_json():
    """Eleven results files written before the strict writers held ``NaN`` (a diverged probe loss), which strict
    parsers (JavaScript, jq) refuse; they now hold ``null`` there, as every writer writes it."""
    from pathlib import Path

    from experiment_scripts import strict_json

    files = sorted(Path(__file__).parent.parent.joinpath("experiments", "results").rglob("*.json"))
    assert len(files) > 50  # the results are there: the check below is not of nothing
    for path in files:
        try:
            strict_json(path.read_text())
        except ValueError as error:
            pytest.fail(f"{path}: {error}")


def test_file_to_write_refuses_an_empty_path_or_a_folder_and_keeps_an_existing_file(tmp_path):
    from triaccel_rl.experiment import file_to_write

    with pytest.raises(ValueError, match=r"^--out '': is empty; give a file path such as x\.json$"):
        file_to_write("--out", "", example="x.json")
    with pytest.raises(
        ValueError, match=rf"^--out {tmp_path}: is a folder; give a file path such as {tmp_path}/x\.json$"
    ):
        file_to_write("--out", str(tmp_path), example="x.json")
    existing = tmp_path / "kept.json"
    existing.write_text("{}")
    assert file_to_write("--out", str(existing)) == existing and existing.read_text() == "{}"
    new = tmp_path / "sub" / "new.json"
    assert file_to_write("--out", str(new)) == new and new.parent.is_dir() and not new.exists()  # folder made
    # a link to a file in a folder not made yet (the writer makes it): was "cannot be written"
    link = tmp_path / "linked.json"
    link.symlink_to("archive/2026/results.json")
    assert file_to_write("--out", str(link)) == link and (tmp_path / "archive" / "2026").is_dir()
    assert link.is_symlink() and not link.exists()  # the link kept, no file left through it


def test_write_text_atomic_leaves_the_old_file_whole_when_the_write_is_interrupted(monkeypatch, tmp_path):
    import pathlib

    from triaccel_rl.experiment import write_text_atomic

    target = tmp_path / "results.json"
    write_text_atomic(target, "old\n")
    assert target.read_text() == "old\n"
    write_text = pathlib.Path.write_text

    def interrupted(path, text, *args, **kwargs):
        write_text(path, text[:2])
        raise KeyboardInterrupt

    monkeypatch.setattr(pathlib.Path, "write_text", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_text_atomic(target, "new\n")
    monkeypatch.undo()
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["results.json"]
    link = tmp_path / "link.json"
    link.symlink_to(target)
    write_text_atomic(link, "new\n")  # through the link to its file, the link kept
    assert link.is_symlink() and target.read_text() == "new\n"


def test_a_smoke_run_leaves_the_recorded_results_alone(tmp_path, monkeypatch, capsys):
    """``bench_elastic.py --smoke`` wrote over experiments/results/elastic_batch.json (and gpu_benchmark.py's and
    transfer.py's smoke runs over theirs): issue 5's GPU evidence replaced by a CPU plumbing check."""
    import tempfile

    from triaccel_rl.experiment import away_from_results

    default = "experiments/results/elastic_batch.json"
    moved = Path(tempfile.gettempdir()) / "triaccel-rl-smoke" / "elastic_batch.json"
    assert away_from_results("--output", "mine.json", default) == "mine.json"
    assert away_from_results("--plots", "", "") == ""
    monkeypatch.chdir(tmp_path)
    moved.unlink(missing_ok=True)
    script = Path(__file__).parents[1] / "experiments" / "bench_elastic.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--smoke"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(script), run_name="__main__")
    assert done.value.code in (0, None)
    assert not (tmp_path / "experiments").exists() and moved.is_file()
    assert f"--smoke: --output {moved} (not the recorded {default})" in capsys.readouterr().err


def test_an_existing_file_that_is_not_a_regular_one_is_refused_and_kept(tmp_path):
    """``--out /dev/null`` was accepted, then the results moved over it: a device (as root, the system's /dev/null) or
    a FIFO replaced by a regular file. A FIFO stands in for the device here."""
    import stat

    from triaccel_rl.experiment import file_to_write, write_text_atomic

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    link = tmp_path / "link.json"
    link.symlink_to(fifo)
    # A reader held open, so that the old writability probe (an open for writing) returned instead of waiting for one.
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        for given in (fifo, link):  # a link to it too: the file it names is what would be replaced
            with pytest.raises(
                ValueError,
                match=rf"^--out {given}: is not a regular file \(a device, a FIFO or a socket\), which writing would "
                rf"replace; give a file path such as x\.json \(\'\' for none, where --out allows it\)$",
            ):
                file_to_write("--out", str(given), example="x.json")
        with pytest.raises(ValueError, match=rf"^{link}: is not a regular file .*; give a regular file's path$"):
            write_text_atomic(link, "results")
    finally:
        os.close(reader)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "pipe"]  # no temporary left beside


def test_a_path_ending_in_a_separator_is_refused_as_a_folder(tmp_path):
    """``--out slash/results/`` (no such folder yet) was accepted and the results written to a file named results:
    ``Path`` drops the trailing separator."""
    from triaccel_rl.experiment import file_to_write

    given = f"{tmp_path}/slash/results/"
    with pytest.raises(
        ValueError, match=rf"^--out {given}: is a folder; give a file path such as {tmp_path}/slash/results/x\.json$"
    ):
        file_to_write("--out", given, example="x.json")
    assert not (tmp_path / "slash").exists()  # refused before its folder is made


# (script, its output flag, the function that starts its workload, how main is called with the output path)
_OUTPUT_FIRST = [
    ("bench_compile", "--out", "build_row", lambda m, out: m.main(m.Args(smoke=True, rows="plain-eager", out=out))),
    ("bench_elastic", "--output", "find_largest_batch", lambda m, out: m.main(["--smoke", "--output", out])),
    ("bench_fused_step", "--output", "run_checks", lambda m, out: m.main(["--smoke", "--output", out])),
    ("bench_signals", "--output", "measure", lambda m, out: m.main(m.Args(smoke=True, output=out))),
    ("lr_budget_probe", "--out", "episode_return", lambda m, out: m.main(m.Args(tasks="synthetic", out=out))),
    ("lr_lookahead_probe", "--out", "probe_run", lambda m, out: m.main(m.Args(tasks="synthetic", out=out))),
]


@pytest.mark.parametrize(("script", "flag", "workload", "run"), _OUTPUT_FIRST, ids=[s[0] for s in _OUTPUT_FIRST])
def test_a_folder_as_the_output_path_is_refused_before_the_workload(monkeypatch, tmp_path, script, flag, workload, run):
    """Given a folder, these scripts ran their whole workload (minutes of GPU measurements) and only then died with
    IsADirectoryError, writing nothing; now they refuse it first, as ``file_to_write`` words it."""
    import torch
    from experiment_scripts import import_experiment

    module = import_experiment(script)

    def workload_ran(*args, **kwargs):
        raise AssertionError(f"{script}: the workload ran before the output path was checked")

    monkeypatch.setattr(module, workload, workload_ran)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # --smoke's one thread: not for the test session
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "1"))  # bench_fused_step pops it
    with pytest.raises((SystemExit, ValueError)) as refused:
        run(module, str(tmp_path))
    assert str(refused.value).startswith(f"{flag} {tmp_path}: is a folder; give a file path such as {tmp_path}/")


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"models": "resnet18,resnet50"}, "--models: unknown model 'resnet50'; allowed: resnet18, cnn-fmnist"),
        ({"models": " , "}, "--models ' , ' is empty; give comma-separated models from: resnet18, cnn-fmnist"),
        ({"repeats": 0}, "--repeats 0 must be >= 1"),
        ({"interval_steps": 0}, "--interval-steps 0 must be >= 1"),
        ({"window_s": 0.0}, "--window-s 0.0 must be a positive number of seconds"),
    ],
)
def test_bench_signals_refuses_a_setting_before_any_model_runs(monkeypatch, tmp_path, setting, message):
    """An unknown model was found only when its turn came (the earlier models' rows, not yet written, lost), and
    nothing else was checked at all."""
    from experiment_scripts import import_experiment

    bench = import_experiment("bench_signals")

    def measured(*args, **kwargs):
        raise AssertionError("the measurement ran before the settings were checked")

    monkeypatch.setattr(bench, "measure", measured)
    with pytest.raises(SystemExit) as refused:
        bench.main(bench.Args(**setting, smoke=True, output=str(tmp_path / "signals.json")))
    assert str(refused.value) == message


def test_bench_signals_records_the_command_of_its_args_and_leaves_them_alone(monkeypatch, tmp_path):
    """Each row's ``command`` was ``sys.argv`` (a run from Python recorded its caller's: pytest's), and ``--smoke``
    narrowed the caller's ``Args`` in place."""
    from experiment_scripts import import_experiment

    bench = import_experiment("bench_signals")
    written = []

    class Written(Exception):
        pass

    def write_rows(rows, path):
        written.extend(rows)
        raise Written  # the printing after it needs a whole row

    monkeypatch.setattr(bench, "measure", lambda args, device: [{"device": "cpu", "model": "resnet18"}])
    monkeypatch.setattr(bench, "write_rows", write_rows)
    monkeypatch.setattr(sys, "argv", ["pytest", "-q", "tests"])
    output = tmp_path / "signals.json"
    args = bench.Args(models="resnet18", repeats=5, smoke=True, output=str(output))
    with pytest.raises(Written):
        bench.main(args)
    assert (
        written[0]["command"]
        == f"python experiments/bench_signals.py --models resnet18 --repeats 5 --output {output} --smoke"
    )
    assert args == bench.Args(models="resnet18", repeats=5, smoke=True, output=str(output))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--epochs", "0"], "--epochs 0 must be >= 1"),
        (["--width", "0"], "--width 0 must be >= 1"),
        (["--max-batch", "0"], "--max-batch 0 must be >= 1"),
        (["--steps-per-epoch", "0"], "--steps-per-epoch 0.0 must be a positive number"),
        (["--fill-frac", "1.5"], "--fill-frac 1.5 must be in (0, 1]"),
        (["--min-use-frac", "0"], "--min-use-frac 0.0 must be in (0, 1]"),
    ],
)
def test_bench_elastic_refuses_a_setting_before_any_run(monkeypatch, tmp_path, flags, message):
    """``--epochs 0`` trained nothing and read as the memory model failing its checks, after the batch finder ran."""
    import torch
    from experiment_scripts import import_experiment

    bench = import_experiment("bench_elastic")

    def finder_ran(*args, **kwargs):
        raise AssertionError("the batch finder ran before the settings were checked")

    monkeypatch.setattr(bench, "find_largest_batch", finder_ran)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    with pytest.raises(SystemExit) as refused:
        bench.main(["--smoke", *flags, "--output", str(tmp_path / "elastic.json")])
    assert str(refused.value) == message


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("bench_elastic", "--epochs EPOCHS Epochs of the budgeted run. (default: 2)"),
        ("bench_signals", "--repeats REPEATS Interleaved windows per configuration"),
    ],
)
def test_the_hand_parsed_scripts_show_each_flags_help(capsys, script, expected):
    """bench_elastic.py and bench_signals.py built their flags by hand: no flag had a help line."""
    from experiment_scripts import import_experiment

    module = import_experiment(script)
    with pytest.raises(SystemExit):
        (module._parse_args if script == "bench_elastic" else module.parse)(["--help"])
    assert expected in " ".join(capsys.readouterr().out.split())


def test_gpu_benchmarks_rows_help_points_at_what_defines_them(capsys):
    """``--rows`` said "(see ROWS)", a name the script does not have; the rows are ``rows_for()``'s."""
    from experiment_scripts import import_experiment

    with pytest.raises(SystemExit):
        import_experiment("gpu_benchmark").parse(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Rows to run, comma-separated: any of the names ``rows_for()`` defines." in text and "(see ROWS)" not in text


@pytest.mark.parametrize("setting", [{"ship_dir": ""}, {"smoke": True}], ids=["ship-dir-empty", "smoke"])
def test_card_only_without_a_ship_dir_is_refused(monkeypatch, tmp_path, setting):
    """``--ship-dir ''`` (what ``--smoke`` sets) resolved to the repository root: the card looked for its policy.zip."""
    from experiment_scripts import import_experiment

    train_pretrained = import_experiment("train_pretrained")
    (tmp_path / "training.json").write_text("{}")

    def card_written(*args, **kwargs):
        raise AssertionError("a card was written for the policy.zip of the repository root")

    monkeypatch.setattr(train_pretrained, "_write_card", card_written)
    with pytest.raises(SystemExit) as refused:
        train_pretrained.main(train_pretrained.Args(card_only=True, run_dir=str(tmp_path), **setting))
    assert str(refused.value) == "--card-only needs --ship-dir (the folder whose policy.zip the card describes)"


@pytest.mark.parametrize(
    ("script", "flags", "message"),
    [
        ("transfer", ["--epochs", "0"], "epochs=0.0 must be a positive finite number"),
        ("transfer", ["--interval-steps", "0"], "interval_steps=0 must be >= 1"),
        ("batch_headroom", ["--tasks", "synthetic", "--rows", "bf16,bogus"], "row 'bogus'; allowed: heuristic, "),
        ("bench_env", ["--tasks", "synthetic", "--n-envs", "1", "--device", "cuda"], "--device='cuda' asked for, "),
        ("lr_lookahead_probe", ["--tasks", "synthetic", "--device", "cuda"], "--device='cuda' asked for, "),
        ("bench_compile", ["--smoke", "--steps", "15"], "--steps 15 must be a positive multiple of 10"),
        ("train_pretrained", ["--timesteps", "0"], "total_timesteps=0 must be a whole number >= 1"),
    ],
)
def test_a_bad_flag_value_exits_with_one_line_not_a_traceback(monkeypatch, tmp_path, script, flags, message):
    """These scripts let the library's ValueError (ConfigError) out of ``__main__``: 10-25 lines of traceback."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # --device cuda is refused on any machine
    monkeypatch.chdir(tmp_path)  # each writes nothing, its output path relative to here
    path = Path(__file__).resolve().parents[1] / "experiments" / f"{script}.py"
    out = ["--run-dir", str(tmp_path / "run")] if script == "train_pretrained" else ["--out", str(tmp_path / "x.json")]
    monkeypatch.setattr(sys, "argv", [str(path), *flags, *out])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(path), run_name="__main__")
    assert isinstance(exited.value.code, str) and exited.value.code.startswith(message)
    assert "\n" not in exited.value.code


@pytest.mark.parametrize("script", ["bench_env", "lr_lookahead_probe"])
def test_an_unusable_device_is_refused_before_any_run(monkeypatch, tmp_path, script):
    """``--device cuda`` on a machine without one failed inside the first environment or run, not up front; ``main``
    still raises for a Python caller (bench_env.py's checks exit, lr_lookahead_probe.py's raise ValueError)."""
    import torch
    from experiment_scripts import import_experiment

    import triaccel_rl.rl

    module = import_experiment(script)

    def ran(*args, **kwargs):
        raise AssertionError("an environment or a run started before the device was checked")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(triaccel_rl.rl, "make_env_fns", ran)  # bench_env's environments
    monkeypatch.setattr(module, "probe_run", ran, raising=False)  # lr_lookahead_probe's runs
    expected = "--device='cuda' asked for, but this machine has no CUDA GPU; use 'cpu'"
    with pytest.raises(SystemExit if script == "bench_env" else ValueError) as refused:
        module.main(module.Args(tasks="synthetic", device="cuda", out=str(tmp_path / "x.json")))
    assert str(refused.value) == expected


def test_cpu_machine_names_the_cpu_model_cores_threads_and_torch(monkeypatch):
    import platform

    import torch

    from triaccel_rl.experiment import cpu_machine

    monkeypatch.setattr("os.cpu_count", lambda: 7)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    monkeypatch.setattr(platform, "processor", lambda: "")
    monkeypatch.setattr(platform, "machine", lambda: "arch64")
    monkeypatch.setattr("builtins.open", _cpuinfo("processor\t: 0\nmodel name\t: Example CPU 9000\n"))
    assert cpu_machine() == f"cpu Example CPU 9000 (7 cores, 3 torch threads), torch {torch.__version__}"
    monkeypatch.setattr("builtins.open", _cpuinfo(None))  # no /proc/cpuinfo (macOS, Windows)
    assert cpu_machine() == f"cpu arch64 (7 cores, 3 torch threads), torch {torch.__version__}"


def _cpuinfo(text):
    import io

    def fake_open(path, *args, **kwargs):
        assert path == "/proc/cpuinfo"
        if text is None:
            raise FileNotFoundError(path)
        return io.StringIO(text)

    return fake_open

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from triaccel_rl.cli import main
from triaccel_rl.experiment import cpu_machine
from triaccel_rl.tasks import TASKS
from triaccel_rl.types import Precision


@pytest.mark.parametrize("command", [[], ["compare"], ["train-policy"], ["profile"], ["tasks"]])
def test_help_on_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: triaccel-rl" in capsys.readouterr().out


def test_every_option_with_a_default_names_it_in_its_help():
    """``compare --help`` did not say that --seeds is 2, --epochs 3 or where --out and --log-dir write by default
    (nor train-policy's --timesteps and --tasks, nor profile's --out); --seed had no help at all."""
    import argparse

    from triaccel_rl.cli import _parser

    shown = {}
    for command, parser in _parser()._subparsers._group_actions[0].choices.items():
        for action in parser._actions:
            if not any(action.default is none for none in (None, False, argparse.SUPPRESS)) and action.default != "":
                assert action.help, f"{command} {action.option_strings[0]} has no help"
                shown[command, action.option_strings[0]] = action.help % {"default": action.default}
    wanted = {
        ("compare", "--task"): "default mlp-fmnist",
        ("compare", "--controllers"): "default fp32,bf16,fp16,heuristic",
        ("compare", "--seeds"): "default 2",
        ("compare", "--epochs"): "default 3)",
        ("compare", "--preset"): "default default",
        ("compare", "--log-dir"): "default runs/compare",
        ("compare", "--out"): "default runs/compare/results.json",
        ("train-policy", "--tasks"): "default synthetic",
        ("train-policy", "--timesteps"): "default 4096",
        ("train-policy", "--n-envs"): "default 2",
        ("train-policy", "--vec"): "default subproc",
        ("train-policy", "--budget-intervals"): "default 16)",
        ("train-policy", "--interval-steps"): "default 20",
        ("train-policy", "--seed"): "default 0",
        ("train-policy", "--out"): "default runs/policy.zip",
        ("train-policy", "--log-dir"): "default runs/ppo",
        ("train-policy", "--eval-every"): "default 0: none",
        ("train-policy", "--checkpoint-every"): "default 0: none",
        ("profile", "--out"): "default profile.json",
        ("profile", "--batch-size"): "default 256",
        ("profile", "--steps"): "default 20",
    }
    assert sorted(shown) == sorted(wanted)
    for key, text in wanted.items():
        assert text in shown[key], (key, shown[key])


def test_compare_writes_table_json_and_tensorboard(tmp_path, capsys):
    out = tmp_path / "results.json"
    code = main(
        [
            "compare",
            "--task",
            "synthetic",
            "--controllers",
            "fp32,bf16,heuristic",
            "--seeds",
            "2",
            "--epochs",
            "1",
            "--interval-steps",
            "5",
            "--log-dir",
            str(tmp_path / "tb"),
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    for name in ("static-fp32", "static-bf16", "heuristic"):
        assert f"| {name} |" in printed
    payload = json.loads(out.read_text())
    assert {row["controller"] for row in payload["rows"]} == {"static-fp32", "static-bf16", "heuristic"}
    assert len(payload["runs"]) == 6
    for run in payload["runs"]:
        assert 0.0 <= run["final_metric"] <= 1.0 and run["time_s"] > 0 and run["steps"] > 0
    bf16 = next(r for r in payload["rows"] if r["controller"] == "static-bf16")
    assert bf16["time_ratio"] < 1.0  # modelled GPU time: bf16 is cheaper than the fp32 reference
    assert "| controller | final acc | time (s, modelled NVIDIA H200) | time 95% CI |" in printed  # the profile's
    assert "| vs static-fp32 (time / to target) |" in printed  # the reference row, by default fp32's
    assert payload["meta"]["time_mode"] == "time (s, modelled NVIDIA H200)"
    # The row the ratios are to, and where the runs trained (the file said neither before).
    assert (payload["meta"]["reference"], payload["meta"]["device"]) == ("static-fp32", cpu_machine())
    # What the times to target were measured against, and what trained (the task name alone, before: a target
    # recalibrated since could not be told)
    task = TASKS["synthetic"]
    assert {k: payload["meta"][k] for k in ("task", "model", "target_metric", "epochs", "seeds")} == {
        "task": "synthetic", "model": task.description, "target_metric": task.target_metric, "epochs": 1.0,
        "seeds": [0, 1],
    }  # fmt: skip
    # The command as main() was given it (it was read from sys.argv: pytest's own arguments, here).
    assert payload["meta"]["command"].startswith("triaccel-rl compare --task synthetic --controllers fp32,bf16,")
    assert len(list((tmp_path / "tb").rglob("events.out.tfevents.*"))) == 6


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compare", "--task", "nope"], "unknown task 'nope'"),
        (["compare", "--task", "synthetic", "--controllers", "fp8"], "unknown policy 'fp8'"),
        (["compare", "--task", "synthetic", "--controllers", "missing.zip"], "does not exist"),
        (["compare", "--seeds", "0"], "--seeds 0 must be >= 1"),
        (["compare", "--task", "synthetic", "--eval-every-steps", "0"], "--eval-every-steps 0 must be >= 1"),
        (["compare", "--task", "synthetic", "--controllers", "plain-bf16,bf16"], "use cost mode 'measured'"),
        (["compare", "--task", "synthetic", "--preset", "fast"], "unknown preset 'fast'; allowed: default, safe"),
        (
            ["compare", "--task", "synthetic", "--max-grad-norm", "0"],
            "--max-grad-norm 0.0 must be a positive finite number",
        ),
        (["compare", "--task", "synthetic", "--epochs", "-1"], "--epochs -1.0 must be a positive finite number"),
        (["compare", "--task", "synthetic", "--epochs", "nan"], "--epochs nan must be a positive finite number"),
        (["compare", "--task", "synthetic", "--epochs", "inf"], "--epochs inf must be a positive finite number"),
        (
            ["compare", "--task", "synthetic", "--epochs", "0.0001"],
            "--epochs 0.0001 is less than one sample of this task's 3584 training samples: give at least 0.00028",
        ),
        (
            ["compare", "--task", "synthetic", "--device", "gpu0"],
            "error: --device 'gpu0' is not a device: use cpu, cuda or cuda:N\n",
        ),
        (
            ["compare", "--task", "synthetic", "--controllers", "fp32,static-fp32"],
            "controllers fp32, static-fp32 would all be reported as row static-fp32",
        ),
        (["compare", "--task", "synthetic", "--lr-scales", "1.5,1,0.5"], "must be strictly increasing"),
        (
            ["compare", "--task", "synthetic", "--eval-every", "2", "--eval-every-steps", "10"],
            "--eval-every and --eval-every-steps both given",
        ),
        (["compare", "--task", "synthetic", "--eval-every", "0"], "--eval-every 0 must be >= 1"),
        (
            ["compare", "--task", "synthetic", "--controllers", "fp32,heuristic", "--reference", "fp32"],
            "--reference 'fp32' is not a row of this comparison; its rows: static-fp32, heuristic",
        ),
    ],
)
def test_bad_input_is_one_clear_line(argv, message, capsys):
    assert main([*argv, "--no-progress", "--out", "", "--log-dir", ""]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("flag", ["--out", "--plots", "--log-dir"])
def test_compare_refuses_an_unwritable_output_before_the_runs(flag, tmp_path, capsys, monkeypatch):
    import triaccel_rl.compare

    monkeypatch.setattr(triaccel_rl.compare, "run_controller", lambda *a, **k: pytest.fail("a run started"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    argv = ["compare", "--task", "synthetic", "--no-progress", "--out", "", "--log-dir", "", flag, str(blocker / "x")]
    assert main(argv) == 2  # the runs' results were lost when the write failed after them
    err = capsys.readouterr().err
    assert f"{flag} {blocker / 'x'}: cannot create" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (["--controllers", "fp8"], "triaccel-rl compare: error: unknown policy 'fp8'"),
        (["--epochs", "-1"], "triaccel-rl compare: error: --epochs -1.0 must be a positive finite number\n"),
        (["--eval-every", "0"], "triaccel-rl compare: error: --eval-every 0 must be >= 1, a whole number of decisions"),
        (["--eval-every-steps", "0"], "triaccel-rl compare: error: --eval-every-steps 0 must be >= 1"),
        (["--max-grad-norm", "-1"], "triaccel-rl compare: error: --max-grad-norm -1.0 must be a positive finite"),
        (["--controllers", "plain-fp32"], "triaccel-rl compare: error: plain-fp32 measure a plain loop's real time"),
        (["--controllers", "fp32,static-fp32"], "controllers fp32, static-fp32 would all be reported as row"),
        (["--device", "gpu0"], "triaccel-rl compare: error: --device 'gpu0' is not a device"),
        (["--epochs", "0.0001"], "error: --epochs 0.0001 is less than one sample of this task's 3584 training samples"),
    ],
)
def test_a_comparison_refused_for_its_arguments_leaves_no_folders(bad, message, tmp_path, capsys):
    """A bad controller name once left the --out, --log-dir and --plots folders it had made before checking; a bad
    --epochs, --eval-every, --eval-every-steps, --max-grad-norm or --device, a plain row in modelled time or two rows
    of one name left them (and printed the note on an earlier comparison's TensorBoard runs) until compare()'s own
    checks ran, after the folders were made; an --epochs under one sample until the first run loaded its data."""
    out, log_dir, plots = str(tmp_path / "o" / "r.json"), str(tmp_path / "tb"), str(tmp_path / "p")
    argv = ["compare", "--task", "synthetic", *bad, "--no-progress"]
    assert main([*argv, "--out", out, "--log-dir", log_dir, "--plots", plots]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_two_policies_of_one_file_name_are_refused_not_merged(tmp_path, capsys):
    """Two zips named alike were reported as one row (their seeds mixed) with one TensorBoard folder."""
    from triaccel_rl.policies import pretrained_policy_path

    zips = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        zips.append(tmp_path / folder / "policy.zip")
        shutil.copy(pretrained_policy_path(), zips[-1])
    argv = ["compare", "--task", "synthetic", "--controllers", f"{zips[0]},{zips[1]}", "--no-progress", "--out", "",
            "--log-dir", ""]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "would all be reported as row learned:policy.zip" in err and "different file names" in err
    # Two names that differ but share their folder and plot file names (they were two rows with one folder)
    for folder, name in (("a", "a b.zip"), ("b", "a_b.zip")):
        shutil.copy(pretrained_policy_path(), tmp_path / folder / name)
    argv[4] = f"{tmp_path / 'a' / 'a b.zip'},{tmp_path / 'b' / 'a_b.zip'}"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "would all be reported as row learned:a b.zip, learned:a_b.zip (one file name): list each once" in err
    # Without zips among them, no word of zips; and a name no row has lists the plain loops too
    argv[4] = "fp32,static-fp32"
    assert main(argv) == 2
    assert "list each once\n" in capsys.readouterr().err
    argv[4] = "fp32,foo"
    assert main(argv) == 2
    assert "or a path to an SB3 .zip, or a plain loop: plain-fp32, plain-bf16, plain-fp16" in capsys.readouterr().err
    # The shipped policy is the row "pretrained": beside one's own policy.zip (train-policy's default name) it clashed
    from triaccel_rl.compare import check_comparison, row_names

    assert row_names(["pretrained", str(zips[0])]) == ["pretrained", "learned:policy.zip"]
    check_comparison("synthetic", ["pretrained", str(zips[0])], [0])


@pytest.mark.parametrize(("a", "b"), [("out", "log-dir"), ("out", "plots"), ("plots", "log-dir")])
def test_one_path_for_two_outputs_is_refused_before_the_runs(a, b, tmp_path, capsys, monkeypatch):
    """``--out X --log-dir X`` ran everything, then failed writing the results over the TensorBoard folder."""
    import triaccel_rl.compare

    monkeypatch.setattr(triaccel_rl.compare, "run_controller", lambda *a, **k: pytest.fail("a run started"))
    paths = {"out": "", "log-dir": "", "plots": ""} | {a: str(tmp_path / "x"), b: str(tmp_path / "x")}
    argv = ["compare", "--task", "synthetic", "--no-progress", *[v for k, p in paths.items() for v in (f"--{k}", p)]]
    assert main(argv) == 2
    assert f"--{a} and --{b} are both {tmp_path / 'x'}: give each its own" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("flag", ["log-dir", "plots"])
def test_a_folder_inside_the_results_file_is_refused_before_the_runs(flag, tmp_path, capsys, monkeypatch):
    """``--out r/results.json --log-dir r/results.json/tb`` ran everything, then failed writing the results over the
    folder (with a stray temporary file); a results file inside a folder flag's path stays fine."""
    import triaccel_rl.compare

    monkeypatch.setattr(triaccel_rl.compare, "run_controller", lambda *a, **k: pytest.fail("a run started"))
    out = tmp_path / "r" / "results.json"
    argv = ["compare", "--task", "synthetic", "--no-progress", "--out", str(out), f"--{flag}", str(out / "tb")]
    assert main(argv) == 2
    assert f"--{flag} {out / 'tb'} is inside --out {out}, the results file" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    from triaccel_rl.cli import _apart

    _apart(out=str(tmp_path / "r" / "results.json"), log_dir=str(tmp_path / "r"))  # a file inside a folder: fine


def test_train_policy_refuses_one_path_for_the_policy_and_its_logs_before_training(tmp_path, capsys, monkeypatch):
    """``--out z/p.zip --log-dir z/p.zip`` trained the whole run, then lost it at the policy's save."""
    import triaccel_rl.rl

    monkeypatch.setattr(triaccel_rl.rl, "train_policy", lambda *a, **k: pytest.fail("training started"))
    path = str(tmp_path / "z" / "p.zip")
    assert main(["train-policy", "--tasks", "synthetic", "--out", path, "--log-dir", path]) == 2
    assert f"--out and --log-dir are both {path}: give each its own" in capsys.readouterr().err


def test_a_results_file_that_cannot_be_written_leaves_no_temporary_behind(tmp_path):
    from triaccel_rl.compare import write_json

    (tmp_path / "results.json").mkdir()  # a folder where the file goes
    with pytest.raises(OSError):
        write_json([], [], tmp_path / "results.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


@pytest.mark.parametrize("device", ["meta", "mps", "xpu"])
def test_a_device_type_the_controller_does_not_support_is_refused_by_name(device, capsys):
    """They failed with a traceback deep in the first run, after its folders were made."""
    assert main(["compare", "--task", "synthetic", "--no-progress", "--device", device]) == 2
    assert f"--device {device!r} is not supported: use cpu, cuda or cuda:N" in capsys.readouterr().err


def test_plots_without_matplotlib_are_refused_before_the_runs(tmp_path, capsys, monkeypatch):
    import triaccel_rl.compare

    monkeypatch.setattr(triaccel_rl.compare, "run_controller", lambda *a, **k: pytest.fail("a run started"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    argv = ["compare", "--task", "synthetic", "--no-progress", "--out", "", "--log-dir", "", "--plots", str(tmp_path)]
    assert main(argv) == 2
    assert "--plots needs matplotlib" in capsys.readouterr().err


def test_compare_prices_steps_with_a_given_profile(tmp_path, capsys, monkeypatch):
    import triaccel_rl.compare as compare_module
    from triaccel_rl.config import HardwareProfile

    class Seen(Exception):
        pass

    def record(*args, **kwargs):
        seen.append(kwargs["profile"])
        raise Seen  # enough: what compare() was given

    seen = []
    monkeypatch.setattr(compare_module, "compare", record)
    shipped = HardwareProfile.load()
    mine = HardwareProfile(**{**shipped.__dict__, "device": "my GPU", "fixed_ms": 0.5})
    mine.save(tmp_path / "p.json")
    argv = ["compare", "--task", "synthetic", "--no-progress", "--out", "", "--log-dir", ""]
    (tmp_path / "bad.json").write_text('{"device": "x"}')
    assert main([*argv, "--profile", str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err
    assert "lacks the fields ['time_factor', 'memory_factor', 'fixed_ms', 'throughput_scale']" in err
    assert seen == []
    # the profile's "device" field, not the command's --device flag (the message read "hardware profile --device 5")
    (tmp_path / "bad.json").write_text(json.dumps({**json.loads((tmp_path / "p.json").read_text()), "device": 5}))
    assert main([*argv, "--profile", str(tmp_path / "bad.json")]) == 2
    assert 'hardware profile field "device"=5 must be the GPU\'s name' in capsys.readouterr().err
    with pytest.raises(Seen):
        main([*argv, "--profile", str(tmp_path / "p.json")])
    assert seen == [mine]
    assert "note" not in capsys.readouterr().err  # modelled time on a CPU: the profile prices it
    with pytest.raises(Seen):  # measured time: said before the runs (the table's time was not the profile's)
        main([*argv, "--profile", str(tmp_path / "p.json"), "--cost-mode", "measured"])
    assert (
        f"triaccel-rl compare: note: --profile {tmp_path / 'p.json'} prices time only with --cost-mode profile; this "
        "comparison measures it" in capsys.readouterr().err
    )


def _compare_failing_at(monkeypatch, tmp_path, failing, seeds):
    """Runs ``compare`` of fp32 and bf16 into ``tmp_path / "r.json"``, its run ``failing`` (controller, seed) raising
    an injected out-of-memory error; returns the command line and the results path."""
    import triaccel_rl.compare

    real = triaccel_rl.compare.run_controller

    def fails(task, controller, seed, *args, **kwargs):
        if (controller, seed) == failing:
            raise RuntimeError("CUDA out of memory (injected)")
        return real(task, controller, seed, *args, **kwargs)

    monkeypatch.setattr(triaccel_rl.compare, "run_controller", fails)
    out = tmp_path / "r.json"
    argv = ["compare", "--task", "synthetic", "--controllers", "fp32,bf16", "--seeds", str(seeds), "--epochs", "0.2",
            "--no-progress", "--log-dir", "", "--out", str(out)]  # fmt: skip
    with pytest.raises(RuntimeError, match="injected"):
        main(argv)
    return argv, out


def test_the_runs_before_a_failure_are_kept_in_a_partial_file(tmp_path, capsys, monkeypatch):
    """Results were written only after every run: a failure in the last lost all of them."""
    import triaccel_rl.compare

    real = triaccel_rl.compare.run_controller
    argv, out = _compare_failing_at(monkeypatch, tmp_path, ("bf16", 0), seeds=1)
    partial = tmp_path / "r.partial.json"
    assert f"the runs that finished are in {partial}" in capsys.readouterr().err and not out.exists()
    kept = json.loads(partial.read_text())
    assert kept["meta"]["complete"] is False and [run["controller"] for run in kept["runs"]] == ["static-fp32"]
    # how its times were measured and where: the only record of a failed comparison lacked them
    assert kept["meta"]["time_mode"] == "time (s, modelled NVIDIA H200)" and kept["meta"]["device"] == cpu_machine()
    # the reference row ran: its ratios are there (meta named it, and every row's ratio was None)
    assert kept["meta"]["reference"] == "static-fp32" and kept["rows"][0]["time_ratio"] == 1.0
    monkeypatch.setattr(triaccel_rl.compare, "run_controller", real)
    assert main(argv) == 0
    assert out.exists() and not partial.exists()  # a comparison that finished leaves no partial file of its own
    # The failed one's, the only record of its runs, was deleted at the next comparison's start: moved aside, named
    earlier = tmp_path / "r.partial_2.json"
    assert f"an earlier comparison's finished runs moved to {earlier}" in capsys.readouterr().err
    assert json.loads(earlier.read_text()) == kept


def test_the_partial_file_summarizes_only_the_rows_whose_seeds_all_ran(tmp_path, monkeypatch):
    """A row still running was ranked and compared on the seeds it had (one seed's time ranked beside two)."""
    _compare_failing_at(monkeypatch, tmp_path, ("bf16", 1), seeds=2)
    kept = json.loads((tmp_path / "r.partial.json").read_text())
    assert [(run["controller"], run["seed"]) for run in kept["runs"]] == [
        ("static-fp32", 0), ("static-fp32", 1), ("static-bf16", 0)
    ]  # fmt: skip
    assert [row["controller"] for row in kept["rows"]] == ["static-fp32"]


def test_ctrl_c_is_one_line_and_exit_code_130(tmp_path, capsys, monkeypatch):
    """Ctrl-C printed a traceback from wherever the run was (after train-policy's checkpoint line, or compare's
    partial file line); now one line, and the shell's exit code for SIGINT."""
    import triaccel_rl.compare

    real = triaccel_rl.compare.run_controller

    def interrupted_in_the_second(task, controller, *args, **kwargs):
        if controller == "bf16":
            raise KeyboardInterrupt
        return real(task, controller, *args, **kwargs)

    monkeypatch.setattr(triaccel_rl.compare, "run_controller", interrupted_in_the_second)
    out = tmp_path / "r.json"
    argv = ["compare", "--task", "synthetic", "--controllers", "fp32,bf16", "--seeds", "1", "--epochs", "0.2",
            "--no-progress", "--log-dir", "", "--out", str(out)]  # fmt: skip
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"triaccel-rl compare: the runs that finished are in {tmp_path / 'r.partial.json'}",
        "triaccel-rl compare: interrupted",
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train-policy", "--n-steps", "0", "--out", "x/policy.zip"], "--n-steps 0 must be a whole number >= 1"),
        # Without the library's "(or None: PyTorch's default)": None cannot be typed for a flag
        (
            ["train-policy", "--torch-threads", "0", "--out", "x/policy.zip"],
            "error: --torch-threads 0 must be a whole number >= 1\n",
        ),
        (["profile", "--batch-size", "0", "--device", "cpu"], "--batch-size 0 must be a positive integer"),
        # The library's total_timesteps is the flag --timesteps (the message said total_timesteps=0)
        (
            ["train-policy", "--timesteps", "0", "--out", "x/policy.zip"],
            "error: --timesteps 0 must be a whole number >= 1",
        ),
        # Not "n_steps*--n-envs 256": only a name that stands alone is a flag
        (
            ["train-policy", "--batch-size", "300", "--out", "x/policy.zip"],
            "error: --batch-size 300 exceeds the rollout size n_steps*n_envs=256",
        ),
        # Only the flag that is wrong (both were named), and the tasks as typed (a Python list was printed)
        (
            ["train-policy", "--eval-every", "-1", "--out", "x/policy.zip"],
            "error: --eval-every -1 must be a whole number >= 0 (0: none)",
        ),
        (
            ["train-policy", "--eval-tasks", "synthetic", "--out", "x/policy.zip"],
            "error: --eval-tasks synthetic and --eval-every 0: give both",
        ),
        (["train-policy", "--tasks", " , ", "--out", "x/policy.zip"], "error: --tasks ' , ' names no task: give one"),
    ],
)
def test_errors_name_the_flags_to_fix(argv, message, tmp_path, capsys, monkeypatch):
    """The library's checks say ``n_steps=0``; on the command line the message names the flag, ``--n-steps 0``.

    Refused, a command leaves no folder behind (``x/`` for ``--out x/policy.zip`` stayed, and ``--log-dir``'s)."""
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--log-dir", "x/tb"] if argv[0] == "train-policy" else argv) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_comparison_into_an_existing_out_file_is_told_it_replaces_it(tmp_path, capsys):
    out = tmp_path / "results.json"
    argv = ["compare", "--task", "synthetic", "--controllers", "fp32", "--seeds", "1", "--epochs", "0.2",
            "--no-progress", "--out", str(out), "--log-dir", ""]  # fmt: skip
    assert main(argv) == 0
    assert "exists; this comparison's results replace it" not in capsys.readouterr().err
    first = json.loads(out.read_text())
    assert main(argv) == 0
    assert f"--out {out} exists; this comparison's results replace it when it ends" in capsys.readouterr().err
    assert json.loads(out.read_text())["rows"][0]["controller"] == first["rows"][0]["controller"]  # replaced whole


def test_a_second_comparison_into_one_log_dir_is_told_its_curves_overlay(tmp_path, capsys):
    argv = ["compare", "--task", "synthetic", "--controllers", "fp32", "--seeds", "1", "--epochs", "0.2",
            "--no-progress", "--out", "", "--log-dir", str(tmp_path / "tb")]  # fmt: skip
    assert main(argv) == 0
    assert "holds an earlier comparison's TensorBoard runs" not in capsys.readouterr().err
    assert main(argv) == 0
    assert f"--log-dir {tmp_path / 'tb'} holds an earlier comparison's TensorBoard runs" in capsys.readouterr().err
    assert len(list((tmp_path / "tb" / "fp32-seed0").glob("events.out.tfevents.*"))) == 2  # both kept


def test_a_controller_listed_twice_is_refused(capsys):
    assert main(["compare", "--task", "synthetic", "--controllers", "fp32,bf16,fp32", "--no-progress"]) == 2
    assert "--controllers lists fp32 more than once" in capsys.readouterr().err


def test_bad_input_is_one_clear_line_with_the_progress_bar_on(capsys):
    # Once a negative epoch budget reached the progress bar first, which raised a TypeError formatting it.
    assert main(["compare", "--task", "synthetic", "--epochs", "-1", "--out", "", "--log-dir", ""]) == 2
    err = capsys.readouterr().err
    assert "--epochs -1.0 must be a positive finite number" in err and "Traceback" not in err


def test_compare_runs_a_users_plain_loop_beside_the_controllers(tmp_path, capsys):
    argv = ["compare", "--task", "synthetic", "--controllers", "plain-fp32,fp32", "--seeds", "1", "--epochs", "0.5",
            "--cost-mode", "measured", "--reference", "plain-fp32", "--log-dir", "", "--out", str(tmp_path / "r.json"),
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| plain-fp32 |" in printed and "| static-fp32 |" in printed
    payload = json.loads((tmp_path / "r.json").read_text())
    assert (payload["meta"]["reference"], payload["meta"]["device"]) == ("plain-fp32", cpu_machine())  # --reference
    rows = {row["controller"]: row for row in payload["rows"]}
    static, plain = rows["static-fp32"], rows["plain-fp32"]
    assert static["time_ratio"] == static["time_s_mean"] / plain["time_s_mean"]  # against the plain row
    assert static["final_metric_mean"] == plain["final_metric_mean"]  # the same updates, step for step


def test_compare_runs_with_a_controller_preset(tmp_path, monkeypatch):
    import triaccel_rl.compare as compare_module
    from triaccel_rl.config import ControllerConfig

    seen = []
    real = compare_module.compare

    def spy(*args, **kwargs):
        seen.append(kwargs["config"])
        return real(*args, **kwargs)

    monkeypatch.setattr(compare_module, "compare", spy)
    argv = ["compare", "--task", "synthetic", "--controllers", "heuristic", "--seeds", "1", "--epochs", "0.5",
            "--interval-steps", "5", "--preset", "anneal", "--log-dir", "", "--out", "", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert seen == [ControllerConfig.preset("anneal", interval_steps=5)]
    seen.clear()  # without --interval-steps, the preset's own interval (it was 20 whatever the preset)
    assert main([a for a in argv if a not in ("--interval-steps", "5")] + ["--preset", "safe"]) == 0
    assert seen == [ControllerConfig.preset("safe")] and seen[0].interval_steps == 50


def test_compare_takes_an_lr_ladder(monkeypatch):
    """``--lr-scales`` overrides the preset's ladder: the deep annealing row of the GPU benchmark from the CLI."""
    import triaccel_rl.compare as compare_module
    from triaccel_rl.config import ControllerConfig

    seen = []
    monkeypatch.setattr(compare_module, "compare", lambda *args, **kwargs: seen.append(kwargs["config"]) or [])
    monkeypatch.setattr(compare_module, "summarize", lambda *args, **kwargs: {})
    monkeypatch.setattr(compare_module, "format_table", lambda *args, **kwargs: "")
    argv = ["compare", "--task", "synthetic", "--controllers", "heuristic", "--seeds", "1", "--interval-steps", "5",
            "--preset", "anneal", "--lr-scales", "0.25, 0.5,0.75,1,1.25,1.5", "--log-dir", "", "--out", "",
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    ladder = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
    assert seen == [ControllerConfig.preset("anneal", interval_steps=5, lr_scales=ladder)]


def test_compare_clips_every_row_with_max_grad_norm(tmp_path, capsys):
    """``--max-grad-norm`` reaches the controller rows and the plain loop alike: clipped hard, both end elsewhere
    than unclipped, and still equal to each other."""

    def final_metrics(*extra):
        out = tmp_path / "r.json"
        argv = ["compare", "--task", "synthetic", "--controllers", "plain-fp32,fp32", "--seeds", "1",
                "--epochs", "0.5", "--cost-mode", "measured", "--log-dir", "", "--out", str(out),
                "--no-progress", *extra]  # fmt: skip
        assert main(argv) == 0
        return {row["controller"]: row["final_metric_mean"] for row in json.loads(out.read_text())["rows"]}

    clipped, unclipped = final_metrics("--max-grad-norm", "0.05"), final_metrics()
    assert clipped["plain-fp32"] == clipped["static-fp32"]
    assert abs(clipped["static-fp32"] - unclipped["static-fp32"]) > 0.02


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0.5,x,1", "--lr-scales '0.5,x,1': 'x' is not a number"),
        (",", "--lr-scales ',' is empty"),
        ("0.5,0.75", r"--lr-scales \(0.5, 0.75\) must contain 1.0"),
    ],
)
def test_compare_rejects_a_bad_lr_ladder(value, message, capsys):
    argv = ["compare", "--task", "synthetic", "--controllers", "heuristic", "--lr-scales", value, "--log-dir", "",
            "--out", "", "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    assert re.search(message, capsys.readouterr().err)


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "triaccel_rl.cli", "tasks"], capture_output=True, text=True)
    assert result.returncode == 0 and "cnn-fmnist" in result.stdout


def test_tasks_lists_every_task_with_its_target_to_a_tenth_of_a_point(capsys):

    assert main(["tasks"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == sorted(TASKS)
    assert len({line.index(TASKS[line.split()[0]].description) for line in lines}) == 1  # one column
    sgd = next(line for line in lines if line.startswith("dwcnn-sgd-fmnist "))
    assert sgd.endswith("(target accuracy 66.5%)")  # 0.665 printed as 66% before


def test_controller_example_runs(tmp_path):
    sys.path.insert(0, "experiments")
    try:
        import controller_loop
    finally:
        sys.path.pop(0)
    accuracy = controller_loop.main(controller_loop.Args(epochs=1, n_train=2000, log_dir=str(tmp_path)))
    assert accuracy > 0.6
    # A bad argument is one line naming it, before the data loads (a bad policy was a traceback from the Controller).
    for args, message in (
        (controller_loop.Args(policy="fp8"), "--policy: unknown policy 'fp8'; allowed: fp32, bf16, fp16, heuristic"),
        (controller_loop.Args(policy=str(tmp_path / "none.zip")), "--policy: policy file"),
        (controller_loop.Args(batch_size=0), "--batch-size 0 must be >= 1"),
        (controller_loop.Args(policy="batch-finder"), "--policy batch-finder: a batch finder is a compare baseline"),
        (controller_loop.Args(max_grad_norm=float("nan")), "--max-grad-norm nan must be a positive finite number"),
        (controller_loop.Args(probe=1), "--probe 1 must be 0 (no rounds) or >= 2"),
        (controller_loop.Args(n_train=60_000), "--probe 256 must be 0 (no rounds) or >= 2, with --n-train + --probe"),
    ):
        with pytest.raises(SystemExit, match=re.escape(message)):
            controller_loop.main(args)


def test_profile_writes_a_loadable_profile(tmp_path, capsys):
    from triaccel_rl.config import HardwareProfile

    out = tmp_path / "profile.json"
    assert main(["profile", "--device", "cpu", "--small", "--batch-size", "8", "--steps", "2", "--out", str(out)]) == 0
    profile = HardwareProfile.load(out)
    assert set(profile.time_factor) == {"fp32", "bf16", "fp16"}
    assert profile.memory_factor == {"fp32": 1.0, "bf16": 1.0, "fp16": 1.0}  # no allocator to read on a CPU
    assert profile.throughput_scale > 0 and profile.fixed_ms > 0
    # ... and it says so: the file alone looked like a measured GPU's
    err = capsys.readouterr().err
    assert "profiling cpu" in err and "memory factors are not measured on a CPU" in err


def test_profile_factors_are_the_measured_ratios(tmp_path, monkeypatch, capsys):
    """With the step timer stubbed: each time factor is its precision's median above the fixed time over fp32's (the
    part of a step ``CostModel.step_ms`` scales by it), the fixed time is the tiny MLP's step, and the throughput
    scale is the rest of fp32's step over the batch's MFLOPs (3 forwards a step)."""
    import triaccel_rl.profiling as profiling
    from triaccel_rl.costs import CostModel
    from triaccel_rl.models import MLP, SmallResNet
    from triaccel_rl.precision import find_layers

    ms = {Precision.FP32: 10.0, Precision.BF16: 4.0, Precision.FP16: 3.0}
    peaks = {Precision.FP32: 100.0, Precision.BF16: 60.0, Precision.FP16: 50.0}
    monkeypatch.setattr(
        profiling,
        "_time_steps",
        lambda model, x, y, p, steps: (0.5, 1.0) if isinstance(model, MLP) else (ms[p], peaks[p]),
    )
    profile = profiling.measure_profile("cpu", batch_size=8, steps=2, small=True)
    assert "profile" not in capsys.readouterr().err  # no bar unless asked
    assert profiling.measure_profile("cpu", batch_size=8, steps=2, small=True, progress=True) == profile
    err = capsys.readouterr().err  # a bar over the three precisions and the fixed cost: minutes on a CPU, unsaid
    assert "profile: 100%" in err and "4/4" in err
    assert profile.time_factor == {"fp32": 1.0, "bf16": (4.0 - 0.5) / (10.0 - 0.5), "fp16": (3.0 - 0.5) / (10.0 - 0.5)}
    assert profile.memory_factor == {"fp32": 1.0, "bf16": 0.6, "fp16": 0.5}
    model = SmallResNet(3, (8, 16), 10)
    costs = CostModel.measure(model, [info for _, _, info in find_layers(model)], torch.zeros(1, 3, 32, 32), 1)
    assert profile.fixed_ms == 0.5
    assert profile.throughput_scale == pytest.approx((10.0 - 0.5) / (8 * 3 * costs.flops_per_sample.sum() / 1e6))


def test_a_profiled_step_time_is_the_median_of_the_timed_steps_after_the_warm_up(monkeypatch):
    """On a fake clock that each forward moves on: 3 warm-up steps of 4 s, then 125, 250 and 2000 ms. The step time
    is 250 ms (their mean is 791.7 ms; timing the warm-up instead gives 4000 ms). The steps are powers of two of a
    second, so the clock's differences are exact."""
    import types

    import triaccel_rl.profiling as profiling

    clock = [0.0]
    monkeypatch.setattr(profiling, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    class Timed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(4, 2)
            self.seconds = iter([4.0, 4.0, 4.0, 0.125, 0.25, 2.0])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            clock[0] += next(self.seconds)
            return self.linear(x)

    step_ms, peak = profiling._time_steps(Timed(), torch.zeros(2, 4), torch.tensor([0, 1]), Precision.FP32, steps=3)
    assert (step_ms, peak) == (250.0, 1.0)  # no allocator to read on a CPU


def test_measure_profile_leaves_the_callers_random_number_generator_as_it_was(monkeypatch):
    """The measurement seeds and draws (torch.manual_seed(0), the batch); the caller's next draw is unchanged."""
    import triaccel_rl.profiling as profiling

    monkeypatch.setattr(profiling, "_time_steps", lambda model, x, y, p, steps: (2.0, 1.0))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    profiling.measure_profile("cpu", batch_size=2, steps=1, small=True)
    assert torch.equal(torch.rand(3), expected)


def test_measure_profile_times_the_same_batch_whatever_the_callers_random_state(monkeypatch):
    """The batch was drawn before the measurement seeded, from the caller's generator: each call timed other inputs."""
    import triaccel_rl.profiling as profiling

    batches = []
    monkeypatch.setattr(profiling, "_time_steps", lambda model, x, y, p, steps: (batches.append((x, y)), (2.0, 1.0))[1])
    for caller_seed in (1, 2):
        torch.manual_seed(caller_seed)
        profiling.measure_profile("cpu", batch_size=2, steps=1, small=True)
    (x1, y1), (x2, y2) = batches[0], batches[len(batches) // 2]
    assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_profile_refuses_an_unwritable_out_before_measuring(tmp_path, capsys, monkeypatch):
    import triaccel_rl.profiling
    from triaccel_rl.config import HardwareProfile

    measured = []
    monkeypatch.setattr(triaccel_rl.profiling, "measure_profile", lambda *args, **kwargs: measured.append(args))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["profile", "--device", "cpu", "--out", str(blocker / "profile.json")]) == 2
    assert f"--out {blocker / 'profile.json'}: cannot create its folder" in capsys.readouterr().err
    assert main(["profile", "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path}: is a folder; give a file path such as" in capsys.readouterr().err
    assert measured == []  # nothing was measured for either
    nested = tmp_path / "new" / "folder" / "profile.json"
    monkeypatch.setattr(triaccel_rl.profiling, "measure_profile", lambda *args, **kwargs: HardwareProfile.load())
    assert main(["profile", "--device", "cpu", "--out", str(nested)]) == 0
    assert HardwareProfile.load(nested) == HardwareProfile.load()  # its folder was made


@pytest.mark.parametrize(
    ("flags", "error"),
    [
        (["--device", "mps"], "--device 'mps' is not supported: use cpu, cuda or cuda:N"),
        (["--device", "cpu", "--steps", "0"], "--steps 0 must be a positive integer"),
    ],
)
def test_profile_refuses_its_arguments_before_saying_anything_of_the_device(tmp_path, capsys, flags, error):
    """It printed "profiling mps (no --device cuda): its times are this CPU's..." before refusing the device."""
    assert main(["profile", *flags, "--out", str(tmp_path / "profile.json")]) == 2
    err = capsys.readouterr().err
    assert error in err
    assert "profiling" not in err and not (tmp_path / "profile.json").exists()


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory"),
        RuntimeError("CUDA error: out of memory"),  # as the elastic loop's recovery reads them
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
        RuntimeError("Storage size calculation overflowed with sizes=[36028797018963968, 3, 32, 32]"),
    ],
)
def test_a_profile_batch_the_device_cannot_hold_is_one_line_naming_the_flag(tmp_path, capsys, monkeypatch, error):
    """Out of memory (injected in the timed steps) ended in a traceback and exit 1; other errors still propagate."""
    import triaccel_rl.profiling as profiling

    def out_of_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr(profiling, "_time_steps", out_of_memory)
    assert (
        main(["profile", "--device", "cpu", "--small", "--batch-size", "4096", "--out", str(tmp_path / "p.json")]) == 2
    )
    first = str(error).splitlines()[0]
    assert f"--batch-size 4096 does not fit in cpu's memory ({first}); give a smaller one" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()
    monkeypatch.setattr(profiling, "_time_steps", lambda *args, **kwargs: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        profiling.measure_profile("cpu", batch_size=8, steps=1, small=True)


def test_the_time_column_names_the_device_of_the_profile_that_modelled_it(tmp_path, capsys):
    """A profile measured on this CPU (``profile --small``) was labelled 'modelled GPU' all the same."""
    from triaccel_rl.config import HardwareProfile

    shipped = HardwareProfile.load()
    HardwareProfile(**{**shipped.__dict__, "device": "Intel Xeon (measured here)"}).save(tmp_path / "p.json")
    argv = ["compare", "--task", "synthetic", "--controllers", "fp32", "--seeds", "1", "--epochs", "0.2"]
    assert main([*argv, "--no-progress", "--out", "", "--log-dir", "", "--profile", str(tmp_path / "p.json")]) == 0
    assert "| controller | final acc | time (s, modelled Intel Xeon) |" in capsys.readouterr().out


def test_a_profile_names_the_factors_it_did_not_measure(tmp_path, monkeypatch):
    """Factors of 1.0 written for what was not measured (memory on a CPU, bf16 on a GPU without it) read as
    measured: the profile's device now says which."""
    import triaccel_rl.profiling as profiling
    from triaccel_rl.models import MLP

    monkeypatch.setattr(
        profiling, "_time_steps", lambda model, x, y, p, steps: (0.5, 1.0) if isinstance(model, MLP) else (4.0, 1.0)
    )
    profile = profiling.measure_profile("cpu", batch_size=8, steps=2, small=True)
    assert profile.device.endswith("; memory factors not measured on a CPU)")
    monkeypatch.setattr(profiling, "_runs", lambda precision, device: precision is not Precision.BF16)
    profile = profiling.measure_profile("cpu", batch_size=8, steps=2, small=True)
    assert profile.time_factor["bf16"] == 1.0 and profile.memory_factor["bf16"] == 1.0
    assert profile.device.endswith("on a CPU; bf16 not native here: its factors are fp32's)")


def test_out_is_refused_when_its_folder_takes_no_new_file(tmp_path, capsys, monkeypatch):
    """The saves write a temporary file beside the target and move it: a writable file in a folder that takes no
    new file was accepted, and the save failed after the work. (Root writes anywhere: the folder is faked.)"""
    import tempfile

    import triaccel_rl.profiling

    measured = []
    monkeypatch.setattr(triaccel_rl.profiling, "measure_profile", lambda *args, **kwargs: measured.append(args))
    out = tmp_path / "locked" / "profile.json"
    out.parent.mkdir()
    out.write_text("{}")
    real = tempfile.TemporaryFile

    def refuse_locked(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == out.parent:
            raise PermissionError(13, "Permission denied", str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse_locked)
    assert main(["profile", "--device", "cpu", "--out", str(out)]) == 2
    assert f"--out {out}: cannot write a file in its folder" in capsys.readouterr().err
    assert measured == [] and out.read_text() == "{}"


def test_library_names_become_flags_but_not_inside_a_python_hint():
    """``ControllerConfig(lr_scales=...)`` in a library message read "ControllerConfig(--lr-scales ...)"."""
    from triaccel_rl.cli import _as_flags

    options = {"lr_scales": None, "n_envs": 2}
    message = "lr_scales=[1] and (n_envs=3): run it with ControllerConfig(lr_scales=...) or f(x, n_envs=2)"
    assert _as_flags(message, options) == (
        "--lr-scales [1] and (--n-envs 3): run it with ControllerConfig(lr_scales=...) or f(x, --n-envs 2)"
    )


def test_a_comparison_refused_for_a_later_folder_leaves_the_earlier_ones_neither(tmp_path, capsys):
    """``--out new/r.json --plots newplots --log-dir AFILE`` made new/ and newplots/, then refused the log folder."""
    blocker = tmp_path / "afile"
    blocker.write_text("")
    argv = ["compare", "--task", "synthetic", "--controllers", "fp32", "--seeds", "1", "--no-progress"]
    out, plots = tmp_path / "new" / "r.json", tmp_path / "newplots"
    assert main([*argv, "--out", str(out), "--plots", str(plots), "--log-dir", str(blocker / "tb")]) == 2
    assert "--log-dir" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    # --out a dangling link: the folder made for its target is removed too
    link = tmp_path / "r.json"
    link.symlink_to(tmp_path / "elsewhere" / "deep" / "r.json")
    assert main([*argv, "--out", str(link), "--log-dir", str(blocker / "tb")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "r.json"]


def test_an_empty_log_dir_scans_nothing_and_says_nothing(tmp_path, capsys, monkeypatch):
    """``--log-dir ''`` is none: the check for an earlier comparison's runs walked the working folder ('' is '.')."""
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "events.out.tfevents.1.host").write_text("")
    monkeypatch.chdir(tmp_path)
    argv = ["compare", "--task", "synthetic", "--controllers", "fp32", "--seeds", "1", "--epochs", "0.2"]
    assert main([*argv, "--no-progress", "--out", "", "--log-dir", ""]) == 0
    assert "holds an earlier comparison's TensorBoard runs" not in capsys.readouterr().err


def test_train_policy_resumes_past_evaluations_cut_short(tmp_path, capsys, caplog):
    """A Ctrl-C or a full disk while SB3 rewrote eval/evaluations.npz left it cut short: --resume then ended in a
    traceback, zipfile.BadZipFile naming no file. Now the file is set aside, said, and the run goes on."""
    shipped = Path(__file__).parents[1] / "triaccel_rl" / "pretrained"
    for name in ("policy.zip", "policy.obs.json"):
        shutil.copy(shipped / name, tmp_path / name)
    evaluations = tmp_path / "eval" / "evaluations.npz"
    evaluations.parent.mkdir()
    evaluations.write_bytes(b"PK\x03\x04 cut short")
    argv = ["train-policy", "--tasks", "synthetic", "--timesteps", "8", "--n-envs", "1", "--vec", "dummy",
            "--n-steps", "8", "--batch-size", "8", "--interval-steps", "10", "--budget-intervals", "2",
            "--eval-tasks", "synthetic", "--eval-every", "8", "--no-progress", "--log-dir", "",
            "--out", str(tmp_path / "policy.zip"), "--resume", str(tmp_path / "policy.zip")]  # fmt: skip
    with caplog.at_level("WARNING", logger="triaccel_rl"):
        assert main(argv) == 0
    assert capsys.readouterr().err == ""
    aside = tmp_path / "eval" / "evaluations_until_4096_steps.npz"
    assert aside.read_bytes() == b"PK\x03\x04 cut short"
    assert f"{evaluations} holds evaluations that cannot be read (BadZipFile: " in caplog.text
    assert f"moved it to {aside}" in caplog.text


def test_a_policy_with_binary_observation_stats_is_one_line_naming_the_file(tmp_path, capsys):
    """A binary .obs.json was refused with the decoder's "'utf-8' codec can't decode byte 0xff ...", no file named."""
    shipped = Path(__file__).parents[1] / "triaccel_rl" / "pretrained"
    policy = tmp_path / "policy.zip"
    shutil.copy(shipped / "policy.zip", policy)
    stats = policy.with_suffix(".obs.json")
    stats.write_bytes(b"\xff\xfe\x00garbage")
    argv = ["compare", "--task", "synthetic", "--controllers", str(policy), "--seeds", "1", "--epochs", "0.2",
            "--no-progress", "--log-dir", "", "--out", str(tmp_path / "r.json")]  # fmt: skip
    assert main(argv) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"triaccel-rl compare: error: observation stats {str(stats)!r} cannot be read: 'utf-8' codec can't decode "
        "byte 0xff in position 0: invalid start byte"
    ]

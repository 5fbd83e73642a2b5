"""What the commands show while they run: log lines beside the progress bars, bars only on a terminal, TensorBoard
points only for what was measured, the resume's message, and where the data warning points."""

import contextlib
import io
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import triaccel_rl.compare as compare_module
import triaccel_rl.profiling as profiling
from triaccel_rl import data
from triaccel_rl.cli import main
from triaccel_rl.compare import compare
from triaccel_rl.data import DatasetError, find_fashion_mnist, load_fashion_mnist
from triaccel_rl.rl import _resumes_its_own_run, _tensorboard_run
from triaccel_rl.tasks import get_task

_COMPARE = ["compare", "--task", "synthetic", "--controllers", "fp32", "--seeds", "1", "--epochs", "0.05",
            "--log-dir", "", "--out", ""]  # fmt: skip
_WARNING = "WARNING triaccel_rl: a warning logged while the bar is drawn"


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal, as tqdm asks (``disable=None`` draws the bar only there)."""

    def isatty(self) -> bool:
        return True


@contextlib.contextmanager
def _on_a_terminal() -> Iterator[_Terminal]:
    """A command's process on a terminal: stderr a :class:`_Terminal`, and no handler on root, so ``main``'s basicConfig
    installs the command's (pytest's on root made it a no-op). Entered in the test's body: pytest sets its own stderr
    and adds its handlers as the test starts, and finds them as they were when it ends."""
    stderr, handlers, level = sys.stderr, logging.root.handlers, logging.root.level
    terminal = _Terminal()
    sys.stderr, logging.root.handlers = terminal, []
    try:
        yield terminal
    finally:
        sys.stderr, logging.root.handlers = stderr, handlers
        logging.root.setLevel(level)


def _log_once(calls: list[int]) -> None:
    if not calls:
        logging.getLogger("triaccel_rl").warning(_WARNING.removeprefix("WARNING triaccel_rl: "))
    calls.append(1)


def _shown_lines(stderr: str) -> list[str]:
    """Each line as a terminal shows it at its end: what the last carriage return left (a bar redraws over itself)."""
    return [line.split("\r")[-1] for line in stderr.removesuffix("\n").split("\n")]


def test_a_warning_logged_during_the_compare_bar_gets_a_line_of_its_own(monkeypatch):
    """It landed inside the bar's line (``...pretrained seed 0]WARNING triaccel_rl: ...``), the bar's redraw after
    it."""
    calls: list[int] = []
    advance = compare_module._advance

    def advance_and_log(*args):
        _log_once(calls)
        return advance(*args)

    monkeypatch.setattr(compare_module, "_advance", advance_and_log)
    with _on_a_terminal() as terminal:
        assert main(_COMPARE) == 0
    shown = _shown_lines(terminal.getvalue())
    assert calls and _WARNING in shown[:-1]  # the warning's line holds nothing else
    assert shown[-1].startswith("compare synthetic: 100%|")  # the bar drawn again under it, to its end


def test_a_warning_logged_during_the_profile_bar_gets_a_line_of_its_own(monkeypatch, tmp_path):
    calls: list[int] = []

    def timed(model, x, y, precision, steps):  # the timing stubbed: the bar and the log are what is tested
        _log_once(calls)
        return 1.0, 1.0

    monkeypatch.setattr(profiling, "_time_steps", timed)
    with _on_a_terminal() as terminal:
        assert main(["profile", "--device", "cpu", "--small", "--batch-size", "2", "--steps", "1",
                     "--out", str(tmp_path / "p.json")]) == 0  # fmt: skip
    shown = _shown_lines(terminal.getvalue())
    assert calls and _WARNING in shown[:-1]
    assert shown[-1].startswith("profile: 100%|") and "| 4/4 [" in shown[-1]


def test_profile_no_progress_hides_the_bar_on_a_terminal(monkeypatch, tmp_path):
    monkeypatch.setattr(profiling, "_time_steps", lambda model, x, y, precision, steps: (1.0, 1.0))
    argv = ["profile", "--device", "cpu", "--small", "--batch-size", "2", "--steps", "1"]
    with _on_a_terminal() as terminal:
        assert main([*argv, "--out", str(tmp_path / "shown.json")]) == 0
    assert "profile: 100%|" in terminal.getvalue()  # the terminal shows it without the flag
    with _on_a_terminal() as terminal:
        assert main([*argv, "--out", str(tmp_path / "quiet.json"), "--no-progress"]) == 0
    err = terminal.getvalue()
    assert "triaccel-rl profile: profiling cpu" in err  # the note stays
    assert "\r" not in err and "profile:" not in err.replace("triaccel-rl profile:", "")


def test_a_bar_on_stderr_that_is_not_a_terminal_is_not_drawn_unless_forced(monkeypatch, tmp_path, capsys):
    """Redirected to a file, every redraw was written into it, joined by carriage returns (7.8 KB for an 85-s compare).

    capsys's stderr is no terminal. The library's True still draws the bar (into the file), as its docs say."""
    assert main(_COMPARE) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "compare synthetic" not in err

    monkeypatch.setattr(profiling, "_time_steps", lambda model, x, y, precision, steps: (1.0, 1.0))
    assert main(["profile", "--device", "cpu", "--small", "--batch-size", "2", "--steps", "1",
                 "--out", str(tmp_path / "p.json")]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "\r" not in err and "profile: " not in err.replace("triaccel-rl profile: ", "")
    profiling.measure_profile("cpu", batch_size=2, steps=1, small=True, progress=None)
    assert capsys.readouterr().err == ""
    profiling.measure_profile("cpu", batch_size=2, steps=1, small=True, progress=True)
    assert "profile: 100%|" in capsys.readouterr().err


@pytest.mark.usefixtures("frozen_gc")
def test_train_policy_draws_no_bar_into_a_file_by_default(tmp_path, capsys):
    argv = ["train-policy", "--tasks", "synthetic", "--timesteps", "8", "--n-envs", "1", "--vec", "dummy",
            "--n-steps", "8", "--batch-size", "8", "--interval-steps", "2", "--max-decisions", "3",
            "--budget-intervals", "2", "--torch-threads", "1", "--warm-start", "heuristic", "--warm-start-steps", "2",
            "--warm-start-epochs", "1", "--log-dir", "", "--out", str(tmp_path / "p.zip")]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "warm start:" not in err and "train-policy:" not in err


def test_a_plain_row_on_the_cpu_writes_no_peak_memory_point(tmp_path):
    """Its peak of 0 is "not measured" (the table's dash): TensorBoard drew ``memory/peak_bytes = 0.0``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [result] = compare("synthetic", ["plain-fp32"], [0], epochs=0.05, cost_mode="measured", device="cpu",
                       log_dir=tmp_path, show_progress=False)  # fmt: skip
    assert result.peak_bytes == 0
    events = EventAccumulator(str(tmp_path / "plain-fp32-seed0"))
    events.Reload()
    assert events.Tags()["scalars"] == ["test/metric_vs_time_us"]


def test_a_resume_of_a_policy_beside_out_says_it_is_neither_out_nor_its_checkpoint(tmp_path, caplog):
    """``--resume tp6/policy.zip --out tp6/policy_v2.zip`` was "another folder's policy than out's": the same folder."""
    resume, out, log_dir = tmp_path / "policy.zip", tmp_path / "policy_v2.zip", tmp_path / "tb"
    recorded = log_dir / "PPO_1"
    recorded.mkdir(parents=True)
    own = _resumes_its_own_run(resume, out.parent / "checkpoints", out.stem)
    with caplog.at_level("WARNING", logger="triaccel_rl"):
        run, continued = _tensorboard_run(log_dir, resume, str(recorded), own=own, out=out)
    assert (own, run, continued) == (False, log_dir / "PPO_2", False)
    assert caplog.messages == [
        f"resume={resume} is neither out={out} nor one of its checkpoints "
        f"({tmp_path / 'checkpoints' / 'policy_v2_<N>_steps.zip'}): its run {recorded} is left to it: its curve goes "
        f"on in a new TensorBoard run, {log_dir / 'PPO_2'} (no run is marked)"
    ]


def test_the_data_warning_points_at_the_users_line_through_every_public_entry(tmp_path, monkeypatch):
    """``stacklevel=2`` named ``load_fashion_mnist``'s own line in data.py, and a task's data a line in tasks.py."""
    monkeypatch.setenv("TRIACCEL_DATA", str(tmp_path))  # no files there: warned, then looked for elsewhere
    monkeypatch.setattr(data, "DEFAULT_FASHION_MNIST_DIR", tmp_path / "no-such-default")
    for entry in (find_fashion_mnist, load_fashion_mnist, lambda: get_task("mlp-fmnist").data(0)):
        with pytest.warns(UserWarning, match="TRIACCEL_DATA") as record, pytest.raises(DatasetError):
            line = sys._getframe().f_lineno + 1
            entry()
        if entry.__name__ == "<lambda>":  # the lambda's own line, in this file too
            line = entry.__code__.co_firstlineno
        assert [(Path(w.filename), w.lineno) for w in record] == [(Path(__file__), line)]

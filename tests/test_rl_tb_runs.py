"""train_policy's TensorBoard runs: each policy's zips record its run, and a resume writes and marks that run only."""

import json
import shutil
import zipfile
from pathlib import Path

import pytest

from triaccel_rl.rl import train_policy

pytestmark = pytest.mark.usefixtures("frozen_gc")  # every environment reset runs gc.collect()

_TINY = {"vec": "dummy", "n_envs": 1, "max_decisions": 3, "interval_steps": 2, "budget_intervals": 2,
         "torch_threads": 1, "n_steps": 8, "batch_size": 4}  # fmt: skip


def _recorded(policy: Path) -> object:
    """The TensorBoard run a policy zip records (SB3 saves the model's attributes in the zip's ``data``)."""
    with zipfile.ZipFile(policy) as archive:
        return json.loads(archive.read("data")).get("tensorboard_run")


def _marks(run: Path) -> list[int]:
    """The steps of the purge marks (``SessionLog`` events) in the run folder's event files."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return [
        event.step
        for file in sorted(run.glob("events.out.tfevents.*"))
        for event in EventFileLoader(str(file)).Load()
        if event.HasField("session_log")
    ]


def _shown(run: Path, tag: str = "rollout/ep_rew_mean") -> list[int]:
    """The steps TensorBoard shows of ``tag`` in the run folder (the points a purge mark drops left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run))
    events.Reload()
    return [point.step for point in events.Scalars(tag)]


def _written(file: Path, tag: str = "rollout/ep_rew_mean") -> list[int]:
    """The steps of every point of ``tag`` in one event file, as written (before any purge mark drops one)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return [
        event.step
        for event in EventFileLoader(str(file)).Load()
        if event.HasField("summary") and any(value.tag == tag for value in event.summary.value)
    ]


def _contents(folder: Path) -> dict[str, bytes]:
    return {str(file.relative_to(folder)): file.read_bytes() for file in sorted(folder.rglob("*")) if file.is_file()}


def test_a_resume_into_a_shared_log_dir_writes_and_marks_its_own_run_only(tmp_path, caplog):
    """Policy A trained into tb/PPO_1, then B into tb/PPO_2: A resumed from its 8-step checkpoint went on writing the
    newest run, B's, whose points past 8 its purge mark hid (B's 16 gone, A's 16 and 24 shown after its 8)."""
    tb = tmp_path / "tb"
    a, b = tmp_path / "a" / "policy.zip", tmp_path / "b" / "policy.zip"
    train_policy(["synthetic"], total_timesteps=16, out=a, log_dir=tb, checkpoint_every=8, **_TINY)
    train_policy(["synthetic"], total_timesteps=16, out=b, log_dir=tb, **_TINY)
    checkpoint = a.parent / "checkpoints" / "policy_8_steps.zip"
    others = _contents(tb / "PPO_2")
    with caplog.at_level("INFO", logger="triaccel_rl"):
        train_policy(["synthetic"], total_timesteps=16, out=a, log_dir=tb, resume=checkpoint, **_TINY)
    assert sorted(run.name for run in tb.iterdir()) == ["PPO_1", "PPO_2"]
    assert _contents(tb / "PPO_2") == others  # B's run untouched
    assert (_marks(tb / "PPO_1"), _marks(tb / "PPO_2")) == ([9], [])
    assert _shown(tb / "PPO_2") == [8, 16]
    first, resumed = sorted((tb / "PPO_1").glob("events.out.tfevents.*"))
    assert (_written(first), _written(resumed)) == ([8, 16], [16, 24])  # the replaced run's 16 and the resumed run's
    assert _shown(tb / "PPO_1") == [8, 16, 24]  # the mark at 9 drops the replaced run's 16
    assert [_recorded(p) for p in (a, checkpoint, b)] == [
        str((tb / run).resolve()) for run in ("PPO_1",) * 2 + ("PPO_2",)
    ]
    assert f"its curve goes on in its TensorBoard run {(tb / 'PPO_1').resolve()}" in caplog.text


def _drop_record(policy: Path) -> None:
    """Rewrites the zip as one saved before runs were recorded: without ``tensorboard_run``."""
    with zipfile.ZipFile(policy) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    data = json.loads(members["data"])
    data.pop("tensorboard_run", None)
    members["data"] = json.dumps(data).encode()
    with zipfile.ZipFile(policy, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)


@pytest.mark.parametrize(
    ("case", "why"),
    [
        ("no record", "records no TensorBoard run"),
        ("run gone", "which is gone"),
        ("another folder", "nor one of its checkpoints"),
    ],
)
def test_a_resume_that_cannot_continue_its_own_run_starts_a_new_one_and_marks_none(tmp_path, caplog, case, why):
    """A checkpoint without the record (saved before runs were recorded), one whose run is gone, or another folder's
    policy: a new run, no purge mark anywhere, the other runs untouched, and a warning saying why."""
    tb = tmp_path / "tb"
    a = tmp_path / "a" / "policy.zip"
    train_policy(["synthetic"], total_timesteps=8, out=a, log_dir=tb, **_TINY)
    out = a
    if case == "no record":
        _drop_record(a)
    elif case == "run gone":
        shutil.rmtree(tb / "PPO_1")
    else:
        out = tmp_path / "c" / "policy.zip"
    before = _contents(tb)
    with caplog.at_level("WARNING", logger="triaccel_rl"):
        train_policy(["synthetic"], total_timesteps=8, out=out, log_dir=tb, resume=a, **_TINY)
    new = tb / ("PPO_1" if case == "run gone" else "PPO_2")  # one past the highest left in tb
    assert {name: content for name, content in _contents(tb).items() if not name.startswith(new.name)} == before
    assert {run.name: _marks(run) for run in tb.iterdir()} == {run.name: [] for run in tb.iterdir()}
    assert _shown(new) == [16]
    assert why in caplog.text and f"its curve goes on in a new TensorBoard run, {new}" in caplog.text
    assert _recorded(out) == str(new.resolve())

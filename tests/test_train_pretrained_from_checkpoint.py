"""``train_pretrained.py --from-checkpoint`` leaves the run folder as it was where it fails; bad algorithm names."""

import re
import shutil
from pathlib import Path

import pytest
from experiment_scripts import import_experiment
from triaccel_rl.policies import LearnedPolicy, PolicyLoadError, pretrained_policy_path

from triaccel_rl.rl import obs_stats_path
from triaccel_rl.shield import ObservationStats


@pytest.fixture
def finished_run(tmp_path):
    """A run folder holding a finished run's policy and its stats (stand-ins: only their bytes are compared)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "policy.zip").write_bytes(b"the finished run's policy")
    (run / "policy.obs.json").write_text("the finished run's stats")
    return run


def _contents(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def _ship(run: Path, checkpoint: Path) -> dict:
    train_pretrained = import_experiment("train_pretrained")
    args = train_pretrained.Args(run_dir=str(run), from_checkpoint=str(checkpoint), smoke=True)
    return train_pretrained.main(args)


def test_a_truncated_or_missing_checkpoint_is_named_and_leaves_the_run_folder_as_it_was(finished_run, tmp_path):
    """The checkpoint was copied over the run's policy.zip before it was read: a truncated one left a broken
    policy.zip beside the old policy's stats and an error naming the copy; a missing one a FileNotFoundError."""
    before = _contents(finished_run)
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(pretrained_policy_path().read_bytes()[:20000])
    message = f"--from-checkpoint: cannot load policy '{truncated}': it holds no 'data' member"
    with pytest.raises(SystemExit, match=re.escape(message)):
        _ship(finished_run, truncated)
    assert _contents(finished_run) == before
    missing = tmp_path / "missing.zip"
    with pytest.raises(SystemExit, match=re.escape(f"--from-checkpoint: {missing} not found")):
        _ship(finished_run, missing)
    assert _contents(finished_run) == before


def test_a_failure_in_the_checkpoints_rollouts_leaves_the_run_folder_as_it_was(finished_run, tmp_path, monkeypatch):
    """The checkpoint was copied over policy.zip before its rollouts ran: a failure in them (Ctrl-C) left the new
    policy beside the old policy's stats."""
    train_pretrained = import_experiment("train_pretrained")
    checkpoint = tmp_path / "checkpoint.zip"
    shutil.copyfile(pretrained_policy_path(), checkpoint)

    def interrupted(zip_path, tasks, args):
        shutil.copyfile(obs_stats_path(pretrained_policy_path()), obs_stats_path(zip_path))
        raise KeyboardInterrupt

    monkeypatch.setattr(train_pretrained, "_stats_from_rollouts", interrupted)
    before = _contents(finished_run)
    with pytest.raises(KeyboardInterrupt):
        _ship(finished_run, checkpoint)
    assert _contents(finished_run) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint.zip", "run"]  # no stats beside it


def test_a_checkpoint_ships_as_it_is_with_its_own_rollouts_stats(finished_run, tmp_path):
    checkpoint = tmp_path / "checkpoints" / "policy_48_steps.zip"
    checkpoint.parent.mkdir()
    shutil.copyfile(pretrained_policy_path(), checkpoint)
    facts = _ship(finished_run, checkpoint)
    assert (finished_run / "policy.zip").read_bytes() == checkpoint.read_bytes()
    assert ObservationStats.load(finished_run / "policy.obs.json").interval_steps == 2  # --smoke's rollouts'
    assert facts["shipped_from_checkpoint"] == str(checkpoint)
    assert sorted(path.name for path in checkpoint.parent.iterdir()) == ["policy_48_steps.zip"]
    assert sorted(path.name for path in finished_run.iterdir()) == ["policy.obs.json", "policy.zip", "training.json"]


@pytest.mark.parametrize("algorithm", [None, 3])
def test_an_algorithm_that_is_not_a_name_is_refused_naming_it(algorithm):
    """None raised a bare AttributeError (from ``algorithm.lower()``)."""
    with pytest.raises(PolicyLoadError, match=rf"algorithm {algorithm!r} not supported; allowed: auto, ppo, a2c"):
        LearnedPolicy(pretrained_policy_path(), algorithm=algorithm)

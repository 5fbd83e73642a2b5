import os
import signal
import threading
import time

import numpy as np
import pytest

from triaccel_rl.rl import train_policy

pytestmark = pytest.mark.usefixtures("frozen_gc")  # every environment reset runs gc.collect()


def _read_worker_0_then(failure):
    """A SubprocVecEnv.step_wait that, at the 3rd step, reads worker 0's reply and then fails as ``failure`` does."""
    from stable_baselines3.common.vec_env import SubprocVecEnv

    original, calls = SubprocVecEnv.step_wait, []

    def step_wait(self):
        calls.append(None)
        if len(calls) == 3:
            self.remotes[0].recv()
            failure(self)
        return original(self)

    return step_wait


def _interrupt(venv):
    raise KeyboardInterrupt  # a Ctrl-C reaching the main process only (kill -INT <pid>)


def _kill_worker_1(venv):
    os.kill(venv.processes[1].pid, signal.SIGKILL)  # as the OOM killer does
    venv.processes[1].join()
    while True:
        venv.remotes[1].recv()  # a reply it sent before it died, then EOFError, as step_wait reads it


@pytest.mark.parametrize(("failure", "raised"), [(_interrupt, KeyboardInterrupt), (_kill_worker_1, EOFError)])
def test_a_step_failing_after_a_reply_was_read_closes_the_workers(tmp_path, monkeypatch, failure, raised):
    """SubprocVecEnv.close() waited for worker 0's reply to the failed step, which step_wait had already read: the
    run hung forever after saving its checkpoint (a worker killed by the OOM killer, a Ctrl-C to the main process)."""
    from stable_baselines3.common.vec_env import SubprocVecEnv

    monkeypatch.setattr(SubprocVecEnv, "step_wait", _read_worker_0_then(failure))
    outcome: list[BaseException] = []

    def run():
        try:
            train_policy(["synthetic"], total_timesteps=64, n_envs=2, vec="subproc", n_steps=8, batch_size=4,
                         interval_steps=2, budget_intervals=2, torch_threads=1, log_dir=None,
                         out=tmp_path / "policy.zip")  # fmt: skip
        except BaseException as error:
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)  # a hang fails the test instead of stopping the suite
    start = time.monotonic()
    thread.start()
    thread.join(timeout=45)
    assert not thread.is_alive(), "train_policy still running 45 s after a step failed: the workers' close hangs"
    assert len(outcome) == 1 and isinstance(outcome[0], raised), outcome
    assert time.monotonic() - start < 30
    if raised is KeyboardInterrupt:  # the interrupt's checkpoint, of the weights before any update
        assert (tmp_path / "checkpoints" / "policy_0_steps.zip").is_file()


_TINY = {"vec": "dummy", "n_envs": 1, "max_decisions": 3, "interval_steps": 2, "budget_intervals": 2,
         "torch_threads": 1, "n_steps": 8, "batch_size": 4, "checkpoint_every": 8}  # fmt: skip


def test_a_resume_without_evaluation_sets_aside_the_replaced_runs_evaluations(tmp_path, caplog, first_run):
    """Resumed from an earlier checkpoint without eval_tasks, the replaced run's evaluations past it stayed in
    eval/evaluations.npz, and a later evaluated resume continued them as its own."""
    out, evaluations = tmp_path / "policy.zip", tmp_path / "eval" / "evaluations.npz"
    first_run(["synthetic"], total_timesteps=24, out=out, eval_tasks=["synthetic"], eval_every=8, **_TINY)
    assert np.load(evaluations)["timesteps"].tolist() == [8, 16, 24]
    with caplog.at_level("WARNING", logger="triaccel_rl"):
        train_policy(["synthetic"], total_timesteps=8, out=out, resume=tmp_path / "checkpoints" / "policy_8_steps.zip",
                     **_TINY)  # fmt: skip
    kept = evaluations.with_name("evaluations_replaced_after_8_steps.npz")
    assert f"is kept as {kept}" in caplog.text
    assert np.load(kept)["timesteps"].tolist() == [8, 16, 24]
    with np.load(evaluations) as saved:
        assert saved["timesteps"].tolist() == [8]
        assert saved["results"].shape == saved["ep_lengths"].shape == (1, 1)
    # Resumed from this run's end (16), evaluated: the curve goes on from the resumed run's own evaluations.
    train_policy(["synthetic"], total_timesteps=8, out=out, resume=out, eval_tasks=["synthetic"], eval_every=8,
                 **_TINY)  # fmt: skip
    assert np.load(evaluations)["timesteps"].tolist() == [8, 24]


def test_a_resume_through_a_symlink_is_of_the_file_it_links_to(tmp_path, caplog, first_run):
    """Through a symlink, the link's own name and folder were read: a link to the run's own step-8 checkpoint counted
    as another folder's policy (all of the run's checkpoints set aside, replaced after 0 steps), and a link to a
    checkpoint set aside was resumed into the folder of the run that replaced it."""
    out, checkpoints = tmp_path / "policy.zip", tmp_path / "checkpoints"
    first_run(["synthetic"], total_timesteps=24, out=out, **_TINY)
    (tmp_path / "step8.zip").symlink_to("checkpoints/policy_8_steps.zip")
    (tmp_path / "step8.obs.json").symlink_to("checkpoints/policy_8_steps.obs.json")
    with caplog.at_level("WARNING", logger="triaccel_rl"):
        train_policy(["synthetic"], total_timesteps=8, out=out, resume=tmp_path / "step8.zip", **_TINY)
    assert "resumed from an earlier checkpoint" in caplog.text and "of another run" not in caplog.text
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["replaced_after_8_steps"]
    aside = checkpoints / "replaced_after_8_steps"
    assert sorted(p.name for p in aside.glob("*.zip")) == ["policy_16_steps.zip", "policy_24_steps.zip"]
    assert sorted(p.name for p in checkpoints.glob("*.zip")) == ["policy_16_steps.zip", "policy_8_steps.zip"]
    (tmp_path / "old16.zip").symlink_to("checkpoints/replaced_after_8_steps/policy_16_steps.zip")
    with pytest.raises(ValueError, match="is a checkpoint a later run set aside in"):
        train_policy(["synthetic"], total_timesteps=8, out=out, resume=tmp_path / "old16.zip", **_TINY)

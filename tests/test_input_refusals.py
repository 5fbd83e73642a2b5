"""Inputs a review found refused with a message naming something else, or taken silently (2026-12-07)."""

import math
import re

import numpy as np
import pytest
import torch
from triaccel_rl.envs.training_env import TriAccelEnv

from triaccel_rl.actions import decode
from triaccel_rl.config import ControllerConfig, LRRule, RewardConfig
from triaccel_rl.elastic import BatchLRCoupler
from triaccel_rl.reward import reward

CONFIG = ControllerConfig()


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.tensor([0, 1, 1, 1, 4, 1], dtype=torch.bfloat16),  # NumPy raised "unsupported ScalarType"
        lambda: torch.tensor([0.0, 1.0, 1.0, 1.0, 4.0, 1.0], requires_grad=True),  # "Can't call numpy()"
        lambda: torch.tensor([0, 1, 1, 1, 4, 1]),
    ],
    ids=["bf16", "requires-grad", "int64"],
)
def test_an_action_as_a_tensor_decodes_as_its_integers(make):
    assert decode(make(), CONFIG) == decode([0, 1, 1, 1, 4, 1], CONFIG)


def test_a_fractional_bf16_tensor_is_refused_by_name():
    with pytest.raises(ValueError, match=r"action \[0\.5, 1\.0, 1\.0, 1\.0, 4\.0, 1\.0\] must hold integers"):
        decode(torch.tensor([0.5, 1, 1, 1, 4, 1], dtype=torch.bfloat16), CONFIG)


def _reward(**overrides):
    kwargs = {"previous_probe_loss": 1.0, "probe_loss": 0.9, "cost_ms": 10.0, "budget_left_ms": 10.0,
              "overflow_rate": 0.0, "over_budget": False, "diverged": False, "divergence_loss": 3.0,
              "config": RewardConfig()}  # fmt: skip
    return reward(**{**kwargs, **overrides})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"probe_loss": -1.0}, "probe_loss=-1.0 must be >= 0: the reward is the drop in the log of the probe loss"),
        ({"previous_probe_loss": -0.5}, "previous_probe_loss=-0.5 must be >= 0"),
        ({"diverged": "no"}, "diverged='no' must be True or False"),
        ({"over_budget": 0}, "over_budget=0 must be True or False"),
    ],
)
def test_a_negative_loss_or_a_flag_that_is_no_bool_is_refused_by_name(overrides, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
        _reward(**overrides)


def test_the_documented_rewards_stand():
    assert _reward() == pytest.approx(10 * (math.log(1.0) - math.log(0.9)))
    assert _reward(probe_loss=0.0) == RewardConfig().clip  # 0 is floored at 1e-12, as documented
    assert _reward(diverged=np.bool_(True)) < 0  # NumPy's bool is a bool


def test_a_coupler_state_naming_its_rule_as_the_enum_loads():
    coupler = BatchLRCoupler(LRRule.LINEAR, base_batch_size=64, batch_size=64)
    coupler.change(128)
    state = {**coupler.state_dict(), "rule": LRRule.LINEAR}  # was refused as "for rule <LRRule.LINEAR> ... 'linear'"
    fresh = BatchLRCoupler(LRRule.LINEAR, base_batch_size=64, batch_size=64)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == coupler.state_dict()
    with pytest.raises(ValueError, match="is for rule 'sqrt' at base batch 64; this one is 'linear'"):
        fresh.load_state_dict({**coupler.state_dict(), "rule": "sqrt"})
    with pytest.raises(ValueError, match="is for rule 'nope'"):
        fresh.load_state_dict({**coupler.state_dict(), "rule": "nope"})


def test_the_environment_says_when_its_probe_loss_is_a_stand_in():
    """A non-finite probe loss reads as 1e6 in the signals; info said nothing of it, at reset too."""
    env = TriAccelEnv(task="synthetic", config=ControllerConfig(interval_steps=2), lr_range=(1e30, 1e30))
    _, info = env.reset(seed=0)
    assert info["probe_loss_finite"] is False and info["probe_loss"] == 1e6
    env.close()
    env = TriAccelEnv(task="synthetic", config=ControllerConfig(interval_steps=2))
    _, info = env.reset(seed=0)
    assert info["probe_loss_finite"] is True and info["probe_loss"] < 10
    *_, info = env.step(np.array([0, 0, 0, 0, 2, 1]))
    assert info["probe_loss_finite"] is True
    env.close()


def _task_data(**overrides):
    from triaccel_rl.tasks import TaskData

    fields = {"train_x": torch.zeros(4, 3), "train_y": torch.zeros(4, dtype=torch.int64),
              "test_x": torch.zeros(2, 3), "test_y": torch.zeros(2, dtype=torch.int64)}  # fmt: skip
    return TaskData(**{**fields, **overrides})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"train_y": torch.zeros(4, dtype=torch.int32)}, "TaskData.train_y must be int64 class labels of shape [n]"),
        ({"test_y": torch.zeros(2, 1, dtype=torch.int64)}, "TaskData.test_y must be int64 class labels of shape [n]"),
        ({"train_y": torch.tensor([0, 1, -1, 2])}, "TaskData.train_y holds the label -1: class labels are >= 0"),
        ({"train_x": torch.zeros(4, 3, dtype=torch.float64)}, "TaskData.train_x must be float32 inputs"),
        ({"test_x": np.zeros((2, 3), dtype=np.float32)}, "TaskData.test_x must be a torch.Tensor, got ndarray"),
        ({"test_x": torch.zeros(2, 4)}, "train and test samples differ in shape: (3,) and (4,)"),
    ],
)
def test_task_data_refuses_what_the_run_would_fail_on_later_by_name(overrides, message):
    """Accepted, these failed inside the run's first step with torch's message (int32 labels: 'expected target dtype
    to be Long'), naming neither the task nor the field."""
    with pytest.raises(ValueError, match=re.escape(message)):
        _task_data(**overrides)


def test_task_data_takes_integer_token_ids_as_inputs():
    data = _task_data(train_x=torch.zeros(4, 3, dtype=torch.int64), test_x=torch.zeros(2, 3, dtype=torch.int64))
    assert data.train_x.dtype == torch.int64


def test_crop_flip_refuses_a_numpy_batch_by_name():
    from triaccel_rl.tasks import crop_flip

    with pytest.raises(ValueError, match=re.escape("crop_flip expects a torch.Tensor, got ndarray")):
        crop_flip(np.zeros((2, 1, 8, 8), dtype=np.float32))


def test_a_fashion_mnist_split_of_no_samples_is_refused_naming_its_folder(tmp_path):
    import gzip
    import shutil

    from triaccel_rl.data import DatasetError, find_fashion_mnist, load_fashion_mnist

    for file in find_fashion_mnist().iterdir():
        shutil.copy(file, tmp_path / file.name)
    for name, header in (("t10k-images-idx3-ubyte.gz", b"\x00\x00\x08\x03" + (0).to_bytes(4, "big") + (28).to_bytes(
            4, "big") * 2), ("t10k-labels-idx1-ubyte.gz", b"\x00\x00\x08\x01" + (0).to_bytes(4, "big"))):  # fmt: skip
        with gzip.open(tmp_path / name, "wb") as file:
            file.write(header)
    with pytest.raises(
        DatasetError, match=rf"t10k split in {re.escape(str(tmp_path))} \(t10k-images.*holds no samples"
    ):
        load_fashion_mnist(tmp_path)


class _BatchNormRun:
    """A run whose model has a BatchNorm1d: a trial at one sample raises torch's ValueError; up to 64 fit."""

    memory_elastic = True
    lr_rule = None
    batch_size = 8
    max_batch_size = 1024
    memory_budget_bytes = 1 << 20

    def fits_in_budget(self, batch):
        if batch < 2:
            raise ValueError("Expected more than 1 value per channel when training, got input size torch.Size([1, 64])")
        return batch <= 64


def test_the_batch_finder_starts_at_two_samples():
    from triaccel_rl.policies import BatchFinderPolicy

    run = _BatchNormRun()
    assert BatchFinderPolicy("batch-finder-bf16").prepare(run) == 64 and run.batch_size == 64


def test_a_release_one_float32_after_the_anneal_is_refused():
    """The heuristic compares both shares with the float32 progress: equal there, annealing never fired."""
    from triaccel_rl.config import ConfigError, HeuristicConfig

    with pytest.raises(ConfigError, match=re.escape("anneal_release_after=0.30000001 must be in")):
        HeuristicConfig(anneal_plateau=0.01, anneal_after=0.3, anneal_release_after=0.30000001)
    assert (
        HeuristicConfig(anneal_plateau=0.01, anneal_after=0.3, anneal_release_after=0.31).anneal_release_after == 0.31
    )


def test_heuristic_arguments_of_the_wrong_kind_are_refused_by_name():
    """A list where a name goes raised "unhashable type: 'list'", naming nothing."""
    from triaccel_rl.policies import HeuristicPolicy

    with pytest.raises(ValueError, match=re.escape("unknown heuristic ['heuristic']; allowed: heuristic")):
        HeuristicPolicy.from_name(["heuristic"])
    with pytest.raises(ValueError, match=re.escape("parts=[['lr']] must be a non-empty subset of")):
        HeuristicPolicy(parts=[["lr"]])
    assert HeuristicPolicy(parts=(part for part in ["lr"])).parts == frozenset({"lr"})  # a generator, read once


def test_step_times_as_pairs_are_refused_by_name():
    from triaccel_rl.policies.heuristic import fastest_16bit

    from triaccel_rl.types import Precision

    with pytest.raises(ValueError, match=re.escape("step_ms=[('fp16', 5.0)] must map precisions to step times")):
        fastest_16bit([("fp16", 5.0)], Precision.BF16)

"""A ``Controller`` checkpoint records the policy that saved it; a load into another policy is refused.

The load restores the checkpoint's precisions and LR multiplier and writes its 16-bit formats into the policy: a
heuristic run's checkpoint loaded into ``policy="fp32"`` trained in bf16 until the first decision, and one saved under
``HeuristicConfig(use_fp16=False)`` kept lowering to bf16 in a controller built with ``use_fp16=True``, both silently.
"""

import copy
import json
import math
import shutil

import numpy as np
import pytest
import torch
from torch import nn
from triaccel_rl.policies import HeuristicPolicy, LearnedPolicy, make_policy, pretrained_policy_path

import triaccel_rl as ta
from triaccel_rl.config import ControllerConfig, HeuristicConfig
from triaccel_rl.shield import obs_stats_path
from triaccel_rl.types import Precision

DATA = (torch.randn(96, 8, generator=torch.Generator().manual_seed(0)), torch.arange(96) % 3)
CONFIG = ControllerConfig(interval_steps=4)
FP16_CONFIG = ControllerConfig(interval_steps=4, heuristic=HeuristicConfig(use_fp16=True))


class OwnPolicy:
    """A user's policy object: SB3's ``predict``, no name, no config."""

    def __init__(self, precision: Precision = Precision.FP32) -> None:
        self.initial_precision = precision

    def predict(self, observation, state=None, episode_start=None, deterministic=False):
        return np.array([0, 0, 0, 0, 1, 1]), state


def build(policy="heuristic", config=CONFIG):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, ta.Controller(model, optimizer, policy=policy, config=config)


def saved_after(steps, policy="heuristic", config=CONFIG):
    """The model's and the controller's state after ``steps`` steps of a run, copied."""
    model, ctl = build(policy, config)
    for step, (x, y) in enumerate(ctl.loader(DATA, batch_size=16, epochs=2), start=1):
        with ctl.autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        ctl.step(loss)
        if step == steps:
            break
    return copy.deepcopy(model.state_dict()), copy.deepcopy(ctl.state_dict())


def kept(ctl):
    """A copy of everything the controller keeps, less the clock (the open interval's training time so far)."""
    state = copy.deepcopy(ctl.state_dict())
    del state["signals"]["interval_ms"]
    return state


def equal(a, b):
    """Deep equality of nested checkpoint values, tensors compared exactly, NaN equal to NaN."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


@pytest.mark.parametrize(
    ("policy", "config", "expected"),
    [
        ("heuristic", CONFIG, {"name": "heuristic", "start_precision": "bf16", "use_fp16": False}),
        (
            "heuristic-precision",
            FP16_CONFIG,
            {"name": "heuristic-precision", "start_precision": "bf16", "use_fp16": True},
        ),
        (
            "heuristic",
            ControllerConfig(heuristic=HeuristicConfig(start_precision="FP32")),
            {"name": "heuristic", "start_precision": "fp32", "use_fp16": False},
        ),
        ("fp32", FP16_CONFIG, {"name": "static-fp32"}),  # a static policy's formats are its own: no settings
        ("static-bf16", CONFIG, {"name": "static-bf16"}),
        # Every learned policy is one kind: the shipped one, a zip by its path, an object built by hand
        ("pretrained", CONFIG, {"name": "learned", "start_precision": "bf16", "use_fp16": False}),
        (str(pretrained_policy_path()), FP16_CONFIG, {"name": "learned", "start_precision": "bf16", "use_fp16": True}),
        (LearnedPolicy(pretrained_policy_path()), CONFIG, {"name": "learned"}),  # no config of its own: no settings
        # An object: its own config's settings, not the controller's
        (HeuristicPolicy(FP16_CONFIG), CONFIG, {"name": "heuristic", "start_precision": "bf16", "use_fp16": True}),
        (OwnPolicy(), CONFIG, {"name": "OwnPolicy"}),  # nothing stable about it but its class
    ],
    ids=[
        "heuristic",
        "ablation-fp16",
        "start-fp32",
        "static",
        "static-name",
        "pretrained",
        "zip-path",
        "learned-object",
        "object",
        "own-object",
    ],
)
def test_the_checkpoint_records_the_policy_that_saved_it(policy, config, expected):
    _, ctl = build(policy, config)
    state = ctl.state_dict()
    assert state["policy"] == expected
    assert json.loads(json.dumps(state["policy"])) == expected  # strings and bools only
    state["policy"]["name"] = "changed"  # a copy: the caller's edits do not reach the controller
    assert ctl.state_dict()["policy"] == expected


def test_a_heuristic_runs_checkpoint_is_refused_by_a_static_fp32_controller_which_stays_as_it_was():
    model_state, state = saved_after(5)
    assert state["engine"]["precisions"] == [int(Precision.BF16)] * 2
    model, ctl = build("fp32")
    model.load_state_dict(model_state)
    before = kept(ctl)
    with pytest.raises(
        ValueError,
        match=r"^the checkpoint's policy is 'heuristic'; this controller's is 'static-fp32': the layers' precisions, "
        r"LR multiplier and 16-bit formats it restores are the other policy's\. Build the Controller with "
        r"policy='heuristic' to resume this checkpoint$",
    ):
        ctl.load_state_dict(state)
    assert equal(kept(ctl), before)
    assert ctl.precisions == [Precision.FP32] * 2 and ctl.steps == 0


@pytest.mark.parametrize(
    ("saver", "loader", "message"),
    [
        ("heuristic", "heuristic-precision", r"policy is 'heuristic'; this controller's is 'heuristic-precision'"),
        ("bf16", "fp16", r"policy is 'static-bf16'; this controller's is 'static-fp16'.* policy='static-bf16' to"),
        ("heuristic", OwnPolicy(), r"policy is 'heuristic'; this controller's is 'OwnPolicy'.* policy='heuristic' to"),
        (
            OwnPolicy(Precision.BF16),
            "heuristic",
            r"policy is 'OwnPolicy'; this controller's is 'heuristic'.* Build the Controller with policy=the OwnPolicy "
            r"object the run was saved with to resume",
        ),
    ],
    ids=["ablation", "static", "to-own-object", "from-own-object"],
)
def test_a_checkpoint_of_another_policy_is_refused_naming_both(saver, loader, message):
    _, state = saved_after(3, saver)
    _, ctl = build(loader)
    before = kept(ctl)
    with pytest.raises(ValueError, match=message):
        ctl.load_state_dict(state)
    assert equal(kept(ctl), before)


def test_a_checkpoint_saved_under_use_fp16_false_is_refused_by_a_heuristic_built_with_use_fp16():
    _, state = saved_after(5)
    _, ctl = build("heuristic", FP16_CONFIG)
    assert ctl.policy.low_precision is Precision.FP16
    before = kept(ctl)
    with pytest.raises(
        ValueError,
        match=r"^the checkpoint's policy 'heuristic' was built with start_precision='bf16', use_fp16=False; this "
        r"controller's with start_precision='bf16', use_fp16=True: the load would give it the checkpoint's 16-bit "
        r"formats, not its config's\. Build the Controller with policy='heuristic' and "
        r"config=ControllerConfig\(heuristic=HeuristicConfig\(use_fp16=False\)\) to resume this checkpoint$",
    ):
        ctl.load_state_dict(state)
    assert equal(kept(ctl), before)
    assert ctl.policy.low_precision is Precision.FP16 and ctl.policy.initial_precision is Precision.BF16


def test_another_start_precision_is_refused_naming_it():
    _, state = saved_after(3)
    _, ctl = build("heuristic", ControllerConfig(interval_steps=4, heuristic=HeuristicConfig(start_precision="fp32")))
    with pytest.raises(
        ValueError, match=r"config=ControllerConfig\(heuristic=HeuristicConfig\(start_precision='bf16'\)"
    ):
        ctl.load_state_dict(state)
    assert ctl.precisions == [Precision.FP32] * 2


def test_the_same_policy_by_name_or_as_an_object_of_the_same_settings_resumes():
    """The identity is the policy's and its settings', not how it was passed; settings it does not read still load."""
    _, state = saved_after(5)
    for policy, config in [
        ("heuristic", CONFIG),
        (HeuristicPolicy(CONFIG), CONFIG),
        (
            "heuristic",
            ControllerConfig(interval_steps=4, heuristic=HeuristicConfig(lower_below=0.5, speed_trial=False)),
        ),
    ]:
        _, ctl = build(policy, config)
        ctl.load_state_dict(state)
        assert ctl.steps == 5 and ctl.precisions == [Precision.BF16] * 2
    _, static_state = saved_after(3, "fp32")
    _, ctl = build("fp32", FP16_CONFIG)  # the heuristic's settings are no static policy's: not compared
    ctl.load_state_dict(static_state)
    assert ctl.steps == 3


def copy_of_the_shipped_policy(folder, name):
    """The shipped zip and its observation stats copied to ``folder/name``; returns the zip's path, a str."""
    zip_path = folder / name
    shutil.copy(pretrained_policy_path(), zip_path)
    shutil.copy(obs_stats_path(pretrained_policy_path()), obs_stats_path(zip_path))
    return str(zip_path)


def test_a_learned_policys_checkpoint_resumes_under_another_file_name_or_the_shipped_one_by_name_or_path(tmp_path):
    """A zip's file name is no identity: the same weights renamed, or the shipped zip by its path, were refused."""
    saved_zip = copy_of_the_shipped_policy(tmp_path, "policy.zip")
    renamed_zip = copy_of_the_shipped_policy(tmp_path, "final_policy.zip")
    _, state = saved_after(5, saved_zip)
    assert state["policy"] == {"name": "learned", "start_precision": "bf16", "use_fp16": False}
    for policy in (renamed_zip, "pretrained", str(pretrained_policy_path()), make_policy("pretrained", CONFIG)):
        _, ctl = build(policy)
        ctl.load_state_dict(state)
        assert ctl.steps == 5 and ctl.precisions == [Precision(p) for p in state["engine"]["precisions"]]
    _, shipped_state = saved_after(5, "pretrained")
    _, ctl = build(renamed_zip)
    ctl.load_state_dict(shipped_state)
    assert ctl.steps == 5


def test_a_learned_policys_checkpoint_is_refused_by_the_heuristic_saying_how_to_build_a_learned_one():
    _, state = saved_after(3, "pretrained")
    _, ctl = build("heuristic")
    before = kept(ctl)
    with pytest.raises(
        ValueError,
        match=r"^the checkpoint's policy is 'learned'; this controller's is 'heuristic': .* Build the Controller with "
        r"policy='pretrained' or the path of a learned policy's zip to resume this checkpoint$",
    ):
        ctl.load_state_dict(state)
    assert equal(kept(ctl), before)
    _, ctl = build("pretrained", FP16_CONFIG)  # the settings are still compared within the kind
    with pytest.raises(
        ValueError,
        match=r"^the checkpoint's policy 'learned' was built with start_precision='bf16', use_fp16=False; .* Build the "
        r"Controller with policy='pretrained' or the path of a learned policy's zip and "
        r"config=ControllerConfig\(heuristic=HeuristicConfig\(use_fp16=False\)\) to resume this checkpoint$",
    ):
        ctl.load_state_dict(state)


@pytest.mark.parametrize("recorded", ["pretrained", "learned:policy.zip"])
def test_a_learned_policys_checkpoint_named_as_first_recorded_resumes_into_any_learned_policy(recorded):
    """For a few commits a learned policy was recorded by its name (``pretrained``, ``learned:<file>``): one kind."""
    _, state = saved_after(3, "pretrained")
    state["policy"] = {**state["policy"], "name": recorded}
    _, ctl = build("pretrained")
    ctl.load_state_dict(state)
    assert ctl.steps == 3
    _, ctl = build("heuristic")
    with pytest.raises(ValueError, match=r"^the checkpoint's policy is 'learned'; this controller's is 'heuristic'"):
        ctl.load_state_dict(state)


def test_a_checkpoint_saved_before_the_policy_was_recorded_loads_as_before():
    """No ``policy`` entry: loaded unchecked, the precision map and formats as the checkpoint has them."""
    _, state = saved_after(5)
    del state["policy"]
    _, ctl = build("fp32")
    ctl.load_state_dict(state)
    assert ctl.steps == 5 and ctl.precisions == [Precision.BF16] * 2
    _, ctl = build("heuristic", FP16_CONFIG)
    ctl.load_state_dict(state)
    assert ctl.policy.low_precision is Precision.BF16  # the checkpoint's format, as every load before the check


@pytest.mark.parametrize("value", ["heuristic", {"start_precision": "bf16"}, {"name": 3}, None])
def test_a_damaged_policy_entry_is_refused_by_name(value):
    _, state = saved_after(2)
    state["policy"] = value
    _, ctl = build()
    before = kept(ctl)
    with pytest.raises(ValueError, match=r"the checkpoint's policy .* is not a dict naming the policy that saved it"):
        ctl.load_state_dict(state)
    assert equal(kept(ctl), before)

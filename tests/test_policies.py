import zipfile

import numpy as np
import pytest
from heuristic_observations import observation
from triaccel_rl.policies import HeuristicPolicy, LearnedPolicy, PolicyLoadError, StaticPolicy, make_policy

from triaccel_rl.config import ConfigError, ControllerConfig, HeuristicConfig
from triaccel_rl.observation import ObservationLayout
from triaccel_rl.types import Policy, Precision

LAYOUT = ObservationLayout(4)


def precisions_of(action):
    return action[:4].tolist()


def test_all_policies_satisfy_the_protocol():
    for policy in (StaticPolicy("bf16"), HeuristicPolicy(), make_policy("fp16")):
        assert isinstance(policy, Policy)


def test_static_presets():
    config = ControllerConfig()
    for name, code in (("fp32", 0), ("bf16", 1), ("fp16", 2)):
        action, state = StaticPolicy(name).predict(np.zeros(LAYOUT.size, np.float32))
        assert action.tolist() == [code] * 4 + [config.lr_scales.index(1.0), 1]
        assert state is None
    batch, _ = StaticPolicy("fp32").predict(np.zeros((3, LAYOUT.size), np.float32))
    assert batch.shape == (3, 6)


def test_heuristic_lowers_insensitive_groups_and_keeps_sensitive_ones():
    rules = HeuristicConfig()
    obs = observation([1.0, rules.lower_below + 0.1, rules.lower_below - 0.1, -1.0])
    action, _ = HeuristicPolicy().predict(obs)
    assert precisions_of(action) == [0, 0, 1, 1]


def test_heuristic_raises_a_group_whose_sensitivity_crosses_the_upper_threshold():
    rules = HeuristicConfig()
    obs = observation([rules.raise_above + 0.1, rules.raise_above - 0.1, 0.0, -1.0], precisions=(1, 1, 1, 1))
    action, _ = HeuristicPolicy().predict(obs)
    assert precisions_of(action) == [0, 1, 1, 1]


def test_heuristic_hysteresis_no_flip_flop():
    """A group whose sensitivity oscillates inside the band keeps its precision, from either side."""
    rules = HeuristicConfig()
    policy = HeuristicPolicy()
    inside = np.linspace(rules.lower_below + 0.01, rules.raise_above - 0.01, 7)
    for start in (0, 1):  # starting in fp32, or in bf16
        current = start
        history = []
        for s in np.concatenate([inside, inside[::-1], inside]):
            action, _ = policy.predict(observation([s, -1, -1, -1], precisions=(current, 1, 1, 1)))
            current = int(action[0])
            history.append(current)
        assert set(history) == {start}, f"flipped from {start}: {history}"
    # Whereas a full swing across both thresholds changes it both ways exactly once each.
    current, history = 0, []
    low, mid, high = rules.lower_below - 0.25, (rules.lower_below + rules.raise_above) / 2, rules.raise_above + 0.25
    for s in (low, mid, high, mid, low):
        action, _ = policy.predict(observation([s, -1, -1, -1], precisions=(current, 1, 1, 1)))
        current = int(action[0])
        history.append(current)
    assert history == [1, 1, 0, 0, 1]


def test_heuristic_does_not_lower_under_overflow_and_leaves_fp16():
    rules = HeuristicConfig()
    obs = observation([-1, -1, -1, -1], precisions=(0, 2, 2, 0), overflow=rules.max_overflow_rate + 0.1)
    action, _ = HeuristicPolicy().predict(obs)
    assert precisions_of(action) == [0, 1, 1, 0]


def test_heuristic_lr_and_batch_rules():
    config = ControllerConfig()
    policy = HeuristicPolicy(config)
    k = config.n_groups
    rising = observation([0, 0, 0, 0], loss_trend=0.15)
    assert config.lr_scales[policy.predict(observation([0] * 4, loss_trend=0.05))[0][k]] == 1.0  # noise: kept
    assert config.lr_scales[policy.predict(rising)[0][k]] == 0.75  # one rung down from 1.0
    recovering = observation([0, 0, 0, 0], loss_trend=-0.15, lr_scale=0.75)
    assert config.lr_scales[policy.predict(recovering)[0][k]] == 1.0
    assert policy.predict(observation([0] * 4, memory_use=0.1, noise_over_batch=2.0))[0][k + 1] == 2  # grow
    assert policy.predict(observation([0] * 4, memory_use=0.1, noise_over_batch=0.5))[0][k + 1] == 1  # noise low
    assert policy.predict(observation([0] * 4, memory_use=0.99))[0][k + 1] == 0  # shrink
    # max_batch_growth = 2: at twice the base batch, a doubling would leave the trust region.
    assert policy.predict(observation([0] * 4, log2_batch=1.0))[0][k + 1] == 1
    wider = HeuristicPolicy(ControllerConfig(heuristic=HeuristicConfig(max_batch_growth=4.0)))
    assert wider.predict(observation([0] * 4, log2_batch=1.0))[0][k + 1] == 2
    with pytest.raises(ConfigError, match=r"max_batch_growth=0\.5 must be a number >= 1"):
        HeuristicConfig(max_batch_growth=0.5)


def test_heuristic_rejects_wrong_observation_shape():
    with pytest.raises(ValueError, match=r"observation has shape \(5,\); expected \(43,\)"):
        HeuristicPolicy().predict(np.zeros(5))


def test_unknown_policy_name():
    with pytest.raises(ValueError, match="unknown policy 'fp8'; allowed: fp32, bf16, fp16, heuristic"):
        make_policy("fp8")


def test_missing_and_corrupt_policy_zip(tmp_path):
    with pytest.raises(PolicyLoadError, match="does not exist"):
        LearnedPolicy(tmp_path / "nope.zip")
    not_zip = tmp_path / "text.zip"
    not_zip.write_text("hello")
    with pytest.raises(PolicyLoadError, match="is not a zip written by stable-baselines3"):
        LearnedPolicy(not_zip)
    empty = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty, "w") as archive:
        archive.writestr("data", "{not json")
    with pytest.raises(PolicyLoadError, match="cannot load policy"):
        LearnedPolicy(empty)


def test_heuristic_starts_from_its_start_precision():
    from triaccel_rl.compare import run_controller

    for start in ("bf16", "fp32"):
        config = ControllerConfig(interval_steps=50, heuristic=HeuristicConfig(start_precision=start))
        assert HeuristicPolicy(config).initial_precision is Precision.parse(start)
        result = run_controller("synthetic", HeuristicPolicy(config), 0, epochs=0.3, config=config, device="cpu")
        first = result.trace[0]["precisions"]  # after the first interval, before any decision applied
        assert first == [int(Precision.parse(start))] * len(first)
    with pytest.raises(ConfigError, match="start_precision='int8' must be one of"):
        HeuristicConfig(start_precision="int8")

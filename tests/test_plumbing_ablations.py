"""Heuristic ablations: each variant moves only its own knob; the names resolve and are listed."""

import numpy as np
import pytest
from heuristic_observations import observation
from triaccel_rl.policies import HEURISTIC_NAMES, HEURISTIC_PARTS, HeuristicPolicy, make_policy

from triaccel_rl.config import ControllerConfig, HeuristicConfig
from triaccel_rl.observation import ObservationLayout
from triaccel_rl.types import BatchMove

CONFIG = ControllerConfig()
LAYOUT = ObservationLayout(CONFIG.n_groups)
K = CONFIG.n_groups
RULES = HeuristicConfig()

VARIANT_PARTS = {
    "heuristic": {"precision", "lr", "batch"},
    "heuristic-precision": {"precision"},
    "heuristic-elastic": {"batch"},
    "heuristic-second-order": {"lr"},
}


# Observations on which the full heuristic moves all three knobs, each in a different direction.
LOW, HIGH = RULES.lower_below - 0.1, RULES.raise_above + 0.1
# A loss change clearly past the tolerance either way: exactly at it keeps the LR (the heuristic's comparisons are
# strict, in the observation's float32), so scenes at +-0.1 = +-loss_rise_tolerance moved no LR.
RISE, FALL = 2 * RULES.loss_rise_tolerance, -2 * RULES.loss_rise_tolerance
SCENES = {
    # fp32 groups with low sensitivity are lowered, the loss rises (LR down a rung), memory is free (grow).
    "lower-slow-grow": dict(sensitivities=[LOW, LOW, HIGH, LOW], loss_trend=RISE, memory_use=0.1),
    # bf16 groups with high sensitivity are raised, the loss recovers at 0.75 (LR up), memory is full (shrink).
    "raise-recover-shrink": dict(
        sensitivities=[HIGH, LOW, HIGH, HIGH], precisions=(1, 1, 1, 2), loss_trend=FALL, lr_scale=0.75, memory_use=0.99
    ),
    # Overflowing steps: fp16 falls back to bf16 and the LR drops; the batch is still free to grow.
    "overflow": dict(
        sensitivities=[LOW, LOW, LOW, LOW], precisions=(2, 0, 0, 2), overflow=RULES.max_overflow_rate + 0.1
    ),
}


def neutral(scene):
    """The raw action that changes nothing: current precisions, current LR rung, batch kept."""
    precisions = list(scene.get("precisions", (0, 0, 0, 0)))
    rung = CONFIG.lr_scales.index(scene.get("lr_scale", 1.0))
    return [*precisions, rung, int(BatchMove.KEEP)]


def knobs(action):
    return {"precision": list(action[:K]), "lr": int(action[K]), "batch": int(action[K + 1])}


@pytest.mark.parametrize("scene", SCENES.values(), ids=SCENES.keys())
def test_full_heuristic_moves_every_knob_in_these_scenes(scene):
    """Guards the test below: an ablation that 'keeps' a knob the full heuristic would keep proves nothing."""
    full = knobs(HeuristicPolicy(CONFIG).predict(observation(**scene))[0])
    still = knobs(neutral(scene))
    for part in HEURISTIC_PARTS:
        assert full[part] != still[part], f"{part} does not move in this scene"


@pytest.mark.parametrize("scene", SCENES.values(), ids=SCENES.keys())
@pytest.mark.parametrize("name", HEURISTIC_NAMES)
def test_each_variant_changes_only_its_part(name, scene):
    obs = observation(**scene)
    full = knobs(HeuristicPolicy(CONFIG).predict(obs)[0])
    still = knobs(neutral(scene))
    got = knobs(make_policy(name, CONFIG).predict(obs)[0])
    for part in HEURISTIC_PARTS:
        expected = full[part] if part in VARIANT_PARTS[name] else still[part]
        assert got[part] == expected, f"{name}: {part} is {got[part]}, expected {expected}"


@pytest.mark.parametrize("name", HEURISTIC_NAMES)
def test_variants_decide_batches_of_observations_row_by_row(name):
    batch = np.stack([observation(**scene) for scene in SCENES.values()])
    policy = make_policy(name, CONFIG)
    actions, state = policy.predict(batch)
    assert state is None
    for row, obs in zip(actions, batch, strict=True):
        assert row.tolist() == policy.predict(obs)[0].tolist()


@pytest.mark.parametrize("name", HEURISTIC_NAMES)
def test_names_resolve_to_the_variant_and_carry_their_name(name):
    policy = make_policy(name.upper(), CONFIG)  # names are case-insensitive
    assert isinstance(policy, HeuristicPolicy)
    assert policy.name == name
    assert policy.parts == VARIANT_PARTS[name]
    assert policy.needs_lr_factors is (name == "heuristic-second-order")
    assert policy.config is CONFIG


def test_default_heuristic_is_the_full_one():
    policy = HeuristicPolicy()
    assert policy.name == "heuristic" and policy.parts == set(HEURISTIC_PARTS) and not policy.needs_lr_factors


def test_constructed_parts_get_the_registered_name_or_a_spelled_out_one():
    assert HeuristicPolicy(parts=["batch"]).name == "heuristic-elastic"
    assert HeuristicPolicy(parts={"lr"}, needs_lr_factors=True).name == "heuristic-second-order"
    # The LR rule without the LR factors is not the second-order variant.
    assert HeuristicPolicy(parts={"lr"}).name == "heuristic[lr]"
    assert HeuristicPolicy(parts={"batch", "lr"}).name == "heuristic[lr+batch]"


@pytest.mark.parametrize("parts", [set(), {"precision", "momentum"}, ["lr", 1]])  # ["lr", 1]: sorting it raised
def test_bad_parts_are_rejected_with_the_allowed_ones(parts):
    with pytest.raises(ValueError, match=r"must be a non-empty subset of \['precision', 'lr', 'batch'\]"):
        HeuristicPolicy(parts=parts)


def test_a_bare_string_is_not_taken_for_a_set_of_letters():
    with pytest.raises(ValueError, match=r"parts='lr' must be a collection of part names, e.g. \{'lr'\}"):
        HeuristicPolicy(parts="lr")


def test_unknown_variant_name():
    with pytest.raises(ValueError, match="unknown heuristic 'heuristic-lr'; allowed: heuristic, heuristic-precision"):
        HeuristicPolicy.from_name("heuristic-lr")


def test_unknown_policy_lists_the_ablations():
    with pytest.raises(ValueError, match="unknown policy 'heuristic-lr'") as error:
        make_policy("heuristic-lr")
    for name in HEURISTIC_NAMES:
        assert f" {name}," in str(error.value)

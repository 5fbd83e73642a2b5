"""Policies with one ``predict`` signature: static baselines, the heuristic, and learned SB3 policies."""

from __future__ import annotations

import logging
import math
import os
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from gymnasium import spaces
from triaccel_rl.policies.batch_finder import BATCH_FINDER_NAMES, BatchFinderPolicy
from triaccel_rl.policies.heuristic import HEURISTIC_NAMES, HEURISTIC_PARTS, HeuristicPolicy
from triaccel_rl.policies.learned import LearnedPolicy, PolicyLoadError, _same_space
from triaccel_rl.policies.static import STATIC_PRESETS, StaticPolicy

from triaccel_rl.actions import action_space as config_action_space
from triaccel_rl.config import ControllerConfig
from triaccel_rl.observation import OBS_HIGH, ObservationLayout
from triaccel_rl.shield import FallbackPolicy, ObservationStats, obs_stats_path
from triaccel_rl.types import Policy, Precision

__all__ = [
    "BATCH_FINDER_NAMES",
    "HEURISTIC_NAMES",
    "HEURISTIC_PARTS",
    "STATIC_PRESETS",
    "BatchFinderPolicy",
    "HeuristicPolicy",
    "LearnedPolicy",
    "PolicyLoadError",
    "StaticPolicy",
    "make_policy",
    "pretrained_policy_path",
    "run_without_bf16",
    "static_preset_name",
]

_log = logging.getLogger("triaccel_rl")


def make_policy(
    spec: str | os.PathLike[str] | Policy,
    config: ControllerConfig | None = None,
    observation_space: spaces.Space[Any] | None = None,
    action_space: spaces.Space[Any] | None = None,
) -> Policy:
    """Turns a name or a path into a policy: ``fp32``/``bf16``/``fp16`` (static), ``heuristic``, a ``.zip``.

    Also the heuristic's ablations ``heuristic-precision`` (precision rule only), ``heuristic-elastic``
    (batch rule only) and ``heuristic-second-order`` (LR rule only, with curvature-scaled per-layer LR
    factors: its ``needs_lr_factors`` asks the driver to switch them on); ``batch-finder``,
    ``batch-finder-bf16``, ``batch-finder-fp16``: the batch-size-finder baseline; ``pretrained``: the
    policy shipped with the package.

    A ``.zip`` (a str or a ``pathlib.Path``) with its observation stats beside it (``.obs.json``, written by
    ``train_policy``) comes wrapped in a ``FallbackPolicy``: observations further than one range width outside the
    training range go to the heuristic. Without them it is the bare ``LearnedPolicy``, and a warning says so. Its
    spaces must be ``observation_space`` and ``action_space``, by default those of ``config`` (its ``n_groups`` and
    LR ladder).

    Raises:
        ValueError: an unknown name or a missing zip (the message lists the allowed ones), an unusable zip (another
            algorithm's, corrupt, or trained for other spaces: ``PolicyLoadError``), or a policy instance built for
            another ``n_groups``, LR ladder or spaces than ``config``'s (``PolicyLoadError``; checked where the instance
            carries a ``config``, spaces or observation stats, and only when ``config`` is given).
        TypeError: ``spec`` is neither a name, a path nor a policy; ``config`` is not a ``ControllerConfig``.
    """
    if config is not None and not isinstance(config, ControllerConfig):  # a HeuristicConfig, say
        raise TypeError(
            f"config={config!r} must be a ControllerConfig (a HeuristicConfig goes in ControllerConfig(heuristic=...))"
        )
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if isinstance(spec, type):  # its predict is callable too, and failed later for want of self
        raise TypeError(
            f"policy={spec.__name__} is a class: pass an instance (e.g. {spec.__name__}(...)), or a name or path"
        )
    if not isinstance(spec, str):
        if not callable(getattr(spec, "predict", None)):
            raise TypeError(
                f"policy={spec!r} is neither a name nor a path (a str or a pathlib.Path) nor an object with SB3's "
                "predict(observation, deterministic=...) method"
            )
        if config is not None:  # the spaces this config implies, as for a zip (a bare LearnedPolicy carries only those)
            if observation_space is None:
                size = ObservationLayout(config.n_groups).size
                observation_space = spaces.Box(-OBS_HIGH, OBS_HIGH, (size,), np.float32)
            _check_instance(spec, config, observation_space, action_space or config_action_space(config))
        return spec
    config = config or ControllerConfig()
    name = spec.lower()
    preset = static_preset_name(name)
    if preset is not None:
        return StaticPolicy(preset, config)
    if name in HEURISTIC_NAMES:
        return HeuristicPolicy.from_name(name, config)
    if name in BATCH_FINDER_NAMES:
        return BatchFinderPolicy(name, config)
    shipped = name == "pretrained"
    if shipped:
        spec = str(pretrained_policy_path())
        name = spec
    if name.endswith(".zip"):
        if not os.path.exists(spec):
            raise PolicyLoadError(f"policy file {spec!r} does not exist; allowed: {_allowed()} that exists")
        if observation_space is None:  # what the Controller, compare and the environment feed for this config
            size = ObservationLayout(config.n_groups).size
            observation_space = spaces.Box(-OBS_HIGH, OBS_HIGH, (size,), np.float32)
        stats_file = obs_stats_path(spec)
        stats = ObservationStats.load(stats_file) if stats_file.is_file() else None
        # Before the policy is read against this configuration's spaces: another ladder's length (the "safe" preset's
        # 3 rungs) failed there as an action-space mismatch that said to retrain, naming neither ladder.
        if stats is not None and stats.lr_scales is not None and tuple(stats.lr_scales) != tuple(config.lr_scales):
            raise PolicyLoadError(
                f"policy {spec!r} was trained with LR multipliers {list(stats.lr_scales)}, and this configuration's "
                f"are {list(config.lr_scales)}: its LR actions would pick other multipliers. Run it with its own "
                "(ControllerConfig(lr_scales=...), or --lr-scales on the command line); `triaccel-rl train-policy` "
                "trains policies for the default ladder and groups only"
            )
        learned = LearnedPolicy(spec, observation_space, action_space or config_action_space(config))
        # Its first decision comes after one interval: until then it runs where the heuristic starts (bf16 by
        # default), not in fp32, so that the two are compared from the same start.
        learned.initial_precision = Precision.parse(config.heuristic.start_precision)
        # On a GPU it runs its 16-bit groups in whichever format the heuristic's speed trial finds faster.
        learned.speed_trial = config.heuristic.speed_trial
        if config.heuristic.use_fp16:  # pinned to fp16 as the heuristic is (its fallback): it moved them to bf16
            learned.low_precision = Precision.FP16
        if shipped:  # its row: "learned:policy.zip" clashed with train-policy's default runs/policy.zip
            learned.name = "pretrained"
        if stats is None:
            _log.warning(
                "policy %r has no observation stats beside it (%s): it runs without the out-of-distribution fallback "
                "to the heuristic",
                spec,
                str(stats_file),
            )
            return learned
        features = math.prod(learned.observation_space.shape or ())
        if len(stats.low) != features:  # the fallback would refuse every observation, at the first decision
            raise PolicyLoadError(
                f"observation stats {str(stats_file)!r} hold {len(stats.low)} features; this policy's observations "
                f"have {features}: they belong to another policy"
            )
        _note_interval(learned.name, stats.interval_steps, config.interval_steps)
        # Out-of-distribution observations go to the heuristic (the shield's fallback).
        return FallbackPolicy(learned, HeuristicPolicy(config), stats)
    raise ValueError(f"unknown policy {spec!r}; allowed: {_allowed()}")


_intervals_noted: set[tuple[str, int, int]] = set()
"""(policy name, training interval, configured interval) already logged by :func:`_note_interval`."""


def _note_interval(name: str, trained: int | None, configured: int) -> None:
    """Logs at INFO, once a process, that a learned policy decides at another interval than it was trained at.

    Not refused: its observations are per-interval rates and trends, and the Controller's default (20 steps, stretched
    on a GPU) is what the shipped policy runs at unless told. But its model card's numbers are at its training
    interval, and nothing said the run's differed.
    """
    if trained is None or trained == configured or (name, trained, configured) in _intervals_noted:
        return
    _intervals_noted.add((name, trained, configured))
    _log.info(
        "policy %r was trained deciding every %d optimizer steps; this configuration decides every %d (on a GPU, "
        "possibly more: ControllerConfig.max_interval_factor). ControllerConfig(interval_steps=%d) decides as in "
        "its training",
        name,
        trained,
        configured,
        trained,
    )


def static_preset_name(spec: object) -> str | None:
    """The static preset a policy name picks, one of ``STATIC_PRESETS``; None for any other spec.

    The rule of :func:`make_policy`: ``"fp32"`` and ``"static-fp32"`` pick ``"fp32"``, in any case, given as a str or
    an ``os.PathLike``.

    Example:
        >>> static_preset_name("Static-BF16"), static_preset_name("heuristic")
        ('bf16', None)
    """
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str):
        return None
    preset = spec.lower().removeprefix("static-")
    return preset if preset in STATIC_PRESETS else None


def run_without_bf16(policy: Policy) -> bool:
    """Starts and lowers ``policy`` in fp16 where it would in bf16: for a GPU without bf16 (a V100 or T4).

    fp16, not fp32: it is the 16-bit format such a GPU runs fast (its tensor cores; what AMP runs there), which a user
    running a controller on one is after, and the executor moves a layer that overflows in it to fp32. Without it, the
    engine refuses a bf16 start (a ``Controller`` with the default heuristic, or ``"pretrained"``, could not be built
    there), and the executor runs every lowering to bf16 in fp32 (a format the device lacks). Touches the start
    precision when it is bf16 and the 16-bit format (``low_precision``) of a policy that has one (a learned policy's
    too: its 16-bit groups run in fp16, as after a speed trial that chose fp16). Returns whether anything changed.
    """
    moved = []  # neither attribute is part of the Policy protocol: a policy may have either, both or neither
    if getattr(policy, "initial_precision", None) is Precision.BF16:
        moved.append("initial_precision")
    if getattr(policy, "low_precision", Precision.FP16) is not Precision.FP16:  # None too: a learned policy's own
        moved.append("low_precision")
    for name in moved:
        setattr(policy, name, Precision.FP16)
    return bool(moved)


def _check_instance(
    policy: Any,
    config: ControllerConfig,
    observation_space: spaces.Space[Any] | None,
    action_space: spaces.Space[Any] | None,
) -> None:
    """Refuses a policy instance built for other settings than the caller's ``config``, by what decoding reads.

    Its actions are decoded with the caller's config: a policy on another LR ladder of the same length had its rungs
    read as other multipliers, unsaid, and one of another ``n_groups`` failed at the first decision on its observation's
    shape. Checked where the instance says what it was built for: a ``config`` (the heuristic, static and batch-finder
    policies), spaces (a ``LearnedPolicy``), the LR ladder of its observation stats, and a ``FallbackPolicy``'s two.
    """
    name = getattr(policy, "name", type(policy).__name__)
    own = getattr(policy, "config", None)
    if isinstance(own, ControllerConfig):
        if own.n_groups != config.n_groups:
            raise PolicyLoadError(
                f"policy {name!r} was built with n_groups={own.n_groups}, and this configuration's is "
                f"n_groups={config.n_groups}: its observations and actions have another shape. Build it with this "
                "configuration (e.g. HeuristicPolicy(config)), or run it with its own (config=policy.config)"
            )
        _check_ladder(name, own.lr_scales, config)
        if isinstance(policy, HeuristicPolicy) and own.max_lr_change != config.max_lr_change:
            # It models the shield's clamp with its own: a stopped climb's rung was read as its floor, and it cut
            # the LR on a falling loss.
            raise PolicyLoadError(
                f"policy {name!r} was built with max_lr_change={own.max_lr_change}, and this configuration's is "
                f"{config.max_lr_change}: it reads its LR rungs through the clamp it was built with. Build it with "
                "this configuration, or run it with its own (config=policy.config)"
            )
    stats = getattr(policy, "stats", None)
    if isinstance(stats, ObservationStats) and stats.lr_scales is not None:
        _check_ladder(name, stats.lr_scales, config)
    for label, expected, found in (
        ("observation", observation_space, getattr(policy, "observation_space", None)),
        ("action", action_space, getattr(policy, "action_space", None)),
    ):
        if isinstance(expected, spaces.Space) and isinstance(found, spaces.Space) and not _same_space(expected, found):
            raise PolicyLoadError(
                f"policy {name!r} was built for {label} space {found}, but this configuration has {expected}: "
                "build it for these settings, or run it with its own"
            )
    if isinstance(policy, FallbackPolicy):  # the learned policy and the heuristic it falls back to, each
        for inner in (policy.policy, policy.fallback):
            _check_instance(inner, config, observation_space, action_space)


def _check_ladder(name: str, ladder: tuple[float, ...], config: ControllerConfig) -> None:
    """Refuses another LR ladder than ``config``'s, as ``make_policy`` does for a zip's (same wording)."""
    if tuple(ladder) != tuple(config.lr_scales):
        raise PolicyLoadError(
            f"policy {name!r} was built with LR multipliers {list(ladder)}, and this configuration's are "
            f"{list(config.lr_scales)}: its LR actions would pick other multipliers. Run it with its own "
            "(ControllerConfig(lr_scales=...), or config=policy.config), or build it with this configuration"
        )


def _allowed() -> str:
    """The policy specs ``make_policy`` takes, for its messages."""
    return (
        f"{', '.join(STATIC_PRESETS)}, {', '.join(HEURISTIC_NAMES)}, pretrained, {', '.join(BATCH_FINDER_NAMES)}, "
        "or a path to an SB3 .zip"
    )


def pretrained_policy_path() -> Path:
    """The policy shipped inside the package (see ``triaccel_rl/pretrained/MODEL_CARD.md``).

    Raises:
        ValueError: this installation has no shipped policy.
    """
    path = Path(str(resources.files("triaccel_rl").joinpath("pretrained/policy.zip")))
    if not path.is_file():
        raise ValueError(f"no pretrained policy is shipped with this installation (looked for {path})")
    return path

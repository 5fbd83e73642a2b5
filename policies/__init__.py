"""Policies with one ``predict`` signature: static baselines, the heuristic, and learned SB3 policies."""

from __future__ import annotations

from typing import Any

from gymnasium import spaces
from triaccel_rl.policies.heuristic import HeuristicPolicy
from triaccel_rl.policies.learned import LearnedPolicy, PolicyLoadError
from triaccel_rl.policies.static import STATIC_PRESETS, StaticPolicy

from triaccel_rl.config import ControllerConfig
from triaccel_rl.types import Policy

__all__ = ["STATIC_PRESETS", "HeuristicPolicy", "LearnedPolicy", "PolicyLoadError", "StaticPolicy", "make_policy"]


def make_policy(
    spec: str | Policy,
    config: ControllerConfig | None = None,
    observation_space: spaces.Space[Any] | None = None,
    action_space: spaces.Space[Any] | None = None,
) -> Policy:
    """Turns a name or a path into a policy: ``fp32``/``bf16``/``fp16`` (static), ``heuristic``, a ``.zip``.

    Raises:
        ValueError: an unknown name (the message lists the allowed ones) or an unusable zip.
    """
    if not isinstance(spec, str):
        return spec
    config = config or ControllerConfig()
    name = spec.lower()
    if name in STATIC_PRESETS or name.removeprefix("static-") in STATIC_PRESETS:
        return StaticPolicy(name.removeprefix("static-"), config)
    if name == "heuristic":
        return HeuristicPolicy(config)
    if name.endswith(".zip"):
        return LearnedPolicy(spec, observation_space, action_space)
    raise ValueError(
        f"unknown policy {spec!r}; allowed: {', '.join(STATIC_PRESETS)}, heuristic, or a path to an SB3 .zip"
    )

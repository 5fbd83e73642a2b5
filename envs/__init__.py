"""Gymnasium environments over a training run; importing this module registers ``TriAccel-v0``."""

from gymnasium.envs.registration import register, registry
from triaccel_rl.envs.training_env import TriAccelEnv

__all__ = ["TriAccelEnv"]

if "TriAccel-v0" not in registry:
    register(id="TriAccel-v0", entry_point="triaccel_rl.envs.training_env:TriAccelEnv")

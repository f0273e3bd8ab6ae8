"""Rewards by name: a data set's ``reward`` field (or the trainer's default) names one of these."""

from __future__ import annotations

from typing import Callable

from megatron_papo.rewards.choice import choice_reward
from megatron_papo.rewards.math_rewards import math_reward

RewardFn = Callable[[str, str], dict]
REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str):
    """Decorator: ``fn(response, ground_truth) -> {"overall", "accuracy", "format"}`` under ``name``."""
    def deco(fn: RewardFn) -> RewardFn:
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is already registered")
        REWARDS[name] = fn
        return fn
    return deco


def get_reward(name: str | None) -> RewardFn:
    """The reward called ``name`` (None or "" -> ``math``, the reward of the published runs)."""
    key = (name or "math").strip().lower()
    if key not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; set the sample's 'reward' field to one of "
                         f"{', '.join(sorted(REWARDS))}")
    return REWARDS[key]


register_reward("math")(math_reward)
register_reward("choice")(choice_reward)
register_reward("multiple_choice")(choice_reward)

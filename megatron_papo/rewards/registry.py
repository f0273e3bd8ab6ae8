"""Rewards by name: a data set's ``reward`` field (or the trainer's default) names one of these."""

from __future__ import annotations

from typing import Callable

from megatron_papo.registry import Registry
from megatron_papo.rewards.choice import choice_reward
from megatron_papo.rewards.math_rewards import math_reward

RewardFn = Callable[[str, str], dict]
# fn(response, ground_truth) -> {"overall", "accuracy", "format"}, by the name a sample's ``reward`` field gives
REWARDS: Registry[RewardFn] = Registry("reward", "the sample's 'reward' field")
register_reward = REWARDS.register


def get_reward(name: str | None) -> RewardFn:
    """The reward called ``name`` (None or "" -> ``math``, the reward of the published runs)."""
    return REWARDS.get((name or "math").strip().lower())


register_reward("math")(math_reward)
register_reward("choice")(choice_reward)
register_reward("multiple_choice")(choice_reward)

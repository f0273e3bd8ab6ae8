"""Rewards: ``fn(response: str, ground_truth: str) -> {"overall", "accuracy", "format"}``, floats in [0, 1].

- :func:`math_reward`: ``0.9 * accuracy + 0.1 * format``; accuracy = mathruler's ``grade_answer`` on the last
  ``\\boxed{}``; format = ``<think>...</think>`` then ``\\boxed{...}`` (docs/algorithm.md section 3).
- :func:`choice_reward`: the same with a multiple-choice letter comparison (falls back to math grading when the
  ground truth is not a letter).
- :func:`get_reward` ``(name)``: registry lookup (``math``, ``choice``/``multiple_choice``); ``register_reward``.

No reward raises on model output: malformed or empty text scores 0, and sympy is guarded against hanging inputs.
"""

from megatron_papo.rewards.choice import choice_letter, choice_reward
from megatron_papo.rewards.math_rewards import has_think_box_format, last_boxed, math_reward, safe_grade
from megatron_papo.rewards.registry import REWARDS, get_reward, register_reward

__all__ = ["REWARDS", "choice_letter", "choice_reward", "get_reward", "has_think_box_format", "last_boxed",
           "math_reward", "register_reward", "safe_grade"]

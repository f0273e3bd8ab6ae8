"""Multiple-choice reward: the letter in the last ``\\boxed{}`` against the ground-truth letter.

Same shape as :func:`math_reward` (``overall = 0.9 * accuracy + 0.1 * format``). A ground truth that is not a
choice letter falls back to math grading, so a mixed data set can name this reward for every sample.
"""

from __future__ import annotations

import re

from megatron_papo.rewards.math_rewards import boxed_answer_reward, safe_grade

# letter alone or decorated: "B", "(B)", "B.", "B)", "B: 12", "\text{B}", "Option B", "(B) 45 cm"
_CHOICE = re.compile(r"^\s*(?:\\text\{\s*)?(?:(?:option|answer|choice)\s*[:\s]?\s*)?\(?([A-J])\)?"
                     r"(?=$|[\s.:),}])", re.IGNORECASE)
_MAX_CHOICE_CHARS = 512


def choice_letter(text: str | None) -> str | None:
    """The option letter ``text`` names, upper-cased, or None. A lone lower-case letter counts; a lower-case
    letter starting longer text ("a triangle") does not."""
    if not text or len(text) > _MAX_CHOICE_CHARS:
        return None
    m = _CHOICE.match(text)
    if m is None:
        return None
    letter = m.group(1)
    if letter.islower() and text.strip() not in (letter, f"({letter})"):
        return None
    return letter.upper()


def _choice_correct(answer, ground_truth: str) -> bool:
    want = choice_letter(ground_truth.strip())
    if want is None:  # not a letter: grade it as a math answer
        return bool(answer) and safe_grade(answer, ground_truth)
    return choice_letter(answer) == want


def choice_reward(response: str, ground_truth: str) -> dict[str, float]:
    """``{"overall", "accuracy", "format"}`` for a multiple-choice answer; never raises."""
    return boxed_answer_reward(response, ground_truth, _choice_correct)

"""Rewards: a table of answer pairs graded by mathruler (the published grader), format rule, multiple choice,
malformed and adversarial model output (never raises, never hangs, scores 0)."""

import random
import re
import subprocess
import sys

import pytest

from megatron_papo.rewards import choice_letter, choice_reward, get_reward, math_reward, register_reward
from megatron_papo.rewards.math_rewards import has_think_box_format, squeeze_tag_spaces


def _wrap(answer):
    return f"<think>Let me work it out step by step.</think> The answer is \\boxed{{{answer}}}."


# (model's boxed answer, ground truth, expected accuracy); the expectations are mathruler's verdicts
MATH_TABLE = [
    # fractions
    ("\\frac{1}{2}", "0.5", 1), ("1/2", "\\frac{1}{2}", 1), ("0.5", "1/2", 1), ("\\dfrac{3}{4}", "\\frac{3}{4}", 1),
    ("\\frac12", "0.5", 1), ("2/4", "1/2", 0), ("0.333", "1/3", 0), ("\\frac{\\sqrt{3}}{2}", "\\sqrt{3}/2", 1),
    # decimals and integers
    ("3.0", "3", 1), ("3.14", "3.14", 1), ("3.1", "3.14", 0), ("12.50", "12.5", 1), ("1,000", "1000", 1),
    ("1e3", "1000", 1), ("-3", "-3", 1), ("- 3", "-3", 1), ("3", "-3", 0), ("7", "8", 0),
    # LaTeX and algebra
    ("\\sqrt{2}", "\\sqrt2", 1), ("2\\sqrt{3}", "\\sqrt{12}", 1), ("10\\sqrt{2}", "\\sqrt{200}", 1),
    ("x^2+2x+1", "(x+1)^2", 1), ("\\frac{2}{3}\\pi", "2\\pi/3", 1), ("\\pi", "3.14159", 0), ("x=5", "5", 1),
    ("(2,3)", "(2, 3)", 1), ("(3,2)", "(2,3)", 0), ("[1,2)", "[1,2)", 1), ("\\infty", "\\infty", 1),
    # units, degrees, percentages, currency
    ("10 cm", "10", 1), ("5 \\text{ meters}", "5", 1), ("45^\\circ", "45", 1), ("120^{\\circ}", "120", 1),
    ("45 degrees", "45", 1), ("45°", "45", 0), ("50\\%", "50", 1), ("50%", "50", 1), ("8\\%", "0.08", 0),
    ("\\$5", "5", 1), ("$12$", "12", 1), ("6 m", "6", 0),
    # letters (multiple choice answered through the math reward, as the reference data does)
    ("\\text{B}", "B", 1), ("B", "b", 1), ("A", "A", 1), ("C", "B", 0),
    # malformed or adversarial content inside the box
    ("", "3", 0), ("   ", "3", 0), ("\\frac{1}{0}", "1", 0), ("1/0", "1", 0), ("9**9**9", "\\sqrt{2}", 0),
    ("(10^9)!", "\\sqrt{2}", 0), ("x**9**9**9", "\\sqrt{2}", 0), ("2^{2^{100}}", "\\sqrt{2}", 0),
    ("\\frac{" * 300, "1", 0), ("1" * 5000, "1", 0), ("}{" * 100, "\\frac{1}{2}", 0),
]


@pytest.mark.parametrize("answer,truth,acc", MATH_TABLE)
def test_math_reward_table(answer, truth, acc):
    r = math_reward(_wrap(answer), truth)
    assert r["accuracy"] == acc and r["format"] == 1.0
    assert r["overall"] == pytest.approx(0.9 * acc + 0.1)


def test_table_is_large_enough():
    assert len(MATH_TABLE) >= 40


@pytest.mark.parametrize("response,truth,expected", [
    ("<think>x</think>\\boxed{4}", "4", (1.0, 1.0, 1.0)),
    ("\\boxed{4}", "4", (0.9, 1.0, 0.0)),                                       # right but no <think>
    ("<think>x</think> 4", "4", (0.0, 0.0, 0.0)),                               # no box: format fails too
    ("<think>x</think>\\boxed{5}", "4", (0.1, 0.0, 1.0)),                       # well formed, wrong
    ("< think >x</ think >\\boxed{4}", "4", (1.0, 1.0, 1.0)),                   # spaced tags (Qwen2.5-VL-32B)
    ("Answer <think>x</think>\\boxed{4}", "4", (0.9, 1.0, 0.0)),                # must start with <think>
    ("<think>x</think>\\boxed{3} then \\boxed{4}", "4", (1.0, 1.0, 1.0)),       # the last box counts
    ("<think>x</think>\\boxed{\\frac{1}{2}", "0.5", (0.1, 0.0, 1.0)),          # unclosed box: no answer, but
                                                                                # the reference's format regex
                                                                                # passes (a "}" follows)
    ("<think>\\boxed{4}</think>", "4", (0.9, 1.0, 0.0)),                        # box inside the thinking only
    ("", "4", (0.0, 0.0, 0.0)),
])
def test_math_reward_format_rule(response, truth, expected):
    r = math_reward(response, truth)
    assert (r["overall"], r["accuracy"], r["format"]) == pytest.approx(expected)


def _reference_format(text):
    """The reference implementation's regexes, verbatim (quadratic in the worst case, fine for short strings)."""
    text = re.sub(r"\s*(<|>|/)\s*", r"\1", text)
    return re.fullmatch(re.compile(r"<think>.*</think>.*\\boxed\{.*\}.*", re.DOTALL), text) is not None


def test_linear_format_check_equals_the_reference_regex():
    rng = random.Random(0)
    pieces = ["<think>", "</think>", "\\boxed{", "}", "{", " ", "\n", "/", "<", ">", "a", "1", "< think >", "</ think>"]
    for _ in range(3000):
        s = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 9)))
        assert has_think_box_format(squeeze_tag_spaces(s)) == _reference_format(s), repr(s)
        assert squeeze_tag_spaces(s) == re.sub(r"\s*(<|>|/)\s*", r"\1", s), repr(s)


@pytest.mark.parametrize("response", [None, 12, b"<think>x</think>\\boxed{1}", ["\\boxed{1}"]])
def test_non_string_output_scores_zero(response):
    assert math_reward(response, "1") == {"overall": 0.0, "accuracy": 0.0, "format": 0.0}
    assert choice_reward(response, "A") == {"overall": 0.0, "accuracy": 0.0, "format": 0.0}


_ADVERSARIAL = r'''
import sys
from megatron_papo.rewards import math_reward, choice_reward
cases = [
    " " * 1_000_000 + "/",                                  # quadratic for the reference's whitespace regex
    "<think>" * 100_000 + "</think>" * 100_000,            # pathological for the format regex
    "\\boxed{" * 50_000, "{" * 200_000 + "}" * 200_000, "\\boxed{" + "{" * 100_000 + "}" * 100_001,
    "<think>x</think>\\boxed{9**9**9}", "<think>x</think>\\boxed{(10^9)!}", "<think>x</think>\\boxed{x**9**9**9}",
    "<think>x</think>\\boxed{((((((9^9)^9)^9)^9)^9)^9)^9}", "\\boxed{" + "\\sqrt{" * 5000 + "2" + "}" * 5001,
    "\x00\xff\ud800 garbage \\boxed{\\frac{}{}}", "\\boxed{\\begin{matrix}" * 1000,
    "\\boxed{2^-9^9}", "\\boxed{3^-99999999}", "\\boxed{2^-\\frac{9999999}{1}}", "\\boxed{2^{-\\dfrac{99999}{1}}}",
]
for truth in ["\\sqrt{2}", "x+1", "A", "1"]:
    for c in cases:
        for fn in (math_reward, choice_reward):
            r = fn(c, truth)
            assert r["accuracy"] == 0.0, (c[:40], truth)
print("done")
'''


def test_adversarial_outputs_neither_raise_nor_hang():
    # a subprocess with a timeout: an unguarded sympy call here would run for hours, not fail
    proc = subprocess.run([sys.executable, "-c", _ADVERSARIAL], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stderr[-2000:]


@pytest.mark.parametrize("answer,truth,acc", [
    ("B", "B", 1), ("(B)", "B", 1), ("B.", "(B)", 1), ("B) 45 cm", "B", 1), ("\\text{B}", "B", 1),
    ("Option B", "B", 1), ("b", "B", 1), ("C", "B", 0), ("a triangle", "A", 0), ("", "A", 0), ("BC", "B", 0),
    ("E: none of these", "E", 1), ("\\frac{1}{2}", "0.5", 1),                   # non-letter truth: math grading
])
def test_choice_reward(answer, truth, acc):
    r = choice_reward(_wrap(answer), truth)
    assert r["accuracy"] == acc and r["overall"] == pytest.approx(0.9 * acc + 0.1)


def test_choice_letter_parsing():
    assert choice_letter("(D)") == "D" and choice_letter("answer: c") is None and choice_letter("c") == "C"
    assert choice_letter(None) is None and choice_letter("Z") is None and choice_letter("A" * 1000) is None


def test_registry():
    assert get_reward("math") is math_reward and get_reward(None) is math_reward
    assert get_reward("Choice") is choice_reward and get_reward("multiple_choice") is choice_reward
    with pytest.raises(ValueError, match="reward"):
        get_reward("bleu")
    with pytest.raises(ValueError, match="already registered"):
        register_reward("math")(math_reward)

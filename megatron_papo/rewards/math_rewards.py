"""Math answer reward: ``overall = 0.9 * accuracy + 0.1 * format`` (docs/algorithm.md section 3).

Accuracy grades the content of the last ``\\boxed{...}`` against the ground truth with ``mathruler``'s
``grade_answer`` (the grader behind the published numbers). Everything here is linear-time in the response and
never raises: model output is untrusted, and a malformed answer scores 0. sympy is only reached through
:func:`safe_grade`, which refuses inputs that can make it hang (huge powers, factorials, long expressions).
"""

from __future__ import annotations

import re

from mathruler import grader as mathruler_grader
from mathruler.grader import grade_answer
from mathruler.math_normalize import normalize_answer

FORMAT_WEIGHT = 0.1
# answers longer than this are compared as normalised strings only (no sympy)
MAX_SYMPY_CHARS = 256
# most exponent operators an answer may hold before sympy is skipped (each nesting multiplies the exponent)
MAX_POWERS = 4
_WS = re.compile(r"\s+")
# an exponent that starts with 3+ digits (2^-99999999: mathruler only refuses unsigned ones), or a tower a^-9^9
_BIG_EXPONENT = re.compile(r"\^[\s{(]*[-+]?[\s{(]*\d[\s,]*\d[\s,]*\d")
_TOWER = re.compile(r"\^\s*[-+]?\s*[\w.]+\s*\^")
# an exponent token: a braced or parenthesised group, or a number / name written with separators (_ ' \, .)
_EXPONENT = re.compile(r"\^\s*(\{[^{}]*\}|\([^()]*\)|[-+]?(?:[\w.']|\\,)+)")


def squeeze_tag_spaces(text: str) -> str:
    """Drop whitespace next to ``<``, ``>`` and ``/`` (the reference's ``re.sub(r"\\s*(<|>|/)\\s*", r"\\1", s)``,
    which is quadratic on long whitespace runs; this is the same result in linear time)."""
    def repl(m: re.Match) -> str:
        s, e = m.span()
        near = (s > 0 and text[s - 1] in "<>/") or (e < len(text) and text[e] in "<>/")
        return "" if near else m.group(0)
    return _WS.sub(repl, text)


def has_think_box_format(text: str) -> bool:
    """The reference's ``re.fullmatch(r"<think>.*</think>.*\\\\boxed\\{.*\\}.*", text, re.DOTALL)`` in linear time:
    ``.*`` matches anything, so taking the earliest occurrence of each literal is always best."""
    if not text.startswith("<think>"):
        return False
    end_think = text.find("</think>", len("<think>"))
    if end_think < 0:
        return False
    box = text.find("\\boxed{", end_think + len("</think>"))
    return box >= 0 and text.find("}", box + len("\\boxed{")) >= 0


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` with nested braces balanced; None if absent or unclosed."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    body = start + len("\\boxed{")
    for i in range(body, len(text)):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            if depth == 0:
                return text[body:i].strip()
            depth -= 1
    return None


def _sympy_safe(expr: str) -> bool:
    if len(expr) > MAX_SYMPY_CHARS:
        return False
    # check the text sympy will see too: LaTeX such as 2^-\frac{9999999}{1} only becomes 2^-9999999/1 there
    return _no_explosive_powers(expr) and _no_explosive_powers(_sympy_view(expr))


def _sympy_view(expr: str) -> str:
    return mathruler_grader._normalize(expr) or ""


def _no_explosive_powers(expr: str) -> bool:
    if "**" in expr or expr.replace("\\!", "").count("!") > 0:           # towers and factorials explode
        return False
    if _BIG_EXPONENT.search(expr) or _TOWER.search(expr) or _risky_exponent(expr):
        return False
    return expr.count("^") <= MAX_POWERS


def _risky_exponent(expr: str) -> bool:
    """Digit separators (``123_456``, ``123\\,456``, ``123'456``) or other bases (``0x7F``) in an exponent hide
    a huge power from the plain-digit check: 3+ digits once separators are dropped, or a base prefix."""
    for m in _EXPONENT.finditer(expr):
        alnum = re.sub(r"[^0-9A-Za-z]", "", m.group(1))
        if sum(c.isdigit() for c in alnum) >= 3 or re.search(r"0[xXbBoO]", alnum):
            return True
    return False


def safe_grade(given: str, ground_truth: str) -> bool:
    """mathruler's ``grade_answer`` behind guards: exceptions count as wrong, and inputs that could make sympy
    hang are compared as normalised strings only."""
    try:
        if _sympy_safe(given) and _sympy_safe(ground_truth):
            return bool(grade_answer(given, ground_truth))
        a, b = normalize_answer(given), normalize_answer(ground_truth)
        return a is not None and a == b
    except Exception:  # noqa: BLE001 - untrusted model output must never crash training
        return False


def boxed_answer_reward(response, ground_truth, is_correct) -> dict[str, float]:
    """The PAPO reward shape: ``is_correct(last boxed answer, ground truth)`` graded, plus the format term.

    ``{"overall": 0.9 * accuracy + 0.1 * format, "accuracy", "format"}``; never raises on model output.
    """
    if not isinstance(response, str) or not isinstance(ground_truth, str):
        return {"overall": 0.0, "accuracy": 0.0, "format": 0.0}
    text = squeeze_tag_spaces(response)
    fmt = 1.0 if has_think_box_format(text) else 0.0
    answer = last_boxed(text)
    acc = 1.0 if is_correct(answer, ground_truth) else 0.0
    return {"overall": (1 - FORMAT_WEIGHT) * acc + FORMAT_WEIGHT * fmt, "accuracy": acc, "format": fmt}


def _math_correct(answer, ground_truth: str) -> bool:
    return bool(answer) and safe_grade(answer, ground_truth)


def math_reward(response: str, ground_truth: str) -> dict[str, float]:
    """``{"overall", "accuracy", "format"}`` for one response; never raises."""
    return boxed_answer_reward(response, ground_truth, _math_correct)

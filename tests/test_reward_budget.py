"""Rewards never stall a run: a response that takes longer than its time budget scores 0 and is counted, its worker
is replaced, and known sympy bombs (exponents with digit separators or in other bases) are refused up front."""

from __future__ import annotations

import time

import pytest

from megatron_papo.rewards import math_reward
from megatron_papo.rewards.budget import RewardPool, score_responses


def _slow(response: str, answer: str) -> dict:
    if response == "hang":
        while True:
            time.sleep(0.05)
    if response == "raise":
        raise RuntimeError("broken grader")
    return {"overall": 1.0, "accuracy": 1.0, "format": 0.0}


def test_a_response_past_its_budget_scores_zero_and_the_rest_are_graded():
    pool = RewardPool(num_workers=2, timeout_s=2.0)
    try:
        jobs = [(_slow, r, "1") for r in ("a", "hang", "b", "raise", "hang", "c")]
        scores, timed_out = pool.score(jobs)
        assert timed_out == 2
        assert [s["overall"] for s in scores] == [1.0, 0.0, 1.0, 0.0, 0.0, 1.0]
        scores, timed_out = pool.score([(_slow, "d", "1")])            # replaced workers keep serving
        assert timed_out == 0 and scores[0]["overall"] == 1.0
    finally:
        pool.close()


BOMBS = ["3^{0x7FFFFFF}", "3^{123_456_789}", "3^{123\\,456\\,789}", "3^{123'456'789}", "7^{0b1111111111111111111111}"]


@pytest.mark.parametrize("exponent", BOMBS)
def test_hidden_huge_exponents_are_graded_without_sympy(exponent):
    response = f"<think>x</think> \\boxed{{{exponent}}}"
    scores, timed_out = score_responses([(math_reward, response, "0.5")], timeout_s=20.0, num_workers=1)
    assert timed_out == 0 and scores[0] == {"overall": 0.1, "accuracy": 0.0, "format": 1.0}


def test_inline_grading_when_the_budget_is_off():
    scores, timed_out = score_responses([(_slow, "a", "1")], timeout_s=0)
    assert scores[0]["overall"] == 1.0 and timed_out == 0

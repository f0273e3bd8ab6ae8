"""Paired statistics over questions: bootstrap intervals, exact sign / McNemar tests, Benjamini-Hochberg.

The paired unit is the question. With k answers per question, run A's score of question i is its correct
fraction a_i = correct_i / k (its avg@k contribution), likewise b_i for run B:
- the difference in accuracy is mean_i (b_i - a_i); its 95% interval is the percentile bootstrap over questions
  (questions resampled with replacement, ``resamples`` times, a seeded generator; within each data set when
  several are pooled, so each keeps its size);
- the **sign test** counts questions with b_i > a_i against b_i < a_i (ties dropped) and gives the exact
  two-sided binomial p-value; with k = 1 it is exactly McNemar's exact test on per-question correctness;
- **McNemar** (exact) is also reported on two binary per-question outcomes: majority correct (correct > k/2)
  and any correct (the pass@k event);
- p-values of several data sets are adjusted with Benjamini-Hochberg (false discovery rate).
"""

from __future__ import annotations

from fractions import Fraction
from math import comb
from typing import Optional, Sequence

import numpy as np

_BLOCK = 4_000_000  # indices drawn at once


def binom_two_sided(successes: int, trials: int) -> float:
    """Exact two-sided p-value of ``successes`` out of ``trials`` under p = 1/2 (the sign / McNemar test)."""
    if trials == 0:
        return 1.0
    m = min(successes, trials - successes)
    tail = Fraction(sum(comb(trials, i) for i in range(m + 1)), 2 ** trials)
    return float(min(Fraction(1), 2 * tail))


def sign_test(a: Sequence[float], b: Sequence[float]) -> dict:
    """Paired sign test of b against a: ``{"better", "worse", "ties", "p"}``."""
    d = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    better, worse = int((d > 0).sum()), int((d < 0).sum())
    return {"better": better, "worse": worse, "ties": int(len(d) - better - worse),
            "p": binom_two_sided(better, better + worse)}


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """Exact McNemar test on paired binary outcomes: ``{"a_only", "b_only", "p"}``."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    a_only, b_only = int((a & ~b).sum()), int((b & ~a).sum())
    return {"a_only": a_only, "b_only": b_only, "p": binom_two_sided(b_only, a_only + b_only)}


def bootstrap_mean_diff(diff: Sequence[float], strata: Optional[Sequence] = None, resamples: int = 10_000,
                        seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(diff) over paired units (resampled within ``strata`` if given)."""
    d = np.asarray(diff, dtype=float)
    rng = np.random.default_rng(seed)
    if strata is None:
        strata = np.zeros(len(d), dtype=int)
    strata = np.asarray(strata)
    means = np.zeros(resamples)
    for s in np.unique(strata):
        part = d[strata == s]
        step = max(1, _BLOCK // len(part))                                  # resamples per draw: bounded memory
        for r in range(0, resamples, step):
            idx = rng.integers(0, len(part), size=(min(step, resamples - r), len(part)))  # [R', n_s]
            means[r:r + len(idx)] += part[idx].sum(1)
    means /= len(d)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def benjamini_hochberg(pvalues: Sequence[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values (step-up, monotone, capped at 1), in the input order."""
    p = np.asarray(pvalues, dtype=float)
    n = len(p)
    if n == 0:
        return []
    order = np.argsort(p)
    scaled = p[order] * n / np.arange(1, n + 1)
    adjusted = np.minimum.accumulate(scaled[::-1])[::-1].clip(max=1.0)
    out = np.empty(n)
    out[order] = adjusted
    return out.tolist()

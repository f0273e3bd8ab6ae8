"""Per-question records -> metrics per data set and overall.

A record is one question: ``correct`` of its ``k`` answers were right, ``format`` well-formed, ``truncated`` cut
by max_new_tokens, ``tokens`` generated in all; with perception also ``correct_masked`` / ``correct_blank`` (the
same question answered k times with the masked / the blank image) and, over the k real-image answers,
``kl_sum`` / ``k3_sum`` (per-token KL between the next-token distributions with the real and the masked image,
summed over the ``tokens`` scored).

Metrics: ``avg@k`` = mean over questions of correct / k; ``pass@k`` = share of questions with an answer right;
``format`` and ``truncation`` = share of answers; ``response_length`` = mean tokens per answer; with perception
``avg@k_masked``, ``avg@k_blank``, ``reliance_masked`` = avg@k - avg@k_masked, ``reliance_blank``, and the
token-weighted means ``kl_exact`` and ``kl_k3``. ``overall`` weighs every question alike.
"""

from __future__ import annotations

from collections import defaultdict


def summarize(records: list[dict], k: int) -> dict:
    by_set = defaultdict(list)
    for r in records:
        by_set[r["dataset"]].append(r)
    out = {d: _metrics(rs, k) for d, rs in sorted(by_set.items())}
    out["overall"] = _metrics(records, k)
    return out


def _metrics(rs: list[dict], k: int) -> dict:
    n = len(rs)
    answers = max(n * k, 1)
    total = lambda key: sum(r[key] for r in rs)  # noqa: E731
    m = {"questions": n, "samples": n * k, "avg@k": total("correct") / answers,
         "pass@k": sum(r["correct"] > 0 for r in rs) / max(n, 1), "format": total("format") / answers,
         "truncation": total("truncated") / answers, "response_length": total("tokens") / answers}
    if rs and "correct_masked" in rs[0]:
        m["avg@k_masked"] = total("correct_masked") / answers
        m["avg@k_blank"] = total("correct_blank") / answers
        m["reliance_masked"] = m["avg@k"] - m["avg@k_masked"]
        m["reliance_blank"] = m["avg@k"] - m["avg@k_blank"]
        scored = max(total("tokens"), 1)
        m["kl_exact"] = total("kl_sum") / scored
        m["kl_k3"] = total("k3_sum") / scored
    return m

"""``megatron-papo compare``: paired differences between evaluation runs (every run against the first).

Runs pair only when they answered the same questions (same ids in the same data sets) under the same decoding
and image settings (``evaluation.settings.PAIRING_KEYS``); the checkpoint, the sampling seed and the parallel
layout may differ, and so may the processor's pixel range of two runs under the same protocol (it follows the model
family). Per data set and overall: the difference in avg@k (B - A) and, when both runs measured
perception, in image reliance (avg@k - avg@k_masked), each with a paired bootstrap 95% interval over questions;
the exact sign test on per-question correct fractions (McNemar's test when k = 1) and the exact McNemar tests on
majority-correct (correct > k/2) and on any-correct (pass@k), Benjamini-Hochberg adjusted across the data sets
(see ``evaluation.stats``).
"""

from __future__ import annotations

import numpy as np

from megatron_papo.evaluation.settings import PAIRING_KEYS, PROTOCOL_FAMILY_KEYS
from megatron_papo.evaluation.stats import benjamini_hochberg, bootstrap_mean_diff, mcnemar, sign_test

TOOL = "megatron-papo compare"


def check_pairable(a: dict, b: dict, name_a: str, name_b: str) -> None:
    """Raise a one-line ValueError naming what differs between two runs."""
    sa, sb = a["settings"], b["settings"]
    same_protocol = sa.get("protocol") is not None and sa.get("protocol") == sb.get("protocol")
    keys = [k for k in PAIRING_KEYS if not (same_protocol and k in PROTOCOL_FAMILY_KEYS)]
    diff = [f"{k} {sa.get(k)!r} vs {sb.get(k)!r}" for k in keys if sa.get(k) != sb.get(k)]
    if diff:
        raise ValueError(f"cannot pair {name_a} and {name_b}: different settings: {'; '.join(diff)}")
    qa = {r["id"]: r["dataset"] for r in a["records"]}
    qb = {r["id"]: r["dataset"] for r in b["records"]}
    if qa != qb:
        only_a, only_b = sorted(set(qa) - set(qb)), sorted(set(qb) - set(qa))
        moved = sorted(i for i in set(qa) & set(qb) if qa[i] != qb[i])
        parts = [f"{len(only_a)} only in {name_a} (e.g. {only_a[0]})" if only_a else "",
                 f"{len(only_b)} only in {name_b} (e.g. {only_b[0]})" if only_b else "",
                 f"{len(moved)} in different data sets (e.g. {moved[0]})" if moved else ""]
        raise ValueError(f"cannot pair {name_a} and {name_b}: different questions: "
                         + ", ".join(p for p in parts if p))


def _scores(run: dict, ids: list) -> dict:
    k = run["settings"]["k"]
    by_id = {r["id"]: r for r in run["records"]}
    rs = [by_id[i] for i in ids]
    out = {"acc": np.array([r["correct"] / k for r in rs]),
           "majority": np.array([2 * r["correct"] > k for r in rs]), "any": np.array([r["correct"] > 0 for r in rs])}
    if "correct_masked" in rs[0]:
        out["reliance"] = out["acc"] - np.array([r["correct_masked"] / k for r in rs])
    return out


def _pair_stats(a: dict, b: dict, strata, resamples: int, seed: int) -> dict:
    d = b["acc"] - a["acc"]
    out = {"questions": len(d), "a": float(a["acc"].mean()), "b": float(b["acc"].mean()), "diff": float(d.mean()),
           "ci95": bootstrap_mean_diff(d, strata, resamples, seed), "sign_test": sign_test(a["acc"], b["acc"]),
           "mcnemar_majority": mcnemar(a["majority"], b["majority"]), "mcnemar_any": mcnemar(a["any"], b["any"])}
    if "reliance" in a and "reliance" in b:
        r = b["reliance"] - a["reliance"]
        out["reliance"] = {"a": float(a["reliance"].mean()), "b": float(b["reliance"].mean()),
                           "diff": float(r.mean()), "ci95": bootstrap_mean_diff(r, strata, resamples, seed + 1),
                           "sign_test": sign_test(a["reliance"], b["reliance"])}
    return out


def compare_pair(a: dict, b: dict, resamples: int = 10_000, seed: int = 0) -> dict:
    """Per data set (+ ``overall``, bootstrap stratified by data set) paired statistics of b against a."""
    ids = [r["id"] for r in a["records"]]
    dsets = np.array([r["dataset"] for r in a["records"]])
    sa, sb = _scores(a, ids), _scores(b, ids)
    out = {}
    for d in sorted(set(dsets.tolist())):
        sel = dsets == d
        out[d] = _pair_stats({k: v[sel] for k, v in sa.items()}, {k: v[sel] for k, v in sb.items()}, None,
                             resamples, seed)
    out["overall"] = _pair_stats(sa, sb, dsets, resamples, seed)
    names = [d for d in out if d != "overall"]
    for key in ("sign_test", "mcnemar_majority", "mcnemar_any"):
        for d, q in zip(names, benjamini_hochberg([out[d][key]["p"] for d in names])):
            out[d][key]["p_bh"] = q
    if all("reliance" in out[d] for d in names):
        for d, q in zip(names, benjamini_hochberg([out[d]["reliance"]["sign_test"]["p"] for d in names])):
            out[d]["reliance"]["sign_test"]["p_bh"] = q
    return out


def compare_runs(runs: list, names: list, resamples: int = 10_000, seed: int = 0) -> dict:
    for run, name in zip(runs[1:], names[1:]):
        check_pairable(runs[0], run, names[0], name)
    return {"tool": TOOL, "baseline": names[0], "resamples": resamples, "seed": seed,
            "settings": {k: runs[0]["settings"].get(k) for k in PAIRING_KEYS},
            "runs": [{"file": n, "checkpoint": r["settings"].get("checkpoint"), "seed": r["settings"].get("seed")}
                     for n, r in zip(names, runs)],
            "comparisons": [{"a": names[0], "b": n, "datasets": compare_pair(runs[0], r, resamples, seed)}
                            for n, r in zip(names[1:], runs[1:])]}


def format_comparison(result: dict) -> str:
    lines = []
    for c in result["comparisons"]:
        lines.append(f"{c['b']} vs {c['a']} (B - A; 95% paired bootstrap over questions, "
                     f"{result['resamples']} resamples; p: exact sign test, BH-adjusted across data sets)")
        rel = "reliance" in c["datasets"]["overall"]
        width = max(len("dataset"), *(len(d) for d in c["datasets"]))
        head = f"{'dataset':<{width}}  {'n':>5}  {'acc A':>7}  {'acc B':>7}  {'diff':>8}  {'95% CI':>19}  " \
               f"{'+/-':>9}  {'p':>7}  {'p_BH':>7}  {'McN_maj':>7}  {'McN_any':>7}"
        lines.append(head + (f"  {'rel A':>7}  {'rel B':>7}  {'rel diff':>8}  {'95% CI':>19}" if rel else ""))
        for d, s in c["datasets"].items():
            st, mc, ma = s["sign_test"], s["mcnemar_majority"], s["mcnemar_any"]
            row = (f"{d:<{width}}  {s['questions']:>5}  {s['a']:>7.4f}  {s['b']:>7.4f}  {s['diff']:>+8.4f}  "
                   f"{_ci(s['ci95']):>19}  {st['better']:>4}/{st['worse']:<4}  {st['p']:>7.3g}  "
                   f"{_fmt(st.get('p_bh')):>7}  {mc['p']:>7.3g}  {ma['p']:>7.3g}")
            if rel:
                r = s["reliance"]
                row += f"  {r['a']:>+7.4f}  {r['b']:>+7.4f}  {r['diff']:>+8.4f}  {_ci(r['ci95']):>19}"
            lines.append(row)
    return "\n".join(lines)


def _ci(ci) -> str:
    return f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"


def _fmt(p) -> str:
    return "-" if p is None else f"{p:.3g}"

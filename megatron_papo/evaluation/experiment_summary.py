"""The summary of an experiment: per arm mean and spread over seeds, per pair of arms paired-by-seed differences
with a bootstrap interval, the power those seeds give, and every difference read against the control arm.

Statistics (the seed is the paired unit: arms of a seed share the warm-start, the data order and the evaluation):
- per arm and metric: mean, standard deviation (ddof 1) and a 95% t interval of the mean over seeds;
- per pair (A, B) and metric: d_s = B_s - A_s; its mean, a 95% percentile bootstrap interval over seeds (seeds
  resampled with replacement, seeded), the count of seeds with B > A, and the smallest true difference the seeds
  would detect with 80% power at two-sided 5% (paired t: (t_.975 + t_.80) * sd(d) / sqrt(n));
- control drift: mean |control_s - baseline_s|, how far two arms that should behave alike land apart; a
  difference is ``beyond drift`` when its interval excludes 0 and its size exceeds that drift (no verdict with
  fewer than 3 seeds: the bootstrap interval of 1-2 seeds is only their range);
- forgetting: a run whose blank-image reliance falls by more than ``forget_threshold`` during RL (final against
  its warm-start) forgot the image.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np

# metric name -> key in the evaluation's "overall" entry
METRICS = {"accuracy": "avg@k", "reliance_blank": "reliance_blank", "reliance_masked": "reliance_masked",
           "accuracy_blank": "avg@k_blank", "perception_kl": "kl_exact"}
PAIRED = ("accuracy", "reliance_blank", "perception_kl")       # the metrics compared between arms
MIN_SEEDS_FOR_VERDICT = 3
CURVES = ("reward/mean", "actor/pg_clipfrac", "actor/perception_kl", "actor/ref_kl")


def mean_std(values) -> dict:
    v = np.asarray(values, dtype=float)
    n = len(v)
    sd = float(v.std(ddof=1)) if n > 1 else 0.0
    half = _t(0.975, n - 1) * sd / math.sqrt(n) if n > 1 else 0.0
    return {"mean": float(v.mean()), "std": sd, "ci95": [float(v.mean()) - half, float(v.mean()) + half], "n": n}


def _t(q: float, dof: int) -> float:
    try:
        from scipy.stats import t
        return float(t.ppf(q, dof))
    except ImportError:                                            # normal approximation
        return {0.975: 1.96, 0.8: 0.8416}[q]


def bootstrap_ci(diffs, resamples: int = 10_000, seed: int = 0) -> list:
    """95% percentile bootstrap interval of mean(diffs), resampling the paired units (seeds)."""
    d = np.asarray(diffs, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(d), size=(resamples, len(d)))   # [R, n]
    lo, hi = np.quantile(d[idx].mean(1), [0.025, 0.975])
    return [float(lo), float(hi)]


def detectable(diffs) -> float:
    """The true mean difference a paired t test on these seeds detects with 80% power (two-sided 5%)."""
    d = np.asarray(diffs, dtype=float)
    n = len(d)
    if n < 2:
        return float("inf")
    return float((_t(0.975, n - 1) + _t(0.8, n - 1)) * d.std(ddof=1) / math.sqrt(n))


def pair_stats(a, b, resamples: int = 10_000, seed: int = 0) -> dict:
    d = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    return {"mean": float(d.mean()), "ci95": bootstrap_ci(d, resamples, seed), "b_better": int((d > 0).sum()),
            "n": len(d), "detectable_80": detectable(d), "diffs": d.tolist()}


# --- collecting the runs ----------------------------------------------------------------------------------------
def _overall(path: Path) -> dict:
    o = json.loads(path.read_text())["datasets"]["overall"]
    return {name: float(o[key]) for name, key in METRICS.items() if key in o}


def read_curves(tb_dir: Path) -> dict:
    """Per-step scalars of a run's tensorboard events: {tag: [values by step]}.

    The trainer writes each start of a run into its own ``run-<date>-<time>`` directory under ``tb_dir``
    (``training.logging.run_directory``); they are read in name (= start time) order, so where a resumed start
    repeats steps the later start's values are kept. Events directly in ``tb_dir`` (older runs) are read first."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not tb_dir.is_dir():
        return {}
    by_tag: dict = {}
    for events_dir in [tb_dir] + sorted(d for d in tb_dir.iterdir() if d.is_dir()):
        acc = EventAccumulator(str(events_dir), size_guidance={"scalars": 0})
        acc.Reload()
        tags = set(acc.Tags().get("scalars", []))
        for tag in CURVES:
            if tag in tags:
                by_tag.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return {tag: [steps[s] for s in sorted(steps)] for tag, steps in by_tag.items()}


def collect(spec) -> dict:
    """{arm: {seed: {"final": metrics, "warm": metrics, "curves": {...}}}} from the experiment directory."""
    from megatron_papo.evaluation.experiment import run_dir, warm_dir

    runs = {}
    for arm in spec.arm_names:
        runs[arm] = {}
        for seed in spec.seeds:
            rd = run_dir(spec, arm, seed)
            runs[arm][seed] = {"final": _overall(rd / "eval.json"), "curves": read_curves(rd / "tb"),
                               "warm": _overall(warm_dir(spec, seed) / "eval.json")}
    return runs


# --- the summary -------------------------------------------------------------------------------------------------
def summarize_runs(spec, runs: dict) -> dict:
    seeds, arms = list(spec.seeds), spec.arm_names
    per_arm = {}
    for arm in arms:
        r = [runs[arm][s] for s in seeds]
        stats = {m: mean_std([x["final"][m] for x in r]) for m in METRICS if all(m in x["final"] for x in r)}
        drops = [x["final"]["reliance_blank"] - x["warm"]["reliance_blank"] for x in r]
        clip = [float(np.mean(x["curves"]["actor/pg_clipfrac"])) for x in r if x["curves"].get("actor/pg_clipfrac")]
        per_arm[arm] = {**stats, "reliance_change": mean_std(drops),
                        "forgetting_runs": int(sum(d < -spec.forget_threshold for d in drops)),
                        "clip_fraction": float(np.mean(clip)) if clip else None}
    warm = {m: mean_std([runs[arms[0]][s]["warm"][m] for s in seeds]) for m in ("accuracy", "accuracy_blank",
                                                                                 "reliance_blank")}
    values = {arm: {m: [runs[arm][s]["final"][m] for s in seeds] for m in PAIRED} for arm in arms}
    pairs = []
    for a, b in itertools.combinations(arms, 2):
        pairs.append({"a": a, "b": b, **{m: pair_stats(values[a][m], values[b][m], spec.bootstrap_resamples,
                                                       seed=i) for i, m in enumerate(PAIRED)}})
    drift = _drift(spec, values)
    for p in pairs:
        for m in PAIRED:
            lo, hi = p[m]["ci95"]
            verdict = drift is not None and len(seeds) >= MIN_SEEDS_FOR_VERDICT
            p[m]["beyond_drift"] = bool((lo > 0 or hi < 0) and abs(p[m]["mean"]) > drift[m]) if verdict else None
    return {"seeds": seeds, "arms": arms, "control": spec.control, "baseline": spec.baseline or arms[0],
            "warm_start": warm, "per_arm": per_arm, "pairs": pairs, "control_drift": drift,
            "runs": {arm: {str(s): runs[arm][s] for s in seeds} for arm in arms}}


def _drift(spec, values: dict):
    base = spec.baseline or spec.arm_names[0]
    if spec.control is None or spec.control == base:
        return None
    return {m: float(np.mean(np.abs(np.subtract(values[spec.control][m], values[base][m])))) for m in PAIRED}


def summarize_experiment(spec) -> dict:
    return summarize_runs(spec, collect(spec))


def _ms(s: dict, digits: int = 3) -> str:
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def format_markdown(summary: dict) -> str:
    seeds, w = summary["seeds"], summary["warm_start"]
    missing = summary.get("missing_seeds") or []
    lines = [f"Seeds: {len(seeds)} ({', '.join(map(str, seeds))}); mean ± std over seeds; held-out accuracy avg@k."
             + (f" Not finished (left out): seeds {', '.join(map(str, missing))}." if missing else ""),
             f"Warm-start (before RL): accuracy {_ms(w['accuracy'])}, black image {_ms(w['accuracy_blank'])}, "
             f"reliance {_ms(w['reliance_blank'])}", "",
             "| arm | accuracy | black-image acc. | reliance (black) | reliance (masked) | perception KL | "
             "reliance change in RL | forgetting runs | clip fraction |", "|---" * 9 + "|"]
    for arm, s in summary["per_arm"].items():
        clip = "n/a" if s["clip_fraction"] is None else f"{s['clip_fraction']:.3f}"
        kl = _ms(s["perception_kl"], 4) if "perception_kl" in s else "n/a"
        lines.append(f"| {arm} | {_ms(s['accuracy'])} | {_ms(s['accuracy_blank'])} | {_ms(s['reliance_blank'])} | "
                     f"{_ms(s['reliance_masked'])} | {kl} | {_ms(s['reliance_change'])} | "
                     f"{s['forgetting_runs']}/{len(seeds)} | {clip} |")
    lines += ["", "| B - A | metric | mean diff | 95% CI (bootstrap over seeds) | seeds B > A | detectable (80% power) "
              "| beyond control drift |", "|---" * 7 + "|"]
    for p in summary["pairs"]:
        for m in PAIRED:
            s = p[m]
            bd = {None: "n/a", True: "yes", False: "no"}[s["beyond_drift"]]
            lines.append(f"| {p['b']} - {p['a']} | {m} | {s['mean']:+.4f} | [{s['ci95'][0]:+.4f}, {s['ci95'][1]:+.4f}]"
                         f" | {s['b_better']}/{s['n']} | {s['detectable_80']:.4f} | {bd} |")
    if summary["control_drift"]:
        d = summary["control_drift"]
        lines += ["", f"Control drift (mean |{summary['control']} - {summary['baseline']}| over seeds): "
                  + ", ".join(f"{m} {d[m]:.4f}" for m in PAIRED)]
    return "\n".join(lines)


def write_summary(spec, summary: dict) -> None:
    out = Path(spec.out_dir)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(format_markdown(summary) + "\n")
    try:
        from megatron_papo.evaluation.experiment_plot import plot_experiment
    except ImportError:
        return
    plot_experiment(summary, out / "summary.png")

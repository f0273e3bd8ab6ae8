"""The experiment's chart: reward curves per arm (5-step moving average; mean over seeds, band min..max), final
held-out accuracy and blank-image reliance per arm (mean, 95% t interval over seeds, one dot per seed).
Needs matplotlib."""

from __future__ import annotations

from pathlib import Path

import numpy as np


SMOOTH = 5


def _curves(summary: dict, arm: str, tag: str) -> np.ndarray:
    """[seeds, steps - SMOOTH + 1] moving averages of ``tag`` (all seeds cut to the shortest run)."""
    runs = [r["curves"].get(tag, []) for r in summary["runs"][arm].values()]
    steps = min((len(c) for c in runs), default=0)
    if steps < SMOOTH:
        return np.zeros((0, 0))
    kernel = np.ones(SMOOTH) / SMOOTH
    return np.array([np.convolve(c[:steps], kernel, mode="valid") for c in runs], dtype=float)


def plot_experiment(summary: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("summary.png skipped: matplotlib is not installed (pip install matplotlib)")
        return
    arms = summary["arms"]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2), dpi=80)
    for i, arm in enumerate(arms):
        c = _curves(summary, arm, "reward/mean")
        if c.size:
            x = np.arange(SMOOTH, SMOOTH + c.shape[1])
            axes[0].plot(x, c.mean(0), label=arm, color=f"C{i}")
            axes[0].fill_between(x, c.min(0), c.max(0), color=f"C{i}", alpha=0.2)
    axes[0].set(title=f"RL reward ({SMOOTH}-step mean)\n(band: min..max over seeds)", xlabel="RL step",
                ylabel="mean reward")
    axes[0].legend(fontsize=8)
    for ax, metric, title in ((axes[1], "accuracy", "held-out accuracy"),
                              (axes[2], "reliance_blank", "image reliance (real - black)")):
        s = [summary["per_arm"][a][metric] for a in arms]
        means = np.array([v["mean"] for v in s])
        err = np.array([[v["mean"] - v["ci95"][0] for v in s], [v["ci95"][1] - v["mean"] for v in s]])
        ax.bar(range(len(arms)), means, yerr=err, capsize=4, color=[f"C{i}" for i in range(len(arms))], alpha=0.7)
        for i, a in enumerate(arms):
            pts = [r["final"][metric] for r in summary["runs"][a].values()]
            ax.scatter(np.full(len(pts), i) + np.linspace(-0.15, 0.15, len(pts)), pts, s=8, color="k", zorder=3)
        ax.set_xticks(range(len(arms)), arms, fontsize=8)
        ax.set(title=f"{title}\n(mean, 95% CI over seeds; dots: seeds)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

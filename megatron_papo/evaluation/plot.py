"""The comparison chart: per data set, the difference in accuracy (and in image reliance) of each run against
the baseline with its 95% bootstrap interval. matplotlib is optional (``pip install megatron_papo[plot]``)."""

from __future__ import annotations

from pathlib import Path


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'megatron_papo[plot]' (or pip install matplotlib), "
                         "or drop --plot") from None


def plot_comparison(result: dict, path: str) -> None:
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    comps = result["comparisons"]
    panels = [("diff", "accuracy difference (B - A)")]
    if all("reliance" in c["datasets"]["overall"] for c in comps):
        panels.append(("reliance", "image reliance difference (B - A)"))
    names = list(comps[0]["datasets"])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 0.5 * len(names) * len(comps) + 1.8),
                             squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for j, c in enumerate(comps):
            stats = [c["datasets"][d] if key == "diff" else c["datasets"][d]["reliance"] for d in names]
            y = [i + j / (len(comps) + 1) for i in range(len(names))]
            mid = [s["diff"] for s in stats]
            lo = [s["diff"] - s["ci95"][0] for s in stats]
            hi = [s["ci95"][1] - s["diff"] for s in stats]
            ax.errorbar(mid, y, xerr=[lo, hi], fmt="o", capsize=3, label=f"{Path(c['b']).stem} vs {Path(c['a']).stem}")
        ax.axvline(0.0, color="grey", lw=0.8)
        ax.set_yticks(range(len(names)), names)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("difference with 95% paired bootstrap interval")
        ax.xaxis.set_major_locator(MaxNLocator(5))
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", fontsize=8, ncol=min(len(labels), 3), frameon=False)
    fig.tight_layout(rect=(0, 0.08 + 0.03 * (len(labels) // 3), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)

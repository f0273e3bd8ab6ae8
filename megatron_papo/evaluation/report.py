"""Results on the console and on disk: the metrics table, the paper's table layout for the PAPO benchmarks, and
the JSON that `megatron-papo compare` reads back (checked, with one-line errors for a wrong file)."""

from __future__ import annotations

import json
import re
from pathlib import Path

TOOL = "megatron-papo evaluate"
FORMAT_VERSION = 1

# The paper's 9 benchmarks (General, then Vision-dependent), and the names their PAPO-Eval splits carry.
GENERAL = ("Geo3K", "MathVista", "We-Math", "MMK12", "MathVerse")
VISION = ("LogicVista", "SuperClevr Counting", "MMMU-Pro", "MathVerse_V")
_ALIASES = {
    "geo3k": "Geo3K", "hiyougageometry3k": "Geo3K", "geometry3k": "Geo3K",
    "mathvista": "MathVista", "ai4mathmathvista": "MathVista",
    "wemath": "We-Math", "wemathwemath": "We-Math",
    "mmk12": "MMK12", "fanqingmmmk12": "MMK12", "papommk12test": "MMK12",
    "mathverse": "MathVerse", "ai4mathmathverse": "MathVerse",
    "logicvista": "LogicVista", "lscpkulogicvista": "LogicVista",
    "superclevrcounting": "SuperClevr Counting", "superclevr": "SuperClevr Counting",
    "buaadreamerclevrcount70k": "SuperClevr Counting", "clevrcount70k": "SuperClevr Counting",
    "mmmupro": "MMMU-Pro", "mmmummmupro": "MMMU-Pro",
    "mathversev": "MathVerse_V", "mathversevisiondependent": "MathVerse_V",
    "ai4mathmathversevisiondependent": "MathVerse_V",
}


def paper_name(dataset: str):
    """The paper's benchmark name for a data set name (or None)."""
    return _ALIASES.get(re.sub(r"[^a-z0-9]", "", dataset.lower()))


def format_table(datasets: dict, k: int) -> str:
    cols = [("questions", "questions", "{:d}"), ("avg@k", f"avg@{k}", "{:.4f}"), ("pass@k", f"pass@{k}", "{:.4f}"),
            ("format", "format", "{:.3f}"), ("truncation", "trunc", "{:.3f}"), ("response_length", "len", "{:.1f}"),
            ("avg@k_masked", "masked", "{:.4f}"), ("avg@k_blank", "blank", "{:.4f}"),
            ("reliance_masked", "rel_mask", "{:+.4f}"), ("reliance_blank", "rel_blank", "{:+.4f}"),
            ("kl_exact", "kl_exact", "{:.3g}"), ("kl_k3", "kl_k3", "{:.3g}")]
    cols = [c for c in cols if c[0] in datasets["overall"]]
    width = max([len("dataset")] + [len(d) for d in datasets])
    head = f"{'dataset':<{width}}" + "".join(f"  {name:>9}" for _, name, _ in cols)
    lines = [head]
    for d, m in datasets.items():
        lines.append(f"{d:<{width}}" + "".join(f"  {fmt.format(m[key]):>9}" for key, _, fmt in cols))
    return "\n".join(lines)


def paper_table(datasets: dict, k: int):
    """The paper's layout (benchmarks as columns, General AVG, Vision AVG, Overall as unweighted means of the
    benchmarks present, in percent) when the data sets carry the benchmark names; else None."""
    acc = {}
    for d, m in datasets.items():
        name = paper_name(d) if d != "overall" else None
        if name:
            acc[name] = 100.0 * m["avg@k"]
    if not acc:
        return None
    mean = lambda names: [acc[n] for n in names if n in acc]  # noqa: E731
    cols = [n for n in GENERAL if n in acc] + ["General AVG"] + [n for n in VISION if n in acc] + ["Vision AVG",
                                                                                                     "Overall"]
    vals = dict(acc)
    for label, names in (("General AVG", GENERAL), ("Vision AVG", VISION), ("Overall", GENERAL + VISION)):
        got = mean(names)
        vals[label] = sum(got) / len(got) if got else float("nan")
    missing = [n for n in GENERAL + VISION if n not in acc]
    header = " | ".join(cols)
    row = " | ".join(f"{vals[c]:.2f}" for c in cols)
    note = f"\n(missing benchmarks: {', '.join(missing)}; averages over those present)" if missing else ""
    return f"avg@{k} (%) in the paper's layout\n| {header} |\n|{'---|' * len(cols)}\n| {row} |{note}"


def write_result(path: str, result: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1))


def load_result(path: str) -> dict:
    """A JSON written by `megatron-papo evaluate --out`; anything else is a one-line error."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no such file (pass JSON files written by megatron-papo evaluate --out)")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not JSON ({exc}); pass files written by megatron-papo evaluate --out") from None
    if not isinstance(data, dict) or data.get("tool") != TOOL or "records" not in data:
        raise ValueError(f"{path}: not a result of megatron-papo evaluate (no tool/records fields; files from "
                         "before per-question records, or from another tool, cannot be paired); re-run evaluate "
                         "with --out")
    if data.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: result format {data.get('format_version')}, this version reads "
                         f"{FORMAT_VERSION}; re-run megatron-papo evaluate")
    return data

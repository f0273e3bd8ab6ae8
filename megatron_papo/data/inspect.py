"""Read every sample of a set of shards the way training does and report what is wrong (``inspect_shards``)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from megatron_papo.data.reader import resolve_shards
from megatron_papo.data.shards import BadSample, iter_raw_groups, parse_group


@dataclass
class ShardReport:
    shard: str
    ok: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list = field(default_factory=list)  # first problems, "key: reason: detail"
    datasets: Counter = field(default_factory=Counter)
    images: int = 0


def inspect_shard(shard: str, max_examples: int = 3) -> ShardReport:
    report = ShardReport(shard)
    for key, group in iter_raw_groups(shard):
        try:
            if isinstance(group, BadSample):
                raise group
            sample = parse_group(shard, key, group)
        except BadSample as bad:
            report.skipped[bad.reason] += 1
            if len(report.examples) < max_examples:
                report.examples.append(f"{key}: {bad.reason}{': ' + bad.detail if bad.detail else ''}")
            continue
        report.ok += 1
        report.images += len(sample["images"])
        report.datasets[sample["dataset"]] += 1
    return report


def inspect_shards(spec, progress=None) -> list[ShardReport]:
    """One report per shard of ``spec`` (directory, glob, brace pattern or list); ``progress(report)`` per shard."""
    reports = []
    for shard in resolve_shards(spec, field="SHARDS"):
        reports.append(inspect_shard(shard))
        if progress is not None:
            progress(reports[-1])
    return reports


def format_report(report: ShardReport) -> str:
    skipped = sum(report.skipped.values())
    line = f"{report.shard}: {report.ok} ok, {skipped} skipped, {report.images} images"
    if report.skipped:
        line += " (" + ", ".join(f"{r}={n}" for r, n in sorted(report.skipped.items())) + ")"
    return "\n".join([line] + [f"    {e}" for e in report.examples])


def summary_line(reports: list[ShardReport]) -> str:
    ok = sum(r.ok for r in reports)
    skipped = sum(sum(r.skipped.values()) for r in reports)
    return f"{ok} ok, {skipped} skipped"

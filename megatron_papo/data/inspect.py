"""Read every sample of a set of shards the way training does and report what is wrong (``inspect_shards``).

The same code path as the training reader (``reader.decode_sample``): the same caps (``limits.py``), field rules,
truncation checks and, given a tokenizer, the same prompt transform (chat template, image processor, length).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional

from megatron_papo.data.limits import DEFAULT_LIMITS, DataLimits
from megatron_papo.data.reader import decode_sample, resolve_shards
from megatron_papo.data.shards import BadSample, iter_raw_groups


@dataclass
class ShardReport:
    shard: str
    ok: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list = field(default_factory=list)  # first problems, "key: reason: detail"
    datasets: Counter = field(default_factory=Counter)
    images: int = 0


def inspect_shard(shard: str, max_examples: int = 3, transform: Optional[Callable] = None,
                  limits: DataLimits = DEFAULT_LIMITS) -> ShardReport:
    report = ShardReport(shard)
    for key, group in iter_raw_groups(shard, limits.max_member_bytes):
        try:
            sample = decode_sample(shard, key, group, transform, limits)
        except BadSample as bad:
            report.skipped[bad.reason] += 1
            if len(report.examples) < max_examples:
                report.examples.append(f"{key}: {bad.reason}{': ' + bad.detail if bad.detail else ''}")
            continue
        report.ok += 1
        report.images += len(sample["images"])
        report.datasets[sample["dataset"]] += 1
    return report


def inspect_shards(spec, progress=None, transform: Optional[Callable] = None,
                   limits: DataLimits = DEFAULT_LIMITS) -> list[ShardReport]:
    """One report per shard of ``spec`` (directory, glob, brace pattern or list); ``progress(report)`` per shard."""
    reports = []
    for shard in resolve_shards(spec, field="SHARDS"):
        reports.append(inspect_shard(shard, transform=transform, limits=limits))
        if progress is not None:
            progress(reports[-1])
    return reports


def training_checks(data_cfg) -> tuple[Callable, DataLimits]:
    """The prompt transform and caps a training run with this ``data`` config section applies."""
    from megatron_papo.data import PromptEncoder, Qwen2VLImageProcessor, build_tokenizer

    tokenizer = build_tokenizer(data_cfg.tokenizer)
    processor = Qwen2VLImageProcessor(min_pixels=data_cfg.min_pixels, max_pixels=data_cfg.max_pixels)
    return PromptEncoder(tokenizer, processor, data_cfg.max_prompt_length), DataLimits.from_config(data_cfg)


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

#!/usr/bin/env python
"""Read every sample of webdataset shards the way training does; report per-shard counts and problems.

  inspect_shards.py SHARDS [--config FILE] [--set key=value ...] [--tokenizer PATH]

SHARDS is a directory, a glob or a brace pattern of .tar files. Without a tokenizer the samples are parsed and
their images checked (caps, truncation, field rules); with --config (a training config: its data section's
tokenizer, caps, pixel range and max_prompt_length) or --tokenizer, every prompt is also built exactly as training
builds it. The last line is "<N> ok, <M> skipped". Exit status 1 when no sample is readable, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", nargs="+", help="directory, glob or brace pattern of .tar shards")
    p.add_argument("--config", help="training config whose data section (tokenizer, caps, lengths) to apply")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, as for megatron-papo train (e.g. --set data.max_prompt_length=1024)")
    p.add_argument("--tokenizer", help="tokenizer to build prompts with: a Hugging Face directory or a "
                                       "sentencepiece .model (shortcut for --set data.tokenizer.path=...)")
    return p


def _checks(args):
    """(transform, limits) for the options: None transform when no tokenizer was named."""
    from megatron_papo.config import load_config
    from megatron_papo.data.inspect import training_checks
    from megatron_papo.data.limits import DataLimits

    overrides = list(args.overrides)
    if args.tokenizer:
        kind = "sentencepiece" if args.tokenizer.endswith(".model") else "huggingface"
        overrides += [f"data.tokenizer.type={kind}", f"data.tokenizer.path={args.tokenizer}"]
    cfg = load_config(args.config, overrides)
    if args.config or args.tokenizer:
        return training_checks(cfg.data)
    return None, DataLimits.from_config(cfg.data)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)

    from collections import Counter

    from megatron_papo.data.inspect import format_report, inspect_shards, summary_line

    try:
        transform, limits = _checks(args)
        reports = inspect_shards(args.shards, progress=lambda r: print(format_report(r), flush=True),
                                 transform=transform, limits=limits)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    reasons = Counter()
    datasets = Counter()
    for r in reports:
        reasons.update(r.skipped)
        datasets.update(r.datasets)
    print(f"{len(reports)} shards; data sets: " + ", ".join(f"{d}={n}" for d, n in sorted(datasets.items())))
    if reasons:
        print("problems: " + ", ".join(f"{k}={n}" for k, n in sorted(reasons.items())))
    print(summary_line(reports))
    return 0 if any(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())

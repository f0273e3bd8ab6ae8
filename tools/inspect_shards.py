#!/usr/bin/env python
"""Read every sample of webdataset shards the way training does; report per-shard counts and problems.

  inspect_shards.py SHARDS   (a directory, a glob or a brace pattern of .tar files)

The last line is "<N> ok, <M> skipped". Exit status 1 when no sample is readable, 2 when SHARDS matches nothing.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", nargs="+", help="directory, glob or brace pattern of .tar shards")
    args = parser.parse_args(argv)

    from collections import Counter

    from megatron_papo.data.inspect import format_report, inspect_shards, summary_line

    try:
        reports = inspect_shards(args.shards, progress=lambda r: print(format_report(r), flush=True))
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

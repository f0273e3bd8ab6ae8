#!/usr/bin/env python
"""Write verifiable synthetic image tasks (answers known by construction) as webdataset shards.

  make_synthetic_shards.py --out DIR [--num-samples 2000] [--seed 0] [--kinds count color] [--image-size 56]

Kinds: count (how many shapes, 1-5) and color (colour of the largest shape). Same seed, same data.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    from megatron_papo.data.synthetic import KINDS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory for the .tar shards")
    parser.add_argument("--num-samples", type=int, default=2000, help="samples to write")
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS), help="task kinds, cycled")
    parser.add_argument("--image-size", type=int, default=56, help="image side in pixels (multiple of 14, >= 42)")
    parser.add_argument("--samples-per-shard", type=int, default=250, help="samples per shard")
    parser.add_argument("--prefix", default="synthetic", help="shard file name prefix")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the .tar shards already in --out first (without it a non-empty --out is refused)")
    args = parser.parse_args(argv)

    from tqdm import tqdm

    from megatron_papo.data.shards import prepare_out_dir, write_shards
    from megatron_papo.data.synthetic import iter_synthetic_samples

    try:
        removed = prepare_out_dir(args.out, args.overwrite)
        if removed:
            print(f"--overwrite: deleted {removed} old shard(s) in {args.out}", file=sys.stderr)
        samples = iter_synthetic_samples(args.num_samples, args.seed, args.kinds, args.image_size)
        with tqdm(total=args.num_samples, desc="writing", unit="sample", file=sys.stderr) as bar:
            paths = write_shards(samples, args.out, args.prefix, args.samples_per_shard,
                                 progress=lambda n: bar.update(1))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.num_samples} samples in {len(paths)} shards to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Convert Qwen2.5-VL and Qwen3-VL checkpoints between Hugging Face and megatron_papo (megatron dist checkpoint).

  convert_checkpoint.py hf-to-mcore --hf DIR --out DIR [--tp N --pp M]
  convert_checkpoint.py mcore-to-hf --mcore DIR --out DIR

hf-to-mcore reads the model family from config.json (model_type qwen2_5_vl or qwen3_vl) and records it in the
output's metadata; it writes with N*M CPU ranks (each holds one shard); the result loads at any TP x PP.
mcore-to-hf writes the family's published Hugging Face layout.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-mcore", help="Hugging Face directory -> megatron dist checkpoint")
    a.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
    a.add_argument("--out", required=True, help="output directory (created; its model/ must be empty)")
    a.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks that write the checkpoint")
    a.add_argument("--pp", type=int, default=1, help="pipeline-parallel ranks that write the checkpoint")
    b = sub.add_parser("mcore-to-hf", help="megatron_papo checkpoint -> Hugging Face directory")
    b.add_argument("--mcore", required=True, help="directory written by hf-to-mcore or by training")
    b.add_argument("--out", required=True, help="output HF directory")
    args = parser.parse_args(argv)

    from megatron_papo.convert import hf_to_mcore, mcore_to_hf

    start = time.time()
    try:
        if args.command == "hf-to-mcore":
            spec = hf_to_mcore(args.hf, args.out, tp=args.tp, pp=args.pp)
            print(f"converted {args.hf} ({spec.num_layers} layers, hidden {spec.hidden_size}) -> {args.out} "
                  f"with tp={args.tp} pp={args.pp} in {time.time() - start:.1f}s")
        else:
            mcore_to_hf(args.mcore, args.out)
            print(f"converted {args.mcore} -> {args.out} in {time.time() - start:.1f}s")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

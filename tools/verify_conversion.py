#!/usr/bin/env python
"""Run a Hugging Face Qwen2.5-VL or Qwen3-VL and its converted megatron checkpoint on the same random image and text.

Prints max_abs_logit_diff=<float> as the last line; exits 1 when it is above --tol.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hf", required=True, help="HF model directory")
    parser.add_argument("--mcore", required=True, help="megatron_papo checkpoint directory")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size to load the checkpoint at")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to load the checkpoint at")
    parser.add_argument("--tol", type=float, default=1e-3, help="largest acceptable |logit difference| (fp32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random input")
    args = parser.parse_args(argv)

    from megatron_papo.convert.verify import max_abs_logit_diff

    diff = max_abs_logit_diff(args.hf, args.mcore, tp=args.tp, pp=args.pp, seed=args.seed)
    print(f"max_abs_logit_diff={diff:.6g}")
    return 0 if diff <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())

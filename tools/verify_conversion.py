#!/usr/bin/env python
"""Run a Hugging Face Qwen2.5-VL or Qwen3-VL and its converted megatron checkpoint on the same random image and text.

Prints max_abs_logit_diff=<float> as the last line; exits 1 when it is above --tol.
"""

from __future__ import annotations

import argparse
import sys


def _check_args(args) -> str | None:
    """One line for a mistake that would otherwise end in a traceback, None when the run can start."""
    import importlib.util
    import os

    for flag, path in (("--hf", args.hf), ("--mcore", args.mcore)):
        if not os.path.isdir(path):
            return f"{flag} {path!r} is not a directory"
    for flag, v in (("--tp", args.tp), ("--pp", args.pp)):
        if v < 1:
            return f"{flag} must be >= 1, got {v}"
    if importlib.util.find_spec("transformers") is None:
        return "the Hugging Face side needs `transformers`: pip install transformers (or megatron-papo[test])"
    try:
        from megatron_papo.convert import read_checkpoint_meta
        from megatron_papo.models import check_tp_divisibility

        check_tp_divisibility(read_checkpoint_meta(args.mcore)[0], args.tp)
    except (ValueError, FileNotFoundError, OSError, KeyError) as exc:
        return f"--mcore {args.mcore}: {exc}"
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hf", required=True, help="HF model directory")
    parser.add_argument("--mcore", required=True, help="megatron_papo checkpoint directory")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size to load the checkpoint at")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to load the checkpoint at")
    parser.add_argument("--tol", type=float, default=1e-3, help="largest acceptable |logit difference| (fp32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random input")
    args = parser.parse_args(argv)
    problem = _check_args(args)
    if problem:
        print(f"verify_conversion.py: error: {problem}", file=sys.stderr)
        return 2

    from megatron_papo.convert.verify import max_abs_logit_diff

    try:
        diff = max_abs_logit_diff(args.hf, args.mcore, tp=args.tp, pp=args.pp, seed=args.seed)
    except (ValueError, FileNotFoundError) as exc:
        print(f"verify_conversion.py: error: {exc}", file=sys.stderr)
        return 2
    print(f"max_abs_logit_diff={diff:.6g}")
    return 0 if diff <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())

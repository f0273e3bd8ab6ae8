"""``megatron-papo``: train, generate, evaluate (the public command line documented in README.md)."""

from __future__ import annotations

import argparse
import sys

from megatron_papo.config import ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-papo", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train with PAPO / GRPO / DAPO (no --config: the embedded CPU demo)")
    t.add_argument("--config", help="YAML config (see examples/); default: the embedded tiny CPU demo")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set training.rl_steps=10 (repeatable)")
    t.add_argument("--resume", help="override checkpoint.resume: auto | none | a checkpoint directory")
    t.add_argument("--dry-run", action="store_true",
                   help="validate the config and build the parallel layout without training")

    g = sub.add_parser("generate", help="generate a response from a checkpoint",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g.add_argument("--checkpoint", required=True, help="checkpoint directory written by train or conversion")
    g.add_argument("--prompt", required=True, help="the question / instruction")
    g.add_argument("--image", action="append", default=[], help="image file (repeatable, in order)")
    g.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    g.add_argument("--max-new-tokens", type=int, default=256, help="longest response in tokens")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (ignored with --greedy)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1.0: off)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")

    e = sub.add_parser("evaluate", help="avg@k accuracy per data set")
    e.add_argument("--checkpoint", required=True, help="checkpoint directory")
    e.add_argument("--data", required=True, help="evaluation shards: directory, glob or brace pattern")
    e.add_argument("--k", type=int, default=8, help="samples per question (avg@k)")
    e.add_argument("--out", help="write the results as JSON here")
    e.add_argument("--max-new-tokens", type=int, default=512)
    e.add_argument("--temperature", type=float, default=1.0)
    e.add_argument("--limit", type=int, default=0, help="evaluate only the first N questions (0: all)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            overrides = list(args.overrides)
            if args.resume is not None:
                overrides.append(f"checkpoint.resume={args.resume if args.resume != 'none' else 'null'}")
            if args.config:
                cfg = load_config(args.config, overrides)
                from megatron_papo.training.entry import train
            else:
                from megatron_papo.training.entry import default_config_tree, train

                cfg = load_config(None, overrides, base=default_config_tree())
            return train(cfg, dry_run=args.dry_run) or 0
        if args.command == "generate":
            from megatron_papo.rollout.cli import generate_command

            return generate_command(args) or 0
        if args.command == "evaluate":
            from megatron_papo.training.evaluate import evaluate_command

            return evaluate_command(args) or 0
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"megatron-papo {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:   # a second Ctrl-C (the first one saves and exits 75, see training/preemption.py)
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

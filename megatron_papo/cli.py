"""``megatron-papo``: train, generate, evaluate, compare (the public command line documented in README.md)."""

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

    e = sub.add_parser("evaluate", help="avg@k, pass@k and perception metrics per data set",
                       description="Answer every question of the shards k times and grade the answers; per data "
                       "set avg@k, pass@k, format and truncation rates, response length; with --perception also "
                       "the accuracy with the image masked (PAPO's random patches) and blanked, the image reliance "
                       "and the real-vs-masked KL. Runs at any TP x PP x DP under torchrun / srun.")
    e.add_argument("--checkpoint", required=True, help="checkpoint directory (training step_N, its checkpoint.dir, "
                   "or an hf-to-mcore output)")
    e.add_argument("--data", required=True, help="evaluation shards: directory, glob or brace pattern")
    e.add_argument("--k", type=int, help="answers sampled per question (avg@k, pass@k); default 8")
    e.add_argument("--out", help="write the results (settings, metrics, per-question records) as JSON here")
    e.add_argument("--perception", action="store_true",
                   help="also answer with the masked and the blank image; image reliance and real-vs-masked KL")
    e.add_argument("--protocol", choices=["papo-eval"], help="the published PAPO evaluation: avg@8, temperature "
                   "1.0, top-p 1.0, top-k 50, 2048 new tokens, images scaled into 1,024..589,824 pixels, then "
                   "into the range of the model family's published processor")
    e.add_argument("--seed", type=int, help="sampling and mask seed (streams keyed by question index); default 0")
    e.add_argument("--max-new-tokens", type=int, help="longest answer in tokens; default 512")
    e.add_argument("--temperature", type=float, help="sampling temperature; default 1.0")
    e.add_argument("--top-p", type=float, help="nucleus sampling threshold; default 1.0 (off)")
    e.add_argument("--top-k", type=int, help="top-k sampling; default 0 (off)")
    e.add_argument("--mask-ratio", type=float, help="--perception: share of 14-px cells blackened; default 0.6")
    e.add_argument("--limit", type=int, default=0, help="evaluate only the first N questions (0: all)")
    e.add_argument("--batch-size", type=int, help="questions per generation batch and rank (speed only); default 16")
    e.add_argument("--max-batch-rows", type=int, help="rows in flight in the rollout engine at most (memory only; "
                   "questions wait and join as rows finish); >= --k, default 0 (no cap)")
    e.add_argument("--tp", type=int, help="tensor-parallel size; default: the world size / --pp (one model on "
                   "all ranks); a smaller --tp leaves world / (tp x pp) data-parallel ranks sharing the questions")
    e.add_argument("--pp", type=int, help="pipeline-parallel size; default 1")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")

    c = sub.add_parser("compare", help="paired comparison of evaluate results (each against the first)",
                       description="Pair evaluate --out results question by question (same questions and "
                       "settings required) and report per data set and overall the difference in avg@k and in "
                       "image reliance with a paired bootstrap 95% interval, the exact sign test on per-question "
                       "correct fractions (McNemar when k=1) and McNemar on majority-correct and any-correct, "
                       "Benjamini-Hochberg adjusted across data sets. Prints a table; --out JSON, --plot PNG.")
    c.add_argument("runs", nargs="+", metavar="RUN.json", help="results of megatron-papo evaluate --out; the first "
                   "is the baseline A")
    c.add_argument("--out", help="write the comparison as JSON here")
    c.add_argument("--plot", metavar="FILE.png", help="chart of the differences with their intervals (matplotlib)")
    c.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples (default 10000)")
    c.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    x = sub.add_parser("experiment", help="arms x seeds of RL runs, evaluated with perception metrics, summarised",
                       description="Run every arm of an experiment YAML for every seed (a shared warm-start per "
                       "seed, the same data and budget), evaluate each final checkpoint with --perception on held-out "
                       "shards and write summary.json, summary.md and summary.png into its out_dir. Rerunning skips "
                       "finished runs and resumes interrupted ones. Example: examples/experiments/papo_vs_grpo_cpu.yaml")
    x.add_argument("--config", required=True, help="experiment YAML (out_dir, seeds, arms, ...)")
    x.add_argument("--seeds", help="run only these seeds of the YAML (comma-separated), e.g. half of them per core; "
                   "the summary covers every seed whose arms are all finished")
    x.add_argument("--summarize", action="store_true", help="run nothing: only write the summary of the finished seeds")
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
            from megatron_papo.evaluation.command import evaluate_command

            return evaluate_command(args) or 0
        if args.command == "compare":
            from megatron_papo.evaluation.command import compare_command

            return compare_command(args) or 0
        if args.command == "experiment":
            from megatron_papo.evaluation.experiment import experiment_command

            return experiment_command(args) or 0
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"megatron-papo {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:   # a second Ctrl-C (the first one saves and exits 75, see training/preemption.py)
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

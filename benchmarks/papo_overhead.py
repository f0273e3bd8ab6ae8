"""RL step time of PAPO-G and VPPO over GRPO, and of one extra view, same config and seed, side by side in one
process.

Arms (all on the GRPO base, so only the view work differs): ``grpo``; ``papo_g`` (the masked view, PAPO's loss
terms); ``vppo`` (GRPO + the VPPO consumer: the masked view, token filter and advantage shaping); ``papo_g+blank``
(PAPO-G with a second view, ``blank``, scored in the same pass). Every run starts from the same weights (same seed)
and reads the same prompts; their steps are interleaved (the order rotates each step) so a load change on the
machine hits all alike, and the first ``--warmup`` steps of each are not timed. A view's extra work per step is
making its images and scoring its rows (batched with the old-log-prob forward), so the scoring phase grows by one
pass over the rows per view and the other phases do not move.

Per phase the table shows the median wall seconds per step, then each arm's step CPU time over GRPO's, the passes
over the rows its scoring phase makes (old log-probs unless the rollout's, one per view, the reference's) and the
median scoring seconds per pass. A step's time is also taken as process CPU time (with ``--threads 1`` the two
agree on an idle machine, and CPU time is barely disturbed by other jobs on a shared one). The last line is
``ratio=<median PAPO-G step CPU time / median GRPO step CPU time>`` (the VPPO ratio is printed above it); the line
before it gives the machine's load average (1 minute) at the start and end of the timed steps, for judging how
shared the machine was.

The scoring pass takes the run's ``training.prefix_scoring`` (default on: each distinct prompt once, at PP=1);
``--set training.prefix_scoring=false`` measures the plain path (every row through megatron's schedule).

  python benchmarks/papo_overhead.py [--steps 20] [--warmup 1] [--prompts 8] [--n 8] [--max-new-tokens 16]
      [--threads 1] [--set key=value ...]

The defaults are the embedded demo's model and data (a tiny VLM on CPU). On a GPU node pass a bigger preset with
``--set model.preset=qwen2.5-vl-3b --set model.load=...``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

PHASES = ("time/rollout", "time/scoring", "time/update", "time/step", "cpu/step")


def _args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed RL steps per algorithm")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--warmup", type=int, default=1, help="untimed RL steps per algorithm first")
    p.add_argument("--prompts", type=int, default=8, help="prompts per RL step")
    p.add_argument("--n", type=int, default=8, help="rollouts per prompt")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return p.parse_args()


ARMS = {"grpo": ("algorithm.preset=grpo",), "papo_g": ("algorithm.preset=papo_g",),
        "vppo": ("algorithm.preset=grpo", "algorithm.consumers=[vppo]"),
        "papo_g+blank": ("algorithm.preset=papo_g", "algorithm.views=[masked,blank]")}


def _config(args, arm: tuple, workdir: str):
    from megatron_papo.config import load_config
    from megatron_papo.training.entry import default_config_tree

    sets = [*arm, f"training.prompts_per_step={args.prompts}",
            f"training.prompts_per_update={args.prompts}", f"rollout.n={args.n}",
            f"rollout.max_new_tokens={args.max_new_tokens}", "training.warmup_sft_steps=0",
            "logging.tensorboard_dir=null", "logging.progress=false", f"checkpoint.dir={workdir}/ckpt",
            f"data.train_shards={workdir}/data"]
    return load_config(None, sets + list(args.overrides), base=default_config_tree())


def _scoring_passes(ctx) -> int:
    """Passes over the rows in the scoring phase: old log-probs (unless the rollout's), one per view, reference."""
    from megatron_papo.algorithms.consumers import view_plan
    from megatron_papo.training.rl_step import rollout_logprobs_usable

    cfg = ctx.cfg
    return (not rollout_logprobs_usable(cfg)) + len(view_plan(cfg.algorithm).scored) + (ctx.reference is not None)


def _table(med: dict, passes: dict) -> None:
    names = list(med)
    print(f"{'phase (median s/step)':<24}" + "".join(f"{n:>14}" for n in names))
    for k in PHASES:
        print(f"{k.replace('time/', ''):<24}" + "".join(f"{med[n][k]:>14.4f}" for n in names))
    print(f"{'step / grpo step (cpu)':<24}" + "".join(f"{med[n]['cpu/step'] / med['grpo']['cpu/step']:>14.3f}"
                                                      for n in names))
    print(f"{'scoring passes':<24}" + "".join(f"{passes[n]:>14d}" for n in names))
    print(f"{'scoring s / pass':<24}" + "".join(f"{med[n]['time/scoring'] / max(passes[n], 1):>14.4f}"
                                                for n in names))


def main() -> int:
    args = _args()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29561")
    import torch

    from megatron_papo.training.rl_step import rl_step

    torch.set_num_threads(args.threads)
    from megatron_papo.training.trainer import build_run

    with tempfile.TemporaryDirectory(prefix="papo_overhead_") as workdir:
        runs = {}
        for name, arm in ARMS.items():
            run = build_run(_config(args, arm, workdir))      # same seed: same initial weights and prompts
            runs[name] = (run, iter(run.reader))
        times = {name: {k: [] for k in PHASES} for name in runs}
        load = [os.getloadavg()[0]]
        tokens = {name: 0.0 for name in runs}
        for step in range(1, args.warmup + args.steps + 1):
            k = step % len(runs)
            order = list(runs)[k:] + list(runs)[:k]            # none always runs right after another
            for name in order:
                run, it = runs[name]
                t0, c0 = time.perf_counter(), time.process_time()
                m = rl_step(run.ctx, it, step)
                m["time/step"], m["cpu/step"] = time.perf_counter() - t0, time.process_time() - c0
                if step > args.warmup:
                    for k in PHASES:
                        times[name][k].append(m.get(k, 0.0))
                    tokens[name] += m["rollout/response_length"]
            print(f"step {step}: " + "  ".join(f"{n} {times[n]['time/step'][-1]:.3f}s" if step > args.warmup
                                              else f"{n} (warm-up)" for n in runs), file=sys.stderr, flush=True)
        load.append(os.getloadavg()[0])
    med = {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}
    _table(med, {n: _scoring_passes(r.ctx) for n, (r, _) in runs.items()})
    for n in runs:
        print(f"mean response length {n}: {tokens[n] / args.steps:.2f} tokens")
    print(f"wall-time ratio (median step): {med['papo_g']['time/step'] / med['grpo']['time/step']:.4f}")
    paired = statistics.median(p / g for p, g in zip(times["papo_g"]["cpu/step"], times["grpo"]["cpu/step"]))
    print(f"paired ratio (median over steps of PAPO-G / GRPO CPU time of the same step): {paired:.4f}")
    print(f"vppo ratio (median VPPO / GRPO step CPU time): {med['vppo']['cpu/step'] / med['grpo']['cpu/step']:.4f}")
    print(f"load average (1 min): {load[0]:.2f} at start, {load[1]:.2f} at end")
    print(f"ratio={med['papo_g']['cpu/step'] / med['grpo']['cpu/step']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

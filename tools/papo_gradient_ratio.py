#!/usr/bin/env python
"""How hard does PAPO's perception term pull, per token, against the policy-gradient term?

  papo_gradient_ratio.py --config TRAIN.yaml [--set key=value ...] [--steps 2]

Builds the run the config describes (model.load: e.g. an experiment's warm-start step_0), collects ``--steps``
rollout batches with its settings (no update), scores them (old, masked-image and reference log-probs, the
trainer's own pass) and prints, over the response tokens, the derivative of each loss term with respect to the
token's log-prob at the rollout weights (ratio r = 1):
- policy gradient: ``-A`` (PPO, unclipped at r = 1);
- perception term ``-gamma * k3(logp, mask_logp)`` with a stop-gradient target: ``-gamma * (1 - exp(d))``,
  ``d = mask_logp - logp`` (it raises a token's log-prob where the real image makes the token likelier than the
  masked one, d < 0, and lowers it where the masked image does; bounded by gamma on the raising side);
- reference KL ``beta * k3(logp, ref_logp)``.
The table gives mean |derivative|, the share of tokens where the perception term pushes up, and the ratio of the
perception term's mean |derivative| to the policy gradient's. Single process, CPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _table(rows: list) -> str:
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def measure(cfg, steps: int) -> dict:
    import torch

    from megatron_papo.algorithms.advantages import broadcast_to_tokens, get_advantage_estimator, group_ids_for
    from megatron_papo.training.rl_step import collect, score
    from megatron_papo.training.trainer import build_run

    run = build_run(cfg)
    ctx, it = run.ctx, iter(run.reader)
    pg, prcp, ref, up, tokens = 0.0, 0.0, 0.0, 0.0, 0.0
    for step in range(1, steps + 1):
        roll, _ = collect(ctx, it, step)
        adv = get_advantage_estimator(cfg.algorithm.advantage)(roll.rewards, group_ids_for(len(roll.samples),
                                                                                          cfg.rollout.n))
        t = score(ctx, roll.rows, roll.masked)
        m = roll.rows.response_mask.float()                                  # [N, T]
        a = broadcast_to_tokens(adv, roll.rows.response_mask)                # [N, T]
        d = (t["mask_logp"] - t["old_logp"]).clamp(-20, 20)
        g_prcp = -cfg.algorithm.gamma * (1 - torch.exp(d))                   # d(-gamma k3)/d logp
        pg += float((a.abs() * m).sum())
        prcp += float((g_prcp.abs() * m).sum())
        up += float(((g_prcp < 0).float() * m).sum())
        if "ref_logp" in t:
            dr = (t["ref_logp"] - t["old_logp"]).clamp(-20, 20)
            ref += float((cfg.algorithm.beta * (1 - torch.exp(dr))).abs().mul(m).sum())
        tokens += float(m.sum())
    return {"tokens": tokens, "pg": pg / tokens, "perception": prcp / tokens, "reference": ref / tokens,
            "up_share": up / tokens}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="training YAML (set model.load to the checkpoint to probe)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=2, help="rollout batches to measure over")
    args = p.parse_args(argv)
    from megatron_papo.config import load_config
    from megatron_papo.platform import set_cpu_threads, shutdown

    cfg = load_config(args.config, args.overrides + ["training.warmup_sft_steps=0", "checkpoint.resume=null",
                                                     "logging.tensorboard_dir=null"])
    if cfg.algorithm.gamma <= 0:
        raise SystemExit("papo_gradient_ratio: algorithm.gamma must be > 0 (set algorithm.preset=papo_g)")
    set_cpu_threads(cfg.training.cpu_threads)
    r = measure(cfg, args.steps)
    shutdown()
    print(_table([("response tokens", f"{r['tokens']:.0f}"), ("gamma", f"{cfg.algorithm.gamma:g}"),
                  ("mean |dL/dlogp| policy gradient", f"{r['pg']:.4g}"),
                  ("mean |dL/dlogp| perception term", f"{r['perception']:.4g}"),
                  ("mean |dL/dlogp| reference KL", f"{r['reference']:.4g}"),
                  ("share of tokens the perception term pushes up", f"{r['up_share']:.3f}")]))
    print(f"ratio={r['perception'] / max(r['pg'], 1e-12):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

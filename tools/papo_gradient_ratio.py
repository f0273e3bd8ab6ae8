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
The table gives mean |derivative|, the share of tokens where the perception term pushes up, and, because per-token
pushes that agree in sign add up where the advantages' signs cancel, the norm of each term's gradient over the
model's parameters (one backward pass per term through megatron's schedule on the same rows, both as token
means). The last line is the ratio of the perception term's parameter-gradient norm to the policy gradient's.
Single process, CPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _table(rows: list) -> str:
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _grad_norm(ctx, rows, tokens: dict, term) -> float:
    """Norm over the parameters of d(token-mean of ``term``)/d(theta) on ``rows``."""
    import torch

    from megatron_papo.training.optimizer import zero_grads
    from megatron_papo.training.sequences import pack, response_stats, run_schedule, seq_len

    cfg = ctx.cfg
    mbs = pack(rows, cfg.training.micro_batch_size, ctx.tokenizer.pad_id, seq_len(rows), tokens,
               image_token_id=ctx.tokenizer.image_token_id)
    total = float(rows.response_mask.sum())

    def loss_fn(logits, mb):
        logp, _ = response_stats(logits, mb, cfg.rollout.temperature)
        loss = torch.where(mb.resp_mask, term(logp, mb.tokens), torch.zeros_like(logp)).sum() / total
        return loss * len(mbs), {}                     # megatron's schedule divides by the micro-batch count

    zero_grads(ctx.optimizer, [ctx.policy])
    run_schedule(ctx.policy, mbs, loss_fn, forward_only=False)
    sq = sum(float(p.main_grad.double().pow(2).sum()) for p in ctx.policy.parameters() if p.requires_grad)
    zero_grads(ctx.optimizer, [ctx.policy])
    return sq ** 0.5


def measure(cfg, steps: int) -> dict:
    import torch

    from megatron_papo.algorithms.advantages import broadcast_to_tokens, get_advantage_estimator, group_ids_for
    from megatron_papo.training.rl_step import collect, score
    from megatron_papo.training.trainer import build_run

    run = build_run(cfg)
    ctx, it = run.ctx, iter(run.reader)
    from megatron_papo.algorithms.kl import k3_kl

    pg, prcp, ref, up, tokens, norms = 0.0, 0.0, 0.0, 0.0, 0.0, []
    gamma = cfg.algorithm.gamma
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
        tok = {"advantages": a, "mask_logp": t["mask_logp"], "old_logp": t["old_logp"]}
        pg_term = lambda lp, tt: -tt["advantages"] * torch.exp(lp - tt["old_logp"])  # noqa: E731  PPO at r = 1
        prcp_term = lambda lp, tt: -gamma * k3_kl(lp, tt["mask_logp"])              # noqa: E731
        norms.append((_grad_norm(ctx, roll.rows, tok, pg_term), _grad_norm(ctx, roll.rows, tok, prcp_term)))
    return {"tokens": tokens, "pg": pg / tokens, "perception": prcp / tokens, "reference": ref / tokens,
            "up_share": up / tokens, "pg_norm": sum(n[0] for n in norms) / len(norms),
            "perception_norm": sum(n[1] for n in norms) / len(norms)}


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
                  ("share of tokens the perception term pushes up", f"{r['up_share']:.3f}"),
                  ("per-token ratio perception / policy gradient", f"{r['perception'] / max(r['pg'], 1e-12):.4f}"),
                  ("parameter-gradient norm, policy gradient", f"{r['pg_norm']:.4g}"),
                  ("parameter-gradient norm, perception term", f"{r['perception_norm']:.4g}")]))
    print(f"ratio={r['perception_norm'] / max(r['pg_norm'], 1e-12):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

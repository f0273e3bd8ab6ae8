"""Supervised warm-start: a few steps of token-mean NLL on the data's worked answers before RL.

The CPU demo uses it so a tiny randomly initialised VLM produces the answer format at all (RL needs some reward
variance to start from); the run says so. Responses are ``sample["extra"]["solution"]`` (the synthetic tasks'
worked answers) or, failing that, ``\\boxed{answer}``, followed by EOS. Micro-batches are built as the RL
update builds them: ``training.micro_batch_size`` padded rows, or token-budget packs
(``training.max_tokens_per_micro_batch``).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from megatron.core import parallel_state

from megatron_papo.algorithms.aggregation import Aggregation, aggregate, count_global_tokens
from megatron_papo.training.optimizer import optimizer_step, zero_grads
from megatron_papo.training.packing import micro_batches
from megatron_papo.training.sequences import Rows, response_stats, run_schedule


def answer_rows(samples: list, tokenizer) -> Rows:
    """Prompt rows whose responses are the samples' worked answers (+ EOS)."""
    responses = []
    for s in samples:
        text = (s.get("extra") or {}).get("solution") or f"\\boxed{{{s['answer']}}}"
        responses.append(torch.tensor(tokenizer.encode(text) + [tokenizer.eos_id], dtype=torch.long))
    t = max(r.numel() for r in responses)
    ids = torch.full((len(samples), t), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros(len(samples), t, dtype=torch.bool)
    for i, r in enumerate(responses):
        ids[i, : r.numel()], mask[i, : r.numel()] = r, True
    prompts = [s["prompt"] for s in samples]
    return Rows([p.input_ids for p in prompts], ids, mask, [(p.pixel_values, p.image_grid_thw) for p in prompts])


def sft_step(ctx, samples: list) -> dict:
    """One optimizer step of global token-mean NLL of the answers; returns {"sft/nll", "grad_norm"}."""
    cfg = ctx.cfg
    mbs = micro_batches(answer_rows(samples, ctx.tokenizer), cfg.training.micro_batch_size, ctx.tokenizer.pad_id,
                        max_tokens=cfg.training.max_tokens_per_micro_batch)      # padded rows, or packed as in RL
    dp_group = parallel_state.get_data_parallel_group(with_context_parallel=False)
    num_tokens, _ = count_global_tokens([m.resp_mask for m in mbs], group=dp_group)
    agg = Aggregation("token-mean", max(num_tokens, 1.0), 1.0, len(mbs), ctx.dp_size)

    def loss_fn(logits, mb):
        logp, _ = response_stats(logits, mb, 1.0)
        nll_sum = torch.where(mb.resp_mask, -logp, torch.zeros_like(logp)).sum()
        return aggregate(-logp, mb.resp_mask, agg), {"nll": nll_sum.detach(), "num_tokens": mb.resp_mask.sum()}

    zero_grads(ctx.optimizer, [ctx.policy])
    out = run_schedule(ctx.policy, mbs, loss_fn, forward_only=False)
    res = optimizer_step(ctx.optimizer, ctx.scheduler, [ctx.policy])
    nll = sum(float(o["nll"]) for o in out) / max(sum(float(o["num_tokens"]) for o in out), 1.0) if out else 0.0
    return {"sft/nll": nll, "grad_norm": res.grad_norm}


@contextmanager
def peak_lr(scheduler, optimizer, lr: float):
    """Run with peak learning rate ``lr`` (the schedule's shape kept; 0: unchanged), then restore."""
    if not lr:
        yield
        return
    groups = optimizer.param_groups
    saved = [g.get("max_lr") for g in groups]
    for g in groups:
        g["max_lr"] = lr                      # megatron's scheduler reads a group's own max_lr first
    scheduler.step(increment=0)
    try:
        yield
    finally:
        for g, old in zip(groups, saved):
            if old is None:
                g.pop("max_lr", None)
            else:
                g["max_lr"] = old
        scheduler.step(increment=0)


def warm_start(ctx, reader: Iterator[dict], steps: int, logger, start: int = 0, after_step=None) -> list[float]:
    """Steps ``start+1 .. steps`` of the supervised warm-start on ``prompts_per_step`` samples each (peak learning
    rate ``training.warmup_sft_lr``); ``after_step(done)`` runs after each (it may raise to stop); NLL per step."""
    nlls = []
    with peak_lr(ctx.scheduler, ctx.optimizer, ctx.cfg.training.warmup_sft_lr):
        for i in logger.bar(range(start, steps), steps - start, "warm-start"):
            m = sft_step(ctx, [next(reader) for _ in range(ctx.prompts_per_rank)])
            nlls.append(m["sft/nll"])
            if logger.writer is not None:
                logger.writer.add_scalar("sft/nll", m["sft/nll"], i + 1)
            if after_step is not None:
                after_step(i + 1)
    if nlls:
        logger.info(f"warm-start done: answer NLL {nlls[0]:.3f} -> {nlls[-1]:.3f}")
    return nlls

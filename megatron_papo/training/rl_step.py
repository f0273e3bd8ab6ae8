"""One PAPO RL step, top to bottom (docs/algorithm.md):

    prompts -> masked images (seeded) -> n rollouts with the real image -> rewards -> group advantages
    (DAPO: dynamic sampling with refill) -> no-grad scoring (old log-probs: the rollout's under plain sampling,
    else recomputed in ONE batched policy pass together with the masked-image log-probs; reference log-probs
    in one pass of the reference; at PP = 1 each distinct prompt is run once for its n rows, see
    ``training.scoring``) -> PPO updates over
    mini-batches through megatron's schedule (global token-mean loss), one optimizer step per mini-batch.

Legend: P prompts on this DP rank, n rollouts per prompt, N = P * n rows (prompt-major), T response tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from megatron.core import parallel_state

from megatron_papo.algorithms.advantages import broadcast_to_tokens, get_advantage_estimator, group_ids_for
from megatron_papo.algorithms.aggregation import Aggregation, count_global_tokens
from megatron_papo.algorithms.dynamic_sampling import dynamic_sampling_filter
from megatron_papo.algorithms.masking import mask_prompt_images, masking_options
from megatron_papo.algorithms.metrics import reduce_metrics
from megatron_papo.algorithms.policy_loss import PolicyLossInputs, get_policy_loss
from megatron_papo.config import Config
from megatron_papo.rewards import get_reward
from megatron_papo.rewards.budget import score_responses
from megatron_papo.rollout import SamplingParams
from megatron_papo.training.optimizer import optimizer_step, zero_grads
from megatron_papo.training.preemption import safe_point
from megatron_papo.training.scoring import select_logprobs_fn
from megatron_papo.training.sequences import (Rows, pack, pair, paired_response_stats, response_stats, run_schedule,
                                              seq_len)


@dataclass
class RLContext:
    """Everything a step needs, built once by the trainer."""
    cfg: Config
    policy: torch.nn.Module           # DDP-wrapped policy chunk
    reference: Optional[torch.nn.Module]  # frozen reference (None when algorithm.beta == 0)
    optimizer: object
    scheduler: object
    engine: object                    # RolloutBackend on the policy
    tokenizer: object
    processor: object                 # image processor (for the masked images' pixels)
    # scoring-pass implementation (training.scoring); None: chosen from cfg when the context is built
    logprobs_fn: Optional[Callable] = None

    def __post_init__(self):
        if self.logprobs_fn is None:
            self.logprobs_fn = select_logprobs_fn(self.cfg)

    @property
    def dp_rank(self) -> int:
        return parallel_state.get_data_parallel_rank()

    @property
    def dp_size(self) -> int:
        return parallel_state.get_data_parallel_world_size()

    @property
    def prompts_per_rank(self) -> int:
        t = self.cfg.training
        if t.prompts_per_step % self.dp_size or t.prompts_per_update % self.dp_size:
            raise ValueError(f"training.prompts_per_step ({t.prompts_per_step}) and training.prompts_per_update "
                             f"({t.prompts_per_update}) must be multiples of the data-parallel size ({self.dp_size})")
        return t.prompts_per_step // self.dp_size

    def sampling(self) -> SamplingParams:
        r = self.cfg.rollout
        return SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                              max_new_tokens=r.max_new_tokens, stop=tuple(r.stop))


@dataclass
class Rollouts:
    samples: list          # P reader samples
    rows: Rows             # N rows with the real images
    masked: list           # N (pixel_values, grid) of the masked images
    rewards: torch.Tensor  # [N] overall reward
    accuracy: torch.Tensor  # [N]
    format: torch.Tensor   # [N]
    lengths: torch.Tensor  # [N]


def _rollout_seed(cfg: Config, step: int, attempt: int, dp_rank: int) -> int:
    return (cfg.training.seed * 1_000_003 + step * 10_007 + attempt * 101 + dp_rank) % (2**63)


def generate(ctx: RLContext, samples: list, step: int, attempt: int) -> Rollouts:
    """Masked images, rollouts with the real images and rewards for ``samples`` (P prompts)."""
    cfg, n = ctx.cfg, ctx.cfg.rollout.n
    first = (attempt * ctx.dp_size + ctx.dp_rank) * len(samples)   # global prompt index: layout independent
    prompts = [s["prompt"] for s in samples]
    masked = []
    for p, (s, pr) in enumerate(zip(samples, prompts)):
        if pr.pixel_values is None:
            masked.append((None, None))
            continue
        imgs = mask_prompt_images(s["images"], seed=cfg.training.seed, step=step, prompt_index=first + p,
                                  **masking_options(cfg.algorithm, pr.image_grid_thw))
        pv, grid = ctx.processor(imgs)
        assert torch.equal(grid, pr.image_grid_thw), "masking must keep the image grid"
        masked.append((pv, grid))
    out = ctx.engine.generate(prompts, n, ctx.sampling(), seed=_rollout_seed(cfg, step, attempt, ctx.dp_rank))
    jobs = [(get_reward(samples[i // n].get("reward")),
             ctx.tokenizer.decode(out.response_ids[i][out.response_mask[i]].tolist()), samples[i // n]["answer"])
            for i in range(len(out))]
    scores, _ = score_responses(jobs, cfg.training.reward_timeout_s, cfg.training.reward_workers)
    rows = Rows([prompts[i // n].input_ids for i in range(len(out))], out.response_ids, out.response_mask.bool(),
                [(prompts[i // n].pixel_values, prompts[i // n].image_grid_thw) for i in range(len(out))],
                out.logprobs.float() if rollout_logprobs_usable(cfg) else None)
    val = lambda k: torch.tensor([sc[k] for sc in scores], dtype=torch.float32)  # noqa: E731
    return Rollouts(samples, rows, [masked[i // n] for i in range(len(out))], val("overall"), val("accuracy"),
                    val("format"), out.lengths)


def _take_groups(r: Rollouts, groups: list[int], n: int) -> Rollouts:
    idx = [g * n + j for g in groups for j in range(n)]
    return Rollouts([r.samples[g] for g in groups], r.rows.select(idx), [r.masked[i] for i in idx],
                    r.rewards[idx], r.accuracy[idx], r.format[idx], r.lengths[idx])


def _merge(a: Optional[Rollouts], b: Rollouts) -> Rollouts:
    if a is None:
        return b
    return Rollouts(a.samples + b.samples, a.rows.concat(b.rows), a.masked + b.masked,
                    torch.cat([a.rewards, b.rewards]), torch.cat([a.accuracy, b.accuracy]),
                    torch.cat([a.format, b.format]), torch.cat([a.lengths, b.lengths]))


def collect(ctx: RLContext, reader: Iterator[dict], step: int) -> tuple[Rollouts, dict]:
    """Rollouts for this rank's prompts; with dynamic sampling keep informative groups, refill (algorithm.md s.3)."""
    cfg, n, want = ctx.cfg, ctx.cfg.rollout.n, ctx.prompts_per_rank
    a = cfg.algorithm
    kept, stats = None, {"rollout/attempts": 0.0, "rollout/dropped_groups": 0.0}
    all_rewards, all_acc, all_fmt, all_len = [], [], [], []
    for attempt in range(a.dynamic_sampling_max_tries if a.dynamic_sampling else 1):
        r = generate(ctx, [next(reader) for _ in range(want)], step, attempt)
        stats["rollout/attempts"] += 1
        all_rewards.append(r.rewards), all_acc.append(r.accuracy), all_fmt.append(r.format)
        all_len.append(r.lengths.float())
        if a.dynamic_sampling:
            f = dynamic_sampling_filter(r.accuracy, group_ids_for(want, n), a.dynamic_sampling_min,
                                        a.dynamic_sampling_max)
            groups = [g for g in range(want) if bool(f.keep[g * n])]
            stats["rollout/dropped_groups"] += f.dropped_groups
            r = _take_groups(r, groups, n)
        kept = _merge(kept, r)
        if len(kept.samples) >= want:
            break
    have = _agree_min(len(kept.samples))                       # every DP rank trains on as many groups
    kept = _take_groups(kept, list(range(min(have, want))), n)
    stats.update({"reward/mean": torch.cat(all_rewards).mean().item(),
                  "reward/accuracy": torch.cat(all_acc).mean().item(),
                  "reward/format": torch.cat(all_fmt).mean().item(),
                  "rollout/response_length": torch.cat(all_len).mean().item(),
                  "rollout/groups_used": float(len(kept.samples))})
    return kept, stats


def _agree_min(value: int) -> int:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.long)
    if dist.is_initialized() and parallel_state.get_data_parallel_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=parallel_state.get_data_parallel_group(with_context_parallel=False))
    return int(t.item())


def rollout_logprobs_usable(cfg: Config) -> bool:
    """The rollout's log-probs are the old policy's (same temperature, nothing truncated): no forward needed."""
    r = cfg.rollout
    return not r.recompute_old_logprobs and r.top_p >= 1.0 and r.top_k == 0


def needs_masked(cfg: Config) -> bool:
    a = cfg.algorithm
    return a.gamma > 0 or a.eta2 > 0


def masked_in_update(cfg: Config) -> bool:
    """The masked rows ride along in every update micro-batch (with gradient, or for the exact KL); otherwise
    their log-probs are computed once per step in the no-grad scoring pass."""
    a = cfg.algorithm
    if (a.perception_grad or a.exact_perception_kl) and not needs_masked(cfg):
        field = "perception_grad" if a.perception_grad else "exact_perception_kl"
        raise ValueError(f"algorithm.{field}=true has no effect without the perception loss; set algorithm.gamma "
                         f"(or algorithm.eta2) > 0, or algorithm.{field}=false")
    if a.exact_perception_kl and a.gamma == 0:
        raise ValueError("algorithm.exact_perception_kl=true only changes the gamma term; set algorithm.gamma > 0 "
                         "or algorithm.exact_perception_kl=false")
    return needs_masked(cfg) and (a.perception_grad or a.exact_perception_kl)


def score(ctx: RLContext, rows: Rows, masked_images: Optional[list]) -> dict:
    """No-grad per-token log-probs [N, T]: ``old_logp`` (the rollout's when usable, else recomputed), ``mask_logp``
    (one batched policy pass over the masked rows, and the real ones when old_logp must be recomputed) and
    ``ref_logp`` (one reference pass), each through ``ctx.logprobs_fn`` (``training.scoring``: prefix-shared at
    PP = 1, megatron's schedule otherwise). Computed ones are filled on the last pipeline stage only."""
    cfg, n = ctx.cfg, len(rows)
    known = rows.logprobs is not None                           # old log-probs from the rollout
    masked = rows.with_images(masked_images) if masked_images is not None else None
    both = masked if known else (rows.concat(masked) if masked is not None else rows)
    mbs = cfg.training.micro_batch_size * 2                     # no activations kept: bigger micro-batches
    run = lambda model, r: ctx.logprobs_fn(model, r, mbs, ctx.tokenizer.pad_id,  # noqa: E731
                                           ctx.tokenizer.image_token_id, cfg.rollout.temperature)
    out = {"old_logp": rows.logprobs} if known else {}
    logp = run(ctx.policy, both) if both is not None else None
    if logp is not None:
        if not known:
            out["old_logp"], logp = logp[:n], logp[n:]
        if masked_images is not None:
            out["mask_logp"] = logp[:n]
    if ctx.reference is not None:
        ref = run(ctx.reference, rows)
        if ref is not None:
            out["ref_logp"] = ref
    return out


def ppo_update(ctx: RLContext, rows: Rows, tokens: dict, num_updates: int, num_groups: int,
               masked_images: Optional[list] = None) -> list[dict]:
    """PPO epochs x ``num_updates`` optimizer steps over contiguous mini-batches of rows; metrics per step.

    With ``masked_images`` each micro-batch also carries its rows with the masked images (see ``pair``), for
    ``algorithm.perception_grad`` / ``algorithm.exact_perception_kl``."""
    cfg = ctx.cfg
    a = cfg.algorithm
    loss_fn_algo = get_policy_loss(cfg.algorithm.policy_loss)
    per = (num_groups // num_updates) * ctx.cfg.rollout.n         # whole prompt groups per optimizer step
    dp_group = parallel_state.get_data_parallel_group(with_context_parallel=False)
    results = []
    for _ in range(cfg.training.ppo_epochs):
        for u in range(num_updates):
            idx = list(range(u * per, (u + 1) * per))
            sub = rows.select(idx)
            sub_tokens = {k: v[idx] for k, v in tokens.items()}
            mbs = pack(sub, cfg.training.micro_batch_size, ctx.tokenizer.pad_id, seq_len(rows), sub_tokens,
                       image_token_id=ctx.tokenizer.image_token_id)
            num_tokens, num_seqs = count_global_tokens([m.resp_mask for m in mbs], group=dp_group)
            agg = Aggregation(cfg.algorithm.loss_agg, max(num_tokens, 1.0), max(num_seqs, 1.0), len(mbs),
                              ctx.dp_size)
            if masked_images is not None:
                masked = pack(sub.with_images([masked_images[i] for i in idx]), cfg.training.micro_batch_size,
                              ctx.tokenizer.pad_id, seq_len(rows), image_token_id=ctx.tokenizer.image_token_id)
                mbs = [pair(r, m) for r, m in zip(mbs, masked)]

            def loss_fn(logits, mb):
                t = mb.tokens
                mask_logp, kl = t.get("mask_logp"), None
                if masked_images is None:
                    logp, ent = response_stats(logits, mb, cfg.rollout.temperature)
                else:
                    logp, ent, mask_logp, kl = paired_response_stats(logits, mb, cfg.rollout.temperature,
                                                                     masked_grad=a.perception_grad)
                inp = PolicyLossInputs(logp=logp, old_logp=t["old_logp"], advantages=t["advantages"],
                                       response_mask=mb.resp_mask, ref_logp=t.get("ref_logp"),
                                       mask_logp=mask_logp, perception_kl=kl if a.exact_perception_kl else None,
                                       entropy=ent.detach())
                return loss_fn_algo(inp, a, agg)

            zero_grads(ctx.optimizer, [ctx.policy])
            metrics = run_schedule(ctx.policy, mbs, loss_fn, forward_only=False)
            res = optimizer_step(ctx.optimizer, ctx.scheduler, [ctx.policy])
            reduced = reduce_metrics(metrics, group=dp_group) if metrics else {}
            reduced.update({"grad_norm": res.grad_norm, "lr": res.lr, "skipped": float(not res.applied)})
            results.append(reduced)
    return results


def rl_step(ctx: RLContext, reader: Iterator[dict], step: int) -> dict:
    """One RL step; returns its metrics (loss metrics are complete on the last pipeline stage)."""
    cfg = ctx.cfg
    t0 = time.perf_counter()
    roll, metrics = collect(ctx, reader, step)
    safe_point()                  # a signal abandons the step here or after scoring: no weight has changed yet
    t1 = time.perf_counter()
    rows, n = roll.rows, cfg.rollout.n
    if len(roll.samples) == 0:
        metrics.update({"time/rollout": t1 - t0, "update/skipped_no_groups": 1.0})
        return metrics
    adv = get_advantage_estimator(cfg.algorithm.advantage)(roll.rewards, group_ids_for(len(roll.samples), n))
    in_update = masked_in_update(cfg)
    tokens = score(ctx, rows, roll.masked if needs_masked(cfg) and not in_update else None)
    safe_point()
    t2 = time.perf_counter()
    tokens["advantages"] = broadcast_to_tokens(adv, rows.response_mask)
    if "old_logp" not in tokens:                                # not the last stage: placeholders, never read
        tokens["old_logp"] = torch.zeros_like(tokens["advantages"])
    num_updates = max(1, min(cfg.training.prompts_per_step // cfg.training.prompts_per_update, len(roll.samples)))
    updates = ppo_update(ctx, rows, tokens, num_updates, len(roll.samples), roll.masked if in_update else None)
    t3 = time.perf_counter()
    for key in updates[0]:
        vals = [u[key] for u in updates if key in u]
        metrics[f"actor/{key}"] = sum(vals) / len(vals) if key != "skipped" else sum(vals)
    metrics.update({"time/rollout": t1 - t0, "time/scoring": t2 - t1, "time/update": t3 - t2,
                    "time/step": t3 - t0, "throughput/tokens_per_s": float(rows.response_mask.sum()) / (t3 - t0)})
    return metrics

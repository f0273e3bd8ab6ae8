"""One RL step of the PAPO / VPPO family, top to bottom (docs/algorithm.md):

    prompts -> auxiliary views of their images (seeded: masked, blank, noise; ``algorithms.views``) -> n rollouts
    with the real image -> rewards -> group advantages (DAPO: dynamic sampling with refill) -> no-grad scoring
    (old log-probs: the rollout's under plain sampling, else recomputed in ONE batched policy pass together with
    every view's log-probs; reference log-probs in one pass of the reference; at PP = 1 each distinct prompt is run
    once for its n rows, see ``training.scoring``) -> the view consumers (``algorithms.consumers``: PAPO's masked
    log-probs for the loss, VPPO's token filter and advantage scale) -> PPO updates over mini-batches through
    megatron's schedule (global token-mean loss), one optimizer step per mini-batch.

Legend: P prompts on this DP rank, n rollouts per prompt, N = P * n rows (prompt-major), T response tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
from megatron.core import parallel_state

from megatron_papo.algorithms.advantages import broadcast_to_tokens, get_advantage_estimator, group_ids_for
from megatron_papo.algorithms.aggregation import Aggregation, count_global_tokens
from megatron_papo.algorithms.consumers import StepLayout, active_consumers, apply_consumers, view_plan
from megatron_papo.algorithms.dynamic_sampling import dynamic_sampling_filter
from megatron_papo.algorithms.views import ViewRequest, make_views
from megatron_papo.algorithms.metrics import reduce_metrics
from megatron_papo.algorithms.policy_loss import PolicyLossInputs, get_policy_loss
from megatron_papo.config import Config
from megatron_papo.rewards import get_reward
from megatron_papo.rewards.budget import score_responses
from megatron_papo.rollout import SamplingParams
from megatron_papo.training.optimizer import optimizer_step, zero_grads
from megatron_papo.training.packing import micro_batches, update_micro_batch_rows
from megatron_papo.training.preemption import safe_point
from megatron_papo.training.scoring import select_logprobs_fn
from megatron_papo.training.sequences import Rows, pair, paired_response_stats, response_stats, run_schedule, seq_len
from megatron_papo.training.telemetry import step_telemetry, timed_scoring


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
    processor: object                 # image processor (for the auxiliary views' pixels)
    # scoring-pass implementation (training.scoring); None: chosen from cfg when the context is built
    logprobs_fn: Optional[Callable] = None
    # (model, rows, seconds) of the step's scoring calls, for the per-pass times (training.telemetry)
    scoring_log: list = field(default_factory=list)

    def __post_init__(self):
        self.logprobs_fn = timed_scoring(self.logprobs_fn or select_logprobs_fn(self.cfg), self.scoring_log)

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
    views: dict            # view name -> N (pixel_values, grid) of that view's images
    rewards: torch.Tensor  # [N] overall reward
    accuracy: torch.Tensor  # [N]
    format: torch.Tensor   # [N]
    lengths: torch.Tensor  # [N]


def _rollout_seed(cfg: Config, step: int, attempt: int, dp_rank: int) -> int:
    return (cfg.training.seed * 1_000_003 + step * 10_007 + attempt * 101 + dp_rank) % (2**63)


def generate(ctx: RLContext, samples: list, step: int, attempt: int) -> Rollouts:
    """Auxiliary views, rollouts with the real images and rewards for ``samples`` (P prompts)."""
    cfg, n = ctx.cfg, ctx.cfg.rollout.n
    first = (attempt * ctx.dp_size + ctx.dp_rank) * len(samples)   # global prompt index: layout independent
    prompts = [s["prompt"] for s in samples]
    requests = [ViewRequest(s.get("images") or [], pr.pixel_values, pr.image_grid_thw, first + p, n,
                            cfg.training.seed, step) for p, (s, pr) in enumerate(zip(samples, prompts))]
    views = make_views(list(view_plan(cfg.algorithm).generated), requests, cfg.algorithm, ctx.processor)
    out = ctx.engine.generate(prompts, n, ctx.sampling(), seed=_rollout_seed(cfg, step, attempt, ctx.dp_rank))
    jobs = [(get_reward(samples[i // n].get("reward")),
             ctx.tokenizer.response_text(out.response_ids[i][out.response_mask[i]].tolist()), samples[i // n]["answer"])
            for i in range(len(out))]
    scores, _ = score_responses(jobs, cfg.training.reward_timeout_s, cfg.training.reward_workers)
    rows = Rows([prompts[i // n].input_ids for i in range(len(out))], out.response_ids, out.response_mask.bool(),
                [(prompts[i // n].pixel_values, prompts[i // n].image_grid_thw) for i in range(len(out))],
                out.logprobs.float() if rollout_logprobs_usable(cfg) else None)
    val = lambda k: torch.tensor([sc[k] for sc in scores], dtype=torch.float32)  # noqa: E731
    return Rollouts(samples, rows, views, val("overall"), val("accuracy"), val("format"), out.lengths)


def _take_groups(r: Rollouts, groups: list[int], n: int) -> Rollouts:
    idx = [g * n + j for g in groups for j in range(n)]
    views = {k: [v[i] for i in idx] for k, v in r.views.items()}
    return Rollouts([r.samples[g] for g in groups], r.rows.select(idx), views,
                    r.rewards[idx], r.accuracy[idx], r.format[idx], r.lengths[idx])


def _merge(a: Optional[Rollouts], b: Rollouts) -> Rollouts:
    if a is None:
        return b
    return Rollouts(a.samples + b.samples, a.rows.concat(b.rows), {k: v + b.views[k] for k, v in a.views.items()},
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
    """The rollout's log-probs are the old policy's (same temperature, nothing truncated, and the same numerics:
    with FP8 the engine generates in bf16, so the update's FP8 forward recomputes them): no forward needed."""
    r = cfg.rollout
    return not r.recompute_old_logprobs and r.top_p >= 1.0 and r.top_k == 0 and cfg.model.fp8 is None


def needs_masked(cfg: Config) -> bool:
    """PAPO's perception terms are on: its consumer reads the masked view."""
    return "papo" in active_consumers(cfg.algorithm)


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


def score(ctx: RLContext, rows: Rows, views: dict) -> tuple[dict, dict]:
    """No-grad per-token log-probs [N, T]: (``{old_logp, ref_logp}``, ``{view name: log-probs with that view}``).

    ``old_logp`` is the rollout's when usable, else recomputed; the real rows (when recomputed) and every view's
    rows (``views``: name -> N images) go through ONE batched policy pass, the reference through one pass, each via
    ``ctx.logprobs_fn`` (``training.scoring``: prefix-shared at PP = 1, megatron's schedule otherwise). Computed
    ones are filled on the last pipeline stage only."""
    cfg, n = ctx.cfg, len(rows)
    known = rows.logprobs is not None                           # old log-probs from the rollout
    parts = ([] if known else [rows]) + [rows.with_images(images) for images in views.values()]
    both = parts[0] if parts else None
    for part in parts[1:]:
        both = both.concat(part)
    mbs = cfg.training.micro_batch_size * 2                     # no activations kept: bigger micro-batches
    run = lambda model, r: ctx.logprobs_fn(model, r, mbs, ctx.tokenizer.pad_id,  # noqa: E731
                                           ctx.tokenizer.image_token_id, cfg.rollout.temperature)
    out, view_logp = ({"old_logp": rows.logprobs} if known else {}), {}
    logp = run(ctx.policy, both) if both is not None else None
    if logp is not None:
        if not known:
            out["old_logp"], logp = logp[:n], logp[n:]
        view_logp = {name: logp[i * n:(i + 1) * n] for i, name in enumerate(views)}
    if ctx.reference is not None:
        ref = run(ctx.reference, rows)
        if ref is not None:
            out["ref_logp"] = ref
    return out, view_logp


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
            split = dict(max_tokens=cfg.training.max_tokens_per_micro_batch, seq_length=seq_len(rows),
                         image_token_id=ctx.tokenizer.image_token_id)       # padded rows or packed (training.packing)
            mbs = micro_batches(sub, cfg.training.micro_batch_size, ctx.tokenizer.pad_id, tokens=sub_tokens, **split)
            num_tokens, num_seqs = count_global_tokens([m.resp_mask for m in mbs], group=dp_group)
            agg = Aggregation(cfg.algorithm.loss_agg, max(num_tokens, 1.0), max(num_seqs, 1.0), len(mbs),
                              ctx.dp_size)
            if masked_images is not None:
                masked = micro_batches(sub.with_images([masked_images[i] for i in idx]), cfg.training.micro_batch_size,
                                       ctx.tokenizer.pad_id, **split)
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
                                       entropy=ent.detach(), pg_mask=t.get("pg_mask"))
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
    masked_in_update(cfg)                                       # option errors
    plan = view_plan(cfg.algorithm)
    ctx.scoring_log.clear()
    tokens, view_logp = score(ctx, rows, {name: roll.views[name] for name in plan.scored})
    safe_point()
    t2 = time.perf_counter()
    tokens["advantages"] = broadcast_to_tokens(adv, rows.response_mask)
    num_updates = max(1, min(cfg.training.prompts_per_step // cfg.training.prompts_per_update, len(roll.samples)))
    if "old_logp" not in tokens:                                # not the last stage: placeholders, never read
        tokens["old_logp"] = torch.zeros_like(tokens["advantages"])
    elif len(view_logp) == len(plan.scored):                    # the ranks that hold the views' log-probs
        per, mbs = (len(roll.samples) // num_updates) * n, cfg.training.micro_batch_size
        layout = StepLayout(per, mbs, update_micro_batch_rows(rows, per, mbs, cfg.training.max_tokens_per_micro_batch))
        metrics.update(apply_consumers(cfg.algorithm, tokens, view_logp, layout, rows.response_mask,
                                       parallel_state.get_data_parallel_group(with_context_parallel=False)))
    updates = ppo_update(ctx, rows, tokens, num_updates, len(roll.samples),
                         roll.views[plan.in_update] if plan.in_update else None)
    t3 = time.perf_counter()
    for key in updates[0]:
        vals = [u[key] for u in updates if key in u]
        metrics[f"actor/{key}"] = sum(vals) / len(vals) if key != "skipped" else sum(vals)
    metrics.update({"time/rollout": t1 - t0, "time/scoring": t2 - t1, "time/update": t3 - t2,
                    "time/step": t3 - t0, "throughput/tokens_per_s": float(rows.response_mask.sum()) / (t3 - t0)})
    metrics.update(step_telemetry(ctx, rows, ctx.scoring_log, old_recomputed=rows.logprobs is None,
                                  masked_scoring=len(plan.scored), masked_in_update=bool(plan.in_update),
                                  step_seconds=t3 - t0))
    return metrics

"""The PAPO algorithm as pure functions the trainer composes (docs/algorithm.md).

Legend: N = responses in an RL step, prompt-major (prompt 0's n samples first); B = sequences in a micro-batch;
T = response tokens (right-padded); every per-token tensor is ``[B, T]`` float32 aligned with ``response_mask``.

Advantages (once per RL step)::

    gid  = group_ids_for(num_prompts, n)                     # [N] int64
    adv  = get_advantage_estimator("grpo")(rewards, gid)     # [N]  (R - mean_g) / (std_g + 1e-6), unbiased std
    advt = broadcast_to_tokens(adv, response_mask)           # [N, T]

Dynamic sampling (DAPO)::

    res = dynamic_sampling_filter(accuracy, gid, low=0.01, high=0.99)   # res.keep [N] bool, res.dropped_groups

Policy loss (per micro-batch, inside megatron's ``loss_func``)::

    agg = Aggregation(mode=cfg.loss_agg, global_tokens=T_all, global_sequences=S_all,
                      num_micro_batches=M, dp_size=D)        # T_all, S_all = count_global_tokens(masks, dp_group)
    loss, metrics = get_policy_loss(cfg.policy_loss)(
        PolicyLossInputs(logp, old_logp, advt, response_mask, ref_logp=..., mask_logp=..., perception_kl=...,
                         entropy=...), cfg, agg)
    # loss: 0-dim tensor to back-propagate. Scaled by agg.grad_scale = M * D so that megatron's schedule
    #   (loss / num_microbatches) and DDP (gradient mean over DP) leave exactly the gradient of the global
    #   token-mean; use Aggregation(framework_averages=False) when summing gradients yourself.
    # metrics: detached 0-dim token sums {loss, pg_loss, nll, pg_clipfrac, pg_clipfrac_low, pg_clipfrac_high,
    #   pg_dualclip_frac, ppo_kl, ratio, [ref_kl], [perception_kl], [mask_nll], [entropy]} + counts num_tokens,
    #   num_seqs; reduce_metrics(list_of_metrics, dp_group) -> exact token means (counts as totals). Log
    #   metrics["loss"] from there, not the scaled loss megatron reports. Padded positions may hold -inf/NaN.

Inputs: ``mask_logp`` [B, T] from the masked-image forward (detached inside unless ``cfg.perception_grad``; pass
it with grad when recomputing per micro-batch); ``perception_kl`` [B, T] the exact KL(pi(.|I) || pi(.|I_mask))
from ``megatron_papo.ops.vocab_parallel_kl`` when ``cfg.exact_perception_kl`` (detach the masked logits yourself
for the stop-gradient variant); ``ref_logp`` needed when ``cfg.beta > 0``.

Presets: ``algorithm_preset("papo_g" | "papo_d" | "grpo" | "dapo", **overrides) -> AlgorithmConfig``.

Collapse: ``CollapseDetector().update(step_metrics, step)`` returns a warning string, once per episode, when the
reference KL rises (the early sign), the perception KL passes its alarm level, or perception KL, clip fraction
and both NLLs rise together.

Views, signals, consumers (once per RL step, after the no-grad scoring pass)::

    views = views.make_views(["masked", "blank"], requests, cfg, processor)   # name -> one (pixels, grid) per row
    dep = signals.visual_dependency(old_logp, view_logp)                      # [N, T], also k3, abs_delta_logp, ...
    metrics = consumers.apply_consumers(cfg, tokens, {"masked": view_logp}, layout, response_mask, dp_group)
    # tokens gains mask_logp (papo) / pg_mask (vppo); tokens["advantages"] is scaled by vppo's shaping

Masking: ``masking.random_patch_blackening(image, patch_size=14, ratio=0.6, generator=None)`` and
``masking.mask_rollout_batch(prompt_images, n, seed=, step=, prompt_offset=)`` (one mask per prompt, shared by
its n rollouts, reproducible from (seed, step, global prompt index)).
"""

from megatron_papo.algorithms import masking
from megatron_papo.algorithms.advantages import (ADVANTAGE_ESTIMATORS, broadcast_to_tokens, get_advantage_estimator,
                                                 group_ids_for, group_mean_std, grpo_advantages, register_advantage)
from megatron_papo.algorithms.aggregation import AGGREGATION_MODES, Aggregation, aggregate, count_global_tokens
from megatron_papo.algorithms.dynamic_sampling import FilterResult, dynamic_sampling_filter
from megatron_papo.algorithms.kl import k3_kl
from megatron_papo.algorithms.metrics import CollapseDetector, reduce_metrics
from megatron_papo.algorithms.policy_loss import (POLICY_LOSSES, PolicyLossInputs, dual_clip_pg, get_policy_loss,
                                                  papo_policy_loss, register_policy_loss)
from megatron_papo.algorithms.presets import algorithm_preset, preset_names

__all__ = [
    "ADVANTAGE_ESTIMATORS", "AGGREGATION_MODES", "Aggregation", "CollapseDetector", "FilterResult", "POLICY_LOSSES",
    "PolicyLossInputs", "aggregate", "algorithm_preset", "broadcast_to_tokens", "count_global_tokens",
    "dual_clip_pg", "dynamic_sampling_filter", "get_advantage_estimator", "get_policy_loss", "group_ids_for",
    "group_mean_std", "grpo_advantages", "k3_kl", "masking", "papo_policy_loss", "preset_names",
    "reduce_metrics", "register_advantage", "register_policy_loss",
]

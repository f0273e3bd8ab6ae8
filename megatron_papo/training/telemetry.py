"""Per-phase time, FLOPs and model FLOP utilisation (MFU) of an RL step (``training.flops`` counts the FLOPs).

Phases: ``rollout`` (prefill of each distinct prompt with its images, then decoding every row's response),
the scoring passes ``scoring_old`` (old log-probs, when recomputed), ``scoring_masked`` (the masked images) and
``scoring_ref`` (the reference), and ``update`` (forward + backward of every row per PPO epoch; a frozen vision
tower has no backward). The old and masked log-probs share one batched forward: its time is split between them
by rows. FLOPs are this rank's rows' (its data-parallel share), divided by TP x PP for one GPU's share;
``perf/mfu`` is that over the step time and the device's dense bf16 peak (``platform.peaks``; absent on CPU).

Metrics: ``time/{rollout,scoring_old,scoring_masked,scoring_ref,update,step}``, ``flops/<phase>`` (this DP
rank, all GPUs of its model replica), ``perf/tflops_per_gpu``, ``perf/tokens_per_s_per_gpu`` (prompt + response
tokens of all passes per second per GPU), ``perf/mfu``.
"""

from __future__ import annotations

import time
from typing import Callable

from megatron_papo.platform.peaks import device_peak_flops
from megatron_papo.training.flops import decode_flops, lm_flops, sequences_flops, vision_flops
from megatron_papo.training.sequences import Rows, response_lengths


def timed_scoring(fn: Callable, log: list) -> Callable:
    """``fn`` (a scoring implementation) that appends (model, rows, seconds) of every call to ``log``."""
    def run(model, rows, *args, **kwargs):
        t0 = time.perf_counter()
        out = fn(model, rows, *args, **kwargs)
        log.append((model, len(rows), time.perf_counter() - t0))
        return out
    run.inner = fn
    return run


def scoring_times(log: list, reference, n: int, old_recomputed: bool, masked: int) -> dict:
    """Seconds per scoring pass of one step from the calls in ``log`` (``n`` rows per view; ``masked``: the
    number of auxiliary views scored, ``scoring_masked`` is their total)."""
    out = {"time/scoring_old": 0.0, "time/scoring_masked": 0.0, "time/scoring_ref": 0.0}
    for model, rows, seconds in log:
        if reference is not None and model is reference:
            out["time/scoring_ref"] += seconds
            continue
        # one batched call holds n rows per pass: the old log-probs (when recomputed) and each scored view
        if old_recomputed:
            out["time/scoring_old"] += seconds * n / rows
        if masked:
            out["time/scoring_masked"] += seconds * int(masked) * n / rows
    return out


def _row_shapes(rows: Rows) -> list[tuple[int, int, object]]:
    lengths = response_lengths(rows.response_mask).tolist()
    return [(int(p.numel()), int(r), img[1]) for p, r, img in zip(rows.prompt_ids, lengths, rows.images)]


def _prompt_flops(spec, shapes, groups) -> float:
    """Each distinct prompt once: its prefill and its images."""
    return sum(lm_flops(spec, shapes[i][0]) + (vision_flops(spec, shapes[i][2]) if shapes[i][2] is not None
                                                else 0.0) for i, _ in groups)


def phase_flops(spec, rows: Rows, *, old_recomputed: bool, masked_scoring: int, reference: bool,
                prefix_scoring: bool, masked_in_update: bool, masked_grad: bool, vision_trained: bool,
                ppo_epochs: int) -> dict:
    """FLOPs per phase of one RL step over ``rows`` (whole model, this DP rank's rows)."""
    from megatron_papo.training.scoring import prompt_groups

    shapes, groups = _row_shapes(rows), prompt_groups(rows)
    lm, vis = sequences_flops(spec, shapes)
    rollout = _prompt_flops(spec, shapes, groups) + sum(decode_flops(spec, p, r) for p, r, _ in shapes)
    if prefix_scoring:              # each distinct prompt once, the responses against its cached keys
        one_pass = _prompt_flops(spec, shapes, groups) + sum(lm_flops(spec, r, context=p) for p, r, _ in shapes)
    else:
        one_pass = lm + vis
    train_one = 3 * lm + (3 if vision_trained else 1) * vis
    update = train_one + (((3 if masked_grad else 1) * (lm + vis)) if masked_in_update else 0.0)
    return {"flops/rollout": rollout, "flops/scoring_old": one_pass if old_recomputed else 0.0,
            "flops/scoring_masked": one_pass * int(masked_scoring),
            "flops/scoring_ref": one_pass if reference else 0.0, "flops/update": ppo_epochs * update}


def utilisation(flops: dict, step_seconds: float, model_parallel: int, tokens: float, peak=None) -> dict:
    """TFLOP/s and tokens/s per GPU and MFU (when the device's peak is known) from phase FLOPs."""
    per_gpu = sum(flops.values()) / model_parallel / max(step_seconds, 1e-9)
    out = {"perf/tflops_per_gpu": per_gpu / 1e12,
           "perf/tokens_per_s_per_gpu": tokens / model_parallel / max(step_seconds, 1e-9)}
    peak = device_peak_flops() if peak is None else peak
    if peak:
        out["perf/mfu"] = per_gpu / peak
    return out


def step_telemetry(ctx, rows: Rows, log: list, old_recomputed: bool, masked_scoring: int,
                   masked_in_update: bool, step_seconds: float) -> dict:
    """Scoring-pass times, phase FLOPs and utilisation of one RL step (the trainer's metrics)."""
    cfg = ctx.cfg
    spec = getattr(ctx.policy, "module", ctx.policy).spec
    from megatron_papo.training.scoring import prefix_shared_logprobs

    prefix = getattr(ctx.logprobs_fn, "inner", ctx.logprobs_fn) is prefix_shared_logprobs
    flops = phase_flops(spec, rows, old_recomputed=old_recomputed, masked_scoring=masked_scoring,
                        reference=ctx.reference is not None, prefix_scoring=prefix,
                        masked_in_update=masked_in_update, masked_grad=cfg.algorithm.perception_grad,
                        vision_trained=not cfg.model.freeze_vision, ppo_epochs=cfg.training.ppo_epochs)
    shapes = _row_shapes(rows)
    row_tokens = sum(p + r for p, r, _ in shapes)
    passes = 1 + int(old_recomputed) + int(masked_scoring) + int(ctx.reference is not None) + \
        cfg.training.ppo_epochs * (1 + int(masked_in_update))
    p = cfg.parallel
    out = scoring_times(log, ctx.reference, len(rows), old_recomputed, masked_scoring)
    out.update(flops)
    out.update(utilisation(flops, step_seconds, p.tensor_model_parallel_size * p.pipeline_model_parallel_size,
                           passes * row_tokens))
    return out

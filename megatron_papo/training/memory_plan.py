"""Per-GPU memory plan of a run, computed from the config alone (``--dry-run``), per pipeline stage.

A rank holds, for the whole run: its weights, megatron DDP's fp32 gradient buffer, the Adam moments (fp32; plus
an fp32 master copy of bf16 weights), sharded over DP by the distributed optimizer, and the frozen reference's
weights. On top, one phase at a time:

- update: the activations of the micro-batches in flight (1F1B keeps ``pp - stage`` of them on a stage), with
  full recomputation only each layer's input plus one layer's activations, and on the last stage the logits and
  their gradient;
- rollout: the engine's KV cache: each prompt's keys once and its n rows' response keys apart, ``prompts x prompt
  + rows x response`` positions x layers x KV heads / TP x head dim x 2 x dtype, for all of the rank's prompts
  at once, or with a row cap (``rollout.max_batch_rows``) for the rows in flight: at most ``cap`` rows, and at
  most ``cap - n + 1`` prompts (every prompt held has a row left, and a prompt joins only when n slots are
  free); plus one prefill chunk's working set.

Activations per token and layer (elements, not bytes) were measured on megatron's local layer spec (what its
autograd saves: both RMSNorms' input, normalised value and output, QKV and rotated Q/K, the core-attention output
and its copy, the SwiGLU pieces, the rotary tables) and fitted as ``8 h (/TP with sequence parallelism) + 7 q/TP
+ 2 kv/TP + 5 ffn/TP + 4 head_dim`` (q = heads x head_dim, kv = KV heads x head_dim): within 10% of six padded
configurations measured, 13% above the packed path (which saves less); attention never stores s x s
(flash / memory-efficient kernels, SDPA per packed row).
Transformer Engine's fused kernels save less, so the figure is an upper bound there. The vision tower uses the
same count at its own sizes. Every row is assumed at the config's maxima: a prompt of one image of
``data.max_pixels`` plus 512 text tokens (at most ``data.max_prompt_length``), a response of
``rollout.max_new_tokens``. 10% of the GPU is kept free for the CUDA context, communication buffers and
fragmentation.

tests/test_memory_plan.py checks the figures against tensor memory measured on the CPU (``platform.memory``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from megatron_papo.config import Config
from megatron_papo.models import get_preset, padded_vocab_size

GB = 1e9
HEADROOM = 0.10      # of the GPU kept free: CUDA context, NCCL buffers, allocator fragmentation


@dataclass
class StagePlan:
    """Bytes one rank of a pipeline stage holds."""
    stage: int
    weights: float
    gradients: float
    optimizer: float
    reference: float
    activations: float        # micro-batches in flight, as configured (recomputation on or off)
    activations_full: float   # the same without recomputation
    activations_recompute: float  # the same with full recomputation
    logits: float             # last stage: logits + their gradient (update)
    kv_cache: float           # rollout
    prefill: float            # rollout: one prefill chunk's working set

    @property
    def static(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.reference

    @property
    def update(self) -> float:
        return self.activations + self.logits

    @property
    def rollout(self) -> float:
        return self.kv_cache + self.prefill

    @property
    def total(self) -> float:
        return self.static + max(self.update, self.rollout)


def token_activation_elements(h: int, heads: int, kv_heads: int, ffn: int, head_dim: int, tp: int,
                              sequence_parallel: bool) -> float:
    """Activation elements one layer keeps per token for the backward (see the module docstring)."""
    q, kv = heads * head_dim, max(kv_heads / tp, 1.0) * head_dim
    return 8 * h / (tp if sequence_parallel else 1) + 7 * q / tp + 2 * kv + 5 * ffn / tp + 4 * head_dim


def prompt_tokens(cfg: Config) -> int:
    """Tokens of the longest prompt the plan assumes: one image of data.max_pixels and 512 text tokens."""
    return min(cfg.data.max_prompt_length, cfg.data.max_pixels // (28 * 28) + 512)


def micro_batch_tokens(cfg: Config) -> tuple[int, float]:
    """(tokens of one update micro-batch, rows in it): packed budget or padded rows, doubled when the masked
    rows ride along (algorithm.perception_grad / exact_perception_kl)."""
    t, row = cfg.training, prompt_tokens(cfg) + cfg.rollout.max_new_tokens
    a = cfg.algorithm
    pair = 2 if (a.gamma > 0 or a.eta2 > 0) and (a.perception_grad or a.exact_perception_kl) else 1
    if t.max_tokens_per_micro_batch:
        return pair * t.max_tokens_per_micro_batch, pair * max(1.0, t.max_tokens_per_micro_batch / row)
    return pair * t.micro_batch_size * row, float(pair * t.micro_batch_size)


def plan_memory(cfg: Config, dp: int, spec=None) -> list[StagePlan]:
    """The plan of every pipeline stage (``spec``: the architecture; default the preset's)."""
    from megatron_papo.training.layout import _vision, params_per_stage

    spec = spec or get_preset(cfg.model.preset)
    p = cfg.parallel
    tp, pp, sp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.sequence_parallel
    pb = 2 if cfg.model.params_dtype == "bfloat16" else 4
    opt_bytes = 8 + (4 if pb == 2 else 0)
    shard = dp if cfg.optimizer.use_distributed_optimizer else 1
    s_mb, rows_mb = micro_batch_tokens(cfg)
    num_mb = max(1, math.ceil(cfg.training.prompts_per_update // dp * cfg.rollout.n / max(rows_mb, 1e-9)))
    lm = token_activation_elements(spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.intermediate_size,
                                   spec.head_dim, tp, sp)
    layers = spec.num_layers // pp
    out = []
    for s, n in enumerate(params_per_stage(cfg, spec)):
        in_flight = min(pp - s, num_mb)
        full = layers * s_mb * lm * pb
        recompute = (layers * s_mb * spec.hidden_size / (tp if sp else 1) + s_mb * lm) * pb
        if s == 0:
            vis = _vision_activations(cfg, spec, tp, rows_mb) * pb
            full, recompute = full + vis, recompute + vis / max(spec.vision.depth, 1)
        act = (recompute if cfg.model.recompute else full) * in_flight
        logits = 2 * s_mb * padded_vocab_size(spec.vocab_size) / tp * pb if s == pp - 1 else 0.0
        trained = n - (_vision(spec, tp) if s == 0 and cfg.model.freeze_vision else 0)
        out.append(StagePlan(s, n * pb, trained * 4.0, trained * opt_bytes / shard,
                             n * pb if cfg.algorithm.beta > 0 else 0.0,
                             act, full * in_flight, recompute * in_flight, logits,
                             _kv_cache(cfg, spec, dp, layers, tp, pb), _prefill(cfg, spec, dp, tp, pb)))
    return out


def _vision_activations(cfg: Config, spec, tp: int, rows_mb: float) -> float:
    """Vision-tower activation elements of one micro-batch (one image of data.max_pixels per row)."""
    if cfg.model.freeze_vision:
        return 0.0
    v = spec.vision
    patches = min(cfg.data.max_pixels / v.patch_size ** 2, 4 * prompt_tokens(cfg)) * rows_mb
    per = token_activation_elements(v.hidden_size, v.num_heads, v.num_heads, v.intermediate_size,
                                    v.hidden_size // v.num_heads, tp, False)
    return v.depth * patches * per


def _kv_cache(cfg: Config, spec, dp: int, layers: int, tp: int, pb: int) -> float:
    prompts, n, cap = cfg.training.prompts_per_step // dp, cfg.rollout.n, cfg.rollout.max_batch_rows
    rows, lp, t = prompts * n, prompt_tokens(cfg), cfg.rollout.max_new_tokens
    if cap:  # the rows in flight, and the prompts they (or a just admitted group) belong to
        prompts, rows = min(prompts, cap - n + 1), min(rows, cap)
    positions = prompts * lp + rows * t   # each prompt's keys once + each row's response keys
    return layers * 2 * max(spec.num_kv_heads / tp, 1.0) * spec.head_dim * pb * positions


def _prefill(cfg: Config, spec, dp: int, tp: int, pb: int, chunk: int = 8) -> float:
    """One prefill chunk (the engine's ``prefill_batch_size`` prompts): a layer's forward working set, the
    left-padding mask and the decode logits of every row this data-parallel rank generates."""
    lp = prompt_tokens(cfg)
    work = chunk * lp * (4 * spec.hidden_size + 3 * spec.intermediate_size / tp) * pb + chunk * lp * lp
    rows = cfg.training.prompts_per_step // dp * cfg.rollout.n
    if cfg.rollout.max_batch_rows:
        rows = min(rows, cfg.rollout.max_batch_rows)
    return work + rows * padded_vocab_size(spec.vocab_size) / tp * 4


def fits(plan: list[StagePlan], gpu_gb: float) -> bool:
    return max(s.total for s in plan) <= gpu_gb * GB * (1 - HEADROOM)


def fitting_knob(cfg: Config, dp: int, spec=None) -> Optional[str]:
    """The first single change (or recomputation plus one) that makes the plan fit, as command-line text
    (``--set k=v --set k2=v2``: one ``--set`` per field, as the CLI takes them)."""
    for sets in _knobs(cfg, dp):
        try:
            new, new_dp = _with(cfg, sets, dp)
            plan = plan_memory(new, new_dp, spec)
        except ValueError:
            continue
        if fits(plan, cfg.parallel.gpu_memory_gb):
            text = " ".join(f"--set {k}={str(v).lower()}" for k, v in sets.items())
            return f"{text} (peak {max(s.total for s in plan) / GB:.1f} GB)"
    return None


def _knobs(cfg: Config, dp: int) -> list[dict]:
    """Cheapest first: recomputation, the optimizer's sharding, smaller micro-batches, a rollout row cap (each
    alone, then with recomputation), and only then a larger TP or PP (fewer data-parallel replicas)."""
    t, p, r = cfg.training, cfg.parallel, cfg.rollout
    single = [{"model.recompute": True}] if not cfg.model.recompute else []
    if dp > 1 and not cfg.optimizer.use_distributed_optimizer:
        single.append({"optimizer.use_distributed_optimizer": True})
    if t.max_tokens_per_micro_batch:
        longest = cfg.data.max_prompt_length + cfg.rollout.max_new_tokens
        single += [{"training.max_tokens_per_micro_batch": v} for v in
                   (t.max_tokens_per_micro_batch // 2, t.max_tokens_per_micro_batch // 4) if v >= longest]
    else:
        single += [{"training.micro_batch_size": v} for v in range(t.micro_batch_size - 1, 0, -1)]
    rows = t.prompts_per_step // dp * r.n
    for part in (2, 3, 4, 6, 8):  # a cap of about 1/part of the rank's rows, whole prompt groups
        cap = rows // part // r.n * r.n
        if r.n <= cap and (not r.max_batch_rows or cap < r.max_batch_rows):
            single.append({"rollout.max_batch_rows": cap})
    layout = []
    for size in (2, 4, 8):
        layout.append({"parallel.tensor_model_parallel_size": p.tensor_model_parallel_size * size})
        layout.append({"parallel.pipeline_model_parallel_size": p.pipeline_model_parallel_size * size})
    recompute = not cfg.model.recompute
    both = [{"model.recompute": True, **k} for k in single[1:]] if single and recompute else []
    return single + both + layout + ([{"model.recompute": True, **k} for k in layout] if recompute else [])


def _with(cfg: Config, sets: dict, dp: int) -> tuple[Config, int]:
    """``cfg`` with dotted fields replaced; the world size stays, so DP shrinks as TP x PP grows."""
    new = cfg
    for dotted, value in sets.items():
        section, name = dotted.split(".")
        new = dataclasses.replace(new, **{section: dataclasses.replace(getattr(new, section), **{name: value})})
    p, old = new.parallel, cfg.parallel
    world = dp * old.tensor_model_parallel_size * old.pipeline_model_parallel_size
    model = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
    if world % model or (new.training.prompts_per_update % (world // model)):
        raise ValueError("layout does not divide the world")
    return new, world // model


def describe_memory(cfg: Config, dp: int, spec=None) -> list[str]:
    """The ``--dry-run`` lines: a table per stage (GB) and the verdict with the knob that would make it fit."""
    plan = plan_memory(cfg, dp, spec)
    gpu = cfg.parallel.gpu_memory_gb
    opt = "distributed over DP" if cfg.optimizer.use_distributed_optimizer else "replicated"
    s_mb, _ = micro_batch_tokens(cfg)
    lines = [f"memory plan per GPU (GB; {cfg.model.params_dtype} weights, optimizer {opt}, {s_mb} tokens per "
             f"micro-batch, recompute {'on' if cfg.model.recompute else 'off'}):",
             f"  {'stage':<6}{'weights':>8}{'grads':>7}{'optim':>7}{'ref':>6}{'activ':>7}{'(full':>7}"
             f"{'recomp)':>8}{'logits':>7}{'KV':>7}{'prefill':>8}{'total':>7}"]
    for s in plan:
        vals = (s.weights, s.gradients, s.optimizer, s.reference, s.activations, s.activations_full,
                s.activations_recompute, s.logits, s.kv_cache, s.prefill, s.total)
        widths = (8, 7, 7, 6, 7, 7, 8, 7, 7, 8, 7)
        lines.append(f"  {s.stage:<6}" + "".join(f"{v / GB:>{w}.1f}" for v, w in zip(vals, widths)))
    peak = max(s.total for s in plan)
    usable = gpu * (1 - HEADROOM)
    if fits(plan, gpu):
        lines.append(f"memory: fits ({peak / GB:.1f} GB of {usable:.1f} usable on a {gpu:g} GB GPU)")
    else:
        knob = fitting_knob(cfg, dp, spec)
        worst = max(plan, key=lambda s: s.total)
        what = "the rollout KV cache" if worst.rollout > worst.update else "the update's activations"
        fix = f"try {knob}" if knob else (f"no single knob fits ({what} is the larger phase): add GPUs, "
                                                "or lower training.prompts_per_step / rollout.max_new_tokens")
        lines.append(f"memory: does NOT fit ({peak / GB:.1f} GB > {usable:.1f} usable on a {gpu:g} GB GPU); {fix}")
    return lines

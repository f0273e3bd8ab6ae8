"""The composition root, in order: processes and parallel layout -> tokenizer and data -> policy (and frozen
reference) -> DDP + optimizer -> rollout engine -> resume -> warm-start -> RL loop with logging, checkpoints and
pre-emption -> summary.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_papo.algorithms.consumers import active_consumers, view_plan
from megatron_papo.config import Config, to_dict
from megatron_papo.evaluation.validation import Validator
from megatron_papo.platform import init_distributed, init_model_parallel
from megatron_papo.training.banned_tokens import ban_tokens, vision_token_ids
from megatron_papo.training.checkpoint import save_checkpoint
from megatron_papo.training.preemption import Preempted, PreemptionHandler, set_current, signal_name
from megatron_papo.training.resume import resume
from megatron_papo.training.logging import RunLogger
from megatron_papo.training.optimizer import build_optimizer, distributed_optimizer_enabled, wrap_ddp
from megatron_papo.training.rl_step import RLContext, masked_in_update, rl_step
from megatron_papo.training.sequence_parallel import model_sequence_parallel
from megatron_papo.training.sft import warm_start

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build_data(cfg: Config):
    """(tokenizer, image processor, reader) for this DP rank; synthetic shards are made first if asked."""
    from megatron_papo.data import PromptEncoder, ShardReader, build_tokenizer, ensure_synthetic_shards, resolve_shards
    from megatron_papo.data.limits import DataLimits
    from megatron_papo.models import family_of_preset

    d = cfg.data
    if d.synthetic_if_missing:
        if not dist.is_initialized() or dist.get_rank() == 0:
            if ensure_synthetic_shards(d.train_shards, d.synthetic_samples, cfg.training.seed):
                print(f"data: {d.train_shards} held no shards: wrote {d.synthetic_samples} SYNTHETIC samples there "
                      "and training uses them (data.synthetic_if_missing=true); set it to false to train only on "
                      "your own data", flush=True)
            if validates(cfg):                   # held out: another seed than the training questions
                ensure_synthetic_shards(d.val_shards, cfg.training.eval_limit or 64, cfg.training.seed + 1)
        if dist.is_initialized():
            dist.barrier()
    resolve_shards(d.train_shards)
    tokenizer = build_tokenizer(d.tokenizer)
    processor = family_of_preset(cfg.model.preset).image_processor(d.min_pixels, d.max_pixels)  # patch, mean/std
    reader = ShardReader(d.train_shards, parallel_state.get_data_parallel_rank(),
                         parallel_state.get_data_parallel_world_size(), cfg.training.seed, d.shuffle_buffer,
                         d.num_workers, transform=PromptEncoder(tokenizer, processor, d.max_prompt_length),
                         limits=DataLimits.from_config(d))
    return tokenizer, processor, reader


def validates(cfg: Config) -> bool:
    """In-training validation will run at least once (``training.eval_interval`` within ``training.rl_steps``)."""
    return 0 < cfg.training.eval_interval <= cfg.training.rl_steps


def model_spec(cfg: Config, tokenizer):
    """The architecture to build. Without ``model.load``: the preset with the tokenizer's vocabulary and vision ids.
    With it: the checkpoint's own architecture (its shapes must load; a Hugging Face tokenizer's ``len`` is smaller
    than the checkpoint's padded vocabulary), checked against the preset and the tokenizer."""
    import dataclasses

    from megatron_papo.models import family_of_preset, family_of_spec, get_preset

    m = cfg.model
    preset = get_preset(m.preset)
    ids = dict(image_token_id=tokenizer.image_token_id, vision_start_token_id=tokenizer.vision_start_id)
    if not m.load:
        return dataclasses.replace(preset, vocab_size=tokenizer.vocab_size, **ids)
    from megatron_papo.convert import read_checkpoint_meta

    spec, _, _ = read_checkpoint_meta(m.load)
    have, want = family_of_spec(spec).name, family_of_preset(m.preset).name
    if have != want:
        raise ValueError(f"model.preset {m.preset} is a {want} model but the checkpoint at model.load holds {have} "
                         f"weights; set model.preset to the checkpoint's {have} size")
    if (spec.hidden_size, spec.num_layers) != (preset.hidden_size, preset.num_layers):
        raise ValueError(f"model.preset {m.preset} (hidden {preset.hidden_size}, {preset.num_layers} layers) does "
                         f"not match the checkpoint at model.load (hidden {spec.hidden_size}, {spec.num_layers} "
                         "layers); set model.preset to the checkpoint's size")
    if tokenizer.vocab_size > spec.vocab_size:
        raise ValueError(f"data.tokenizer has {tokenizer.vocab_size} tokens but the checkpoint at model.load only "
                         f"{spec.vocab_size}; use the tokenizer of that checkpoint")
    have = dict(image_token_id=spec.image_token_id, vision_start_token_id=spec.vision_start_token_id)
    if have != ids:
        raise ValueError(f"data.tokenizer's vision token ids {ids} differ from the checkpoint's {have} at "
                         "model.load; use the tokenizer of that checkpoint")
    return spec


def build_model(cfg: Config, tokenizer, trainable: bool = True):
    from megatron_papo.models import build_vlm

    m = cfg.model
    model = build_vlm(model_spec(cfg, tokenizer), transformer_impl=m.transformer_impl, fp8=m.fp8,
                      fp8_recipe=m.fp8_recipe, params_dtype=_DTYPES[m.params_dtype],
                      freeze_vision=m.freeze_vision, recompute=m.recompute,
                      sequence_parallel=model_sequence_parallel(cfg, trainable))
    ban_tokens(model, vision_token_ids(tokenizer))        # the policy never emits vision special tokens
    if m.load:
        from megatron_papo.convert.checkpoint import load_vlm_checkpoint

        load_vlm_checkpoint(model, m.load)
    if not trainable:
        model.requires_grad_(False)
        model.eval()
    return model


@dataclass
class Run:
    ctx: RLContext
    reader: object
    logger: RunLogger
    start_step: int = 0
    # warm-start steps already done (from the checkpoint resumed from)
    warmup_done: int = 0
    # the run changed weights since its last save
    dirty: bool = False
    # consecutive RL steps whose optimizer steps were all skipped (non-finite gradients)
    skipped_in_a_row: int = 0
    handler: Optional[PreemptionHandler] = None


def optimizer_steps(cfg: Config) -> int:
    t = cfg.training
    return t.rl_steps * (t.prompts_per_step // t.prompts_per_update) * t.ppo_epochs + t.warmup_sft_steps


def build_run(cfg: Config) -> Run:
    from megatron_papo.rollout import MegatronEngine

    masked_in_update(cfg)                                   # option errors before any process group starts
    init_distributed()
    p = cfg.parallel
    init_model_parallel(p.tensor_model_parallel_size, p.pipeline_model_parallel_size, cfg.training.seed)
    tokenizer, processor, reader = build_data(cfg)
    policy = build_model(cfg, tokenizer)
    reference = None
    if cfg.algorithm.beta > 0:
        reference = build_model(cfg, tokenizer, trainable=False)
        reference.load_state_dict(policy.state_dict())
    ddp = wrap_ddp(policy, cfg.optimizer)
    optimizer, scheduler = build_optimizer(cfg.optimizer, [ddp], optimizer_steps(cfg), _DTYPES[cfg.model.params_dtype])
    engine = MegatronEngine(policy, max_seq_len=cfg.data.max_prompt_length + cfg.rollout.max_new_tokens,
                            tokenizer=tokenizer, max_rows=cfg.rollout.max_batch_rows,
                            lean_decode=cfg.rollout.lean_decode)
    ctx = RLContext(greedy_as_top1(cfg), ddp, reference, optimizer, scheduler, engine, tokenizer, processor)
    logger = RunLogger(cfg.logging.tensorboard_dir, cfg.logging.log_interval, cfg.logging.progress)
    return Run(ctx, reader, logger)


def greedy_as_top1(cfg: Config) -> Config:
    """``rollout.temperature=0`` is greedy decoding: argmax tokens (top-k 1), log-probs scored at temperature 1."""
    if cfg.rollout.temperature != 0:
        return cfg
    return replace_cfg(cfg, rollout={"temperature": 1.0, "top_k": 1})


class NonFiniteTraining(ValueError):
    """Too many consecutive RL steps whose optimizer steps were all skipped for non-finite gradients."""


def _check_skipped(run: Run, metrics: dict, step: int) -> None:
    limit = run.ctx.cfg.training.max_skipped_steps
    run.skipped_in_a_row = run.skipped_in_a_row + 1 if metrics.get("actor/skipped", 0) > 0 else 0
    if limit and run.skipped_in_a_row >= limit:
        raise NonFiniteTraining(
            f"RL steps {step - limit + 1}..{step}: every optimizer step was skipped for non-finite gradients "
            f"(training.max_skipped_steps={limit}); stopping without saving, the last checkpoint in "
            f"{run.ctx.cfg.checkpoint.dir} is kept; lower optimizer.lr or check the data and rewards")


def _extra(ctx: RLContext) -> dict:
    return {"reference": ctx.reference} if ctx.reference is not None else {}


def save(run: Run, step: int) -> str:
    cfg, ctx = run.ctx.cfg, run.ctx
    with (run.handler.saving() if run.handler is not None else _nothing()):
        path = save_checkpoint(cfg.checkpoint.dir, step, [ctx.policy], ctx.optimizer, ctx.scheduler,
                               reader_state=run.reader.state_dict(), config=to_dict(cfg),
                               keep_last=cfg.checkpoint.keep_last, extra_modules=_extra(ctx),
                               describe=lambda d: describe_checkpoint(d, cfg, ctx.policy),
                               progress={"warmup_sft_done": run.warmup_done}, checksums=cfg.checkpoint.checksums)
    run.dirty = False
    return str(path)


@contextmanager
def _nothing():
    yield


def describe_checkpoint(out_dir, cfg: Config, policy) -> None:
    """The model description (and the Hugging Face config it came from) plus the tokenizer files, next to the
    weights: tools/convert_checkpoint.py mcore-to-hf then exports a training checkpoint directly."""
    from megatron_papo.convert import read_checkpoint_meta, write_checkpoint_meta
    from megatron_papo.convert.checkpoint import copy_side_files

    hf_config = read_checkpoint_meta(cfg.model.load)[2] if cfg.model.load else None
    write_checkpoint_meta(str(out_dir), getattr(policy, "module", policy).spec, _DTYPES[cfg.model.params_dtype],
                          hf_config=hf_config)
    if cfg.data.tokenizer.type == "huggingface" and cfg.data.tokenizer.path:
        copy_side_files(cfg.data.tokenizer.path, str(out_dir))


def _dp_mean(metrics: dict) -> dict:
    """Average the rollout/reward metrics over data-parallel ranks (each rank saw its own prompts)."""
    keys = sorted(k for k in metrics if k.startswith(("reward/", "rollout/")))
    if not keys or parallel_state.get_data_parallel_world_size() == 1:
        return metrics
    t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t, group=parallel_state.get_data_parallel_group(with_context_parallel=False))
    return {**metrics, **dict(zip(keys, (t / parallel_state.get_data_parallel_world_size()).tolist()))}


def skip_totals(run: Run) -> dict:
    """Samples skipped so far by reason, summed over data-parallel ranks (as ``data/skipped/<reason>``), and their
    total ``data/skipped``; one collective."""
    from megatron_papo.data.shards import KNOWN_SKIP_REASONS

    stats = run.reader.stats
    reasons = sorted(set(KNOWN_SKIP_REASONS) | set(stats))[:64]
    t = torch.tensor([float(stats.get(r, 0)) for r in reasons], dtype=torch.float64)
    if parallel_state.get_data_parallel_world_size() > 1:
        dist.all_reduce(t, group=parallel_state.get_data_parallel_group(with_context_parallel=False))
    out = {f"data/skipped/{r}": v for r, v in zip(reasons, t.tolist()) if v}
    out["data/skipped"] = float(t.sum())
    return out


def _warm_start_phase(run: Run, reader_iter) -> None:
    """The supervised warm-start steps not yet done; a signal stops it after the current step."""
    ctx, cfg, log = run.ctx, run.ctx.cfg, run.logger
    total = cfg.training.warmup_sft_steps
    if run.start_step > 0 or run.warmup_done >= total:
        return
    log.info(f"warm-start: {total} supervised steps on the data's worked answers (training.warmup_sft_steps)"
             + (f", resuming after {run.warmup_done}" if run.warmup_done else "") + ", then RL")

    def after_step(done: int) -> None:
        run.warmup_done, run.dirty = done, True
        run.handler.check()

    warm_start(ctx, reader_iter, total, log, start=run.warmup_done, after_step=after_step)
    if ctx.reference is not None:
        ctx.reference.load_state_dict(ctx.policy.module.state_dict())


def _abandon_step(run: Run, snapshot) -> None:
    """Undo what an interrupted RL step consumed (reader position, RNG draws); no weight has changed."""
    from megatron_papo.platform import set_rng_state

    run.reader.load_state_dict(snapshot[0])
    set_rng_state(snapshot[1])


def _rl_phase(run: Run, reader_iter, result: dict) -> None:
    from megatron_papo.platform import rng_state
    from megatron_papo.rewards.budget import timed_out_total

    ctx, cfg, log = run.ctx, run.ctx.cfg, run.logger
    validator = Validator.build(cfg) if validates(cfg) else None
    for step in range(run.start_step + 1, cfg.training.rl_steps + 1):
        snapshot, timed_out = (run.reader.state_dict(), rng_state()), timed_out_total()
        try:
            metrics = _dp_mean(rl_step(ctx, reader_iter, step))
        except Preempted:
            _abandon_step(run, snapshot)
            raise
        metrics.update(skip_totals(run))
        metrics["rewards/timed_out"] = float(timed_out_total() - timed_out)   # this rank's, in this step
        result["rewards"].append(metrics["reward/mean"])
        result["skipped"] = {k: v for k, v in metrics.items() if k.startswith("data/skipped")}
        result["steps"], run.dirty = step, True
        log.log_step(step, cfg.training.rl_steps, metrics)
        if validator is not None:
            result["validation"] = validator.maybe_run(ctx, step, log) or result.get("validation")
        _check_skipped(run, metrics, step)
        if cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0:
            result["checkpoint"] = save(run, step)
        run.handler.check()
    if validator is not None and result["steps"] > run.start_step:     # a break in the last update shows only here
        result["validation"] = validator.finish(ctx, result["steps"], log) or result.get("validation")


def train_loop(run: Run) -> dict:
    """Warm-start (what is left of it), then RL steps until ``training.rl_steps`` or a signal; every change of
    weights is saved before returning (``result["signal"]``: the signal that stopped the run, 0: none)."""
    log = run.logger
    run.handler = run.handler or PreemptionHandler()
    result = {"rewards": [], "checkpoint": None, "steps": run.start_step, "signal": 0}
    try:
        run.handler.check()                                    # a signal while the run was being built
        reader_iter = iter(run.reader)
        _warm_start_phase(run, reader_iter)
        _rl_phase(run, reader_iter, result)
    except Preempted as p:
        result["signal"] = p.signum
    if run.dirty:
        result["checkpoint"] = save(run, result["steps"])
    if result["signal"]:
        log.info(f"{signal_name(result['signal'])} received: saved {result['checkpoint'] or 'nothing (no new '}"
                 f"{'' if result['checkpoint'] else 'progress since the last checkpoint)'}; exiting")
    return result


def summarize(run: Run, result: dict) -> Optional[str]:
    """The closing lines; the last one is ``mean reward <start> -> <end>`` (first and last steps, up to 3 each),
    after the image reliance of the policy at the last validation (when validating)."""
    r = result["rewards"]
    if not r:
        run.logger.info("no RL steps were run (training.rl_steps already reached)")
        return None
    k = max(1, min(3, len(r) // 3))
    start, end = sum(r[:k]) / k, sum(r[-k:]) / k
    cfg = run.ctx.cfg
    skipped = {k.rsplit("/", 1)[-1]: int(v) for k, v in result.get("skipped", {}).items() if k.count("/") == 2}
    if skipped:
        run.logger.info("skipped samples: " + ", ".join(f"{k}={n}" for k, n in sorted(skipped.items()))
                        + " (tools/inspect_shards.py names them)")
    run.logger.info(f"tensorboard logs: {run.logger.run_dir}")
    run.logger.info(f"checkpoint: {result['checkpoint']}")
    v = result.get("validation")
    if v:
        run.logger.info(f"image reliance of the policy at the last validation ({cfg.data.val_shards}): accuracy "
                        f"real {v['val/avg@k']:.3f} / masked {v['val/avg@k_masked']:.3f} / black "
                        f"{v['val/avg@k_blank']:.3f}")
    line = f"mean reward {start:.3f} -> {end:.3f}"
    run.logger.info(line)
    return line


def run_training(cfg: Config) -> dict:
    """Build, resume, train, summarise; signals are handled from the start to the end (see preemption.py)."""
    from megatron_papo.platform.children import child_hygiene

    handler = PreemptionHandler()
    with handler, child_hygiene():
        set_current(handler)
        try:
            run = build_run(cfg)
            run.handler = handler
            _announce(run)
            resume(run)
            result = train_loop(run)
        finally:
            set_current(None)
        result["summary"] = summarize(run, result)
        run.logger.close()
    return result


def _announce(run: Run) -> None:
    cfg = run.ctx.cfg
    if run.logger.active:
        plan = view_plan(cfg.algorithm)
        print(f"algorithm {cfg.algorithm.preset}: gamma={cfg.algorithm.gamma} beta={cfg.algorithm.beta} "
              f"dynamic_sampling={cfg.algorithm.dynamic_sampling} views={','.join(plan.generated) or '-'} "
              f"consumers={','.join(active_consumers(cfg.algorithm)) or '-'}; layout "
              f"TP={cfg.parallel.tensor_model_parallel_size} PP={cfg.parallel.pipeline_model_parallel_size} "
              f"DP={run.ctx.dp_size}", flush=True)
        if cfg.optimizer.use_distributed_optimizer and not distributed_optimizer_enabled(cfg.optimizer):
            print("optimizer: megatron's plain optimizer (optimizer.use_distributed_optimizer needs a GPU; "
                  "optimizer state is replicated across data-parallel ranks here)", flush=True)


def replace_cfg(cfg: Config, **sections) -> Config:
    """A copy of ``cfg`` with some fields of some sections replaced: ``replace_cfg(cfg, training={...})``."""
    return dataclasses.replace(cfg, **{k: dataclasses.replace(getattr(cfg, k), **v) for k, v in sections.items()})

"""The composition root, in order: processes and parallel layout -> tokenizer and data -> policy (and frozen
reference) -> DDP + optimizer -> rollout engine -> resume -> warm-start -> RL loop with logging, checkpoints and
pre-emption -> summary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_papo.config import Config, to_dict
from megatron_papo.evaluation.validation import Validator
from megatron_papo.platform import init_distributed, init_model_parallel
from megatron_papo.training.banned_tokens import ban_tokens, vision_token_ids
from megatron_papo.training.checkpoint import (PreemptionHandler, checkpoint_path, find_resume, load_checkpoint,
                                               save_checkpoint)
from megatron_papo.training.logging import RunLogger
from megatron_papo.training.optimizer import build_optimizer, distributed_optimizer_enabled, wrap_ddp
from megatron_papo.training.rl_step import RLContext, masked_in_update, rl_step
from megatron_papo.training.sft import warm_start

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build_data(cfg: Config):
    """(tokenizer, image processor, reader) for this DP rank; synthetic shards are made first if asked."""
    from megatron_papo.data import (PromptEncoder, Qwen2VLImageProcessor, ShardReader, build_tokenizer,
                                    ensure_synthetic_shards, resolve_shards)

    d = cfg.data
    if d.synthetic_if_missing:
        if not dist.is_initialized() or dist.get_rank() == 0:
            ensure_synthetic_shards(d.train_shards, d.synthetic_samples, cfg.training.seed)
            if validates(cfg):                   # held out: another seed than the training questions
                ensure_synthetic_shards(d.val_shards, cfg.training.eval_limit or 64, cfg.training.seed + 1)
        if dist.is_initialized():
            dist.barrier()
    resolve_shards(d.train_shards)
    tokenizer = build_tokenizer(d.tokenizer)
    processor = Qwen2VLImageProcessor(min_pixels=d.min_pixels, max_pixels=d.max_pixels)
    reader = ShardReader(d.train_shards, parallel_state.get_data_parallel_rank(),
                         parallel_state.get_data_parallel_world_size(), cfg.training.seed, d.shuffle_buffer,
                         d.num_workers, transform=PromptEncoder(tokenizer, processor, d.max_prompt_length))
    return tokenizer, processor, reader


def validates(cfg: Config) -> bool:
    """In-training validation will run at least once (``training.eval_interval`` within ``training.rl_steps``)."""
    return 0 < cfg.training.eval_interval <= cfg.training.rl_steps


def model_spec(cfg: Config, tokenizer):
    """The architecture to build. Without ``model.load``: the preset with the tokenizer's vocabulary and vision ids.
    With it: the checkpoint's own architecture (its shapes must load; a Hugging Face tokenizer's ``len`` is smaller
    than the checkpoint's padded vocabulary), checked against the preset and the tokenizer."""
    import dataclasses

    from megatron_papo.models import get_preset

    m = cfg.model
    preset = get_preset(m.preset)
    ids = dict(image_token_id=tokenizer.image_token_id, vision_start_token_id=tokenizer.vision_start_id)
    if not m.load:
        return dataclasses.replace(preset, vocab_size=tokenizer.vocab_size, **ids)
    from megatron_papo.convert import read_checkpoint_meta

    spec, _, _ = read_checkpoint_meta(m.load)
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
                      freeze_vision=m.freeze_vision, recompute=m.recompute)
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
    resumed: bool = False         # restored from checkpoint.resume (a step_0 checkpoint too: no second warm-start)


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
                            tokenizer=tokenizer)
    ctx = RLContext(cfg, ddp, reference, optimizer, scheduler, engine, tokenizer, processor)
    logger = RunLogger(cfg.logging.tensorboard_dir, cfg.logging.log_interval, cfg.logging.progress)
    return Run(ctx, reader, logger)


def _extra(ctx: RLContext) -> dict:
    return {"reference": ctx.reference} if ctx.reference is not None else {}


def resume(run: Run) -> None:
    cfg, ctx = run.ctx.cfg, run.ctx
    path = find_resume(cfg.checkpoint.resume, cfg.checkpoint.dir)
    if path is None:
        return
    info = load_checkpoint(path, [ctx.policy], ctx.optimizer, ctx.scheduler, extra_modules=_extra(ctx))
    if info["reader_state"] is not None:
        run.reader.load_state_dict(info["reader_state"])
    run.start_step, run.resumed = info["step"], True
    run.logger.info(f"resumed from {path} at RL step {run.start_step}")


def save(run: Run, step: int) -> str:
    cfg, ctx = run.ctx.cfg, run.ctx
    path = save_checkpoint(cfg.checkpoint.dir, step, [ctx.policy], ctx.optimizer, ctx.scheduler,
                           reader_state=run.reader.state_dict(), config=to_dict(cfg),
                           keep_last=cfg.checkpoint.keep_last, extra_modules=_extra(ctx),
                           describe=lambda d: describe_checkpoint(d, cfg, ctx.policy))
    return str(path)


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


def train_loop(run: Run) -> dict:
    """Warm-start (fresh runs), then RL steps until ``training.rl_steps`` or a pre-emption signal.

    A warm-start with ``training.rl_steps=0`` saves ``step_0``: the shared starting point that other runs load with
    ``model.load`` (weights only: their step counter, optimizer and data position start afresh)."""
    ctx, cfg, log = run.ctx, run.ctx.cfg, run.logger
    reader_iter = iter(run.reader)
    warmed = not run.resumed and cfg.training.warmup_sft_steps > 0
    if warmed:
        log.info(f"warm-start: {cfg.training.warmup_sft_steps} supervised steps on the data's worked answers "
                 "(training.warmup_sft_steps), then RL")
        warm_start(ctx, reader_iter, cfg.training.warmup_sft_steps, log)
        if ctx.reference is not None:
            ctx.reference.load_state_dict(ctx.policy.module.state_dict())
    handler = PreemptionHandler().install()
    validator = Validator.build(cfg) if validates(cfg) else None
    rewards, last_saved, step, validated = [], None, run.start_step, None
    try:
        for step in range(run.start_step + 1, cfg.training.rl_steps + 1):
            metrics = _dp_mean(rl_step(ctx, reader_iter, step))
            rewards.append(metrics["reward/mean"])
            log.log_step(step, cfg.training.rl_steps, metrics)
            if validator is not None:
                validated = validator.maybe_run(ctx, step, log) or validated
            stop = handler.should_stop()
            if stop or (cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0):
                last_saved = save(run, step)
            if stop:
                log.info(f"signal {handler.received or 'on another rank'} received: saved {last_saved}, exiting")
                break
    finally:
        handler.uninstall()
    if (step > run.start_step or warmed) and last_saved != str(checkpoint_path(cfg.checkpoint.dir, step)):
        last_saved = save(run, step)
    return {"rewards": rewards, "checkpoint": last_saved, "steps": step, "validation": validated}


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
    run.logger.info(f"tensorboard logs: {cfg.logging.tensorboard_dir}")
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
    run = build_run(cfg)
    if run.logger.active:
        print(f"algorithm {cfg.algorithm.preset}: gamma={cfg.algorithm.gamma} beta={cfg.algorithm.beta} "
              f"dynamic_sampling={cfg.algorithm.dynamic_sampling}; layout TP={cfg.parallel.tensor_model_parallel_size}"
              f" PP={cfg.parallel.pipeline_model_parallel_size} DP={run.ctx.dp_size}", flush=True)
        if cfg.optimizer.use_distributed_optimizer and not distributed_optimizer_enabled(cfg.optimizer):
            print("optimizer: megatron's plain optimizer (optimizer.use_distributed_optimizer needs a GPU; "
                  "optimizer state is replicated across data-parallel ranks here)", flush=True)
    resume(run)
    result = train_loop(run)
    result["summary"] = summarize(run, result)
    run.logger.close()
    return result


def replace_cfg(cfg: Config, **sections) -> Config:
    """A copy of ``cfg`` with some fields of some sections replaced: ``replace_cfg(cfg, training={...})``."""
    return dataclasses.replace(cfg, **{k: dataclasses.replace(getattr(cfg, k), **v) for k, v in sections.items()})

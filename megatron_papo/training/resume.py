"""Resuming a run: choose a complete checkpoint, keep one lineage, and say what a changed config does.

- ``checkpoint.resume=auto`` takes the newest checkpoint that passes ``verify_checkpoint`` (sizes, and the CRC32
  of every file with ``checkpoint.checksums``); newer broken ones are named in one line each. One that then fails to
  load (a damaged file the manifest cannot tell, or one without checksums) is passed over too: one warning line
  naming the directory and the error, on the console and in tensorboard, and the next older one is tried; nothing
  is deleted. If checkpoints existed but none loaded, the run stops (a failed load may have overwritten part of
  the model, so starting afresh silently would be wrong). An explicit directory must be complete and load: its
  failure is an error, never a fallback.
- Checkpoints after the resumed step (a roll-back), or any checkpoint when a fresh run starts in a used directory,
  are moved to ``<checkpoint.dir>/abandoned/...`` (one line); nothing is deleted.
- A changed ``optimizer.lr`` / warm-up / schedule: with ``checkpoint.override_lr_schedule`` (default) the config's
  schedule continues from the checkpoint's step count, else the checkpoint's is kept; one line says which.
- The reader position is reused when the data settings and the data-parallel size are unchanged; otherwise (shards
  added, other seed, DP changed) reading starts afresh from the seed, in one line (``checkpoint.load_reader_state``
  false: always afresh).
"""

from __future__ import annotations

import torch.distributed as dist

from megatron_papo.training.checkpoint import (CheckpointError, find_resume, load_checkpoint, resume_candidates,
                                               set_aside_later)

_LR_FIELDS = ("lr", "warmup_steps", "schedule")


def resume(run) -> None:
    """Load the checkpoint ``checkpoint.resume`` names into ``run`` (model, optimizer, scheduler, reader, step)."""
    cfg, log = run.ctx.cfg, run.logger
    if cfg.checkpoint.resume == "auto":
        path, info = _load_newest(run)
    else:
        path = find_resume(cfg.checkpoint.resume, cfg.checkpoint.dir, checksums=cfg.checkpoint.checksums)
        info = _load(run, path) if path is not None else None
    if path is not None:
        run.start_step = info["step"]
        run.warmup_done = int(info["progress"].get("warmup_sft_done", cfg.training.warmup_sft_steps
                                                    if run.start_step > 0 else 0))
        _lr_schedule(run, info)
        _reader_state(run, info)
        log.info(f"resumed from {path} at RL step {run.start_step}")
    _one_lineage(run, fresh=path is None)


def _load(run, path):
    ctx = run.ctx
    extra = {"reference": ctx.reference} if ctx.reference is not None else {}
    return load_checkpoint(path, [ctx.policy], ctx.optimizer, ctx.scheduler, extra_modules=extra)


def _load_newest(run):
    """(path, info) of the newest checkpoint that verifies and loads, (None, None) when there is none; every one
    passed over is named in one warning line (console and tensorboard)."""
    cfg, note = run.ctx.cfg, run.logger.note
    failed = []
    for path in resume_candidates(cfg.checkpoint.dir, warn=note, checksums=cfg.checkpoint.checksums):
        try:
            return path, _load(run, path)
        except CheckpointError as exc:            # raised on every rank alike (checkpoint._agreed)
            failed.append(path)
            note(f"checkpoint.resume=auto: {path} failed to load ({exc}); falling back to the next older complete "
                 "checkpoint (nothing is deleted)")
    if failed:
        raise CheckpointError(f"checkpoint.resume=auto: none of the checkpoints in {cfg.checkpoint.dir} could be "
                              f"loaded ({', '.join(p.name for p in failed)} failed, see the warnings above); fix or "
                              "remove them, name one with checkpoint.resume=<dir>, or set checkpoint.resume=null "
                              "to start afresh (they are then moved aside, not deleted)")
    return None, None


def _one_lineage(run, fresh: bool) -> None:
    moved = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        moved = set_aside_later(run.ctx.cfg.checkpoint.dir, run.start_step, fresh)
    if moved is not None:
        print(f"checkpoints after step {run.start_step} belong to another run: moved to {moved} (kept, never "
              f"resumed from automatically)", flush=True)
    if dist.is_initialized():
        dist.barrier()


def _lr_schedule(run, info: dict) -> None:
    cfg, log = run.ctx.cfg, run.logger
    saved = (info["config"] or {}).get("optimizer") or {}
    changed = {k: (saved[k], getattr(cfg.optimizer, k)) for k in _LR_FIELDS
               if k in saved and saved[k] != getattr(cfg.optimizer, k)}
    if not changed:
        return
    what = ", ".join(f"optimizer.{k} {a} -> {b}" for k, (a, b) in changed.items())
    if not cfg.checkpoint.override_lr_schedule:
        log.info(f"resume: keeping the checkpoint's learning-rate schedule although {what}; set "
                 "checkpoint.override_lr_schedule=true to use the config's")
        return
    sched = run.ctx.scheduler
    o = cfg.optimizer
    sched.max_lr, sched.init_lr = o.lr, (0.0 if o.warmup_steps else o.lr)
    sched.lr_warmup_steps, sched.lr_decay_style = o.warmup_steps, o.schedule
    for g in run.ctx.optimizer.param_groups:
        g.pop("max_lr", None)
    sched.step(increment=0)
    log.info(f"resume: the config's learning-rate schedule replaces the checkpoint's ({what}) from optimizer "
             f"step {sched.num_steps}; checkpoint.override_lr_schedule=false keeps the checkpoint's")


def _reader_state(run, info: dict) -> None:
    cfg, log = run.ctx.cfg, run.logger
    if not cfg.checkpoint.load_reader_state:
        log.info("resume: data order starts afresh from the seed (checkpoint.load_reader_state=false)")
        return
    state = info["reader_state"]
    if state is None:
        log.info(f"resume: data order starts afresh from the seed: the checkpoint was written with data-parallel "
                 f"size {info['layout'].get('dp')}, this run has {run.ctx.dp_size} (positions are per DP rank); "
                 "samples seen before may come again")
        return
    try:
        run.reader.load_state_dict(state)
    except ValueError:
        log.info("resume: data order starts afresh from the seed: the data settings changed since the checkpoint "
                 "(shards, seed, shuffle_buffer or num_workers); samples seen before may come again")

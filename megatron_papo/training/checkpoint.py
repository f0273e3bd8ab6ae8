"""Checkpoints with megatron dist checkpointing: atomic, resharding-friendly, resumable exactly.

A checkpoint ``<dir>/step_<N>/`` holds the model's sharded state dict, megatron's optimizer state (sharded), the
LR scheduler, every rank's RNG states, every data-parallel rank's reader position, the step and the resolved
config. It is written into ``step_<N>.tmp`` and renamed only once every rank has finished writing, so a crash
mid-save leaves the previous checkpoint as the newest complete one (``resume: auto`` ignores ``*.tmp``).
Before the rename rank 0 writes ``complete.json``, the size and CRC32 of every file (``checkpoint_manifest.py``);
``resume: auto`` takes the newest checkpoint that passes :func:`verify_checkpoint` (checksums included) and names
what is wrong with any newer one it passes over; one that then fails to load is passed over the same way
(``resume.py``). A read error on any rank is raised on every rank (no rank is left waiting in a collective).

Lineages: a run that starts at step S while ``checkpoint.dir`` holds checkpoints after S (a roll-back, or a fresh
run in a used directory) moves those aside into ``abandoned/<time>-after-step_S/`` (see :func:`set_aside_later`),
so ``keep_last`` and ``resume: auto`` only ever see one lineage; nothing is deleted.

A save that runs out of disk space removes its own partial ``.tmp`` directory and fails with one line naming the
directory and the bytes needed; the previous checkpoints are untouched. Signals: see ``preemption.py``.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from torch.distributed.checkpoint.api import CheckpointException   # a BaseException: caught by name

_ERRORS = (Exception, CheckpointException)

from megatron_papo.platform import device, rng_state, set_rng_state
from megatron_papo.training.checkpoint_manifest import (MANIFEST, gather_objects,  # noqa: F401  (re-exported)
                                                        shared_checksums, verify_agreed, verify_checkpoint,
                                                        write_manifest)
from megatron_papo.training.preemption import PreemptionHandler  # noqa: F401  (re-exported, older import path)

log = logging.getLogger(__name__)
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read; the message names the directory or file and the fix."""


def checkpoint_path(ckpt_dir: str | Path, step: int) -> Path:
    return Path(ckpt_dir) / f"step_{step}"


def list_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``ckpt_dir`` as (step, path), oldest first."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def find_resume(resume: Optional[str], ckpt_dir: str | Path, warn=None, checksums: bool = False) -> Optional[Path]:
    """The checkpoint to resume from: None (fresh), ``auto`` (newest *complete* one in ckpt_dir, if any; each newer
    incomplete one is named through ``warn``), or a path (which must be complete). ``checksums``: also check every
    file's CRC32 (collective: every rank must call it)."""
    if resume is None:
        return None
    if resume == "auto":
        return next(resume_candidates(ckpt_dir, warn, checksums), None)
    path = Path(resume)
    problem = verify_agreed(path, checksums)
    if problem is not None:
        raise CheckpointError(f"checkpoint.resume: {resume!r} is not a usable checkpoint: {problem}; pass a "
                              "complete step_<N> directory, 'auto', or null")
    return path


def resume_candidates(ckpt_dir: str | Path, warn=None, checksums: bool = False) -> Iterator[Path]:
    """Complete checkpoints of ``ckpt_dir``, newest first; each one passed over is named through ``warn`` with
    what is wrong. Collective (every rank gets the same sequence)."""
    warn = warn or log.warning
    for _, path in reversed(list_checkpoints(ckpt_dir)):
        problem = verify_agreed(path, checksums)
        if problem is None:
            yield path
        else:
            warn(f"checkpoint.resume=auto: passing over {path}: {problem}")


def set_aside_later(ckpt_dir: str | Path, start_step: int, fresh: bool) -> Optional[Path]:
    """Move checkpoints of another lineage (steps after ``start_step``; every one for a ``fresh`` run) into
    ``<ckpt_dir>/abandoned/<time>-after-step_<S>/``; returns that directory (None: nothing moved). Rank 0 only."""
    later = [p for s, p in list_checkpoints(ckpt_dir) if fresh or s > start_step]
    if not later:
        return None
    dest = Path(ckpt_dir) / "abandoned" / f"{time.strftime('%Y%m%d-%H%M%S')}-after-step_{start_step}"
    dest.mkdir(parents=True, exist_ok=True)
    for p in later:
        os.replace(p, dest / p.name)
    return dest


def _layout() -> dict:
    return dict(tp=parallel_state.get_tensor_model_parallel_world_size(),
                pp=parallel_state.get_pipeline_model_parallel_world_size(),
                dp=parallel_state.get_data_parallel_world_size())


def _per_rank_objects(reader_state, layout: dict, with_rng: bool = True) -> dict:
    """RNG states of this rank (same layout only) and the reader position of this DP rank, as sharded objects."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    dp_rank = parallel_state.get_data_parallel_rank()
    shape = (layout["pp"], layout["tp"], layout["dp"])
    out = {}
    if with_rng:
        out["rng_state"] = ShardedObject("rng_state", rng_state(), shape, (pp_rank, tp_rank, dp_rank), replica_id=0)
    # one reader per DP rank; its TP/PP peers hold copies of the same position
    replica = 0 if (tp_rank == 0 and pp_rank == 0) else 1
    out["data_reader"] = ShardedObject("data_reader", reader_state, (layout["dp"],), (dp_rank,), replica_id=replica)
    return out


def _unwrap(chunk):
    """The model inside a DDP wrapper: parameter names must not carry the wrapper's ``module.`` prefix."""
    return getattr(chunk, "module", chunk)


def _state_dict(model_chunks, optimizer, scheduler, *, step, reader_state, config, is_loading, with_objects=True,
                extra_modules=None, with_rng=True, progress=None):
    sd: dict = {}
    for name, module in (extra_modules or {}).items():   # e.g. the frozen reference model, under its own keys
        sd[f"extra_{name}"] = _unwrap(module).sharded_state_dict(prefix=f"{name}.")
    for i, chunk in enumerate(model_chunks):
        sd["model" if len(model_chunks) == 1 else f"model{i}"] = _unwrap(chunk).sharded_state_dict()
    if optimizer is not None:
        model_sd = {k: v for k, v in sd.items() if k.startswith("model")}
        sd["optimizer"] = optimizer.sharded_state_dict(
            model_sd["model"] if len(model_chunks) == 1 else model_sd, is_loading=is_loading)
    if scheduler is not None:
        sd["scheduler"] = scheduler.state_dict()
    layout = _layout()
    sd.update(step=step, config=config, layout=layout, progress=progress or {})
    if with_objects:
        sd.update(_per_rank_objects(reader_state, layout, with_rng))
    return sd


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _rename(src: Path, dst: Path) -> None:
    os.replace(src, dst)


def save_checkpoint(ckpt_dir: str | Path, step: int, model_chunks: list, optimizer=None, scheduler=None,
                    reader_state=None, config: Optional[dict] = None, keep_last: int = 0,
                    extra_modules: Optional[dict] = None, describe: Optional[Callable[[Path], None]] = None,
                    progress: Optional[dict] = None, checksums: bool = True) -> Path:
    """Write ``<ckpt_dir>/step_<step>`` atomically on every rank; keep the newest ``keep_last`` (0: all).

    ``describe(dir)`` runs on rank 0 before the rename, to add files that travel with the weights (the model
    description and tokenizer files that make the checkpoint usable by mcore-to-hf, generate and evaluate).
    ``progress`` (a small dict, e.g. warm-start steps done) is stored with the step. ``checksums``: record every
    file's CRC32 in ``complete.json`` (computed in parallel, each rank reading its share)."""
    final = checkpoint_path(ckpt_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)                 # a leftover of a crashed save of the same step
    _agree_free_space(ckpt_dir, rank0)
    if rank0:
        tmp.mkdir(parents=True)
    _barrier()
    sd = _state_dict(model_chunks, optimizer, scheduler, step=step, reader_state=reader_state,
                     config=config or {}, is_loading=False, extra_modules=extra_modules, progress=progress)
    try:
        dist_checkpointing.save(sd, str(tmp))
    except _ERRORS as exc:
        if _is_disk_full(exc):
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(_disk_full_message(ckpt_dir, f"step_{step}", sd)) from None
        raise
    _barrier()                                                 # every rank's shards are on disk
    crcs = shared_checksums(tmp) if checksums else None
    if rank0:
        if describe is not None:
            describe(tmp)
        write_manifest(tmp, crcs)
        if final.exists():
            shutil.rmtree(final)
        _rename(tmp, final)
        if keep_last > 0:
            older = [p for s, p in list_checkpoints(ckpt_dir) if s < step]   # never what this save just wrote
            for old in older[:max(0, len(older) - (keep_last - 1))]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _needed_bytes(ckpt_dir, sd: Optional[dict] = None) -> Optional[int]:
    """The size of the newest complete checkpoint, else the tensors of ``sd`` on this rank times the world size."""
    for _, path in reversed(list_checkpoints(ckpt_dir)):
        if verify_checkpoint(path) is None:
            return _dir_bytes(path)
    if sd is None:
        return None
    world = dist.get_world_size() if dist.is_initialized() else 1
    return _tensor_bytes(sd) * world


def _tensor_bytes(tree) -> int:
    if isinstance(tree, dict):
        return sum(_tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_tensor_bytes(v) for v in tree)
    data = getattr(tree, "data", tree)
    return data.numel() * data.element_size() if torch.is_tensor(data) else 0


def _disk_full_message(ckpt_dir, what: str, sd: Optional[dict] = None) -> str:
    need = _needed_bytes(ckpt_dir, sd)
    free = shutil.disk_usage(Path(ckpt_dir)).free if Path(ckpt_dir).exists() else 0
    need_txt = f"about {need:,} bytes needed" if need else "more space needed"
    return (f"checkpoint.dir {str(ckpt_dir)!r}: disk full while saving {what}: {need_txt}, {free:,} free; "
            "the previous checkpoints are intact; free space or lower checkpoint.keep_last")


def _agree_free_space(ckpt_dir, rank0: bool) -> None:
    """Refuse to start a save that cannot fit (rank 0 measures, every rank raises together)."""
    need = _needed_bytes(ckpt_dir) if rank0 else None
    short = float(bool(need) and shutil.disk_usage(Path(ckpt_dir)).free < need)
    if dist.is_initialized():
        flag = torch.tensor([short], device=device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        short = flag.item()
    if short:
        raise CheckpointError(_disk_full_message(ckpt_dir, "the next checkpoint"))


def _is_disk_full(exc: BaseException) -> bool:
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(exc):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def load_checkpoint(path: str | Path, model_chunks: list, optimizer=None, scheduler=None,
                    extra_modules: Optional[dict] = None) -> dict:
    """Restore model, optimizer, scheduler, RNG states (same TP x PP x DP only) and the reader positions (same DP).

    Returns ``{"step", "config", "reader_state", "layout", "progress"}``; ``reader_state`` is None when the
    checkpoint was written with another data-parallel size. A file that cannot be read is named in a
    :class:`CheckpointError`.
    """
    path = Path(path)
    common = _agreed(lambda: dist_checkpointing.load_common_state_dict(str(path)), path)
    layout = _layout()
    same_layout = common.get("layout") == layout
    same_dp = (common.get("layout") or {}).get("dp") == layout["dp"]
    sd = _state_dict(model_chunks, optimizer, scheduler, step=0, reader_state=None, config={},
                     is_loading=True, with_objects=same_dp, extra_modules=extra_modules, with_rng=same_layout)
    loaded = _agreed(lambda: dist_checkpointing.load(sd, str(path)), path)
    _restore(loaded, model_chunks, optimizer, scheduler, extra_modules)
    if same_layout:
        set_rng_state(loaded["rng_state"])
    return {"step": int(loaded["step"]), "config": loaded["config"], "layout": loaded["layout"],
            "reader_state": loaded["data_reader"] if same_dp else None, "progress": common.get("progress") or {}}


def _restore(loaded: dict, model_chunks, optimizer, scheduler, extra_modules) -> None:
    for i, chunk in enumerate(model_chunks):
        _unwrap(chunk).load_state_dict(loaded["model" if len(model_chunks) == 1 else f"model{i}"])
    for name, module in (extra_modules or {}).items():
        _unwrap(module).load_state_dict({k[len(name) + 1:]: v for k, v in loaded[f"extra_{name}"].items()})
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(loaded["scheduler"])


def _agreed(read: Callable, path: Path):
    """``read()`` on every rank; if it failed on any rank, every rank raises the same :class:`CheckpointError`
    (naming the file when the manifest can tell), so a read error on one rank cannot leave the others waiting in
    the next collective."""
    try:
        result, error = read(), None
    except _ERRORS as exc:
        result, error = None, _first_line(exc)
    errors = [e for e in gather_objects(error) if e is not None]
    if errors:
        raise CheckpointError(f"checkpoint {path}: cannot be read ({errors[0]}){_bad_file(path)}; resume from "
                              "another step_<N>") from None
    return result


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def _bad_file(path: Path) -> str:
    problem = verify_agreed(path, checksums=True)           # collective: called by every rank of a failed load
    return f"; {problem}" if problem else ""

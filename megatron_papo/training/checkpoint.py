"""Checkpoints with megatron dist checkpointing: atomic, resharding-friendly, resumable exactly.

A checkpoint ``<dir>/step_<N>/`` holds the model's sharded state dict, megatron's optimizer state (sharded), the
LR scheduler, every rank's RNG states, every data-parallel rank's reader position, the step and the resolved
config. It is written into ``step_<N>.tmp`` and renamed only once every rank has finished writing, so a crash
mid-save leaves the previous checkpoint as the newest complete one (``resume: auto`` ignores ``*.tmp``).

SIGTERM / SIGUSR1 (SLURM sends one before pre-empting a job) only set a flag; the training loop asks
:meth:`PreemptionHandler.should_stop` once per step (all ranks agree through one collective), saves, and exits.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_papo.platform import device, rng_state, set_rng_state

_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_path(ckpt_dir: str | Path, step: int) -> Path:
    return Path(ckpt_dir) / f"step_{step}"


def list_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``ckpt_dir`` as (step, path), oldest first."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def find_resume(resume: Optional[str], ckpt_dir: str | Path) -> Optional[Path]:
    """The checkpoint to resume from: None (fresh), ``auto`` (newest complete one in ckpt_dir, if any), a path."""
    if resume is None:
        return None
    if resume == "auto":
        found = list_checkpoints(ckpt_dir)
        return found[-1][1] if found else None
    path = Path(resume)
    if not (path / "metadata.json").is_file():
        raise ValueError(f"checkpoint.resume: {resume!r} is not a complete checkpoint directory (no metadata.json); "
                         "pass a step_<N> directory, 'auto', or null")
    return path


def _layout() -> dict:
    return dict(tp=parallel_state.get_tensor_model_parallel_world_size(),
                pp=parallel_state.get_pipeline_model_parallel_world_size(),
                dp=parallel_state.get_data_parallel_world_size())


def _per_rank_objects(reader_state, layout: dict) -> dict:
    """RNG states of this rank and the reader position of this DP rank, as sharded objects."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    dp_rank = parallel_state.get_data_parallel_rank()
    shape = (layout["pp"], layout["tp"], layout["dp"])
    out = {"rng_state": ShardedObject("rng_state", rng_state(), shape, (pp_rank, tp_rank, dp_rank), replica_id=0)}
    # one reader per DP rank; its TP/PP peers hold copies of the same position
    replica = 0 if (tp_rank == 0 and pp_rank == 0) else 1
    out["data_reader"] = ShardedObject("data_reader", reader_state, (layout["dp"],), (dp_rank,), replica_id=replica)
    return out


def _unwrap(chunk):
    """The model inside a DDP wrapper: parameter names must not carry the wrapper's ``module.`` prefix."""
    return getattr(chunk, "module", chunk)


def _state_dict(model_chunks, optimizer, scheduler, *, step, reader_state, config, is_loading, with_objects=True,
                extra_modules=None):
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
    sd.update(step=step, config=config, layout=layout)
    if with_objects:
        sd.update(_per_rank_objects(reader_state, layout))
    return sd


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _rename(src: Path, dst: Path) -> None:
    os.replace(src, dst)


def save_checkpoint(ckpt_dir: str | Path, step: int, model_chunks: list, optimizer=None, scheduler=None,
                    reader_state=None, config: Optional[dict] = None, keep_last: int = 0,
                    extra_modules: Optional[dict] = None, describe: Optional[Callable[[Path], None]] = None) -> Path:
    """Write ``<ckpt_dir>/step_<step>`` atomically on every rank; keep the newest ``keep_last`` (0: all).

    ``describe(dir)`` runs on rank 0 before the rename, to add files that travel with the weights (the model
    description and tokenizer files that make the checkpoint usable by mcore-to-hf, generate and evaluate)."""
    final = checkpoint_path(ckpt_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)                 # a leftover of a crashed save of the same step
        tmp.mkdir(parents=True)
    _barrier()
    sd = _state_dict(model_chunks, optimizer, scheduler, step=step, reader_state=reader_state,
                     config=config or {}, is_loading=False, extra_modules=extra_modules)
    dist_checkpointing.save(sd, str(tmp))
    _barrier()                                                 # every rank's shards are on disk
    if rank0:
        if describe is not None:
            describe(tmp)
        if final.exists():
            shutil.rmtree(final)
        _rename(tmp, final)
        if keep_last > 0:
            for _, old in list_checkpoints(ckpt_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: str | Path, model_chunks: list, optimizer=None, scheduler=None,
                    extra_modules: Optional[dict] = None) -> dict:
    """Restore model, optimizer, scheduler and (same layout only) RNG states in place.

    Returns ``{"step", "config", "reader_state", "layout"}``; ``reader_state`` is None when the checkpoint was
    written with a different parallel layout (the reader then restarts its order from the seed).
    """
    path = Path(path)
    common = dist_checkpointing.load_common_state_dict(str(path))
    same_layout = common.get("layout") == _layout()
    sd = _state_dict(model_chunks, optimizer, scheduler, step=0, reader_state=None, config={},
                     is_loading=True, with_objects=same_layout, extra_modules=extra_modules)
    loaded = dist_checkpointing.load(sd, str(path))
    for i, chunk in enumerate(model_chunks):
        _unwrap(chunk).load_state_dict(loaded["model" if len(model_chunks) == 1 else f"model{i}"])
    for name, module in (extra_modules or {}).items():
        _unwrap(module).load_state_dict({k[len(name) + 1:]: v for k, v in loaded[f"extra_{name}"].items()})
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(loaded["scheduler"])
    if same_layout:
        set_rng_state(loaded["rng_state"])
    return {"step": int(loaded["step"]), "config": loaded["config"], "layout": loaded["layout"],
            "reader_state": loaded["data_reader"] if same_layout else None}


class PreemptionHandler:
    """SIGTERM/SIGUSR1 set a flag; :meth:`should_stop` tells every rank at once to save and exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: Optional[int] = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        self.received = signum

    def install(self) -> "PreemptionHandler":
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def should_stop(self) -> bool:
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=device())
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)       # a signal to any rank stops all of them together
        return bool(flag.item() > 0)

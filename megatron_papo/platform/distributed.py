"""Process-group start-up from torchrun or SLURM variables, then megatron's model-parallel state."""

from __future__ import annotations

import datetime
import os
import re
import socket
from dataclasses import dataclass

import torch.distributed as dist

from megatron_papo.platform import cpu_compat
from megatron_papo.platform.device import backend, bind_local_device


@dataclass(frozen=True)
class LaunchInfo:
    """Where this process sits, as told by the launcher."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" | "slurm" | "single"


def first_host(nodelist: str) -> str:
    """First host name of a SLURM node list: ``gpu[003-005,009],cpu1`` -> ``gpu003``."""
    nodelist = nodelist.strip()
    m = re.match(r"^([^\[,]+)(\[([^\]]+)\])?", nodelist)
    if not m:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, _, ranges = m.groups()
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_info(env: dict | None = None) -> LaunchInfo:
    """Read rank/world/master from torchrun variables, else SLURM variables, else a single process."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchInfo(
            rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]), local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"), master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        addr = env.get("MASTER_ADDR") or (first_host(nodelist) if nodelist else "127.0.0.1")
        job = int(env.get("SLURM_JOB_ID", "0") or 0)
        return LaunchInfo(
            rank=int(env["SLURM_PROCID"]), world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)), master_addr=addr,
            master_port=int(env.get("MASTER_PORT", 20000 + job % 20000)), launcher="slurm",
        )
    return LaunchInfo(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", 0)) or _free_port(), "single")


def check_layout(world_size: int, tp: int, pp: int) -> int:
    """Validate TP x PP against the world size and return the data-parallel size."""
    for name, v in (("parallel.tensor_model_parallel_size", tp), ("parallel.pipeline_model_parallel_size", pp)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if world_size % (tp * pp) != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor_model_parallel_size {tp} x "
            f"pipeline_model_parallel_size {pp} = {tp * pp}; launch a multiple of {tp * pp} processes (with --dry-run: "
            "set parallel.world_size) or change parallel.tensor_model_parallel_size / "
            "parallel.pipeline_model_parallel_size"
        )
    return world_size // (tp * pp)


def init_distributed(info: LaunchInfo | None = None, timeout_s: float = 600.0) -> LaunchInfo:
    """Initialise the default process group (idempotent) and apply the CPU adaptation when needed."""
    cpu_compat.apply()
    info = info or launch_info()
    if dist.is_initialized():
        return info
    bind_local_device(info.local_rank)
    dist.init_process_group(
        backend=backend(), init_method=f"tcp://{info.master_addr}:{info.master_port}",
        rank=info.rank, world_size=info.world_size, timeout=datetime.timedelta(seconds=timeout_s),
    )
    return info


def init_model_parallel(tp: int = 1, pp: int = 1, seed: int = 1234) -> int:
    """Create megatron's TP/PP/DP groups on the initialised default group and seed every RNG.

    Returns the data-parallel size.
    """
    from megatron.core import parallel_state

    dp = check_layout(dist.get_world_size(), tp, pp)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp
    )
    from megatron_papo.platform.seed import seed_all

    seed_all(seed)
    return dp


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()

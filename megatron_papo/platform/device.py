"""Device and collective backend, timing and peak memory (with gpu.py, the only modules that name CUDA or NCCL)."""

from __future__ import annotations

import os

import torch


def has_gpu() -> bool:
    return torch.cuda.is_available()


def backend() -> str:
    """NCCL for GPU tensors with a GPU, gloo otherwise (override with MEGATRON_PAPO_BACKEND).

    With a GPU the default group is ``cpu:gloo,cuda:nccl``: model tensors go through NCCL, and the small CPU
    tensors of the trainer's bookkeeping (token counts, metrics, agreement flags) through gloo, instead of
    failing in NCCL, which only takes CUDA tensors. megatron's groups inherit both."""
    return os.environ.get("MEGATRON_PAPO_BACKEND") or ("cpu:gloo,cuda:nccl" if has_gpu() else "gloo")


def device(local_rank: int | None = None) -> torch.device:
    """The device this process computes on: its local GPU, or the CPU."""
    if not has_gpu():
        return torch.device("cpu")
    if local_rank is None:
        local_rank = torch.cuda.current_device()
    return torch.device("cuda", local_rank)


def bind_local_device(local_rank: int) -> torch.device:
    """Select this process's GPU (no-op on CPU) and return its device."""
    if has_gpu():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    return device(local_rank % max(torch.cuda.device_count(), 1) if has_gpu() else None)


def local_world_size(env: dict | None = None) -> int:
    """Processes of this job on this node, from torchrun or SLURM (1 when launched alone)."""
    env = os.environ if env is None else env
    raw = env.get("LOCAL_WORLD_SIZE") or env.get("SLURM_NTASKS_PER_NODE") or "1"
    digits = "".join(ch for ch in raw.split("(")[0] if ch.isdigit())   # SLURM writes e.g. "4(x2)"
    return max(1, int(digits or 1))


def set_cpu_threads(requested: int = 0, env: dict | None = None) -> int:
    """Set torch's intra-op threads: ``requested``, or (0) the node's cores divided among its ranks."""
    n = requested or max(1, (os.cpu_count() or 1) // local_world_size(env))
    torch.set_num_threads(n)
    return n


def synchronize() -> None:
    if has_gpu():
        torch.cuda.synchronize()


def max_memory_allocated() -> int:
    """Peak accelerator memory in bytes (0 on CPU, where RSS is the measure)."""
    return torch.cuda.max_memory_allocated() if has_gpu() else 0


def fp8_available() -> tuple[bool, str]:
    """Whether FP8 can run here, and why not if it cannot."""
    if not has_gpu():
        return False, "FP8 needs an NVIDIA GPU (Ada, Hopper or Blackwell); none is visible to torch"
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError:
        return False, ("FP8 needs Transformer Engine: use an NGC PyTorch container or install it (README section "
                       "'GPU')")
    from megatron_papo.platform.gpu import generation

    cc = tuple(torch.cuda.get_device_capability())
    if cc < (8, 9):
        return False, f"FP8 needs an Ada, Hopper or Blackwell GPU (compute capability >= 8.9); this is {generation(cc)}"
    return True, ""


def reset_peak_memory() -> None:
    if has_gpu():
        torch.cuda.reset_peak_memory_stats()


class Timer:
    """Wall time of a block of device work: CUDA events on a GPU (queued work included), perf_counter on CPU.

    ``with Timer() as t: ...`` then ``t.seconds``."""

    def __enter__(self):
        import time

        if has_gpu():
            self._start, self._end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        import time

        if has_gpu():
            self._end.record()
            self._end.synchronize()
            self.seconds = self._start.elapsed_time(self._end) / 1e3
        else:
            self.seconds = time.perf_counter() - self._t0

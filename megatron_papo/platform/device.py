"""Device and collective backend choice: the only place that names CUDA or NCCL."""

from __future__ import annotations

import os

import torch


def has_gpu() -> bool:
    return torch.cuda.is_available()


def backend() -> str:
    """``nccl`` with a GPU, ``gloo`` otherwise (override with MEGATRON_PAPO_BACKEND)."""
    return os.environ.get("MEGATRON_PAPO_BACKEND") or ("nccl" if has_gpu() else "gloo")


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


def synchronize() -> None:
    if has_gpu():
        torch.cuda.synchronize()


def max_memory_allocated() -> int:
    """Peak accelerator memory in bytes (0 on CPU, where RSS is the measure)."""
    return torch.cuda.max_memory_allocated() if has_gpu() else 0


def fp8_available() -> tuple[bool, str]:
    """Whether FP8 can run here, and why not if it cannot."""
    if not has_gpu():
        return False, "FP8 needs an NVIDIA GPU (Hopper or newer); none is visible to torch"
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError:
        return False, "FP8 needs Transformer Engine: install transformer-engine[pytorch] or use an NGC PyTorch container"
    major, _ = torch.cuda.get_device_capability()
    if major < 9:
        return False, f"FP8 needs compute capability >= 9.0 (Hopper); this GPU has {major}.x"
    return True, ""

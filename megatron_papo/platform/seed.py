"""Seeding of python, numpy, torch and megatron's model-parallel RNG tracker, and RNG state capture."""

from __future__ import annotations

import random

import numpy as np
import torch

from megatron_papo.platform import cpu_compat


def seed_all(seed: int) -> None:
    """Seed every RNG. Data-parallel ranks share the seed (same init); megatron offsets the TP stream per rank."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if cpu_compat.is_active():
        cpu_compat.install_cpu_rng_tracker()
    if parallel_state.model_parallel_is_initialized():
        model_parallel_cuda_manual_seed(seed)


def rng_state() -> dict:
    """Everything needed to continue the random streams exactly after a resume."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "tracker": tracker.get_states() if tracker is not None else None,
    }


def set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if state.get("tracker") is not None:
        get_cuda_rng_tracker().set_states(state["tracker"])

"""Platform layer: device/backend choice, process groups, seeding, the CPU adaptation of megatron-core, GPU
generations and FP8 recipe support, and the optional-accelerator notice."""

from megatron_papo.platform.device import (
    Timer,
    backend,
    device,
    fp8_available,
    has_gpu,
    local_world_size,
    max_memory_allocated,
    reset_peak_memory,
    set_cpu_threads,
    synchronize,
)
from megatron_papo.platform.distributed import (
    LaunchInfo,
    check_layout,
    first_host,
    init_distributed,
    init_model_parallel,
    launch_info,
    shutdown,
)
from megatron_papo.platform.seed import rng_state, seed_all, set_rng_state

__all__ = [
    "LaunchInfo", "Timer", "backend", "check_layout", "device", "first_host", "fp8_available", "has_gpu",
    "init_distributed", "init_model_parallel", "launch_info", "local_world_size", "max_memory_allocated",
    "reset_peak_memory", "rng_state", "seed_all", "set_cpu_threads", "set_rng_state", "shutdown", "synchronize",
]

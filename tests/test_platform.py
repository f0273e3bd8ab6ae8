import pytest
import torch

from megatron_papo.platform import check_layout, first_host, launch_info
from megatron_papo.platform import cpu_compat
from multirank import run_multirank


@pytest.mark.parametrize("nodelist, host", [
    ("gpu[003-005,009]", "gpu003"), ("node7", "node7"), ("a-b[12,14],c[1-2]", "a-b12"), ("n[1-2],m5", "n1"),
])
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host


def test_launch_info_sources():
    t = launch_info({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "99"})
    assert (t.rank, t.world_size, t.local_rank, t.master_addr, t.master_port, t.launcher) == (3, 4, 1, "h", 99,
                                                                                            "torchrun")
    s = launch_info({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                     "SLURM_JOB_NODELIST": "gpu[010-011]", "SLURM_JOB_ID": "123"})
    assert (s.rank, s.world_size, s.local_rank, s.master_addr, s.launcher) == (5, 8, 1, "gpu010", "slurm")
    assert s.master_port == 20123
    one = launch_info({})
    assert (one.rank, one.world_size, one.launcher) == (0, 1, "single")


def test_check_layout():
    assert check_layout(8, 2, 2) == 2
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by tensor_model_parallel_size 2 x "
                                         r"pipeline_model_parallel_size 2 = 4"):
        check_layout(6, 2, 2)
    with pytest.raises(ValueError, match="parallel.tensor_model_parallel_size must be >= 1"):
        check_layout(4, 0, 1)


def test_cpu_adaptation_matches_pinned_megatron():
    """Fails loudly if megatron-core moves under the adaptation (re-verify cpu_compat.py on upgrade)."""
    import inspect

    import megatron.core
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mp_random

    assert megatron.core.__version__ == cpu_compat.MEGATRON_CORE_VERSION
    assert inspect.getsource(schedules).count('device="cuda"') == 3, "schedules' literal cuda allocations moved"
    assert hasattr(mp_random, "_CUDA_RNG_STATE_TRACKER") and hasattr(mp_random, "_CUDA_RNG_STATE_TRACKER_INITIALIZED")
    if not torch.cuda.is_available():
        assert cpu_compat.apply()
        assert torch.cuda.current_device() == torch.device("cpu")
        assert schedules.torch.zeros([], device="cuda").device.type == "cpu"
        assert isinstance(mp_random.get_cuda_rng_tracker(), cpu_compat.CpuRNGStatesTracker)


def test_cpu_rng_tracker_forks_independent_streams():
    tr = cpu_compat.CpuRNGStatesTracker()
    tr.add("a", 1)
    torch.manual_seed(0)
    outer = torch.rand(3)
    torch.manual_seed(0)
    with tr.fork("a"):
        x1 = torch.rand(3)
    after = torch.rand(3)
    torch.testing.assert_close(after, outer)  # the default stream is untouched by the fork
    with tr.fork("a"):
        x2 = torch.rand(3)
    assert not torch.equal(x1, x2)  # the named stream advanced
    torch.testing.assert_close(x1, torch.rand(3, generator=torch.Generator().manual_seed(1)))
    with pytest.raises(Exception, match="already exists"):
        tr.add("b", 1)


def _seeded_dropout(rank, world):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    with get_cuda_rng_tracker().fork():
        tp_stream = torch.rand(4)
    return ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank(), torch.rand(4), tp_stream


def test_model_parallel_seeding_tp_streams_differ_dp_same():
    out = run_multirank(_seeded_dropout, 4, tp=2, pp=1, seed=7, timeout=120)
    by = {(tp, dp): (default, tps) for tp, dp, default, tps in out}
    torch.testing.assert_close(by[(0, 0)][0], by[(1, 0)][0])  # default stream: same seed on every rank
    assert not torch.equal(by[(0, 0)][1], by[(1, 0)][1])  # TP ranks get different model-parallel streams
    torch.testing.assert_close(by[(0, 0)][1], by[(0, 1)][1])  # ... shared across data-parallel replicas


def test_cpu_threads_split_among_local_ranks():
    import os

    from megatron_papo.platform import local_world_size, set_cpu_threads

    assert local_world_size({"LOCAL_WORLD_SIZE": "4"}) == 4
    assert local_world_size({"SLURM_NTASKS_PER_NODE": "2(x3)"}) == 2
    assert local_world_size({}) == 1
    before = torch.get_num_threads()
    try:
        assert set_cpu_threads(1) == 1 and torch.get_num_threads() == 1
        cores = os.cpu_count() or 1
        assert set_cpu_threads(0, {"LOCAL_WORLD_SIZE": str(cores)}) == 1
        assert set_cpu_threads(0, {}) == cores
    finally:
        torch.set_num_threads(before)
